//! The production backend: Kafka for logs, PostgreSQL for everything else.
//!
//! * PUBLISH → `<prefix>.msg.all` ([`KafkaPublishLog`], the broker's ingest appends to it), read
//!   back by the dispatcher through [`KafkaLogReader`].
//! * Dispatcher batches → DEVICE queues in PostgreSQL, APPLICATION logs in
//!   `<prefix>.app.<client>`.
//! * Sessions, subscriptions, retained messages, in-flight marks, APPLICATION offsets →
//!   PostgreSQL.
//!
//! A batch that holds APPLICATION appends is produced first and its PostgreSQL part is applied
//! after Kafka acknowledged them; the completion resolves when both are done. The PostgreSQL
//! writer waits for those appends before it applies that batch or any submitted after it, so
//! batches are applied in submission order whoever submits them (the `Storage` contract). The
//! price: while Kafka does not answer, PostgreSQL writes queue behind such a batch for up to
//! `kafka.produce_timeout_ms`.
//!
//! **APPLICATION appends made before.** Each dispatcher append carries its origin (publish-log
//! partition and offset). A batch replayed after a crash, or retried after a failed attempt
//! (a produce that timed out has an unknown outcome), may hold appends that are already in
//! the logs: at start the broker reads the end of every APPLICATION log, and before the first
//! batch after a failure it reads the ends of the logs that batch appends to, and drops the
//! appends at or below the origins it found there.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{self, StreamExt};
use sqlx::PgConnection;
use tokio::sync::{oneshot, Mutex, Notify};

use super::kafka::app::{ApplicationLogs, Tag};
use super::kafka::local::KafkaLocalReader;
use super::kafka::reader::KafkaLogReader;
use super::kafka::shared::SharedGroups;
use super::kafka::{already_appended, note_origin, Kafka, KafkaPublishLog, Origins};
use super::log::{LocalLogReader, LogReader, PublishLog};
use super::postgres::{take_node_lock, OnCommit, PgStore};
use super::{
    ClientKind, Completion, QueueRead, QueueTotals, Snapshot, Storage, StorageError, SweepStats,
    WriteBatch, WriteOp,
};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::router::SubscriptionOptions;

/// How often Kafka and PostgreSQL are probed for the readiness state.
pub(crate) const PROBE_INTERVAL: Duration = Duration::from_secs(2);
/// APPLICATION logs whose ends are read at once at start.
const TAIL_SCAN_CONCURRENCY: usize = 16;

