//! Several active nodes (`cluster.enabled`): what a node does so that any node can take any
//! client. The session directory ([`directory`]) says which node holds each client id and what
//! every persistent session is subscribed to; this module applies it to the node's registry and
//! router, moves sessions between nodes, and closes a local connection whose client connected
//! elsewhere. Design and limits: docs/scale-out.md.

pub mod directory;
pub mod fence;
pub mod lease;
pub mod timers;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::oneshot;

use crate::broker::Broker;
use crate::session::registry::{Kick, KickReason};
use crate::session::Session;
use crate::storage::codec::now_ms;
use crate::storage::{
    ClientKind, Completion, RestoredSession, SessionOwner, SessionTimer, StorageError, WriteOp,
};
use directory::{Change, Directory, Known, SessionState};

/// Runs `step` every `period` until shutdown, skipping ticks while the node is fenced (it cannot
/// reach its storage; another node does the work). A failing step is logged once per outage
/// (`what`: what failed), and the next tick tries again.
pub(crate) async fn every_tick_unfenced<F, Fut>(
    cluster: &Cluster,
    period: Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    what: &'static str,
    mut step: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), StorageError>>,
{
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tick.tick() => {}
        }
        if cluster.is_fenced() {
            continue;
        }
        match step().await {
            Ok(()) => failing = false,
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "{what} failed; retrying");
                }
                failing = true;
            }
        }
    }
}

/// How long a node taking a session waits for the node that held it to let go (a dead node
/// never answers).
pub const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(5);

/// A node's part in the cluster.
pub struct Cluster {
    pub directory: Arc<Directory>,
    /// Client ids connected to this node, with the epoch of their connection's claim.
    local: Mutex<HashMap<Arc<str>, i64>>,
    /// Set while the node is cut off from Kafka and PostgreSQL ([`fence`]).
    fenced: std::sync::atomic::AtomicBool,
}

impl Cluster {
    /// Opens the directory, starts following it and returns once this node has read it to
    /// its end (so it knows every session before it serves a client).
    pub async fn start(broker: &Arc<Broker>) -> Result<Arc<Cluster>, StorageError> {
        let (directory, consumer) = Directory::open(
            &broker.config.kafka,
            &broker.config.cluster,
            broker.metrics.clone(),
        )
        .await?;
        let cluster = Arc::new(Cluster {
            directory: directory.clone(),
            local: Mutex::new(HashMap::new()),
            fenced: std::sync::atomic::AtomicBool::new(false),
        });
        broker.set_cluster(cluster.clone());
        let weak = Arc::downgrade(broker);
        tokio::spawn(directory.clone().follow(consumer, move |change, previous| {
            if let Some(broker) = weak.upgrade() {
                apply(&broker, change, previous);
            }
        }));
        directory.catch_up().await?;
        tracing::info!(
            node = directory.node(),
            "session directory read; this node knows every session"
        );
        // Registered before this node takes any client: a node that takes the row of this
        // node's previous life closes only claims made before (`lease`).
        let node = cluster.directory.node().to_string();
        let lease = lease::lease(broker.config.cluster.fence_after_secs);
        broker
            .storage
            .renew_lease(&node, now_ms() + lease.as_millis() as u64)
            .await?;
        cluster
            .close_sessions_of(broker, &node, cluster.directory.applied())
            .await;
        Ok(cluster)
    }

    /// Sessions `node` held connected when it stopped without closing them (a crash; called
    /// for this node at its start, and for a node whose lease lapsed, `lease`), among those
    /// claimed at directory offsets below `below`: a clean one has ended (every node drops its
    /// copy, so a shared group no longer counts it); a persistent one is disconnected now, so
    /// its expiry starts now and is stored as a cluster timer like any other disconnect's.
    /// Their wills died with the process. A session another node took meanwhile is left alone
    /// (the batch carries the old claim's epoch and is refused).
    pub async fn close_sessions_of(&self, broker: &Arc<Broker>, node: &str, below: i64) {
        let now = now_ms();
        for (client, known) in self.directory.connected_on(node) {
            if known.claim_epoch >= below {
                continue;
            }
            let state = &known.state;
            if !state.persistent {
                if let Err(e) = self.directory.ended(&client).await {
                    tracing::warn!(client_id = %client, error = %e, "announcing the end of a session held before the restart failed");
                }
                continue;
            }
            let mut batch = crate::storage::WriteBatch::owned_by(Some(SessionOwner {
                client: client.clone(),
                epoch: known.claim_epoch,
            }));
            batch.push(WriteOp::PutSession {
                client: client.clone(),
                record: crate::storage::SessionRecord {
                    kind: state.client_kind(),
                    expiry_interval: state.expiry_interval,
                    disconnected_at_ms: now,
                },
            });
            if let Some(timer) = SessionTimer::at_disconnect(now, state.expiry_interval, None) {
                batch.push(WriteOp::PutTimer {
                    client: client.clone(),
                    timer,
                });
            }
            match broker.storage.submit(batch).await {
                Ok(Ok(())) => {
                    let mut offline = state.clone();
                    offline.claim = Some(known.claim_epoch);
                    offline.keeps_subscriptions = false;
                    offline.connected = false;
                    offline.disconnected_at_ms = now;
                    if let Err(e) = self.directory.announce(&client, offline).await {
                        tracing::warn!(client_id = %client, error = %e, "announcing a session disconnected by a restart failed");
                    }
                }
                Ok(Err(e)) => {
                    tracing::debug!(client_id = %client, error = %e, "a session held before the restart moved on");
                }
                Err(_) => {}
            }
        }
    }

