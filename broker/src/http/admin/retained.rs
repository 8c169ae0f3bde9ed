//! Retained messages.
//!
//! * `GET /api/v1/retained?prefix=&after=&limit=`: by topic, with the payload as text when it is
//!   UTF-8 and at most [`PAYLOAD_PREVIEW`] bytes.
//! * `DELETE /api/v1/retained?topic=...`: removes one (memory and storage), as an empty retained
//!   PUBLISH would; 204, or 404 when there was none. The topic is a query parameter because
//!   topics contain `/` and may have empty levels.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{ok, page_limit, Page};
use crate::http::{error, AppState};
use crate::message::Message;
use crate::protocol::QoS;
use crate::storage::codec::instant_to_ms;
use crate::storage::WriteBatch;

/// Payloads up to this size are shown as text when they are UTF-8.
pub const PAYLOAD_PREVIEW: usize = 1024;

pub fn routes() -> Router<AppState> {
    Router::new().route("/retained", get(list).delete(delete))
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    prefix: Option<String>,
    after: Option<String>,
    limit: Option<usize>,
}

fn entry(topic: &str, message: &Arc<Message>) -> Value {
    let text = (message.payload.len() <= PAYLOAD_PREVIEW)
        .then(|| std::str::from_utf8(&message.payload).ok())
        .flatten();
    json!({
        "topic": topic,
        "qos": match message.qos {
            QoS::AtMostOnce => 0,
            QoS::AtLeastOnce => 1,
            QoS::ExactlyOnce => 2,
        },
        "payload_bytes": message.payload.len(),
        "payload": text,
        "received_at_ms": instant_to_ms(message.received_at),
        "message_expiry_secs": message.properties.message_expiry_interval,
        "publisher": &*message.publisher,
    })
}

async fn list(State(state): State<AppState>, Query(q): Query<ListQuery>) -> Response {
    let limit = match page_limit(q.limit) {
        Ok(l) => l,
        Err(bad) => return bad.into_response(),
    };
    let mut page: Page<String, Value> = Page::new(q.after, limit);
    state.broker.router.for_each_retained(|topic, message| {
        if q.prefix.as_deref().is_some_and(|p| !topic.starts_with(p)) {
            return;
        }
        page.offer(topic.to_string(), || entry(topic, message));
    });
    let (retained, next) = page.finish();
    ok(json!({ "retained": retained, "next": next }))
}

#[derive(Debug, Deserialize)]
struct DeleteQuery {
    topic: Option<String>,
}

async fn delete(State(state): State<AppState>, Query(q): Query<DeleteQuery>) -> Response {
    let Some(topic) = q.topic else {
        return error(
            StatusCode::BAD_REQUEST,
            "the `topic` query parameter is required",
        );
    };
    let broker = &state.broker;
    let mut batch = WriteBatch::default();
    if !broker.router.delete_retained(&topic, &mut batch) {
        return error(StatusCode::NOT_FOUND, "no retained message on this topic");
    }
    // Waited for, so a 204 means the deletion survives a restart.
    match broker.storage.submit(batch).await {
        Ok(Ok(())) => StatusCode::NO_CONTENT.into_response(),
        Ok(Err(e)) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("deleted in memory, but storing the deletion failed: {e}"),
        ),
        Err(_) => error(StatusCode::SERVICE_UNAVAILABLE, "storage is shut down"),
    }
}