pub struct KafkaPostgresStorage {
    kafka: Arc<Kafka>,
    log: Arc<KafkaPublishLog>,
    /// Created at start (so a broken setup fails before listeners open), taken by the broker
    /// for its dispatcher.
    reader: parking_lot::Mutex<Option<KafkaLogReader>>,
    /// In a cluster: this node's local reader, taken by the broker likewise.
    local: parking_lot::Mutex<Option<KafkaLocalReader>>,
    /// In a cluster: the wakes for this node's sessions (`storage::wake`).
    wakes: parking_lot::Mutex<Option<tokio::sync::mpsc::Receiver<super::wake::Wake>>>,
    /// Per APPLICATION client, the highest origins found at the end of its log: appends at or
    /// below them were made already (module docs).
    appended: Arc<parking_lot::Mutex<HashMap<Arc<str>, Origins>>>,
    /// A batch with APPLICATION appends failed: the next one reads the logs' ends first.
    recheck: Arc<AtomicBool>,
    /// Publish-log partitions this node's router claimed from the group since start (a
    /// cluster's rebalances). A claimed partition is replayed from its stored position, and
    /// the node that routed it before may have appended some of those records already.
    claims: Arc<AtomicU64>,
    /// Per APPLICATION client, the value of `claims` when its log's end was last read: an
    /// append to a log read before the latest claim reads its end again first.
    checked: Arc<parking_lot::Mutex<HashMap<Arc<str>, u64>>>,
    apps: Arc<ApplicationLogs>,
    shared: Arc<SharedGroups>,
    pg: Arc<PgStore>,
    app_topic_config: Vec<(&'static str, String)>,
}

impl KafkaPostgresStorage {
    /// Connects to both services (failing with a message that names the unreachable one), applies
    /// the PostgreSQL migrations, takes the schema's node lock and prepares the publish log.
    pub async fn connect(
        config: &Config,
        metrics: Arc<Metrics>,
    ) -> Result<KafkaPostgresStorage, StorageError> {
        let kafka = Kafka::connect(&config.kafka, metrics.clone()).await?;
        let apps = Arc::new(ApplicationLogs::new(kafka.clone()));
        let cluster = config.cluster.enabled;
        let (pg, lock) = PgStore::connect(
            &config.postgres,
            config.device.queue_limit,
            metrics,
            cluster,
        )
        .await?;
        let pg = Arc::new(pg);
        let log = Arc::new(KafkaPublishLog::new(kafka.clone()));
        let claims = Arc::new(AtomicU64::new(0));
        let reader = KafkaLogReader::open(&kafka, &pg, &config.cluster, claims.clone()).await?;
        // Opened here, before the broker loads its retained snapshot (see `kafka::local`).
        let local = if cluster {
            Some(KafkaLocalReader::open(&kafka, &pg, &config.cluster.node_id()).await?)
        } else {
            None
        };
        let wakes = if cluster {
            let (tx, rx) = tokio::sync::mpsc::channel(super::wake::WAKE_QUEUE);
            let options = super::postgres::schema_options(&config.postgres).await?;
            let channel = super::wake::channel(&config.postgres.schema);
            tokio::spawn(super::wake::listen(options, channel, tx));
            Some(rx)
        } else {
            None
        };
        tokio::spawn(watch_health(
            kafka.clone(),
            pg.clone(),
            lock,
            config.postgres.url.clone(),
        ));
        let app_topic_config = ApplicationLogs::topic_config(
            config.application.retention_secs.saturating_mul(1000),
            config.application.retention_bytes,
        );
        let shared = Arc::new(SharedGroups::new(
            kafka.clone(),
            apps.clone(),
            config.kafka.shared_group_partitions,
            app_topic_config.clone(),
        ));
        Ok(KafkaPostgresStorage {
            kafka,
            log,
            reader: parking_lot::Mutex::new(Some(reader)),
            local: parking_lot::Mutex::new(local),
            wakes: parking_lot::Mutex::new(wakes),
            appended: Default::default(),
            recheck: Default::default(),
            claims,
            checked: Default::default(),
            apps,
            shared,
            pg,
            app_topic_config,
        })
    }

    /// The publish log's ingest side.
    pub fn publish_log(&self) -> Arc<dyn PublishLog> {
        self.log.clone()
    }

    /// The publish log's dispatch side; there is one, taken once.
    pub fn take_log_reader(&self) -> Option<Box<dyn LogReader>> {
        self.reader
            .lock()
            .take()
            .map(|r| Box::new(r) as Box<dyn LogReader>)
    }

    /// In a cluster, this node's local reader of the publish log; taken once.
    pub fn take_local_reader(&self) -> Option<Box<dyn LocalLogReader>> {
        self.local
            .lock()
            .take()
            .map(|r| Box::new(r) as Box<dyn LocalLogReader>)
    }
}

/// A change to an APPLICATION client's "PUBREC received" marks.
enum ReleasedChange {
    Add(u64),
    /// Everything below this sequence was acknowledged.
    Below(u64),
    /// The session is gone.
    All,
}

/// What producing a batch's APPLICATION and group appends needs, cloned into the task that
/// waits for them.
#[derive(Clone)]
struct Appender {
    kafka: Arc<Kafka>,
    apps: Arc<ApplicationLogs>,
    shared: Arc<SharedGroups>,
    appended: Arc<parking_lot::Mutex<HashMap<Arc<str>, Origins>>>,
    recheck: Arc<AtomicBool>,
    checked: Arc<parking_lot::Mutex<HashMap<Arc<str>, u64>>>,
}

/// Appends handed to Kafka, and what to do once they are acknowledged.
struct Produced {
    waits: Vec<Completion>,
    /// Group appends: appended in order once their topics exist.
    shared: Vec<WriteOp>,
    /// Online readers of the appended logs.
    wake: Vec<Arc<Notify>>,
}

impl KafkaPostgresStorage {
    /// What `batch` changes in the APPLICATION logs' "PUBREC received" marks that reads consult
    /// (`ApplicationLogs::released`, loaded from `application_released` at start): applied once
    /// PostgreSQL committed the batch, so the marks never run ahead of what a restart would
    /// load.
    fn released_changes(&self, batch: &WriteBatch) -> Option<OnCommit> {
        let mut changes: Vec<(Arc<str>, ReleasedChange)> = Vec::new();
        for op in &batch.ops {
            match op {
                WriteOp::MarkReleased {
                    client,
                    kind: ClientKind::Application,
                    seq,
                } => changes.push((client.clone(), ReleasedChange::Add(*seq))),
                WriteOp::CommitApplication {
                    client,
                    next_offset,
                } => changes.push((client.clone(), ReleasedChange::Below(*next_offset))),
                WriteOp::DeleteSession { client } => {
                    changes.push((client.clone(), ReleasedChange::All))
                }
                _ => {}
            }
        }
        if changes.is_empty() {
            return None;
        }
        let released = self.apps.released.clone();
        Some(Box::new(move || {
            let mut map = released.lock();
            for (client, change) in changes {
                match change {
                    ReleasedChange::Add(seq) => {
                        map.entry(client).or_default().insert(seq);
                    }
                    ReleasedChange::Below(seq) => {
                        if let Some(set) = map.get_mut(&client) {
                            *set = set.split_off(&seq);
                        }
                    }
                    ReleasedChange::All => {
                        map.remove(&client);
                    }
                }
            }
        }))
    }

