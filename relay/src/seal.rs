//! Sealing of relay requests and responses, and of delivered messages.
//!
//! Requests follow the Oblivious HTTP pattern (RFC 9458) on HPKE (RFC 9180):
//! each request is sealed in base mode to the relay's pinned X25519 identity key
//! with a fresh ephemeral key, and the response is sealed with a key derived
//! from a secret exported from that same HPKE context and a random response
//! nonce (RFC 9458 §4.4). Nothing links two requests, an observer sees
//! fixed-size opaque blocks, and only the holder of the identity key can read a
//! request or produce a response the client will accept.
//!
//! Delivered messages are re-encrypted by the relay under a secret it shares
//! with the queue's recipient only, so what a sender uploads and what the
//! recipient downloads share no bytes.

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce, Tag};
use hkdf::Hkdf;
use hpke::{Deserializable, Serializable};
use rand_core::{CryptoRng, RngCore};
use sha2::Sha256;
use thiserror::Error;
use zeroize::{Zeroize, Zeroizing};

type Kem = hpke::kem::X25519HkdfSha256;
type Kdf = hpke::kdf::HkdfSha256;
type Aead = hpke::aead::ChaCha20Poly1305;

/// The transport version byte that starts every request block.
pub const TRANSPORT_VERSION: u8 = 1;
/// Every request and every response is exactly this many bytes.
pub const BLOCK_LEN: usize = 16_384;
const TAG_LEN: usize = 16;
const ENC_LEN: usize = 32;
/// Plaintext length of a request: block minus version, HPKE `enc` and tag.
pub const REQUEST_LEN: usize = BLOCK_LEN - 1 - ENC_LEN - TAG_LEN;
/// Random bytes that start every response and enter its key.
pub const RESPONSE_NONCE_LEN: usize = 32;
/// Plaintext length of a response: block minus response nonce and tag.
pub const RESPONSE_LEN: usize = BLOCK_LEN - RESPONSE_NONCE_LEN - TAG_LEN;
/// Ciphertext overhead of a delivered message.
pub const DELIVERY_OVERHEAD: usize = TAG_LEN;

const HPKE_INFO: &[u8] = b"tern/v1 relay request";
const RESPONSE_EXPORT: &[u8] = b"tern/v1 relay response";
const DELIVERY_INFO: &[u8] = b"tern/v1 delivery";

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SealError {
    #[error("block is {0} bytes, expected {BLOCK_LEN}")]
    Length(usize),
    #[error("unsupported transport version {0}")]
    Version(u8),
    #[error("sealed block does not decrypt (wrong relay key or tampered)")]
    Open,
    #[error("plaintext has the wrong length")]
    PlaintextLength,
    #[error("key agreement gave a degenerate result")]
    KeyAgreement,
}

/// The relay's long-term X25519 identity. Its public half is the `KEY` in the
/// relay's address.
pub struct RelayIdentity {
    secret: <Kem as hpke::Kem>::PrivateKey,
    public: [u8; 32],
}

impl RelayIdentity {
    pub fn generate<R: RngCore + CryptoRng>(rng: &mut R) -> Self {
        let mut bytes = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(bytes.as_mut());
        Self::from_secret(&bytes)
    }

    pub fn from_secret(secret: &[u8; 32]) -> Self {
        let secret = <Kem as hpke::Kem>::PrivateKey::from_bytes(secret)
            .expect("any 32 bytes are an X25519 private key");
        let public = x25519_public(&secret);
        Self { secret, public }
    }

    /// The secret key bytes, for the relay's key file.
    pub fn secret_bytes(&self) -> Zeroizing<[u8; 32]> {
        let mut out = Zeroizing::new([0u8; 32]);
        out.copy_from_slice(&self.secret.to_bytes());
        out
    }

    pub fn public(&self) -> [u8; 32] {
        self.public
    }
}

fn x25519_public(sk: &<Kem as hpke::Kem>::PrivateKey) -> [u8; 32] {
    let mut b = Zeroizing::new([0u8; 32]);
    b.copy_from_slice(&sk.to_bytes());
    let s = x25519_dalek::StaticSecret::from(*b);
    x25519_dalek::PublicKey::from(&s).to_bytes()
}

