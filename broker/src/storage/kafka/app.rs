//! APPLICATION logs in Kafka: one single-partition topic per client (one partition, so the log
//! is totally ordered), appended to by the router, read by the client's session.
//!
//! Sequence numbers are Kafka offsets plus one (sequence 0 means "none" elsewhere). Reading is
//! asynchronous: each online APPLICATION client has a reader (a consumer assigned to its
//! partition, no consumer-group membership, so no rebalances) that the session asks for the next
//! entries; the reader answers through a channel, never blocking a connection task. The
//! committed offset lives in PostgreSQL with the rest of the session (see the postgres module),
//! advanced only over what the client acknowledged.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message as _;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::oneshot;

use super::position::{NextOffset, Step};
use super::record::{self, SubscriberPart};
use super::{application_topic, kafka_error, Kafka};
use crate::storage::codec::now_ms;
use crate::storage::Enqueued;
use crate::storage::{Completion, QueueRead, QueuedEntry, StorageError};

/// Records read from the end of an APPLICATION topic at start to learn what was appended
/// (two router batches' worth).
const TAIL_SCAN: i64 = 2_048;
/// How long a start-up scan of a log's end may wait for Kafka to return records below the high
/// watermark: only an unreachable cluster takes that long.
const SCAN_TIMEOUT: Duration = Duration::from_secs(30);

/// Where an APPLICATION append came from.
#[derive(Debug, Clone, Copy)]
pub enum Tag<'a> {
    None,
    /// Routed from this publish-log record (partition, offset).
    Origin(i32, i64),
    /// Claimed from this shared group topic record (topic, partition, offset).
    Claim(&'a str, i32, i64),
}

/// What the end of an APPLICATION topic says was appended (see [`ApplicationLogs::tail`]).
#[derive(Debug, Default)]
pub struct Tail {
    pub origins: super::Origins,
    pub claims: HashMap<(String, i32), i64>,
}

/// Reads the last [`TAIL_SCAN`] records of a partition, up to its high watermark, handing each
/// record's headers to `f`. A missing topic has no tail.
pub async fn scan_tail(
    kafka: &Kafka,
    topic: &str,
    partition: i32,
    mut f: impl FnMut(&rdkafka::message::BorrowedHeaders),
) -> Result<(), StorageError> {
    let (low, high) = match kafka.watermarks(topic, partition).await {
        Ok(w) => w,
        Err(_) => return Ok(()),
    };
    if high <= low {
        return Ok(());
    }
    let consumer = reader_consumer(kafka)?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(
        topic,
        partition,
        Offset::Offset((high - TAIL_SCAN).max(low)),
    )
    .map_err(kafka_error)?;
    consumer.assign(&tpl).map_err(kafka_error)?;
    loop {
        let next = tokio::time::timeout(SCAN_TIMEOUT, consumer.recv())
            .await
            .map_err(|_| {
                StorageError::engine_msg(format!(
                    "kafka: reading the end of {topic}: no record within {SCAN_TIMEOUT:?} although its high watermark is {high}"
                ))
            })?
            .map_err(kafka_error)?;
        if let Some(headers) = next.headers() {
            f(headers);
        }
        if next.offset() + 1 >= high {
            return Ok(());
        }
    }
}

/// One client's reader.
struct Reader {
    consumer: StreamConsumer,
    /// The offset the current fetch returns next; `None` before the first read.
    next: Option<NextOffset>,
}

/// The APPLICATION side of the Kafka backend.
pub struct ApplicationLogs {
    kafka: Arc<Kafka>,
    readers: parking_lot::Mutex<HashMap<Arc<str>, Arc<tokio::sync::Mutex<Reader>>>>,
    /// Entries whose PUBREC was received (QoS 2 in flight), per client: kept here so a read
    /// needs no database round trip; loaded at start, maintained by the writer.
    pub released: Arc<parking_lot::Mutex<HashMap<Arc<str>, BTreeSet<u64>>>>,
}

impl ApplicationLogs {
    pub fn new(kafka: Arc<Kafka>) -> ApplicationLogs {
        ApplicationLogs {
            kafka,
            readers: Default::default(),
            released: Default::default(),
        }
    }

    pub fn topic(&self, client: &str) -> String {
        application_topic(&self.kafka.config.topic_prefix, client)
    }

