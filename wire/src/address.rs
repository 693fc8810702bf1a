//! Relay addresses: everything a client needs to reach a relay and know it is
//! talking to the right one, with no DNS and no certificate authority.
//!
//! Text form (what operators hand out and users paste):
//!
//! ```text
//! tern://KEY[:ACCESS]@HOST[:PORT]                plain HTTP to HOST:PORT (default port 5223)
//! tern+https://KEY[:ACCESS]@HOST[:PORT][/PATH]   HTTPS to a front (reverse proxy, PaaS router)
//! ```
//!
//! `KEY` is the relay's X25519 identity public key in unpadded base64url (43
//! characters); every session's handshake authenticates the relay by it, so a
//! front or network in between learns nothing and cannot answer in the
//! relay's name. `ACCESS` is the
//! operator's optional access key, needed only to create queues.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use data_encoding::BASE64URL_NOPAD;
use thiserror::Error;

use crate::codec::{CodecError, Reader, Writer};

/// The port a relay listens on when an address names none.
pub const DEFAULT_PORT: u16 = 5223;
/// The HTTP path of a relay session, after the address's path.
pub const SESSION_PATH: &str = "/v2";
const MAX_ACCESS_KEY: usize = 64;
const MAX_PATH: usize = 128;
const MAX_NAME: usize = 253;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AddressError {
    #[error("a relay address starts with tern:// or tern+https://")]
    Scheme,
    #[error("the relay key is missing or is not 43 characters of base64url")]
    Key,
    #[error("the access key must be 1 to 64 characters of A-Z a-z 0-9 _ -")]
    AccessKey,
    #[error("the relay key is a low-order X25519 point: it would authenticate nobody")]
    WeakKey,
    #[error("the host is not an IP address or a valid host name")]
    Host,
    #[error("an IPv4-mapped IPv6 address names an IPv4 host: write the IPv4 address")]
    MappedV4,
    #[error("the port is not a number from 1 to 65535")]
    Port,
    #[error("a path is only allowed after a tern+https:// host, up to 128 URL-safe characters")]
    Path,
    #[error("binary relay address: {0}")]
    Binary(#[from] CodecError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    Http,
    Https,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    V4(Ipv4Addr),
    V6(Ipv6Addr),
    /// A lower-case host name; resolved by the operating system when used.
    Name(String),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::V4(a) => write!(f, "{a}"),
            Host::V6(a) => write!(f, "[{a}]"),
            Host::Name(n) => f.write_str(n),
        }
    }
}

/// A parsed relay address. Two addresses are the same relay when transport,
/// host, port, path and key are equal; the access key is a credential, not
/// part of the relay's identity (see [`RelayAddress::same_relay`]).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct RelayAddress {
    pub transport: Transport,
    pub host: Host,
    pub port: u16,
    /// Empty, or starting with '/'; only with [`Transport::Https`].
    pub path: String,
    pub key: [u8; 32],
    pub access_key: Option<String>,
}

// The access key is a credential: keep it out of debug output and logs.
impl fmt::Debug for RelayAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RelayAddress({})", self.without_access_key())
    }
}

