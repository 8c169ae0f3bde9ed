//! The state every connection shares: configuration, router, session registry, authenticator and
//! metrics, plus the session lifecycle (open, take over, park, expire, wills).

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::auth::{AllowAll, Authenticator};
use crate::cluster::Cluster;
use crate::config::Config;
use crate::ingest::{Ingest, Parts};
use crate::message::{Message, MessageProperties};
use crate::metrics::Metrics;
use crate::protocol::Will;
use crate::router::topic::{parse_filter, TopicLimits};
use crate::router::{Mailbox, Router, SubscriptionOptions};
use crate::session::registry::{Claim, Due, Kick, KickReason, PendingWill, Registry};
use crate::session::{Session, NEVER_EXPIRES};
use crate::storage::codec::now_ms;
use crate::storage::log::{LocalLogReader, LogReader};
use crate::storage::{
    ClientKind, LogParts, RestoredSession, SessionOwner, SessionRecord, SessionTimer, Storage,
    StorageError, WriteBatch, WriteOp,
};

/// How long a new connection waits for the previous owner of its client id to let go.
use crate::cluster::TAKEOVER_TIMEOUT;

/// Shared broker state. One per process, behind an `Arc`.
pub struct Broker {
    pub config: Config,
    /// Shared with the dispatcher of a log-first backend.
    pub router: Arc<Router>,
    pub registry: Registry,
    pub auth: Arc<dyn Authenticator>,
    pub metrics: Arc<Metrics>,
    pub topic_limits: TopicLimits,
    pub storage: Arc<dyn Storage>,
    /// The durable publish step (route-then-store, or append to the storage's publish log).
    pub ingest: Ingest,
    /// A log-first backend's publish log reader, until the server starts its dispatcher.
    log_reader: parking_lot::Mutex<Option<Box<dyn LogReader>>>,
    /// In a cluster, this node's local reader of the publish log, until the server starts its
    /// local delivery.
    local_reader: parking_lot::Mutex<Option<Box<dyn LocalLogReader>>>,
    /// Several active nodes (`cluster.enabled`): this node's part in the cluster.
    cluster: OnceLock<Arc<Cluster>>,
}

/// Why a session could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("the previous connection of this client id did not close in time")]
    TakeoverTimeout,
    #[error("storing the session failed: {0}")]
    Storage(#[from] StorageError),
    #[error("this node is fenced: it cannot reach Kafka or PostgreSQL")]
    NodeFenced,
}

/// The message a will becomes when it is published, as if its client had sent it.
fn will_message(client_id: &Arc<str>, will: Will) -> Message {
    Message {
        topic: will.topic.into(),
        payload: will.payload,
        qos: will.qos,
        retain: will.retain,
        properties: MessageProperties::from_will(will.properties),
        received_at: Instant::now(),
        publisher: client_id.clone(),
    }
}

impl Broker {
    /// Opens the configured storage, restores what it holds and returns the broker.
    pub async fn open(config: Config) -> Result<Arc<Broker>, StorageError> {
        Self::open_with_authenticator(config, Arc::new(AllowAll)).await
    }

    pub async fn open_with_authenticator(
        config: Config,
        auth: Arc<dyn Authenticator>,
    ) -> Result<Arc<Broker>, StorageError> {
        let metrics = Arc::new(Metrics::default());
        let opened = crate::storage::open(&config, metrics.clone()).await?;
        let broker = Self::with_parts(config, auth, opened.storage, metrics, opened.log);
        broker.restore().await?;
        if broker.config.cluster.enabled {
            Cluster::start(&broker).await?;
        }
        Ok(broker)
    }

