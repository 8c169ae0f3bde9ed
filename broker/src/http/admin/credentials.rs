//! Credentials in the broker's credential store (the embedded file or the PostgreSQL table,
//! whichever the broker uses). On the embedded backend the running broker holds the store file
//! locked, so this API is how its credentials change while it runs.
//!
//! * `GET /api/v1/credentials?after=&limit=`: in key order (client ids, then user names).
//! * `POST /api/v1/credentials`: creates a record (key from its `username` or `client_id`);
//!   409 when the key is taken.
//! * `GET|PUT|DELETE /api/v1/credentials/{kind}/{name}`: `kind` is `username` or `client_id`.
//!   PUT creates or replaces (201 / 200).
//!
//! Bodies take `password` (hashed here with argon2id, on the blocking pool) or `password_hash`
//! (argon2id or bcrypt, stored as given). Responses never contain a hash, only `has_password`.
//! Changes apply to a client's next CONNECT.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::Deserialize;
use serde_json::json;

use super::{ok, page_limit};
use crate::auth::acl::AclRules;
use crate::auth::password;
use crate::auth::store::{
    ClientType, CredentialKey, CredentialRecord, CredentialStore, StoreError,
};
use crate::http::{error, AppState};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/credentials", get(list).post(create))
        .route(
            "/credentials/{kind}/{name}",
            get(show).put(replace).delete(delete),
        )
}

/// A refused request: its status and message, answered as `{"error": message}`.
#[derive(Debug)]
pub struct ApiError(pub StatusCode, pub String);

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError(status, message.into())
    }

    fn bad(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        error(self.0, &self.1)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::Invalid(message) => ApiError::bad(message),
            StoreError::Backend(_) => {
                tracing::error!(error = %e, "admin API: credential store unavailable");
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
            }
            StoreError::Corrupt { .. } => {
                tracing::error!(error = %e, "admin API: stored credential is unreadable");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
            }
        }
    }
}

/// The broker's credential store, or the 404 that says there is none (a broker embedded with
/// an authenticator of its own).
pub fn store(state: &AppState) -> Result<Arc<dyn CredentialStore>, ApiError> {
    state.broker.auth.credential_store().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "this broker's authenticator has no credential store",
        )
    })
}

/// The page size a request asked for, as an [`ApiError`].
pub fn limit(limit: Option<usize>) -> Result<usize, ApiError> {
    page_limit(limit).map_err(|bad| ApiError::bad(bad.0))
}

fn parse_key(
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<CredentialKey, ApiError> {
    let Path((kind, name)) = path.map_err(|e| ApiError::bad(format!("bad path: {e}")))?;
    match kind.as_str() {
        "username" => Ok(CredentialKey::Username(name)),
        "client_id" => Ok(CredentialKey::ClientId(name)),
        _ => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "no such endpoint (use /credentials/username/{name} or /credentials/client_id/{name})",
        )),
    }
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
    let after = match q.after.as_deref().map(CredentialKey::decode) {
        None => None,
        Some(Some(key)) => Some(key),
        Some(None) => {
            return Err(ApiError::bad(
                "`after` must be the `next` value of a previous page",
            ))
        }
    };
    // One more than asked tells whether another page follows.
    let mut records = store.list(after.as_ref(), limit + 1).await?;
    let more = records.len() > limit;
    records.truncate(limit);
    let next = if more {
        records.last().and_then(|r| r.key()).map(|k| k.encode())
    } else {
        None
    };
    let credentials: Vec<_> = records.iter().map(CredentialRecord::redacted).collect();
    Ok(ok(json!({ "credentials": credentials, "next": next })))
}

async fn show(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, ApiError> {
    let (store, key) = (store(&state)?, parse_key(path)?);
    match store.get(&key).await? {
        Some(record) => Ok(ok(record.redacted())),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no credential with {key}"),
        )),
    }
}

/// A request body: the record format, with `password` as an alternative to `password_hash`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CredentialBody {
    username: Option<String>,
    client_id: Option<String>,
    password: Option<String>,
    password_hash: Option<String>,
    client_type: Option<ClientType>,
    #[serde(default)]
    acl: AclRules,
}

/// Parses a body and hashes its password: the record to store, or the 400 that says why not.
async fn record_from(value: serde_json::Value) -> Result<CredentialRecord, ApiError> {
    let body: CredentialBody = serde_json::from_value(value)
        .map_err(|e| ApiError::bad(format!("the body is not a credential object: {e}")))?;
    let password_hash = match (body.password, body.password_hash) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad(
                "give `password` or `password_hash`, not both",
            ))
        }
        (Some(pw), None) if pw.is_empty() => return Err(ApiError::bad("`password` is empty")),
        (Some(pw), None) => Some(
            password::hash_async(pw.into_bytes())
                .await
                .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e))?,
        ),
        (None, hash) => hash,
    };
    let record = CredentialRecord {
        username: body.username,
        client_id: body.client_id,
        password_hash,
        client_type: body.client_type,
        acl: body.acl,
    };
    record.validate().map_err(ApiError::bad)?;
    Ok(record)
}

fn parse_body(body: &[u8]) -> Result<serde_json::Value, ApiError> {
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad(format!("the body is not a credential object: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::bad("the body is not a credential object"));
    }
    Ok(value)
}

async fn create(State(state): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let store = store(&state)?;
    let record = record_from(parse_body(&body)?).await?;
    let view = record.redacted();
    let key = record.key();
    if store.create(record).await? {
        return Ok((StatusCode::CREATED, axum::Json(view)).into_response());
    }
    Err(ApiError::new(
        StatusCode::CONFLICT,
        match key {
            Some(k) => format!("a credential with {k} exists (PUT replaces it)"),
            None => "the credential exists".into(),
        },
    ))
}

async fn replace(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (store, key) = (store(&state)?, parse_key(path)?);
    let record = record_from(keyed_body(&key, parse_body(&body)?)?).await?;
    let view = record.redacted();
    // Create first, so the status says whether the key was new; else replace.
    if store.create(record.clone()).await? {
        return Ok((StatusCode::CREATED, axum::Json(view)).into_response());
    }
    store.put(record).await?;
    Ok(ok(view))
}

/// The body of a PUT with the key from the path: a `username` or `client_id` in the body must
/// agree with it.
fn keyed_body(
    key: &CredentialKey,
    mut value: serde_json::Value,
) -> Result<serde_json::Value, ApiError> {
    let Some(obj) = value.as_object_mut() else {
        return Err(ApiError::bad("the body is not a credential object"));
    };
    let field = |obj: &serde_json::Map<String, serde_json::Value>, name: &str| {
        obj.get(name).and_then(|v| v.as_str()).map(str::to_string)
    };
    match key {
        CredentialKey::Username(name) => {
            if field(obj, "username").is_some_and(|u| &u != name) {
                return Err(ApiError::bad(
                    "`username` in the body differs from the path",
                ));
            }
            obj.insert("username".into(), name.clone().into());
        }
        CredentialKey::ClientId(name) => {
            if obj.contains_key("username") {
                return Err(ApiError::bad(
                    "a record with a `username` is keyed by it: PUT it under /credentials/username/{name}",
                ));
            }
            if field(obj, "client_id").is_some_and(|c| &c != name) {
                return Err(ApiError::bad(
                    "`client_id` in the body differs from the path",
                ));
            }
            obj.insert("client_id".into(), name.clone().into());
        }
    }
    Ok(value)
}

async fn delete(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, ApiError> {
    let (store, key) = (store(&state)?, parse_key(path)?);
    if store.delete(&key).await? {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    Err(ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no credential with {key}"),
    ))
}
