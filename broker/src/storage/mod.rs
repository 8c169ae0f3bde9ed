//! Durable storage seams: what the broker must keep across a crash, and the backends that keep it.
//!
//! Three kinds of state, one write path:
//! * the **session store**: persistent sessions, their subscriptions, incoming QoS 2 packet ids
//!   awaiting PUBREL, outgoing QoS 2 "PUBREC received" marks, and retained messages;
//! * the **DEVICE queue**: per persistent DEVICE session, an ordered queue with a per-client limit
//!   (oldest trimmed) and a TTL; an entry is deleted when the client acknowledges it;
//! * the **APPLICATION log**: per APPLICATION client, an append-only log with a committed offset
//!   that advances over the contiguous prefix the client acknowledged; entries are kept until
//!   retention (age, size) removes them.
//!
//! Writes go through [`Storage::submit`] as a [`WriteBatch`]: applied atomically and durably, in
//! submission order, and completed through a [`Completion`]. A PUBLISH is acknowledged only after
//! its batch completed (durable before ack). The embedded backend batches concurrent submissions
//! into one transaction and one fsync (group commit).
//!
//! Outgoing packet ids of stored entries are derived from their sequence number
//! ([`pkid_for_seq`]), so a restarted broker resends a QoS 2 message with the packet id the
//! client already saw — which the receiver's exactly-once state depends on — without writing the
//! packet id down on every send.

pub mod codec;
pub mod embedded;
pub mod kafka;
pub mod kafka_postgres;
pub mod log;
pub mod postgres;
pub mod wake;

use std::sync::Arc;

use tokio::sync::{oneshot, Notify};

use crate::message::Message;
use crate::router::SubscriptionOptions;
use codec::StoredDelivery;

/// Which queue kind a persistent client has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientKind {
    /// Publishes a lot, subscribes to little; bounded queue with limit and TTL.
    Device,
    /// Subscribes to high-rate topics; its own log, never trimmed by a count limit.
    Application,
}

impl ClientKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ClientKind::Device => "device",
            ClientKind::Application => "application",
        }
    }
}

/// The stored part of a persistent session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    pub kind: ClientKind,
    /// Session Expiry Interval in seconds (`u32::MAX`: never).
    pub expiry_interval: u32,
    /// When the client disconnected (ms since epoch); 0 while connected.
    pub disconnected_at_ms: u64,
}

/// How a publisher's open QoS 2 flows changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qos2FlowChange {
    /// A message with this packet id was routed.
    Open(u16),
    /// The publisher released the packet id (PUBREL).
    Release(u16),
    /// The publisher started a new session: every packet id is free.
    Reset,
}

