//! Remembers the HPKE `enc` of every request that passed the freshness check
//! for as long as the same block could pass it again, so a captured block
//! cannot be replayed. In memory only: after a restart the freshness window
//! starts at the relay's start time, so blocks from before it are stale anyway.

use std::collections::{HashSet, VecDeque};

#[derive(Default)]
pub struct ReplayCache {
    seen: HashSet<[u8; 32]>,
    /// (forget after this time in ms, enc), roughly in insertion order.
    order: VecDeque<(u64, [u8; 32])>,
}

impl ReplayCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `enc` until `forget_at_ms`; false if it was already recorded.
    pub fn insert(&mut self, enc: [u8; 32], forget_at_ms: u64, now_ms: u64) -> bool {
        // Entries are pruned from the front only while they have expired; an
        // entry queued behind a longer-lived one is kept a little longer than
        // necessary, never shorter.
        while let Some(&(forget, old)) = self.order.front() {
            if forget > now_ms {
                break;
            }
            self.seen.remove(&old);
            self.order.pop_front();
        }
        if !self.seen.insert(enc) {
            return false;
        }
        self.order.push_back((forget_at_ms, enc));
        true
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.seen.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_until_expiry() {
        let mut c = ReplayCache::new();
        assert!(c.insert([1; 32], 100, 0));
        assert!(!c.insert([1; 32], 100, 50));
        assert!(c.insert([2; 32], 300, 99));
        assert!(!c.insert([1; 32], 200, 99));
        assert!(c.insert([1; 32], 250, 100));
        assert_eq!(c.len(), 2);
    }
}
