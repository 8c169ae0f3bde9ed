//! The embedded backend: one redb database file under the data directory.
//!
//! Why redb: a maintained, pure-Rust, ACID key-value store with crash-safe copy-on-write B-trees
//! and a stable file format — no C toolchain, no server, one file to back up. Its write
//! transactions are serialised, which suits group commit: one writer thread takes every batch
//! that is waiting, applies them all in one transaction, commits once (one fsync), then completes
//! every batch. Reads run concurrently on MVCC snapshots and never wait for the writer.
//!
//! Tables (keys in parentheses):
//! `sessions` (client) → record · `subscriptions` (client, filter) → options ·
//! `device_queue` (client, seq) → delivery · `app_log` (client, offset) → delivery ·
//! `app_offsets` (client) → committed offset · `released` (client, seq) → () ·
//! `inbound_qos2` (client, pkid) → () · `retained` (topic) → message ·
//! `sent_marks` (client) → highest entry sent.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::thread;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use redb::{
    Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
    WriteTransaction,
};
use tokio::sync::{mpsc, oneshot, Notify};

use super::codec::{self, decode_delivery, now_ms};
use super::{
    ClientKind, Completion, QueueRead, QueueTotals, QueuedEntry, RestoredSession, SessionRecord,
    Snapshot, Storage, StorageError, SweepStats, WriteBatch, WriteOp,
};
use crate::metrics::Metrics;

const SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("sessions");
const SUBSCRIPTIONS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("subscriptions");
const DEVICE_QUEUE: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("device_queue");
const APP_LOG: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("app_log");
const APP_OFFSETS: TableDefinition<&str, u64> = TableDefinition::new("app_offsets");
const RELEASED: TableDefinition<(&str, u64), ()> = TableDefinition::new("released");
const INBOUND_QOS2: TableDefinition<(&str, u16), ()> = TableDefinition::new("inbound_qos2");
const RETAINED: TableDefinition<&str, &[u8]> = TableDefinition::new("retained");
const SENT: TableDefinition<&str, u64> = TableDefinition::new("sent_marks");

/// Batches waiting for the writer. When full, submissions fail fast with `Overloaded` (the
/// publisher gets a v5 reason code or a disconnect) instead of queueing without bound.
const WRITE_QUEUE_CAPACITY: usize = 16_384;
/// With `fsync = false`, the longest time between two durable commits.
const UNSYNCED_INTERVAL: std::time::Duration = std::time::Duration::from_millis(200);
/// Batches folded into one transaction at most, to bound commit latency.
const MAX_GROUP: usize = 4_096;

/// Limits the writer enforces as it appends.
#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    /// Entries kept per DEVICE queue; the oldest are trimmed beyond it.
    pub device_queue_limit: u64,
    /// APPLICATION log retention by age, milliseconds.
    pub application_retention_ms: u64,
    /// APPLICATION log retention by size, bytes per client.
    pub application_retention_bytes: u64,
    /// Commit with fsync. Off only for benchmarks that want to see the cost of it: then a commit
    /// is made durable at least every 200 ms and on every flush, and a crash can lose the
    /// acknowledged writes of that window.
    pub fsync: bool,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        EmbeddedOptions {
            device_queue_limit: 10_000,
            application_retention_ms: 7 * 24 * 3600 * 1000,
            application_retention_bytes: 1 << 30,
            fsync: true,
        }
    }
}

struct Request {
    batch: WriteBatch,
    done: oneshot::Sender<Result<(), StorageError>>,
    /// Someone waits for this batch to be durable (an ack depends on it). Detached batches
    /// (acknowledgement deletes, sent marks, disconnect times) ride along with the next durable
    /// commit instead of paying an fsync of their own: losing them in a crash costs only a
    /// redelivery with DUP=1.
    durable: bool,
}

/// The embedded store. Cloning gives another handle on the same database and writer.
#[derive(Clone)]
pub struct EmbeddedStorage {
    db: Arc<Database>,
    tx: mpsc::Sender<Request>,
    options: EmbeddedOptions,
    /// Client id the next sweep starts at.
    sweep_from: Arc<parking_lot::Mutex<String>>,
}

/// Entry count and bytes of one queue or log, kept by the writer so limits need no reads.
#[derive(Debug, Default, Clone, Copy)]
struct QueueStats {
    count: u64,
    bytes: u64,
    /// Sequence number the next append gets.
    next_seq: u64,
}

fn engine(e: impl Into<redb::Error>) -> StorageError {
    StorageError::engine("embedded storage", e.into())
}

