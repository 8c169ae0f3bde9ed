//! Kafka topic names, by the broker's rule (`ferrymq::storage::kafka`). The operator keeps its
//! own copy so its binary does not link the broker; `tests/naming.rs` asserts both agree on
//! every kind of client id.

use sha2::{Digest, Sha256};

/// The publish log topic `<prefix>.msg.all`.
pub fn publish_log_topic(prefix: &str) -> String {
    format!("{prefix}.msg.all")
}

/// The topic of one APPLICATION client: `<prefix>.app.<client id>` when the id is 1 to 64
/// characters of `[A-Za-z0-9_-]`, else `<prefix>.app.h.<sha-256 of the id, hex>`.
pub fn application_topic(prefix: &str, client_id: &str) -> String {
    let plain = !client_id.is_empty()
        && client_id.len() <= 64
        && client_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if plain {
        format!("{prefix}.app.{client_id}")
    } else {
        let hex: String = Sha256::digest(client_id.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        format!("{prefix}.app.h.{hex}")
    }
}