/// One change to durable state.
#[derive(Debug, Clone)]
pub enum WriteOp {
    PutSession {
        client: Arc<str>,
        record: SessionRecord,
    },
    /// Deletes the session with everything it owns: subscriptions, queue or log, offsets,
    /// in-flight marks.
    DeleteSession {
        client: Arc<str>,
    },
    PutSubscription {
        client: Arc<str>,
        filter: String,
        options: SubscriptionOptions,
    },
    DeleteSubscription {
        client: Arc<str>,
        filter: String,
    },
    /// Appends a delivery at the client's next sequence number; `notify` is woken after the
    /// commit so an online subscriber reads it. Each backend encodes the delivery in its own
    /// format ([`Enqueued::encode`] for the embedded and PostgreSQL stores, Kafka headers for
    /// APPLICATION logs), once.
    ///
    /// The backend assigns the sequence number when it applies the write, not the caller: then
    /// sequence order is commit order, and a reader that has seen entry N has seen every entry
    /// below N that will ever exist — two publishers racing to the same subscriber cannot leave
    /// a gap behind its read position.
    Enqueue {
        client: Arc<str>,
        kind: ClientKind,
        delivery: Enqueued,
        notify: Option<Arc<Notify>>,
        /// Where the message came from in the Kafka publish log (partition, offset), set by the
        /// log router so that a replay after a crash can recognise appends it already made.
        origin: Option<(i32, i64)>,
    },
    /// A message for the APPLICATION members of a shared group, appended once to the group's own
    /// log (Kafka backend only; see `kafka::shared`). `delivery` has the message's own QoS and
    /// retain flag; each member's share is decided when it is claimed.
    AppendShared {
        group: Arc<str>,
        filter: Arc<str>,
        delivery: Enqueued,
        /// As for `Enqueue`: the publish-log record it was routed from.
        origin: Option<(i32, i64)>,
    },
    /// The log router has stored everything of a publish-log partition below `next_offset`.
    /// Written in the same transaction as the batch's queue writes, so a replay after a crash
    /// starts exactly after what was stored (Kafka backend only).
    ///
    /// `epoch` is the partition's claim the records were read under (see
    /// `storage::kafka::reader`): when the partition was claimed again since (by another node,
    /// or by this one after a rebalance), the whole batch is refused with
    /// [`StorageError::Fenced`] and none of it is applied.
    RouterPosition {
        partition: i32,
        next_offset: i64,
        epoch: i64,
    },
    /// The log router's record of a publisher's open QoS 2 flows changed (Kafka backend only;
    /// see `router::dispatcher::Qos2Flows`). Written in the batch's transaction.
    RouterQos2 {
        client: Arc<str>,
        /// The publish-log partition the flow's records travel in.
        partition: i32,
        change: Qos2FlowChange,
    },
    /// The DEVICE client acknowledged the entry (PUBACK, or PUBCOMP for QoS 2).
    AckDevice {
        client: Arc<str>,
        seq: u64,
    },
    /// The APPLICATION client acknowledged everything below `next_offset`.
    CommitApplication {
        client: Arc<str>,
        next_offset: u64,
    },
    /// PUBREC received for an outgoing QoS 2 entry: after a restart send PUBREL, not PUBLISH.
    MarkReleased {
        client: Arc<str>,
        kind: ClientKind,
        seq: u64,
    },
    /// Entries up to `upto` have been sent to the client at least once. Written without waiting,
    /// after the send: after a crash, entries above the last durable mark are resent with DUP=0
    /// (never sent before, [MQTT-3.3.1-1]) and entries at or below it with DUP=1. Only sends in
    /// the last group commit before a crash can be misflagged.
    MarkSent {
        client: Arc<str>,
        upto: u64,
    },
    /// An incoming QoS 2 PUBLISH was stored and PUBRECed; a resend must not be routed again.
    PutInboundQos2 {
        client: Arc<str>,
        pkid: u16,
    },
    DeleteInboundQos2 {
        client: Arc<str>,
        pkid: u16,
    },
    /// Removes an entry whose TTL or retention passed (counted as expired).
    Expire {
        client: Arc<str>,
        kind: ClientKind,
        seq: u64,
    },
    PutRetained {
        topic: String,
        record: Vec<u8>,
    },
    /// A disconnected persistent session's delayed will and expiry, kept where every node of a
    /// cluster fires them once ([`Storage::claim_due_timers`]). Replaces an earlier timer of the
    /// client. Cluster backends only: a single node keeps its timers in memory.
    PutTimer {
        client: Arc<str>,
        timer: SessionTimer,
    },
    DeleteRetained {
        topic: String,
    },
}

/// Operations applied together, atomically and durably.
#[derive(Debug, Default, Clone)]
pub struct WriteBatch {
    pub ops: Vec<WriteOp>,
    /// The session these writes are made for, in a cluster: a backend shared by several nodes
    /// refuses the whole batch ([`StorageError::SessionMoved`]) when the session was taken by a
    /// newer connection since ([`Storage::own_session`]). `None`: writes of no one session
    /// (router batches, retained messages) or a single node.
    pub owner: Option<SessionOwner>,
}

/// A session and the directory epoch of the connection that writes for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionOwner {
    pub client: Arc<str>,
    pub epoch: i64,
}

impl WriteBatch {
    /// An empty batch made for `owner`'s session (see [`WriteBatch::owner`]).
    pub fn owned_by(owner: Option<SessionOwner>) -> WriteBatch {
        WriteBatch {
            ops: Vec::new(),
            owner,
        }
    }

