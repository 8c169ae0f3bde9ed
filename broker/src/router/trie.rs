//! The subscription trie: every PUBLISH topic is matched against it.
//!
//! One node per filter level. Literal levels live in a map keyed by the level text
//! ([`SmallMap`]: a short exact-size list, a `HashMap` once it grows); `+` has its own child so that
//! a match never has to scan siblings; `#` is always the last level of a valid filter, so its
//! subscriptions are stored directly on the node of the level before it (`hash`) instead of in a
//! child node. Subscribers sit in a box that only nodes where a filter ends have. A match walks the topic level by level and follows at most two
//! children per level (the literal one and `+`), never allocating.
//!
//! Filters must be plain (not `$share/...`, the router strips that) and valid per
//! [`super::topic::validate_filter`]. Invalid filters do not panic: a `#` that is not the last level is
//! stored as a literal level, which no valid topic name can match. Insert, remove and match recurse or
//! loop once per level, so their depth is bounded by the validated `max_levels`.

use super::small_map::SmallMap;
use super::topic::split_level;

/// Subscriptions keyed by (filter, `K`); `V` is the subscription's data. One value per (filter, key).
pub struct SubscriptionTrie<K, V> {
    root: Node<K, V>,
    /// Number of (filter, key) entries.
    len: usize,
    /// Number of nodes below the root, kept so pruning can be checked and reported cheaply.
    nodes: usize,
}

struct Node<K, V> {
    /// Literal next levels. An empty map does not allocate, so leaves cost nothing here.
    children: SmallMap<Box<str>, Node<K, V>>,
    /// The `+` next level.
    plus: Option<Box<Node<K, V>>>,
    /// Subscriptions of filters that end here; `None` on the many nodes that are only a path.
    subs: Option<Box<Subs<K, V>>>,
}

struct Subs<K, V> {
    /// Subscriptions whose filter ends exactly at this node.
    exact: SmallMap<K, V>,
    /// Subscriptions whose filter is this node's path followed by `/#` (or `#` alone at the root).
    hash: SmallMap<K, V>,
}

impl<K: Eq + std::hash::Hash, V> Node<K, V> {
    fn new() -> Self {
        Self {
            children: SmallMap::new(),
            plus: None,
            subs: None,
        }
    }

    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.plus.is_none() && self.subs.is_none()
    }

    /// The subscriptions ending here exactly (`hash` false) or with `/#` (`hash` true).
    fn subs(&self, hash: bool) -> Option<&SmallMap<K, V>> {
        let subs = self.subs.as_deref()?;
        Some(if hash { &subs.hash } else { &subs.exact })
    }

    fn subs_mut(&mut self, hash: bool) -> Option<&mut SmallMap<K, V>> {
        let subs = self.subs.as_deref_mut()?;
        Some(if hash {
            &mut subs.hash
        } else {
            &mut subs.exact
        })
    }

    fn subs_or_insert(&mut self, hash: bool) -> &mut SmallMap<K, V> {
        let subs = self.subs.get_or_insert_with(|| {
            Box::new(Subs {
                exact: SmallMap::new(),
                hash: SmallMap::new(),
            })
        });
        if hash {
            &mut subs.hash
        } else {
            &mut subs.exact
        }
    }

    /// Drops the subscriber box once both of its maps are empty, so a path node that lost its
    /// last subscriber is empty again and can be pruned.
    fn prune_subs(&mut self) {
        if self
            .subs
            .as_deref()
            .is_some_and(|s| s.exact.is_empty() && s.hash.is_empty())
        {
            self.subs = None;
        }
    }
}

/// Splits a filter into its path (the levels that become nodes) and whether it ends in `#`.
///
/// `"#"` is `(None, true)`: no levels, the subscription sits in the root's `hash` map.
fn filter_path(filter: &str) -> (Option<&str>, bool) {
    if filter == "#" {
        (None, true)
    } else if let Some(prefix) = filter.strip_suffix("/#") {
        (Some(prefix), true)
    } else {
        (Some(filter), false)
    }
}

