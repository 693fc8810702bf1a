//! What a sender uploads to a queue (PROTOCOL.md §5 and §7): exactly
//! `QUEUE_MSG_LEN` bytes, zero-filled.
//!
//! ```text
//! 0x01 connection request:  J (32) || E (32) || ratchet message
//! 0x02 message:             nonce (24) || XChaCha20-Poly1305(queue key, nonce,
//!                                          ratchet message, aad = 0x02)
//! 0x03 resync offer:        nonce (24) || XChaCha20-Poly1305(queue key, nonce,
//!                                          offer body (1,288), aad = 0x03)
//! 0x04 resync accept:       nonce (24) || XChaCha20-Poly1305(queue key, nonce,
//!                                          J' || E' || ratchet message, aad = 0x04)
//! ```
//!
//! Types 0x03 and 0x04 restart a connection's ratchet when it lost step
//! (PROTOCOL.md §6.7): they travel under the queue layer because the ratchet
//! is what they replace.
//!
//! The queue key is `HKDF-SHA256(salt = sender id, ikm = connection secret,
//! info = "tern/v1 queue layer")`. The same ratchet message goes to every
//! queue of a direction (one per relay, for redundancy); this layer makes the
//! uploads differ byte for byte, so relays comparing notes cannot match them.
//! Connection requests lack it (no secret exists yet), and are the same on
//! every queue of the invitation — which listed those queues together anyway.

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{Tag, XChaCha20Poly1305, XNonce};
use hkdf::Hkdf;
use rand_core::{CryptoRng, RngCore};
use sha2::{Digest, Sha256};
use tern_wire::codec::{CodecError, Reader, Writer};
use tern_wire::{Id, QUEUE_MSG_LEN};
use zeroize::Zeroizing;

use super::envelope::ENVELOPE_LEN;
use super::keys::Secret32;
use super::ratchet;
use super::ProtoError;

/// Length of every ratchet message (an encrypted padded envelope).
pub const RATCHET_MSG_LEN: usize = ratchet::message_len(ENVELOPE_LEN);
const TYPE_CONN_REQUEST: u8 = 0x01;
const TYPE_MESSAGE: u8 = 0x02;
pub(crate) const TYPE_RESYNC_OFFER: u8 = 0x03;
pub(crate) const TYPE_RESYNC_ACCEPT: u8 = 0x04;
/// The body of a resync offer: `I' || R' || EK' || head seq || head hash`.
pub const RESYNC_OFFER_LEN: usize = 32 + 32 + super::keys::KEM_EK_LEN + 8 + 32;
/// The body of a resync accept: `J' || E' || ratchet message`.
pub const RESYNC_ACCEPT_LEN: usize = 64 + RATCHET_MSG_LEN;
const QUEUE_LAYER_INFO: &[u8] = b"tern/v1 queue layer";
const DIGEST_LABEL: &[u8] = b"tern/v1 message digest";

const _: () = assert!(1 + 64 + RATCHET_MSG_LEN <= QUEUE_MSG_LEN);
const _: () = assert!(1 + 24 + RATCHET_MSG_LEN + 16 <= QUEUE_MSG_LEN);
const _: () = assert!(1 + 24 + RESYNC_ACCEPT_LEN + 16 <= QUEUE_MSG_LEN);

/// A parsed queue message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueMessage {
    ConnRequest {
        joiner_identity: [u8; 32],
        joiner_ephemeral: [u8; 32],
        ratchet_msg: Vec<u8>,
    },
    /// Still under the queue layer: open with [`open_message`].
    Message { sealed: Vec<u8> },
    /// Type 0x03 or 0x04, still under the queue layer: open with
    /// [`open_sealed`] and this type.
    Resync { kind: u8, sealed: Vec<u8> },
}

/// Builds a connection request.
pub fn conn_request(
    joiner_identity: &[u8; 32],
    joiner_ephemeral: &[u8; 32],
    ratchet_msg: &[u8],
) -> Vec<u8> {
    assert_eq!(ratchet_msg.len(), RATCHET_MSG_LEN);
    let mut w = Writer::with_capacity(QUEUE_MSG_LEN);
    w.u8(TYPE_CONN_REQUEST)
        .bytes(joiner_identity)
        .bytes(joiner_ephemeral)
        .bytes(ratchet_msg);
    w.pad_to(QUEUE_MSG_LEN)
        .expect("sizes checked at compile time")
}

