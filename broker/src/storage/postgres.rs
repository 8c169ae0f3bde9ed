//! PostgreSQL: the session store and the DEVICE queues for `storage.backend = "kafka+postgres"`.
//!
//! One writer task applies batches in submission order, group-committing everything queued into
//! one transaction: DEVICE appends become one multi-row `INSERT … SELECT FROM UNNEST(…)`, acks
//! one `DELETE … USING UNNEST(…)`, so a router batch of a thousand messages is a handful of
//! statements, not a thousand round trips. With `cluster.enabled = false`, sequence numbers,
//! queue lengths and the set of live sessions are kept in memory by the writer (it is their only
//! writer; the node lock makes it the only one in the cluster) and rebuilt from the tables when
//! a transaction fails. With `cluster.enabled = true` several nodes write the schema: the group's
//! transaction locks the DEVICE sessions it appends to (`SELECT … ORDER BY client_id FOR
//! UPDATE`, one statement, in key order so two writers cannot deadlock on them), takes their
//! `next_seq` from there, and trims each queue to the `device.queue_limit` newest sequence
//! numbers in SQL: nothing of it lives in one node's memory.
//!
//! **Fencing.** Router batches carry the epoch of the partition claim they were read under
//! (`WriteOp::RouterPosition`). The transaction first locks those partitions' rows `FOR UPDATE`
//! and leaves out every batch whose epoch is no longer the stored one (it fails with
//! [`StorageError::Fenced`]); the other batches of the group are applied. A claim by another
//! node (`claim_partition`) waits for that lock, so it reads the position this transaction
//! stores, and no transaction after it can store for the old epoch.
//!
//! Schema layout: `common/migrations/postgres/` (embedded with `sqlx::migrate!`), applied at
//! start inside `postgres.schema`.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool, Postgres, Row, Transaction};
use tokio::sync::{mpsc, oneshot, Notify};

use super::codec::{self, decode_delivery, now_ms};
use super::{
    ClientKind, Completion, DueTimer, Qos2FlowChange, QueuedEntry, RestoredSession, SessionRecord,
    Snapshot, StorageError, SweepStats, WriteBatch, WriteOp,
};
use crate::config::PostgresConfig;
use crate::metrics::Metrics;

/// The tables that hold a session's state, all keyed by `client_id`: deleting a session is
/// deleting its rows from each.
const SESSION_TABLES: [&str; 7] = [
    "sessions",
    "subscriptions",
    "device_queue",
    "application_offsets",
    "application_released",
    "inbound_qos2",
    "session_timers",
];
/// Batches waiting for the writer at most; beyond it submissions fail with `Overloaded`.
const WRITE_QUEUE_CAPACITY: usize = 16_384;
/// Batches group-committed in one transaction at most.
const MAX_GROUP: usize = 1_024;

fn db(e: sqlx::Error) -> StorageError {
    StorageError::engine("postgres", e)
}

fn kind_code(kind: ClientKind) -> i16 {
    match kind {
        ClientKind::Device => 0,
        ClientKind::Application => 1,
    }
}

fn kind_from(code: i16) -> Result<ClientKind, StorageError> {
    match code {
        0 => Ok(ClientKind::Device),
        1 => Ok(ClientKind::Application),
        other => Err(StorageError::Corrupt(format!("session kind {other}"))),
    }
}

enum Request {
    Batch {
        batch: WriteBatch,
        /// Writes to another system this batch must follow: the writer waits for it before the
        /// batch (and everything submitted after it) is applied, and fails the batch with its
        /// error. This is what keeps batches in submission order when part of one goes to
        /// Kafka first.
        after: Option<Completion>,
        /// Runs once the batch is committed, before its completion resolves: how a caller
        /// keeps an in-memory view of what the batch changed (see [`OnCommit`]).
        on_commit: Option<OnCommit>,
        /// Sessions to notify in a cluster besides the DEVICE ones the batch appends to (the
        /// APPLICATION clients whose logs the batch's Kafka part appended to).
        wake: Vec<Arc<str>>,
        done: oneshot::Sender<Result<(), StorageError>>,
    },
    Sweep {
        now_ms: u64,
        budget: usize,
        done: oneshot::Sender<Result<SweepStats, StorageError>>,
    },
}

/// The PostgreSQL half of the backend.
pub struct PgStore {
    pool: PgPool,
    tx: mpsc::Sender<Request>,
    healthy: Arc<AtomicBool>,
    schema: String,
}

impl PgStore {
    /// Connects, takes the node lock, applies migrations and starts the writer. Fails with a
    /// message naming the URL's host when PostgreSQL cannot be reached. In a cluster
    /// (`cluster`: several nodes share the schema) there is no node lock, the writer
    /// notifies the sessions it stores entries for (`storage::wake`), and DEVICE sequence
    /// numbers come from the locked session rows (module docs).
    pub async fn connect(
        config: &PostgresConfig,
        device_queue_limit: u64,
        metrics: Arc<Metrics>,
        cluster: bool,
    ) -> Result<(PgStore, Option<PgConnection>), StorageError> {
        let options = schema_options(config).await?;
        // The node lock: one broker per schema. It lives as long as this connection.
        let lock = if !cluster {
            let mut lock = PgConnection::connect_with(&options)
                .await
                .map_err(|e| unreachable(config, e))?;
            take_node_lock(&mut lock, &config.schema).await?;
            Some(lock)
        } else {
            None
        };
        let pool = PgPoolOptions::new()
            .max_connections(config.max_connections)
            .acquire_timeout(Duration::from_secs(config.connect_timeout_secs))
            .connect_with(options)
            .await
            .map_err(|e| unreachable(config, e))?;
        migrate(&pool, &config.schema).await?;
        let (tx, rx) = mpsc::channel(WRITE_QUEUE_CAPACITY);
        let healthy = Arc::new(AtomicBool::new(true));
        let mut writer = Writer {
            pool: pool.clone(),
            device_queue_limit,
            live: HashSet::new(),
            device: HashMap::new(),
            cluster,
            txn_seqs: HashMap::new(),
            metrics,
            healthy: healthy.clone(),
            wake_channel: cluster.then(|| super::wake::channel(&config.schema)),
        };
        writer.reload().await?;
        let store = PgStore {
            pool,
            tx,
            healthy,
            schema: config.schema.clone(),
        };
        store.spawn_writer(writer, rx);
        Ok((store, lock))
    }

    fn spawn_writer(&self, writer: Writer, rx: mpsc::Receiver<Request>) {
        tokio::spawn(writer.run(rx));
    }