    pub fn push(&mut self, op: WriteOp) {
        self.ops.push(op);
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// Why a storage operation failed. `Display` and `Error` are written out (not derived) so that
/// `source()` hands out the underlying error itself, which a caller can downcast
/// (`KafkaError`, `sqlx::Error`, …); a derived one would hand out the `Arc` around it.
#[derive(Debug, Clone)]
pub enum StorageError {
    /// A backend failed. `source` keeps the underlying error; shared, because a failed batch
    /// completes every waiter with the same error.
    Engine {
        context: String,
        source: Option<Arc<dyn std::error::Error + Send + Sync>>,
    },
    /// A stored record cannot be decoded.
    Corrupt(String),
    /// The write queue is full.
    Overloaded,
    /// Storage is shut down.
    Closed,
    /// Another broker node holds the node lock on this PostgreSQL schema.
    NodeLockHeld(String),
    /// The APPLICATION client's Kafka topic does not exist and may not be created by the broker.
    MissingTopic(String),
    /// A router batch for a publish-log partition that was claimed again since its records
    /// were read (another node routes it now): nothing of the batch was applied, and it must
    /// not be retried.
    Fenced { partition: i32, epoch: i64 },
    /// A write for a session that a newer connection owns now (its claim epoch is above the
    /// batch's): nothing of the batch was applied.
    SessionMoved { client: String, epoch: i64 },
}

impl std::fmt::Display for StorageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // The cause is part of the message: logs and the readiness reason print only this.
            StorageError::Engine {
                context,
                source: Some(source),
            } => write!(f, "{context}: {source}"),
            StorageError::Engine {
                context,
                source: None,
            } => f.write_str(context),
            StorageError::Corrupt(what) => write!(f, "stored record is corrupt: {what}"),
            StorageError::Overloaded => f.write_str("storage write queue is full"),
            StorageError::Closed => f.write_str("storage is shut down"),
            StorageError::NodeLockHeld(schema) => write!(
                f,
                "another ferrymq node holds the lock on postgres schema `{schema}` \
                 (postgres.schema); each active broker node needs its own schema (set \
                 postgres.standby = true to wait as a standby instead)"
            ),
            StorageError::MissingTopic(topic) => write!(f, "missing Kafka topic {topic}"),
            StorageError::Fenced { partition, epoch } => write!(
                f,
                "publish-log partition {partition} was claimed again since epoch {epoch}; \
                 its batch is not applied"
            ),
            StorageError::SessionMoved { client, epoch } => write!(
                f,
                "session `{client}` was taken over since epoch {epoch}; its write is not applied"
            ),
        }
    }
}

impl std::error::Error for StorageError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StorageError::Engine {
                source: Some(source),
                ..
            } => Some(&**source as &(dyn std::error::Error + 'static)),
            _ => None,
        }
    }
}

impl StorageError {
    /// A backend error with its cause.
    pub fn engine(
        context: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> StorageError {
        StorageError::Engine {
            context: context.into(),
            source: Some(Arc::new(source)),
        }
    }

    /// A backend error that has no underlying error value (a state the broker detected).
    pub fn engine_msg(context: impl Into<String>) -> StorageError {
        StorageError::Engine {
            context: context.into(),
            source: None,
        }
    }
}

/// A delivery to store for one subscriber: the message, shared by every subscriber it goes to,
/// and what this subscriber gets of it.
#[derive(Debug, Clone)]
pub struct Enqueued {
    pub message: Arc<Message>,
    pub qos: crate::protocol::QoS,
    pub retain: bool,
    /// When it expires (ms since the epoch; 0: never).
    pub expires_at_ms: u64,
    pub subscription_ids: Vec<usize>,
}

impl Enqueued {
    /// The stored form of the embedded and PostgreSQL queues ([`codec::encode_delivery`]).
    pub fn encode(&self) -> Vec<u8> {
        codec::encode_delivery(
            self.qos,
            self.retain,
            self.expires_at_ms,
            &self.subscription_ids,
            &self.message,
        )
    }
}

/// What waits for a disconnected persistent session ([`WriteOp::PutTimer`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionTimer {
    /// The will and when it is due (ms since the epoch): a v5 Will Delay, or the expiry when
    /// that comes first [MQTT-3.1.3-9]. Encoded with [`codec::encode_message`].
    pub will: Option<(u64, Vec<u8>)>,
    /// When the session ends (ms since the epoch); `None`: never.
    pub expires_at_ms: Option<u64>,
}