    fn appender(&self) -> Appender {
        Appender {
            kafka: self.kafka.clone(),
            apps: self.apps.clone(),
            shared: self.shared.clone(),
            appended: self.appended.clone(),
            recheck: self.recheck.clone(),
            checked: self.checked.clone(),
        }
    }

    /// Whether an APPLICATION log that `appends` go to was last read before this node's
    /// latest partition claim (its end must be read again before appending).
    fn read_before_claim(&self, appends: &[WriteOp], claims: u64) -> bool {
        if claims == 0 {
            return false;
        }
        let checked = self.checked.lock();
        appends.iter().any(|op| match op {
            WriteOp::Enqueue {
                client,
                origin: Some(_),
                ..
            } => checked.get(client).copied().unwrap_or(0) < claims,
            WriteOp::AppendShared {
                group,
                filter,
                delivery,
                origin: Some(_),
            } => self
                .shared
                .read_before_claim(group, filter, &delivery.message.publisher, claims),
            _ => false,
        })
    }
}

impl Appender {
    /// Hands the APPLICATION appends to the producer, in order, except those the logs have
    /// already (their readers are woken all the same).
    fn produce(&self, appends: Vec<WriteOp>) -> Produced {
        let mut produced = Produced {
            waits: Vec::new(),
            shared: Vec::new(),
            wake: Vec::new(),
        };
        let appended = self.appended.lock();
        for op in appends {
            match op {
                WriteOp::Enqueue {
                    client,
                    delivery,
                    notify,
                    origin,
                    ..
                } => {
                    produced.wake.extend(notify);
                    if let Some((p, o)) = origin {
                        if already_appended(appended.get(&client), p, o) {
                            continue;
                        }
                    }
                    let tag = match origin {
                        Some((p, o)) => Tag::Origin(p, o),
                        None => Tag::None,
                    };
                    produced
                        .waits
                        .push(self.apps.append(&client, &delivery, tag));
                    self.kafka.metrics.application_messages_stored.inc();
                }
                shared @ WriteOp::AppendShared { .. } => produced.shared.push(shared),
                _ => {}
            }
        }
        produced
    }

    /// Waits until Kafka acknowledged every append (group topics are checked for appends made
    /// before where their partition is known, `shared::append`), then wakes the readers. A
    /// failure makes the next batch recheck the logs' ends.
    async fn finish(&self, mut produced: Produced) -> Result<(), StorageError> {
        for op in produced.shared {
            if let WriteOp::AppendShared {
                group,
                filter,
                delivery,
                origin,
            } = op
            {
                produced
                    .waits
                    .push(self.shared.append(&group, &filter, &delivery, origin).await);
            }
        }
        let mut result = Ok(());
        for wait in produced.waits {
            if let Err(e) = wait.await.unwrap_or(Err(StorageError::Closed)) {
                result = Err(e);
            }
        }
        match result {
            Ok(()) => {
                for n in produced.wake {
                    n.notify_one();
                }
            }
            Err(_) => self.recheck.store(true, Ordering::Release),
        }
        result
    }

