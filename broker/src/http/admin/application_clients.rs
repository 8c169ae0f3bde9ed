//! APPLICATION registrations in the credential store (what `ferrymq app-clients` edits): a
//! registered client id gets an APPLICATION session at its next CONNECT unless its credential
//! names another type.
//!
//! * `GET /api/v1/application-clients?after=&limit=`: registered client ids in order.
//! * `PUT /api/v1/application-clients/{client_id}`: registers (201), or 200 when it already was.
//! * `DELETE /api/v1/application-clients/{client_id}`: 204, or 404 when it was not registered.

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::Router;
use serde::Deserialize;
use serde_json::json;

use super::credentials::{store, store_error};
use super::{ok, page_limit};
use crate::auth::applications;
use crate::http::{error, AppState};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/application-clients", get(list))
        .route("/application-clients/{client_id}", put(add).delete(remove))
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    after: Option<String>,
    limit: Option<usize>,
}

async fn list(State(state): State<AppState>, Query(q): Query<ListQuery>) -> Response {
    let store = match store(&state) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let limit = match page_limit(q.limit) {
        Ok(l) => l,
        Err(bad) => return bad.into_response(),
    };
    match applications::list(store.as_ref(), q.after.as_deref(), limit).await {
        Ok((ids, more)) => {
            let next = if more { ids.last().cloned() } else { None };
            ok(json!({ "application_clients": ids, "next": next }))
        }
        Err(e) => store_error(e),
    }
}

fn client_id(path: Result<Path<String>, PathRejection>) -> Result<String, Response> {
    path.map(|Path(id)| id)
        .map_err(|e| error(StatusCode::BAD_REQUEST, &format!("bad path: {e}")))
}

async fn add(State(state): State<AppState>, path: Result<Path<String>, PathRejection>) -> Response {
    let (store, id) = match (store(&state), client_id(path)) {
        (Ok(s), Ok(id)) => (s, id),
        (Err(r), _) | (_, Err(r)) => return r,
    };
    let body = json!({ "client_id": id, "registered": true });
    match applications::register(store.as_ref(), &id).await {
        Ok(true) => (StatusCode::CREATED, axum::Json(body)).into_response(),
        Ok(false) => ok(body),
        Err(e) => store_error(e),
    }
}

async fn remove(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Response {
    let (store, id) = match (store(&state), client_id(path)) {
        (Ok(s), Ok(id)) => (s, id),
        (Err(r), _) | (_, Err(r)) => return r,
    };
    match applications::unregister(store.as_ref(), &id).await {
        Ok(true) => StatusCode::NO_CONTENT.into_response(),
        Ok(false) => error(
            StatusCode::NOT_FOUND,
            &format!("client id `{id}` is not registered as an APPLICATION client"),
        ),
        Err(e) => store_error(e),
    }
}
