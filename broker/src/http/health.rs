//! Kubernetes probes.
//!
//! * `GET /health/live`: 200 whenever the process answers HTTP (the runtime is not wedged).
//! * `GET /health/ready`: 200 only when every MQTT listener is bound (and shutdown has not
//!   begun), the storage backend passes [`crate::storage::Storage::health`] and a cluster node
//!   is not fenced ([`crate::cluster::fence`]); otherwise 503.
//!   The JSON body names each check and why it failed.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use super::AppState;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
}

async fn live() -> Response {
    Json(json!({ "status": "live" })).into_response()
}

async fn ready(State(state): State<AppState>) -> Response {
    let listeners = state.listeners_ready();
    let storage = state.broker.storage.clone();
    let health = tokio::task::spawn_blocking(move || storage.health())
        .await
        .unwrap_or_else(|_| {
            Err(crate::storage::StorageError::engine_msg(
                "storage check panicked",
            ))
        });
    let fenced = state.broker.cluster().is_some_and(|c| c.is_fenced());
    let ok = listeners && health.is_ok() && !fenced;
    let check = |passed: bool, why: Option<String>| match (passed, why) {
        (true, _) => json!({ "ready": true }),
        (false, why) => json!({ "ready": false, "reason": why }),
    };
    let body = json!({
        "status": if ok { "ready" } else { "not ready" },
        "checks": {
            "listeners": check(
                listeners,
                Some("MQTT listeners are not bound (starting or shutting down)".into()),
            ),
            "storage": check(health.is_ok(), health.err().map(|e| e.to_string())),
            "cluster": check(
                !fenced,
                Some("fenced: this node lost Kafka or PostgreSQL (cluster.fence_after_secs)".into()),
            ),
        },
    });
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}
