//! `relay_request`: everything a relay reads from the network (transport
//! v2, PROTOCOL.md §3.2–§3.8). Modes (first byte):
//!
//! 0. arbitrary bytes as message 1 to a fixed relay identity (what anyone can
//!    send after the upgrade): refused unless it is a client's own message 1;
//! 1. an arbitrary frame through `frame::parse_commands`, as-is and padded to
//!    a frame length; every record it accepts re-encodes to itself, and no
//!    signature in it verifies under an unrelated key;
//! 2. whole sessions against a real `handler::Handler` over a SQLite store in
//!    a temporary directory, without sockets: two sessions (as two clients
//!    would hold) run a program of frames of commands — CREATE, SECURE, SEND
//!    (signed, unsigned, wrongly signed), SUB, ACK, ACK_UPTO, DELETE, UNSUB,
//!    CHECK, INFO, raw records — signed by the right key, a wrong one or
//!    none; records replayed from the other session; tampered and replayed
//!    transport messages; time passing, purges and new sessions.
//!
//! Invariants of a session, besides "no panic":
//! - every command gets exactly one answer, in order, with its tag, and
//!   every frame the relay sends opens and parses;
//! - a command not signed by the queue's key never succeeds (SECURE, SUB,
//!   ACK, ACK_UPTO and DELETE need the recipient key, SEND the sender key
//!   once secured), and a record signed in one session never succeeds in
//!   the other; an unknown queue answers nothing but errors;
//! - a queue accepts exactly one unsigned SEND, and none once secured; its
//!   sender key never changes once set;
//! - a pushed message opens under the recipient's queue secret, is one that
//!   was sent to that queue, and was not deleted (acknowledged, or with its
//!   queue);
//! - a tampered or replayed transport message ends the session;
//! - once every session has ended, no subscription is left registered.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use ed25519_dalek::SigningKey;
use tern_relay::config::AccessKey;
use tern_relay::handler::{Handler, Policy, SessionState};
use tern_relay::limits::{Origin, Rate};
use tern_relay::store::{QueueRef, Store, DB_FILE};
use tern_wire::delivery::{delivery_open, queue_secret};
use tern_wire::frame::{padded_len, parse_commands, parse_replies, FrameBuilder, MAX_FRAME_LEN};
use tern_wire::session::{Fixed, MSG1_LEN};
use tern_wire::{
    ClientHandshake, Command, ErrorCode, Id, Reply, Request, ServerHandshake, Session,
    QUEUE_MSG_LEN,
};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use super::input::{padded, Input};
use super::relay_response::{relay_info, relay_public, RELAY_E, RELAY_KEM, RELAY_SECRET};

/// Most steps one program takes, so one input stays cheap.
const MAX_STEPS: usize = 20;
const START_MS: u64 = 1_700_000_000_000;
const ACCESS_KEY: &str = "fuzz-access_key";
const KEYS: usize = 4;

pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let mode = input.u8();
    match mode % 3 {
        0 => {
            let rest = input.rest();
            let msg1 = if mode & 0x80 != 0 {
                rest.to_vec()
            } else {
                padded(rest, MSG1_LEN)
            };
            let answered = ServerHandshake::respond_fixed(
                &RELAY_SECRET,
                &msg1,
                &relay_info(),
                Fixed {
                    ephemeral: &RELAY_E,
                    kem: &RELAY_KEM,
                },
            );
            // Anyone can write a message 1 to a relay, but not by flipping
            // bits: one that is answered is well formed.
            if answered.is_ok() {
                assert_eq!(msg1.len(), MSG1_LEN);
            }
        }
        1 => {
            let rest = input.rest();
            decode_frame(rest);
            decode_frame(&padded(rest, padded_len(rest.len()).min(MAX_FRAME_LEN)));
        }
        _ => Program::run(&mut input),
    }
}

