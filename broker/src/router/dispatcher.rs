//! The dispatcher of a log-first backend: reads the publish log back ([`LogReader`]) and does
//! what the publishing connection does on embedded storage — match subscriptions, hand
//! deliveries to connected clean-session subscribers, and store them for persistent ones —
//! then stores each batch together with its position in the log.
//!
//! It depends on the router and the storage seam only. What a backend does with a batch (a
//! PostgreSQL transaction, appends to APPLICATION logs) and how it recognises appends it made
//! before a crash or a failed attempt is the backend's business: the dispatcher marks every
//! APPLICATION and shared-group append with the log position it came from (`origin`), which is
//! all a backend needs for that.
//!
//! **Failures.** When a write fails (a backend down) the same batch is retried, with backoff,
//! until it succeeds: the dispatcher stops moving, the log keeps the messages, nothing
//! acknowledged is lost. The exception is [`StorageError::Fenced`]: the partition was claimed
//! by another reader since its records were read, nothing of the batch was stored, and the new
//! owner routes those records from the stored position; the batch is dropped, not retried.
//!
//! **Partitions move** (a consumer-group rebalance, see [`PartitionChange`]): the QoS 2 flows of
//! a claimed partition are reloaded as stored, those of a released one forgotten.
//!
//! **Subscriptions made on other nodes** ([`BatchGate`]): in a cluster a persistent session's
//! SUBSCRIBE is acknowledged on the node that holds the connection once it is recorded in the
//! session directory; before routing a batch the dispatcher waits until it has applied the
//! directory up to its current end, so a message published after a SUBACK anywhere in the
//! cluster is routed with that subscription in force.
//!
//! **QoS 2.** The PUBLISH append and the publisher's stored packet id are writes to two systems;
//! a crash between them makes the publisher resend (DUP set) a message that is already in the
//! log. QoS 2 records of persistent sessions carry their packet id, and the dispatcher remembers
//! the packet ids it routed ([`Qos2Flows`], stored with its batches) until the publisher's
//! PUBREL (a `Release` control record) or a new session (`Reset`) frees them: a DUP record for a
//! packet id still open is such a copy and is dropped. A record without DUP is always new (a
//! publisher only sets DUP on a resend).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;

use super::{place_blocked, Router, Scope};
use crate::metrics::Metrics;
use crate::storage::log::{LogControl, LogEntry, LogReader, PartitionChange, PartitionRecords};
use crate::storage::{ClientKind, Qos2FlowChange, Storage, StorageError, WriteBatch, WriteOp};

/// Backoff between attempts to store a batch while a backend is down.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Something that must be current before a batch is routed: in a cluster, the session
/// directory that carries the subscriptions of sessions connected to other nodes.
#[async_trait]
pub trait BatchGate: Send + Sync {
    /// Returns once every subscription acknowledged before this call is known here.
    async fn before_batch(&self) -> Result<(), StorageError>;
}

/// What the dispatcher routes with and stores into.
pub struct Dispatcher {
    pub router: Arc<Router>,
    pub storage: Arc<dyn Storage>,
    pub metrics: Arc<Metrics>,
    /// How long a connected subscriber with a full queue may hold a batch back
    /// (`limits.slow_subscriber_wait_ms`), as on embedded storage.
    pub slow_wait: Duration,
    /// `All` on a single node; `Persistent` in a cluster, where every node's local reader
    /// (`router::local`) delivers to its own connections and keeps its retained store.
    pub scope: Scope,
    /// `Some` in a cluster (the session directory); see [`BatchGate`].
    pub gate: Option<Arc<dyn BatchGate>>,
}

impl Dispatcher {
    /// Routes the log until shutdown (or until the log cannot be read any more).
    pub async fn run(self, mut reader: Box<dyn LogReader>, mut shutdown: watch::Receiver<bool>) {
        let mut flows = Qos2Flows::new(HashMap::new());
        loop {
            for change in reader.take_changes() {
                flows.change(change);
            }
            let partitions = tokio::select! {
                _ = shutdown.changed() => return,
                next = reader.next() => match next {
                    Some(p) => p,
                    None => return,
                },
            };
            // Claims made while reading come before the records read after them.
            for change in reader.take_changes() {
                flows.change(change);
            }
            if !self.pass_gate(&mut shutdown).await {
                return;
            }
            // One batch per partition: a replay after a crash then redoes at most one
            // partition's batch.
            for records in partitions {
                let (partition, epoch) = (records.partition, records.epoch);
                let Some((batch, next_offset)) = self.route(records, &mut flows).await else {
                    continue;
                };
                match self.store(batch, &mut shutdown).await {
                    Stored::Yes => reader.routed(partition, next_offset),
                    Stored::Fenced => {
                        self.metrics.storage_errors.inc();
                        tracing::warn!(partition, epoch, "a router batch was refused: the partition was claimed by another node, which routes it from the stored position");
                        reader.fenced(partition, epoch);
                        flows.change(PartitionChange::Released { partition });
                    }
                    Stored::ShutDown => return,
                }
            }
        }
    }

