//! The router side of the publish log: consumes `<prefix>.msg.all` and does what the publishing
//! connection does on embedded storage — match subscriptions, hand deliveries to connected
//! clean-session subscribers, and store them for persistent ones (DEVICE queues in PostgreSQL,
//! APPLICATION logs in their Kafka topics).
//!
//! **Positions.** The router's position in each partition is stored in PostgreSQL
//! (`router_offsets`) in the same transaction as the DEVICE queue and retained writes of the
//! batch, so after a crash it resumes exactly after what was stored: DEVICE queues get every
//! message once. APPLICATION appends go to Kafka before that transaction; each carries its origin
//! (partition, offset) in a header, and at start the router reads the last record of every
//! APPLICATION topic and skips appends up to that origin again (batches hold one partition, and
//! one client's appends are in order, so the last record says exactly what made it).
//!
//! **Failures.** When a write fails (PostgreSQL or Kafka down) the same writes are retried, with
//! backoff, until they succeed: the router stops moving, the publish log keeps the messages,
//! nothing acknowledged is lost.
//!
//! **QoS 2.** The PUBLISH append and the publisher's stored packet id are writes to two systems;
//! a crash between them makes the publisher resend (DUP set) a message that is already in the
//! log. QoS 2 records of persistent sessions carry their packet id, and the router remembers
//! the packet ids it routed (`router_qos2_flows`, in the batch transaction) until the
//! publisher's PUBREL (a `release` control record) or a new session (`reset`) frees them: a
//! DUP record for a packet id still open is such a copy and is dropped. A record without DUP
//! is always new (a publisher only sets DUP on a resend).
//!
//! The consumer is assigned every partition explicitly (no group membership, so no rebalance
//! pauses); offsets are also committed to the `<prefix>.router` group, for lag tooling only. One
//! broker node owns a PostgreSQL schema at a time (the node lock), so one router consumes the log.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message as _;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::watch;

use super::position::{NextOffset, Step};
use super::record::Control;
use super::{kafka_error, record, router_group, Kafka, PublishLog};
use crate::broker::Broker;
use crate::storage::postgres::PgStore;
use crate::storage::{ClientKind, Qos2FlowChange, StorageError, WriteBatch, WriteOp};

