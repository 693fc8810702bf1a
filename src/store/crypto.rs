//! Record encryption: keys derived from the profile identity, XChaCha20-Poly1305
//! sealing with associated data, and keyed hashes that hide row names.

use age::secrecy::ExposeSecret;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use rand::{rngs::OsRng, RngCore};
use sha2::Sha256;
use zeroize::Zeroizing;

/// First byte of every sealed blob, so the format can change later without
/// guessing. It is also covered by the associated data.
const SEAL_VERSION: u8 = 1;
pub(crate) const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;

/// Plaintexts are padded with JSON whitespace to a multiple of this, so the
/// ciphertext length tells only roughly how long a message or record is.
/// serde_json ignores trailing whitespace, so no length field is needed.
const PAD_TO: usize = 64;

const INFO_DATA_KEY: &[u8] = b"tern/v1 store key";
const INFO_NAME_KEY: &[u8] = b"tern/v1 store name key";

/// Where a sealed value lives. It goes into the associated data, so a
/// ciphertext copied to another table, row or sequence number fails to open.
pub(crate) enum Slot<'a> {
    Meta(&'a str),
    KvValue(&'a [u8; 32]),
    KvName(&'a [u8; 32]),
    Log(&'a [u8; 32], u64),
}

impl Slot<'_> {
    fn associated_data(&self) -> Vec<u8> {
        let mut ad = Vec::with_capacity(64);
        ad.extend_from_slice(b"tern/v1 record\0");
        ad.push(SEAL_VERSION);
        match self {
            Slot::Meta(name) => {
                ad.extend_from_slice(b"meta\0");
                ad.extend_from_slice(name.as_bytes());
            }
            Slot::KvValue(id) => {
                ad.extend_from_slice(b"kv.value\0");
                ad.extend_from_slice(&id[..]);
            }
            Slot::KvName(id) => {
                ad.extend_from_slice(b"kv.name\0");
                ad.extend_from_slice(&id[..]);
            }
            Slot::Log(id, seq) => {
                ad.extend_from_slice(b"log\0");
                ad.extend_from_slice(&id[..]);
                ad.extend_from_slice(&seq.to_be_bytes());
            }
        }
        ad
    }
}

/// Domains for the keyed name hashes: the same string used as a kv key, a
/// log name and a seen-set name gives three unrelated row ids.
#[derive(Clone, Copy)]
pub(crate) enum NameKind {
    Kv,
    KvBucket,
    Log,
    SeenSet,
    SeenDigest,
}

impl NameKind {
    fn label(self) -> &'static [u8] {
        match self {
            NameKind::Kv => b"kv\0",
            NameKind::KvBucket => b"kv-bucket\0",
            NameKind::Log => b"log\0",
            NameKind::SeenSet => b"seen-set\0",
            NameKind::SeenDigest => b"seen-digest\0",
        }
    }
}

/// How many bytes of a name id are kept: the row id columns hold 32, the
/// bucket and seen-digest columns 16 (see `SHORT_ID` in the store).
impl NameKind {
    fn kept(self) -> usize {
        match self {
            NameKind::KvBucket | NameKind::SeenDigest => 16,
            NameKind::Kv | NameKind::Log | NameKind::SeenSet => 32,
        }
    }
}

/// The keys of a profile. The AEAD zeroizes its key on drop
/// (chacha20poly1305's `zeroize` feature is on), the MAC keys are
/// `Zeroizing`.
///
/// The data key comes from the current identity. Name ids are a chain: the
/// first name key (from the identity the profile was created with) hashes
/// the name, and each later name key — one per re-key, the last from the
/// current identity — hashes the previous id again. A re-key can so move
/// every stored id to a key the old identity does not know without knowing
/// the names themselves (log names and seen digests are stored only as
/// ids). The earlier name keys are kept sealed under the data key.
pub(crate) struct Keys {
    aead: XChaCha20Poly1305,
    /// Oldest first; the last is the current identity's.
    name_keys: Vec<Zeroizing<[u8; 32]>>,
}

/// The data key and name key an identity derives.
fn derive_pair(identity: &age::x25519::Identity) -> (Zeroizing<[u8; 32]>, Zeroizing<[u8; 32]>) {
    let encoded = identity.to_string();
    let hk = Hkdf::<Sha256>::new(None, encoded.expose_secret().as_bytes());
    let mut data_key = Zeroizing::new([0u8; 32]);
    let mut name_key = Zeroizing::new([0u8; 32]);
    // Both expansions are 32 bytes, far below HKDF's 255*32 limit.
    hk.expand(INFO_DATA_KEY, &mut data_key[..])
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    hk.expand(INFO_NAME_KEY, &mut name_key[..])
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    (data_key, name_key)
}

fn mac(key: &[u8; 32], kind: NameKind, input: &[u8]) -> [u8; 32] {
    let mut mac =
        <Hmac<Sha256> as Mac>::new_from_slice(&key[..]).expect("HMAC takes keys of any length");
    mac.update(kind.label());
    mac.update(input);
    mac.finalize().into_bytes().into()
}

fn keep(kind: NameKind, mut id: [u8; 32]) -> [u8; 32] {
    id[kind.kept()..].fill(0);
    id
}

impl Keys {
    /// HKDF-SHA256 over the identity's canonical encoding
    /// (`AGE-SECRET-KEY-1…`, a fixed bijection of the 32-byte scalar), with
    /// one `info` label per key so the two keys are independent.
    pub(crate) fn derive(identity: &age::x25519::Identity) -> Keys {
        Keys::with_history(identity, Vec::new())
    }

    /// The keys of a re-keyed profile: `earlier` are the name keys of the
    /// identities before this one, oldest first.
    pub(crate) fn with_history(
        identity: &age::x25519::Identity,
        mut earlier: Vec<Zeroizing<[u8; 32]>>,
    ) -> Keys {
        let (data_key, name_key) = derive_pair(identity);
        earlier.push(name_key);
        Keys {
            aead: XChaCha20Poly1305::new((&*data_key).into()),
            name_keys: earlier,
        }
    }

    /// Every name key, oldest first (to seal into a re-keyed store).
    pub(crate) fn name_keys(&self) -> &[Zeroizing<[u8; 32]>] {
        &self.name_keys
    }

    /// An id kept by these keys moved one step on, to `next`'s last name
    /// key: what re-keying does to every stored id.
    pub(crate) fn step(next: &Keys, kind: NameKind, id: &[u8]) -> [u8; 32] {
        let last = next.name_keys.last().expect("at least one name key");
        keep(kind, mac(last, kind, &id[..kind.kept()]))
    }

    /// `version || nonce || ciphertext+tag`. The plaintext is padded first.
    pub(crate) fn seal(&self, slot: Slot<'_>, plaintext: &[u8]) -> Vec<u8> {
        let padded_len = plaintext.len().div_ceil(PAD_TO).max(1) * PAD_TO;
        let mut padded = Zeroizing::new(Vec::with_capacity(padded_len));
        padded.extend_from_slice(plaintext);
        padded.resize(padded_len, b' ');

        // Random 192-bit nonces: collisions are negligible for any number
        // of records one profile will ever write, with no counter to keep.
        let mut nonce = [0u8; NONCE_LEN];
        OsRng.fill_bytes(&mut nonce);
        let nonce = XNonce::from(nonce);
        let ad = slot.associated_data();
        let ct = self
            .aead
            .encrypt(
                &nonce,
                Payload {
                    msg: &padded,
                    aad: &ad,
                },
            )
            // Only fails for plaintexts beyond 2^38 bytes, which SQLite
            // could not store anyway.
            .expect("plaintext within XChaCha20-Poly1305 limits");
        let mut out = Vec::with_capacity(1 + NONCE_LEN + ct.len());
        out.push(SEAL_VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        out
    }

    /// Open a sealed blob; `None` if it is malformed or fails authentication
    /// (wrong key, wrong slot, or damaged). The padding is left in place:
    /// everything sealed is JSON, which ignores trailing whitespace.
    pub(crate) fn open(&self, slot: Slot<'_>, sealed: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
        if sealed.len() < 1 + NONCE_LEN + TAG_LEN || sealed[0] != SEAL_VERSION {
            return None;
        }
        let nonce = XNonce::from_slice(&sealed[1..1 + NONCE_LEN]);
        let ad = slot.associated_data();
        self.aead
            .decrypt(
                nonce,
                Payload {
                    msg: &sealed[1 + NONCE_LEN..],
                    aad: &ad,
                },
            )
            .ok()
            .map(Zeroizing::new)
    }

    /// HMAC-SHA256 of a name under the name key (chained through every
    /// name key since the profile's creation, see [`Keys`]), cut to the
    /// length its column keeps (the rest zero). Row ids are these, so the
    /// database shows neither contact ids nor message digests.
    pub(crate) fn name_id(&self, kind: NameKind, name: &[u8]) -> [u8; 32] {
        let mut keys = self.name_keys.iter();
        let first = keys.next().expect("at least one name key");
        let mut id = keep(kind, mac(first, kind, name));
        for k in keys {
            id = keep(kind, mac(k, kind, &id[..kind.kept()]));
        }
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Keys {
        Keys::derive(&age::x25519::Identity::generate())
    }

    #[test]
    fn seal_round_trip_and_padding() {
        let k = keys();
        let id = [7u8; 32];
        for len in [0usize, 1, 63, 64, 65, 1000] {
            let pt = vec![b'x'; len];
            let sealed = k.seal(Slot::KvValue(&id), &pt);
            assert_eq!((sealed.len() - 1 - NONCE_LEN - TAG_LEN) % PAD_TO, 0);
            let opened = k.open(Slot::KvValue(&id), &sealed).unwrap();
            assert_eq!(&opened[..len], &pt[..]);
            assert!(opened[len..].iter().all(|&b| b == b' '));
        }
    }

    #[test]
    fn slot_binding() {
        let k = keys();
        let a = [1u8; 32];
        let b = [2u8; 32];
        let sealed = k.seal(Slot::Log(&a, 5), b"\"hi\"");
        assert!(k.open(Slot::Log(&a, 5), &sealed).is_some());
        assert!(k.open(Slot::Log(&a, 6), &sealed).is_none());
        assert!(k.open(Slot::Log(&b, 5), &sealed).is_none());
        assert!(k.open(Slot::KvValue(&a), &sealed).is_none());
        // Another profile's key cannot open it either.
        assert!(keys().open(Slot::Log(&a, 5), &sealed).is_none());
        // Malformed blobs are rejected without panicking.
        assert!(k.open(Slot::Log(&a, 5), &[]).is_none());
        assert!(k.open(Slot::Log(&a, 5), &sealed[..20]).is_none());
    }

    #[test]
    fn a_step_equals_the_chain_of_the_next_keys() {
        let first = age::x25519::Identity::generate();
        let old = Keys::derive(&first);
        let (_, name_key) = derive_pair(&first);
        let new = Keys::with_history(&age::x25519::Identity::generate(), vec![name_key]);
        for kind in [NameKind::Kv, NameKind::KvBucket, NameKind::SeenDigest] {
            let id = old.name_id(kind, b"contact/1");
            assert_eq!(Keys::step(&new, kind, &id), new.name_id(kind, b"contact/1"));
            assert_ne!(id, new.name_id(kind, b"contact/1"));
        }
    }

    #[test]
    fn names_are_domain_separated() {
        let k = keys();
        assert_ne!(
            k.name_id(NameKind::Kv, b"x"),
            k.name_id(NameKind::Log, b"x")
        );
        assert_eq!(k.name_id(NameKind::Kv, b"x"), k.name_id(NameKind::Kv, b"x"));
    }
}
