//! Retained messages by topic name, searchable by topic filter.
//!
//! A tree with one node per topic level, so a SUBSCRIBE's filter is resolved by walking the levels it
//! names (a literal level is one hash lookup, `+` visits the children of one node, `#` a subtree)
//! instead of testing every retained topic. Topics must be valid topic names (no wildcards); filters
//! plain and valid. Walks recurse once per level, so their depth is bounded by the validated
//! `max_levels`.

use std::collections::HashMap;

use super::topic::split_level;

/// Retained messages by topic name, searchable by filter. `V` is the stored message.
pub struct RetainedStore<V> {
    root: Node<V>,
    /// Number of stored messages.
    len: usize,
    /// Number of nodes below the root; 0 when the store is empty.
    nodes: usize,
}

struct Node<V> {
    children: HashMap<Box<str>, Node<V>>,
    /// The message retained on the topic ending at this node, with that topic's full name so that
    /// matches can report it without rebuilding it from the path.
    entry: Option<(Box<str>, V)>,
}

impl<V> Node<V> {
    fn new() -> Self {
        Self {
            children: HashMap::new(),
            entry: None,
        }
    }

    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.entry.is_none()
    }
}

/// See the trie's twin: shrink maps that lost most entries so churn does not pin memory.
fn shrink_if_sparse<T>(map: &mut HashMap<Box<str>, T>) {
    if map.capacity() > 16 && map.len() * 4 < map.capacity() {
        map.shrink_to_fit();
    }
}

impl<V> Default for RetainedStore<V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<V> RetainedStore<V> {
    /// An empty store.
    pub fn new() -> Self {
        Self {
            root: Node::new(),
            len: 0,
            nodes: 0,
        }
    }

    /// Stores `value` as the retained message of `topic`, returning the one it replaces.
    pub fn insert(&mut self, topic: &str, value: V) -> Option<V> {
        let mut node = &mut self.root;
        let mut rest = Some(topic);
        while let Some(r) = rest {
            let (level, next) = split_level(r);
            // Owned key for the entry API: one small allocation per level per retained PUBLISH,
            // which is far cheaper than the message it stores.
            node = match node.children.entry(Box::from(level)) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    self.nodes += 1;
                    e.insert(Node::new())
                }
            };
            rest = next;
        }
        match &mut node.entry {
            // Keep the stored name: it is equal to `topic`, so no need to reallocate it.
            Some((_, old)) => Some(std::mem::replace(old, value)),
            None => {
                node.entry = Some((Box::from(topic), value));
                self.len += 1;
                None
            }
        }
    }

    /// Removes the retained message of `topic`, pruning nodes left empty.
    pub fn remove(&mut self, topic: &str) -> Option<V> {
        let removed = remove_at(&mut self.root, Some(topic), &mut self.nodes)?;
        self.len -= 1;
        Some(removed)
    }

    /// The retained message of `topic`.
    pub fn get(&self, topic: &str) -> Option<&V> {
        let mut node = &self.root;
        let mut rest = Some(topic);
        while let Some(r) = rest {
            let (level, next) = split_level(r);
            node = node.children.get(level)?;
            rest = next;
        }
        node.entry.as_ref().map(|(_, v)| v)
    }

    /// Calls `f(topic, value)` for every retained message whose topic matches `filter`, applying the
    /// `$` rule: a first-level `+` or `#` does not match topics starting with `$`. Order is
    /// unspecified.
    pub fn for_each_match<F: FnMut(&str, &V)>(&self, filter: &str, mut f: F) {
        walk(&self.root, Some(filter), true, &mut f);
    }

    /// Removes the messages for which `keep` returns false (message expiry), pruning empty nodes.
    /// Visits every message.
    pub fn retain<F: FnMut(&str, &mut V) -> bool>(&mut self, mut keep: F) {
        retain_at(&mut self.root, &mut keep, &mut self.len, &mut self.nodes);
    }

    /// Calls `f(topic, value)` for every retained message, `$` topics included. Order is
    /// unspecified.
    pub fn for_each<F: FnMut(&str, &V)>(&self, mut f: F) {
        visit_all(&self.root, &mut f);
    }

    /// Number of retained messages.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no message is retained.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of tree nodes below the root: 0 when the store is empty. Useful as a memory metric.
    pub fn node_count(&self) -> usize {
        self.nodes
    }
}

/// Follows `filter` from `node`. Literal levels loop; `+` and `#` fan out over children.
fn walk<V, F: FnMut(&str, &V)>(
    mut node: &Node<V>,
    mut rest: Option<&str>,
    mut at_root: bool,
    f: &mut F,
) {
    loop {
        let Some(r) = rest else {
            if let Some((t, v)) = &node.entry {
                f(t, v);
            }
            return;
        };
        let (level, next) = split_level(r);
        match level {
            // A valid filter has '#' only last; a misplaced one falls through as a literal level,
            // which no valid topic name contains.
            "#" if next.is_none() => {
                // "sport/#" also matches "sport" itself. The root never holds an entry.
                if let Some((t, v)) = &node.entry {
                    f(t, v);
                }
                for (name, child) in &node.children {
                    if !(at_root && name.starts_with('$')) {
                        visit_all(child, f);
                    }
                }
                return;
            }
            "+" => {
                for (name, child) in &node.children {
                    if !(at_root && name.starts_with('$')) {
                        walk(child, next, false, f);
                    }
                }
                return;
            }
            _ => match node.children.get(level) {
                Some(child) => {
                    node = child;
                    rest = next;
                    at_root = false;
                }
                None => return,
            },
        }
    }
}