impl EmbeddedStorage {
    /// Opens (or creates) `<dir>/ferrymq.redb` and starts the writer thread.
    pub fn open(
        dir: &Path,
        options: EmbeddedOptions,
        metrics: Arc<Metrics>,
    ) -> Result<EmbeddedStorage, StorageError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StorageError::engine(format!("creating {}", dir.display()), e))?;
        let path = dir.join("ferrymq.redb");
        let db = Database::create(&path)
            .map_err(|e| StorageError::engine(format!("opening {}", path.display()), e))?;
        let db = Arc::new(db);
        // Create every table up front so readers never see a missing one.
        {
            let txn = db.begin_write().map_err(engine)?;
            txn.open_table(SESSIONS).map_err(engine)?;
            txn.open_table(SUBSCRIPTIONS).map_err(engine)?;
            txn.open_table(DEVICE_QUEUE).map_err(engine)?;
            txn.open_table(APP_LOG).map_err(engine)?;
            txn.open_table(APP_OFFSETS).map_err(engine)?;
            txn.open_table(RELEASED).map_err(engine)?;
            txn.open_table(INBOUND_QOS2).map_err(engine)?;
            txn.open_table(RETAINED).map_err(engine)?;
            txn.open_table(SENT).map_err(engine)?;
            txn.commit().map_err(engine)?;
        }
        let stats = load_stats(&db)?;
        let live = load_live(&db)?;
        let (tx, rx) = mpsc::channel(WRITE_QUEUE_CAPACITY);
        let writer = Writer {
            db: db.clone(),
            options: options.clone(),
            stats,
            live,
            metrics,
            last_durable: std::time::Instant::now(),
        };
        thread::Builder::new()
            .name("ferrymq-storage".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| StorageError::engine("starting the writer thread", e))?;
        Ok(EmbeddedStorage {
            db,
            tx,
            options,
            sweep_from: Arc::new(parking_lot::Mutex::new(String::new())),
        })
    }
}

impl EmbeddedStorage {
    fn send(&self, batch: WriteBatch, durable: bool) -> Completion {
        let (done, completion) = oneshot::channel();
        let request = Request {
            batch,
            done,
            durable,
        };
        if let Err(e) = self.tx.try_send(request) {
            let (request, error) = match e {
                mpsc::error::TrySendError::Full(r) => (r, StorageError::Overloaded),
                mpsc::error::TrySendError::Closed(r) => (r, StorageError::Closed),
            };
            let _ = request.done.send(Err(error));
        }
        completion
    }
}

#[async_trait::async_trait]
impl Storage for EmbeddedStorage {
    fn submit(&self, batch: WriteBatch) -> Completion {
        self.send(batch, true)
    }

    fn submit_detached(&self, batch: WriteBatch) {
        drop(self.send(batch, false));
    }

    fn flush(&self) -> Completion {
        // Batches are applied in order, so an empty one completes after all earlier ones.
        self.submit(WriteBatch::default())
    }

    async fn load(&self) -> Result<Snapshot, StorageError> {
        self.load_blocking()
    }

    fn read_queue(
        &self,
        client: &Arc<str>,
        kind: ClientKind,
        from: u64,
        limit: usize,
    ) -> QueueRead {
        // A local read of a few pages: cheaper than a hop to another thread.
        QueueRead::Ready(self.read_queue_blocking(client, kind, from, limit))
    }

    async fn sweep(&self, now_ms: u64, budget: usize) -> Result<SweepStats, StorageError> {
        // Bounded, but a sweep may touch many pages: keep it off the connection threads.
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.sweep_blocking(now_ms, budget))
            .await
            .map_err(|e| StorageError::engine("sweep task", e))?
    }

    fn health(&self) -> Result<(), StorageError> {
        if self.tx.is_closed() {
            return Err(StorageError::engine_msg("the writer thread has stopped"));
        }
        let txn = self.db.begin_read().map_err(engine)?;
        txn.open_table(SESSIONS).map_err(engine)?;
        Ok(())
    }

    fn queue_totals(&self) -> Result<Option<QueueTotals>, StorageError> {
        queue_totals(&self.db).map(Some)
    }
}

