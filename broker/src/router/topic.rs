//! Topic names and topic filters: validation, shared-subscription parsing and single-filter matching.
//!
//! The rules are MQTT 3.1.1 §4.7 and MQTT 5.0 §4.7 (topic names and filters) and §4.8.2 (shared
//! subscriptions). Every function here works on the borrowed string and never allocates: they run for
//! every PUBLISH and SUBSCRIBE the broker receives.
//!
//! All scanning is done on bytes. That is sound for UTF-8 input because the ASCII bytes we look for
//! (`/`, `+`, `#`, NUL) never occur inside a multi-byte UTF-8 sequence.

/// Size limits applied to topic names and filters before they reach the router.
///
/// `max_levels` also bounds the recursion depth of the trie and retained-store walks, which recurse
/// once per level, so keep it modest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicLimits {
    /// Maximum length in bytes of the whole (UTF-8 encoded) topic name or filter.
    pub max_topic_len: usize,
    /// Maximum number of `/`-separated levels.
    pub max_levels: usize,
}

impl Default for TopicLimits {
    /// 65535 bytes is the largest string an MQTT packet can carry; 128 levels is far beyond any real
    /// topic hierarchy while keeping per-level recursion shallow.
    fn default() -> Self {
        Self {
            max_topic_len: 65535,
            max_levels: 128,
        }
    }
}

/// Why a topic name or filter was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// Topic names and filters must be at least one character long [MQTT-4.7.3-1].
    #[error("topic is empty")]
    Empty,
    /// Longer than [`TopicLimits::max_topic_len`].
    #[error("topic is longer than the configured limit")]
    TooLong,
    /// More levels than [`TopicLimits::max_levels`].
    #[error("topic has more levels than the configured limit")]
    TooManyLevels,
    /// A wildcard in a topic name, `#` not alone as the last level, or `+` not alone in its level.
    #[error("invalid use of a wildcard character")]
    InvalidWildcard,
    /// U+0000 is not allowed in topic names or filters [MQTT-4.7.3-2].
    #[error("topic contains the null character U+0000")]
    ContainsNul,
    /// A malformed `$share/{ShareName}/{filter}`, or a `$share` filter where a plain filter is expected.
    #[error("invalid shared subscription filter")]
    InvalidSharedSubscription,
}

/// The first level that marks a shared subscription (MQTT 5.0 §4.8.2). Case-sensitive, like all topics.
const SHARE_PREFIX: &str = "$share";

/// Validates a topic NAME as carried in a PUBLISH: non-empty, no `+` or `#`, no U+0000, within
/// `limits`.
///
/// Names starting with `$` are accepted: the broker itself publishes `$SYS/...`, and whether clients
/// may publish there is an authorization question, not a syntax one.
pub fn validate_topic_name(topic: &str, limits: &TopicLimits) -> Result<(), TopicError> {
    check_size(topic, limits)?;
    let mut levels = 1usize;
    for b in topic.bytes() {
        match b {
            0 => return Err(TopicError::ContainsNul),
            b'+' | b'#' => return Err(TopicError::InvalidWildcard),
            b'/' => levels += 1,
            _ => {}
        }
    }
    if levels > limits.max_levels {
        return Err(TopicError::TooManyLevels);
    }
    Ok(())
}

/// Validates a plain topic FILTER: non-empty, `#` only as the whole last level, `+` only as a whole
/// level, no U+0000, within `limits`.
///
/// A filter whose first level is `$share` is rejected with
/// [`TopicError::InvalidSharedSubscription`]: shared subscriptions must go through [`parse_filter`],
/// so that one is never stored as a plain filter by mistake.
pub fn validate_filter(filter: &str, limits: &TopicLimits) -> Result<(), TopicError> {
    check_size(filter, limits)?;
    if first_level(filter) == SHARE_PREFIX {
        return Err(TopicError::InvalidSharedSubscription);
    }
    check_filter_levels(filter, limits)
}

/// A SUBSCRIBE filter after shared-subscription parsing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParsedFilter<'a> {
    /// An ordinary filter, validated.
    Plain(&'a str),
    /// `$share/{group}/{filter}`: `filter` is the part matched against topics.
    Shared {
        /// The ShareName: non-empty, without `/`, `+` or `#`.
        group: &'a str,
        /// The topic filter after the ShareName, validated and non-empty.
        filter: &'a str,
    },
}

impl<'a> ParsedFilter<'a> {
    /// The part of the filter that is matched against topic names.
    pub fn topic_filter(&self) -> &'a str {
        match *self {
            ParsedFilter::Plain(f) => f,
            ParsedFilter::Shared { filter, .. } => filter,
        }
    }
}

