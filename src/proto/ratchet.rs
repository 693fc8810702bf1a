//! The double ratchet with header encryption (Signal's specification,
//! revision 4, section 4), over X25519, HKDF-SHA256, HMAC-SHA256,
//! ChaCha20-Poly1305 for message bodies and XChaCha20-Poly1305 for headers.
//!
//! PROTOCOL.md §6. A ratchet message is `enc_header (80 bytes) || ciphertext`:
//!
//! ```text
//! header      = dh_public (32) || pn (u32 BE) || n (u32 BE)                 40 bytes
//! enc_header  = nonce (24) || XChaCha20-Poly1305(hk, nonce, header, ad)     80 bytes
//! ciphertext  = ChaCha20-Poly1305(mk_key, mk_nonce, plaintext, ad || enc_header)
//! ```
//!
//! `ad` is the connection's 32-byte transcript hash, which binds both
//! parties' handshake keys into every message. Decryption is transactional:
//! it works on a copy of the state and keeps it only if the message
//! authenticates, so garbage never advances or corrupts a ratchet.

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, XChaCha20Poly1305, XNonce};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use rand_core::{CryptoRng, RngCore};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use zeroize::Zeroizing;

use super::keys::{b64, DhKeyPair, Secret32};
use super::ProtoError;

/// Most message keys one chain step may skip (messages lost or delayed).
pub const MAX_SKIP: u32 = 1000;
/// Most skipped message keys kept in all; the oldest are dropped past this.
pub const MAX_SKIPPED_KEYS: usize = 2000;
pub const HEADER_LEN: usize = 40;
pub const ENC_HEADER_LEN: usize = 24 + HEADER_LEN + 16;
const TAG_LEN: usize = 16;

const KDF_RK_INFO: &[u8] = b"tern/v1 ratchet root";
const MESSAGE_KEY_INFO: &[u8] = b"tern/v1 message key";

/// Ciphertext length of a ratchet message carrying `plaintext_len` bytes.
pub const fn message_len(plaintext_len: usize) -> usize {
    ENC_HEADER_LEN + plaintext_len + TAG_LEN
}

/// What both sides derive from the handshake to start their ratchets.
#[derive(Clone)]
pub struct RatchetInit {
    pub root_key: Secret32,
    /// Header key of the initiator's first sending chain.
    pub header_key_initiator: Secret32,
    /// The responder's first "next header key".
    pub header_key_responder: Secret32,
    /// Associated data for every message: the handshake transcript hash.
    pub ad: [u8; 32],
}

#[derive(Clone, Serialize, Deserialize)]
struct SkippedKey {
    hk: Secret32,
    n: u32,
    mk: Secret32,
}

/// One side's ratchet state. Serializable for the encrypted store.
#[derive(Clone, Serialize, Deserialize)]
pub struct Ratchet {
    dhs: DhKeyPair,
    #[serde(with = "opt_b64")]
    dhr: Option<[u8; 32]>,
    rk: Secret32,
    cks: Option<Secret32>,
    ckr: Option<Secret32>,
    hks: Option<Secret32>,
    hkr: Option<Secret32>,
    nhks: Secret32,
    nhkr: Secret32,
    ns: u32,
    nr: u32,
    pn: u32,
    /// Oldest first.
    skipped: Vec<SkippedKey>,
    #[serde(with = "b64")]
    ad: [u8; 32],
}

mod opt_b64 {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    struct W(#[serde(with = "super::b64")] [u8; 32]);

    pub fn serialize<S: Serializer>(v: &Option<[u8; 32]>, s: S) -> Result<S::Ok, S::Error> {
        v.map(W).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<[u8; 32]>, D::Error> {
        Ok(Option::<W>::deserialize(d)?.map(|w| w.0))
    }
}

impl std::fmt::Debug for Ratchet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ratchet")
            .field("ns", &self.ns)
            .field("nr", &self.nr)
            .field("pn", &self.pn)
            .field("skipped", &self.skipped.len())
            .finish_non_exhaustive()
    }
}

