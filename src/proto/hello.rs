//! Bodies of the handshake envelopes and of profile updates (PROTOCOL.md §5).
//!
//! ```text
//! profile     = u8 len || name (UTF-8, 1..=64 bytes)
//!               u16 len || status (UTF-8, 0..=512 bytes)
//!               u32 len || avatar (JPEG or PNG bytes, 0..=11264)
//! hello       = u8 min_version || u8 max_version || u8 channel
//!               u8 n || n × [32] Ed25519 sender key, one per inviter queue, in invitation order
//!               queues (count byte + SendQueue list): the joiner's reply queues
//!               profile
//! hello-reply = u8 min_version || u8 max_version || u8 channel
//!               u8 n || n × [32] Ed25519 sender key, one per joiner reply queue, in order
//!               profile
//! ```
//!
//! `channel` is how the invitation travelled as its sender saw it: 1 for a
//! QR code shown on a screen or scanned from one, 2 for a link or a shared
//! file. Each side records both, so both can state the connection's security
//! level honestly.

use serde::{Deserialize, Serialize};
use tern_wire::codec::{CodecError, Reader, Writer};

use super::invitation::{decode_queues, encode_queues, SendQueue, MAX_QUEUES};
use super::{text, ProtoError};

pub const MAX_NAME: usize = 64;
pub const MAX_STATUS: usize = 512;
/// 11 KiB: the largest that keeps the largest Hello (three reply queues with
/// the longest relay addresses, the largest profile) inside one envelope
/// beside the ratchet's post-quantum header (PROTOCOL.md §5.5, §7.4).
pub const MAX_AVATAR: usize = 11_264;
/// The longest profile encoding.
pub const MAX_PROFILE_LEN: usize = 1 + MAX_NAME + 2 + MAX_STATUS + 4 + MAX_AVATAR;
/// The longest relay address in binary form without an access key: flags,
/// a 253-byte name, port, key, a 128-byte path (§3.1.2).
const MAX_SEND_ADDRESS_LEN: usize = 1 + (1 + 253) + 2 + 32 + (1 + 128);
/// The longest Hello: versions and channel, three sender keys, three reply
/// queues, the longest profile.
pub const MAX_HELLO_LEN: usize =
    3 + (1 + 3 * 32) + (1 + 3 * (MAX_SEND_ADDRESS_LEN + 16)) + MAX_PROFILE_LEN;
const _: () = assert!(MAX_HELLO_LEN <= super::envelope::MAX_BODY_LEN);

pub const NAME_RULE: &str =
    "profile name: 1 to 64 bytes, not only white space, no control or format characters";
pub const STATUS_RULE: &str =
    "profile status: up to 512 bytes, no control or format characters but line feeds";

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    pub name: String,
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avatar: Option<Vec<u8>>,
}

impl Profile {
    /// Checks the limits and the character rules of PROTOCOL.md §5.5: the
    /// CLI calls this before saving a profile, and every received profile
    /// passes through it.
    pub fn validate(&self) -> Result<(), ProtoError> {
        // Fixed texts (the test vectors name them); `text::name_problem`
        // says which character is wrong, for people.
        if text::name_problem(&self.name, MAX_NAME).is_some() {
            return Err(CodecError::Invalid(NAME_RULE).into());
        }
        if text::status_problem(&self.status, MAX_STATUS).is_some() {
            return Err(CodecError::Invalid(STATUS_RULE).into());
        }
        if let Some(a) = &self.avatar {
            if a.len() > MAX_AVATAR
                || !(a.starts_with(b"\x89PNG\r\n\x1a\n") || a.starts_with(&[0xff, 0xd8, 0xff]))
            {
                return Err(CodecError::Invalid("avatar: a PNG or JPEG of at most 11 KiB").into());
            }
        }
        Ok(())
    }

    /// Encodes the profile. Callers [`Profile::validate`] first; fields over
    /// the limits are cut (at a character boundary) rather than panicking.
    pub fn encode(&self, w: &mut Writer) {
        w.short_bytes(clip(&self.name, MAX_NAME).as_bytes());
        let status = clip(&self.status, MAX_STATUS);
        w.u16(status.len() as u16).bytes(status.as_bytes());
        let avatar = self.avatar.as_deref().unwrap_or(&[]);
        w.long_bytes(&avatar[..avatar.len().min(MAX_AVATAR)]);
    }

