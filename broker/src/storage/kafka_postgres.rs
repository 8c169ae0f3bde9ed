//! The production backend: Kafka for logs, PostgreSQL for everything else.
//!
//! * PUBLISH → `<prefix>.msg.all` ([`PublishLog`], used by the connection directly).
//! * Router → DEVICE queues in PostgreSQL, APPLICATION logs in `<prefix>.app.<client>`.
//! * Sessions, subscriptions, retained messages, in-flight marks, APPLICATION offsets →
//!   PostgreSQL.
//!
//! A batch that holds APPLICATION appends is produced first and its PostgreSQL part is applied
//! after Kafka acknowledged them; the completion resolves when both are done. The PostgreSQL
//! writer waits for those appends before it applies that batch or any submitted after it, so
//! batches are applied in submission order whoever submits them (the `Storage` contract). The
//! price: while Kafka does not answer, PostgreSQL writes queue behind such a batch for up to
//! `kafka.produce_timeout_ms`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{self, StreamExt};
use sqlx::PgConnection;
use tokio::sync::{oneshot, Mutex, Notify};

use super::kafka::app::{ApplicationLogs, Tag};
use super::kafka::shared::SharedGroups;
use super::kafka::{Kafka, PublishLog};
use super::postgres::{take_node_lock, PgStore, ReleasedHook};
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
    log: Arc<PublishLog>,
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
        let released: ReleasedHook = apps.released.clone();
        let (pg, lock) = PgStore::connect(
            &config.postgres,
            config.device.queue_limit,
            metrics,
            released,
        )
        .await?;
        let pg = Arc::new(pg);
        let log = Arc::new(PublishLog::open(kafka.clone(), &pg).await?);
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
            apps,
            shared,
            pg,
            app_topic_config,
        })
    }

    pub fn publish_log(&self) -> Arc<PublishLog> {
        self.log.clone()
    }
}

/// Probes both services, logs every change of state, and keeps the node lock: when its
/// connection dies (PostgreSQL restarted) a new one takes the lock again; when another node took
/// it meanwhile, the process exits.
async fn watch_health(kafka: Arc<Kafka>, pg: Arc<PgStore>, lock: PgConnection, url: String) {
    let lock = Mutex::new(Some(lock));
    let mut tick = tokio::time::interval(PROBE_INTERVAL);
    loop {
        tick.tick().await;
        kafka.probe().await;
        if !pg.probe().await {
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
            return self.pg.submit(batch);
        }
        // Produce the APPLICATION appends now, in order; the rest goes to PostgreSQL once Kafka
        // has them all.
        let mut produced = Vec::new();
        let mut wake = Vec::new();
        let mut shared = Vec::new();
        batch.ops.retain_mut(|op| match op {
            WriteOp::AppendShared {
                group,
                filter,
                record,
                origin,
            } => {
                shared.push((
                    group.clone(),
                    filter.clone(),
                    std::mem::take(record),
                    *origin,
                ));
                false
            }
            WriteOp::Enqueue {
                client,
                kind: ClientKind::Application,
                record,
                notify,
                origin,
            } => {
                let tag = match origin {
                    Some((p, o)) => Tag::Origin(*p, *o),
                    None => Tag::None,
                };
                // The op is dropped here: its record moves on without a copy.
                let record = bytes::Bytes::from(std::mem::take(record));
                produced.push(self.apps.append(client, record, tag));
                self.kafka.metrics.application_messages_stored.inc();
                if let Some(n) = notify.take() {
                    wake.push(n);
                }
                false
            }
            _ => true,
        });
        let groups = self.shared.clone();
        let (appended, after) = oneshot::channel();
        tokio::spawn(async move {
            let mut result = Ok(());
            // Group topics may need creating first; appended in the router's order.
            for (group, filter, record, origin) in shared {
                produced.push(
                    groups
                        .append(&group, &filter, bytes::Bytes::from(record), origin)
                        .await,
                );
            }
            for p in produced {
                if let Err(e) = p.await.unwrap_or(Err(StorageError::Closed)) {
                    result = Err(e);
                }
            }
            if result.is_ok() {
                for n in wake {
                    n.notify_one();
                }
            }
            let _ = appended.send(result);
        });
        self.pg.submit_after(batch, Some(after))
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
                    self.log
                        .skip
                        .lock()
                        .insert(session.client.clone(), tail.origins);
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
