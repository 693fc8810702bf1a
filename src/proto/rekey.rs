//! Re-key invitations (PROTOCOL.md §Re-key): a new invitation for an
//! existing contact, exchanged out of band like the first one, that
//! replaces the connection's keys and queues while keeping the contact and
//! its history.
//!
//! ```text
//! u8   version   1
//! u8   kind      2 (re-key)
//! [16] tag       HMAC-SHA256(connection secret, "tern/v1 rekey tag")[..16]
//! [24] nonce
//! ciphertext     XChaCha20-Poly1305(key, nonce, contact invitation (kind 1, binary),
//!                                   aad = version || kind || tag)
//!     key = HKDF-SHA256(salt = none, ikm = connection secret, info = "tern/v1 rekey")
//! ```
//!
//! Only the contact holding the current connection secret can read it: to
//! anyone else who sees the QR code it is noise. The tag lets the contact's
//! client find the connection it belongs to without trying every one.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use rand_core::{CryptoRng, RngCore};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use tern_wire::codec::{CodecError, Reader, Writer};
use zeroize::Zeroizing;

use super::invitation::{link_bytes, link_of, Invitation, KIND_CONTACT, KIND_DEVICE};
use super::keys::Secret32;
use super::{ProtoError, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};

pub const KIND_REKEY: u8 = 2;
const TAG_LABEL: &[u8] = b"tern/v1 rekey tag";
const KEY_INFO: &[u8] = b"tern/v1 rekey";

/// Any kind of invitation, as found in a link or QR code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnyInvitation {
    Contact(Invitation),
    Rekey(RekeyInvitation),
    /// A device link (PROTOCOL.md §12): for `tern device join` only.
    Device(Invitation),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RekeyInvitation {
    /// The version byte it was written with (authenticated).
    version: u8,
    pub tag: [u8; 16],
    nonce: [u8; 24],
    ciphertext: Vec<u8>,
}

/// The tag identifying a connection's re-key invitations.
pub fn rekey_tag(connection_secret: &Secret32) -> [u8; 16] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(connection_secret.as_bytes())
        .expect("any key length");
    mac.update(TAG_LABEL);
    let full = mac.finalize().into_bytes();
    let mut tag = [0u8; 16];
    tag.copy_from_slice(&full[..16]);
    tag
}

fn cipher(connection_secret: &Secret32) -> XChaCha20Poly1305 {
    let mut key = Zeroizing::new([0u8; 32]);
    Hkdf::<Sha256>::new(None, connection_secret.as_bytes())
        .expand(KEY_INFO, key.as_mut())
        .expect("32 bytes is a valid HKDF-SHA256 length");
    XChaCha20Poly1305::new_from_slice(key.as_ref()).expect("32-byte key")
}

fn aad(version: u8, tag: &[u8; 16]) -> Vec<u8> {
    let mut a = vec![version, KIND_REKEY];
    a.extend_from_slice(tag);
    a
}

impl RekeyInvitation {
    /// Seals `inner` (a fresh contact invitation) for the peer of the
    /// connection whose secret is `connection_secret`.
    pub fn seal<R: RngCore + CryptoRng>(
        inner: &Invitation,
        connection_secret: &Secret32,
        rng: &mut R,
    ) -> Self {
        let tag = rekey_tag(connection_secret);
        let mut nonce = [0u8; 24];
        rng.fill_bytes(&mut nonce);
        let ciphertext = cipher(connection_secret)
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &inner.encode(),
                    aad: &aad(MIN_PROTOCOL_VERSION, &tag),
                },
            )
            .expect("invitation within AEAD limits");
        Self {
            version: MIN_PROTOCOL_VERSION,
            tag,
            nonce,
            ciphertext,
        }
    }

    /// Whether this invitation is meant for the connection with this secret.
    pub fn is_for(&self, connection_secret: &Secret32) -> bool {
        rekey_tag(connection_secret).ct_eq(&self.tag).into()
    }

    pub fn open(&self, connection_secret: &Secret32) -> Result<Invitation, ProtoError> {
        let plain = cipher(connection_secret)
            .decrypt(
                XNonce::from_slice(&self.nonce),
                Payload {
                    msg: &self.ciphertext,
                    aad: &aad(self.version, &self.tag),
                },
            )
            .map_err(|_| ProtoError::Decrypt)?;
        Invitation::decode(&plain)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u8(self.version)
            .u8(KIND_REKEY)
            .bytes(&self.tag)
            .bytes(&self.nonce)
            .bytes(&self.ciphertext);
        w.into_vec()
    }

    pub fn to_link(&self) -> String {
        link_of(&self.encode())
    }
}

/// Parses a link or QR payload of either kind.
pub fn parse_link(text: &str) -> Result<AnyInvitation, ProtoError> {
    let bytes = link_bytes(text)?;
    let mut r = Reader::new(&bytes);
    let version = r.u8()?;
    if version == 0 {
        return Err(CodecError::Invalid("invitation version").into());
    }
    if version > PROTOCOL_VERSION {
        return Err(ProtoError::UnsupportedVersion(version));
    }
    match r.u8()? {
        KIND_CONTACT => Ok(AnyInvitation::Contact(Invitation::decode(&bytes)?)),
        KIND_REKEY => {
            let tag = r.array()?;
            let nonce = r.array()?;
            let rest = r.remaining();
            // Tag, then at least an empty-invitation-sized ciphertext.
            if rest < 16 + 2 {
                return Err(CodecError::Truncated.into());
            }
            let ciphertext = r.bytes(rest)?.to_vec();
            Ok(AnyInvitation::Rekey(RekeyInvitation {
                version,
                tag,
                nonce,
                ciphertext,
            }))
        }
        KIND_DEVICE => Ok(AnyInvitation::Device(Invitation::decode_as(
            &bytes,
            KIND_DEVICE,
        )?)),
        // Reserved kinds come from newer versions.
        k @ 4..=15 => Err(ProtoError::UnsupportedInvitation(k)),
        _ => Err(CodecError::Invalid("invitation kind").into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn only_the_contact_can_open_it() {
        let mut rng = StdRng::seed_from_u64(1);
        let inner = crate::proto::invitation::tests::sample(2);
        let secret = Secret32([7; 32]);
        let link = RekeyInvitation::seal(&inner, &secret, &mut rng).to_link();
        let AnyInvitation::Rekey(r) = parse_link(&link).unwrap() else {
            panic!("wrong kind")
        };
        assert!(r.is_for(&secret));
        assert!(!r.is_for(&Secret32([8; 32])));
        assert_eq!(r.open(&secret).unwrap(), inner);
        assert_eq!(r.open(&Secret32([8; 32])), Err(ProtoError::Decrypt));
        let mut bytes = r.encode();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        let AnyInvitation::Rekey(bad) = parse_link(&link_of(&bytes)).unwrap() else {
            panic!()
        };
        assert!(bad.open(&secret).is_err());
        // A plain invitation still parses as one.
        assert_eq!(
            parse_link(&inner.to_link()).unwrap(),
            AnyInvitation::Contact(inner)
        );
    }
}
