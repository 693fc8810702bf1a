//! `relay_request`: everything a relay reads from the network.
//!
//! Modes (first byte):
//! 0. an arbitrary block through `seal::open_request` with a fixed identity
//!    (what anyone on the network can post);
//! 1. an arbitrary plaintext through `wire::Request::decode` (as-is and
//!    zero-padded to `REQUEST_LEN`), then `Request::verify`;
//! 2. a whole session against a real `handler::Handler` over a SQLite store
//!    in a temporary directory, with no sockets: the rest of the input is a
//!    program of requests (create, secure, send, fetch with long-poll, ack,
//!    delete, raw plaintexts, replays, clock changes, purges), each sealed
//!    to the relay, signed by the right key, by a wrong one or not at all.
//!
//! Invariants of a session, besides "no panic":
//! - every block the harness seals is answered (never `Reject`), with a
//!   block that opens under the request's response key and decodes;
//! - a request that is not signed by the queue's key never succeeds
//!   (SECURE/FETCH/ACK/DELETE need the recipient key, SEND the sender key
//!   once secured); an unknown queue never answers anything but an error;
//! - a queue accepts exactly one unsigned SEND, and none once secured; its
//!   sender key never changes once set;
//! - a delivered message opens under the recipient's queue secret and is one
//!   that was sent to that queue, not yet acknowledged, not deleted;
//! - a block that was accepted once is refused when replayed (`Stale`);
//! - once every parked FETCH has been answered, none is left registered.

use std::path::Path;

use ed25519_dalek::SigningKey;
use rand::rngs::StdRng;
use rand::SeedableRng;
use tern_relay::handler::{Handler, Outcome, Policy};
use tern_relay::seal::{
    self, delivery_open, open_request, RelayIdentity, RequestSealer, ResponseKey, BLOCK_LEN,
    REQUEST_LEN,
};
use tern_relay::store::{Store, DB_FILE};
use tern_relay::wire::{Command, ErrorCode, Id, Reply, Request, Response, QUEUE_MSG_LEN};
use x25519_dalek::{PublicKey, StaticSecret};

use super::input::{padded, Input};

/// Most requests one session makes, so one input stays cheap.
const MAX_OPS: usize = 24;
const START_MS: u64 = 1_700_000_000_000;
const ACCESS_KEY: &str = "fuzz-access_key";
const KEYS: usize = 4;

pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let mode = input.u8();
    match mode % 3 {
        0 => {
            let rest = input.rest();
            let block = if mode & 0x80 != 0 {
                rest.to_vec()
            } else {
                padded(rest, BLOCK_LEN)
            };
            let identity = RelayIdentity::from_secret(&[0x42; 32]);
            // Anyone can seal to a relay, but not by flipping bits: a block
            // that opens came from a sealer (a kept input, say).
            if let Ok(opened) = open_request(&identity, &block) {
                decode_request(&opened.plaintext);
            }
        }
        1 => {
            let rest = input.rest();
            decode_request(rest);
            decode_request(&padded(rest, REQUEST_LEN));
        }
        _ => Session::run(&mut input),
    }
}

fn decode_request(plaintext: &[u8]) {
    let Ok(req) = Request::decode(plaintext) else {
        return;
    };
    let _ = format!("{req:?}");
    let key = SigningKey::from_bytes(&[1; 32]);
    assert!(!req.verify(plaintext, &[0; 32], key.verifying_key().as_bytes()));
    // Re-encoding (unsigned) gives a request that decodes to the same command.
    let again = Request::encode(&req.command, req.time_ms, &[0; 32], None);
    assert_eq!(again.len(), REQUEST_LEN);
    let back = Request::decode(&again).expect("an encoded request decodes");
    assert_eq!(back.command, req.command);
    assert_eq!(back.time_ms, req.time_ms);
}

/// What the harness knows about a queue it created.
struct Queue {
    recipient_id: Id,
    sender_id: Id,
    recipient: usize,
    secret: [u8; 32],
    sender: Option<usize>,
    unsigned_used: bool,
    /// Every message sent and accepted, and the ids acknowledged.
    sent: Vec<Vec<u8>>,
    acked: Vec<Id>,
    last_msg: Option<Id>,
    deleted: bool,
}

