//! A map for the subscription trie's nodes, where almost every map is tiny: a level like
//! `devices/<id>` has one child, and most filters have one or a few subscribers. A `HashMap`'s
//! first table holds four slots plus control bytes, and each node had three of them: that was
//! most of the 2.6 KiB a device's command subscription cost (docs/benchmarks.md, "Sizes for the
//! scale-out plan"). Here up to [`INLINE_MAX`] entries live in a `Vec` sized exactly to its
//! entries and found by a linear scan (no hashing, which is also faster at that size); a map
//! that grows past it becomes a `HashMap`, and goes back when it shrinks to half of that, so a
//! filter with 100,000 subscribers keeps O(1) inserts and removals.

use std::borrow::Borrow;
use std::collections::{hash_map, HashMap};
use std::hash::Hash;

/// Entries kept in the inline `Vec` at most.
const INLINE_MAX: usize = 8;

pub(super) enum SmallMap<Q, T> {
    Inline(Vec<(Q, T)>),
    Hashed(HashMap<Q, T>),
}

impl<Q, T> SmallMap<Q, T> {
    pub(super) fn len(&self) -> usize {
        match self {
            SmallMap::Inline(v) => v.len(),
            SmallMap::Hashed(m) => m.len(),
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Slots allocated (for tests that check that emptied maps give memory back).
    #[cfg(test)]
    pub(super) fn capacity(&self) -> usize {
        match self {
            SmallMap::Inline(v) => v.capacity(),
            SmallMap::Hashed(m) => m.capacity(),
        }
    }

    pub(super) fn iter(&self) -> Iter<'_, Q, T> {
        match self {
            SmallMap::Inline(v) => Iter::Inline(v.iter()),
            SmallMap::Hashed(m) => Iter::Hashed(m.iter()),
        }
    }
}

impl<Q: Eq + Hash, T> SmallMap<Q, T> {
    pub(super) fn new() -> Self {
        SmallMap::Inline(Vec::new())
    }

    pub(super) fn get<B>(&self, q: &B) -> Option<&T>
    where
        Q: Borrow<B>,
        B: Eq + Hash + ?Sized,
    {
        match self {
            SmallMap::Inline(v) => v.iter().find(|(k, _)| k.borrow() == q).map(|(_, t)| t),
            SmallMap::Hashed(m) => m.get(q),
        }
    }

    pub(super) fn get_mut<B>(&mut self, q: &B) -> Option<&mut T>
    where
        Q: Borrow<B>,
        B: Eq + Hash + ?Sized,
    {
        match self {
            SmallMap::Inline(v) => v.iter_mut().find(|(k, _)| k.borrow() == q).map(|(_, t)| t),
            SmallMap::Hashed(m) => m.get_mut(q),
        }
    }

    /// Inserts or replaces; returns the replaced value.
    pub(super) fn insert(&mut self, q: Q, t: T) -> Option<T> {
        match self {
            SmallMap::Inline(v) => {
                if let Some(slot) = v.iter_mut().find(|(k, _)| *k == q) {
                    return Some(std::mem::replace(&mut slot.1, t));
                }
                self.push_new(q, t);
                None
            }
            SmallMap::Hashed(m) => m.insert(q, t),
        }
    }

    /// The value for `q`, inserting `make()` first when there is none.
    pub(super) fn get_or_insert_with(&mut self, q: Q, make: impl FnOnce() -> T) -> &mut T {
        let at = match self {
            SmallMap::Inline(v) => v.iter().position(|(k, _)| *k == q),
            SmallMap::Hashed(m) => return m.entry(q).or_insert_with(make),
        };
        match at {
            Some(i) => self.inline_at(i),
            None => self.push_new(q, make()),
        }
    }