    /// Topic settings for topics the broker creates: retention from `[application]` (the rule
    /// the operator provisions with, in `ferrymq_common::application`).
    pub fn topic_config(retention_ms: u64, retention_bytes: u64) -> Vec<(&'static str, String)> {
        ferrymq_common::application::topic_config(retention_ms, retention_bytes)
    }

    /// Makes sure the client's topic exists (created when allowed) and returns the sequence
    /// number its log ends at: where a brand-new session starts reading.
    pub async fn prepare(
        &self,
        client: &str,
        topic_config: &[(&str, String)],
    ) -> Result<u64, StorageError> {
        let topic = self.topic(client);
        let create = self.kafka.config.auto_create_application_topics;
        self.kafka
            .ensure_topic(&topic, 1, topic_config, create)
            .await?;
        Ok(self.end(client).await?.max(0) as u64 + 1)
    }

    /// The sequence number the next append to `client`'s log will get.
    pub async fn next_seq(&self, client: &str) -> Result<u64, StorageError> {
        Ok(self.end(client).await?.max(0) as u64 + 1)
    }

    /// The offset after the last record of `client`'s log (its high watermark).
    pub async fn end(&self, client: &str) -> Result<i64, StorageError> {
        Ok(self.kafka.watermarks(&self.topic(client), 0).await?.1)
    }

    /// Appends a delivery (the dispatcher's `WriteOp::Enqueue`) to the client's log. `tag`:
    /// where it came from, for recognising it after a crash.
    pub fn append(&self, client: &str, delivery: &Enqueued, tag: Tag<'_>) -> Completion {
        let mut headers = record::headers(
            &delivery.message,
            Some(SubscriberPart {
                qos: delivery.qos,
                retain: delivery.retain,
                subscription_ids: &delivery.subscription_ids,
            }),
        );
        let tag = match tag {
            Tag::None => None,
            Tag::Origin(p, o) => Some((record::ORIGIN_HEADER, format!("{p}:{o}"))),
            Tag::Claim(topic, p, o) => Some((record::CLAIM_HEADER, format!("{topic}:{p}:{o}"))),
        };
        if let Some((key, value)) = &tag {
            headers = headers.insert(rdkafka::message::Header {
                key,
                value: Some(value.as_bytes()),
            });
        }
        self.kafka.send(
            &self.topic(client),
            None,
            Some(0),
            &delivery.message.payload,
            headers,
        )
    }

    /// What the end of `client`'s topic says was appended: per publish-log partition the
    /// highest origin offset (what a replaying router must not append again), and per shared
    /// group topic partition the highest offset claimed (see the `shared` module).
    pub async fn tail(&self, client: &str) -> Result<Tail, StorageError> {
        let mut tail = Tail::default();
        scan_tail(&self.kafka, &self.topic(client), 0, |headers| {
            if let Some((p, o)) = record::origin(headers) {
                super::note_origin(&mut tail.origins, p, o);
            }
            if let Some((topic, p, o)) = record::claim(headers) {
                let e = tail.claims.entry((topic, p)).or_insert(o);
                *e = (*e).max(o);
            }
        })
        .await?;
        Ok(tail)
    }

    /// Starts a read of up to `limit` entries from sequence `from`. It returns fewer only when
    /// it reached the log's high watermark (see `Storage::read_queue`).
    pub fn read(&self, client: &Arc<str>, from: u64, limit: usize) -> QueueRead {
        let reader = match self.reader(client) {
            Ok(r) => r,
            Err(e) => return QueueRead::Ready(Err(e)),
        };
        let released = self
            .released
            .lock()
            .get(client)
            .map(|s| s.range(from..).copied().collect::<BTreeSet<u64>>())
            .unwrap_or_default();
        let topic = self.topic(client);
        let kafka = self.kafka.clone();
        let (tx, rx) = oneshot::channel();
        tokio::spawn(async move {
            let mut reader = reader.lock().await;
            let result = read_from(&kafka, &mut reader, &topic, from, limit, &released).await;
            if result.is_err() {
                // The next read positions the fetch afresh.
                reader.next = None;
            }
            let _ = tx.send(result);
        });
        QueueRead::Pending(rx)
    }

