//! `relay_response`: what a client reads back from a relay, or from anything
//! that sits in front of one. Three depths:
//!
//! 0. an arbitrary block given to `ResponseKey::open_response` (what a
//!    network attacker or an HTTPS front can send: must fail cleanly);
//! 1. an arbitrary plaintext given to `Response::decode`;
//! 2. an arbitrary plaintext sealed with the relay's half of a real response
//!    key, opened with the client's half and decoded: what a malicious relay
//!    (which holds the key) can make a client accept. The client then uses
//!    the reply as `tern::client` does: a QUEUE answer completes a
//!    `RecvQueue`, a MSG answer is opened with the queue secret.
//!
//! Invariants: a plaintext that decodes re-encodes to itself (the response
//! format is canonical: no two plaintexts mean the same reply), and nothing
//! panics.

use std::sync::OnceLock;

use rand::rngs::StdRng;
use rand::SeedableRng;
use tern::proto::connection::{QueueKeys, RecvQueue};
use tern_relay::address::RelayAddress;
use tern_relay::seal::{
    delivery_open, open_request, RelayIdentity, RequestSealer, ResponseKey, BLOCK_LEN, REQUEST_LEN,
    RESPONSE_LEN,
};
use tern_relay::wire::{Reply, Response};

use super::input::{padded, Input};

struct Keys {
    /// The relay's half (seals).
    relay: ResponseKey,
    /// The client's half (opens).
    client: ResponseKey,
    queue_keys: QueueKeys,
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let mut rng = StdRng::seed_from_u64(0x7e57);
        let identity = RelayIdentity::generate(&mut rng);
        let (block, client) = RequestSealer::new(&identity.public(), &mut rng)
            .unwrap()
            .seal(&vec![0u8; REQUEST_LEN])
            .unwrap();
        let relay = open_request(&identity, &block).unwrap().response_key;
        Keys {
            relay,
            client,
            queue_keys: QueueKeys::generate(&mut rng),
        }
    })
}

pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let mode = input.u8();
    let rest = input.rest();
    let k = keys();
    match mode % 3 {
        0 => {
            let block = if rest.len() == BLOCK_LEN || mode & 0x80 != 0 {
                rest.to_vec()
            } else {
                padded(rest, BLOCK_LEN)
            };
            assert!(k.client.open_response(&block).is_err());
        }
        1 => {
            decode_and_use(rest);
            decode_and_use(&padded(rest, RESPONSE_LEN));
        }
        _ => {
            let plaintext = padded(rest, RESPONSE_LEN);
            let block = k.relay.seal_response(&plaintext).unwrap();
            assert_eq!(block.len(), BLOCK_LEN);
            let opened = k.client.open_response(&block).unwrap();
            assert_eq!(opened, plaintext);
            decode_and_use(&opened);
        }
    }
}

fn decode_and_use(plaintext: &[u8]) {
    let Ok(resp) = Response::decode(plaintext) else {
        return;
    };
    if plaintext.len() == RESPONSE_LEN {
        assert_eq!(resp.encode(), plaintext, "response format is not canonical");
    }
    let _ = format!("{resp:?}");
    match resp.reply {
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
            if let Ok(q) = RecvQueue::created(
                relay,
                &keys().queue_keys,
                recipient_id,
                sender_id,
                &relay_dh,
            ) {
                assert_eq!(q.recipient_id, recipient_id);
            }
        }
        Reply::Message { msg_id, body, .. } => {
            let _ = delivery_open(&[7u8; 32], &msg_id, &body);
        }
        Reply::Error(code) => {
            let _ = (code.is_transient(), code.to_string());
        }
        Reply::Ok | Reply::Info(_) | Reply::Empty => {}
    }
}
