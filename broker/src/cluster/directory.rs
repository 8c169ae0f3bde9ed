//! The session directory of a cluster: which node holds each client id, and the subscriptions
//! of every persistent session, shared by all nodes through the compacted Kafka topic
//! `<prefix>.sessions` (one partition, so that every node applies the changes in one order).
//!
//! * **Key**: the client id. **Value**: a [`Record::State`] (the node that holds the session,
//!   whether it is connected, and for persistent sessions their type, expiry and whole
//!   subscription set), or no value (a tombstone: the session ended). Compaction keeps the
//!   latest record of each client, so a node that starts replays one record per session.
//! * **Epochs**: a record's offset. A node that takes a client id appends a `State` record and
//!   remembers its offset as the epoch of its connection; a `State` record of another node at a
//!   higher offset means the client connected there, and the local connection is closed (v5
//!   DISCONNECT 0x8E, as for a takeover on one node).
//! * **Release**: the node that closed a connection for a takeover writes everything the
//!   connection owed (in-flight marks, acknowledgements, QoS 2 state) and then appends a
//!   [`Record::Release`] under the key `\0release\0<client>` (client ids cannot hold U+0000,
//!   [MQTT-1.5.4-2]) naming the epoch it released to. The new node waits for it (up to a
//!   timeout, for a node that died) before it reads the session's state from PostgreSQL.
//! * **Subscriptions of persistent sessions** travel in their `State` records, appended with
//!   acks=all before the SUBACK: every node's dispatcher stores for every persistent session,
//!   wherever it is connected. The dispatcher calls [`Directory::sync`] before each batch, so a
//!   PUBLISH appended after a SUBACK is routed with that subscription whichever node routes it.
//!   Clean-session subscriptions stay on their node: its local reader delivers to them.
//!
//! Why Kafka and not PostgreSQL LISTEN/NOTIFY: docs/scale-out.md.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message as _;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};

use crate::config::{ClusterConfig, KafkaConfig};
use crate::metrics::Metrics;
use crate::router::SubscriptionOptions;
use crate::storage::{codec, ClientKind, StorageError};

/// Prefix of the keys of release records.
const RELEASE_KEY: &[u8] = b"\0release\0";
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the reader checks that it keeps up (see [`Directory::follow`]).
const STALL_CHECK: Duration = Duration::from_secs(5);
/// How long the reader may take no record while records wait before it is rebuilt.
const STALL_AFTER: Duration = Duration::from_secs(15);
/// How long [`Directory::sync`] waits for the reader to apply a record before it reports an
/// error (the caller retries; the reader rebuilds itself meanwhile).
const SYNC_TIMEOUT: Duration = Duration::from_secs(30);

/// The topic name.
pub fn sessions_topic(prefix: &str) -> String {
    format!("{prefix}.sessions")
}

/// What a directory record says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Record {
    State(SessionState),
    Release {
        node: String,
        /// The epoch (offset of the `State` record) the session was released to.
        epoch: i64,
    },
}

/// Who holds a session, and what every node needs to route for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionState {
    pub node: String,
    /// `None`: this record is a claim (its offset is the new epoch). Otherwise the epoch of the
    /// claim this record continues: a record whose claim was superseded meanwhile (it was in
    /// flight when another node claimed the client) is stale and ignored.
    #[serde(default)]
    pub claim: Option<i64>,
    pub connected: bool,
    pub persistent: bool,
    /// 0 = DEVICE, 1 = APPLICATION.
    pub kind: u8,
    pub expiry_interval: u32,
    pub disconnected_at_ms: u64,
    /// Filter and encoded options (`storage::codec::encode_options`): a persistent session's
    /// all, a clean session's shared ones.
    pub subscriptions: Vec<(String, Vec<u8>)>,
    /// A claim that continues a persistent session: its subscriptions are the ones the session
    /// had before, whatever `subscriptions` says. The claiming node's view of them may lag
    /// (it has not read the last SUBSCRIBE yet), and a claim carrying that view would take the
    /// newest subscriptions away from every node until the claimer has read the session from
    /// storage and announced it again: messages published in between would match nothing
    /// (found by `cluster`'s roaming test). `subscriptions` is only the fallback for a node
    /// that knows nothing of the session (the topic compacted its earlier records).
    #[serde(default)]
    pub keeps_subscriptions: bool,
}

impl SessionState {
    pub fn client_kind(&self) -> ClientKind {
        if self.kind == 1 {
            ClientKind::Application
        } else {
            ClientKind::Device
        }
    }