fn queue_cipher(connection_secret: &Secret32, sender_id: &Id) -> XChaCha20Poly1305 {
    let mut key = Zeroizing::new([0u8; 32]);
    Hkdf::<Sha256>::new(Some(sender_id), connection_secret.as_bytes())
        .expand(QUEUE_LAYER_INFO, key.as_mut())
        .expect("32 bytes is a valid HKDF-SHA256 length");
    XChaCha20Poly1305::new_from_slice(key.as_ref()).expect("32-byte key")
}

/// Wraps a ratchet message for the queue with `sender_id`.
pub fn seal_message<R: RngCore + CryptoRng>(
    connection_secret: &Secret32,
    sender_id: &Id,
    ratchet_msg: &[u8],
    rng: &mut R,
) -> Vec<u8> {
    assert_eq!(ratchet_msg.len(), RATCHET_MSG_LEN);
    seal_typed(connection_secret, sender_id, TYPE_MESSAGE, ratchet_msg, rng)
}

/// The length of the sealed part of a queue message of `kind`.
fn body_len(kind: u8) -> usize {
    match kind {
        TYPE_RESYNC_OFFER => RESYNC_OFFER_LEN,
        TYPE_RESYNC_ACCEPT => RESYNC_ACCEPT_LEN,
        _ => RATCHET_MSG_LEN,
    }
}

fn seal_typed<R: RngCore + CryptoRng>(
    connection_secret: &Secret32,
    sender_id: &Id,
    kind: u8,
    body: &[u8],
    rng: &mut R,
) -> Vec<u8> {
    assert_eq!(body.len(), body_len(kind));
    let mut nonce = [0u8; 24];
    rng.fill_bytes(&mut nonce);
    let mut buf = Vec::with_capacity(QUEUE_MSG_LEN);
    buf.push(kind);
    buf.extend_from_slice(&nonce);
    buf.extend_from_slice(body);
    let tag = queue_cipher(connection_secret, sender_id)
        .encrypt_in_place_detached(XNonce::from_slice(&nonce), &[kind], &mut buf[25..])
        .expect("message within AEAD limits");
    buf.extend_from_slice(&tag);
    buf.resize(QUEUE_MSG_LEN, 0);
    buf
}

/// What a delivery job carries for one queue layer type: a ratchet message
/// (type 0x02), or a resync body prefixed with its type (0x03, 0x04). A
/// job stores one payload for every peer queue and seals it per queue at
/// upload time, so the payload says which type it is.
pub fn resync_payload(kind: u8, body: &[u8]) -> Vec<u8> {
    assert_eq!(body.len(), body_len(kind));
    let mut p = Vec::with_capacity(1 + body.len());
    p.push(kind);
    p.extend_from_slice(body);
    p
}

/// Seals a delivery payload (see [`resync_payload`]) for the queue with
/// `sender_id`. A ratchet message has exactly [`RATCHET_MSG_LEN`] bytes,
/// which no resync payload has.
pub fn seal_payload<R: RngCore + CryptoRng>(
    connection_secret: &Secret32,
    sender_id: &Id,
    payload: &[u8],
    rng: &mut R,
) -> Result<Vec<u8>, ProtoError> {
    if payload.len() == RATCHET_MSG_LEN {
        return Ok(seal_message(connection_secret, sender_id, payload, rng));
    }
    match payload.split_first() {
        Some((&k @ (TYPE_RESYNC_OFFER | TYPE_RESYNC_ACCEPT), body))
            if body.len() == body_len(k) =>
        {
            Ok(seal_typed(connection_secret, sender_id, k, body, rng))
        }
        _ => Err(CodecError::Invalid("delivery payload").into()),
    }
}