/// The secret from which the response to one request is sealed (relay) or
/// opened (client).
///
/// As in RFC 9458 §4.4, every response carries a fresh random nonce that is
/// mixed into its key: should the relay ever answer the same request block
/// twice (a replay it refuses with `Stale`, say), the two answers still use
/// unrelated keys, so one cannot be used to read the other.
pub struct ResponseKey {
    secret: Zeroizing<[u8; 32]>,
    enc: [u8; 32],
}

impl ResponseKey {
    fn cipher(&self, response_nonce: &[u8; RESPONSE_NONCE_LEN]) -> (ChaCha20Poly1305, Nonce) {
        let mut salt = [0u8; 32 + RESPONSE_NONCE_LEN];
        salt[..32].copy_from_slice(&self.enc);
        salt[32..].copy_from_slice(response_nonce);
        let hk = Hkdf::<Sha256>::new(Some(&salt), self.secret.as_ref());
        let mut key = Zeroizing::new([0u8; 32]);
        let mut nonce = [0u8; 12];
        hk.expand(b"key", key.as_mut())
            .expect("32 bytes is a valid HKDF-SHA256 length");
        hk.expand(b"nonce", &mut nonce)
            .expect("12 bytes is a valid HKDF-SHA256 length");
        (
            ChaCha20Poly1305::new(Key::from_slice(key.as_ref())),
            *Nonce::from_slice(&nonce),
        )
    }

    /// Seals a response plaintext of exactly [`RESPONSE_LEN`] bytes under a
    /// fresh random response nonce.
    pub fn seal_response(&self, plaintext: &[u8]) -> Result<Vec<u8>, SealError> {
        let mut nonce = [0u8; RESPONSE_NONCE_LEN];
        rand_core::OsRng.fill_bytes(&mut nonce);
        self.seal_response_with_nonce(plaintext, &nonce)
    }

    /// [`ResponseKey::seal_response`] with a given nonce, for test vectors.
    /// A nonce must never be used twice with the same key.
    pub fn seal_response_with_nonce(
        &self,
        plaintext: &[u8],
        response_nonce: &[u8; RESPONSE_NONCE_LEN],
    ) -> Result<Vec<u8>, SealError> {
        if plaintext.len() != RESPONSE_LEN {
            return Err(SealError::PlaintextLength);
        }
        let (cipher, nonce) = self.cipher(response_nonce);
        let mut buf = Vec::with_capacity(BLOCK_LEN);
        buf.extend_from_slice(response_nonce);
        buf.extend_from_slice(plaintext);
        let tag = cipher
            .encrypt_in_place_detached(&nonce, &[], &mut buf[RESPONSE_NONCE_LEN..])
            .map_err(|_| SealError::PlaintextLength)?;
        buf.extend_from_slice(&tag);
        Ok(buf)
    }

    /// Opens a response block; the plaintext is [`RESPONSE_LEN`] bytes.
    pub fn open_response(&self, block: &[u8]) -> Result<Vec<u8>, SealError> {
        if block.len() != BLOCK_LEN {
            return Err(SealError::Length(block.len()));
        }
        let (response_nonce, rest) = block.split_at(RESPONSE_NONCE_LEN);
        let (ct, tag) = rest.split_at(RESPONSE_LEN);
        let response_nonce: &[u8; RESPONSE_NONCE_LEN] =
            response_nonce.try_into().expect("split at its length");
        let (cipher, nonce) = self.cipher(response_nonce);
        let mut buf = ct.to_vec();
        cipher
            .decrypt_in_place_detached(&nonce, &[], &mut buf, Tag::from_slice(tag))
            .map_err(|_| SealError::Open)?;
        Ok(buf)
    }
}

fn response_key<C: ExportCtx>(ctx: &C, enc: &[u8; 32]) -> ResponseKey {
    let mut secret = Zeroizing::new([0u8; 32]);
    ctx.export_into(RESPONSE_EXPORT, secret.as_mut());
    ResponseKey { secret, enc: *enc }
}

trait ExportCtx {
    fn export_into(&self, label: &[u8], out: &mut [u8]);
}
impl ExportCtx for hpke::aead::AeadCtxS<Aead, Kdf, Kem> {
    fn export_into(&self, label: &[u8], out: &mut [u8]) {
        self.export(label, out)
            .expect("32 bytes is within the HPKE export limit");
    }
}
impl ExportCtx for hpke::aead::AeadCtxR<Aead, Kdf, Kem> {
    fn export_into(&self, label: &[u8], out: &mut [u8]) {
        self.export(label, out)
            .expect("32 bytes is within the HPKE export limit");
    }
}