/// The record a decoded command came from, re-encoded with the signature
/// (and a SEND's flag) it carried.
fn record_of(r: &Request) -> Vec<u8> {
    let mut rec = Vec::new();
    Request::encode(r.tag, &r.command, &[0; 32], None, &mut rec);
    if let Some(sig) = r.signature {
        if matches!(r.command, Command::Send { .. }) {
            rec[5 + 16] = 1;
        }
        let n = rec.len();
        rec[n - 64..].copy_from_slice(&sig);
    }
    rec
}

fn decode_frame(frame: &[u8]) {
    let Ok(reqs) = parse_commands(frame) else {
        return;
    };
    let key = SigningKey::from_bytes(&[1; 32]).verifying_key().to_bytes();
    let mut again = Vec::new();
    for r in &reqs {
        let _ = format!("{r:?}");
        assert!(!r.verify(&[0; 32], &key));
        again.extend(record_of(r));
    }
    assert!(again.len() <= frame.len());
    again.resize(frame.len(), 0);
    assert_eq!(again, frame, "the frame format is not canonical");
}

/// What the program knows about a queue it created.
struct Queue {
    recipient_id: Id,
    sender_id: Id,
    recipient: usize,
    secret: [u8; 32],
    sender: Option<usize>,
    unsigned_used: bool,
    /// Every message accepted, by content; ids seen pushed; ids deleted.
    sent: Vec<Vec<u8>>,
    acked: Vec<Id>,
    last_msg: Option<Id>,
    deleted: bool,
}

/// One client's session with the relay.
struct Client {
    ticket: u64,
    session: Session,
    state: Box<SessionState>,
    next_tag: u32,
    /// Live subscriptions: tag → queue index.
    subs: HashMap<u32, usize>,
    /// A signed record sent in this session (for replays elsewhere).
    last_signed: Option<Vec<u8>>,
    /// The last transport message sent (for replays within the session).
    last_message: Option<Vec<u8>>,
}

/// Who signs a command.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Signer {
    Right,
    Wrong(usize),
    None,
}

/// What a command in a frame expects of its answer.
struct Sent {
    tag: u32,
    /// The queue it names, if one the program knows.
    queue: Option<usize>,
    /// Whether the relay may accept it.
    authorised: bool,
    what: What,
}

enum What {
    Info,
    Create {
        recipient: usize,
        dh: Option<StaticSecret>,
        signed_right: bool,
    },
    Secure {
        sender: usize,
    },
    Send {
        message: Vec<u8>,
        key: Option<usize>,
    },
    Sub,
    Ack {
        msg_id: Id,
        upto: bool,
    },
    Delete,
    Unsub {
        sub_tag: u32,
    },
    Check,
    /// A record replayed from the other session: never accepted.
    Replayed,
    Raw,
}

struct Program {
    handler: Handler,
    wakes: Arc<Mutex<Vec<(u64, QueueRef, bool)>>>,
    now_ms: u64,
    signers: Vec<SigningKey>,
    dh: Vec<StaticSecret>,
    queues: Vec<Queue>,
    clients: [Option<Client>; 2],
    sessions_made: u8,
}

impl Program {
    fn run(input: &mut Input<'_>) {
        let dir = temp_dir();
        let store = Store::open(&dir.path().join(DB_FILE)).expect("open relay store");
        let policy = Policy {
            access_keys: if input.bool() {
                vec![AccessKey::new(ACCESS_KEY)]
            } else {
                Vec::new()
            },
            ttl_secs: 3600 * (1 + u32::from(input.u8() % 48)),
            max_pending: 1 + u32::from(input.u8() % 8),
            max_data_bytes: u64::MAX,
            max_open_queues: 1 + u64::from(input.u8() % 16),
            unsecured_days: u32::from(input.u8() % 3),
            create_rate_connection: Rate {
                burst: 1 + u32::from(input.u8() % 8),
                per_minute: 60,
            },
            create_rate_address: Rate {
                burst: 16,
                per_minute: 240,
            },
            max_subscriptions: 1 + u16::from(input.u8() % 4),
            max_window: 1 + u16::from(input.u8() % 4),
            session_push_budget: 1 + usize::from(input.u8() % 6),
        };
        let wakes: Arc<Mutex<Vec<(u64, QueueRef, bool)>>> = Arc::default();
        let sink = wakes.clone();
        let handler = Handler::new(
            Zeroizing::new(RELAY_SECRET),
            store,
            policy,
            Box::new(move |t, q, gone| {
                sink.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push((t, q, gone))
            }),
        );
        assert_eq!(handler.public_key(), relay_public());
        let mut p = Program {
            handler,
            wakes,
            now_ms: START_MS,
            signers: (0..KEYS)
                .map(|i| SigningKey::from_bytes(&[i as u8 + 1; 32]))
                .collect(),
            dh: (0..KEYS)
                .map(|i| StaticSecret::from([i as u8 + 0x40; 32]))
                .collect(),
            queues: Vec::new(),
            clients: [None, None],
            sessions_made: 0,
        };
        for _ in 0..MAX_STEPS {
            if input.is_empty() {
                break;
            }
            p.step(input);
        }
        for c in p.clients.iter_mut() {
            if let Some(c) = c.take() {
                p.handler.end_session(&c.state);
            }
        }
        assert_eq!(
            p.handler.subscriptions(),
            0,
            "a subscription outlived its session"
        );
    }