    /// Routes one partition's records into a batch ending with the partition's new position.
    /// `None` when there were no records.
    async fn route(
        &self,
        records: PartitionRecords,
        flows: &mut Qos2Flows,
    ) -> Option<(WriteBatch, i64)> {
        let (partition, epoch) = (records.partition, records.epoch);
        let next_offset = records.records.last()?.offset + 1;
        let mut batch = WriteBatch::default();
        let mut blocked = VecDeque::new();
        for record in records.records {
            let (delivery, qos2) = match record.entry {
                LogEntry::Publish { delivery, qos2 } => (delivery, qos2),
                LogEntry::Control(control) => {
                    flows.apply(partition, &control, &mut batch);
                    continue;
                }
                LogEntry::Unreadable => continue,
            };
            if let Some((pkid, dup)) = qos2 {
                if !flows.route(
                    partition,
                    &delivery.message.publisher,
                    pkid,
                    dup,
                    &mut batch,
                ) {
                    tracing::debug!(partition, offset = record.offset, publisher = %delivery.message.publisher, pkid, "dropping a resent QoS 2 message the router already routed");
                    continue;
                }
            }
            let message = Arc::new(delivery.message);
            let first_op = batch.ops.len();
            if message.retain {
                match self.scope {
                    Scope::All => self.router.retain(&message, &mut batch),
                    _ => self.router.retain_stored(&message, &mut batch),
                }
            }
            let routed = self.router.publish_scoped(
                &message,
                &mut batch,
                self.scope,
                Some((partition, record.offset)),
            );
            if routed.matched == 0 {
                self.metrics.messages_dropped_no_subscribers.inc();
            }
            blocked.extend(routed.full);
            stamp_origin(&mut batch, first_op, partition, record.offset);
        }
        if !blocked.is_empty() {
            // Connected subscribers with a full queue get the same grace as on embedded
            // storage; what still does not fit is dropped and counted.
            let deadline = tokio::time::Instant::now() + self.slow_wait;
            let dropped = place_blocked(&mut blocked, deadline).await;
            if dropped > 0 {
                self.metrics.messages_dropped_queue_full.add(dropped);
            }
        }
        batch.push(WriteOp::RouterPosition {
            partition,
            next_offset,
            epoch,
        });
        Some((batch, next_offset))
    }

    /// Waits for the gate, retrying with backoff while it fails (the directory unreadable):
    /// routing without the subscriptions of other nodes would skip their subscribers.
    /// `false` when the broker shuts down meanwhile.
    async fn pass_gate(&self, shutdown: &mut watch::Receiver<bool>) -> bool {
        let Some(gate) = &self.gate else {
            return true;
        };
        let mut retry = Retry::default();
        loop {
            let attempt = tokio::select! {
                _ = shutdown.changed() => return false,
                attempt = gate.before_batch() => attempt,
            };
            match attempt {
                Ok(()) => {
                    retry.succeeded("session directory readable again; routing resumes");
                    return true;
                }
                Err(e) => {
                    self.metrics.storage_errors.inc();
                    retry.log_first(|| tracing::error!(error = %e, "router waits: the session directory cannot be read, so subscriptions made on other nodes may be missing (the publish log keeps the messages)"));
                    if !retry.wait(shutdown).await {
                        return false;
                    }
                }
            }
        }
    }

    /// Stores the batch, retrying until it succeeds, is fenced, or the broker shuts down.
    async fn store(&self, batch: WriteBatch, shutdown: &mut watch::Receiver<bool>) -> Stored {
        let mut retry = Retry::default();
        loop {
            // The same batch again: a backend that may have applied part of a failed attempt
            // (an append whose outcome is unknown) recognises those parts by their origin.
            let outcome = match self.storage.submit(batch.clone()).await {
                Ok(result) => result,
                Err(_) => Err(StorageError::Closed),
            };
            match outcome {
                Ok(()) => {
                    retry.succeeded("router stores again; resuming");
                    return Stored::Yes;
                }
                Err(StorageError::Fenced { .. }) => return Stored::Fenced,
                Err(e) => {
                    self.metrics.storage_errors.inc();
                    retry.log_first(|| tracing::error!(error = %e, "router cannot store a batch; retrying until storage is back (the publish log keeps the messages)"));
                    if !retry.wait(shutdown).await {
                        return Stored::ShutDown;
                    }
                }
            }
        }
    }
}

