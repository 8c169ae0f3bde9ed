//! The admin REST API under `/api/v1/`: JSON, bearer-token protected, read-mostly.
//!
//! Without `http.admin_token` (or `admin_token_file`) every `/api/v1/` path answers 404: the
//! API does not exist. With a token, a request without `Authorization: Bearer <token>` or with
//! another token gets 401 (compared in constant time).
//!
//! Lists use keyset pagination: `limit` (default 100, at most [`MAX_LIMIT`]) and `after`, the
//! opaque `next` value of the previous page. A page walks the whole collection under its read
//! lock but keeps only `limit` items, so memory is bounded and pages are stable while the
//! collection changes.
//!
//! One submodule per resource; a new resource adds a file and one `.merge` below.

pub mod application_clients;
pub mod credentials;
pub mod retained;
pub mod sessions;
pub mod subscriptions;

use std::collections::BinaryHeap;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use subtle::ConstantTimeEq;

use super::{error, AppState};

/// Largest page a list returns.
pub const MAX_LIMIT: usize = 1000;
/// Page size when `limit` is not given.
pub const DEFAULT_LIMIT: usize = 100;

pub fn routes(state: AppState) -> Router<AppState> {
    Router::new()
        .merge(sessions::routes())
        .merge(subscriptions::routes())
        .merge(retained::routes())
        .merge(credentials::routes())
        .merge(application_clients::routes())
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such endpoint") })
        .layer(middleware::from_fn_with_state(state, authorize))
}

async fn authorize(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let Some(expected) = &state.admin_token else {
        return error(
            StatusCode::NOT_FOUND,
            "the admin API is disabled (set http.admin_token or http.admin_token_file)",
        );
    };
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let authorized =
        presented.is_some_and(|token| bool::from(token.as_bytes().ct_eq(expected.as_bytes())));
    if !authorized {
        let mut response = error(
            StatusCode::UNAUTHORIZED,
            if presented.is_some() {
                "invalid bearer token"
            } else {
                "missing bearer token"
            },
        );
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer realm=\"ferrymq\""),
        );
        return response;
    }
    next.run(req).await
}

/// A 400 with its message.
pub struct BadRequest(pub &'static str);

impl IntoResponse for BadRequest {
    fn into_response(self) -> Response {
        error(StatusCode::BAD_REQUEST, self.0)
    }
}

/// The page size a request asked for.
pub fn page_limit(limit: Option<usize>) -> Result<usize, BadRequest> {
    match limit {
        None => Ok(DEFAULT_LIMIT),
        Some(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
        Some(_) => Err(BadRequest("limit must be between 1 and 1000")),
    }
}

/// Keeps the `limit` smallest keys above `after` out of a stream of candidates: O(limit)
/// memory whatever the collection size.
pub struct Page<K: Ord, V> {
    after: Option<K>,
    limit: usize,
    heap: BinaryHeap<Entry<K, V>>,
    /// More items than `limit` were above `after`.
    more: bool,
}

struct Entry<K, V>(K, V);

impl<K: Ord, V> PartialEq for Entry<K, V> {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}
impl<K: Ord, V> Eq for Entry<K, V> {}
impl<K: Ord, V> PartialOrd for Entry<K, V> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl<K: Ord, V> Ord for Entry<K, V> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.cmp(&other.0)
    }
}

impl<K: Ord, V> Page<K, V> {
    pub fn new(after: Option<K>, limit: usize) -> Self {
        Page {
            after,
            limit,
            heap: BinaryHeap::with_capacity(limit + 1),
            more: false,
        }
    }

    /// Whether `key` could still make it onto the page (lets callers skip building values).
    pub fn wants(&self, key: &K) -> bool {
        if self.after.as_ref().is_some_and(|a| key <= a) {
            return false;
        }
        self.heap.len() < self.limit || self.heap.peek().is_some_and(|top| key < &top.0)
    }

    /// Offers a candidate.
    pub fn offer(&mut self, key: K, value: impl FnOnce() -> V) {
        if self.after.as_ref().is_some_and(|a| &key <= a) {
            return;
        }
        if !self.wants(&key) {
            self.more = true;
            return;
        }
        self.heap.push(Entry(key, value()));
        if self.heap.len() > self.limit {
            self.heap.pop();
            self.more = true;
        }
    }

    /// The page in key order, and the key of its last item when more follow.
    pub fn finish(self) -> (Vec<V>, Option<K>)
    where
        K: Clone,
    {
        let more = self.more;
        let entries = self.heap.into_sorted_vec();
        let next = if more {
            entries.last().map(|e| e.0.clone())
        } else {
            None
        };
        (entries.into_iter().map(|e| e.1).collect(), next)
    }
}

/// A JSON body with status 200.
pub fn ok(body: serde_json::Value) -> Response {
    axum::Json(body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_keeps_the_smallest_keys_after_the_cursor() {
        let mut page = Page::new(Some(3), 3);
        for k in [9, 1, 5, 3, 7, 4, 8, 6, 2] {
            page.offer(k, || k * 10);
        }
        let (items, next) = page.finish();
        assert_eq!(items, vec![40, 50, 60]);
        assert_eq!(next, Some(6));
        let mut page = Page::new(Some(6), 3);
        for k in [9, 1, 5, 3, 7, 4, 8, 6, 2] {
            page.offer(k, || k);
        }
        let (items, next) = page.finish();
        assert_eq!(items, vec![7, 8, 9]);
        assert_eq!(next, None, "nothing after the last page");
    }
}
