//! Security codes (PROTOCOL.md §8): a number both people can compare out of
//! band. It is derived from the handshake transcript, so it is equal on both
//! sides exactly when neither side's keys were substituted.
//!
//! `d = SHA-256("tern/v1 security code" || transcript)`; the code is six
//! groups of five digits, group `i` being the big-endian integer of
//! `d[5i..5i+5]` modulo 100000, zero-padded.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

const LABEL: &[u8] = b"tern/v1 security code";

pub fn security_code(transcript: &[u8; 32]) -> String {
    let d: [u8; 32] = Sha256::new()
        .chain_update(LABEL)
        .chain_update(transcript)
        .finalize()
        .into();
    (0..6)
        .map(|i| {
            let v = d[i * 5..i * 5 + 5]
                .iter()
                .fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
            format!("{:05}", v % 100_000)
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Compares a code typed (or scanned) by a person with ours, ignoring spaces
/// and dashes, in constant time.
pub fn codes_match(ours: &str, theirs: &str) -> bool {
    let norm = |s: &str| -> Vec<u8> { s.bytes().filter(|b| b.is_ascii_digit()).collect() };
    let (a, b) = (norm(ours), norm(theirs));
    a.len() == b.len() && bool::from(a.ct_eq(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_and_match() {
        let c = security_code(&[1; 32]);
        assert_eq!(c.len(), 35);
        assert_eq!(c.split(' ').count(), 6);
        assert!(codes_match(&c, &c.replace(' ', "-")));
        assert!(!codes_match(&c, &security_code(&[2; 32])));
        assert!(!codes_match(&c, &c[..20]));
    }
}