fn valid_token(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn valid_path(p: &str) -> bool {
    p.len() <= MAX_PATH
        && p.starts_with('/')
        && p.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/_-.~".contains(&b))
}

/// One host, one form: an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) would
/// be a second spelling of an IPv4 host, so it is refused in both forms.
fn unmapped(ip: Ipv6Addr) -> Result<Ipv6Addr, AddressError> {
    if ip.to_ipv4_mapped().is_some() {
        return Err(AddressError::MappedV4);
    }
    Ok(ip)
}

/// Digits and dots only: an IPv4 address or a typo of one, never a name.
/// The u-coordinates of small order (a point of order dividing 8 on the
/// curve, or 4 on its twist), with the non-canonical spellings p and p + 1
/// of 0 and 1: the keys whose X25519 product with any clamped scalar is
/// zero (libsodium refuses the same list). A relay key among them makes the
/// session's `es` computable by anyone, so nothing would authenticate the
/// relay. A list, not a scalar multiplication, because addresses are parsed
/// wherever a contact record is read; the key is public, so the comparison
/// need not be constant time.
const LOW_ORDER: [[u8; 32]; 7] = [
    [0; 32],
    [
        1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 0,
    ],
    [
        0xe0, 0xeb, 0x7a, 0x7c, 0x3b, 0x41, 0xb8, 0xae, 0x16, 0x56, 0xe3, 0xfa, 0xf1, 0x9f, 0xc4,
        0x6a, 0xda, 0x09, 0x8d, 0xeb, 0x9c, 0x32, 0xb1, 0xfd, 0x86, 0x62, 0x05, 0x16, 0x5f, 0x49,
        0xb8, 0x00,
    ],
    [
        0x5f, 0x9c, 0x95, 0xbc, 0xa3, 0x50, 0x8c, 0x24, 0xb1, 0xd0, 0xb1, 0x55, 0x9c, 0x83, 0xef,
        0x5b, 0x04, 0x44, 0x5c, 0xc4, 0x58, 0x1c, 0x8e, 0x86, 0xd8, 0x22, 0x4e, 0xdd, 0xd0, 0x9f,
        0x11, 0x57,
    ],
    high(0xec),
    high(0xed),
    high(0xee),
];

/// `b` followed by 30 bytes 0xff and 0x7f: p − 1, p and p + 1 for 0xec,
/// 0xed, 0xee.
const fn high(b: u8) -> [u8; 32] {
    let mut k = [0xff; 32];
    k[0] = b;
    k[31] = 0x7f;
    k
}

fn check_key(key: &[u8; 32]) -> Result<(), AddressError> {
    // X25519 ignores bit 255 (RFC 7748 §5).
    let mut k = *key;
    k[31] &= 0x7f;
    if LOW_ORDER.contains(&k) {
        return Err(AddressError::WeakKey);
    }
    Ok(())
}

fn numeric(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_digit() || b == b'.')
}

fn parse_name(s: &str) -> Option<String> {
    let s = s.to_ascii_lowercase();
    let ok = !s.is_empty()
        && s.len() <= MAX_NAME
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    ok.then_some(s)
}

impl RelayAddress {
    /// A plain-HTTP address for `host:port` with `key`.
    pub fn new(host: Host, port: u16, key: [u8; 32]) -> Self {
        Self {
            transport: Transport::Http,
            host,
            port,
            path: String::new(),
            key,
            access_key: None,
        }
    }

    /// The same address with no access key: what a relay address looks like
    /// when it names somebody else's queue (sending never needs the key).
    pub fn without_access_key(&self) -> RelayAddress {
        RelayAddress {
            access_key: None,
            ..self.clone()
        }
    }

    /// True when both name the same relay, whatever their access keys.
    pub fn same_relay(&self, other: &RelayAddress) -> bool {
        self.transport == other.transport
            && self.host == other.host
            && self.port == other.port
            && self.path == other.path
            && self.key == other.key
    }

    /// The WebSocket URL a session is opened on (PROTOCOL.md §3.1.1, §3.11).
    pub fn endpoint(&self) -> String {
        let scheme = match self.transport {
            Transport::Http => "ws",
            Transport::Https => "wss",
        };
        format!(
            "{scheme}://{}:{}{}{}",
            self.host, self.port, self.path, SESSION_PATH
        )
    }

    /// The HTTP request target of the session: the path, then `/v2`.
    pub fn request_target(&self) -> String {
        format!("{}{}", self.path, SESSION_PATH)
    }

    /// The host name to present to a TLS front (`tern+https://`); an IP
    /// address for an address that names one.
    pub fn server_name(&self) -> String {
        match &self.host {
            Host::V4(a) => a.to_string(),
            Host::V6(a) => a.to_string(),
            Host::Name(n) => n.clone(),
        }
    }