    pub fn decode(r: &mut Reader<'_>) -> Result<Self, ProtoError> {
        let name = utf8(r.short_bytes()?)?;
        let n = r.u16()? as usize;
        let status = utf8(r.bytes(n)?)?;
        let avatar = r.long_bytes()?;
        let p = Self {
            name,
            status,
            avatar: (!avatar.is_empty()).then(|| avatar.to_vec()),
        };
        p.validate()?;
        Ok(p)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut w = Writer::new();
        self.encode(&mut w);
        w.into_vec()
    }

    pub fn from_bytes(b: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Reader::new(b);
        let p = Self::decode(&mut r)?;
        r.finish()?;
        Ok(p)
    }
}

fn clip(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn utf8(b: &[u8]) -> Result<String, ProtoError> {
    String::from_utf8(b.to_vec()).map_err(|_| CodecError::Invalid("UTF-8 text").into())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Channel {
    /// A QR code on a screen, scanned in person.
    Screen,
    /// A link or a file, sent through some other channel.
    Shared,
}

impl Channel {
    fn code(self) -> u8 {
        match self {
            Channel::Screen => 1,
            Channel::Shared => 2,
        }
    }

    fn from_code(c: u8) -> Result<Self, ProtoError> {
        match c {
            1 => Ok(Channel::Screen),
            2 => Ok(Channel::Shared),
            _ => Err(CodecError::Invalid("channel").into()),
        }
    }
}

fn encode_keys(keys: &[[u8; 32]], w: &mut Writer) {
    assert!(!keys.is_empty() && keys.len() <= MAX_QUEUES);
    w.u8(keys.len() as u8);
    for k in keys {
        w.bytes(k);
    }
}

fn decode_keys(r: &mut Reader<'_>) -> Result<Vec<[u8; 32]>, ProtoError> {
    let n = r.u8()? as usize;
    if n == 0 || n > MAX_QUEUES {
        return Err(CodecError::Invalid("key count").into());
    }
    (0..n)
        .map(|_| r.array().map_err(ProtoError::from))
        .collect()
}

fn decode_versions(r: &mut Reader<'_>) -> Result<(u8, u8), ProtoError> {
    let min = r.u8()?;
    let max = r.u8()?;
    if min == 0 || min > max {
        return Err(CodecError::Invalid("version range").into());
    }
    Ok((min, max))
}

/// The joiner's first message, inside the connection request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub min_version: u8,
    pub max_version: u8,
    pub channel: Channel,
    /// The keys the joiner will sign its sends to the inviter's queues with.
    pub sender_keys: Vec<[u8; 32]>,
    /// Where the inviter should send.
    pub reply_queues: Vec<SendQueue>,
    pub profile: Profile,
}

impl Hello {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u8(self.min_version)
            .u8(self.max_version)
            .u8(self.channel.code());
        encode_keys(&self.sender_keys, &mut w);
        encode_queues(&self.reply_queues, &mut w);
        self.profile.encode(&mut w);
        w.into_vec()
    }

    pub fn decode(b: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Reader::new(b);
        let (min_version, max_version) = decode_versions(&mut r)?;
        let channel = Channel::from_code(r.u8()?)?;
        let sender_keys = decode_keys(&mut r)?;
        let reply_queues = decode_queues(&mut r)?;
        let profile = Profile::decode(&mut r)?;
        r.finish()?;
        Ok(Self {
            min_version,
            max_version,
            channel,
            sender_keys,
            reply_queues,
            profile,
        })
    }
}

/// The inviter's answer, the first message on the joiner's reply queues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloReply {
    pub min_version: u8,
    pub max_version: u8,
    pub channel: Channel,
    pub sender_keys: Vec<[u8; 32]>,
    pub profile: Profile,
}

