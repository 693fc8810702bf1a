//! Delivery receipts: the body of an envelope of kind 4 (PROTOCOL.md §7.6).
//!
//! ```text
//! u8   version   1
//! u8   flags     0; bit 0 (read) is reserved and never set by this version
//! u16  count     1 ..= MAX_RECEIPT_IDS
//! [16] × count   envelope ids of the messages stored, all different
//! ```
//!
//! The body is read to its end: trailing bytes, a count of 0, more ids than
//! fit one envelope, a repeated id, an unknown version or flag bit are all
//! malformed. A receipt says only that the messages were *stored* on the
//! device that sent it; what the ids mean is up to the receiver, which must
//! treat them as hostile (an id it never sent to that contact is ignored).

use tern_wire::codec::{CodecError, Reader, Writer};

use super::envelope::MAX_BODY_LEN;
use super::ProtoError;

/// The receipt body version this implementation writes and reads.
pub const RECEIPT_VERSION: u8 = 1;
/// Flag bit 0: the messages were read, not only stored. Reserved: never
/// set by this version; a receipt carrying it is still a delivery receipt.
pub const FLAG_READ: u8 = 0x01;
const HEADER_LEN: usize = 1 + 1 + 2;
/// The most ids one receipt carries: as many as fit one envelope body
/// (4 + 840 × 16 = 13,444 ≤ 13,456 bytes).
pub const MAX_RECEIPT_IDS: usize = (MAX_BODY_LEN - HEADER_LEN) / 16;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    pub flags: u8,
    pub ids: Vec<[u8; 16]>,
}

impl Receipt {
    /// A delivery receipt for `ids` (no flags). `None` if there are none,
    /// too many, or a repeated one: the caller splits and deduplicates.
    pub fn delivered(ids: Vec<[u8; 16]>) -> Option<Self> {
        let r = Receipt { flags: 0, ids };
        r.check().ok()?;
        Some(r)
    }

    fn check(&self) -> Result<(), ProtoError> {
        if self.ids.is_empty() {
            return Err(CodecError::Invalid("receipt without ids").into());
        }
        if self.ids.len() > MAX_RECEIPT_IDS {
            return Err(ProtoError::TooLong {
                len: self.ids.len(),
                max: MAX_RECEIPT_IDS,
            });
        }
        if self.flags & !FLAG_READ != 0 {
            return Err(CodecError::Invalid("receipt flags").into());
        }
        let mut sorted = self.ids.clone();
        sorted.sort_unstable();
        if sorted.windows(2).any(|w| w[0] == w[1]) {
            return Err(CodecError::Invalid("repeated id in a receipt").into());
        }
        Ok(())
    }

    pub fn encode(&self) -> Result<Vec<u8>, ProtoError> {
        self.check()?;
        let mut w = Writer::with_capacity(HEADER_LEN + 16 * self.ids.len());
        w.u8(RECEIPT_VERSION)
            .u8(self.flags)
            .u16(self.ids.len() as u16);
        for id in &self.ids {
            w.bytes(id);
        }
        Ok(w.into_vec())
    }

    pub fn decode(body: &[u8]) -> Result<Self, ProtoError> {
        // Bounded before anything is read: a hostile count cannot make us
        // allocate more than one envelope's worth.
        if body.len() > HEADER_LEN + 16 * MAX_RECEIPT_IDS {
            return Err(ProtoError::TooLong {
                len: body.len(),
                max: HEADER_LEN + 16 * MAX_RECEIPT_IDS,
            });
        }
        let mut r = Reader::new(body);
        if r.u8()? != RECEIPT_VERSION {
            return Err(CodecError::Invalid("receipt version").into());
        }
        let flags = r.u8()?;
        let count = r.u16()? as usize;
        if count > MAX_RECEIPT_IDS {
            return Err(ProtoError::TooLong {
                len: count,
                max: MAX_RECEIPT_IDS,
            });
        }
        let mut ids = Vec::with_capacity(count);
        for _ in 0..count {
            ids.push(r.array()?);
        }
        r.finish()?;
        let receipt = Receipt { flags, ids };
        receipt.check()?;
        Ok(receipt)
    }
}