    pub fn schema(&self) -> &str {
        &self.schema
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    /// Runs `SELECT 1` and records whether it worked; returns the new state.
    pub async fn probe(&self) -> bool {
        let ok = sqlx::query("SELECT 1").execute(&self.pool).await.is_ok();
        let was = self.healthy.swap(ok, Ordering::AcqRel);
        if was != ok {
            if ok {
                tracing::info!("postgres is reachable again");
            } else {
                tracing::error!("postgres is unreachable; persistent sessions cannot be stored until it returns");
            }
        }
        ok
    }

    /// Queues a batch for the writer; never blocks.
    pub fn submit(&self, batch: WriteBatch) -> Completion {
        self.submit_after(batch, None, None, Vec::new())
    }

    /// Queues a batch that is applied only once `after` succeeded, and runs `on_commit` once
    /// it is committed (see `Request::Batch`).
    pub fn submit_after(
        &self,
        batch: WriteBatch,
        after: Option<Completion>,
        on_commit: Option<OnCommit>,
        wake: Vec<Arc<str>>,
    ) -> Completion {
        let (done, completion) = oneshot::channel();
        let request = Request::Batch {
            batch,
            after,
            on_commit,
            wake,
            done,
        };
        if let Err(e) = self.tx.try_send(request) {
            let (request, error) = match e {
                mpsc::error::TrySendError::Full(r) => (r, StorageError::Overloaded),
                mpsc::error::TrySendError::Closed(r) => (r, StorageError::Closed),
            };
            if let Request::Batch { done, .. } = request {
                let _ = done.send(Err(error));
            }
        }
        completion
    }

    pub async fn sweep(&self, now_ms: u64, budget: usize) -> Result<SweepStats, StorageError> {
        let (done, rx) = oneshot::channel();
        self.tx
            .try_send(Request::Sweep {
                now_ms,
                budget,
                done,
            })
            .map_err(|_| StorageError::Overloaded)?;
        rx.await.unwrap_or(Err(StorageError::Closed))
    }

    /// Up to `limit` live DEVICE entries with `seq >= from`, read on a pooled connection.
    pub fn read_device(
        &self,
        client: &Arc<str>,
        from: u64,
        limit: usize,
    ) -> oneshot::Receiver<Result<Vec<QueuedEntry>, StorageError>> {
        let (tx, rx) = oneshot::channel();
        let pool = self.pool.clone();
        let client = client.clone();
        tokio::spawn(async move {
            let _ = tx.send(read_device(&pool, &client, from, limit).await);
        });
        rx
    }

    /// Entries in all DEVICE queues, and every APPLICATION client's committed sequence.
    pub async fn queue_counts(&self) -> Result<(u64, Vec<(String, i64)>), StorageError> {
        let device: i64 = sqlx::query_scalar("SELECT count(*) FROM device_queue")
            .fetch_one(&self.pool)
            .await
            .map_err(db)?;
        let offsets = sqlx::query("SELECT client_id, committed_seq FROM application_offsets")
            .fetch_all(&self.pool)
            .await
            .map_err(db)?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        Ok((device.max(0) as u64, offsets))
    }

    /// The APPLICATION client's committed position, created at `start` when it has none.
    pub async fn application_start(&self, client: &str, start: u64) -> Result<u64, StorageError> {
        sqlx::query(
            "INSERT INTO application_offsets (client_id, committed_seq) VALUES ($1, $2) \
             ON CONFLICT (client_id) DO NOTHING",
        )
        .bind(client)
        .bind(start as i64)
        .execute(&self.pool)
        .await
        .map_err(db)?;
        let committed: i64 = sqlx::query_scalar(
            "SELECT committed_seq FROM application_offsets WHERE client_id = $1",
        )
        .bind(client)
        .fetch_one(&self.pool)
        .await
        .map_err(db)?;
        Ok(committed.max(1) as u64)
    }

    /// Every open QoS 2 flow of the log router: publisher → packet ids.
    pub async fn router_qos2_flows(&self) -> Result<HashMap<Arc<str>, HashSet<u16>>, StorageError> {
        self.qos2_flows(None).await
    }

    /// The log router's open QoS 2 flows routed from `partitions` (and those recorded before
    /// flows had a partition): publisher → packet ids.
    pub async fn router_qos2_flows_of(
        &self,
        partitions: &[i32],
    ) -> Result<HashMap<Arc<str>, HashSet<u16>>, StorageError> {
        self.qos2_flows(Some(partitions)).await
    }

    async fn qos2_flows(
        &self,
        partitions: Option<&[i32]>,
    ) -> Result<HashMap<Arc<str>, HashSet<u16>>, StorageError> {
        let rows = sqlx::query(
            "SELECT client_id, pkid FROM router_qos2_flows \
             WHERE $1::int4[] IS NULL OR partition = ANY($1) OR partition < 0",
        )
        .bind(partitions)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        let mut flows: HashMap<Arc<str>, HashSet<u16>> = HashMap::new();
        for row in rows {
            let client: String = row.get(0);
            let pkid: i32 = row.get(1);
            if let Ok(pkid) = u16::try_from(pkid) {
                flows.entry(client.into()).or_default().insert(pkid);
            }
        }
        Ok(flows)
    }

    /// The log router's stored positions: partition → next offset.
    pub async fn router_positions(&self) -> Result<HashMap<i32, i64>, StorageError> {
        let rows = sqlx::query("SELECT partition, next_offset FROM router_offsets")
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Claims a publish-log partition for `node`: bumps its epoch (every batch stored under an
    /// older epoch is refused from now on) and returns the new epoch and the stored position.
    /// The row is created at `start` first when missing. The update waits for a transaction of
    /// the previous owner that holds the row, so the position returned includes it.
    pub async fn claim_partition(
        &self,
        partition: i32,
        node: &str,
        start: i64,
    ) -> Result<(i64, i64), StorageError> {
        sqlx::query(
            "INSERT INTO router_offsets (partition, next_offset) VALUES ($1, $2) \
             ON CONFLICT (partition) DO NOTHING",
        )
        .bind(partition)
        .bind(start)
        .execute(&self.pool)
        .await
        .map_err(db)?;
        let row = sqlx::query(
            "UPDATE router_offsets SET owner_node = $2, epoch = epoch + 1 \
             WHERE partition = $1 RETURNING epoch, next_offset",
        )
        .bind(partition)
        .bind(node)
        .fetch_one(&self.pool)
        .await
        .map_err(db)?;
        Ok((row.get(0), row.get(1)))
    }

    /// Records starting positions (first start, or partitions added since) before the router
    /// runs; existing rows are kept.
    pub async fn init_router_positions(
        &self,
        positions: &[(i32, i64)],
    ) -> Result<(), StorageError> {
        for (partition, offset) in positions {
            sqlx::query(
                "INSERT INTO router_offsets (partition, next_offset) VALUES ($1, $2) \
                 ON CONFLICT (partition) DO NOTHING",
            )
            .bind(partition)
            .bind(offset)
            .execute(&self.pool)
            .await
            .map_err(db)?;
        }
        Ok(())
    }

    /// Reads every session, subscription, retained message and in-flight mark. APPLICATION
    /// sessions get `next_seq` from `app_next_seq` (their log is in Kafka).
    pub async fn load(&self) -> Result<(Snapshot, Vec<(Arc<str>, u64)>), StorageError> {
        let pool = &self.pool;
        let mut subscriptions: HashMap<String, Vec<(String, crate::router::SubscriptionOptions)>> =
            HashMap::new();
        for row in sqlx::query("SELECT client_id, filter, options FROM subscriptions")
            .fetch_all(pool)
            .await
            .map_err(db)?
        {
            let options = codec::decode_options(Bytes::from(row.get::<Vec<u8>, _>(2)))
                .map_err(|e| StorageError::Corrupt(e.to_string()))?;
            subscriptions
                .entry(row.get(0))
                .or_default()
                .push((row.get(1), options));
        }
        let mut qos2: HashMap<String, Vec<u16>> = HashMap::new();
        for row in sqlx::query("SELECT client_id, pkid FROM inbound_qos2")
            .fetch_all(pool)
            .await
            .map_err(db)?
        {
            let pkid: i32 = row.get(1);
            qos2.entry(row.get(0)).or_default().push(pkid as u16);
        }
        let mut device_first: HashMap<String, i64> = HashMap::new();
        for row in sqlx::query("SELECT client_id, min(seq) FROM device_queue GROUP BY client_id")
            .fetch_all(pool)
            .await
            .map_err(db)?
        {
            device_first.insert(row.get(0), row.get(1));
        }
        let mut app_committed: HashMap<String, i64> = HashMap::new();
        for row in sqlx::query("SELECT client_id, committed_seq FROM application_offsets")
            .fetch_all(pool)
            .await
            .map_err(db)?
        {
            app_committed.insert(row.get(0), row.get(1));
        }
        let mut released: Vec<(Arc<str>, u64)> = Vec::new();
        for row in sqlx::query("SELECT client_id, seq FROM application_released")
            .fetch_all(pool)
            .await
            .map_err(db)?
        {
            let client: String = row.get(0);
            let seq: i64 = row.get(1);
            released.push((Arc::from(client), seq as u64));
        }
        let mut snapshot = Snapshot::default();
        for row in sqlx::query(
            "SELECT client_id, kind, expiry_interval, disconnected_at_ms, next_seq, sent_upto FROM sessions",
        )
        .fetch_all(pool)
        .await
        .map_err(db)?
        {
            let client: String = row.get(0);
            let kind = kind_from(row.get(1))?;
            let expiry: i64 = row.get(2);
            let next_seq: i64 = row.get(4);
            let (next_seq, read_from) = match kind {
                ClientKind::Device => {
                    let first = device_first.get(&client).copied().unwrap_or(next_seq);
                    (next_seq.max(1) as u64, first.max(1) as u64)
                }
                // next_seq is filled in from the Kafka log by the caller.
                ClientKind::Application => {
                    let committed = app_committed.get(&client).copied().unwrap_or(1);
                    (0, committed.max(1) as u64)
                }
            };
            snapshot.sessions.push(RestoredSession {
                subscriptions: subscriptions.remove(&client).unwrap_or_default(),
                inbound_qos2: qos2.remove(&client).unwrap_or_default(),
                client: Arc::from(client),
                record: SessionRecord {
                    kind,
                    expiry_interval: expiry.clamp(0, i64::from(u32::MAX)) as u32,
                    disconnected_at_ms: row.get::<i64, _>(3).max(0) as u64,
                },
                next_seq,
                read_from,
                sent_upto: row.get::<i64, _>(5).max(0) as u64,
            });
        }
        for row in sqlx::query("SELECT record FROM retained")
            .fetch_all(pool)
            .await
            .map_err(db)?
        {
            let mut bytes = Bytes::from(row.get::<Vec<u8>, _>(0));
            let message = codec::decode_message(&mut bytes)
                .map_err(|e| StorageError::Corrupt(e.to_string()))?;
            snapshot.retained.push(message);
        }
        Ok((snapshot, released))
    }
}

impl PgStore {
    /// One session's durable state, as [`PgStore::load`] reads it for all: `None` when there is
    /// no stored session. APPLICATION sessions get `next_seq` from their log (the caller).
    pub async fn load_session(
        &self,
        client: &str,
    ) -> Result<Option<RestoredSession>, StorageError> {
        let pool = &self.pool;
        let Some(row) = sqlx::query(
            "SELECT kind, expiry_interval, disconnected_at_ms, next_seq, sent_upto FROM sessions \
             WHERE client_id = $1",
        )
        .bind(client)
        .fetch_optional(pool)
        .await
        .map_err(db)?
        else {
            return Ok(None);
        };
        let kind = kind_from(row.get(0))?;
        let expiry: i64 = row.get(1);
        let next_seq: i64 = row.get(3);
        let mut subscriptions = Vec::new();
        for sub in sqlx::query("SELECT filter, options FROM subscriptions WHERE client_id = $1")
            .bind(client)
            .fetch_all(pool)
            .await
            .map_err(db)?
        {
            let options = codec::decode_options(Bytes::from(sub.get::<Vec<u8>, _>(1)))
                .map_err(|e| StorageError::Corrupt(e.to_string()))?;
            subscriptions.push((sub.get(0), options));
        }
        let inbound_qos2 = sqlx::query("SELECT pkid FROM inbound_qos2 WHERE client_id = $1")
            .bind(client)
            .fetch_all(pool)
            .await
            .map_err(db)?
            .iter()
            .map(|r| r.get::<i32, _>(0) as u16)
            .collect();
        let (next_seq, read_from) = match kind {
            ClientKind::Device => {
                let first: Option<i64> =
                    sqlx::query_scalar("SELECT min(seq) FROM device_queue WHERE client_id = $1")
                        .bind(client)
                        .fetch_one(pool)
                        .await
                        .map_err(db)?;
                let first = first.unwrap_or(next_seq);
                (next_seq.max(1) as u64, first.max(1) as u64)
            }
            ClientKind::Application => {
                let committed: Option<i64> = sqlx::query_scalar(
                    "SELECT committed_seq FROM application_offsets WHERE client_id = $1",
                )
                .bind(client)
                .fetch_optional(pool)
                .await
                .map_err(db)?;
                (0, committed.unwrap_or(1).max(1) as u64)
            }
        };
        Ok(Some(RestoredSession {
            client: Arc::from(client),
            record: SessionRecord {
                kind,
                expiry_interval: expiry.clamp(0, i64::from(u32::MAX)) as u32,
                disconnected_at_ms: row.get::<i64, _>(2).max(0) as u64,
            },
            subscriptions,
            inbound_qos2,
            next_seq,
            read_from,
            sent_upto: row.get::<i64, _>(4).max(0) as u64,
        }))
    }
}

impl PgStore {
    /// `epoch`'s connection owns `client`'s session from now on (see `Storage::own_session`):
    /// the stored owner epoch is raised (never lowered) and the session's timers are cancelled,
    /// in one transaction. Waits for a writer transaction that holds the session row, so every
    /// batch of the previous owner is either in before this or refused after it.
    pub async fn own_session(&self, client: &str, epoch: i64) -> Result<(), StorageError> {
        let mut txn = self.pool.begin().await.map_err(db)?;
        sqlx::query(
            "UPDATE sessions SET owner_epoch = $2 WHERE client_id = $1 AND owner_epoch < $2",
        )
        .bind(client)
        .bind(epoch)
        .execute(&mut *txn)
        .await
        .map_err(db)?;
        sqlx::query("DELETE FROM session_timers WHERE client_id = $1")
            .bind(client)
            .execute(&mut *txn)
            .await
            .map_err(db)?;
        txn.commit().await.map_err(db)
    }

    /// Renews (or registers) `node`'s lease.
    pub async fn renew_lease(&self, node: &str, until_ms: u64) -> Result<(), StorageError> {
        sqlx::query(
            "INSERT INTO nodes (node_id, lease_until_ms) VALUES ($1, $2) \
             ON CONFLICT (node_id) DO UPDATE SET lease_until_ms = EXCLUDED.lease_until_ms",
        )
        .bind(node)
        .bind(until_ms as i64)
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(())
    }

    /// Deletes and returns the other nodes whose lease lapsed: one caller gets each.
    pub async fn take_lapsed_nodes(
        &self,
        me: &str,
        now_ms: u64,
    ) -> Result<Vec<String>, StorageError> {
        sqlx::query_scalar(
            "DELETE FROM nodes WHERE lease_until_ms < $1 AND node_id <> $2 RETURNING node_id",
        )
        .bind(now_ms as i64)
        .bind(me)
        .fetch_all(&self.pool)
        .await
        .map_err(db)
    }

    /// Claims up to `budget` due timers for `lease_ms` (rows another node's claim holds, or
    /// another transaction locks, are skipped: `FOR UPDATE SKIP LOCKED`).
    pub async fn claim_due_timers(
        &self,
        now_ms: u64,
        budget: usize,
        lease_ms: u64,
    ) -> Result<Vec<DueTimer>, StorageError> {
        let now = now_ms as i64;
        let rows = sqlx::query(
            "UPDATE session_timers SET claim_token = nextval('session_timer_claims'), \
             claimed_until_ms = $1 + $3 \
             WHERE client_id IN (SELECT client_id FROM session_timers \
               WHERE (will_at_ms <= $1 OR expires_at_ms <= $1) AND claimed_until_ms < $1 \
               ORDER BY LEAST(will_at_ms, expires_at_ms) LIMIT $2 FOR UPDATE SKIP LOCKED) \
             RETURNING client_id, will_at_ms, will, expires_at_ms, claim_token",
        )
        .bind(now)
        .bind(budget as i64)
        .bind(lease_ms as i64)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        let mut due = Vec::with_capacity(rows.len());
        for row in rows {
            let client: String = row.get(0);
            let expires = row.get::<Option<i64>, _>(3).is_some_and(|at| at <= now);
            let will_due = row.get::<Option<i64>, _>(1).is_some_and(|at| at <= now);
            let will = match row.get::<Option<Vec<u8>>, _>(2) {
                Some(record) if will_due || expires => {
                    let mut buf = Bytes::from(record);
                    Some(
                        codec::decode_message(&mut buf)
                            .map_err(|e| StorageError::Corrupt(format!("will of {client}: {e}")))?,
                    )
                }
                _ => None,
            };
            due.push(DueTimer {
                client: Arc::from(client),
                token: row.get(4),
                will,
                expires,
            });
        }
        Ok(due)
    }

    /// Completes a claimed timer (see `Storage::finish_timer`).
    pub async fn finish_timer(&self, timer: &DueTimer) -> Result<bool, StorageError> {
        let mut txn = self.pool.begin().await.map_err(db)?;
        let held = if timer.expires {
            sqlx::query("DELETE FROM session_timers WHERE client_id = $1 AND claim_token = $2")
        } else {
            sqlx::query(
                "UPDATE session_timers SET will = NULL, will_at_ms = NULL, claim_token = 0, \
                 claimed_until_ms = 0 WHERE client_id = $1 AND claim_token = $2",
            )
        }
        .bind(&*timer.client)
        .bind(timer.token)
        .execute(&mut *txn)
        .await
        .map_err(db)?
        .rows_affected()
            > 0;
        if !held {
            return Ok(false);
        }
        if timer.expires {
            for table in SESSION_TABLES {
                sqlx::query(&format!("DELETE FROM {table} WHERE client_id = $1"))
                    .bind(&*timer.client)
                    .execute(&mut *txn)
                    .await
                    .map_err(db)?;
            }
        }
        txn.commit().await.map_err(db)?;
        Ok(true)
    }
}

/// "postgres at `<url without password>` (postgres.url): <error>"
pub fn unreachable(
    config: &PostgresConfig,
    e: impl std::error::Error + Send + Sync + 'static,
) -> StorageError {
    StorageError::engine(
        format!("postgres at `{}` (postgres.url)", redact(&config.url)),
        e,
    )
}

/// Connects once to create `postgres.schema` when it is missing, and returns the connection
/// options of the broker's own connections (search_path = the schema). Fails with a message
/// naming `postgres.url` when PostgreSQL cannot be reached.
pub async fn schema_options(config: &PostgresConfig) -> Result<PgConnectOptions, StorageError> {
    let base = PgConnectOptions::from_str(&config.url).map_err(|e| unreachable(config, e))?;
    // Create the schema before anything uses it as search_path (an operator-provisioned role
    // owns its schema already, and may lack CREATE on the database: then skip).
    let mut setup = tokio::time::timeout(
        Duration::from_secs(config.connect_timeout_secs),
        PgConnection::connect_with(&base),
    )
    .await
    .map_err(|_| {
        StorageError::engine_msg(format!(
            "postgres at `{}` (postgres.url): no answer within {} s",
            redact(&config.url),
            config.connect_timeout_secs
        ))
    })?
    .map_err(|e| unreachable(config, e))?;
    if !schema_exists(&mut setup, &config.schema).await? {
        let created = sqlx::query(&format!(
            "CREATE SCHEMA IF NOT EXISTS \"{}\"",
            config.schema
        ))
        .execute(&mut setup)
        .await;
        // Several cluster nodes starting together race here, and `IF NOT EXISTS` does not
        // stop the loser failing on the catalog's unique index: the schema is there then.
        if let Err(e) = created {
            if !schema_exists(&mut setup, &config.schema).await? {
                return Err(StorageError::engine(
                    format!("postgres: creating schema {}", config.schema),
                    e,
                ));
            }
        }
    }
    // Best effort: the server closes it anyway when the socket goes.
    let _ = setup.close().await;
    Ok(base.options([("search_path", config.schema.as_str())]))
}

async fn schema_exists(conn: &mut PgConnection, schema: &str) -> Result<bool, StorageError> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
        .bind(schema)
        .fetch_one(conn)
        .await
        .map_err(db)
}

/// Applies the embedded migrations (`common/migrations/postgres/`, shared with the operator)
/// inside the pool's schema.
/// Safe to run from several processes at once: sqlx serialises them with an advisory lock.
pub async fn migrate(pool: &PgPool, schema: &str) -> Result<(), StorageError> {
    ferrymq_common::migrations::MIGRATOR
        .run(pool)
        .await
        .map_err(|e| StorageError::engine(format!("postgres: migrating schema {schema}"), e))
}

/// Shared map of APPLICATION entries whose PUBREC was received.
/// Work to do right after a batch commits, on the writer task (keep it short: the next group
/// waits). The writer knows nothing about what it does.
pub type OnCommit = Box<dyn FnOnce() + Send>;

/// Takes the schema's node lock (a session-level advisory lock) on `conn`.
pub async fn take_node_lock(conn: &mut PgConnection, schema: &str) -> Result<(), StorageError> {
    if !try_node_lock(conn, schema).await? {
        return Err(StorageError::NodeLockHeld(schema.to_string()));
    }
    Ok(())
}

async fn try_node_lock(conn: &mut PgConnection, schema: &str) -> Result<bool, StorageError> {
    sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtext('ferrymq:' || $1))")
        .bind(schema)
        .fetch_one(conn)
        .await
        .map_err(db)
}

/// Whether the schema's node lock is free right now (taken and released at once on `conn`).
pub async fn node_lock_is_free(
    conn: &mut PgConnection,
    schema: &str,
) -> Result<bool, StorageError> {
    let got = try_node_lock(conn, schema).await?;
    if got {
        sqlx::query("SELECT pg_advisory_unlock(hashtext('ferrymq:' || $1))")
            .bind(schema)
            .execute(&mut *conn)
            .await
            .map_err(db)?;
    }
    Ok(got)
}

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{}@{}", &url[..scheme + 3], user, &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

async fn read_device(
    pool: &PgPool,
    client: &str,
    from: u64,
    limit: usize,
) -> Result<Vec<QueuedEntry>, StorageError> {
    let rows = sqlx::query(
        "SELECT seq, released, record FROM device_queue \
         WHERE client_id = $1 AND seq >= $2 AND (expires_at_ms = 0 OR expires_at_ms > $3) \
         ORDER BY seq LIMIT $4",
    )
    .bind(client)
    .bind(from as i64)
    .bind(now_ms() as i64)
    .bind(limit as i64)
    .fetch_all(pool)
    .await
    .map_err(db)?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let seq: i64 = row.get(0);
        let delivery = decode_delivery(Bytes::from(row.get::<Vec<u8>, _>(2)))
            .map_err(|e| StorageError::Corrupt(e.to_string()))?;
        out.push(QueuedEntry {
            seq: seq as u64,
            delivery,
            released: row.get(1),
        });
    }
    Ok(out)
}

