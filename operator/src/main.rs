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
    /// Run the controllers only while holding the leader Lease (needed with more than one
    /// replica). Without it, this process reconciles at once.
    #[arg(long)]
    leader_election: bool,
    /// Namespace of the leader Lease (the operator's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    #[arg(long, env = "LEASE_NAME", default_value = "ferrymq-operator")]
    lease_name: String,
    /// Lease duration, seconds; renewed every third of it. A new leader takes over at most this
    /// long after the old one died.
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(3..=3600))]
    lease_duration_secs: u64,
    /// Log format: `text` or `json`.
    #[arg(long, env = "FERRYMQ_OPERATOR_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// This replica's identity in the Lease.
    #[arg(long, env = "POD_NAME")]
    holder_id: Option<String>,
}

#[derive(Clone)]
struct Http {
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // One TLS provider for the process, chosen here: with both of rustls' providers compiled
    // in, rustls refuses to guess and the first API connection would panic.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,kube=warn".into());
    if cli.log_format == "json" {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    let lease_ttl = Duration::from_secs(cli.lease_duration_secs);
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

    // On SIGTERM the controllers are told to stop and then awaited: kube-runtime's graceful
    // shutdown lets the reconciles in flight finish (the pod's terminationGracePeriodSeconds
    // bounds it). Dropping the controllers' future instead would abandon them half-way.
    let outcome = if !cli.leader_election {
        metrics.leader.set(1);
        let controllers = ferrymq_operator::controller::run(
            ctx.clone(),
            cli.namespace.clone(),
            controllers_stop.clone(),
        );
        tokio::pin!(controllers);
        tokio::select! {
            r = signal => {
                tracing::info!("stopping: letting the reconciles in flight finish");
                let _ = stop_tx.send(true);
                controllers.await;
                r
            }
            _ = &mut controllers => Ok(()),
        }
    } else {
        let lock = LeaseLock::new(
            client.clone(),
            &cli.lease_namespace,
            LeaseLockParams {
                holder_id: holder.clone(),
                lease_name: cli.lease_name.clone(),
                lease_ttl,
            },
        );
        let leading = lead(
            &lock,
            lease_ttl,
            ctx.clone(),
            cli.namespace.clone(),
            controllers_stop.clone(),
            &metrics,
        );
        tokio::pin!(leading);
        let result = tokio::select! {
            r = signal => {
                tracing::info!("stopping: letting the reconciles in flight finish");
                let _ = stop_tx.send(true);
                // `lead` keeps renewing the Lease until the controllers have finished, so no
                // other replica starts while this one still writes.
                let led = (&mut leading).await;
                r.and(led)
            }
            r = &mut leading => r,
        };
        let _ = stop_tx.send(true);
        // Give the Lease up at once so a standby takes over without waiting for the TTL.
        if metrics.leader.get() == 1 {
            match lock.step_down().await {
                Ok(()) => tracing::info!("released the leader Lease"),
                Err(e) => tracing::warn!(error = %e, "cannot release the leader Lease"),
            }
            metrics.leader.set(0);
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
    lease_ttl: Duration,
    ctx: Arc<Context>,
    namespace: Option<String>,
    stop: futures_util::future::Shared<futures_util::future::BoxFuture<'static, ()>>,
    metrics: &Metrics,
) -> anyhow::Result<()> {
    let renew = lease_ttl / 3;
    loop {
        match lock.try_acquire_or_renew().await {
            Ok(kube_leader_election::LeaseLockResult::Acquired(_)) => break,
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "leader election"),
        }
        // A standby told to stop has nothing to finish.
        tokio::select! {
            _ = stop.clone() => return Ok(()),
            _ = tokio::time::sleep(renew) => {}
        }
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