/// Splits `ids` (deduplicated, in their first order) into receipts that
/// each fit one envelope.
pub fn receipts_for(ids: &[[u8; 16]]) -> Vec<Receipt> {
    let mut seen = std::collections::HashSet::new();
    let unique: Vec<[u8; 16]> = ids.iter().copied().filter(|i| seen.insert(*i)).collect();
    unique
        .chunks(MAX_RECEIPT_IDS)
        .filter_map(|c| Receipt::delivered(c.to_vec()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u16) -> [u8; 16] {
        let mut i = [0u8; 16];
        i[..2].copy_from_slice(&n.to_be_bytes());
        i[15] = 0xAA;
        i
    }

    #[test]
    fn round_trips_and_fits_one_envelope() {
        let r = Receipt::delivered(vec![id(1), id(2)]).unwrap();
        let b = r.encode().unwrap();
        assert_eq!(b.len(), 4 + 32);
        assert_eq!(&b[..4], &[1, 0, 0, 2]);
        assert_eq!(Receipt::decode(&b).unwrap(), r);
        let full: Vec<[u8; 16]> = (0..MAX_RECEIPT_IDS as u16).map(id).collect();
        let b = Receipt::delivered(full.clone()).unwrap().encode().unwrap();
        assert!(b.len() <= MAX_BODY_LEN);
        assert_eq!(MAX_RECEIPT_IDS, 840);
        assert_eq!(Receipt::decode(&b).unwrap().ids, full);
    }

    #[test]
    fn hostile_bodies_are_refused() {
        let good = Receipt::delivered(vec![id(1), id(2)])
            .unwrap()
            .encode()
            .unwrap();
        // Empty, short, truncated in an id, trailing bytes.
        assert!(Receipt::decode(&[]).is_err());
        assert!(Receipt::decode(&good[..3]).is_err());
        assert!(Receipt::decode(&good[..good.len() - 1]).is_err());
        let mut long = good.clone();
        long.push(0);
        assert!(Receipt::decode(&long).is_err());
        // Another version, unknown flag bits, zero ids.
        let mut v = good.clone();
        v[0] = 2;
        assert!(Receipt::decode(&v).is_err());
        let mut f = good.clone();
        f[1] = 0x02;
        assert!(Receipt::decode(&f).is_err());
        assert!(Receipt::decode(&[1, 0, 0, 0]).is_err());
        // A count that claims more than the body holds, or more than fit.
        assert!(Receipt::decode(&[1, 0, 0xFF, 0xFF]).is_err());
        let mut over = vec![1, 0];
        over.extend_from_slice(&((MAX_RECEIPT_IDS + 1) as u16).to_be_bytes());
        for n in 0..=MAX_RECEIPT_IDS as u16 {
            over.extend_from_slice(&id(n));
        }
        assert!(matches!(
            Receipt::decode(&over),
            Err(ProtoError::TooLong { .. })
        ));
        // Far larger than any envelope: refused before it is read.
        assert!(Receipt::decode(&vec![0u8; 1 << 20]).is_err());
        // The same id twice.
        let mut dup = vec![1, 0, 0, 2];
        dup.extend_from_slice(&id(7));
        dup.extend_from_slice(&id(7));
        assert!(Receipt::decode(&dup).is_err());
        // The read bit alone is allowed (reserved, not an error).
        let mut read = good.clone();
        read[1] = FLAG_READ;
        assert_eq!(Receipt::decode(&read).unwrap().flags, FLAG_READ);
    }

    #[test]
    fn split_and_deduplicated() {
        let ids: Vec<[u8; 16]> = (0..2000u16).map(id).chain([id(3), id(4)]).collect();
        let rs = receipts_for(&ids);
        assert_eq!(rs.len(), 3);
        assert_eq!(rs.iter().map(|r| r.ids.len()).sum::<usize>(), 2000);
        assert!(rs.iter().all(|r| r.encode().unwrap().len() <= MAX_BODY_LEN));
        assert!(receipts_for(&[]).is_empty());
        assert!(Receipt::delivered(Vec::new()).is_none());
        assert!(Receipt::delivered(vec![id(1), id(1)]).is_none());
    }
}
