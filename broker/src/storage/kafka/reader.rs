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
//! **Claims.** Before it reads a partition the reader claims it in PostgreSQL
//! (`PgStore::claim_partition`: its epoch goes up by one, and this node is recorded as owner)
//! and reads from the position stored with that claim. Every batch carries the epoch its records
//! were read under and is refused (`StorageError::Fenced`) once the partition was claimed again,
//! so a node that lost a partition, however late it notices, stores nothing more for it.
//!
//! **Who reads what.** With `cluster.enabled = false` the consumer is assigned every partition
//! explicitly (no group membership, so no rebalance pauses) and claims them all at start, which
//! also fences a stale node after a standby took over; offsets are committed to the
//! `<prefix>.router` group for lag tooling only. With `cluster.enabled = true` the consumer joins
//! the group `<prefix>.router` and reads what the group assigns it. The assignment strategy is
//! eager (`range`): every rebalance revokes everything and assigns afresh, so each assigned
//! partition is claimed again and re-read from the stored position — the reader's whole state
//! is rebuilt from PostgreSQL at each rebalance and no partition is read under two claims. With a
//! few dozen partitions a claim is a few milliseconds; cooperative-sticky would move fewer
//! partitions, at the price of a second code path for incremental changes. Revoked partitions
//! are forgotten at once: records of them still buffered (in the consumer or in the call being
//! assembled) are dropped, not routed.
//!
//! Rebalance callbacks run inside the consumer's poll and must not block, so they only queue
//! the change; [`LogReader::next`] applies it (claims, seeks) before it takes another record.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::{BorrowedMessage, Message as _};
use rdkafka::{Offset, TopicPartitionList};

use super::position::{NextOffset, Step};
use super::{kafka_error, msg_all_topic, record, router_group, Kafka};
use crate::config::ClusterConfig;
use crate::metrics::Metrics;
use crate::storage::log::{LogEntry, LogReader, LogRecord, PartitionChange, PartitionRecords};
use crate::storage::postgres::PgStore;
use crate::storage::StorageError;

/// Records handed to the dispatcher per call at most (it stores one batch per partition).
const MAX_RECORDS: usize = 1_024;
/// How long a seek to a claimed partition's position may take.
const SEEK_TIMEOUT: Duration = Duration::from_secs(5);
/// Backoff while a claim cannot be stored (PostgreSQL down during a rebalance).
const CLAIM_RETRY: Duration = Duration::from_millis(500);
/// How often a waiting reader checks that its consumer still works (see [`Watchdog`]).
const STALL_CHECK: Duration = Duration::from_secs(5);
/// How long a consumer may fetch nothing while its claimed partitions hold unread records.
const FETCH_STALL: Duration = Duration::from_secs(15);
/// How long a group member may wait for an assignment after a revocation (a rebalance takes
/// a few seconds; a dead member is dropped after the 10 s session timeout).
const JOIN_STALL: Duration = Duration::from_secs(40);

/// The publish log read from the stored positions.
pub struct KafkaLogReader {
    consumer: StreamConsumer<GroupEvents>,
    claims: Claims,
    cluster: bool,
    watchdog: Watchdog,
}

/// Notices a consumer that stopped working and has it rebuilt. librdkafka consumers have been
/// seen (e2e `cluster_fence`, a Kafka broker frozen for 10 s and thawed) to stay out of their
/// group for good after the coordinator came back, or to fetch nothing more for assigned
/// partitions; the router must not wait for a restart of the process. A new consumer joins
/// the group afresh, and every partition is claimed again from its stored position.
struct Watchdog {
    /// When the current wait for a record began.
    waiting_since: tokio::time::Instant,
    /// Set while the group owes this member an assignment (after a revocation).
    unassigned_since: Option<tokio::time::Instant>,
}

impl Watchdog {
    fn new() -> Watchdog {
        Watchdog {
            waiting_since: tokio::time::Instant::now(),
            unassigned_since: None,
        }
    }
}

