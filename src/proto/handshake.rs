//! The connection handshake's key agreement (PROTOCOL.md §5): an X3DH-style
//! mix of three X25519 results over connection-specific keys only.
//!
//! The inviter publishes, out of band, an invitation key `I` and a ratchet key
//! `R`. The joiner generates an identity key `J` and an ephemeral key `E`:
//!
//! ```text
//! DH1 = X25519(J, R)    DH2 = X25519(E, I)    DH3 = X25519(E, R)
//! th  = SHA-256("tern/v1 transcript" || I || R || J || E)
//! okm = HKDF-SHA256(salt = th, ikm = 0xFF*32 || DH1 || DH2 || DH3,
//!                   info = "tern/v1 handshake", L = 128)
//! root key = okm[0..32], initiator header key = okm[32..64],
//! responder header key = okm[64..96], connection secret = okm[96..128]
//! ```
//!
//! The joiner then starts its ratchet as the initiator against `R`, the
//! inviter as the responder with `R`'s key pair. Because `I` and `R` only ever
//! travel in the invitation, a relay cannot substitute them, and every later
//! byte is authenticated under keys derived from them.

use hkdf::Hkdf;
use rand_core::{CryptoRng, RngCore};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::keys::{b64, DhKeyPair, Secret32};
use super::ratchet::RatchetInit;
use super::ProtoError;

const TRANSCRIPT_LABEL: &[u8] = b"tern/v1 transcript";
const HANDSHAKE_INFO: &[u8] = b"tern/v1 handshake";

/// The four public keys of a handshake, in transcript order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandshakeKeys {
    #[serde(with = "b64")]
    pub invitation: [u8; 32],
    #[serde(with = "b64")]
    pub inviter_ratchet: [u8; 32],
    #[serde(with = "b64")]
    pub joiner_identity: [u8; 32],
    #[serde(with = "b64")]
    pub joiner_ephemeral: [u8; 32],
}

impl HandshakeKeys {
    /// The transcript hash: associated data of every ratchet message and the
    /// input of the security code.
    pub fn transcript(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(TRANSCRIPT_LABEL);
        h.update(self.invitation);
        h.update(self.inviter_ratchet);
        h.update(self.joiner_identity);
        h.update(self.joiner_ephemeral);
        h.finalize().into()
    }
}

/// What both sides hold after the agreement.
pub struct Agreement {
    pub keys: HandshakeKeys,
    pub ratchet: RatchetInit,
    /// Keys the per-queue encryption layer (see `queue_msg`).
    pub connection_secret: Secret32,
}

fn derive(keys: HandshakeKeys, dh1: Secret32, dh2: Secret32, dh3: Secret32) -> Agreement {
    let th = keys.transcript();
    let mut ikm = Zeroizing::new([0u8; 128]);
    ikm[..32].fill(0xff);
    ikm[32..64].copy_from_slice(dh1.as_bytes());
    ikm[64..96].copy_from_slice(dh2.as_bytes());
    ikm[96..].copy_from_slice(dh3.as_bytes());
    let mut okm = Zeroizing::new([0u8; 128]);
    Hkdf::<Sha256>::new(Some(&th), ikm.as_ref())
        .expand(HANDSHAKE_INFO, okm.as_mut())
        .expect("128 bytes is a valid HKDF-SHA256 length");
    let take = |i: usize| {
        let mut k = [0u8; 32];
        k.copy_from_slice(&okm[i * 32..(i + 1) * 32]);
        Secret32(k)
    };
    Agreement {
        keys,
        ratchet: RatchetInit {
            root_key: take(0),
            header_key_initiator: take(1),
            header_key_responder: take(2),
            ad: th,
        },
        connection_secret: take(3),
    }
}

/// The inviter's secret half of an invitation.
#[derive(Clone, Serialize, Deserialize, Debug, PartialEq, Eq)]
pub struct InviterSecrets {
    pub invitation: DhKeyPair,
    pub ratchet: DhKeyPair,
}