    /// This node's part in a cluster of active nodes, when `cluster.enabled`.
    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.get()
    }

    pub(crate) fn set_cluster(&self, cluster: Arc<Cluster>) {
        let _ = self.cluster.set(cluster);
    }

    pub fn with_parts(
        config: Config,
        auth: Arc<dyn Authenticator>,
        storage: Arc<dyn Storage>,
        metrics: Arc<Metrics>,
        log: Option<LogParts>,
    ) -> Arc<Broker> {
        let topic_limits = TopicLimits {
            max_topic_len: config.limits.max_topic_len,
            max_levels: config.limits.max_topic_levels,
        };
        let router = Arc::new(Router::new(metrics.clone(), config.device.message_ttl_secs));
        router.set_shared_groups_in_log(storage.shared_groups_in_log());
        let (ingest, log_reader, local_reader) = match log {
            Some(LogParts {
                append,
                reader,
                local,
            }) => (Ingest::AppendToLog(append), Some(reader), local),
            None => (Ingest::RouteThenStore, None, None),
        };
        Arc::new(Broker {
            router,
            registry: Registry::default(),
            auth,
            metrics,
            topic_limits,
            storage,
            ingest,
            log_reader: parking_lot::Mutex::new(log_reader),
            local_reader: parking_lot::Mutex::new(local_reader),
            cluster: OnceLock::new(),
            config,
        })
    }

    /// The client type of `client_id` per configuration (`[[application_clients]]`), for
    /// clients whose credentials do not decide it.
    pub fn client_kind(&self, client_id: &str) -> ClientKind {
        if self.config.is_application_client(client_id) {
            ClientKind::Application
        } else {
            ClientKind::Device
        }
    }

    /// Rebuilds sessions, subscriptions and retained messages from storage, after a clean stop or
    /// a crash. Every restored session starts offline; its expiry counts from when its client
    /// disconnected (or from now, when the broker died while it was connected).
    async fn restore(self: &Arc<Self>) -> Result<(), StorageError> {
        let snapshot = self.storage.load().await?;
        let now = now_ms();
        let clustered = self.config.cluster.enabled;
        let (mut sessions, mut entries) = (0usize, 0u64);
        for restored in snapshot.sessions {
            // The type was decided at CONNECT (by credentials or configuration) and stored with
            // the session; a client whose type changed since gets a fresh session when it
            // connects again (see `open_session`).
            let record = &restored.record;
            let gone_ms = if record.disconnected_at_ms == 0 {
                0
            } else {
                now.saturating_sub(record.disconnected_at_ms)
            };
            // In a cluster the stored session timers end sessions, once for all nodes
            // (`cluster::timers`); this node only mirrors them.
            let remaining = if record.expiry_interval == NEVER_EXPIRES || clustered {
                NEVER_EXPIRES
            } else {
                let left = u64::from(record.expiry_interval).saturating_sub(gone_ms / 1000);
                if left == 0 {
                    self.delete_stored(&restored.client);
                    continue;
                }
                left as u32
            };
            entries += restored.next_seq.saturating_sub(restored.read_from);
            let client = restored.client.clone();
            let session = self.session_from_restored(restored);
            sessions += 1;
            let epoch = self.registry.restore(session);
            if remaining != NEVER_EXPIRES {
                let deadline = now + u64::from(remaining) * 1000;
                self.registry
                    .schedule(&client, epoch, deadline, Due::Expiry);
            }
        }
        let retained = snapshot.retained.len();
        for message in snapshot.retained {
            self.router.restore_retained(&message);
        }
        tracing::info!(
            sessions,
            queued_upper_bound = entries,
            retained,
            "restored state from storage"
        );
        Ok(())
    }

    /// A session rebuilt from its stored state, its subscriptions in the router.
    pub(crate) fn session_from_restored(&self, restored: RestoredSession) -> Session {
        let session = self.unrouted_session(restored);
        self.route_subscriptions(&session.mailbox, session.subscriptions.iter());
        session
    }

    /// A session rebuilt from its stored state, its subscriptions not in the router yet.
    pub(crate) fn unrouted_session(&self, restored: RestoredSession) -> Session {
        let mut session = Session::new(
            restored.client.clone(),
            self.config.limits.max_queued_messages,
            restored.record.expiry_interval,
            restored.record.kind,
            restored.next_seq,
        );
        session.stored = true;
        session.cursor = restored.read_from;
        session.committed = restored.read_from;
        session.dup_below = restored.sent_upto + 1;
        session.sent_upto = restored.sent_upto;
        session.stored_pending = true;
        session.inbound_qos2 = restored.inbound_qos2.into_iter().collect();
        for (filter, options) in restored.subscriptions {
            if parse_filter(&filter, &self.topic_limits).is_ok() {
                session.subscriptions.insert(filter, options);
            }
        }
        self.metrics.sessions.inc();
        session
    }

    /// Puts the subscriptions in the router for `mailbox` (an entry of the same client id is
    /// replaced).
    fn route_subscriptions<'a>(
        &self,
        mailbox: &Arc<Mailbox>,
        subscriptions: impl Iterator<Item = (&'a String, &'a SubscriptionOptions)>,
    ) {
        for (filter, options) in subscriptions {
            if let Ok(parsed) = parse_filter(filter, &self.topic_limits) {
                self.router.subscribe(mailbox, parsed, options.clone());
            }
        }
    }

    /// Takes a session out of the router and the counts without touching storage (another
    /// node holds it, or a fresher copy replaces it).
    fn forget_local(&self, session: &Session) {
        for filter in session.subscriptions.keys() {
            if let Ok(parsed) = parse_filter(filter, &self.topic_limits) {
                self.router.unsubscribe_mailbox(&session.mailbox, parsed);
            }
        }
        self.metrics.sessions.dec();
    }

    /// Parks `session`, a copy of a session another node holds, in place of this node's copy.
    /// Returns its offline epoch, or `None` (and drops it) when the client is online here.
    ///
    /// `session` comes from [`Broker::unrouted_session`]: its subscriptions enter the router only
    /// once the registry took it. Routed first, a copy refused because its client is connected
    /// here would have replaced the live session's router entries, and removing it would have
    /// left the client with none (found by `cluster`'s roaming test: a message published while
    /// the client's previous connection on this node was still closing matched nothing).
    pub(crate) fn replace_mirror(&self, session: Session) -> Option<u64> {
        let mailbox = session.mailbox.clone();
        let subscriptions: Vec<(String, SubscriptionOptions)> = session
            .subscriptions
            .iter()
            .map(|(f, o)| (f.clone(), o.clone()))
            .collect();
        match self.registry.mirror(session) {
            Ok((epoch, old)) => {
                // The new entries replace the old copy's first, so that the client is never
                // without a subscription in between.
                self.route_subscriptions(&mailbox, subscriptions.iter().map(|(f, o)| (f, o)));
                if let Some(old) = old {
                    self.forget_local(&old);
                }
                Some(epoch)
            }
            Err(_connected_here) => {
                self.metrics.sessions.dec();
                None
            }
        }
    }

    /// Drops this node's offline copy of a session that ended on another node, or that is
    /// a clean session there now.
    pub(crate) fn forget_mirror(&self, client: &str) {
        if let Some((session, _will)) = self.registry.remove_offline(client) {
            self.forget_local(&session);
        }
    }

    /// Claims `client_id` for connection `conn_id`, taking the session over from a live
    /// connection if needed, and returns the session to use and whether it existed
    /// (CONNACK Session Present). A persistent session is durable before this returns.
    pub async fn open_session(
        self: &Arc<Self>,
        client_id: Arc<str>,
        conn_id: u64,
        mut kick: Option<oneshot::Sender<Kick>>,
        clean_start: bool,
        expiry_interval: u32,
        kind: ClientKind,
    ) -> Result<(Session, bool), OpenError> {
        // Several active nodes: take the client id in the directory first (the node that held
        // it closes its connection and lets go), then read the session's state from storage.
        let cluster = self.cluster().cloned();
        if cluster.as_ref().is_some_and(|c| c.is_fenced()) {
            return Err(OpenError::NodeFenced);
        }
        let restart = clean_start && kind == ClientKind::Device;
        let cluster_epoch = match &cluster {
            Some(c) => Some(
                c.claim(
                    &client_id,
                    expiry_interval > 0,
                    restart,
                    kind,
                    expiry_interval,
                )
                .await?,
            ),
            None => None,
        };
        let deadline = tokio::time::Instant::now() + TAKEOVER_TIMEOUT;
        let (mut session, mut present) = loop {
            match self.registry.claim(&client_id, conn_id, &mut kick) {
                Claim::Fresh => {
                    break (
                        self.new_session(client_id.clone(), expiry_interval, kind),
                        false,
                    )
                }
                Claim::Resumed(session, pending_will) => {
                    // APPLICATION sessions are always resumed: their log is the point.
                    let restart =
                        (clean_start && kind == ClientKind::Device) || session.kind != kind;
                    if restart {
                        // Clean Start ends the old session: a will still waiting on its delay is
                        // due now ("the Session ends, whichever happens first", v5 §3.1.3.2.2).
                        if let Some(p) = pending_will {
                            self.publish_will(&client_id, *p.will);
                        }
                        self.discard(*session);
                        break (
                            self.new_session(client_id.clone(), expiry_interval, kind),
                            false,
                        );
                    }
                    // A reconnect within the will delay cancels the will [MQTT-3.1.3-9].
                    let mut session = *session;
                    session.expiry_interval = expiry_interval;
                    session.mailbox.set_persistent(expiry_interval > 0);
                    session.stored_pending = session.stored;
                    break (session, true);
                }
                Claim::Busy(other) => {
                    let (done_tx, done_rx) = oneshot::channel();
                    let kick = Kick {
                        done: done_tx,
                        reason: KickReason::TakenOver,
                    };
                    match other.map(|o| o.send(kick)) {
                        // Either the old owner parks/releases and answers, or it is already
                        // gone; both end the wait.
                        Some(Ok(())) => {
                            let _ = tokio::time::timeout_at(deadline, done_rx).await;
                        }
                        // Its task is finishing, or another connection is kicking it: give
                        // it a moment to release the slot.
                        _ => tokio::time::sleep(Duration::from_millis(5)).await,
                    }
                    if tokio::time::Instant::now() >= deadline {
                        return Err(OpenError::TakeoverTimeout);
                    }
                }
            }
        };
        if let (Some(cluster), Some(epoch)) = (&cluster, cluster_epoch) {
            session.cluster_epoch = Some(epoch);
            match self
                .session_from_storage(session, present, restart, expiry_interval, kind)
                .await
            {
                Ok((s, p)) => (session, present) = (s, p),
                Err(e) => {
                    cluster.unclaim(&client_id, epoch);
                    self.registry.release(&client_id, conn_id);
                    return Err(e.into());
                }
            }
        }
        if kind == ClientKind::Application {
            match self.storage.prepare_application(&client_id).await {
                Ok(Some(start)) if !present => {
                    session.cursor = start;
                    session.committed = start;
                    session.stored_pending = true;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(client_id = %client_id, error = %e, "APPLICATION client refused: its log is not available");
                    self.release_failed_open(session, conn_id);
                    return Err(e.into());
                }
            }
        }
        if session.is_persistent() {
            let record = SessionRecord {
                kind,
                expiry_interval: session.expiry_interval,
                disconnected_at_ms: 0,
            };
            // Written for this connection: in a cluster it records its claim as the owner epoch.
            let mut batch = WriteBatch::owned_by(session.cluster_epoch.map(|epoch| SessionOwner {
                client: client_id.clone(),
                epoch,
            }));
            batch.push(WriteOp::PutSession {
                client: client_id.clone(),
                record,
            });
            // With a publish log, a new session frees every QoS 2 packet id the dispatcher
            // still holds for this client (`router::dispatcher::Qos2Flows`); the reset is in
            // the log before any PUBLISH of the new session.
            let reset = if present {
                None
            } else {
                self.ingest.reset_session(&client_id)
            };
            let written = self.storage.submit(batch).await;
            let written = match (written, reset) {
                (Ok(Ok(())), Some(reset)) => reset.await,
                (written, _) => written,
            };
            match written {
                Ok(Ok(())) => session.stored = true,
                Ok(Err(e)) => {
                    self.release_failed_open(session, conn_id);
                    return Err(e.into());
                }
                Err(_) => {
                    self.release_failed_open(session, conn_id);
                    return Err(StorageError::Closed.into());
                }
            }
        }
        if let (Some(cluster), true) = (&cluster, session.is_persistent()) {
            // Every node's dispatcher stores for this session from now on, with these
            // subscriptions (the claim carried the ones the directory knew).
            if let Err(e) = cluster.announce(&session, true).await {
                self.release_failed_open(session, conn_id);
                return Err(e.into());
            }
        }
        if kind == ClientKind::Application {
            self.application_shared(&session);
        }
        Ok((session, present))
    }

    /// Several active nodes: the session as storage has it, in place of this node's copy
    /// (which another node may have changed since). Clean Start deletes what is stored.
    async fn session_from_storage(
        &self,
        local: Session,
        present: bool,
        restart: bool,
        expiry_interval: u32,
        kind: ClientKind,
    ) -> Result<(Session, bool), StorageError> {
        let epoch = local.cluster_epoch;
        if let Some(epoch) = epoch {
            // From here on the connections that held the session before cannot change it, and
            // its will and expiry are cancelled (the client is back).
            self.storage.own_session(&local.client_id, epoch).await?;
        }
        if restart {
            if !present {
                let mut batch = WriteBatch::default();
                batch.push(WriteOp::DeleteSession {
                    client: local.client_id.clone(),
                });
                self.storage
                    .submit(batch)
                    .await
                    .unwrap_or(Err(StorageError::Closed))?;
            }
            return Ok((local, false));
        }
        let stored = self.storage.load_session(&local.client_id).await?;
        let (mut session, present) = match stored {
            Some(restored) if restored.record.kind == kind => {
                let session = self.session_from_restored(restored);
                self.forget_local(&local);
                (session, true)
            }
            _ if present => {
                // This node's copy is of a session that has ended elsewhere.
                self.forget_local(&local);
                (
                    self.new_session(local.client_id.clone(), expiry_interval, kind),
                    false,
                )
            }
            _ => (local, false),
        };
        session.expiry_interval = expiry_interval;
        session.mailbox.set_persistent(expiry_interval > 0);
        session.stored_pending = session.stored;
        session.cluster_epoch = epoch;
        Ok((session, present))
    }

    /// Hands an online APPLICATION session's shared subscriptions to the storage backend.
    pub fn application_shared(&self, session: &Session) {
        let shared: Vec<_> = session
            .subscriptions
            .iter()
            .filter(|(filter, _)| filter.starts_with("$share/"))
            .map(|(filter, options)| (filter.clone(), options.clone()))
            .collect();
        self.storage
            .application_shared(&session.client_id, shared, session.mailbox.stored.clone());
    }

    /// Gives the slot back when a session could not be made durable.
    fn release_failed_open(&self, session: Session, conn_id: u64) {
        let client_id = session.client_id.clone();
        if session.stored {
            let _ = self.registry.park(session, conn_id, None);
        } else {
            self.registry.release(&client_id, conn_id);
            self.discard(session);
        }
    }

    fn new_session(&self, client_id: Arc<str>, expiry_interval: u32, kind: ClientKind) -> Session {
        self.metrics.sessions.inc();
        Session::new(
            client_id,
            self.config.limits.max_queued_messages,
            expiry_interval,
            kind,
            1,
        )
    }

    /// Ends a session for good: its subscriptions leave the router, its in-memory queue is
    /// dropped and its stored state deleted.
    pub fn discard(&self, session: Session) {
        for filter in session.subscriptions.keys() {
            if let Ok(parsed) = parse_filter(filter, &self.topic_limits) {
                self.router.unsubscribe_mailbox(&session.mailbox, parsed);
            }
        }
        if session.stored {
            self.delete_stored(&session.client_id);
        }
        self.metrics.sessions.dec();
    }

    fn delete_stored(&self, client_id: &Arc<str>) {
        let mut batch = WriteBatch::default();
        batch.push(WriteOp::DeleteSession {
            client: client_id.clone(),
        });
        // Not awaited: a crash before it lands only resurrects a session that was ending anyway,
        // and restore applies its expiry again.
        self.storage.submit_detached(batch);
    }

    /// Called by a connection task when its connection is over. `will` is the will to honour
    /// (already `None` after a normal DISCONNECT); it is published now, or parked with the
    /// session when the client asked for a delay.
    pub fn close_session(self: &Arc<Self>, session: Session, conn_id: u64, will: Option<Will>) {
        let client_id = session.client_id.clone();
        self.storage.client_offline(&client_id);
        let will_delay = will
            .as_ref()
            .and_then(|w| w.properties.as_ref())
            .and_then(|p| p.delay_interval)
            .unwrap_or(0);
        if let (Some(cluster), Some(epoch)) = (self.cluster(), session.cluster_epoch) {
            cluster.unclaim(&client_id, epoch);
            if cluster.superseded(&client_id, epoch) {
                self.close_superseded(session, conn_id, will, will_delay);
                return;
            }
            if session.is_persistent() {
                cluster.announce_offline(&session);
            } else {
                cluster.announce_ended(&client_id);
            }
        }
        if !session.is_persistent() {
            // Its subscriptions go before its client id is free: a new session of the same
            // client id must not subscribe in between and then lose that subscription.
            self.discard(session);
            self.registry.release(&client_id, conn_id);
            if let Some(will) = will {
                self.publish_will(&client_id, will);
            }
            return;
        }
        let expiry = session.expiry_interval;
        let mut batch = session.write_batch();
        batch.push(WriteOp::PutSession {
            client: client_id.clone(),
            record: SessionRecord {
                kind: session.kind,
                expiry_interval: expiry,
                disconnected_at_ms: now_ms(),
            },
        });
        if self.cluster().is_some() {
            self.close_clustered(session, conn_id, will, will_delay, batch);
            return;
        }
        self.storage.submit_detached(batch);
        // The will waits for min(will delay, session expiry) [MQTT-3.1.3-9].
        let (publish_now, pending) = match will {
            Some(w) if will_delay == 0 => (Some(w), None),
            Some(w) => (None, Some(PendingWill { will: Box::new(w) })),
            None => (None, None),
        };
        let has_pending = pending.is_some();
        let Some(epoch) = self.registry.park(session, conn_id, pending) else {
            return;
        };
        if let Some(will) = publish_now {
            self.publish_will(&client_id, will);
        }
        let now = now_ms();
        if has_pending && will_delay < expiry {
            let deadline = now + u64::from(will_delay) * 1000;
            self.registry
                .schedule(&client_id, epoch, deadline, Due::Will);
        }
        if expiry != NEVER_EXPIRES {
            let deadline = now + u64::from(expiry) * 1000;
            self.registry
                .schedule(&client_id, epoch, deadline, Due::Expiry);
        }
    }

    /// A persistent session's connection ended on a cluster node: its delayed will and its
    /// expiry go to storage with the session's disconnect, where one node of the cluster fires
    /// each (`cluster::timers`); nothing is scheduled in this node's memory.
    fn close_clustered(
        &self,
        session: Session,
        conn_id: u64,
        will: Option<Will>,
        will_delay: u32,
        mut batch: WriteBatch,
    ) {
        let client_id = session.client_id.clone();
        let (publish_now, delayed) = match will {
            Some(w) if will_delay == 0 => (Some(w), None),
            Some(w) => {
                let mut record = bytes::BytesMut::new();
                crate::storage::codec::encode_message(&will_message(&client_id, w), &mut record);
                (None, Some((will_delay, record.to_vec())))
            }
            None => (None, None),
        };
        if let Some(timer) = SessionTimer::at_disconnect(now_ms(), session.expiry_interval, delayed)
        {
            batch.push(WriteOp::PutTimer {
                client: client_id.clone(),
                timer,
            });
        }
        self.storage.submit_detached(batch);
        let _ = self.registry.park(session, conn_id, None);
        if let Some(will) = publish_now {
            self.publish_will(&client_id, will);
        }
    }

    /// Closes a connection whose client connected to another node since: that node owns the
    /// session now, so nothing more is written about it here. The will is published unless
    /// it waits on a delay (the client is back, which cancels it [MQTT-3.1.3-9]).
    fn close_superseded(&self, session: Session, conn_id: u64, will: Option<Will>, delay: u32) {
        let client_id = session.client_id.clone();
        if session.is_persistent() {
            let _ = self.registry.park(session, conn_id, None);
        } else {
            self.forget_local(&session);
            self.registry.release(&client_id, conn_id);
        }
        if let (Some(will), 0) = (will, delay) {
            self.publish_will(&client_id, will);
        }
    }

    /// Publishes delayed wills and removes expired sessions whose time has come, at most
    /// `budget` per call. Called by a background task every [`crate::server`] tick.
    pub fn expire_due(&self, budget: usize) -> usize {
        let due = self.registry.take_due(now_ms(), budget);
        let n = due.len();
        for (client_id, epoch, what) in due {
            match what {
                Due::Will => {
                    if let Some(p) = self.registry.take_due_will(&client_id, epoch) {
                        self.publish_will(&client_id, *p.will);
                    }
                }
                Due::Expiry => {
                    if let Some((session, will)) = self.registry.expire(&client_id, epoch) {
                        tracing::debug!(client_id = %client_id, "session expired");
                        // The session ends: a will still waiting on its delay is due now.
                        if let Some(p) = will {
                            self.publish_will(&client_id, *p.will);
                        }
                        self.discard(session);
                        if let Some(cluster) = self.cluster() {
                            cluster.announce_ended(&client_id);
                        }
                    }
                }
            }
        }
        n
    }

    /// What the ingest step works with.
    pub fn parts(&self) -> Parts<'_> {
        Parts {
            router: &self.router,
            storage: self.storage.as_ref(),
            metrics: &self.metrics,
        }
    }

    /// The log-first backend's publish log reader, for the dispatcher; there is one.
    pub fn take_log_reader(&self) -> Option<Box<dyn LogReader>> {
        self.log_reader.lock().take()
    }

    /// In a cluster, the local reader of the publish log, for local delivery; there is one.
    pub fn take_local_reader(&self) -> Option<Box<dyn LocalLogReader>> {
        self.local_reader.lock().take()
    }

    /// Publishes a will message as if the client had sent it.
    pub fn publish_will(&self, client_id: &Arc<str>, will: Will) {
        let message = Arc::new(will_message(client_id, will));
        self.ingest.will(self.parts(), &message);
    }

    /// Publishes a will message and waits until it is stored (`cluster::timers`).
    pub async fn publish_will_durably(&self, message: Arc<Message>) -> Result<(), StorageError> {
        match self.ingest.will_durably(self.parts(), &message) {
            Some(done) => done.await.unwrap_or(Err(StorageError::Closed)),
            None => Ok(()),
        }
    }
}