/// The partitions this reader claimed, and how it claims more.
struct Claims {
    positions: Positions,
    pg: Arc<PgStore>,
    kafka: Arc<Kafka>,
    node: String,
    /// Partitions that had a stored position when the reader opened; a claim of any other
    /// starts at the partition's beginning (a partition added later).
    known: HashSet<i32>,
    /// Claims and releases not yet taken by the dispatcher.
    changes: Vec<PartitionChange>,
    /// Counts the group assignments this reader claimed (shared with the storage, which reads
    /// the APPLICATION logs' ends again after one: `kafka_postgres.rs`).
    claimed: Arc<std::sync::atomic::AtomicU64>,
}

/// Where each partition is, and what a fetched record becomes. Shared with the cluster's local
/// reader (`local.rs`).
pub(super) struct Positions {
    pub(super) topic: String,
    /// The next offset each partition must deliver.
    pub(super) expected: HashMap<i32, NextOffset>,
    /// The epoch of each claimed partition.
    pub(super) epochs: HashMap<i32, i64>,
    /// `true` (the dispatcher): a record of a partition not claimed here is dropped. `false`
    /// (the local reader, which reads every partition without claims): a partition seen for
    /// the first time starts at its first record, with epoch 0.
    pub(super) claimed_only: bool,
    pub(super) metrics: Arc<Metrics>,
}

/// A rebalance, queued by the consumer's callbacks for [`LogReader::next`].
#[derive(Debug)]
enum GroupEvent {
    Assigned(Vec<i32>),
    Revoked(Vec<i32>),
}

/// The consumer's context: queues rebalances (the callbacks run inside the poll and must not
/// wait for PostgreSQL).
#[derive(Default)]
struct GroupEvents {
    queue: parking_lot::Mutex<Vec<GroupEvent>>,
    /// Wakes [`LogReader::next`]: the consumer handles a rebalance inside `recv` and goes on
    /// waiting for a record, which may not come for a long time.
    queued: tokio::sync::Notify,
}

impl GroupEvents {
    fn push(&self, event: GroupEvent) {
        self.queue.lock().push(event);
        self.queued.notify_one();
    }
}

impl ClientContext for GroupEvents {}

impl ConsumerContext for GroupEvents {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            self.push(GroupEvent::Revoked(partitions_of(tpl)));
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => self.push(GroupEvent::Assigned(partitions_of(tpl))),
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => tracing::error!(error = %e, "publish log rebalance failed"),
        }
    }
}

fn partitions_of(tpl: &TopicPartitionList) -> Vec<i32> {
    tpl.elements().iter().map(|e| e.partition()).collect()
}

impl KafkaLogReader {
    /// Creates the consumer. With `cluster.enabled = false` it is assigned every partition of
    /// the publish log, each claimed at the position stored in PostgreSQL; with `true` it
    /// subscribes to the router group and claims what the group assigns it.
    pub async fn open(
        kafka: &Arc<Kafka>,
        pg: &Arc<PgStore>,
        cluster: &ClusterConfig,
        claimed: Arc<std::sync::atomic::AtomicU64>,
    ) -> Result<KafkaLogReader, StorageError> {
        let topic = msg_all_topic(&kafka.config.topic_prefix);
        let consumer = consumer(kafka, cluster.enabled)?;
        let known = init_positions(kafka, &topic, pg).await?;
        let mut reader = KafkaLogReader {
            consumer,
            claims: Claims {
                positions: Positions {
                    topic: topic.clone(),
                    expected: HashMap::new(),
                    epochs: HashMap::new(),
                    claimed_only: true,
                    metrics: kafka.metrics.clone(),
                },
                pg: pg.clone(),
                kafka: kafka.clone(),
                node: cluster.node_id(),
                known: known.clone(),
                changes: Vec::new(),
                claimed,
            },
            cluster: cluster.enabled,
            watchdog: Watchdog::new(),
        };
        reader.start().await?;
        Ok(reader)
    }

