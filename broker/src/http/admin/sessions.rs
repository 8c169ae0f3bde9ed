//! Sessions held by this node.
//!
//! * `GET /api/v1/sessions?connected=&client_type=&after=&limit=`
//! * `GET /api/v1/sessions/{client_id}`: details with subscriptions.
//! * `POST /api/v1/sessions/{client_id}/kick`: closes the connection (v5: DISCONNECT 0x98
//!   Administrative action); a persistent session stays, and the will is published as for any
//!   server-initiated close.
//! * `DELETE /api/v1/sessions/{client_id}`: kicks it if connected, then ends the session for
//!   good (subscriptions, queue and stored state; a will waiting on its delay is published).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::oneshot;

use super::{ok, page_limit, Page};
use crate::broker::Broker;
use crate::http::{error, AppState};
use crate::session::registry::{Kick, KickReason, SlotView};
use crate::session::NEVER_EXPIRES;
use crate::storage::ClientKind;

/// How long a kick waits for the connection to close and park its session.
const KICK_TIMEOUT: Duration = Duration::from_secs(5);

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/sessions", get(list))
        .route("/sessions/{client_id}", get(show).delete(delete))
        .route("/sessions/{client_id}/kick", post(kick))
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    connected: Option<bool>,
    client_type: Option<String>,
    after: Option<String>,
    limit: Option<usize>,
}

fn parse_kind(text: &str) -> Option<ClientKind> {
    match text {
        "device" => Some(ClientKind::Device),
        "application" => Some(ClientKind::Application),
        _ => None,
    }
}

/// The JSON summary of one session.
fn summary(broker: &Broker, client_id: &str, view: &SlotView<'_>) -> Value {
    match view {
        SlotView::Online(Some(info)) => json!({
            "client_id": client_id,
            "connected": true,
            "client_type": info.mailbox.kind.as_str(),
            "persistent": info.mailbox.is_persistent(),
            "session_expiry_secs": expiry(info.expiry_interval),
            "connection": {
                "peer": info.peer.to_string(),
                "listener": info.listener,
                "protocol": info.protocol,
                "connected_at_ms": info.connected_at_ms,
            },
            "queued_messages": info.mailbox.queued(),
        }),
        SlotView::Online(None) => json!({
            "client_id": client_id,
            "connected": true,
            "client_type": broker.client_kind(client_id).as_str(),
            "connection": null,
        }),
        SlotView::Offline(session, pending_will) => json!({
            "client_id": client_id,
            "connected": false,
            "client_type": session.kind.as_str(),
            "persistent": true,
            "session_expiry_secs": expiry(session.expiry_interval),
            "connection": null,
            "queued_messages": session.mailbox.queued(),
            "inflight_messages": session.outbound.len(),
            "subscription_count": session.subscriptions.len(),
            "pending_will": pending_will,
        }),
    }
}

fn expiry(interval: u32) -> Value {
    if interval == NEVER_EXPIRES {
        Value::String("never".into())
    } else {
        Value::from(interval)
    }
}

fn view_kind(broker: &Broker, client_id: &str, view: &SlotView<'_>) -> ClientKind {
    match view {
        SlotView::Online(Some(info)) => info.mailbox.kind,
        SlotView::Online(None) => broker.client_kind(client_id),
        SlotView::Offline(session, _) => session.kind,
    }
}

async fn list(State(state): State<AppState>, Query(q): Query<ListQuery>) -> Response {
    let limit = match page_limit(q.limit) {
        Ok(l) => l,
        Err(bad) => return bad.into_response(),
    };
    let kind = match q.client_type.as_deref().map(|t| (t, parse_kind(t))) {
        None => None,
        Some((_, Some(kind))) => Some(kind),
        Some((t, None)) => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("client_type `{t}`: expected `device` or `application`"),
            )
        }
    };
    let broker = &state.broker;
    let mut page: Page<String, Value> = Page::new(q.after, limit);
    broker.registry.for_each_view(|id, view| {
        let connected = matches!(view, SlotView::Online(_));
        if q.connected.is_some_and(|c| c != connected) {
            return;
        }
        if kind.is_some_and(|k| k != view_kind(broker, id, &view)) {
            return;
        }
        // The summary is built only for sessions that make it onto the page.
        page.offer(id.to_string(), || summary(broker, id, &view));
    });
    let (sessions, next) = page.finish();
    ok(json!({ "sessions": sessions, "next": next }))
}