/// Per DEVICE queue: what the writer needs to assign sequence numbers and enforce the limit.
#[derive(Debug, Default, Clone, Copy)]
struct DeviceStats {
    count: u64,
    next_seq: u64,
}

struct Writer {
    pool: PgPool,
    device_queue_limit: u64,
    /// Clients with a stored session; appends for anyone else are dropped (as on embedded).
    live: HashSet<String>,
    device: HashMap<String, DeviceStats>,
    /// `cluster.enabled`: sequence numbers and the live set come from the locked session rows
    /// of each transaction (`txn_seqs`), not from `live` and `device`.
    cluster: bool,
    /// Cluster mode, during one transaction: the next sequence number of every DEVICE session
    /// the transaction locked (or created); an append for a client missing here is dropped
    /// (no session: it was never created, or another node deleted it).
    txn_seqs: HashMap<String, u64>,
    metrics: Arc<Metrics>,
    healthy: Arc<AtomicBool>,
    /// In a cluster, the channel its transactions notify the sessions they stored entries for
    /// on (`storage::wake`).
    wake_channel: Option<String>,
}

/// Writes collected from a group, applied as a few set-based statements.
#[derive(Default)]
struct Pending {
    insert_client: Vec<String>,
    insert_seq: Vec<i64>,
    insert_expires: Vec<i64>,
    insert_record: Vec<Vec<u8>>,
    ack_client: Vec<String>,
    ack_seq: Vec<i64>,
    sent: HashMap<String, i64>,
    touched: HashSet<String>,
    /// APPLICATION commit points: one per client and group (every acknowledgement moves it, and
    /// only the furthest matters).
    app_commit: HashMap<String, i64>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.insert_client.is_empty()
            && self.ack_client.is_empty()
            && self.sent.is_empty()
            && self.app_commit.is_empty()
    }
}