fn kdf_rk(rk: &Secret32, dh_out: &Secret32) -> (Secret32, Secret32, Secret32) {
    let mut okm = Zeroizing::new([0u8; 96]);
    Hkdf::<Sha256>::new(Some(rk.as_bytes()), dh_out.as_bytes())
        .expand(KDF_RK_INFO, okm.as_mut())
        .expect("96 bytes is a valid HKDF-SHA256 length");
    let take = |i: usize| {
        let mut k = [0u8; 32];
        k.copy_from_slice(&okm[i * 32..(i + 1) * 32]);
        Secret32(k)
    };
    (take(0), take(1), take(2))
}

fn hmac(key: &Secret32, byte: u8) -> Secret32 {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key.as_bytes()).expect("any key length");
    mac.update(&[byte]);
    Secret32(mac.finalize().into_bytes().into())
}

/// KDF_CK: (next chain key, message key).
fn kdf_ck(ck: &Secret32) -> (Secret32, Secret32) {
    (hmac(ck, 0x02), hmac(ck, 0x01))
}

fn message_cipher(mk: &Secret32) -> (ChaCha20Poly1305, chacha20poly1305::Nonce) {
    let mut okm = Zeroizing::new([0u8; 44]);
    Hkdf::<Sha256>::new(None, mk.as_bytes())
        .expand(MESSAGE_KEY_INFO, okm.as_mut())
        .expect("44 bytes is a valid HKDF-SHA256 length");
    let cipher = ChaCha20Poly1305::new_from_slice(&okm[..32]).expect("32-byte key");
    (cipher, *chacha20poly1305::Nonce::from_slice(&okm[32..]))
}

struct Header {
    dh: [u8; 32],
    pn: u32,
    n: u32,
}

fn header_encrypt<R: RngCore + CryptoRng>(
    hk: &Secret32,
    h: &Header,
    ad: &[u8; 32],
    rng: &mut R,
) -> Vec<u8> {
    let mut nonce = [0u8; 24];
    rng.fill_bytes(&mut nonce);
    let mut buf = Vec::with_capacity(ENC_HEADER_LEN);
    buf.extend_from_slice(&nonce);
    buf.extend_from_slice(&h.dh);
    buf.extend_from_slice(&h.pn.to_be_bytes());
    buf.extend_from_slice(&h.n.to_be_bytes());
    let cipher = XChaCha20Poly1305::new_from_slice(hk.as_bytes()).expect("32-byte key");
    let tag = cipher
        .encrypt_in_place_detached(XNonce::from_slice(&nonce), ad, &mut buf[24..])
        .expect("header within AEAD limits");
    buf.extend_from_slice(&tag);
    buf
}

fn header_decrypt(hk: &Secret32, enc: &[u8], ad: &[u8; 32]) -> Option<Header> {
    debug_assert_eq!(enc.len(), ENC_HEADER_LEN);
    let cipher = XChaCha20Poly1305::new_from_slice(hk.as_bytes()).expect("32-byte key");
    let mut buf = Zeroizing::new(enc[24..24 + HEADER_LEN].to_vec());
    cipher
        .decrypt_in_place_detached(
            XNonce::from_slice(&enc[..24]),
            ad,
            &mut buf,
            chacha20poly1305::Tag::from_slice(&enc[24 + HEADER_LEN..]),
        )
        .ok()?;
    let mut dh_pub = [0u8; 32];
    dh_pub.copy_from_slice(&buf[..32]);
    Some(Header {
        dh: dh_pub,
        pn: u32::from_be_bytes(buf[32..36].try_into().expect("4 bytes")),
        n: u32::from_be_bytes(buf[36..40].try_into().expect("4 bytes")),
    })
}

impl Ratchet {
    /// The side that sends first (the joiner, whose connection request is the
    /// first ratchet message): `RatchetInitAliceHE`.
    pub fn init_initiator<R: RngCore + CryptoRng>(
        init: &RatchetInit,
        responder_ratchet_key: &[u8; 32],
        rng: &mut R,
    ) -> Result<Self, ProtoError> {
        let dhs = DhKeyPair::generate(rng);
        let (rk, cks, nhks) = kdf_rk(&init.root_key, &dhs.dh(responder_ratchet_key)?);
        Ok(Self {
            dhs,
            dhr: Some(*responder_ratchet_key),
            rk,
            cks: Some(cks),
            ckr: None,
            hks: Some(init.header_key_initiator.clone()),
            hkr: None,
            nhks,
            nhkr: init.header_key_responder.clone(),
            ns: 0,
            nr: 0,
            pn: 0,
            skipped: Vec::new(),
            ad: init.ad,
        })
    }