    /// Whether the node is fenced: it serves no client until Kafka and PostgreSQL answer again.
    pub fn is_fenced(&self) -> bool {
        self.fenced.load(std::sync::atomic::Ordering::Acquire)
    }

    fn set_fenced(&self, fenced: bool) {
        self.fenced
            .store(fenced, std::sync::atomic::Ordering::Release);
    }

    fn local_epoch(&self, client: &str) -> Option<i64> {
        self.local.lock().get(client).copied()
    }

    /// Whether a newer claim by another node superseded this node's connection of `client`
    /// (its close then writes nothing more about the session: the new node owns it).
    pub fn superseded(&self, client: &str, epoch: i64) -> bool {
        self.directory
            .known(client)
            .is_some_and(|k| k.epoch > epoch && k.state.node != self.directory.node())
    }

    /// Forgets the local claim of `client` made with `epoch`.
    pub fn unclaim(&self, client: &str, epoch: i64) {
        let mut local = self.local.lock();
        if local.get(client) == Some(&epoch) {
            local.remove(client);
        }
    }

    /// Claims `client` for a connection on this node: appends the claim and, when another
    /// node holds the client connected, waits until it let go (or [`TAKEOVER_TIMEOUT`]).
    /// Returns the epoch of the claim.
    pub async fn claim(
        &self,
        client: &Arc<str>,
        persistent: bool,
        restart: bool,
        kind: ClientKind,
        expiry_interval: u32,
    ) -> Result<i64, StorageError> {
        let previous = self.directory.known(client);
        let continues = persistent && !restart;
        let subscriptions = match &previous {
            Some(p) if p.state.persistent && continues => p.state.subscriptions.clone(),
            _ => Vec::new(),
        };
        let state = SessionState {
            node: self.directory.node().to_string(),
            claim: None,
            connected: true,
            persistent,
            kind: SessionState::kind_code(kind),
            expiry_interval,
            disconnected_at_ms: 0,
            subscriptions,
            keeps_subscriptions: continues,
        };
        let epoch = self.directory.announce(client, state).await?;
        self.local.lock().insert(client.clone(), epoch);
        if let Some(p) = previous {
            if p.state.connected && p.state.node != self.directory.node() {
                let released = self
                    .directory
                    .wait_released(client, epoch, TAKEOVER_TIMEOUT)
                    .await;
                if !released {
                    tracing::warn!(client_id = %client, node = p.state.node, "the node that held this client did not release it in time (down?); taking the session over");
                }
            }
        }
        Ok(epoch)
    }

    /// The announce of a persistent session's state as a storage-style completion, to be
    /// joined with the storage write a reply waits for.
    pub fn announce_completion(self: &Arc<Self>, session: &Session) -> Completion {
        let (tx, rx) = oneshot::channel();
        let state = self.state_of(session, true);
        let (cluster, client) = (self.clone(), session.client_id.clone());
        tokio::spawn(async move {
            let result = cluster.directory.announce(&client, state).await.map(|_| ());
            let _ = tx.send(result);
        });
        rx
    }

    /// What the directory says of `session`: a persistent session with all its subscriptions,
    /// a clean one with its shared subscriptions only (the others are served by this node's
    /// local reader alone; a shared group's members must be known to every node).
    fn state_of(&self, session: &Session, connected: bool) -> SessionState {
        let persistent = session.is_persistent();
        let subscriptions = session
            .subscriptions
            .iter()
            .filter(|(filter, _)| persistent || filter.starts_with("$share/"));
        SessionState {
            node: self.directory.node().to_string(),
            claim: session.cluster_epoch,
            connected,
            persistent,
            kind: SessionState::kind_code(session.kind),
            expiry_interval: session.expiry_interval,
            disconnected_at_ms: if connected { 0 } else { now_ms() },
            subscriptions: SessionState::encode_subscriptions(subscriptions),
            keeps_subscriptions: false,
        }
    }

    /// Announces a persistent session's current state (after SUBSCRIBE/UNSUBSCRIBE, at
    /// connect and disconnect).
    pub async fn announce(&self, session: &Session, connected: bool) -> Result<i64, StorageError> {
        let state = self.state_of(session, connected);
        self.directory.announce(&session.client_id, state).await
    }

    /// Announces, without waiting, a persistent session gone offline here.
    pub fn announce_offline(self: &Arc<Self>, session: &Session) {
        let state = self.state_of(session, false);
        let (cluster, client) = (self.clone(), session.client_id.clone());
        tokio::spawn(async move {
            if let Err(e) = cluster.directory.announce(&client, state).await {
                tracing::warn!(client_id = %client, error = %e, "announcing a disconnected session failed");
            }
        });
    }