impl EmbeddedStorage {
    fn load_blocking(&self) -> Result<Snapshot, StorageError> {
        let txn = self.db.begin_read().map_err(engine)?;
        let sessions_t = txn.open_table(SESSIONS).map_err(engine)?;
        let subs_t = txn.open_table(SUBSCRIPTIONS).map_err(engine)?;
        let device_t = txn.open_table(DEVICE_QUEUE).map_err(engine)?;
        let app_t = txn.open_table(APP_LOG).map_err(engine)?;
        let offsets_t = txn.open_table(APP_OFFSETS).map_err(engine)?;
        let qos2_t = txn.open_table(INBOUND_QOS2).map_err(engine)?;
        let retained_t = txn.open_table(RETAINED).map_err(engine)?;
        let sent_t = txn.open_table(SENT).map_err(engine)?;

        let mut snapshot = Snapshot::default();
        for row in sessions_t.iter().map_err(engine)? {
            let (k, v) = row.map_err(engine)?;
            let client: Arc<str> = Arc::from(k.value());
            let record = decode_session(v.value())?;
            let mut subscriptions = Vec::new();
            for row in subs_t.range((&*client, "")..).map_err(engine)? {
                let (k, v) = row.map_err(engine)?;
                let (c, filter) = k.value();
                if c != &*client {
                    break;
                }
                let options = codec::decode_options(Bytes::copy_from_slice(v.value()))
                    .map_err(|e| StorageError::Corrupt(e.to_string()))?;
                subscriptions.push((filter.to_string(), options));
            }
            let mut inbound_qos2 = Vec::new();
            for row in qos2_t
                .range((&*client, 0u16)..=(&*client, u16::MAX))
                .map_err(engine)?
            {
                let (k, _) = row.map_err(engine)?;
                inbound_qos2.push(k.value().1);
            }
            let (next_seq, read_from) = match record.kind {
                ClientKind::Device => {
                    let mut range = device_t
                        .range((&*client, 0u64)..=(&*client, u64::MAX))
                        .map_err(engine)?;
                    let first = range
                        .next()
                        .transpose()
                        .map_err(engine)?
                        .map(|(k, _)| k.value().1);
                    let last = range
                        .next_back()
                        .transpose()
                        .map_err(engine)?
                        .map(|(k, _)| k.value().1);
                    match (first, last) {
                        (Some(f), Some(l)) => (l + 1, f),
                        (Some(f), None) => (f + 1, f),
                        _ => (1, 1),
                    }
                }
                ClientKind::Application => {
                    let committed = offsets_t
                        .get(&*client)
                        .map_err(engine)?
                        .map(|v| v.value())
                        .unwrap_or(1);
                    let last = app_t
                        .range((&*client, 0u64)..=(&*client, u64::MAX))
                        .map_err(engine)?
                        .next_back()
                        .transpose()
                        .map_err(engine)?
                        .map(|(k, _)| k.value().1);
                    let next = last.map_or(committed, |l| (l + 1).max(committed));
                    (next, committed)
                }
            };
            let sent_upto = sent_t
                .get(&*client)
                .map_err(engine)?
                .map(|v| v.value())
                .unwrap_or(0);
            snapshot.sessions.push(RestoredSession {
                client,
                record,
                subscriptions,
                inbound_qos2,
                next_seq,
                read_from,
                sent_upto,
            });
        }
        for row in retained_t.iter().map_err(engine)? {
            let (_, v) = row.map_err(engine)?;
            let mut bytes = Bytes::copy_from_slice(v.value());
            let message = codec::decode_message(&mut bytes)
                .map_err(|e| StorageError::Corrupt(e.to_string()))?;
            snapshot.retained.push(message);
        }
        Ok(snapshot)
    }

    fn read_queue_blocking(
        &self,
        client: &str,
        kind: ClientKind,
        from: u64,
        limit: usize,
    ) -> Result<Vec<QueuedEntry>, StorageError> {
        let txn = self.db.begin_read().map_err(engine)?;
        let table = txn
            .open_table(match kind {
                ClientKind::Device => DEVICE_QUEUE,
                ClientKind::Application => APP_LOG,
            })
            .map_err(engine)?;
        let released = txn.open_table(RELEASED).map_err(engine)?;
        let now = now_ms();
        let mut out = Vec::new();
        for row in table
            .range((client, from)..=(client, u64::MAX))
            .map_err(engine)?
        {
            if out.len() >= limit {
                break;
            }
            let (k, v) = row.map_err(engine)?;
            let seq = k.value().1;
            let delivery = decode_delivery(Bytes::copy_from_slice(v.value()))
                .map_err(|e| StorageError::Corrupt(e.to_string()))?;
            if delivery.expires_at_ms != 0 && delivery.expires_at_ms <= now {
                continue;
            }
            let is_released = released.get((client, seq)).map_err(engine)?.is_some();
            out.push(QueuedEntry {
                seq,
                delivery,
                released: is_released,
            });
        }
        Ok(out)
    }

    fn sweep_blocking(&self, now_ms: u64, budget: usize) -> Result<SweepStats, StorageError> {
        // Find candidates on a read snapshot, then delete them through the writer like every
        // other write (an entry acknowledged meanwhile is simply not found again).
        //
        // Queues are FIFO in time and share one TTL, so expired entries sit at the head of each
        // client's range: per session only the head is examined, never the whole table. Entries
        // with a shorter MQTT 5 expiry in the middle are skipped at read time and removed once
        // they reach the head.
        let txn = self.db.begin_read().map_err(engine)?;
        let sessions = txn.open_table(SESSIONS).map_err(engine)?;
        let device = txn.open_table(DEVICE_QUEUE).map_err(engine)?;
        let app = txn.open_table(APP_LOG).map_err(engine)?;
        let cutoff = now_ms.saturating_sub(self.options.application_retention_ms);
        let mut expired: Vec<(ClientKind, Arc<str>, u64)> = Vec::new();
        // Sessions are visited round-robin from where the last sweep stopped, at most `budget`
        // of them per sweep, so the work per tick stays bounded with many sessions too.
        let start = self.sweep_from.lock().clone();
        let mut next_start = String::new();
        'clients: for (examined, row) in sessions
            .range(start.as_str()..)
            .map_err(engine)?
            .enumerate()
        {
            let (k, v) = row.map_err(engine)?;
            if examined >= budget {
                next_start = k.value().to_string();
                break;
            }
            let client: Arc<str> = Arc::from(k.value());
            let kind = decode_session(v.value())?.kind;
            let table = match kind {
                ClientKind::Device => &device,
                ClientKind::Application => &app,
            };
            for entry in table
                .range((&*client, 0u64)..=(&*client, u64::MAX))
                .map_err(engine)?
            {
                if expired.len() >= budget {
                    break 'clients;
                }
                let (k, v) = entry.map_err(engine)?;
                let seq = k.value().1;
                let bytes = v.value();
                let due = match kind {
                    ClientKind::Device => {
                        let expires = codec::delivery_expires_at(bytes);
                        expires != 0 && expires <= now_ms
                    }
                    ClientKind::Application => {
                        received_ms(&mut Bytes::copy_from_slice(bytes)) < cutoff
                    }
                };
                if !due {
                    continue 'clients;
                }
                expired.push((kind, client.clone(), seq));
            }
        }
        drop((sessions, device, app, txn));
        *self.sweep_from.lock() = next_start;
        let mut stats = SweepStats::default();
        if expired.is_empty() {
            return Ok(stats);
        }
        let mut batch = WriteBatch::default();
        for (kind, client, seq) in expired {
            match kind {
                ClientKind::Device => stats.device_expired += 1,
                ClientKind::Application => stats.application_expired += 1,
            }
            batch.push(WriteOp::Expire { client, kind, seq });
        }
        self.submit_detached(batch);
        Ok(stats)
    }
}