/// Retrying an attempt that failed (storage or the directory down): doubling backoff from
/// [`RETRY_MIN`] to [`RETRY_MAX`], the failure logged once and the recovery once.
struct Retry {
    backoff: Duration,
    failing: bool,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            backoff: RETRY_MIN,
            failing: false,
        }
    }
}

impl Retry {
    /// Runs `log` on the first failure only.
    fn log_first(&mut self, log: impl FnOnce()) {
        if !self.failing {
            log();
            self.failing = true;
        }
    }

    /// Logs `resumed` when earlier attempts had failed.
    fn succeeded(&self, resumed: &str) {
        if self.failing {
            tracing::info!("{resumed}");
        }
    }

    /// Sleeps out the backoff and doubles it; `false` when the broker shuts down meanwhile.
    async fn wait(&mut self, shutdown: &mut watch::Receiver<bool>) -> bool {
        tokio::select! {
            _ = shutdown.changed() => return false,
            _ = tokio::time::sleep(self.backoff) => {}
        }
        self.backoff = (self.backoff * 2).min(RETRY_MAX);
        true
    }
}

/// What became of a batch given to [`Dispatcher::store`].
enum Stored {
    Yes,
    /// Refused: the partition was claimed by another reader.
    Fenced,
    ShutDown,
}

/// Marks the APPLICATION and shared-group appends made for the record at (`partition`,
/// `offset`) with that origin.
fn stamp_origin(batch: &mut WriteBatch, from: usize, partition: i32, offset: i64) {
    for op in &mut batch.ops[from..] {
        match op {
            WriteOp::AppendShared { origin, .. }
            | WriteOp::Enqueue {
                kind: ClientKind::Application,
                origin,
                ..
            } => *origin = Some((partition, offset)),
            _ => {}
        }
    }
}

/// The QoS 2 packet ids the dispatcher routed a message for and has not seen released, per
/// publisher (see the module docs), with the partition the publisher's records travel in.
/// Bounded by 65,535 per publisher client id; a new session of the publisher clears its
/// entries, and a partition that goes to another reader takes its publishers' entries along.
pub struct Qos2Flows {
    open: HashMap<Arc<str>, (i32, HashSet<u16>)>,
}

impl Qos2Flows {
    pub fn new(open: HashMap<Arc<str>, (i32, HashSet<u16>)>) -> Qos2Flows {
        Qos2Flows { open }
    }

    /// Flows whose partition is not known (the local reader's, which reads every partition
    /// and never releases one): kept until released or reset.
    pub fn unpartitioned(open: HashMap<Arc<str>, HashSet<u16>>) -> Qos2Flows {
        Qos2Flows {
            open: open.into_iter().map(|(p, ids)| (p, (-1, ids))).collect(),
        }
    }

    /// A partition was claimed (its stored flows replace what was known of it) or released.
    fn change(&mut self, change: PartitionChange) {
        match change {
            PartitionChange::Claimed { partition, flows } => {
                self.open.retain(|_, (p, _)| *p != partition);
                for (publisher, ids) in flows {
                    self.open.insert(publisher, (partition, ids));
                }
            }
            PartitionChange::Released { partition } => {
                self.open.retain(|_, (p, _)| *p != partition);
            }
        }
    }

    /// Whether to route a QoS 2 message with this packet id and DUP flag; records the flow as
    /// open (in `batch`) when it is routed.
    pub(super) fn route(
        &mut self,
        partition: i32,
        publisher: &Arc<str>,
        pkid: u16,
        dup: bool,
        batch: &mut WriteBatch,
    ) -> bool {
        let (p, ids) = self
            .open
            .entry(publisher.clone())
            .or_insert_with(|| (partition, HashSet::new()));
        *p = partition;
        if ids.contains(&pkid) {
            // Open already: a DUP is the copy of what was routed; without DUP the publisher
            // says it is new (the release must have been lost with a crash), and it stays open.
            return !dup;
        }
        ids.insert(pkid);
        batch.push(WriteOp::RouterQos2 {
            client: publisher.clone(),
            partition,
            change: Qos2FlowChange::Open(pkid),
        });
        true
    }