/// The sessions a cluster node's transaction notifies: the DEVICE clients its batches append
/// to and `extra`, once each.
fn woken_clients(batches: &[WriteBatch], extra: Vec<Arc<str>>) -> Vec<String> {
    let device = batches
        .iter()
        .flat_map(|b| &b.ops)
        .filter_map(|op| match op {
            WriteOp::Enqueue {
                client,
                kind: ClientKind::Device,
                ..
            } => Some(client.to_string()),
            _ => None,
        });
    let all: HashSet<String> = device.chain(extra.iter().map(|c| c.to_string())).collect();
    all.into_iter().collect()
}

impl Writer {
    async fn reload(&mut self) -> Result<(), StorageError> {
        if self.cluster {
            // Nothing cached: every transaction reads what it needs under its locks.
            return Ok(());
        }
        let mut live = HashSet::new();
        let mut device = HashMap::new();
        for row in sqlx::query("SELECT client_id, kind, next_seq FROM sessions")
            .fetch_all(&self.pool)
            .await
            .map_err(db)?
        {
            let client: String = row.get(0);
            let kind: i16 = row.get(1);
            if kind == 0 {
                let next: i64 = row.get(2);
                device.insert(
                    client.clone(),
                    DeviceStats {
                        count: 0,
                        next_seq: next.max(1) as u64,
                    },
                );
            }
            live.insert(client);
        }
        for row in
            sqlx::query("SELECT client_id, count(*), max(seq) FROM device_queue GROUP BY client_id")
                .fetch_all(&self.pool)
                .await
                .map_err(db)?
        {
            let client: String = row.get(0);
            let count: i64 = row.get(1);
            let max: i64 = row.get(2);
            let stats = device.entry(client).or_default();
            stats.count = count as u64;
            stats.next_seq = stats.next_seq.max(max as u64 + 1);
        }
        self.live = live;
        self.device = device;
        Ok(())
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        let mut group: Vec<Request> = Vec::new();
        while let Some(first) = rx.recv().await {
            group.push(first);
            while group.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(r) => group.push(r),
                    Err(_) => break,
                }
            }
            let mut batches = Vec::new();
            let mut dones = Vec::new();
            let mut on_commit: Vec<Option<OnCommit>> = Vec::new();
            let mut wake: Vec<Arc<str>> = Vec::new();
            let mut sweeps = Vec::new();
            for request in group.drain(..) {
                match request {
                    Request::Batch {
                        batch,
                        after,
                        on_commit: then,
                        wake: woken,
                        done,
                    } => {
                        if let Some(after) = after {
                            if let Err(e) = after.await.unwrap_or(Err(StorageError::Closed)) {
                                let _ = done.send(Err(e));
                                continue;
                            }
                        }
                        batches.push(batch);
                        dones.push(done);
                        on_commit.push(then);
                        wake.extend(woken);
                    }
                    Request::Sweep {
                        now_ms,
                        budget,
                        done,
                    } => sweeps.push((now_ms, budget, done)),
                }
            }
            if !batches.is_empty() {
                let mut notify = Vec::new();
                let count = batches.len();
                let results = match self.apply(batches, &mut notify, wake).await {
                    Ok(fenced) => {
                        self.healthy.store(true, Ordering::Release);
                        for (then, fenced) in on_commit.into_iter().zip(&fenced) {
                            if let (Some(then), None) = (then, fenced) {
                                then();
                            }
                        }
                        for n in notify {
                            n.notify_one();
                        }
                        fenced.into_iter().map(|f| f.map_or(Ok(()), Err)).collect()
                    }
                    Err(e) => {
                        tracing::error!(error = %e, batches = dones.len(), "postgres commit failed");
                        if let Err(e) = self.reload().await {
                            tracing::warn!(error = %e, "reloading queue counters failed; retrying with the next commit");
                        }
                        vec![Err(e); count]
                    }
                };
                for (done, result) in dones.into_iter().zip(results) {
                    let _ = done.send(result);
                }
            }
            for (now, budget, done) in sweeps {
                let _ = done.send(self.sweep(now, budget).await);
            }
        }
    }

    /// Applies a group of batches in one transaction. Per batch: `None` when it was applied,
    /// `Some(Fenced)` when it was left out because its partition was claimed again.
    async fn apply(
        &mut self,
        batches: Vec<WriteBatch>,
        notify: &mut Vec<Arc<Notify>>,
        wake: Vec<Arc<str>>,
    ) -> Result<Vec<Option<StorageError>>, StorageError> {
        let woken = match &self.wake_channel {
            Some(_) => woken_clients(&batches, wake),
            None => Vec::new(),
        };
        let mut txn = self.pool.begin().await.map_err(db)?;
        let mut fenced = fence(&mut txn, &batches).await?;
        let mut owners = if self.cluster {
            self.lock_sessions(&mut txn, &batches, &fenced).await?
        } else {
            HashMap::new()
        };
        let mut pending = Pending::default();
        for (batch, fenced) in batches.into_iter().zip(fenced.iter_mut()) {
            if fenced.is_some() {
                continue;
            }
            if let Some(refused) = refuse_stale_owner(&batch, &mut owners) {
                self.metrics.session_writes_refused.inc();
                *fenced = Some(refused);
                continue;
            }
            let epoch = batch.owner.as_ref().map_or(0, |o| o.epoch);
            for op in batch.ops {
                self.apply_op(&mut txn, op, epoch, &mut pending, notify)
                    .await?;
            }
        }
        self.flush(&mut txn, &mut pending).await?;
        if let Some(channel) = &self.wake_channel {
            super::wake::notify(&mut txn, channel, &woken).await?;
        }
        txn.commit().await.map_err(db)?;
        Ok(fenced)
    }

    /// Cluster mode: locks, in key order and in one statement (two statements locking rows in
    /// different orders deadlock across nodes), the session rows of every DEVICE client the
    /// unfenced batches append to, of every client whose `sent_upto` they move, and of every
    /// session a batch is written for. Reads the next sequence numbers of the appended-to
    /// queues into `txn_seqs` and returns the owner epoch of each session a batch is written
    /// for (absent: no stored session).
    async fn lock_sessions(
        &mut self,
        txn: &mut Transaction<'static, Postgres>,
        batches: &[WriteBatch],
        fenced: &[Option<StorageError>],
    ) -> Result<HashMap<String, i64>, StorageError> {
        self.txn_seqs.clear();
        let unfenced = || {
            batches
                .iter()
                .zip(fenced)
                .filter(|(_, f)| f.is_none())
                .map(|(b, _)| b)
        };
        let appended: HashSet<&str> = unfenced()
            .flat_map(|b| b.ops.iter())
            .filter_map(|op| match op {
                WriteOp::Enqueue {
                    client,
                    kind: ClientKind::Device,
                    ..
                } => Some(&**client),
                _ => None,
            })
            .collect();
        let owned: HashSet<&str> = unfenced()
            .filter_map(|b| b.owner.as_ref().map(|o| &*o.client))
            .collect();
        // The sessions whose `sent_upto` the group moves are locked here too: several nodes'
        // writers update the same session rows, and rows locked in statement order by two
        // transactions deadlock (measured with two nodes under `ferrymq-bench cluster`).
        let mut clients: Vec<&str> = unfenced()
            .flat_map(|b| b.ops.iter())
            .filter_map(|op| match op {
                WriteOp::MarkSent { client, .. } => Some(&**client),
                _ => None,
            })
            .chain(appended.iter().copied())
            .chain(owned.iter().copied())
            .collect();
        if clients.is_empty() {
            return Ok(HashMap::new());
        }
        clients.sort_unstable();
        clients.dedup();
        let rows = sqlx::query(
            "SELECT client_id, kind, next_seq, owner_epoch FROM sessions \
             WHERE client_id = ANY($1) ORDER BY client_id FOR UPDATE",
        )
        .bind(&clients)
        .fetch_all(&mut **txn)
        .await
        .map_err(db)?;
        let mut owners = HashMap::new();
        for row in rows {
            let client: String = row.get(0);
            let kind: i16 = row.get(1);
            if owned.contains(client.as_str()) {
                owners.insert(client.clone(), row.get::<i64, _>(3));
            }
            if kind == kind_code(ClientKind::Device) && appended.contains(client.as_str()) {
                let next: i64 = row.get(2);
                self.txn_seqs.insert(client, next.max(1) as u64);
            }
        }
        Ok(owners)
    }

    /// Applies the buffered set-based writes; called before any op whose effect depends on them
    /// (order within a group is submission order).
    async fn flush(
        &mut self,
        txn: &mut Transaction<'static, Postgres>,
        pending: &mut Pending,
    ) -> Result<(), StorageError> {
        if pending.is_empty() {
            return Ok(());
        }
        let p = std::mem::take(pending);
        if !p.insert_client.is_empty() {
            sqlx::query(
                "INSERT INTO device_queue (client_id, seq, expires_at_ms, record) \
                 SELECT * FROM UNNEST($1::text[], $2::int8[], $3::int8[], $4::bytea[])",
            )
            .bind(&p.insert_client)
            .bind(&p.insert_seq)
            .bind(&p.insert_expires)
            .bind(&p.insert_record)
            .execute(&mut **txn)
            .await
            .map_err(db)?;
        }
        if !p.ack_client.is_empty() {
            let removed = sqlx::query(
                "DELETE FROM device_queue d USING UNNEST($1::text[], $2::int8[]) AS a(c, s) \
                 WHERE d.client_id = a.c AND d.seq = a.s RETURNING d.client_id",
            )
            .bind(&p.ack_client)
            .bind(&p.ack_seq)
            .fetch_all(&mut **txn)
            .await
            .map_err(db)?;
            for row in removed {
                let client: String = row.get(0);
                if let Some(s) = self.device.get_mut(&client) {
                    s.count = s.count.saturating_sub(1);
                }
            }
        }
        self.store_device_seqs(txn, &p.touched).await?;
        if !p.app_commit.is_empty() {
            let (clients, next): (Vec<String>, Vec<i64>) = p.app_commit.into_iter().unzip();
            sqlx::query(
                "UPDATE application_offsets o SET committed_seq = GREATEST(o.committed_seq, v.n) \
                 FROM UNNEST($1::text[], $2::int8[]) AS v(c, n) WHERE o.client_id = v.c",
            )
            .bind(&clients)
            .bind(&next)
            .execute(&mut **txn)
            .await
            .map_err(db)?;
            sqlx::query(
                "DELETE FROM application_released r USING UNNEST($1::text[], $2::int8[]) AS v(c, n) \
                 WHERE r.client_id = v.c AND r.seq < v.n",
            )
            .bind(&clients)
            .bind(&next)
            .execute(&mut **txn)
            .await
            .map_err(db)?;
        }
        if !p.sent.is_empty() {
            let (clients, upto): (Vec<String>, Vec<i64>) = p.sent.into_iter().unzip();
            sqlx::query(
                "UPDATE sessions s SET sent_upto = GREATEST(s.sent_upto, v.u) \
                 FROM UNNEST($1::text[], $2::int8[]) AS v(c, u) WHERE s.client_id = v.c",
            )
            .bind(&clients)
            .bind(&upto)
            .execute(&mut **txn)
            .await
            .map_err(db)?;
        }
        Ok(())
    }

    /// After DEVICE appends: trims the touched queues to `device.queue_limit` and stores their
    /// next sequence numbers.
    async fn store_device_seqs(
        &mut self,
        txn: &mut Transaction<'static, Postgres>,
        touched: &HashSet<String>,
    ) -> Result<(), StorageError> {
        if touched.is_empty() {
            return Ok(());
        }
        if self.cluster {
            return self.store_device_seqs_cluster(txn, touched).await;
        }
        // Trim every queue that grew past the limit: the oldest entries go (counted).
        for client in touched {
            let Some(stats) = self.device.get(client).copied() else {
                continue;
            };
            if stats.count > self.device_queue_limit {
                let excess = stats.count - self.device_queue_limit;
                let trimmed = sqlx::query(
                    "DELETE FROM device_queue WHERE client_id = $1 AND seq IN \
                     (SELECT seq FROM device_queue WHERE client_id = $1 ORDER BY seq LIMIT $2)",
                )
                .bind(client)
                .bind(excess as i64)
                .execute(&mut **txn)
                .await
                .map_err(db)?
                .rows_affected();
                if let Some(s) = self.device.get_mut(client) {
                    s.count = s.count.saturating_sub(trimmed);
                }
                self.metrics.device_messages_trimmed.add(trimmed);
            }
        }
        let clients: Vec<&String> = touched.iter().collect();
        let next: Vec<i64> = clients
            .iter()
            .map(|c| self.device.get(*c).map_or(1, |s| s.next_seq as i64))
            .collect();
        sqlx::query(
            "UPDATE sessions s SET next_seq = v.n FROM UNNEST($1::text[], $2::int8[]) AS v(c, n) \
             WHERE s.client_id = v.c",
        )
        .bind(&clients)
        .bind(&next)
        .execute(&mut **txn)
        .await
        .map_err(db)?;
        Ok(())
    }

    /// Cluster mode: no node knows a queue's length, so the bound is on sequence numbers: a
    /// queue keeps the `device.queue_limit` newest sequence numbers (entries acknowledged or
    /// expired in between count as gone). One `DELETE` and one `UPDATE` for the whole group.
    async fn store_device_seqs_cluster(
        &mut self,
        txn: &mut Transaction<'static, Postgres>,
        touched: &HashSet<String>,
    ) -> Result<(), StorageError> {
        let (clients, next): (Vec<&str>, Vec<i64>) = touched
            .iter()
            .filter_map(|c| self.txn_seqs.get(c).map(|n| (c.as_str(), *n as i64)))
            .unzip();
        // Capped so that `n - limit` cannot overflow in SQL.
        let limit = self.device_queue_limit.min(1 << 62) as i64;
        let trimmed = sqlx::query(
            "DELETE FROM device_queue d USING UNNEST($1::text[], $2::int8[]) AS v(c, n) \
             WHERE d.client_id = v.c AND d.seq < v.n - $3",
        )
        .bind(&clients)
        .bind(&next)
        .bind(limit)
        .execute(&mut **txn)
        .await
        .map_err(db)?
        .rows_affected();
        self.metrics.device_messages_trimmed.add(trimmed);
        sqlx::query(
            "UPDATE sessions s SET next_seq = v.n FROM UNNEST($1::text[], $2::int8[]) AS v(c, n) \
             WHERE s.client_id = v.c",
        )
        .bind(&clients)
        .bind(&next)
        .execute(&mut **txn)
        .await
        .map_err(db)?;
        Ok(())
    }

    async fn apply_op(
        &mut self,
        txn: &mut Transaction<'static, Postgres>,
        op: WriteOp,
        owner_epoch: i64,
        pending: &mut Pending,
        notify: &mut Vec<Arc<Notify>>,
    ) -> Result<(), StorageError> {
        match op {
            // Buffered: the hot path of the router and of acknowledging clients.
            WriteOp::Enqueue {
                client,
                kind: ClientKind::Device,
                delivery,
                notify: wake,
                ..
            } => {
                let seq = if self.cluster {
                    let Some(next) = self.txn_seqs.get_mut(&*client) else {
                        return Ok(());
                    };
                    let seq = *next;
                    *next = seq + 1;
                    seq
                } else {
                    if !self.live.contains(&*client) {
                        return Ok(());
                    }
                    let stats = self.device.entry(client.to_string()).or_default();
                    let seq = stats.next_seq.max(1);
                    stats.next_seq = seq + 1;
                    stats.count += 1;
                    seq
                };
                pending.insert_client.push(client.to_string());
                pending.insert_seq.push(seq as i64);
                pending.insert_expires.push(delivery.expires_at_ms as i64);
                pending.insert_record.push(delivery.encode());
                pending.touched.insert(client.to_string());
                self.metrics.device_messages_stored.inc();
                if let Some(n) = wake {
                    notify.push(n);
                }
                return Ok(());
            }
            WriteOp::AckDevice { client, seq } => {
                pending.ack_client.push(client.to_string());
                pending.ack_seq.push(seq as i64);
                return Ok(());
            }
            WriteOp::CommitApplication {
                client,
                next_offset,
            } => {
                let e = pending.app_commit.entry(client.to_string()).or_insert(0);
                *e = (*e).max(next_offset as i64);
                return Ok(());
            }
            WriteOp::MarkSent { client, upto } => {
                // In cluster mode another node may have created the session: the UPDATE
                // finds it or nothing.
                if self.cluster || self.live.contains(&*client) {
                    let e = pending.sent.entry(client.to_string()).or_insert(0);
                    *e = (*e).max(upto as i64);
                }
                return Ok(());
            }
            _ => {}
        }
        // Everything else sees the buffered writes first.
        self.flush(txn, pending).await?;
        let t = &mut **txn;
        match op {
            WriteOp::RouterPosition {
                partition,
                next_offset,
                epoch,
            } => {
                // `fence` checked the epoch under the row lock already; this is the same
                // condition, so that no path stores a position for a stale claim.
                let stored = sqlx::query(
                    "UPDATE router_offsets SET next_offset = $2 WHERE partition = $1 AND epoch = $3",
                )
                .bind(partition)
                .bind(next_offset)
                .bind(epoch)
                .execute(t)
                .await
                .map_err(db)?
                .rows_affected();
                if stored == 0 {
                    return Err(StorageError::Fenced { partition, epoch });
                }
            }
            WriteOp::RouterQos2 {
                client,
                partition,
                change,
            } => {
                let query = match change {
                    Qos2FlowChange::Open(pkid) => sqlx::query(
                        "INSERT INTO router_qos2_flows (client_id, pkid, partition) \
                         VALUES ($1, $2, $3) ON CONFLICT (client_id, pkid) \
                         DO UPDATE SET partition = EXCLUDED.partition",
                    )
                    .bind(&*client)
                    .bind(i32::from(pkid))
                    .bind(partition),
                    Qos2FlowChange::Release(pkid) => sqlx::query(
                        "DELETE FROM router_qos2_flows WHERE client_id = $1 AND pkid = $2",
                    )
                    .bind(&*client)
                    .bind(i32::from(pkid)),
                    Qos2FlowChange::Reset => {
                        sqlx::query("DELETE FROM router_qos2_flows WHERE client_id = $1")
                            .bind(&*client)
                    }
                };
                query.execute(t).await.map_err(db)?;
            }
            WriteOp::PutSession { client, record } => {
                let next_seq: i64 = sqlx::query_scalar(
                    "INSERT INTO sessions \
                     (client_id, kind, expiry_interval, disconnected_at_ms, owner_epoch) \
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (client_id) DO UPDATE SET \
                     kind = EXCLUDED.kind, expiry_interval = EXCLUDED.expiry_interval, \
                     disconnected_at_ms = EXCLUDED.disconnected_at_ms, \
                     owner_epoch = GREATEST(sessions.owner_epoch, EXCLUDED.owner_epoch) \
                     RETURNING next_seq",
                )
                .bind(&*client)
                .bind(kind_code(record.kind))
                .bind(i64::from(record.expiry_interval))
                .bind(record.disconnected_at_ms as i64)
                .bind(owner_epoch)
                .fetch_one(t)
                .await
                .map_err(db)?;
                if self.cluster {
                    // The row is locked by this transaction now: appends later in the group
                    // continue from its stored sequence.
                    match record.kind {
                        ClientKind::Device => {
                            self.txn_seqs
                                .insert(client.to_string(), next_seq.max(1) as u64);
                        }
                        ClientKind::Application => {
                            self.txn_seqs.remove(&*client);
                        }
                    }
                }
                if record.kind == ClientKind::Device {
                    self.device
                        .entry(client.to_string())
                        .or_insert(DeviceStats {
                            count: 0,
                            next_seq: 1,
                        });
                }
                self.live.insert(client.to_string());
            }
            WriteOp::DeleteSession { client } => {
                for table in SESSION_TABLES {
                    sqlx::query(&format!("DELETE FROM {table} WHERE client_id = $1"))
                        .bind(&*client)
                        .execute(&mut **txn)
                        .await
                        .map_err(db)?;
                }
                self.live.remove(&*client);
                self.device.remove(&*client);
                self.txn_seqs.remove(&*client);
            }
            WriteOp::PutSubscription {
                client,
                filter,
                options,
            } => {
                sqlx::query(
                    "INSERT INTO subscriptions (client_id, filter, options) VALUES ($1, $2, $3) \
                     ON CONFLICT (client_id, filter) DO UPDATE SET options = EXCLUDED.options",
                )
                .bind(&*client)
                .bind(&filter)
                .bind(codec::encode_options(&options))
                .execute(t)
                .await
                .map_err(db)?;
            }
            WriteOp::DeleteSubscription { client, filter } => {
                sqlx::query("DELETE FROM subscriptions WHERE client_id = $1 AND filter = $2")
                    .bind(&*client)
                    .bind(&filter)
                    .execute(t)
                    .await
                    .map_err(db)?;
            }
            WriteOp::MarkReleased { client, kind, seq } => match kind {
                ClientKind::Device => {
                    sqlx::query(
                        "UPDATE device_queue SET released = true WHERE client_id = $1 AND seq = $2",
                    )
                    .bind(&*client)
                    .bind(seq as i64)
                    .execute(t)
                    .await
                    .map_err(db)?;
                }
                ClientKind::Application => {
                    sqlx::query(
                        "INSERT INTO application_released (client_id, seq) VALUES ($1, $2) \
                         ON CONFLICT DO NOTHING",
                    )
                    .bind(&*client)
                    .bind(seq as i64)
                    .execute(t)
                    .await
                    .map_err(db)?;
                }
            },
            WriteOp::PutInboundQos2 { client, pkid } => {
                sqlx::query(
                    "INSERT INTO inbound_qos2 (client_id, pkid) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                )
                .bind(&*client)
                .bind(i32::from(pkid))
                .execute(t)
                .await
                .map_err(db)?;
            }
            WriteOp::DeleteInboundQos2 { client, pkid } => {
                sqlx::query("DELETE FROM inbound_qos2 WHERE client_id = $1 AND pkid = $2")
                    .bind(&*client)
                    .bind(i32::from(pkid))
                    .execute(t)
                    .await
                    .map_err(db)?;
            }
            WriteOp::PutTimer { client, timer } => {
                let (will_at, will) = match timer.will {
                    Some((at, will)) => (Some(at as i64), Some(will)),
                    None => (None, None),
                };
                sqlx::query(
                    "INSERT INTO session_timers \
                     (client_id, owner_epoch, will_at_ms, will, expires_at_ms) \
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (client_id) DO UPDATE SET \
                     owner_epoch = EXCLUDED.owner_epoch, will_at_ms = EXCLUDED.will_at_ms, \
                     will = EXCLUDED.will, expires_at_ms = EXCLUDED.expires_at_ms, \
                     claim_token = 0, claimed_until_ms = 0",
                )
                .bind(&*client)
                .bind(owner_epoch)
                .bind(will_at)
                .bind(will)
                .bind(timer.expires_at_ms.map(|ms| ms as i64))
                .execute(t)
                .await
                .map_err(db)?;
            }
            WriteOp::PutRetained { topic, record } => {
                sqlx::query(
                    "INSERT INTO retained (topic, record) VALUES ($1, $2) \
                     ON CONFLICT (topic) DO UPDATE SET record = EXCLUDED.record",
                )
                .bind(&topic)
                .bind(&record)
                .execute(t)
                .await
                .map_err(db)?;
            }
            WriteOp::DeleteRetained { topic } => {
                sqlx::query("DELETE FROM retained WHERE topic = $1")
                    .bind(&topic)
                    .execute(t)
                    .await
                    .map_err(db)?;
            }
            WriteOp::Expire {
                client,
                kind: ClientKind::Device,
                seq,
            } => {
                let removed =
                    sqlx::query("DELETE FROM device_queue WHERE client_id = $1 AND seq = $2")
                        .bind(&*client)
                        .bind(seq as i64)
                        .execute(t)
                        .await
                        .map_err(db)?
                        .rows_affected();
                if removed > 0 {
                    if let Some(s) = self.device.get_mut(&*client) {
                        s.count = s.count.saturating_sub(removed);
                    }
                    self.metrics.device_messages_expired.add(removed);
                }
            }
            // APPLICATION logs expire by Kafka retention; their appends go to Kafka, not here.
            WriteOp::Expire {
                kind: ClientKind::Application,
                ..
            }
            | WriteOp::Enqueue {
                kind: ClientKind::Application,
                ..
            } => {}
            WriteOp::Enqueue { .. }
            | WriteOp::AckDevice { .. }
            | WriteOp::MarkSent { .. }
            | WriteOp::CommitApplication { .. } => {}
            // Appended to Kafka by the Kafka/PostgreSQL backend before the rest reaches here.
            WriteOp::AppendShared { .. } => {}
        }
        Ok(())
    }

    /// Deletes up to `budget` DEVICE entries whose TTL or message expiry passed.
    async fn sweep(&mut self, now_ms: u64, budget: usize) -> Result<SweepStats, StorageError> {
        let rows = sqlx::query(
            "DELETE FROM device_queue WHERE ctid IN (SELECT ctid FROM device_queue \
             WHERE expires_at_ms > 0 AND expires_at_ms <= $1 LIMIT $2) RETURNING client_id",
        )
        .bind(now_ms as i64)
        .bind(budget as i64)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        for row in &rows {
            let client: String = row.get(0);
            if let Some(s) = self.device.get_mut(&client) {
                s.count = s.count.saturating_sub(1);
            }
        }
        self.metrics.device_messages_expired.add(rows.len() as u64);
        Ok(SweepStats {
            device_expired: rows.len() as u64,
            application_expired: 0,
        })
    }
}