    /// The client `i`, connected first if it is not.
    fn client(&mut self, i: usize) -> &mut Client {
        if self.clients[i].is_none() {
            self.sessions_made = self.sessions_made.wrapping_add(1);
            let e = [self.sessions_made; 32];
            let kem = [self.sessions_made ^ 0x5a; 64];
            let (hs, msg1) = ClientHandshake::start_fixed(
                &relay_public(),
                Fixed {
                    ephemeral: &e,
                    kem: &kem,
                },
            )
            .unwrap();
            let ticket = u64::from(self.sessions_made);
            let (state, msg2) = self
                .handler
                .handshake(&msg1, ticket, Origin::of("127.0.0.1".parse().unwrap()))
                .expect("the relay answers a client's message 1");
            let (session, info) = hs.finish(&msg2).expect("the client accepts the relay");
            assert_eq!(info, self.handler.info());
            assert_eq!(session.hash(), state.hash());
            self.clients[i] = Some(Client {
                ticket,
                session,
                state,
                // Separate tag spaces, so that a record replayed from the
                // other session never shares a tag with this one's.
                next_tag: if i == 0 { 0 } else { 0x8000_0000 },
                subs: HashMap::new(),
                last_signed: None,
                last_message: None,
            });
        }
        self.clients[i].as_mut().expect("connected")
    }

    fn end(&mut self, i: usize) {
        if let Some(c) = self.clients[i].take() {
            self.handler.end_session(&c.state);
        }
    }

    fn signer(input: &mut Input<'_>) -> Signer {
        match input.u8() % 4 {
            0 | 1 => Signer::Right,
            2 => Signer::Wrong(input.below(KEYS)),
            _ => Signer::None,
        }
    }

    fn key(signer: Signer, right: Option<usize>) -> Option<usize> {
        match signer {
            Signer::Right => right,
            Signer::Wrong(k) => Some(k),
            Signer::None => None,
        }
    }

    /// A known queue (by index) or, one time in eight, an unknown one.
    fn target(&self, input: &mut Input<'_>) -> Option<usize> {
        let b = input.u8();
        if self.queues.is_empty() || b % 8 == 7 {
            None
        } else {
            Some(b as usize % self.queues.len())
        }
    }

