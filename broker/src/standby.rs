//! Standby nodes: a broker started with `postgres.standby = true` on a PostgreSQL schema whose
//! node lock another broker holds waits instead of failing, and takes over when the lock is
//! released (the active node stopped, or died and PostgreSQL closed its connection).
//!
//! The session state lives in the active node's memory and in PostgreSQL, so only one node may
//! write a schema at a time; a standby adds availability, not capacity. While it waits it
//! answers the HTTP probes (live, never ready, so a Kubernetes Service sends it no clients) and
//! keeps its MQTT listeners closed. The active node, for its part, exits when it finds its lock
//! taken by someone else (see `storage::kafka_postgres::watch_health`).

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};
use tokio::sync::watch;

use crate::config::Config;
use crate::storage::kafka_postgres::PROBE_INTERVAL;
use crate::storage::postgres::node_lock_is_free;

/// How often a standby checks the lock.
const POLL: Duration = Duration::from_secs(1);
/// How long a free lock must stay free before a standby starts. An active node whose lock
/// connection broke notices within one health probe and exits (or takes the lock back); waiting
/// longer than that keeps two nodes from writing at once.
const TAKEOVER_GRACE: Duration = Duration::from_secs(PROBE_INTERVAL.as_secs() + 1);

#[derive(Debug, thiserror::Error)]
pub enum StandbyError {
    #[error("postgres.url: {0}")]
    Url(sqlx::Error),
    #[error("cannot bind the HTTP endpoint on {addr} while standing by: {source}")]
    HttpBind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Waits until this node may start: returns once the schema's node lock has been free for
/// [`TAKEOVER_GRACE`]. The caller then starts the broker, which takes the lock for real (and
/// comes back here when another standby was faster).
pub async fn wait_for_node_lock(config: &Config) -> Result<(), StandbyError> {
    let schema = &config.postgres.schema;
    let options = PgConnectOptions::from_str(&config.postgres.url).map_err(StandbyError::Url)?;
    let (stop_http, http) = serve_probes(config, schema).await?;
    let mut conn: Option<PgConnection> = None;
    let mut free_since: Option<tokio::time::Instant> = None;
    let mut announced = false;
    loop {
        if conn.is_none() {
            match PgConnection::connect_with(&options).await {
                Ok(c) => conn = Some(c),
                Err(e) => tracing::warn!(error = %e, "standby: cannot reach postgres; retrying"),
            }
        }
        if let Some(c) = conn.as_mut() {
            match node_lock_is_free(c, schema).await {
                Ok(true) => {
                    let since = *free_since.get_or_insert_with(|| {
                        tracing::info!(
                            schema,
                            grace = ?TAKEOVER_GRACE,
                            "standby: the node lock is free; starting if it stays free"
                        );
                        tokio::time::Instant::now()
                    });
                    if since.elapsed() >= TAKEOVER_GRACE {
                        tracing::info!(schema, "standby: the node lock is free; taking over");
                        break;
                    }
                }
                Ok(false) => {
                    free_since = None;
                    if !announced {
                        announced = true;
                        tracing::info!(
                            schema,
                            "standby: another broker node holds the node lock; waiting to take over"
                        );
                    }
                }
                Err(e) => {
                    free_since = None;
                    conn = None;
                    tracing::warn!(error = %e, "standby: checking the node lock failed; reconnecting");
                }
            }
        }
        tokio::time::sleep(POLL).await;
    }
    let _ = stop_http.send(true);
    if let Some(http) = http {
        // The broker binds the same address next.
        let _ = http.await;
    }
    Ok(())
}

/// Answers `/health/live` (200), `/health/ready` (503, "standby") and `/metrics`
/// (`ferrymq_standby 1`) on the configured HTTP address while the node waits.
async fn serve_probes(
    config: &Config,
    schema: &str,
) -> Result<(watch::Sender<bool>, Option<tokio::task::JoinHandle<()>>), StandbyError> {
    let (stop, stopped) = watch::channel(false);
    if !config.http.enabled {
        return Ok((stop, None));
    }
    let http = config.http.clone();
    let listener = crate::http::bind(&http)
        .await
        .map_err(|e| StandbyError::HttpBind {
            addr: http.bind,
            source: match e {
                crate::http::HttpStartError::Bind { source, .. } => source,
                other => std::io::Error::other(other.to_string()),
            },
        })?;
    let why =
        format!("standby: another broker node holds the node lock on postgres schema `{schema}`");
    let app = Router::new()
        .route(
            "/health/live",
            get(|| async { Json(json!({ "status": "live", "role": "standby" })) }),
        )
        .route(
            "/health/ready",
            get(move || {
                let why = why.clone();
                async move {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        Json(json!({ "status": "standby", "reason": why })),
                    )
                        .into_response()
                }
            }),
        )
        .route(
            "/metrics",
            get(|| async {
                "# HELP ferrymq_standby 1 while this node waits as a standby for the node lock.\n\
                 # TYPE ferrymq_standby gauge\n\
                 ferrymq_standby 1\n"
            }),
        );
    let task = tokio::spawn(crate::http::serve(listener, app, http, stopped));
    Ok((stop, Some(task)))
}
