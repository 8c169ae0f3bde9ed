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
//! The consumer is assigned every partition explicitly (no group membership, so no rebalance
//! pauses); offsets are also committed to the `<prefix>.router` group, for lag tooling only. One
//! broker node owns a PostgreSQL schema at a time (the node lock), so one router consumes the log.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message as _;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::watch;

use super::fetch_start::{FetchStart, Step};
use super::{kafka_error, record, router_group, Kafka, PublishLog};
use crate::broker::Broker;
use crate::storage::postgres::PgStore;
use crate::storage::{ClientKind, StorageError, WriteBatch, WriteOp};

/// Records routed per batch at most (one storage transaction and one offset commit per batch).
const MAX_BATCH: usize = 1_024;
/// Backoff between attempts to store a batch while a backend is down.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// How long one seek may wait for librdkafka's own thread.
const SEEK_TIMEOUT: Duration = Duration::from_secs(5);

/// Creates the router's consumer, assigned to every partition of the publish log at the
/// positions stored in PostgreSQL (a little before them: see [`FetchStart`]). On the very first
/// start there are none: the router starts at the log's current end, recorded before any
/// listener opens, so every PUBLISH acknowledged afterwards lies after the router's starting
/// point. A partition added later starts at its beginning.
pub async fn consumer(
    kafka: &Arc<Kafka>,
    topic: &str,
    pg: &PgStore,
) -> Result<(StreamConsumer, HashMap<i32, FetchStart>), StorageError> {
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
                starts.insert(p, FetchStart::new(*position, low));
            }
            None => {
                // The log's end and its start are batch boundaries: nothing to look back for.
                let start = if first_start { high } else { low };
                init.push((p, start));
                stored.insert(p, start);
                starts.insert(p, FetchStart::confirmed_at(start));
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
            .add_partition_offset(topic, *p, Offset::Offset(start.from()))
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
    let Some(consumer) = log.take_router_consumer() else {
        tracing::error!("the router consumer was already taken; not routing");
        return;
    };
    let topic = log.topic().to_string();
    let slow_wait = Duration::from_millis(broker.config.limits.slow_subscriber_wait_ms);
    // The next offset each partition must deliver: a record below it was stored already (it is
    // skipped), a record above it means a fetch started too late (fetched again from earlier)
    // or, once reading in order, that the Kafka broker skipped some (logged loudly).
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
                    .or_insert_with(|| FetchStart::confirmed_at(offset));
                match state.step(offset) {
                    Step::Skip => continue,
                    Step::Take => {}
                    Step::Rewind(from) => {
                        tracing::info!(partition, want = state.want(), got = offset, from, "the publish log returned a later record than the one asked for; fetching again from earlier");
                        if !rewind(&consumer, &topic, partition, from, &mut shutdown).await {
                            return;
                        }
                        // What else this chunk holds for the partition came from the old fetch.
                        break;
                    }
                    Step::Gap { expected } => {
                        broker.metrics.storage_errors.inc();
                        tracing::error!(partition, expected, got = offset, "the publish log skipped offsets: the Kafka broker returned a later record than the one asked for, and the log holds nothing earlier");
                    }
                }
                next_offset = Some(offset + 1);
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
            if !store(&broker, batch, &mut shutdown).await {
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

/// Moves the fetch of `partition` to `from`, retrying until it works or the broker shuts down
/// (false). Records the old fetch had already returned are dropped by librdkafka.
async fn rewind(
    consumer: &StreamConsumer,
    topic: &str,
    partition: i32,
    from: i64,
    shutdown: &mut watch::Receiver<bool>,
) -> bool {
    let mut backoff = RETRY_MIN;
    loop {
        match consumer.seek(topic, partition, Offset::Offset(from), SEEK_TIMEOUT) {
            Ok(()) => return true,
            Err(e) => {
                tracing::warn!(partition, from, error = %e, "seeking the publish log failed; retrying");
                tokio::select! {
                    _ = shutdown.changed() => return false,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(RETRY_MAX);
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
        if let WriteOp::Enqueue {
            client,
            kind: ClientKind::Application,
            origin,
            ..
        } = &mut batch.ops[i]
        {
            if skip
                .get(client)
                .and_then(|origins| origins.get(&partition))
                .is_some_and(|o| offset <= *o)
            {
                batch.ops.remove(i);
                continue;
            }
            *origin = Some((partition, offset));
        }
        i += 1;
    }
}

/// Stores the batch, retrying until it succeeds or the broker shuts down (false).
async fn store(
    broker: &Arc<Broker>,
    batch: WriteBatch,
    shutdown: &mut watch::Receiver<bool>,
) -> bool {
    let mut backoff = RETRY_MIN;
    let mut failing = false;
    loop {
        let outcome = match broker.storage.submit(batch.clone()).await {
            Ok(result) => result,
            Err(_) => Err(StorageError::Closed),
        };
        match outcome {
            Ok(()) => {
                if failing {
                    tracing::info!("router stores again; resuming");
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