    /// Joins the group (cluster) or claims and assigns every partition (single node).
    async fn start(&mut self) -> Result<(), StorageError> {
        let topic = self.claims.positions.topic.clone();
        if self.cluster {
            self.consumer.subscribe(&[&topic]).map_err(kafka_error)?;
            self.watchdog.unassigned_since = Some(tokio::time::Instant::now());
            tracing::info!(
                group = router_group(&self.claims.kafka.config.topic_prefix),
                node = self.claims.node,
                "router joins the publish log's consumer group"
            );
            return Ok(());
        }
        let mut all: Vec<i32> = self.claims.known.iter().copied().collect();
        all.sort_unstable();
        let mut assignment = TopicPartitionList::new();
        for p in all {
            let (epoch, start) = self.claims.claim(p).await?;
            assignment
                .add_partition_offset(&topic, p, Offset::Offset(start))
                .map_err(kafka_error)?;
            tracing::debug!(partition = p, epoch, start, "publish log partition claimed");
        }
        self.consumer.assign(&assignment).map_err(kafka_error)?;
        let positions = self.claims.positions.next_offsets();
        tracing::info!(
            ?positions,
            "router resumes the publish log at the stored positions"
        );
        Ok(())
    }

    /// Whether the consumer stopped working (see [`Watchdog`]): out of its group for
    /// [`JOIN_STALL`], or nothing fetched for [`FETCH_STALL`] while a claimed partition holds
    /// records past its position. Never while Kafka is unreachable: a new consumer could do no
    /// better.
    async fn stalled(&self) -> bool {
        if !self.claims.kafka.is_healthy() {
            return false;
        }
        if let Some(since) = self.watchdog.unassigned_since {
            if since.elapsed() >= JOIN_STALL {
                tracing::warn!(
                    waited_secs = since.elapsed().as_secs(),
                    "the router's consumer got no assignment from its group since a rebalance"
                );
                return true;
            }
        }
        if self.watchdog.waiting_since.elapsed() < FETCH_STALL {
            return false;
        }
        match self
            .claims
            .positions
            .unread_partition(&self.claims.kafka)
            .await
        {
            Some((partition, expected, high)) => {
                tracing::warn!(
                    partition,
                    expected,
                    high,
                    "the router's consumer fetched nothing while a claimed partition holds unread records"
                );
                true
            }
            None => false,
        }
    }

    /// Replaces the consumer: every claimed partition is released, and the new consumer joins
    /// the group (or claims them all again) as at start.
    async fn rebuild(&mut self, out: &mut Vec<PartitionRecords>) {
        tracing::warn!(
            node = self.claims.node,
            "rebuilding the router's publish log consumer"
        );
        let fresh = match consumer(&self.claims.kafka, self.cluster) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "creating a new publish log consumer failed; retrying later");
                return;
            }
        };
        self.claims
            .kafka
            .metrics
            .kafka_consumer_rebuilds
            .with_label_values(&["router"])
            .inc();
        let claimed: Vec<i32> = self.claims.positions.epochs.keys().copied().collect();
        for partition in claimed {
            self.claims.release(partition, out);
        }
        super::close_in_background(std::mem::replace(&mut self.consumer, fresh));
        self.watchdog = Watchdog::new();
        while let Err(e) = self.start().await {
            tracing::warn!(error = %e, "starting the new publish log consumer failed; retrying");
            tokio::time::sleep(CLAIM_RETRY).await;
        }
    }
}

/// Applies the rebalances `consumer` queued, and notes them for the [`Watchdog`]. (Fields, not
/// the reader: the record just received still borrows the consumer.)
async fn apply_group_events(
    consumer: &StreamConsumer<GroupEvents>,
    claims: &mut Claims,
    watchdog: &mut Watchdog,
    out: &mut Vec<PartitionRecords>,
) {
    let events = std::mem::take(&mut *consumer.context().queue.lock());
    for event in events {
        match event {
            GroupEvent::Revoked(partitions) => {
                watchdog.unassigned_since = Some(tokio::time::Instant::now());
                claims.release_all(&partitions, out);
            }
            GroupEvent::Assigned(partitions) => {
                watchdog.unassigned_since = None;
                claims.claim_all(consumer, &partitions).await;
            }
        }
    }
}

