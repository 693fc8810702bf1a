//! Delivery encryption: what a relay stores and delivers is re-encrypted
//! under a secret it shares with the queue's recipient only, so the bytes a
//! sender uploads, the bytes on the relay's disk and the bytes the recipient
//! downloads are all different (PROTOCOL.md §3.9).

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce, Tag};
use hkdf::Hkdf;
use sha2::Sha256;
use thiserror::Error;
use zeroize::{Zeroize, Zeroizing};

use crate::Id;

/// Bytes the delivery encryption adds to a message (the AEAD tag).
pub const DELIVERY_OVERHEAD: usize = 16;

const DELIVERY_INFO: &[u8] = b"tern/v2 delivery";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum DeliveryError {
    #[error("the key agreement gave an all-zero secret (a low-order key)")]
    KeyAgreement,
    #[error("the delivered message does not open: the relay misbehaved")]
    Open,
}

/// X25519 between a queue's relay-side key and its recipient-side key. Both
/// ends compute it; an all-zero (non-contributory) result is refused.
pub fn queue_secret(
    secret: &x25519_dalek::StaticSecret,
    peer: &[u8; 32],
) -> Result<Zeroizing<[u8; 32]>, DeliveryError> {
    let shared = secret.diffie_hellman(&x25519_dalek::PublicKey::from(*peer));
    if !shared.was_contributory() {
        return Err(DeliveryError::KeyAgreement);
    }
    Ok(Zeroizing::new(shared.to_bytes()))
}

/// The ChaCha20-Poly1305 key and nonce of one delivered message; `msg_id` is
/// random per message, so no pair is ever used twice.
pub fn delivery_key(queue_secret: &[u8; 32], msg_id: &Id) -> Zeroizing<[u8; 44]> {
    let mut okm = Zeroizing::new([0u8; 44]);
    Hkdf::<Sha256>::new(Some(msg_id), queue_secret)
        .expand(DELIVERY_INFO, okm.as_mut())
        .expect("44 bytes is a valid HKDF-SHA256 output length");
    okm
}

fn delivery_cipher(queue_secret: &[u8; 32], msg_id: &Id) -> (ChaCha20Poly1305, Nonce) {
    let mut okm = delivery_key(queue_secret, msg_id);
    let cipher = ChaCha20Poly1305::new(Key::from_slice(&okm[..32]));
    let nonce = *Nonce::from_slice(&okm[32..]);
    okm.zeroize();
    (cipher, nonce)
}

/// Relay side: encrypts a message for the queue's recipient.
pub fn delivery_seal(queue_secret: &[u8; 32], msg_id: &Id, msg: &[u8]) -> Vec<u8> {
    let (cipher, nonce) = delivery_cipher(queue_secret, msg_id);
    let mut buf = Vec::with_capacity(msg.len() + DELIVERY_OVERHEAD);
    buf.extend_from_slice(msg);
    let tag = cipher
        .encrypt_in_place_detached(&nonce, msg_id, &mut buf)
        .expect("message within AEAD limits");
    buf.extend_from_slice(&tag);
    buf
}

/// Recipient side: decrypts a delivered message.
pub fn delivery_open(
    queue_secret: &[u8; 32],
    msg_id: &Id,
    ct: &[u8],
) -> Result<Vec<u8>, DeliveryError> {
    if ct.len() < DELIVERY_OVERHEAD {
        return Err(DeliveryError::Open);
    }
    let (cipher, nonce) = delivery_cipher(queue_secret, msg_id);
    let (body, tag) = ct.split_at(ct.len() - DELIVERY_OVERHEAD);
    let mut buf = body.to_vec();
    cipher
        .decrypt_in_place_detached(&nonce, msg_id, &mut buf, Tag::from_slice(tag))
        .map_err(|_| DeliveryError::Open)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_binding() {
        let s = [5u8; 32];
        let ct = delivery_seal(&s, &[1; 16], b"hello");
        assert_eq!(delivery_open(&s, &[1; 16], &ct).unwrap(), b"hello");
        assert!(delivery_open(&s, &[2; 16], &ct).is_err());
        assert!(delivery_open(&[6; 32], &[1; 16], &ct).is_err());
        assert!(delivery_open(&s, &[1; 16], &ct[..10]).is_err());
    }

    #[test]
    fn low_order_key_refused() {
        let secret = x25519_dalek::StaticSecret::from([7u8; 32]);
        assert_eq!(
            queue_secret(&secret, &[0u8; 32]).unwrap_err(),
            DeliveryError::KeyAgreement
        );
    }
}
