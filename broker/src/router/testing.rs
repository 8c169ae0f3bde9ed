//! Generators shared by the router's property tests: a tiny deterministic PRNG (no dependency)
//! and random topic names and filters over a small alphabet of levels, including empty levels and
//! `$`-topics, so that matches are frequent.

/// SplitMix64.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

const LEVELS: [&str; 5] = ["a", "b", "", "$SYS", "$x"];

pub(crate) fn random_topic(rng: &mut Rng) -> String {
    let n = 1 + rng.below(4);
    (0..n)
        .map(|_| LEVELS[rng.below(LEVELS.len())])
        .collect::<Vec<_>>()
        .join("/")
}

pub(crate) fn random_filter(rng: &mut Rng) -> String {
    let n = 1 + rng.below(4);
    let mut levels: Vec<&str> = (0..n)
        .map(|_| match rng.below(7) {
            0 | 1 => "+",
            i => LEVELS[i - 2],
        })
        .collect();
    if rng.below(3) == 0 {
        levels.push("#");
    }
    levels.join("/")
}