impl SessionTimer {
    /// What waits for a persistent session that disconnects at `now_ms` with Session Expiry
    /// `expiry_interval` (`u32::MAX`: never) and, maybe, a will with a delay (the encoded
    /// message): `None` when nothing does. The will waits for min(will delay, session expiry)
    /// [MQTT-3.1.3-9].
    pub fn at_disconnect(
        now_ms: u64,
        expiry_interval: u32,
        will: Option<(u32, Vec<u8>)>,
    ) -> Option<SessionTimer> {
        let after = |secs: u32| now_ms + u64::from(secs) * 1000;
        let timer = SessionTimer {
            will: will.map(|(delay, record)| (after(delay.min(expiry_interval)), record)),
            expires_at_ms: (expiry_interval != u32::MAX).then(|| after(expiry_interval)),
        };
        (timer.will.is_some() || timer.expires_at_ms.is_some()).then_some(timer)
    }
}

/// A timer this node claimed ([`Storage::claim_due_timers`]): publish the will (if any), then
/// hand it back to [`Storage::finish_timer`].
#[derive(Debug)]
pub struct DueTimer {
    pub client: Arc<str>,
    /// The claim's token: the finish applies only while the claim is this one.
    pub token: i64,
    /// The will to publish now (its time came, or the session ends).
    pub will: Option<Message>,
    /// The session ends now.
    pub expires: bool,
}

/// Resolves when a submitted batch is durable (or failed).
pub type Completion = oneshot::Receiver<Result<(), StorageError>>;

/// Resolves when both are done: `Ok` if both succeeded, else the first error.
pub fn join_completions(a: Completion, b: Completion) -> Completion {
    let (tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        let a = a.await.unwrap_or(Err(StorageError::Closed));
        let b = b.await.unwrap_or(Err(StorageError::Closed));
        let _ = tx.send(a.and(b));
    });
    rx
}

/// The configured backend, opened: its storage and, for a log-first backend, both sides of its
/// publish log. The one place that names the backends.
pub struct Opened {
    pub storage: Arc<dyn Storage>,
    pub log: Option<LogParts>,
}

/// A log-first backend's publish log: what connections append to, and what the dispatcher
/// reads back.
pub struct LogParts {
    pub append: Arc<dyn log::PublishLog>,
    pub reader: Box<dyn log::LogReader>,
    /// In a cluster (`cluster.enabled`): this node's reader of the whole log for its own
    /// connections (`router::local`).
    pub local: Option<Box<dyn log::LocalLogReader>>,
}

/// Opens the backend `config.storage` names (creating what it needs, failing with a message
/// that names the unreachable service or the bad file).
pub async fn open(
    config: &crate::config::Config,
    metrics: Arc<crate::metrics::Metrics>,
) -> Result<Opened, StorageError> {
    if config.storage.is_kafka_postgres() {
        let backend = kafka_postgres::KafkaPostgresStorage::connect(config, metrics).await?;
        let append = backend.publish_log();
        let reader = backend
            .take_log_reader()
            .ok_or_else(|| StorageError::engine_msg("the publish log reader was taken already"))?;
        let local = backend.take_local_reader();
        return Ok(Opened {
            storage: Arc::new(backend),
            log: Some(LogParts {
                append,
                reader,
                local,
            }),
        });
    }
    let options = embedded::EmbeddedOptions {
        device_queue_limit: config.device.queue_limit,
        application_retention_ms: config.application.retention_secs.saturating_mul(1000),
        application_retention_bytes: config.application.retention_bytes,
        fsync: config.storage.fsync,
    };
    let storage = embedded::EmbeddedStorage::open(&config.data_dir, options, metrics)?;
    Ok(Opened {
        storage: Arc::new(storage),
        log: None,
    })
}

/// The answer to [`Storage::read_queue`]: at once (a local read) or later (a network read).
pub enum QueueRead {
    Ready(Result<Vec<QueuedEntry>, StorageError>),
    Pending(oneshot::Receiver<Result<Vec<QueuedEntry>, StorageError>>),
}

/// One entry read back from a queue or log.
#[derive(Debug)]
pub struct QueuedEntry {
    pub seq: u64,
    pub delivery: StoredDelivery,
    /// PUBREC was received for it before: resend PUBREL.
    pub released: bool,
}

/// A persistent session as found in storage at start.
#[derive(Debug)]
pub struct RestoredSession {
    pub client: Arc<str>,
    pub record: SessionRecord,
    pub subscriptions: Vec<(String, SubscriptionOptions)>,
    pub inbound_qos2: Vec<u16>,
    /// The next sequence number to assign.
    pub next_seq: u64,
    /// Where reading starts: the oldest DEVICE entry, or the APPLICATION committed offset.
    pub read_from: u64,
    /// The highest entry recorded as sent (0: none).
    pub sent_upto: u64,
}

