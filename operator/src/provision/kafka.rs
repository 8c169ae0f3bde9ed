//! Kafka side effects of the operator, through the admin API: the publish log of an
//! `MqttBroker` and the topic of each `ApplicationClient`.
//!
//! Kubernetes is the source of truth (unidirectional, as Strimzi's topic operator): a topic that
//! already exists is adopted, its partitions grow when the spec asks for more (Kafka cannot
//! remove partitions, so fewer is refused), and configuration that differs from the spec is
//! set back; [`TopicOutcome`] says what changed so the controller can emit an Event. Topic
//! names come from the rule the broker reads with ([`ferrymq_common::topics`]), so the operator
//! provisions exactly the topic the broker will read.

mod native;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::{
    AdminClient, AdminOptions, ConfigSource, NewPartitions, NewTopic, ResourceSpecifier,
    TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError as RdError, RDKafkaErrorCode};

pub use native::ConfigOp;

/// The publish log `<prefix>.msg.all` (the broker's naming rule).
pub fn publish_log_topic(prefix: &str) -> String {
    ferrymq_common::topics::msg_all_topic(prefix)
}

/// The topic of one APPLICATION client: `<prefix>.app.<clientId>`, or `<prefix>.app.h.<sha-256>`
/// when the client id is not a legal topic name part (the broker's naming rule).
pub fn application_topic(prefix: &str, client_id: &str) -> String {
    ferrymq_common::topics::application_topic(prefix, client_id)
}

/// How the operator reaches a Kafka cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaConnection {
    /// `host:port[,host:port…]`
    pub bootstrap_servers: String,
    /// librdkafka properties (TLS, SASL, …) passed through unchanged, as the broker's
    /// `kafka.properties`.
    pub properties: BTreeMap<String, String>,
    /// How long one admin or metadata request may take before the cluster counts as
    /// unreachable.
    pub timeout: Duration,
}

impl KafkaConnection {
    pub fn new(bootstrap_servers: impl Into<String>) -> KafkaConnection {
        KafkaConnection {
            bootstrap_servers: bootstrap_servers.into(),
            properties: BTreeMap::new(),
            timeout: Duration::from_secs(10),
        }
    }
}

/// What a Kafka operation failed on. The variants are what a controller needs to decide on a
/// condition reason and whether retrying can help.
#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    /// The cluster did not answer (connection refused, timeout, no broker up). Retry later.
    #[error("kafka at `{servers}` is unreachable: {detail}")]
    Unreachable { servers: String, detail: String },
    /// Authentication failed or an ACL forbids the operation.
    #[error("kafka refused to {action}: not authorised ({detail})")]
    NotAuthorized { action: String, detail: String },
    /// The cluster refused the request as invalid (bad config key or value, replication factor
    /// above the number of brokers, policy violation, …). Retrying the same spec will not help.
    #[error("kafka refused to {action}: {detail}")]
    InvalidRequest { action: String, detail: String },
    /// The cluster does not implement the request (some Kafka-protocol servers lack
    /// CreatePartitions, for one).
    #[error("kafka at `{servers}` does not support {action}: {detail}")]
    Unsupported {
        servers: String,
        action: String,
        detail: String,
    },
    /// The spec asks for fewer partitions than the topic has; Kafka cannot remove partitions.
    #[error(
        "topic {topic} has {current} partitions and the spec asks for {requested}: Kafka cannot \
         remove partitions (delete and recreate the topic, losing its data, to shrink it)"
    )]
    PartitionShrink {
        topic: String,
        current: i32,
        requested: i32,
    },
    /// The operator's own settings are wrong (a bad librdkafka property, say).
    #[error("kafka client settings: {0}")]
    Client(String),
}

impl KafkaError {
    /// Whether trying again later can succeed without a change to the spec or the cluster's
    /// permissions.
    pub fn is_transient(&self) -> bool {
        matches!(self, KafkaError::Unreachable { .. })
    }
}