impl<K: Eq + std::hash::Hash + Clone, V> Default for SubscriptionTrie<K, V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: Eq + std::hash::Hash + Clone, V> SubscriptionTrie<K, V> {
    /// An empty trie.
    pub fn new() -> Self {
        Self {
            root: Node::new(),
            len: 0,
            nodes: 0,
        }
    }

    /// Inserts or replaces the value for (`filter`, `key`); returns the previous value.
    pub fn insert(&mut self, filter: &str, key: K, value: V) -> Option<V> {
        let (path, hash) = filter_path(filter);
        let mut node = &mut self.root;
        let mut rest = path;
        while let Some(r) = rest {
            let (level, next) = split_level(r);
            node = if level == "+" {
                if node.plus.is_none() {
                    self.nodes += 1;
                }
                node.plus.get_or_insert_with(|| Box::new(Node::new()))
            } else {
                // An owned key is needed only to insert, but the lookup takes one too: this
                // allocates a Box<str> even when the level exists. Subscribing is rare next to
                // matching, and this keeps the code plain.
                let nodes = &mut self.nodes;
                node.children.get_or_insert_with(Box::from(level), || {
                    *nodes += 1;
                    Node::new()
                })
            };
            rest = next;
        }
        let previous = node.subs_or_insert(hash).insert(key, value);
        if previous.is_none() {
            self.len += 1;
        }
        previous
    }

    /// Removes (`filter`, `key`), pruning nodes left empty; returns the removed value.
    pub fn remove(&mut self, filter: &str, key: &K) -> Option<V> {
        let (path, hash) = filter_path(filter);
        let removed = remove_at(&mut self.root, path, hash, key, &mut self.nodes)?;
        self.len -= 1;
        Some(removed)
    }

    /// The value for (`filter`, `key`).
    pub fn get(&self, filter: &str, key: &K) -> Option<&V> {
        let (path, hash) = filter_path(filter);
        let mut node = &self.root;
        let mut rest = path;
        while let Some(r) = rest {
            let (level, next) = split_level(r);
            node = if level == "+" {
                node.plus.as_deref()?
            } else {
                node.children.get(level)?
            };
            rest = next;
        }
        node.subs(hash)?.get(key)
    }

    /// The value for (`filter`, `key`), mutably.
    pub fn get_mut(&mut self, filter: &str, key: &K) -> Option<&mut V> {
        let (path, hash) = filter_path(filter);
        let mut node = &mut self.root;
        let mut rest = path;
        while let Some(r) = rest {
            let (level, next) = split_level(r);
            node = if level == "+" {
                node.plus.as_deref_mut()?
            } else {
                node.children.get_mut(level)?
            };
            rest = next;
        }
        node.subs_mut(hash)?.get_mut(key)
    }

    /// Calls `f(key, value)` for every (filter, key) whose filter matches `topic`, applying the `$`
    /// rule (a topic starting with `$` is not matched by a first-level `+` or `#`).
    ///
    /// A key subscribed through two overlapping filters is visited once per filter; the caller merges
    /// (MQTT 5.0 §4.7.3 lets the server pick, e.g. the highest QoS). Order is unspecified. No
    /// allocation.
    pub fn for_each_match<F: FnMut(&K, &V)>(&self, topic: &str, mut f: F) {
        walk(&self.root, Some(topic), topic.starts_with('$'), &mut f);
    }

    /// Calls `f(key, value)` for every entry in the trie (for example to rebuild indexes or dump
    /// state). Order is unspecified.
    pub fn for_each<F: FnMut(&K, &V)>(&self, mut f: F) {
        visit_all(&self.root, &mut f);
    }

    /// Calls `f(filter, key, value)` for every entry, rebuilding each filter's text on the way
    /// (for the admin API; allocates one string per node with entries). Order is unspecified.
    pub fn for_each_with_filter<F: FnMut(&str, &K, &V)>(&self, mut f: F) {
        let mut levels = Vec::new();
        visit_with_filter(&self.root, &mut levels, &mut f);
    }

