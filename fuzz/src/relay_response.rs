//! `relay_response`: what a client reads from a relay, or from anything
//! that sits in front of one (transport v2, PROTOCOL.md §3.2–§3.7). Modes
//! (first byte):
//!
//! 0. arbitrary bytes as message 2, read by a client whose message 1 went to
//!    a fixed relay key (what a network attacker or a front can answer: it
//!    never completes the handshake unless it is the relay's own answer);
//! 1. an arbitrary frame through `frame::parse_replies`, as-is and padded to
//!    a frame length, then used as the client uses replies;
//! 2. an arbitrary frame plaintext sealed by the relay's half of a real
//!    session and opened by the client's (what a malicious relay, which holds
//!    the session keys, can make a client accept), then parsed and used: a
//!    QUEUE completes a `RecvQueue`, a MSG is opened with a queue secret;
//! 3. a stream of the relay's transport messages handed to the client in an
//!    order the input chooses, replayed, skipped, flipped, cut or extended.
//!
//! Invariants: a frame that parses re-encodes to itself (records, then zero
//! padding: the format is canonical); a transport message opens exactly when
//! it is the next genuine one, unchanged, and a refused one changes nothing;
//! nothing panics.

use std::sync::OnceLock;

use rand::rngs::StdRng;
use rand::SeedableRng;
use tern::proto::connection::{QueueKeys, RecvQueue};
use tern_wire::address::RelayAddress;
use tern_wire::delivery::delivery_open;
use tern_wire::frame::{padded_len, parse_replies, MAX_FRAME_LEN};
use tern_wire::session::{Fixed, MSG2_LEN};
use tern_wire::{ClientHandshake, RelayInfo, Reply, ServerHandshake, Session};

use super::input::{padded, Input};

/// The fixed relay and the fixed inputs of both halves of its session.
pub const RELAY_SECRET: [u8; 32] = [0x42; 32];
pub const CLIENT_E: [u8; 32] = [0x11; 32];
pub const CLIENT_KEM: [u8; 64] = [0x12; 64];
pub const RELAY_E: [u8; 32] = [0x21; 32];
pub const RELAY_KEM: [u8; 32] = [0x22; 32];

pub fn relay_public() -> [u8; 32] {
    x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(RELAY_SECRET)).to_bytes()
}

pub fn relay_info() -> RelayInfo {
    RelayInfo {
        min_version: 2,
        max_version: 2,
        open: true,
        max_pending: 1000,
        ttl_secs: 21 * 86_400,
        max_window: 64,
        max_subscriptions: 4096,
        unsecured_ttl_secs: 86_400,
    }
}

/// The client's half, before message 2; and its message 1.
pub fn client_start() -> (ClientHandshake, Vec<u8>) {
    ClientHandshake::start_fixed(
        &relay_public(),
        Fixed {
            ephemeral: &CLIENT_E,
            kem: &CLIENT_KEM,
        },
    )
    .expect("the client starts")
}

/// Both halves of the fixed session, freshly made: (client, relay).
pub fn session_pair() -> (Session, Session) {
    let (client, msg1) = client_start();
    let (relay, msg2, _) = ServerHandshake::respond_fixed(
        &RELAY_SECRET,
        &msg1,
        &relay_info(),
        Fixed {
            ephemeral: &RELAY_E,
            kem: &RELAY_KEM,
        },
    )
    .expect("the relay answers");
    let (client, info) = client.finish(&msg2).expect("the client accepts");
    assert_eq!(info, relay_info());
    (client, relay)
}

/// The relay's genuine message 2 to the fixed client.
fn genuine_msg2() -> &'static [u8] {
    static M: OnceLock<Vec<u8>> = OnceLock::new();
    M.get_or_init(|| {
        let (_, msg1) = client_start();
        ServerHandshake::respond_fixed(
            &RELAY_SECRET,
            &msg1,
            &relay_info(),
            Fixed {
                ephemeral: &RELAY_E,
                kem: &RELAY_KEM,
            },
        )
        .unwrap()
        .1
    })
}

fn queue_keys() -> &'static QueueKeys {
    static K: OnceLock<QueueKeys> = OnceLock::new();
    K.get_or_init(|| QueueKeys::generate(&mut StdRng::seed_from_u64(0x7e57)))
}

pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let mode = input.u8();
    match mode % 4 {
        0 => {
            let rest = input.rest();
            let msg2 = if mode & 0x80 != 0 {
                rest.to_vec()
            } else {
                padded(rest, MSG2_LEN)
            };
            let (client, _) = client_start();
            if client.finish(&msg2).is_ok() {
                assert_eq!(msg2, genuine_msg2(), "a forged message 2 was accepted");
            }
        }
        1 => {
            let rest = input.rest();
            decode_and_use(rest);
            decode_and_use(&padded(rest, padded_len(rest.len()).min(MAX_FRAME_LEN)));
        }
        2 => {
            let rest = input.rest();
            let frame = padded(rest, padded_len(rest.len()).min(MAX_FRAME_LEN));
            let (mut client, mut relay) = session_pair();
            let message = relay.seal(&frame).expect("a frame-sized plaintext seals");
            assert_eq!(client.open(&message).expect("it opens"), frame);
            decode_and_use(&frame);
        }
        _ => stream(&mut input),
    }
}

fn decode_and_use(frame: &[u8]) {
    let Ok(replies) = parse_replies(frame) else {
        return;
    };
    let mut again = Vec::new();
    for (tag, r) in &replies {
        r.encode(*tag, &mut again);
    }
    assert!(again.len() <= frame.len());
    again.resize(frame.len(), 0);
    assert_eq!(again, frame, "the frame format is not canonical");
    for (_, reply) in replies {
        let _ = format!("{reply:?}");
        match reply {
            Reply::Queue {
                recipient_id,
                sender_id,
                relay_dh,
            } => {
                let relay: RelayAddress =
                    "tern://AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE@127.0.0.1"
                        .parse()
                        .unwrap();
                // A low-order relay_dh must be refused, anything else accepted.
                if let Ok(q) =
                    RecvQueue::created(relay, queue_keys(), recipient_id, sender_id, &relay_dh)
                {
                    assert_eq!(q.recipient_id, recipient_id);
                }
            }
            Reply::Message { msg_id, body, .. } => {
                let _ = delivery_open(&[7u8; 32], &msg_id, &body);
            }
            Reply::Error(code) => {
                let _ = (code.is_transient(), code.to_string(), code.name());
            }
            Reply::Info(i) => assert!(i.min_version >= 1 && i.min_version <= i.max_version),
            Reply::Ok | Reply::Idle | Reply::Ended | Reply::Count(_) => {}
        }
    }
}

/// Up to 8 genuine messages, then up to 24 deliveries chosen by the input.
fn stream(input: &mut Input<'_>) {
    let (mut client, mut relay) = session_pair();
    let n = 1 + input.below(8);
    let frames: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            let mut f = vec![0u8; 1024 * (1 + input.below(3))];
            f[0] = 0x84; // IDLE, tag i
            f[1..5].copy_from_slice(&(i as u32).to_be_bytes());
            f
        })
        .collect();
    let messages: Vec<Vec<u8>> = frames.iter().map(|f| relay.seal(f).unwrap()).collect();
    let mut next = 0;
    for _ in 0..24 {
        if input.is_empty() {
            break;
        }
        let i = input.below(n);
        let mut m = messages[i].clone();
        let changed = match input.u8() % 5 {
            0 | 1 => false,
            2 => {
                let at = input.u16() as usize % m.len();
                let mask = input.u8() | 1;
                m[at] ^= mask;
                true
            }
            3 => {
                m.truncate(input.u16() as usize % m.len());
                true
            }
            _ => {
                let n = 1 + input.below(8);
                m.extend_from_slice(input.bytes(n));
                m.len() != messages[i].len()
            }
        };
        match client.open(&m) {
            Ok(f) => {
                assert!(
                    !changed && i == next,
                    "message {i} opened out of turn or changed"
                );
                assert_eq!(f, frames[i]);
                assert_eq!(parse_replies(&f).unwrap(), vec![(i as u32, Reply::Idle)]);
                next += 1;
            }
            Err(_) => assert!(changed || i != next, "the next genuine message was refused"),
        }
    }
}
