//! Kafka topic names: the rule the broker reads with (`ferrymq_common::topics`), so the operator
//! provisions exactly the topics the broker reads.

/// The publish log topic `<prefix>.msg.all`.
pub fn publish_log_topic(prefix: &str) -> String {
    ferrymq_common::topics::msg_all_topic(prefix)
}

/// The topic of one APPLICATION client: `<prefix>.app.<client id>`, or
/// `<prefix>.app.h.<sha-256>` for ids that are not legal in a topic name.
pub fn application_topic(prefix: &str, client_id: &str) -> String {
    ferrymq_common::topics::application_topic(prefix, client_id)
}