    /// Number of (filter, key) entries.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when there are no entries.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of trie nodes below the root: 0 when the trie is empty. Useful as a memory metric.
    pub fn node_count(&self) -> usize {
        self.nodes
    }
}

/// The match walk. The literal chain is followed in a loop and only `+` branches recurse, so the
/// common topic with no `+` subscriptions along its path uses one stack frame. Each topic level is
/// split off once per node visited; there is no up-front split into a buffer because that would
/// need an allocation (or a cap on levels), and the walk usually stops early anyway.
fn walk<K, V, F: FnMut(&K, &V)>(
    mut node: &Node<K, V>,
    mut rest: Option<&str>,
    // True only at the root for a `$` topic: first-level wildcards must not match it.
    mut dollar_root: bool,
    f: &mut F,
) {
    loop {
        // `#` here matches whatever remains of the topic, including nothing ("sport/#" ~ "sport").
        if let Some(subs) = node.subs.as_deref() {
            if !dollar_root {
                for (k, v) in subs.hash.iter() {
                    f(k, v);
                }
            }
            if rest.is_none() {
                for (k, v) in subs.exact.iter() {
                    f(k, v);
                }
            }
        }
        let Some(r) = rest else {
            return;
        };
        let (level, next) = split_level(r);
        if !dollar_root {
            if let Some(plus) = &node.plus {
                walk(plus, next, false, f);
            }
        }
        match node.children.get(level) {
            Some(child) => {
                node = child;
                rest = next;
                dollar_root = false;
            }
            None => return,
        }
    }
}

fn remove_at<K: Eq + std::hash::Hash, V>(
    node: &mut Node<K, V>,
    rest: Option<&str>,
    hash: bool,
    key: &K,
    nodes: &mut usize,
) -> Option<V> {
    let Some(r) = rest else {
        let removed = node.subs_mut(hash)?.remove(key);
        node.prune_subs();
        return removed;
    };
    let (level, next) = split_level(r);
    if level == "+" {
        let child = node.plus.as_deref_mut()?;
        let removed = remove_at(child, next, hash, key, nodes)?;
        if child.is_empty() {
            node.plus = None;
            *nodes -= 1;
        }
        Some(removed)
    } else {
        let child = node.children.get_mut(level)?;
        let removed = remove_at(child, next, hash, key, nodes)?;
        if child.is_empty() {
            node.children.remove(level);
            *nodes -= 1;
        }
        Some(removed)
    }
}

fn visit_all<K, V, F: FnMut(&K, &V)>(node: &Node<K, V>, f: &mut F) {
    if let Some(subs) = node.subs.as_deref() {
        for (k, v) in subs.exact.iter().chain(subs.hash.iter()) {
            f(k, v);
        }
    }
    if let Some(plus) = &node.plus {
        visit_all(plus, f);
    }
    for (_, child) in node.children.iter() {
        visit_all(child, f);
    }
}

fn visit_with_filter<'a, K, V, F: FnMut(&str, &K, &V)>(
    node: &'a Node<K, V>,
    levels: &mut Vec<&'a str>,
    f: &mut F,
) {
    if let Some(subs) = node.subs.as_deref() {
        if !subs.exact.is_empty() {
            let filter = levels.join("/");
            for (k, v) in subs.exact.iter() {
                f(&filter, k, v);
            }
        }
        if !subs.hash.is_empty() {
            let filter = if levels.is_empty() {
                "#".to_string()
            } else {
                format!("{}/#", levels.join("/"))
            };
            for (k, v) in subs.hash.iter() {
                f(&filter, k, v);
            }
        }
    }
    if let Some(plus) = &node.plus {
        levels.push("+");
        visit_with_filter(plus, levels, f);
        levels.pop();
    }
    for (level, child) in node.children.iter() {
        levels.push(level);
        visit_with_filter(child, levels, f);
        levels.pop();
    }
}

#[cfg(test)]
mod tests {
    use super::super::topic::matches;
    use super::*;