/// The received-at time inside an encoded delivery (0 when unreadable).
/// Most APPLICATION clients one scrape looks at; beyond it the lag total is a lower bound.
const TOTALS_CLIENT_BUDGET: usize = 100_000;

/// Table lengths are kept by redb (O(1)); the APPLICATION lag costs two lookups per client
/// with a log, skipping from one client's keys to the next.
fn queue_totals(db: &Database) -> Result<QueueTotals, StorageError> {
    use std::ops::Bound;
    let txn = db.begin_read().map_err(engine)?;
    let device = txn.open_table(DEVICE_QUEUE).map_err(engine)?;
    let app = txn.open_table(APP_LOG).map_err(engine)?;
    let offsets = txn.open_table(APP_OFFSETS).map_err(engine)?;
    let mut totals = QueueTotals {
        device_queued: device.len().map_err(engine)?,
        application_log: app.len().map_err(engine)?,
        application_lag: 0,
    };
    let mut after: Option<String> = None;
    for _ in 0..TOTALS_CLIENT_BUDGET {
        let next = match &after {
            None => app.iter().map_err(engine)?.next(),
            Some(c) => app
                .range::<(&str, u64)>((Bound::Excluded((c.as_str(), u64::MAX)), Bound::Unbounded))
                .map_err(engine)?
                .next(),
        };
        let Some(row) = next.transpose().map_err(engine)? else {
            break;
        };
        let (client, first) = {
            let (c, seq) = row.0.value();
            (c.to_string(), seq)
        };
        let last = app
            .range((client.as_str(), 0u64)..=(client.as_str(), u64::MAX))
            .map_err(engine)?
            .next_back()
            .transpose()
            .map_err(engine)?
            .map_or(first, |(k, _)| k.value().1);
        let committed = offsets
            .get(client.as_str())
            .map_err(engine)?
            .map_or(1, |v| v.value());
        totals.application_lag += (last + 1).saturating_sub(committed.max(first));
        after = Some(client);
    }
    Ok(totals)
}

fn received_ms(bytes: &mut Bytes) -> u64 {
    // delivery: version(1) flags(1) expires(8) n_ids(2) ids(4n) | message: version(1) flags(1) received(8)
    if bytes.len() < 12 {
        return 0;
    }
    let n = (&bytes[10..12]).get_u16() as usize;
    let at = 12 + 4 * n + 2;
    if bytes.len() < at + 8 {
        return 0;
    }
    (&bytes[at..at + 8]).get_u64()
}

fn encode_session(r: &SessionRecord) -> Vec<u8> {
    let mut out = BytesMut::with_capacity(14);
    out.put_u8(codec::FORMAT_V1);
    out.put_u8(match r.kind {
        ClientKind::Device => 0,
        ClientKind::Application => 1,
    });
    out.put_u32(r.expiry_interval);
    out.put_u64(r.disconnected_at_ms);
    out.to_vec()
}

fn decode_session(mut b: &[u8]) -> Result<SessionRecord, StorageError> {
    let corrupt = || StorageError::Corrupt("session record".into());
    if b.len() < 14 {
        return Err(corrupt());
    }
    if b.get_u8() != codec::FORMAT_V1 {
        return Err(corrupt());
    }
    let kind = match b.get_u8() {
        0 => ClientKind::Device,
        1 => ClientKind::Application,
        _ => return Err(corrupt()),
    };
    Ok(SessionRecord {
        kind,
        expiry_interval: b.get_u32(),
        disconnected_at_ms: b.get_u64(),
    })
}

fn load_stats(db: &Database) -> Result<HashMap<(String, ClientKind), QueueStats>, StorageError> {
    let mut stats: HashMap<(String, ClientKind), QueueStats> = HashMap::new();
    let txn = db.begin_read().map_err(engine)?;
    for (def, kind) in [
        (DEVICE_QUEUE, ClientKind::Device),
        (APP_LOG, ClientKind::Application),
    ] {
        let table = txn.open_table(def).map_err(engine)?;
        for row in table.iter().map_err(engine)? {
            let (k, v) = row.map_err(engine)?;
            let (client, seq) = k.value();
            let s = stats.entry((client.to_string(), kind)).or_default();
            s.count += 1;
            s.bytes += v.value().len() as u64;
            s.next_seq = s.next_seq.max(seq + 1);
        }
    }
    // An APPLICATION log whose entries all aged out continues after its committed offset.
    let offsets = txn.open_table(APP_OFFSETS).map_err(engine)?;
    for row in offsets.iter().map_err(engine)? {
        let (k, v) = row.map_err(engine)?;
        let s = stats
            .entry((k.value().to_string(), ClientKind::Application))
            .or_default();
        s.next_seq = s.next_seq.max(v.value());
    }
    Ok(stats)
}

