//! `receipt`: what a contact can put in a delivery receipt (envelope kind
//! 4, PROTOCOL.md §7.6).
//!
//! Input: the body.
//!
//! Invariants, besides "no panic":
//! - a decoded receipt re-encodes to exactly its input (the body is
//!   canonical): 1 to 840 ids, all different, no flag but bit 0;
//! - splitting its ids for sending again gives the same ids in one receipt.

use tern::proto::receipt::{receipts_for, Receipt, FLAG_READ, MAX_RECEIPT_IDS};

pub fn run(data: &[u8]) {
    let Ok(r) = Receipt::decode(data) else {
        return;
    };
    assert_eq!(r.encode().expect("a decoded receipt encodes"), data);
    assert!(!r.ids.is_empty() && r.ids.len() <= MAX_RECEIPT_IDS);
    assert_eq!(r.flags & !FLAG_READ, 0);
    let again = receipts_for(&r.ids);
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].ids, r.ids);
}