    pub(super) fn apply(&mut self, partition: i32, control: &LogControl, batch: &mut WriteBatch) {
        match control {
            LogControl::Release { publisher, pkid } => {
                let Some((_, ids)) = self.open.get_mut(publisher) else {
                    return;
                };
                if ids.remove(pkid) {
                    if ids.is_empty() {
                        self.open.remove(publisher);
                    }
                    batch.push(WriteOp::RouterQos2 {
                        client: publisher.clone(),
                        partition,
                        change: Qos2FlowChange::Release(*pkid),
                    });
                }
            }
            LogControl::Reset { publisher } => {
                if self.open.remove(publisher).is_some() {
                    batch.push(WriteOp::RouterQos2 {
                        client: publisher.clone(),
                        partition,
                        change: Qos2FlowChange::Reset,
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::Enqueued;

    fn changes(batch: &WriteBatch) -> Vec<Qos2FlowChange> {
        batch
            .ops
            .iter()
            .filter_map(|op| match op {
                WriteOp::RouterQos2 { change, .. } => Some(*change),
                _ => None,
            })
            .collect()
    }

    /// A DUP resend of an open packet id is dropped; the first send, a resend without DUP and
    /// a send after PUBREL or a new session are routed.
    #[test]
    fn qos2_resends_are_dropped_until_released() {
        let p: Arc<str> = "meter".into();
        let mut flows = Qos2Flows::new(HashMap::new());
        let mut batch = WriteBatch::default();
        assert!(flows.route(0, &p, 7, false, &mut batch));
        assert!(!flows.route(0, &p, 7, true, &mut batch), "a DUP copy");
        assert!(
            flows.route(0, &p, 7, false, &mut batch),
            "new, says the publisher"
        );
        flows.apply(
            0,
            &LogControl::Release {
                publisher: p.clone(),
                pkid: 7,
            },
            &mut batch,
        );
        assert!(
            flows.route(0, &p, 7, true, &mut batch),
            "released: a new flow"
        );
        flows.apply(
            0,
            &LogControl::Reset {
                publisher: p.clone(),
            },
            &mut batch,
        );
        assert!(flows.route(0, &p, 7, true, &mut batch), "new session");
        assert_eq!(
            changes(&batch),
            vec![
                Qos2FlowChange::Open(7),
                Qos2FlowChange::Release(7),
                Qos2FlowChange::Open(7),
                Qos2FlowChange::Reset,
                Qos2FlowChange::Open(7),
            ]
        );
    }

    /// A claimed partition's stored flows replace what was known of it; a released partition
    /// takes its publishers' flows along, and other partitions keep theirs.
    #[test]
    fn qos2_flows_follow_their_partition() {
        let (p0, p1): (Arc<str>, Arc<str>) = ("on-0".into(), "on-1".into());
        let mut flows = Qos2Flows::new(HashMap::new());
        let mut batch = WriteBatch::default();
        assert!(flows.route(0, &p0, 1, false, &mut batch));
        assert!(flows.route(1, &p1, 2, false, &mut batch));
        flows.change(PartitionChange::Released { partition: 0 });
        assert!(
            flows.route(0, &p0, 1, true, &mut batch),
            "forgotten with its partition"
        );
        assert!(!flows.route(1, &p1, 2, true, &mut batch), "kept");
        let stored = HashMap::from([(p0.clone(), HashSet::from([9]))]);
        flows.change(PartitionChange::Claimed {
            partition: 0,
            flows: stored,
        });
        assert!(
            !flows.route(0, &p0, 9, true, &mut batch),
            "loaded with the claim"
        );
        assert!(
            flows.route(0, &p0, 1, true, &mut batch),
            "replaced by the claim"
        );
    }

    /// Only APPLICATION and group appends carry their origin; DEVICE appends do not need it
    /// (they are stored in the transaction that moves the position).
    #[test]
    fn origins_mark_application_and_group_appends_only() {
        let delivery = Enqueued {
            message: Arc::new(crate::message::Message {
                topic: "t".into(),
                payload: Default::default(),
                qos: crate::protocol::QoS::AtLeastOnce,
                retain: false,
                properties: Default::default(),
                received_at: std::time::Instant::now(),
                publisher: "p".into(),
            }),
            qos: crate::protocol::QoS::AtLeastOnce,
            retain: false,
            expires_at_ms: 0,
            subscription_ids: Vec::new(),
        };
        let mut batch = WriteBatch::default();
        for kind in [ClientKind::Device, ClientKind::Application] {
            batch.push(WriteOp::Enqueue {
                client: "c".into(),
                kind,
                delivery: delivery.clone(),
                notify: None,
                origin: None,
            });
        }
        batch.push(WriteOp::AppendShared {
            group: "g".into(),
            filter: "f".into(),
            delivery,
            origin: None,
        });
        stamp_origin(&mut batch, 1, 3, 42);
        let origins: Vec<_> = batch
            .ops
            .iter()
            .map(|op| match op {
                WriteOp::Enqueue { origin, .. } | WriteOp::AppendShared { origin, .. } => *origin,
                _ => None,
            })
            .collect();
        assert_eq!(origins, vec![None, Some((3, 42)), Some((3, 42))]);
    }
}
