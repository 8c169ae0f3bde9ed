//! Authorization: per-identity publish and subscribe patterns in MQTT wildcard syntax.
//!
//! Rules are stored and configured as text ([`AclRules`]) with `${client_id}` and `${username}`
//! placeholders, and resolved once per connection into an [`Acl`] that the session checks on
//! PUBLISH, SUBSCRIBE and the will. Semantics (docs/security.md, "ACL syntax"):
//!
//! * a topic may be published when some publish pattern matches it;
//! * a filter may be subscribed when every topic it can match is matched by one subscribe
//!   pattern (the filter is "inside" the pattern); retained messages are then delivered for
//!   everything the filter matches, and `$share/{group}/{filter}` is checked on `{filter}`;
//! * unlike a subscription, a pattern that starts with a wildcard also covers topics starting
//!   with `$`: `#` means every topic;
//! * a placeholder whose value is missing, empty or contains `/`, `+`, `#` or U+0000 drops the
//!   whole pattern, so a client id such as `#` can never widen what `devices/${client_id}/#`
//!   grants.

use serde::{Deserialize, Serialize};

/// Most patterns one rule list may hold (records, JWT claims and config alike): bounds the
/// memory and the per-message work one identity can cause.
pub const MAX_PATTERNS: usize = 256;
/// Longest pattern, in bytes.
pub const MAX_PATTERN_LEN: usize = 1024;

const CLIENT_ID: &str = "${client_id}";
const USERNAME: &str = "${username}";

/// Publish and subscribe patterns as written in a credential record, a JWT or the config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AclRules {
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
}

impl AclRules {
    /// Everything allowed: `#` for both.
    pub fn everything() -> AclRules {
        AclRules {
            publish: vec!["#".into()],
            subscribe: vec!["#".into()],
        }
    }

    /// Checks the syntax of every pattern; the error names the list and the pattern.
    pub fn validate(&self) -> Result<(), String> {
        for (what, list) in [("publish", &self.publish), ("subscribe", &self.subscribe)] {
            if list.len() > MAX_PATTERNS {
                return Err(format!("{what}: more than {MAX_PATTERNS} patterns"));
            }
            for pattern in list {
                validate_pattern(pattern)
                    .map_err(|e| format!("{what} pattern `{pattern}`: {e}"))?;
            }
        }
        Ok(())
    }

    /// The rules of one connection, placeholders substituted.
    pub fn resolve(&self, client_id: &str, username: Option<&str>) -> Acl {
        Acl {
            publish: Patterns::resolve(&self.publish, client_id, username),
            subscribe: Patterns::resolve(&self.subscribe, client_id, username),
        }
    }
}

/// Why a pattern is not valid.
fn validate_pattern(pattern: &str) -> Result<(), &'static str> {
    if pattern.is_empty() {
        return Err("empty");
    }
    if pattern.len() > MAX_PATTERN_LEN {
        return Err("too long");
    }
    if pattern.contains('\0') {
        return Err("contains U+0000");
    }
    // Placeholders are checked with a harmless value in their place.
    let probe = pattern.replace(CLIENT_ID, "x").replace(USERNAME, "x");
    if probe.contains("${") {
        return Err("unknown placeholder (use ${client_id} or ${username})");
    }
    parse(&probe).map(|_| ())
}

fn parse(pattern: &str) -> Result<Vec<Level>, &'static str> {
    let parts: Vec<&str> = pattern.split('/').collect();
    let last = parts.len() - 1;
    parts
        .iter()
        .enumerate()
        .map(|(i, part)| match *part {
            "#" if i == last => Ok(Level::Hash),
            "#" => Err("`#` must be the last level"),
            "+" => Ok(Level::Plus),
            p if p.contains(['+', '#']) => Err("a wildcard must be a whole level"),
            p => Ok(Level::Literal(p.to_string())),
        })
        .collect()
}