    /// Counts nodes by walking the tree, to check the maintained counter.
    fn count_nodes<K, V>(node: &Node<K, V>) -> usize {
        node.children
            .iter()
            .map(|(_, c)| 1 + count_nodes(c))
            .sum::<usize>()
            + node.plus.as_deref().map_or(0, |p| 1 + count_nodes(p))
    }

    fn matched(
        trie: &SubscriptionTrie<u32, &'static str>,
        topic: &str,
    ) -> Vec<(u32, &'static str)> {
        let mut out = Vec::new();
        trie.for_each_match(topic, |k, v| out.push((*k, *v)));
        out.sort();
        out
    }

    #[test]
    fn insert_get_replace_remove() {
        let mut t = SubscriptionTrie::new();
        assert!(t.is_empty());
        assert_eq!(t.insert("a/b", 1u32, "x"), None);
        assert_eq!(t.insert("a/b", 1, "y"), Some("x"));
        assert_eq!(t.insert("a/b", 2, "z"), None);
        assert_eq!(t.insert("a/#", 1, "h"), None);
        assert_eq!(t.insert("#", 1, "r"), None);
        assert_eq!(t.len(), 4);
        assert_eq!(t.get("a/b", &1), Some(&"y"));
        assert_eq!(t.get("a/#", &1), Some(&"h"));
        assert_eq!(t.get("#", &1), Some(&"r"));
        assert_eq!(t.get("a", &1), None);
        assert_eq!(t.get("a/b/c", &1), None);
        assert_eq!(t.get("a/+", &1), None);
        if let Some(v) = t.get_mut("a/b", &2) {
            *v = "w";
        }
        assert_eq!(t.get("a/b", &2), Some(&"w"));
        assert_eq!(t.remove("a/b", &3), None);
        assert_eq!(t.remove("a/c", &1), None);
        assert_eq!(t.remove("a/b/c", &1), None);
        assert_eq!(t.remove("a/b", &1), Some("y"));
        assert_eq!(t.remove("a/b", &1), None);
        assert_eq!(t.len(), 3);
        assert_eq!(t.remove("#", &1), Some("r"));
        assert_eq!(t.remove("a/#", &1), Some("h"));
        assert_eq!(t.remove("a/b", &2), Some("w"));
        assert!(t.is_empty());
        assert_eq!(t.node_count(), 0);
        assert_eq!(count_nodes(&t.root), 0);
    }

    #[test]
    fn spec_examples_through_trie() {
        let mut t = SubscriptionTrie::new();
        t.insert("sport/tennis/player1/#", 1u32, "p1");
        t.insert("sport/+", 2, "s+");
        t.insert("+/+", 3, "++");
        t.insert("/+", 4, "/+");
        t.insert("#", 5, "#");
        t.insert("$SYS/#", 6, "sys");
        t.insert("+/monitor/Clients", 7, "mon");
        t.insert("a//b", 8, "a//b");
        t.insert("sport/#", 9, "s#");
        let keys = |topic: &str| {
            matched(&t, topic)
                .into_iter()
                .map(|(k, _)| k)
                .collect::<Vec<_>>()
        };
        assert_eq!(keys("sport/tennis/player1"), vec![1, 5, 9]);
        assert_eq!(keys("sport/tennis/player1/ranking"), vec![1, 5, 9]);
        assert_eq!(keys("sport/tennis/player1/score/wimbledon"), vec![1, 5, 9]);
        assert_eq!(keys("sport"), vec![5, 9]);
        assert_eq!(keys("sport/"), vec![2, 3, 5, 9]);
        assert_eq!(keys("/finance"), vec![3, 4, 5]);
        assert_eq!(keys("$SYS/x"), vec![6]);
        assert_eq!(keys("$SYS"), vec![6]);
        assert_eq!(keys("$SYS/monitor/Clients"), vec![6]);
        assert_eq!(keys("x/monitor/Clients"), vec![5, 7]);
        assert_eq!(keys("a//b"), vec![5, 8]);
        assert_eq!(keys("a/b"), vec![3, 5]);
        assert_eq!(keys("$other"), Vec::<u32>::new());
    }

