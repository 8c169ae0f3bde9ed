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
}

impl Session {
    pub fn new(client_id: Arc<str>, queue_capacity: usize, expiry_interval: u32) -> Session {
        let (mailbox, queue) = Mailbox::new(client_id.clone(), queue_capacity);
        Session {
            client_id,
            mailbox,
            queue,
            subscriptions: HashMap::new(),
            expiry_interval,
            outbound: Outbound::default(),
            inbound_qos2: HashSet::new(),
        }
    }

    /// Whether the session outlives the connection.
    pub fn is_persistent(&self) -> bool {
        self.expiry_interval > 0
    }
}
