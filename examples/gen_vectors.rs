//! Regenerates the protocol test vectors in `tests/vectors/` from fixed seeds:
//!
//! ```text
//! cargo run --example gen_vectors
//! ```
//!
//! Every random input (keys, nonces, ids) comes from `StdRng::seed_from_u64`
//! with one constant seed per file, and is written into the vectors
//! explicitly, so another implementation never needs this RNG: it feeds the
//! recorded bytes to its own code. tern's functions take their randomness as
//! an argument; the generator hands them a [`FixedRng`] that replays exactly
//! the recorded bytes (and fails if the code draws more or fewer).
//!
//! While generating, every output of tern is also recomputed with the small
//! independent [`reference`] implementation below (RFC 9180 HPKE, the ratchet
//! key schedule and message layout, the handshake KDF, ...) and the two must
//! agree, so a vector records what the protocol specifies, not merely what the
//! code happens to do.
//!
//! `tests/vectors.rs` includes this file as a module: it regenerates every file
//! and compares it byte for byte with the committed one, then checks each
//! stored case against tern in both directions. See `tests/vectors/README.md`.
#![allow(dead_code)]

use std::path::PathBuf;

use data_encoding::{BASE32_NOPAD, BASE64URL_NOPAD, HEXLOWER};
use ed25519_dalek::{Signer, SigningKey};
use rand::rngs::StdRng;
use rand::{CryptoRng, RngCore, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use tern::proto::device::{self, DeviceMsg, Entry, QueueGrant};
use tern::proto::envelope::{
    ChainError, ChainReceiver, ChainSender, ChainStatus, Envelope, Kind, ENVELOPE_LEN, MAX_BODY_LEN,
};
use tern::proto::file::{ChunkError, FileOffer, OfferQueue, OfferSet};
use tern::proto::handshake::{joiner_agree, Agreement, InviterSecrets};
use tern::proto::hello::{Channel, Hello, HelloReply, Profile};
use tern::proto::invitation::{Invitation, SendQueue};
use tern::proto::keys::{DhKeyPair, Secret32};
use tern::proto::queue_msg::{self, QueueMessage, RATCHET_MSG_LEN};
use tern::proto::ratchet::{Ratchet, RatchetInit};
use tern::proto::receipt::{Receipt, MAX_RECEIPT_IDS};
use tern::proto::rekey::{parse_link, AnyInvitation};
use tern::proto::security_code::{codes_match, security_code};
use tern::proto::ProtoError;
use tern::wire::address::{AddressError, Host, RelayAddress, Transport};
use tern::wire::codec::{CodecError, Reader, Writer};
use tern::wire::command::{MAX_COMMAND_LEN, MAX_REPLY_LEN};
use tern::wire::delivery::{self, DeliveryError};
use tern::wire::frame::{self as wire_frame, FrameBuilder, FRAME_QUANTUM, MAX_FRAME_LEN};
use tern::wire::session::{self as wire_session, Fixed, SessionError};
use tern::wire::{
    ClientHandshake, Command, ErrorCode, RelayInfo, Reply, Request, ServerHandshake, Session,
    WireError, DELIVERED_LEN, QUEUE_MSG_LEN,
};

// ---------------------------------------------------------------------------
// Encoding helpers shared with tests/vectors.rs
// ---------------------------------------------------------------------------

pub fn hex(b: &[u8]) -> String {
    HEXLOWER.encode(b)
}

pub fn unhex(s: &str) -> Vec<u8> {
    HEXLOWER
        .decode(s.as_bytes())
        .unwrap_or_else(|e| panic!("bad hex {:?}: {e}", &s[..s.len().min(40)]))
}

pub fn arr<const N: usize>(s: &str) -> [u8; N] {
    unhex(s)
        .try_into()
        .unwrap_or_else(|v: Vec<u8>| panic!("expected {N} bytes, got {}", v.len()))
}

/// A byte string followed by zero bytes: `hex` is the string up to its last
/// non-zero byte, `len` the total length. Keeps fixed-size, zero-padded
/// blocks readable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Padded {
    pub hex: String,
    pub len: usize,
}

impl Padded {
    pub fn of(b: &[u8]) -> Self {
        let end = b.iter().rposition(|&x| x != 0).map_or(0, |i| i + 1);
        Self {
            hex: hex(&b[..end]),
            len: b.len(),
        }
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut v = unhex(&self.hex);
        assert!(v.len() <= self.len, "padded value longer than its len");
        v.resize(self.len, 0);
        v
    }
}

/// How an invalid case derives its input from a valid one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Mutation {
    /// XOR the byte at `offset` with `mask`.
    Xor { offset: usize, mask: u8 },
    /// Keep the first `len` bytes.
    Truncate { len: usize },
    /// Append bytes.
    Append { hex: String },
}

impl Mutation {
    pub fn apply(&self, b: &[u8]) -> Vec<u8> {
        let mut v = b.to_vec();
        match self {
            Mutation::Xor { offset, mask } => v[*offset] ^= mask,
            Mutation::Truncate { len } => v.truncate(*len),
            Mutation::Append { hex } => v.extend_from_slice(&unhex(hex)),
        }
        v
    }
}

fn xor(offset: usize, mask: u8) -> Option<Mutation> {
    Some(Mutation::Xor { offset, mask })
}

/// An RNG that hands out exactly the bytes it was given, in order, and panics
/// if asked for more: it proves which random bytes an operation consumes.
pub struct FixedRng {
    bytes: Vec<u8>,
    pos: usize,
}

impl FixedRng {
    pub fn new(bytes: &[u8]) -> Self {
        Self {
            bytes: bytes.to_vec(),
            pos: 0,
        }
    }

    pub fn used(&self) -> usize {
        self.pos
    }

    pub fn assert_used_up(&self, what: &str) {
        assert_eq!(
            self.pos,
            self.bytes.len(),
            "{what}: drew {} of the {} random bytes provided",
            self.pos,
            self.bytes.len()
        );
    }
}

impl RngCore for FixedRng {
    fn next_u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        self.fill_bytes(&mut b);
        u32::from_le_bytes(b)
    }

    fn next_u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        self.fill_bytes(&mut b);
        u64::from_le_bytes(b)
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        let end = self.pos + dest.len();
        assert!(
            end <= self.bytes.len(),
            "the code drew {end} random bytes; the vector provides {}",
            self.bytes.len()
        );
        dest.copy_from_slice(&self.bytes[self.pos..end]);
        self.pos = end;
    }

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

impl CryptoRng for FixedRng {}

type Key = [u8; 32];
type Id = [u8; 16];

fn random<const N: usize>(rng: &mut StdRng) -> [u8; N] {
    let mut b = [0u8; N];
    rng.fill_bytes(&mut b);
    b
}

fn random_vec(rng: &mut StdRng, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    rng.fill_bytes(&mut b);
    b
}

fn seeded(file: u64) -> StdRng {
    // "tern" in ASCII, then the file number.
    StdRng::seed_from_u64(0x7465_726e_0000_0000 | file)
}

// ---------------------------------------------------------------------------
// Stable error names (one per error variant; README lists them)
// ---------------------------------------------------------------------------

pub fn codec_err(e: &CodecError) -> String {
    match e {
        CodecError::Truncated => "truncated".into(),
        CodecError::Trailing => "trailing".into(),
        CodecError::BadPadding => "bad_padding".into(),
        CodecError::Invalid(what) => format!("invalid: {what}"),
    }
}

pub fn proto_err(e: &ProtoError) -> String {
    match e {
        ProtoError::Malformed(c) => codec_err(c),
        ProtoError::NotAnInvitation => "not_an_invitation".into(),
        ProtoError::LinkDamaged => "link_damaged".into(),
        ProtoError::UnsupportedVersion(_) => "unsupported_version".into(),
        ProtoError::Address(_) => "address".into(),
        ProtoError::KeyAgreement => "key_agreement".into(),
        ProtoError::Decrypt => "decrypt".into(),
        ProtoError::Duplicate => "duplicate".into(),
        ProtoError::TooManySkipped(_) => "too_many_skipped".into(),
        ProtoError::TooLong { .. } => "too_long".into(),
        ProtoError::UnknownType(_) => "unknown_type".into(),
        ProtoError::ChainMismatch => "chain_mismatch".into(),
        ProtoError::NotReady => "not_ready".into(),
        ProtoError::Downgrade => "downgrade".into(),
        ProtoError::InvitationReused => "invitation_reused".into(),
        ProtoError::UnsupportedInvitation(_) => "unsupported_invitation".into(),
    }
}

pub fn addr_err(e: &AddressError) -> String {
    match e {
        AddressError::Scheme => "scheme".into(),
        AddressError::Key => "key".into(),
        AddressError::AccessKey => "access_key".into(),
        AddressError::Host => "host".into(),
        AddressError::MappedV4 => "mapped_v4".into(),
        AddressError::WeakKey => "weak_key".into(),
        AddressError::Port => "port".into(),
        AddressError::Path => "path".into(),
        AddressError::Binary(c) => codec_err(c),
    }
}

pub fn wire_err(e: &WireError) -> String {
    match e {
        WireError::Codec(c) => codec_err(c),
        WireError::UnknownCommand(_) => "unknown_command".into(),
        WireError::UnknownReply(_) => "unknown_reply".into(),
        WireError::UnknownError(_) => "unknown_error".into(),
    }
}

pub fn session_err(e: &SessionError) -> String {
    match e {
        SessionError::BadKey => "bad_key".into(),
        SessionError::Length => "length".into(),
        SessionError::Handshake => "handshake".into(),
        SessionError::Version(..) => "version".into(),
        SessionError::Malformed(w) => format!("malformed: {}", wire_err(w)),
        SessionError::Frame => "frame".into(),
        SessionError::TooLong => "too_long".into(),
    }
}

pub fn delivery_err(e: &DeliveryError) -> String {
    match e {
        DeliveryError::KeyAgreement => "key_agreement".into(),
        DeliveryError::Open => "open".into(),
    }
}

/// Every relay error code, in code order (PROTOCOL.md §3.6); the vectors
/// name them as the specification does (`ErrorCode::name`).
pub const ERROR_CODES: [ErrorCode; 12] = [
    ErrorCode::BadRequest,
    ErrorCode::Auth,
    ErrorCode::QueueFull,
    ErrorCode::Access,
    ErrorCode::NoMessage,
    ErrorCode::Internal,
    ErrorCode::Unavailable,
    ErrorCode::NotEmpty,
    ErrorCode::RateLimited,
    ErrorCode::Quota,
    ErrorCode::Limit,
    ErrorCode::NotSecured,
];

pub fn error_code(name: &str) -> ErrorCode {
    *ERROR_CODES
        .iter()
        .find(|c| c.name() == name)
        .unwrap_or_else(|| panic!("unknown error code name {name}"))
}

fn expect_err<T, E>(r: Result<T, E>, name: impl Fn(&E) -> String, want: &str, what: &str) {
    match r {
        Ok(_) => panic!("{what}: expected error {want}, got success"),
        Err(e) => assert_eq!(name(&e), want, "{what}"),
    }
}

// ---------------------------------------------------------------------------
// Independent reference computations (no tern code)
// ---------------------------------------------------------------------------

pub mod reference {
    use chacha20poly1305::aead::{Aead, KeyInit, Payload};
    use chacha20poly1305::{ChaCha20Poly1305, XChaCha20Poly1305};
    use hkdf::Hkdf;
    use hmac::{Hmac, Mac};
    use sha2::{Digest, Sha256};

    pub fn hkdf(salt: Option<&[u8]>, ikm: &[u8], info: &[u8], len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        Hkdf::<Sha256>::new(salt, ikm)
            .expand(info, &mut out)
            .expect("valid HKDF length");
        out
    }