/// Parses and validates a SUBSCRIBE/UNSUBSCRIBE filter, recognising `$share/{group}/{filter}`
/// (MQTT 5.0 §4.8.2; also accepted from 3.1.1 clients, as Mosquitto and EMQX do).
///
/// The whole string is checked against `max_topic_len` (it is one MQTT string on the wire); the
/// level limit applies to the filter part, which is what the trie stores. `$share` alone, an empty
/// or wildcard-bearing group, a missing or empty filter part, or a nested `$share` all give
/// [`TopicError::InvalidSharedSubscription`]; other faults in the filter part give their own error.
pub fn parse_filter<'a>(
    filter: &'a str,
    limits: &TopicLimits,
) -> Result<ParsedFilter<'a>, TopicError> {
    check_size(filter, limits)?;
    if first_level(filter) != SHARE_PREFIX {
        check_filter_levels(filter, limits)?;
        return Ok(ParsedFilter::Plain(filter));
    }
    // `$share` alone has no '/' after it: nothing to split, and no group.
    let rest = filter
        .strip_prefix("$share/")
        .ok_or(TopicError::InvalidSharedSubscription)?;
    let (group, inner) = rest
        .split_once('/')
        .ok_or(TopicError::InvalidSharedSubscription)?;
    if group.is_empty() || group.bytes().any(|b| b == b'+' || b == b'#') {
        return Err(TopicError::InvalidSharedSubscription);
    }
    if group.bytes().any(|b| b == 0) {
        return Err(TopicError::ContainsNul);
    }
    // A nested `$share` would be ambiguous if the filter were ever re-parsed (for example when a
    // stored session is restored), so it is refused rather than matched literally.
    if inner.is_empty() || first_level(inner) == SHARE_PREFIX {
        return Err(TopicError::InvalidSharedSubscription);
    }
    check_filter_levels(inner, limits)?;
    Ok(ParsedFilter::Shared {
        group,
        filter: inner,
    })
}

/// True if `filter` contains a `+` or `#` wildcard (so a lookup cannot be a single exact get).
pub fn has_wildcards(filter: &str) -> bool {
    filter.bytes().any(|b| b == b'+' || b == b'#')
}