/// What a topic should look like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    pub name: String,
    /// At least 1.
    pub partitions: i32,
    /// `-1`: the cluster's `default.replication.factor`. Used when creating; an existing topic
    /// keeps its replication factor (changing it needs a partition reassignment), and a
    /// difference is reported in [`TopicOutcome::replication_factor_differs`].
    pub replication_factor: i32,
    /// Topic configuration the operator owns (`retention.ms`, `cleanup.policy`, …).
    pub config: BTreeMap<String, String>,
}

/// A topic as the cluster describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicDescription {
    pub name: String,
    /// Kafka's topic id (base64), when the cluster reports one. It changes only when the
    /// topic is deleted and created again.
    pub topic_id: Option<String>,
    pub partitions: i32,
    pub replication_factor: i32,
    /// Configuration set on the topic itself (source `DynamicTopic`), not inherited.
    pub config: BTreeMap<String, String>,
    /// Every key the cluster lists for the topic, with the value in effect.
    pub effective_config: BTreeMap<String, String>,
}

#[derive(Debug, Default)]
struct TopicConfig {
    own: BTreeMap<String, String>,
    effective: BTreeMap<String, String>,
}

/// How [`KafkaAdmin::ensure_topic`] found the topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicAction {
    /// It did not exist and was created.
    Created,
    /// It existed; the operator manages it from now on (or already did).
    Existing,
}

/// One configuration key the operator changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigChange {
    pub key: String,
    /// The value found on the topic; `None`: not set on the topic.
    pub found: Option<String>,
    /// The value the spec asks for; `None`: removed (back to the cluster default).
    pub wanted: Option<String>,
}

impl std::fmt::Display for ConfigChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "(default)".into());
        write!(
            f,
            "{}: {} -> {}",
            self.key,
            show(&self.found),
            show(&self.wanted)
        )
    }
}

/// What [`KafkaAdmin::ensure_topic`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicOutcome {
    pub action: TopicAction,
    /// Partitions before, when they were increased.
    pub grown_from: Option<i32>,
    /// Configuration set back to the spec (out-of-band drift, or a spec change).
    pub config_changes: Vec<ConfigChange>,
    /// `(found, wanted)` when an existing topic's replication factor differs from the spec.
    pub replication_factor_differs: Option<(i32, i32)>,
    /// The topic after the changes.
    pub topic: TopicDescription,
}

impl TopicOutcome {
    /// Whether anything on the cluster was changed.
    pub fn changed(&self) -> bool {
        self.action == TopicAction::Created
            || self.grown_from.is_some()
            || !self.config_changes.is_empty()
    }
}

/// Admin and metadata clients for one Kafka cluster.
pub struct KafkaAdmin {
    connection: KafkaConnection,
    admin: AdminClient<DefaultClientContext>,
    /// Shared with blocking tasks: metadata requests block the calling thread.
    metadata: Arc<BaseConsumer>,
}

