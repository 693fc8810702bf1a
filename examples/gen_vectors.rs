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
use tern::proto::handshake::{joiner_agree, Agreement, InviterSecrets};
use tern::proto::hello::{Channel, Hello, HelloReply, Profile};
use tern::proto::invitation::{Invitation, SendQueue};
use tern::proto::keys::{DhKeyPair, Secret32};
use tern::proto::queue_msg::{self, QueueMessage, RATCHET_MSG_LEN};
use tern::proto::ratchet::{Ratchet, RatchetInit};
use tern::proto::rekey::{parse_link, AnyInvitation};
use tern::proto::security_code::{codes_match, security_code};
use tern::proto::ProtoError;
use tern::relay::address::{AddressError, Host, RelayAddress, Transport};
use tern::relay::codec::{CodecError, Reader, Writer};
use tern::relay::seal::{
    self, open_request, RelayIdentity, RequestSealer, SealError, BLOCK_LEN, REQUEST_LEN,
    RESPONSE_LEN,
};
use tern::relay::wire::{
    Command, ErrorCode, RelayInfo, Reply, Request, Response, WireError, DELIVERED_LEN,
    QUEUE_MSG_LEN,
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
        AddressError::Port => "port".into(),
        AddressError::Path => "path".into(),
        AddressError::Binary(c) => codec_err(c),
    }
}

pub fn wire_err(e: &WireError) -> String {
    match e {
        WireError::Codec(c) => codec_err(c),
        WireError::UnknownCommand(_) => "unknown_command".into(),
        WireError::UnknownResponse(_) => "unknown_response".into(),
        WireError::MessageLength(_) => "message_length".into(),
    }
}

pub fn seal_err(e: &SealError) -> String {
    match e {
        SealError::Length(_) => "length".into(),
        SealError::Version(_) => "version".into(),
        SealError::Open => "open".into(),
        SealError::PlaintextLength => "plaintext_length".into(),
        SealError::KeyAgreement => "key_agreement".into(),
    }
}

pub fn error_code_name(c: ErrorCode) -> &'static str {
    match c {
        ErrorCode::BadRequest => "bad_request",
        ErrorCode::Auth => "auth",
        ErrorCode::QueueFull => "queue_full",
        ErrorCode::Stale => "stale",
        ErrorCode::Access => "access",
        ErrorCode::NoMessage => "no_message",
        ErrorCode::Internal => "internal",
        ErrorCode::Unavailable => "unavailable",
    }
}

pub const ERROR_CODES: [ErrorCode; 8] = [
    ErrorCode::BadRequest,
    ErrorCode::Auth,
    ErrorCode::QueueFull,
    ErrorCode::Stale,
    ErrorCode::Access,
    ErrorCode::NoMessage,
    ErrorCode::Internal,
    ErrorCode::Unavailable,
];

