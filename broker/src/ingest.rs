//! The durable publish step: what happens to a PUBLISH between the session checking it and the
//! PUBACK/PUBREC that promises it is stored. Chosen once when the broker opens, from what the
//! storage offers:
//!
//! * **Route, then store** (a backend without a publish log: embedded). The publishing
//!   connection matches subscriptions itself, hands deliveries to connected clean-session
//!   subscribers, and submits the deliveries for persistent ones together with the session's
//!   own writes as one batch; the ack waits for that batch. Whether anyone was subscribed is
//!   known at once (v5 reason code 0x10).
//! * **Append, then dispatch** (a backend with a publish log: Kafka). The connection appends
//!   the PUBLISH to the log, and the ack waits for the append (and for the session's own
//!   writes); the dispatcher (`router::dispatcher`) reads the log back and routes. Nobody knows
//!   yet whether anyone is subscribed, so v5 acks say Success.
//!
//! Everything above this module sees an [`Ingest`] and a [`Accepted`]; nothing names a backend.

use std::sync::Arc;

use crate::message::{Delivery, Message};
use crate::metrics::Metrics;
use crate::router::{Mailbox, RouteResult, Router};
use crate::storage::log::{LogControl, PublishLog, Qos2Mark};
use crate::storage::{join_completions, Completion, Storage, WriteBatch};

pub enum Ingest {
    RouteThenStore,
    AppendToLog(Arc<dyn PublishLog>),
}

/// What became of an accepted PUBLISH.
pub struct Accepted {
    /// What the acknowledgement waits for (`None`: nothing to wait for).
    pub wait: Option<Completion>,
    /// How many subscriptions matched, when that is known before the ack.
    pub matched: Option<usize>,
    /// Deliveries that found a connected subscriber's queue full; the publisher places them
    /// (bounded wait, `router::place_blocked`) before it reads on.
    pub blocked: Vec<(Arc<Mailbox>, Delivery)>,
}

/// The parts of the broker a route-then-store publish works with.
pub struct Parts<'a> {
    pub router: &'a Router,
    pub storage: &'a dyn Storage,
    pub metrics: &'a Metrics,
}

impl Ingest {
    /// Whether PUBLISHes go through a log that a dispatcher routes from.
    pub fn is_log(&self) -> bool {
        matches!(self, Ingest::AppendToLog(_))
    }

    /// Takes a PUBLISH (already checked and accepted by the session). `own` holds the session's
    /// own writes that the ack also promises (the stored QoS 2 packet id). `qos2`: the packet id
    /// and DUP flag of a QoS 2 PUBLISH from a persistent session, which lets a dispatcher drop a
    /// resend of a message it already routed.
    pub fn publish(
        &self,
        parts: Parts<'_>,
        message: &Arc<Message>,
        own: WriteBatch,
        qos2: Option<Qos2Mark>,
    ) -> Accepted {
        match self {
            Ingest::RouteThenStore => {
                let (mut batch, routed) = parts.route(message);
                if routed.matched == 0 {
                    parts.metrics.messages_dropped_no_subscribers.inc();
                }
                batch.ops.extend(own.ops);
                Accepted {
                    wait: parts.storage.submit_nonempty(batch),
                    matched: Some(routed.matched),
                    blocked: routed.full,
                }
            }
            Ingest::AppendToLog(log) => {
                let appended = log.append(message, qos2);
                let wait = match parts.storage.submit_nonempty(own) {
                    Some(marked) => join_completions(appended, marked),
                    None => appended,
                };
                Accepted {
                    wait: Some(wait),
                    matched: None,
                    blocked: Vec::new(),
                }
            }
        }
    }

    /// The publisher released a QoS 2 packet id (PUBREL). With a log, the release goes through
    /// it (after the message, same partition) so the dispatcher frees the id; PUBCOMP waits for
    /// it, since it lets the publisher reuse the id.
    pub fn release_qos2(&self, publisher: &Arc<str>, pkid: u16) -> Option<Completion> {
        match self {
            Ingest::RouteThenStore => None,
            Ingest::AppendToLog(log) => Some(log.append_control(&LogControl::Release {
                publisher: publisher.clone(),
                pkid,
            })),
        }
    }

    /// A new persistent session of `publisher`: with a log, every QoS 2 packet id the
    /// dispatcher still holds for it is freed, before any PUBLISH of the new session.
    pub fn reset_session(&self, publisher: &Arc<str>) -> Option<Completion> {
        match self {
            Ingest::RouteThenStore => None,
            Ingest::AppendToLog(log) => Some(log.append_control(&LogControl::Reset {
                publisher: publisher.clone(),
            })),
        }
    }

    /// Publishes a will message and resolves once it is stored (in the publish log, or routed
    /// and stored): for a will that must not be lost by whoever fires it (a cluster's session
    /// timers, `cluster::timers`).
    pub fn will_durably(&self, parts: Parts<'_>, message: &Arc<Message>) -> Option<Completion> {
        match self {
            Ingest::RouteThenStore => {
                let (batch, routed) = parts.route(message);
                parts
                    .metrics
                    .messages_dropped_queue_full
                    .add(routed.full.len() as u64);
                parts.storage.submit_nonempty(batch)
            }
            Ingest::AppendToLog(log) => Some(log.append(message, None)),
        }
    }

    /// Publishes a will message as if its client had sent it. Nobody waits for it or reads on
    /// behalf of it, so nothing is held back; it is stored for persistent subscribers all the
    /// same, and a failure is worth a log line.
    pub fn will(&self, parts: Parts<'_>, message: &Arc<Message>) {
        let Some(stored) = self.will_durably(parts, message) else {
            return;
        };
        let client_id = message.publisher.clone();
        tokio::spawn(async move {
            if let Ok(Err(e)) = stored.await {
                tracing::warn!(client_id = %client_id, error = %e, "will message could not be stored");
            }
        });
    }
}

impl Parts<'_> {
    /// Matches `message` (and keeps it if it is retained): deliveries for clean sessions are in
    /// their mailboxes, the writes for persistent ones in the returned batch.
    fn route(&self, message: &Arc<Message>) -> (WriteBatch, RouteResult) {
        let mut batch = WriteBatch::default();
        if message.retain {
            self.router.retain(message, &mut batch);
        }
        let routed = self.router.publish(message, &mut batch);
        (batch, routed)
    }
}