    pub fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("any key length");
        m.update(data);
        m.finalize().into_bytes().into()
    }

    pub fn sha256(parts: &[&[u8]]) -> [u8; 32] {
        let mut h = Sha256::new();
        for p in parts {
            h.update(p);
        }
        h.finalize().into()
    }

    pub fn x25519(secret: &[u8; 32], public: &[u8; 32]) -> [u8; 32] {
        x25519_dalek::StaticSecret::from(*secret)
            .diffie_hellman(&x25519_dalek::PublicKey::from(*public))
            .to_bytes()
    }

    pub fn x25519_public(secret: &[u8; 32]) -> [u8; 32] {
        x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(*secret)).to_bytes()
    }

    pub fn chacha_seal(key: &[u8], nonce: &[u8], aad: &[u8], pt: &[u8]) -> Vec<u8> {
        ChaCha20Poly1305::new_from_slice(key)
            .expect("32-byte key")
            .encrypt(nonce.into(), Payload { msg: pt, aad })
            .expect("within limits")
    }

    pub fn xchacha_seal(key: &[u8], nonce: &[u8], aad: &[u8], pt: &[u8]) -> Vec<u8> {
        XChaCha20Poly1305::new_from_slice(key)
            .expect("32-byte key")
            .encrypt(nonce.into(), Payload { msg: pt, aad })
            .expect("within limits")
    }

    fn take<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
        b[at..at + N].try_into().expect("length")
    }

    // --- files (PROTOCOL.md §16) ---

    pub fn file_chunk_count(size: u64) -> u64 {
        size.div_ceil(15_979).max(1)
    }

    pub fn file_set_key(file_key: &[u8; 32], set: u8) -> [u8; 32] {
        let k = hkdf(
            None,
            file_key,
            &[b"tern/v1 file chunks".as_slice(), &[set]].concat(),
            32,
        );
        take(&k, 0)
    }

    /// (nonce, the 16,000-byte chunk message); `data` is zero-filled to 15,979.
    pub fn file_chunk(set_key: &[u8], index: u32, count: u64, data: &[u8]) -> ([u8; 24], Vec<u8>) {
        let mut nonce = [0u8; 24];
        nonce[..4].copy_from_slice(&index.to_be_bytes());
        nonce[4] = (index as u64 + 1 == count) as u8;
        let mut pt = data.to_vec();
        pt.resize(15_979, 0);
        let aad = [&[0x05u8][..], &index.to_be_bytes()].concat();
        let sealed = xchacha_seal(set_key, &nonce, &aad, &pt);
        let mut msg = vec![0x05];
        msg.extend_from_slice(&index.to_be_bytes());
        msg.extend_from_slice(&sealed);
        (nonce, msg)
    }

    /// The offer body written field by field from a case.
    pub fn file_offer(c: &super::FileCase) -> Vec<u8> {
        let un = |s: &str| super::unhex(s);
        let mut b = vec![1u8];
        b.extend_from_slice(&c.size.unwrap().to_be_bytes());
        b.extend(un(c.sha256.as_ref().unwrap()));
        b.extend(un(c.file_key.as_ref().unwrap()));
        let name = c.name.as_ref().unwrap().as_bytes();
        b.push(name.len() as u8);
        b.extend_from_slice(name);
        let cap = c.caption.as_deref().unwrap_or("").as_bytes();
        b.extend_from_slice(&(cap.len() as u16).to_be_bytes());
        b.extend_from_slice(cap);
        b.extend_from_slice(&c.chunks_per_queue.unwrap().to_be_bytes());
        b.push(c.sets.len() as u8);
        for s in &c.sets {
            let a: tern::wire::address::RelayAddress = s.relay.parse().unwrap();
            b.extend(super::encode_address(&a));
            b.extend(un(&s.set_seed));
            b.extend_from_slice(&(s.queues.len() as u16).to_be_bytes());
            for q in &s.queues {
                b.extend(un(&q.recipient_id));
                b.extend(un(&q.queue_secret));
            }
        }
        b
    }

    // --- handshake (PROTOCOL.md §5) ---

    pub fn invitation_hash(binary: &[u8]) -> [u8; 32] {
        sha256(&[b"tern/v1 invitation", binary])
    }

    pub fn transcript(
        h: &[u8; 32],
        i: &[u8; 32],
        r: &[u8; 32],
        j: &[u8; 32],
        e: &[u8; 32],
    ) -> [u8; 32] {
        sha256(&[b"tern/v1 transcript", h, i, r, j, e])
    }

    /// root key, initiator header key, responder header key, connection secret.
    pub fn handshake_keys(th: &[u8; 32], dh: [[u8; 32]; 3]) -> [[u8; 32]; 4] {
        let mut ikm = vec![0xffu8; 32];
        for d in dh {
            ikm.extend_from_slice(&d);
        }
        let okm = hkdf(Some(th), &ikm, b"tern/v1 handshake", 128);
        [
            take(&okm, 0),
            take(&okm, 32),
            take(&okm, 64),
            take(&okm, 96),
        ]
    }

    pub fn security_code(th: &[u8; 32]) -> String {
        let d = sha256(&[b"tern/v1 security code", th]);
        (0..6)
            .map(|i| {
                let v = d[i * 5..i * 5 + 5]
                    .iter()
                    .fold(0u64, |a, b| (a << 8) | u64::from(*b));
                format!("{:05}", v % 100_000)
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    // --- double ratchet (PROTOCOL.md §6) ---

    /// KDF_RK: (root key, chain key, next header key), of a step without
    /// an ML-KEM secret.
    pub fn kdf_rk(rk: &[u8; 32], dh: &[u8; 32]) -> ([u8; 32], [u8; 32], [u8; 32]) {
        kdf_rk_pq(rk, dh, None)
    }

    /// KDF_RK of a hybrid step: ikm = dh || ss.
    pub fn kdf_rk_pq(
        rk: &[u8; 32],
        dh: &[u8; 32],
        ss: Option<&[u8; 32]>,
    ) -> ([u8; 32], [u8; 32], [u8; 32]) {
        let mut ikm = dh.to_vec();
        if let Some(ss) = ss {
            ikm.extend_from_slice(ss);
        }
        let okm = hkdf(Some(rk), &ikm, b"tern/v1 ratchet root", 96);
        (take(&okm, 0), take(&okm, 32), take(&okm, 64))
    }

    // --- ML-KEM-768 (FIPS 203), straight from the ml-kem crate ---

    fn kem_pair(
        seed: &[u8],
    ) -> (
        <ml_kem::MlKem768 as ml_kem::KemCore>::DecapsulationKey,
        <ml_kem::MlKem768 as ml_kem::KemCore>::EncapsulationKey,
    ) {
        use ml_kem::KemCore;
        let d = ml_kem::B32::try_from(&seed[..32]).expect("d");
        let z = ml_kem::B32::try_from(&seed[32..64]).expect("z");
        ml_kem::MlKem768::generate_deterministic(&d, &z)
    }

    /// ML-KEM.KeyGen_internal(d, z): the encapsulation key.
    pub fn kem_keygen(seed: &[u8]) -> Vec<u8> {
        use ml_kem::EncodedSizeUser;
        kem_pair(seed).1.as_bytes().to_vec()
    }

    /// ML-KEM.Encaps_internal(ek, m): (ciphertext, shared secret).
    pub fn kem_encaps(ek: &[u8], m: &[u8; 32]) -> (Vec<u8>, [u8; 32]) {
        use ml_kem::{EncapsulateDeterministic, EncodedSizeUser};
        type Ek = <ml_kem::MlKem768 as ml_kem::KemCore>::EncapsulationKey;
        let key = Ek::from_bytes(ek.try_into().expect("1184 bytes"));
        let m = ml_kem::B32::try_from(&m[..]).expect("m");
        let (ct, ss) = key.encapsulate_deterministic(&m).expect("encaps");
        (ct.to_vec(), ss.as_slice().try_into().expect("32"))
    }

    /// ML-KEM.Decaps(dk, ct) with dk from the seed.
    pub fn kem_decaps(seed: &[u8], ct: &[u8]) -> [u8; 32] {
        use ml_kem::kem::Decapsulate;
        let ct: &ml_kem::Ciphertext<ml_kem::MlKem768> = ct.try_into().expect("1088 bytes");
        let ss = kem_pair(seed).0.decapsulate(ct).expect("decaps");
        ss.as_slice().try_into().expect("32")
    }

    /// KDF_CK: (next chain key, message key).
    pub fn kdf_ck(ck: &[u8; 32]) -> ([u8; 32], [u8; 32]) {
        (hmac(ck, &[0x02]), hmac(ck, &[0x01]))
    }

    /// The 2,313-byte header: dh || pn || n || ek || flag || ct (or zeros).
    pub fn header(dh: &[u8; 32], pn: u32, n: u32, ek: &[u8], ct: Option<&[u8]>) -> Vec<u8> {
        let mut h = dh.to_vec();
        h.extend_from_slice(&pn.to_be_bytes());
        h.extend_from_slice(&n.to_be_bytes());
        assert_eq!(ek.len(), 1184);
        h.extend_from_slice(ek);
        match ct {
            Some(ct) => {
                assert_eq!(ct.len(), 1088);
                h.push(1);
                h.extend_from_slice(ct);
            }
            None => h.resize(40 + 1184 + 1 + 1088, 0),
        }
        h
    }

    /// (ChaCha20-Poly1305 key, nonce) of a message key in a message with
    /// this header nonce.
    pub fn message_cipher(mk: &[u8; 32], header_nonce: &[u8; 24]) -> ([u8; 32], [u8; 12]) {
        let okm = hkdf(Some(header_nonce), mk, b"tern/v1 message key", 44);
        (take(&okm, 0), take(&okm, 32))
    }

    pub fn ratchet_message(
        hk: &[u8; 32],
        header_nonce: &[u8; 24],
        header: &[u8],
        ad: &[u8; 32],
        mk: &[u8; 32],
        plaintext: &[u8],
    ) -> Vec<u8> {
        let mut out = header_nonce.to_vec();
        out.extend(xchacha_seal(hk, header_nonce, ad, header));
        let mut aad = ad.to_vec();
        aad.extend_from_slice(&out);
        let (key, nonce) = message_cipher(mk, header_nonce);
        out.extend(chacha_seal(&key, &nonce, &aad, plaintext));
        out
    }

    // --- envelopes, queue layer, delivery ---

    pub fn chain_hash(unpadded: &[u8]) -> [u8; 32] {
        sha256(&[b"tern/v1 chain", unpadded])
    }

    pub fn queue_key(connection_secret: &[u8; 32], sender_id: &[u8; 16]) -> [u8; 32] {
        take(
            &hkdf(
                Some(sender_id),
                connection_secret,
                b"tern/v1 queue layer",
                32,
            ),
            0,
        )
    }

    pub fn queue_seal(key: &[u8; 32], nonce: &[u8; 24], ratchet_msg: &[u8], len: usize) -> Vec<u8> {
        let mut out = vec![0x02];
        out.extend_from_slice(nonce);
        out.extend(xchacha_seal(key, nonce, &[0x02], ratchet_msg));
        out.resize(len, 0);
        out
    }

    /// A queue message of type `kind` (0x02, 0x03, 0x04) under the queue layer.
    pub fn queue_seal_typed(
        key: &[u8; 32],
        nonce: &[u8; 24],
        kind: u8,
        body: &[u8],
        len: usize,
    ) -> Vec<u8> {
        let mut out = vec![kind];
        out.extend_from_slice(nonce);
        out.extend(xchacha_seal(key, nonce, &[kind], body));
        out.resize(len, 0);
        out
    }

    /// The resync key schedule (§6.7): root key, initiator and responder
    /// header keys.
    pub fn resync_keys(salt: &[u8; 32], dh: [[u8; 32]; 3], cs: &[u8; 32]) -> [[u8; 32]; 3] {
        let mut ikm = vec![0xffu8; 32];
        for d in dh {
            ikm.extend_from_slice(&d);
        }
        ikm.extend_from_slice(cs);
        let okm = hkdf(Some(salt), &ikm, b"tern/v1 resync", 96);
        [take(&okm, 0), take(&okm, 32), take(&okm, 64)]
    }

    pub fn digest(ratchet_msg: &[u8]) -> [u8; 32] {
        sha256(&[b"tern/v1 message digest", ratchet_msg])
    }

    pub fn delivery_cipher(queue_secret: &[u8; 32], msg_id: &[u8; 16]) -> ([u8; 32], [u8; 12]) {
        let okm = hkdf(Some(msg_id), queue_secret, b"tern/v2 delivery", 44);
        (take(&okm, 0), take(&okm, 32))
    }
}

/// The link form (PROTOCOL.md §4.2), from BIP 350's own description of the
/// bech32m checksum: no tern code and no bech32 library.
pub mod link_ref {
    use data_encoding::BASE32_NOPAD;

    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    const GEN: [u32; 5] = [0x3b6a57b2, 0x26508e6d, 0x1ea119fa, 0x3d4233dd, 0x2a1462b3];
    const BECH32M_CONST: u32 = 0x2bc830a3;

    fn polymod(values: &[u8]) -> u32 {
        let mut chk: u32 = 1;
        for &v in values {
            let top = chk >> 25;
            chk = ((chk & 0x1ff_ffff) << 5) ^ u32::from(v);
            for (i, g) in GEN.iter().enumerate() {
                if (top >> i) & 1 == 1 {
                    chk ^= g;
                }
            }
        }
        chk
    }

    /// BIP 173's expansion of the human-readable part "tern".
    fn hrp_expand() -> Vec<u8> {
        let hrp = b"tern";
        let mut v: Vec<u8> = hrp.iter().map(|c| c >> 5).collect();
        v.push(0);
        v.extend(hrp.iter().map(|c| c & 31));
        v
    }

    fn values(body: &str) -> Vec<u8> {
        body.bytes()
            .map(|c| ALPHABET.iter().position(|&a| a == c).expect("base32") as u8)
            .collect()
    }

    /// The six checksum characters for a body of base32 characters.
    pub fn checksum(body: &str) -> String {
        let mut v = hrp_expand();
        v.extend(values(body));
        v.extend([0u8; 6]);
        let pm = polymod(&v) ^ BECH32M_CONST;
        (0..6)
            .map(|i| ALPHABET[((pm >> (5 * (5 - i))) & 31) as usize] as char)
            .collect()
    }

    /// `TERN:` + base32(binary) + checksum.
    pub fn link(binary: &[u8]) -> String {
        let body = BASE32_NOPAD.encode(binary);
        format!("TERN:{body}{}", checksum(&body))
    }

    /// A link over any body of base32 characters, canonical or not.
    pub fn link_over(body: &str) -> String {
        format!("TERN:{body}{}", checksum(body))
    }

    /// Whether the text (upper case, no white space) carries a valid checksum.
    pub fn verifies(link: &str) -> bool {
        let Some(rest) = link.strip_prefix("TERN:") else {
            return false;
        };
        if rest.len() < 6 || !rest.bytes().all(|c| ALPHABET.contains(&c)) {
            return false;
        }
        let mut v = hrp_expand();
        v.extend(values(rest));
        polymod(&v) == BECH32M_CONST
    }
}

use reference as refc;

// ---------------------------------------------------------------------------
// relay_address.json
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddressFields {
    /// "http" (`tern://`) or "https" (`tern+https://`).
    pub transport: String,
    /// "ipv4", "ipv6" or "name".
    pub host_kind: String,
    pub host: String,
    pub port: u16,
    pub path: String,
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_key: Option<String>,
}

impl AddressFields {
    pub fn of(a: &RelayAddress) -> Self {
        let (host_kind, host) = match &a.host {
            Host::V4(ip) => ("ipv4", ip.to_string()),
            Host::V6(ip) => ("ipv6", ip.to_string()),
            Host::Name(n) => ("name", n.clone()),
        };
        Self {
            transport: match a.transport {
                Transport::Http => "http",
                Transport::Https => "https",
            }
            .into(),
            host_kind: host_kind.into(),
            host,
            port: a.port,
            path: a.path.clone(),
            key: hex(&a.key),
            access_key: a.access_key.clone(),
        }
    }

    pub fn to_address(&self) -> RelayAddress {
        RelayAddress {
            transport: match self.transport.as_str() {
                "http" => Transport::Http,
                "https" => Transport::Https,
                t => panic!("transport {t}"),
            },
            host: match self.host_kind.as_str() {
                "ipv4" => Host::V4(self.host.parse().expect("IPv4")),
                "ipv6" => Host::V6(self.host.parse().expect("IPv6")),
                "name" => Host::Name(self.host.clone()),
                k => panic!("host kind {k}"),
            },
            port: self.port,
            path: self.path.clone(),
            key: arr(&self.key),
            access_key: self.access_key.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddressCase {
    pub comment: String,
    pub result: String,
    /// Valid: the canonical text form. Invalid: text input that must be refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// Valid: the binary form. Invalid: binary input that must be refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binary: Option<String>,
    /// Other spellings that parse to the same address.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub also_accepted: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<AddressFields>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

pub fn encode_address(a: &RelayAddress) -> Vec<u8> {
    let mut w = Writer::new();
    a.encode(&mut w);
    w.into_vec()
}

pub fn decode_address(b: &[u8]) -> Result<RelayAddress, AddressError> {
    let mut r = Reader::new(b);
    let a = RelayAddress::decode(&mut r)?;
    r.finish()?;
    Ok(a)
}

/// A point of order 8 on Curve25519 (u-coordinate, little endian).
const LOW_ORDER_8: [u8; 32] = [
    0xe0, 0xeb, 0x7a, 0x7c, 0x3b, 0x41, 0xb8, 0xae, 0x16, 0x56, 0xe3, 0xfa, 0xf1, 0x9f, 0xc4, 0x6a,
    0xda, 0x09, 0x8d, 0xeb, 0x9c, 0x32, 0xb1, 0xfd, 0x86, 0x62, 0x05, 0x16, 0x5f, 0x49, 0xb8, 0x00,
];

/// p + 1 = 2^255 − 18, which X25519 reads as u = 1.
const P_PLUS_1: [u8; 32] = [
    0xee, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f,
];

fn key_text(k: &[u8; 32]) -> String {
    BASE64URL_NOPAD.encode(k)
}

fn gen_relay_address() -> Vec<AddressCase> {
    let mut rng = seeded(1);
    let mut out = Vec::new();
    let mut valid = |comment: &str, input: String, extra: Vec<String>| {
        let a: RelayAddress = input.parse().expect(comment);
        let text = a.to_string();
        let mut also = Vec::new();
        if input != text {
            also.push(input);
        }
        also.extend(extra);
        for t in &also {
            assert_eq!(t.parse::<RelayAddress>().unwrap(), a, "{comment}: {t}");
        }
        let binary = encode_address(&a);
        assert_eq!(decode_address(&binary).unwrap(), a);
        out.push(AddressCase {
            comment: comment.into(),
            result: "valid".into(),
            text: Some(text),
            binary: Some(hex(&binary)),
            also_accepted: also,
            address: Some(AddressFields::of(&a)),
            error: None,
        });
    };
    let k: Vec<String> = (0..8).map(|_| key_text(&random(&mut rng))).collect();
    valid(
        "IPv4 host, plain HTTP, explicit port",
        format!("tern://{}@203.0.113.7:5223", k[0]),
        vec![format!("  tern://{}@203.0.113.7:5223\n", k[0])],
    );
    valid(
        "no port: tern:// implies 5223, and the canonical text always names the port",
        format!("tern://{}@198.51.100.20", k[1]),
        vec![],
    );
    valid(
        "IPv6 host in brackets, with an access key",
        format!("tern://{}:op-Key_2024@[2001:db8::1]:8443", k[2]),
        vec![format!(
            "tern://{}:op-Key_2024@[2001:DB8:0:0:0:0:0:1]:8443",
            k[2]
        )],
    );
    valid(
        "host names are case-insensitive and stored in lower case",
        format!("tern://{}@Relay.Example.ORG:7000", k[3]),
        vec![],
    );
    valid(
        "HTTPS front with a path; tern+https:// implies port 443",
        format!("tern+https://{}@relay.example.net/tern/relay-1", k[4]),
        vec![format!(
            "tern+https://{}@relay.example.net:443/tern/relay-1/",
            k[4]
        )],
    );
    valid(
        "HTTPS with an IPv6 host, port, path and access key",
        format!("tern+https://{}:abc@[2001:db8::2]:8443/base_~.x", k[5]),
        vec![],
    );
    valid(
        "a lone slash after the host is no path",
        format!("tern+https://{}@example.com/", k[6]),
        vec![format!("tern+https://{}@example.com", k[6])],
    );
    valid(
        "single-label host name with digits and hyphens, highest port",
        format!("tern://{}@relay-01:65535", k[7]),
        vec![],
    );

    let k0 = &k[0];
    let invalid_text: Vec<(&str, String, &str)> = vec![
        (
            "an http:// URL is not a relay address",
            format!("http://{k0}@1.2.3.4:1"),
            "scheme",
        ),
        (
            "no @: the key and host are not separated",
            format!("tern://{k0}"),
            "key",
        ),
        (
            "a key of 42 characters",
            format!("tern://{}@1.2.3.4", &k0[..42]),
            "key",
        ),
        (
            "a key in standard base64 ('+' is not base64url)",
            format!("tern://+{}@1.2.3.4", &k0[1..]),
            "key",
        ),
        (
            "an empty access key",
            format!("tern://{k0}:@1.2.3.4"),
            "access_key",
        ),
        (
            "an access key with a space",
            format!("tern://{k0}:bad key@1.2.3.4"),
            "access_key",
        ),
        (
            "an access key of 65 characters",
            format!("tern://{k0}:{}@1.2.3.4", "a".repeat(65)),
            "access_key",
        ),
        ("port 0", format!("tern://{k0}@1.2.3.4:0"), "port"),
        ("port 65536", format!("tern://{k0}@1.2.3.4:65536"), "port"),
        (
            "a port with a plus sign",
            format!("tern://{k0}@1.2.3.4:+80"),
            "port",
        ),
        ("an empty port", format!("tern://{k0}@1.2.3.4:"), "port"),
        (
            "digits and dots that are not an IPv4 address",
            format!("tern://{k0}@1.2.3:1"),
            "host",
        ),
        (
            "a label starting with a hyphen",
            format!("tern://{k0}@-bad.example:1"),
            "host",
        ),
        (
            "an underscore in a host name",
            format!("tern://{k0}@bad_host.example"),
            "host",
        ),
        (
            "an IPv6 address without the closing bracket",
            format!("tern://{k0}@[::1:80"),
            "host",
        ),
        (
            "garbage after an IPv6 address",
            format!("tern://{k0}@[::1]x"),
            "port",
        ),
        (
            "a path after a plain tern:// host",
            format!("tern://{k0}@relay.example/path"),
            "path",
        ),
        (
            "a space in a path",
            format!("tern+https://{k0}@relay.example/a b"),
            "path",
        ),
        (
            "a path of 129 characters",
            format!("tern+https://{k0}@relay.example/{}", "p".repeat(128)),
            "path",
        ),
        (
            "an IPv4-mapped IPv6 address: a second spelling of an IPv4 host",
            format!("tern://{k0}@[::ffff:192.0.2.1]:5223"),
            "mapped_v4",
        ),
        (
            "an IPv4-mapped IPv6 address written in hexadecimal",
            format!("tern://{k0}@[::ffff:c000:201]"),
            "mapped_v4",
        ),
        (
            "a relay key of all zeros (u = 0, order 2): es would be public",
            format!("tern://{}@192.0.2.1:5223", key_text(&[0; 32])),
            "weak_key",
        ),
        (
            "a relay key of order 8 on the curve: es would be public",
            format!("tern://{}@192.0.2.1:5223", key_text(&LOW_ORDER_8)),
            "weak_key",
        ),
        (
            "a relay key u = p + 1, a non-canonical spelling of u = 1 (order 4 on the twist)",
            format!("tern://{}@192.0.2.1:5223", key_text(&P_PLUS_1)),
            "weak_key",
        ),
    ];
    for (comment, text, err) in invalid_text {
        expect_err(text.parse::<RelayAddress>(), addr_err, err, comment);
        out.push(AddressCase {
            comment: comment.into(),
            result: "invalid".into(),
            text: Some(text),
            binary: None,
            also_accepted: vec![],
            address: None,
            error: Some(err.into()),
        });
    }

    // Binary inputs, built field by field: flags, host, port, key, path, access.
    let key: [u8; 32] = random(&mut rng);
    let bin = |flags: u8, host: &[u8], port: u16, rest: &[u8]| -> Vec<u8> {
        let mut v = vec![flags];
        v.extend_from_slice(host);
        v.extend_from_slice(&port.to_be_bytes());
        v.extend_from_slice(&key);
        v.extend_from_slice(rest);
        v
    };
    let name = |n: &[u8]| -> Vec<u8> {
        let mut v = vec![n.len() as u8];
        v.extend_from_slice(n);
        v
    };
    let v4 = [192, 0, 2, 1];
    let good = bin(0, &v4, 5223, &[]);
    assert!(decode_address(&good).is_ok());
    let invalid_bin: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "a reserved flag bit (5) set",
            bin(0x20, &v4, 5223, &[]),
            "invalid: relay address flags",
        ),
        (
            "host kind 3 is reserved",
            bin(3, &v4, 5223, &[]),
            "invalid: relay host kind",
        ),
        (
            "a host name in upper case (the binary form is canonical)",
            bin(2, &name(b"Relay.example"), 1, &[]),
            "host",
        ),
        (
            "a host name label starting with a hyphen",
            bin(2, &name(b"-relay.example"), 1, &[]),
            "host",
        ),
        (
            "a host name that is not UTF-8",
            bin(2, &name(b"relay\xff"), 1, &[]),
            "host",
        ),
        ("an empty host name", bin(2, &name(b""), 1, &[]), "host"),
        ("port 0", bin(0, &v4, 0, &[]), "port"),
        (
            "a path on a plain HTTP address",
            bin(0x08, &v4, 1, &name(b"/p")),
            "path",
        ),
        ("a path of just '/'", bin(0x0c, &v4, 1, &name(b"/")), "path"),
        (
            "a path not starting with '/'",
            bin(0x0c, &v4, 1, &name(b"p")),
            "path",
        ),
        (
            "an access key with a space",
            bin(0x10, &v4, 1, &name(b"a b")),
            "access_key",
        ),
        (
            "an empty access key",
            bin(0x10, &v4, 1, &name(b"")),
            "access_key",
        ),
        (
            "truncated inside the key",
            good[..good.len() - 1].to_vec(),
            "truncated",
        ),
        (
            "truncated inside the IPv6 host",
            vec![1, 0x20, 0x01],
            "truncated",
        ),
        (
            "an access key flag with no access key",
            bin(0x10, &v4, 1, &[]),
            "truncated",
        ),
        ("empty input", vec![], "truncated"),
        (
            "an IPv4-mapped IPv6 host (::ffff:192.0.2.1): write the IPv4 address, kind 0",
            bin(
                1,
                &std::net::Ipv4Addr::from(v4).to_ipv6_mapped().octets(),
                5223,
                &[],
            ),
            "mapped_v4",
        ),
        (
            "a relay key of order 8 on the curve: es would be public",
            {
                let mut b = bin(0, &v4, 5223, &[]);
                b[7..39].copy_from_slice(&LOW_ORDER_8);
                b
            },
            "weak_key",
        ),
    ];
    for (comment, b, err) in invalid_bin {
        expect_err(decode_address(&b), addr_err, err, comment);
        out.push(AddressCase {
            comment: comment.into(),
            result: "invalid".into(),
            text: None,
            binary: Some(hex(&b)),
            also_accepted: vec![],
            address: None,
            error: Some(err.into()),
        });
    }
    out
}

// ---------------------------------------------------------------------------
// invitation.json
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueFields {
    /// The relay address in canonical text form (never with an access key).
    pub relay: String,
    pub sender_id: String,
}

impl QueueFields {
    pub fn of(q: &SendQueue) -> Self {
        Self {
            relay: q.relay.to_string(),
            sender_id: hex(&q.sender_id),
        }
    }

    pub fn to_queue(&self) -> SendQueue {
        SendQueue {
            relay: self.relay.parse().expect("relay address"),
            sender_id: arr(&self.sender_id),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InvitationFields {
    pub invitation_key: String,
    pub ratchet_key: String,
    pub queues: Vec<QueueFields>,
}

impl InvitationFields {
    pub fn of(i: &Invitation) -> Self {
        Self {
            invitation_key: hex(&i.invitation_key),
            ratchet_key: hex(&i.ratchet_key),
            queues: i.queues.iter().map(QueueFields::of).collect(),
        }
    }

    pub fn to_invitation(&self) -> Invitation {
        Invitation {
            invitation_key: arr(&self.invitation_key),
            ratchet_key: arr(&self.ratchet_key),
            queues: self.queues.iter().map(QueueFields::to_queue).collect(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InvitationCase {
    pub comment: String,
    pub result: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invitation: Option<InvitationFields>,
    /// Valid: the binary form. Invalid: binary input to refuse.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binary: Option<String>,
    /// Valid: the canonical link. Invalid: link input to refuse.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub also_accepted: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn gen_invitation() -> Vec<InvitationCase> {
    let mut rng = seeded(2);
    let mut out = Vec::new();
    let relay = |rng: &mut StdRng, host: &str, https_path: Option<&str>| -> RelayAddress {
        let k = key_text(&random(rng));
        match https_path {
            None => format!("tern://{k}@{host}"),
            Some(p) => format!("tern+https://{k}@{host}{p}"),
        }
        .parse()
        .unwrap()
    };
    let specs: Vec<(&str, Vec<RelayAddress>)> = vec![
        (
            "one queue on an IPv4 relay",
            vec![relay(&mut rng, "203.0.113.9:5223", None)],
        ),
        (
            "two queues: an IPv6 relay and a named relay",
            vec![
                relay(&mut rng, "[2001:db8::7]:5223", None),
                relay(&mut rng, "relay.example.org:9000", None),
            ],
        ),
        (
            "three queues, the most allowed, one behind an HTTPS front with a path",
            vec![
                relay(&mut rng, "198.51.100.1", None),
                relay(&mut rng, "front.example.net", Some("/tern")),
                relay(&mut rng, "[2001:db8::8]:443", None),
            ],
        ),
    ];
    let mut valid_bins = Vec::new();
    for (comment, relays) in specs {
        let inv = Invitation {
            invitation_key: DhKeyPair::from_secret(Secret32(random(&mut rng))).public(),
            ratchet_key: DhKeyPair::from_secret(Secret32(random(&mut rng))).public(),
            queues: relays
                .into_iter()
                .map(|relay| SendQueue {
                    relay,
                    sender_id: random(&mut rng),
                })
                .collect(),
        };
        let bin = inv.encode();
        let link = inv.to_link();
        assert_eq!(link, link_ref::link(&bin), "the reference link");
        let body = &link[5..];
        let wrapped: String = body
            .as_bytes()
            .chunks(60)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect::<Vec<_>>()
            .join("\n  ");
        let also = vec![
            link.to_lowercase(),
            format!(" TERN:\n  {wrapped}\n"),
            format!("tern:{body}"),
        ];
        assert_eq!(Invitation::decode(&bin).unwrap(), inv);
        for t in std::iter::once(&link).chain(&also) {
            assert_eq!(Invitation::from_link(t).unwrap(), inv, "{t}");
        }
        valid_bins.push(bin.clone());
        out.push(InvitationCase {
            comment: comment.into(),
            result: "valid".into(),
            invitation: Some(InvitationFields::of(&inv)),
            binary: Some(hex(&bin)),
            link: Some(link),
            also_accepted: also,
            error: None,
        });
    }

    let one = &valid_bins[0];
    let with = |at: usize, v: u8| -> Vec<u8> {
        let mut b = one.clone();
        b[at] = v;
        b
    };
    // Offsets in a one-queue invitation: version 0, kind 1, keys 2..66,
    // queue count 66, relay flags 67, IPv4 68..72, port 72..74, relay key
    // 74..106, sender id 106..122.
    let mut with_access = one[..67].to_vec();
    with_access.push(0x10);
    with_access.extend_from_slice(&one[68..106]);
    with_access.extend_from_slice(&[3, b'a', b'b', b'c']);
    with_access.extend_from_slice(&one[106..]);
    let mut trailing = one.clone();
    trailing.push(0);
    let invalid_bin: Vec<(&str, Vec<u8>, &str)> = vec![
        ("version 0 does not exist", with(0, 0), "invalid: invitation version"),
        ("version 2 is newer than this implementation", with(0, 2), "unsupported_version"),
        ("kind 0 is not a contact invitation", with(1, 0), "invalid: invitation kind"),
        ("kind 2 is a re-key invitation (§11), not a contact invitation", with(1, 2), "invalid: invitation kind"),
        ("a queue count of 0", with(66, 0), "invalid: queue count"),
        ("a queue count of 4 (at most 3)", with(66, 4), "invalid: queue count"),
        ("a queue count of 2 with one queue present (the missing relay address reads as a truncated address)", with(66, 2), "address"),
        ("truncated inside the ratchet key", one[..40].to_vec(), "truncated"),
        ("truncated inside the sender id", one[..one.len() - 1].to_vec(), "truncated"),
        ("a trailing byte", trailing, "trailing"),
        ("a queue whose relay address carries an access key", with_access, "address"),
        ("a relay address with a reserved flag bit", with(67, 0x40), "address"),
        ("a relay address with port 0", { let mut b = with(72, 0); b[73] = 0; b }, "address"),
        ("empty input", vec![], "truncated"),
    ];
    for (comment, b, err) in invalid_bin {
        expect_err(Invitation::decode(&b), proto_err, err, comment);
        out.push(InvitationCase {
            comment: comment.into(),
            result: "invalid".into(),
            invitation: None,
            binary: Some(hex(&b)),
            link: None,
            also_accepted: vec![],
            error: Some(err.into()),
        });
    }

    let link0 = link_ref::link(one);
    let body0 = BASE32_NOPAD.encode(one);
    let body0 = body0.as_str();
    // Base32 lengths of 1, 3 or 6 mod 8 characters encode no whole bytes.
    let mut bad_len = body0.to_string();
    while ![1, 3, 6].contains(&(bad_len.len() % 8)) {
        bad_len.pop();
    }
    // 122 bytes = 976 bits: the last of the 196 characters carries 1 data bit
    // and 4 bits that must be zero.
    assert_eq!(one.len() * 8 % 5, 1);
    let last = body0.as_bytes()[body0.len() - 1];
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let idx = alphabet.iter().position(|&c| c == last).unwrap();
    let nonzero_tail = format!("{}{}", &body0[..body0.len() - 1], alphabet[idx | 1] as char);
    // Single typos in the valid link: each must be caught by the checksum.
    let at =
        |i: usize, with: &str, skip: usize| format!("{}{with}{}", &link0[..i], &link0[i + skip..]);
    let sub_at = 5 + 40;
    let sub = {
        let c = link0.as_bytes()[sub_at];
        let i = alphabet.iter().position(|&a| a == c).unwrap();
        at(sub_at, &(alphabet[(i + 1) % 32] as char).to_string(), 1)
    };
    let swap_at = (5 + 60..link0.len() - 1)
        .find(|&i| link0.as_bytes()[i] != link0.as_bytes()[i + 1])
        .unwrap();
    let swapped = at(
        swap_at,
        &format!(
            "{}{}",
            &link0[swap_at + 1..swap_at + 2],
            &link0[swap_at..swap_at + 1]
        ),
        2,
    );
    let check_at = link0.len() - 3;
    let check_sub = {
        let c = link0.as_bytes()[check_at];
        let i = alphabet.iter().position(|&a| a == c).unwrap();
        at(check_at, &(alphabet[(i + 7) % 32] as char).to_string(), 1)
    };
    let invalid_link: Vec<(&str, String, &str)> = vec![
        ("not a link at all", "hello".into(), "not_an_invitation"),
        (
            "the prefix without its colon",
            format!("TERN{}", &link0[5..]),
            "not_an_invitation",
        ),
        (
            "another scheme",
            format!("https:{}", &link0[5..]),
            "not_an_invitation",
        ),
        (
            "one character replaced by another (the 41st after the prefix)",
            sub,
            "link_damaged",
        ),
        (
            "two neighbouring characters swapped",
            swapped,
            "link_damaged",
        ),
        ("one character dropped", at(5 + 100, "", 1), "link_damaged"),
        ("one character added", at(5 + 100, "Q", 0), "link_damaged"),
        (
            "a character of the checksum replaced",
            check_sub,
            "link_damaged",
        ),
        (
            "the checksum left out (base32 of the binary form alone)",
            format!("TERN:{body0}"),
            "link_damaged",
        ),
        (
            "the last character cut off",
            link0[..link0.len() - 1].to_string(),
            "link_damaged",
        ),
        (
            "characters outside the base32 alphabet",
            "TERN:!!!".into(),
            "link_damaged",
        ),
        (
            "the 0 and 1 digits are not base32 (no O/I substitution)",
            format!(
                "TERN:{}",
                link0[5..].replacen(|c: char| c.is_ascii_alphabetic(), "0", 1)
            ),
            "link_damaged",
        ),
        (
            "base32 with '=' padding (and the checksum after it)",
            format!("TERN:{body0}======{}", link_ref::checksum(body0)),
            "link_damaged",
        ),
        (
            "a prefix with nothing after it",
            "TERN:".into(),
            "link_damaged",
        ),
        (
            "a correct checksum over a base32 length that encodes no whole byte",
            link_ref::link_over(&bad_len),
            "not_an_invitation",
        ),
        (
            "a correct checksum over non-zero trailing bits in the last base32 character",
            link_ref::link_over(&nonzero_tail),
            "not_an_invitation",
        ),
        (
            "a well-formed link to a version 2 invitation",
            link_ref::link(&with(0, 2)),
            "unsupported_version",
        ),
    ];
    for (comment, l, _) in &invalid_link {
        if !l.to_ascii_uppercase().starts_with("TERN:") {
            continue;
        }
        let damaged = !link_ref::verifies(&l.to_ascii_uppercase());
        assert_eq!(
            damaged,
            proto_err(&Invitation::from_link(l).unwrap_err()) == "link_damaged",
            "{comment}: the reference agrees on the checksum"
        );
    }
    for (comment, l, err) in invalid_link {
        expect_err(Invitation::from_link(&l), proto_err, err, comment);
        out.push(InvitationCase {
            comment: comment.into(),
            result: "invalid".into(),
            invitation: None,
            binary: None,
            link: Some(l),
            also_accepted: vec![],
            error: Some(err.into()),
        });
    }
    out
}

// ---------------------------------------------------------------------------
// Relay transport v2: session.json, frames.json, relay_commands.json and
// relay_replies.json (PROTOCOL.md §3.2–§3.7)
// ---------------------------------------------------------------------------

/// An independent reference for the relay transport, written from
/// PROTOCOL.md §3 and the Noise specification (revision 34) without
/// `tern_wire` or `snow`: the Noise symmetric state (§5.2) over SHA-256,
/// HMAC-SHA256 and ChaCha20-Poly1305 from RustCrypto, the NKpsk2 handshake
/// with an ML-KEM-768 shared secret as its PSK, and the record and frame
/// layouts, built from the vectors' own field structs. ML-KEM-768 itself is
/// the `ml-kem` crate's deterministic API (FIPS 203; a standard primitive
/// with its own known-answer tests), Ed25519 is ed25519-dalek's.
pub mod wire_ref {
    use chacha20poly1305::aead::{Aead, KeyInit, Payload};
    use chacha20poly1305::ChaCha20Poly1305;
    use ed25519_dalek::{Signer, SigningKey};
    use hmac::{Hmac, Mac};
    use ml_kem::kem::Decapsulate;
    use ml_kem::EncapsulateDeterministic;
    use ml_kem::{EncodedSizeUser, KemCore, MlKem768};
    use sha2::{Digest, Sha256};

    use super::refc::{x25519, x25519_public};
    use super::{arr, CommandFields, RelayInfoFields, ReplyFields};

    pub const PROTOCOL_NAME: &[u8] = b"Noise_NKpsk2_25519_ChaChaPoly_SHA256";
    pub const PROLOGUE: &[u8] = b"tern/v2 relay session";
    pub const SIGNATURE_CONTEXT: &[u8] = b"tern/v2 command";
    pub const QUANTUM: usize = 1024;
    /// 63 × 1024: the largest multiple of 1024 that fits a Noise message
    /// (65,535 bytes) with its 16-byte tag.
    pub const MAX_FRAME: usize = 64_512;
    pub const QUEUE_MSG: usize = 16_000;
    pub const DELIVERED: usize = 16_016;
    pub const ERROR_NAMES: [&str; 12] = [
        "BadRequest",
        "Auth",
        "QueueFull",
        "Access",
        "NoMessage",
        "Internal",
        "Unavailable",
        "NotEmpty",
        "RateLimited",
        "Quota",
        "Limit",
        "NotSecured",
    ];

    fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("any key length");
        for p in parts {
            m.update(p);
        }
        m.finalize().into_bytes().into()
    }

    fn sha256(a: &[u8], b: &[u8]) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(a);
        h.update(b);
        h.finalize().into()
    }

    /// HKDF as the Noise specification defines it (§4.3): `outputs`
    /// 32-byte blocks, each an HMAC under HMAC(ck, ikm).
    pub fn hkdf(ck: &[u8; 32], ikm: &[u8], outputs: u8) -> Vec<[u8; 32]> {
        let temp = hmac(ck, &[ikm]);
        let mut out = vec![hmac(&temp, &[&[1]])];
        for i in 2..=outputs {
            let prev = *out.last().expect("one output");
            out.push(hmac(&temp, &[&prev, &[i]]));
        }
        out
    }

    /// ChaChaPoly's nonce (§12.3): 32 zero bits, then `n` little endian.
    pub fn nonce(n: u64) -> [u8; 12] {
        let mut b = [0u8; 12];
        b[4..].copy_from_slice(&n.to_le_bytes());
        b
    }

    pub fn encrypt(k: &[u8; 32], n: u64, ad: &[u8], pt: &[u8]) -> Vec<u8> {
        ChaCha20Poly1305::new_from_slice(k)
            .expect("32-byte key")
            .encrypt(&nonce(n).into(), Payload { msg: pt, aad: ad })
            .expect("within limits")
    }

    pub fn decrypt(k: &[u8; 32], n: u64, ad: &[u8], ct: &[u8]) -> Option<Vec<u8>> {
        ChaCha20Poly1305::new_from_slice(k)
            .expect("32-byte key")
            .decrypt(&nonce(n).into(), Payload { msg: ct, aad: ad })
            .ok()
    }

    /// The state after one operation: what the vectors' trace records.
    #[derive(Debug, Clone)]
    pub struct Step {
        pub op: String,
        pub ck: [u8; 32],
        pub h: [u8; 32],
        pub k: Option<[u8; 32]>,
    }

    /// The SymmetricState of §5.2 with its CipherState (`k`, `n`) inside.
    #[derive(Clone)]
    pub struct Symmetric {
        pub ck: [u8; 32],
        pub h: [u8; 32],
        pub k: Option<[u8; 32]>,
        pub n: u64,
        pub trace: Vec<Step>,
    }

    impl Symmetric {
        pub fn initialize() -> Self {
            // The name is longer than HASHLEN, so h = HASH(name).
            assert!(PROTOCOL_NAME.len() > 32);
            let h = sha256(PROTOCOL_NAME, b"");
            let mut s = Self {
                ck: h,
                h,
                k: None,
                n: 0,
                trace: Vec::new(),
            };
            s.note("InitializeSymmetric(protocol_name): h = SHA-256(name), ck = h");
            s
        }

        fn note(&mut self, op: &str) {
            self.trace.push(Step {
                op: op.into(),
                ck: self.ck,
                h: self.h,
                k: self.k,
            });
        }

        pub fn mix_hash(&mut self, data: &[u8], op: &str) {
            self.h = sha256(&self.h, data);
            self.note(op);
        }

        pub fn mix_key(&mut self, ikm: &[u8], op: &str) {
            let o = hkdf(&self.ck, ikm, 2);
            self.ck = o[0];
            self.k = Some(o[1]);
            self.n = 0;
            self.note(op);
        }

        pub fn mix_key_and_hash(&mut self, ikm: &[u8], op: &str) {
            let o = hkdf(&self.ck, ikm, 3);
            self.ck = o[0];
            self.h = sha256(&self.h, &o[1]);
            self.k = Some(o[2]);
            self.n = 0;
            self.note(op);
        }

        pub fn encrypt_and_hash(&mut self, pt: &[u8], op: &str) -> Vec<u8> {
            let ct = match self.k {
                Some(k) => {
                    let c = encrypt(&k, self.n, &self.h, pt);
                    self.n += 1;
                    c
                }
                None => pt.to_vec(),
            };
            self.h = sha256(&self.h, &ct);
            self.note(op);
            ct
        }

        pub fn decrypt_and_hash(&mut self, ct: &[u8], op: &str) -> Option<Vec<u8>> {
            let pt = match self.k {
                Some(k) => {
                    let p = decrypt(&k, self.n, &self.h, ct)?;
                    self.n += 1;
                    p
                }
                None => ct.to_vec(),
            };
            self.h = sha256(&self.h, ct);
            self.note(op);
            Some(pt)
        }

        /// The two transport keys: client to relay, relay to client.
        pub fn split(&self) -> ([u8; 32], [u8; 32]) {
            let o = hkdf(&self.ck, &[], 2);
            (o[0], o[1])
        }
    }

    /// Where both sides start: the protocol name, the prologue, and the
    /// pre-message `<- s` (the relay key pinned in its address).
    pub fn initial(relay_static: &[u8; 32]) -> Symmetric {
        let mut s = Symmetric::initialize();
        s.mix_hash(PROLOGUE, "MixHash(prologue)");
        s.mix_hash(relay_static, "pre-message <- s: MixHash(rs)");
        s
    }

    fn token_e(s: &mut Symmetric, e: &[u8; 32], who: &str) {
        s.mix_hash(e, &format!("{who} e: MixHash(e.public)"));
        s.mix_key(
            e,
            &format!("{who} e: MixKey(e.public), as in every PSK handshake"),
        );
    }

    /// The client writes message 1 (`-> e, es`) with `hello` as payload.
    pub fn write_message1(s: &mut Symmetric, e: &[u8; 32], rs: &[u8; 32], hello: &[u8]) -> Vec<u8> {
        let e_pub = x25519_public(e);
        token_e(s, &e_pub, "->");
        s.mix_key(&x25519(e, rs), "-> es: MixKey(DH(e, rs))");
        let mut m = e_pub.to_vec();
        m.extend(s.encrypt_and_hash(hello, "-> payload: EncryptAndHash(ClientHello)"));
        m
    }

    /// The relay reads message 1 with its static secret `s_secret`.
    pub fn read_message1(s: &mut Symmetric, s_secret: &[u8; 32], msg: &[u8]) -> Option<Vec<u8>> {
        let e: [u8; 32] = msg.get(..32)?.try_into().ok()?;
        token_e(s, &e, "->");
        s.mix_key(&x25519(s_secret, &e), "-> es: MixKey(DH(s, re))");
        s.decrypt_and_hash(&msg[32..], "-> payload: DecryptAndHash(ClientHello)")
    }

    /// What someone without the relay's secret can do with message 1: mix
    /// what it sees with its own `es`, without being able to decrypt.
    pub fn impostor_reads_message1(s: &mut Symmetric, own_secret: &[u8; 32], msg: &[u8]) {
        let e: [u8; 32] = msg[..32].try_into().expect("32 bytes");
        token_e(s, &e, "->");
        s.mix_key(&x25519(own_secret, &e), "-> es with the impostor's own key");
        s.mix_hash(&msg[32..], "-> payload: MixHash(ciphertext), undecrypted");
    }

    /// The relay writes the Noise part of message 2 (`<- e, ee, psk`).
    pub fn write_message2(
        s: &mut Symmetric,
        e: &[u8; 32],
        client_e: &[u8; 32],
        psk: &[u8; 32],
        hello: &[u8],
    ) -> Vec<u8> {
        let e_pub = x25519_public(e);
        token_e(s, &e_pub, "<-");
        s.mix_key(&x25519(e, client_e), "<- ee: MixKey(DH(e, re))");
        s.mix_key_and_hash(psk, "<- psk: MixKeyAndHash(ML-KEM shared secret)");
        let mut m = e_pub.to_vec();
        m.extend(s.encrypt_and_hash(hello, "<- payload: EncryptAndHash(ServerHello)"));
        m
    }

    /// The client reads the Noise part of message 2.
    pub fn read_message2(
        s: &mut Symmetric,
        e: &[u8; 32],
        msg: &[u8],
        psk: &[u8; 32],
    ) -> Option<Vec<u8>> {
        let re: [u8; 32] = msg.get(..32)?.try_into().ok()?;
        token_e(s, &re, "<-");
        s.mix_key(&x25519(e, &re), "<- ee: MixKey(DH(e, re))");
        s.mix_key_and_hash(psk, "<- psk: MixKeyAndHash(ML-KEM shared secret)");
        s.decrypt_and_hash(&msg[32..], "<- payload: DecryptAndHash(ServerHello)")
    }

    /// ML-KEM-768.KeyGen_internal(d, z) from `d || z`: the encapsulation
    /// key's bytes and the decapsulation key.
    pub fn kem_keygen(seed: &[u8; 64]) -> (Vec<u8>, <MlKem768 as KemCore>::DecapsulationKey) {
        let d = ml_kem::B32::try_from(&seed[..32]).expect("32 bytes");
        let z = ml_kem::B32::try_from(&seed[32..]).expect("32 bytes");
        let (dk, ek) = MlKem768::generate_deterministic(&d, &z);
        (ek.as_bytes().to_vec(), dk)
    }

    /// ML-KEM-768.Encaps_internal(ek, m): (ciphertext, shared secret).
    pub fn kem_encapsulate(ek: &[u8], m: &[u8; 32]) -> (Vec<u8>, [u8; 32]) {
        let enc = ml_kem::Encoded::<<MlKem768 as KemCore>::EncapsulationKey>::try_from(ek)
            .expect("1184 bytes");
        let ek = <MlKem768 as KemCore>::EncapsulationKey::from_bytes(&enc);
        let (ct, ss) = ek
            .encapsulate_deterministic(&ml_kem::B32::from(*m))
            .expect("encapsulation");
        (ct.to_vec(), ss.into())
    }

    pub fn kem_decapsulate(dk: &<MlKem768 as KemCore>::DecapsulationKey, ct: &[u8]) -> [u8; 32] {
        let ct = ml_kem::Ciphertext::<MlKem768>::try_from(ct).expect("1088 bytes");
        dk.decapsulate(&ct).expect("decapsulation").into()
    }

    pub fn client_hello(min: u8, max: u8, ek: &[u8]) -> Vec<u8> {
        [&[min, max][..], ek].concat()
    }

    pub fn relay_info(i: &RelayInfoFields) -> Vec<u8> {
        let mut b = vec![i.min_version, i.max_version, i.open as u8];
        b.extend(i.max_pending.to_be_bytes());
        b.extend(i.ttl_secs.to_be_bytes());
        b.extend(i.max_window.to_be_bytes());
        b.extend(i.max_subscriptions.to_be_bytes());
        b.extend(i.unsecured_ttl_secs.to_be_bytes());
        b
    }

    pub fn server_hello(version: u8, info: &RelayInfoFields) -> Vec<u8> {
        [vec![version], relay_info(info)].concat()
    }

    pub fn signed_message(session_hash: &[u8; 32], prefix: &[u8]) -> Vec<u8> {
        [SIGNATURE_CONTEXT, session_hash, prefix].concat()
    }

    /// A command record: code, tag, body, then the signature field for
    /// every command but INFO, UNSUB and CHECK (64 zero bytes when a SEND
    /// is unsigned).
    pub fn command_record(c: &CommandFields, hash: &[u8; 32], key: Option<&SigningKey>) -> Vec<u8> {
        let f = |v: &Option<String>| super::unhex(v.as_deref().expect("field"));
        let (code, body, signed): (u8, Vec<u8>, bool) = match c.name.as_str() {
            "INFO" => (0x01, vec![], false),
            "CREATE" => {
                let ak = c.access_key.as_deref().unwrap_or("").as_bytes();
                let body = [
                    &[ak.len() as u8][..],
                    ak,
                    &f(&c.recipient_auth),
                    &f(&c.recipient_dh),
                ];
                (0x02, body.concat(), true)
            }
            "SECURE" => (0x03, [f(&c.recipient_id), f(&c.sender_auth)].concat(), true),
            "SEND" => {
                let msg = c.message.as_ref().expect("message").bytes();
                assert_eq!(msg.len(), QUEUE_MSG);
                let flag = vec![key.is_some() as u8];
                (0x04, [f(&c.sender_id), flag, msg].concat(), true)
            }
            "SUB" => {
                let w = c.window.expect("window").to_be_bytes().to_vec();
                (0x05, [f(&c.recipient_id), w].concat(), true)
            }
            "ACK" => (0x06, [f(&c.recipient_id), f(&c.msg_id)].concat(), true),
            "ACK_UPTO" => (0x07, [f(&c.recipient_id), f(&c.msg_id)].concat(), true),
            "DELETE" => {
                let flag = vec![c.if_empty.expect("if_empty") as u8];
                (0x08, [f(&c.recipient_id), flag].concat(), true)
            }
            "UNSUB" => (
                0x09,
                c.sub_tag.expect("sub_tag").to_be_bytes().to_vec(),
                false,
            ),
            "CHECK" => (0x0A, f(&c.recipient_id), false),
            n => panic!("command {n}"),
        };
        let mut r = vec![code];
        r.extend(c.tag.to_be_bytes());
        r.extend(body);
        if signed {
            let sig = key.map_or([0u8; 64], |k| k.sign(&signed_message(hash, &r)).to_bytes());
            r.extend(sig);
        }
        r
    }

    /// A reply record: kind, tag, body.
    pub fn reply_record(r: &ReplyFields) -> Vec<u8> {
        let f = |v: &Option<String>| super::unhex(v.as_deref().expect("field"));
        let (kind, body): (u8, Vec<u8>) = match r.kind.as_str() {
            "OK" => (0x80, vec![]),
            "INFO" => (0x81, relay_info(r.info.as_ref().expect("info"))),
            "QUEUE" => (
                0x82,
                [f(&r.recipient_id), f(&r.sender_id), f(&r.relay_dh)].concat(),
            ),
            "MSG" => {
                let body = r.body.as_ref().expect("body").bytes();
                assert_eq!(body.len(), DELIVERED);
                let at = r.received_at.expect("received_at").to_be_bytes().to_vec();
                (0x83, [f(&r.msg_id), at, body].concat())
            }
            "IDLE" => (0x84, vec![]),
            "ENDED" => (0x85, vec![]),
            "COUNT" => (0x86, r.count.expect("count").to_be_bytes().to_vec()),
            "ERROR" => {
                let name = r.code.as_deref().expect("code");
                let i = ERROR_NAMES
                    .iter()
                    .position(|n| *n == name)
                    .expect("known code");
                (0xFF, vec![i as u8 + 1])
            }
            k => panic!("reply {k}"),
        };
        let mut b = vec![kind];
        b.extend(r.tag.to_be_bytes());
        b.extend(body);
        b
    }

    /// The length of the command record at the start of `b`, from its code
    /// (and, for CREATE, its access key length).
    pub fn command_len(b: &[u8]) -> Option<usize> {
        Some(match b[0] {
            0x01 => 5,
            0x02 => 5 + 1 + usize::from(*b.get(5)?) + 32 + 32 + 64,
            0x03 => 5 + 16 + 32 + 64,
            0x04 => 5 + 16 + 1 + QUEUE_MSG + 64,
            0x05 => 5 + 16 + 2 + 64,
            0x06 | 0x07 => 5 + 16 + 16 + 64,
            0x08 => 5 + 16 + 1 + 64,
            0x09 => 5 + 4,
            0x0A => 5 + 16,
            _ => return None,
        })
    }

    pub fn reply_len(b: &[u8]) -> Option<usize> {
        Some(match b[0] {
            0x80 | 0x84 | 0x85 => 5,
            0x81 => 5 + 19,
            0x82 => 5 + 16 + 16 + 32,
            0x83 => 5 + 16 + 8 + DELIVERED,
            0x86 => 5 + 4,
            0xFF => 5 + 1,
            _ => return None,
        })
    }

    /// Packs records into frames in order, starting a new frame when the
    /// next record would not fit, each zero-padded to a multiple of 1024.
    pub fn pack(records: &[Vec<u8>]) -> Vec<Vec<u8>> {
        let mut frames = Vec::new();
        let mut cur: Vec<u8> = Vec::new();
        let close = |cur: &mut Vec<u8>, frames: &mut Vec<Vec<u8>>| {
            if !cur.is_empty() {
                let len = cur.len().div_ceil(QUANTUM) * QUANTUM;
                cur.resize(len, 0);
                frames.push(std::mem::take(cur));
            }
        };
        for r in records {
            if cur.len() + r.len() > MAX_FRAME {
                close(&mut cur, &mut frames);
            }
            cur.extend_from_slice(r);
        }
        close(&mut cur, &mut frames);
        frames
    }

    /// Splits a frame into its records by their lengths (the fields inside
    /// are the record decoders' business); `None` if the frame is not
    /// well formed: its length, a record cut off, unknown code, padding.
    pub fn split(frame: &[u8], replies: bool) -> Option<Vec<Vec<u8>>> {
        if frame.is_empty() || frame.len() % QUANTUM != 0 || frame.len() > MAX_FRAME {
            return None;
        }
        let mut out = Vec::new();
        let mut at = 0;
        while at < frame.len() {
            if frame[at] == 0 {
                return frame[at..].iter().all(|&b| b == 0).then_some(out);
            }
            let rest = &frame[at..];
            let n = if replies {
                reply_len(rest)
            } else {
                command_len(rest)
            }?;
            if n > rest.len() {
                return None;
            }
            out.push(rest[..n].to_vec());
            at += n;
        }
        Some(out)
    }

    pub fn key32(v: &Option<String>) -> [u8; 32] {
        arr(v.as_deref().expect("32-byte field"))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayInfoFields {
    pub min_version: u8,
    pub max_version: u8,
    pub open: bool,
    pub max_pending: u32,
    pub ttl_secs: u32,
    pub max_window: u16,
    pub max_subscriptions: u16,
    pub unsecured_ttl_secs: u32,
}

impl RelayInfoFields {
    pub fn of(i: &RelayInfo) -> Self {
        Self {
            min_version: i.min_version,
            max_version: i.max_version,
            open: i.open,
            max_pending: i.max_pending,
            ttl_secs: i.ttl_secs,
            max_window: i.max_window,
            max_subscriptions: i.max_subscriptions,
            unsecured_ttl_secs: i.unsecured_ttl_secs,
        }
    }

    pub fn to_info(self) -> RelayInfo {
        RelayInfo {
            min_version: self.min_version,
            max_version: self.max_version,
            open: self.open,
            max_pending: self.max_pending,
            ttl_secs: self.ttl_secs,
            max_window: self.max_window,
            max_subscriptions: self.max_subscriptions,
            unsecured_ttl_secs: self.unsecured_ttl_secs,
        }
    }
}

/// The policy of the reference relay with its default settings.
pub fn default_relay_info() -> RelayInfo {
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

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct CommandFields {
    /// INFO, CREATE, SECURE, SEND, SUB, ACK, ACK_UPTO, DELETE, UNSUB or CHECK.
    pub name: String,
    pub tag: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipient_auth: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipient_dh: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipient_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sender_auth: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sender_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<Padded>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub msg_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub if_empty: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub_tag: Option<u32>,
}

fn o(b: &[u8]) -> Option<String> {
    Some(hex(b))
}

impl CommandFields {
    pub fn of(tag: u32, c: &Command) -> Self {
        let base = Self {
            name: c.name().to_string(),
            tag,
            ..Default::default()
        };
        match c {
            Command::Info => base,
            Command::Create {
                access_key,
                recipient_auth,
                recipient_dh,
            } => Self {
                access_key: access_key.clone(),
                recipient_auth: o(recipient_auth),
                recipient_dh: o(recipient_dh),
                ..base
            },
            Command::Secure {
                recipient_id,
                sender_auth,
            } => Self {
                recipient_id: o(recipient_id),
                sender_auth: o(sender_auth),
                ..base
            },
            Command::Send { sender_id, message } => Self {
                sender_id: o(sender_id),
                message: Some(Padded::of(message)),
                ..base
            },
            Command::Subscribe {
                recipient_id,
                window,
            } => Self {
                recipient_id: o(recipient_id),
                window: Some(*window),
                ..base
            },
            Command::Ack {
                recipient_id,
                msg_id,
            }
            | Command::AckUpTo {
                recipient_id,
                msg_id,
            } => Self {
                recipient_id: o(recipient_id),
                msg_id: o(msg_id),
                ..base
            },
            Command::Delete {
                recipient_id,
                if_empty,
            } => Self {
                recipient_id: o(recipient_id),
                if_empty: Some(*if_empty),
                ..base
            },
            Command::Unsubscribe { sub_tag } => Self {
                sub_tag: Some(*sub_tag),
                ..base
            },
            Command::Check { recipient_id } => Self {
                recipient_id: o(recipient_id),
                ..base
            },
        }
    }

    pub fn to_command(&self) -> Command {
        let h16 = |v: &Option<String>| arr::<16>(v.as_deref().expect("16-byte field"));
        let h32 = |v: &Option<String>| arr::<32>(v.as_deref().expect("32-byte field"));
        match self.name.as_str() {
            "INFO" => Command::Info,
            "CREATE" => Command::Create {
                access_key: self.access_key.clone(),
                recipient_auth: h32(&self.recipient_auth),
                recipient_dh: h32(&self.recipient_dh),
            },
            "SECURE" => Command::Secure {
                recipient_id: h16(&self.recipient_id),
                sender_auth: h32(&self.sender_auth),
            },
            "SEND" => Command::Send {
                sender_id: h16(&self.sender_id),
                message: self.message.as_ref().expect("message").bytes(),
            },
            "SUB" => Command::Subscribe {
                recipient_id: h16(&self.recipient_id),
                window: self.window.expect("window"),
            },
            "ACK" => Command::Ack {
                recipient_id: h16(&self.recipient_id),
                msg_id: h16(&self.msg_id),
            },
            "ACK_UPTO" => Command::AckUpTo {
                recipient_id: h16(&self.recipient_id),
                msg_id: h16(&self.msg_id),
            },
            "DELETE" => Command::Delete {
                recipient_id: h16(&self.recipient_id),
                if_empty: self.if_empty.expect("if_empty"),
            },
            "UNSUB" => Command::Unsubscribe {
                sub_tag: self.sub_tag.expect("sub_tag"),
            },
            "CHECK" => Command::Check {
                recipient_id: h16(&self.recipient_id),
            },
            n => panic!("command {n}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ReplyFields {
    /// OK, INFO, QUEUE, MSG, IDLE, ENDED, COUNT or ERROR.
    pub kind: String,
    pub tag: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<RelayInfoFields>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipient_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sender_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_dh: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub msg_id: Option<String>,
    /// Seconds since the Unix epoch, a multiple of 3600.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub received_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<Padded>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u32>,
    /// The error code's name (PROTOCOL.md §3.6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

impl ReplyFields {
    pub fn of(tag: u32, r: &Reply) -> Self {
        let k = |kind: &str| Self {
            kind: kind.into(),
            tag,
            ..Default::default()
        };
        match r {
            Reply::Ok => k("OK"),
            Reply::Idle => k("IDLE"),
            Reply::Ended => k("ENDED"),
            Reply::Info(i) => Self {
                info: Some(RelayInfoFields::of(i)),
                ..k("INFO")
            },
            Reply::Queue {
                recipient_id,
                sender_id,
                relay_dh,
            } => Self {
                recipient_id: o(recipient_id),
                sender_id: o(sender_id),
                relay_dh: o(relay_dh),
                ..k("QUEUE")
            },
            Reply::Message {
                msg_id,
                received_at,
                body,
            } => Self {
                msg_id: o(msg_id),
                received_at: Some(*received_at),
                body: Some(Padded::of(body)),
                ..k("MSG")
            },
            Reply::Count(n) => Self {
                count: Some(*n),
                ..k("COUNT")
            },
            Reply::Error(c) => Self {
                code: Some(c.name().into()),
                ..k("ERROR")
            },
        }
    }

    pub fn to_reply(&self) -> Reply {
        let h16 = |v: &Option<String>| arr::<16>(v.as_deref().expect("16-byte field"));
        match self.kind.as_str() {
            "OK" => Reply::Ok,
            "IDLE" => Reply::Idle,
            "ENDED" => Reply::Ended,
            "INFO" => Reply::Info(self.info.as_ref().expect("info").to_info()),
            "QUEUE" => Reply::Queue {
                recipient_id: h16(&self.recipient_id),
                sender_id: h16(&self.sender_id),
                relay_dh: arr(self.relay_dh.as_deref().expect("relay_dh")),
            },
            "MSG" => Reply::Message {
                msg_id: h16(&self.msg_id),
                received_at: self.received_at.expect("received_at"),
                body: self.body.as_ref().expect("body").bytes(),
            },
            "COUNT" => Reply::Count(self.count.expect("count")),
            "ERROR" => Reply::Error(error_code(self.code.as_deref().expect("code"))),
            k => panic!("reply {k}"),
        }
    }
}

/// tern's encoding of one command record.
pub fn command_record(tag: u32, c: &Command, hash: &[u8; 32], key: Option<&SigningKey>) -> Vec<u8> {
    let mut out = Vec::new();
    Request::encode(tag, c, hash, key, &mut out);
    out
}

/// tern's encoding of one reply record.
pub fn reply_record(tag: u32, r: &Reply) -> Vec<u8> {
    let mut out = Vec::new();
    r.encode(tag, &mut out);
    out
}

/// One command record through tern's decoder, which must consume it all.
pub fn decode_command(b: &[u8]) -> Result<Request, WireError> {
    let mut r = Reader::new(b);
    let req = Request::decode(&mut r)?;
    r.finish()?;
    Ok(req)
}

pub fn decode_reply(b: &[u8]) -> Result<(u32, Reply), WireError> {
    let mut r = Reader::new(b);
    let reply = Reply::decode(&mut r)?;
    r.finish()?;
    Ok(reply)
}

/// The record a decoded command came from: its fields re-encoded, with the
/// signature (and a SEND's flag) it carried.
pub fn record_of(r: &Request) -> Vec<u8> {
    let mut rec = command_record(r.tag, &r.command, &[0; 32], None);
    if let Some(sig) = r.signature {
        if matches!(r.command, Command::Send { .. }) {
            rec[5 + 16] = 1;
        }
        let n = rec.len();
        rec[n - 64..].copy_from_slice(&sig);
    }
    rec
}

/// Where the signature field of a command record starts, if it has one.
pub fn signature_offset(c: &Command) -> Option<usize> {
    c.has_signature_field()
        .then(|| command_record(0, c, &[0; 32], None).len() - 64)
}

/// A command record checked against the reference encoder: the same bytes.
fn checked_command(tag: u32, c: &Command, hash: &[u8; 32], key: Option<&SigningKey>) -> Vec<u8> {
    let rec = command_record(tag, c, hash, key);
    assert_eq!(
        wire_ref::command_record(&CommandFields::of(tag, c), hash, key),
        rec,
        "{c:?}: tern and the reference encode differently"
    );
    assert!(rec.len() <= MAX_COMMAND_LEN);
    rec
}

fn checked_reply(tag: u32, r: &Reply) -> Vec<u8> {
    let rec = reply_record(tag, r);
    assert_eq!(
        wire_ref::reply_record(&ReplyFields::of(tag, r)),
        rec,
        "{r:?}: tern and the reference encode differently"
    );
    assert!(rec.len() <= MAX_REPLY_LEN);
    rec
}

/// tern's frames for `records`, checked against the reference's packing.
fn checked_frames(records: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let mut b = FrameBuilder::new();
    for r in records {
        b.push(r);
    }
    let frames = b.finish();
    assert_eq!(
        frames,
        wire_ref::pack(records),
        "tern and the reference pack differently"
    );
    frames
}

// --- session.json ----------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SymmetricStep {
    /// The Noise operation (and the token it belongs to).
    pub op: String,
    /// ck, h and k after it (k absent while there is none).
    pub ck: String,
    pub h: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransportMessage {
    /// "client_to_relay" or "relay_to_client".
    pub direction: String,
    /// The AEAD nonce counter: 0 for the first message each way.
    pub nonce: u64,
    /// The frame plaintext.
    pub frame: Padded,
    /// ChaCha20-Poly1305(transport key of the direction, nonce, ad = empty, frame).
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct SessionCase {
    pub comment: String,
    pub result: String,
    /// Which sides tern plays in the check: "client" (writes message 1 and
    /// reads message 2) and "relay" (reads message 1, writes message 2).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_static_secret: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_static_public: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ephemeral_secret: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ephemeral_public: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_ephemeral_secret: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_ephemeral_public: Option<String>,
    /// `d || z` (64 bytes): ML-KEM-768.KeyGen_internal's randomness.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kem_seed: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kem_encapsulation_key: Option<String>,
    /// `m` (32 bytes): ML-KEM-768.Encaps_internal's randomness.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kem_m: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kem_ciphertext: Option<String>,
    /// The ML-KEM shared secret: the Noise PSK.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kem_shared_secret: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_min_version: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_max_version: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_hello: Option<String>,
    /// Valid: message 1 as sent. Invalid (`target` "message1"): the input
    /// to refuse, when it is not a mutation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message1: Option<String>,
    /// X25519(client ephemeral, relay static) and X25519(client ephemeral,
    /// relay ephemeral).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub es: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ee: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_info: Option<RelayInfoFields>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_hello: Option<String>,
    /// Valid: message 2 as sent (the KEM ciphertext, then the Noise
    /// message). Invalid (`target` "message2"): the input to refuse.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message2: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handshake_hash: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub symmetric_state: Vec<SymmetricStep>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_to_relay_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_to_client_key: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub transport: Vec<TransportMessage>,
    // Invalid cases.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub of_case: Option<usize>,
    /// "message1" (the relay of `of_case` must refuse it), "message2" (the
    /// client of `of_case` must refuse it) or "transport" (the receiving
    /// side of `of_case`'s session must refuse the last message of `open`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direction: Option<String>,
    /// Transport: indexes (among `of_case`'s messages of `direction`) of
    /// the messages handed to the receiver, in this order; all but the last
    /// must open, the last (after `mutation`) must be refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub open: Vec<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mutation: Option<Mutation>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

pub const CLIENT_TO_RELAY: &str = "client_to_relay";
pub const RELAY_TO_CLIENT: &str = "relay_to_client";

/// Everything a handshake is made from.
#[derive(Clone)]
struct HandshakeInputs {
    relay_secret: Key,
    client_e: Key,
    relay_e: Key,
    kem_seed: [u8; 64],
    kem_m: Key,
    info: RelayInfo,
    versions: (u8, u8),
}

/// tern's two halves of the session of case `c`, from its recorded inputs.
pub fn tern_session_pair(c: &SessionCase) -> (Session, Session) {
    let relay_public: Key = arr(c.relay_static_public.as_deref().unwrap());
    let client = client_start(c, &relay_public);
    let (server, msg2, _) = relay_respond(c, &unhex(c.message1.as_deref().unwrap()))
        .expect("the recorded message 1 is answered");
    let (client, _) = client
        .finish(&msg2)
        .expect("the recorded message 2 is accepted");
    (client, server)
}

/// tern's client half of case `c`, started with its recorded inputs.
pub fn client_start(c: &SessionCase, relay_public: &Key) -> ClientHandshake {
    let e: Key = arr(c.client_ephemeral_secret.as_deref().unwrap());
    let seed = unhex(c.kem_seed.as_deref().unwrap());
    ClientHandshake::start_fixed(
        relay_public,
        Fixed {
            ephemeral: &e,
            kem: &seed,
        },
    )
    .expect("the client starts")
    .0
}

/// tern's relay answering `msg1` with case `c`'s recorded inputs.
pub fn relay_respond(
    c: &SessionCase,
    msg1: &[u8],
) -> Result<(Session, Vec<u8>, wire_session::ClientHello), SessionError> {
    let s: Key = arr(c.relay_static_secret.as_deref().unwrap());
    let e: Key = arr(c.relay_ephemeral_secret.as_deref().unwrap());
    let m = unhex(c.kem_m.as_deref().unwrap());
    let info = c.relay_info.expect("relay_info").to_info();
    ServerHandshake::respond_fixed(
        &s,
        msg1,
        &info,
        Fixed {
            ephemeral: &e,
            kem: &m,
        },
    )
}

/// The reference handshake of `inp`, cross-checked against tern's (in the
/// roles tern can play with these inputs). Returns the case and, when tern
/// played both sides, tern's two halves of the session.
fn handshake_case(
    comment: &str,
    inp: &HandshakeInputs,
) -> (SessionCase, Option<(Session, Session)>) {
    let relay_public = refc::x25519_public(&inp.relay_secret);
    let client_e_public = refc::x25519_public(&inp.client_e);
    let info = RelayInfoFields::of(&inp.info);
    let (ek, dk) = wire_ref::kem_keygen(&inp.kem_seed);
    let hello = wire_ref::client_hello(inp.versions.0, inp.versions.1, &ek);
    let mut c = wire_ref::initial(&relay_public);
    let msg1 = wire_ref::write_message1(&mut c, &inp.client_e, &relay_public, &hello);
    let mut r = wire_ref::initial(&relay_public);
    assert_eq!(
        wire_ref::read_message1(&mut r, &inp.relay_secret, &msg1).as_deref(),
        Some(&hello[..])
    );
    let (ct, ss) = wire_ref::kem_encapsulate(&ek, &inp.kem_m);
    assert_eq!(wire_ref::kem_decapsulate(&dk, &ct), ss);
    let server_hello = wire_ref::server_hello(2, &info);
    let noise2 =
        wire_ref::write_message2(&mut r, &inp.relay_e, &client_e_public, &ss, &server_hello);
    let msg2 = [ct.clone(), noise2.clone()].concat();
    assert_eq!(
        wire_ref::read_message2(&mut c, &inp.client_e, &noise2, &ss).as_deref(),
        Some(&server_hello[..])
    );
    assert_eq!(c.h, r.h);
    let (k1, k2) = c.split();
    assert_eq!(r.split(), (k1, k2));
    assert_eq!(msg1.len(), wire_session::MSG1_LEN);
    assert_eq!(msg2.len(), wire_session::MSG2_LEN);

    // tern's relay on the reference's message 1.
    let (server, tern_msg2, offered) = ServerHandshake::respond_fixed(
        &inp.relay_secret,
        &msg1,
        &inp.info,
        Fixed {
            ephemeral: &inp.relay_e,
            kem: &inp.kem_m,
        },
    )
    .expect("tern's relay answers the reference's message 1");
    assert_eq!(tern_msg2, msg2, "{comment}: message 2");
    assert_eq!((offered.min_version, offered.max_version), inp.versions);
    assert_eq!(server.hash(), &c.h);
    let mut roles = vec!["relay".to_string()];
    // tern's client, when it would offer these versions.
    let pair = (inp.versions == (2, 2)).then(|| {
        let (client, tern_msg1) = ClientHandshake::start_fixed(
            &relay_public,
            Fixed {
                ephemeral: &inp.client_e,
                kem: &inp.kem_seed,
            },
        )
        .unwrap();
        assert_eq!(tern_msg1, msg1, "{comment}: message 1");
        let (client, got) = client
            .finish(&msg2)
            .expect("tern's client accepts message 2");
        assert_eq!(got, inp.info);
        assert_eq!(client.hash(), &c.h);
        roles.insert(0, "client".into());
        (client, server)
    });
    let case = SessionCase {
        comment: comment.into(),
        result: "valid".into(),
        roles,
        relay_static_secret: o(&inp.relay_secret),
        relay_static_public: o(&relay_public),
        client_ephemeral_secret: o(&inp.client_e),
        client_ephemeral_public: o(&client_e_public),
        relay_ephemeral_secret: o(&inp.relay_e),
        relay_ephemeral_public: o(&refc::x25519_public(&inp.relay_e)),
        kem_seed: o(&inp.kem_seed),
        kem_encapsulation_key: o(&ek),
        kem_m: o(&inp.kem_m),
        kem_ciphertext: o(&ct),
        kem_shared_secret: o(&ss),
        client_min_version: Some(inp.versions.0),
        client_max_version: Some(inp.versions.1),
        client_hello: o(&hello),
        message1: o(&msg1),
        es: o(&refc::x25519(&inp.client_e, &relay_public)),
        ee: o(&refc::x25519(
            &inp.client_e,
            &refc::x25519_public(&inp.relay_e),
        )),
        relay_info: Some(info),
        server_hello: o(&server_hello),
        message2: o(&msg2),
        handshake_hash: o(&c.h),
        symmetric_state: c
            .trace
            .iter()
            .map(|s| SymmetricStep {
                op: s.op.clone(),
                ck: hex(&s.ck),
                h: hex(&s.h),
                k: s.k.map(|k| hex(&k)),
            })
            .collect(),
        client_to_relay_key: o(&k1),
        relay_to_client_key: o(&k2),
        ..Default::default()
    };
    (case, pair)
}

fn gen_session() -> Vec<SessionCase> {
    let mut rng = seeded(5);
    let inputs = |rng: &mut StdRng, info: RelayInfo, versions| HandshakeInputs {
        relay_secret: random(rng),
        client_e: random(rng),
        relay_e: random(rng),
        kem_seed: random(rng),
        kem_m: random(rng),
        info,
        versions,
    };
    let inp = inputs(&mut rng, default_relay_info(), (2, 2));
    let (mut base, pair) = handshake_case(
        "a complete session: the handshake, then three transport messages each way",
        &inp,
    );
    let (mut client, mut server) = pair.expect("tern plays both sides");
    let hash = *client.hash();

    // Frames each way, as a client and a relay would send them.
    let recipient = SigningKey::from_bytes(&random(&mut rng));
    let sender = SigningKey::from_bytes(&random(&mut rng));
    let rid: [u8; 16] = random(&mut rng);
    let sid: [u8; 16] = random(&mut rng);
    let msg_id: [u8; 16] = random(&mut rng);
    let mut queue_msg = vec![0x02];
    queue_msg.extend(random_vec(&mut rng, 100));
    queue_msg.resize(QUEUE_MSG_LEN, 0);
    let delivered = random_vec(&mut rng, DELIVERED_LEN);
    let cmd = |tag, c: Command, key: Option<&SigningKey>| checked_command(tag, &c, &hash, key);
    let client_frames: Vec<Vec<Vec<u8>>> = vec![
        vec![
            cmd(1, Command::Info, None),
            cmd(2, Command::Check { recipient_id: rid }, None),
        ],
        vec![
            cmd(
                3,
                Command::Subscribe {
                    recipient_id: rid,
                    window: 64,
                },
                Some(&recipient),
            ),
            cmd(
                4,
                Command::AckUpTo {
                    recipient_id: rid,
                    msg_id,
                },
                Some(&recipient),
            ),
        ],
        vec![cmd(
            5,
            Command::Send {
                sender_id: sid,
                message: queue_msg,
            },
            Some(&sender),
        )],
    ];
    let relay_frames: Vec<Vec<Vec<u8>>> = vec![
        vec![
            checked_reply(1, &Reply::Info(inp.info)),
            checked_reply(2, &Reply::Count(1)),
        ],
        vec![
            checked_reply(3, &Reply::Ok),
            checked_reply(
                3,
                &Reply::Message {
                    msg_id,
                    received_at: 1_767_225_600,
                    body: delivered,
                },
            ),
            checked_reply(3, &Reply::Idle),
        ],
        vec![checked_reply(4, &Reply::Ok), checked_reply(5, &Reply::Ok)],
    ];
    let k1 = wire_ref::key32(&base.client_to_relay_key);
    let k2 = wire_ref::key32(&base.relay_to_client_key);
    for (direction, frames, key) in [
        (CLIENT_TO_RELAY, &client_frames, k1),
        (RELAY_TO_CLIENT, &relay_frames, k2),
    ] {
        for (n, records) in frames.iter().enumerate() {
            let packed = checked_frames(records);
            assert_eq!(packed.len(), 1);
            let frame = &packed[0];
            let (sealer, opener) = if direction == CLIENT_TO_RELAY {
                (&mut client, &mut server)
            } else {
                (&mut server, &mut client)
            };
            let message = sealer.seal(frame).unwrap();
            assert_eq!(
                message,
                wire_ref::encrypt(&key, n as u64, &[], frame),
                "transport message {direction} {n}"
            );
            assert_eq!(&opener.open(&message).unwrap(), frame);
            base.transport.push(TransportMessage {
                direction: direction.into(),
                nonce: n as u64,
                frame: Padded::of(frame),
                message: hex(&message),
            });
        }
    }
    let mut out = vec![base];

    let closed = RelayInfo {
        open: false,
        max_pending: 250,
        ttl_secs: 7 * 86_400,
        max_window: 16,
        max_subscriptions: 512,
        unsecured_ttl_secs: 0,
        ..default_relay_info()
    };
    let inp1 = inputs(&mut rng, closed, (1, 3));
    out.push(
        handshake_case(
            "a client offering versions 1 to 3 (the relay picks 2), to a relay that needs an \
             access key and keeps never-secured queues for its idle TTL only",
            &inp1,
        )
        .0,
    );

    // Handshake messages to refuse.
    let c0 = out[0].clone();
    let msg1 = unhex(c0.message1.as_deref().unwrap());
    let msg2 = unhex(c0.message2.as_deref().unwrap());
    let relay_public: Key = arr(c0.relay_static_public.as_deref().unwrap());
    let client_e_public: Key = arr(c0.client_ephemeral_public.as_deref().unwrap());
    let (ek, _) = wire_ref::kem_keygen(&inp.kem_seed);
    let (ct, ss) = wire_ref::kem_encapsulate(&ek, &inp.kem_m);
    let info = RelayInfoFields::of(&inp.info);
    // Message 1 written by the reference with another ClientHello, or to
    // another relay key.
    let reference_msg1 = |hello: &[u8], rs: &Key| {
        let mut s = wire_ref::initial(rs);
        wire_ref::write_message1(&mut s, &inp.client_e, rs, hello)
    };
    // Message 2 written by the reference from the relay's state after
    // message 1, with another ServerHello.
    let reference_msg2 = |server_hello: &[u8]| {
        let mut r = wire_ref::initial(&relay_public);
        wire_ref::read_message1(&mut r, &inp.relay_secret, &msg1).unwrap();
        let noise =
            wire_ref::write_message2(&mut r, &inp.relay_e, &client_e_public, &ss, server_hello);
        [ct.clone(), noise].concat()
    };
    let other_relay: Key = random(&mut rng);
    let other_public = refc::x25519_public(&other_relay);
    let impostor_msg2 = {
        let mut s = wire_ref::initial(&other_public);
        wire_ref::impostor_reads_message1(&mut s, &other_relay, &msg1);
        let noise = wire_ref::write_message2(
            &mut s,
            &inp.relay_e,
            &client_e_public,
            &ss,
            &wire_ref::server_hello(2, &info),
        );
        [ct.clone(), noise].concat()
    };
    let hello = |min: u8, max: u8| wire_ref::client_hello(min, max, &ek);
    let mut bad_info = wire_ref::server_hello(2, &info);
    bad_info[3] = 2;
    let mut zero_min = wire_ref::server_hello(2, &info);
    zero_min[1] = 0;
    // (comment, target, mutation, explicit input, the hello inside, error)
    type Refused<'a> = (
        &'a str,
        &'a str,
        Option<Mutation>,
        Option<Vec<u8>>,
        Option<Vec<u8>>,
        &'a str,
    );
    let refused: Vec<Refused> =
        vec![
        ("message 1: a flipped bit in e", "message1", xor(0, 0x01), None, None, "handshake"),
        (
            "message 1: a flipped bit in the encrypted ClientHello (the encapsulation key)",
            "message1",
            xor(32 + 2 + 100, 0x40),
            None,
            None,
            "handshake",
        ),
        (
            "message 1: a flipped bit in the tag",
            "message1",
            xor(wire_session::MSG1_LEN - 1, 0x80),
            None,
            None,
            "handshake",
        ),
        (
            "message 1 one byte short",
            "message1",
            Some(Mutation::Truncate {
                len: wire_session::MSG1_LEN - 1,
            }),
            None,
            None,
            "length",
        ),
        (
            "message 1 with a byte appended",
            "message1",
            Some(Mutation::Append { hex: "00".into() }),
            None,
            None,
            "length",
        ),
        (
            "message 1 written to another relay's key: this relay cannot read it",
            "message1",
            None,
            Some(reference_msg1(&hello(2, 2), &other_public)),
            Some(hello(2, 2)),
            "handshake",
        ),
        (
            "message 1 offering only version 3",
            "message1",
            None,
            Some(reference_msg1(&hello(3, 3), &relay_public)),
            Some(hello(3, 3)),
            "version",
        ),
        (
            "message 1 offering only version 1",
            "message1",
            None,
            Some(reference_msg1(&hello(1, 1), &relay_public)),
            Some(hello(1, 1)),
            "version",
        ),
        (
            "message 1 offering versions 3 to 1 (min above max)",
            "message1",
            None,
            Some(reference_msg1(&hello(3, 1), &relay_public)),
            Some(hello(3, 1)),
            "version",
        ),
        (
            "message 2: a flipped bit in the KEM ciphertext's first byte (another shared secret)",
            "message2",
            xor(0, 0x01),
            None,
            None,
            "handshake",
        ),
        (
            "message 2: a flipped bit in the KEM ciphertext's last byte",
            "message2",
            xor(wire_session::KEM_CT_LEN - 1, 0x80),
            None,
            None,
            "handshake",
        ),
        (
            "message 2: a flipped bit in the relay's e",
            "message2",
            xor(wire_session::KEM_CT_LEN, 0x01),
            None,
            None,
            "handshake",
        ),
        (
            "message 2: a flipped bit in the encrypted ServerHello",
            "message2",
            xor(wire_session::KEM_CT_LEN + 32 + 5, 0x01),
            None,
            None,
            "handshake",
        ),
        (
            "message 2: a flipped bit in the tag",
            "message2",
            xor(wire_session::MSG2_LEN - 1, 0x01),
            None,
            None,
            "handshake",
        ),
        (
            "message 2 one byte short",
            "message2",
            Some(Mutation::Truncate {
                len: wire_session::MSG2_LEN - 1,
            }),
            None,
            None,
            "length",
        ),
        (
            "message 2 with a byte appended",
            "message2",
            Some(Mutation::Append { hex: "00".into() }),
            None,
            None,
            "length",
        ),
        (
            "message 2 without its KEM ciphertext: a classical-only answer is refused",
            "message2",
            None,
            Some(msg2[wire_session::KEM_CT_LEN..].to_vec()),
            None,
            "length",
        ),
        (
            "message 2 from someone without the relay's key (it mixed its own es)",
            "message2",
            None,
            Some(impostor_msg2),
            None,
            "handshake",
        ),
        (
            "message 2 whose ServerHello says version 3",
            "message2",
            None,
            Some(reference_msg2(&wire_ref::server_hello(3, &info))),
            Some(wire_ref::server_hello(3, &info)),
            "version",
        ),
        (
            "message 2 whose relay policy has open = 2",
            "message2",
            None,
            Some(reference_msg2(&bad_info)),
            Some(bad_info.clone()),
            "malformed: invalid: open flag",
        ),
        (
            "message 2 whose relay policy has min_version 0",
            "message2",
            None,
            Some(reference_msg2(&zero_min)),
            Some(zero_min.clone()),
            "malformed: invalid: relay versions",
        ),
    ];
    for (comment, target, mutation, input, inner, err) in refused {
        let given = input.clone().unwrap_or_else(|| {
            let m = mutation.as_ref().unwrap();
            m.apply(if target == "message1" { &msg1 } else { &msg2 })
        });
        if target == "message1" {
            expect_err(
                relay_respond(&c0, &given).map(|_| ()),
                session_err,
                err,
                comment,
            );
        } else {
            expect_err(
                client_start(&c0, &relay_public).finish(&given).map(|_| ()),
                session_err,
                err,
                comment,
            );
        }
        let (message1, message2) = match target {
            "message1" => (input.as_ref().map(|b| hex(b)), None),
            _ => (None, input.as_ref().map(|b| hex(b))),
        };
        let (client_hello, server_hello) = match target {
            "message1" => (inner.as_ref().map(|b| hex(b)), None),
            _ => (None, inner.as_ref().map(|b| hex(b))),
        };
        out.push(SessionCase {
            comment: comment.into(),
            result: "invalid".into(),
            of_case: Some(0),
            target: Some(target.into()),
            mutation,
            message1,
            message2,
            client_hello,
            server_hello,
            error: Some(err.into()),
            ..Default::default()
        });
    }

    // Transport messages to refuse, each on a fresh copy of case 0's session.
    type Transport<'a> = (&'a str, &'a str, Vec<usize>, Option<Mutation>, &'a str);
    let transport: Vec<Transport> = vec![
        (
            "a replayed message",
            CLIENT_TO_RELAY,
            vec![0, 0],
            None,
            "frame",
        ),
        (
            "a reordered message: the second before the first",
            CLIENT_TO_RELAY,
            vec![1],
            None,
            "frame",
        ),
        (
            "a dropped message: the third after the first",
            RELAY_TO_CLIENT,
            vec![0, 2],
            None,
            "frame",
        ),
        (
            "a flipped bit in the ciphertext",
            CLIENT_TO_RELAY,
            vec![0],
            xor(10, 0x01),
            "frame",
        ),
        (
            "a flipped bit in the tag",
            RELAY_TO_CLIENT,
            vec![0, 1],
            xor(16_384 + 15, 0x80),
            "frame",
        ),
        (
            "a message cut to 1024 bytes",
            RELAY_TO_CLIENT,
            vec![0],
            Some(Mutation::Truncate { len: 1024 }),
            "frame",
        ),
        (
            "a message shorter than a tag",
            CLIENT_TO_RELAY,
            vec![0],
            Some(Mutation::Truncate { len: 15 }),
            "too_long",
        ),
        (
            "a message with a byte appended",
            CLIENT_TO_RELAY,
            vec![0],
            Some(Mutation::Append { hex: "00".into() }),
            "frame",
        ),
    ];
    for (comment, direction, open, mutation, err) in transport {
        let (mut client, mut server) = tern_session_pair(&out[0]);
        let receiver = if direction == CLIENT_TO_RELAY {
            &mut server
        } else {
            &mut client
        };
        let msgs: Vec<&TransportMessage> = out[0]
            .transport
            .iter()
            .filter(|m| m.direction == direction)
            .collect();
        let (last, before) = open.split_last().unwrap();
        for i in before {
            receiver.open(&unhex(&msgs[*i].message)).unwrap();
        }
        let m = unhex(&msgs[*last].message);
        let m = mutation.as_ref().map_or(m.clone(), |x| x.apply(&m));
        expect_err(receiver.open(&m), session_err, err, comment);
        out.push(SessionCase {
            comment: comment.into(),
            result: "invalid".into(),
            of_case: Some(0),
            target: Some("transport".into()),
            direction: Some(direction.into()),
            open,
            mutation,
            error: Some(err.into()),
            ..Default::default()
        });
    }
    // A message sealed for the other direction does not open either.
    {
        let (mut client, _) = tern_session_pair(&out[0]);
        let m = unhex(&out[0].transport[0].message);
        expect_err(client.open(&m), session_err, "frame", "reflected");
    }
    out
}

// --- frames.json -----------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FrameLayout {
    /// How many of the case's records (the next ones, in order) it carries.
    pub records: usize,
    /// Its length: the records, then zero padding to this multiple of 1024.
    pub len: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FrameCase {
    pub comment: String,
    pub result: String,
    /// "commands" (a client's frame) or "replies" (a relay's).
    pub direction: String,
    /// Valid: the records, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub records: Vec<Padded>,
    /// Valid: the frames the records are packed into.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub frames: Vec<FrameLayout>,
    /// The frames are not what a sender packs these records into (an empty
    /// frame): only the receiving direction is checked.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub parse_only: bool,
    /// Invalid: the frame to refuse.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frame: Option<Padded>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The bytes of a valid case's frames.
pub fn frame_bytes(c: &FrameCase) -> Vec<Vec<u8>> {
    let mut records = c.records.iter().map(Padded::bytes);
    c.frames
        .iter()
        .map(|f| {
            let mut b: Vec<u8> = records.by_ref().take(f.records).flatten().collect();
            assert!(
                b.len() <= f.len,
                "{}: records longer than their frame",
                c.comment
            );
            b.resize(f.len, 0);
            b
        })
        .collect()
}

/// How a sender packs `records` (PROTOCOL.md §3.3): in order, a new frame
/// when the next record would not fit.
pub fn frame_layout(records: &[Vec<u8>]) -> Vec<FrameLayout> {
    let mut out = Vec::new();
    let (mut n, mut len) = (0, 0);
    for r in records {
        if len + r.len() > MAX_FRAME_LEN {
            out.push(FrameLayout {
                records: n,
                len: wire_frame::padded_len(len),
            });
            (n, len) = (0, 0);
        }
        n += 1;
        len += r.len();
    }
    if n > 0 {
        out.push(FrameLayout {
            records: n,
            len: wire_frame::padded_len(len),
        });
    }
    out
}

pub fn parse_frame(direction: &str, frame: &[u8]) -> Result<Vec<Vec<u8>>, WireError> {
    Ok(match direction {
        "commands" => wire_frame::parse_commands(frame)?
            .iter()
            .map(record_of)
            .collect(),
        "replies" => wire_frame::parse_replies(frame)?
            .iter()
            .map(|(t, r)| reply_record(*t, r))
            .collect(),
        d => panic!("direction {d}"),
    })
}

fn gen_frames() -> Vec<FrameCase> {
    let mut rng = seeded(40);
    let mut out = Vec::new();
    let hash: [u8; 32] = random(&mut rng);
    let key = SigningKey::from_bytes(&random(&mut rng));
    let rid: [u8; 16] = random(&mut rng);
    let cmd = |tag: u32, c: Command| {
        let k = (c.has_signature_field() && !matches!(c, Command::Send { .. })).then_some(&key);
        checked_command(tag, &c, &hash, k)
    };
    let ack = |tag: u32| {
        cmd(
            tag,
            Command::Ack {
                recipient_id: rid,
                msg_id: [tag as u8; 16],
            },
        )
    };
    let small_send = |tag: u32, rng: &mut StdRng| {
        let mut m = vec![0x01];
        m.extend(random_vec(rng, 63));
        m.resize(QUEUE_MSG_LEN, 0);
        cmd(
            tag,
            Command::Send {
                sender_id: random(rng),
                message: m,
            },
        )
    };
    let sends: Vec<Vec<u8>> = (1..=5).map(|t| small_send(t, &mut rng)).collect();
    let msg = |tag: u32, rng: &mut StdRng| {
        let mut body = random_vec(rng, 32);
        body.resize(DELIVERED_LEN, 0);
        checked_reply(
            tag,
            &Reply::Message {
                msg_id: random(rng),
                received_at: 1_767_225_600 + 3600 * u64::from(tag),
                body,
            },
        )
    };
    let msgs: Vec<Vec<u8>> = (1..=5).map(|t| msg(t, &mut rng)).collect();
    let valid: Vec<(&str, &str, Vec<Vec<u8>>)> = vec![
        (
            "one INFO: five bytes, then 0x00 and zero padding to 1024",
            "commands",
            vec![cmd(1, Command::Info)],
        ),
        (
            "several commands in one frame, in order",
            "commands",
            vec![
                cmd(7, Command::Info),
                cmd(8, Command::Check { recipient_id: rid }),
                cmd(
                    9,
                    Command::Subscribe {
                        recipient_id: rid,
                        window: 16,
                    },
                ),
                cmd(10, Command::Unsubscribe { sub_tag: 9 }),
                cmd(
                    11,
                    Command::AckUpTo {
                        recipient_id: rid,
                        msg_id: [3; 16],
                    },
                ),
            ],
        ),
        (
            "records that fill exactly 1024 bytes: no 0x00 byte, no padding",
            "commands",
            (1..=10)
                .map(ack)
                .chain([
                    cmd(11, Command::Unsubscribe { sub_tag: 1 }),
                    cmd(12, Command::Info),
                ])
                .collect(),
        ),
        (
            "1,111 bytes of records: a frame of 2048",
            "commands",
            (1..=11).map(ack).collect(),
        ),
        (
            "five SENDs: four fill a frame of 64,512 bytes, the fifth starts a new one",
            "commands",
            sends,
        ),
        (
            "one reply of every kind but MSG",
            "replies",
            vec![
                checked_reply(1, &Reply::Ok),
                checked_reply(2, &Reply::Info(default_relay_info())),
                checked_reply(
                    3,
                    &Reply::Queue {
                        recipient_id: random(&mut rng),
                        sender_id: random(&mut rng),
                        relay_dh: random(&mut rng),
                    },
                ),
                checked_reply(4, &Reply::Idle),
                checked_reply(5, &Reply::Ended),
                checked_reply(6, &Reply::Count(3)),
                checked_reply(7, &Reply::Error(ErrorCode::NotEmpty)),
            ],
        ),
        ("five MSG pushes: four to a frame", "replies", msgs),
    ];
    for (comment, direction, records) in valid {
        let frames = checked_frames(&records);
        let layout = frame_layout(&records);
        for f in &frames {
            let parsed = parse_frame(direction, f).unwrap();
            assert_eq!(Some(parsed), wire_ref::split(f, direction == "replies"));
        }
        let case = FrameCase {
            comment: comment.into(),
            result: "valid".into(),
            direction: direction.into(),
            records: records.iter().map(|r| Padded::of(r)).collect(),
            frames: layout,
            ..Default::default()
        };
        assert_eq!(frame_bytes(&case), frames);
        out.push(case);
    }
    let empty = vec![0u8; FRAME_QUANTUM];
    assert_eq!(
        parse_frame("commands", &empty).unwrap(),
        Vec::<Vec<u8>>::new()
    );
    for direction in ["commands", "replies"] {
        out.push(FrameCase {
            comment: "a frame of padding only: no records, valid (a sender never makes one)".into(),
            result: "valid".into(),
            direction: direction.into(),
            frames: vec![FrameLayout {
                records: 0,
                len: FRAME_QUANTUM,
            }],
            parse_only: true,
            ..Default::default()
        });
    }

    let framed = |records: &[&[u8]], len: usize| {
        let mut f: Vec<u8> = records.concat();
        f.resize(len, 0);
        f
    };
    let info = cmd(1, Command::Info);
    let ok = checked_reply(1, &Reply::Ok);
    let at = |mut f: Vec<u8>, i: usize, v: u8| {
        f[i] = v;
        f
    };
    let check = cmd(11, Command::Check { recipient_id: rid });
    let acks: Vec<Vec<u8>> = (1..=10).map(ack).collect();
    let invalid: Vec<(&str, &str, Vec<u8>, &str)> = vec![
        (
            "an empty frame",
            "commands",
            vec![],
            "invalid: frame length",
        ),
        (
            "1,000 bytes: not a multiple of 1024",
            "commands",
            framed(&[&info], 1000),
            "invalid: frame length",
        ),
        (
            "1,025 bytes",
            "commands",
            framed(&[&info], 1025),
            "invalid: frame length",
        ),
        (
            "65,536 bytes: longer than 64,512",
            "commands",
            framed(&[&info], 65_536),
            "invalid: frame length",
        ),
        (
            "a non-zero byte in the padding",
            "commands",
            at(framed(&[&info], 1024), 100, 1),
            "bad_padding",
        ),
        (
            "a record after the 0x00 that ends the records",
            "commands",
            framed(&[&info, &[0], &info], 1024),
            "bad_padding",
        ),
        (
            "an unknown command code (0x0B) after a valid record",
            "commands",
            at(framed(&[&info], 1024), 5, 0x0B),
            "unknown_command",
        ),
        (
            "a reply record in a client's frame",
            "commands",
            framed(&[&ok], 1024),
            "unknown_command",
        ),
        (
            "a CHECK cut off by the end of the frame (10 ACKs, then 14 of its 21 bytes)",
            "commands",
            [acks.concat(), check[..14].to_vec()].concat(),
            "truncated",
        ),
        (
            "an unknown reply kind (0x87)",
            "replies",
            at(framed(&[&ok], 1024), 5, 0x87),
            "unknown_reply",
        ),
        (
            "a command record in a relay's frame",
            "replies",
            framed(&[&info], 1024),
            "unknown_reply",
        ),
        (
            "1,023 bytes",
            "replies",
            framed(&[&ok], 1023),
            "invalid: frame length",
        ),
        (
            "a non-zero byte in the last byte of the padding",
            "replies",
            at(framed(&[&ok], 2048), 2047, 0x80),
            "bad_padding",
        ),
    ];
    for (comment, direction, frame, err) in invalid {
        expect_err(parse_frame(direction, &frame), wire_err, err, comment);
        assert_eq!(
            wire_ref::split(&frame, direction == "replies"),
            None,
            "{comment}"
        );
        out.push(FrameCase {
            comment: comment.into(),
            result: "invalid".into(),
            direction: direction.into(),
            frame: Some(Padded::of(&frame)),
            error: Some(err.into()),
            ..Default::default()
        });
    }
    out
}

// --- relay_commands.json ---------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct CommandCase {
    pub comment: String,
    pub result: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<CommandFields>,
    /// The handshake hash of the session the relay verifies in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_hash: Option<String>,
    /// The session hash the record was signed for, where it differs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signed_for: Option<String>,
    /// Ed25519 secret key (seed) that signed the record, when tern can
    /// re-sign it to the same bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_key: Option<String>,
    /// The key the relay verifies against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verifying_key: Option<String>,
    /// Where the signature field starts: the signed prefix's length.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signed_len: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
    /// Whether the signature verifies under `verifying_key` and `session_hash`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_signature: Option<bool>,
    pub record: Padded,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Ed25519's group order L, little endian.
const ED25519_L: [u8; 32] = [
    0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9, 0xde, 0x14,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
];

fn add_le(a: &[u8], b: &[u8]) -> Vec<u8> {
    let mut carry = 0u16;
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            let s = u16::from(*x) + u16::from(*y) + carry;
            carry = s >> 8;
            s as u8
        })
        .collect()
}

fn gen_relay_commands() -> Vec<CommandCase> {
    let mut rng = seeded(3);
    let mut out = Vec::new();
    let hash: [u8; 32] = random(&mut rng);
    let other_hash: [u8; 32] = random(&mut rng);
    let key = SigningKey::from_bytes(&random(&mut rng));
    let other = SigningKey::from_bytes(&random(&mut rng));
    let mut queue_msg = vec![0x02];
    queue_msg.extend(random_vec(&mut rng, 63));
    queue_msg.resize(QUEUE_MSG_LEN, 0);
    let mut conn_req = vec![0x01];
    conn_req.extend(random_vec(&mut rng, 63));
    conn_req.resize(QUEUE_MSG_LEN, 0);
    let commands: Vec<(&str, Command, bool)> = vec![
        ("INFO: unsigned, no signature field", Command::Info, false),
        (
            "CREATE with an access key, signed by the new recipient key",
            Command::Create {
                access_key: Some("op-Key_2024".into()),
                recipient_auth: key.verifying_key().to_bytes(),
                recipient_dh: random(&mut rng),
            },
            true,
        ),
        (
            "CREATE on an open relay: an empty access key",
            Command::Create {
                access_key: None,
                recipient_auth: key.verifying_key().to_bytes(),
                recipient_dh: random(&mut rng),
            },
            true,
        ),
        (
            "CREATE with the longest access key (64 bytes)",
            Command::Create {
                access_key: Some("k".repeat(64)),
                recipient_auth: key.verifying_key().to_bytes(),
                recipient_dh: random(&mut rng),
            },
            true,
        ),
        (
            "SECURE",
            Command::Secure {
                recipient_id: random(&mut rng),
                sender_auth: random(&mut rng),
            },
            true,
        ),
        (
            "SEND signed by the queue's sender key (flag 1)",
            Command::Send {
                sender_id: random(&mut rng),
                message: queue_msg,
            },
            true,
        ),
        (
            "unsigned SEND of a connection request (flag 0, zero signature field)",
            Command::Send {
                sender_id: random(&mut rng),
                message: conn_req,
            },
            false,
        ),
        (
            "SUB with a window of 64",
            Command::Subscribe {
                recipient_id: random(&mut rng),
                window: 64,
            },
            true,
        ),
        (
            "SUB with a window of 0 (the relay makes it 1)",
            Command::Subscribe {
                recipient_id: random(&mut rng),
                window: 0,
            },
            true,
        ),
        (
            "ACK",
            Command::Ack {
                recipient_id: random(&mut rng),
                msg_id: random(&mut rng),
            },
            true,
        ),
        (
            "ACK_UPTO",
            Command::AckUpTo {
                recipient_id: random(&mut rng),
                msg_id: random(&mut rng),
            },
            true,
        ),
        (
            "DELETE, whatever the queue holds",
            Command::Delete {
                recipient_id: random(&mut rng),
                if_empty: false,
            },
            true,
        ),
        (
            "DELETE only if empty",
            Command::Delete {
                recipient_id: random(&mut rng),
                if_empty: true,
            },
            true,
        ),
        (
            "UNSUB: unsigned",
            Command::Unsubscribe {
                sub_tag: 0x0102_0304,
            },
            false,
        ),
        (
            "CHECK: unsigned",
            Command::Check {
                recipient_id: random(&mut rng),
            },
            false,
        ),
    ];
    let mut sub = None;
    for (i, (comment, cmd, signed)) in commands.into_iter().enumerate() {
        let tag = if i == 0 { 0xFFFF_FFFF } else { i as u32 };
        let signer = signed.then_some(&key);
        let rec = checked_command(tag, &cmd, &hash, signer);
        let req = decode_command(&rec).unwrap();
        assert_eq!((req.tag, &req.command), (tag, &cmd));
        let n = signature_offset(&cmd);
        let signature = signer.map(|k| {
            let n = n.unwrap();
            let sig = k
                .sign(&wire_ref::signed_message(&hash, &rec[..n]))
                .to_bytes();
            assert_eq!(&rec[n..], &sig);
            assert_eq!(req.signature, Some(sig));
            assert!(req.verify(&hash, key.verifying_key().as_bytes()));
            assert!(!req.verify(&other_hash, key.verifying_key().as_bytes()));
            sig
        });
        if signer.is_none() {
            assert_eq!(req.signature, None);
        }
        if matches!(cmd, Command::Subscribe { window: 64, .. }) {
            sub = Some((tag, cmd.clone(), rec.clone()));
        }
        out.push(CommandCase {
            comment: comment.into(),
            result: "valid".into(),
            command: Some(CommandFields::of(tag, &cmd)),
            session_hash: o(&hash),
            signing_key: signer.map(|k| hex(k.as_bytes())),
            verifying_key: signer.map(|k| hex(k.verifying_key().as_bytes())),
            signed_len: n.filter(|_| signed),
            signature: signature.map(|s| hex(&s)),
            valid_signature: signed.then_some(true),
            record: Padded::of(&rec),
            ..Default::default()
        });
    }

    // Records that decode, but whose signature the relay must refuse.
    let (tag, cmd, rec) = sub.unwrap();
    let n = signature_offset(&cmd).unwrap();
    let mut non_canonical = rec.clone();
    non_canonical[n + 32..].copy_from_slice(&add_le(&rec[n + 32..], &ED25519_L));
    let mut identity = [0u8; 32];
    identity[0] = 1;
    let mut weak = rec.clone();
    weak[n..n + 32].copy_from_slice(&identity);
    weak[n + 32..].fill(0);
    let mut zero = rec.clone();
    zero[n..].fill(0);
    // y = p + 1 = 2^255 - 18: a non-canonical encoding of the identity.
    let mut identity_non_canonical = [0xffu8; 32];
    identity_non_canonical[0] = 0xee;
    identity_non_canonical[31] = 0x7f;
    // y = 2 is not the y of any point: this key does not decode.
    let mut off_curve = [0u8; 32];
    off_curve[0] = 2;
    assert!(ed25519_dalek::VerifyingKey::from_bytes(&off_curve).is_err());
    let vk_non_canonical = ed25519_dalek::VerifyingKey::from_bytes(&identity_non_canonical)
        .expect("a non-canonical encoding decodes");
    assert!(vk_non_canonical.is_weak());
    // (comment, record, signer, verifying key, session hash, signed for)
    type Refused<'a> = (
        &'a str,
        Vec<u8>,
        Option<&'a SigningKey>,
        Key,
        Key,
        Option<Key>,
    );
    let vk = key.verifying_key().to_bytes();
    let refused: Vec<Refused> = vec![
        (
            "SUB signed for another session: the same record does not verify in this one",
            rec.clone(),
            None,
            vk,
            other_hash,
            Some(hash),
        ),
        (
            "SUB signed by another key than the one the relay holds",
            rec.clone(),
            Some(&key),
            other.verifying_key().to_bytes(),
            hash,
            None,
        ),
        (
            "SUB whose signature scalar S is replaced by S + L (non-canonical; malleable under lax Ed25519)",
            non_canonical,
            None,
            vk,
            hash,
            None,
        ),
        (
            "SUB with R = identity, S = 0 against the identity public key: verifies any message under \
             cofactorless lax rules; strict verification refuses the small-order key",
            weak,
            None,
            identity,
            hash,
            None,
        ),
        (
            "SUB with an all-zero signature field: a signed command is never taken as unsigned",
            zero,
            None,
            vk,
            hash,
            None,
        ),
        (
            "a verifying key that is a non-canonical encoding (y = p + 1) of the identity: it decodes, \
             and is refused as of small order",
            rec.clone(),
            None,
            identity_non_canonical,
            hash,
            None,
        ),
        (
            "a verifying key that does not decode (no point has y = 2)",
            rec.clone(),
            None,
            off_curve,
            hash,
            None,
        ),
    ];
    for (comment, r, signer, vk, h, signed_for) in refused {
        let req = decode_command(&r).unwrap();
        assert_eq!(req.command, cmd);
        assert!(!req.verify(&h, &vk), "{comment}");
        if let Some(f) = signed_for {
            assert!(req.verify(&f, &key.verifying_key().to_bytes()));
        }
        out.push(CommandCase {
            comment: comment.into(),
            result: "valid".into(),
            command: Some(CommandFields::of(tag, &cmd)),
            session_hash: o(&h),
            signed_for: signed_for.map(|f| hex(&f)),
            signing_key: signer.map(|k| hex(k.as_bytes())),
            verifying_key: o(&vk),
            signed_len: Some(n),
            signature: o(&r[n..]),
            valid_signature: Some(false),
            record: Padded::of(&r),
            ..Default::default()
        });
    }

    // Records that must not decode.
    let info = command_record(1, &Command::Info, &hash, None);
    let create = command_record(
        2,
        &Command::Create {
            access_key: Some("k".into()),
            recipient_auth: [1; 32],
            recipient_dh: [2; 32],
        },
        &hash,
        Some(&key),
    );
    let send = command_record(
        3,
        &Command::Send {
            sender_id: [5; 16],
            message: [vec![1], vec![0; QUEUE_MSG_LEN - 1]].concat(),
        },
        &hash,
        None,
    );
    let delete = command_record(
        4,
        &Command::Delete {
            recipient_id: [6; 16],
            if_empty: true,
        },
        &hash,
        Some(&key),
    );
    let with = |b: &[u8], at: usize, v: u8| {
        let mut b = b.to_vec();
        b[at] = v;
        b
    };
    let mut long_key = vec![0x02, 0, 0, 0, 5, 65];
    long_key.extend(vec![b'a'; 65]);
    long_key.extend([0u8; 32 + 32 + 64]);
    let mut sig_on_unsigned = send.clone();
    let last = sig_on_unsigned.len() - 1;
    sig_on_unsigned[last] = 1;
    let invalid: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "command 0x00 does not exist (in a frame it starts the padding)",
            with(&info, 0, 0x00),
            "unknown_command",
        ),
        (
            "command 0x0b does not exist",
            with(&info, 0, 0x0b),
            "unknown_command",
        ),
        (
            "command 0xff does not exist",
            with(&info, 0, 0xff),
            "unknown_command",
        ),
        (
            "CREATE with a 65-byte access key",
            long_key,
            "invalid: access key",
        ),
        (
            "CREATE with an access key that is not UTF-8",
            with(&create, 6, 0xff),
            "invalid: access key",
        ),
        (
            "SEND with flag 2",
            with(&send, 5 + 16, 2),
            "invalid: send flag",
        ),
        (
            "unsigned SEND with a non-zero signature field",
            sig_on_unsigned,
            "invalid: unsigned send signature",
        ),
        (
            "DELETE with if_empty 2",
            with(&delete, 5 + 16, 2),
            "invalid: delete flag",
        ),
        (
            "DELETE cut off inside its signature",
            delete[..delete.len() - 1].to_vec(),
            "truncated",
        ),
        (
            "INFO cut off inside its tag",
            info[..3].to_vec(),
            "truncated",
        ),
        ("empty input", vec![], "truncated"),
    ];
    for (comment, r, err) in invalid {
        expect_err(decode_command(&r), wire_err, err, comment);
        out.push(CommandCase {
            comment: comment.into(),
            result: "invalid".into(),
            record: Padded::of(&r),
            error: Some(err.into()),
            ..Default::default()
        });
    }
    out
}

// --- relay_replies.json ----------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplyCase {
    pub comment: String,
    pub result: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<ReplyFields>,
    pub record: Padded,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn gen_relay_replies() -> Vec<ReplyCase> {
    let mut rng = seeded(4);
    let mut out = Vec::new();
    let mut delivered = random_vec(&mut rng, 64);
    delivered.resize(DELIVERED_LEN, 0);
    let mut replies: Vec<(String, Reply)> = vec![
        ("OK".into(), Reply::Ok),
        (
            "INFO: the relay's version range and policy".into(),
            Reply::Info(default_relay_info()),
        ),
        (
            "QUEUE: the answer to CREATE".into(),
            Reply::Queue {
                recipient_id: random(&mut rng),
                sender_id: random(&mut rng),
                relay_dh: random(&mut rng),
            },
        ),
        (
            "MSG: a pushed message, received_at rounded down to the hour".into(),
            Reply::Message {
                msg_id: random(&mut rng),
                received_at: 1_767_225_600,
                body: delivered,
            },
        ),
        (
            "IDLE: the subscription has pushed everything there is".into(),
            Reply::Idle,
        ),
        ("ENDED: the subscribed queue is gone".into(), Reply::Ended),
        ("COUNT: the answer to CHECK".into(), Reply::Count(1000)),
    ];
    for c in ERROR_CODES {
        replies.push((format!("ERROR {} ({})", c as u8, c.name()), Reply::Error(c)));
    }
    for (i, (comment, reply)) in replies.into_iter().enumerate() {
        let tag = 0x0100_0000 + i as u32;
        let rec = checked_reply(tag, &reply);
        assert_eq!(decode_reply(&rec).unwrap(), (tag, reply.clone()));
        out.push(ReplyCase {
            comment,
            result: "valid".into(),
            reply: Some(ReplyFields::of(tag, &reply)),
            record: Padded::of(&rec),
            error: None,
        });
    }
    let ok = reply_record(1, &Reply::Ok);
    let info = reply_record(1, &Reply::Info(default_relay_info()));
    let with = |b: &[u8], at: usize, v: u8| {
        let mut b = b.to_vec();
        b[at] = v;
        b
    };
    let error = |code: u8| [&ok[..], &[code]].concat();
    let invalid: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "reply kind 0x87 does not exist",
            with(&ok, 0, 0x87),
            "unknown_reply",
        ),
        (
            "reply kind 0x7f does not exist",
            with(&ok, 0, 0x7f),
            "unknown_reply",
        ),
        (
            "reply kind 0x00 does not exist",
            with(&ok, 0, 0x00),
            "unknown_reply",
        ),
        (
            "ERROR code 0 does not exist",
            with(&error(0), 0, 0xFF),
            "unknown_error",
        ),
        (
            "ERROR code 13 does not exist",
            with(&error(13), 0, 0xFF),
            "unknown_error",
        ),
        (
            "ERROR code 255 does not exist",
            with(&error(255), 0, 0xFF),
            "unknown_error",
        ),
        (
            "INFO with open = 2",
            with(&info, 5 + 2, 2),
            "invalid: open flag",
        ),
        (
            "INFO with min_version 0",
            with(&info, 5, 0),
            "invalid: relay versions",
        ),
        (
            "INFO with min_version 3 above max_version 2",
            with(&info, 5, 3),
            "invalid: relay versions",
        ),
        (
            "INFO cut off inside unsecured_ttl_secs",
            info[..info.len() - 1].to_vec(),
            "truncated",
        ),
        (
            "MSG cut off inside its body",
            reply_record(
                1,
                &Reply::Message {
                    msg_id: [1; 16],
                    received_at: 0,
                    body: vec![7; DELIVERED_LEN],
                },
            )[..5 + 16 + 8 + 100]
                .to_vec(),
            "truncated",
        ),
        ("ERROR without its code", with(&ok, 0, 0xFF), "truncated"),
        ("empty input", vec![], "truncated"),
    ];
    for (comment, r, err) in invalid {
        expect_err(decode_reply(&r), wire_err, err, comment);
        out.push(ReplyCase {
            comment: comment.into(),
            result: "invalid".into(),
            reply: None,
            record: Padded::of(&r),
            error: Some(err.into()),
        });
    }
    out
}

// ---------------------------------------------------------------------------
// handshake.json and security_code.json
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct HandshakeCase {
    pub comment: String,
    pub result: String,
    /// The binary form of the invitation the handshake answers (§4.1) and
    /// `SHA-256("tern/v1 invitation" || invitation)`, the first input of the
    /// transcript.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invitation: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invitation_hash: Option<String>,
    /// X25519 secrets (32 bytes, clamped when used). The inviter's pair is
    /// present when the inviter side is to be computed, the joiner's when the
    /// joiner side is (the joiner draws J then E from its RNG).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invitation_secret: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inviter_ratchet_secret: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub joiner_identity_secret: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub joiner_ephemeral_secret: Option<String>,
    /// The public keys I, R, J, E.
    pub invitation_key: String,
    pub inviter_ratchet_key: String,
    pub joiner_identity_key: String,
    pub joiner_ephemeral_key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dh1: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dh2: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dh3: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transcript: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header_key_initiator: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header_key_responder: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_secret: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn public_of(s: &[u8; 32]) -> [u8; 32] {
    DhKeyPair::from_secret(Secret32(*s)).public()
}

/// Low-order and non-canonical-zero X25519 public keys (all give an all-zero
/// shared secret with every private key).
pub const LOW_ORDER_POINTS: [[u8; 32]; 3] = [
    [0; 32],
    [
        1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 0,
    ],
    // A point of order 8.
    [
        0xe0, 0xeb, 0x7a, 0x7c, 0x3b, 0x41, 0xb8, 0xae, 0x16, 0x56, 0xe3, 0xfa, 0xf1, 0x9f, 0xc4,
        0x6a, 0xda, 0x09, 0x8d, 0xeb, 0x9c, 0x32, 0xb1, 0xfd, 0x86, 0x62, 0x05, 0x16, 0x5f, 0x49,
        0xb8, 0x00,
    ],
];

/// p = 2^255 - 19, which X25519 reads as u = 0.
pub const NONCANONICAL_ZERO: [u8; 32] = [
    0xed, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f,
];

/// The handshake's four secrets, generated for case `i` of handshake.json.
fn handshake_secrets(rng: &mut StdRng) -> [[u8; 32]; 4] {
    [random(rng), random(rng), random(rng), random(rng)]
}

/// The invitation of handshake case `secrets`: its keys `I` and `R` and one
/// queue on a fixed relay (no random bytes drawn, so the cases keep theirs).
pub fn handshake_invitation(secrets: &[[u8; 32]; 4]) -> Vec<u8> {
    Invitation {
        invitation_key: public_of(&secrets[0]),
        ratchet_key: public_of(&secrets[1]),
        queues: vec![SendQueue {
            relay: format!("tern://{}@192.0.2.1:5223", key_text(&[0x5a; 32]))
                .parse()
                .unwrap(),
            sender_id: [0x11; 16],
        }],
    }
    .encode()
}

fn agreement_for(secrets: &[[u8; 32]; 4]) -> (Agreement, Agreement) {
    let h = refc::invitation_hash(&handshake_invitation(secrets));
    let inviter = InviterSecrets {
        invitation: DhKeyPair::from_secret(Secret32(secrets[0])),
        ratchet: DhKeyPair::from_secret(Secret32(secrets[1])),
        invitation_hash: h,
    };
    let mut frng = FixedRng::new(&[secrets[2], secrets[3]].concat());
    let j = joiner_agree(
        &h,
        &inviter.invitation.public(),
        &inviter.ratchet.public(),
        &mut frng,
    )
    .unwrap();
    frng.assert_used_up("joiner_agree");
    let i = inviter
        .agree(&j.keys.joiner_identity, &j.keys.joiner_ephemeral)
        .unwrap();
    (i, j)
}

fn gen_handshake() -> Vec<HandshakeCase> {
    let mut rng = seeded(6);
    let mut out = Vec::new();
    let comments = [
        "a handshake (ratchet.json case 0 continues this connection)",
        "a second handshake",
        "a third handshake",
    ];
    for comment in comments {
        let s = handshake_secrets(&mut rng);
        let (i, j) = agreement_for(&s);
        let p: Vec<[u8; 32]> = s.iter().map(public_of).collect();
        let dh = [
            refc::x25519(&s[2], &p[1]),
            refc::x25519(&s[3], &p[0]),
            refc::x25519(&s[3], &p[1]),
        ];
        assert_eq!(dh[0], refc::x25519(&s[1], &p[2]));
        let binary = handshake_invitation(&s);
        let h = refc::invitation_hash(&binary);
        let th = refc::transcript(&h, &p[0], &p[1], &p[2], &p[3]);
        assert_eq!(th, i.keys.transcript());
        let k = refc::handshake_keys(&th, dh);
        for a in [&i, &j] {
            assert_eq!(a.ratchet.root_key.0, k[0]);
            assert_eq!(a.ratchet.header_key_initiator.0, k[1]);
            assert_eq!(a.ratchet.header_key_responder.0, k[2]);
            assert_eq!(a.connection_secret.0, k[3]);
            assert_eq!(a.ratchet.ad, th);
        }
        let code = security_code(&th);
        assert_eq!(code, refc::security_code(&th));
        out.push(HandshakeCase {
            comment: comment.into(),
            result: "valid".into(),
            invitation: o(&binary),
            invitation_hash: o(&h),
            invitation_secret: o(&s[0]),
            inviter_ratchet_secret: o(&s[1]),
            joiner_identity_secret: o(&s[2]),
            joiner_ephemeral_secret: o(&s[3]),
            invitation_key: hex(&p[0]),
            inviter_ratchet_key: hex(&p[1]),
            joiner_identity_key: hex(&p[2]),
            joiner_ephemeral_key: hex(&p[3]),
            dh1: o(&dh[0]),
            dh2: o(&dh[1]),
            dh3: o(&dh[2]),
            transcript: o(&th),
            root_key: o(&k[0]),
            header_key_initiator: o(&k[1]),
            header_key_responder: o(&k[2]),
            connection_secret: o(&k[3]),
            security_code: Some(code),
            error: None,
        });
    }

    // Low-order keys: the inviter refuses a joiner key, the joiner an invitation key.
    let s = handshake_secrets(&mut rng);
    let p: Vec<[u8; 32]> = s.iter().map(public_of).collect();
    let inviter = InviterSecrets {
        invitation: DhKeyPair::from_secret(Secret32(s[0])),
        ratchet: DhKeyPair::from_secret(Secret32(s[1])),
        invitation_hash: [0; 32],
    };
    let inviter_side: Vec<(&str, [u8; 32], [u8; 32])> = vec![
        (
            "the inviter refuses an all-zero joiner identity key",
            [0; 32],
            p[3],
        ),
        (
            "the inviter refuses a joiner identity key of order 8",
            LOW_ORDER_POINTS[2],
            p[3],
        ),
        (
            "the inviter refuses the joiner ephemeral key u = 1 (order 4)",
            p[2],
            LOW_ORDER_POINTS[1],
        ),
        (
            "the inviter refuses the joiner ephemeral key u = p (non-canonical zero)",
            p[2],
            NONCANONICAL_ZERO,
        ),
    ];
    for (comment, jk, ek) in inviter_side {
        expect_err(inviter.agree(&jk, &ek), proto_err, "key_agreement", comment);
        out.push(HandshakeCase {
            comment: comment.into(),
            result: "invalid".into(),
            invitation_secret: o(&s[0]),
            inviter_ratchet_secret: o(&s[1]),
            invitation_key: hex(&p[0]),
            inviter_ratchet_key: hex(&p[1]),
            joiner_identity_key: hex(&jk),
            joiner_ephemeral_key: hex(&ek),
            error: Some("key_agreement".into()),
            ..Default::default()
        });
    }
    let joiner_side: Vec<(&str, [u8; 32], [u8; 32])> = vec![
        (
            "the joiner refuses an all-zero invitation key",
            [0; 32],
            p[1],
        ),
        (
            "the joiner refuses an inviter ratchet key of order 8",
            p[0],
            LOW_ORDER_POINTS[2],
        ),
    ];
    for (comment, ik, rk) in joiner_side {
        let mut frng = FixedRng::new(&[s[2], s[3]].concat());
        expect_err(
            joiner_agree(&[0; 32], &ik, &rk, &mut frng),
            proto_err,
            "key_agreement",
            comment,
        );
        out.push(HandshakeCase {
            comment: comment.into(),
            result: "invalid".into(),
            joiner_identity_secret: o(&s[2]),
            joiner_ephemeral_secret: o(&s[3]),
            invitation_key: hex(&ik),
            inviter_ratchet_key: hex(&rk),
            joiner_identity_key: hex(&p[2]),
            joiner_ephemeral_key: hex(&p[3]),
            error: Some("key_agreement".into()),
            ..Default::default()
        });
    }
    out
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecurityCodeCase {
    pub comment: String,
    /// A transcript hash and the code derived from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transcript: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    pub code: String,
    /// What a person typed, and whether it matches `code`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub typed: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matches: Option<bool>,
}

fn gen_security_code() -> Vec<SecurityCodeCase> {
    let mut rng = seeded(7);
    let mut out = Vec::new();
    let mut transcripts: Vec<(&str, [u8; 32])> = vec![
        ("an all-zero transcript", [0; 32]),
        ("an all-0xff transcript", [0xff; 32]),
    ];
    for _ in 0..4 {
        transcripts.push(("a random transcript", random(&mut rng)));
    }
    for (comment, th) in transcripts {
        let code = security_code(&th);
        assert_eq!(code, refc::security_code(&th));
        out.push(SecurityCodeCase {
            comment: comment.into(),
            transcript: o(&th),
            digest: o(&refc::sha256(&[b"tern/v1 security code", &th])),
            code,
            typed: None,
            matches: None,
        });
    }
    let code = out[2].code.clone();
    let mut one_off = code.clone().into_bytes();
    one_off[0] = if one_off[0] == b'9' {
        b'0'
    } else {
        one_off[0] + 1
    };
    let one_off = String::from_utf8(one_off).unwrap();
    let typed: Vec<(&str, String, bool)> = vec![
        ("the same code", code.clone(), true),
        ("dashes instead of spaces", code.replace(' ', "-"), true),
        ("no separators", code.replace(' ', ""), true),
        ("one digit different", one_off, false),
        ("only the first five groups", code[..29].to_string(), false),
        ("an extra digit", format!("{code}0"), false),
        ("nothing", String::new(), false),
    ];
    for (comment, t, m) in typed {
        assert_eq!(codes_match(&code, &t), m, "{comment}");
        out.push(SecurityCodeCase {
            comment: comment.into(),
            transcript: None,
            digest: None,
            code: code.clone(),
            typed: Some(t),
            matches: Some(m),
        });
    }
    out
}

// ---------------------------------------------------------------------------
// ratchet.json
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RatchetInitFields {
    pub root_key: String,
    pub header_key_initiator: String,
    pub header_key_responder: String,
    /// Associated data of every message (the handshake transcript).
    pub ad: String,
    /// The responder's ratchet key pair (R in the handshake).
    pub responder_ratchet_secret: String,
    pub responder_ratchet_key: String,
    /// The 32 bytes the initiator draws for its first ratchet key, then the
    /// 64 (`d || z`) it draws for its first ML-KEM-768 key pair, and that
    /// pair's encapsulation key (published in every header of its chain).
    pub initiator_ratchet_secret: String,
    pub initiator_ratchet_key: String,
    pub initiator_kem_seed: String,
    pub initiator_kem_key: String,
    /// The initiator's first DH ratchet output, and KDF_RK of it.
    pub initiator_dh_output: String,
    pub initiator_root_key: String,
    pub initiator_sending_chain_key: String,
    pub initiator_next_sending_header_key: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderFields {
    pub dh: String,
    pub pn: u32,
    pub n: u32,
    /// The sender's ML-KEM encapsulation key.
    pub ek: String,
    /// The ciphertext of the sender's chain (flag 1), if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ct: Option<String>,
}

/// The key schedule of a DH ratchet step on receipt of a new ratchet key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DhStepFields {
    pub peer_ratchet_key: String,
    pub receiving_dh_output: String,
    pub receiving_chain_key: String,
    pub next_receiving_header_key: String,
    pub root_key_between: String,
    pub new_ratchet_key: String,
    pub sending_dh_output: String,
    pub sending_chain_key: String,
    pub next_sending_header_key: String,
    pub root_key: String,
    /// The ciphertext in the received header and the secret it decapsulates
    /// to with the receiver's key, mixed into the receiving root step;
    /// absent only for the initiator's first chain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub received_ciphertext: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub received_kem_secret: Option<String>,
    /// The receiver's new ML-KEM key pair (the 64 bytes drawn after the
    /// ratchet secret) and its encapsulation key; the 32 bytes `m` drawn
    /// last, encapsulated to the sender's key: the ciphertext and secret of
    /// the sending root step.
    pub new_kem_seed: String,
    pub new_kem_key: String,
    pub kem_m: String,
    pub sent_ciphertext: String,
    pub sent_kem_secret: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RatchetStep {
    /// "encrypt", "encrypt_lost" or "decrypt".
    pub op: String,
    /// "initiator" or "responder".
    pub party: String,
    /// encrypt: this message's number; decrypt: the message received.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plaintext: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header_nonce: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<HeaderFields>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<String>,
    /// encrypt_lost: messages encrypted and never delivered, all with `header_nonce`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u32>,
    /// decrypt: the received bytes are the message's bytes changed by this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mutation: Option<Mutation>,
    /// decrypt: the 32 bytes drawn for the new ratchet key when the message
    /// starts a new receiving chain (then `dh_ratchet.new_kem_seed` and
    /// `dh_ratchet.kem_m` are drawn, 96 bytes more).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ratchet_secret: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dh_ratchet: Option<DhStepFields>,
    /// decrypt: message keys held for skipped messages afterwards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped_keys: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RatchetCase {
    pub comment: String,
    pub init: RatchetInitFields,
    pub steps: Vec<RatchetStep>,
}

pub const PARTIES: [&str; 2] = ["initiator", "responder"];

fn b64_32(v: &Value) -> Option<[u8; 32]> {
    v.as_str().map(|s| {
        BASE64URL_NOPAD
            .decode(s.as_bytes())
            .expect("base64url")
            .try_into()
            .expect("32 bytes")
    })
}

/// The parts of a ratchet's state the vectors describe, read from its
/// serialized form (the store's format).
struct View {
    kem_seed: Option<Vec<u8>>,
    kem_ek: Vec<u8>,
    kem_ct: Vec<u8>,
    dhs_secret: [u8; 32],
    dhs_public: [u8; 32],
    dhr: Option<[u8; 32]>,
    rk: [u8; 32],
    cks: Option<[u8; 32]>,
    hks: Option<[u8; 32]>,
    nhks: [u8; 32],
    nhkr: [u8; 32],
    ns: u32,
    pn: u32,
}

fn view(r: &Ratchet) -> View {
    let v = serde_json::to_value(r).expect("ratchet state serializes");
    let n = |f: &str| v[f].as_u64().expect("counter") as u32;
    let bytes = |f: &str| {
        v[f].as_str()
            .map(|s| BASE64URL_NOPAD.decode(s.as_bytes()).expect("base64url"))
    };
    View {
        kem_seed: bytes("kem"),
        kem_ek: bytes("kem_ek").unwrap_or_default(),
        kem_ct: bytes("kem_ct").unwrap_or_default(),
        dhs_secret: b64_32(&v["dhs"]["secret"]).expect("dhs.secret"),
        dhs_public: b64_32(&v["dhs"]["public"]).expect("dhs.public"),
        dhr: b64_32(&v["dhr"]),
        rk: b64_32(&v["rk"]).expect("rk"),
        cks: b64_32(&v["cks"]),
        hks: b64_32(&v["hks"]),
        nhks: b64_32(&v["nhks"]).expect("nhks"),
        nhkr: b64_32(&v["nhkr"]).expect("nhkr"),
        ns: n("ns"),
        pn: n("pn"),
    }
}

/// A message: its bytes, and the sender's DH key, encapsulation key and
/// chain ciphertext when it was sent.
type SentMessage = (Vec<u8>, [u8; 32], Vec<u8>, Vec<u8>);

struct Conversation {
    rng: StdRng,
    init: RatchetInitFields,
    ad: [u8; 32],
    parties: [Ratchet; 2],
    sent: Vec<SentMessage>,
    steps: Vec<RatchetStep>,
}

fn party(p: usize) -> String {
    PARTIES[p].to_string()
}

impl Conversation {
    fn new(mut rng: StdRng, init: RatchetInit, responder_secret: [u8; 32]) -> Self {
        let initiator_secret: [u8; 32] = random(&mut rng);
        let kem_seed: [u8; 64] = random(&mut rng);
        let bob = DhKeyPair::from_secret(Secret32(responder_secret));
        let mut frng = FixedRng::new(&[&initiator_secret[..], &kem_seed].concat());
        let alice = Ratchet::init_initiator(&init, &bob.public(), &mut frng).unwrap();
        frng.assert_used_up("init_initiator");
        assert_eq!(view(&alice).kem_ek, refc::kem_keygen(&kem_seed));
        let dh = refc::x25519(&initiator_secret, &bob.public());
        let (rk, ck, nhk) = refc::kdf_rk(&init.root_key.0, &dh);
        let a = view(&alice);
        assert_eq!((a.rk, a.cks, a.nhks), (rk, Some(ck), nhk));
        let fields = RatchetInitFields {
            root_key: hex(&init.root_key.0),
            header_key_initiator: hex(&init.header_key_initiator.0),
            header_key_responder: hex(&init.header_key_responder.0),
            ad: hex(&init.ad),
            responder_ratchet_secret: hex(&responder_secret),
            responder_ratchet_key: hex(&bob.public()),
            initiator_ratchet_secret: hex(&initiator_secret),
            initiator_ratchet_key: hex(&public_of(&initiator_secret)),
            initiator_kem_seed: hex(&kem_seed),
            initiator_kem_key: hex(&refc::kem_keygen(&kem_seed)),
            initiator_dh_output: hex(&dh),
            initiator_root_key: hex(&rk),
            initiator_sending_chain_key: hex(&ck),
            initiator_next_sending_header_key: hex(&nhk),
        };
        let responder = Ratchet::init_responder(&init, bob);
        Self {
            rng,
            init: fields,
            ad: init.ad,
            parties: [alice, responder],
            sent: Vec::new(),
            steps: Vec::new(),
        }
    }

    fn send(&mut self, p: usize, plaintext: &[u8]) -> usize {
        let before = view(&self.parties[p]);
        let nonce: [u8; 24] = random(&mut self.rng);
        let mut frng = FixedRng::new(&nonce);
        let bytes = self.parties[p].encrypt(plaintext, &mut frng).unwrap();
        frng.assert_used_up("encrypt");
        let ck = before.cks.expect("sending chain");
        let hk = before.hks.expect("sending header key");
        let (_, mk) = refc::kdf_ck(&ck);
        let ct = (!before.kem_ct.is_empty()).then_some(&before.kem_ct[..]);
        let header = refc::header(&before.dhs_public, before.pn, before.ns, &before.kem_ek, ct);
        assert_eq!(
            refc::ratchet_message(&hk, &nonce, &header, &self.ad, &mk, plaintext),
            bytes,
            "ratchet message"
        );
        self.sent.push((
            bytes.clone(),
            before.dhs_public,
            before.kem_ek.clone(),
            before.kem_ct.clone(),
        ));
        self.steps.push(RatchetStep {
            op: "encrypt".into(),
            party: party(p),
            message: Some(self.sent.len() - 1),
            plaintext: o(plaintext),
            header_nonce: o(&nonce),
            header_key: o(&hk),
            chain_key: o(&ck),
            message_key: o(&mk),
            header: Some(HeaderFields {
                dh: hex(&before.dhs_public),
                pn: before.pn,
                n: before.ns,
                ek: hex(&before.kem_ek),
                ct: ct.map(hex),
            }),
            bytes: o(&bytes),
            ..Default::default()
        });
        self.sent.len() - 1
    }

    fn send_not_ready(&mut self, p: usize, plaintext: &[u8]) {
        let mut frng = FixedRng::new(&[]);
        expect_err(
            self.parties[p].encrypt(plaintext, &mut frng),
            proto_err,
            "not_ready",
            "encrypt before receiving",
        );
        self.steps.push(RatchetStep {
            op: "encrypt".into(),
            party: party(p),
            plaintext: o(plaintext),
            error: Some("not_ready".into()),
            ..Default::default()
        });
    }

    fn lose(&mut self, p: usize, count: u32) {
        let nonce: [u8; 24] = random(&mut self.rng);
        for _ in 0..count {
            let mut frng = FixedRng::new(&nonce);
            self.parties[p].encrypt(b"lost", &mut frng).unwrap();
            frng.assert_used_up("encrypt");
        }
        self.steps.push(RatchetStep {
            op: "encrypt_lost".into(),
            party: party(p),
            plaintext: o(b"lost"),
            header_nonce: o(&nonce),
            count: Some(count),
            ..Default::default()
        });
    }

    fn recv(&mut self, p: usize, m: usize, mutation: Option<Mutation>, expect: Result<(), &str>) {
        let before = view(&self.parties[p]);
        let drawn: [u8; 128] = random(&mut self.rng);
        let candidate: [u8; 32] = drawn[..32].try_into().unwrap();
        let mut frng = FixedRng::new(&drawn);
        let (bytes, sender_dh, sender_ek, sender_ct) = self.sent[m].clone();
        let input = mutation.as_ref().map_or(bytes.clone(), |x| x.apply(&bytes));
        let res = self.parties[p].decrypt(&input, &mut frng);
        let used = frng.used();
        let mut step = RatchetStep {
            op: "decrypt".into(),
            party: party(p),
            message: Some(m),
            mutation,
            skipped_keys: Some(self.parties[p].skipped_len()),
            ..Default::default()
        };
        match (res, expect) {
            (Ok(pt), Ok(())) => {
                let sent = self
                    .steps
                    .iter()
                    .find(|s| s.op == "encrypt" && s.message == Some(m))
                    .unwrap();
                assert_eq!(Some(hex(&pt)), sent.plaintext);
                step.plaintext = o(&pt);
                // A DH ratchet step draws 128 bytes (X25519 secret, ML-KEM
                // seed, encapsulation message); a message of the current
                // chain or a late one of an old chain draws none.
                assert!(used == 0 || used == 128, "drew {used} random bytes");
                if before.dhr == Some(sender_dh) {
                    assert_eq!(used, 0, "a message of the current chain");
                }
                if used == 128 {
                    let after = view(&self.parties[p]);
                    let dh_r = refc::x25519(&before.dhs_secret, &sender_dh);
                    let received = (!sender_ct.is_empty()).then(|| {
                        let seed = before.kem_seed.as_ref().expect("a key to decapsulate with");
                        (sender_ct.clone(), refc::kem_decaps(seed, &sender_ct))
                    });
                    let (rk1, ckr, nhkr) =
                        refc::kdf_rk_pq(&before.rk, &dh_r, received.as_ref().map(|r| &r.1));
                    let new_pub = public_of(&candidate);
                    let new_seed = &drawn[32..96];
                    let kem_m: [u8; 32] = drawn[96..].try_into().unwrap();
                    let new_ek = refc::kem_keygen(new_seed);
                    let (sent_ct, sent_ss) = refc::kem_encaps(&sender_ek, &kem_m);
                    assert_eq!(after.kem_ek, new_ek, "new encapsulation key");
                    assert_eq!(after.kem_ct, sent_ct, "the new chain's ciphertext");
                    let dh_s = refc::x25519(&candidate, &sender_dh);
                    let (rk2, cks, nhks) = refc::kdf_rk_pq(&rk1, &dh_s, Some(&sent_ss));
                    assert_eq!(after.rk, rk2);
                    assert_eq!(after.cks, Some(cks));
                    assert_eq!(after.nhks, nhks);
                    assert_eq!(after.nhkr, nhkr);
                    assert_eq!(after.dhs_public, new_pub);
                    assert_eq!(after.hks, Some(before.nhks));
                    assert_eq!((after.ns, after.pn), (0, before.ns));
                    step.ratchet_secret = o(&candidate);
                    step.dh_ratchet = Some(DhStepFields {
                        peer_ratchet_key: hex(&sender_dh),
                        receiving_dh_output: hex(&dh_r),
                        receiving_chain_key: hex(&ckr),
                        next_receiving_header_key: hex(&nhkr),
                        root_key_between: hex(&rk1),
                        new_ratchet_key: hex(&new_pub),
                        sending_dh_output: hex(&dh_s),
                        sending_chain_key: hex(&cks),
                        next_sending_header_key: hex(&nhks),
                        root_key: hex(&rk2),
                        received_ciphertext: received.as_ref().map(|r| hex(&r.0)),
                        received_kem_secret: received.as_ref().map(|r| hex(&r.1)),
                        new_kem_seed: hex(new_seed),
                        new_kem_key: hex(&new_ek),
                        kem_m: hex(&kem_m),
                        sent_ciphertext: hex(&sent_ct),
                        sent_kem_secret: hex(&sent_ss),
                    });
                }
            }
            (Err(e), Err(want)) => {
                assert_eq!(proto_err(&e), want, "decrypt of message {m}");
                step.error = Some(want.into());
            }
            (Ok(_), Err(want)) => panic!("message {m}: decrypted, expected {want}"),
            (Err(e), Ok(())) => panic!("message {m}: {e}"),
        }
        self.steps.push(step);
    }

    /// A downgraded answer: what a responder that ignores the initiator's
    /// encapsulation key would send in reply to message `m` (its first
    /// chain), built with the reference from the responder's state `before`
    /// it received `m`: an X25519-only root step and a header with flag 0.
    fn forge_classical_answer(&mut self, before: &View, m: usize, plaintext: &[u8]) -> usize {
        let (_, sender_dh, _, _) = self.sent[m].clone();
        let dh_r = refc::x25519(&before.dhs_secret, &sender_dh);
        let (rk1, _, _) = refc::kdf_rk(&before.rk, &dh_r);
        let x: [u8; 32] = random(&mut self.rng);
        let seed: [u8; 64] = random(&mut self.rng);
        let nonce: [u8; 24] = random(&mut self.rng);
        let (_, cks, _) = refc::kdf_rk(&rk1, &refc::x25519(&x, &sender_dh));
        let (_, mk) = refc::kdf_ck(&cks);
        let ek = refc::kem_keygen(&seed);
        let header = refc::header(&public_of(&x), 0, 0, &ek, None);
        let bytes = refc::ratchet_message(&before.nhks, &nonce, &header, &self.ad, &mk, plaintext);
        self.sent
            .push((bytes.clone(), public_of(&x), ek, Vec::new()));
        self.steps.push(RatchetStep {
            op: "forged".into(),
            party: party(B),
            message: Some(self.sent.len() - 1),
            plaintext: o(plaintext),
            bytes: o(&bytes),
            ..Default::default()
        });
        self.sent.len() - 1
    }

    fn finish(self, comment: &str) -> RatchetCase {
        RatchetCase {
            comment: comment.into(),
            init: self.init,
            steps: self.steps,
        }
    }
}

const A: usize = 0;
const B: usize = 1;

fn random_init(rng: &mut StdRng) -> (RatchetInit, [u8; 32]) {
    let init = RatchetInit {
        root_key: Secret32(random(rng)),
        header_key_initiator: Secret32(random(rng)),
        header_key_responder: Secret32(random(rng)),
        ad: random(rng),
    };
    (init, random(rng))
}

fn gen_ratchet() -> Vec<RatchetCase> {
    let mut out = Vec::new();

    // Case 0: continues handshake.json case 0.
    let s = handshake_secrets(&mut seeded(6));
    let (_, j) = agreement_for(&s);
    let mut c = Conversation::new(seeded(8), j.ratchet, s[1]);
    c.send_not_ready(B, b"the responder cannot send first");
    let m0 = c.send(A, b"hello, this is the joiner");
    let m1 = c.send(A, b"");
    c.recv(B, m0, None, Ok(()));
    c.recv(B, m1, None, Ok(()));
    let r0 = c.send(B, b"hi joiner");
    let r1 = c.send(B, &[0xa5; 100]);
    c.recv(A, r0, None, Ok(()));
    c.recv(A, r1, None, Ok(()));
    let m2 = c.send(A, b"third from the joiner");
    c.recv(B, m2, None, Ok(()));
    let r2 = c.send(B, b"third from the inviter");
    c.recv(A, r2, None, Ok(()));
    c.recv(A, r2, None, Err("duplicate"));
    c.recv(B, m0, None, Err("decrypt"));
    out.push(c.finish(
        "in order, both directions, from handshake.json case 0; then replays: one from the current \
         receiving chain is a duplicate, one from a retired chain whose keys are gone no longer \
         decrypts at all",
    ));

    // Case 1: out of order, skipped, late messages of an old chain.
    let mut rng = seeded(9);
    let (init, bob) = random_init(&mut rng);
    let mut c = Conversation::new(rng, init, bob);
    let m: Vec<usize> = (0..5u8).map(|i| c.send(A, &[b'a', b'0' + i])).collect();
    c.recv(B, m[3], None, Ok(()));
    c.recv(B, m[0], None, Ok(()));
    c.recv(B, m[4], None, Ok(()));
    c.recv(B, m[1], None, Ok(()));
    let r0 = c.send(B, b"reply");
    c.recv(A, r0, None, Ok(()));
    let n: Vec<usize> = (0..3u8).map(|i| c.send(A, &[b'b', b'0' + i])).collect();
    c.recv(B, n[2], None, Ok(()));
    c.recv(B, n[0], None, Ok(()));
    c.recv(B, m[4], None, Err("duplicate"));
    c.recv(B, m[2], None, Ok(()));
    c.recv(B, n[1], None, Ok(()));
    c.recv(B, n[1], None, Err("duplicate"));
    c.recv(B, m[0], None, Err("decrypt"));
    out.push(c.finish(
        "out of order: the responder receives 3, 0, 4, 1 of the first chain, replies, then gets a \
         new chain's 2 and 0 before the old chain's 2 arrives late; replays are refused",
    ));

    // Case 2: the lost tail of a chain is recovered through pn.
    let mut rng = seeded(10);
    let (init, bob) = random_init(&mut rng);
    let mut c = Conversation::new(rng, init, bob);
    let m0 = c.send(A, b"first");
    let m1 = c.send(A, b"second, delayed");
    c.recv(B, m0, None, Ok(()));
    let r0 = c.send(B, b"reply");
    c.recv(A, r0, None, Ok(()));
    let m2 = c.send(A, b"new chain, pn = 2");
    c.recv(B, m2, None, Ok(()));
    c.recv(B, m1, None, Ok(()));
    out.push(c.finish(
        "a new chain's header carries pn = 2, so the receiver keeps the key of the previous \
         chain's undelivered message 1, which then arrives",
    ));

    // Case 3: errors leave the state unchanged.
    let mut rng = seeded(11);
    let (init, bob) = random_init(&mut rng);
    let mut c = Conversation::new(rng, init, bob);
    let m0 = c.send(A, b"tamper with me");
    let len = ratchet_len(14);
    c.recv(B, m0, xor(0, 0x01), Err("decrypt"));
    c.recv(B, m0, xor(30, 0x80), Err("decrypt"));
    c.recv(B, m0, xor(79, 0x01), Err("decrypt"));
    c.recv(B, m0, xor(85, 0x10), Err("decrypt"));
    c.recv(B, m0, xor(len - 1, 0x01), Err("decrypt"));
    c.recv(
        B,
        m0,
        Some(Mutation::Truncate { len: len - 1 }),
        Err("decrypt"),
    );
    c.recv(B, m0, Some(Mutation::Truncate { len: 95 }), Err("decrypt"));
    c.recv(
        B,
        m0,
        Some(Mutation::Append { hex: "00".into() }),
        Err("decrypt"),
    );
    c.recv(B, m0, None, Ok(()));
    let r0 = c.send(B, b"ok");
    c.recv(A, r0, xor(40, 0x02), Err("decrypt"));
    c.recv(A, r0, None, Ok(()));
    out.push(c.finish(
        "a flipped bit in the header nonce, the encrypted header, the header tag, the body or the \
         body tag, a truncated, too short or extended message: each is refused and the state is \
         unchanged, so the genuine message still decrypts",
    ));

    // Case 4: the skip limit, exactly at and just past MAX_SKIP = 1000.
    let mut rng = seeded(12);
    let (init, bob) = random_init(&mut rng);
    let mut c = Conversation::new(rng, init, bob);
    c.lose(A, 1000);
    let m0 = c.send(A, b"n = 1000: exactly 1000 skipped");
    c.recv(B, m0, None, Ok(()));
    c.lose(A, 1001);
    let m1 = c.send(A, b"n = 2002: 1001 skipped, too many");
    c.recv(B, m1, None, Err("too_many_skipped"));
    out.push(c.finish(
        "the receiver skips at most 1000 message keys in one step: n = 1000 as the first message \
         is accepted, a gap of 1001 is refused",
    ));

    // Case 5: downgrade refusal, and skipped messages across KEM steps.
    let mut rng = seeded(20);
    let (init, bob) = random_init(&mut rng);
    let mut c = Conversation::new(rng, init, bob);
    let m0 = c.send(A, b"hello with my encapsulation key");
    let before = view(&c.parties[B]);
    c.recv(B, m0, None, Ok(()));
    let f = c.forge_classical_answer(&before, m0, b"an answer without a ciphertext");
    c.recv(A, f, None, Err("downgrade"));
    let r: Vec<usize> = (0..3u8).map(|i| c.send(B, &[b'r', b'0' + i])).collect();
    c.recv(A, r[2], None, Ok(()));
    let n: Vec<usize> = (0..2u8).map(|i| c.send(A, &[b'n', b'0' + i])).collect();
    c.recv(B, n[1], None, Ok(()));
    let q = c.send(B, b"third KEM step");
    c.recv(A, q, None, Ok(()));
    c.recv(A, r[0], None, Ok(()));
    c.recv(B, n[0], None, Ok(()));
    c.recv(A, r[1], None, Ok(()));
    out.push(c.finish(
        "a responder's answer whose header carries no ML-KEM ciphertext, although the initiator \
         published its encapsulation key, is refused as a downgrade (state unchanged); then \
         messages skipped across three hybrid steps (each chain's first message lost, later \
         ones first) all decrypt late",
    ));
    out
}

fn ratchet_len(plaintext_len: usize) -> usize {
    tern::proto::ratchet::message_len(plaintext_len)
}

// ---------------------------------------------------------------------------
// envelope.json and envelope_chain.json
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvelopeFields {
    pub version: u8,
    pub kind: u8,
    pub id: String,
    pub seq: u64,
    pub prev: String,
    pub sent_at_ms: u64,
    pub body: Padded,
}

impl EnvelopeFields {
    pub fn of(e: &Envelope) -> Self {
        Self {
            version: e.version,
            kind: e.kind.code(),
            id: hex(&e.id),
            seq: e.seq,
            prev: hex(&e.prev),
            sent_at_ms: e.sent_at_ms,
            body: Padded::of(&e.body),
        }
    }

    pub fn to_envelope(&self) -> Envelope {
        Envelope {
            version: self.version,
            kind: Kind::from_code(self.kind),
            id: arr(&self.id),
            seq: self.seq,
            prev: arr(&self.prev),
            sent_at_ms: self.sent_at_ms,
            body: self.body.bytes(),
        }
    }

    /// The encoding without padding, built field by field.
    pub fn unpadded(&self) -> Vec<u8> {
        let body = self.body.bytes();
        let mut v = vec![self.version, self.kind];
        v.extend(unhex(&self.id));
        v.extend(self.seq.to_be_bytes());
        v.extend(unhex(&self.prev));
        v.extend(self.sent_at_ms.to_be_bytes());
        v.extend((body.len() as u32).to_be_bytes());
        v.extend(body);
        v
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvelopeCase {
    pub comment: String,
    pub result: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envelope: Option<EnvelopeFields>,
    /// Valid: the padded encoding. Invalid: input that must not decode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoded: Option<Padded>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain_hash: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn gen_envelope() -> Vec<EnvelopeCase> {
    let mut rng = seeded(13);
    let mut out = Vec::new();
    let mut valid = |comment: String, e: Envelope| {
        let enc = e.encode().unwrap();
        assert_eq!(enc.len(), ENVELOPE_LEN);
        assert_eq!(Envelope::decode(&enc).unwrap(), e);
        let f = EnvelopeFields::of(&e);
        assert_eq!(&enc[..f.unpadded().len()], &f.unpadded()[..]);
        let h = e.chain_hash();
        assert_eq!(h, refc::chain_hash(&f.unpadded()));
        out.push(EnvelopeCase {
            comment,
            result: "valid".into(),
            envelope: Some(f),
            encoded: Some(Padded::of(&enc)),
            chain_hash: o(&h),
            error: None,
        });
    };
    let mut sender = ChainSender::default();
    let t0 = 1_767_225_600_000u64;
    for (i, text) in [
        "first message",
        "second: prev is the first's chain hash",
        "ünïcödé ✓",
    ]
    .iter()
    .enumerate()
    {
        let e = sender
            .next(
                1,
                Kind::Text,
                random(&mut rng),
                t0 + 1000 * i as u64,
                text.as_bytes().to_vec(),
            )
            .unwrap();
        valid(
            format!("text envelope {} of a chain built by a sender", i + 1),
            e,
        );
    }
    let profile = Profile {
        name: "Ada".into(),
        status: "around".into(),
        avatar: None,
    };
    let others: Vec<(&str, Kind, Vec<u8>)> = vec![
        (
            "a profile update (kind 2)",
            Kind::Profile,
            profile.to_bytes(),
        ),
        (
            "a control message (kind 3)",
            Kind::Control,
            b"{\"op\":\"x\"}".to_vec(),
        ),
        (
            "a receipt (kind 4)",
            Kind::Receipt,
            random_vec(&mut rng, 16),
        ),
        ("hello (kind 5)", Kind::Hello, random_vec(&mut rng, 40)),
        (
            "hello-reply (kind 6)",
            Kind::HelloReply,
            random_vec(&mut rng, 40),
        ),
        ("confirm (kind 7), empty body", Kind::Confirm, vec![]),
        (
            "an unknown kind (42) decodes and is kept",
            Kind::Unknown(42),
            b"from the future".to_vec(),
        ),
        (
            "kind 0 is unknown too, not an error",
            Kind::Unknown(0),
            vec![1],
        ),
    ];
    for (comment, kind, body) in others {
        let seq = 1 + u64::from(rng.next_u32() % 1000);
        let e = Envelope {
            version: 1,
            kind,
            id: random(&mut rng),
            seq,
            prev: random(&mut rng),
            sent_at_ms: t0 + u64::from(rng.next_u32()),
            body,
        };
        valid(comment.into(), e);
    }
    let big = Envelope {
        version: 1,
        kind: Kind::Text,
        id: [0xff; 16],
        seq: u64::MAX,
        prev: [0xff; 32],
        sent_at_ms: u64::MAX,
        body: [vec![1], vec![0; MAX_BODY_LEN - 1]].concat(),
    };
    valid(
        "the largest body, no padding left; extreme field values".into(),
        big.clone(),
    );
    let good = out[0].encoded.as_ref().unwrap().bytes();
    let with = |at: usize, v: u8| {
        let mut b = good.clone();
        b[at] = v;
        b
    };
    let body_len_at = 1 + 1 + 16 + 8 + 32 + 8;
    let with_len = |n: u32| {
        let mut b = good.clone();
        b[body_len_at..body_len_at + 4].copy_from_slice(&n.to_be_bytes());
        b
    };
    let invalid: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "one byte short",
            good[..ENVELOPE_LEN - 1].to_vec(),
            "invalid: envelope length",
        ),
        (
            "one byte too long",
            [good.clone(), vec![0]].concat(),
            "invalid: envelope length",
        ),
        ("version 0", with(0, 0), "invalid: envelope version"),
        ("version 2", with(0, 2), "unsupported_version"),
        (
            "sequence number 0",
            {
                let mut b = good.clone();
                b[18..26].fill(0);
                b
            },
            "invalid: sequence number 0",
        ),
        (
            "a body length one past the end",
            with_len((MAX_BODY_LEN + 1) as u32),
            "truncated",
        ),
        ("a body length of 2^32 - 1", with_len(u32::MAX), "truncated"),
        (
            "a body length one short: a non-zero byte is left in the padding",
            with_len(12),
            "bad_padding",
        ),
        (
            "a non-zero padding byte right after the body",
            with(body_len_at + 4 + 13, 0x80),
            "bad_padding",
        ),
    ];
    for (comment, b, err) in invalid {
        expect_err(Envelope::decode(&b), proto_err, err, comment);
        out.push(EnvelopeCase {
            comment: comment.into(),
            result: "invalid".into(),
            envelope: None,
            encoded: Some(Padded::of(&b)),
            chain_hash: None,
            error: Some(err.into()),
        });
    }
    let too_long = Envelope {
        body: vec![0; MAX_BODY_LEN + 1],
        ..big
    };
    expect_err(too_long.encode(), proto_err, "too_long", "encode");
    out.push(EnvelopeCase {
        comment: "a body one byte longer than the maximum cannot be encoded".into(),
        result: "invalid".into(),
        envelope: Some(EnvelopeFields::of(&too_long)),
        encoded: None,
        chain_hash: None,
        error: Some("too_long".into()),
    });
    out
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChainEnvelope {
    pub envelope: EnvelopeFields,
    pub chain_hash: String,
    /// Not made by the sender: a relay's or attacker's substitute.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub forged: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChainStep {
    pub envelope: usize,
    /// in_order, gap, late, duplicate or mismatch.
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missing: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChainCase {
    pub comment: String,
    pub envelopes: Vec<ChainEnvelope>,
    pub steps: Vec<ChainStep>,
    /// Envelopes known missing after the last step.
    pub missing_after: u64,
}

pub fn chain_status_name(s: &Result<ChainStatus, ChainError>) -> (String, Option<u64>) {
    match s {
        Ok(ChainStatus::InOrder) => ("in_order".into(), None),
        Ok(ChainStatus::Gap { missing }) => ("gap".into(), Some(*missing)),
        Ok(ChainStatus::Late) => ("late".into(), None),
        Err(ChainError::Duplicate) => ("duplicate".into(), None),
        Err(ChainError::Mismatch) => ("mismatch".into(), None),
    }
}

fn gen_envelope_chain() -> Vec<ChainCase> {
    let mut rng = seeded(14);
    let mut out = Vec::new();
    let mut scenario = |rng: &mut StdRng,
                        comment: &str,
                        n: usize,
                        forge: &dyn Fn(&[Envelope]) -> Vec<Envelope>,
                        order: &[usize]| {
        let mut s = ChainSender::default();
        let mut envs: Vec<Envelope> = (0..n)
            .map(|i| {
                s.next(
                    1,
                    Kind::Text,
                    random(rng),
                    1000 + i as u64,
                    vec![b'a' + i as u8; i],
                )
                .unwrap()
            })
            .collect();
        let genuine = envs.len();
        envs.extend(forge(&envs));
        let mut r = ChainReceiver::default();
        let steps = order
            .iter()
            .map(|&i| {
                let st = r.check(&envs[i]);
                if st.is_ok() {
                    r.record(&envs[i]);
                }
                let (status, missing) = chain_status_name(&st);
                ChainStep {
                    envelope: i,
                    status,
                    missing,
                }
            })
            .collect();
        out.push(ChainCase {
            comment: comment.into(),
            envelopes: envs
                .iter()
                .enumerate()
                .map(|(i, e)| ChainEnvelope {
                    envelope: EnvelopeFields::of(e),
                    chain_hash: hex(&e.chain_hash()),
                    forged: i >= genuine,
                })
                .collect(),
            steps,
            missing_after: r.missing(),
        });
    };
    scenario(
        &mut rng,
        "in order, a duplicate, a gap filled late, a forged envelope 3 whose prev does not link to 2",
        5,
        &|e| {
            let mut f = e[2].clone();
            f.prev = [9; 32];
            vec![f]
        },
        &[0, 0, 3, 1, 5, 2, 4],
    );
    scenario(
        &mut rng,
        "the first envelope must have an all-zero prev; starting with seq 3 reports a gap of 2",
        3,
        &|e| {
            let mut f = e[0].clone();
            f.prev = [1; 32];
            vec![f]
        },
        &[3, 2, 0, 1, 2],
    );
    scenario(
        &mut rng,
        "a substitute for envelope 2 that links to 1 but is not the one envelope 3 links to",
        4,
        &|e| {
            let mut f = e[1].clone();
            f.body = b"substituted".to_vec();
            vec![f]
        },
        &[0, 2, 4, 1, 3],
    );
    out
}

// ---------------------------------------------------------------------------
// queue_layer.json
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct QueueCase {
    pub comment: String,
    pub result: String,
    /// "message" or "conn_request".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_secret: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sender_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub joiner_identity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub joiner_ephemeral: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ratchet_message: Option<Padded>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_message: Option<Padded>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub of_case: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mutation: Option<Mutation>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn gen_queue_layer() -> Vec<QueueCase> {
    let mut rng = seeded(15);
    let mut out = Vec::new();
    let secret: [u8; 32] = random(&mut rng);
    let other_secret: [u8; 32] = random(&mut rng);
    let ids: [[u8; 16]; 2] = [random(&mut rng), random(&mut rng)];
    let mut rm = random_vec(&mut rng, 48);
    rm.resize(RATCHET_MSG_LEN, 0);
    for (i, id) in ids.iter().enumerate() {
        let nonce: [u8; 24] = random(&mut rng);
        let mut frng = FixedRng::new(&nonce);
        let qm = queue_msg::seal_message(&Secret32(secret), id, &rm, &mut frng);
        frng.assert_used_up("seal_message");
        let key = refc::queue_key(&secret, id);
        assert_eq!(refc::queue_seal(&key, &nonce, &rm, QUEUE_MSG_LEN), qm);
        out.push(QueueCase {
            comment: if i == 0 {
                "a ratchet message under the queue layer (the ratchet message is a placeholder of the right length: this layer never looks inside)".into()
            } else {
                "the same ratchet message for another queue of the same connection: no byte in common but the type".into()
            },
            result: "valid".into(),
            kind: Some("message".into()),
            connection_secret: o(&secret),
            sender_id: o(id),
            queue_key: o(&key),
            nonce: o(&nonce),
            ratchet_message: Some(Padded::of(&rm)),
            digest: o(&queue_msg::digest(&rm)),
            queue_message: Some(Padded::of(&qm)),
            ..Default::default()
        });
    }
    let j = public_of(&random(&mut rng));
    let e = public_of(&random(&mut rng));
    let cr = queue_msg::conn_request(&j, &e, &rm);
    assert_eq!(queue_msg::digest(&rm), refc::digest(&rm));
    out.push(QueueCase {
        comment: "a connection request: J, E and the first ratchet message, in the clear".into(),
        result: "valid".into(),
        kind: Some("conn_request".into()),
        joiner_identity: o(&j),
        joiner_ephemeral: o(&e),
        ratchet_message: Some(Padded::of(&rm)),
        digest: o(&refc::digest(&rm)),
        queue_message: Some(Padded::of(&cr)),
        ..Default::default()
    });

    let sealed_end = 1 + 24 + RATCHET_MSG_LEN + 16;
    // (comment, of_case, mutation, connection secret, sender id, error)
    type Invalid<'a> = (
        &'a str,
        usize,
        Option<Mutation>,
        Option<Key>,
        Option<Id>,
        &'a str,
    );
    let invalid: Vec<Invalid> = vec![
        (
            "type 0x05 does not exist",
            0,
            xor(0, 0x07),
            None,
            None,
            "unknown_type",
        ),
        (
            "type 0x00 does not exist",
            0,
            xor(0, 0x02),
            None,
            None,
            "unknown_type",
        ),
        (
            "a non-zero padding byte after the tag",
            0,
            xor(QUEUE_MSG_LEN - 1, 0x01),
            None,
            None,
            "bad_padding",
        ),
        (
            "a non-zero padding byte after a connection request",
            2,
            xor(1 + 64 + RATCHET_MSG_LEN, 0x01),
            None,
            None,
            "bad_padding",
        ),
        (
            "one byte short",
            0,
            Some(Mutation::Truncate {
                len: QUEUE_MSG_LEN - 1,
            }),
            None,
            None,
            "invalid: queue message length",
        ),
        (
            "one byte too many",
            2,
            Some(Mutation::Append { hex: "00".into() }),
            None,
            None,
            "invalid: queue message length",
        ),
        (
            "a flipped bit in the nonce",
            0,
            xor(5, 0x01),
            None,
            None,
            "decrypt",
        ),
        (
            "a flipped bit in the ciphertext",
            0,
            xor(5000, 0x20),
            None,
            None,
            "decrypt",
        ),
        (
            "a flipped bit in the tag",
            0,
            xor(sealed_end - 1, 0x01),
            None,
            None,
            "decrypt",
        ),
        (
            "opened as if it came through the other queue (case 1's sender id)",
            0,
            None,
            None,
            Some(ids[1]),
            "decrypt",
        ),
        (
            "opened with another connection's secret",
            0,
            None,
            Some(other_secret),
            None,
            "decrypt",
        ),
    ];
    for (comment, of, mutation, cs, sid, err) in invalid {
        let base = out[of].queue_message.as_ref().unwrap().bytes();
        let input = mutation.as_ref().map_or(base.clone(), |m| m.apply(&base));
        let cs_ = cs.unwrap_or(secret);
        let sid_ = sid.unwrap_or(ids[0]);
        let got = queue_msg::parse(&input).and_then(|p| match p {
            QueueMessage::Message { sealed } => {
                queue_msg::open_message(&Secret32(cs_), &sid_, &sealed).map(|_| ())
            }
            QueueMessage::ConnRequest { .. } => Ok(()),
            QueueMessage::Resync { kind, sealed } => {
                queue_msg::open_sealed(&Secret32(cs_), &sid_, kind, &sealed).map(|_| ())
            }
        });
        expect_err(got, proto_err, err, comment);
        out.push(QueueCase {
            comment: comment.into(),
            result: "invalid".into(),
            connection_secret: cs.map(|c| hex(&c)),
            sender_id: sid.map(|s| hex(&s)),
            of_case: Some(of),
            mutation,
            error: Some(err.into()),
            ..Default::default()
        });
    }
    out
}

// ---------------------------------------------------------------------------
// delivery.json
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct DeliveryCase {
    pub comment: String,
    pub result: String,
    /// The relay's per-queue X25519 secret and the recipient's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_secret: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_public: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipient_secret: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipient_public: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_secret: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub msg_id: Option<String>,
    /// HKDF output: ChaCha20-Poly1305 key and nonce.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<Padded>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ciphertext: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub of_case: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mutation: Option<Mutation>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn gen_delivery() -> Vec<DeliveryCase> {
    let mut rng = seeded(16);
    let mut out = Vec::new();
    let mut full = vec![0x02];
    full.extend(random_vec(&mut rng, 100));
    full.resize(QUEUE_MSG_LEN, 0);
    let msgs: Vec<(&str, Vec<u8>)> = vec![
        ("a short message", b"hello, recipient".to_vec()),
        ("an empty message: just the tag", vec![]),
        ("a full queue message, as the relay delivers it", full),
    ];
    for (comment, msg) in msgs {
        let rs: [u8; 32] = random(&mut rng);
        let cs: [u8; 32] = random(&mut rng);
        let (rp, cp) = (public_of(&rs), public_of(&cs));
        let qs = delivery::queue_secret(&x25519_dalek::StaticSecret::from(rs), &cp).unwrap();
        let qs2 = delivery::queue_secret(&x25519_dalek::StaticSecret::from(cs), &rp).unwrap();
        assert_eq!(*qs, *qs2);
        assert_eq!(*qs, refc::x25519(&rs, &cp));
        let msg_id: [u8; 16] = random(&mut rng);
        let ct = delivery::delivery_seal(&qs, &msg_id, &msg);
        let (key, nonce) = refc::delivery_cipher(&qs, &msg_id);
        assert_eq!(refc::chacha_seal(&key, &nonce, &msg_id, &msg), ct);
        out.push(DeliveryCase {
            comment: comment.into(),
            result: "valid".into(),
            relay_secret: o(&rs),
            relay_public: o(&rp),
            recipient_secret: o(&cs),
            recipient_public: o(&cp),
            queue_secret: o(&qs[..]),
            msg_id: o(&msg_id),
            key: o(&key),
            nonce: o(&nonce),
            message: Some(Padded::of(&msg)),
            ciphertext: o(&ct),
            ..Default::default()
        });
    }
    let other_id: [u8; 16] = random(&mut rng);
    let other_qs: [u8; 32] = random(&mut rng);
    // (comment, of_case, mutation, msg id, queue secret, error)
    type Invalid<'a> = (
        &'a str,
        usize,
        Option<Mutation>,
        Option<Id>,
        Option<Key>,
        &'a str,
    );
    let invalid: Vec<Invalid> = vec![
        (
            "opened under another message id",
            0,
            None,
            Some(other_id),
            None,
            "open",
        ),
        (
            "opened with another queue's secret",
            0,
            None,
            None,
            Some(other_qs),
            "open",
        ),
        (
            "a flipped bit in the ciphertext",
            0,
            xor(0, 0x01),
            None,
            None,
            "open",
        ),
        (
            "a flipped bit in the tag",
            2,
            xor(QUEUE_MSG_LEN + 15, 0x80),
            None,
            None,
            "open",
        ),
        (
            "shorter than a tag",
            1,
            Some(Mutation::Truncate { len: 15 }),
            None,
            None,
            "open",
        ),
        (
            "empty",
            1,
            Some(Mutation::Truncate { len: 0 }),
            None,
            None,
            "open",
        ),
    ];
    for (comment, of, mutation, id, qs, err) in invalid {
        let base = &out[of];
        let ct = unhex(base.ciphertext.as_ref().unwrap());
        let input = mutation.as_ref().map_or(ct.clone(), |m| m.apply(&ct));
        let qs_ = qs.unwrap_or_else(|| arr(base.queue_secret.as_ref().unwrap()));
        let id_ = id.unwrap_or_else(|| arr(base.msg_id.as_ref().unwrap()));
        expect_err(
            delivery::delivery_open(&qs_, &id_, &input),
            delivery_err,
            err,
            comment,
        );
        out.push(DeliveryCase {
            comment: comment.into(),
            result: "invalid".into(),
            queue_secret: qs.map(|q| hex(&q)),
            msg_id: id.map(|i| hex(&i)),
            of_case: Some(of),
            mutation,
            error: Some(err.into()),
            ..Default::default()
        });
    }
    let rs: [u8; 32] = random(&mut rng);
    for (comment, p) in [
        (
            "a recipient key of order 8: the relay refuses the queue secret",
            LOW_ORDER_POINTS[2],
        ),
        (
            "a recipient key u = p (non-canonical zero)",
            NONCANONICAL_ZERO,
        ),
    ] {
        expect_err(
            delivery::queue_secret(&x25519_dalek::StaticSecret::from(rs), &p),
            delivery_err,
            "key_agreement",
            comment,
        );
        out.push(DeliveryCase {
            comment: comment.into(),
            result: "invalid".into(),
            relay_secret: o(&rs),
            recipient_public: o(&p),
            error: Some("key_agreement".into()),
            ..Default::default()
        });
    }
    out
}

// ---------------------------------------------------------------------------
// hello.json
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileFields {
    pub name: String,
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avatar: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HelloCase {
    pub comment: String,
    pub result: String,
    /// "hello" or "hello_reply".
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_version: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_version: Option<u8>,
    /// "screen" or "shared".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sender_keys: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reply_queues: Vec<QueueFields>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<ProfileFields>,
    pub encoded: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

pub fn channel_name(c: Channel) -> &'static str {
    match c {
        Channel::Screen => "screen",
        Channel::Shared => "shared",
    }
}

pub fn profile_of(p: &ProfileFields) -> Profile {
    Profile {
        name: p.name.clone(),
        status: p.status.clone(),
        avatar: p.avatar.as_deref().map(unhex),
    }
}

fn profile_fields(p: &Profile) -> ProfileFields {
    ProfileFields {
        name: p.name.clone(),
        status: p.status.clone(),
        avatar: p.avatar.as_deref().map(hex),
    }
}

fn gen_hello() -> Vec<HelloCase> {
    let mut rng = seeded(17);
    let mut out = Vec::new();
    let queues = |rng: &mut StdRng, n: usize| -> Vec<SendQueue> {
        (0..n)
            .map(|i| SendQueue {
                relay: format!("tern://{}@192.0.2.{}:5223", key_text(&random(rng)), 10 + i)
                    .parse()
                    .unwrap(),
                sender_id: random(rng),
            })
            .collect()
    };
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(random_vec(&mut rng, 24));
    let profiles = [
        Profile {
            name: "Ada".into(),
            status: String::new(),
            avatar: None,
        },
        Profile {
            name: "Grace Hopper ✓".into(),
            status: "at sea\nback Monday".into(),
            avatar: Some(png),
        },
    ];
    let hellos = [
        (
            "hello: one key, one reply queue, a minimal profile",
            Hello {
                min_version: 1,
                max_version: 1,
                channel: Channel::Screen,
                sender_keys: vec![random(&mut rng)],
                reply_queues: queues(&mut rng, 1),
                profile: profiles[0].clone(),
            },
        ),
        (
            "hello: three keys, two reply queues, a profile with status and PNG avatar",
            Hello {
                min_version: 1,
                max_version: 3,
                channel: Channel::Shared,
                sender_keys: vec![random(&mut rng), random(&mut rng), random(&mut rng)],
                reply_queues: queues(&mut rng, 2),
                profile: profiles[1].clone(),
            },
        ),
    ];
    let mut encoded = Vec::new();
    for (comment, h) in hellos {
        let b = h.encode();
        assert_eq!(Hello::decode(&b).unwrap(), h);
        encoded.push(b.clone());
        out.push(HelloCase {
            comment: comment.into(),
            result: "valid".into(),
            kind: "hello".into(),
            min_version: Some(h.min_version),
            max_version: Some(h.max_version),
            channel: Some(channel_name(h.channel).into()),
            sender_keys: h.sender_keys.iter().map(|k| hex(k)).collect(),
            reply_queues: h.reply_queues.iter().map(QueueFields::of).collect(),
            profile: Some(profile_fields(&h.profile)),
            encoded: hex(&b),
            error: None,
        });
    }
    let reply = HelloReply {
        min_version: 1,
        max_version: 1,
        channel: Channel::Screen,
        sender_keys: vec![random(&mut rng), random(&mut rng)],
        profile: profiles[1].clone(),
    };
    let rb = reply.encode();
    assert_eq!(HelloReply::decode(&rb).unwrap(), reply);
    out.push(HelloCase {
        comment: "hello-reply: two keys, one per reply queue".into(),
        result: "valid".into(),
        kind: "hello_reply".into(),
        min_version: Some(1),
        max_version: Some(1),
        channel: Some("screen".into()),
        sender_keys: reply.sender_keys.iter().map(|k| hex(k)).collect(),
        reply_queues: vec![],
        profile: Some(profile_fields(&reply.profile)),
        encoded: hex(&rb),
        error: None,
    });

    let h0 = &encoded[0];
    let with = |b: &[u8], at: usize, v: u8| {
        let mut b = b.to_vec();
        b[at] = v;
        b
    };
    // hello 0: versions 0..2, channel 2, key count 3, key 4..36, queue count 36,
    // queue 37..92, profile 92..: name length 92.
    let name_at = 3 + 1 + 32 + 1 + 39 + 16;
    let with_name = |name: &[u8]| {
        let mut b = h0[..name_at].to_vec();
        b.push(name.len() as u8);
        b.extend_from_slice(name);
        b.extend_from_slice(&h0[name_at + 4..]);
        b
    };
    // The status (u16 length) follows the three-byte name "Ada".
    let with_status = |status: &[u8]| {
        let mut b = h0[..name_at + 4].to_vec();
        b.extend_from_slice(&(status.len() as u16).to_be_bytes());
        b.extend_from_slice(status);
        b.extend_from_slice(&h0[name_at + 6..]);
        b
    };
    const NAME_RULE: &str =
        "invalid: profile name: 1 to 64 bytes, not only white space, no control or format characters";
    const STATUS_RULE: &str =
        "invalid: profile status: up to 512 bytes, no control or format characters but line feeds";
    let mut gif = h0[..h0.len() - 4].to_vec();
    gif.extend_from_slice(&6u32.to_be_bytes());
    gif.extend_from_slice(b"GIF89a");
    let invalid: Vec<(&str, &str, Vec<u8>, &str)> = vec![
        (
            "hello",
            "min_version 0",
            with(h0, 0, 0),
            "invalid: version range",
        ),
        (
            "hello",
            "min_version above max_version",
            with(h0, 0, 2),
            "invalid: version range",
        ),
        ("hello", "channel 0", with(h0, 2, 0), "invalid: channel"),
        ("hello", "channel 3", with(h0, 2, 3), "invalid: channel"),
        (
            "hello",
            "no sender keys",
            with(h0, 3, 0),
            "invalid: key count",
        ),
        (
            "hello",
            "four sender keys",
            with(h0, 3, 4),
            "invalid: key count",
        ),
        (
            "hello",
            "no reply queues",
            with(h0, 36, 0),
            "invalid: queue count",
        ),
        (
            "hello",
            "an empty name",
            with_name(b""),
            "invalid: profile name: 1 to 64 bytes, not only white space, no control or format characters",
        ),
        (
            "hello",
            "a name of spaces only",
            with_name(b"   "),
            "invalid: profile name: 1 to 64 bytes, not only white space, no control or format characters",
        ),
        (
            "hello",
            "a name with a control character",
            with_name(b"A\x07"),
            "invalid: profile name: 1 to 64 bytes, not only white space, no control or format characters",
        ),
        (
            "hello",
            "a name of 65 bytes",
            with_name(&[b'n'; 65]),
            "invalid: profile name: 1 to 64 bytes, not only white space, no control or format characters",
        ),
        (
            "hello",
            "a name with a C1 control (U+0085)",
            with_name("Ada\u{85}".as_bytes()),
            NAME_RULE,
        ),
        (
            "hello",
            "a name with DEL",
            with_name(b"Ada\x7f"),
            NAME_RULE,
        ),
        (
            "hello",
            "a name with a right-to-left override (U+202E, category Cf)",
            with_name("\u{202E}adA".as_bytes()),
            NAME_RULE,
        ),
        (
            "hello",
            "a name with a first-strong isolate (U+2068)",
            with_name("Ada\u{2068}".as_bytes()),
            NAME_RULE,
        ),
        (
            "hello",
            "a name with a zero-width space (U+200B, category Cf)",
            with_name("Ad\u{200B}a".as_bytes()),
            NAME_RULE,
        ),
        (
            "hello",
            "a name with a line separator (U+2028, category Zl)",
            with_name("Ada\u{2028}".as_bytes()),
            NAME_RULE,
        ),
        (
            "hello",
            "a name of ideographic spaces only (U+3000, White_Space)",
            with_name("\u{3000}\u{3000}".as_bytes()),
            NAME_RULE,
        ),
        (
            "hello",
            "a status with an escape sequence",
            with_status(b"\x1b[2J"),
            STATUS_RULE,
        ),
        (
            "hello",
            "a status with a carriage return",
            with_status(b"away\rAda: hi"),
            STATUS_RULE,
        ),
        (
            "hello",
            "a status with a left-to-right isolate (U+2066)",
            with_status("\u{2066}away".as_bytes()),
            STATUS_RULE,
        ),
        (
            "hello",
            "a name that is not UTF-8",
            with_name(b"\xc3("),
            "invalid: UTF-8 text",
        ),
        (
            "hello",
            "a GIF avatar",
            gif,
            "invalid: avatar: a PNG or JPEG of at most 11 KiB",
        ),
        (
            "hello",
            "a trailing byte",
            [h0.clone(), vec![0]].concat(),
            "trailing",
        ),
        (
            "hello",
            "truncated",
            h0[..h0.len() - 1].to_vec(),
            "truncated",
        ),
        (
            "hello_reply",
            "a hello-reply cut inside its keys",
            rb[..40].to_vec(),
            "truncated",
        ),
    ];
    for (kind, comment, b, err) in invalid {
        if kind == "hello" {
            expect_err(Hello::decode(&b), proto_err, err, comment);
        } else {
            expect_err(HelloReply::decode(&b), proto_err, err, comment);
        }
        out.push(HelloCase {
            comment: comment.into(),
            result: "invalid".into(),
            kind: kind.into(),
            min_version: None,
            max_version: None,
            channel: None,
            sender_keys: vec![],
            reply_queues: vec![],
            profile: None,
            encoded: hex(&b),
            error: Some(err.into()),
        });
    }
    out
}

// ---------------------------------------------------------------------------
// device.json
// ---------------------------------------------------------------------------

/// A field a case must state for its message type.
pub fn need<'a, T>(v: &'a Option<T>, what: &str, of: &str) -> &'a T {
    v.as_ref().unwrap_or_else(|| panic!("{of}: missing {what}"))
}

/// One history entry of HISTORY or COPY (PROTOCOL.md §12.3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntryFields {
    /// "from_contact" (direction byte 1) or "from_person" (2).
    pub direction: String,
    pub envelope_id: String,
    pub sent_at_ms: u64,
    /// 0: not known.
    pub received_at_ms: u64,
    pub text: String,
}

impl EntryFields {
    pub fn of(e: &Entry) -> Self {
        Self {
            direction: if e.incoming {
                "from_contact"
            } else {
                "from_person"
            }
            .into(),
            envelope_id: hex(&e.id),
            sent_at_ms: e.sent_at_ms,
            received_at_ms: e.received_at_ms,
            text: e.text.clone(),
        }
    }

    pub fn to_entry(&self) -> Entry {
        Entry {
            incoming: match self.direction.as_str() {
                "from_contact" => true,
                "from_person" => false,
                d => panic!("direction {d}"),
            },
            id: arr(&self.envelope_id),
            sent_at_ms: self.sent_at_ms,
            received_at_ms: self.received_at_ms,
            text: self.text.clone(),
        }
    }
}

/// One receiving queue named by ANNOUNCE.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantFields {
    /// The relay in canonical text form, with its access key if any (the
    /// body carries the binary form, §3.1.2).
    pub relay: String,
    pub recipient_id: String,
    pub recipient_auth_seed: String,
}

impl GrantFields {
    pub fn of(q: &QueueGrant) -> Self {
        Self {
            relay: q.relay.to_string(),
            recipient_id: hex(&q.recipient_id),
            recipient_auth_seed: hex(q.auth.as_bytes()),
        }
    }

    pub fn to_grant(&self) -> QueueGrant {
        QueueGrant {
            relay: self.relay.parse().expect("relay address"),
            recipient_id: arr(&self.recipient_id),
            auth: Secret32(arr(&self.recipient_auth_seed)),
        }
    }
}

/// A device message's fields: `type` and those of its row in PROTOCOL.md
/// §12.3, nothing else. Byte strings in hex; an invitation (ADD, OFFER) and a
/// profile (SETTINGS) by their own fields, the body holding their binary forms.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct DeviceMsgFields {
    /// ADD, DROP, ADDED, SETTINGS, GROUP, SIBLING, OFFER, HISTORY, COPY,
    /// ANNOUNCE, REMOVED, PROFILE or FORGET.
    #[serde(rename = "type")]
    pub msg_type: String,
    /// GROUP, HISTORY, COPY, FORGET; ANNOUNCE of a connection with a contact.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// SIBLING.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// OFFER.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
    /// ADD, GROUP, SIBLING.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// ADD, GROUP, OFFER.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub introduce: Option<bool>,
    /// GROUP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub members: Option<Vec<String>>,
    /// ADD, OFFER: a contact invitation (kind 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invitation: Option<InvitationFields>,
    /// SETTINGS, PROFILE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<ProfileFields>,
    /// SETTINGS: relays in text form, with their access keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relays: Option<Vec<String>>,
    /// SETTINGS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotate_days: Option<u32>,
    /// DROP, ADDED, ANNOUNCE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// ADDED: SHA-256("tern/v1 device added" || the ADD's invitation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// ANNOUNCE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queues: Option<Vec<GrantFields>>,
    /// HISTORY.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entries: Option<Vec<EntryFields>>,
    /// COPY.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry: Option<EntryFields>,
    /// REMOVED.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprints: Option<Vec<String>>,
}

fn ids<const N: usize>(v: &[[u8; N]]) -> Option<Vec<String>> {
    Some(v.iter().map(|x| hex(x)).collect())
}

impl DeviceMsgFields {
    pub fn of(m: &DeviceMsg) -> Self {
        let inv = |b: &[u8]| {
            Some(InvitationFields::of(
                &Invitation::decode(b).expect("kind 1"),
            ))
        };
        let t = |name: &str| name.to_string();
        match m {
            DeviceMsg::Add {
                name,
                introduce,
                invitation,
            } => Self {
                msg_type: t("ADD"),
                name: Some(name.clone()),
                introduce: Some(*introduce),
                invitation: inv(invitation),
                ..Default::default()
            },
            DeviceMsg::Drop { fingerprint } => Self {
                msg_type: t("DROP"),
                fingerprint: Some(hex(fingerprint)),
                ..Default::default()
            },
            DeviceMsg::Added { tag, fingerprint } => Self {
                msg_type: t("ADDED"),
                tag: Some(hex(tag)),
                fingerprint: Some(hex(fingerprint)),
                ..Default::default()
            },
            DeviceMsg::Settings {
                profile,
                relays,
                rotate_days,
            } => Self {
                msg_type: t("SETTINGS"),
                profile: Some(profile_fields(
                    &Profile::from_bytes(profile).expect("a §5.5 profile"),
                )),
                relays: Some(relays.iter().map(ToString::to_string).collect()),
                rotate_days: Some(*rotate_days),
                ..Default::default()
            },
            DeviceMsg::Group {
                group,
                name,
                introduce,
                members,
            } => Self {
                msg_type: t("GROUP"),
                group: Some(hex(group)),
                name: Some(name.clone()),
                introduce: Some(*introduce),
                members: ids(members),
                ..Default::default()
            },
            DeviceMsg::Sibling { device, name } => Self {
                msg_type: t("SIBLING"),
                device: Some(hex(device)),
                name: Some(name.clone()),
                ..Default::default()
            },
            DeviceMsg::Offer {
                via,
                introduce,
                invitation,
            } => Self {
                msg_type: t("OFFER"),
                via: Some(hex(via)),
                introduce: Some(*introduce),
                invitation: inv(invitation),
                ..Default::default()
            },
            DeviceMsg::History { group, entries } => Self {
                msg_type: t("HISTORY"),
                group: Some(hex(group)),
                entries: Some(entries.iter().map(EntryFields::of).collect()),
                ..Default::default()
            },
            DeviceMsg::Copy { group, entry } => Self {
                msg_type: t("COPY"),
                group: Some(hex(group)),
                entry: Some(EntryFields::of(entry)),
                ..Default::default()
            },
            DeviceMsg::Announce {
                group,
                fingerprint,
                queues,
            } => Self {
                msg_type: t("ANNOUNCE"),
                group: group.as_ref().map(|g| hex(g)),
                fingerprint: Some(hex(fingerprint)),
                queues: Some(queues.iter().map(GrantFields::of).collect()),
                ..Default::default()
            },
            DeviceMsg::Removed { fingerprints } => Self {
                msg_type: t("REMOVED"),
                fingerprints: ids(fingerprints),
                ..Default::default()
            },
            DeviceMsg::Profile { profile } => Self {
                msg_type: t("PROFILE"),
                profile: Some(profile_fields(
                    &Profile::from_bytes(profile).expect("a §5.5 profile"),
                )),
                ..Default::default()
            },
            DeviceMsg::Forget { group } => Self {
                msg_type: t("FORGET"),
                group: Some(hex(group)),
                ..Default::default()
            },
        }
    }

    pub fn to_msg(&self) -> DeviceMsg {
        let t = self.msg_type.as_str();
        let s = |v: &Option<String>, what: &str| need(v, what, t).clone();
        let b = |v: &Option<bool>, what: &str| *need(v, what, t);
        let inv = || {
            need(&self.invitation, "invitation", t)
                .to_invitation()
                .encode()
        };
        match t {
            "ADD" => DeviceMsg::Add {
                name: s(&self.name, "name"),
                introduce: b(&self.introduce, "introduce"),
                invitation: inv(),
            },
            "ADDED" => DeviceMsg::Added {
                tag: arr(&s(&self.tag, "tag")),
                fingerprint: arr(&s(&self.fingerprint, "fingerprint")),
            },
            "DROP" => DeviceMsg::Drop {
                fingerprint: arr(&s(&self.fingerprint, "fingerprint")),
            },
            "SETTINGS" => DeviceMsg::Settings {
                profile: profile_of(need(&self.profile, "profile", t)).to_bytes(),
                relays: need(&self.relays, "relays", t)
                    .iter()
                    .map(|r| r.parse().expect("relay address"))
                    .collect(),
                rotate_days: *need(&self.rotate_days, "rotate_days", t),
            },
            "GROUP" => DeviceMsg::Group {
                group: arr(&s(&self.group, "group")),
                name: s(&self.name, "name"),
                introduce: b(&self.introduce, "introduce"),
                members: need(&self.members, "members", t)
                    .iter()
                    .map(|m| arr(m))
                    .collect(),
            },
            "SIBLING" => DeviceMsg::Sibling {
                device: arr(&s(&self.device, "device")),
                name: s(&self.name, "name"),
            },
            "OFFER" => DeviceMsg::Offer {
                via: arr(&s(&self.via, "via")),
                introduce: b(&self.introduce, "introduce"),
                invitation: inv(),
            },
            "HISTORY" => DeviceMsg::History {
                group: arr(&s(&self.group, "group")),
                entries: need(&self.entries, "entries", t)
                    .iter()
                    .map(EntryFields::to_entry)
                    .collect(),
            },
            "COPY" => DeviceMsg::Copy {
                group: arr(&s(&self.group, "group")),
                entry: need(&self.entry, "entry", t).to_entry(),
            },
            "ANNOUNCE" => DeviceMsg::Announce {
                group: self.group.as_deref().map(arr),
                fingerprint: arr(&s(&self.fingerprint, "fingerprint")),
                queues: need(&self.queues, "queues", t)
                    .iter()
                    .map(GrantFields::to_grant)
                    .collect(),
            },
            "REMOVED" => DeviceMsg::Removed {
                fingerprints: need(&self.fingerprints, "fingerprints", t)
                    .iter()
                    .map(|f| arr(f))
                    .collect(),
            },
            "PROFILE" => DeviceMsg::Profile {
                profile: profile_of(need(&self.profile, "profile", t)).to_bytes(),
            },
            "FORGET" => DeviceMsg::Forget {
                group: arr(&s(&self.group, "group")),
            },
            other => panic!("device message type {other}"),
        }
    }
}

/// PROTOCOL.md §12.3 built byte by byte from a case's fields, without tern's
/// encoders: the device message bodies and the encodings nested in them
/// (relay addresses §3.1.2, invitations §4.1, profiles §5.5). Only the text
/// form of relay addresses is read with tern's parser (relay_address.json
/// checks it). Counts are written as the fields give them, so an invalid case
/// can exceed a limit on purpose.
pub mod device_ref {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::{
        need, unhex, AddressFields, DeviceMsgFields, EntryFields, InvitationFields, ProfileFields,
    };

    pub fn s8(out: &mut Vec<u8>, b: &[u8]) {
        out.push(u8::try_from(b.len()).expect("s8: at most 255 bytes"));
        out.extend_from_slice(b);
    }

    pub fn s32(out: &mut Vec<u8>, b: &[u8]) {
        out.extend_from_slice(&u32::try_from(b.len()).unwrap().to_be_bytes());
        out.extend_from_slice(b);
    }

    fn fixed<const N: usize>(out: &mut Vec<u8>, h: &str) {
        let b = unhex(h);
        assert_eq!(b.len(), N, "{h}: expected {N} bytes");
        out.extend_from_slice(&b);
    }

    fn count(out: &mut Vec<u8>, n: usize) {
        out.push(u8::try_from(n).expect("u8 count"));
    }

    /// §3.1.2: flags (host kind, https, path, access key), host, port, key,
    /// path, access key.
    pub fn address(text: &str) -> Vec<u8> {
        let a = AddressFields::of(&text.parse().expect("relay address"));
        let (kind, host) = match a.host_kind.as_str() {
            "ipv4" => (0u8, a.host.parse::<Ipv4Addr>().unwrap().octets().to_vec()),
            "ipv6" => (1, a.host.parse::<Ipv6Addr>().unwrap().octets().to_vec()),
            "name" => {
                let mut v = Vec::new();
                s8(&mut v, a.host.as_bytes());
                (2, v)
            }
            k => panic!("host kind {k}"),
        };
        let flags = kind
            | u8::from(a.transport == "https") << 2
            | u8::from(!a.path.is_empty()) << 3
            | u8::from(a.access_key.is_some()) << 4;
        let mut out = vec![flags];
        out.extend(host);
        out.extend_from_slice(&a.port.to_be_bytes());
        fixed::<32>(&mut out, &a.key);
        if !a.path.is_empty() {
            s8(&mut out, a.path.as_bytes());
        }
        if let Some(k) = &a.access_key {
            s8(&mut out, k.as_bytes());
        }
        out
    }

    /// §4.1, version 1, with the given kind (1: contact invitation, 3: device
    /// link).
    pub fn invitation(i: &InvitationFields, kind: u8) -> Vec<u8> {
        let mut out = vec![1, kind];
        fixed::<32>(&mut out, &i.invitation_key);
        fixed::<32>(&mut out, &i.ratchet_key);
        count(&mut out, i.queues.len());
        for q in &i.queues {
            out.extend(address(&q.relay));
            fixed::<16>(&mut out, &q.sender_id);
        }
        out
    }

    /// §5.5: name (u8 length), status (u16 length), avatar (u32 length).
    pub fn profile(p: &ProfileFields) -> Vec<u8> {
        let mut out = Vec::new();
        s8(&mut out, p.name.as_bytes());
        out.extend_from_slice(&u16::try_from(p.status.len()).unwrap().to_be_bytes());
        out.extend_from_slice(p.status.as_bytes());
        s32(
            &mut out,
            &p.avatar.as_deref().map(unhex).unwrap_or_default(),
        );
        out
    }

    /// direction u8, envelope id [16], sent_at u64, received_at u64, text s32.
    pub fn entry(out: &mut Vec<u8>, e: &EntryFields) {
        out.push(match e.direction.as_str() {
            "from_contact" => 1,
            "from_person" => 2,
            d => panic!("direction {d}"),
        });
        fixed::<16>(out, &e.envelope_id);
        out.extend_from_slice(&e.sent_at_ms.to_be_bytes());
        out.extend_from_slice(&e.received_at_ms.to_be_bytes());
        s32(out, e.text.as_bytes());
    }

    pub fn type_byte(name: &str) -> u8 {
        match name {
            "ADD" => 0x01,
            "DROP" => 0x02,
            "ADDED" => 0x03,
            "SETTINGS" => 0x10,
            "GROUP" => 0x11,
            "SIBLING" => 0x12,
            "OFFER" => 0x13,
            "HISTORY" => 0x14,
            "COPY" => 0x15,
            "ANNOUNCE" => 0x16,
            "REMOVED" => 0x17,
            "PROFILE" => 0x18,
            "FORGET" => 0x19,
            t => panic!("device message type {t}"),
        }
    }

    /// The body of a device message (envelope kind 8), row by row of the
    /// table in §12.3.
    pub fn body(m: &DeviceMsgFields) -> Vec<u8> {
        let t = m.msg_type.as_str();
        let s = |v: &Option<String>, what: &str| need(v, what, t).clone();
        let flag = |v: &Option<bool>, what: &str| u8::from(*need(v, what, t));
        let mut o = vec![type_byte(t)];
        match t {
            "ADD" => {
                s8(&mut o, s(&m.name, "name").as_bytes());
                o.push(flag(&m.introduce, "introduce"));
                s32(&mut o, &invitation(need(&m.invitation, "invitation", t), 1));
            }
            "DROP" => fixed::<32>(&mut o, &s(&m.fingerprint, "fingerprint")),
            "ADDED" => {
                fixed::<32>(&mut o, &s(&m.tag, "tag"));
                fixed::<32>(&mut o, &s(&m.fingerprint, "fingerprint"));
            }
            "SETTINGS" => {
                s32(&mut o, &profile(need(&m.profile, "profile", t)));
                let relays = need(&m.relays, "relays", t);
                count(&mut o, relays.len());
                for r in relays {
                    o.extend_from_slice(&address(r));
                }
                o.extend_from_slice(&need(&m.rotate_days, "rotate_days", t).to_be_bytes());
            }
            "GROUP" => {
                fixed::<16>(&mut o, &s(&m.group, "group"));
                s8(&mut o, s(&m.name, "name").as_bytes());
                o.push(flag(&m.introduce, "introduce"));
                let members = need(&m.members, "members", t);
                count(&mut o, members.len());
                for id in members {
                    fixed::<16>(&mut o, id);
                }
            }
            "SIBLING" => {
                fixed::<16>(&mut o, &s(&m.device, "device"));
                s8(&mut o, s(&m.name, "name").as_bytes());
            }
            "OFFER" => {
                fixed::<16>(&mut o, &s(&m.via, "via"));
                o.push(flag(&m.introduce, "introduce"));
                s32(&mut o, &invitation(need(&m.invitation, "invitation", t), 1));
            }
            "HISTORY" => {
                fixed::<16>(&mut o, &s(&m.group, "group"));
                let entries = need(&m.entries, "entries", t);
                o.extend_from_slice(&u16::try_from(entries.len()).unwrap().to_be_bytes());
                for e in entries {
                    entry(&mut o, e);
                }
            }
            "COPY" => {
                fixed::<16>(&mut o, &s(&m.group, "group"));
                entry(&mut o, need(&m.entry, "entry", t));
            }
            "ANNOUNCE" => {
                match &m.group {
                    None => o.push(0),
                    Some(g) => {
                        o.push(1);
                        fixed::<16>(&mut o, g);
                    }
                }
                fixed::<32>(&mut o, &s(&m.fingerprint, "fingerprint"));
                let queues = need(&m.queues, "queues", t);
                count(&mut o, queues.len());
                for q in queues {
                    o.extend(address(&q.relay));
                    fixed::<16>(&mut o, &q.recipient_id);
                    fixed::<32>(&mut o, &q.recipient_auth_seed);
                }
            }
            "REMOVED" => {
                let fps = need(&m.fingerprints, "fingerprints", t);
                count(&mut o, fps.len());
                for f in fps {
                    fixed::<32>(&mut o, f);
                }
            }
            "PROFILE" => s32(&mut o, &profile(need(&m.profile, "profile", t))),
            "FORGET" => fixed::<16>(&mut o, &s(&m.group, "group")),
            _ => unreachable!("type_byte refused it"),
        }
        o
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct DeviceCase {
    pub comment: String,
    /// "fingerprint", "message" or "device_link".
    pub kind: String,
    pub result: String,
    /// fingerprint: a connection's transcript hash (§5.2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transcript: Option<String>,
    /// fingerprint: SHA-256("tern/v1 device fingerprint" || transcript).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// message, valid: the fields.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<DeviceMsgFields>,
    /// message: the body of the kind-8 envelope (valid: the encoding of
    /// `message`; invalid: input to refuse).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// device_link: the invitation's fields.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invitation: Option<InvitationFields>,
    /// device_link: the binary form, kind 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binary: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
    /// device_link: how a reader of contact invitations refuses it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contact_invitation_error: Option<String>,
    /// message, invalid: the error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn gen_device() -> Vec<DeviceCase> {
    let mut rng = seeded(18);
    let mut out = Vec::new();

    // (a) Fingerprints.
    let mut transcripts: Vec<(&str, [u8; 32])> = vec![
        ("an all-zero transcript", [0; 32]),
        ("an all-0xff transcript", [0xff; 32]),
    ];
    for _ in 0..2 {
        transcripts.push(("a random transcript", random(&mut rng)));
    }
    let mut fps = Vec::new();
    for (comment, th) in &transcripts {
        let fp = device::fingerprint(th);
        assert_eq!(
            fp,
            refc::sha256(&[b"tern/v1 device fingerprint", th]),
            "{comment}"
        );
        fps.push(fp);
        out.push(DeviceCase {
            comment: format!("fingerprint of {comment}"),
            kind: "fingerprint".into(),
            result: "valid".into(),
            transcript: Some(hex(th)),
            fingerprint: Some(hex(&fp)),
            ..Default::default()
        });
    }

    // (b) One valid body of every message type.
    let canon = |s: String| s.parse::<RelayAddress>().expect(&s).to_string();
    let k: Vec<String> = (0..8).map(|_| key_text(&random(&mut rng))).collect();
    let invitation = |rng: &mut StdRng, relays: &[String]| InvitationFields {
        invitation_key: hex(&refc::x25519_public(&random(rng))),
        ratchet_key: hex(&refc::x25519_public(&random(rng))),
        queues: relays
            .iter()
            .map(|r| QueueFields {
                relay: r.clone(),
                sender_id: hex(&random::<16>(rng)),
            })
            .collect(),
    };
    let inv_one = invitation(
        &mut rng,
        &[canon(format!("tern://{}@203.0.113.9:5223", k[0]))],
    );
    let inv_two = invitation(
        &mut rng,
        &[
            canon(format!("tern://{}@[2001:db8::7]:5223", k[1])),
            canon(format!("tern://{}@relay.example.org:9000", k[2])),
        ],
    );
    let group = hex(&random::<16>(&mut rng));
    let members = vec![hex(&random::<16>(&mut rng)), hex(&random::<16>(&mut rng))];
    let sibling = hex(&random::<16>(&mut rng));
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(random_vec(&mut rng, 16));
    let entries = vec![
        EntryFields {
            direction: "from_contact".into(),
            envelope_id: hex(&random::<16>(&mut rng)),
            sent_at_ms: 1_767_225_600_000,
            received_at_ms: 1_767_225_601_234,
            text: "héllo ✓".into(),
        },
        EntryFields {
            direction: "from_person".into(),
            envelope_id: hex(&random::<16>(&mut rng)),
            sent_at_ms: 1_767_225_660_000,
            received_at_ms: 0,
            text: "two lines\nof text".into(),
        },
    ];
    let copied = EntryFields {
        direction: "from_person".into(),
        envelope_id: hex(&random::<16>(&mut rng)),
        sent_at_ms: 1_767_225_720_000,
        received_at_ms: 1_767_225_720_000,
        text: "sent from the laptop".into(),
    };
    let grant = |rng: &mut StdRng, relay: String| GrantFields {
        relay: canon(relay),
        recipient_id: hex(&random::<16>(rng)),
        recipient_auth_seed: hex(&random::<32>(rng)),
    };
    let contact_queues = vec![
        grant(
            &mut rng,
            format!("tern://{}:op-Key_2024@192.0.2.10:5223", k[3]),
        ),
        grant(
            &mut rng,
            format!("tern+https://{}@[2001:db8::5]:8443/q", k[4]),
        ),
    ];
    let device_queues = vec![grant(
        &mut rng,
        format!("tern://{}:abc@relay.example.net:7000", k[5]),
    )];
    let msg = |t: &str| DeviceMsgFields {
        msg_type: t.into(),
        ..Default::default()
    };
    let messages: Vec<(&str, DeviceMsgFields)> = vec![
        (
            "ADD to another device of the person: the new device's name, introduce = 0, a one-queue invitation",
            DeviceMsgFields {
                name: Some("laptop".into()),
                introduce: Some(false),
                invitation: Some(inv_one.clone()),
                ..msg("ADD")
            },
        ),
        (
            "ADD to a contact: an empty name, introduce = 1, a two-queue invitation",
            DeviceMsgFields {
                name: Some(String::new()),
                introduce: Some(true),
                invitation: Some(inv_two.clone()),
                ..msg("ADD")
            },
        ),
        (
            "ADDED: the tag of the two-queue invitation of the ADD to a contact above, SHA-256(\"tern/v1 device added\" || invitation), and the fingerprint of the connection made from it (the second transcript above)",
            DeviceMsgFields {
                tag: Some(hex(&refc::sha256(&[
                    b"tern/v1 device added",
                    &device_ref::invitation(&inv_two, 1),
                ]))),
                fingerprint: Some(hex(&fps[1])),
                ..msg("ADDED")
            },
        ),
        (
            "DROP: the fingerprint of the third transcript above",
            DeviceMsgFields {
                fingerprint: Some(hex(&fps[2])),
                ..msg("DROP")
            },
        ),
        (
            "SETTINGS: a profile with status and PNG avatar, two relays (the first with an access key), rotation every 7 days; rotate_days comes once, after the last relay",
            DeviceMsgFields {
                profile: Some(ProfileFields {
                    name: "Ada Lovelace".into(),
                    status: "analyst\nengine".into(),
                    avatar: Some(hex(&png)),
                }),
                relays: Some(vec![
                    canon(format!("tern://{}:op-Key_2024@192.0.2.10:5223", k[3])),
                    canon(format!("tern+https://{}@relay.example.org/tern", k[6])),
                ]),
                rotate_days: Some(7),
                ..msg("SETTINGS")
            },
        ),
        (
            "GROUP: a contact with two member connections, introduce = 1 (no code, no verified flag: those never come from another device, §12.7)",
            DeviceMsgFields {
                group: Some(group.clone()),
                name: Some("Bob".into()),
                introduce: Some(true),
                members: Some(members.clone()),
                ..msg("GROUP")
            },
        ),
        (
            "GROUP: one member, introduce = 0",
            DeviceMsgFields {
                group: Some(group.clone()),
                name: Some("Zoë".into()),
                introduce: Some(false),
                members: Some(members[1..].to_vec()),
                ..msg("GROUP")
            },
        ),
        (
            "SIBLING: another device of the person",
            DeviceMsgFields {
                device: Some(sibling.clone()),
                name: Some("phone".into()),
                ..msg("SIBLING")
            },
        ),
        (
            "OFFER: an invitation for the first member of the GROUP above, introduce copied (1)",
            DeviceMsgFields {
                via: Some(members[0].clone()),
                introduce: Some(true),
                invitation: Some(inv_one.clone()),
                ..msg("OFFER")
            },
        ),
        (
            "HISTORY: two entries, oldest first: from the contact (non-ASCII text), then from the person (received_at not known)",
            DeviceMsgFields {
                group: Some(group.clone()),
                entries: Some(entries.clone()),
                ..msg("HISTORY")
            },
        ),
        (
            "COPY: a text the person sent",
            DeviceMsgFields {
                group: Some(group.clone()),
                entry: Some(copied.clone()),
                ..msg("COPY")
            },
        ),
        (
            "ANNOUNCE of a connection with a contact (group flag 1): two queues, the first on a relay with an access key, the second behind an HTTPS front",
            DeviceMsgFields {
                group: Some(group.clone()),
                fingerprint: Some(hex(&fps[3])),
                queues: Some(contact_queues.clone()),
                ..msg("ANNOUNCE")
            },
        ),
        (
            "ANNOUNCE of a device connection (group flag 0): one queue on a named relay with an access key",
            DeviceMsgFields {
                fingerprint: Some(hex(&fps[1])),
                queues: Some(device_queues.clone()),
                ..msg("ANNOUNCE")
            },
        ),
        (
            "REMOVED: two fingerprints",
            DeviceMsgFields {
                fingerprints: Some(vec![hex(&fps[2]), hex(&fps[3])]),
                ..msg("REMOVED")
            },
        ),
        (
            "REMOVED naming one fingerprint: sent on the removed device's own connection, it tells that device it was removed (§12.6)",
            DeviceMsgFields {
                fingerprints: Some(vec![hex(&fps[1])]),
                ..msg("REMOVED")
            },
        ),
        (
            "PROFILE: the person changed the profile on the sending device (after linking; no relays, no rotation period)",
            DeviceMsgFields {
                profile: Some(ProfileFields {
                    name: "Ada L.".into(),
                    status: "away".into(),
                    avatar: None,
                }),
                ..msg("PROFILE")
            },
        ),
        (
            "FORGET: the person forgot the contact of this group on the sending device",
            DeviceMsgFields {
                group: Some(group.clone()),
                ..msg("FORGET")
            },
        ),
    ];
    let mut bodies: Vec<(String, Vec<u8>)> = Vec::new();
    for (comment, m) in messages {
        let tern_msg = m.to_msg();
        let b = tern_msg.encode();
        assert_eq!(
            hex(&b),
            hex(&device_ref::body(&m)),
            "{comment}: tern and the reference disagree"
        );
        assert_eq!(DeviceMsg::decode(&b).unwrap(), tern_msg, "{comment}");
        assert_eq!(DeviceMsgFields::of(&tern_msg), m, "{comment}");
        bodies.push((m.msg_type.clone(), b.clone()));
        out.push(DeviceCase {
            comment: comment.into(),
            kind: "message".into(),
            result: "valid".into(),
            message: Some(m),
            body: Some(hex(&b)),
            ..Default::default()
        });
    }

    // (c) Bodies to refuse, from the valid ones above or built field by field.
    let body = |t: &str| -> Vec<u8> {
        bodies
            .iter()
            .find(|(n, _)| n == t)
            .map(|(_, b)| b.clone())
            .unwrap()
    };
    let with = |t: &str, at: usize, v: u8| {
        let mut b = body(t);
        b[at] = v;
        b
    };
    let cat = |parts: &[&[u8]]| parts.concat();
    let (add, drop, group_b, sibling_b, history, copy, announce, removed) = (
        body("ADD"),
        body("DROP"),
        body("GROUP"),
        body("SIBLING"),
        body("HISTORY"),
        body("COPY"),
        body("ANNOUNCE"),
        body("REMOVED"),
    );
    // Offsets: ADD type 0, name length 1, name 2..8 ("laptop"), introduce 8.
    // GROUP: type 0, group 1..17, name "Bob" 17..21, introduce 21, member
    // count 22. OFFER: via 1..17, introduce
    // 17. HISTORY: group 1..17, count 17..19, first entry's direction 19.
    // COPY: group 1..17, direction 17, id 18..34, times 34..50, text 50...
    // ANNOUNCE (with group): flag 1, group 2..18, fingerprint 18..50, queue
    // count 50, first relay address's flags 51.
    assert_eq!(add[8], 0);
    assert_eq!((group_b[21], group_b[22]), (1, 2));
    assert_eq!((history[17], history[18], history[19]), (0, 2, 1));
    assert_eq!(
        (copy[17], announce[1], announce[50], announce[51]),
        (2, 1, 2, 0x10)
    );
    let count_at = |b: &[u8], at: usize, hi: u8, lo: u8| {
        let mut b = b.to_vec();
        b[at] = hi;
        b[at + 1] = lo;
        b
    };
    let settings_33 = device_ref::body(&DeviceMsgFields {
        profile: Some(ProfileFields {
            name: "Ada".into(),
            status: String::new(),
            avatar: None,
        }),
        relays: Some(
            (0..33)
                .map(|i| canon(format!("tern://{}@192.0.2.{}:5223", k[7], i + 1)))
                .collect(),
        ),
        rotate_days: Some(7),
        ..msg("SETTINGS")
    });
    let announce_13 = device_ref::body(&DeviceMsgFields {
        fingerprint: Some(hex(&fps[1])),
        queues: Some(
            (0..13u8)
                .map(|i| GrantFields {
                    relay: canon(format!("tern://{}@192.0.2.{}:5223", k[7], i + 1)),
                    recipient_id: hex(&[i; 16]),
                    recipient_auth_seed: hex(&[0x80 | i; 32]),
                })
                .collect(),
        ),
        ..msg("ANNOUNCE")
    });
    let invalid: Vec<(&str, Vec<u8>, &str)> = vec![
        ("type 0x00 is reserved", cat(&[&[0x00], &drop[1..]]), "invalid: device message type"),
        ("type 0x04 is reserved (a DROP body under a reserved type)", cat(&[&[0x04], &drop[1..]]), "invalid: device message type"),
        ("type 0x0F is reserved", vec![0x0f], "invalid: device message type"),
        ("type 0x1A is reserved (a FORGET body under the next type)", cat(&[&[0x1a], &group_b[1..17]]), "invalid: device message type"),
        ("type 0xFF is reserved", vec![0xff], "invalid: device message type"),
        ("an empty body", vec![], "truncated"),
        ("ADD with an introduce flag of 2", with("ADD", 8, 2), "invalid: flag"),
        ("GROUP with an introduce flag of 2", with("GROUP", 21, 2), "invalid: flag"),
        ("OFFER with an introduce flag of 2", with("OFFER", 17, 2), "invalid: flag"),
        ("ANNOUNCE with a group flag of 2", with("ANNOUNCE", 1, 2), "invalid: announce group flag"),
        ("HISTORY whose first entry has direction 0", with("HISTORY", 19, 0), "invalid: history entry direction"),
        ("COPY whose entry has direction 3", with("COPY", 17, 3), "invalid: history entry direction"),
        ("DROP truncated inside its fingerprint", drop[..drop.len() - 1].to_vec(), "truncated"),
        ("ADD truncated inside its invitation", add[..add.len() - 1].to_vec(), "truncated"),
        ("SIBLING truncated inside its name", sibling_b[..sibling_b.len() - 1].to_vec(), "truncated"),
        ("HISTORY truncated inside its last entry's text", history[..history.len() - 1].to_vec(), "truncated"),
        ("REMOVED with a trailing byte", cat(&[&removed, &[0]]), "trailing"),
        ("SIBLING with a trailing byte", cat(&[&sibling_b, &[0]]), "trailing"),
        ("COPY with a trailing byte", cat(&[&copy, &[0]]), "trailing"),
        ("SETTINGS listing 33 relays (at most 32), otherwise well formed", settings_33, "invalid: relay count"),
        ("ANNOUNCE of 13 queues (at most 12), otherwise well formed", announce_13, "invalid: queue count"),
        ("HISTORY with a count of 3 and two entries", count_at(&history, 17, 0, 3), "truncated"),
        ("HISTORY with a count of 65535 and two entries (more than the bytes can hold: refused before reading them)", count_at(&history, 17, 0xff, 0xff), "truncated"),
        ("GROUP with a member count of 3 and two members", with("GROUP", 22, 3), "truncated"),
        ("REMOVED with a count of 3 and two fingerprints", with("REMOVED", 1, 3), "truncated"),
        ("SIBLING whose name is not UTF-8", cat(&[&sibling_b[..17], &[2, 0xc3, 0x28]]), "invalid: UTF-8 text"),
        ("ADD whose name is not UTF-8", cat(&[&[0x01, 6], b"lapto\xff", &add[8..]]), "invalid: UTF-8 text"),
        ("COPY whose text is not UTF-8", cat(&[&copy[..50], &[0, 0, 0, 2, 0xff, 0xfe]]), "invalid: UTF-8 text"),
        ("ANNOUNCE whose first relay address has a reserved flag bit", with("ANNOUNCE", 51, 0x30), "address"),
    ];
    for (comment, b, err) in invalid {
        expect_err(DeviceMsg::decode(&b), proto_err, err, comment);
        out.push(DeviceCase {
            comment: comment.into(),
            kind: "message".into(),
            result: "invalid".into(),
            body: Some(hex(&b)),
            error: Some(err.into()),
            ..Default::default()
        });
    }

    // (d) A device link: a contact invitation's body under kind 3.
    let fields = invitation(
        &mut rng,
        &[
            canon(format!("tern://{}@198.51.100.1", k[7])),
            canon(format!("tern+https://{}@front.example.net/tern", k[6])),
        ],
    );
    let inv = fields.to_invitation();
    let binary = device_ref::invitation(&fields, 3);
    let link = inv.to_device_link();
    assert_eq!(link, link_ref::link(&binary));
    let mut as_contact = inv.encode();
    assert_eq!(as_contact, device_ref::invitation(&fields, 1));
    as_contact[1] = 3;
    assert_eq!(as_contact, binary, "kind 3 is kind 1 but for the kind byte");
    assert_eq!(
        parse_link(&link).unwrap(),
        AnyInvitation::Device(inv.clone())
    );
    assert_eq!(
        parse_link(&inv.to_link()).unwrap(),
        AnyInvitation::Contact(inv.clone())
    );
    let refused = "invalid: invitation kind";
    expect_err(
        Invitation::from_link(&link),
        proto_err,
        refused,
        "device link as contact link",
    );
    expect_err(
        Invitation::decode(&binary),
        proto_err,
        refused,
        "device link as contact invitation",
    );
    out.push(DeviceCase {
        comment:
            "a device link with two queues: read as a device link, refused as a contact invitation"
                .into(),
        kind: "device_link".into(),
        result: "valid".into(),
        invitation: Some(fields),
        binary: Some(hex(&binary)),
        link: Some(link),
        contact_invitation_error: Some(refused.into()),
        ..Default::default()
    });
    out
}

// ---------------------------------------------------------------------------
// Driver
// ---------------------------------------------------------------------------

// ---------------------------------------------------------------------------
// resync.json: ratchet resynchronisation (PROTOCOL.md §6.7)
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResyncCase {
    pub comment: String,
    /// The connection: its transcript hash and connection secret, and the
    /// sender id of the queue the two messages are sealed for.
    pub transcript: String,
    pub connection_secret: String,
    pub sender_id: String,
    /// The offer: the 64 bytes the offering side draws (I' then R'), their
    /// public keys, the 64 it draws next for an ML-KEM-768 key pair and its
    /// encapsulation key EK', its head (the last envelope of the other
    /// direction it holds), the body, the queue layer nonce and the queue
    /// message.
    pub offer_secrets: String,
    pub offer_invitation_key: String,
    pub offer_ratchet_key: String,
    pub offer_kem_seed: String,
    pub offer_kem_key: String,
    pub offer_head_seq: u64,
    pub offer_head_hash: String,
    pub offer_body: String,
    pub offer_nonce: String,
    pub offer_message: Padded,
    /// The accept: the 64 bytes the accepting side draws (J' then E'),
    /// their public keys, the key schedule, then what it draws to start the
    /// new ratchet (its first ratchet key, an ML-KEM key pair, the message
    /// `m` it encapsulates to EK') with the resulting ciphertext and secret
    /// and first root step, and the RESYNCED envelope (its head of the
    /// offerer's direction) as the first ratchet message, with its header
    /// nonce.
    pub accept_secrets: String,
    pub accept_identity_key: String,
    pub accept_ephemeral_key: String,
    pub dh1: String,
    pub dh2: String,
    pub dh3: String,
    pub resync_transcript: String,
    pub root_key: String,
    pub header_key_initiator: String,
    pub header_key_responder: String,
    pub initiator_ratchet_secret: String,
    pub initiator_kem_seed: String,
    pub initiator_kem_key: String,
    pub initiator_kem_m: String,
    pub offer_ciphertext: String,
    pub offer_kem_secret: String,
    pub first_chain_key: String,
    pub resynced_head_seq: u64,
    pub resynced_head_hash: String,
    pub resynced: EnvelopeFields,
    pub header_nonce: String,
    pub ratchet_message: String,
    pub accept_nonce: String,
    pub accept_message: Padded,
}

/// The RESYNCED control body (§10.1 type 7).
pub fn resynced_body(seq: u64, hash: &[u8; 32]) -> Vec<u8> {
    let mut b = vec![7u8];
    b.extend(seq.to_be_bytes());
    b.extend(hash);
    b
}

fn gen_resync() -> Vec<ResyncCase> {
    use tern::proto::handshake::{resync_accepter_agree, resync_offerer_agree};
    let mut rng = seeded(19);
    let th: [u8; 32] = random(&mut rng);
    let cs: [u8; 32] = random(&mut rng);
    let sender_id: [u8; 16] = random(&mut rng);
    let offer_secrets: [u8; 64] = random(&mut rng);
    let offer_kem: [u8; 64] = random(&mut rng);
    let offer_head = (5u64, random::<32>(&mut rng));
    let offer_nonce: [u8; 24] = random(&mut rng);
    let accept_secrets: [u8; 64] = random(&mut rng);
    let initiator_secret: [u8; 32] = random(&mut rng);
    let initiator_kem: [u8; 64] = random(&mut rng);
    let initiator_m: [u8; 32] = random(&mut rng);
    let resynced_head = (3u64, random::<32>(&mut rng));
    let env_id: [u8; 16] = random(&mut rng);
    let header_nonce: [u8; 24] = random(&mut rng);
    let accept_nonce: [u8; 24] = random(&mut rng);

    // The offer.
    let mut frng = FixedRng::new(&offer_secrets);
    let offer = InviterSecrets::generate(&mut frng);
    frng.assert_used_up("offer keys");
    let offer_ek = refc::kem_keygen(&offer_kem);
    let (ip, rp) = (offer.invitation.public(), offer.ratchet.public());
    assert_eq!(
        ip,
        refc::x25519_public(&offer_secrets[..32].try_into().unwrap())
    );
    assert_eq!(
        rp,
        refc::x25519_public(&offer_secrets[32..].try_into().unwrap())
    );
    let mut offer_body = ip.to_vec();
    offer_body.extend(rp);
    offer_body.extend(&offer_ek);
    offer_body.extend(offer_head.0.to_be_bytes());
    offer_body.extend(offer_head.1);
    let mut frng = FixedRng::new(&offer_nonce);
    let offer_message = queue_msg::seal_payload(
        &Secret32(cs),
        &sender_id,
        &queue_msg::resync_payload(0x03, &offer_body),
        &mut frng,
    )
    .unwrap();
    frng.assert_used_up("offer seal");
    let qk = refc::queue_key(&cs, &sender_id);
    assert_eq!(
        refc::queue_seal_typed(&qk, &offer_nonce, 0x03, &offer_body, QUEUE_MSG_LEN),
        offer_message
    );

    // The accept.
    let mut frng = FixedRng::new(&accept_secrets);
    let (init, jp, ep) = resync_accepter_agree(&th, &Secret32(cs), &ip, &rp, &mut frng).unwrap();
    frng.assert_used_up("accept keys");
    let (js, es): ([u8; 32], [u8; 32]) = (
        accept_secrets[..32].try_into().unwrap(),
        accept_secrets[32..].try_into().unwrap(),
    );
    let dh = [
        refc::x25519(&js, &rp),
        refc::x25519(&es, &ip),
        refc::x25519(&es, &rp),
    ];
    let salt = refc::sha256(&[b"tern/v1 resync transcript", &th, &ip, &rp, &jp, &ep]);
    let k = refc::resync_keys(&salt, dh, &cs);
    assert_eq!(
        (
            init.root_key.0,
            init.header_key_initiator.0,
            init.header_key_responder.0,
            init.ad
        ),
        (k[0], k[1], k[2], th)
    );
    let offerer_init = resync_offerer_agree(&offer, &th, &Secret32(cs), &jp, &ep).unwrap();
    assert_eq!(offerer_init.root_key, init.root_key);
    let mut frng = FixedRng::new(&[&initiator_secret[..], &initiator_kem, &initiator_m].concat());
    let mut ratchet = Ratchet::init_initiator_pq(&init, &rp, Some(&offer_ek), &mut frng).unwrap();
    frng.assert_used_up("init_initiator_pq");
    let env = Envelope {
        version: 1,
        kind: Kind::Control,
        id: env_id,
        seq: offer_head.0 + 1,
        prev: offer_head.1,
        sent_at_ms: 1_764_000_000_000,
        body: resynced_body(resynced_head.0, &resynced_head.1),
    };
    let mut frng = FixedRng::new(&header_nonce);
    let ratchet_message = ratchet.encrypt(&env.encode().unwrap(), &mut frng).unwrap();
    frng.assert_used_up("encrypt");
    let (offer_ct, offer_ss) = refc::kem_encaps(&offer_ek, &initiator_m);
    let (_, ck, _) = refc::kdf_rk_pq(
        &k[0],
        &refc::x25519(&initiator_secret, &rp),
        Some(&offer_ss),
    );
    let (_, mk) = refc::kdf_ck(&ck);
    let initiator_ek = refc::kem_keygen(&initiator_kem);
    let header = refc::header(
        &public_of(&initiator_secret),
        0,
        0,
        &initiator_ek,
        Some(&offer_ct),
    );
    assert_eq!(
        refc::ratchet_message(
            &k[1],
            &header_nonce,
            &header,
            &th,
            &mk,
            &env.encode().unwrap()
        ),
        ratchet_message
    );
    let mut accept_body = jp.to_vec();
    accept_body.extend(ep);
    accept_body.extend(&ratchet_message);
    let mut frng = FixedRng::new(&accept_nonce);
    let accept_message = queue_msg::seal_payload(
        &Secret32(cs),
        &sender_id,
        &queue_msg::resync_payload(0x04, &accept_body),
        &mut frng,
    )
    .unwrap();
    frng.assert_used_up("accept seal");
    assert_eq!(
        refc::queue_seal_typed(&qk, &accept_nonce, 0x04, &accept_body, QUEUE_MSG_LEN),
        accept_message
    );
    vec![ResyncCase {
        comment: "an offer and its accept: the accepting side continues its chain from the \
                  offer's head (seq 6 after 5) with RESYNCED carrying its own head (3)"
            .into(),
        transcript: hex(&th),
        connection_secret: hex(&cs),
        sender_id: hex(&sender_id),
        offer_secrets: hex(&offer_secrets),
        offer_invitation_key: hex(&ip),
        offer_ratchet_key: hex(&rp),
        offer_kem_seed: hex(&offer_kem),
        offer_kem_key: hex(&offer_ek),
        offer_head_seq: offer_head.0,
        offer_head_hash: hex(&offer_head.1),
        offer_body: hex(&offer_body),
        offer_nonce: hex(&offer_nonce),
        offer_message: Padded::of(&offer_message),
        accept_secrets: hex(&accept_secrets),
        accept_identity_key: hex(&jp),
        accept_ephemeral_key: hex(&ep),
        dh1: hex(&dh[0]),
        dh2: hex(&dh[1]),
        dh3: hex(&dh[2]),
        resync_transcript: hex(&salt),
        root_key: hex(&k[0]),
        header_key_initiator: hex(&k[1]),
        header_key_responder: hex(&k[2]),
        initiator_ratchet_secret: hex(&initiator_secret),
        initiator_kem_seed: hex(&initiator_kem),
        initiator_kem_key: hex(&initiator_ek),
        initiator_kem_m: hex(&initiator_m),
        offer_ciphertext: hex(&offer_ct),
        offer_kem_secret: hex(&offer_ss),
        first_chain_key: hex(&ck),
        resynced_head_seq: resynced_head.0,
        resynced_head_hash: hex(&resynced_head.1),
        resynced: EnvelopeFields::of(&env),
        header_nonce: hex(&header_nonce),
        ratchet_message: hex(&ratchet_message),
        accept_nonce: hex(&accept_nonce),
        accept_message: Padded::of(&accept_message),
    }]
}

// ---------------------------------------------------------------------------
// file.json (PROTOCOL.md §16)
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FileQueueFields {
    pub recipient_id: String,
    pub queue_secret: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FileSetFields {
    /// Text form (§3.1); the offer carries the binary form.
    pub relay: String,
    pub set_seed: String,
    pub queues: Vec<FileQueueFields>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FileCase {
    pub comment: String,
    pub result: String,
    /// "offer", "chunk" or "queue_auth".
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caption: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunks_per_queue: Option<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sets: Vec<FileSetFields>,
    /// The offer body, or the 16,000-byte chunk message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoded: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
    /// The chunk's file bytes (without the zero fill of a last chunk).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_seed: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_seed: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_public: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub of_case: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mutation: Option<Mutation>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

pub fn chunk_err(e: &ChunkError) -> String {
    match e {
        ChunkError::NotAChunk => "not_a_chunk".into(),
        ChunkError::Index => "index".into(),
        ChunkError::Decrypt => "decrypt".into(),
        ChunkError::Padding => "padding".into(),
    }
}

/// The offer's fields back as a [`FileOffer`].
pub fn offer_of(c: &FileCase) -> FileOffer {
    FileOffer {
        size: c.size.expect("size"),
        sha256: arr(c.sha256.as_ref().expect("sha256")),
        key: Secret32(arr(c.file_key.as_ref().expect("file_key"))),
        name: c.name.clone().expect("name"),
        caption: c.caption.clone().unwrap_or_default(),
        chunks_per_queue: c.chunks_per_queue.expect("chunks_per_queue"),
        sets: c
            .sets
            .iter()
            .map(|s| OfferSet {
                relay: s.relay.parse().expect("relay address"),
                seed: Secret32(arr(&s.set_seed)),
                queues: s
                    .queues
                    .iter()
                    .map(|q| OfferQueue {
                        recipient_id: arr(&q.recipient_id),
                        queue_secret: Secret32(arr(&q.queue_secret)),
                    })
                    .collect(),
            })
            .collect(),
    }
}

fn gen_file() -> Vec<FileCase> {
    let mut rng = seeded(18);
    let mut out = Vec::new();
    let relays: Vec<String> = (0..3)
        .map(|i| {
            let k: [u8; 32] = random(&mut rng);
            let host = ["10.0.0.7", "relay.example.org", "[2001:db8::5]"][i];
            format!("tern://{}@{host}:5223", key_text(&refc::x25519_public(&k)))
        })
        .collect();
    // (comment, size, name, caption, chunks per queue, relays)
    let offers: [(&str, u64, &str, &str, u32, usize); 4] = [
        ("an empty file, one relay", 0, "empty.txt", "", 937, 1),
        (
            "a file of three chunks, two relays, a caption",
            2 * 15_979 + 1,
            "report.pdf",
            "the numbers",
            937,
            2,
        ),
        (
            "a name the recipient must sanitise (kept as sent here)",
            40,
            "../../etc/passwd",
            "",
            1,
            1,
        ),
        (
            "20 MiB: two queues of up to 937 chunks in each of three relays",
            20 << 20,
            "video.mp4",
            "",
            937,
            3,
        ),
    ];
    for (comment, size, name, caption, cpq, n) in offers {
        let nq = refc::file_chunk_count(size).div_ceil(cpq as u64) as usize;
        let sets: Vec<FileSetFields> = relays[..n]
            .iter()
            .map(|r| FileSetFields {
                relay: r.clone(),
                set_seed: hex(&random::<32>(&mut rng)),
                queues: (0..nq)
                    .map(|_| FileQueueFields {
                        recipient_id: hex(&random::<16>(&mut rng)),
                        queue_secret: hex(&random::<32>(&mut rng)),
                    })
                    .collect(),
            })
            .collect();
        let mut c = FileCase {
            comment: comment.into(),
            result: "valid".into(),
            kind: "offer".into(),
            size: Some(size),
            sha256: Some(hex(&random::<32>(&mut rng))),
            file_key: Some(hex(&random::<32>(&mut rng))),
            name: Some(name.into()),
            caption: Some(caption.into()),
            chunks_per_queue: Some(cpq),
            sets,
            ..Default::default()
        };
        let encoded = offer_of(&c).encode().expect(comment);
        assert_eq!(refc::file_offer(&c), encoded, "{comment}: reference");
        assert_eq!(FileOffer::decode(&encoded).expect(comment), offer_of(&c));
        c.encoded = Some(hex(&encoded));
        out.push(c);
    }
    let name_at = 1 + 8 + 32 + 32;
    // (comment, of, mutation, error)
    let bad_offers: Vec<(&str, usize, Option<Mutation>, &str)> = vec![
        (
            "another format",
            1,
            xor(0, 0x03),
            "invalid: file offer format",
        ),
        (
            "an empty name",
            0,
            Some(Mutation::Truncate { len: name_at }),
            "truncated",
        ),
        (
            "truncated in the last queue",
            1,
            Some(Mutation::Truncate { len: 200 }),
            "truncated",
        ),
        (
            "a byte after the last set",
            1,
            Some(Mutation::Append { hex: "00".into() }),
            "trailing",
        ),
        (
            "a size that needs more queues than the sets have",
            2,
            xor(6, 0x01),
            "invalid: queue count",
        ),
        (
            "chunks per queue beyond 100,000",
            0,
            xor(name_at + 1 + 9 + 2, 0xff),
            "invalid: chunks per queue",
        ),
        (
            "a name that is not UTF-8",
            0,
            xor(name_at + 1, 0x80),
            "invalid: file name",
        ),
    ];
    for (comment, of, mutation, err) in bad_offers {
        let base = unhex(out[of].encoded.as_ref().unwrap());
        let input = mutation.as_ref().map_or(base.clone(), |m| m.apply(&base));
        expect_err(FileOffer::decode(&input), proto_err, err, comment);
        out.push(FileCase {
            comment: comment.into(),
            result: "invalid".into(),
            kind: "offer".into(),
            of_case: Some(of),
            mutation,
            error: Some(err.into()),
            ..Default::default()
        });
    }
    // Chunks of the three-chunk file: its key, set 0 and set 1.
    let first_chunk = out.len();
    let key = Secret32(arr(out[1].file_key.as_ref().unwrap()));
    let size = out[1].size.unwrap();
    let content = random_vec(&mut rng, size as usize);
    for (set, index) in [(0u8, 0u32), (0, 2), (1, 2)] {
        let sk = tern::proto::file::set_key(&key, set);
        assert_eq!(&sk[..], &refc::file_set_key(&key.0, set)[..]);
        let start = index as usize * 15_979;
        let data = &content[start..(start + 15_979).min(content.len())];
        let msg = tern::proto::file::seal_chunk(&sk, index, 3, data);
        let (nonce, reference) = refc::file_chunk(&sk[..], index, 3, data);
        assert_eq!(msg, reference, "chunk {index} of set {set}: reference");
        out.push(FileCase {
            comment: format!(
                "chunk {index} of 3 ({}), set {set}",
                if index == 2 {
                    "the last: 1 byte, zero fill"
                } else {
                    "full"
                }
            ),
            result: "valid".into(),
            kind: "chunk".into(),
            size: Some(size),
            file_key: Some(hex(&key.0)),
            set: Some(set),
            set_key: Some(hex(&sk[..])),
            index: Some(index),
            nonce: Some(hex(&nonce)),
            data: Some(hex(data)),
            encoded: Some(hex(&msg)),
            ..Default::default()
        });
    }
    // (comment, of, mutation, another set or size, error)
    type BadChunk<'a> = (&'a str, usize, Option<Mutation>, Option<u64>, &'a str);
    let bad_chunks: Vec<BadChunk> = vec![
        (
            "a flipped bit in the data",
            first_chunk,
            xor(100, 0x01),
            None,
            "decrypt",
        ),
        (
            "a flipped bit in the tag",
            first_chunk,
            xor(15_999, 0x80),
            None,
            "decrypt",
        ),
        (
            "moved to another position (index rewritten)",
            first_chunk,
            xor(4, 0x01),
            None,
            "decrypt",
        ),
        (
            "another set's chunk",
            first_chunk + 2,
            None,
            Some(0),
            "decrypt",
        ),
        (
            "the last chunk presented as one more of a longer file (truncation)",
            first_chunk + 1,
            None,
            Some(size + 15_979),
            "decrypt",
        ),
        (
            "an index beyond the file",
            first_chunk,
            xor(4, 0x03),
            None,
            "index",
        ),
        (
            "not a chunk (type 0x02)",
            first_chunk,
            xor(0, 0x07),
            None,
            "not_a_chunk",
        ),
        (
            "one byte short",
            first_chunk,
            Some(Mutation::Truncate { len: 15_999 }),
            None,
            "not_a_chunk",
        ),
    ];
    for (comment, of, mutation, size_or_set, err) in bad_chunks {
        let base = &out[of];
        let mut input = unhex(base.encoded.as_ref().unwrap());
        input = mutation.as_ref().map_or(input.clone(), |m| m.apply(&input));
        let (mut set, mut sz) = (base.set.unwrap(), base.size.unwrap());
        match comment {
            c if c.starts_with("another set") => set = size_or_set.unwrap() as u8,
            _ => sz = size_or_set.unwrap_or(sz),
        }
        let sk = tern::proto::file::set_key(&key, set);
        expect_err(
            tern::proto::file::open_chunk(&sk, sz, &mut input).map(|_| ()),
            chunk_err,
            err,
            comment,
        );
        out.push(FileCase {
            comment: comment.into(),
            result: "invalid".into(),
            kind: "chunk".into(),
            size: (sz != base.size.unwrap()).then_some(sz),
            set: (set != base.set.unwrap()).then_some(set),
            of_case: Some(of),
            mutation,
            error: Some(err.into()),
            ..Default::default()
        });
    }
    // A last chunk with a non-zero fill, sealed by the reference.
    let sk = tern::proto::file::set_key(&key, 0);
    let mut filled = content[2 * 15_979..].to_vec();
    filled.resize(15_979, 0);
    filled[15_978] = 1;
    let (_, msg) = refc::file_chunk(&sk[..], 2, 3, &filled);
    let mut m = msg.clone();
    expect_err(
        tern::proto::file::open_chunk(&sk, size, &mut m).map(|_| ()),
        chunk_err,
        "padding",
        "non-zero fill",
    );
    out.push(FileCase {
        comment: "a last chunk whose fill is not zero".into(),
        result: "invalid".into(),
        kind: "chunk".into(),
        size: Some(size),
        file_key: Some(hex(&key.0)),
        set: Some(0),
        index: Some(2),
        encoded: Some(hex(&msg)),
        error: Some("padding".into()),
        ..Default::default()
    });
    for q in [0u16, 1, 300] {
        let seed: [u8; 32] = random(&mut rng);
        let k = tern::proto::file::queue_auth(&Secret32(seed), q);
        let auth_seed = refc::hkdf(
            None,
            &seed,
            &[b"tern/v1 file queue auth".as_slice(), &q.to_be_bytes()].concat(),
            32,
        );
        assert_eq!(k.to_bytes().to_vec(), auth_seed);
        out.push(FileCase {
            comment: format!("the recipient key of file queue {q}"),
            result: "valid".into(),
            kind: "queue_auth".into(),
            set_seed: Some(hex(&seed)),
            queue: Some(q),
            auth_seed: Some(hex(&auth_seed)),
            auth_public: Some(hex(&k.verifying_key().to_bytes())),
            ..Default::default()
        });
    }
    out
}

// ---------------------------------------------------------------------------
// receipt.json (PROTOCOL.md §7.6)
// ---------------------------------------------------------------------------

/// The receipt body written and read from the specification alone (no
/// tern code), to check tern's codec against.
pub mod receipt_reference {
    /// version 1, flags, u16 count, the ids.
    pub fn body(flags: u8, ids: &[[u8; 16]]) -> Vec<u8> {
        let mut b = vec![1, flags];
        b.extend_from_slice(&(ids.len() as u16).to_be_bytes());
        for id in ids {
            b.extend_from_slice(id);
        }
        b
    }

    /// The flags and ids of a body, or why it is refused.
    pub fn parse(b: &[u8]) -> Result<(u8, Vec<[u8; 16]>), &'static str> {
        if b.len() < 4 {
            return Err("short");
        }
        if b[0] != 1 {
            return Err("version");
        }
        if b[1] & !1 != 0 {
            return Err("flags");
        }
        let n = usize::from(u16::from_be_bytes([b[2], b[3]]));
        if n == 0 {
            return Err("no ids");
        }
        if n > 840 || b.len() > 4 + 16 * 840 {
            return Err("too many");
        }
        if b.len() != 4 + 16 * n {
            return Err("length");
        }
        let ids: Vec<[u8; 16]> = b[4..]
            .chunks(16)
            .map(|c| c.try_into().expect("16 bytes"))
            .collect();
        for (i, a) in ids.iter().enumerate() {
            if ids[..i].contains(a) {
                return Err("repeated");
            }
        }
        Ok((b[1], ids))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiptCase {
    pub comment: String,
    pub result: String,
    /// Valid cases: the fields.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flags: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ids: Option<Vec<String>>,
    /// Valid: the encoding of the fields. Invalid: a body that must be
    /// refused.
    pub body: String,
    /// For one valid case: the kind-4 envelope carrying the body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envelope: Option<EnvelopeFields>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoded: Option<Padded>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn gen_receipt() -> Vec<ReceiptCase> {
    use receipt_reference as rr;
    let mut rng = seeded(21);
    let mut out = Vec::new();
    let id_list = |rng: &mut StdRng, n: usize| -> Vec<[u8; 16]> {
        (0..n).map(|_| random::<16>(rng)).collect()
    };
    let mut valid = |comment: &str, flags: u8, ids: Vec<[u8; 16]>, carry: bool| {
        let r = Receipt {
            flags,
            ids: ids.clone(),
        };
        let b = r.encode().unwrap();
        assert_eq!(b, rr::body(flags, &ids), "{comment}: reference encoding");
        assert_eq!(Receipt::decode(&b).unwrap(), r, "{comment}");
        assert_eq!(rr::parse(&b), Ok((flags, ids.clone())), "{comment}");
        let (envelope, encoded) = if carry {
            let e = ChainSender::default()
                .next(1, Kind::Receipt, [0x44; 16], 1_767_225_600_000, b.clone())
                .unwrap();
            let enc = e.encode().unwrap();
            (Some(EnvelopeFields::of(&e)), Some(Padded::of(&enc)))
        } else {
            (None, None)
        };
        out.push(ReceiptCase {
            comment: comment.into(),
            result: "valid".into(),
            flags: Some(flags),
            ids: Some(ids.iter().map(|i| hex(i)).collect()),
            body: hex(&b),
            envelope,
            encoded,
            error: None,
        });
    };
    let one = id_list(&mut rng, 1);
    valid(
        "one id, in the first envelope of a direction (kind 4)",
        0,
        one.clone(),
        true,
    );
    let three = id_list(&mut rng, 3);
    valid(
        "three ids: one batch of messages stored",
        0,
        three.clone(),
        false,
    );
    let full = id_list(&mut rng, MAX_RECEIPT_IDS);
    valid(
        "840 ids, the most one envelope body holds (13,444 bytes)",
        0,
        full.clone(),
        false,
    );
    valid(
        "the reserved read bit: still read as a delivery receipt",
        1,
        one.clone(),
        false,
    );
    let good = rr::body(0, &three);
    let mut invalid: Vec<(&str, Vec<u8>, &str)> = vec![
        ("an empty body", vec![], "truncated"),
        ("three bytes", good[..3].to_vec(), "truncated"),
        (
            "the last id one byte short",
            good[..good.len() - 1].to_vec(),
            "truncated",
        ),
        (
            "one byte after the last id",
            [good.clone(), vec![0]].concat(),
            "trailing",
        ),
        (
            "a count of 4 with three ids",
            {
                let mut b = good.clone();
                b[3] = 4;
                b
            },
            "truncated",
        ),
        (
            "version 0",
            [vec![0], good[1..].to_vec()].concat(),
            "invalid: receipt version",
        ),
        (
            "version 2",
            [vec![2], good[1..].to_vec()].concat(),
            "invalid: receipt version",
        ),
        (
            "an unknown flag bit (0x02)",
            {
                let mut b = good.clone();
                b[1] = 2;
                b
            },
            "invalid: receipt flags",
        ),
        ("no ids", vec![1, 0, 0, 0], "invalid: receipt without ids"),
        (
            "a count of 65535 (more than fit one envelope)",
            [vec![1, 0, 0xff, 0xff], good[4..].to_vec()].concat(),
            "too_long",
        ),
        (
            "841 ids: one more than fit one envelope",
            {
                let mut ids = full.clone();
                ids.push(random::<16>(&mut rng));
                rr::body(0, &ids)
            },
            "too_long",
        ),
        (
            "the same id twice",
            rr::body(0, &[three[0], three[1], three[0]]),
            "invalid: repeated id in a receipt",
        ),
    ];
    for (comment, b, err) in invalid.drain(..) {
        expect_err(Receipt::decode(&b), proto_err, err, comment);
        assert!(
            rr::parse(&b).is_err(),
            "{comment}: the reference refuses it too"
        );
        out.push(ReceiptCase {
            comment: comment.into(),
            result: "invalid".into(),
            flags: None,
            ids: None,
            body: hex(&b),
            envelope: None,
            encoded: None,
            error: Some(err.into()),
        });
    }
    out
}

fn json<T: Serialize>(cases: &[T]) -> String {
    let mut s = serde_json::to_string_pretty(cases).expect("serializable");
    s.push('\n');
    s
}

/// Every vector file: (file name, contents).
pub fn generate() -> Vec<(&'static str, String)> {
    vec![
        ("relay_address.json", json(&gen_relay_address())),
        ("invitation.json", json(&gen_invitation())),
        ("session.json", json(&gen_session())),
        ("frames.json", json(&gen_frames())),
        ("relay_commands.json", json(&gen_relay_commands())),
        ("relay_replies.json", json(&gen_relay_replies())),
        ("handshake.json", json(&gen_handshake())),
        ("security_code.json", json(&gen_security_code())),
        ("ratchet.json", json(&gen_ratchet())),
        ("envelope.json", json(&gen_envelope())),
        ("envelope_chain.json", json(&gen_envelope_chain())),
        ("queue_layer.json", json(&gen_queue_layer())),
        ("delivery.json", json(&gen_delivery())),
        ("hello.json", json(&gen_hello())),
        ("device.json", json(&gen_device())),
        ("resync.json", json(&gen_resync())),
        ("file.json", json(&gen_file())),
        ("receipt.json", json(&gen_receipt())),
    ]
}

pub fn vectors_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vectors")
}

fn main() {
    let dir = vectors_dir();
    std::fs::create_dir_all(&dir).expect("create tests/vectors");
    for (name, text) in generate() {
        let path = dir.join(name);
        let old = std::fs::read_to_string(&path).ok();
        std::fs::write(&path, &text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let cases = serde_json::from_str::<Vec<Value>>(&text).unwrap().len();
        let state = match old {
            None => "new",
            Some(o) if o == text => "unchanged",
            Some(_) => "CHANGED",
        };
        println!(
            "{name:<22} {cases:>3} cases  {:>7} bytes  {state}",
            text.len()
        );
    }
}