impl Claims {
    /// Claims `partition` in PostgreSQL and starts reading it at the stored position (the
    /// caller seeks or assigns there); queues its stored QoS 2 flows for the dispatcher.
    async fn claim(&mut self, partition: i32) -> Result<(i64, i64), StorageError> {
        let start = if self.known.contains(&partition) {
            0
        } else {
            self.kafka
                .watermarks(&self.positions.topic, partition)
                .await?
                .0
        };
        let (epoch, next) = self
            .pg
            .claim_partition(partition, &self.node, start)
            .await?;
        let flows = self.pg.router_qos2_flows_of(&[partition]).await?;
        self.known.insert(partition);
        self.positions
            .expected
            .insert(partition, NextOffset::new(next));
        self.positions.epochs.insert(partition, epoch);
        self.changes
            .push(PartitionChange::Claimed { partition, flows });
        Ok((epoch, next))
    }

    /// Forgets `partition`: nothing more of it is routed here until it is claimed again.
    fn release(&mut self, partition: i32, out: &mut Vec<PartitionRecords>) {
        self.positions.expected.remove(&partition);
        self.positions.epochs.remove(&partition);
        out.retain(|p| p.partition != partition);
        self.changes.push(PartitionChange::Released { partition });
    }

    /// A revocation by the group.
    fn release_all(&mut self, partitions: &[i32], out: &mut Vec<PartitionRecords>) {
        for p in partitions {
            self.release(*p, out);
        }
        tracing::info!(?partitions, "publish log partitions revoked");
    }

    /// An assignment by the group. A claim that cannot be stored (PostgreSQL down) is
    /// retried: the partition is this node's to route.
    async fn claim_all(&mut self, consumer: &StreamConsumer<GroupEvents>, partitions: &[i32]) {
        for p in partitions {
            self.claim_and_seek(consumer, *p).await;
        }
        self.claimed
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        tracing::info!(
            ?partitions,
            node = self.node,
            "publish log partitions claimed"
        );
    }

    async fn claim_and_seek(&mut self, consumer: &StreamConsumer<GroupEvents>, partition: i32) {
        let start = loop {
            match self.claim(partition).await {
                Ok((_, start)) => break start,
                Err(e) => {
                    tracing::warn!(partition, error = %e, "claiming a publish log partition failed; retrying");
                    tokio::time::sleep(CLAIM_RETRY).await;
                }
            }
        };
        // Fetching starts at the group's committed offset, which never passes the stored
        // position (it is committed after the batch is stored), so what lies before the
        // stored position is skipped even when the seek fails; the seek saves re-reading it.
        if let Err(e) = consumer.seek(
            &self.positions.topic,
            partition,
            Offset::Offset(start),
            SEEK_TIMEOUT,
        ) {
            tracing::warn!(partition, start, error = %e, "seeking a claimed partition failed; reading on from the committed offset");
        }
    }
}

impl Positions {
    /// The next offset of every partition, in partition order.
    pub(super) fn next_offsets(&self) -> Vec<(i32, i64)> {
        let mut positions: Vec<(i32, i64)> =
            self.expected.iter().map(|(p, o)| (*p, o.get())).collect();
        positions.sort_unstable();
        positions
    }

    /// A partition whose log holds records past the offset expected next, as (partition,
    /// expected, high watermark): a consumer that fetches nothing meanwhile has stalled.
    pub(super) async fn unread_partition(&self, kafka: &Kafka) -> Option<(i32, i64, i64)> {
        for (partition, expected) in self.next_offsets() {
            if let Ok((_, high)) = kafka.watermarks(&self.topic, partition).await {
                if high > expected {
                    return Some((partition, expected, high));
                }
            }
        }
        None
    }