struct Session {
    handler: Handler,
    identity_public: [u8; 32],
    rng: StdRng,
    now_ms: u64,
    skew_ms: i64,
    ticket: u64,
    signers: Vec<SigningKey>,
    dh: Vec<StaticSecret>,
    queues: Vec<Queue>,
    /// The last block sealed, and whether its first answer means it passed
    /// the freshness and replay check.
    last_block: Option<(Vec<u8>, ResponseKey, bool)>,
}

/// Who signs a request.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Signer {
    /// The key the relay expects for this request.
    Right,
    /// Another key from the pool.
    Wrong(usize),
    None,
}

impl Session {
    fn run(input: &mut Input<'_>) {
        let dir = temp_dir();
        let store = Store::open(&dir.path().join(DB_FILE)).expect("open relay store");
        let policy = Policy {
            access_key: input.bool().then(|| ACCESS_KEY.to_string()),
            ttl_secs: 3600 * (1 + u32::from(input.u8() % 48)),
            max_pending: 1 + u32::from(input.u8() % 8),
            max_wait_ms: 30_000,
        };
        let identity = RelayIdentity::from_secret(&[0x42; 32]);
        let identity_public = identity.public();
        let handler = Handler::new(identity, store, policy, START_MS - 10_000, Box::new(|_| {}));
        let mut s = Session {
            handler,
            identity_public,
            rng: StdRng::seed_from_u64(0x5e55),
            now_ms: START_MS,
            skew_ms: 0,
            ticket: 0,
            signers: (0..KEYS)
                .map(|i| SigningKey::from_bytes(&[i as u8 + 1; 32]))
                .collect(),
            dh: (0..KEYS)
                .map(|i| StaticSecret::from([i as u8 + 0x40; 32]))
                .collect(),
            queues: Vec::new(),
            last_block: None,
        };
        for _ in 0..MAX_OPS {
            if input.is_empty() {
                break;
            }
            s.step(input);
        }
        assert_eq!(
            s.handler.waiting(),
            0,
            "a FETCH answered at its deadline left its waiter registered"
        );
    }