    /// `host:port`, for socket-level operations.
    pub fn authority(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// A short, stable label for people: host and port plus the key's first
    /// characters. Never includes the access key.
    pub fn label(&self) -> String {
        let key = BASE64URL_NOPAD.encode(&self.key);
        format!("{}:{} ({})", self.host, self.port, &key[..8])
    }

    /// Appends the binary form (used inside invitations).
    ///
    /// ```text
    /// u8 flags   bits 0-1 host kind (0 IPv4, 1 IPv6, 2 name), bit 2 https,
    ///            bit 3 path present, bit 4 access key present, bits 5-7 zero
    /// host       4 bytes | 16 bytes | u8 length + ASCII name
    /// u16 port   big endian
    /// [32] key
    /// path       u8 length + bytes, if bit 3
    /// access     u8 length + bytes, if bit 4
    /// ```
    pub fn encode(&self, w: &mut Writer) {
        let mut flags = match self.host {
            Host::V4(_) => 0u8,
            Host::V6(_) => 1,
            Host::Name(_) => 2,
        };
        if self.transport == Transport::Https {
            flags |= 1 << 2;
        }
        if !self.path.is_empty() {
            flags |= 1 << 3;
        }
        if self.access_key.is_some() {
            flags |= 1 << 4;
        }
        w.u8(flags);
        match &self.host {
            Host::V4(a) => w.bytes(&a.octets()),
            Host::V6(a) => w.bytes(&a.octets()),
            Host::Name(n) => w.short_bytes(n.as_bytes()),
        };
        w.u16(self.port).bytes(&self.key);
        if !self.path.is_empty() {
            w.short_bytes(self.path.as_bytes());
        }
        if let Some(a) = &self.access_key {
            w.short_bytes(a.as_bytes());
        }
    }

    /// Reads the binary form written by [`RelayAddress::encode`], validating
    /// every field as strictly as the text parser does.
    pub fn decode(r: &mut Reader<'_>) -> Result<Self, AddressError> {
        let flags = r.u8()?;
        if flags & 0b1110_0000 != 0 {
            return Err(CodecError::Invalid("relay address flags").into());
        }
        let host = match flags & 0b11 {
            0 => Host::V4(Ipv4Addr::from(r.array::<4>()?)),
            1 => Host::V6(unmapped(Ipv6Addr::from(r.array::<16>()?))?),
            2 => {
                let raw = std::str::from_utf8(r.short_bytes()?).map_err(|_| AddressError::Host)?;
                let name = parse_name(raw).ok_or(AddressError::Host)?;
                // Only the canonical form: what the text parser would read
                // back as this same name (lower case, not digits and dots).
                if name != raw || numeric(&name) {
                    return Err(AddressError::Host);
                }
                Host::Name(name)
            }
            _ => return Err(CodecError::Invalid("relay host kind").into()),
        };
        let transport = if flags & (1 << 2) != 0 {
            Transport::Https
        } else {
            Transport::Http
        };
        let port = r.u16()?;
        if port == 0 {
            return Err(AddressError::Port);
        }
        let key = r.array::<32>()?;
        check_key(&key)?;
        let path = if flags & (1 << 3) != 0 {
            let p = std::str::from_utf8(r.short_bytes()?).map_err(|_| AddressError::Path)?;
            if transport != Transport::Https || !valid_path(p) || p.ends_with('/') {
                return Err(AddressError::Path);
            }
            p.to_string()
        } else {
            String::new()
        };
        let access_key = if flags & (1 << 4) != 0 {
            let a = std::str::from_utf8(r.short_bytes()?).map_err(|_| AddressError::AccessKey)?;
            if !valid_token(a, MAX_ACCESS_KEY) {
                return Err(AddressError::AccessKey);
            }
            Some(a.to_string())
        } else {
            None
        };
        Ok(Self {
            transport,
            host,
            port,
            path,
            key,
            access_key,
        })
    }
}

impl fmt::Display for RelayAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = match self.transport {
            Transport::Http => "tern",
            Transport::Https => "tern+https",
        };
        write!(f, "{scheme}://{}", BASE64URL_NOPAD.encode(&self.key))?;
        if let Some(a) = &self.access_key {
            write!(f, ":{a}")?;
        }
        write!(f, "@{}:{}{}", self.host, self.port, self.path)
    }
}

