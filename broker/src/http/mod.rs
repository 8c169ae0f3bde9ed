//! The HTTP endpoint: Prometheus metrics, health probes and the admin REST API on one port.
//!
//! axum routes on hyper's HTTP/1.1 server, driven by our own accept loop so that every resource
//! is bounded: concurrent connections (`http.max_connections`, more are closed at accept),
//! header read time and per-request time (`http.request_timeout_secs`), connection age
//! ([`MAX_CONNECTION_AGE`]) and request bodies (`http.max_body_bytes`).
//!
//! One module per resource: [`metrics`], [`health`], and [`admin`] with a submodule per admin
//! resource, so new resources (credentials, application clients) are one file and one `.merge`.

pub mod admin;
pub mod health;
pub mod metrics;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Request};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use crate::broker::Broker;
use crate::config::HttpConfig;

/// A keep-alive connection is closed (gracefully, between requests) after this long, so that
/// no client holds one of the few connection slots forever.
pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(60);
/// Time a connection closed by shutdown or age has to finish its request.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub broker: Arc<Broker>,
    /// Set once every MQTT listener is bound, cleared when shutdown starts.
    pub listeners_ready: Arc<AtomicBool>,
    /// The admin bearer token; `None` disables the admin API.
    pub admin_token: Option<Arc<str>>,
}

impl AppState {
    pub fn listeners_ready(&self) -> bool {
        self.listeners_ready.load(Ordering::Acquire)
    }
}

/// Why the endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum HttpStartError {
    #[error("cannot bind the HTTP endpoint on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("http.admin_token_file {path}: {source}")]
    TokenFile {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("http.admin_token_file {0}: the file is empty")]
    EmptyTokenFile(std::path::PathBuf),
}

/// The admin token from the configuration or its file.
pub fn load_admin_token(config: &HttpConfig) -> Result<Option<Arc<str>>, HttpStartError> {
    if let Some(token) = &config.admin_token {
        return Ok(Some(Arc::from(token.trim())));
    }
    let Some(path) = &config.admin_token_file else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path).map_err(|source| HttpStartError::TokenFile {
        path: path.clone(),
        source,
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(HttpStartError::EmptyTokenFile(path.clone()));
    }
    Ok(Some(Arc::from(token)))
}

/// All routes, with the request timeout and body limit applied.
pub fn router(state: AppState, config: &HttpConfig) -> Router {
    let timeout = Duration::from_secs(config.request_timeout_secs);
    Router::new()
        .merge(metrics::routes())
        .merge(health::routes())
        .nest("/api/v1", admin::routes(state.clone()))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such endpoint") })
        .layer(DefaultBodyLimit::max(config.max_body_bytes))
        .layer(middleware::from_fn(move |req: Request, next: Next| {
            request_timeout(timeout, req, next)
        }))
        .with_state(state)
}

async fn request_timeout(timeout: Duration, req: Request, next: Next) -> Response {
    match tokio::time::timeout(timeout, next.run(req)).await {
        Ok(response) => response,
        Err(_) => error(StatusCode::SERVICE_UNAVAILABLE, "request timed out"),
    }
}

/// A JSON error body: `{"error": "..."}`.
pub fn error(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(serde_json::json!({ "error": message }))).into_response()
}

/// Binds the endpoint now, so a port conflict is reported at start.
pub async fn bind(config: &HttpConfig) -> Result<TcpListener, HttpStartError> {
    TcpListener::bind(config.bind)
        .await
        .map_err(|source| HttpStartError::Bind {
            addr: config.bind,
            source,
        })
}

/// Serves `app` on `listener` until `shutdown` changes.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    config: HttpConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(config.max_connections));
    let header_timeout = Duration::from_secs(config.request_timeout_secs);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.changed() => {
                // Each connection finishes its request within CLOSE_GRACE; wait for them so
                // nothing holds the broker after shutdown.
                let all = async { while connections.join_next().await.is_some() {} };
                let _ = tokio::time::timeout(CLOSE_GRACE + Duration::from_secs(1), all).await;
                return;
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        let (stream, _peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                tracing::warn!(error = %e, "HTTP accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let service = TowerToHyperService::new(app.clone());
        let mut shutdown = shutdown.clone();
        connections.spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(stream), service);
            let mut conn = std::pin::pin!(conn);
            let age = tokio::time::sleep(MAX_CONNECTION_AGE);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = shutdown.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(CLOSE_GRACE, conn.as_mut()).await;
                }
                _ = age => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(CLOSE_GRACE, conn.as_mut()).await;
                }
            }
            drop(permit);
        });
    }
}
