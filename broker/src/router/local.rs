//! Local delivery in a cluster (`cluster.enabled`): every node reads all of the publish log
//! ([`LocalLogReader`]) and does the [`Scope::Local`] part of routing for its own connections —
//! clean-session subscribers at any QoS, QoS 0 to persistent sessions — and keeps its in-memory
//! retained store current. The dispatcher of each partition does the [`Scope::Persistent`]
//! part, on whichever node holds it, so nothing is delivered twice on a node that runs both.
//!
//! Nothing is stored: a clean subscriber's messages live in its mailbox, as on a single node.
//! Full mailboxes of connected subscribers hold the reader back for up to
//! `limits.slow_subscriber_wait_ms`, as they hold the dispatcher back on a single node.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::dispatcher::Qos2Flows;
use super::{place_blocked, Router, Scope};
use crate::message::Delivery;
use crate::metrics::Metrics;
use crate::storage::log::{LocalLogReader, LogEntry, PartitionRecords};
use crate::storage::WriteBatch;

/// What local delivery needs.
pub struct LocalDelivery {
    pub router: Arc<Router>,
    pub metrics: Arc<Metrics>,
    /// `limits.slow_subscriber_wait_ms`.
    pub slow_wait: Duration,
}

impl LocalDelivery {
    /// Delivers from the log until shutdown (or until the log cannot be read any more).
    pub async fn run(
        self,
        mut reader: Box<dyn LocalLogReader>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut flows = Qos2Flows::new(reader.open_qos2_flows());
        loop {
            let partitions = tokio::select! {
                _ = shutdown.changed() => return,
                next = reader.next() => match next {
                    Some(p) => p,
                    None => return,
                },
            };
            let mut blocked = VecDeque::new();
            for records in partitions {
                let live_from = reader.live_from(records.partition);
                self.deliver(records, live_from, &mut flows, &mut blocked);
            }
            if !blocked.is_empty() {
                let deadline = tokio::time::Instant::now() + self.slow_wait;
                let dropped = place_blocked(&mut blocked, deadline).await;
                if dropped > 0 {
                    self.metrics.messages_dropped_queue_full.add(dropped);
                }
            }
        }
    }

    /// Applies one partition's records: retained changes always, deliveries from `live_from`.
    fn deliver(
        &self,
        records: PartitionRecords,
        live_from: i64,
        flows: &mut Qos2Flows,
        blocked: &mut VecDeque<(Arc<super::Mailbox>, Delivery)>,
    ) {
        // The local scope writes nothing; the flows' own bookkeeping ops land here and go.
        let mut scratch = WriteBatch::default();
        for record in records.records {
            let (delivery, qos2) = match record.entry {
                LogEntry::Publish { delivery, qos2 } => (delivery, qos2),
                LogEntry::Control(control) => {
                    flows.apply(&control, &mut scratch);
                    continue;
                }
                LogEntry::Unreadable => continue,
            };
            // A resent copy of a QoS 2 message the dispatchers drop is dropped here too:
            // exactly once for clean subscribers as well.
            if let Some((pkid, dup)) = qos2 {
                if !flows.route(&delivery.message.publisher, pkid, dup, &mut scratch) {
                    continue;
                }
            }
            let message = Arc::new(delivery.message);
            if message.retain {
                self.router.restore_retained(&message);
            }
            if record.offset >= live_from {
                let routed = self
                    .router
                    .publish_scoped(&message, &mut scratch, Scope::Local);
                blocked.extend(routed.full);
            }
            scratch.ops.clear();
        }
    }
}