fn visit_all<V, F: FnMut(&str, &V)>(node: &Node<V>, f: &mut F) {
    if let Some((t, v)) = &node.entry {
        f(t, v);
    }
    for child in node.children.values() {
        visit_all(child, f);
    }
}

fn remove_at<V>(node: &mut Node<V>, rest: Option<&str>, nodes: &mut usize) -> Option<V> {
    let Some(r) = rest else {
        return node.entry.take().map(|(_, v)| v);
    };
    let (level, next) = split_level(r);
    let child = node.children.get_mut(level)?;
    let removed = remove_at(child, next, nodes)?;
    if child.is_empty() {
        node.children.remove(level);
        shrink_if_sparse(&mut node.children);
        *nodes -= 1;
    }
    Some(removed)
}

fn retain_at<V, F: FnMut(&str, &mut V) -> bool>(
    node: &mut Node<V>,
    keep: &mut F,
    len: &mut usize,
    nodes: &mut usize,
) {
    if let Some((t, v)) = &mut node.entry {
        if !keep(t, v) {
            node.entry = None;
            *len -= 1;
        }
    }
    node.children.retain(|_, child| {
        retain_at(child, keep, len, nodes);
        if child.is_empty() {
            *nodes -= 1;
            false
        } else {
            true
        }
    });
    shrink_if_sparse(&mut node.children);
}

#[cfg(test)]
mod tests {
    use super::super::topic::matches;
    use super::*;

    fn count_nodes<V>(node: &Node<V>) -> usize {
        node.children.values().map(|c| 1 + count_nodes(c)).sum()
    }

    fn found<V>(store: &RetainedStore<V>, filter: &str) -> Vec<String> {
        let mut out = Vec::new();
        store.for_each_match(filter, |t, _| out.push(t.to_string()));
        out.sort();
        out
    }

    fn sample() -> RetainedStore<u32> {
        let mut s = RetainedStore::new();
        for (i, t) in [
            "sport",
            "sport/",
            "sport/tennis/player1",
            "sport/tennis/player1/ranking",
            "sport/tennis/player2",
            "/finance",
            "a//b",
            "$SYS/monitor/Clients",
            "$SYS",
            "x/monitor/Clients",
        ]
        .iter()
        .enumerate()
        {
            s.insert(t, i as u32);
        }
        s
    }

    #[test]
    fn insert_get_replace_remove() {
        let mut s = RetainedStore::new();
        assert!(s.is_empty());
        assert_eq!(s.insert("a/b", 1), None);
        assert_eq!(s.insert("a/b", 2), Some(1));
        assert_eq!(s.insert("a", 3), None);
        assert_eq!(s.len(), 2);
        assert_eq!(s.get("a/b"), Some(&2));
        assert_eq!(s.get("a"), Some(&3));
        assert_eq!(s.get("a/"), None);
        assert_eq!(s.get("a/b/c"), None);
        assert_eq!(s.remove("a/b/c"), None);
        assert_eq!(s.remove("a"), Some(3));
        assert_eq!(s.remove("a"), None);
        assert_eq!(s.node_count(), 2, "a stays as the parent of b");
        assert_eq!(s.remove("a/b"), Some(2));
        assert!(s.is_empty());
        assert_eq!(s.node_count(), 0);
        assert_eq!(count_nodes(&s.root), 0);
    }

    #[test]
    fn wildcard_lookup_and_dollar_rule() {
        let s = sample();
        assert_eq!(
            found(&s, "sport/tennis/player1/#"),
            ["sport/tennis/player1", "sport/tennis/player1/ranking"]
        );
        assert_eq!(found(&s, "sport/+"), ["sport/"]);
        assert_eq!(found(&s, "sport/#").len(), 5);
        assert_eq!(found(&s, "+/+"), ["/finance", "sport/"]);
        assert_eq!(found(&s, "/+"), ["/finance"]);
        assert_eq!(found(&s, "a/+/b"), ["a//b"]);
        assert_eq!(found(&s, "a//b"), ["a//b"]);
        assert_eq!(found(&s, "+/monitor/Clients"), ["x/monitor/Clients"]);
        assert_eq!(found(&s, "$SYS/#"), ["$SYS", "$SYS/monitor/Clients"]);
        assert_eq!(found(&s, "$SYS/+/Clients"), ["$SYS/monitor/Clients"]);
        let all = found(&s, "#");
        assert_eq!(all.len(), 8);
        assert!(all.iter().all(|t| !t.starts_with('$')));
        assert_eq!(found(&s, "+"), ["sport"]);
        assert!(found(&s, "nothing/#").is_empty());
        assert!(found(&s, "sport/tennis").is_empty());
    }

