//! The message envelope inside the ratchet (PROTOCOL.md §7), padded so that
//! every envelope — and so every message on the wire — has the same size.
//!
//! ```text
//! u8   version      protocol version the sender used
//! u8   kind         1 text, 2 profile, 3 control, 4 receipt, 5 hello,
//!                   6 hello-reply, 7 confirm, 8 device, 9 file offer;
//!                   others reserved
//! [16] id           random message id (dedup, references)
//! u64  seq          1, 2, 3, … per direction of a connection
//! [32] prev         chain hash of envelope seq-1 (zeros for seq 1)
//! u64  sent_at      sender's clock, ms since the Unix epoch
//! u32  body length
//! body
//! zero padding to ENVELOPE_LEN
//! ```
//!
//! The chain hash of an envelope is `SHA-256("tern/v1 chain" || envelope
//! without padding)`; a receiver that checks `prev` against the envelope it
//! received before detects drops, reordering and duplicates even when a relay
//! withholds messages (the ratchet alone would only see skipped keys).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tern_wire::codec::{CodecError, Reader, Writer};

use super::keys::b64;
use super::{ProtoError, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};

/// Size of every padded envelope: the most that leaves room, in a 16,000-byte
/// queue message of every type (the resync accept is the tightest), for the
/// ratchet's 2,353-byte hybrid header and tag (PROTOCOL.md §7.4).
pub const ENVELOPE_LEN: usize = 13_526;
const HEADER_LEN: usize = 1 + 1 + 16 + 8 + 32 + 8 + 4;
/// The largest body an envelope carries.
pub const MAX_BODY_LEN: usize = ENVELOPE_LEN - HEADER_LEN;
const CHAIN_LABEL: &[u8] = b"tern/v1 chain";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    Text,
    Profile,
    Control,
    Receipt,
    Hello,
    HelloReply,
    Confirm,
    /// Between the devices of one person, or from one to a contact
    /// (PROTOCOL.md §12).
    Device,
    /// A file offer (PROTOCOL.md §16): where a file's chunks are and the key
    /// that opens them.
    File,
    /// A kind from a newer version: kept, shown as unsupported, never fatal.
    Unknown(u8),
}

impl Kind {
    pub fn code(self) -> u8 {
        match self {
            Kind::Text => 1,
            Kind::Profile => 2,
            Kind::Control => 3,
            Kind::Receipt => 4,
            Kind::Hello => 5,
            Kind::HelloReply => 6,
            Kind::Confirm => 7,
            Kind::Device => 8,
            Kind::File => 9,
            Kind::Unknown(c) => c,
        }
    }

    pub fn from_code(c: u8) -> Kind {
        match c {
            1 => Kind::Text,
            2 => Kind::Profile,
            3 => Kind::Control,
            4 => Kind::Receipt,
            5 => Kind::Hello,
            6 => Kind::HelloReply,
            7 => Kind::Confirm,
            8 => Kind::Device,
            9 => Kind::File,
            other => Kind::Unknown(other),
        }
    }
}

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub version: u8,
    pub kind: Kind,
    #[serde(with = "b64")]
    pub id: [u8; 16],
    pub seq: u64,
    #[serde(with = "b64")]
    pub prev: [u8; 32],
    pub sent_at_ms: u64,
    pub body: Vec<u8>,
}

impl std::fmt::Debug for Envelope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Envelope")
            .field("kind", &self.kind)
            .field("seq", &self.seq)
            .field("body_len", &self.body.len())
            .finish_non_exhaustive()
    }
}

impl Envelope {
    fn encode_unpadded(&self) -> Writer {
        let mut w = Writer::with_capacity(ENVELOPE_LEN);
        w.u8(self.version)
            .u8(self.kind.code())
            .bytes(&self.id)
            .u64(self.seq)
            .bytes(&self.prev)
            .u64(self.sent_at_ms)
            .long_bytes(&self.body);
        w
    }

    /// The padded encoding, exactly [`ENVELOPE_LEN`] bytes.
    pub fn encode(&self) -> Result<Vec<u8>, ProtoError> {
        if self.body.len() > MAX_BODY_LEN {
            return Err(ProtoError::TooLong {
                len: self.body.len(),
                max: MAX_BODY_LEN,
            });
        }
        Ok(self
            .encode_unpadded()
            .pad_to(ENVELOPE_LEN)
            .expect("body length checked"))
    }

