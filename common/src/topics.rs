//! Kafka topic names: the publish log and one topic per APPLICATION client.

use sha2::{Digest, Sha256};

/// The publish log topic `<prefix>.msg.all`.
pub fn msg_all_topic(prefix: &str) -> String {
    format!("{prefix}.msg.all")
}

/// The topic of one APPLICATION client: `<prefix>.app.<client id>` when the client id is 1 to
/// 64 characters of `[A-Za-z0-9_-]`, else `<prefix>.app.h.<sha-256 of the id, hex>`. Legal ids
/// contain no `.`, so the two forms can never collide; the hash keeps every other id (UTF-8,
/// `/`, very long) a legal, stable topic name.
pub fn application_topic(prefix: &str, client_id: &str) -> String {
    if is_plain_name(client_id) {
        format!("{prefix}.app.{client_id}")
    } else {
        format!(
            "{prefix}.app.h.{}",
            hex(&Sha256::digest(client_id.as_bytes()))
        )
    }
}

/// A name usable as is inside a topic name: 1 to 64 characters of `[A-Za-z0-9_-]` (no `.`, so
/// it cannot collide with the hashed forms).
pub fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn application_topic_names_are_legal_and_distinct() {
        assert_eq!(
            application_topic("ferrymq", "app-1_A"),
            "ferrymq.app.app-1_A"
        );
        let hashed = application_topic("ferrymq", "plant/7 ünïcode");
        assert!(hashed.starts_with("ferrymq.app.h."));
        assert_eq!(hashed.len(), "ferrymq.app.h.".len() + 64);
        assert!(hashed
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)));
        // A dot is legal in Kafka names but reserved for the hashed form here.
        assert!(application_topic("p", "a.b").starts_with("p.app.h."));
        assert!(application_topic("p", &"x".repeat(65)).starts_with("p.app.h."));
        assert_ne!(application_topic("p", "a.b"), application_topic("p", "a_b"));
        assert_eq!(application_topic("p", "a.b"), application_topic("p", "a.b"));
    }

    #[test]
    fn publish_log_name() {
        assert_eq!(msg_all_topic("ferrymq"), "ferrymq.msg.all");
    }
}
