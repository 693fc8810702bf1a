//! `file`: what a contact or a relay can feed the file code (PROTOCOL.md
//! §16): offer bodies (envelope kind 9) and delivered chunks (type 0x05).
//!
//! Input: one selector byte, then the payload.
//!
//! Invariants, besides "no panic":
//! - a decoded offer re-encodes to exactly its input (the body is
//!   canonical), its queue counts match its size, and no set carries an
//!   access key;
//! - a chunk opens only if it is the one sealed for its position: a chunk
//!   sealed here and then changed by the input's bytes never opens to other
//!   data, and an opened chunk returns the index it claims, below the count.

use tern::proto::file::{chunk_count, open_chunk, seal_chunk, set_key, FileOffer, CHUNK_LEN};
use tern::proto::keys::Secret32;
use tern_wire::QUEUE_MSG_LEN;

use super::input::Input;

pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let mode = input.u8();
    match mode % 3 {
        // An offer body as a contact sends it.
        0 => {
            let body = input.rest();
            if let Ok(offer) = FileOffer::decode(body) {
                assert_eq!(offer.encode().expect("a decoded offer fits"), body);
                for s in &offer.sets {
                    assert_eq!(s.queues.len(), offer.queue_count());
                    assert!(s.relay.access_key.is_none());
                }
            }
        }
        // Any 16,000 bytes as a delivered chunk, under a fixed key.
        1 => {
            let size = input.u64() % (1 << 32);
            let mut msg = input.rest().to_vec();
            msg.resize(QUEUE_MSG_LEN, 0);
            let key = set_key(&Secret32([7; 32]), 0);
            if let Ok((i, d)) = open_chunk(&key, size, &mut msg) {
                assert!((i as u64) < chunk_count(size));
                assert!(d.len() <= CHUNK_LEN);
            }
        }
        // A real chunk with bytes of the input xored into it: it opens
        // unchanged or not at all.
        _ => {
            let index = (input.u8() % 3) as u32;
            let size = (2 * CHUNK_LEN + 10) as u64;
            let key = set_key(&Secret32([9; 32]), 1);
            let data: Vec<u8> = (0..CHUNK_LEN.min(size as usize - index as usize * CHUNK_LEN))
                .map(|i| i as u8)
                .collect();
            let sealed = seal_chunk(&key, index, chunk_count(size), &data);
            let mut msg = sealed.clone();
            let flips = input.rest();
            for (k, b) in flips.chunks(3).enumerate() {
                if b.len() == 3 {
                    let at = (u16::from_be_bytes([b[0], b[1]]) as usize + k) % QUEUE_MSG_LEN;
                    msg[at] ^= b[2];
                }
            }
            let changed = msg != sealed;
            match open_chunk(&key, size, &mut msg) {
                Ok((i, d)) => {
                    assert!(!changed, "a changed chunk opened");
                    assert_eq!((i, d), (index, &data[..]));
                }
                Err(_) => assert!(changed, "the chunk as sealed did not open"),
            }
        }
    }
}
