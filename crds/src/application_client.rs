//! `ApplicationClient`: an MQTT client id registered as APPLICATION with a broker, with its own
//! Kafka topic and MQTT credentials.

// kube's `printcolumn(type_ = ...)` repeats the same attribute key once per column.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::LocalObjectRef;

/// Desired state of an APPLICATION client.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "ferrymq.io",
    version = "v1alpha1",
    kind = "ApplicationClient",
    plural = "applicationclients",
    shortname = "mqapp",
    category = "ferrymq",
    namespaced,
    status = "ApplicationClientStatus",
    derive = "PartialEq",
    derive = "Default",
    cel,
    doc = "An MQTT client id registered as APPLICATION with a ferrymq broker: its Kafka topic and its credentials.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Broker", type_ = "string", json_path = ".spec.brokerRef.name"),
    printcolumn(name = "Client", type_ = "string", json_path = ".spec.clientId"),
    printcolumn(name = "Topic", type_ = "string", json_path = ".status.topicName"),
    printcolumn(
        name = "Partitions",
        type_ = "integer",
        json_path = ".status.partitions"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        priority = 1,
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
// `self == oldSelf` on an optional field runs only when the old and the new object both have it,
// so it cannot refuse unset -> set (or set -> unset); this rule on the parent does.
#[x_kube(
    validation = Rule::new("has(self.credentialsSecretName) == has(oldSelf.credentialsSecretName)")
        .message("credentialsSecretName is immutable")
)]
pub struct ApplicationClientSpec {
    /// The MqttBroker (same namespace) this client belongs to. Immutable.
    #[x_kube(validation = Rule::new("self == oldSelf").message("brokerRef is immutable"))]
    pub broker_ref: LocalObjectRef,
    /// The MQTT client identifier. Immutable: a new id is a new client with a new log.
    #[schemars(length(min = 1, max = 256))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("clientId is immutable"))]
    pub client_id: String,
    /// The client's Kafka topic `<prefix>.app.<clientId>`.
    #[serde(default)]
    pub topic: TopicSpec,
    /// What the client may publish and subscribe to (the credential record's ACL).
    #[serde(default)]
    pub acl: Acl,
    /// Name of the Secret the operator writes the MQTT credentials into (`username`,
    /// `password`, `clientId`); `<metadata.name>-mqtt` when absent. Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("credentialsSecretName is immutable"))]
    pub credentials_secret_name: Option<String>,
    /// What deleting this resource does to the topic and the registration: `Retain` (default)
    /// keeps the topic and its data, `Delete` removes the topic and the credential record.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
    /// Stop reconciling (no changes to Kafka, PostgreSQL or the Secret) until set to false.
    #[serde(default)]
    pub suspend: bool,
}

/// The client's Kafka topic.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct TopicSpec {
    /// Partitions. May grow, never shrink (Kafka cannot remove partitions).
    #[serde(default = "default_partitions")]
    #[schemars(range(min = 1, max = 10000))]
    #[x_kube(validation = Rule::new("self >= oldSelf").message("partitions may grow, never shrink"))]
    pub partitions: i32,
    /// Replication factor; -1 takes the broker's `kafkaPostgres.kafka.replicationFactor`.
    /// Immutable.
    #[serde(default = "default_replication_factor")]
    #[schemars(range(min = -1, max = 32767))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("replicationFactor is immutable"))]
    pub replication_factor: i32,
    /// Topic configuration (`retention.ms`, `cleanup.policy`…), kept in sync with Kafka.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub config: BTreeMap<String, String>,
}

impl Default for TopicSpec {
    fn default() -> Self {
        TopicSpec {
            partitions: default_partitions(),
            replication_factor: default_replication_factor(),
            config: BTreeMap::new(),
        }
    }
}

fn default_partitions() -> i32 {
    1
}

fn default_replication_factor() -> i32 {
    -1
}

/// Topic patterns of the client's credential record (docs/security.md "ACL syntax"); an empty
/// list allows nothing.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Acl {
    /// Patterns the client may publish to. Default: none.
    #[serde(default)]
    #[schemars(length(max = 256))]
    pub publish: Vec<String>,
    /// Patterns the client may subscribe to. Default: `#` (everything), since an APPLICATION
    /// client usually consumes what devices publish.
    #[serde(default = "default_subscribe")]
    #[schemars(length(max = 256))]
    pub subscribe: Vec<String>,
}

impl Default for Acl {
    fn default() -> Self {
        Acl {
            publish: Vec::new(),
            subscribe: default_subscribe(),
        }
    }
}

fn default_subscribe() -> Vec<String> {
    vec!["#".into()]
}

/// What happens to the topic and registration when the resource is deleted.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum DeletionPolicy {
    #[default]
    Retain,
    Delete,
}

/// Observed state of an APPLICATION client.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApplicationClientStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The Kafka topic name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic_name: Option<String>,
    /// The topic's id; a change means the topic was deleted and recreated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic_id: Option<String>,
    /// Partitions the topic has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partitions: Option<i32>,
    /// The Secret holding the credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
    /// Ready, TopicReady, CredentialsReady.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

impl ApplicationClient {
    /// The credentials Secret's name.
    pub fn secret_name(&self) -> String {
        match &self.spec.credentials_secret_name {
            Some(name) => name.clone(),
            None => format!("{}-mqtt", self.metadata.name.as_deref().unwrap_or_default()),
        }
    }
}