/// Cluster mode: `Some(SessionMoved)` when `batch` is written for a session whose stored owner
/// epoch is above its own (a newer connection took it), or for a session that is not stored
/// and that the batch does not create (it ended, or a Clean Start of a newer connection
/// deleted it). Keeps `owners` current for the batches after it in the same group.
fn refuse_stale_owner(
    batch: &WriteBatch,
    owners: &mut HashMap<String, i64>,
) -> Option<StorageError> {
    let owner = batch.owner.as_ref()?;
    let mut creates = false;
    let mut deletes = false;
    for op in &batch.ops {
        match op {
            WriteOp::PutSession { client, .. } if *client == owner.client => creates = true,
            WriteOp::DeleteSession { client } if *client == owner.client => {
                deletes = true;
                creates = false;
            }
            _ => {}
        }
    }
    let allowed = match owners.get(&*owner.client) {
        Some(&stored) => stored <= owner.epoch,
        None => creates || deletes,
    };
    if !allowed {
        return Some(StorageError::SessionMoved {
            client: owner.client.to_string(),
            epoch: owner.epoch,
        });
    }
    if creates {
        let stored = owners
            .entry(owner.client.to_string())
            .or_insert(owner.epoch);
        *stored = (*stored).max(owner.epoch);
    } else if deletes {
        owners.remove(&*owner.client);
    }
    None
}

