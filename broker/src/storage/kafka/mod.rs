//! Kafka: the publish log `<prefix>.msg.all` that every PUBLISH is appended to before it is
//! acknowledged, and one topic per APPLICATION client, `<prefix>.app.<client>`.
//!
//! * **Durability.** The producer runs with `acks=all` and idempotence on, whatever the
//!   `properties` table says (config validation refuses overrides): a record is acknowledged only
//!   once every in-sync replica has it, and retries cannot duplicate or reorder it.
//! * **Record key.** `msg.all` records are keyed by the publisher's client id, so all of one
//!   client's messages land in one partition, in the order it sent them. MQTT asks for order per
//!   publisher and topic (4.6); keying by publisher keeps that and spreads a topic many devices
//!   publish to over every partition (keying by topic would put a fleet's telemetry topic on one
//!   partition and one router consumer).
//! * **No spawned task per message.** Each record carries its completion channel as the
//!   librdkafka delivery opaque; the producer's polling thread answers it directly.

pub mod app;
pub mod local;
pub mod position;
pub mod reader;
pub mod record;
pub mod shared;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;
use tokio::sync::oneshot;

use crate::config::KafkaConfig;
use crate::message::Message;
use crate::metrics::Metrics;
use crate::storage::log::{LogControl, Qos2Mark};
use crate::storage::{Completion, StorageError};

/// How long a metadata or admin request may take before the broker calls Kafka unreachable.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

// The topic names the operator provisions with too (one definition for both).
pub use ferrymq_common::topics::{application_topic, msg_all_topic};
pub(crate) use ferrymq_common::topics::{hex, is_plain_name};

/// Per publish-log partition, the highest offset whose appends were found in a log (its
/// records' `ferrymq.origin` headers): what a replaying or retrying router must not append
/// again to that log.
pub type Origins = std::collections::HashMap<i32, i64>;

/// Drops a Kafka client on a blocking thread: closing a consumer leaves its group and commits,
/// which can wait on a broker that does not answer, and must not hold a runtime thread.
pub fn close_in_background<T: Send + 'static>(client: T) {
    tokio::task::spawn_blocking(move || drop(client));
}

/// Notes that the append routed from `offset` of publish-log `partition` is in the log.
pub(crate) fn note_origin(origins: &mut Origins, partition: i32, offset: i64) {
    let known = origins.entry(partition).or_insert(offset);
    *known = (*known).max(offset);
}

/// Whether the append routed from (`partition`, `offset`) is already in the log.
pub(crate) fn already_appended(origins: Option<&Origins>, partition: i32, offset: i64) -> bool {
    origins
        .and_then(|o| o.get(&partition))
        .is_some_and(|appended| offset <= *appended)
}

/// The consumer group whose committed offsets say how far the router has stored `msg.all`.
pub fn router_group(prefix: &str) -> String {
    format!("{prefix}.router")
}

pub(crate) fn kafka_error(e: KafkaError) -> StorageError {
    match e {
        KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull) => StorageError::Overloaded,
        e => StorageError::engine("kafka", e),
    }
}

/// Answers each record's completion channel from the producer's polling thread, and notes when
/// the producer's idempotence state is broken.
pub struct DeliveryContext {
    /// The cluster fenced this producer or lost its sequence state (after a long outage, say):
    /// every further record would fail the same way, so a new producer is needed.
    broken: AtomicBool,
}

impl ClientContext for DeliveryContext {}

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = Box<oneshot::Sender<Result<(), StorageError>>>;

    fn delivery(&self, result: &DeliveryResult<'_>, done: Self::DeliveryOpaque) {
        // With acks=all, Kafka answers a produce request only once the partition's high
        // watermark covers the record: a reader that asks for the high watermark after this
        // completion fires finds the record below it.
        let outcome = match result {
            Ok(_) => Ok(()),
            Err((e, _)) => {
                if matches!(
                    e.rdkafka_error_code(),
                    Some(
                        RDKafkaErrorCode::ProducerFenced
                            | RDKafkaErrorCode::InvalidProducerEpoch
                            | RDKafkaErrorCode::UnknownProducerId
                            | RDKafkaErrorCode::OutOfOrderSequenceNumber
                            | RDKafkaErrorCode::Fatal
                    )
                ) {
                    self.broken.store(true, Ordering::Release);
                }
                Err(kafka_error(e.clone()))
            }
        };
        let _ = done.send(outcome);
    }
}

