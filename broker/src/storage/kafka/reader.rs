//! The dispatch side of the publish log: reads `<prefix>.msg.all` back for the dispatcher
//! (`router::dispatcher`), from the positions stored in PostgreSQL with its batches.
//!
//! **Positions.** The dispatcher's position in each partition is stored in PostgreSQL
//! (`router_offsets`) in the same transaction as the DEVICE queue and retained writes of the
//! batch (`WriteOp::RouterPosition`), so after a crash reading resumes exactly after what was
//! stored: DEVICE queues get every message once. Records are fetched from exactly that offset,
//! as Kafka's fetch contract allows; a record below it (the rest of a fetched record batch) is
//! skipped, and a record past it means records were deleted before they were read (retention
//! shorter than an outage): logged and counted in `ferrymq_kafka_log_gap_records_total`.
//!
//! The consumer is assigned every partition explicitly (no group membership, so no rebalance
//! pauses); offsets are also committed to the `<prefix>.router` group, for lag tooling only. One
//! broker node owns a PostgreSQL schema at a time (the node lock), so one reader consumes the
//! log.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use futures_util::FutureExt;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Message as _};
use rdkafka::{Offset, TopicPartitionList};

use super::position::{NextOffset, Step};
use super::{kafka_error, msg_all_topic, record, router_group, Kafka};
use crate::metrics::Metrics;
use crate::storage::log::{LogEntry, LogReader, LogRecord, PartitionRecords};
use crate::storage::postgres::PgStore;
use crate::storage::StorageError;

/// Records handed to the dispatcher per call at most (it stores one batch per partition).
const MAX_RECORDS: usize = 1_024;

/// The publish log read from the stored positions.
pub struct KafkaLogReader {
    consumer: StreamConsumer,
    positions: Positions,
    open_qos2: HashMap<Arc<str>, HashSet<u16>>,
}

/// Where each partition is, and what a fetched record becomes. Shared with the cluster's local
/// reader (`local.rs`).
pub(super) struct Positions {
    pub(super) topic: String,
    /// The next offset each partition must deliver.
    pub(super) expected: HashMap<i32, NextOffset>,
    pub(super) metrics: Arc<Metrics>,
}

impl KafkaLogReader {
    /// Creates the consumer, assigned to every partition of the publish log at the positions
    /// stored in PostgreSQL, and reads the dispatcher's stored QoS 2 flows.
    pub async fn open(kafka: &Arc<Kafka>, pg: &PgStore) -> Result<KafkaLogReader, StorageError> {
        let topic = msg_all_topic(&kafka.config.topic_prefix);
        let (consumer, expected) = consumer(kafka, &topic, pg).await?;
        Ok(KafkaLogReader {
            consumer,
            positions: Positions {
                topic,
                expected,
                metrics: kafka.metrics.clone(),
            },
            open_qos2: pg.router_qos2_flows().await?,
        })
    }
}

impl Positions {
    /// Adds one fetched record to `out`, unless it was stored already.
    pub(super) fn take(&mut self, message: &BorrowedMessage<'_>, out: &mut Vec<PartitionRecords>) {
        let (partition, offset) = (message.partition(), message.offset());
        let state = self
            .expected
            .entry(partition)
            .or_insert_with(|| NextOffset::new(offset));
        match state.step(offset) {
            Step::Skip => return,
            Step::Take => {}
            Step::Gap { expected, missing } => {
                self.metrics.kafka_log_gaps.add(missing as u64);
                tracing::error!(topic = self.topic, partition, expected, got = offset, missing, "publish log records were deleted before the router read them (retention.ms/retention.bytes of the topic too short for this outage); they are lost");
            }
        }
        let entry = self.entry(message);
        let record = LogRecord { offset, entry };
        match out.iter_mut().find(|p| p.partition == partition) {
            Some(p) => p.records.push(record),
            None => out.push(PartitionRecords {
                partition,
                records: vec![record],
            }),
        }
    }