impl KafkaAdmin {
    /// Creates the clients (librdkafka connects lazily; [`KafkaAdmin::check`] proves the
    /// cluster answers).
    pub fn new(connection: KafkaConnection) -> Result<KafkaAdmin, KafkaError> {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &connection.bootstrap_servers);
        for (k, v) in &connection.properties {
            config.set(k, v);
        }
        let client = |e: RdError| KafkaError::Client(e.to_string());
        let admin: AdminClient<DefaultClientContext> = config.create().map_err(client)?;
        let metadata: BaseConsumer = config.create().map_err(client)?;
        Ok(KafkaAdmin {
            connection,
            admin,
            metadata: Arc::new(metadata),
        })
    }

    pub fn connection(&self) -> &KafkaConnection {
        &self.connection
    }

    fn options(&self) -> AdminOptions {
        AdminOptions::new()
            .request_timeout(Some(self.connection.timeout))
            .operation_timeout(Some(self.connection.timeout))
    }

    /// Maps a librdkafka error code to the operator's error kinds.
    fn classify(&self, action: &str, code: RDKafkaErrorCode, detail: String) -> KafkaError {
        use RDKafkaErrorCode as C;
        let detail = if detail.is_empty() {
            code.to_string()
        } else {
            detail
        };
        match code {
            C::BrokerTransportFailure
            | C::AllBrokersDown
            | C::OperationTimedOut
            | C::RequestTimedOut
            | C::NetworkException
            | C::Resolve
            | C::TimedOutQueue
            | C::SSL
            | C::LeaderNotAvailable
            | C::NotController
            | C::BrokerNotAvailable
            | C::CoordinatorNotAvailable
            | C::NotCoordinator
            | C::BrokerDestroy => KafkaError::Unreachable {
                servers: self.connection.bootstrap_servers.clone(),
                detail: format!("{action}: {detail}"),
            },
            C::TopicAuthorizationFailed
            | C::ClusterAuthorizationFailed
            | C::GroupAuthorizationFailed
            | C::SaslAuthenticationFailed
            | C::Authentication
            | C::DelegationTokenAuthorizationFailed
            | C::TransactionalIdAuthorizationFailed => KafkaError::NotAuthorized {
                action: action.to_string(),
                detail,
            },
            C::UnsupportedVersion | C::UnsupportedFeature | C::NotImplemented => {
                KafkaError::Unsupported {
                    servers: self.connection.bootstrap_servers.clone(),
                    action: action.to_string(),
                    detail,
                }
            }
            _ => KafkaError::InvalidRequest {
                action: action.to_string(),
                detail,
            },
        }
    }

    fn rd_error(&self, action: &str, e: RdError) -> KafkaError {
        let code = match &e {
            // rdkafka's `rdkafka_error_code` leaves these out.
            RdError::AdminOp(code) | RdError::MetadataFetch(code) => Some(*code),
            e => e.rdkafka_error_code(),
        };
        match code {
            Some(code) => self.classify(action, code, e.to_string()),
            None => KafkaError::Client(format!("{action}: {e}")),
        }
    }

    fn native_error(&self, action: &str, e: native::NativeError) -> KafkaError {
        self.classify(action, e.code, e.message)
    }

    /// Bounds a future by the request timeout (plus a margin for librdkafka's own timers), so
    /// an admin call can never hang a reconcile.
    async fn bounded<T>(
        &self,
        action: &str,
        f: impl std::future::Future<Output = Result<T, KafkaError>>,
    ) -> Result<T, KafkaError> {
        match tokio::time::timeout(self.connection.timeout + Duration::from_secs(5), f).await {
            Ok(r) => r,
            Err(_) => Err(KafkaError::Unreachable {
                servers: self.connection.bootstrap_servers.clone(),
                detail: format!("{action}: no answer within {:?}", self.connection.timeout),
            }),
        }
    }

    /// Asks the cluster for its metadata: `Ok` when it answers.
    pub async fn check(&self) -> Result<(), KafkaError> {
        let timeout = self.connection.timeout;
        let metadata = self.metadata.clone();
        let result = tokio::task::spawn_blocking(move || {
            metadata
                .fetch_metadata(None, timeout)
                .map(|m| m.brokers().len())
        })
        .await
        .map_err(|e| KafkaError::Client(format!("metadata task failed: {e}")))?;
        match result {
            Ok(0) => Err(KafkaError::Unreachable {
                servers: self.connection.bootstrap_servers.clone(),
                detail: "the cluster reports no brokers".into(),
            }),
            Ok(_) => Ok(()),
            Err(e) => Err(self.rd_error("fetch cluster metadata", e)),
        }
    }

    /// The topic as the cluster sees it, or `None` when it does not exist.
    pub async fn describe(&self, topic: &str) -> Result<Option<TopicDescription>, KafkaError> {
        let action = format!("describe topic {topic}");
        let info = self
            .bounded(&action, async {
                match native::describe_topic(&self.admin, topic, self.connection.timeout).await {
                    Ok(info) => Ok(info),
                    // Servers without DescribeTopics support: plain metadata, without topic id.
                    Err(e) if e.code == RDKafkaErrorCode::UnsupportedFeature => {
                        self.describe_by_metadata(topic).await
                    }
                    Err(e) => Err(self.native_error(&action, e)),
                }
            })
            .await?;
        let Some(info) = info else {
            return Ok(None);
        };
        let config = self.topic_config(topic).await?;
        Ok(Some(TopicDescription {
            name: topic.to_string(),
            topic_id: info.topic_id,
            partitions: info.partitions,
            replication_factor: info.replication_factor,
            config: config.own,
            effective_config: config.effective,
        }))
    }

    async fn describe_by_metadata(
        &self,
        topic: &str,
    ) -> Result<Option<native::TopicInfo>, KafkaError> {
        let timeout = self.connection.timeout;
        let consumer = self.metadata.clone();
        let name = topic.to_string();
        let metadata =
            tokio::task::spawn_blocking(move || consumer.fetch_metadata(Some(&name), timeout))
                .await
                .map_err(|e| KafkaError::Client(format!("metadata task failed: {e}")))?
                .map_err(|e| self.rd_error(&format!("fetch metadata of topic {topic}"), e))?;
        Ok(metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
            .map(|t| native::TopicInfo {
                topic_id: None,
                partitions: i32::try_from(t.partitions().len()).unwrap_or(i32::MAX),
                replication_factor: t
                    .partitions()
                    .first()
                    .map_or(0, |p| i32::try_from(p.replicas().len()).unwrap_or(i32::MAX)),
            }))
    }

    /// The topic's configuration as DescribeConfigs lists it: every key with its effective
    /// value, and which keys are set on the topic itself (source `DynamicTopic`).
    async fn topic_config(&self, topic: &str) -> Result<TopicConfig, KafkaError> {
        let action = format!("describe the configuration of topic {topic}");
        let results = self
            .bounded(&action, async {
                self.admin
                    .describe_configs([&ResourceSpecifier::Topic(topic)], &self.options())
                    .await
                    .map_err(|e| self.rd_error(&action, e))
            })
            .await?;
        let mut config = TopicConfig::default();
        for result in results {
            let resource = result.map_err(|code| self.classify(&action, code, String::new()))?;
            for entry in resource.entries {
                if let Some(value) = entry.value {
                    if entry.source == ConfigSource::DynamicTopic {
                        config.own.insert(entry.name.clone(), value.clone());
                    }
                    config.effective.insert(entry.name, value);
                }
            }
        }
        Ok(config)
    }

    /// Makes the topic match `spec`: creates it, or adopts an existing one, grows its partitions
    /// and sets back configuration that differs. Refuses (changing nothing) when the spec has
    /// fewer partitions than the topic.
    pub async fn ensure_topic(&self, spec: &TopicSpec) -> Result<TopicOutcome, KafkaError> {
        if spec.partitions < 1 {
            return Err(KafkaError::InvalidRequest {
                action: format!("create topic {}", spec.name),
                detail: format!("partitions must be at least 1, not {}", spec.partitions),
            });
        }
        let (action, existing) = match self.describe(&spec.name).await? {
            Some(t) => (TopicAction::Existing, t),
            None => match self.create(spec).await? {
                // Someone else created it between our look and our create: adopt it.
                false => (TopicAction::Existing, self.wait_for(&spec.name).await?),
                true => (TopicAction::Created, self.wait_for(&spec.name).await?),
            },
        };
        if spec.partitions < existing.partitions {
            return Err(KafkaError::PartitionShrink {
                topic: spec.name.clone(),
                current: existing.partitions,
                requested: spec.partitions,
            });
        }
        let mut grown_from = None;
        if spec.partitions > existing.partitions {
            self.grow(&spec.name, spec.partitions).await?;
            grown_from = Some(existing.partitions);
        }
        let config_changes =
            config_diff(&existing.config, &existing.effective_config, &spec.config);
        if !config_changes.is_empty() {
            let ops: Vec<ConfigOp> = config_changes
                .iter()
                .map(|c| match &c.wanted {
                    Some(v) => ConfigOp::Set(c.key.clone(), v.clone()),
                    None => ConfigOp::Delete(c.key.clone()),
                })
                .collect();
            self.alter_config(&spec.name, &ops).await?;
        }
        let replication_factor_differs = (spec.replication_factor > 0
            && existing.replication_factor != spec.replication_factor)
            .then_some((existing.replication_factor, spec.replication_factor));
        let topic = if grown_from.is_some() || !config_changes.is_empty() {
            self.wait_until_applied(&spec.name, spec.partitions, &config_changes)
                .await?
        } else {
            existing
        };
        Ok(TopicOutcome {
            action,
            grown_from,
            config_changes,
            replication_factor_differs,
            topic,
        })
    }

    /// Creates the topic; `false` when it already existed.
    async fn create(&self, spec: &TopicSpec) -> Result<bool, KafkaError> {
        let action = format!("create topic {}", spec.name);
        let mut new = NewTopic::new(
            &spec.name,
            spec.partitions,
            TopicReplication::Fixed(spec.replication_factor),
        );
        for (k, v) in &spec.config {
            new = new.set(k, v);
        }
        let results = self
            .bounded(&action, async {
                self.admin
                    .create_topics([&new], &self.options())
                    .await
                    .map_err(|e| self.rd_error(&action, e))
            })
            .await?;
        for result in results {
            match result {
                Ok(_) => {}
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => return Ok(false),
                Err((_, code)) => return Err(self.classify(&action, code, String::new())),
            }
        }
        tracing::info!(topic = %spec.name, partitions = spec.partitions, "created kafka topic");
        Ok(true)
    }

    /// A created topic shows up in every broker's metadata a moment after CreateTopics returns.
    async fn wait_for(&self, topic: &str) -> Result<TopicDescription, KafkaError> {
        let deadline = tokio::time::Instant::now() + self.connection.timeout;
        loop {
            if let Some(t) = self.describe(topic).await? {
                return Ok(t);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(KafkaError::Unreachable {
                    servers: self.connection.bootstrap_servers.clone(),
                    detail: format!("topic {topic} was created but does not show up in metadata"),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Describes the topic until it shows `partitions` and every change in `changes`. Kafka
    /// applies a configuration change or new partitions asynchronously: the controller commits
    /// the change to the metadata log and each broker applies it when it replays that log, so
    /// a describe right after the request may still show the old state (and the next
    /// reconcile would see drift that is not there).
    async fn wait_until_applied(
        &self,
        topic: &str,
        partitions: i32,
        changes: &[ConfigChange],
    ) -> Result<TopicDescription, KafkaError> {
        let deadline = tokio::time::Instant::now() + self.connection.timeout;
        loop {
            let Some(now) = self.describe(topic).await? else {
                return Err(KafkaError::InvalidRequest {
                    action: format!("describe topic {topic}"),
                    detail: "the topic disappeared while it was being updated".into(),
                });
            };
            let applied = now.partitions >= partitions
                && changes.iter().all(|c| match &c.wanted {
                    Some(v) => now.effective_config.get(&c.key) == Some(v),
                    None => !now.config.contains_key(&c.key),
                });
            if applied || tokio::time::Instant::now() >= deadline {
                // Past the deadline the caller gets what the cluster shows; the next reconcile
                // compares again.
                return Ok(now);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn grow(&self, topic: &str, partitions: i32) -> Result<(), KafkaError> {
        let action = format!("grow topic {topic} to {partitions} partitions");
        let count = usize::try_from(partitions).unwrap_or(1);
        let new = NewPartitions::new(topic, count);
        let results = self
            .bounded(&action, async {
                self.admin
                    .create_partitions([&new], &self.options())
                    .await
                    .map_err(|e| self.rd_error(&action, e))
            })
            .await?;
        for result in results {
            if let Err((_, code)) = result {
                return Err(self.classify(&action, code, String::new()));
            }
        }
        tracing::info!(topic, partitions, "grew kafka topic");
        Ok(())
    }

    /// Applies single-key changes to a topic's configuration (IncrementalAlterConfigs).
    pub async fn alter_config(&self, topic: &str, ops: &[ConfigOp]) -> Result<(), KafkaError> {
        let action = format!("change the configuration of topic {topic}");
        self.bounded(&action, async {
            native::incremental_alter_topic_config(&self.admin, topic, ops, self.connection.timeout)
                .await
                .map_err(|e| self.native_error(&action, e))
        })
        .await
    }

    /// Deletes the topic and its data; `false` when it did not exist.
    pub async fn delete_topic(&self, topic: &str) -> Result<bool, KafkaError> {
        let action = format!("delete topic {topic}");
        let results = self
            .bounded(&action, async {
                self.admin
                    .delete_topics(&[topic], &self.options())
                    .await
                    .map_err(|e| self.rd_error(&action, e))
            })
            .await?;
        for result in results {
            match result {
                Ok(_) => {}
                Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => return Ok(false),
                Err((_, code)) => return Err(self.classify(&action, code, String::new())),
            }
        }
        tracing::info!(topic, "deleted kafka topic");
        Ok(true)
    }
}

/// The changes that make a topic's configuration match `wanted`: a wanted key whose value in
/// effect differs is set; a key set on the topic itself (`own`) that the spec does not name is
/// removed, back to the cluster default. Servers that report no configuration sources (some
/// Kafka-protocol servers list every key as a default) get the first half only: an extra key
/// set out of band there is not seen.
pub fn config_diff(
    own: &BTreeMap<String, String>,
    effective: &BTreeMap<String, String>,
    wanted: &BTreeMap<String, String>,
) -> Vec<ConfigChange> {
    let mut changes = Vec::new();
    for (key, value) in wanted {
        if effective.get(key) != Some(value) {
            changes.push(ConfigChange {
                key: key.clone(),
                found: own.get(key).or_else(|| effective.get(key)).cloned(),
                wanted: Some(value.clone()),
            });
        }
    }
    for (key, value) in own {
        if !wanted.contains_key(key) {
            changes.push(ConfigChange {
                key: key.clone(),
                found: Some(value.clone()),
                wanted: None,
            });
        }
    }
    changes.sort_by(|a, b| a.key.cmp(&b.key));
    changes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn config_diff_sets_changed_and_removes_extra_keys() {
        let own = map(&[("retention.ms", "1"), ("cleanup.policy", "compact")]);
        let mut effective = own.clone();
        effective.insert("segment.ms".into(), "604800000".into());
        effective.insert("max.message.bytes".into(), "1048588".into());
        let wanted = map(&[
            ("retention.ms", "604800000"),
            ("segment.ms", "60000"),
            ("max.message.bytes", "1048588"),
        ]);
        let diff = config_diff(&own, &effective, &wanted);
        assert_eq!(
            diff.iter().map(ToString::to_string).collect::<Vec<_>>(),
            [
                "cleanup.policy: compact -> (default)",
                "retention.ms: 1 -> 604800000",
                "segment.ms: 604800000 -> 60000",
            ]
        );
        // A wanted value already in effect (here a cluster default) needs no change.
        assert!(config_diff(&BTreeMap::new(), &wanted, &wanted).is_empty());
    }

    #[test]
    fn topic_names_are_the_brokers() {
        assert_eq!(publish_log_topic("fmq"), "fmq.msg.all");
        assert_eq!(application_topic("fmq", "ingest-1"), "fmq.app.ingest-1");
        assert!(application_topic("fmq", "plant/7").starts_with("fmq.app.h."));
    }
}
