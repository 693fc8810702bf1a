//! `ratchet`: what a receiving client does with a message from one of its
//! queues — the queue layer, the double ratchet with header encryption, the
//! envelope, the hash chain and every message kind (handshake, text,
//! profile, rotation control) — and the decoders on their own.
//!
//! The first byte picks a starting point, built once per process from a
//! seeded RNG by running the real handshake:
//!
//! 0. the inviter has just made an invitation (no joiner yet);
//! 1. the inviter has accepted the request and its reply is in flight;
//! 2. both sides are connected;
//! 3. no connection: the rest goes to one of the decoders (`Envelope`,
//!    `Hello`, `HelloReply`, `Profile`, `Control`, `queue_msg::parse`),
//!    which must re-encode what they accept to exactly their input.
//!
//! For 0–2 the rest of the input is a program of up to `MAX_OPS` steps:
//! arbitrary queue messages; arbitrary ratchet messages under a valid queue
//! layer; arbitrary envelopes (or kinds and bodies) under the peer's real
//! ratchet, so the fuzzer gets past the cryptography and into the state
//! machine; crafted connection requests; legitimate texts, rotations and
//! rotation requests from either side; delivery of anything in flight, again,
//! late, on any queue, or with a flipped byte. Every delivery goes through
//! `Connection::digest_of` and then `Connection::receive`, as
//! `tern::client` does.
//!
//! Invariants, besides "no panic":
//! - on error, the connection is exactly as before (compared through its
//!   JSON form, which is what the client stores);
//! - on success, `digest_of` (called before) gave the digest `receive`
//!   reports, since the client deduplicates with it;
//! - on success, the new state survives the store's JSON round trip
//!   unchanged: what the client saves is what it loads.

use std::sync::OnceLock;

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use tern::proto::connection::{Action, Connection, QueueKeys, RecvQueue};
use tern::proto::envelope::{ChainSender, Envelope, Kind, ENVELOPE_LEN, MAX_BODY_LEN};
use tern::proto::handshake::joiner_agree;
use tern::proto::hello::{Channel, Hello, HelloReply, Profile, MAX_AVATAR};
use tern::proto::invitation::{Invitation, SendQueue};
use tern::proto::keys::DhKeyPair;
use tern::proto::queue_msg::{self, RATCHET_MSG_LEN};
use tern::proto::ratchet::Ratchet;
use tern::proto::rotation::Control;
use tern::proto::MIN_PROTOCOL_VERSION;
use tern_wire::address::RelayAddress;
use tern_wire::codec::Reader;
use tern_wire::{Id, QUEUE_MSG_LEN};

use super::input::{padded, Input};

const MAX_OPS: usize = 12;
const MAX_FLIGHTS: usize = 16;
const RELAY_KEY: &str = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE";

/// Something one side sent to the other and the harness holds.
#[derive(Clone)]
struct Flight {
    to: usize,
    /// A whole queue message (a connection request), or a ratchet message
    /// still to be wrapped in the queue layer of the queue it goes to.
    raw: bool,
    bytes: Vec<u8>,
}

#[derive(Clone)]
struct Start {
    conns: [Option<Connection>; 2],
    flights: Vec<Flight>,
}

struct Fixture {
    invitation: Invitation,
    starts: [Start; 3],
    /// Queues made ahead of time for rotations and joins: making one costs
    /// two X25519 operations, most of an input's time otherwise.
    pool: Vec<RecvQueue>,
}

fn profile(name: &str) -> Profile {
    Profile {
        name: name.into(),
        ..Profile::default()
    }
}

pub fn new_queues(rng: &mut StdRng, n: usize, host: u8) -> Vec<RecvQueue> {
    (0..n)
        .map(|i| {
            let keys = QueueKeys::generate(rng);
            let relay_dh = DhKeyPair::generate(rng);
            let relay: RelayAddress = format!("tern://{RELAY_KEY}@10.0.{host}.{i}:5223")
                .parse()
                .unwrap();
            let mut ids = [0u8; 32];
            rng.fill_bytes(&mut ids);
            RecvQueue::created(
                relay,
                &keys,
                ids[..16].try_into().unwrap(),
                ids[16..].try_into().unwrap(),
                &relay_dh.public(),
            )
            .unwrap()
        })
        .collect()
}