pub fn error_code(name: &str) -> ErrorCode {
    *ERROR_CODES
        .iter()
        .find(|c| error_code_name(**c) == name)
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

    /// RFC 9458-style response sealing: key and nonce from
    /// HKDF(salt = enc || response nonce, ikm = exported secret).
    pub fn response_seal(secret: &[u8], enc: &[u8], response_nonce: &[u8], pt: &[u8]) -> Vec<u8> {
        let mut salt = enc.to_vec();
        salt.extend_from_slice(response_nonce);
        let key = hkdf(Some(&salt), secret, b"key", 32);
        let nonce = hkdf(Some(&salt), secret, b"nonce", 12);
        let mut out = response_nonce.to_vec();
        out.extend(chacha_seal(&key, &nonce, &[], pt));
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

    // --- handshake (PROTOCOL.md §5) ---

    pub fn transcript(i: &[u8; 32], r: &[u8; 32], j: &[u8; 32], e: &[u8; 32]) -> [u8; 32] {
        sha256(&[b"tern/v1 transcript", i, r, j, e])
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

    /// KDF_RK: (root key, chain key, next header key).
    pub fn kdf_rk(rk: &[u8; 32], dh: &[u8; 32]) -> ([u8; 32], [u8; 32], [u8; 32]) {
        let okm = hkdf(Some(rk), dh, b"tern/v1 ratchet root", 96);
        (take(&okm, 0), take(&okm, 32), take(&okm, 64))
    }

    /// KDF_CK: (next chain key, message key).
    pub fn kdf_ck(ck: &[u8; 32]) -> ([u8; 32], [u8; 32]) {
        (hmac(ck, &[0x02]), hmac(ck, &[0x01]))
    }

    pub fn header(dh: &[u8; 32], pn: u32, n: u32) -> [u8; 40] {
        let mut h = [0u8; 40];
        h[..32].copy_from_slice(dh);
        h[32..36].copy_from_slice(&pn.to_be_bytes());
        h[36..].copy_from_slice(&n.to_be_bytes());
        h
    }

    /// (ChaCha20-Poly1305 key, nonce) of a message key.
    pub fn message_cipher(mk: &[u8; 32]) -> ([u8; 32], [u8; 12]) {
        let okm = hkdf(None, mk, b"tern/v1 message key", 44);
        (take(&okm, 0), take(&okm, 32))
    }

    pub fn ratchet_message(
        hk: &[u8; 32],
        header_nonce: &[u8; 24],
        header: &[u8; 40],
        ad: &[u8; 32],
        mk: &[u8; 32],
        plaintext: &[u8],
    ) -> Vec<u8> {
        let mut out = header_nonce.to_vec();
        out.extend(xchacha_seal(hk, header_nonce, ad, header));
        let mut aad = ad.to_vec();
        aad.extend_from_slice(&out);
        let (key, nonce) = message_cipher(mk);
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

    pub fn digest(ratchet_msg: &[u8]) -> [u8; 32] {
        sha256(&[b"tern/v1 message digest", ratchet_msg])
    }

    pub fn delivery_cipher(queue_secret: &[u8; 32], msg_id: &[u8; 16]) -> ([u8; 32], [u8; 12]) {
        let okm = hkdf(Some(msg_id), queue_secret, b"tern/v1 delivery", 44);
        (take(&okm, 0), take(&okm, 32))
    }

    /// RFC 9180 base mode with DHKEM(X25519, HKDF-SHA256), HKDF-SHA256 and
    /// ChaCha20Poly1305 (suite 0x0020, 0x0001, 0x0003).
    pub mod hpke {
        use super::{chacha_seal, x25519, x25519_public};
        use hkdf::Hkdf;
        use sha2::Sha256;

        const KEM_SUITE: &[u8] = b"KEM\x00\x20";
        const HPKE_SUITE: &[u8] = b"HPKE\x00\x20\x00\x01\x00\x03";

        fn labeled_extract(suite: &[u8], salt: &[u8], label: &[u8], ikm: &[u8]) -> [u8; 32] {
            let mut m = b"HPKE-v1".to_vec();
            m.extend_from_slice(suite);
            m.extend_from_slice(label);
            m.extend_from_slice(ikm);
            Hkdf::<Sha256>::extract(Some(salt), &m).0.into()
        }

        fn labeled_expand(
            suite: &[u8],
            prk: &[u8; 32],
            label: &[u8],
            info: &[u8],
            len: usize,
        ) -> Vec<u8> {
            let mut i = (len as u16).to_be_bytes().to_vec();
            i.extend_from_slice(b"HPKE-v1");
            i.extend_from_slice(suite);
            i.extend_from_slice(label);
            i.extend_from_slice(info);
            let mut out = vec![0u8; len];
            Hkdf::<Sha256>::from_prk(prk)
                .expect("32-byte PRK")
                .expand(&i, &mut out)
                .expect("valid length");
            out
        }

        /// DeriveKeyPair(ikm): (skE, pkE).
        pub fn derive_keypair(ikm: &[u8]) -> ([u8; 32], [u8; 32]) {
            let prk = labeled_extract(KEM_SUITE, b"", b"dkp_prk", ikm);
            let sk: [u8; 32] = labeled_expand(KEM_SUITE, &prk, b"sk", b"", 32)
                .try_into()
                .expect("32");
            (sk, x25519_public(&sk))
        }

        fn extract_and_expand(dh: &[u8; 32], kem_context: &[u8]) -> [u8; 32] {
            let prk = labeled_extract(KEM_SUITE, b"", b"eae_prk", dh);
            labeled_expand(KEM_SUITE, &prk, b"shared_secret", kem_context, 32)
                .try_into()
                .expect("32")
        }

        /// Encap with a given ephemeral secret: (enc, shared secret).
        pub fn encap(sk_e: &[u8; 32], pk_r: &[u8; 32]) -> ([u8; 32], [u8; 32]) {
            let enc = x25519_public(sk_e);
            let dh = x25519(sk_e, pk_r);
            let mut ctx = enc.to_vec();
            ctx.extend_from_slice(pk_r);
            (enc, extract_and_expand(&dh, &ctx))
        }

        pub fn decap(sk_r: &[u8; 32], enc: &[u8; 32]) -> [u8; 32] {
            let dh = x25519(sk_r, enc);
            let mut ctx = enc.to_vec();
            ctx.extend_from_slice(&x25519_public(sk_r));
            extract_and_expand(&dh, &ctx)
        }

        pub struct Context {
            pub key: [u8; 32],
            pub base_nonce: [u8; 12],
            pub exporter_secret: [u8; 32],
        }

        pub fn key_schedule(shared_secret: &[u8; 32], info: &[u8]) -> Context {
            let psk_id_hash = labeled_extract(HPKE_SUITE, b"", b"psk_id_hash", b"");
            let info_hash = labeled_extract(HPKE_SUITE, b"", b"info_hash", info);
            let mut ks = vec![0u8]; // mode_base
            ks.extend_from_slice(&psk_id_hash);
            ks.extend_from_slice(&info_hash);
            let secret = labeled_extract(HPKE_SUITE, shared_secret, b"secret", b"");
            Context {
                key: labeled_expand(HPKE_SUITE, &secret, b"key", &ks, 32)
                    .try_into()
                    .expect("32"),
                base_nonce: labeled_expand(HPKE_SUITE, &secret, b"base_nonce", &ks, 12)
                    .try_into()
                    .expect("12"),
                exporter_secret: labeled_expand(HPKE_SUITE, &secret, b"exp", &ks, 32)
                    .try_into()
                    .expect("32"),
            }
        }

        impl Context {
            /// The first (and only) message: sequence number 0.
            pub fn seal_first(&self, aad: &[u8], pt: &[u8]) -> Vec<u8> {
                chacha_seal(&self.key, &self.base_nonce, aad, pt)
            }

            pub fn export(&self, exporter_context: &[u8], len: usize) -> Vec<u8> {
                labeled_expand(
                    HPKE_SUITE,
                    &self.exporter_secret,
                    b"sec",
                    exporter_context,
                    len,
                )
            }
        }
    }
}

use reference as refc;

/// Labels fixed by the protocol (relay/src/seal.rs).
pub const HPKE_INFO: &[u8] = b"tern/v1 relay request";
pub const RESPONSE_EXPORT: &[u8] = b"tern/v1 relay response";
pub const SIGNATURE_CONTEXT: &[u8] = b"tern/v1 signed request";

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

fn encode_address(a: &RelayAddress) -> Vec<u8> {
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
        ("kind 2 is reserved", with(1, 2), "invalid: invitation kind"),
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

    let link0 = format!("TERN:{}", BASE32_NOPAD.encode(one));
    let body0 = &link0[5..];
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
    let nonzero_tail = format!(
        "TERN:{}{}",
        &body0[..body0.len() - 1],
        alphabet[idx | 1] as char
    );
    let invalid_link: Vec<(&str, String, &str)> = vec![
        ("not a link at all", "hello".into(), "not_an_invitation"),
        (
            "the prefix without its colon",
            format!("TERN{body0}"),
            "not_an_invitation",
        ),
        (
            "another scheme",
            format!("https:{body0}"),
            "not_an_invitation",
        ),
        (
            "characters outside the base32 alphabet",
            "TERN:!!!".into(),
            "not_an_invitation",
        ),
        (
            "base32 with '=' padding",
            format!("{link0}======"),
            "not_an_invitation",
        ),
        (
            "a base32 length that encodes no whole byte",
            format!("TERN:{bad_len}"),
            "not_an_invitation",
        ),
        (
            "non-zero trailing bits in the last base32 character",
            nonzero_tail,
            "not_an_invitation",
        ),
        (
            "the 0 and 1 digits are not base32 (no O/I substitution)",
            format!(
                "TERN:{}",
                body0.replacen(|c: char| c.is_ascii_alphabetic(), "0", 1)
            ),
            "not_an_invitation",
        ),
        (
            "a prefix with nothing after it",
            "TERN:".into(),
            "truncated",
        ),
        (
            "a well-formed link to a version 2 invitation",
            format!("TERN:{}", BASE32_NOPAD.encode(&with(0, 2))),
            "unsupported_version",
        ),
    ];
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
// relay_requests.json and relay_responses.json
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct CommandFields {
    /// INFO, CREATE, SECURE, SEND, FETCH, ACK, DELETE, PEEK or ACK_UPTO.
    pub name: String,
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
    pub wait_ms: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub msg_id: Option<String>,
    /// PEEK: the message the answer must come after.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
}

fn o(b: &[u8]) -> Option<String> {
    Some(hex(b))
}

impl CommandFields {
    pub fn of(c: &Command) -> Self {
        let name = c.name().to_string();
        match c {
            Command::Info => Self {
                name,
                ..Default::default()
            },
            Command::Create {
                access_key,
                recipient_auth,
                recipient_dh,
            } => Self {
                name,
                access_key: access_key.clone(),
                recipient_auth: o(recipient_auth),
                recipient_dh: o(recipient_dh),
                ..Default::default()
            },
            Command::Secure {
                recipient_id,
                sender_auth,
            } => Self {
                name,
                recipient_id: o(recipient_id),
                sender_auth: o(sender_auth),
                ..Default::default()
            },
            Command::Send { sender_id, message } => Self {
                name,
                sender_id: o(sender_id),
                message: Some(Padded::of(message)),
                ..Default::default()
            },
            Command::Fetch {
                recipient_id,
                wait_ms,
            } => Self {
                name,
                recipient_id: o(recipient_id),
                wait_ms: Some(*wait_ms),
                ..Default::default()
            },
            Command::Ack {
                recipient_id,
                msg_id,
            } => Self {
                name,
                recipient_id: o(recipient_id),
                msg_id: o(msg_id),
                ..Default::default()
            },
            Command::Delete { recipient_id } => Self {
                name,
                recipient_id: o(recipient_id),
                ..Default::default()
            },
            Command::Peek {
                recipient_id,
                after,
            } => Self {
                name,
                recipient_id: o(recipient_id),
                after: o(after),
                ..Default::default()
            },
            Command::AckUpTo {
                recipient_id,
                msg_id,
            } => Self {
                name,
                recipient_id: o(recipient_id),
                msg_id: o(msg_id),
                ..Default::default()
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
            "FETCH" => Command::Fetch {
                recipient_id: h16(&self.recipient_id),
                wait_ms: self.wait_ms.expect("wait_ms"),
            },
            "ACK" => Command::Ack {
                recipient_id: h16(&self.recipient_id),
                msg_id: h16(&self.msg_id),
            },
            "DELETE" => Command::Delete {
                recipient_id: h16(&self.recipient_id),
            },
            "PEEK" => Command::Peek {
                recipient_id: h16(&self.recipient_id),
                after: h16(&self.after),
            },
            "ACK_UPTO" => Command::AckUpTo {
                recipient_id: h16(&self.recipient_id),
                msg_id: h16(&self.msg_id),
            },
            n => panic!("command {n}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestCase {
    pub comment: String,
    pub result: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<CommandFields>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_ms: Option<u64>,
    /// HPKE `enc` of the block carrying the request (bound into the signature).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enc: Option<String>,
    /// Ed25519 secret key (seed) that signed the request, when it can be re-signed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_key: Option<String>,
    /// The key the relay verifies against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verifying_key: Option<String>,
    /// Length of the signed prefix of the plaintext (where the signature starts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signed_len: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
    /// Whether the signature verifies under `verifying_key` and `enc`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_signature: Option<bool>,
    pub plaintext: Padded,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The message an Ed25519 request signature covers.
pub fn signed_message(enc: &[u8; 32], plaintext: &[u8], signed_len: usize) -> Vec<u8> {
    let mut m = SIGNATURE_CONTEXT.to_vec();
    m.extend_from_slice(enc);
    m.extend_from_slice(&plaintext[..signed_len]);
    m
}

/// Where the signature field starts in an encoded request.
pub fn signature_offset(c: &Command) -> Option<usize> {
    let body = match c {
        Command::Info => return None,
        Command::Create { access_key, .. } => {
            1 + access_key.as_deref().map_or(0, str::len) + 32 + 32
        }
        Command::Secure { .. } => 16 + 32,
        Command::Send { .. } => 16 + 1 + QUEUE_MSG_LEN,
        Command::Fetch { .. } => 16 + 4,
        Command::Ack { .. } => 16 + 16,
        Command::Delete { .. } => 16,
        Command::Peek { .. } | Command::AckUpTo { .. } => 16 + 16,
    };
    Some(1 + 8 + body)
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

fn gen_relay_requests() -> Vec<RequestCase> {
    let mut rng = seeded(3);
    let mut out = Vec::new();
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
            "CREATE on an open relay: empty access key",
            Command::Create {
                access_key: None,
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
            "FETCH with a long-poll wait",
            Command::Fetch {
                recipient_id: random(&mut rng),
                wait_ms: 25_000,
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
            "DELETE",
            Command::Delete {
                recipient_id: random(&mut rng),
            },
            true,
        ),
        (
            "PEEK",
            Command::Peek {
                recipient_id: random(&mut rng),
                after: random(&mut rng),
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
    ];
    let mut fetch = None;
    for (comment, cmd, signed) in commands {
        let time_ms = 1_767_225_600_000 + u64::from(rng.next_u32());
        let enc: [u8; 32] = random(&mut rng);
        let signer = signed.then_some(&key);
        let pt = Request::encode(&cmd, time_ms, &enc, signer);
        assert_eq!(pt.len(), REQUEST_LEN);
        let req = Request::decode(&pt).unwrap();
        assert!(req.command == cmd && req.time_ms == time_ms);
        let signed_len = signature_offset(&cmd);
        let signature = signer.map(|k| {
            let n = signed_len.unwrap();
            let sig = k.sign(&signed_message(&enc, &pt, n)).to_bytes();
            assert_eq!(&pt[n..n + 64], &sig);
            assert_eq!(req.signature, Some(sig));
            assert!(req.verify(&pt, &enc, key.verifying_key().as_bytes()));
            sig
        });
        if matches!(cmd, Command::Fetch { .. }) {
            fetch = Some((cmd.clone(), time_ms, enc, pt.clone()));
        }
        out.push(RequestCase {
            comment: comment.into(),
            result: "valid".into(),
            command: Some(CommandFields::of(&cmd)),
            time_ms: Some(time_ms),
            enc: Some(hex(&enc)),
            signing_key: signer.map(|k| hex(k.as_bytes())),
            verifying_key: signer.map(|k| hex(k.verifying_key().as_bytes())),
            signed_len: signed_len.filter(|_| signed),
            signature: signature.map(|s| hex(&s)),
            valid_signature: signed.then_some(true),
            plaintext: Padded::of(&pt),
            error: None,
        });
    }

    // Requests that decode but whose signature the relay must refuse.
    let (cmd, time_ms, enc, pt) = fetch.unwrap();
    let n = signature_offset(&cmd).unwrap();
    let mut non_canonical = pt.clone();
    let s_plus_l = add_le(&pt[n + 32..n + 64], &ED25519_L);
    non_canonical[n + 32..n + 64].copy_from_slice(&s_plus_l);
    let mut weak = pt.clone();
    // The identity point as R, and S = 0: [S]B = R + [k]A holds for A = identity.
    let mut identity = [0u8; 32];
    identity[0] = 1;
    weak[n..n + 32].copy_from_slice(&identity);
    weak[n + 32..n + 64].fill(0);
    // (comment, plaintext, signer, verifying key)
    type Refused<'a> = (&'a str, Vec<u8>, Option<&'a SigningKey>, Key);
    let cases: Vec<Refused> = vec![
        (
            "FETCH signed by another key than the one the relay holds",
            pt.clone(),
            Some(&key),
            other.verifying_key().to_bytes(),
        ),
        (
            "FETCH whose signature scalar S is replaced by S + L (non-canonical; malleable under lax Ed25519)",
            non_canonical,
            None,
            key.verifying_key().to_bytes(),
        ),
        (
            "FETCH with R = identity, S = 0 against the identity public key: verifies any message under cofactorless lax rules; strict verification refuses the small-order key",
            weak,
            None,
            identity,
        ),
    ];
    for (comment, p, signer, vk) in cases {
        let req = Request::decode(&p).unwrap();
        assert!(!req.verify(&p, &enc, &vk), "{comment}");
        out.push(RequestCase {
            comment: comment.into(),
            result: "valid".into(),
            command: Some(CommandFields::of(&cmd)),
            time_ms: Some(time_ms),
            enc: Some(hex(&enc)),
            signing_key: signer.map(|k| hex(k.as_bytes())),
            verifying_key: Some(hex(&vk)),
            signed_len: Some(n),
            signature: Some(hex(&p[n..n + 64])),
            valid_signature: Some(false),
            plaintext: Padded::of(&p),
            error: None,
        });
    }

    // Plaintexts the relay must refuse to parse.
    let info = Request::encode(&Command::Info, 1, &[0; 32], None);
    let create = Request::encode(
        &Command::Create {
            access_key: Some("k".into()),
            recipient_auth: [1; 32],
            recipient_dh: [2; 32],
        },
        1,
        &[0; 32],
        Some(&key),
    );
    let send = Request::encode(
        &Command::Send {
            sender_id: [5; 16],
            message: [vec![1], vec![0; QUEUE_MSG_LEN - 1]].concat(),
        },
        1,
        &[0; 32],
        None,
    );
    let with = |b: &[u8], at: usize, v: u8| {
        let mut b = b.to_vec();
        b[at] = v;
        b
    };
    let mut long_key = vec![0x02, 0, 0, 0, 0, 0, 0, 0, 1, 65];
    long_key.extend(vec![b'a'; 65]);
    long_key.resize(REQUEST_LEN, 0);
    let mut bad_utf8 = create.clone();
    bad_utf8[10] = 0xff;
    let mut sig_on_unsigned = send.clone();
    sig_on_unsigned[1 + 8 + 16 + 1 + QUEUE_MSG_LEN] = 1;
    let fetch_cut = pt[..n + 63].to_vec();
    let invalid: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "command 0x00 does not exist",
            with(&info, 0, 0x00),
            "unknown_command",
        ),
        (
            "command 0x0a does not exist",
            with(&info, 0, 0x0a),
            "unknown_command",
        ),
        (
            "a non-zero byte in the padding",
            with(&info, 9, 1),
            "bad_padding",
        ),
        (
            "CREATE with a 65-byte access key",
            long_key,
            "invalid: access key",
        ),
        (
            "CREATE with an access key that is not UTF-8",
            bad_utf8,
            "invalid: access key",
        ),
        (
            "SEND with signed flag 2",
            with(&send, 1 + 8 + 16, 2),
            "invalid: signed flag",
        ),
        (
            "unsigned SEND with a non-zero signature field",
            sig_on_unsigned,
            "invalid: unsigned request with a signature",
        ),
        ("FETCH cut off inside its signature", fetch_cut, "truncated"),
        ("empty input", vec![], "truncated"),
    ];
    for (comment, p, err) in invalid {
        expect_err(Request::decode(&p), wire_err, err, comment);
        out.push(RequestCase {
            comment: comment.into(),
            result: "invalid".into(),
            command: None,
            time_ms: None,
            enc: None,
            signing_key: None,
            verifying_key: None,
            signed_len: None,
            signature: None,
            valid_signature: None,
            plaintext: Padded::of(&p),
            error: Some(err.into()),
        });
    }
    out
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ReplyFields {
    /// OK, INFO, QUEUE, MESSAGE, EMPTY or ERROR.
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_version: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_version: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_wait_ms: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipient_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sender_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_dh: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub msg_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub received_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<Padded>,
    /// The error code's name (see README).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

impl ReplyFields {
    pub fn of(r: &Reply) -> Self {
        let k = |kind: &str| Self {
            kind: kind.into(),
            ..Default::default()
        };
        match r {
            Reply::Ok => k("OK"),
            Reply::Empty => k("EMPTY"),
            Reply::Info(i) => Self {
                min_version: Some(i.min_version),
                max_version: Some(i.max_version),
                open: Some(i.open),
                max_pending: Some(i.max_pending),
                ttl_secs: Some(i.ttl_secs),
                max_wait_ms: Some(i.max_wait_ms),
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
                ..k("MESSAGE")
            },
            Reply::Error(c) => Self {
                code: Some(error_code_name(*c).into()),
                ..k("ERROR")
            },
        }
    }

    pub fn to_reply(&self) -> Reply {
        let h16 = |v: &Option<String>| arr::<16>(v.as_deref().expect("16-byte field"));
        match self.kind.as_str() {
            "OK" => Reply::Ok,
            "EMPTY" => Reply::Empty,
            "INFO" => Reply::Info(RelayInfo {
                min_version: self.min_version.expect("min_version"),
                max_version: self.max_version.expect("max_version"),
                open: self.open.expect("open"),
                max_pending: self.max_pending.expect("max_pending"),
                ttl_secs: self.ttl_secs.expect("ttl_secs"),
                max_wait_ms: self.max_wait_ms.expect("max_wait_ms"),
            }),
            "QUEUE" => Reply::Queue {
                recipient_id: h16(&self.recipient_id),
                sender_id: h16(&self.sender_id),
                relay_dh: arr(self.relay_dh.as_deref().expect("relay_dh")),
            },
            "MESSAGE" => Reply::Message {
                msg_id: h16(&self.msg_id),
                received_at: self.received_at.expect("received_at"),
                body: self.body.as_ref().expect("body").bytes(),
            },
            "ERROR" => Reply::Error(error_code(self.code.as_deref().expect("code"))),
            k => panic!("reply kind {k}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResponseCase {
    pub comment: String,
    pub result: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<ReplyFields>,
    pub plaintext: Padded,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn gen_relay_responses() -> Vec<ResponseCase> {
    let mut rng = seeded(4);
    let mut out = Vec::new();
    let mut body = random_vec(&mut rng, 48);
    body.resize(DELIVERED_LEN, 0);
    let mut replies: Vec<(String, Reply)> = vec![
        ("OK".into(), Reply::Ok),
        ("EMPTY: no message pending".into(), Reply::Empty),
        (
            "INFO of an open relay".into(),
            Reply::Info(RelayInfo {
                min_version: 1,
                max_version: 1,
                open: true,
                max_pending: 1000,
                ttl_secs: 1_209_600,
                max_wait_ms: 30_000,
            }),
        ),
        (
            "INFO of a relay that needs an access key to create queues".into(),
            Reply::Info(RelayInfo {
                min_version: 1,
                max_version: 3,
                open: false,
                max_pending: 0xdead_beef,
                ttl_secs: 7,
                max_wait_ms: 0,
            }),
        ),
        (
            "QUEUE: a new queue's ids and the relay's X25519 key for it".into(),
            Reply::Queue {
                recipient_id: random(&mut rng),
                sender_id: random(&mut rng),
                relay_dh: random(&mut rng),
            },
        ),
        (
            "MESSAGE: a pending message (the body is DELIVERED_LEN bytes of delivery ciphertext; here mostly zeros)".into(),
            Reply::Message {
                msg_id: random(&mut rng),
                received_at: 1_767_225_600,
                body,
            },
        ),
    ];
    for c in ERROR_CODES {
        replies.push((format!("ERROR {}", error_code_name(c)), Reply::Error(c)));
    }
    let mut ok = Vec::new();
    for (comment, reply) in replies {
        let time_ms = 1_767_225_600_000 + u64::from(rng.next_u32());
        let resp = Response { time_ms, reply };
        let pt = resp.encode();
        assert_eq!(pt.len(), RESPONSE_LEN);
        assert_eq!(Response::decode(&pt).unwrap(), resp);
        ok.push(pt.clone());
        out.push(ResponseCase {
            comment,
            result: "valid".into(),
            time_ms: Some(time_ms),
            reply: Some(ReplyFields::of(&resp.reply)),
            plaintext: Padded::of(&pt),
            error: None,
        });
    }
    let with = |i: usize, at: usize, v: u8| {
        let mut b = ok[i].clone();
        b[at] = v;
        b
    };
    let invalid: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "kind 0x00 does not exist",
            with(0, 0, 0x00),
            "unknown_response",
        ),
        (
            "kind 0x85 does not exist",
            with(0, 0, 0x85),
            "unknown_response",
        ),
        (
            "kind 0x04 is a command code, not a response",
            with(0, 0, 0x04),
            "unknown_response",
        ),
        (
            "INFO with open flag 2",
            with(2, 11, 2),
            "invalid: open flag",
        ),
        ("ERROR with code 0", with(6, 9, 0), "invalid: error code"),
        ("ERROR with code 9", with(6, 9, 9), "invalid: error code"),
        (
            "a non-zero byte in the padding",
            with(1, 9, 1),
            "bad_padding",
        ),
        (
            "MESSAGE cut off inside its body",
            ok[5][..9 + 16 + 8 + 100].to_vec(),
            "truncated",
        ),
        ("empty input", vec![], "truncated"),
    ];
    for (comment, p, err) in invalid {
        expect_err(Response::decode(&p), wire_err, err, comment);
        out.push(ResponseCase {
            comment: comment.into(),
            result: "invalid".into(),
            time_ms: None,
            reply: None,
            plaintext: Padded::of(&p),
            error: Some(err.into()),
        });
    }
    out
}

// ---------------------------------------------------------------------------
// request_seal.json
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SealCase {
    pub comment: String,
    pub result: String,
    /// The relay's X25519 identity secret; `relay_public` goes in its address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_secret: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_public: Option<String>,
    /// The 32 random bytes the client draws: HPKE's ikmE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ikm_e: Option<String>,
    /// DeriveKeyPair(ikmE): the ephemeral secret and its public key `enc`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sk_e: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enc: Option<String>,
    /// HPKE intermediate values (RFC 9180 §5.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_secret: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_nonce: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exporter_secret: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<Padded>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block: Option<String>,
    /// Export("tern/v1 relay response", 32).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_key: Option<String>,
    /// The relay's 32 random bytes that start the response block.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_nonce: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<Padded>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_block: Option<String>,
    // Invalid cases: derived from valid case `of_case`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub of_case: Option<usize>,
    /// "request" (the relay opens `block`) or "response" (the client opens `response_block`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mutation: Option<Mutation>,
    /// Use this case's keys instead: a request is opened by this case's
    /// relay, a response with this case's response key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys_of_case: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn gen_request_seal() -> Vec<SealCase> {
    let mut rng = seeded(5);
    let mut out = Vec::new();
    let signer = SigningKey::from_bytes(&random(&mut rng));
    let specs: Vec<(&str, Command, bool, Reply)> = vec![
        (
            "INFO, answered with INFO",
            Command::Info,
            false,
            Reply::Info(RelayInfo {
                min_version: 1,
                max_version: 1,
                open: true,
                max_pending: 1000,
                ttl_secs: 1_209_600,
                max_wait_ms: 30_000,
            }),
        ),
        (
            "a signed FETCH (its signature covers enc), answered with EMPTY",
            Command::Fetch {
                recipient_id: random(&mut rng),
                wait_ms: 20_000,
            },
            true,
            Reply::Empty,
        ),
        (
            "CREATE, answered with QUEUE",
            Command::Create {
                access_key: Some("s3cret".into()),
                recipient_auth: signer.verifying_key().to_bytes(),
                recipient_dh: random(&mut rng),
            },
            true,
            Reply::Queue {
                recipient_id: random(&mut rng),
                sender_id: random(&mut rng),
                relay_dh: random(&mut rng),
            },
        ),
    ];
    let mut identities = Vec::new();
    for (comment, cmd, signed, reply) in specs {
        let relay_secret: [u8; 32] = random(&mut rng);
        let identity = RelayIdentity::from_secret(&relay_secret);
        let relay_public = identity.public();
        assert_eq!(relay_public, refc::x25519_public(&relay_secret));
        let ikm_e: [u8; 32] = random(&mut rng);
        let mut frng = FixedRng::new(&ikm_e);
        let sealer = RequestSealer::new(&relay_public, &mut frng).unwrap();
        frng.assert_used_up("RequestSealer::new");
        let enc = *sealer.enc();
        let (sk_e, pk_e) = refc::hpke::derive_keypair(&ikm_e);
        assert_eq!(pk_e, enc, "HPKE DeriveKeyPair");
        let time_ms = 1_767_225_600_000 + u64::from(rng.next_u32());
        let request = Request::encode(&cmd, time_ms, &enc, signed.then_some(&signer));
        let (block, client_key) = sealer.seal(&request).unwrap();

        let (enc2, ss) = refc::hpke::encap(&sk_e, &relay_public);
        assert_eq!(enc2, enc);
        assert_eq!(refc::hpke::decap(&relay_secret, &enc), ss);
        let ctx = refc::hpke::key_schedule(&ss, HPKE_INFO);
        let mut ref_block = vec![seal::TRANSPORT_VERSION];
        ref_block.extend_from_slice(&enc);
        ref_block.extend(ctx.seal_first(&[seal::TRANSPORT_VERSION], &request));
        assert_eq!(ref_block, block, "request block");
        assert_eq!(block.len(), BLOCK_LEN);

        let opened = open_request(&identity, &block).unwrap();
        assert_eq!(opened.plaintext, request);
        assert_eq!(opened.enc, enc);
        let response = Response {
            time_ms: time_ms + 17,
            reply,
        }
        .encode();
        let response_nonce: [u8; 32] = random(&mut rng);
        let response_block = opened
            .response_key
            .seal_response_with_nonce(&response, &response_nonce)
            .unwrap();
        let response_key = ctx.export(RESPONSE_EXPORT, 32);
        assert_eq!(
            refc::response_seal(&response_key, &enc, &response_nonce, &response),
            response_block,
            "response block"
        );
        assert_eq!(client_key.open_response(&response_block).unwrap(), response);
        identities.push(identity);
        out.push(SealCase {
            comment: comment.into(),
            result: "valid".into(),
            relay_secret: o(&relay_secret),
            relay_public: o(&relay_public),
            ikm_e: o(&ikm_e),
            sk_e: o(&sk_e),
            enc: o(&enc),
            shared_secret: o(&ss),
            key: o(&ctx.key),
            base_nonce: o(&ctx.base_nonce),
            exporter_secret: o(&ctx.exporter_secret),
            request: Some(Padded::of(&request)),
            block: o(&block),
            response_key: o(&response_key),
            response_nonce: o(&response_nonce),
            response: Some(Padded::of(&response)),
            response_block: o(&response_block),
            of_case: None,
            target: None,
            mutation: None,
            keys_of_case: None,
            error: None,
        });
    }

    // (comment, of_case, target, mutation, keys_of_case, error)
    type Invalid<'a> = (
        &'a str,
        usize,
        &'a str,
        Option<Mutation>,
        Option<usize>,
        &'a str,
    );
    let invalid: Vec<Invalid> = vec![
        (
            "transport version 2",
            0,
            "request",
            xor(0, 0x03),
            None,
            "version",
        ),
        (
            "transport version 0",
            0,
            "request",
            xor(0, 0x01),
            None,
            "version",
        ),
        (
            "a flipped bit in enc",
            0,
            "request",
            xor(1, 0x01),
            None,
            "open",
        ),
        (
            "enc's top bit flipped: X25519 ignores it, but HPKE binds the enc bytes",
            0,
            "request",
            xor(32, 0x80),
            None,
            "open",
        ),
        (
            "a flipped bit in the ciphertext",
            0,
            "request",
            xor(1000, 0x40),
            None,
            "open",
        ),
        (
            "a flipped bit in the padding's ciphertext",
            1,
            "request",
            xor(BLOCK_LEN - 17, 0x01),
            None,
            "open",
        ),
        (
            "a flipped bit in the tag",
            1,
            "request",
            xor(BLOCK_LEN - 1, 0x80),
            None,
            "open",
        ),
        (
            "one byte short",
            0,
            "request",
            Some(Mutation::Truncate { len: BLOCK_LEN - 1 }),
            None,
            "length",
        ),
        (
            "one byte too many",
            0,
            "request",
            Some(Mutation::Append { hex: "00".into() }),
            None,
            "length",
        ),
        (
            "a block sealed to another relay (case 1's block opened by case 0's relay)",
            1,
            "request",
            None,
            Some(0),
            "open",
        ),
        (
            "a response with a flipped bit",
            0,
            "response",
            xor(7, 0x01),
            None,
            "open",
        ),
        (
            "a response with a flipped bit in the tag",
            2,
            "response",
            xor(BLOCK_LEN - 1, 0x01),
            None,
            "open",
        ),
        (
            "a response one byte short",
            0,
            "response",
            Some(Mutation::Truncate { len: BLOCK_LEN - 1 }),
            None,
            "length",
        ),
        (
            "case 1's response opened with case 0's response key",
            1,
            "response",
            None,
            Some(0),
            "open",
        ),
    ];
    for (comment, of, target, mutation, other, err) in invalid {
        let base = &out[of];
        let mut_ = |b: &[u8]| mutation.as_ref().map_or(b.to_vec(), |m| m.apply(b));
        if target == "request" {
            let block = mut_(&unhex(base.block.as_ref().unwrap()));
            let id = &identities[other.unwrap_or(of)];
            expect_err(open_request(id, &block), seal_err, err, comment);
        } else {
            let rb = mut_(&unhex(base.response_block.as_ref().unwrap()));
            let k = open_request(
                &identities[other.unwrap_or(of)],
                &unhex(out[other.unwrap_or(of)].block.as_ref().unwrap()),
            )
            .unwrap()
            .response_key;
            expect_err(k.open_response(&rb), seal_err, err, comment);
        }
        out.push(SealCase {
            comment: comment.into(),
            result: "invalid".into(),
            relay_secret: None,
            relay_public: None,
            ikm_e: None,
            sk_e: None,
            enc: None,
            shared_secret: None,
            key: None,
            base_nonce: None,
            exporter_secret: None,
            request: None,
            block: None,
            response_key: None,
            response_nonce: None,
            response: None,
            response_block: None,
            of_case: Some(of),
            target: Some(target.into()),
            mutation,
            keys_of_case: other,
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

fn agreement_for(secrets: &[[u8; 32]; 4]) -> (Agreement, Agreement) {
    let inviter = InviterSecrets {
        invitation: DhKeyPair::from_secret(Secret32(secrets[0])),
        ratchet: DhKeyPair::from_secret(Secret32(secrets[1])),
    };
    let mut frng = FixedRng::new(&[secrets[2], secrets[3]].concat());
    let j = joiner_agree(
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
        let th = refc::transcript(&p[0], &p[1], &p[2], &p[3]);
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
            joiner_agree(&ik, &rk, &mut frng),
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
    /// The 32 bytes the initiator draws for its first ratchet key.
    pub initiator_ratchet_secret: String,
    pub initiator_ratchet_key: String,
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
    /// starts a new receiving chain.
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
    View {
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

struct Conversation {
    rng: StdRng,
    init: RatchetInitFields,
    ad: [u8; 32],
    parties: [Ratchet; 2],
    sent: Vec<(Vec<u8>, [u8; 32])>,
    steps: Vec<RatchetStep>,
}

fn party(p: usize) -> String {
    PARTIES[p].to_string()
}

impl Conversation {
    fn new(mut rng: StdRng, init: RatchetInit, responder_secret: [u8; 32]) -> Self {
        let initiator_secret: [u8; 32] = random(&mut rng);
        let bob = DhKeyPair::from_secret(Secret32(responder_secret));
        let mut frng = FixedRng::new(&initiator_secret);
        let alice = Ratchet::init_initiator(&init, &bob.public(), &mut frng).unwrap();
        frng.assert_used_up("init_initiator");
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
        let header = refc::header(&before.dhs_public, before.pn, before.ns);
        assert_eq!(
            refc::ratchet_message(&hk, &nonce, &header, &self.ad, &mk, plaintext),
            bytes,
            "ratchet message"
        );
        self.sent.push((bytes.clone(), before.dhs_public));
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
        let candidate: [u8; 32] = random(&mut self.rng);
        let mut frng = FixedRng::new(&candidate);
        let (bytes, sender_dh) = self.sent[m].clone();
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
                // A DH ratchet step draws 32 bytes; a message of the current
                // chain or a late one of an old chain draws none.
                assert!(used == 0 || used == 32, "drew {used} random bytes");
                if before.dhr == Some(sender_dh) {
                    assert_eq!(used, 0, "a message of the current chain");
                }
                if used == 32 {
                    let after = view(&self.parties[p]);
                    let dh_r = refc::x25519(&before.dhs_secret, &sender_dh);
                    let (rk1, ckr, nhkr) = refc::kdf_rk(&before.rk, &dh_r);
                    let new_pub = public_of(&candidate);
                    let dh_s = refc::x25519(&candidate, &sender_dh);
                    let (rk2, cks, nhks) = refc::kdf_rk(&rk1, &dh_s);
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
            "type 0x03 does not exist",
            0,
            xor(0, 0x01),
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
        let qs = seal::queue_secret(&x25519_dalek::StaticSecret::from(rs), &cp).unwrap();
        let qs2 = seal::queue_secret(&x25519_dalek::StaticSecret::from(cs), &rp).unwrap();
        assert_eq!(*qs, *qs2);
        assert_eq!(*qs, refc::x25519(&rs, &cp));
        let msg_id: [u8; 16] = random(&mut rng);
        let ct = seal::delivery_seal(&qs, &msg_id, &msg);
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
            seal::delivery_open(&qs_, &id_, &input),
            seal_err,
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
            seal::queue_secret(&x25519_dalek::StaticSecret::from(rs), &p),
            seal_err,
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
            "invalid: avatar: a PNG or JPEG of at most 12 KiB",
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
    assert_eq!(link, format!("TERN:{}", BASE32_NOPAD.encode(&binary)));
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
        ("relay_requests.json", json(&gen_relay_requests())),
        ("relay_responses.json", json(&gen_relay_responses())),
        ("request_seal.json", json(&gen_request_seal())),
        ("handshake.json", json(&gen_handshake())),
        ("security_code.json", json(&gen_security_code())),
        ("ratchet.json", json(&gen_ratchet())),
        ("envelope.json", json(&gen_envelope())),
        ("envelope_chain.json", json(&gen_envelope_chain())),
        ("queue_layer.json", json(&gen_queue_layer())),
        ("delivery.json", json(&gen_delivery())),
        ("hello.json", json(&gen_hello())),
        ("device.json", json(&gen_device())),
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