/// The subscriptions of one client, from the router (online and offline sessions alike).
fn subscriptions_of(broker: &Broker, client_id: &str) -> Vec<Value> {
    let mut out = Vec::new();
    broker
        .router
        .for_each_subscription(|filter, group, client, options| {
            if &**client == client_id {
                out.push(super::subscriptions::entry(filter, group, client, options));
            }
        });
    out.sort_by(|a, b| a["filter"].as_str().cmp(&b["filter"].as_str()));
    out
}

async fn show(State(state): State<AppState>, Path(client_id): Path<String>) -> Response {
    let broker = &state.broker;
    let Some(mut body) = broker
        .registry
        .with_view(&client_id, |view| summary(broker, &client_id, &view))
    else {
        return error(StatusCode::NOT_FOUND, "no such session");
    };
    body["subscriptions"] = Value::Array(subscriptions_of(broker, &client_id));
    ok(body)
}

/// What a kick achieved.
enum Kicked {
    Done,
    NotConnected,
    /// Someone else (a takeover or another kick) is closing it already.
    Busy,
    TimedOut,
}

async fn kick_session(broker: &Arc<Broker>, client_id: &str) -> Kicked {
    let sender = match broker.registry.take_kick(client_id) {
        None => return Kicked::NotConnected,
        Some(None) => return Kicked::Busy,
        Some(Some(sender)) => sender,
    };
    let (done, done_rx) = oneshot::channel();
    let kick = Kick {
        done,
        reason: KickReason::Administrative,
    };
    if sender.send(kick).is_err() {
        // The connection is ending on its own right now.
        return Kicked::Done;
    }
    match tokio::time::timeout(KICK_TIMEOUT, done_rx).await {
        Ok(_) => Kicked::Done,
        Err(_) => Kicked::TimedOut,
    }
}

fn kick_failure(kicked: Kicked) -> Option<Response> {
    match kicked {
        Kicked::Done => None,
        Kicked::NotConnected => Some(error(StatusCode::NOT_FOUND, "the client is not connected")),
        Kicked::Busy => Some(error(
            StatusCode::CONFLICT,
            "the connection is already being closed (session takeover or another kick)",
        )),
        Kicked::TimedOut => Some(error(
            StatusCode::GATEWAY_TIMEOUT,
            "the connection did not close in time",
        )),
    }
}

async fn kick(State(state): State<AppState>, Path(client_id): Path<String>) -> Response {
    if let Some(failure) = kick_failure(kick_session(&state.broker, &client_id).await) {
        return failure;
    }
    ok(json!({ "client_id": client_id, "kicked": true }))
}

async fn delete(State(state): State<AppState>, Path(client_id): Path<String>) -> Response {
    let broker = &state.broker;
    let kicked = kick_session(broker, &client_id).await;
    let was_online = matches!(kicked, Kicked::Done);
    if !matches!(kicked, Kicked::NotConnected) {
        if let Some(failure) = kick_failure(kicked) {
            return failure;
        }
    }
    match broker.registry.remove_offline(&client_id) {
        Some((session, will)) => {
            let id = session.client_id.clone();
            if let Some(pending) = will {
                broker.publish_will(&id, *pending.will);
            }
            broker.discard(session);
            StatusCode::NO_CONTENT.into_response()
        }
        // A clean session ends with its connection.
        None if was_online => StatusCode::NO_CONTENT.into_response(),
        None if broker.registry.with_view(&client_id, |_| ()).is_some() => error(
            StatusCode::CONFLICT,
            "the client reconnected while its session was being deleted",
        ),
        None => error(StatusCode::NOT_FOUND, "no such session"),
    }
}