/// Substitutes placeholders in one pass (a value is never scanned for placeholders itself);
/// `None` when a value could widen the pattern, or is missing.
fn substitute(pattern: &str, client_id: &str, username: Option<&str>) -> Option<String> {
    let safe = |v: &str| !v.is_empty() && !v.contains(['/', '+', '#', '\0']);
    let mut out = String::with_capacity(pattern.len());
    let mut rest = pattern;
    while let Some(at) = rest.find("${") {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        let (value, len) = if tail.starts_with(CLIENT_ID) {
            (Some(client_id), CLIENT_ID.len())
        } else if tail.starts_with(USERNAME) {
            (username, USERNAME.len())
        } else {
            // Not a placeholder (validation refuses these in stored rules).
            return None;
        };
        out.push_str(value.filter(|v| safe(v))?);
        rest = &tail[len..];
    }
    out.push_str(rest);
    Some(out)
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Level {
    Literal(String),
    Plus,
    Hash,
}

#[derive(Debug, Clone)]
enum Patterns {
    /// `#` among the patterns: no check needed.
    All,
    List(Vec<Vec<Level>>),
}

impl Patterns {
    fn resolve(list: &[String], client_id: &str, username: Option<&str>) -> Patterns {
        let mut out = Vec::with_capacity(list.len());
        for pattern in list {
            let Some(text) = substitute(pattern, client_id, username) else {
                continue;
            };
            let Ok(levels) = parse(&text) else { continue };
            if levels == [Level::Hash] {
                return Patterns::All;
            }
            out.push(levels);
        }
        Patterns::List(out)
    }
}

/// The resolved rules of one connection.
#[derive(Debug, Clone)]
pub struct Acl {
    publish: Patterns,
    subscribe: Patterns,
}

impl Acl {
    /// No restriction at all.
    pub fn allow_all() -> Acl {
        Acl {
            publish: Patterns::All,
            subscribe: Patterns::All,
        }
    }

    /// Whether the ACL restricts nothing (the hot path skips the checks).
    pub fn is_unrestricted(&self) -> bool {
        matches!(
            (&self.publish, &self.subscribe),
            (Patterns::All, Patterns::All)
        )
    }

    /// May the client publish to `topic` (a valid topic name)?
    pub fn may_publish(&self, topic: &str) -> bool {
        match &self.publish {
            Patterns::All => true,
            Patterns::List(list) => list.iter().any(|p| matches_topic(p, topic)),
        }
    }

    /// Whether the client may read every topic (no delivery check needed).
    pub fn reads_everything(&self) -> bool {
        matches!(self.subscribe, Patterns::All)
    }

    /// May a message on `topic` be delivered to the client (some subscribe pattern matches it)?
    /// Subscriptions are checked when made; this catches what a session holds from before:
    /// another identity's subscriptions and queued messages under the same client id.
    pub fn may_receive(&self, topic: &str) -> bool {
        match &self.subscribe {
            Patterns::All => true,
            Patterns::List(list) => list.iter().any(|p| matches_topic(p, topic)),
        }
    }

    /// May the client subscribe to `filter` (a valid filter, without a `$share/{group}/`
    /// prefix)?
    pub fn may_subscribe(&self, filter: &str) -> bool {
        match &self.subscribe {
            Patterns::All => true,
            Patterns::List(list) => list.iter().any(|p| covers(p, filter)),
        }
    }
}

/// Whether `pattern` matches the topic name `topic`.
fn matches_topic(pattern: &[Level], topic: &str) -> bool {
    let mut levels = topic.split('/');
    for p in pattern {
        match p {
            Level::Hash => return true,
            Level::Plus => {
                if levels.next().is_none() {
                    return false;
                }
            }
            Level::Literal(l) => match levels.next() {
                Some(t) if t == l => {}
                _ => return false,
            },
        }
    }
    levels.next().is_none()
}

/// Whether every topic `filter` matches is matched by `pattern`.
fn covers(pattern: &[Level], filter: &str) -> bool {
    let mut levels = filter.split('/');
    for p in pattern {
        let f = levels.next();
        match (p, f) {
            // `a/#` also matches `a`: a pattern ending in `#` covers whatever is left.
            (Level::Hash, _) => return true,
            (_, None) => return false,
            (Level::Plus, Some("#")) => return false,
            (Level::Plus, Some(_)) => {}
            (Level::Literal(l), Some(f)) => {
                if f != l {
                    return false;
                }
            }
        }
    }
    levels.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(publish: &[&str], subscribe: &[&str]) -> AclRules {
        AclRules {
            publish: publish.iter().map(|s| s.to_string()).collect(),
            subscribe: subscribe.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn publish_matching() {
        let acl = rules(&["sensors/+/temp", "devices/${client_id}/#"], &[]).resolve("d1", None);
        assert!(acl.may_publish("sensors/room1/temp"));
        assert!(!acl.may_publish("sensors/room1/humidity"));
        assert!(!acl.may_publish("sensors/room1/temp/x"));
        assert!(acl.may_publish("devices/d1"));
        assert!(acl.may_publish("devices/d1/state"));
        assert!(!acl.may_publish("devices/d2/state"));
        assert!(!acl.may_publish("devices"));
    }

    #[test]
    fn subscribe_is_checked_as_a_subset() {
        let acl = rules(&[], &["sensors/+/temp", "cmd/${username}/#"]).resolve("d1", Some("bob"));
        assert!(acl.may_subscribe("sensors/+/temp"));
        assert!(acl.may_subscribe("sensors/a/temp"));
        assert!(!acl.may_subscribe("sensors/#"));
        assert!(!acl.may_subscribe("sensors/+/+"));
        assert!(!acl.may_subscribe("#"));
        assert!(acl.may_subscribe("cmd/bob/#"));
        assert!(acl.may_subscribe("cmd/bob"));
        assert!(acl.may_subscribe("cmd/bob/+/x"));
        assert!(!acl.may_subscribe("cmd/+/x"));
        assert!(!acl.may_subscribe("cmd/#"));
        assert!(acl.may_receive("sensors/x/temp"));
        assert!(acl.may_receive("cmd/bob"));
        assert!(acl.may_receive("cmd/bob/a/b"));
        assert!(!acl.may_receive("cmd/alice"));
        assert!(!acl.reads_everything());
    }

    #[test]
    fn hash_means_everything_even_dollar_topics() {
        let acl = rules(&["#"], &["#"]).resolve("c", None);
        assert!(acl.is_unrestricted());
        assert!(acl.may_publish("$weird/topic"));
        assert!(acl.may_subscribe("$SYS/#"));
        let acl = rules(&["+/x"], &[]).resolve("c", None);
        assert!(acl.may_publish("$a/x"));
    }

    #[test]
    fn placeholders_cannot_widen() {
        let r = rules(&["devices/${client_id}/#"], &["devices/${client_id}/#"]);
        for evil in ["+", "#", "a/b", "", "a+", "x#"] {
            let acl = r.resolve(evil, None);
            assert!(!acl.may_publish("devices/victim/state"), "{evil:?}");
            assert!(!acl.may_subscribe("devices/+/state"), "{evil:?}");
            assert!(!acl.may_subscribe("devices/#"), "{evil:?}");
        }
        // A value is not scanned for placeholders again.
        let acl = rules(&["devices/${client_id}"], &[]).resolve("${username}", Some("bob"));
        assert!(!acl.may_publish("devices/bob"));
        assert!(acl.may_publish("devices/${username}"));
        // A missing username drops patterns that need it.
        let acl = rules(&["u/${username}"], &[]).resolve("c", None);
        assert!(!acl.may_publish("u/"));
        assert!(!acl.may_publish("u/${username}"));
    }

    #[test]
    fn empty_rules_allow_nothing() {
        let acl = AclRules::default().resolve("c", Some("u"));
        assert!(!acl.is_unrestricted());
        assert!(!acl.may_publish("a"));
        assert!(!acl.may_subscribe("a"));
    }

    #[test]
    fn validation() {
        assert!(rules(&["a/+/b", "a/#", "${client_id}/x"], &["#"])
            .validate()
            .is_ok());
        assert!(rules(&["a/#/b"], &[]).validate().is_err());
        assert!(rules(&["a/b+"], &[]).validate().is_err());
        assert!(rules(&[""], &[]).validate().is_err());
        assert!(rules(&[], &["${clientid}/x"]).validate().is_err());
        let many: Vec<&str> = std::iter::repeat_n("a", MAX_PATTERNS + 1).collect();
        assert!(rules(&many, &[]).validate().is_err());
    }
}