    #[test]
    fn overlapping_filters_visit_key_twice() {
        let mut t = SubscriptionTrie::new();
        t.insert("a/+", 1u32, "plus");
        t.insert("a/#", 1, "hash");
        t.insert("a/b", 1, "exact");
        t.insert("a/b", 2, "exact2");
        assert_eq!(
            matched(&t, "a/b"),
            vec![(1, "exact"), (1, "hash"), (1, "plus"), (2, "exact2")]
        );
        assert_eq!(matched(&t, "a/c"), vec![(1, "hash"), (1, "plus")]);
    }

    #[test]
    fn remove_prunes_only_empty_nodes() {
        let mut t = SubscriptionTrie::new();
        t.insert("a/b/c/d", 1u32, ());
        t.insert("a/b", 1, ());
        t.insert("a/+/x", 1, ());
        t.insert("a/b/#", 2, ());
        assert_eq!(t.node_count(), 6); // a, b, c, d, +, x
        assert_eq!(t.node_count(), count_nodes(&t.root));
        t.remove("a/b/c/d", &1);
        assert_eq!(t.node_count(), 4); // c and d pruned; b still has subs
        assert_eq!(t.node_count(), count_nodes(&t.root));
        t.remove("a/b", &1);
        assert_eq!(t.node_count(), 4, "b keeps its '#' subscription");
        t.remove("a/b/#", &2);
        assert_eq!(t.node_count(), 3); // a, +, x
        assert_eq!(t.node_count(), count_nodes(&t.root));
        t.remove("a/+/x", &1);
        assert_eq!(t.node_count(), 0);
        assert!(t.root.is_empty());
    }

    #[test]
    fn churn_of_many_distinct_filters_leaves_trie_empty() {
        const N: u32 = 1_000_000;
        let mut t = SubscriptionTrie::new();
        let filter = |i: u32| format!("tenant{}/dev{}/+/m{}/#", i % 97, i, i % 7);
        for i in 0..N {
            t.insert(&filter(i), i, ());
        }
        assert_eq!(t.len(), N as usize);
        assert_eq!(t.node_count(), count_nodes(&t.root));
        for i in 0..N {
            assert_eq!(t.remove(&filter(i), &i), Some(()));
        }
        assert!(t.is_empty());
        assert_eq!(t.node_count(), 0);
        assert_eq!(count_nodes(&t.root), 0);
        // The tables emptied by the churn were shrunk too, not just left with zero entries.
        assert!(t.root.children.capacity() <= 16);
    }

    #[test]
    fn many_keys_on_one_filter_shrink_back() {
        let mut t = SubscriptionTrie::new();
        for i in 0..10_000u32 {
            t.insert("x", i, ());
        }
        for i in 0..9_999u32 {
            t.remove("x", &i);
        }
        let node = t.root.children.get("x").and_then(|n| n.subs(false));
        let capacity = node.map(|s| s.capacity());
        assert!(capacity.is_some_and(|c| c <= 16), "{capacity:?}");
    }

    #[test]
    fn invalid_filters_do_not_panic() {
        let mut t = SubscriptionTrie::new();
        t.insert("a/#/b", 1u32, ());
        t.insert("", 2, ());
        t.insert("a#", 3, ());
        assert_eq!(matched_unit(&t, "a/x/b"), Vec::<u32>::new());
        assert_eq!(matched_unit(&t, ""), vec![2]);
        assert_eq!(t.remove("a/#/b", &1), Some(()));
        assert_eq!(t.remove("", &2), Some(()));
        assert_eq!(t.remove("a#", &3), Some(()));
        assert_eq!(t.node_count(), 0);
    }

    fn matched_unit(t: &SubscriptionTrie<u32, ()>, topic: &str) -> Vec<u32> {
        let mut out = Vec::new();
        t.for_each_match(topic, |k, _| out.push(*k));
        out.sort();
        out
    }