/// Parses the outer framing of a queue message.
pub fn parse(msg: &[u8]) -> Result<QueueMessage, ProtoError> {
    if msg.len() != QUEUE_MSG_LEN {
        return Err(CodecError::Invalid("queue message length").into());
    }
    let mut r = Reader::new(msg);
    match r.u8()? {
        TYPE_CONN_REQUEST => {
            let joiner_identity = r.array()?;
            let joiner_ephemeral = r.array()?;
            let ratchet_msg = r.bytes(RATCHET_MSG_LEN)?.to_vec();
            r.finish_padding()?;
            Ok(QueueMessage::ConnRequest {
                joiner_identity,
                joiner_ephemeral,
                ratchet_msg,
            })
        }
        TYPE_MESSAGE => {
            let sealed = r.bytes(24 + RATCHET_MSG_LEN + 16)?.to_vec();
            r.finish_padding()?;
            Ok(QueueMessage::Message { sealed })
        }
        kind @ (TYPE_RESYNC_OFFER | TYPE_RESYNC_ACCEPT) => {
            let sealed = r.bytes(24 + body_len(kind) + 16)?.to_vec();
            r.finish_padding()?;
            Ok(QueueMessage::Resync { kind, sealed })
        }
        other => Err(ProtoError::UnknownType(other)),
    }
}

/// Removes the queue layer, giving the ratchet message.
pub fn open_message(
    connection_secret: &Secret32,
    sender_id: &Id,
    sealed: &[u8],
) -> Result<Vec<u8>, ProtoError> {
    open_sealed(connection_secret, sender_id, TYPE_MESSAGE, sealed)
}

/// Removes the queue layer of a queue message of type `kind`.
pub fn open_sealed(
    connection_secret: &Secret32,
    sender_id: &Id,
    kind: u8,
    sealed: &[u8],
) -> Result<Vec<u8>, ProtoError> {
    let len = body_len(kind);
    if sealed.len() != 24 + len + 16 {
        return Err(ProtoError::Decrypt);
    }
    let (nonce, rest) = sealed.split_at(24);
    let (body, tag) = rest.split_at(len);
    let mut buf = body.to_vec();
    queue_cipher(connection_secret, sender_id)
        .decrypt_in_place_detached(
            XNonce::from_slice(nonce),
            &[kind],
            &mut buf,
            Tag::from_slice(tag),
        )
        .map_err(|_| ProtoError::Decrypt)?;
    Ok(buf)
}

/// Identifies a ratchet message across the copies that arrive through
/// several relays, so the receiver keeps exactly one.
pub fn digest(ratchet_msg: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(DIGEST_LABEL);
    h.update(ratchet_msg);
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn queue_layer_round_trip_and_unlinkable_copies() {
        let mut rng = StdRng::seed_from_u64(1);
        let secret = Secret32([3; 32]);
        let rm = vec![5u8; RATCHET_MSG_LEN];
        let a = seal_message(&secret, &[1; 16], &rm, &mut rng);
        let b = seal_message(&secret, &[2; 16], &rm, &mut rng);
        assert_eq!(a.len(), QUEUE_MSG_LEN);
        assert_ne!(a[25..100], b[25..100]);
        for (m, id) in [(&a, [1u8; 16]), (&b, [2u8; 16])] {
            let QueueMessage::Message { sealed } = parse(m).unwrap() else {
                panic!("wrong type")
            };
            assert_eq!(open_message(&secret, &id, &sealed).unwrap(), rm);
            assert_eq!(
                open_message(&secret, &[9; 16], &sealed),
                Err(ProtoError::Decrypt)
            );
        }
    }

    #[test]
    fn conn_request_round_trip_and_rejects_garbage() {
        let rm = vec![5u8; RATCHET_MSG_LEN];
        let m = conn_request(&[1; 32], &[2; 32], &rm);
        assert_eq!(
            parse(&m).unwrap(),
            QueueMessage::ConnRequest {
                joiner_identity: [1; 32],
                joiner_ephemeral: [2; 32],
                ratchet_msg: rm
            }
        );
        let mut bad = m.clone();
        bad[0] = 9;
        assert_eq!(parse(&bad), Err(ProtoError::UnknownType(9)));
        let mut bad = m;
        bad[QUEUE_MSG_LEN - 1] = 1;
        assert!(parse(&bad).is_err());
        assert!(parse(&[1u8; 10]).is_err());
    }
}