/// Matches one plain, valid topic filter against one topic name.
///
/// Applies the `$` rule: a topic starting with `$` is not matched by a filter whose first level is
/// `+` or `#` [MQTT-4.7.2-1]. `#` also matches the parent level (`sport/#` matches `sport`), and `+`
/// matches an empty level (`+/+` matches `/finance`). The result for invalid filters is unspecified
/// but never panics.
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && matches!(first_level(filter), "+" | "#") {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            // '#' covers this level, everything below it, and the parent when the topic ended.
            (Some("#"), _) => return true,
            (Some(fl), Some(tl)) => {
                if fl != "+" && fl != tl {
                    return false;
                }
            }
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Splits the first level off a topic or filter: `("a", Some("b/c"))` for `"a/b/c"`, `("a", None)`
/// for `"a"`. `None` means there are no more levels, which differs from `Some("")`, an empty level.
#[inline]
pub(crate) fn split_level(s: &str) -> (&str, Option<&str>) {
    match s.find('/') {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    }
}

#[inline]
fn first_level(s: &str) -> &str {
    split_level(s).0
}

fn check_size(s: &str, limits: &TopicLimits) -> Result<(), TopicError> {
    if s.is_empty() {
        return Err(TopicError::Empty);
    }
    if s.len() > limits.max_topic_len {
        return Err(TopicError::TooLong);
    }
    Ok(())
}

/// The per-level filter rules, without the size and `$share` checks.
fn check_filter_levels(filter: &str, limits: &TopicLimits) -> Result<(), TopicError> {
    let mut levels = 0usize;
    let mut rest = Some(filter);
    while let Some(r) = rest {
        let (level, next) = split_level(r);
        levels += 1;
        if levels > limits.max_levels {
            return Err(TopicError::TooManyLevels);
        }
        match level {
            // '#' must be the last level [MQTT-4.7.1-1].
            "#" if next.is_some() => return Err(TopicError::InvalidWildcard),
            "#" | "+" => {}
            _ => {
                for b in level.bytes() {
                    match b {
                        0 => return Err(TopicError::ContainsNul),
                        // A wildcard sharing its level with other characters [MQTT-4.7.1-2/3].
                        b'+' | b'#' => return Err(TopicError::InvalidWildcard),
                        _ => {}
                    }
                }
            }
        }
        rest = next;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lim() -> TopicLimits {
        TopicLimits::default()
    }

    #[test]
    fn limits_default() {
        assert_eq!(
            TopicLimits::default(),
            TopicLimits {
                max_topic_len: 65535,
                max_levels: 128
            }
        );
    }

    #[test]
    fn spec_multi_level_wildcard_examples() {
        // MQTT 3.1.1 §4.7.1.2 / 5.0 §4.7.1.2.
        let f = "sport/tennis/player1/#";
        assert!(matches(f, "sport/tennis/player1"));
        assert!(matches(f, "sport/tennis/player1/ranking"));
        assert!(matches(f, "sport/tennis/player1/score/wimbledon"));
        assert!(!matches(f, "sport/tennis/player2"));
        assert!(!matches(f, "sport/tennis"));
        assert!(matches("sport/#", "sport"));
        assert!(matches("sport/#", "sport/"));
        assert!(matches("#", "sport/tennis"));
        assert!(matches("#", "/"));
        assert!(matches("#", "a"));
    }

    #[test]
    fn spec_single_level_wildcard_examples() {
        // MQTT 3.1.1 §4.7.1.3 / 5.0 §4.7.1.3.
        assert!(matches("sport/tennis/+", "sport/tennis/player1"));
        assert!(matches("sport/tennis/+", "sport/tennis/player2"));
        assert!(!matches("sport/tennis/+", "sport/tennis/player1/ranking"));
        assert!(matches("sport/+", "sport/"));
        assert!(!matches("sport/+", "sport"));
        assert!(matches("+/+", "/finance"));
        assert!(matches("/+", "/finance"));
        assert!(!matches("+", "/finance"));
        assert!(matches("+/tennis/#", "sport/tennis/player1"));
        assert!(matches("sport/+/player1", "sport/tennis/player1"));
    }

    #[test]
    fn spec_dollar_topics() {
        // MQTT 3.1.1 §4.7.2 / 5.0 §4.7.2.
        assert!(!matches("#", "$SYS/broker/uptime"));
        assert!(!matches("#", "$SYS"));
        assert!(!matches("+/monitor/Clients", "$SYS/monitor/Clients"));
        assert!(!matches("+", "$SYS"));
        assert!(matches("$SYS/#", "$SYS/x"));
        assert!(matches("$SYS/#", "$SYS"));
        assert!(matches("$SYS/monitor/+", "$SYS/monitor/Clients"));
        assert!(matches("$SYS/monitor/Clients", "$SYS/monitor/Clients"));
        // Only a leading '$' is special.
        assert!(matches("+/$x", "a/$x"));
        assert!(matches("#", "a/$x"));
    }

    #[test]
    fn exact_and_empty_levels() {
        assert!(matches("a//b", "a//b"));
        assert!(!matches("a//b", "a/b"));
        assert!(matches("a/+/b", "a//b"));
        assert!(matches("+/+/+", "//"));
        assert!(!matches("a/b", "a/b/"));
        assert!(matches("a/b/", "a/b/"));
        assert!(matches("/", "/"));
        assert!(!matches("a", "A"), "topics are case-sensitive");
    }

    #[test]
    fn topic_name_validation() {
        assert_eq!(validate_topic_name("a/b", &lim()), Ok(()));
        assert_eq!(validate_topic_name("/", &lim()), Ok(()));
        assert_eq!(validate_topic_name("a//b", &lim()), Ok(()));
        assert_eq!(validate_topic_name("$SYS/x", &lim()), Ok(()));
        assert_eq!(validate_topic_name("ü/日本", &lim()), Ok(()));
        assert_eq!(validate_topic_name("", &lim()), Err(TopicError::Empty));
        assert_eq!(
            validate_topic_name("a/+", &lim()),
            Err(TopicError::InvalidWildcard)
        );
        assert_eq!(
            validate_topic_name("a#", &lim()),
            Err(TopicError::InvalidWildcard)
        );
        assert_eq!(
            validate_topic_name("a\0b", &lim()),
            Err(TopicError::ContainsNul)
        );
        let small = TopicLimits {
            max_topic_len: 5,
            max_levels: 3,
        };
        assert_eq!(validate_topic_name("abcde", &small), Ok(()));
        assert_eq!(
            validate_topic_name("abcdef", &small),
            Err(TopicError::TooLong)
        );
        assert_eq!(validate_topic_name("a/b/c", &small), Ok(()));
        assert_eq!(
            validate_topic_name("a/b/", &small),
            Ok(()),
            "3 levels: a, b, empty"
        );
        assert_eq!(
            validate_topic_name("a//b/", &small),
            Err(TopicError::TooManyLevels)
        );
    }

    #[test]
    fn filter_validation_valid() {
        for f in [
            "#",
            "+",
            "a/#",
            "a/+/b",
            "+/+",
            "/+",
            "a//b",
            "/",
            "$SYS/#",
            "sport/tennis/player1/#",
            "+/tennis/#",
            "$SHARE/g/x",
            "$sharex/g",
        ] {
            assert_eq!(validate_filter(f, &lim()), Ok(()), "{f}");
        }
    }

    #[test]
    fn filter_validation_invalid() {
        let cases = [
            ("", TopicError::Empty),
            ("a/#/b", TopicError::InvalidWildcard),
            ("a#", TopicError::InvalidWildcard),
            ("a/b#", TopicError::InvalidWildcard),
            ("a/b+", TopicError::InvalidWildcard),
            ("#/", TopicError::InvalidWildcard),
            ("+a", TopicError::InvalidWildcard),
            ("++", TopicError::InvalidWildcard),
            ("##", TopicError::InvalidWildcard),
            ("#/#", TopicError::InvalidWildcard),
            ("a/\0", TopicError::ContainsNul),
            ("$share/g/x", TopicError::InvalidSharedSubscription),
            ("$share", TopicError::InvalidSharedSubscription),
        ];
        for (f, e) in cases {
            assert_eq!(validate_filter(f, &lim()), Err(e), "{f:?}");
        }
        let small = TopicLimits {
            max_topic_len: 8,
            max_levels: 2,
        };
        assert_eq!(validate_filter("a/#", &small), Ok(()));
        assert_eq!(
            validate_filter("a/b/#", &small),
            Err(TopicError::TooManyLevels)
        );
        assert_eq!(
            validate_filter("abcdefghi", &small),
            Err(TopicError::TooLong)
        );
    }

    #[test]
    fn shared_subscription_parsing_valid() {
        assert_eq!(parse_filter("a/+", &lim()), Ok(ParsedFilter::Plain("a/+")));
        assert_eq!(
            parse_filter("$SYS/#", &lim()),
            Ok(ParsedFilter::Plain("$SYS/#"))
        );
        let p = parse_filter("$share/g1/sensors/+/temp", &lim());
        assert_eq!(
            p,
            Ok(ParsedFilter::Shared {
                group: "g1",
                filter: "sensors/+/temp"
            })
        );
        assert_eq!(p.map(|p| p.topic_filter()), Ok("sensors/+/temp"));
        assert_eq!(
            parse_filter("$share/g/#", &lim()),
            Ok(ParsedFilter::Shared {
                group: "g",
                filter: "#"
            })
        );
        // An empty first level in the filter part is still a non-empty filter.
        assert_eq!(
            parse_filter("$share/g//x", &lim()),
            Ok(ParsedFilter::Shared {
                group: "g",
                filter: "/x"
            })
        );
        assert_eq!(
            parse_filter("$share/g/$SYS/x", &lim()),
            Ok(ParsedFilter::Shared {
                group: "g",
                filter: "$SYS/x"
            })
        );
    }

    #[test]
    fn shared_subscription_parsing_invalid() {
        let iss = TopicError::InvalidSharedSubscription;
        for f in [
            "$share",
            "$share/",
            "$share/g",
            "$share/g/",
            "$share//x",
            "$share/g+/x",
            "$share/+/x",
            "$share/g#/x",
            "$share/#/x",
            "$share/#",
            "$share/g/$share/h/x",
        ] {
            assert_eq!(parse_filter(f, &lim()), Err(iss.clone()), "{f:?}");
        }
        assert_eq!(
            parse_filter("$share/g/a/#/b", &lim()),
            Err(TopicError::InvalidWildcard)
        );
        assert_eq!(
            parse_filter("$share/g\0/x", &lim()),
            Err(TopicError::ContainsNul)
        );
        assert_eq!(
            parse_filter("a/#/b", &lim()),
            Err(TopicError::InvalidWildcard)
        );
        assert_eq!(parse_filter("", &lim()), Err(TopicError::Empty));
        // Level limit applies to the filter part, length limit to the whole string.
        let small = TopicLimits {
            max_topic_len: 14,
            max_levels: 2,
        };
        assert!(parse_filter("$share/g/a/b", &small).is_ok());
        assert_eq!(
            parse_filter("$share/g/a/b/c", &small),
            Err(TopicError::TooManyLevels)
        );
        assert_eq!(
            parse_filter("$share/group/ab", &small),
            Err(TopicError::TooLong)
        );
    }

    #[test]
    fn wildcard_detection() {
        assert!(has_wildcards("a/+"));
        assert!(has_wildcards("#"));
        assert!(!has_wildcards("a/b"));
    }

    #[test]
    fn split_level_distinguishes_end_from_empty_level() {
        assert_eq!(split_level("a/b/c"), ("a", Some("b/c")));
        assert_eq!(split_level("a"), ("a", None));
        assert_eq!(split_level("a/"), ("a", Some("")));
        assert_eq!(split_level(""), ("", None));
    }
}
