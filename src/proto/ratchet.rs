//! The double ratchet with header encryption (Signal's specification,
//! revision 4, section 4), over X25519, HKDF-SHA256, HMAC-SHA256,
//! ChaCha20-Poly1305 for message bodies and XChaCha20-Poly1305 for headers,
//! made hybrid post-quantum as SimpleX's PQ double ratchet does: every DH
//! ratchet step also runs ML-KEM-768. Each sending chain publishes a fresh
//! encapsulation key in every header and carries, in every header, the
//! ciphertext encapsulated to the key of the peer's chain that started it;
//! the KEM secret joins the X25519 output in `KDF_RK`.
//!
//! PROTOCOL.md §6. A ratchet message is `enc_header (2,353 bytes) || ciphertext`:
//!
//! ```text
//! header      = dh_public (32) || pn (u32 BE) || n (u32 BE)
//!               || ek (1184) || flag (1: ct present) || ct (1088, or zeros)  2,313 bytes
//! enc_header  = nonce (24) || XChaCha20-Poly1305(hk, nonce, header, ad)     2,353 bytes
//! ciphertext  = ChaCha20-Poly1305(mk_key, mk_nonce, plaintext, ad || enc_header)
//! mk_key, mk_nonce = HKDF-SHA256(salt = header nonce, ikm = mk, "tern/v1 message key")
//! ```
//!
//! The body key and nonce depend on the header's fresh random nonce as well
//! as on the message key: a state that was rolled back (a restored backup, a
//! VM snapshot, a copied home) and encrypts again under a message key it
//! already used gets a new key and nonce, never the old pair.
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

use super::keys::{
    b64, b64vec, kem_encapsulate, DhKeyPair, KemSeed, Secret32, KEM_CT_LEN, KEM_EK_LEN,
};
use super::ProtoError;

/// Most message keys one chain step may skip (messages lost or delayed).
pub const MAX_SKIP: u32 = 1000;
/// Most skipped message keys kept in all; the oldest are dropped past this.
pub const MAX_SKIPPED_KEYS: usize = 2000;
pub const HEADER_LEN: usize = 40 + KEM_EK_LEN + 1 + KEM_CT_LEN;
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
    /// Our current ML-KEM key pair (its seed), whose encapsulation key every
    /// header of our sending chain publishes. `None` only for a responder
    /// that has not received yet (and a state stored before ML-KEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kem: Option<KemSeed>,
    #[serde(default, skip_serializing_if = "Vec::is_empty", with = "b64vec")]
    kem_ek: Vec<u8>,
    /// The ciphertext every header of our sending chain carries: the one
    /// that chain's root step encapsulated to the peer. Empty for a chain
    /// started without the peer's key (the initiator's first).
    #[serde(default, skip_serializing_if = "Vec::is_empty", with = "b64vec")]
    kem_ct: Vec<u8>,
    /// Every message of our sending chain carried our encapsulation key,
    /// so the peer's next chain must carry a ciphertext (downgrade refusal).
    #[serde(default)]
    ek_whole_chain: bool,
    /// The root steps of our current sending and receiving chains mixed in
    /// an ML-KEM secret.
    #[serde(default)]
    pq_send: bool,
    #[serde(default)]
    pq_recv: bool,
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

