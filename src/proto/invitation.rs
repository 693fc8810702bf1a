//! One-time invitations (PROTOCOL.md §4): what travels out of band, as a QR
//! code or a link, from the inviter to the joiner.
//!
//! Binary form:
//!
//! ```text
//! u8   version        1
//! u8   kind           1 = contact invitation, 3 = device link (same body;
//!                     2 is the re-key invitation of `rekey`)
//! [32] invitation key I (X25519)
//! [32] ratchet key    R (X25519)
//! u8   queue count    1..=3
//! per queue:          relay address (binary form, never an access key)
//!                     [16] sender id
//! ```
//!
//! Link form: `TERN:` followed by the binary form in RFC 4648 base32,
//! upper case, no padding. Upper case keeps the whole link inside the QR
//! alphanumeric mode (5.5 bits per character rather than 8), which is what
//! lets a three-relay invitation fit an 80-column terminal. Parsers accept
//! any case and ignore white space, so a link wrapped by a mail client still
//! works. The QR payload is the link.
//!
//! Nothing here names the inviter; profiles travel only inside the ratchet.

use data_encoding::BASE32_NOPAD;
use tern_relay::address::RelayAddress;
use tern_relay::codec::{CodecError, Reader, Writer};
use tern_relay::wire::Id;

use super::{ProtoError, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};

pub const LINK_PREFIX: &str = "TERN:";
/// Most queues (relays) one invitation may list.
pub const MAX_QUEUES: usize = 3;
pub(crate) const KIND_CONTACT: u8 = 1;
/// Links another device of the same person (PROTOCOL.md §12): the body of
/// a contact invitation under another kind, so that no contact can take it
/// for an ordinary invitation and no device for a contact's.
pub(crate) const KIND_DEVICE: u8 = 3;

/// A queue someone may send to: a relay and the queue's sender id there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendQueue {
    pub relay: RelayAddress,
    pub sender_id: Id,
}

impl SendQueue {
    pub fn encode(&self, w: &mut Writer) {
        self.relay.without_access_key().encode(w);
        w.bytes(&self.sender_id);
    }

    pub fn decode(r: &mut Reader<'_>) -> Result<Self, ProtoError> {
        let relay = RelayAddress::decode(r).map_err(|e| ProtoError::Address(e.to_string()))?;
        if relay.access_key.is_some() {
            return Err(ProtoError::Address(
                "an access key has no place in a shared queue".into(),
            ));
        }
        Ok(Self {
            relay,
            sender_id: r.array()?,
        })
    }
}

/// Encodes a list of 1..=MAX_QUEUES queues with a count byte.
pub fn encode_queues(queues: &[SendQueue], w: &mut Writer) {
    assert!(!queues.is_empty() && queues.len() <= MAX_QUEUES);
    w.u8(queues.len() as u8);
    for q in queues {
        q.encode(w);
    }
}

pub fn decode_queues(r: &mut Reader<'_>) -> Result<Vec<SendQueue>, ProtoError> {
    let n = r.u8()? as usize;
    if n == 0 || n > MAX_QUEUES {
        return Err(CodecError::Invalid("queue count").into());
    }
    (0..n).map(|_| SendQueue::decode(r)).collect()
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invitation {
    pub invitation_key: [u8; 32],
    pub ratchet_key: [u8; 32],
    pub queues: Vec<SendQueue>,
}

impl Invitation {
    pub fn encode(&self) -> Vec<u8> {
        self.encode_as(KIND_CONTACT)
    }

    fn encode_as(&self, kind: u8) -> Vec<u8> {
        let mut w = Writer::new();
        // The lowest version that can express it, so older peers can read it.
        w.u8(MIN_PROTOCOL_VERSION)
            .u8(kind)
            .bytes(&self.invitation_key)
            .bytes(&self.ratchet_key);
        encode_queues(&self.queues, &mut w);
        w.into_vec()
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, ProtoError> {
        Self::decode_as(bytes, KIND_CONTACT)
    }

    pub(crate) fn decode_as(bytes: &[u8], kind: u8) -> Result<Self, ProtoError> {
        let mut r = Reader::new(bytes);
        let version = r.u8()?;
        if version == 0 {
            return Err(CodecError::Invalid("invitation version").into());
        }
        if version > PROTOCOL_VERSION {
            return Err(ProtoError::UnsupportedVersion(version));
        }
        if r.u8()? != kind {
            return Err(CodecError::Invalid("invitation kind").into());
        }
        let invitation_key = r.array()?;
        let ratchet_key = r.array()?;
        let queues = decode_queues(&mut r)?;
        r.finish()?;
        Ok(Self {
            invitation_key,
            ratchet_key,
            queues,
        })
    }

    pub fn to_link(&self) -> String {
        format!("{LINK_PREFIX}{}", BASE32_NOPAD.encode(&self.encode()))
    }

    /// The link form of this invitation as a device link (kind 3).
    pub fn to_device_link(&self) -> String {
        format!(
            "{LINK_PREFIX}{}",
            BASE32_NOPAD.encode(&self.encode_as(KIND_DEVICE))
        )
    }

    pub fn from_link(text: &str) -> Result<Self, ProtoError> {
        Self::decode(&link_bytes(text)?)
    }
}

/// The binary form inside a link (either kind).
pub fn link_bytes(text: &str) -> Result<Vec<u8>, ProtoError> {
    let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    let upper = compact.to_ascii_uppercase();
    let body = upper
        .strip_prefix(LINK_PREFIX)
        .ok_or(ProtoError::NotAnInvitation)?;
    BASE32_NOPAD
        .decode(body.as_bytes())
        .map_err(|_| ProtoError::NotAnInvitation)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample(n: usize) -> Invitation {
        let key = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE";
        Invitation {
            invitation_key: [2; 32],
            ratchet_key: [3; 32],
            queues: (0..n)
                .map(|i| SendQueue {
                    relay: format!("tern://{key}@203.0.113.{i}:5223").parse().unwrap(),
                    sender_id: [i as u8; 16],
                })
                .collect(),
        }
    }

    #[test]
    fn link_round_trip_any_case_and_wrapping() {
        let inv = sample(3);
        let link = inv.to_link();
        assert!(link.starts_with("TERN:"));
        assert!(link
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b':'));
        assert_eq!(Invitation::from_link(&link).unwrap(), inv);
        let mangled = format!("  {}\n{}  ", link[..40].to_lowercase(), &link[40..]);
        assert_eq!(Invitation::from_link(&mangled).unwrap(), inv);
    }

    #[test]
    fn three_relays_fit_a_small_qr() {
        // Alphanumeric capacity of a version 12 QR code at level M: 419.
        assert!(
            sample(3).to_link().len() <= 419,
            "{}",
            sample(3).to_link().len()
        );
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(
            Invitation::from_link("hello"),
            Err(ProtoError::NotAnInvitation)
        );
        assert_eq!(
            Invitation::from_link("TERN:!!!"),
            Err(ProtoError::NotAnInvitation)
        );
        let mut b = sample(1).encode();
        b[0] = 2;
        assert_eq!(
            Invitation::decode(&b),
            Err(ProtoError::UnsupportedVersion(2))
        );
        let full = sample(2).encode();
        for cut in 0..full.len() {
            assert!(Invitation::decode(&full[..cut]).is_err());
        }
        let mut extra = full.clone();
        extra.push(0);
        assert!(Invitation::decode(&extra).is_err());
        let mut zero = sample(1).encode();
        zero[66] = 0;
        assert!(Invitation::decode(&zero).is_err());
        let mut four = sample(1).encode();
        four[66] = 4;
        assert!(Invitation::decode(&four).is_err());
    }
}