    fn entry(&self, message: &BorrowedMessage<'_>) -> LogEntry {
        let (partition, offset) = (message.partition(), message.offset());
        match record::control(message.headers()) {
            Ok(None) => {}
            Ok(Some(control)) => return LogEntry::Control(control),
            Err(e) => {
                self.metrics.storage_errors.inc();
                tracing::error!(partition, offset, error = %e, "skipping unreadable publish log control record");
                return LogEntry::Unreadable;
            }
        }
        let qos2 = record::qos2_flow(message.headers());
        match record::decode(message.headers(), message.payload().unwrap_or_default()) {
            Ok(delivery) => LogEntry::Publish { delivery, qos2 },
            Err(e) => {
                self.metrics.storage_errors.inc();
                tracing::error!(partition, offset, error = %e, "skipping unreadable publish log record");
                LogEntry::Unreadable
            }
        }
    }
}

#[async_trait::async_trait]
impl LogReader for KafkaLogReader {
    async fn next(&mut self) -> Option<Vec<PartitionRecords>> {
        let mut out = Vec::new();
        let mut taken = 0;
        while out.is_empty() {
            match self.consumer.recv().await {
                Ok(message) => self.positions.take(&message, &mut out),
                Err(e) => tracing::warn!(error = %e, "reading the publish log failed"),
            }
            taken += 1;
        }
        // Whatever else has arrived already joins this call: batching from what is queued,
        // never from waiting.
        while taken < MAX_RECORDS {
            match self.consumer.recv().now_or_never() {
                Some(Ok(message)) => self.positions.take(&message, &mut out),
                Some(Err(e)) => tracing::warn!(error = %e, "reading the publish log failed"),
                None => break,
            }
            taken += 1;
        }
        Some(out)
    }

    fn routed(&mut self, partition: i32, next_offset: i64) {
        let mut commit = TopicPartitionList::new();
        if commit
            .add_partition_offset(
                &self.positions.topic,
                partition,
                Offset::Offset(next_offset),
            )
            .is_ok()
        {
            let _ = self.consumer.commit(&commit, CommitMode::Async);
        }
    }

    fn open_qos2_flows(&mut self) -> HashMap<Arc<str>, HashSet<u16>> {
        std::mem::take(&mut self.open_qos2)
    }
}

/// Creates the router's consumer, assigned to every partition of the publish log at the
/// positions stored in PostgreSQL. On the very first
/// start there are none: the router starts at the log's current end, recorded before any
/// listener opens, so every PUBLISH acknowledged afterwards lies after the router's starting
/// point. A partition added later starts at its beginning.
async fn consumer(
    kafka: &Arc<Kafka>,
    topic: &str,
    pg: &PgStore,
) -> Result<(StreamConsumer, HashMap<i32, NextOffset>), StorageError> {
    let group = router_group(&kafka.config.topic_prefix);
    let consumer: StreamConsumer = Kafka::client_config(&kafka.config)
        .set("group.id", &group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", "50")
        .create()
        .map_err(kafka_error)?;
    let partitions = kafka
        .partitions(topic)
        .await?
        .ok_or_else(|| StorageError::MissingTopic(topic.to_string()))?;
    let mut stored = pg.router_positions().await?;
    let first_start = stored.is_empty();
    let mut init = Vec::new();
    let mut starts = HashMap::new();
    for p in 0..partitions as i32 {
        let (low, high) = kafka.watermarks(topic, p).await?;
        match stored.get(&p) {
            Some(position) => {
                starts.insert(p, NextOffset::new(*position));
            }
            None => {
                let start = if first_start { high } else { low };
                init.push((p, start));
                stored.insert(p, start);
                starts.insert(p, NextOffset::new(start));
            }
        }
    }
    if !init.is_empty() {
        pg.init_router_positions(&init).await?;
        tracing::info!(
            partitions = init.len(),
            first_start,
            "router positions initialised"
        );
    }
    let mut assignment = TopicPartitionList::new();
    for (p, start) in &starts {
        assignment
            .add_partition_offset(topic, *p, Offset::Offset(start.get()))
            .map_err(kafka_error)?;
    }
    consumer.assign(&assignment).map_err(kafka_error)?;
    let mut positions: Vec<(i32, i64)> = stored.iter().map(|(p, o)| (*p, *o)).collect();
    positions.sort_unstable();
    tracing::info!(
        ?positions,
        "router resumes the publish log at the stored positions"
    );
    Ok((consumer, starts))
}
