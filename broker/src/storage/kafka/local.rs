//! A cluster node's local reader of `<prefix>.msg.all` (only with `cluster.enabled`): every
//! partition assigned explicitly (no consumer group, so no rebalances and no commits), read for
//! this node's own connections and its in-memory retained store (`router::local`).
//!
//! **Where it starts.** At the dispatchers' stored positions (`router_offsets`), read before
//! the broker loads its retained snapshot from PostgreSQL: every retained change missing from
//! that snapshot lies at or after them, so replaying from there makes the in-memory store
//! converge. Records below the log's end as it was at start are applied to the retained store
//! only (see [`LocalLogReader::live_from`]): they were acknowledged before this node's listeners
//! opened, so none of its subscribers is owed them. A partition without a stored position (a
//! fresh cluster) starts at the log's end; a stored position below the log start (retention)
//! starts at the log start.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use futures_util::FutureExt;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{Offset, TopicPartitionList};

use super::position::NextOffset;
use super::reader::Positions;
use super::{kafka_error, msg_all_topic, Kafka};
use crate::storage::log::{LocalLogReader, PartitionRecords};
use crate::storage::postgres::PgStore;
use crate::storage::StorageError;

/// Records handed to the local delivery loop per call at most.
const MAX_RECORDS: usize = 1_024;
/// librdkafka's prefetch for this consumer (its default is 64 MB): enough for several read
/// batches, and the memory this reader holds at most besides one batch.
const QUEUED_KBYTES: &str = "16384";

/// How often a waiting reader checks that its consumer still works.
const STALL_CHECK: std::time::Duration = std::time::Duration::from_secs(5);
/// How long the consumer may fetch nothing while a partition holds records past its position
/// before it is rebuilt (the router's reader does the same: `reader.rs`, `Watchdog`).
const FETCH_STALL: std::time::Duration = std::time::Duration::from_secs(15);

/// `msg.all` read for this node's connections.
pub struct KafkaLocalReader {
    consumer: StreamConsumer,
    kafka: Arc<Kafka>,
    node_id: String,
    positions: Positions,
    /// Per partition, the log's end when this reader opened.
    live_from: HashMap<i32, i64>,
    open_qos2: HashMap<Arc<str>, HashSet<u16>>,
}

impl KafkaLocalReader {
    /// Assigns every partition of the publish log at the dispatchers' stored positions.
    pub async fn open(
        kafka: &Arc<Kafka>,
        pg: &PgStore,
        node_id: &str,
    ) -> Result<KafkaLocalReader, StorageError> {
        let topic = msg_all_topic(&kafka.config.topic_prefix);
        let consumer = local_consumer(kafka, node_id)?;
        let partitions = kafka
            .partitions(&topic)
            .await?
            .ok_or_else(|| StorageError::MissingTopic(topic.clone()))?;
        // Read before the broker's retained snapshot is (module docs).
        let stored = pg.router_positions().await?;
        let open_qos2 = pg.router_qos2_flows().await?;
        let mut assignment = TopicPartitionList::new();
        let mut expected = HashMap::new();
        let mut live_from = HashMap::new();
        for p in 0..partitions as i32 {
            let (low, high) = kafka.watermarks(&topic, p).await?;
            let start = stored.get(&p).copied().unwrap_or(high).clamp(low, high);
            assignment
                .add_partition_offset(&topic, p, Offset::Offset(start))
                .map_err(kafka_error)?;
            expected.insert(p, NextOffset::new(start));
            live_from.insert(p, high);
        }
        consumer.assign(&assignment).map_err(kafka_error)?;
        tracing::info!(
            partitions,
            "local reader assigned every partition of the publish log"
        );
        Ok(KafkaLocalReader {
            consumer,
            kafka: kafka.clone(),
            node_id: node_id.to_string(),
            positions: Positions {
                topic,
                expected,
                epochs: HashMap::new(),
                claimed_only: false,
                metrics: kafka.metrics.clone(),
            },
            live_from,
            open_qos2,
        })
    }

    /// Whether a partition holds records past the position this reader expects next.
    async fn behind(&self) -> bool {
        if !self.kafka.is_healthy() {
            return false;
        }
        self.positions.unread_partition(&self.kafka).await.is_some()
    }

    /// A new consumer at the positions this reader expects next (see `FETCH_STALL`).
    fn rebuild(&mut self) {
        tracing::warn!(
            "local reader: the consumer fetched nothing for {}s while records wait; rebuilding it",
            FETCH_STALL.as_secs()
        );
        let fresh = local_consumer(&self.kafka, &self.node_id).and_then(|consumer| {
            let mut assignment = TopicPartitionList::new();
            for (partition, next) in self.positions.next_offsets() {
                assignment
                    .add_partition_offset(&self.positions.topic, partition, Offset::Offset(next))
                    .map_err(kafka_error)?;
            }
            consumer.assign(&assignment).map_err(kafka_error)?;
            Ok(consumer)
        });
        self.kafka
            .metrics
            .kafka_consumer_rebuilds
            .with_label_values(&["local"])
            .inc();
        match fresh {
            Ok(consumer) => {
                super::close_in_background(std::mem::replace(&mut self.consumer, consumer))
            }
            Err(e) => {
                tracing::warn!(error = %e, "local reader: rebuilding the consumer failed; retrying later")
            }
        }
    }
}

/// `node_id` names the (never joined, never committed) consumer group, so that the consumer
/// shows up per node in Kafka's client lists.
fn local_consumer(kafka: &Kafka, node_id: &str) -> Result<StreamConsumer, StorageError> {
    Kafka::client_config(&kafka.config)
        .set(
            "group.id",
            format!("{}.local.{node_id}", kafka.config.topic_prefix),
        )
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", "20")
        .set("queued.max.messages.kbytes", QUEUED_KBYTES)
        .create()
        .map_err(kafka_error)
}

#[async_trait::async_trait]
impl LocalLogReader for KafkaLocalReader {
    async fn next(&mut self) -> Option<Vec<PartitionRecords>> {
        let mut out = Vec::new();
        let mut taken = 0;
        let waiting_since = tokio::time::Instant::now();
        let mut check = tokio::time::interval_at(waiting_since + STALL_CHECK, STALL_CHECK);
        let mut rebuilt = waiting_since;
        while out.is_empty() {
            tokio::select! {
                biased;
                received = self.consumer.recv() => {
                    match received {
                        Ok(message) => self.positions.take(&message, &mut out),
                        Err(e) => {
                            tracing::warn!(error = %e, "local reader: reading the publish log failed")
                        }
                    }
                    taken += 1;
                }
                _ = check.tick() => {
                    if rebuilt.elapsed() >= FETCH_STALL && self.behind().await {
                        self.rebuild();
                        rebuilt = tokio::time::Instant::now();
                    }
                }
            }
        }
        // Batching from what has arrived already, never from waiting.
        while taken < MAX_RECORDS {
            match self.consumer.recv().now_or_never() {
                Some(Ok(message)) => self.positions.take(&message, &mut out),
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "local reader: reading the publish log failed")
                }
                None => break,
            }
            taken += 1;
        }
        Some(out)
    }

    fn live_from(&self, partition: i32) -> i64 {
        // A partition added after start: everything in it is new.
        self.live_from.get(&partition).copied().unwrap_or(0)
    }

    fn open_qos2_flows(&mut self) -> HashMap<Arc<str>, HashSet<u16>> {
        std::mem::take(&mut self.open_qos2)
    }
}