    fn step(&mut self, input: &mut Input<'_>) {
        let who = input.below(2);
        match input.u8() % 8 {
            0..=3 => self.frame(who, input),
            4 => {
                // A tampered, or replayed, transport message ends the session.
                let c = self.client(who);
                let m = match (c.last_message.clone(), input.bool()) {
                    (Some(m), true) => m,
                    _ => {
                        let mut b = FrameBuilder::new();
                        let mut rec = Vec::new();
                        Request::encode(0, &Command::Info, &[0; 32], None, &mut rec);
                        b.push(&rec);
                        let mut m = c.session.seal(&b.finish()[0]).unwrap();
                        let at = input.u16() as usize % m.len();
                        m[at] ^= input.u8() | 1;
                        m
                    }
                };
                let now = self.now_ms;
                let c = self.clients[who].as_mut().unwrap();
                let out = self.handler.process(&mut c.state, &[m], &[], now);
                assert!(
                    out.close,
                    "a tampered or replayed message did not end the session"
                );
                self.end(who);
            }
            5 => {
                // Time passes (up to about 3 days), expired things go.
                self.now_ms += u64::from(input.u16()) * u64::from(1 + input.u8() % 64) * 64;
                if input.bool() {
                    self.handler.purge(self.now_ms).expect("purge");
                }
            }
            6 => self.end(who),
            _ => {
                // Pending pushes and ENDEDs for this session.
                self.exchange(who, Vec::new(), Vec::new());
            }
        }
    }

    /// A frame of one to four commands.
    fn frame(&mut self, who: usize, input: &mut Input<'_>) {
        let n = 1 + input.below(4);
        let hash = *self.client(who).session.hash();
        let mut records = Vec::new();
        let mut sent = Vec::new();
        let mut replayed = false;
        for _ in 0..n {
            let tag = {
                let c = self.client(who);
                c.next_tag += 1;
                c.next_tag
            };
            let (command, key, s) = self.command(who, tag, input);
            let signing = key.map(|k| self.signers[k].clone());
            let mut rec = Vec::new();
            let mut s = s;
            let (is_replay, is_raw) = (
                matches!(s.what, What::Replayed),
                matches!(s.what, What::Raw),
            );
            match () {
                () if is_replay => {
                    let other = self.clients[1 - who].as_ref();
                    match other
                        .and_then(|o| o.last_signed.clone())
                        .filter(|_| !replayed)
                    {
                        // Sent as it was, its own tag included (from the
                        // other session's tag space).
                        Some(r) => {
                            s.tag = u32::from_be_bytes(r[1..5].try_into().unwrap());
                            replayed = true;
                            rec = r;
                        }
                        None => {
                            s.what = What::Info;
                            s.authorised = true;
                            Request::encode(tag, &Command::Info, &hash, None, &mut rec);
                        }
                    }
                }
                () if is_raw => rec = raw_record(tag, input),
                () => Request::encode(tag, &command, &hash, signing.as_ref(), &mut rec),
            }
            if signing.is_some() && !is_replay {
                self.clients[who].as_mut().unwrap().last_signed = Some(rec.clone());
            }
            records.push(rec);
            sent.push(s);
        }
        self.exchange(who, records, sent);
    }