    /// The side that published its ratchet key (the inviter): `RatchetInitBobHE`.
    pub fn init_responder(init: &RatchetInit, ratchet_key: DhKeyPair) -> Self {
        Self {
            dhs: ratchet_key,
            dhr: None,
            rk: init.root_key.clone(),
            cks: None,
            ckr: None,
            hks: None,
            hkr: None,
            nhks: init.header_key_responder.clone(),
            nhkr: init.header_key_initiator.clone(),
            ns: 0,
            nr: 0,
            pn: 0,
            skipped: Vec::new(),
            ad: init.ad,
        }
    }

    /// Whether this side can encrypt (the responder must receive first).
    pub fn can_send(&self) -> bool {
        self.cks.is_some() && self.hks.is_some()
    }

    /// Encrypts `plaintext`, advancing the sending chain.
    pub fn encrypt<R: RngCore + CryptoRng>(
        &mut self,
        plaintext: &[u8],
        rng: &mut R,
    ) -> Result<Vec<u8>, ProtoError> {
        let (Some(cks), Some(hks)) = (&self.cks, &self.hks) else {
            return Err(ProtoError::NotReady);
        };
        let (next_ck, mk) = kdf_ck(cks);
        let header = Header {
            dh: self.dhs.public(),
            pn: self.pn,
            n: self.ns,
        };
        let mut out = header_encrypt(hks, &header, &self.ad, rng);
        let mut aad = Vec::with_capacity(32 + ENC_HEADER_LEN);
        aad.extend_from_slice(&self.ad);
        aad.extend_from_slice(&out);
        let (cipher, nonce) = message_cipher(&mk);
        let start = out.len();
        out.extend_from_slice(plaintext);
        let tag = cipher
            .encrypt_in_place_detached(&nonce, &aad, &mut out[start..])
            .expect("message within AEAD limits");
        out.extend_from_slice(&tag);
        // Checked before anything changes: on error the state stays as it was.
        let ns = self
            .ns
            .checked_add(1)
            .ok_or(ProtoError::TooManySkipped(u32::MAX))?;
        self.cks = Some(next_ck);
        self.ns = ns;
        Ok(out)
    }

    /// Decrypts a ratchet message. On any error the state is unchanged.
    pub fn decrypt<R: RngCore + CryptoRng>(
        &mut self,
        message: &[u8],
        rng: &mut R,
    ) -> Result<Vec<u8>, ProtoError> {
        if message.len() < ENC_HEADER_LEN + TAG_LEN {
            return Err(ProtoError::Decrypt);
        }
        let mut next = self.clone();
        let plaintext = next.decrypt_inner(message, rng)?;
        *self = next;
        Ok(plaintext)
    }

    fn decrypt_inner<R: RngCore + CryptoRng>(
        &mut self,
        message: &[u8],
        rng: &mut R,
    ) -> Result<Vec<u8>, ProtoError> {
        let (enc_header, ct) = message.split_at(ENC_HEADER_LEN);
        if let Some(pt) = self.try_skipped(enc_header, ct)? {
            return Ok(pt);
        }
        let (header, dh_ratchet) = if let Some(h) = self
            .hkr
            .as_ref()
            .and_then(|k| header_decrypt(k, enc_header, &self.ad))
        {
            (h, false)
        } else if let Some(h) = header_decrypt(&self.nhkr, enc_header, &self.ad) {
            (h, true)
        } else {
            return Err(ProtoError::Decrypt);
        };
        if dh_ratchet {
            self.skip_message_keys(header.pn)?;
            self.dh_ratchet(&header, rng)?;
        } else if header.n < self.nr {
            // Its key was used or skipped-and-used already.
            return Err(ProtoError::Duplicate);
        }
        self.skip_message_keys(header.n)?;
        let ckr = self.ckr.as_ref().ok_or(ProtoError::Decrypt)?;
        let (next_ck, mk) = kdf_ck(ckr);
        self.ckr = Some(next_ck);
        self.nr += 1;
        open(&mk, &self.ad, enc_header, ct)
    }