fn deliveries(actions: &[Action], to: usize) -> Vec<Flight> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Deliver { ratchet_msg, .. } => Some(Flight {
                to,
                raw: false,
                bytes: ratchet_msg.clone(),
            }),
            _ => None,
        })
        .collect()
}

/// The queue of `to` whose sender id is `sender_id`.
fn queue_for(to: &Connection, sender_id: &Id) -> Id {
    to.all_recv_queues()
        .find(|q| &q.sender_id == sender_id)
        .expect("peer queue exists")
        .recipient_id
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let mut rng = StdRng::seed_from_u64(0xf022);
        let rng = &mut rng;
        let (mut alice, invitation) =
            Connection::invite(new_queues(rng, 2, 1), Channel::Screen, rng);
        let invited = Start {
            conns: [Some(alice.clone()), None],
            flights: Vec::new(),
        };
        let (mut bob, request) = Connection::accept(
            &invitation,
            new_queues(rng, 3, 2),
            &profile("bob"),
            Channel::Shared,
            1,
            rng,
        )
        .unwrap();
        let a0 = alice.recv_queues[0].recipient_id;
        let r = alice
            .receive(&a0, &request, &profile("alice"), 2, rng)
            .unwrap();
        let reply = deliveries(&r.actions, 1);
        assert_eq!(reply.len(), 1);
        let accepted = Start {
            conns: [Some(alice.clone()), Some(bob.clone())],
            flights: reply.clone(),
        };
        let up = alice.queue_message(0, &reply[0].bytes, rng).unwrap();
        let b = queue_for(&bob, &alice.peer_queues[0].sender_id);
        let r = bob.receive(&b, &up, &profile("bob"), 3, rng).unwrap();
        let confirm = deliveries(&r.actions, 0);
        let up = bob.queue_message(0, &confirm[0].bytes, rng).unwrap();
        let a = queue_for(&alice, &bob.peer_queues[0].sender_id);
        alice.receive(&a, &up, &profile("alice"), 4, rng).unwrap();
        let connected = Start {
            conns: [Some(alice), Some(bob)],
            flights: Vec::new(),
        };
        Fixture {
            invitation,
            starts: [invited, accepted, connected],
            pool: new_queues(rng, 3 * MAX_OPS, 100),
        }
    })
}

pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let start = input.u8() % 4;
    if start == 3 {
        decoders(&mut input);
        return;
    }
    let f = fixture();
    let s = &f.starts[start as usize];
    let mut world = World {
        conns: s.conns.clone(),
        flights: s.flights.clone(),
        invitation: &f.invitation,
        pool: &f.pool,
        rng: StdRng::seed_from_u64(u64::from(start)),
        now: 10,
    };
    for _ in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        world.step(&mut input);
    }
}

struct World<'f> {
    conns: [Option<Connection>; 2],
    flights: Vec<Flight>,
    invitation: &'f Invitation,
    /// Fresh queues still unused by this input.
    pool: &'f [RecvQueue],
    rng: StdRng,
    now: u64,
}