/// The Kafka clients one broker shares: a producer for every topic, an admin client, and a
/// consumer used only for metadata and watermarks.
pub struct Kafka {
    pub config: KafkaConfig,
    /// Replaced when it hits a fatal error (an idempotent producer that was fenced cannot send
    /// again); records in flight on the old one fail, and are therefore not acknowledged.
    producer: parking_lot::RwLock<Arc<ThreadedProducer<DeliveryContext>>>,
    admin: AdminClient<DefaultClientContext>,
    metadata: Arc<BaseConsumer>,
    /// Topics known to exist (created or seen), so a lookup happens once per topic.
    known_topics: parking_lot::Mutex<HashSet<String>>,
    healthy: AtomicBool,
    pub metrics: Arc<Metrics>,
}

impl Kafka {
    /// Common client settings: the servers and the pass-through properties (TLS, SASL, …).
    pub fn client_config(config: &KafkaConfig) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &config.bootstrap_servers);
        for (k, v) in &config.properties {
            c.set(k, v);
        }
        c
    }

    /// Creates the clients and checks, within a few seconds, that the cluster answers and the
    /// publish log exists (creating it when missing).
    pub async fn connect(
        config: &KafkaConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Kafka>, StorageError> {
        let unreachable = |e: KafkaError| {
            StorageError::engine(
                format!(
                    "kafka at `{}` (kafka.bootstrap_servers)",
                    config.bootstrap_servers
                ),
                e,
            )
        };
        let producer = Self::producer(config).map_err(unreachable)?;
        let admin: AdminClient<DefaultClientContext> =
            Self::client_config(config).create().map_err(unreachable)?;
        let metadata: BaseConsumer = Self::client_config(config)
            .set("group.id", format!("{}.metadata", config.topic_prefix))
            .set("enable.auto.commit", "false")
            .create()
            .map_err(unreachable)?;
        let kafka = Arc::new(Kafka {
            config: config.clone(),
            producer: parking_lot::RwLock::new(Arc::new(producer)),
            admin,
            metadata: Arc::new(metadata),
            known_topics: Default::default(),
            healthy: AtomicBool::new(true),
            metrics,
        });
        kafka
            .ensure_topic(
                &msg_all_topic(&config.topic_prefix),
                config.msg_all_partitions,
                &[],
                true,
            )
            .await
            .map_err(|e| match e {
                StorageError::Engine { context, source } => StorageError::Engine {
                    context: format!(
                        "kafka at `{}` (kafka.bootstrap_servers): {context}",
                        config.bootstrap_servers
                    ),
                    source,
                },
                e => e,
            })?;
        kafka.check_durability().await;
        Ok(kafka)
    }

    /// Reads the publish log topic's `min.insync.replicas` and `unclean.leader.election.enable`
    /// and warns when acks=all cannot keep an acknowledged PUBLISH through the loss of a Kafka
    /// broker (see docs/kafka-postgres.md, "A production Kafka cluster"). Failing to read them
    /// is a warning too: some managed services refuse DescribeConfigs.
    async fn check_durability(&self) {
        let topic = msg_all_topic(&self.config.topic_prefix);
        let options = AdminOptions::new().request_timeout(Some(REQUEST_TIMEOUT));
        let described = self
            .admin
            .describe_configs([&ResourceSpecifier::Topic(&topic)], &options)
            .await;
        let resource = match described.as_deref() {
            Ok([Ok(resource)]) => resource,
            other => {
                tracing::warn!(topic, result = ?other.map(|r| r.len()), "cannot read the publish log topic's configuration; its min.insync.replicas is not checked");
                return;
            }
        };
        let value = |name: &str| resource.get(name).and_then(|e| e.value.clone());
        let min_isr: u64 = value("min.insync.replicas")
            .and_then(|v| v.parse().ok())
            .unwrap_or(1);
        self.metrics
            .kafka_replication
            .min_insync_replicas
            .set(min_isr);
        if min_isr < 2 {
            tracing::warn!(topic, min_isr, "the publish log topic has min.insync.replicas below 2: acks=all is satisfied by the partition leader alone, and losing that one Kafka broker loses acknowledged messages. Production clusters need replication_factor = 3 and min.insync.replicas = 2");
        }
        if value("unclean.leader.election.enable").as_deref() == Some("true") {
            tracing::warn!(topic, "the publish log topic allows unclean leader election: an out-of-sync replica may become leader and drop acknowledged messages. Set unclean.leader.election.enable=false");
        }
    }

    /// Exports how the publish log's partitions are replicated, from a metadata answer, and
    /// warns when that changes for the worse.
    fn note_replication(&self, topic: &rdkafka::metadata::MetadataTopic) {
        let gauges = &self.metrics.kafka_replication;
        let min_isr = gauges.min_insync_replicas.get().max(1) as usize;
        let (mut factor, mut under, mut under_min) = (0, 0, 0);
        for p in topic.partitions() {
            factor = factor.max(p.replicas().len());
            under += usize::from(p.isr().len() < p.replicas().len());
            under_min += usize::from(p.isr().len() < min_isr);
        }
        gauges.replication_factor.set(factor as u64);
        let was = gauges.under_min_isr_partitions.get();
        gauges.under_replicated_partitions.set(under as u64);
        gauges.under_min_isr_partitions.set(under_min as u64);
        if under_min > 0 && was == 0 {
            tracing::error!(topic = topic.name(), partitions = under_min, "publish log partitions have fewer in-sync replicas than min.insync.replicas: publishes to them fail until the replicas catch up");
        }
    }

    /// The producer every record goes through: acks=all and idempotence, whatever the
    /// pass-through properties say.
    fn producer(config: &KafkaConfig) -> Result<ThreadedProducer<DeliveryContext>, KafkaError> {
        Self::client_config(config)
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("linger.ms", config.linger_ms.to_string())
            .set("batch.size", config.batch_size.to_string())
            .set("message.timeout.ms", config.produce_timeout_ms.to_string())
            .set(
                "queue.buffering.max.messages",
                config.max_pending_records.to_string(),
            )
            .create_with_context(DeliveryContext {
                broken: AtomicBool::new(false),
            })
    }

    /// Replaces a producer that hit a fatal error or lost its idempotence state. The health
    /// probe asks librdkafka (`check_fatal`); the send path only reads the flag the delivery
    /// callback sets, so a PUBLISH costs no extra call into librdkafka.
    fn renew_producer_if_fatal(&self, check_fatal: bool) {
        let current = self.producer.read().clone();
        let broken = current.context().broken.load(Ordering::Acquire);
        let fatal = if check_fatal && !broken {
            current.client().fatal_error()
        } else {
            None
        };
        if fatal.is_none() && !broken {
            return;
        }
        let mut slot = self.producer.write();
        if !Arc::ptr_eq(&slot, &current) {
            return; // another caller replaced it already
        }
        tracing::error!(
            ?fatal,
            "kafka producer lost its idempotence state; replacing it"
        );
        match Self::producer(&self.config) {
            Ok(p) => *slot = Arc::new(p),
            Err(e) => tracing::error!(error = %e, "creating a new kafka producer failed"),
        }
    }

    /// Whether the last metadata request reached the cluster.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    /// Asks the cluster for the publish log's metadata and records whether it answered;
    /// returns the new state.
    pub async fn probe(&self) -> bool {
        self.renew_producer_if_fatal(true);
        let metadata = self.metadata.clone();
        let topic = msg_all_topic(&self.config.topic_prefix);
        let answer = tokio::task::spawn_blocking(move || {
            metadata.fetch_metadata(Some(&topic), REQUEST_TIMEOUT)
        })
        .await;
        let ok = match &answer {
            Ok(Ok(m)) => match m.topics().iter().find(|t| t.error().is_none()) {
                Some(t) => {
                    self.note_replication(t);
                    true
                }
                None => false,
            },
            _ => false,
        };
        let was = self.healthy.swap(ok, Ordering::AcqRel);
        if was != ok {
            if ok {
                tracing::info!(servers = %self.config.bootstrap_servers, "kafka is reachable again");
            } else {
                tracing::error!(servers = %self.config.bootstrap_servers, "kafka is unreachable; publishes are refused until it returns");
            }
        }
        ok
    }

    /// Partition count of `topic`, or `None` when it does not exist.
    pub async fn partitions(&self, topic: &str) -> Result<Option<usize>, StorageError> {
        let metadata = self.metadata.clone();
        let name = topic.to_string();
        tokio::task::spawn_blocking(move || {
            let m = metadata
                .fetch_metadata(Some(&name), REQUEST_TIMEOUT)
                .map_err(kafka_error)?;
            Ok(m.topics()
                .iter()
                .find(|t| t.name() == name)
                .and_then(|t| match t.error() {
                    None if !t.partitions().is_empty() => Some(t.partitions().len()),
                    _ => None,
                }))
        })
        .await
        .map_err(|e| StorageError::engine("kafka metadata task", e))?
    }

    /// (low, high) watermarks of a partition of `topic`, asked of the partition leader
    /// (ListOffsets). The high watermark covers every record acknowledged with acks=all.
    pub async fn watermarks(
        &self,
        topic: &str,
        partition: i32,
    ) -> Result<(i64, i64), StorageError> {
        // A partition whose leader is moving (or a topic just created) answers "unknown" for a
        // moment: retry a few times before calling it an error.
        let mut attempt = 0;
        loop {
            let metadata = self.metadata.clone();
            let name = topic.to_string();
            let result = tokio::task::spawn_blocking(move || {
                metadata
                    .fetch_watermarks(&name, partition, REQUEST_TIMEOUT)
                    .map_err(kafka_error)
            })
            .await
            .map_err(|e| StorageError::engine("kafka watermark task", e))?;
            attempt += 1;
            match result {
                Err(_) if attempt < 10 => tokio::time::sleep(Duration::from_millis(100)).await,
                other => return other,
            }
        }
    }

    /// Makes sure `topic` exists: known, found in metadata, or created when `create` allows.
    pub async fn ensure_topic(
        &self,
        topic: &str,
        partitions: i32,
        topic_config: &[(&str, String)],
        create: bool,
    ) -> Result<(), StorageError> {
        if self.known_topics.lock().contains(topic) {
            return Ok(());
        }
        if self.partitions(topic).await?.is_none() {
            if !create {
                return Err(StorageError::MissingTopic(topic.to_string()));
            }
            let mut new = NewTopic::new(
                topic,
                partitions,
                TopicReplication::Fixed(self.config.replication_factor),
            );
            for (k, v) in topic_config {
                new = new.set(k, v);
            }
            let options = AdminOptions::new().operation_timeout(Some(REQUEST_TIMEOUT));
            let results = self
                .admin
                .create_topics([&new], &options)
                .await
                .map_err(kafka_error)?;
            for result in results {
                match result {
                    Ok(_) => tracing::info!(topic, partitions, "created kafka topic"),
                    Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                    Err((name, code)) => {
                        return Err(StorageError::engine(
                            format!("kafka: creating topic {name}"),
                            KafkaError::AdminOp(code),
                        ))
                    }
                }
            }
            // A new topic reaches every broker's metadata a moment after CreateTopics returns;
            // until then produce and offset requests for it fail.
            let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
            while self.partitions(topic).await.ok().flatten().is_none() {
                if tokio::time::Instant::now() >= deadline {
                    return Err(StorageError::engine_msg(format!(
                        "kafka: topic {topic} was created but does not show up in metadata"
                    )));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        self.known_topics.lock().insert(topic.to_string());
        Ok(())
    }

    /// Sends one record; `done` is answered once Kafka acknowledged it (or it failed).
    fn send(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        partition: Option<i32>,
        payload: &[u8],
        headers: rdkafka::message::OwnedHeaders,
    ) -> Completion {
        let (tx, rx) = oneshot::channel();
        let mut record = BaseRecord::with_opaque_to(topic, Box::new(tx))
            .payload(payload)
            .headers(headers);
        if let Some(key) = key {
            record = record.key(key);
        }
        if let Some(p) = partition {
            record = record.partition(p);
        }
        let producer = {
            let current = self.producer.read();
            if current.context().broken.load(Ordering::Acquire) {
                drop(current);
                self.renew_producer_if_fatal(false);
                self.producer.read().clone()
            } else {
                current.clone()
            }
        };
        if let Err((e, record)) = producer.send(record) {
            self.metrics.storage_errors.inc();
            let _ = record.delivery_opaque.send(Err(kafka_error(e)));
        }
        rx
    }

    /// Waits (bounded) until every record handed to the producer is acknowledged.
    pub fn flush(&self, timeout: Duration) {
        let producer = self.producer.read().clone();
        let _ = producer.flush(timeout);
    }
}

/// The publish log `<prefix>.msg.all`, the ingest side: what a connection appends a PUBLISH to.
/// The dispatch side is [`reader::KafkaLogReader`].
pub struct KafkaPublishLog {
    kafka: Arc<Kafka>,
    topic: String,
}

impl KafkaPublishLog {
    pub fn new(kafka: Arc<Kafka>) -> KafkaPublishLog {
        let topic = msg_all_topic(&kafka.config.topic_prefix);
        KafkaPublishLog { kafka, topic }
    }
}

impl crate::storage::log::PublishLog for KafkaPublishLog {
    /// Resolves once Kafka has the record with acks=all. Fails at once with `Overloaded` when
    /// the producer's queue (`kafka.max_pending_records`) is full. `qos2`: see
    /// [`record::with_qos2_flow`].
    fn append(&self, message: &Message, qos2: Option<Qos2Mark>) -> Completion {
        let mut headers = record::headers(message, None);
        if let Some((pkid, dup)) = qos2 {
            headers = record::with_qos2_flow(headers, pkid, dup);
        }
        self.kafka.send(
            &self.topic,
            Some(message.publisher.as_bytes()),
            None,
            &message.payload,
            headers,
        )
    }

    /// Keyed by the publisher like its messages, so it lands in the same partition, after
    /// everything the publisher appended before.
    fn append_control(&self, control: &LogControl) -> Completion {
        self.kafka.send(
            &self.topic,
            Some(control.publisher().as_bytes()),
            None,
            &[],
            record::control_headers(control),
        )
    }
}