/// Records routed per batch at most (one storage transaction and one offset commit per batch).
const MAX_BATCH: usize = 1_024;
/// Backoff between attempts to store a batch while a backend is down.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Creates the router's consumer, assigned to every partition of the publish log at the
/// positions stored in PostgreSQL. On the very first
/// start there are none: the router starts at the log's current end, recorded before any
/// listener opens, so every PUBLISH acknowledged afterwards lies after the router's starting
/// point. A partition added later starts at its beginning.
pub async fn consumer(
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

/// Runs the router until shutdown.
pub async fn run(broker: Arc<Broker>, log: Arc<PublishLog>, mut shutdown: watch::Receiver<bool>) {
    let (Some(consumer), Some(mut flows)) = (log.take_router_consumer(), log.take_qos2_flows())
    else {
        tracing::error!("the router consumer was already taken; not routing");
        return;
    };
    let topic = log.topic().to_string();
    let slow_wait = Duration::from_millis(broker.config.limits.slow_subscriber_wait_ms);
    // The next offset each partition must deliver: a record below it was stored already (it is
    // skipped), a record above it means records were deleted before the router got to them
    // (retention shorter than an outage of the router: logged and counted).
    let mut expected = log.start_positions();
    let mut stream = consumer.stream().ready_chunks(MAX_BATCH);
    loop {
        let chunk = tokio::select! {
            _ = shutdown.changed() => return,
            chunk = stream.next() => match chunk {
                Some(chunk) => chunk,
                None => return,
            },
        };
        // One batch per partition: a replay after a crash then redoes at most one partition's
        // batch, which is what makes APPLICATION appends recognisable (see `PublishLog::skip`).
        let mut by_partition: Vec<(i32, Vec<_>)> = Vec::new();
        for next in chunk {
            let message = match next {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "reading the publish log failed");
                    continue;
                }
            };
            let p = message.partition();
            match by_partition.iter_mut().find(|(q, _)| *q == p) {
                Some((_, list)) => list.push(message),
                None => by_partition.push((p, vec![message])),
            }
        }
        for (partition, messages) in by_partition {
            let mut batch = WriteBatch::default();
            let mut blocked = std::collections::VecDeque::new();
            let mut next_offset = None;
            for message in messages {
                let offset = message.offset();
                let state = expected
                    .entry(partition)
                    .or_insert_with(|| NextOffset::new(offset));
                match state.step(offset) {
                    Step::Skip => continue,
                    Step::Take => {}
                    Step::Gap { expected, missing } => {
                        broker.metrics.kafka_log_gaps.add(missing as u64);
                        tracing::error!(topic, partition, expected, got = offset, missing, "publish log records were deleted before the router read them (retention.ms/retention.bytes of the topic too short for this outage); they are lost");
                    }
                }
                next_offset = Some(offset + 1);
                match record::control(message.headers()) {
                    Ok(None) => {}
                    Ok(Some(control)) => {
                        flows.apply(&control, &mut batch);
                        continue;
                    }
                    Err(e) => {
                        broker.metrics.storage_errors.inc();
                        tracing::error!(partition, offset, error = %e, "skipping unreadable publish log control record");
                        continue;
                    }
                }
                let qos2 = record::qos2_flow(message.headers());
                let delivery = match record::decode(
                    message.headers(),
                    message.payload().unwrap_or_default(),
                ) {
                    Ok(d) => d,
                    Err(e) => {
                        broker.metrics.storage_errors.inc();
                        tracing::error!(partition, offset, error = %e, "skipping unreadable publish log record");
                        continue;
                    }
                };
                if let Some((pkid, dup)) = qos2 {
                    if !flows.route(&delivery.message.publisher, pkid, dup, &mut batch) {
                        tracing::debug!(partition, offset, publisher = %delivery.message.publisher, pkid, "dropping a resent QoS 2 message the router already routed");
                        continue;
                    }
                }
                let message = Arc::new(delivery.message);
                let first_op = batch.ops.len();
                if message.retain {
                    broker.router.retain(&message, &mut batch);
                }
                let routed = broker.router.publish(&message, &mut batch);
                if routed.matched == 0 {
                    broker.metrics.messages_dropped_no_subscribers.inc();
                }
                blocked.extend(routed.full);
                stamp_origin(&log, &mut batch, first_op, partition, offset);
            }
            let Some(next_offset) = next_offset else {
                // Nothing of this partition was routed: its position stays where it is.
                continue;
            };
            if !blocked.is_empty() {
                // Connected subscribers with a full queue get the same grace as on embedded
                // storage; what still does not fit is dropped and counted.
                let deadline = tokio::time::Instant::now() + slow_wait;
                let dropped = crate::connection::place_blocked(&mut blocked, deadline).await;
                if dropped > 0 {
                    broker.metrics.messages_dropped_queue_full.add(dropped);
                }
            }
            batch.push(WriteOp::RouterPosition {
                partition,
                next_offset,
            });
            if !store(&broker, &log, batch, &mut shutdown).await {
                return;
            }
            // For lag tooling only (kafka-consumer-groups): the position that counts is the one
            // stored with the batch.
            let mut commit = TopicPartitionList::new();
            if commit
                .add_partition_offset(&topic, partition, Offset::Offset(next_offset))
                .is_ok()
            {
                let _ = consumer.commit(&commit, CommitMode::Async);
            }
        }
    }
}

/// The QoS 2 packet ids the router routed a message for and has not seen released, per
/// publisher (see the module docs). Bounded by 65,535 per publisher client id; a new session
/// of the publisher clears its entries.
pub struct Qos2Flows {
    open: HashMap<Arc<str>, HashSet<u16>>,
}

impl Qos2Flows {
    pub fn new(open: HashMap<Arc<str>, HashSet<u16>>) -> Qos2Flows {
        Qos2Flows { open }
    }

    /// Whether to route a QoS 2 message with this packet id and DUP flag; records the flow as
    /// open (in `batch`) when it is routed.
    fn route(
        &mut self,
        publisher: &Arc<str>,
        pkid: u16,
        dup: bool,
        batch: &mut WriteBatch,
    ) -> bool {
        let ids = self.open.entry(publisher.clone()).or_default();
        if ids.contains(&pkid) {
            // Open already: a DUP is the copy of what was routed; without DUP the publisher
            // says it is new (the release must have been lost with a crash), and it stays open.
            return !dup;
        }
        ids.insert(pkid);
        batch.push(WriteOp::RouterQos2 {
            client: publisher.clone(),
            change: Qos2FlowChange::Open(pkid),
        });
        true
    }

    fn apply(&mut self, control: &Control, batch: &mut WriteBatch) {
        match control {
            Control::Release { publisher, pkid } => {
                let Some(ids) = self.open.get_mut(publisher) else {
                    return;
                };
                if ids.remove(pkid) {
                    if ids.is_empty() {
                        self.open.remove(publisher);
                    }
                    batch.push(WriteOp::RouterQos2 {
                        client: publisher.clone(),
                        change: Qos2FlowChange::Release(*pkid),
                    });
                }
            }
            Control::Reset { publisher } => {
                if self.open.remove(publisher).is_some() {
                    batch.push(WriteOp::RouterQos2 {
                        client: publisher.clone(),
                        change: Qos2FlowChange::Reset,
                    });
                }
            }
        }
    }
}