    fn try_skipped(&mut self, enc_header: &[u8], ct: &[u8]) -> Result<Option<Vec<u8>>, ProtoError> {
        // Skipped keys share few header keys: decrypt the header once per
        // distinct key rather than once per skipped message.
        let mut tried: Vec<&Secret32> = Vec::new();
        let mut found = None;
        for (i, s) in self.skipped.iter().enumerate() {
            if tried.contains(&&s.hk) {
                continue;
            }
            tried.push(&s.hk);
            if let Some(h) = header_decrypt(&s.hk, enc_header, &self.ad) {
                found = self
                    .skipped
                    .iter()
                    .enumerate()
                    .skip(i)
                    .find(|(_, k)| k.hk == s.hk && k.n == h.n)
                    .map(|(j, _)| j);
                if found.is_none() && self.hkr.as_ref() != Some(&s.hk) {
                    // A header under an old chain's key whose message key is gone.
                    return Err(ProtoError::Duplicate);
                }
                break;
            }
        }
        let Some(j) = found else {
            return Ok(None);
        };
        let key = self.skipped.remove(j);
        open(&key.mk, &self.ad, enc_header, ct).map(Some)
    }

    fn skip_message_keys(&mut self, until: u32) -> Result<(), ProtoError> {
        if until > self.nr.saturating_add(MAX_SKIP) {
            return Err(ProtoError::TooManySkipped(until - self.nr));
        }
        if let (Some(ckr), Some(hkr)) = (self.ckr.clone(), self.hkr.clone()) {
            let mut ck = ckr;
            while self.nr < until {
                let (next, mk) = kdf_ck(&ck);
                self.skipped.push(SkippedKey {
                    hk: hkr.clone(),
                    n: self.nr,
                    mk,
                });
                ck = next;
                self.nr += 1;
            }
            self.ckr = Some(ck);
            if self.skipped.len() > MAX_SKIPPED_KEYS {
                let excess = self.skipped.len() - MAX_SKIPPED_KEYS;
                self.skipped.drain(..excess);
            }
        }
        Ok(())
    }

    fn dh_ratchet<R: RngCore + CryptoRng>(
        &mut self,
        header: &Header,
        rng: &mut R,
    ) -> Result<(), ProtoError> {
        self.pn = self.ns;
        self.ns = 0;
        self.nr = 0;
        self.hks = Some(self.nhks.clone());
        self.hkr = Some(self.nhkr.clone());
        self.dhr = Some(header.dh);
        let (rk, ckr, nhkr) = kdf_rk(&self.rk, &self.dhs.dh(&header.dh)?);
        self.rk = rk;
        self.ckr = Some(ckr);
        self.nhkr = nhkr;
        self.dhs = DhKeyPair::generate(rng);
        let (rk, cks, nhks) = kdf_rk(&self.rk, &self.dhs.dh(&header.dh)?);
        self.rk = rk;
        self.cks = Some(cks);
        self.nhks = nhks;
        Ok(())
    }

    /// Number of skipped message keys held (for diagnostics and tests).
    pub fn skipped_len(&self) -> usize {
        self.skipped.len()
    }
}