    pub(super) fn remove<B>(&mut self, q: &B) -> Option<T>
    where
        Q: Borrow<B>,
        B: Eq + Hash + ?Sized,
    {
        match self {
            SmallMap::Inline(v) => {
                let i = v.iter().position(|(k, _)| k.borrow() == q)?;
                let (_, t) = v.swap_remove(i);
                v.shrink_to_fit();
                Some(t)
            }
            SmallMap::Hashed(m) => {
                let t = m.remove(q)?;
                if m.len() <= INLINE_MAX / 2 {
                    let mut v = Vec::with_capacity(m.len());
                    v.extend(m.drain());
                    *self = SmallMap::Inline(v);
                } else if m.capacity() > 16 && m.len() * 4 < m.capacity() {
                    m.shrink_to_fit();
                }
                Some(t)
            }
        }
    }

    /// Adds an entry known to be new; returns it.
    fn push_new(&mut self, q: Q, t: T) -> &mut T {
        if let SmallMap::Inline(v) = self {
            if v.len() >= INLINE_MAX {
                let mut m = HashMap::with_capacity(INLINE_MAX * 2);
                m.extend(v.drain(..));
                *self = SmallMap::Hashed(m);
            }
        }
        match self {
            SmallMap::Inline(v) => {
                // Exactly as many slots as entries: a node with one child holds one slot.
                v.reserve_exact(1);
                v.push((q, t));
                let last = v.len() - 1;
                &mut v[last].1
            }
            SmallMap::Hashed(m) => match m.entry(q) {
                hash_map::Entry::Occupied(e) => {
                    let slot = e.into_mut();
                    *slot = t;
                    slot
                }
                hash_map::Entry::Vacant(e) => e.insert(t),
            },
        }
    }

    fn inline_at(&mut self, i: usize) -> &mut T {
        match self {
            SmallMap::Inline(v) => &mut v[i].1,
            // Only called with a position found in the inline vector just before.
            SmallMap::Hashed(_) => unreachable!("inline_at on a hashed map"),
        }
    }
}

pub(super) enum Iter<'a, Q, T> {
    Inline(std::slice::Iter<'a, (Q, T)>),
    Hashed(hash_map::Iter<'a, Q, T>),
}

impl<'a, Q, T> Iterator for Iter<'a, Q, T> {
    type Item = (&'a Q, &'a T);

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Iter::Inline(i) => i.next().map(|(q, t)| (q, t)),
            Iter::Hashed(i) => i.next(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Same answers as a HashMap through growth past the inline limit and back.
    #[test]
    fn behaves_like_a_hash_map_across_both_forms() {
        let mut small = SmallMap::new();
        let mut reference = HashMap::new();
        let mut rng = 0x9E37_79B9_7F4A_7C15u64;
        for step in 0..20_000u32 {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let key = (rng >> 33) % 24;
            match (rng >> 20) % 4 {
                0 | 1 => assert_eq!(small.insert(key, step), reference.insert(key, step)),
                2 => assert_eq!(small.remove(&key), reference.remove(&key)),
                _ => {
                    let got = *small.get_or_insert_with(key, || step);
                    assert_eq!(got, *reference.entry(key).or_insert(step));
                }
            }
            assert_eq!(small.len(), reference.len());
            assert_eq!(small.get(&key), reference.get(&key));
        }
        let mut all: Vec<_> = small.iter().map(|(k, v)| (*k, *v)).collect();
        let mut expected: Vec<_> = reference.into_iter().collect();
        all.sort_unstable();
        expected.sort_unstable();
        assert_eq!(all, expected);
    }

    #[test]
    fn small_maps_hold_exactly_their_entries_and_big_ones_go_back() {
        let mut m = SmallMap::new();
        m.insert(1u32, ());
        assert_eq!(m.capacity(), 1);
        for i in 0..1_000u32 {
            m.insert(i, ());
        }
        assert!(matches!(m, SmallMap::Hashed(_)));
        for i in 0..998u32 {
            m.remove(&i);
        }
        assert!(matches!(m, SmallMap::Inline(_)));
        assert_eq!(m.capacity(), 2);
    }
}