    pub fn decode(padded: &[u8]) -> Result<Self, ProtoError> {
        if padded.len() != ENVELOPE_LEN {
            return Err(CodecError::Invalid("envelope length").into());
        }
        let mut r = Reader::new(padded);
        let version = r.u8()?;
        if version < MIN_PROTOCOL_VERSION {
            return Err(CodecError::Invalid("envelope version").into());
        }
        if version > PROTOCOL_VERSION {
            return Err(ProtoError::UnsupportedVersion(version));
        }
        let kind = Kind::from_code(r.u8()?);
        let id = r.array()?;
        let seq = r.u64()?;
        let prev = r.array()?;
        let sent_at_ms = r.u64()?;
        let body = r.long_bytes()?.to_vec();
        r.finish_padding()?;
        if seq == 0 {
            return Err(CodecError::Invalid("sequence number 0").into());
        }
        Ok(Self {
            version,
            kind,
            id,
            seq,
            prev,
            sent_at_ms,
            body,
        })
    }

    /// This envelope's link in the hash chain.
    pub fn chain_hash(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(CHAIN_LABEL);
        h.update(self.encode_unpadded().into_vec());
        h.finalize().into()
    }
}

/// The sending end of a direction: numbers envelopes and links them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainSender {
    pub last_seq: u64,
    #[serde(with = "b64")]
    pub last_hash: [u8; 32],
}

impl ChainSender {
    /// Builds the next envelope and advances the chain. `version` is the one
    /// negotiated with the peer (before negotiation, the lowest supported).
    pub fn next(
        &mut self,
        version: u8,
        kind: Kind,
        id: [u8; 16],
        sent_at_ms: u64,
        body: Vec<u8>,
    ) -> Result<Envelope, ProtoError> {
        if body.len() > MAX_BODY_LEN {
            return Err(ProtoError::TooLong {
                len: body.len(),
                max: MAX_BODY_LEN,
            });
        }
        let env = Envelope {
            version,
            kind,
            id,
            seq: self.last_seq + 1,
            prev: self.last_hash,
            sent_at_ms,
            body,
        };
        self.last_seq = env.seq;
        self.last_hash = env.chain_hash();
        Ok(env)
    }
}

/// What the chain says about a received envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChainStatus {
    /// The next one expected.
    InOrder,
    /// Newer than expected: `missing` envelopes before it have not arrived (yet).
    Gap { missing: u64 },
    /// Fills an earlier gap.
    Late,
}

/// Why a received envelope does not fit the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainError {
    /// The same sequence number again.
    Duplicate,
    /// `prev` does not match its predecessor (or its successor's `prev` does
    /// not match it): the sender's history was altered or forked.
    Mismatch,
}

/// How many recent links the receiver remembers to check neighbours.
const RECENT: usize = 128;

/// seq → (hash, prev) of received envelopes.
type Links = BTreeMap<u64, ([u8; 32], [u8; 32])>;

/// The links as `[seq, hash, prev]` with base64url hashes: this is rewritten
/// with the connection on every message, and JSON arrays of byte values
/// made it several times larger (and slower) than it needs to be.
mod recent_links {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::Links;

    #[derive(Serialize, Deserialize)]
    struct Link(
        u64,
        #[serde(with = "super::b64")] [u8; 32],
        #[serde(with = "super::b64")] [u8; 32],
    );

    pub fn serialize<S: Serializer>(m: &Links, s: S) -> Result<S::Ok, S::Error> {
        m.iter()
            .map(|(k, (h, p))| Link(*k, *h, *p))
            .collect::<Vec<_>>()
            .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Links, D::Error> {
        Ok(Vec::<Link>::deserialize(d)?
            .into_iter()
            .map(|Link(k, h, p)| (k, (h, p)))
            .collect())
    }
}

/// The receiving end of a direction.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainReceiver {
    pub highest: u64,
    /// seq → (hash, prev) of recently received envelopes.
    #[serde(with = "recent_links")]
    recent: Links,
    /// Sequence numbers below `highest` not received yet (capped).
    missing: BTreeSet<u64>,
}

impl ChainReceiver {
    /// Envelopes known to be missing so far.
    pub fn missing(&self) -> u64 {
        self.missing.len() as u64
    }

    /// The chain hash of received envelope `seq`, while it is tracked.
    pub fn hash_of(&self, seq: u64) -> Option<[u8; 32]> {
        self.recent.get(&seq).map(|(h, _)| *h)
    }