    /// Announces, without waiting, that a session ended.
    pub fn announce_ended(self: &Arc<Self>, client: &Arc<str>) {
        let (cluster, client) = (self.clone(), client.clone());
        tokio::spawn(async move {
            if let Err(e) = cluster.directory.ended(&client).await {
                tracing::warn!(client_id = %client, error = %e, "announcing an ended session failed");
            }
        });
    }
}

/// Applies one directory change to this node; `previous` is what the directory said of the
/// client before it.
fn apply(broker: &Arc<Broker>, change: Change, previous: Option<Known>) {
    let Some(cluster) = broker.cluster() else {
        return;
    };
    let me = cluster.directory.node();
    match change {
        Change::Released { .. } => {}
        Change::Ended { client } => match cluster.local_epoch(&client) {
            None => broker.forget_mirror(&client),
            Some(local) => {
                // The end of a connection that was superseded by this node's claim, appended
                // while the claim was in flight: the session is here, say so again.
                if let Some(mut known) = previous.filter(|k| k.state.node == me) {
                    known.state.claim = Some(local);
                    let directory = cluster.directory.clone();
                    tokio::spawn(async move {
                        if let Err(e) = directory.announce(&client, known.state).await {
                            tracing::warn!(client_id = %client, error = %e, "announcing a session again failed");
                        }
                    });
                }
            }
        },
        Change::State {
            client,
            epoch,
            state,
        } => {
            if state.node == me {
                return;
            }
            let is_claim = state.claim.is_none();
            match cluster.local_epoch(&client) {
                Some(local) if is_claim && local < epoch => {
                    tokio::spawn(release_to(broker.clone(), client, epoch));
                }
                Some(_) => {}
                None => {
                    // Held here before, by a connection that is gone (this node restarted, or
                    // the connection closed as the claim came): nothing to wait for.
                    let was_here = previous
                        .as_ref()
                        .is_some_and(|p| p.state.node == me && p.state.connected);
                    if is_claim && was_here {
                        tokio::spawn(release_to(broker.clone(), client.clone(), epoch));
                    }
                    mirror(broker, &client, &state);
                }
            }
        }
    }
}

/// Keeps this node's copy of a session held by another node: a persistent session's
/// subscriptions in the router (so the dispatcher stores for it); a connected clean session's
/// shared subscriptions (so this node's picks count it as a group member; its local reader
/// never offers to the copy, which no connection reads here); nothing else of a clean session.
fn mirror(broker: &Arc<Broker>, client: &Arc<str>, state: &SessionState) {
    let clean_member = !state.persistent && state.connected && !state.subscriptions.is_empty();
    if !state.persistent && !clean_member {
        broker.forget_mirror(client);
        return;
    }
    let restored = RestoredSession {
        client: client.clone(),
        record: crate::storage::SessionRecord {
            kind: state.client_kind(),
            expiry_interval: state.expiry_interval,
            disconnected_at_ms: state.disconnected_at_ms,
        },
        subscriptions: state.decoded_subscriptions(),
        inbound_qos2: Vec::new(),
        next_seq: 1,
        read_from: 1,
        sent_upto: 0,
    };
    // Its end comes from the node that fires its expiry (`timers`) or, for a clean session,
    // from the node it was connected to, through the directory.
    let mut session = broker.unrouted_session(restored);
    // A clean member's copy has nothing stored, and must not delete anything when it goes.
    session.stored = state.persistent;
    let _ = broker.replace_mirror(session);
}

/// Another node claimed `client` at `epoch` while it is connected here: close the local
/// connection (v5 DISCONNECT 0x8E), let everything it submitted reach storage, then release
/// the session to the new node.
async fn release_to(broker: Arc<Broker>, client: Arc<str>, epoch: i64) {
    let Some(cluster) = broker.cluster() else {
        return;
    };
    if let Some(Some(sender)) = broker.registry.take_kick(&client) {
        let (done, closed) = oneshot::channel();
        if sender
            .send(Kick {
                done,
                reason: KickReason::TakenOver,
            })
            .is_ok()
        {
            let _ = tokio::time::timeout(TAKEOVER_TIMEOUT, closed).await;
        }
    }
    // The storage applies batches in submission order: once this empty one is applied, so is
    // every write of the closed connection.
    let flushed = broker
        .storage
        .submit(crate::storage::WriteBatch::default())
        .await;
    if let Ok(Err(e)) = flushed {
        tracing::warn!(client_id = %client, error = %e, "flushing before a release failed; the new node may redeliver");
    }
    if let Err(e) = cluster.directory.release(&client, epoch).await {
        tracing::warn!(client_id = %client, error = %e, "releasing a session in the directory failed; the new node waits for its timeout");
    }
    if cluster.local_epoch(&client).is_none() {
        if let Some(known) = cluster.directory.known(&client) {
            if known.state.node != cluster.directory.node() {
                mirror(&broker, &client, &known.state);
            }
        }
    }
}