/// Marks the APPLICATION appends made for the record at (`partition`, `offset`) with their
/// origin, and drops those a crashed predecessor already made (see `PublishLog::skip`).
fn stamp_origin(
    log: &PublishLog,
    batch: &mut WriteBatch,
    from: usize,
    partition: i32,
    offset: i64,
) {
    let skip = log.skip.lock();
    let mut i = from;
    while i < batch.ops.len() {
        // Group topics are checked where their partition is known (`shared::append`).
        if let WriteOp::AppendShared { origin, .. } = &mut batch.ops[i] {
            *origin = Some((partition, offset));
            i += 1;
            continue;
        }
        if let WriteOp::Enqueue {
            client,
            kind: ClientKind::Application,
            origin,
            ..
        } = &mut batch.ops[i]
        {
            if super::already_appended(skip.get(client), partition, offset) {
                batch.ops.remove(i);
                continue;
            }
            *origin = Some((partition, offset));
        }
        i += 1;
    }
}

/// Reads the end of the APPLICATION logs `batch` appends to, raises `log.skip` to the origins
/// found there and drops the batch's appends at or below them. `false` when a log's end could
/// not be read (Kafka unreachable).
async fn drop_appended(
    log: &PublishLog,
    batch: &mut WriteBatch,
    wake: &mut Vec<Arc<tokio::sync::Notify>>,
) -> bool {
    let clients: HashSet<Arc<str>> = batch
        .ops
        .iter()
        .filter_map(|op| match op {
            WriteOp::Enqueue {
                client,
                kind: ClientKind::Application,
                origin: Some(_),
                ..
            } => Some(client.clone()),
            _ => None,
        })
        .collect();
    for client in clients {
        let topic = super::application_topic(&log.kafka.config.topic_prefix, &client);
        if log.kafka.watermarks(&topic, 0).await.is_err() {
            return false;
        }
        let mut found = super::Origins::new();
        let scanned = super::app::scan_tail(&log.kafka, &topic, 0, |headers| {
            if let Some((p, o)) = record::origin(headers) {
                super::note_origin(&mut found, p, o);
            }
        })
        .await;
        if scanned.is_err() {
            return false;
        }
        let mut skip = log.skip.lock();
        let known = skip.entry(client).or_default();
        for (p, o) in found {
            super::note_origin(known, p, o);
        }
    }
    let skip = log.skip.lock();
    batch.ops.retain_mut(|op| match op {
        WriteOp::Enqueue {
            client,
            kind: ClientKind::Application,
            origin: Some((p, o)),
            notify,
            ..
        } => {
            let appended = super::already_appended(skip.get(client), *p, *o);
            if appended {
                wake.extend(notify.take());
            }
            !appended
        }
        _ => true,
    });
    true
}

/// Stores the batch, retrying until it succeeds or the broker shuts down (false).
async fn store(
    broker: &Arc<Broker>,
    log: &PublishLog,
    mut batch: WriteBatch,
    shutdown: &mut watch::Receiver<bool>,
) -> bool {
    let mut backoff = RETRY_MIN;
    let mut failing = false;
    // Online readers of appends dropped below: woken once the rest is stored.
    let mut wake = Vec::new();
    loop {
        // A failed attempt may have appended part of the batch to APPLICATION logs all the
        // same: a produce request that timed out has an unknown outcome. Before a retry, learn
        // from the logs' ends what made it, so the retry does not append it twice. While Kafka
        // cannot say, wait: a retry then would fail anyway, or duplicate.
        if failing && !drop_appended(log, &mut batch, &mut wake).await {
            tokio::select! {
                _ = shutdown.changed() => return false,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(RETRY_MAX);
            continue;
        }
        let outcome = match broker.storage.submit(batch.clone()).await {
            Ok(result) => result,
            Err(_) => Err(StorageError::Closed),
        };
        match outcome {
            Ok(()) => {
                if failing {
                    tracing::info!("router stores again; resuming");
                }
                for n in wake {
                    n.notify_one();
                }
                return true;
            }
            Err(e) => {
                broker.metrics.storage_errors.inc();
                if !failing {
                    tracing::error!(error = %e, "router cannot store a batch; retrying until storage is back (the publish log keeps the messages)");
                    failing = true;
                }
                tokio::select! {
                    _ = shutdown.changed() => return false,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(RETRY_MAX);
            }
        }
    }
}