impl World<'_> {
    fn fresh_queues(&mut self, n: usize) -> Vec<RecvQueue> {
        let n = n.min(self.pool.len());
        let (take, rest) = self.pool.split_at(n);
        self.pool = rest;
        take.to_vec()
    }

    fn step(&mut self, input: &mut Input<'_>) {
        self.now += 1;
        let side = input.below(2);
        let peer = 1 - side;
        match input.u8() % 12 {
            // An arbitrary queue message: a type byte, then content,
            // zero-padded to the fixed size (or not, one time in four).
            0 => {
                let ty = input.u8() % 4;
                let body = input.var_bytes(QUEUE_MSG_LEN);
                let mut msg = vec![ty];
                msg.extend_from_slice(body);
                if input.u8() % 4 != 0 {
                    msg = padded(&msg, QUEUE_MSG_LEN);
                }
                let q = self.pick_queue(side, input);
                self.deliver(side, q, msg);
            }
            // Arbitrary ratchet-message bytes under a valid queue layer.
            1 => {
                let bytes = padded(input.var_bytes(RATCHET_MSG_LEN), RATCHET_MSG_LEN);
                self.deliver_flight(
                    Flight {
                        to: side,
                        raw: false,
                        bytes,
                    },
                    input,
                );
            }
            // An arbitrary padded envelope under the peer's real ratchet.
            2 => {
                let env = padded(input.var_bytes(ENVELOPE_LEN), ENVELOPE_LEN);
                if let Some(bytes) = self.peer_encrypt(peer, &env) {
                    self.deliver_flight(
                        Flight {
                            to: side,
                            raw: false,
                            bytes,
                        },
                        input,
                    );
                }
            }
            // Any kind and body, numbered and chained by the peer.
            3 => {
                let kind = Kind::from_code(match input.u8() {
                    k @ 0..=199 => 1 + k % 7,
                    k => k,
                });
                let body = body(kind, input);
                let id = input.array::<16>();
                let now = self.now;
                let Some(c) = self.conns[peer].as_mut() else {
                    return;
                };
                if !c.ratchet.as_ref().is_some_and(Ratchet::can_send) {
                    return;
                }
                let version = match (input.u8(), c.version) {
                    (v @ 250.., _) => v.wrapping_add(6),
                    (_, 0) => MIN_PROTOCOL_VERSION,
                    (_, v) => v,
                };
                let mut chain = c.chain_out.clone();
                let Ok(env) = chain.next(version, kind, id, now, body) else {
                    return;
                };
                c.chain_out = chain;
                let plain = env.encode().unwrap();
                if let Some(bytes) = self.peer_encrypt(peer, &plain) {
                    self.hold_and_deliver(side, bytes, input);
                }
            }
            // A legitimate text from the peer.
            4 => {
                let text = String::from_utf8_lossy(input.var_bytes(64)).into_owned();
                let id = input.array::<16>();
                let (now, rng) = (self.now, &mut self.rng);
                let Some(c) = self.conns[peer].as_mut() else {
                    return;
                };
                if let Ok(Action::Deliver { ratchet_msg, .. }) =
                    c.encrypt(Kind::Text, id, text.into_bytes(), now, rng)
                {
                    self.hold_and_deliver(side, ratchet_msg, input);
                }
            }
            // Something in flight, again or for the first time, on any queue.
            5 => {
                if self.flights.is_empty() {
                    return;
                }
                let k = input.below(self.flights.len());
                let flight = if input.bool() {
                    self.flights.remove(k)
                } else {
                    self.flights[k].clone()
                };
                self.deliver_flight(flight, input);
            }
            // The same, with one byte changed.
            6 => {
                if self.flights.is_empty() {
                    return;
                }
                let k = input.below(self.flights.len());
                let mut flight = self.flights[k].clone();
                let at = input.u16() as usize % flight.bytes.len();
                flight.bytes[at] ^= input.u8().max(1);
                self.deliver_flight(flight, input);
            }
            // A connection request to the inviter.
            7 => self.conn_request(input),
            // The real joiner accepts the invitation (start 0 only).
            8 => {
                if self.conns[1].is_some() {
                    return;
                }
                let n = 1 + input.below(3);
                let queues = self.fresh_queues(n);
                let p = fuzz_profile(input);
                let (now, rng) = (self.now, &mut self.rng);
                if let Ok((bob, request)) =
                    Connection::accept(self.invitation, queues, &p, Channel::Shared, now, rng)
                {
                    self.conns[1] = Some(bob);
                    self.hold_and_deliver_raw(0, request, input);
                }
            }
            // A side rotates its receiving queues.
            9 => {
                let n = 1 + input.below(3);
                let queues = self.fresh_queues(n);
                let (now, rng) = (self.now, &mut self.rng);
                let Some(c) = self.conns[side].as_mut() else {
                    return;
                };
                if let Ok((actions, _abandoned)) = c.start_rotation(queues, now, rng) {
                    for f in deliveries(&actions, peer) {
                        self.hold(f);
                    }
                }
            }
            // A side asks the peer to rotate.
            10 => {
                let (now, rng) = (self.now, &mut self.rng);
                let Some(c) = self.conns[side].as_mut() else {
                    return;
                };
                if let Ok(action) = c.request_rotation(now, rng) {
                    for f in deliveries(&[action], peer) {
                        self.hold(f);
                    }
                }
            }
            // The client deleted a retired queue on its relay.
            _ => {
                if let Some(c) = self.conns[side].as_mut() {
                    if let Some(id) = c.retired_queues.first().map(|q| q.recipient_id) {
                        c.forget_queue(&id);
                    }
                }
            }
        }
    }

    fn hold(&mut self, f: Flight) {
        if self.flights.len() < MAX_FLIGHTS {
            self.flights.push(f);
        }
    }

    /// Keeps a copy (for later replays) and delivers now or not.
    fn hold_and_deliver(&mut self, to: usize, bytes: Vec<u8>, input: &mut Input<'_>) {
        let f = Flight {
            to,
            raw: false,
            bytes,
        };
        self.hold(f.clone());
        if input.bool() {
            self.deliver_flight(f, input);
        }
    }

    fn hold_and_deliver_raw(&mut self, to: usize, bytes: Vec<u8>, input: &mut Input<'_>) {
        let f = Flight {
            to,
            raw: true,
            bytes,
        };
        self.hold(f.clone());
        if input.bool() {
            self.deliver_flight(f, input);
        }
    }

    /// Encrypts `plaintext` with the peer's ratchet (as its next message).
    fn peer_encrypt(&mut self, peer: usize, plaintext: &[u8]) -> Option<Vec<u8>> {
        let c = self.conns[peer].as_mut()?;
        let ratchet = c.ratchet.as_mut()?;
        if !ratchet.can_send() {
            return None;
        }
        ratchet.encrypt(plaintext, &mut self.rng).ok()
    }

    /// A queue of `side`: one of its queues (current, new or retired), or
    /// an unknown id one time in eight.
    fn pick_queue(&self, side: usize, input: &mut Input<'_>) -> Option<(Id, Id)> {
        let c = self.conns[side].as_ref()?;
        let queues: Vec<(Id, Id)> = c
            .all_recv_queues()
            .map(|q| (q.recipient_id, q.sender_id))
            .collect();
        let b = input.u8();
        if b % 8 == 7 || queues.is_empty() {
            Some(([b; 16], [b; 16]))
        } else {
            Some(queues[b as usize % queues.len()])
        }
    }

    fn deliver_flight(&mut self, f: Flight, input: &mut Input<'_>) {
        let Some(q) = self.pick_queue(f.to, input) else {
            return;
        };
        let msg = if f.raw {
            f.bytes
        } else {
            let Some(secret) = self.conns[f.to]
                .as_ref()
                .and_then(|c| c.connection_secret.clone())
            else {
                return;
            };
            if f.bytes.len() != RATCHET_MSG_LEN {
                return;
            }
            queue_msg::seal_message(&secret, &q.1, &f.bytes, &mut self.rng)
        };
        self.deliver(f.to, Some(q), msg);
    }

    /// Hands `msg` to `side` as arrived on queue `q`, as the client does,
    /// and checks the invariants.
    fn deliver(&mut self, side: usize, q: Option<(Id, Id)>, msg: Vec<u8>) {
        let Some((queue, _)) = q else {
            return;
        };
        let peer = 1 - side;
        let now = self.now;
        let Some(c) = self.conns[side].as_mut() else {
            return;
        };
        let before = serde_json::to_string(c).unwrap();
        let digest = c.digest_of(&queue, &msg);
        let me = profile(if side == 0 { "alice" } else { "bob" });
        match c.receive(&queue, &msg, &me, now, &mut self.rng) {
            Err(_) => assert_eq!(
                serde_json::to_string(c).unwrap(),
                before,
                "a refused message changed the connection"
            ),
            Ok(r) => {
                assert_eq!(digest, Some(r.digest), "digest_of disagrees with receive");
                let json = serde_json::to_string(c).unwrap();
                let back: Connection =
                    serde_json::from_str(&json).expect("the saved connection loads again");
                assert_eq!(
                    serde_json::to_string(&back).unwrap(),
                    json,
                    "the connection changes through the store's JSON round trip"
                );
                let _ = (c.security_code(), c.security_level());
                for f in deliveries(&r.actions, peer) {
                    self.hold(f);
                }
            }
        }
    }

    /// A connection request crafted with the invitation's keys, carrying a
    /// fuzzed Hello (or any envelope), or a request with arbitrary keys.
    fn conn_request(&mut self, input: &mut Input<'_>) {
        let inv = self.invitation;
        let hash = tern::proto::handshake::invitation_hash(&inv.encode());
        let Ok(agreement) =
            joiner_agree(&hash, &inv.invitation_key, &inv.ratchet_key, &mut self.rng)
        else {
            return;
        };
        let Ok(mut ratchet) =
            Ratchet::init_initiator(&agreement.ratchet, &inv.ratchet_key, &mut self.rng)
        else {
            return;
        };
        let plaintext = match input.u8() % 4 {
            0 => padded(input.var_bytes(ENVELOPE_LEN), ENVELOPE_LEN),
            n => {
                let kind = if n == 3 {
                    Kind::from_code(input.u8())
                } else {
                    Kind::Hello
                };
                let body = if n == 1 {
                    input.var_bytes(MAX_BODY_LEN).to_vec()
                } else {
                    fuzz_hello(input).encode()
                };
                let mut chain = ChainSender::default();
                let Ok(env) = chain.next(MIN_PROTOCOL_VERSION, kind, input.array(), self.now, body)
                else {
                    return;
                };
                env.encode().unwrap()
            }
        };
        let Ok(msg) = ratchet.encrypt(&plaintext, &mut self.rng) else {
            return;
        };
        let (j, e) = if input.u8() % 8 == 0 {
            (input.array(), input.array())
        } else {
            (
                agreement.keys.joiner_identity,
                agreement.keys.joiner_ephemeral,
            )
        };
        let request = queue_msg::conn_request(&j, &e, &msg);
        self.hold_and_deliver_raw(0, request, input);
    }
}