impl FromStr for RelayAddress {
    type Err = AddressError;

    fn from_str(s: &str) -> Result<Self, AddressError> {
        let s = s.trim();
        let (transport, rest) = if let Some(r) = s.strip_prefix("tern://") {
            (Transport::Http, r)
        } else if let Some(r) = s.strip_prefix("tern+https://") {
            (Transport::Https, r)
        } else {
            return Err(AddressError::Scheme);
        };
        let (userinfo, hostpart) = rest.split_once('@').ok_or(AddressError::Key)?;
        let (key_text, access_key) = match userinfo.split_once(':') {
            Some((k, a)) => {
                if !valid_token(a, MAX_ACCESS_KEY) {
                    return Err(AddressError::AccessKey);
                }
                (k, Some(a.to_string()))
            }
            None => (userinfo, None),
        };
        let key_bytes = BASE64URL_NOPAD
            .decode(key_text.as_bytes())
            .map_err(|_| AddressError::Key)?;
        let key: [u8; 32] = key_bytes.try_into().map_err(|_| AddressError::Key)?;
        check_key(&key)?;

        let (authority, path) = match hostpart.find('/') {
            Some(i) => (&hostpart[..i], &hostpart[i..]),
            None => (hostpart, ""),
        };
        // "/" alone is the same base as no path.
        let path = path.trim_end_matches('/');
        if !path.is_empty() && (transport != Transport::Https || !valid_path(path)) {
            return Err(AddressError::Path);
        }
        let default_port = match transport {
            Transport::Http => DEFAULT_PORT,
            Transport::Https => 443,
        };
        let (host, port_text) = if let Some(v6) = authority.strip_prefix('[') {
            let (addr, after) = v6.split_once(']').ok_or(AddressError::Host)?;
            let ip = unmapped(addr.parse().map_err(|_| AddressError::Host)?)?;
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or(AddressError::Port)?),
            };
            (Host::V6(ip), port)
        } else {
            let (h, p) = match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            };
            let host = if let Ok(ip) = h.parse::<Ipv4Addr>() {
                Host::V4(ip)
            } else if numeric(h) {
                // All digits and dots but not an IPv4 address: a typo, not a name.
                return Err(AddressError::Host);
            } else {
                Host::Name(parse_name(h).ok_or(AddressError::Host)?)
            };
            (host, p)
        };
        let port = match port_text {
            None => default_port,
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n > 0 && !p.starts_with('+') => n,
                _ => return Err(AddressError::Port),
            },
        };
        Ok(Self {
            transport,
            host,
            port,
            path: path.to_string(),
            key,
            access_key,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE";

    fn round_trip(text: &str) -> RelayAddress {
        let a: RelayAddress = text.parse().unwrap();
        assert_eq!(a.to_string().parse::<RelayAddress>().unwrap(), a);
        let mut w = Writer::new();
        a.encode(&mut w);
        let bytes = w.into_vec();
        let mut r = Reader::new(&bytes);
        assert_eq!(RelayAddress::decode(&mut r).unwrap(), a);
        r.finish().unwrap();
        a
    }

    #[test]
    fn parses_every_form() {
        let a = round_trip(&format!("tern://{KEY}@127.0.0.1:5223"));
        assert_eq!(a.endpoint(), "ws://127.0.0.1:5223/v2");
        assert_eq!(a.key, [1u8; 32]);
        let a = round_trip(&format!("tern://{KEY}:s3cret_-x@[::1]:80"));
        assert_eq!(a.access_key.as_deref(), Some("s3cret_-x"));
        assert_eq!(a.endpoint(), "ws://[::1]:80/v2");
        let a = round_trip(&format!("tern://{KEY}@Relay.Example.org"));
        assert_eq!(a.port, DEFAULT_PORT);
        assert_eq!(a.host, Host::Name("relay.example.org".into()));
        let a = round_trip(&format!("tern+https://{KEY}@app.example.net/tern/relay"));
        assert_eq!(a.endpoint(), "wss://app.example.net:443/tern/relay/v2");
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "http://x@1.2.3.4:1".to_string(),
            format!("tern://{KEY}"),
            "tern://short@1.2.3.4:1".to_string(),
            format!("tern://{KEY}@1.2.3.4:0"),
            format!("tern://{KEY}@1.2.3.4:99999"),
            format!("tern://{KEY}@1.2.3:1"),
            format!("tern://{KEY}@-bad-.com:1"),
            format!("tern://{KEY}@host/path"),
            format!("tern://{KEY}:bad key@host"),
            format!("tern://{KEY}:@host"),
            format!("tern+https://{KEY}@host/a b"),
            format!("tern://{KEY}@[::ffff:1.2.3.4]:1"),
        ] {
            assert!(bad.parse::<RelayAddress>().is_err(), "{bad}");
        }
    }

    /// The small-order u-coordinates (0, 1, p − 1 and the two of order 8)
    /// and the non-canonical spellings p and p + 1 of 0 and 1 make `es`
    /// public: refused in text and in binary.
    #[test]
    fn low_order_relay_keys_are_refused() {
        let mut low = vec![[0u8; 32], {
            let mut k = [0u8; 32];
            k[0] = 1;
            k
        }];
        for hex in [
            "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
            "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
            "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
            "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
            "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        ] {
            let b: Vec<u8> = (0..32)
                .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
                .collect();
            low.push(b.try_into().unwrap());
        }
        for k in &low {
            assert_eq!(x25519_dalek::x25519([0x55; 32], *k), [0; 32], "low order");
        }
        assert_eq!(low.len(), LOW_ORDER.len());
        // X25519 ignores bit 255: the same keys with it set.
        for k in low.clone() {
            let mut k = k;
            k[31] |= 0x80;
            low.push(k);
        }
        // Keys the ladder does not zero pass.
        for i in 0..64u8 {
            let k = *x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from([i; 32]))
                .as_bytes();
            assert_ne!(x25519_dalek::x25519([0x55; 32], k), [0; 32]);
            assert!(check_key(&k).is_ok());
        }
        for key in low {
            let text = format!("tern://{}@1.2.3.4:1", BASE64URL_NOPAD.encode(&key));
            assert_eq!(
                text.parse::<RelayAddress>(),
                Err(AddressError::WeakKey),
                "{text}"
            );
            let mut w = Writer::new();
            RelayAddress::new(Host::V4(Ipv4Addr::new(1, 2, 3, 4)), 1, key).encode(&mut w);
            let bytes = w.into_vec();
            assert_eq!(
                RelayAddress::decode(&mut Reader::new(&bytes)),
                Err(AddressError::WeakKey)
            );
        }
    }

    #[test]
    fn ipv4_mapped_ipv6_is_refused_in_binary_too() {
        let mut w = Writer::new();
        w.u8(1).bytes(
            &std::net::Ipv4Addr::new(1, 2, 3, 4)
                .to_ipv6_mapped()
                .octets(),
        );
        w.u16(1).bytes(&[1; 32]);
        let bytes = w.into_vec();
        assert_eq!(
            RelayAddress::decode(&mut Reader::new(&bytes)),
            Err(AddressError::MappedV4)
        );
    }

    #[test]
    fn debug_hides_access_key() {
        let a: RelayAddress = format!("tern://{KEY}:topsecret@1.2.3.4").parse().unwrap();
        assert!(!format!("{a:?}").contains("topsecret"));
    }
}
