//! What one stranger may make the relay spend: queues created per minute,
//! per connection and per network address, and connections per address.
//!
//! Kept in memory only and never logged: an address is held for as long as
//! it has connections or a bucket that is not yet full again, then
//! forgotten. IPv6 addresses count by /64, the block one host usually gets.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

/// Where a connection comes from, as the limits count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Origin([u8; 16]);

impl Origin {
    pub fn of(ip: IpAddr) -> Self {
        let mut key = [0u8; 16];
        match ip {
            IpAddr::V4(a) => key[..4].copy_from_slice(&a.octets()),
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(v4) => key[..4].copy_from_slice(&v4.octets()),
                None => {
                    key[..8].copy_from_slice(&a.octets()[..8]);
                    key[15] = 6;
                }
            },
        }
        Origin(key)
    }
}

/// A token bucket: `burst` at once, then `per_minute` a minute.
#[derive(Debug, Clone, Copy)]
pub struct Rate {
    pub burst: u32,
    pub per_minute: u32,
}

#[derive(Debug, Clone)]
pub struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    pub fn full(rate: Rate) -> Self {
        Self {
            tokens: f64::from(rate.burst),
            at: Instant::now(),
        }
    }

    fn refill(&mut self, rate: Rate, now: Instant) {
        let secs = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens =
            (self.tokens + secs * f64::from(rate.per_minute) / 60.0).min(f64::from(rate.burst));
        self.at = now;
    }

    /// Takes a token if there is one.
    pub fn take(&mut self, rate: Rate, now: Instant) -> bool {
        self.refill(rate, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn is_full(&mut self, rate: Rate, now: Instant) -> bool {
        self.refill(rate, now);
        self.tokens >= f64::from(rate.burst)
    }
}

/// CREATE rate limits per origin, shared by every worker.
pub struct CreateLimits {
    rate: Rate,
    buckets: Mutex<HashMap<Origin, Bucket>>,
}

impl CreateLimits {
    pub fn new(rate: Rate) -> Self {
        Self {
            rate,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `origin` may create one more queue now.
    pub fn allow(&self, origin: Origin) -> bool {
        let now = Instant::now();
        let mut map = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        let rate = self.rate;
        // Forget full buckets once in a while, so the map holds only
        // addresses that created queues lately.
        if map.len() > 4096 {
            map.retain(|_, b| !b.is_full(rate, now));
        }
        map.entry(origin)
            .or_insert_with(|| Bucket::full(rate))
            .take(rate, now)
    }
}

/// Connections per origin (the event loop's own, so no lock).
#[derive(Default)]
pub struct ConnectionCounts(HashMap<Origin, u32>);

impl ConnectionCounts {
    /// Counts a new connection unless `origin` is at `max`.
    pub fn admit(&mut self, origin: Origin, max: u32) -> bool {
        let n = self.0.entry(origin).or_insert(0);
        if *n >= max {
            return false;
        }
        *n += 1;
        true
    }

    pub fn release(&mut self, origin: Origin) {
        if let Some(n) = self.0.get_mut(&origin) {
            *n -= 1;
            if *n == 0 {
                self.0.remove(&origin);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn buckets_burst_then_refill() {
        let rate = Rate {
            burst: 3,
            per_minute: 60,
        };
        let mut b = Bucket::full(rate);
        let t0 = Instant::now();
        assert!((0..3).all(|_| b.take(rate, t0)));
        assert!(!b.take(rate, t0));
        assert!(b.take(rate, t0 + Duration::from_millis(1100)));
        assert!(!b.take(rate, t0 + Duration::from_millis(1200)));
    }

    #[test]
    fn ipv6_counts_by_64_and_connections_are_capped() {
        let a = Origin::of("2001:db8::1".parse().unwrap());
        let b = Origin::of("2001:db8::ffff:2".parse().unwrap());
        let c = Origin::of("2001:db8:0:1::1".parse().unwrap());
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(
            Origin::of("::ffff:1.2.3.4".parse().unwrap()),
            Origin::of("1.2.3.4".parse().unwrap())
        );
        let mut counts = ConnectionCounts::default();
        assert!(counts.admit(a, 2) && counts.admit(b, 2));
        assert!(!counts.admit(a, 2));
        assert!(counts.admit(c, 2));
        counts.release(a);
        assert!(counts.admit(b, 2));
    }
}