    pub fn kind_code(kind: ClientKind) -> u8 {
        match kind {
            ClientKind::Device => 0,
            ClientKind::Application => 1,
        }
    }

    /// The subscriptions with their options decoded; undecodable ones are left out (logged).
    pub fn decoded_subscriptions(&self) -> Vec<(String, SubscriptionOptions)> {
        self.subscriptions
            .iter()
            .filter_map(
                |(filter, options)| match codec::decode_options(Bytes::from(options.clone())) {
                    Ok(o) => Some((filter.clone(), o)),
                    Err(e) => {
                        tracing::warn!(filter, error = %e, "directory: unreadable subscription options");
                        None
                    }
                },
            )
            .collect()
    }

    pub fn encode_subscriptions<'a>(
        subscriptions: impl Iterator<Item = (&'a String, &'a SubscriptionOptions)>,
    ) -> Vec<(String, Vec<u8>)> {
        let mut out: Vec<(String, Vec<u8>)> = subscriptions
            .map(|(f, o)| (f.clone(), codec::encode_options(o)))
            .collect();
        out.sort();
        out
    }
}

/// One record read back, as the applier sees it.
#[derive(Debug)]
pub enum Change {
    State {
        client: Arc<str>,
        epoch: i64,
        state: SessionState,
    },
    Ended {
        client: Arc<str>,
    },
    Released {
        client: Arc<str>,
        epoch: i64,
    },
}

/// The latest `State` of a client, as this node has applied it.
#[derive(Debug, Clone)]
pub struct Known {
    /// The offset of the record.
    pub epoch: i64,
    /// The epoch of the claim in force: the latest claim's offset.
    pub claim_epoch: i64,
    pub state: SessionState,
}

/// Delivery reports with the offset the record got: the offset is the epoch.
struct OffsetContext;
impl ClientContext for OffsetContext {}
impl ProducerContext for OffsetContext {
    type DeliveryOpaque = Box<oneshot::Sender<Result<i64, StorageError>>>;
    fn delivery(&self, result: &DeliveryResult<'_>, done: Self::DeliveryOpaque) {
        let outcome = match result {
            Ok(m) => Ok(m.offset()),
            Err((e, _)) => Err(directory_error(e.clone())),
        };
        let _ = done.send(outcome);
    }
}

fn directory_error(e: KafkaError) -> StorageError {
    StorageError::engine("kafka: session directory", e)
}

/// This node's handle on the directory.
pub struct Directory {
    node: String,
    topic: String,
    producer: ThreadedProducer<OffsetContext>,
    /// Watermarks only.
    metadata: Arc<BaseConsumer>,
    /// The reader's settings, to rebuild it (see [`Directory::follow`]).
    reader_config: ClientConfig,
    metrics: Arc<Metrics>,
    /// Latest `State` per client, applied in log order.
    view: Mutex<HashMap<Arc<str>, Known>>,
    /// Highest epoch released per client.
    releases: Mutex<HashMap<Arc<str>, i64>>,
    /// The offset after the last record applied.
    applied: watch::Sender<i64>,
    caught_up: AtomicBool,
}