/// Client side: a request being prepared. The HPKE context is set up first so
/// that a signature inside the request can cover its `enc` (binding the
/// signature to this one sealed request), then the plaintext is sealed.
pub struct RequestSealer {
    enc: [u8; 32],
    ctx: hpke::aead::AeadCtxS<Aead, Kdf, Kem>,
}

impl RequestSealer {
    pub fn new<R: RngCore + CryptoRng>(
        relay_key: &[u8; 32],
        rng: &mut R,
    ) -> Result<Self, SealError> {
        let pk = <Kem as hpke::Kem>::PublicKey::from_bytes(relay_key)
            .map_err(|_| SealError::KeyAgreement)?;
        let (enc, ctx) =
            hpke::setup_sender::<Aead, Kdf, Kem, _>(&hpke::OpModeS::Base, &pk, HPKE_INFO, rng)
                .map_err(|_| SealError::KeyAgreement)?;
        let mut e = [0u8; 32];
        e.copy_from_slice(&enc.to_bytes());
        Ok(Self { enc: e, ctx })
    }

    /// The encapsulated key that will start the block.
    pub fn enc(&self) -> &[u8; 32] {
        &self.enc
    }

    /// Seals a plaintext of exactly [`REQUEST_LEN`] bytes, returning the block
    /// to post and the key for its response.
    pub fn seal(mut self, plaintext: &[u8]) -> Result<(Vec<u8>, ResponseKey), SealError> {
        if plaintext.len() != REQUEST_LEN {
            return Err(SealError::PlaintextLength);
        }
        let mut block = Vec::with_capacity(BLOCK_LEN);
        block.push(TRANSPORT_VERSION);
        block.extend_from_slice(&self.enc);
        let start = block.len();
        block.extend_from_slice(plaintext);
        let tag = self
            .ctx
            .seal_in_place_detached(&mut block[start..], &[TRANSPORT_VERSION])
            .map_err(|_| SealError::PlaintextLength)?;
        block.extend_from_slice(&tag.to_bytes());
        let key = response_key(&self.ctx, &self.enc);
        Ok((block, key))
    }
}

/// A request as the relay reads it.
pub struct OpenedRequest {
    /// [`REQUEST_LEN`] bytes of plaintext.
    pub plaintext: Vec<u8>,
    /// The HPKE encapsulated key: unique per request, it identifies the
    /// request for replay detection and binds signatures to this request.
    pub enc: [u8; 32],
    pub response_key: ResponseKey,
}

/// Relay side: opens a request block. Any failure means no response can be
/// sealed, so the relay answers such a block with a bare HTTP error.
pub fn open_request(identity: &RelayIdentity, block: &[u8]) -> Result<OpenedRequest, SealError> {
    if block.len() != BLOCK_LEN {
        return Err(SealError::Length(block.len()));
    }
    if block[0] != TRANSPORT_VERSION {
        return Err(SealError::Version(block[0]));
    }
    let enc: [u8; 32] = block[1..1 + ENC_LEN].try_into().expect("length checked");
    let encapped =
        <Kem as hpke::Kem>::EncappedKey::from_bytes(&enc).map_err(|_| SealError::Open)?;
    let mut ctx = hpke::setup_receiver::<Aead, Kdf, Kem>(
        &hpke::OpModeR::Base,
        &identity.secret,
        &encapped,
        HPKE_INFO,
    )
    .map_err(|_| SealError::Open)?;
    let mut plaintext = block[1 + ENC_LEN..BLOCK_LEN - TAG_LEN].to_vec();
    let tag = hpke::aead::AeadTag::<Aead>::from_bytes(&block[BLOCK_LEN - TAG_LEN..])
        .map_err(|_| SealError::Open)?;
    ctx.open_in_place_detached(&mut plaintext, &[TRANSPORT_VERSION], &tag)
        .map_err(|_| SealError::Open)?;
    let response_key = response_key(&ctx, &enc);
    Ok(OpenedRequest {
        plaintext,
        enc,
        response_key,
    })
}

/// X25519 between a queue's relay-side key and its recipient-side key. Both
/// ends compute it; an all-zero (non-contributory) result is refused.
pub fn queue_secret(
    secret: &x25519_dalek::StaticSecret,
    peer: &[u8; 32],
) -> Result<Zeroizing<[u8; 32]>, SealError> {
    let shared = secret.diffie_hellman(&x25519_dalek::PublicKey::from(*peer));
    if !shared.was_contributory() {
        return Err(SealError::KeyAgreement);
    }
    Ok(Zeroizing::new(shared.to_bytes()))
}

