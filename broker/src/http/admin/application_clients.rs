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

use super::credentials::{limit, store, ApiError};
use super::ok;
use crate::auth::applications;
use crate::http::AppState;

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

async fn list(
    State(state): State<AppState>,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    let store = store(&state)?;
    let limit = limit(q.limit)?;
    let (ids, more) = applications::list(store.as_ref(), q.after.as_deref(), limit).await?;
    let next = if more { ids.last().cloned() } else { None };
    Ok(ok(json!({ "application_clients": ids, "next": next })))
}

fn client_id(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    path.map(|Path(id)| id)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("bad path: {e}")))
}

async fn add(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let (store, id) = (store(&state)?, client_id(path)?);
    let newly = applications::register(store.as_ref(), &id).await?;
    let body = json!({ "client_id": id, "registered": true });
    Ok(if newly {
        (StatusCode::CREATED, axum::Json(body)).into_response()
    } else {
        ok(body)
    })
}

async fn remove(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let (store, id) = (store(&state)?, client_id(path)?);
    if applications::unregister(store.as_ref(), &id).await? {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    Err(ApiError::new(
        StatusCode::NOT_FOUND,
        format!("client id `{id}` is not registered as an APPLICATION client"),
    ))
}