/// Everything durable, read once at start.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub sessions: Vec<RestoredSession>,
    pub retained: Vec<Message>,
}

/// What one sweep removed.
#[derive(Debug, Default, Clone, Copy)]
pub struct SweepStats {
    pub device_expired: u64,
    pub application_expired: u64,
}

/// A storage backend. Implementations: [`embedded::EmbeddedStorage`] (the default, under the data
/// directory); the production backend (Kafka + PostgreSQL) implements the same seam.
#[async_trait::async_trait]
pub trait Storage: Send + Sync + 'static {
    /// Queues a batch; never blocks. A full write queue fails the completion with `Overloaded`.
    fn submit(&self, batch: WriteBatch) -> Completion;
    /// Submits the batch unless it is empty (nothing to wait for then).
    fn submit_nonempty(&self, batch: WriteBatch) -> Option<Completion> {
        (!batch.is_empty()).then(|| self.submit(batch))
    }
    /// Submits a batch nobody waits for (writes whose loss in a crash only causes a redelivery
    /// or a late cleanup). It is still applied in order with every other batch.
    fn submit_detached(&self, batch: WriteBatch) {
        drop(self.submit(batch));
    }
    /// Resolves once every batch submitted before it is applied (used at shutdown).
    fn flush(&self) -> Completion;
    /// Reads everything needed to rebuild the broker's state.
    async fn load(&self) -> Result<Snapshot, StorageError>;
    /// Up to `limit` live entries with `seq >= from`, in order. Expired entries are skipped.
    /// Fewer than `limit` means the queue held nothing more when the read began: the session
    /// then stops reading until `Mailbox::stored` is woken, and the wake for entries written
    /// before the read may already be spent. So a backend must not stop short of entries that
    /// were durable when the read began (a slow network read fails instead).
    fn read_queue(&self, client: &Arc<str>, kind: ClientKind, from: u64, limit: usize)
        -> QueueRead;
    /// Removes expired entries, at most `budget` of them. Bounded work per call.
    async fn sweep(&self, now_ms: u64, budget: usize) -> Result<SweepStats, StorageError>;
    /// Whether the backend can take writes now (the readiness probe). Cheap: reports what the
    /// backend last observed, it does not probe on every call.
    fn health(&self) -> Result<(), StorageError> {
        Ok(())
    }
    /// Checks, at CONNECT, that an APPLICATION client's log can be used, creating it when the
    /// configuration allows. Returns where a session that is new to this broker starts reading
    /// (`None`: at the beginning of its log, as on embedded storage, where a new session's log
    /// is empty). A log that outlives its session (a Kafka topic) starts at its end.
    async fn prepare_application(&self, _client: &Arc<str>) -> Result<Option<u64>, StorageError> {
        Ok(None)
    }
    /// The session `client` ended for good or went offline: release per-client resources
    /// (readers, caches). Nothing durable changes.
    fn client_offline(&self, _client: &str) {}
    /// Reads one session's durable state, for a node that takes over a session another node
    /// served (several active nodes: the copy in this node's memory may be stale). `None`: no
    /// stored session, or a backend whose state only this process writes.
    async fn load_session(
        &self,
        _client: &Arc<str>,
    ) -> Result<Option<RestoredSession>, StorageError> {
        Ok(None)
    }
    /// Several active nodes: `epoch`'s connection owns `client`'s session from now on. Raises
    /// the stored owner epoch (batches of older connections are refused from here on) and
    /// cancels the session's timers (its client is back). Called after the previous owner let go
    /// and before the session is read.
    async fn own_session(&self, _client: &Arc<str>, _epoch: i64) -> Result<(), StorageError> {
        Ok(())
    }
    /// Several active nodes: claims up to `budget` timers that are due, for `lease_ms`. Each
    /// is due once for the whole cluster: a row claimed by one node is skipped by the others
    /// until its claim lapses.
    async fn claim_due_timers(
        &self,
        _now_ms: u64,
        _budget: usize,
        _lease_ms: u64,
    ) -> Result<Vec<DueTimer>, StorageError> {
        Ok(Vec::new())
    }
    /// Completes a claimed timer after its will was published: the session and everything it
    /// owns is deleted when it expired, else the will is removed from the timer. `false`: the
    /// claim was lost (the client reconnected, or the claim lapsed), nothing changed.
    async fn finish_timer(&self, _timer: &DueTimer) -> Result<bool, StorageError> {
        Ok(false)
    }
    /// Several active nodes: `node` is alive until `until_ms` (its lease, `cluster::lease`).
    async fn renew_lease(&self, _node: &str, _until_ms: u64) -> Result<(), StorageError> {
        Ok(())
    }
    /// Several active nodes: takes the rows of the nodes other than `me` whose lease lapsed
    /// before `now_ms`; each lapsed node is returned to one caller only.
    async fn take_lapsed_nodes(
        &self,
        _me: &str,
        _now_ms: u64,
    ) -> Result<Vec<String>, StorageError> {
        Ok(Vec::new())
    }
    /// The shared subscriptions (`$share/…` filters) of an online APPLICATION client, given at
    /// connect and after each change: a backend that serves APPLICATION shared groups from
    /// their own log (Kafka) starts or stops the member's share of it. `wake` is notified
    /// when entries were added to the client's log.
    fn application_shared(
        &self,
        _client: &Arc<str>,
        _subscriptions: Vec<(String, SubscriptionOptions)>,
        _wake: Arc<Notify>,
    ) {
    }
    /// In a cluster, the wakes other nodes' writers send this node's sessions
    /// ([`wake::listen`]); taken once by the broker, which wakes the online sessions they name.
    fn take_wakes(&self) -> Option<tokio::sync::mpsc::Receiver<wake::Wake>> {
        None
    }
    /// Whether the router hands APPLICATION shared group members their messages through the
    /// group's own log ([`WriteOp::AppendShared`]) instead of picking a member.
    fn shared_groups_in_log(&self) -> bool {
        false
    }
    /// Stored message totals for the metrics endpoint (called on a blocking thread, once per
    /// scrape); `None` when the backend does not report them (the gauges are then left out).
    fn queue_totals(&self) -> Result<Option<QueueTotals>, StorageError> {
        Ok(None)
    }
}