    #[test]
    fn retain_expires_and_prunes() {
        let mut s = sample();
        let total = s.len();
        let mut seen = 0;
        s.retain(|t, v| {
            seen += 1;
            *v += 100;
            !t.starts_with("sport")
        });
        assert_eq!(seen, total);
        assert_eq!(s.len(), total - 5);
        assert_eq!(s.get("sport"), None);
        assert_eq!(s.get("/finance"), Some(&105));
        assert_eq!(s.node_count(), count_nodes(&s.root));
        assert!(!s.root.children.contains_key("sport"));
        s.retain(|_, _| false);
        assert!(s.is_empty());
        assert_eq!(s.node_count(), 0);
        assert_eq!(count_nodes(&s.root), 0);
    }

    #[test]
    fn churn_leaves_store_empty() {
        let mut s = RetainedStore::new();
        let topic = |i: u32| format!("site{}/dev{i}/state", i % 13);
        for i in 0..100_000u32 {
            s.insert(&topic(i), i);
        }
        assert_eq!(s.node_count(), count_nodes(&s.root));
        for i in 0..100_000u32 {
            assert_eq!(s.remove(&topic(i)), Some(i));
        }
        assert!(s.is_empty());
        assert_eq!(s.node_count(), 0);
        assert!(s.root.children.capacity() <= 16);
    }

    use crate::router::testing::{random_filter, random_topic, Rng};

    #[test]
    fn property_retained_agrees_with_brute_force() {
        let mut rng = Rng(0xC0FFEE);
        // Guards against a vacuous test: the generators must produce plenty of matches.
        let mut total_matches = 0usize;
        for round in 0..20 {
            let mut store = RetainedStore::new();
            let mut topics: Vec<String> = Vec::new();
            for i in 0..200u32 {
                let t = random_topic(&mut rng);
                store.insert(&t, i);
                if !topics.contains(&t) {
                    topics.push(t);
                }
            }
            // Drop some through remove and some through retain, to cover both pruning paths.
            topics.retain(|t| {
                if rng.below(4) == 0 {
                    store.remove(t).is_none()
                } else {
                    true
                }
            });
            let parity = round % 2;
            store.retain(|_, v| *v % 5 != parity);
            topics.retain(|t| store.get(t).is_some());
            assert_eq!(store.len(), topics.len());
            assert_eq!(store.node_count(), count_nodes(&store.root));
            for _ in 0..300 {
                let filter = random_filter(&mut rng);
                let got = found(&store, &filter);
                let mut want: Vec<String> = topics
                    .iter()
                    .filter(|t| matches(&filter, t))
                    .cloned()
                    .collect();
                want.sort();
                total_matches += want.len();
                assert_eq!(got, want, "round {round} filter {filter:?}");
            }
        }
        println!("total matches checked: {total_matches}");
        assert!(total_matches > 5_000, "{total_matches}");
    }

    /// Run with: cargo test --release -- --ignored --nocapture bench_retained_lookup
    #[test]
    #[ignore]
    fn bench_retained_lookup() {
        use std::hint::black_box;
        use std::time::Instant;
        let mut s = RetainedStore::new();
        for i in 0..100_000u32 {
            s.insert(&format!("site{}/dev{i}/state", i % 100), i);
        }
        // Three shapes timed separately: they differ by orders of magnitude in work.
        type Shape = (&'static str, fn(u32) -> String);
        let shapes: [Shape; 3] = [
            ("exact 'siteN/devM/state' (1 hit)", |i| {
                let d = i * 37 % 100_000;
                format!("site{}/dev{d}/state", d % 100)
            }),
            ("'siteN/+/state' (1000 hits)", |i| {
                format!("site{}/+/state", i % 100)
            }),
            ("'siteN/devM/#' (1 hit)", |i| {
                let d = i * 11 % 100_000;
                format!("site{}/dev{d}/#", d % 100)
            }),
        ];
        for (name, make) in shapes {
            let filters: Vec<String> = (0..1000u32).map(make).collect();
            let iterations = if name.contains("1000 hits") {
                10_000
            } else {
                1_000_000
            };
            let start = Instant::now();
            let mut hits = 0usize;
            for i in 0..iterations {
                s.for_each_match(black_box(&filters[i % filters.len()]), |_, v| {
                    hits = hits.wrapping_add(1 + (*v as usize & 1));
                });
            }
            let elapsed = start.elapsed();
            println!(
                "retained: {} topics, {name}: {iterations} lookups in {:?} = {:.0} ns/lookup \
                 (checksum {hits})",
                s.len(),
                elapsed,
                elapsed.as_nanos() as f64 / iterations as f64,
            );
        }
    }
}