/// A body for `kind`: usually well-formed for it, with fuzzed fields,
/// sometimes arbitrary bytes.
fn body(kind: Kind, input: &mut Input<'_>) -> Vec<u8> {
    if input.u8() % 4 == 0 {
        return input.var_bytes(MAX_BODY_LEN).to_vec();
    }
    match kind {
        Kind::Text => input.var_bytes(256).to_vec(),
        Kind::Profile => fuzz_profile(input).to_bytes(),
        Kind::Control => fuzz_control(input).encode(),
        Kind::HelloReply => HelloReply {
            min_version: input.u8() % 3,
            max_version: input.u8() % 3,
            channel: if input.bool() {
                Channel::Screen
            } else {
                Channel::Shared
            },
            sender_keys: (0..1 + input.below(3)).map(|_| input.array()).collect(),
            profile: fuzz_profile(input),
        }
        .encode(),
        Kind::Hello => fuzz_hello(input).encode(),
        _ => input.var_bytes(64).to_vec(),
    }
}

fn fuzz_string(input: &mut Input<'_>, max_bytes: usize) -> String {
    let mut s = String::from_utf8_lossy(input.var_bytes(max_bytes)).into_owned();
    while s.len() > max_bytes {
        s.pop();
    }
    s
}

fn fuzz_profile(input: &mut Input<'_>) -> Profile {
    let flags = input.u8();
    let name = fuzz_string(input, 80);
    let status = if flags & 1 != 0 {
        fuzz_string(input, 600)
    } else {
        String::new()
    };
    let avatar = match (flags >> 1) & 3 {
        0 | 1 => None,
        2 => {
            let mut a = b"\x89PNG\r\n\x1a\n".to_vec();
            a.extend_from_slice(input.var_bytes(MAX_AVATAR));
            Some(a)
        }
        _ => Some(input.var_bytes(MAX_AVATAR + 16).to_vec()),
    };
    Profile {
        name,
        status,
        avatar,
    }
}

