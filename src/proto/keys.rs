//! Key types that zeroize on drop and serialize (for the encrypted store) as
//! base64url strings.

use data_encoding::BASE64URL_NOPAD;
use rand_core::{CryptoRng, RngCore};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use subtle::ConstantTimeEq;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::{Zeroize, ZeroizeOnDrop};

use super::ProtoError;

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
