//! ferrymq-operator: runs the MqttBroker and ApplicationClient controllers while this replica
//! holds the leader Lease, and serves /metrics, /healthz and /readyz.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use clap::Parser;
use futures_util::FutureExt;
use kube_leader_election::{LeaseLock, LeaseLockParams};
use tokio::sync::watch;

use ferrymq_operator::context::Context;
use ferrymq_operator::metrics::Metrics;
use ferrymq_operator::provisioner::Real;

#[derive(Parser, Debug)]
#[command(name = "ferrymq-operator", version, about)]
struct Cli {
    /// Watch only this namespace (all namespaces when absent).
    #[arg(long, env = "WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "FERRYMQ_OPERATOR_HTTP", default_value = "0.0.0.0:8080")]
    http: SocketAddr,
    /// Run the controllers without a leader Lease (one replica only).
    #[arg(long)]
    no_leader_election: bool,
    /// Namespace of the leader Lease (the operator's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    #[arg(long, env = "LEASE_NAME", default_value = "ferrymq-operator")]
    lease_name: String,
    /// This replica's identity in the Lease.
    #[arg(long, env = "POD_NAME")]
    holder_id: Option<String>,
}

/// Lease duration; renewed every third of it. A new leader takes over at most this long after
/// the old one died.
const LEASE_TTL: Duration = Duration::from_secs(15);

#[derive(Clone)]
struct Http {
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FERRYMQ_LOG")
                .unwrap_or_else(|_| "info,kube=warn".into()),
        )
        .init();
    let cli = Cli::parse();
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    let metrics = Arc::new(Metrics::new());
    let ready = Arc::new(AtomicBool::new(false));

    let listener = tokio::net::TcpListener::bind(cli.http)
        .await
        .with_context(|| format!("binding {}", cli.http))?;
    let app = Router::new()
        .route(
            "/metrics",
            get(|State(s): State<Http>| async move { s.metrics.render() }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(s): State<Http>| async move {
                if s.ready.load(Ordering::Relaxed) {
                    (StatusCode::OK, "ready")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "starting")
                }
            }),
        )
        .with_state(Http {
            metrics: metrics.clone(),
            ready: ready.clone(),
        });
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut http_stop = stop_rx.clone();
    let http = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = http_stop.wait_for(|s| *s).await;
            })
            .await
    });

    let holder = cli
        .holder_id
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("ferrymq-operator-{}", std::process::id()));
    let ctx = Arc::new(Context::new(
        client.clone(),
        Arc::new(Real::new()),
        metrics.clone(),
        Some(holder.clone()),
    ));
    // Ready means: able to serve, as leader or as a standby waiting for the Lease.
    ready.store(true, Ordering::Relaxed);

    let signal = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        tokio::select! {
            _ = term.recv() => {}
            r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C")?,
        }
        anyhow::Ok(())
    };

    let controllers_stop = {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
        .boxed()
        .shared()
    };

    let outcome = if cli.no_leader_election {
        metrics.leader.set(1);
        tokio::select! {
            r = signal => r,
            _ = ferrymq_operator::controller::run(ctx.clone(), cli.namespace.clone(), controllers_stop.clone()) => {
                Ok(())
            }
        }
    } else {
        let lock = LeaseLock::new(
            client.clone(),
            &cli.lease_namespace,
            LeaseLockParams {
                holder_id: holder.clone(),
                lease_name: cli.lease_name.clone(),
                lease_ttl: LEASE_TTL,
            },
        );
        let result = tokio::select! {
            r = signal => r,
            r = lead(&lock, ctx.clone(), cli.namespace.clone(), controllers_stop.clone(), &metrics) => r,
        };
        let _ = stop_tx.send(true);
        // Give the Lease up at once so a standby takes over without waiting for the TTL.
        if metrics.leader.get() == 1 {
            if let Err(e) = lock.step_down().await {
                tracing::warn!(error = %e, "cannot release the leader Lease");
            }
        }
        result
    };
    let _ = stop_tx.send(true);
    ready.store(false, Ordering::Relaxed);
    let _ = http.await;
    tracing::info!("stopped");
    outcome
}

/// Waits for the Lease, then runs the controllers while renewing it. Losing the Lease ends the
/// process with an error (the pod restarts as a standby): two replicas must never reconcile at
/// once for longer than one renewal interval.
async fn lead(
    lock: &LeaseLock,
    ctx: Arc<Context>,
    namespace: Option<String>,
    stop: futures_util::future::Shared<futures_util::future::BoxFuture<'static, ()>>,
    metrics: &Metrics,
) -> anyhow::Result<()> {
    let renew = LEASE_TTL / 3;
    loop {
        match lock.try_acquire_or_renew().await {
            Ok(kube_leader_election::LeaseLockResult::Acquired(_)) => break,
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "leader election"),
        }
        tokio::time::sleep(renew).await;
    }
    tracing::info!("acquired the leader Lease; starting the controllers");
    metrics.leader.set(1);
    let controllers = ferrymq_operator::controller::run(ctx, namespace, stop);
    tokio::pin!(controllers);
    loop {
        tokio::select! {
            _ = &mut controllers => return Ok(()),
            _ = tokio::time::sleep(renew) => {
                match lock.try_acquire_or_renew().await {
                    Ok(kube_leader_election::LeaseLockResult::Acquired(_)) => {}
                    Ok(_) => {
                        metrics.leader.set(0);
                        anyhow::bail!("lost the leader Lease to another replica");
                    }
                    // A failed renewal is retried; the Lease outlives two of them.
                    Err(e) => tracing::warn!(error = %e, "renewing the leader Lease"),
                }
            }
        }
    }
}