fn open(mk: &Secret32, ad: &[u8; 32], enc_header: &[u8], ct: &[u8]) -> Result<Vec<u8>, ProtoError> {
    if ct.len() < TAG_LEN {
        return Err(ProtoError::Decrypt);
    }
    let (body, tag) = ct.split_at(ct.len() - TAG_LEN);
    let mut aad = Vec::with_capacity(32 + ENC_HEADER_LEN);
    aad.extend_from_slice(ad);
    aad.extend_from_slice(enc_header);
    let (cipher, nonce) = message_cipher(mk);
    let mut buf = body.to_vec();
    cipher
        .decrypt_in_place_detached(
            &nonce,
            &aad,
            &mut buf,
            chacha20poly1305::Tag::from_slice(tag),
        )
        .map_err(|_| ProtoError::Decrypt)?;
    Ok(buf)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    pub(crate) fn pair(seed: u64) -> (Ratchet, Ratchet, StdRng) {
        let mut rng = StdRng::seed_from_u64(seed);
        let init = RatchetInit {
            root_key: Secret32::random(&mut rng),
            header_key_initiator: Secret32::random(&mut rng),
            header_key_responder: Secret32::random(&mut rng),
            ad: [7u8; 32],
        };
        let bob_key = DhKeyPair::generate(&mut rng);
        let alice = Ratchet::init_initiator(&init, &bob_key.public(), &mut rng).unwrap();
        let bob = Ratchet::init_responder(&init, bob_key);
        (alice, bob, rng)
    }

    #[test]
    fn in_order_both_ways() {
        let (mut a, mut b, mut rng) = pair(1);
        assert!(!b.can_send());
        assert_eq!(b.encrypt(b"x", &mut rng), Err(ProtoError::NotReady));
        for i in 0..5u8 {
            let m = a.encrypt(&[i; 10], &mut rng).unwrap();
            assert_eq!(m.len(), message_len(10));
            assert_eq!(b.decrypt(&m, &mut rng).unwrap(), vec![i; 10]);
            let r = b.encrypt(&[i + 100; 3], &mut rng).unwrap();
            assert_eq!(a.decrypt(&r, &mut rng).unwrap(), vec![i + 100; 3]);
        }
    }

    #[test]
    fn out_of_order_and_skipped() {
        let (mut a, mut b, mut rng) = pair(2);
        let msgs: Vec<_> = (0..6u8)
            .map(|i| a.encrypt(&[i], &mut rng).unwrap())
            .collect();
        for i in [3usize, 0, 5, 1] {
            assert_eq!(b.decrypt(&msgs[i], &mut rng).unwrap(), vec![i as u8]);
        }
        // A reply, a new chain from a, then the stragglers of the old chain.
        let r = b.encrypt(b"r", &mut rng).unwrap();
        a.decrypt(&r, &mut rng).unwrap();
        let late = a.encrypt(b"new", &mut rng).unwrap();
        assert_eq!(b.decrypt(&late, &mut rng).unwrap(), b"new");
        assert_eq!(b.decrypt(&msgs[2], &mut rng).unwrap(), vec![2]);
        assert_eq!(b.decrypt(&msgs[4], &mut rng).unwrap(), vec![4]);
        assert_eq!(b.skipped_len(), 0);
    }

    #[test]
    fn replays_are_rejected_and_leave_state_alone() {
        let (mut a, mut b, mut rng) = pair(3);
        let m0 = a.encrypt(b"zero", &mut rng).unwrap();
        let m1 = a.encrypt(b"one", &mut rng).unwrap();
        b.decrypt(&m1, &mut rng).unwrap();
        b.decrypt(&m0, &mut rng).unwrap();
        assert_eq!(b.decrypt(&m0, &mut rng), Err(ProtoError::Duplicate));
        assert_eq!(b.decrypt(&m1, &mut rng), Err(ProtoError::Duplicate));
        let m2 = a.encrypt(b"two", &mut rng).unwrap();
        assert_eq!(b.decrypt(&m2, &mut rng).unwrap(), b"two");
    }

    #[test]
    fn tampering_is_rejected_without_state_change() {
        let (mut a, mut b, mut rng) = pair(4);
        let m = a.encrypt(b"hello", &mut rng).unwrap();
        for i in 0..m.len() {
            let mut t = m.clone();
            t[i] ^= 0x01;
            assert!(b.decrypt(&t, &mut rng).is_err(), "flip at {i}");
        }
        assert_eq!(b.decrypt(&m, &mut rng).unwrap(), b"hello");
    }

    #[test]
    fn skip_cap_is_enforced() {
        let (mut a, mut b, mut rng) = pair(5);
        for _ in 0..=MAX_SKIP {
            a.encrypt(b"lost", &mut rng).unwrap();
        }
        let m = a.encrypt(b"too late", &mut rng).unwrap();
        assert!(matches!(
            b.decrypt(&m, &mut rng),
            Err(ProtoError::TooManySkipped(_))
        ));
    }

    #[test]
    fn state_survives_serialization() {
        let (mut a, mut b, mut rng) = pair(6);
        let m = a.encrypt(b"a", &mut rng).unwrap();
        let json = serde_json::to_string(&b).unwrap();
        let mut b2: Ratchet = serde_json::from_str(&json).unwrap();
        assert_eq!(b2.decrypt(&m, &mut rng).unwrap(), b"a");
        assert_eq!(b.decrypt(&m, &mut rng).unwrap(), b"a");
    }
}
