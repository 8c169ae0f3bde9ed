//! Types shared by both resources: references and status conditions.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// A reference to an object in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct LocalObjectRef {
    /// Name of the object, in the namespace of the referring resource.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// A key of a Secret in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret, in the namespace of the referring resource.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key inside the Secret's data.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// Condition types (kstatus conventions: `Ready`, `Reconciling`, `Stalled`, so Argo CD and Flux
/// read health without custom scripts; plus resource-specific ones).
pub mod condition_type {
    /// The resource does what its spec asks.
    pub const READY: &str = "Ready";
    /// The operator is still working towards the spec (abnormal-true: present only while true).
    pub const RECONCILING: &str = "Reconciling";
    /// The operator cannot make progress without a change to the spec or the environment
    /// (abnormal-true).
    pub const STALLED: &str = "Stalled";
    /// MqttBroker: the operator reached the Kafka cluster of a Kafka + PostgreSQL broker.
    pub const KAFKA_REACHABLE: &str = "KafkaReachable";
    /// MqttBroker: the operator reached the PostgreSQL database of a Kafka + PostgreSQL broker.
    pub const POSTGRES_REACHABLE: &str = "PostgresReachable";
    /// ApplicationClient: the Kafka topic exists with the declared settings.
    pub const TOPIC_READY: &str = "TopicReady";
    /// ApplicationClient: the credentials Secret exists and the broker's credential store has
    /// the client registered as APPLICATION.
    pub const CREDENTIALS_READY: &str = "CredentialsReady";
}

/// Condition reasons the operator sets (CamelCase, as the API conventions ask).
pub mod reason {
    pub const RECONCILED: &str = "Reconciled";
    pub const PROGRESSING: &str = "Progressing";
    pub const ROLLING_OUT: &str = "RollingOut";
    pub const PODS_NOT_READY: &str = "PodsNotReady";
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// The API server refused a child object the operator wrote (an immutable field, a value
    /// its validation refuses, a missing permission).
    pub const API_REJECTED: &str = "ApiRejected";
    pub const SECRET_NOT_FOUND: &str = "SecretNotFound";
    pub const KAFKA_ERROR: &str = "KafkaError";
    pub const POSTGRES_ERROR: &str = "PostgresError";
    pub const REACHABLE: &str = "Reachable";
    pub const NOT_APPLICABLE: &str = "NotApplicable";
    pub const PROVISIONED: &str = "Provisioned";
    pub const BROKER_NOT_FOUND: &str = "BrokerNotFound";
    pub const BROKER_NOT_KAFKA_POSTGRES: &str = "BrokerNotKafkaPostgres";
    pub const RESOURCE_CONFLICT: &str = "ResourceConflict";
    pub const NOT_SUPPORTED: &str = "NotSupported";
    pub const SUSPENDED: &str = "Suspended";
    pub const DELETION_BLOCKED: &str = "DeletionBlocked";
}

/// Sets `new` in `conditions`, keeping `lastTransitionTime` when the status did not change (the
/// API conventions' rule; rewriting it on every loop would make every reconcile a write).
/// Returns whether anything changed.
pub fn set_condition(conditions: &mut Vec<Condition>, new: Condition) -> bool {
    match conditions.iter_mut().find(|c| c.type_ == new.type_) {
        Some(existing) => {
            let transition = if existing.status == new.status {
                existing.last_transition_time.clone()
            } else {
                new.last_transition_time.clone()
            };
            let updated = Condition {
                last_transition_time: transition,
                ..new
            };
            if *existing == updated {
                false
            } else {
                *existing = updated;
                true
            }
        }
        None => {
            conditions.push(new);
            true
        }
    }
}

/// Removes the condition of type `type_`; returns whether it was present.
pub fn remove_condition(conditions: &mut Vec<Condition>, type_: &str) -> bool {
    let before = conditions.len();
    conditions.retain(|c| c.type_ != type_);
    before != conditions.len()
}

/// A condition of `type_` with the given status, reason and message, stamped `now`.
pub fn condition(
    type_: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    observed_generation: Option<i64>,
    now: Time,
) -> Condition {
    Condition {
        type_: type_.to_string(),
        status: if status { "True" } else { "False" }.to_string(),
        reason: reason.to_string(),
        message: message.into(),
        observed_generation,
        last_transition_time: now,
    }
}

/// Whether `conditions` holds `type_` with status `True`.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    conditions
        .iter()
        .any(|c| c.type_ == type_ && c.status == "True")
}