    /// Checks `env` against the chain without changing anything.
    pub fn check(&self, env: &Envelope) -> Result<ChainStatus, ChainError> {
        let seq = env.seq;
        // Only what is still tracked can be called a duplicate; an older
        // number is a late arrival (the ratchet already guarantees that no
        // message is accepted twice).
        if self.recent.contains_key(&seq) {
            return Err(ChainError::Duplicate);
        }
        let hash = env.chain_hash();
        if seq == 1 && env.prev != [0u8; 32] {
            return Err(ChainError::Mismatch);
        }
        if let Some((prev_hash, _)) = seq.checked_sub(1).and_then(|p| self.recent.get(&p)) {
            if *prev_hash != env.prev {
                return Err(ChainError::Mismatch);
            }
        }
        if let Some((_, next_prev)) = seq.checked_add(1).and_then(|n| self.recent.get(&n)) {
            if *next_prev != hash {
                return Err(ChainError::Mismatch);
            }
        }
        Ok(if Some(seq) == self.highest.checked_add(1) {
            ChainStatus::InOrder
        } else if seq > self.highest {
            ChainStatus::Gap {
                missing: seq - self.highest - 1,
            }
        } else {
            ChainStatus::Late
        })
    }

    /// Records `env` (call after [`ChainReceiver::check`] accepted it).
    pub fn record(&mut self, env: &Envelope) {
        let seq = env.seq;
        if seq > self.highest {
            // Cap the missing set: a hostile peer must not grow our state.
            let start = (self.highest + 1).max(seq.saturating_sub(RECENT as u64));
            self.missing.extend(start..seq);
            self.highest = seq;
        } else {
            self.missing.remove(&seq);
        }
        self.recent.insert(seq, (env.chain_hash(), env.prev));
        while self.recent.len() > RECENT {
            self.recent.pop_first();
        }
        while self.missing.len() > RECENT {
            self.missing.pop_first();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: usize) -> Vec<Envelope> {
        let mut s = ChainSender::default();
        (0..n)
            .map(|i| {
                s.next(1, Kind::Text, [i as u8; 16], 1000 + i as u64, vec![b'a'; i])
                    .unwrap()
            })
            .collect()
    }

    #[test]
    fn encode_is_fixed_size_and_round_trips() {
        for e in chain(3) {
            let p = e.encode().unwrap();
            assert_eq!(p.len(), ENVELOPE_LEN);
            assert_eq!(Envelope::decode(&p).unwrap(), e);
        }
        let mut s = ChainSender::default();
        let big = s
            .next(1, Kind::Text, [0; 16], 0, vec![0; MAX_BODY_LEN])
            .unwrap();
        assert_eq!(big.encode().unwrap().len(), ENVELOPE_LEN);
        assert!(s
            .next(1, Kind::Text, [0; 16], 0, vec![0; MAX_BODY_LEN + 1])
            .is_err());
    }

    #[test]
    fn newer_version_and_garbage_are_rejected() {
        let mut p = chain(1)[0].encode().unwrap();
        p[0] = PROTOCOL_VERSION + 1;
        assert_eq!(
            Envelope::decode(&p),
            Err(ProtoError::UnsupportedVersion(PROTOCOL_VERSION + 1))
        );
        let mut p = chain(1)[0].encode().unwrap();
        p[ENVELOPE_LEN - 1] = 1;
        assert!(Envelope::decode(&p).is_err());
    }

    #[test]
    fn chain_detects_gaps_duplicates_and_forks() {
        let c = chain(5);
        let mut r = ChainReceiver::default();
        let mut take = |e: &Envelope| {
            let s = r.check(e);
            if s.is_ok() {
                r.record(e);
            }
            s
        };
        assert_eq!(take(&c[0]), Ok(ChainStatus::InOrder));
        assert_eq!(take(&c[0]), Err(ChainError::Duplicate));
        assert_eq!(take(&c[3]), Ok(ChainStatus::Gap { missing: 2 }));
        assert_eq!(take(&c[1]), Ok(ChainStatus::Late));
        // A forged envelope 3 whose prev does not link to 2.
        let mut forged = c[2].clone();
        forged.prev = [9; 32];
        assert_eq!(take(&forged), Err(ChainError::Mismatch));
        assert_eq!(take(&c[2]), Ok(ChainStatus::Late));
        assert_eq!(take(&c[4]), Ok(ChainStatus::InOrder));
        assert_eq!(r.missing(), 0);
    }
}
