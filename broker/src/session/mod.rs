//! Session state: what the broker remembers about a client between connections, and the
//! per-connection protocol state machine that drives it.
//!
//! One owner at a time: while a client is connected its connection task owns the [`Session`]
//! value outright; while it is offline the [`registry`] holds it. Nothing else mutates it, so the
//! hot path takes no lock on session state.

pub mod machine;
pub mod outbound;
pub mod registry;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::message::Delivery;
use crate::router::{Mailbox, SubscriptionOptions};
use crate::storage::ClientKind;
use outbound::Outbound;

/// Session Expiry Interval value meaning "never expires" (v5 §3.1.2.11.2).
pub const NEVER_EXPIRES: u32 = u32::MAX;

/// The state of one MQTT session that outlives a network connection (v5 §4.1).
#[derive(Debug)]
pub struct Session {
    pub client_id: Arc<str>,
    /// The router's handle to this session's outbound queue.
    pub mailbox: Arc<Mailbox>,
    /// The receiving end of that queue. Messages keep arriving here while the client is offline,
    /// up to `limits.max_queued_messages`.
    pub queue: mpsc::Receiver<Delivery>,
    /// Subscriptions by their full filter text (including a `$share/group/` prefix).
    pub subscriptions: HashMap<String, SubscriptionOptions>,
    /// Seconds the session outlives its connection; 0 ends it with the connection.
    pub expiry_interval: u32,
    /// Outgoing QoS 1/2 messages not yet fully acknowledged.
    pub outbound: Outbound,
    /// Incoming QoS 2 packet ids that were PUBRECed and await PUBREL. The message was already
    /// routed, so a duplicate PUBLISH with one of these ids must not be routed again
    /// [MQTT-4.3.3-10].
    pub inbound_qos2: HashSet<u16>,
    /// DEVICE or APPLICATION.
    pub kind: ClientKind,
    /// The session has a record in durable storage (it was persistent at some point).
    pub stored: bool,
    /// Durable queue reading: the next sequence number to read.
    pub cursor: u64,
    /// Entries below this were sent before the broker restarted: resend with DUP=1.
    pub dup_below: u64,
    /// The highest stored entry sent to the client (recorded with `WriteOp::MarkSent`).
    pub sent_upto: u64,
    /// The durable queue may hold entries not read yet.
    pub stored_pending: bool,
    /// APPLICATION log: everything below this offset is acknowledged and committed.
    pub committed: u64,
    /// Several active nodes: the epoch of this connection's claim in the session directory.
    pub cluster_epoch: Option<i64>,
}

impl Session {
    /// A session whose durable queue (if any) is read from `next_seq` on.
    pub fn new(
        client_id: Arc<str>,
        queue_capacity: usize,
        expiry_interval: u32,
        kind: ClientKind,
        next_seq: u64,
    ) -> Session {
        let persistent = expiry_interval > 0;
        let (mailbox, queue) = Mailbox::new(client_id.clone(), queue_capacity, kind, persistent);
        Session {
            client_id,
            mailbox,
            queue,
            subscriptions: HashMap::new(),
            expiry_interval,
            outbound: Outbound::default(),
            inbound_qos2: HashSet::new(),
            kind,
            stored: false,
            cursor: next_seq.max(1),
            dup_below: 0,
            sent_upto: 0,
            stored_pending: false,
            committed: next_seq.max(1),
            cluster_epoch: None,
        }
    }

    /// An empty batch for this session's writes. In a cluster a stored session's batches carry
    /// its connection's claim epoch, so storage refuses them once another connection has taken
    /// the session over (`storage::WriteBatch::owner`).
    pub fn write_batch(&self) -> crate::storage::WriteBatch {
        let owner = match (self.stored, self.cluster_epoch) {
            (true, Some(epoch)) => Some(crate::storage::SessionOwner {
                client: self.client_id.clone(),
                epoch,
            }),
            _ => None,
        };
        crate::storage::WriteBatch::owned_by(owner)
    }

    /// Records that the client acknowledged the stored entry `seq` (already removed from the
    /// in-flight window); returns the write that makes it durable: a DEVICE entry is deleted, an
    /// APPLICATION log commits up to its oldest entry still unacknowledged.
    pub fn ack_stored(&mut self, seq: u64) -> Option<crate::storage::WriteOp> {
        use crate::storage::WriteOp;
        match self.kind {
            ClientKind::Device => Some(WriteOp::AckDevice {
                client: self.client_id.clone(),
                seq,
            }),
            ClientKind::Application => {
                // Entries are read in order, so everything below the read cursor is either
                // acknowledged or still in flight: the commit point is the oldest in flight.
                let oldest_in_flight = self
                    .outbound
                    .iter()
                    .filter_map(|i| i.delivery.seq)
                    .min()
                    .unwrap_or(self.cursor);
                if oldest_in_flight <= self.committed {
                    return None;
                }
                self.committed = oldest_in_flight;
                Some(WriteOp::CommitApplication {
                    client: self.client_id.clone(),
                    next_offset: self.committed,
                })
            }
        }
    }

    /// Whether the session outlives the connection.
    pub fn is_persistent(&self) -> bool {
        self.expiry_interval > 0
    }
}