impl Directory {
    /// Creates the topic when missing and the clients; [`Directory::follow`] then reads it.
    pub async fn open(
        kafka: &KafkaConfig,
        cluster: &ClusterConfig,
        metrics: Arc<Metrics>,
    ) -> Result<(Arc<Directory>, StreamConsumer), StorageError> {
        let topic = sessions_topic(&kafka.topic_prefix);
        let base = || {
            let mut c = ClientConfig::new();
            c.set("bootstrap.servers", &kafka.bootstrap_servers);
            for (k, v) in &kafka.properties {
                c.set(k, v);
            }
            c
        };
        let admin: AdminClient<DefaultClientContext> = base().create().map_err(directory_error)?;
        let mut new = NewTopic::new(&topic, 1, TopicReplication::Fixed(kafka.replication_factor));
        new = new.set("cleanup.policy", "compact");
        let options = AdminOptions::new().operation_timeout(Some(REQUEST_TIMEOUT));
        for result in admin
            .create_topics([&new], &options)
            .await
            .map_err(directory_error)?
        {
            match result {
                Ok(_) => tracing::info!(topic, "created the session directory topic"),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) => return Err(directory_error(KafkaError::AdminOp(code))),
            }
        }
        let producer: ThreadedProducer<OffsetContext> = base()
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("linger.ms", "0")
            .set("message.timeout.ms", kafka.produce_timeout_ms.to_string())
            .create_with_context(OffsetContext)
            .map_err(directory_error)?;
        let node = cluster.node_id();
        let group = format!("{}.directory.{node}", kafka.topic_prefix);
        let metadata: BaseConsumer = base()
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .create()
            .map_err(directory_error)?;
        let mut reader_config = base();
        reader_config
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "20");
        let consumer = reader(&reader_config, &topic, Offset::Beginning)?;
        let (applied, _) = watch::channel(0);
        let directory = Arc::new(Directory {
            node,
            topic,
            producer,
            metadata: Arc::new(metadata),
            reader_config,
            metrics,
            view: Mutex::new(HashMap::new()),
            releases: Mutex::new(HashMap::new()),
            applied,
            caught_up: AtomicBool::new(false),
        });
        Ok((directory, consumer))
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// Reads the directory for as long as the node runs, handing each change to `apply`
    /// after the view was updated. `apply` also gets what the view held for the client before
    /// the change.
    ///
    /// A reader that takes no record for [`STALL_AFTER`] while the topic has records past what
    /// it applied is rebuilt at the next offset it needs. librdkafka consumers have been seen
    /// to stop fetching for good after the Kafka broker stalled and came back (the e2e test
    /// `cluster_fence`), and every batch of the dispatcher waits for this reader.
    pub async fn follow(
        self: Arc<Self>,
        mut consumer: StreamConsumer,
        mut apply: impl FnMut(Change, Option<Known>),
    ) {
        let mut progress = tokio::time::Instant::now();
        let mut check = tokio::time::interval(STALL_CHECK);
        loop {
            let received = tokio::select! {
                received = consumer.recv() => received,
                _ = check.tick() => {
                    if progress.elapsed() >= STALL_AFTER && self.behind().await {
                        if let Some(fresh) = self.rebuilt_reader() {
                            crate::storage::kafka::close_in_background(std::mem::replace(&mut consumer, fresh));
                        }
                        progress = tokio::time::Instant::now();
                    }
                    continue;
                }
            };
            let message = match received {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "reading the session directory failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            progress = tokio::time::Instant::now();
            let offset = message.offset();
            let change = decode(message.key(), message.payload(), offset);
            if let Some(mut change) = change {
                if let Some(previous) = self.note(&mut change) {
                    apply(change, previous);
                }
            }
            self.applied.send_replace(offset + 1);
        }
    }

    /// Whether the topic holds records this node has not applied.
    async fn behind(&self) -> bool {
        match self.high_watermark().await {
            Ok(high) => high > self.applied(),
            Err(_) => false,
        }
    }

    /// A new reader at the next offset to apply; `None` (logged) when it cannot be created.
    fn rebuilt_reader(&self) -> Option<StreamConsumer> {
        let from = self.applied();
        self.metrics
            .kafka_consumer_rebuilds
            .with_label_values(&["directory"])
            .inc();
        tracing::warn!(
            applied = from,
            "the session directory reader took no record for {}s while records wait; rebuilding it",
            STALL_AFTER.as_secs()
        );
        match reader(&self.reader_config, &self.topic, Offset::Offset(from)) {
            Ok(fresh) => Some(fresh),
            Err(e) => {
                tracing::warn!(error = %e, "rebuilding the session directory reader failed; retrying later");
                None
            }
        }
    }

    async fn high_watermark(&self) -> Result<i64, StorageError> {
        let metadata = self.metadata.clone();
        let topic = self.topic.clone();
        let (_, high) = tokio::task::spawn_blocking(move || {
            metadata.fetch_watermarks(&topic, 0, REQUEST_TIMEOUT)
        })
        .await
        .map_err(|_| StorageError::Closed)?
        .map_err(directory_error)?;
        Ok(high)
    }

    /// Updates the view and returns what it held for the client before; `None` for a stale
    /// record (ignored). A claim that keeps its session's subscriptions gets them here.
    fn note(&self, change: &mut Change) -> Option<Option<Known>> {
        match change {
            Change::State {
                client,
                epoch,
                state,
            } => {
                let mut view = self.view.lock();
                if state.keeps_subscriptions {
                    if let Some(known) = view.get(client).filter(|k| k.state.persistent) {
                        state.subscriptions = known.state.subscriptions.clone();
                    }
                }
                let claim_epoch = match state.claim {
                    None => *epoch,
                    Some(claim) => {
                        if view.get(client).is_some_and(|k| k.claim_epoch != claim) {
                            tracing::debug!(client_id = %client, claim, "directory: a record of a superseded claim; ignored");
                            return None;
                        }
                        claim
                    }
                };
                Some(view.insert(
                    client.clone(),
                    Known {
                        epoch: *epoch,
                        claim_epoch,
                        state: state.clone(),
                    },
                ))
            }
            Change::Ended { client } => {
                self.releases.lock().remove(client);
                Some(self.view.lock().remove(client))
            }
            Change::Released { client, epoch } => {
                let mut releases = self.releases.lock();
                let e = releases.entry(client.clone()).or_insert(*epoch);
                *e = (*e).max(*epoch);
                Some(None)
            }
        }
    }

    /// The latest state of `client` this node has applied.
    pub fn known(&self, client: &str) -> Option<Known> {
        self.view.lock().get(client).cloned()
    }

    /// The offset after the last record this node applied.
    pub fn applied(&self) -> i64 {
        *self.applied.borrow()
    }

    /// The sessions the directory says are connected to `node`.
    pub fn connected_on(&self, node: &str) -> Vec<(Arc<str>, Known)> {
        self.view
            .lock()
            .iter()
            .filter(|(_, k)| k.state.node == node && k.state.connected)
            .map(|(client, k)| (client.clone(), k.clone()))
            .collect()
    }

    /// Appends a `State` record; resolves to its offset (the epoch) once Kafka has it.
    pub async fn announce(&self, client: &str, state: SessionState) -> Result<i64, StorageError> {
        let payload = serde_json::to_vec(&Record::State(state))
            .map_err(|e| StorageError::Corrupt(e.to_string()))?;
        self.send(client.as_bytes(), Some(&payload)).await
    }

    /// Appends a tombstone: the session ended. Its release record, if a takeover left one, is
    /// tombstoned too, so that compaction keeps nothing of an ended session.
    pub async fn ended(&self, client: &str) -> Result<i64, StorageError> {
        let offset = self.send(client.as_bytes(), None).await?;
        if self.releases.lock().contains_key(client) {
            let mut key = RELEASE_KEY.to_vec();
            key.extend_from_slice(client.as_bytes());
            self.send(&key, None).await?;
        }
        Ok(offset)
    }

    /// Appends the release of `client` to `epoch`.
    pub async fn release(&self, client: &str, epoch: i64) -> Result<i64, StorageError> {
        let payload = serde_json::to_vec(&Record::Release {
            node: self.node.clone(),
            epoch,
        })
        .map_err(|e| StorageError::Corrupt(e.to_string()))?;
        let mut key = RELEASE_KEY.to_vec();
        key.extend_from_slice(client.as_bytes());
        self.send(&key, Some(&payload)).await
    }

    async fn send(&self, key: &[u8], payload: Option<&[u8]>) -> Result<i64, StorageError> {
        let (tx, rx) = oneshot::channel();
        let mut record = BaseRecord::with_opaque_to(&self.topic, Box::new(tx)).key(key);
        if let Some(p) = payload {
            record = record.payload(p);
        }
        if let Err((e, record)) = self.producer.send(record) {
            let _ = record.delivery_opaque.send(Err(directory_error(e)));
        }
        rx.await.unwrap_or(Err(StorageError::Closed))
    }

    /// Waits until the release of `client` to `epoch` (or a later one) has been read, or
    /// `timeout` passed. `true` when released.
    pub async fn wait_released(&self, client: &str, epoch: i64, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut applied = self.applied.subscribe();
        loop {
            if self
                .releases
                .lock()
                .get(client)
                .is_some_and(|e| *e >= epoch)
            {
                return true;
            }
            if tokio::time::timeout_at(deadline, applied.changed())
                .await
                .is_err()
            {
                return false;
            }
        }
    }

    /// Waits until every record appended before this call is applied: a subscription
    /// acknowledged (SUBACK) before a PUBLISH was appended is in force when that PUBLISH is
    /// routed.
    /// An error when the reader applies nothing for [`SYNC_TIMEOUT`] while it is behind (it
    /// rebuilds itself meanwhile; the caller retries). A long replay that keeps going is
    /// waited for.
    pub async fn sync(&self) -> Result<(), StorageError> {
        let high = self.high_watermark().await?;
        let mut applied = self.applied.subscribe();
        while *applied.borrow_and_update() < high {
            match tokio::time::timeout(SYNC_TIMEOUT, applied.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(StorageError::Closed),
                Err(_) => {
                    return Err(StorageError::engine_msg(format!(
                        "kafka: session directory: the reader applied nothing for {}s at offset {} of {high}",
                        SYNC_TIMEOUT.as_secs(),
                        self.applied()
                    )))
                }
            }
        }
        Ok(())
    }

    /// Reads the directory up to its end as it is now: a node serves no client before it
    /// knows every session.
    pub async fn catch_up(&self) -> Result<(), StorageError> {
        self.sync().await?;
        self.caught_up.store(true, Ordering::Release);
        Ok(())
    }

    pub fn is_caught_up(&self) -> bool {
        self.caught_up.load(Ordering::Acquire)
    }

    /// Waits (bounded) until every record handed to the producer is acknowledged.
    pub fn flush(&self, timeout: Duration) {
        let _ = self.producer.flush(timeout);
    }
}