impl InviterSecrets {
    pub fn generate<R: RngCore + CryptoRng>(rng: &mut R) -> Self {
        Self {
            invitation: DhKeyPair::generate(rng),
            ratchet: DhKeyPair::generate(rng),
        }
    }

    /// Completes the agreement from the joiner's two public keys.
    pub fn agree(
        &self,
        joiner_identity: &[u8; 32],
        joiner_ephemeral: &[u8; 32],
    ) -> Result<Agreement, ProtoError> {
        let keys = HandshakeKeys {
            invitation: self.invitation.public(),
            inviter_ratchet: self.ratchet.public(),
            joiner_identity: *joiner_identity,
            joiner_ephemeral: *joiner_ephemeral,
        };
        let dh1 = self.ratchet.dh(joiner_identity)?;
        let dh2 = self.invitation.dh(joiner_ephemeral)?;
        let dh3 = self.ratchet.dh(joiner_ephemeral)?;
        Ok(derive(keys, dh1, dh2, dh3))
    }
}

/// The joiner's side: generates `J` and `E` and agrees with the invitation's
/// `I` and `R`. `E`'s secret is dropped (zeroized) right after.
pub fn joiner_agree<R: RngCore + CryptoRng>(
    invitation_key: &[u8; 32],
    inviter_ratchet: &[u8; 32],
    rng: &mut R,
) -> Result<Agreement, ProtoError> {
    let identity = DhKeyPair::generate(rng);
    let ephemeral = DhKeyPair::generate(rng);
    let keys = HandshakeKeys {
        invitation: *invitation_key,
        inviter_ratchet: *inviter_ratchet,
        joiner_identity: identity.public(),
        joiner_ephemeral: ephemeral.public(),
    };
    let dh1 = identity.dh(inviter_ratchet)?;
    let dh2 = ephemeral.dh(invitation_key)?;
    let dh3 = ephemeral.dh(inviter_ratchet)?;
    Ok(derive(keys, dh1, dh2, dh3))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::ratchet::Ratchet;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn both_sides_agree_and_can_talk() {
        let mut rng = StdRng::seed_from_u64(9);
        let inviter = InviterSecrets::generate(&mut rng);
        let j = joiner_agree(
            &inviter.invitation.public(),
            &inviter.ratchet.public(),
            &mut rng,
        )
        .unwrap();
        let i = inviter
            .agree(&j.keys.joiner_identity, &j.keys.joiner_ephemeral)
            .unwrap();
        assert_eq!(i.keys, j.keys);
        assert_eq!(i.connection_secret, j.connection_secret);
        assert_eq!(i.ratchet.ad, j.ratchet.ad);
        let mut a =
            Ratchet::init_initiator(&j.ratchet, &inviter.ratchet.public(), &mut rng).unwrap();
        let mut b = Ratchet::init_responder(&i.ratchet, inviter.ratchet.clone());
        let m = a.encrypt(b"hi", &mut rng).unwrap();
        assert_eq!(b.decrypt(&m, &mut rng).unwrap(), b"hi");
    }

    #[test]
    fn substituted_key_breaks_agreement() {
        let mut rng = StdRng::seed_from_u64(10);
        let inviter = InviterSecrets::generate(&mut rng);
        let mallory = InviterSecrets::generate(&mut rng);
        // The joiner was given Mallory's invitation key instead of the inviter's.
        let j = joiner_agree(
            &mallory.invitation.public(),
            &inviter.ratchet.public(),
            &mut rng,
        )
        .unwrap();
        let i = inviter
            .agree(&j.keys.joiner_identity, &j.keys.joiner_ephemeral)
            .unwrap();
        assert_ne!(i.connection_secret, j.connection_secret);
        assert_ne!(i.keys.transcript(), j.keys.transcript());
    }

    #[test]
    fn low_order_keys_are_refused() {
        let mut rng = StdRng::seed_from_u64(11);
        let inviter = InviterSecrets::generate(&mut rng);
        assert!(inviter.agree(&[0u8; 32], &[9u8; 32]).is_err());
        assert!(joiner_agree(&[0u8; 32], &inviter.ratchet.public(), &mut rng).is_err());
    }
}
