//! Failed authentication attempts per source address: a token bucket per IP, in a bounded map.
//!
//! Each IP may fail `burst` times in a row; one more attempt is earned every `refill`. While its
//! bucket is empty every CONNECT from it is refused before its credentials are looked at (v5
//! CONNACK 0x9F), so guessing passwords costs the guesser time, not the broker CPU.
//!
//! The map is bounded by two generations of at most `capacity / 2` entries each: when the
//! current one is full it becomes the previous one and the older is dropped. An address seen
//! recently moves to the current generation, so the ones forgotten first are the ones that
//! stopped failing longest ago; at worst, an attacker with more addresses than `capacity` gets
//! its buckets refilled early.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

#[derive(Debug)]
pub struct FailureLimiter {
    burst: f64,
    refill: Duration,
    half: usize,
    maps: Mutex<(HashMap<IpAddr, Bucket>, HashMap<IpAddr, Bucket>)>,
}

impl FailureLimiter {
    /// `burst` 0 disables the limit.
    pub fn new(burst: u32, refill: Duration, capacity: usize) -> FailureLimiter {
        FailureLimiter {
            burst: f64::from(burst),
            refill: refill.max(Duration::from_millis(1)),
            half: (capacity / 2).max(1),
            maps: Mutex::new((HashMap::new(), HashMap::new())),
        }
    }

    fn refilled(&self, bucket: Bucket, now: Instant) -> Bucket {
        let earned = now.duration_since(bucket.updated).as_secs_f64() / self.refill.as_secs_f64();
        Bucket {
            tokens: (bucket.tokens + earned).min(self.burst),
            updated: now,
        }
    }

    /// Whether `ip` has used up its failures.
    pub fn is_blocked(&self, ip: IpAddr, now: Instant) -> bool {
        if self.burst == 0.0 {
            return false;
        }
        let maps = self.maps.lock();
        let bucket = maps.0.get(&ip).or_else(|| maps.1.get(&ip));
        bucket.is_some_and(|b| self.refilled(*b, now).tokens < 1.0)
    }

    /// Records one failed attempt from `ip`.
    pub fn record_failure(&self, ip: IpAddr, now: Instant) {
        if self.burst == 0.0 {
            return;
        }
        let mut maps = self.maps.lock();
        let (current, previous) = &mut *maps;
        let bucket = current
            .remove(&ip)
            .or_else(|| previous.remove(&ip))
            .map(|b| self.refilled(b, now))
            .unwrap_or(Bucket {
                tokens: self.burst,
                updated: now,
            });
        if current.len() >= self.half {
            *previous = std::mem::take(current);
        }
        current.insert(
            ip,
            Bucket {
                tokens: (bucket.tokens - 1.0).max(0.0),
                updated: now,
            },
        );
    }

    /// Addresses tracked now (for tests and metrics).
    pub fn tracked(&self) -> usize {
        let maps = self.maps.lock();
        maps.0.len() + maps.1.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u32) -> IpAddr {
        IpAddr::from(n.to_be_bytes())
    }

    #[test]
    fn blocks_after_burst_and_refills() {
        let l = FailureLimiter::new(3, Duration::from_secs(10), 100);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(!l.is_blocked(ip(1), t0));
            l.record_failure(ip(1), t0);
        }
        assert!(l.is_blocked(ip(1), t0));
        assert!(!l.is_blocked(ip(2), t0));
        assert!(l.is_blocked(ip(1), t0 + Duration::from_secs(9)));
        assert!(!l.is_blocked(ip(1), t0 + Duration::from_secs(10)));
    }

    #[test]
    fn map_stays_bounded() {
        let l = FailureLimiter::new(1, Duration::from_secs(60), 100);
        let t0 = Instant::now();
        for n in 0..10_000 {
            l.record_failure(ip(n), t0);
            assert!(l.tracked() <= 100);
        }
        // The most recent addresses are still remembered.
        assert!(l.is_blocked(ip(9_999), t0));
    }

    #[test]
    fn zero_burst_disables() {
        let l = FailureLimiter::new(0, Duration::from_secs(60), 100);
        let t0 = Instant::now();
        for _ in 0..10 {
            l.record_failure(ip(1), t0);
        }
        assert!(!l.is_blocked(ip(1), t0));
        assert_eq!(l.tracked(), 0);
    }
}