    fn signer(&self, input: &mut Input<'_>) -> Signer {
        match input.u8() % 4 {
            0 | 1 => Signer::Right,
            2 => Signer::Wrong(input.below(KEYS)),
            _ => Signer::None,
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
        match input.u8() % 13 {
            0 => {
                let reply = self.call(&Command::Info, None);
                assert!(matches!(reply, Reply::Info(_) | Reply::Error(_)));
            }
            1 => self.create(input),
            2 => self.secure(input),
            3 => self.send(input),
            4 => self.fetch(input),
            5 => self.ack(input),
            6 => self.delete(input),
            7 => {
                // A raw plaintext, sealed properly: decode and dispatch see
                // anything, with a signature field full of input bytes.
                let pt = padded(input.var_bytes(REQUEST_LEN), REQUEST_LEN);
                let reply = self.call_raw(&pt);
                if let Reply::Message { .. } = reply {
                    panic!("an unsigned raw request fetched a message");
                }
            }
            8 => self.replay(),
            9 => {
                // Time passes: up to about 18 hours.
                let step = u64::from(input.u16()) * u64::from(1 + input.u8() % 64) * 16;
                self.now_ms += step;
            }
            10 => self.skew_ms = i64::from(input.u16() as i16) * 8,
            11 => {
                self.handler.purge(self.now_ms).expect("purge");
                self.handler.checkpoint().expect("checkpoint");
            }
            _ => {
                // A block not sealed to this relay (or not a block at all).
                let b = input.var_bytes(BLOCK_LEN + 1);
                let block = if input.bool() {
                    padded(b, BLOCK_LEN)
                } else {
                    b.to_vec()
                };
                let t = self.next_ticket();
                assert!(matches!(
                    self.handler.handle(&block, self.now_ms, t),
                    Outcome::Reject
                ));
            }
        }
    }

    fn next_ticket(&mut self) -> u64 {
        self.ticket += 1;
        self.ticket
    }

    fn time(&self) -> u64 {
        self.now_ms.saturating_add_signed(self.skew_ms)
    }

    /// Seals `command` signed by `key`, has it handled, and opens the answer.
    fn call(&mut self, command: &Command, key: Option<usize>) -> Reply {
        let sealer = RequestSealer::new(&self.identity_public, &mut self.rng).unwrap();
        let key = key.map(|i| self.signers[i].clone());
        let pt = Request::encode(command, self.time(), sealer.enc(), key.as_ref());
        let (block, rk) = sealer.seal(&pt).unwrap();
        self.exchange(block, rk)
    }

    fn call_raw(&mut self, pt: &[u8]) -> Reply {
        let sealer = RequestSealer::new(&self.identity_public, &mut self.rng).unwrap();
        let (block, rk) = sealer.seal(pt).unwrap();
        self.exchange(block, rk)
    }

    fn exchange(&mut self, block: Vec<u8>, rk: ResponseKey) -> Reply {
        let t = self.next_ticket();
        let out = self.handler.handle(&block, self.now_ms, t);
        let reply = self.answer(out, &rk, t);
        let passed = !matches!(
            reply,
            Reply::Error(ErrorCode::BadRequest) | Reply::Error(ErrorCode::Stale)
        );
        self.last_block = Some((block, rk, passed));
        reply
    }

    /// Turns an outcome into the reply the client would read; a parked
    /// FETCH is answered at its deadline.
    fn answer(&mut self, out: Outcome, rk: &ResponseKey, ticket: u64) -> Reply {
        match out {
            Outcome::Reject => panic!("the relay could not open a block sealed to it"),
            Outcome::Reply(block) => {
                assert_eq!(block.len(), BLOCK_LEN);
                let pt = rk
                    .open_response(&block)
                    .expect("the response opens under the request's key");
                Response::decode(&pt)
                    .expect("the relay's response decodes")
                    .reply
            }
            Outcome::Wait(w) => {
                assert!(w.deadline_ms() > self.now_ms);
                // First a wake with nothing there, then the deadline.
                let out = self.handler.resume(w, self.now_ms, ticket, false);
                let out = match out {
                    Outcome::Wait(w) => {
                        let at = w.deadline_ms();
                        self.handler.resume(w, at, ticket, true)
                    }
                    other => other,
                };
                assert!(!matches!(out, Outcome::Wait(_)), "a last resume waits");
                self.answer(out, rk, ticket)
            }
        }
    }

    fn replay(&mut self) {
        let Some((block, rk, passed)) = self.last_block.take() else {
            return;
        };
        let t = self.next_ticket();
        let out = self.handler.handle(&block, self.now_ms, t);
        let reply = self.answer(out, &rk, t);
        if passed {
            assert_eq!(
                reply,
                Reply::Error(ErrorCode::Stale),
                "a replayed request was accepted"
            );
        }
        self.last_block = Some((block, rk, passed));
    }

    fn create(&mut self, input: &mut Input<'_>) {
        let access_key = match input.u8() % 4 {
            0 => None,
            1 | 2 => Some(ACCESS_KEY.to_string()),
            _ => Some(String::from_utf8_lossy(input.var_bytes(64)).into_owned()),
        };
        let recipient = input.below(KEYS);
        let dh_choice = input.u8();
        let (recipient_dh, dh_secret) = match dh_choice % 8 {
            // A low-order point, or any 32 bytes.
            6 => ([0u8; 32], None),
            7 => (input.array::<32>(), None),
            i => {
                let s = &self.dh[i as usize % KEYS];
                (PublicKey::from(s).to_bytes(), Some(s.clone()))
            }
        };
        let signer = self.signer(input);
        let key = match signer {
            Signer::Right => Some(recipient),
            Signer::Wrong(i) => Some(i),
            Signer::None => None,
        };
        let command = Command::Create {
            access_key,
            recipient_auth: self.signers[recipient].verifying_key().to_bytes(),
            recipient_dh,
        };
        let reply = self.call(&command, key);
        if let Reply::Queue {
            recipient_id,
            sender_id,
            relay_dh,
        } = reply
        {
            assert!(key == Some(recipient), "CREATE accepted a bad signature");
            assert!(
                self.queues
                    .iter()
                    .all(|q| q.recipient_id != recipient_id && q.sender_id != sender_id),
                "the relay handed out an id twice"
            );
            let Some(secret) = dh_secret else {
                // Any 32 bytes that were not low order: nothing to check with.
                return;
            };
            let secret = seal::queue_secret(&secret, &relay_dh).expect("contributory");
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
    }

    /// The recipient id to name and the key to sign with.
    fn recipient_request(&self, input: &mut Input<'_>) -> (Option<usize>, Id, Option<usize>, bool) {
        let target = self.target(input);
        let signer = self.signer(input);
        let (id, right) = match target {
            Some(i) => (self.queues[i].recipient_id, Some(self.queues[i].recipient)),
            None => (input.array::<16>(), None),
        };
        let key = match signer {
            Signer::Right => right,
            Signer::Wrong(k) => Some(k),
            Signer::None => None,
        };
        // Only used to demand a refusal, so it need not know about freshness.
        let authorised = target.is_some() && key.is_some() && key == right;
        (target, id, key, authorised)
    }

    fn check_refused(&self, reply: &Reply, authorised: bool, what: &str) {
        if !authorised {
            assert!(
                matches!(reply, Reply::Error(_)),
                "{what} succeeded without the queue's key: {reply:?}"
            );
        }
    }

    fn secure(&mut self, input: &mut Input<'_>) {
        let (target, recipient_id, key, authorised) = self.recipient_request(input);
        let sender = input.below(KEYS);
        let command = Command::Secure {
            recipient_id,
            sender_auth: self.signers[sender].verifying_key().to_bytes(),
        };
        let reply = self.call(&command, key);
        self.check_refused(&reply, authorised, "SECURE");
        if reply == Reply::Ok {
            let q = &mut self.queues[target.unwrap()];
            assert!(!q.deleted, "SECURE on a deleted queue");
            assert!(
                q.sender.is_none() || q.sender == Some(sender),
                "the sender key of a secured queue was replaced"
            );
            q.sender = Some(sender);
        }
    }

    fn send(&mut self, input: &mut Input<'_>) {
        let target = self.target(input);
        let signer = self.signer(input);
        let message = padded(input.var_bytes(64), QUEUE_MSG_LEN);
        let sender_id = match target {
            Some(i) => self.queues[i].sender_id,
            None => input.array::<16>(),
        };
        let right = target.and_then(|i| self.queues[i].sender);
        let key = match signer {
            Signer::Right => right,
            Signer::Wrong(k) => Some(k),
            Signer::None => None,
        };
        let command = Command::Send {
            sender_id,
            message: message.clone(),
        };
        let reply = self.call(&command, key);
        if reply != Reply::Ok {
            assert!(matches!(reply, Reply::Error(_)), "SEND answered {reply:?}");
            return;
        }
        let Some(i) = target else {
            panic!("SEND to an unknown queue succeeded");
        };
        let q = &mut self.queues[i];
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

    fn check_message(&mut self, target: Option<usize>, reply: &Reply) {
        let Reply::Message { msg_id, body, .. } = reply else {
            return;
        };
        let q = &mut self.queues[target.expect("a message from an unknown queue")];
        assert!(!q.deleted, "a deleted queue delivered a message");
        assert!(
            !q.acked.contains(msg_id),
            "an acknowledged message came back"
        );
        let plain = delivery_open(&q.secret, msg_id, body)
            .expect("a delivered message opens under the queue secret");
        assert!(
            q.sent.contains(&plain),
            "the relay delivered a message nobody sent to this queue"
        );
        q.last_msg = Some(*msg_id);
    }

    fn fetch(&mut self, input: &mut Input<'_>) {
        let (target, recipient_id, key, authorised) = self.recipient_request(input);
        let wait_ms = match input.u8() % 4 {
            0 => 0,
            1 => 1 + u32::from(input.u16()),
            2 => u32::MAX,
            _ => input.u32(),
        };
        let reply = self.call(
            &Command::Fetch {
                recipient_id,
                wait_ms,
            },
            key,
        );
        self.check_refused(&reply, authorised, "FETCH");
        self.check_message(target, &reply);
    }

    fn ack(&mut self, input: &mut Input<'_>) {
        let (target, recipient_id, key, authorised) = self.recipient_request(input);
        let msg_id = match (target.and_then(|i| self.queues[i].last_msg), input.bool()) {
            (Some(id), true) => id,
            _ => input.array::<16>(),
        };
        let reply = self.call(
            &Command::Ack {
                recipient_id,
                msg_id,
            },
            key,
        );
        self.check_refused(&reply, authorised, "ACK");
        if !matches!(reply, Reply::Error(_)) {
            let q = &mut self.queues[target.unwrap()];
            q.acked.push(msg_id);
        }
        self.check_message(target, &reply);
    }

    fn delete(&mut self, input: &mut Input<'_>) {
        let (target, recipient_id, key, authorised) = self.recipient_request(input);
        let reply = self.call(&Command::Delete { recipient_id }, key);
        self.check_refused(&reply, authorised, "DELETE");
        if reply == Reply::Ok {
            self.queues[target.unwrap()].deleted = true;
        }
    }
}

/// A directory for one session's database: in memory where the machine has
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
