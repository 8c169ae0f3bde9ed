//! APPLICATION topics: the retention the broker gives the topics it creates (its
//! `[application]` section), which the operator must also want, or adopting a topic the broker
//! created would strip it.

/// `application.retention_secs` when the config does not set it: 7 days.
pub const DEFAULT_RETENTION_SECS: u64 = 7 * 24 * 3600;
/// `application.retention_bytes` when the config does not set it: 1 GiB per client log.
pub const DEFAULT_RETENTION_BYTES: u64 = 1 << 30;

/// The topic settings of an APPLICATION topic with this retention.
pub fn topic_config(retention_ms: u64, retention_bytes: u64) -> Vec<(&'static str, String)> {
    vec![
        ("retention.ms", retention_ms.to_string()),
        ("retention.bytes", retention_bytes.to_string()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_keys_are_kafka_topic_configs() {
        assert_eq!(
            topic_config(DEFAULT_RETENTION_SECS * 1000, DEFAULT_RETENTION_BYTES),
            [
                ("retention.ms", "604800000".to_string()),
                ("retention.bytes", "1073741824".to_string()),
            ]
        );
    }
}