/// Locks the publish-log partitions the batches store positions for (`FOR UPDATE`, in
/// partition order) and checks each batch's epochs against the stored ones. Per batch:
/// `Some(Fenced)` when a partition was claimed again since its records were read.
async fn fence(
    txn: &mut Transaction<'static, Postgres>,
    batches: &[WriteBatch],
) -> Result<Vec<Option<StorageError>>, StorageError> {
    let claims: Vec<Vec<(i32, i64)>> = batches
        .iter()
        .map(|b| {
            b.ops
                .iter()
                .filter_map(|op| match op {
                    WriteOp::RouterPosition {
                        partition, epoch, ..
                    } => Some((*partition, *epoch)),
                    _ => None,
                })
                .collect()
        })
        .collect();
    let mut partitions: Vec<i32> = claims.iter().flatten().map(|(p, _)| *p).collect();
    if partitions.is_empty() {
        return Ok(vec![None; batches.len()]);
    }
    partitions.sort_unstable();
    partitions.dedup();
    let current: HashMap<i32, i64> = sqlx::query(
        "SELECT partition, epoch FROM router_offsets WHERE partition = ANY($1) \
         ORDER BY partition FOR UPDATE",
    )
    .bind(&partitions)
    .fetch_all(&mut **txn)
    .await
    .map_err(db)?
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect();
    Ok(claims
        .iter()
        .map(|claims| {
            claims
                .iter()
                .find(|(p, e)| current.get(p) != Some(e))
                .map(|(partition, epoch)| StorageError::Fenced {
                    partition: *partition,
                    epoch: *epoch,
                })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db"),
            "postgres://u@h:5432/db"
        );
        assert_eq!(redact("postgres://h/db"), "postgres://h/db");
    }
}
