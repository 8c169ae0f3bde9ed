//! `GET /metrics`: the broker's registry in Prometheus text format, plus gauges computed at
//! scrape time from state the broker holds anyway (so the data path never tracks them):
//!
//! * `ferrymq_subscriptions`: the router's entry count (O(1));
//! * `ferrymq_queued_messages`, `ferrymq_queued_messages_max`: the in-memory session queues,
//!   one atomic read per session under the registry lock (O(sessions));
//! * `ferrymq_device_queue_messages`, `ferrymq_application_log_messages`,
//!   `ferrymq_application_lag_messages`: from [`crate::storage::Storage::queue_totals`] (the
//!   embedded backend reads two table lengths and two keys per APPLICATION client), left out when
//!   the backend does not report them;
//! * `ferrymq_storage_healthy`: [`crate::storage::Storage::health`], 1 or 0.
//!
//! Storage calls block, so they run on the blocking pool.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus::{Encoder, IntGauge, Registry, TextEncoder};

use super::AppState;

pub fn routes() -> Router<AppState> {
    Router::new().route("/metrics", get(scrape))
}

async fn scrape(State(state): State<AppState>) -> Response {
    let broker = state.broker.clone();
    let storage = broker.storage.clone();
    let (health, totals) =
        tokio::task::spawn_blocking(move || (storage.health(), storage.queue_totals()))
            .await
            .unwrap_or_else(|_| {
                let e = crate::storage::StorageError::engine_msg("storage check panicked");
                (Err(e.clone()), Err(e))
            });
    let scraped = Registry::new();
    let gauge = |name: &str, help: &str, value: u64| {
        if let Ok(g) = IntGauge::new(name, help) {
            g.set(i64::try_from(value).unwrap_or(i64::MAX));
            let _ = scraped.register(Box::new(g));
        }
    };
    gauge(
        "ferrymq_subscriptions",
        "Subscription entries in the router: one per (filter, client), one per shared group.",
        broker.router.subscription_count() as u64,
    );
    let (queued, queued_max) = queue_depths(&broker);
    gauge(
        "ferrymq_queued_messages",
        "Deliveries waiting in the in-memory per-session queues, summed over sessions.",
        queued,
    );
    gauge(
        "ferrymq_queued_messages_max",
        "Deliveries waiting in the fullest in-memory per-session queue (at most limits.max_queued_messages).",
        queued_max,
    );
    gauge(
        "ferrymq_storage_healthy",
        "1 when the storage backend answered its health check at this scrape, else 0.",
        u64::from(health.is_ok()),
    );
    match totals {
        Ok(Some(t)) => {
            gauge(
                "ferrymq_device_queue_messages",
                "Entries in all DEVICE queues (stored, not yet acknowledged by their client).",
                t.device_queued,
            );
            gauge(
                "ferrymq_application_log_messages",
                "Entries in all APPLICATION logs, acknowledged or not (until retention).",
                t.application_log,
            );
            gauge(
                "ferrymq_application_lag_messages",
                "APPLICATION log entries above their client's committed offset, summed over clients.",
                t.application_lag,
            );
        }
        Ok(None) => {}
        Err(e) => tracing::warn!(error = %e, "reading queue totals for /metrics failed"),
    }
    let mut families = broker.metrics.registry().gather();
    families.extend(scraped.gather());
    let encoder = TextEncoder::new();
    let mut body = Vec::new();
    if let Err(e) = encoder.encode(&families, &mut body) {
        return super::error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string());
    }
    (
        [(header::CONTENT_TYPE, encoder.format_type().to_string())],
        body,
    )
        .into_response()
}

/// Total and largest in-memory queue depth over every session, connected or not.
fn queue_depths(broker: &crate::broker::Broker) -> (u64, u64) {
    use crate::session::registry::SlotView;
    let (mut total, mut max) = (0u64, 0u64);
    broker.registry.for_each_view(|_, view| {
        let queued = match view {
            SlotView::Online(Some(info)) => info.mailbox.queued(),
            SlotView::Online(None) => 0,
            SlotView::Offline(session, _) => session.mailbox.queued(),
        } as u64;
        total += queued;
        max = max.max(queued);
    });
    (total, max)
}