    fn reader(&self, client: &Arc<str>) -> Result<Arc<tokio::sync::Mutex<Reader>>, StorageError> {
        if let Some(r) = self.readers.lock().get(client) {
            return Ok(r.clone());
        }
        let consumer = reader_consumer(&self.kafka)?;
        let reader = Arc::new(tokio::sync::Mutex::new(Reader {
            consumer,
            next: None,
        }));
        self.readers.lock().insert(client.clone(), reader.clone());
        Ok(reader)
    }

    /// The client went offline: its reader (and the consumer's connections) go away.
    pub fn drop_reader(&self, client: &str) {
        self.readers.lock().remove(client);
    }
}

/// A consumer that reads assigned partitions (no group membership, nothing committed to Kafka:
/// APPLICATION offsets live in PostgreSQL).
fn reader_consumer(kafka: &Kafka) -> Result<StreamConsumer, StorageError> {
    Kafka::client_config(&kafka.config)
        .set(
            "group.id",
            format!("{}.app.reader", kafka.config.topic_prefix),
        )
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", "100")
        // One reader per connected APPLICATION client: librdkafka's 64 MB prefetch each would
        // let a thousand clients hold gigabytes. 4 MB still covers many read batches.
        .set("queued.max.messages.kbytes", "4096")
        .create()
        .map_err(kafka_error)
}

/// Points the reader's consumer at `offset`.
fn assign(reader: &mut Reader, topic: &str, offset: i64) -> Result<(), StorageError> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Offset(offset))
        .map_err(kafka_error)?;
    reader.consumer.assign(&tpl).map_err(kafka_error)?;
    reader.next = Some(NextOffset::new(offset));
    Ok(())
}

async fn read_from(
    kafka: &Kafka,
    reader: &mut Reader,
    topic: &str,
    from: u64,
    limit: usize,
    released: &BTreeSet<u64>,
) -> Result<Vec<QueuedEntry>, StorageError> {
    let wanted = from.saturating_sub(1) as i64;
    // The end of the log now: a read stops short of `limit` only there (see
    // `Storage::read_queue`: the session takes a short read as "drained"). Every record whose
    // append completed before this lies below it.
    let (low, high) = kafka.watermarks(topic, 0).await?;
    if wanted >= high {
        return Ok(Vec::new());
    }
    if reader.next.map(NextOffset::get) != Some(wanted) {
        // Entries retention deleted are gone: start at the log start and count the gap below.
        assign(reader, topic, wanted.max(low))?;
        if wanted < low {
            kafka.metrics.kafka_log_gaps.add((low - wanted) as u64);
            tracing::error!(topic, expected = wanted, log_start = low, "APPLICATION log entries were deleted by retention before the client read them; they are lost");
        }
    }
    let mut out = Vec::new();
    let now = now_ms();
    while out.len() < limit && reader.next.is_some_and(|n| n.get() < high) {
        // No timeout: the record is in the log (below the high watermark), so only an
        // unreachable cluster delays it, and the read goes on when the cluster is back. The
        // session does not wait on this task (it is answered through a channel).
        let next = reader.consumer.recv().await.map_err(kafka_error)?;
        let offset = next.offset();
        let Some(position) = reader.next.as_mut() else {
            break;
        };
        match position.step(offset) {
            Step::Skip => continue,
            Step::Take => {}
            Step::Gap { expected, missing } => {
                kafka.metrics.kafka_log_gaps.add(missing as u64);
                tracing::error!(topic, expected, got = offset, missing, "APPLICATION log entries were deleted by retention before the client read them; they are lost");
            }
        }
        let seq = offset as u64 + 1;
        let delivery = match record::decode(next.headers(), next.payload().unwrap_or_default()) {
            Ok(d) => d,
            Err(e) => {
                // A record we cannot read cannot be delivered; skipping it (loudly) keeps the
                // client's log moving instead of wedging it forever.
                tracing::error!(topic, offset, error = %e, "skipping unreadable APPLICATION record");
                continue;
            }
        };
        if delivery.expires_at_ms != 0 && delivery.expires_at_ms <= now {
            continue;
        }
        out.push(QueuedEntry {
            seq,
            delivery,
            released: released.contains(&seq),
        });
    }
    Ok(out)
}