impl HelloReply {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u8(self.min_version)
            .u8(self.max_version)
            .u8(self.channel.code());
        encode_keys(&self.sender_keys, &mut w);
        self.profile.encode(&mut w);
        w.into_vec()
    }

    pub fn decode(b: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Reader::new(b);
        let (min_version, max_version) = decode_versions(&mut r)?;
        let channel = Channel::from_code(r.u8()?)?;
        let sender_keys = decode_keys(&mut r)?;
        let profile = Profile::decode(&mut r)?;
        r.finish()?;
        Ok(Self {
            min_version,
            max_version,
            channel,
            sender_keys,
            profile,
        })
    }
}

/// The version two peers use: the highest both speak.
pub fn negotiate(our: (u8, u8), their: (u8, u8)) -> Option<u8> {
    let lo = our.0.max(their.0);
    let hi = our.1.min(their.1);
    (lo <= hi).then_some(hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile() -> Profile {
        Profile {
            name: "Ada".into(),
            status: "around".into(),
            avatar: Some(b"\x89PNG\r\n\x1a\nrest".to_vec()),
        }
    }

    #[test]
    fn round_trips() {
        let q = crate::proto::invitation::tests::sample(2).queues;
        let h = Hello {
            min_version: 1,
            max_version: 1,
            channel: Channel::Screen,
            sender_keys: vec![[1; 32], [2; 32]],
            reply_queues: q,
            profile: profile(),
        };
        assert_eq!(Hello::decode(&h.encode()).unwrap(), h);
        let r = HelloReply {
            min_version: 1,
            max_version: 3,
            channel: Channel::Shared,
            sender_keys: vec![[1; 32]],
            profile: profile(),
        };
        assert_eq!(HelloReply::decode(&r.encode()).unwrap(), r);
        let b = r.encode();
        for cut in 0..b.len() {
            assert!(HelloReply::decode(&b[..cut]).is_err());
        }
    }

    /// The longest Hello there can be fits one envelope (the constant is
    /// checked at compile time; this checks the constant).
    #[test]
    fn the_longest_hello_fits_an_envelope() {
        let key = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE";
        let host = format!(
            "{}.{}.{}.{}",
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(61)
        );
        let path = format!("/{}", "p".repeat(127));
        let q = SendQueue {
            relay: format!("tern+https://{key}@{host}:65535{path}")
                .parse()
                .unwrap(),
            sender_id: [7; 16],
        };
        let h = Hello {
            min_version: 1,
            max_version: 1,
            channel: Channel::Shared,
            sender_keys: vec![[1; 32]; 3],
            reply_queues: vec![q.clone(), q.clone(), q],
            profile: Profile {
                name: "n".repeat(MAX_NAME),
                status: "s".repeat(MAX_STATUS),
                avatar: Some([&b"\x89PNG\r\n\x1a\n"[..], &vec![0; MAX_AVATAR - 8]].concat()),
            },
        };
        let b = h.encode();
        assert_eq!(b.len(), MAX_HELLO_LEN);
        assert!(b.len() <= crate::proto::envelope::MAX_BODY_LEN);
    }

    #[test]
    fn profile_limits() {
        assert!(Profile {
            name: "".into(),
            ..profile()
        }
        .validate()
        .is_err());
        assert!(Profile {
            name: "x".repeat(65),
            ..profile()
        }
        .validate()
        .is_err());
        assert!(Profile {
            avatar: Some(b"GIF89a".to_vec()),
            ..profile()
        }
        .validate()
        .is_err());
        assert!(profile().validate().is_ok());
        // Received profiles are checked too: a bidi override or a zero-width
        // space in a name, an escape sequence in a status.
        for (name, status) in [("Ada\u{202E}", ""), ("Ad\u{200B}a", ""), ("Ada", "\x1b[2J")] {
            let p = Profile {
                name: name.into(),
                status: status.into(),
                avatar: None,
            };
            let mut w = Writer::new();
            w.short_bytes(name.as_bytes());
            w.u16(status.len() as u16).bytes(status.as_bytes());
            w.long_bytes(&[]);
            assert!(p.validate().is_err(), "{name:?} {status:?}");
            assert!(Profile::from_bytes(&w.into_vec()).is_err(), "{name:?}");
        }
    }

    #[test]
    fn version_negotiation() {
        assert_eq!(negotiate((1, 1), (1, 3)), Some(1));
        assert_eq!(negotiate((1, 2), (2, 3)), Some(2));
        assert_eq!(negotiate((1, 1), (2, 3)), None);
    }
}