    /// Reads the ends of the APPLICATION logs and group topic partitions `appends` go to and
    /// raises the known origins to what is found there. `Err` when a log's end could not be
    /// read (Kafka unreachable).
    async fn drop_appended(&self, appends: &[WriteOp], claims: u64) -> Result<(), StorageError> {
        let mut groups: Vec<(&str, &str, &str)> = appends
            .iter()
            .filter_map(|op| match op {
                WriteOp::AppendShared {
                    group,
                    filter,
                    delivery,
                    origin: Some(_),
                } => Some((&**group, &**filter, &*delivery.message.publisher)),
                _ => None,
            })
            .collect();
        groups.sort_unstable();
        groups.dedup();
        let mut partitions = Vec::new();
        for (group, filter, publisher) in groups {
            partitions.push(self.shared.partition_of(group, filter, publisher).await?);
        }
        partitions.sort_unstable();
        partitions.dedup();
        for key in partitions {
            self.shared.recheck(key, claims).await?;
        }
        let clients: HashSet<Arc<str>> = appends
            .iter()
            .filter_map(|op| match op {
                WriteOp::Enqueue {
                    client,
                    origin: Some(_),
                    ..
                } => Some(client.clone()),
                _ => None,
            })
            .collect();
        for client in clients {
            let found = self.apps.tail(&client).await?.origins;
            self.checked.lock().insert(client.clone(), claims);
            let mut appended = self.appended.lock();
            let known = appended.entry(client).or_default();
            for (p, o) in found {
                note_origin(known, p, o);
            }
        }
        Ok(())
    }
}

/// Probes both services, logs every change of state, and keeps the node lock: when its
/// connection dies (PostgreSQL restarted) a new one takes the lock again; when another node took
/// it meanwhile, the process exits. In a cluster there is no lock (`None`): only the probes.
async fn watch_health(
    kafka: Arc<Kafka>,
    pg: Arc<PgStore>,
    lock: Option<PgConnection>,
    url: String,
) {
    let locked = lock.is_some();
    let lock = Mutex::new(lock);
    let mut tick = tokio::time::interval(PROBE_INTERVAL);
    loop {
        tick.tick().await;
        kafka.probe().await;
        if !pg.probe().await || !locked {
            continue;
        }
        let mut held = lock.lock().await;
        let alive = match held.as_mut() {
            Some(conn) => sqlx::query("SELECT 1").execute(&mut *conn).await.is_ok(),
            None => false,
        };
        if !alive {
            *held = None;
            let options =
                match <sqlx::postgres::PgConnectOptions as std::str::FromStr>::from_str(&url) {
                    Ok(o) => o.options([("search_path", pg.schema())]),
                    Err(_) => continue,
                };
            match sqlx::Connection::connect_with(&options).await {
                Ok(mut conn) => match take_node_lock(&mut conn, pg.schema()).await {
                    Ok(()) => {
                        tracing::info!(
                            schema = pg.schema(),
                            "node lock taken again after a postgres reconnect"
                        );
                        *held = Some(conn);
                    }
                    Err(StorageError::NodeLockHeld(schema)) => {
                        // Another node (a standby) holds the lock now and is taking over: two
                        // nodes must never write one schema, so this one stops at once, without
                        // the graceful shutdown that would write more.
                        tracing::error!(
                            schema,
                            "lost the node lock to another broker node; exiting now so that only one node writes"
                        );
                        std::process::exit(3);
                    }
                    Err(e) => tracing::error!(error = %e, "cannot take the node lock again"),
                },
                Err(e) => tracing::warn!(error = %e, "reconnecting the node lock failed"),
            }
        }
    }
}

#[async_trait::async_trait]
impl Storage for KafkaPostgresStorage {
    fn submit(&self, mut batch: WriteBatch) -> Completion {
        let on_commit = self.released_changes(&batch);
        let has_app = batch.ops.iter().any(|op| {
            matches!(
                op,
                WriteOp::Enqueue {
                    kind: ClientKind::Application,
                    ..
                } | WriteOp::AppendShared { .. }
            )
        });
        if !has_app {
            return self.pg.submit_after(batch, None, on_commit, Vec::new());
        }
        // The APPLICATION and group appends leave the batch; the rest goes to PostgreSQL once
        // Kafka has them all.
        let (appends, rest): (Vec<WriteOp>, Vec<WriteOp>) =
            std::mem::take(&mut batch.ops).into_iter().partition(|op| {
                matches!(
                    op,
                    WriteOp::AppendShared { .. }
                        | WriteOp::Enqueue {
                            kind: ClientKind::Application,
                            ..
                        }
                )
            });
        batch.ops = rest;
        // In a cluster the client may be connected to another node: the writer notifies it
        // at commit, when these appends are in Kafka (`storage::wake`).
        let woken: Vec<Arc<str>> = appends
            .iter()
            .filter_map(|op| match op {
                WriteOp::Enqueue { client, .. } => Some(client.clone()),
                _ => None,
            })
            .collect();
        let (appended, after) = oneshot::channel();
        let this = self.appender();
        let claims = self.claims.load(Ordering::Acquire);
        if self.recheck.load(Ordering::Acquire) || self.read_before_claim(&appends, claims) {
            // After a failure, or into a log last read before a partition was claimed from
            // another node: learn from the logs' ends what made it before producing again.
            // Nothing else appends to APPLICATION logs while the dispatcher waits for this.
            tokio::spawn(async move {
                let result = match this.drop_appended(&appends, claims).await {
                    Ok(()) => {
                        this.recheck.store(false, Ordering::Release);
                        let produced = this.produce(appends);
                        this.finish(produced).await
                    }
                    Err(e) => Err(e),
                };
                let _ = appended.send(result);
            });
        } else {
            // Produced now, in submission order.
            let produced = this.produce(appends);
            tokio::spawn(async move {
                let _ = appended.send(this.finish(produced).await);
            });
        }
        self.pg.submit_after(batch, Some(after), on_commit, woken)
    }