fn load_live(db: &Database) -> Result<HashSet<String>, StorageError> {
    let txn = db.begin_read().map_err(engine)?;
    let table = txn.open_table(SESSIONS).map_err(engine)?;
    let mut live = HashSet::new();
    for row in table.iter().map_err(engine)? {
        let (k, _) = row.map_err(engine)?;
        live.insert(k.value().to_string());
    }
    Ok(live)
}

/// The writer thread's state.
struct Writer {
    db: Arc<Database>,
    options: EmbeddedOptions,
    stats: HashMap<(String, ClientKind), QueueStats>,
    /// Clients with a stored session. An append for anyone else is dropped: it was routed just
    /// before the session ended, and storing it would leave an orphan nobody reads or sweeps.
    live: HashSet<String>,
    metrics: Arc<Metrics>,
    /// When the last commit with fsync happened (only consulted with `fsync = false`).
    last_durable: std::time::Instant,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        let mut group: Vec<Request> = Vec::new();
        while let Some(first) = rx.blocking_recv() {
            group.push(first);
            while group.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(r) => group.push(r),
                    Err(_) => break,
                }
            }
            let mut notify: Vec<Arc<Notify>> = Vec::new();
            let result = self.apply(&mut group, &mut notify);
            if let Err(e) = &result {
                tracing::error!(error = %e, batches = group.len(), "storage commit failed");
                // The transaction was rolled back; the in-memory counters may have drifted, so
                // rebuild them from what is actually stored.
                if let Ok(stats) = load_stats(&self.db) {
                    self.stats = stats;
                }
                if let Ok(live) = load_live(&self.db) {
                    self.live = live;
                }
            }
            for request in group.drain(..) {
                let _ = request.done.send(result.clone());
            }
            if result.is_ok() {
                for n in notify {
                    n.notify_one();
                }
            }
        }
    }

    fn apply(
        &mut self,
        group: &mut [Request],
        notify: &mut Vec<Arc<Notify>>,
    ) -> Result<(), StorageError> {
        let mut txn = self.db.begin_write().map_err(engine)?;
        // Without fsync, redb's non-durable commits reach the disk only with the next durable
        // one, so make one at least every UNSYNCED_INTERVAL and for every flush (an empty batch,
        // as at shutdown): the window of acknowledged-but-lost writes in a crash stays bounded.
        // Detached-only groups are committed without fsync and become durable with the next
        // durable commit (redb makes every earlier commit durable with it), or after
        // UNSYNCED_INTERVAL at the latest.
        let flush = group.iter().any(|r| r.batch.ops.is_empty());
        let wanted = group.iter().any(|r| r.durable);
        let durable = (self.options.fsync && wanted)
            || flush
            || self.last_durable.elapsed() >= UNSYNCED_INTERVAL;
        if durable {
            self.last_durable = std::time::Instant::now();
        } else {
            txn.set_durability(redb::Durability::None).map_err(engine)?;
        }
        for request in group.iter_mut() {
            for op in request.batch.ops.drain(..) {
                self.apply_op(&txn, op, notify)?;
            }
        }
        txn.commit().map_err(engine)?;
        Ok(())
    }

    fn apply_op(
        &mut self,
        txn: &WriteTransaction,
        op: WriteOp,
        notify: &mut Vec<Arc<Notify>>,
    ) -> Result<(), StorageError> {
        match op {
            WriteOp::PutSession { client, record } => {
                self.live.insert(client.to_string());
                let mut t = txn.open_table(SESSIONS).map_err(engine)?;
                t.insert(&*client, encode_session(&record).as_slice())
                    .map_err(engine)?;
            }
            WriteOp::DeleteSession { client } => self.delete_session(txn, &client)?,
            WriteOp::PutSubscription {
                client,
                filter,
                options,
            } => {
                let mut t = txn.open_table(SUBSCRIPTIONS).map_err(engine)?;
                t.insert(
                    (&*client, filter.as_str()),
                    codec::encode_options(&options).as_slice(),
                )
                .map_err(engine)?;
            }
            WriteOp::DeleteSubscription { client, filter } => {
                let mut t = txn.open_table(SUBSCRIPTIONS).map_err(engine)?;
                t.remove((&*client, filter.as_str())).map_err(engine)?;
            }
            WriteOp::Enqueue {
                client,
                kind,
                delivery,
                notify: wake,
                ..
            } => {
                if !self.live.contains(&*client) {
                    return Ok(());
                }
                self.enqueue(txn, &client, kind, &delivery.encode())?;
                if let Some(n) = wake {
                    notify.push(n);
                }
            }
            WriteOp::AckDevice { client, seq } => {
                self.remove_entry(txn, &client, ClientKind::Device, seq)?;
                let mut r = txn.open_table(RELEASED).map_err(engine)?;
                r.remove((&*client, seq)).map_err(engine)?;
            }
            WriteOp::CommitApplication {
                client,
                next_offset,
            } => {
                let mut t = txn.open_table(APP_OFFSETS).map_err(engine)?;
                let current = t.get(&*client).map_err(engine)?.map(|v| v.value());
                if current.is_none_or(|c| c < next_offset) {
                    t.insert(&*client, next_offset).map_err(engine)?;
                }
                drop(t);
                let mut r = txn.open_table(RELEASED).map_err(engine)?;
                r.retain_in((&*client, 0u64)..(&*client, next_offset), |_, _| false)
                    .map_err(engine)?;
            }
            WriteOp::MarkReleased { client, seq, .. } => {
                let mut r = txn.open_table(RELEASED).map_err(engine)?;
                r.insert((&*client, seq), ()).map_err(engine)?;
            }
            WriteOp::MarkSent { client, upto } => {
                if self.live.contains(&*client) {
                    let mut t = txn.open_table(SENT).map_err(engine)?;
                    let current = t.get(&*client).map_err(engine)?.map(|v| v.value());
                    if current.is_none_or(|c| c < upto) {
                        t.insert(&*client, upto).map_err(engine)?;
                    }
                }
            }
            WriteOp::PutInboundQos2 { client, pkid } => {
                let mut t = txn.open_table(INBOUND_QOS2).map_err(engine)?;
                t.insert((&*client, pkid), ()).map_err(engine)?;
            }
            WriteOp::DeleteInboundQos2 { client, pkid } => {
                let mut t = txn.open_table(INBOUND_QOS2).map_err(engine)?;
                t.remove((&*client, pkid)).map_err(engine)?;
            }
            WriteOp::PutRetained { topic, record } => {
                let mut t = txn.open_table(RETAINED).map_err(engine)?;
                t.insert(topic.as_str(), record.as_slice())
                    .map_err(engine)?;
            }
            WriteOp::DeleteRetained { topic } => {
                let mut t = txn.open_table(RETAINED).map_err(engine)?;
                t.remove(topic.as_str()).map_err(engine)?;
            }
            // Never produced here: only a dispatcher of a publish log writes positions and QoS 2
            // flows, and the embedded router picks a shared group member itself
            // (`shared_groups_in_log`). Not silent: reaching here is a bug.
            WriteOp::RouterPosition { .. }
            | WriteOp::RouterQos2 { .. }
            | WriteOp::AppendShared { .. } => {
                tracing::error!("a publish-log op (a router position, QoS 2 flow or group append) reached the embedded backend; dropped");
            }
            // Never produced here: one node keeps its session timers in memory
            // (`session::registry`); only cluster nodes share them through storage.
            WriteOp::PutTimer { .. } => {
                tracing::error!("a cluster session timer reached the embedded backend; dropped");
            }
            WriteOp::Expire { client, kind, seq } => {
                if self.remove_entry(txn, &client, kind, seq)? {
                    match kind {
                        ClientKind::Device => self.metrics.device_messages_expired.inc(),
                        ClientKind::Application => self.metrics.application_messages_expired.inc(),
                    }
                }
            }
        }
        Ok(())
    }

    fn enqueue(
        &mut self,
        txn: &WriteTransaction,
        client: &str,
        kind: ClientKind,
        record: &[u8],
    ) -> Result<(), StorageError> {
        let def = match kind {
            ClientKind::Device => DEVICE_QUEUE,
            ClientKind::Application => APP_LOG,
        };
        let mut t = txn.open_table(def).map_err(engine)?;
        let stats = self.stats.entry((client.to_string(), kind)).or_default();
        let seq = stats.next_seq.max(1);
        stats.next_seq = seq + 1;
        t.insert((client, seq), record).map_err(engine)?;
        stats.count += 1;
        stats.bytes += record.len() as u64;
        match kind {
            ClientKind::Device => self.metrics.device_messages_stored.inc(),
            ClientKind::Application => self.metrics.application_messages_stored.inc(),
        }
        // Per-client limit for DEVICE queues, size retention for APPLICATION logs: trim the
        // oldest entries.
        loop {
            let over = match kind {
                ClientKind::Device => stats.count > self.options.device_queue_limit,
                ClientKind::Application => {
                    stats.bytes > self.options.application_retention_bytes && stats.count > 1
                }
            };
            if !over {
                break;
            }
            let oldest = t
                .range((client, 0u64)..=(client, u64::MAX))
                .map_err(engine)?
                .next()
                .transpose()
                .map_err(engine)?
                .map(|(k, v)| (k.value().1, v.value().len() as u64));
            let Some((oldest, len)) = oldest else {
                break;
            };
            t.remove((client, oldest)).map_err(engine)?;
            stats.count -= 1;
            stats.bytes -= len;
            match kind {
                ClientKind::Device => self.metrics.device_messages_trimmed.inc(),
                ClientKind::Application => self.metrics.application_messages_trimmed.inc(),
            }
        }
        Ok(())
    }

    /// Removes one entry; true when it existed.
    fn remove_entry(
        &mut self,
        txn: &WriteTransaction,
        client: &str,
        kind: ClientKind,
        seq: u64,
    ) -> Result<bool, StorageError> {
        let def = match kind {
            ClientKind::Device => DEVICE_QUEUE,
            ClientKind::Application => APP_LOG,
        };
        let mut t = txn.open_table(def).map_err(engine)?;
        let removed = t.remove((client, seq)).map_err(engine)?;
        if let Some(v) = removed {
            if let Some(stats) = self.stats.get_mut(&(client.to_string(), kind)) {
                stats.count = stats.count.saturating_sub(1);
                stats.bytes = stats.bytes.saturating_sub(v.value().len() as u64);
            }
            return Ok(true);
        }
        Ok(false)
    }

    fn delete_session(&mut self, txn: &WriteTransaction, client: &str) -> Result<(), StorageError> {
        self.live.remove(client);
        txn.open_table(SESSIONS)
            .map_err(engine)?
            .remove(client)
            .map_err(engine)?;
        {
            let mut subs = txn.open_table(SUBSCRIPTIONS).map_err(engine)?;
            let filters: Vec<String> = subs
                .range((client, "")..)
                .map_err(engine)?
                .map_while(|row| match row {
                    Ok((k, _)) if k.value().0 == client => Some(k.value().1.to_string()),
                    _ => None,
                })
                .collect();
            for f in filters {
                subs.remove((client, f.as_str())).map_err(engine)?;
            }
        }
        for def in [DEVICE_QUEUE, APP_LOG] {
            let mut t = txn.open_table(def).map_err(engine)?;
            t.retain_in((client, 0u64)..=(client, u64::MAX), |_, _| false)
                .map_err(engine)?;
        }
        txn.open_table(RELEASED)
            .map_err(engine)?
            .retain_in((client, 0u64)..=(client, u64::MAX), |_, _| false)
            .map_err(engine)?;
        txn.open_table(INBOUND_QOS2)
            .map_err(engine)?
            .retain_in((client, 0u16)..=(client, u16::MAX), |_, _| false)
            .map_err(engine)?;
        txn.open_table(APP_OFFSETS)
            .map_err(engine)?
            .remove(client)
            .map_err(engine)?;
        txn.open_table(SENT)
            .map_err(engine)?
            .remove(client)
            .map_err(engine)?;
        self.stats.remove(&(client.to_string(), ClientKind::Device));
        self.stats
            .remove(&(client.to_string(), ClientKind::Application));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Message, MessageProperties};
    use crate::protocol::{QoS, RetainForwardRule};
    use crate::router::SubscriptionOptions;
    use std::time::{Duration, Instant};

    fn message(payload: &'static str) -> Message {
        Message {
            topic: Bytes::from_static(b"t"),
            payload: Bytes::from_static(payload.as_bytes()),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: MessageProperties::default(),
            received_at: Instant::now(),
            publisher: Arc::from("p"),
        }
    }

    fn enqueue(client: &str, kind: ClientKind, payload: &'static str, expires: u64) -> WriteOp {
        WriteOp::Enqueue {
            client: Arc::from(client),
            kind,
            delivery: crate::storage::Enqueued {
                message: Arc::new(message(payload)),
                qos: QoS::AtLeastOnce,
                retain: false,
                expires_at_ms: expires,
                subscription_ids: Vec::new(),
            },
            notify: None,
            origin: None,
        }
    }

    fn open(dir: &Path, options: EmbeddedOptions) -> EmbeddedStorage {
        // The previous instance's writer thread may still hold the file for a moment.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match EmbeddedStorage::open(dir, options.clone(), Arc::new(Metrics::default())) {
                Ok(s) => return s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    async fn write(storage: &EmbeddedStorage, ops: Vec<WriteOp>) {
        storage
            .submit(WriteBatch { ops, owner: None })
            .await
            .unwrap()
            .unwrap();
    }

    fn seqs(storage: &EmbeddedStorage, client: &str, kind: ClientKind) -> Vec<u64> {
        storage
            .read_queue_blocking(client, kind, 0, 100)
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect()
    }

    #[tokio::test]
    async fn device_queue_limit_trims_oldest_and_ack_deletes() {
        let dir = tempfile::tempdir().unwrap();
        let options = EmbeddedOptions {
            device_queue_limit: 3,
            ..Default::default()
        };
        let storage = open(dir.path(), options);
        // An append for a client without a stored session is dropped (see Writer::live).
        write(&storage, vec![enqueue("dev", ClientKind::Device, "m", 0)]).await;
        assert!(seqs(&storage, "dev", ClientKind::Device).is_empty());
        let mut ops = vec![WriteOp::PutSession {
            client: Arc::from("dev"),
            record: SessionRecord {
                kind: ClientKind::Device,
                expiry_interval: 60,
                disconnected_at_ms: 0,
            },
        }];
        ops.extend((0..5).map(|_| enqueue("dev", ClientKind::Device, "m", 0)));
        write(&storage, ops).await;
        assert_eq!(seqs(&storage, "dev", ClientKind::Device), vec![3, 4, 5]);
        write(
            &storage,
            vec![WriteOp::AckDevice {
                client: Arc::from("dev"),
                seq: 4,
            }],
        )
        .await;
        assert_eq!(seqs(&storage, "dev", ClientKind::Device), vec![3, 5]);
    }

    #[tokio::test]
    async fn everything_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let client: Arc<str> = Arc::from("dev");
        {
            let storage = open(dir.path(), EmbeddedOptions::default());
            let mut retained = BytesMut::new();
            codec::encode_message(&message("kept"), &mut retained);
            write(
                &storage,
                vec![
                    WriteOp::PutSession {
                        client: client.clone(),
                        record: SessionRecord {
                            kind: ClientKind::Device,
                            expiry_interval: 60,
                            disconnected_at_ms: 5,
                        },
                    },
                    WriteOp::PutSubscription {
                        client: client.clone(),
                        filter: "a/#".into(),
                        options: SubscriptionOptions {
                            qos: QoS::ExactlyOnce,
                            no_local: false,
                            retain_as_published: false,
                            retain_handling: RetainForwardRule::OnEverySubscribe,
                            identifier: Some(3),
                        },
                    },
                    enqueue("dev", ClientKind::Device, "one", 0),
                    enqueue("dev", ClientKind::Device, "two", 0),
                    WriteOp::MarkReleased {
                        client: client.clone(),
                        kind: ClientKind::Device,
                        seq: 2,
                    },
                    WriteOp::PutInboundQos2 {
                        client: client.clone(),
                        pkid: 42,
                    },
                    WriteOp::PutRetained {
                        topic: "t".into(),
                        record: retained.to_vec(),
                    },
                ],
            )
            .await;
        }
        let storage = open(dir.path(), EmbeddedOptions::default());
        let snapshot = storage.load_blocking().unwrap();
        assert_eq!(snapshot.sessions.len(), 1);
        let s = &snapshot.sessions[0];
        assert_eq!(s.record.expiry_interval, 60);
        assert_eq!(s.record.disconnected_at_ms, 5);
        assert_eq!(s.subscriptions[0].0, "a/#");
        assert_eq!(s.subscriptions[0].1.identifier, Some(3));
        assert_eq!(s.inbound_qos2, vec![42]);
        assert_eq!((s.read_from, s.next_seq), (1, 3));
        assert_eq!(&snapshot.retained[0].payload[..], b"kept");
        let entries = storage
            .read_queue_blocking("dev", ClientKind::Device, 1, 10)
            .unwrap();
        assert_eq!(entries.len(), 2);
        assert!(!entries[0].released && entries[1].released);
        assert_eq!(&entries[1].delivery.message.payload[..], b"two");
        // Sequence numbers continue after a restart.
        write(
            &storage,
            vec![enqueue("dev", ClientKind::Device, "three", 0)],
        )
        .await;
        assert_eq!(seqs(&storage, "dev", ClientKind::Device), vec![1, 2, 3]);
        // Deleting the session removes everything it owns.
        write(&storage, vec![WriteOp::DeleteSession { client }]).await;
        let snapshot = storage.load_blocking().unwrap();
        assert!(snapshot.sessions.is_empty());
        assert!(seqs(&storage, "dev", ClientKind::Device).is_empty());
    }

    #[tokio::test]
    async fn application_log_commits_and_resumes_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let client: Arc<str> = Arc::from("app");
        let session = WriteOp::PutSession {
            client: client.clone(),
            record: SessionRecord {
                kind: ClientKind::Application,
                expiry_interval: u32::MAX,
                disconnected_at_ms: 0,
            },
        };
        {
            let storage = open(dir.path(), EmbeddedOptions::default());
            let mut ops = vec![session];
            ops.extend((0..4).map(|_| enqueue("app", ClientKind::Application, "m", 0)));
            ops.push(WriteOp::CommitApplication {
                client: client.clone(),
                next_offset: 3,
            });
            write(&storage, ops).await;
            // The log keeps acknowledged entries until retention removes them.
            assert_eq!(
                seqs(&storage, "app", ClientKind::Application),
                vec![1, 2, 3, 4]
            );
        }
        let storage = open(dir.path(), EmbeddedOptions::default());
        let snapshot = storage.load_blocking().unwrap();
        assert_eq!(
            (
                snapshot.sessions[0].read_from,
                snapshot.sessions[0].next_seq
            ),
            (3, 5)
        );
    }

    #[tokio::test]
    async fn sweep_removes_expired_heads_within_budget() {
        let dir = tempfile::tempdir().unwrap();
        let storage = open(dir.path(), EmbeddedOptions::default());
        let client: Arc<str> = Arc::from("dev");
        let mut ops = vec![WriteOp::PutSession {
            client: client.clone(),
            record: SessionRecord {
                kind: ClientKind::Device,
                expiry_interval: 60,
                disconnected_at_ms: 0,
            },
        }];
        ops.extend((0..5).map(|_| enqueue("dev", ClientKind::Device, "old", 1)));
        ops.push(enqueue("dev", ClientKind::Device, "new", 0));
        write(&storage, ops).await;
        // Expired entries are already invisible to readers.
        assert_eq!(seqs(&storage, "dev", ClientKind::Device), vec![6]);
        let stats = storage.sweep_blocking(now_ms(), 3).unwrap();
        assert_eq!(stats.device_expired, 3, "bounded by the budget");
        storage.flush().await.unwrap().unwrap();
        let stats = storage.sweep_blocking(now_ms(), 100).unwrap();
        assert_eq!(stats.device_expired, 2);
        storage.flush().await.unwrap().unwrap();
        assert_eq!(
            storage
                .sweep_blocking(now_ms(), 100)
                .unwrap()
                .device_expired,
            0
        );
    }
}