    /// Chooses a command; returns it, its signing key and what it expects.
    fn command(
        &mut self,
        who: usize,
        tag: u32,
        input: &mut Input<'_>,
    ) -> (Command, Option<usize>, Sent) {
        let target = self.target(input);
        let signer = Self::signer(input);
        let recipient = target.map(|i| self.queues[i].recipient);
        let rid = match target {
            Some(i) => self.queues[i].recipient_id,
            None => input.array::<16>(),
        };
        let sent = |queue, authorised, what| Sent {
            tag,
            queue,
            authorised,
            what,
        };
        match input.u8() % 11 {
            0 => (Command::Info, None, sent(None, true, What::Info)),
            1 => {
                let access_key = match input.u8() % 3 {
                    0 => None,
                    1 => Some(ACCESS_KEY.to_string()),
                    _ => Some("not-the-key".to_string()),
                };
                let r = input.below(KEYS);
                let (recipient_dh, dh) = match input.u8() % 6 {
                    5 => ([0u8; 32], None),
                    i => {
                        let s = self.dh[usize::from(i) % KEYS].clone();
                        (PublicKey::from(&s).to_bytes(), Some(s))
                    }
                };
                let key = Self::key(signer, Some(r));
                let command = Command::Create {
                    access_key,
                    recipient_auth: self.signers[r].verifying_key().to_bytes(),
                    recipient_dh,
                };
                let what = What::Create {
                    recipient: r,
                    dh,
                    signed_right: key == Some(r),
                };
                (command, key, sent(None, true, what))
            }
            2 => {
                let key = Self::key(signer, recipient);
                let sender = input.below(KEYS);
                let command = Command::Secure {
                    recipient_id: rid,
                    sender_auth: self.signers[sender].verifying_key().to_bytes(),
                };
                let ok = target.is_some() && key.is_some() && key == recipient;
                (command, key, sent(target, ok, What::Secure { sender }))
            }
            3 | 4 => {
                let sender_id = match target {
                    Some(i) => self.queues[i].sender_id,
                    None => input.array::<16>(),
                };
                let right = target.and_then(|i| self.queues[i].sender);
                let key = Self::key(signer, right);
                let message = padded(input.var_bytes(48), QUEUE_MSG_LEN);
                let command = Command::Send {
                    sender_id,
                    message: message.clone(),
                };
                (
                    command,
                    key,
                    sent(target, true, What::Send { message, key }),
                )
            }
            5 => {
                let key = Self::key(signer, recipient);
                let ok = target.is_some() && key.is_some() && key == recipient;
                let command = Command::Subscribe {
                    recipient_id: rid,
                    window: input.u16() % 8,
                };
                (command, key, sent(target, ok, What::Sub))
            }
            6 | 7 => {
                let key = Self::key(signer, recipient);
                let ok = target.is_some() && key.is_some() && key == recipient;
                let msg_id = match (target.and_then(|i| self.queues[i].last_msg), input.bool()) {
                    (Some(id), true) => id,
                    _ => input.array::<16>(),
                };
                let upto = input.bool();
                let command = if upto {
                    Command::AckUpTo {
                        recipient_id: rid,
                        msg_id,
                    }
                } else {
                    Command::Ack {
                        recipient_id: rid,
                        msg_id,
                    }
                };
                (command, key, sent(target, ok, What::Ack { msg_id, upto }))
            }
            8 => {
                let key = Self::key(signer, recipient);
                let ok = target.is_some() && key.is_some() && key == recipient;
                let command = Command::Delete {
                    recipient_id: rid,
                    if_empty: input.bool(),
                };
                (command, key, sent(target, ok, What::Delete))
            }
            9 => {
                let subs: Vec<u32> = self.clients[who]
                    .as_ref()
                    .map(|c| c.subs.keys().copied().collect())
                    .unwrap_or_default();
                let sub_tag = match subs.is_empty() {
                    true => input.u32(),
                    false => subs[input.below(subs.len())],
                };
                (
                    Command::Unsubscribe { sub_tag },
                    None,
                    sent(None, true, What::Unsub { sub_tag }),
                )
            }
            _ => match input.u8() % 3 {
                0 => (
                    Command::Check { recipient_id: rid },
                    None,
                    sent(target, true, What::Check),
                ),
                1 => (Command::Info, None, sent(None, false, What::Replayed)),
                _ => (Command::Info, None, sent(None, true, What::Raw)),
            },
        }
    }

