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
//! Link form: `TERN:`, the binary form in RFC 4648 base32 (upper case, no
//! padding), then a six-character bech32m checksum (BIP 350) of the base32
//! characters, written in the same alphabet. Upper case keeps the whole link
//! inside the QR alphanumeric mode (5.5 bits per character rather than 8),
//! which is what lets a three-relay invitation fit an 80-column terminal.
//! The checksum turns a typo into "the link is damaged" before anything is
//! sent: any one or two wrong characters (so any transposition) are caught
//! for certain, anything else but one time in 2^30. Parsers accept any case
//! and ignore white space, so a link wrapped by a mail client still works.
//! The QR payload is the link.
//!
//! Nothing here names the inviter; profiles travel only inside the ratchet.

use bech32::primitives::checksum::Engine;
use bech32::{Bech32m, Fe32, Hrp};
use data_encoding::BASE32_NOPAD;
use tern_wire::address::RelayAddress;
use tern_wire::codec::{CodecError, Reader, Writer};
use tern_wire::Id;

use super::{ProtoError, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};

pub const LINK_PREFIX: &str = "TERN:";
/// Characters of the checksum at the end of every link.
pub const LINK_CHECKSUM_LEN: usize = 6;
/// RFC 4648 base32: the link's characters and their 5-bit values.
const BASE32_ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
/// The checksum's human-readable part (BIP 173), fixed: the prefix is
/// case-insensitive, so it is not taken from the text.
const CHECKSUM_HRP: Hrp = Hrp::parse_unchecked("tern");
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

    /// The binary form under `kind` (1: contact invitation, 3: device link).
    pub(crate) fn encode_as(&self, kind: u8) -> Vec<u8> {
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
        link_of(&self.encode())
    }

    /// The link form of this invitation as a device link (kind 3).
    pub fn to_device_link(&self) -> String {
        link_of(&self.encode_as(KIND_DEVICE))
    }

    pub fn from_link(text: &str) -> Result<Self, ProtoError> {
        Self::decode(&link_bytes(text)?)
    }
}

/// The link form of a binary invitation of any kind (PROTOCOL.md §4.2).
pub fn link_of(binary: &[u8]) -> String {
    let body = BASE32_NOPAD.encode(binary);
    let values: Vec<u8> = body.bytes().filter_map(base32_value).collect();
    let check: String = checksum(&values)
        .iter()
        .map(|&v| BASE32_ALPHABET[usize::from(v)] as char)
        .collect();
    format!("{LINK_PREFIX}{body}{check}")
}

/// The binary form inside a link (any kind). Once the prefix is there, the
/// text means to be an invitation, so a character outside the alphabet, a
/// missing checksum or a wrong one all read as damage in transit or typing.
pub fn link_bytes(text: &str) -> Result<Vec<u8>, ProtoError> {
    let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    let upper = compact.to_ascii_uppercase();
    let rest = upper
        .strip_prefix(LINK_PREFIX)
        .ok_or(ProtoError::NotAnInvitation)?;
    let values = rest
        .bytes()
        .map(base32_value)
        .collect::<Option<Vec<u8>>>()
        .ok_or(ProtoError::LinkDamaged)?;
    let Some(split) = values.len().checked_sub(LINK_CHECKSUM_LEN) else {
        return Err(ProtoError::LinkDamaged);
    };
    if checksum(&values[..split])[..] != values[split..] {
        return Err(ProtoError::LinkDamaged);
    }
    // A correct checksum over base32 that is not canonical (an impossible
    // length, non-zero trailing bits) came from a broken writer, not a typo.
    BASE32_NOPAD
        .decode(&rest.as_bytes()[..split])
        .map_err(|_| ProtoError::NotAnInvitation)
}

fn base32_value(c: u8) -> Option<u8> {
    BASE32_ALPHABET
        .iter()
        .position(|&a| a == c)
        .map(|v| v as u8)
}

