//! The publish-log seam: with a log-first backend (Kafka), a PUBLISH is appended to a durable
//! log and acknowledged once the log has it; a dispatcher (`router::dispatcher`) reads the log
//! back and routes it. These traits are what the rest of the broker sees of that log, so that
//! nothing above `storage/` names the backend that provides it.
//!
//! The log is split into partitions. A publisher's records (its messages and its control
//! records) all land in one partition, in the order it sent them; offsets within a partition
//! only grow. That is all the dispatcher relies on.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::codec::StoredDelivery;
use super::Completion;
use crate::message::Message;

/// A record of the publish log that carries no MQTT message: a change in a publisher's QoS 2
/// state, which the dispatcher needs in order to drop resends of messages it already routed.
/// It travels in the publisher's partition, so it is read after the messages it refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogControl {
    /// PUBREL: the packet id may carry a new message from now on.
    Release { publisher: Arc<str>, pkid: u16 },
    /// A new session: every packet id of the publisher is free.
    Reset { publisher: Arc<str> },
}

impl LogControl {
    pub fn publisher(&self) -> &Arc<str> {
        match self {
            LogControl::Release { publisher, .. } | LogControl::Reset { publisher } => publisher,
        }
    }
}

/// The packet id and DUP flag of a QoS 2 PUBLISH from a persistent session, carried with its
/// record so the dispatcher can recognise a resend of a message it already routed.
pub type Qos2Mark = (u16, bool);

/// The ingest side: what a connection appends a PUBLISH to.
pub trait PublishLog: Send + Sync + 'static {
    /// Appends `message`; the completion resolves once the log has it durably. Fails at once
    /// with `Overloaded` when the backend's send queue is full.
    fn append(&self, message: &Message, qos2: Option<Qos2Mark>) -> Completion;
    /// Appends a control record, in the publisher's partition after everything it appended
    /// before.
    fn append_control(&self, control: &LogControl) -> Completion;
}

/// One record read back from the log.
#[derive(Debug)]
pub struct LogRecord {
    pub offset: i64,
    pub entry: LogEntry,
}

// Nearly every record is a Publish: boxing it would cost an allocation per message to save
// space on the rare control record.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum LogEntry {
    Publish {
        delivery: StoredDelivery,
        qos2: Option<Qos2Mark>,
    },
    Control(LogControl),
    /// A record this broker cannot read: the reader logged and counted it. The dispatcher
    /// moves past it (it can never become readable).
    Unreadable,
}

/// Records of one partition, in log order.
#[derive(Debug)]
pub struct PartitionRecords {
    pub partition: i32,
    /// The reader's claim on the partition these records were read under: stored with their
    /// batch ([`super::WriteOp::RouterPosition`]), which is refused once the partition was
    /// claimed again.
    pub epoch: i64,
    pub records: Vec<LogRecord>,
}

/// A change in the partitions a reader routes, handed to the dispatcher before any record read
/// after it.
#[derive(Debug)]
pub enum PartitionChange {
    /// The partition is this reader's now: its open QoS 2 flows as stored (publisher → packet
    /// ids; see [`super::WriteOp::RouterQos2`]). They replace whatever the dispatcher knew of
    /// the partition.
    Claimed {
        partition: i32,
        flows: HashMap<Arc<str>, HashSet<u16>>,
    },
    /// The partition went to another reader: forget its state.
    Released { partition: i32 },
}

/// The dispatch side: the publish log read back from the positions the backend stored with
/// the dispatcher's last batches ([`super::WriteOp::RouterPosition`]). The reader delivers
/// every record at or after those positions exactly once per run (records before them are
/// skipped; records lost to retention are logged and counted by the reader). Which partitions
/// it reads may change while it runs ([`PartitionChange`]): a consumer-group rebalance.
#[async_trait::async_trait]
pub trait LogReader: Send + 'static {
    /// The next records, grouped by partition; `None` once the log cannot be read any more.
    /// Waits while there is nothing new.
    async fn next(&mut self) -> Option<Vec<PartitionRecords>>;
    /// Everything of `partition` below `next_offset` is stored: a hint for lag tooling (the
    /// position that counts is the one stored with the batch).
    fn routed(&mut self, partition: i32, next_offset: i64);
    /// The partitions claimed or released since the last call, in order (at start: every
    /// partition claimed when opening). Taken after each [`LogReader::next`], before its records
    /// are routed.
    fn take_changes(&mut self) -> Vec<PartitionChange>;
    /// Storing a batch of `partition` read under `epoch` was refused
    /// ([`super::StorageError::Fenced`]): another reader claimed it. Stop reading it until it
    /// is claimed again.
    fn fenced(&mut self, partition: i32, epoch: i64);
}

/// The publish log as a cluster node's local reader sees it (`router::local`, only with
/// `cluster.enabled`): every partition, whoever routes it, for delivery to this node's own
/// connections and for its in-memory retained store. Nothing is stored and no position is kept:
/// a restarted node starts again from the dispatchers' stored positions.
#[async_trait::async_trait]
pub trait LocalLogReader: Send + 'static {
    /// The next records, grouped by partition, in log order; `None` once the log cannot be
    /// read any more. Waits while there is nothing new.
    async fn next(&mut self) -> Option<Vec<PartitionRecords>>;
    /// Records of `partition` below this offset were in the log before this node opened its
    /// listeners, so no subscriber of this node can be owed them: they only bring the retained
    /// store up to date.
    fn live_from(&self, partition: i32) -> i64;
    /// The dispatchers' open QoS 2 flows at the positions this reader starts from, so that it
    /// drops the same resent copies they do; taken once at start.
    fn open_qos2_flows(&mut self) -> HashMap<Arc<str>, HashSet<u16>>;
}