    fn take_wakes(&self) -> Option<tokio::sync::mpsc::Receiver<super::wake::Wake>> {
        self.wakes.lock().take()
    }

    fn flush(&self) -> Completion {
        self.kafka.flush(Duration::from_secs(5));
        self.pg.submit(WriteBatch::default())
    }

    async fn load(&self) -> Result<Snapshot, StorageError> {
        let (mut snapshot, released) = self.pg.load().await?;
        {
            let mut map = self.apps.released.lock();
            for (client, seq) in released {
                map.entry(client).or_default().insert(seq);
            }
        }
        let shared_filters: Vec<String> = snapshot
            .sessions
            .iter()
            .filter(|s| s.record.kind == ClientKind::Application)
            .flat_map(|s| s.subscriptions.iter().map(|(f, _)| f.clone()))
            .filter(|f| f.starts_with("$share/"))
            .collect();
        self.shared.scan_group_topics(&shared_filters).await;
        // Each tail scan is a few round trips to Kafka: scan several logs at once, or a broker
        // with many APPLICATION clients starts slowly.
        let clients: Vec<Arc<str>> = snapshot
            .sessions
            .iter()
            .filter(|s| s.record.kind == ClientKind::Application)
            .map(|s| s.client.clone())
            .collect();
        let apps = &self.apps;
        let mut scanned: HashMap<Arc<str>, _> = stream::iter(clients)
            .map(|client| async move {
                let tail = apps.tail(&client).await;
                let next = apps.next_seq(&client).await;
                (client, (tail, next))
            })
            .buffer_unordered(TAIL_SCAN_CONCURRENCY)
            .collect()
            .await;
        for session in &mut snapshot.sessions {
            let Some((tail, next)) = scanned.remove(&session.client) else {
                continue;
            };
            match tail {
                Ok(tail) => {
                    tracing::info!(client_id = %session.client, origins = ?tail.origins, claims = ?tail.claims, "APPLICATION log tail read; a replay skips appends up to these offsets");
                    self.appended
                        .lock()
                        .insert(session.client.clone(), tail.origins);
                    self.checked
                        .lock()
                        .insert(session.client.clone(), self.claims.load(Ordering::Acquire));
                    self.shared.claimed_at_start(tail.claims);
                }
                Err(e) => {
                    tracing::warn!(client_id = %session.client, error = %e, "reading the end of an APPLICATION topic failed");
                }
            }
            // The log's end is in Kafka; a topic deleted out of band leaves nothing to read.
            session.next_seq = match next {
                Ok(n) => n.max(session.read_from),
                Err(e) => {
                    tracing::warn!(client_id = %session.client, error = %e, "APPLICATION topic not readable at start");
                    session.read_from
                }
            };
        }
        Ok(snapshot)
    }