    /// Adds one fetched record to `out`, unless it was stored already or (with
    /// `claimed_only`) its partition is not claimed here.
    pub(super) fn take(&mut self, message: &BorrowedMessage<'_>, out: &mut Vec<PartitionRecords>) {
        let (partition, offset) = (message.partition(), message.offset());
        if !self.claimed_only {
            self.expected
                .entry(partition)
                .or_insert_with(|| NextOffset::new(offset));
            self.epochs.entry(partition).or_insert(0);
        }
        let (Some(state), Some(&epoch)) = (
            self.expected.get_mut(&partition),
            self.epochs.get(&partition),
        ) else {
            tracing::trace!(
                partition,
                offset,
                "dropping a record of a partition not claimed here"
            );
            return;
        };
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
                epoch,
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
        self.watchdog.waiting_since = tokio::time::Instant::now();
        let mut check =
            tokio::time::interval_at(tokio::time::Instant::now() + STALL_CHECK, STALL_CHECK);
        while out.is_empty() {
            tokio::select! {
                biased;
                received = self.consumer.recv() => {
                    // A rebalance runs inside recv: apply it before the record it returned.
                    apply_group_events(&self.consumer, &mut self.claims, &mut self.watchdog, &mut out).await;
                    match received {
                        Ok(message) => self.claims.positions.take(&message, &mut out),
                        Err(e) => tracing::warn!(error = %e, "reading the publish log failed"),
                    }
                    taken += 1;
                }
                _ = self.consumer.context().queued.notified() => {
                    apply_group_events(&self.consumer, &mut self.claims, &mut self.watchdog, &mut out).await;
                }
                _ = check.tick() => {
                    if self.stalled().await {
                        self.rebuild(&mut out).await;
                    }
                }
            }
        }
        // Whatever else has arrived already joins this call: batching from what is queued,
        // never from waiting.
        while taken < MAX_RECORDS {
            let received = self.consumer.recv().now_or_never();
            apply_group_events(
                &self.consumer,
                &mut self.claims,
                &mut self.watchdog,
                &mut out,
            )
            .await;
            match received {
                Some(Ok(message)) => self.claims.positions.take(&message, &mut out),
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
                &self.claims.positions.topic,
                partition,
                Offset::Offset(next_offset),
            )
            .is_ok()
        {
            let _ = self.consumer.commit(&commit, CommitMode::Async);
        }
    }

    fn take_changes(&mut self) -> Vec<PartitionChange> {
        std::mem::take(&mut self.claims.changes)
    }

    fn fenced(&mut self, partition: i32, epoch: i64) {
        if self.claims.positions.epochs.get(&partition) == Some(&epoch) {
            tracing::warn!(
                partition,
                epoch,
                "publish log partition was claimed by another node; no longer routing it here"
            );
            let mut none = Vec::new();
            self.claims.release(partition, &mut none);
        }
    }
}

/// The router's consumer: in the `<prefix>.router` group (its members share the partitions in
/// cluster mode; otherwise it only receives the lag-tooling commits).
fn consumer(
    kafka: &Arc<Kafka>,
    cluster: bool,
) -> Result<StreamConsumer<GroupEvents>, StorageError> {
    let group = router_group(&kafka.config.topic_prefix);
    let mut config = Kafka::client_config(&kafka.config);
    config
        .set("group.id", &group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", "50");
    if cluster {
        // Eager (see the module docs); a dead node's partitions move after the session
        // timeout, so keep it short (the broker's default minimum is 6 s).
        config
            .set("partition.assignment.strategy", "range")
            .set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "1000");
    }
    config
        .create_with_context(GroupEvents::default())
        .map_err(kafka_error)
}

/// Records a starting position for every partition that has none, before anything claims
/// one, and returns the partitions. On the very first start there are none: the router starts
/// at the log's current end, recorded before any listener opens, so every PUBLISH acknowledged
/// afterwards lies after the router's starting point. A partition added later starts at its
/// beginning. Several nodes may do this at once: existing rows are kept.
async fn init_positions(
    kafka: &Arc<Kafka>,
    topic: &str,
    pg: &PgStore,
) -> Result<HashSet<i32>, StorageError> {
    let partitions = kafka
        .partitions(topic)
        .await?
        .ok_or_else(|| StorageError::MissingTopic(topic.to_string()))?;
    let stored = pg.router_positions().await?;
    let first_start = stored.is_empty();
    let mut init = Vec::new();
    for p in 0..partitions as i32 {
        if !stored.contains_key(&p) {
            let (low, high) = kafka.watermarks(topic, p).await?;
            init.push((p, if first_start { high } else { low }));
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
    Ok((0..partitions as i32).collect())
}