fn delivery_cipher(queue_secret: &[u8; 32], msg_id: &[u8; 16]) -> (ChaCha20Poly1305, Nonce) {
    let mut okm = Zeroizing::new([0u8; 44]);
    Hkdf::<Sha256>::new(Some(msg_id), queue_secret)
        .expand(DELIVERY_INFO, okm.as_mut())
        .expect("44 bytes is a valid HKDF-SHA256 output length");
    let cipher = ChaCha20Poly1305::new(Key::from_slice(&okm[..32]));
    let nonce = *Nonce::from_slice(&okm[32..]);
    okm.zeroize();
    (cipher, nonce)
}

/// Relay side: encrypts a message for the queue's recipient. `msg_id` is the
/// relay's random id for the message, unique per queue secret.
pub fn delivery_seal(queue_secret: &[u8; 32], msg_id: &[u8; 16], msg: &[u8]) -> Vec<u8> {
    let (cipher, nonce) = delivery_cipher(queue_secret, msg_id);
    let mut buf = Vec::with_capacity(msg.len() + TAG_LEN);
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
    msg_id: &[u8; 16],
    ct: &[u8],
) -> Result<Vec<u8>, SealError> {
    if ct.len() < TAG_LEN {
        return Err(SealError::Open);
    }
    let (cipher, nonce) = delivery_cipher(queue_secret, msg_id);
    let (body, tag) = ct.split_at(ct.len() - TAG_LEN);
    let mut buf = body.to_vec();
    cipher
        .decrypt_in_place_detached(&nonce, msg_id, &mut buf, Tag::from_slice(tag))
        .map_err(|_| SealError::Open)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::OsRng;

    #[test]
    fn request_and_response_round_trip() {
        let id = RelayIdentity::generate(&mut OsRng);
        let req = vec![7u8; REQUEST_LEN];
        let (block, client_key) = RequestSealer::new(&id.public(), &mut OsRng)
            .unwrap()
            .seal(&req)
            .unwrap();
        assert_eq!(block.len(), BLOCK_LEN);
        let opened = open_request(&id, &block).unwrap();
        assert_eq!(opened.plaintext, req);
        let resp = vec![9u8; RESPONSE_LEN];
        let rblock = opened.response_key.seal_response(&resp).unwrap();
        assert_eq!(rblock.len(), BLOCK_LEN);
        assert_eq!(client_key.open_response(&rblock).unwrap(), resp);
    }

    #[test]
    fn wrong_relay_key_gets_nothing() {
        let id = RelayIdentity::generate(&mut OsRng);
        let other = RelayIdentity::generate(&mut OsRng);
        let (block, _) = RequestSealer::new(&other.public(), &mut OsRng)
            .unwrap()
            .seal(&vec![0u8; REQUEST_LEN])
            .unwrap();
        assert!(matches!(open_request(&id, &block), Err(SealError::Open)));
    }

    #[test]
    fn any_flipped_bit_is_rejected() {
        let id = RelayIdentity::generate(&mut OsRng);
        let (block, key) = RequestSealer::new(&id.public(), &mut OsRng)
            .unwrap()
            .seal(&vec![1u8; REQUEST_LEN])
            .unwrap();
        for i in [0, 1, 20, 40, 5000, BLOCK_LEN - 17, BLOCK_LEN - 1] {
            let mut b = block.clone();
            b[i] ^= 0x10;
            assert!(open_request(&id, &b).is_err(), "byte {i}");
        }
        let opened = open_request(&id, &block).unwrap();
        let mut r = opened
            .response_key
            .seal_response(&vec![2u8; RESPONSE_LEN])
            .unwrap();
        r[100] ^= 1;
        assert_eq!(key.open_response(&r), Err(SealError::Open));
    }

    #[test]
    fn delivery_round_trip_and_binding() {
        let s = [5u8; 32];
        let ct = delivery_seal(&s, &[1; 16], b"hello");
        assert_eq!(delivery_open(&s, &[1; 16], &ct).unwrap(), b"hello");
        assert!(delivery_open(&s, &[2; 16], &ct).is_err());
        assert!(delivery_open(&[6; 32], &[1; 16], &ct).is_err());
    }
}
