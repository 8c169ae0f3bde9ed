//! Starting and stopping a broker: bind every listener, run until shutdown, then tell every
//! connection to close and wait (bounded) for them.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::broker::Broker;
use crate::config::Config;
use crate::listener::Listener;

/// How long shutdown waits for connections to say goodbye.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// How long a drain waits past its period for the last connections, which may still be
/// flushing their DISCONNECT and lingering (`connection::LINGER_TIMEOUT`).
const DRAIN_TAIL: Duration = Duration::from_secs(2);
/// How often expired queue and log entries are swept, and how many at most per sweep (bounded
/// work per tick; a backlog drains over several ticks).
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
const SWEEP_BUDGET: usize = 10_000;
/// How often session expiries and delayed wills are checked, and how many at most per tick.
const EXPIRY_INTERVAL: Duration = Duration::from_millis(250);
const EXPIRY_BUDGET: usize = 10_000;
/// How often expired retained messages are purged.
const RETAINED_PURGE_INTERVAL: Duration = Duration::from_secs(60);

/// A running broker.
pub struct Server {
    pub broker: Arc<Broker>,
    addrs: Vec<SocketAddr>,
    http_addr: Option<SocketAddr>,
    /// Readiness: listeners bound and not shutting down.
    ready: Arc<AtomicBool>,
    shutdown: watch::Sender<bool>,
    /// Tells the listeners to stop accepting and every connection when to leave.
    drain: Arc<watch::Sender<Option<Arc<crate::drain::DrainPlan>>>>,
    tasks: JoinSet<()>,
    connections: Arc<Semaphore>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot open storage: {0}")]
    Storage(crate::storage::StorageError),
    #[error("authentication setup: {0}")]
    Auth(#[from] crate::auth::chain::SetupError),
    #[error("cannot bind listener `{name}` on {addr}: {source}")]
    Bind {
        name: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("listener `{name}`: {source}")]
    Listener {
        name: String,
        source: crate::listener::ListenerError,
    },
    #[error(transparent)]
    Http(#[from] crate::http::HttpStartError),
}

impl Server {
    /// Binds every listener and starts serving.
    pub async fn start(config: Config) -> Result<Server, StartError> {
        let auth = crate::auth::chain::AuthChain::open(&config).await?;
        let broker = Broker::open_with_authenticator(config, Arc::new(auth))
            .await
            .map_err(StartError::Storage)?;
        Self::start_with(broker).await
    }

    pub async fn start_with(broker: Arc<Broker>) -> Result<Server, StartError> {
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (drain, drain_rx) = crate::drain::channel();
        let drain = Arc::new(drain);
        let connections = Arc::new(Semaphore::new(broker.config.limits.max_connections));
        let mut tasks = JoinSet::new();
        let mut addrs = Vec::new();
        let mut bound = Vec::new();
        for lc in &broker.config.listeners {
            let listener = Listener::bind(lc).await.map_err(|e| match e {
                crate::listener::ListenerError::Bind(source) => StartError::Bind {
                    name: lc.name.clone(),
                    addr: lc.bind,
                    source,
                },
                source => StartError::Listener {
                    name: lc.name.clone(),
                    source,
                },
            })?;
            let addr = listener.local_addr().map_err(|source| StartError::Bind {
                name: lc.name.clone(),
                addr: lc.bind,
                source,
            })?;
            tracing::info!(listener = %lc.name, %addr, protocol = lc.protocol.as_str(), "listening for MQTT 3.1/3.1.1/5.0");
            addrs.push(addr);
            bound.push(listener);
        }
        let rate = Arc::new(crate::rate_limit::ConnectionRate::new(
            broker.config.limits.max_connection_rate,
        ));
        let ready = Arc::new(AtomicBool::new(false));
        let mut http_addr = None;
        if broker.config.http.enabled {
            let http = &broker.config.http;
            let state = crate::http::AppState {
                broker: broker.clone(),
                listeners_ready: ready.clone(),
                admin_token: crate::http::load_admin_token(http)?,
            };
            let listener = crate::http::bind(http).await?;
            let addr =
                listener
                    .local_addr()
                    .map_err(|source| crate::http::HttpStartError::Bind {
                        addr: http.bind,
                        source,
                    })?;
            tracing::info!(%addr, admin_api = state.admin_token.is_some(), "HTTP endpoint: /metrics, /health/live, /health/ready, /api/v1");
            http_addr = Some(addr);
            let app = crate::http::router(state, http);
            tasks.spawn(crate::http::serve(
                listener,
                app,
                http.clone(),
                shutdown_rx.clone(),
            ));
        }
        for listener in bound {
            tasks.spawn(listener.run(
                broker.clone(),
                connections.clone(),
                rate.clone(),
                crate::connection::CloseSignals {
                    shutdown: shutdown_rx.clone(),
                    drain: drain_rx.clone(),
                },
            ));
        }
        ready.store(true, Ordering::Release);
        let purger = broker.clone();
        let mut purge_shutdown = shutdown_rx.clone();
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(RETAINED_PURGE_INTERVAL);
            loop {
                tokio::select! {
                    _ = purge_shutdown.changed() => return,
                    _ = tick.tick() => {
                        let mut batch = crate::storage::WriteBatch::default();
                        purger.router.purge_expired_retained(&mut batch);
                        if !batch.is_empty() {
                            purger.storage.submit_detached(batch);
                        }
                    }
                }
            }
        });
        let expirer = broker.clone();
        let mut expiry_shutdown = shutdown_rx.clone();
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(EXPIRY_INTERVAL);
            loop {
                tokio::select! {
                    _ = expiry_shutdown.changed() => return,
                    _ = tick.tick() => {
                        expirer.expire_due(EXPIRY_BUDGET);
                    }
                }
            }
        });
        let sweeper = broker.clone();
        let mut sweep_shutdown = shutdown_rx.clone();
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(SWEEP_INTERVAL);
            loop {
                tokio::select! {
                    _ = sweep_shutdown.changed() => return,
                    _ = tick.tick() => {}
                }
                let swept = sweeper
                    .storage
                    .sweep(crate::storage::codec::now_ms(), SWEEP_BUDGET)
                    .await;
                if let Err(e) = swept {
                    tracing::warn!(error = %e, "expiry sweep failed");
                }
            }
        });
        let slow_wait = Duration::from_millis(broker.config.limits.slow_subscriber_wait_ms);
        if let Some(wakes) = broker.storage.take_wakes() {
            tasks.spawn(crate::wake::run(broker.clone(), wakes, shutdown_rx.clone()));
        }
        // In a cluster the dispatcher does the persistent part of routing and the local reader
        // delivers to this node's connections (`router::local`); alone, the dispatcher does both.
        let local = broker.take_local_reader();
        let scope = match local {
            Some(_) => crate::router::Scope::Persistent,
            None => crate::router::Scope::All,
        };
        if let Some(reader) = local {
            let delivery = crate::router::local::LocalDelivery {
                router: broker.router.clone(),
                metrics: broker.metrics.clone(),
                slow_wait,
                gate: broker.cluster().map(|cluster| {
                    cluster.directory.clone() as Arc<dyn crate::router::dispatcher::BatchGate>
                }),
            };
            tasks.spawn(delivery.run(reader, shutdown_rx.clone()));
        }
        if let Some(cluster) = broker.cluster() {
            tasks.spawn(crate::cluster::lease::run(
                broker.clone(),
                cluster.clone(),
                shutdown_rx.clone(),
            ));
            tasks.spawn(crate::cluster::timers::run(
                broker.clone(),
                cluster.clone(),
                shutdown_rx.clone(),
            ));
            tasks.spawn(crate::cluster::fence::watch(
                broker.clone(),
                cluster.clone(),
                drain.clone(),
                shutdown_rx.clone(),
            ));
        }
        if let Some(reader) = broker.take_log_reader() {
            let dispatcher = crate::router::dispatcher::Dispatcher {
                router: broker.router.clone(),
                storage: broker.storage.clone(),
                metrics: broker.metrics.clone(),
                slow_wait,
                scope,
                gate: broker.cluster().map(|cluster| {
                    cluster.directory.clone() as Arc<dyn crate::router::dispatcher::BatchGate>
                }),
            };
            tasks.spawn(dispatcher.run(reader, shutdown_rx.clone()));
        }
        Ok(Server {
            broker,
            addrs,
            http_addr,
            ready,
            shutdown,
            drain,
            tasks,
            connections,
        })
    }

    /// Drains the node: it turns unready (`/health/ready` 503, so it leaves the Service),
    /// stops accepting, and closes its connections one by one spread evenly over `period`
    /// (v5 clients get DISCONNECT 0x8B with the configured Server Reference, v3 clients a
    /// plain close), while everything else (acks, routing, storage) keeps running for the
    /// clients still here. Returns when the last client has left, or shortly after the period.
    async fn drain(&mut self, period: Duration) {
        self.ready.store(false, Ordering::Release);
        let max = self.broker.config.limits.max_connections;
        let open = max.saturating_sub(self.connections.available_permits());
        let reference = self.broker.config.shutdown.server_reference.as_deref();
        tracing::info!(
            connections = open,
            secs = period.as_secs(),
            server_reference = reference.unwrap_or(""),
            "draining: closing connections gradually"
        );
        let plan = crate::drain::DrainPlan::new(period, open, reference.map(Arc::from));
        let _ = self.drain.send(Some(Arc::new(plan)));
        let all = u32::try_from(max).unwrap_or(u32::MAX);
        let left = tokio::time::timeout(period + DRAIN_TAIL, self.connections.acquire_many(all));
        match left.await {
            Ok(_) => tracing::info!("drained: every client has left"),
            Err(_) => tracing::warn!(
                still_open = max.saturating_sub(self.connections.available_permits()),
                "drain period over with clients still connected; closing the rest now"
            ),
        }
    }

    /// The addresses actually bound (useful with port 0).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// The HTTP endpoint's bound address, when it is enabled.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// Stops accepting, asks every connection to close (v5 clients get DISCONNECT 0x8B) and
    /// waits up to a grace period for them. With `shutdown.drain_secs` set, the connections are
    /// first closed one by one over that period (see [`Server::drain`]).
    pub async fn shutdown(mut self) {
        let period = Duration::from_secs(self.broker.config.shutdown.drain_secs);
        if !period.is_zero() {
            self.drain(period).await;
        }
        self.ready.store(false, Ordering::Release);
        let _ = self.shutdown.send(true);
        while self.tasks.join_next().await.is_some() {}
        let max = self.broker.config.limits.max_connections;
        let all = u32::try_from(max).unwrap_or(u32::MAX);
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, self.connections.acquire_many(all)).await;
        // Let the storage writer finish what the closing sessions submitted.
        if let Ok(Ok(Err(e))) =
            tokio::time::timeout(SHUTDOWN_GRACE, self.broker.storage.flush()).await
        {
            tracing::warn!(error = %e, "final storage flush failed");
        }
    }
}
