//! Token buckets for the connection rate (shared by every listener) and the per-client publish
//! rate.

use std::time::Instant;

/// Allows `rate` events per second on average and bursts of up to `rate` events.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket. `rate` must be at least 1.
    pub fn new(rate: u32, now: Instant) -> TokenBucket {
        let rate = f64::from(rate.max(1));
        TokenBucket {
            rate,
            tokens: rate,
            last: now,
        }
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The connection-rate bucket all listeners share; `None` inside when unlimited.
#[derive(Debug)]
pub struct ConnectionRate(Option<parking_lot::Mutex<TokenBucket>>);

impl ConnectionRate {
    /// `per_sec` = 0: no limit.
    pub fn new(per_sec: u32) -> ConnectionRate {
        ConnectionRate(
            (per_sec > 0)
                .then(|| parking_lot::Mutex::new(TokenBucket::new(per_sec, Instant::now()))),
        )
    }

    /// Whether a connection accepted now is within the rate.
    pub fn admit(&self) -> bool {
        match &self.0 {
            Some(bucket) => bucket.lock().try_take(Instant::now()),
            None => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_refill() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(3, t0);
        assert!(b.try_take(t0));
        assert!(b.try_take(t0));
        assert!(b.try_take(t0));
        assert!(!b.try_take(t0));
        // A third of a second brings one token back, not more.
        let t1 = t0 + Duration::from_millis(334);
        assert!(b.try_take(t1));
        assert!(!b.try_take(t1));
        // A long pause refills to the burst size only.
        let t2 = t1 + Duration::from_secs(60);
        for _ in 0..3 {
            assert!(b.try_take(t2));
        }
        assert!(!b.try_take(t2));
    }

    #[test]
    fn unlimited_connection_rate_admits_everything() {
        let r = ConnectionRate::new(0);
        assert!((0..10_000).all(|_| r.admit()));
        let r = ConnectionRate::new(2);
        assert!(r.admit() && r.admit());
        assert!(!r.admit());
    }
}