    /// Sends `records` (if any) in frames and checks what comes back.
    fn exchange(&mut self, who: usize, records: Vec<Vec<u8>>, sent: Vec<Sent>) {
        let now = self.now_ms;
        let ticket = self.client(who).ticket;
        let wakes: Vec<(QueueRef, bool)> = {
            let mut all = self.wakes.lock().unwrap_or_else(PoisonError::into_inner);
            let mine = all
                .iter()
                .filter(|w| w.0 == ticket)
                .map(|w| (w.1, w.2))
                .collect();
            all.retain(|w| w.0 != ticket);
            mine
        };
        let c = self.clients[who].as_mut().unwrap();
        let mut b = FrameBuilder::new();
        for r in &records {
            b.push(r);
        }
        let messages: Vec<Vec<u8>> = b
            .finish()
            .iter()
            .map(|f| c.session.seal(f).unwrap())
            .collect();
        if let Some(m) = messages.last() {
            c.last_message = Some(m.clone());
        }
        let out = self.handler.process(&mut c.state, &messages, &wakes, now);
        let mut replies = Vec::new();
        for m in &out.messages {
            let f = c.session.open(m).expect("the relay's frames open");
            replies.extend(parse_replies(&f).expect("the relay's frames parse"));
        }
        // A raw record that does not parse ends the session: nothing of
        // that frame is answered.
        let raw_broke = out.close;
        if raw_broke {
            assert!(
                sent.iter().any(|s| matches!(s.what, What::Raw)),
                "the relay ended a session over well-formed records"
            );
        }
        let mut answers: HashMap<u32, Reply> = HashMap::new();
        let mut order = Vec::new();
        let mut pushes = Vec::new();
        for (tag, reply) in replies {
            let command = sent.iter().find(|s| s.tag == tag);
            if let Some(s) = command.filter(|_| !answers.contains_key(&tag)) {
                // Subscriptions start and end where their answers are: the
                // records after them are routed accordingly.
                let c = self.clients[who].as_mut().unwrap();
                match (&s.what, &reply) {
                    (What::Sub, Reply::Ok) => {
                        let q = s.queue.expect("SUB of an unknown queue succeeded");
                        c.subs.retain(|_, v| *v != q);
                        c.subs.insert(tag, q);
                    }
                    (What::Unsub { sub_tag }, Reply::Ok) => {
                        c.subs.remove(sub_tag);
                    }
                    _ => {}
                }
                order.push(tag);
                answers.insert(tag, reply);
                continue;
            }
            let Some(&q) = self.clients[who].as_ref().unwrap().subs.get(&tag) else {
                panic!("a record with tag {tag} that nobody asked for: {reply:?}");
            };
            if reply == Reply::Ended {
                self.clients[who].as_mut().unwrap().subs.remove(&tag);
            } else {
                // Checked once the answers before it are taken in: a
                // message pushed may be one a SEND of this frame sent.
                pushes.push((q, reply));
            }
        }
        if raw_broke {
            for (q, reply) in pushes {
                self.pushed(q, &reply);
            }
            self.end(who);
            return;
        }
        let expected: Vec<u32> = sent.iter().map(|s| s.tag).collect();
        assert_eq!(order, expected, "answers out of order or missing");
        for s in sent {
            let reply = answers.remove(&s.tag).expect("answered");
            self.answered(who, s, reply);
        }
        for (q, reply) in pushes {
            self.pushed(q, &reply);
        }
    }

    /// A MSG or IDLE pushed for a subscription of queue `q`.
    fn pushed(&mut self, q: usize, reply: &Reply) {
        match reply {
            Reply::Message { msg_id, body, .. } => {
                let queue = &mut self.queues[q];
                assert!(!queue.deleted, "a deleted queue pushed a message");
                assert!(
                    !queue.acked.contains(msg_id),
                    "an acknowledged message came back"
                );
                let plain = delivery_open(&queue.secret, msg_id, body)
                    .expect("a pushed message opens under the queue secret");
                assert!(
                    queue.sent.contains(&plain),
                    "pushed a message nobody sent to this queue"
                );
                queue.last_msg = Some(*msg_id);
            }
            Reply::Idle => {}
            other => panic!("a subscription pushed {other:?}"),
        }
    }