    #[test]
    fn for_each_visits_everything() {
        let mut t = SubscriptionTrie::new();
        t.insert("#", 1u32, ());
        t.insert("a/+", 2, ());
        t.insert("a/b/#", 3, ());
        t.insert("a/b", 4, ());
        let mut all = Vec::new();
        t.for_each(|k, _| all.push(*k));
        all.sort();
        assert_eq!(all, vec![1, 2, 3, 4]);
    }

    use crate::router::testing::{random_filter, random_topic, Rng};

    #[test]
    fn property_trie_agrees_with_brute_force() {
        let mut rng = Rng(0x5EED);
        // Guards against a vacuous test: the generators must produce plenty of matches.
        let mut total_matches = 0usize;
        for round in 0..20 {
            let mut trie = SubscriptionTrie::new();
            let mut subs: Vec<(String, u32)> = Vec::new();
            for i in 0..300u32 {
                let f = random_filter(&mut rng);
                // Few distinct keys so the same key often appears under several filters.
                let key = i % 17;
                if !subs.contains(&(f.clone(), key)) {
                    subs.push((f.clone(), key));
                }
                trie.insert(&f, key, i);
            }
            // Remove a random third to exercise pruning alongside matching.
            let mut kept = Vec::new();
            for (f, k) in subs {
                if rng.below(3) == 0 {
                    assert!(trie.remove(&f, &k).is_some());
                } else {
                    kept.push((f, k));
                }
            }
            assert_eq!(trie.len(), kept.len());
            assert_eq!(trie.node_count(), count_nodes(&trie.root));
            for _ in 0..300 {
                let topic = random_topic(&mut rng);
                let mut got: Vec<u32> = Vec::new();
                trie.for_each_match(&topic, |k, _| got.push(*k));
                let mut want: Vec<u32> = kept
                    .iter()
                    .filter(|(f, _)| matches(f, &topic))
                    .map(|(_, k)| *k)
                    .collect();
                got.sort();
                want.sort();
                total_matches += want.len();
                assert_eq!(got, want, "round {round} topic {topic:?}");
            }
        }
        println!("total matches checked: {total_matches}");
        assert!(total_matches > 5_000, "{total_matches}");
    }

    /// Run with: cargo test --release -- --ignored --nocapture bench_trie_match
    #[test]
    #[ignore]
    fn bench_trie_match() {
        use std::hint::black_box;
        use std::time::Instant;
        let mut trie = SubscriptionTrie::new();
        for i in 0..10_000u32 {
            let f = match i % 5 {
                0 => format!("fleet/{i}/telemetry/+"),
                1 => format!("fleet/{i}/status"),
                2 => format!("fleet/+/alerts/{i}"),
                3 => format!("fleet/{i}/#"),
                _ => format!("site/{}/+/dev{i}/temp", i % 50),
            };
            trie.insert(&f, i, i);
        }
        trie.insert("#", 10_001, 0);
        trie.insert("fleet/+/telemetry/temp", 10_002, 0);
        let topics: Vec<String> = (0..1024u32)
            .map(|i| match i % 4 {
                0 => format!("fleet/{}/telemetry/temp", i * 7),
                1 => format!("fleet/{}/status", i * 5),
                2 => format!("site/{}/floor1/dev{}/temp", i % 50, i * 3),
                _ => format!("fleet/nobody/alerts/{}", i * 9),
            })
            .collect();
        let iterations = 1_000_000usize;
        let start = Instant::now();
        let mut hits = 0usize;
        for i in 0..iterations {
            trie.for_each_match(black_box(&topics[i % topics.len()]), |k, v| {
                hits = hits.wrapping_add(*k as usize + *v as usize);
            });
        }
        let elapsed = start.elapsed();
        let mut count = 0usize;
        for t in &topics {
            trie.for_each_match(t, |_, _| count += 1);
        }
        println!(
            "trie: {} filters, {} nodes, {iterations} matches in {:?} = {:.0} ns/match, \
             {:.2} subscriptions matched per topic (checksum {hits})",
            trie.len(),
            trie.node_count(),
            elapsed,
            elapsed.as_nanos() as f64 / iterations as f64,
            count as f64 / topics.len() as f64,
        );
    }
}
