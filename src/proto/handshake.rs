//! The connection handshake's key agreement (PROTOCOL.md §5): an X3DH-style
//! mix of three X25519 results over connection-specific keys only.
//!
//! The inviter publishes, out of band, an invitation key `I` and a ratchet key
//! `R`. The joiner generates an identity key `J` and an ephemeral key `E`:
//!
//! ```text
//! DH1 = X25519(J, R)    DH2 = X25519(E, I)    DH3 = X25519(E, R)
//! h   = SHA-256("tern/v1 invitation" || the invitation's binary form)
//! th  = SHA-256("tern/v1 transcript" || h || I || R || J || E)
//! okm = HKDF-SHA256(salt = th, ikm = 0xFF*32 || DH1 || DH2 || DH3,
//!                   info = "tern/v1 handshake", L = 128)
//! root key = okm[0..32], initiator header key = okm[32..64],
//! responder header key = okm[64..96], connection secret = okm[96..128]
//! ```
//!
//! The joiner then starts its ratchet as the initiator against `R`, the
//! inviter as the responder with `R`'s key pair. Because `I` and `R` only ever
//! travel in the invitation, a relay cannot substitute them, and every later
//! byte is authenticated under keys derived from them. The hash of the whole
//! invitation (its kind and every queue, not only its keys) is part of the
//! transcript: an invitation changed on its way — a queue swapped for one on
//! another relay, say — makes the Hello fail to open and the codes differ.

use hkdf::Hkdf;
use rand_core::{CryptoRng, RngCore};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::keys::{b64, DhKeyPair, Secret32};
use super::ratchet::RatchetInit;
use super::ProtoError;

const TRANSCRIPT_LABEL: &[u8] = b"tern/v1 transcript";
const INVITATION_LABEL: &[u8] = b"tern/v1 invitation";

/// The hash of an invitation's binary form (PROTOCOL.md §4.1, §5.2), as the
/// inviter made it and as the joiner received it: both sides put it in the
/// transcript.
pub fn invitation_hash(binary: &[u8]) -> [u8; 32] {
    Sha256::new()
        .chain_update(INVITATION_LABEL)
        .chain_update(binary)
        .finalize()
        .into()
}
const HANDSHAKE_INFO: &[u8] = b"tern/v1 handshake";

/// What the transcript covers: the invitation's hash and the four public
/// keys of a handshake, in transcript order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandshakeKeys {
    /// [`invitation_hash`] of the invitation the handshake answers.
    #[serde(default, with = "b64")]
    pub invitation_hash: [u8; 32],
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
        h.update(self.invitation_hash);
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

/// HKDF-SHA256 over the X3DH-style input `0xFF^32 || DH1 || DH2 || DH3`
/// (followed by `psk` for a resync), split into 32-byte keys.
fn agreement_keys<const N: usize>(
    salt: &[u8; 32],
    dh: [&Secret32; 3],
    psk: Option<&Secret32>,
    info: &[u8],
) -> Vec<Secret32> {
    let mut ikm = Zeroizing::new(Vec::with_capacity(160));
    ikm.extend_from_slice(&[0xff; 32]);
    for d in dh.into_iter().chain(psk) {
        ikm.extend_from_slice(d.as_bytes());
    }
    let mut okm = Zeroizing::new([0u8; N]);
    Hkdf::<Sha256>::new(Some(salt), ikm.as_ref())
        .expand(info, okm.as_mut())
        .expect("a valid HKDF-SHA256 length");
    okm.chunks_exact(32)
        .map(|c| Secret32(c.try_into().expect("32 bytes")))
        .collect()
}

fn derive(keys: HandshakeKeys, dh1: Secret32, dh2: Secret32, dh3: Secret32) -> Agreement {
    let th = keys.transcript();
    let mut k = agreement_keys::<128>(&th, [&dh1, &dh2, &dh3], None, HANDSHAKE_INFO).into_iter();
    let mut next = || k.next().expect("four keys");
    Agreement {
        keys,
        ratchet: RatchetInit {
            root_key: next(),
            header_key_initiator: next(),
            header_key_responder: next(),
            ad: th,
        },
        connection_secret: next(),
    }
}

/// The inviter's secret half of an invitation, and the hash of the
/// invitation it made (set once the invitation is encoded).
#[derive(Clone, Serialize, Deserialize, Debug, PartialEq, Eq)]
pub struct InviterSecrets {
    pub invitation: DhKeyPair,
    pub ratchet: DhKeyPair,
    #[serde(default, with = "b64")]
    pub invitation_hash: [u8; 32],
}

impl InviterSecrets {
    pub fn generate<R: RngCore + CryptoRng>(rng: &mut R) -> Self {
        Self {
            invitation: DhKeyPair::generate(rng),
            ratchet: DhKeyPair::generate(rng),
            invitation_hash: [0; 32],
        }
    }