/// A queue whose address comes from the input's binary form when it is
/// valid (any relay a peer can name), else a plain one.
fn fuzz_send_queue(input: &mut Input<'_>) -> SendQueue {
    let raw = input.var_bytes(300);
    let mut r = Reader::new(raw);
    let relay = RelayAddress::decode(&mut r)
        .ok()
        .filter(|a| a.access_key.is_none())
        .unwrap_or_else(|| {
            format!("tern://{RELAY_KEY}@192.0.2.1:5223")
                .parse()
                .unwrap()
        });
    SendQueue {
        relay,
        sender_id: input.array(),
    }
}

fn fuzz_hello(input: &mut Input<'_>) -> Hello {
    Hello {
        min_version: input.u8() % 3,
        max_version: input.u8() % 3,
        channel: if input.bool() {
            Channel::Screen
        } else {
            Channel::Shared
        },
        sender_keys: (0..1 + input.below(3)).map(|_| input.array()).collect(),
        reply_queues: (0..1 + input.below(3))
            .map(|_| fuzz_send_queue(input))
            .collect(),
        profile: fuzz_profile(input),
    }
}

fn fuzz_control(input: &mut Input<'_>) -> Control {
    match input.u8() % 5 {
        0 => Control::Add(
            (0..1 + input.below(3))
                .map(|_| fuzz_send_queue(input))
                .collect(),
        ),
        1 => Control::Keys {
            tag: input.array(),
            keys: (0..1 + input.below(3)).map(|_| input.array()).collect(),
        },
        2 => Control::Use { tag: input.array() },
        3 => Control::Switched,
        _ => Control::Rotate,
    }
}