/// The dispatcher routes a batch only once this node knows every subscription the directory
/// held when the batch was taken (`sync`): one watermark request per batch.
#[async_trait::async_trait]
impl crate::router::dispatcher::BatchGate for Directory {
    async fn before_batch(&self) -> Result<(), StorageError> {
        self.sync().await
    }
}

/// A reader of the directory's one partition from `from` (no group membership: nothing can
/// take the partition away).
fn reader(
    config: &ClientConfig,
    topic: &str,
    from: Offset,
) -> Result<StreamConsumer, StorageError> {
    let consumer: StreamConsumer = config.create().map_err(directory_error)?;
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(topic, 0, from)
        .map_err(directory_error)?;
    consumer.assign(&assignment).map_err(directory_error)?;
    Ok(consumer)
}

/// Reads one record: `None` for a record this version cannot read (logged).
fn decode(key: Option<&[u8]>, payload: Option<&[u8]>, offset: i64) -> Option<Change> {
    let key = key?;
    if let Some(client) = key.strip_prefix(RELEASE_KEY) {
        let client: Arc<str> = Arc::from(std::str::from_utf8(client).ok()?);
        return match serde_json::from_slice::<Record>(payload?) {
            Ok(Record::Release { epoch, .. }) => Some(Change::Released { client, epoch }),
            _ => None,
        };
    }
    let client: Arc<str> = match std::str::from_utf8(key) {
        Ok(c) => Arc::from(c),
        Err(_) => {
            tracing::warn!(
                offset,
                "directory: a record whose key is not UTF-8; skipped"
            );
            return None;
        }
    };
    let Some(payload) = payload else {
        return Some(Change::Ended { client });
    };
    match serde_json::from_slice::<Record>(payload) {
        Ok(Record::State(state)) => Some(Change::State {
            client,
            epoch: offset,
            state,
        }),
        Ok(Record::Release { .. }) => None,
        Err(e) => {
            tracing::warn!(offset, error = %e, "directory: unreadable record; skipped");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> SessionState {
        SessionState {
            node: "a".into(),
            claim: Some(3),
            connected: true,
            persistent: true,
            kind: 0,
            expiry_interval: 60,
            disconnected_at_ms: 0,
            subscriptions: vec![("t/#".into(), vec![1, 2])],
            keeps_subscriptions: false,
        }
    }

    #[test]
    fn records_read_back_as_changes() {
        let payload = serde_json::to_vec(&Record::State(state())).unwrap();
        match decode(Some(b"c1"), Some(&payload), 7) {
            Some(Change::State {
                client,
                epoch,
                state: s,
            }) => {
                assert_eq!(&*client, "c1");
                assert_eq!(epoch, 7);
                assert_eq!(s, state());
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            decode(Some(b"c1"), None, 8),
            Some(Change::Ended { client }) if &*client == "c1"
        ));
        let release = serde_json::to_vec(&Record::Release {
            node: "a".into(),
            epoch: 7,
        })
        .unwrap();
        let mut key = RELEASE_KEY.to_vec();
        key.extend_from_slice(b"c1");
        assert!(matches!(
            decode(Some(&key), Some(&release), 9),
            Some(Change::Released { client, epoch: 7 }) if &*client == "c1"
        ));
        assert!(decode(Some(b"c1"), Some(b"{nonsense"), 10).is_none());
        assert!(decode(None, Some(&payload), 11).is_none());
    }
}