/// `KDF_RK(rk, dh_out || kem_ss)`: the KEM secret, when the step has one,
/// follows the X25519 output in the input key material (hybrid: the output
/// is secret if either is).
fn kdf_rk(
    rk: &Secret32,
    dh_out: &Secret32,
    kem_ss: Option<&Secret32>,
) -> (Secret32, Secret32, Secret32) {
    let mut ikm = Zeroizing::new([0u8; 64]);
    ikm[..32].copy_from_slice(dh_out.as_bytes());
    let len = match kem_ss {
        Some(ss) => {
            ikm[32..].copy_from_slice(ss.as_bytes());
            64
        }
        None => 32,
    };
    let mut okm = Zeroizing::new([0u8; 96]);
    Hkdf::<Sha256>::new(Some(rk.as_bytes()), &ikm[..len])
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

/// The body cipher of message key `mk` in a message whose header nonce is
/// `header_nonce` (the first 24 bytes of the message).
fn message_cipher(
    mk: &Secret32,
    header_nonce: &[u8],
) -> (ChaCha20Poly1305, chacha20poly1305::Nonce) {
    let mut okm = Zeroizing::new([0u8; 44]);
    Hkdf::<Sha256>::new(Some(header_nonce), mk.as_bytes())
        .expand(MESSAGE_KEY_INFO, okm.as_mut())
        .expect("44 bytes is a valid HKDF-SHA256 length");
    let cipher = ChaCha20Poly1305::new_from_slice(&okm[..32]).expect("32-byte key");
    (cipher, *chacha20poly1305::Nonce::from_slice(&okm[32..]))
}

struct Header {
    dh: [u8; 32],
    pn: u32,
    n: u32,
    /// The sender's encapsulation key.
    ek: Vec<u8>,
    /// A ciphertext encapsulated to our key, when the sender's chain has one.
    ct: Option<Vec<u8>>,
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
    buf.extend_from_slice(&h.ek);
    buf.resize(24 + 40 + KEM_EK_LEN, 0);
    match &h.ct {
        Some(ct) => {
            buf.push(1);
            buf.extend_from_slice(ct);
        }
        None => buf.push(0),
    }
    buf.resize(24 + HEADER_LEN, 0);
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
    let at = 40 + KEM_EK_LEN;
    let ct = &buf[at + 1..];
    let ct = match buf[at] {
        0 if ct.iter().all(|b| *b == 0) => None,
        1 => Some(ct.to_vec()),
        // Authentic, so only a broken peer sends this: refuse it.
        _ => return None,
    };
    Some(Header {
        dh: dh_pub,
        pn: u32::from_be_bytes(buf[32..36].try_into().expect("4 bytes")),
        n: u32::from_be_bytes(buf[36..40].try_into().expect("4 bytes")),
        ek: buf[40..at].to_vec(),
        ct,
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
        Self::init_initiator_pq(init, responder_ratchet_key, None, rng)
    }

    /// [`Ratchet::init_initiator`] when the responder published an ML-KEM
    /// encapsulation key beforehand (a resync offer, PROTOCOL.md §6.7): the
    /// first chain is then hybrid too.
    pub fn init_initiator_pq<R: RngCore + CryptoRng>(
        init: &RatchetInit,
        responder_ratchet_key: &[u8; 32],
        responder_ek: Option<&[u8]>,
        rng: &mut R,
    ) -> Result<Self, ProtoError> {
        let dhs = DhKeyPair::generate(rng);
        // Without a key of the responder's to encapsulate to (the invitation
        // carries none, to stay small) this first chain is X25519 only. It
        // publishes our encapsulation key, so the responder's answer is not.
        let kem = KemSeed::generate(rng);
        let kem_ek = kem.encapsulation_key();
        let (kem_ct, ss) = match responder_ek {
            Some(ek) => {
                let (ct, ss) = kem_encapsulate(ek, rng)?;
                (ct, Some(ss))
            }
            None => (Vec::new(), None),
        };
        let (rk, cks, nhks) = kdf_rk(&init.root_key, &dhs.dh(responder_ratchet_key)?, ss.as_ref());
        let pq_send = ss.is_some();
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
            kem: Some(kem),
            kem_ek,
            kem_ct,
            ek_whole_chain: true,
            pq_send,
            pq_recv: false,
        })
    }

    /// The side that published its ratchet key (the inviter): `RatchetInitBobHE`.
    pub fn init_responder(init: &RatchetInit, ratchet_key: DhKeyPair) -> Self {
        Self::init_responder_pq(init, ratchet_key, None)
    }

    /// [`Ratchet::init_responder`] for a responder that published the
    /// encapsulation key of `kem` with its ratchet key: the initiator's
    /// first chain must then carry a ciphertext to it.
    pub fn init_responder_pq(
        init: &RatchetInit,
        ratchet_key: DhKeyPair,
        kem: Option<KemSeed>,
    ) -> Self {
        let published = kem.is_some();
        let kem_ek = kem
            .as_ref()
            .map(KemSeed::encapsulation_key)
            .unwrap_or_default();
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
            kem,
            kem_ek,
            kem_ct: Vec::new(),
            ek_whole_chain: published,
            pq_send: false,
            pq_recv: false,
        }
    }

    /// Whether the current sending and receiving chains both come from root
    /// steps that mixed in an ML-KEM secret: messages in both directions are
    /// protected against a quantum-capable recorder (PROTOCOL.md §6.2).
    pub fn post_quantum(&self) -> bool {
        self.pq_send && self.pq_recv
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
        if self.cks.is_none() || self.hks.is_none() {
            return Err(ProtoError::NotReady);
        }
        if self.kem.is_none() {
            // A state stored before ML-KEM: publish a key from now on, so
            // the peer's next step is hybrid (and ours after it).
            let kem = KemSeed::generate(rng);
            self.kem_ek = kem.encapsulation_key();
            self.kem = Some(kem);
        }
        let (Some(cks), Some(hks)) = (&self.cks, &self.hks) else {
            return Err(ProtoError::NotReady);
        };
        let (next_ck, mk) = kdf_ck(cks);
        let header = Header {
            dh: self.dhs.public(),
            pn: self.pn,
            n: self.ns,
            ek: self.kem_ek.clone(),
            ct: (!self.kem_ct.is_empty()).then(|| self.kem_ct.clone()),
        };
        let mut out = header_encrypt(hks, &header, &self.ad, rng);
        let mut aad = Vec::with_capacity(32 + ENC_HEADER_LEN);
        aad.extend_from_slice(&self.ad);
        aad.extend_from_slice(&out);
        let (cipher, nonce) = message_cipher(&mk, &out[..24]);
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
        // The receiving half: the peer's chain answers one of ours. If every
        // message of ours carried our encapsulation key, it must carry a
        // ciphertext: a classical answer to a post-quantum offer is refused.
        let ss_recv = match (&header.ct, &self.kem) {
            (Some(ct), Some(kem)) => Some(kem.decapsulate(ct)?),
            (Some(_), None) => return Err(ProtoError::Decrypt),
            (None, _) if self.ek_whole_chain => return Err(ProtoError::Downgrade),
            (None, _) => None,
        };
        self.pn = self.ns;
        self.ns = 0;
        self.nr = 0;
        self.hks = Some(self.nhks.clone());
        self.hkr = Some(self.nhkr.clone());
        self.dhr = Some(header.dh);
        let (rk, ckr, nhkr) = kdf_rk(&self.rk, &self.dhs.dh(&header.dh)?, ss_recv.as_ref());
        self.rk = rk;
        self.ckr = Some(ckr);
        self.nhkr = nhkr;
        self.pq_recv = ss_recv.is_some();
        // The sending half: a new X25519 key and a new ML-KEM key pair, and
        // an encapsulation to the key the peer's header published.
        self.dhs = DhKeyPair::generate(rng);
        let kem = KemSeed::generate(rng);
        let (ct, ss_send) = kem_encapsulate(&header.ek, rng)?;
        let (rk, cks, nhks) = kdf_rk(&self.rk, &self.dhs.dh(&header.dh)?, Some(&ss_send));
        self.rk = rk;
        self.cks = Some(cks);
        self.nhks = nhks;
        self.kem_ek = kem.encapsulation_key();
        self.kem = Some(kem);
        self.kem_ct = ct;
        self.ek_whole_chain = true;
        self.pq_send = true;
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
    let (cipher, nonce) = message_cipher(mk, &enc_header[..24]);
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
        pair_inner(seed)
    }

    fn pair_inner(seed: u64) -> (Ratchet, Ratchet, StdRng) {
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

    /// Issue 14 item 7: a copy of a ratchet state (a restored backup, a VM
    /// snapshot) that encrypts again under message keys already used must
    /// not reuse their (key, nonce): the same plaintext gives unrelated
    /// bodies, and XOR of two bodies is not the XOR of their plaintexts.
    #[test]
    fn a_rolled_back_state_never_reuses_a_body_key() {
        let (mut a, mut b, mut rng) = pair(7);
        let copy = a.clone();
        let m1 = a.encrypt(&[0u8; 64], &mut rng).unwrap();
        let mut a2 = copy;
        let m2 = a2.encrypt(&[0xffu8; 64], &mut rng).unwrap();
        let (c1, c2) = (&m1[ENC_HEADER_LEN..], &m2[ENC_HEADER_LEN..]);
        let xor: Vec<u8> = c1.iter().zip(c2).take(64).map(|(x, y)| x ^ y).collect();
        assert_ne!(xor, vec![0xffu8; 64], "one keystream for two messages");
        // Both still decrypt (one of them at the receiver: the other is at
        // a position already used, refused as a duplicate).
        assert_eq!(b.decrypt(&m2, &mut rng).unwrap(), vec![0xffu8; 64]);
        assert_eq!(b.decrypt(&m1, &mut rng), Err(ProtoError::Duplicate));
    }

    /// After one round trip every chain is hybrid; the responder's first
    /// receiving chain (the initiator's first, sent before it had any key of
    /// the responder's) is the one X25519-only chain.
    #[test]
    fn both_directions_are_post_quantum_after_one_round_trip() {
        let (mut a, mut b, mut rng) = pair(8);
        assert!(!a.post_quantum() && !b.post_quantum());
        let m = a.encrypt(b"1", &mut rng).unwrap();
        assert_eq!(m.len(), message_len(1));
        b.decrypt(&m, &mut rng).unwrap();
        assert!(b.pq_send && !b.pq_recv);
        let r = b.encrypt(b"2", &mut rng).unwrap();
        a.decrypt(&r, &mut rng).unwrap();
        assert!(a.post_quantum());
        let m = a.encrypt(b"3", &mut rng).unwrap();
        b.decrypt(&m, &mut rng).unwrap();
        assert!(b.post_quantum());
    }

    /// The answer of a peer that ignores our encapsulation key (a chain
    /// without a ciphertext) is refused, and changes nothing.
    #[test]
    fn a_classical_answer_to_a_post_quantum_offer_is_refused() {
        let (mut a, mut b, mut rng) = pair(9);
        let m = a.encrypt(b"offer", &mut rng).unwrap();
        b.decrypt(&m, &mut rng).unwrap();
        let mut downgraded = b.clone();
        downgraded.kem_ct.clear();
        let r = downgraded.encrypt(b"classical", &mut rng).unwrap();
        let before = serde_json::to_string(&a).unwrap();
        assert_eq!(a.decrypt(&r, &mut rng), Err(ProtoError::Downgrade));
        assert_eq!(serde_json::to_string(&a).unwrap(), before);
        let r = b.encrypt(b"hybrid", &mut rng).unwrap();
        assert_eq!(a.decrypt(&r, &mut rng).unwrap(), b"hybrid");
    }

    /// A state stored before ML-KEM (no KEM fields) keeps working and is
    /// hybrid from its next steps.
    #[test]
    fn a_state_from_before_ml_kem_upgrades_at_its_next_steps() {
        let (a, b, mut rng) = pair(10);
        // Make both look like states stored before ML-KEM (whose roots are
        // all X25519-only, as the initial ones are).
        let strip = |r: &Ratchet| -> Ratchet {
            let mut v = serde_json::to_value(r).unwrap();
            for f in [
                "kem",
                "kem_ek",
                "kem_ct",
                "ek_whole_chain",
                "pq_send",
                "pq_recv",
            ] {
                v.as_object_mut().unwrap().remove(f);
            }
            serde_json::from_value(v).unwrap()
        };
        let (mut a, mut b) = (strip(&a), strip(&b));
        assert!(!a.post_quantum());
        for i in 0..3u8 {
            let m = a.encrypt(&[i], &mut rng).unwrap();
            assert_eq!(b.decrypt(&m, &mut rng).unwrap(), [i]);
            let r = b.encrypt(&[i], &mut rng).unwrap();
            assert_eq!(a.decrypt(&r, &mut rng).unwrap(), [i]);
        }
        assert!(a.post_quantum() && b.post_quantum());
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config { cases: 24, failure_persistence: None, ..Default::default() })]

        /// A changed ML-KEM ciphertext, even under a valid header (a broken
        /// or lying peer), never gives both sides one root: the message
        /// does not decrypt, and the state stays as it was.
        #[test]
        fn a_changed_kem_ciphertext_is_detected(at in 0usize..KEM_CT_LEN, mask in 1u8..) {
            let (mut a, mut b, mut rng) = pair(11);
            let m = a.encrypt(b"1", &mut rng).unwrap();
            b.decrypt(&m, &mut rng).unwrap();
            let mut bad = b.clone();
            bad.kem_ct[at] ^= mask;
            let r = bad.encrypt(b"2", &mut rng).unwrap();
            let before = serde_json::to_string(&a).unwrap();
            proptest::prop_assert_eq!(a.decrypt(&r, &mut rng), Err(ProtoError::Decrypt));
            proptest::prop_assert_eq!(serde_json::to_string(&a).unwrap(), before);
        }

        /// A changed encapsulation key in our headers: the peer either
        /// refuses it at once (not a valid key) or encapsulates to it, and
        /// then we cannot read its answer: never a silent mismatch.
        #[test]
        fn a_changed_encapsulation_key_is_detected(at in 0usize..KEM_EK_LEN, mask in 1u8..) {
            let (mut a, mut b, mut rng) = pair(12);
            let mut bad = a.clone();
            bad.kem_ek[at] ^= mask;
            let m = bad.encrypt(b"1", &mut rng).unwrap();
            match b.decrypt(&m, &mut rng) {
                Err(e) => proptest::prop_assert_eq!(e, ProtoError::KeyAgreement),
                Ok(_) => {
                    let r = b.encrypt(b"2", &mut rng).unwrap();
                    proptest::prop_assert_eq!(a.decrypt(&r, &mut rng), Err(ProtoError::Decrypt));
                }
            }
        }
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
