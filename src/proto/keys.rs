//! Key types that zeroize on drop and serialize (for the encrypted store) as
//! base64url strings.

use data_encoding::BASE64URL_NOPAD;
use rand_core::{CryptoRng, RngCore};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use subtle::ConstantTimeEq;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::{Zeroize, ZeroizeOnDrop};

use super::ProtoError;

/// Serde helper for byte strings (KEM keys and ciphertexts, queued
/// messages) as base64url strings: in the store's JSON, a list of numbers
/// costs about four characters a byte and is the slowest thing to parse
/// in a record that holds a 16 KiB message; base64 costs 1.33 and decodes
/// at memory speed. Reads a list of numbers too (records written before
/// the field used this).
pub mod b64vec {
    use std::fmt;

    use data_encoding::BASE64URL_NOPAD;
    use serde::de::{Error, SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&BASE64URL_NOPAD.encode(v))
    }

    struct Bytes;

    impl<'de> Visitor<'de> for Bytes {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("base64url bytes")
        }

        fn visit_str<E: Error>(self, s: &str) -> Result<Vec<u8>, E> {
            BASE64URL_NOPAD.decode(s.as_bytes()).map_err(E::custom)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 16));
            while let Some(b) = seq.next_element::<u8>()? {
                v.push(b);
            }
            Ok(v)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_any(Bytes)
    }
}

/// 32 secret bytes: a private key, a chain key, a root key.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct Secret32(pub [u8; 32]);

impl Secret32 {
    pub fn random<R: RngCore + CryptoRng>(rng: &mut R) -> Self {
        let mut b = [0u8; 32];
        rng.fill_bytes(&mut b);
        Self(b)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl PartialEq for Secret32 {
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}
impl Eq for Secret32 {}

impl std::fmt::Debug for Secret32 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret32(..)")
    }
}

impl Serialize for Secret32 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&BASE64URL_NOPAD.encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for Secret32 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = zeroize::Zeroizing::new(String::deserialize(d)?);
        let mut v = zeroize::Zeroizing::new(
            BASE64URL_NOPAD
                .decode(s.as_bytes())
                .map_err(serde::de::Error::custom)?,
        );
        if v.len() != 32 {
            return Err(serde::de::Error::custom("expected 32 bytes"));
        }
        let mut out = [0u8; 32];
        out.copy_from_slice(&v);
        v.zeroize();
        Ok(Self(out))
    }
}

/// Serde helper for public byte arrays as base64url strings.
pub mod b64 {
    use data_encoding::BASE64URL_NOPAD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer, const N: usize>(v: &[u8; N], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&BASE64URL_NOPAD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>, const N: usize>(
        d: D,
    ) -> Result<[u8; N], D::Error> {
        let s = String::deserialize(d)?;
        let v = BASE64URL_NOPAD
            .decode(s.as_bytes())
            .map_err(serde::de::Error::custom)?;
        v.try_into()
            .map_err(|_| serde::de::Error::custom(format!("expected {N} bytes")))
    }
}

/// An X25519 key pair whose secret half zeroizes on drop.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq, Debug)]
pub struct DhKeyPair {
    secret: Secret32,
    #[serde(with = "b64")]
    public: [u8; 32],
}

impl DhKeyPair {
    pub fn generate<R: RngCore + CryptoRng>(rng: &mut R) -> Self {
        Self::from_secret(Secret32::random(rng))
    }

    pub fn from_secret(secret: Secret32) -> Self {
        let public = PublicKey::from(&StaticSecret::from(secret.0)).to_bytes();
        Self { secret, public }
    }

    pub fn public(&self) -> [u8; 32] {
        self.public
    }

    pub fn secret(&self) -> &Secret32 {
        &self.secret
    }

    /// X25519 with `peer`, refusing a non-contributory (all-zero) result so a
    /// low-order peer key cannot force a known shared secret.
    pub fn dh(&self, peer: &[u8; 32]) -> Result<Secret32, ProtoError> {
        dh(&self.secret, peer)
    }
}

pub fn dh(secret: &Secret32, peer: &[u8; 32]) -> Result<Secret32, ProtoError> {
    let s = StaticSecret::from(secret.0);
    let shared = s.diffie_hellman(&PublicKey::from(*peer));
    if !shared.was_contributory() {
        return Err(ProtoError::KeyAgreement);
    }
    Ok(Secret32(shared.to_bytes()))
}

// ---------------------------------------------------------------------------
// ML-KEM-768 (FIPS 203), the post-quantum half of every key agreement.

use ml_kem::kem::Decapsulate;
use ml_kem::{EncapsulateDeterministic, EncodedSizeUser, KemCore, MlKem768};

/// An ML-KEM-768 encapsulation key.
pub const KEM_EK_LEN: usize = 1184;
/// An ML-KEM-768 ciphertext.
pub const KEM_CT_LEN: usize = 1088;

type Ek = <MlKem768 as KemCore>::EncapsulationKey;

/// The 64-byte seed `d || z` of an ML-KEM-768 key pair (FIPS 203
/// ML-KEM.KeyGen_internal): kept instead of the 2,400-byte decapsulation
/// key, which is derived again when needed.
#[derive(Clone, Zeroize, ZeroizeOnDrop, PartialEq, Eq)]
pub struct KemSeed(pub [u8; 64]);

impl std::fmt::Debug for KemSeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KemSeed(..)")
    }
}