    fn read_queue(
        &self,
        client: &Arc<str>,
        kind: ClientKind,
        from: u64,
        limit: usize,
    ) -> QueueRead {
        match kind {
            ClientKind::Device => QueueRead::Pending(self.pg.read_device(client, from, limit)),
            ClientKind::Application => self.apps.read(client, from, limit),
        }
    }

    async fn sweep(&self, now_ms: u64, budget: usize) -> Result<SweepStats, StorageError> {
        self.pg.sweep(now_ms, budget).await
    }

    fn health(&self) -> Result<(), StorageError> {
        if !self.kafka.is_healthy() {
            return Err(StorageError::engine_msg(format!(
                "kafka at `{}` is unreachable",
                self.kafka.config.bootstrap_servers
            )));
        }
        if !self.pg.is_healthy() {
            return Err(StorageError::engine_msg("postgres is unreachable"));
        }
        Ok(())
    }

    async fn prepare_application(&self, client: &Arc<str>) -> Result<Option<u64>, StorageError> {
        let end = self.apps.prepare(client, &self.app_topic_config).await?;
        Ok(Some(self.pg.application_start(client, end).await?))
    }

    fn client_offline(&self, client: &str) {
        self.shared.member_offline(client);
        self.apps.drop_reader(client);
    }

    async fn load_session(
        &self,
        client: &Arc<str>,
    ) -> Result<Option<super::RestoredSession>, StorageError> {
        let Some(mut session) = self.pg.load_session(client).await? else {
            return Ok(None);
        };
        if session.record.kind == ClientKind::Application {
            session.next_seq = self.apps.next_seq(client).await?.max(session.read_from);
        }
        Ok(Some(session))
    }

    async fn renew_lease(&self, node: &str, until_ms: u64) -> Result<(), StorageError> {
        self.pg.renew_lease(node, until_ms).await
    }

    async fn take_lapsed_nodes(&self, me: &str, now_ms: u64) -> Result<Vec<String>, StorageError> {
        self.pg.take_lapsed_nodes(me, now_ms).await
    }

    async fn own_session(&self, client: &Arc<str>, epoch: i64) -> Result<(), StorageError> {
        self.pg.own_session(client, epoch).await
    }

    async fn claim_due_timers(
        &self,
        now_ms: u64,
        budget: usize,
        lease_ms: u64,
    ) -> Result<Vec<super::DueTimer>, StorageError> {
        self.pg.claim_due_timers(now_ms, budget, lease_ms).await
    }

    async fn finish_timer(&self, timer: &super::DueTimer) -> Result<bool, StorageError> {
        self.pg.finish_timer(timer).await
    }

    fn application_shared(
        &self,
        client: &Arc<str>,
        subscriptions: Vec<(String, SubscriptionOptions)>,
        wake: Arc<Notify>,
    ) {
        self.shared.set_member(client, subscriptions, wake);
    }

    fn shared_groups_in_log(&self) -> bool {
        true
    }

    fn queue_totals(&self) -> Result<Option<QueueTotals>, StorageError> {
        // Called on a blocking thread (once per scrape): waiting here stalls no connection.
        tokio::runtime::Handle::current()
            .block_on(self.totals())
            .map(Some)
    }
}

impl KafkaPostgresStorage {
    /// DEVICE entries in PostgreSQL; APPLICATION log sizes and lag from each client's topic
    /// watermarks and its committed offset.
    async fn totals(&self) -> Result<QueueTotals, StorageError> {
        let (device_queued, offsets) = self.pg.queue_counts().await?;
        let mut totals = QueueTotals {
            device_queued,
            ..QueueTotals::default()
        };
        for (client, committed_seq) in offsets {
            let topic = self.apps.topic(&client);
            let Ok((low, high)) = self.kafka.watermarks(&topic, 0).await else {
                continue;
            };
            totals.application_log += (high - low).max(0) as u64;
            // Sequence numbers are offsets + 1: the committed sequence is the first entry not
            // yet acknowledged.
            totals.application_lag += (high - (committed_seq - 1).max(low)).max(0) as u64;
        }
        Ok(totals)
    }
}