    /// Completes the agreement from the joiner's two public keys.
    pub fn agree(
        &self,
        joiner_identity: &[u8; 32],
        joiner_ephemeral: &[u8; 32],
    ) -> Result<Agreement, ProtoError> {
        let keys = HandshakeKeys {
            invitation_hash: self.invitation_hash,
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
/// `invitation_hash` is [`invitation_hash`] of the invitation as received.
pub fn joiner_agree<R: RngCore + CryptoRng>(
    invitation_hash: &[u8; 32],
    invitation_key: &[u8; 32],
    inviter_ratchet: &[u8; 32],
    rng: &mut R,
) -> Result<Agreement, ProtoError> {
    let identity = DhKeyPair::generate(rng);
    let ephemeral = DhKeyPair::generate(rng);
    let keys = HandshakeKeys {
        invitation_hash: *invitation_hash,
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

const RESYNC_TRANSCRIPT_LABEL: &[u8] = b"tern/v1 resync transcript";
const RESYNC_INFO: &[u8] = b"tern/v1 resync";

/// The key schedule of a ratchet resynchronisation (PROTOCOL.md §6.7): the
/// handshake's agreement over four fresh keys, with the connection's
/// transcript hash `th` and connection secret `cs` mixed in, so that only a
/// holder of the connection's secrets can take part and the new ratchet
/// belongs to this connection alone. `keys` are `I', R', J', E'`.
fn derive_resync(
    th: &[u8; 32],
    cs: &Secret32,
    keys: [&[u8; 32]; 4],
    dh: [Secret32; 3],
) -> RatchetInit {
    let mut h = Sha256::new();
    h.update(RESYNC_TRANSCRIPT_LABEL);
    h.update(th);
    for k in keys {
        h.update(k);
    }
    let salt: [u8; 32] = h.finalize().into();
    let mut k =
        agreement_keys::<96>(&salt, [&dh[0], &dh[1], &dh[2]], Some(cs), RESYNC_INFO).into_iter();
    let mut next = || k.next().expect("three keys");
    RatchetInit {
        root_key: next(),
        header_key_initiator: next(),
        header_key_responder: next(),
        ad: *th,
    }
}

/// The offering side of a resync (it sent `I'`, `R'`): the new ratchet's
/// start from the accepting side's `J'`, `E'`. It takes the responder role.
pub fn resync_offerer_agree(
    offer: &InviterSecrets,
    th: &[u8; 32],
    cs: &Secret32,
    j: &[u8; 32],
    e: &[u8; 32],
) -> Result<RatchetInit, ProtoError> {
    let dh = [
        offer.ratchet.dh(j)?,
        offer.invitation.dh(e)?,
        offer.ratchet.dh(e)?,
    ];
    let (i, r) = (offer.invitation.public(), offer.ratchet.public());
    Ok(derive_resync(th, cs, [&i, &r, j, e], dh))
}

/// The accepting side of a resync: draws `J'` then `E'`, returns the new
/// ratchet's start (it takes the initiator role) and the two public keys.
pub fn resync_accepter_agree<R: RngCore + CryptoRng>(
    th: &[u8; 32],
    cs: &Secret32,
    i: &[u8; 32],
    r: &[u8; 32],
    rng: &mut R,
) -> Result<(RatchetInit, [u8; 32], [u8; 32]), ProtoError> {
    let j = DhKeyPair::generate(rng);
    let e = DhKeyPair::generate(rng);
    let dh = [j.dh(r)?, e.dh(i)?, e.dh(r)?];
    let (jp, ep) = (j.public(), e.public());
    Ok((derive_resync(th, cs, [i, r, &jp, &ep], dh), jp, ep))
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
            &[0; 32],
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
            &[0; 32],
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
        assert!(joiner_agree(&[0; 32], &[0u8; 32], &inviter.ratchet.public(), &mut rng).is_err());
    }

    #[test]
    fn another_invitation_hash_changes_the_transcript_and_every_key() {
        let mut rng = StdRng::seed_from_u64(12);
        let mut inviter = InviterSecrets::generate(&mut rng);
        inviter.invitation_hash = invitation_hash(b"the invitation the inviter made");
        let seen = invitation_hash(b"the invitation with one queue swapped");
        let j = joiner_agree(
            &seen,
            &inviter.invitation.public(),
            &inviter.ratchet.public(),
            &mut rng,
        )
        .unwrap();
        let i = inviter
            .agree(&j.keys.joiner_identity, &j.keys.joiner_ephemeral)
            .unwrap();
        assert_ne!(i.keys.transcript(), j.keys.transcript());
        assert_ne!(i.ratchet.root_key, j.ratchet.root_key);
        assert_ne!(i.connection_secret, j.connection_secret);
    }
}