/// The bech32m checksum (BIP 350) of 5-bit values, as six 5-bit values.
fn checksum(values: &[u8]) -> [u8; LINK_CHECKSUM_LEN] {
    let mut engine = Engine::<Bech32m>::new();
    engine.input_hrp(CHECKSUM_HRP);
    for &v in values {
        engine.input_fe(Fe32::try_from(v).expect("a 5-bit value"));
    }
    engine.input_target_residue();
    let residue: u32 = *engine.residue();
    std::array::from_fn(|i| ((residue >> (5 * (LINK_CHECKSUM_LEN - 1 - i))) & 31) as u8)
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

    /// Every link a single typo can make from `link`: each character
    /// replaced by every other one of the alphabet (and by characters base32
    /// lacks), each pair of neighbours swapped, each character dropped, and
    /// each alphabet character inserted at each place.
    pub(crate) fn single_typos(link: &str) -> Vec<String> {
        let body = &link[LINK_PREFIX.len()..];
        let at = |i: usize, with: &str, skip: usize| {
            format!("{LINK_PREFIX}{}{with}{}", &body[..i], &body[i + skip..])
        };
        let mut out = Vec::new();
        for i in 0..body.len() {
            let c = body.as_bytes()[i];
            for &r in BASE32_ALPHABET.iter().chain(b"0189") {
                if r != c {
                    out.push(at(i, &(r as char).to_string(), 1));
                }
            }
            if i + 1 < body.len() && body.as_bytes()[i + 1] != c {
                let swapped = format!("{}{}", &body[i + 1..i + 2], &body[i..i + 1]);
                out.push(at(i, &swapped, 2));
            }
            out.push(at(i, "", 1));
        }
        for i in 0..=body.len() {
            for &r in BASE32_ALPHABET {
                out.push(at(i, &(r as char).to_string(), 0));
            }
        }
        out
    }

    #[test]
    fn every_single_typo_is_reported_as_damage() {
        for n in [1, 3] {
            let link = sample(n).to_link();
            let typos = single_typos(&link);
            assert!(typos.len() > 60 * link.len(), "{}", typos.len());
            for t in &typos {
                assert_eq!(link_bytes(t), Err(ProtoError::LinkDamaged), "{t}");
            }
        }
        // Missing or cut checksums, and nothing after the prefix.
        let link = sample(1).to_link();
        for cut in 1..=LINK_CHECKSUM_LEN + 2 {
            assert_eq!(
                link_bytes(&link[..link.len() - cut]),
                Err(ProtoError::LinkDamaged)
            );
        }
        assert_eq!(link_bytes("TERN:"), Err(ProtoError::LinkDamaged));
        assert_eq!(link_bytes("TERN:AAAAAA"), Err(ProtoError::LinkDamaged));
    }

    #[test]
    fn the_checksum_is_bech32m_of_the_base32_characters() {
        // BIP 350's own valid string "a1lqfn3a": HRP "a", no data, and the
        // checksum "lqfn3a" in bech32's alphabet.
        let bech32_alphabet = b"qpzry9x8gf2tvdw0s3jn54khce6mua7l";
        let mut engine = Engine::<Bech32m>::new();
        engine.input_hrp(Hrp::parse_unchecked("a"));
        engine.input_target_residue();
        let r: u32 = *engine.residue();
        let check: String = (0..6)
            .map(|i| bech32_alphabet[((r >> (5 * (5 - i))) & 31) as usize] as char)
            .collect();
        assert_eq!(check, "lqfn3a");
        // A link's checksum verifies as bech32m over the same values.
        let link = sample(2).to_link();
        let values: Vec<u8> = link[5..].bytes().filter_map(base32_value).collect();
        let mut engine = Engine::<Bech32m>::new();
        engine.input_hrp(CHECKSUM_HRP);
        for v in values {
            engine.input_fe(Fe32::try_from(v).unwrap());
        }
        assert_eq!(*engine.residue(), 0x2bc8_30a3, "the bech32m constant");
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
            Err(ProtoError::LinkDamaged)
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
