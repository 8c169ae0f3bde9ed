//! A small seeded PRNG (SplitMix64) so every random choice in a test can be replayed.
//!
//! The seed comes from `FERRYMQ_E2E_SEED` when set, otherwise from the clock; it is always printed,
//! so a failing run can be repeated with `FERRYMQ_E2E_SEED=<seed> cargo test ...`.

use std::ops::Range;
use std::time::{SystemTime, UNIX_EPOCH};

/// Environment variable that fixes the seed of every [`Rng::from_env`].
pub const SEED_ENV: &str = "FERRYMQ_E2E_SEED";

/// SplitMix64: tiny, fast and good enough to pick kill points and delays.
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng { state: seed }
    }

    /// A generator seeded from `FERRYMQ_E2E_SEED` (decimal or `0x` hex) or the clock. The seed is
    /// printed together with `label`, the test it belongs to.
    pub fn from_env(label: &str) -> Rng {
        let seed = seed_from_env();
        println!("[{label}] {SEED_ENV}={seed}");
        Rng::new(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A value in `range` (`range.start` when the range is empty).
    pub fn range(&mut self, range: Range<u64>) -> u64 {
        let span = range.end.saturating_sub(range.start);
        if span == 0 {
            return range.start;
        }
        range.start + self.next_u64() % span
    }
}

/// The seed from `FERRYMQ_E2E_SEED`, or one derived from the clock when unset or unparsable.
pub fn seed_from_env() -> u64 {
    if let Ok(text) = std::env::var(SEED_ENV) {
        let text = text.trim();
        let parsed = match text.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).ok(),
            None => text.parse().ok(),
        };
        if let Some(seed) = parsed {
            return seed;
        }
        eprintln!("{SEED_ENV}={text:?} is not a number; using a clock seed");
    }
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    nanos ^ u64::from(std::process::id()).rotate_left(32)
}

/// `n` sorted, distinct kill points drawn from `range` (fewer when the range is smaller than `n`).
/// The points are spread out: the range is cut into `n` equal slices and one point is drawn from
/// each, so two kills never land on top of each other.
pub fn random_kill_points(rng: &mut Rng, n: usize, range: Range<u64>) -> Vec<u64> {
    let span = range.end.saturating_sub(range.start);
    let n = (n as u64).min(span);
    if n == 0 {
        return Vec::new();
    }
    let slice = span / n;
    (0..n)
        .map(|i| {
            let start = range.start + i * slice;
            rng.range(start..start + slice)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kill_points_are_sorted_distinct_and_in_range() {
        let mut rng = Rng::new(42);
        for _ in 0..100 {
            let points = random_kill_points(&mut rng, 3, 10_000..90_000);
            assert_eq!(points.len(), 3);
            assert!(points.windows(2).all(|w| w[0] < w[1]), "{points:?}");
            assert!(points.iter().all(|p| (10_000..90_000).contains(p)));
        }
        assert_eq!(random_kill_points(&mut rng, 5, 3..5).len(), 2);
        assert!(random_kill_points(&mut rng, 3, 5..5).is_empty());
    }

    #[test]
    fn same_seed_same_sequence() {
        let a: Vec<u64> = (0..5)
            .scan(Rng::new(7), |r, _| Some(r.next_u64()))
            .collect();
        let b: Vec<u64> = (0..5)
            .scan(Rng::new(7), |r, _| Some(r.next_u64()))
            .collect();
        assert_eq!(a, b);
        assert_ne!(a[0], a[1]);
    }
}
