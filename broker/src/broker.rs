//! The state every connection shares: configuration, router, session registry, authenticator and
//! metrics, plus the session lifecycle (open, take over, park, expire, wills).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::auth::{AllowAll, Authenticator};
use crate::config::Config;
use crate::message::{Message, MessageProperties};
use crate::metrics::Metrics;
use crate::protocol::Will;
use crate::router::topic::{parse_filter, TopicLimits};
use crate::router::Router;
use crate::session::registry::{Claim, Kick, PendingWill, Registry};
use crate::session::{Session, NEVER_EXPIRES};

/// How long a new connection waits for the previous owner of its client id to let go.
const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(5);

/// Shared broker state. One per process, behind an `Arc`.
pub struct Broker {
    pub config: Config,
    pub router: Router,
    pub registry: Registry,
    pub auth: Arc<dyn Authenticator>,
    pub metrics: Arc<Metrics>,
    pub topic_limits: TopicLimits,
}

/// Why a session could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("the previous connection of this client id did not close in time")]
    TakeoverTimeout,
}

impl Broker {
    pub fn new(config: Config) -> Arc<Broker> {
        Self::with_authenticator(config, Arc::new(AllowAll))
    }

    pub fn with_authenticator(config: Config, auth: Arc<dyn Authenticator>) -> Arc<Broker> {
        let metrics = Arc::new(Metrics::default());
        let topic_limits = TopicLimits {
            max_topic_len: config.limits.max_topic_len,
            max_levels: config.limits.max_topic_levels,
        };
        Arc::new(Broker {
            router: Router::new(metrics.clone()),
            registry: Registry::default(),
            auth,
            metrics,
            topic_limits,
            config,
        })
    }

    /// Claims `client_id` for connection `conn_id`, taking the session over from a live
    /// connection if needed, and returns the session to use and whether it existed
    /// (CONNACK Session Present).
    pub async fn open_session(
        self: &Arc<Self>,
        client_id: Arc<str>,
        conn_id: u64,
        kick: &mpsc::Sender<Kick>,
        clean_start: bool,
        expiry_interval: u32,
    ) -> Result<(Session, bool), OpenError> {
        let deadline = tokio::time::Instant::now() + TAKEOVER_TIMEOUT;
        loop {
            match self.registry.claim(&client_id, conn_id, kick) {
                Claim::Fresh => {
                    let session = self.new_session(client_id, expiry_interval);
                    return Ok((session, false));
                }
                Claim::Resumed(session, pending_will) => {
                    if clean_start {
                        // Clean Start ends the old session: a will still waiting on its delay is
                        // due now ("the Session ends, whichever happens first", v5 §3.1.3.2.2).
                        if let Some(p) = pending_will {
                            self.publish_will(&client_id, p.will);
                        }
                        self.discard(*session);
                        let session = self.new_session(client_id, expiry_interval);
                        return Ok((session, false));
                    }
                    // A reconnect within the will delay cancels the will [MQTT-3.1.3-9].
                    let mut session = *session;
                    session.expiry_interval = expiry_interval;
                    return Ok((session, true));
                }
                Claim::Busy(other) => {
                    let (done_tx, done_rx) = oneshot::channel();
                    if other.send(Kick { done: done_tx }).await.is_ok() {
                        // Either the old owner parks/releases and answers, or it is already
                        // gone; both end the wait.
                        let _ = tokio::time::timeout_at(deadline, done_rx).await;
                    } else {
                        // Its task is finishing; give it a moment to release the slot.
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    if tokio::time::Instant::now() >= deadline {
                        return Err(OpenError::TakeoverTimeout);
                    }
                }
            }
        }
    }

    fn new_session(&self, client_id: Arc<str>, expiry_interval: u32) -> Session {
        self.metrics.sessions.inc();
        Session::new(
            client_id,
            self.config.limits.max_queued_messages,
            expiry_interval,
        )
    }

    /// Ends a session for good: its subscriptions leave the router and its queue is dropped.
    pub fn discard(&self, session: Session) {
        for filter in session.subscriptions.keys() {
            if let Ok(parsed) = parse_filter(filter, &self.topic_limits) {
                self.router.unsubscribe(&session.client_id, parsed);
            }
        }
        self.metrics.sessions.dec();
    }

    /// Called by a connection task when its connection is over. `will` is the will to honour
    /// (already `None` after a normal DISCONNECT); it is published now, or parked with the
    /// session when the client asked for a delay.
    pub fn close_session(self: &Arc<Self>, session: Session, conn_id: u64, will: Option<Will>) {
        let client_id = session.client_id.clone();
        let will_delay = will
            .as_ref()
            .and_then(|w| w.properties.as_ref())
            .and_then(|p| p.delay_interval)
            .unwrap_or(0);
        if !session.is_persistent() {
            self.registry.release(&client_id, conn_id);
            self.discard(session);
            if let Some(will) = will {
                self.publish_will(&client_id, will);
            }
            return;
        }
        let expiry = session.expiry_interval;
        // The will waits for min(will delay, session expiry) [MQTT-3.1.3-9].
        let (publish_now, pending) = match will {
            Some(w) if will_delay == 0 => (Some(w), None),
            Some(w) => (None, Some(PendingWill { will: w })),
            None => (None, None),
        };
        let has_pending = pending.is_some();
        let Some(epoch) = self.registry.park(session, conn_id, pending) else {
            return;
        };
        if let Some(will) = publish_now {
            self.publish_will(&client_id, will);
        }
        if expiry == NEVER_EXPIRES && !has_pending {
            return;
        }
        let broker = self.clone();
        tokio::spawn(async move {
            broker
                .run_offline_timers(client_id, epoch, expiry, will_delay, has_pending)
                .await;
        });
    }

    /// Sleeps through one offline period: publishes a delayed will when it falls due and removes
    /// the session when it expires, unless the client came back meanwhile (epoch changed).
    async fn run_offline_timers(
        self: Arc<Self>,
        client_id: Arc<str>,
        epoch: u64,
        expiry: u32,
        will_delay: u32,
        has_pending_will: bool,
    ) {
        let start = Instant::now();
        if has_pending_will && will_delay < expiry {
            tokio::time::sleep(Duration::from_secs(u64::from(will_delay))).await;
            if let Some(p) = self.registry.take_due_will(&client_id, epoch) {
                self.publish_will(&client_id, p.will);
            }
        }
        if expiry == NEVER_EXPIRES {
            return;
        }
        let total = Duration::from_secs(u64::from(expiry));
        tokio::time::sleep(total.saturating_sub(start.elapsed())).await;
        if let Some((session, will)) = self.registry.expire(&client_id, epoch) {
            tracing::debug!(client_id = %client_id, "session expired");
            if let Some(p) = will {
                self.publish_will(&client_id, p.will);
            }
            self.discard(session);
        }
    }

    /// Publishes a will message as if the client had sent it.
    pub fn publish_will(&self, client_id: &Arc<str>, will: Will) {
        let properties = will.properties.map(|p| MessageProperties {
            payload_format_indicator: p.payload_format_indicator,
            message_expiry_interval: p.message_expiry_interval,
            response_topic: p.response_topic,
            correlation_data: p.correlation_data,
            user_properties: p.user_properties,
            content_type: p.content_type,
        });
        let message = Arc::new(Message {
            topic: will.topic.into(),
            payload: will.payload,
            qos: will.qos,
            retain: will.retain,
            properties: properties.unwrap_or_default(),
            received_at: Instant::now(),
            publisher: client_id.clone(),
        });
        if message.retain {
            self.router.retain(&message);
        }
        self.router.publish(&message);
    }
}
