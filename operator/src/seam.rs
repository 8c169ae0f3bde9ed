//! The boundary between the controllers and the systems outside Kubernetes. Controllers talk to
//! Kafka and PostgreSQL only through [`Provisioner`]; the production implementation
//! (`provisioner::Real`) calls `crate::provision`, which is tested against real Apache Kafka and
//! PostgreSQL, and the controller tests use an in-memory implementation to drive every branch
//! (unreachable, refused, drift) without those services.

use std::collections::BTreeMap;

use async_trait::async_trait;

/// How to reach a Kafka cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaTarget {
    pub bootstrap_servers: String,
    /// librdkafka properties (from the broker's `propertiesSecretRef`).
    pub properties: BTreeMap<String, String>,
}

/// A topic as the spec wants it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicWanted {
    pub name: String,
    pub partitions: i32,
    pub replication_factor: i32,
    pub config: BTreeMap<String, String>,
}

/// What ensuring a topic found and did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TopicState {
    pub topic_id: Option<String>,
    pub partitions: i32,
    /// It did not exist and was created.
    pub created: bool,
    /// Partitions before they were grown.
    pub grown_from: Option<i32>,
    /// Configuration keys set back to the spec, as `key: found -> wanted`.
    pub reverted: Vec<String>,
    /// `(found, wanted)` when the replication factor differs (Kafka cannot change it in place).
    pub replication_factor_differs: Option<(i32, i32)>,
}

/// A broker's PostgreSQL schema and login role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerDatabase {
    pub schema: String,
    pub role: String,
}

/// An APPLICATION client's credential record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppCredential {
    pub client_id: String,
    pub username: String,
    pub password: String,
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
}

/// A failed side effect. `transient` says whether retrying the same spec can succeed (the
/// service was unreachable), which decides between Reconciling and Stalled.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{message}")]
pub struct ProvisionError {
    pub message: String,
    pub transient: bool,
}

impl ProvisionError {
    pub fn transient(message: impl Into<String>) -> Self {
        ProvisionError {
            message: message.into(),
            transient: true,
        }
    }

    pub fn permanent(message: impl Into<String>) -> Self {
        ProvisionError {
            message: message.into(),
            transient: false,
        }
    }
}

/// Kafka and PostgreSQL side effects, idempotent: a call that finds everything in place changes
/// nothing and reports no change.
#[async_trait]
pub trait Provisioner: Send + Sync + 'static {
    /// Whether the cluster answers a metadata request.
    async fn check_kafka(&self, kafka: &KafkaTarget) -> Result<(), ProvisionError>;
    /// Creates or adopts the topic, grows partitions, sets configuration back to the spec.
    async fn ensure_topic(
        &self,
        kafka: &KafkaTarget,
        topic: &TopicWanted,
    ) -> Result<TopicState, ProvisionError>;
    /// Deletes the topic; `false` when it did not exist.
    async fn delete_topic(&self, kafka: &KafkaTarget, topic: &str) -> Result<bool, ProvisionError>;
    /// Creates the broker's role (with `password`) and schema through an admin connection;
    /// returns whether anything changed.
    async fn ensure_broker_database(
        &self,
        admin_url: &str,
        db: &BrokerDatabase,
        password: &str,
    ) -> Result<bool, ProvisionError>;
    /// Whether the broker's own URL connects.
    async fn check_postgres(&self, url: &str) -> Result<(), ProvisionError>;
    /// Writes the client's credential rows into the broker's `mqtt_credentials` table as the
    /// broker role; returns whether anything changed.
    async fn upsert_application(
        &self,
        broker_url: &str,
        schema: &str,
        credential: &AppCredential,
    ) -> Result<bool, ProvisionError>;
    /// Removes the client's credential rows; returns whether any existed.
    async fn delete_application(
        &self,
        broker_url: &str,
        schema: &str,
        client_id: &str,
        username: &str,
    ) -> Result<bool, ProvisionError>;
}