/// Stored message totals over all clients, computed at scrape time.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct QueueTotals {
    /// Entries in all DEVICE queues.
    pub device_queued: u64,
    /// Entries in all APPLICATION logs, acknowledged or not.
    pub application_log: u64,
    /// APPLICATION log entries above each client's committed offset (not yet acknowledged).
    pub application_lag: u64,
}

/// The MQTT packet id used for the stored entry `seq` (1..=65535, never 0).
pub fn pkid_for_seq(seq: u64) -> u16 {
    (seq % 65_535) as u16 + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A will waits for the sooner of its delay and the session's expiry; a session that never
    /// expires and has no will needs no timer.
    #[test]
    fn timers_at_disconnect() {
        let t = SessionTimer::at_disconnect(1_000, 60, Some((10, vec![1]))).expect("timer");
        assert_eq!(t.will, Some((11_000, vec![1])));
        assert_eq!(t.expires_at_ms, Some(61_000));
        let t = SessionTimer::at_disconnect(1_000, 5, Some((100, vec![1]))).expect("timer");
        assert_eq!(t.will, Some((6_000, vec![1])), "the session ends first");
        let t = SessionTimer::at_disconnect(1_000, u32::MAX, Some((3, vec![]))).expect("timer");
        assert_eq!((t.will.map(|w| w.0), t.expires_at_ms), (Some(4_000), None));
        assert_eq!(SessionTimer::at_disconnect(1_000, u32::MAX, None), None);
    }

    /// A backend error keeps what caused it: the message names it, and `source()` returns it
    /// for whoever needs to tell cases apart.
    #[test]
    fn engine_errors_keep_their_source() {
        let cause = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let e = StorageError::engine("postgres at `db:5432`", cause);
        assert_eq!(e.to_string(), "postgres at `db:5432`: refused");
        let source = std::error::Error::source(&e).expect("source kept");
        let io = source
            .downcast_ref::<std::io::Error>()
            .expect("the original error type");
        assert_eq!(io.kind(), std::io::ErrorKind::ConnectionRefused);
        // Every waiter of a failed batch gets the same error.
        assert!(std::error::Error::source(&e.clone()).is_some());
        assert!(std::error::Error::source(&StorageError::engine_msg("x")).is_none());
    }
}