/// Every decoder on its own: what it accepts must re-encode to its input.
fn decoders(input: &mut Input<'_>) {
    let which = input.u8();
    let rest = input.rest();
    match which % 7 {
        0 | 1 => {
            let b = if which % 7 == 0 {
                padded(rest, ENVELOPE_LEN)
            } else {
                rest.to_vec()
            };
            if let Ok(env) = Envelope::decode(&b) {
                assert_eq!(env.encode().unwrap(), b, "envelope is not canonical");
                let _ = (env.chain_hash(), format!("{env:?}"));
            }
        }
        2 => {
            if let Ok(h) = Hello::decode(rest) {
                assert_eq!(h.encode(), rest, "hello is not canonical");
            }
        }
        3 => {
            if let Ok(h) = HelloReply::decode(rest) {
                assert_eq!(h.encode(), rest, "hello-reply is not canonical");
            }
        }
        4 => {
            if let Ok(p) = Profile::from_bytes(rest) {
                assert_eq!(p.to_bytes(), rest, "profile is not canonical");
            }
        }
        5 => {
            if let Ok(Some(c)) = Control::decode(rest) {
                assert_eq!(c.encode(), rest, "control message is not canonical");
            }
        }
        _ => {
            let b = padded(rest, QUEUE_MSG_LEN);
            let _ = queue_msg::parse(rest);
            let _ = queue_msg::parse(&b);
        }
    }
}