    fn answered(&mut self, who: usize, s: Sent, reply: Reply) {
        if !s.authorised {
            assert!(
                matches!(reply, Reply::Error(_)),
                "accepted without the queue's key: {reply:?}"
            );
        }
        match s.what {
            What::Info => assert!(matches!(reply, Reply::Info(_))),
            What::Create {
                recipient,
                dh,
                signed_right,
            } => {
                let Reply::Queue {
                    recipient_id,
                    sender_id,
                    relay_dh,
                } = reply
                else {
                    assert!(
                        matches!(reply, Reply::Error(_)),
                        "CREATE answered {reply:?}"
                    );
                    return;
                };
                assert!(signed_right, "CREATE accepted a bad signature");
                let dh = dh.expect("a low-order recipient key was accepted");
                assert!(
                    self.queues
                        .iter()
                        .all(|q| q.recipient_id != recipient_id && q.sender_id != sender_id),
                    "the relay handed out an id twice"
                );
                let secret = queue_secret(&dh, &relay_dh).expect("contributory");
                self.queues.push(Queue {
                    recipient_id,
                    sender_id,
                    recipient,
                    secret: *secret,
                    sender: None,
                    unsigned_used: false,
                    sent: Vec::new(),
                    acked: Vec::new(),
                    last_msg: None,
                    deleted: false,
                });
            }
            What::Secure { sender } => {
                if reply == Reply::Ok {
                    let q = &mut self.queues[s.queue.unwrap()];
                    assert!(!q.deleted, "SECURE on a deleted queue");
                    assert!(
                        q.sender.is_none() || q.sender == Some(sender),
                        "the sender key of a secured queue was replaced"
                    );
                    q.sender = Some(sender);
                }
            }
            What::Send { message, key } => {
                if reply != Reply::Ok {
                    assert!(matches!(reply, Reply::Error(_)), "SEND answered {reply:?}");
                    return;
                }
                let q = &mut self.queues[s.queue.expect("SEND to an unknown queue succeeded")];
                assert!(!q.deleted, "SEND to a deleted queue succeeded");
                match key {
                    None => {
                        assert!(
                            q.sender.is_none() && !q.unsigned_used,
                            "a second or late unsigned SEND was accepted"
                        );
                        q.unsigned_used = true;
                    }
                    Some(k) => assert_eq!(Some(k), q.sender, "SEND accepted a wrong signature"),
                }
                q.sent.push(message);
            }
            // Registered as its answer came (see `exchange`).
            What::Sub => assert!(matches!(reply, Reply::Ok | Reply::Error(_))),
            What::Ack { msg_id, upto } => {
                assert!(matches!(
                    reply,
                    Reply::Ok
                        | Reply::Error(
                            ErrorCode::NoMessage | ErrorCode::Auth | ErrorCode::Internal
                        )
                ));
                if reply == Reply::Ok && !upto {
                    self.queues[s.queue.unwrap()].acked.push(msg_id);
                }
            }
            What::Delete => {
                if reply == Reply::Ok {
                    let q = s.queue.unwrap();
                    self.queues[q].deleted = true;
                    let c = self.clients[who].as_mut().unwrap();
                    assert!(
                        !c.subs.values().any(|v| *v == q),
                        "DELETE's OK came before the subscription's ENDED"
                    );
                }
            }
            What::Unsub { .. } => assert_eq!(reply, Reply::Ok),
            What::Check => {
                if let Reply::Count(_) = reply {
                    assert!(s.queue.is_some(), "CHECK counted an unknown queue");
                } else {
                    assert_eq!(reply, Reply::Error(ErrorCode::Auth));
                }
            }
            What::Replayed => {}
            What::Raw => {}
        }
    }
}

/// A record of any command but UNSUB (which could end a subscription the
/// program would not know of), with the length its code implies and a body
/// from the input: it parses as one record, with tag `tag`, or breaks the
/// frame.
fn raw_record(tag: u32, input: &mut Input<'_>) -> Vec<u8> {
    const CODES: [u8; 9] = [0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x0A];
    let code = CODES[input.below(CODES.len())];
    let body = padded(input.var_bytes(200), 1 + 64 + 32 + 32 + 64);
    let body_len = match code {
        0x01 => 0,
        0x02 => 1 + usize::from(body[0]).min(64) + 32 + 32 + 64,
        0x03 => 16 + 32 + 64,
        0x04 => 16 + 1 + QUEUE_MSG_LEN + 64,
        0x05 => 16 + 2 + 64,
        0x06 | 0x07 => 16 + 16 + 64,
        0x08 => 16 + 1 + 64,
        _ => 16,
    };
    let mut rec = vec![code];
    rec.extend(tag.to_be_bytes());
    rec.extend(padded(&body, body_len));
    rec
}

/// A directory for one program's database: in memory where the machine has
/// a tmpfs, since every commit is fsynced.
pub fn temp_dir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::Builder::new().prefix("tern-fuzz").tempdir_in(shm) {
            return d;
        }
    }
    tempfile::tempdir().expect("temporary directory")
}