impl Serialize for KemSeed {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&BASE64URL_NOPAD.encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for KemSeed {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = zeroize::Zeroizing::new(String::deserialize(d)?);
        let v = zeroize::Zeroizing::new(
            BASE64URL_NOPAD
                .decode(s.as_bytes())
                .map_err(serde::de::Error::custom)?,
        );
        let b: [u8; 64] = v
            .as_slice()
            .try_into()
            .map_err(|_| serde::de::Error::custom("expected 64 bytes"))?;
        Ok(Self(b))
    }
}

fn keypair(seed: &KemSeed) -> (<MlKem768 as KemCore>::DecapsulationKey, Ek) {
    let d = ml_kem::B32::try_from(&seed.0[..32]).expect("32 bytes");
    let z = ml_kem::B32::try_from(&seed.0[32..]).expect("32 bytes");
    MlKem768::generate_deterministic(&d, &z)
}

impl KemSeed {
    /// A fresh key pair: draws `d` then `z` (32 bytes each), as FIPS 203
    /// ML-KEM.KeyGen does.
    pub fn generate<R: RngCore + CryptoRng>(rng: &mut R) -> Self {
        let mut b = [0u8; 64];
        rng.fill_bytes(&mut b);
        Self(b)
    }

    /// The encapsulation key to publish.
    pub fn encapsulation_key(&self) -> Vec<u8> {
        keypair(self).1.as_bytes().to_vec()
    }

    /// ML-KEM.Decaps: the shared secret of `ct`. A ciphertext that was
    /// altered gives an unrelated secret (implicit rejection), which the
    /// AEAD keyed from it then refuses.
    pub fn decapsulate(&self, ct: &[u8]) -> Result<Secret32, ProtoError> {
        let ct: &ml_kem::Ciphertext<MlKem768> = ct.try_into().map_err(|_| ProtoError::Decrypt)?;
        let ss = keypair(self)
            .0
            .decapsulate(ct)
            .map_err(|_| ProtoError::Decrypt)?;
        let mut out = [0u8; 32];
        out.copy_from_slice(&ss);
        Ok(Secret32(out))
    }
}

/// Decodes an encapsulation key, with the FIPS 203 §7.2 modulus check:
/// every 12-bit coefficient must be below q = 3329, i.e. the key must
/// encode back to the same bytes.
fn encapsulation_key(ek: &[u8]) -> Result<Ek, ProtoError> {
    let enc: &ml_kem::Encoded<Ek> = ek.try_into().map_err(|_| ProtoError::KeyAgreement)?;
    let key = Ek::from_bytes(enc);
    if key.as_bytes().as_slice() != ek || !coefficients_below_q(ek) {
        return Err(ProtoError::KeyAgreement);
    }
    Ok(key)
}

/// Whether every 12-bit little-endian coefficient of the key's first 1152
/// bytes (the vector t̂; the last 32 are the seed ρ) is below q.
fn coefficients_below_q(ek: &[u8]) -> bool {
    ek[..KEM_EK_LEN - 32].chunks_exact(3).all(|b| {
        let a = u16::from(b[0]) | (u16::from(b[1] & 0x0f) << 8);
        let c = u16::from(b[1] >> 4) | (u16::from(b[2]) << 4);
        a < 3329 && c < 3329
    })
}

/// ML-KEM.Encaps to the peer's encapsulation key `ek`: draws the 32-byte
/// message `m`; returns the ciphertext and the shared secret. An invalid
/// key is refused.
pub fn kem_encapsulate<R: RngCore + CryptoRng>(
    ek: &[u8],
    rng: &mut R,
) -> Result<(Vec<u8>, Secret32), ProtoError> {
    let key = encapsulation_key(ek)?;
    let mut m = zeroize::Zeroizing::new([0u8; 32]);
    rng.fill_bytes(m.as_mut());
    let mut m = ml_kem::B32::try_from(m.as_slice()).expect("32 bytes");
    let r = key.encapsulate_deterministic(&m);
    m.as_mut_slice().zeroize();
    let (ct, ss) = r.map_err(|_| ProtoError::KeyAgreement)?;
    let mut out = [0u8; 32];
    out.copy_from_slice(&ss);
    Ok((ct.to_vec(), Secret32(out)))
}

#[cfg(test)]
mod kem_tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn encapsulate_decapsulate_and_refuse_bad_keys() {
        let mut rng = StdRng::seed_from_u64(1);
        let seed = KemSeed::generate(&mut rng);
        let ek = seed.encapsulation_key();
        assert_eq!(ek.len(), KEM_EK_LEN);
        let (ct, ss) = kem_encapsulate(&ek, &mut rng).unwrap();
        assert_eq!(ct.len(), KEM_CT_LEN);
        assert_eq!(seed.decapsulate(&ct).unwrap(), ss);
        let mut bad = ct.clone();
        bad[100] ^= 1;
        assert_ne!(seed.decapsulate(&bad).unwrap(), ss, "implicit rejection");
        let mut over = ek.clone();
        over[0] = 0xff;
        over[1] |= 0x0f; // first coefficient 4095 >= q
        assert_eq!(
            kem_encapsulate(&over, &mut rng).map(|_| ()),
            Err(ProtoError::KeyAgreement)
        );
        assert!(kem_encapsulate(&ek[1..], &mut rng).is_err());
    }
}
