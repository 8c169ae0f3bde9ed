//! `GET /api/v1/subscriptions?client_id=&after=&limit=`: every subscription in the router,
//! ordered by (client id, filter). A `$share/{group}/{filter}` subscription is listed once per
//! member, with its full filter text.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{ok, page_limit, Page};
use crate::http::AppState;
use crate::protocol::{QoS, RetainForwardRule};
use crate::router::SubscriptionOptions;

pub fn routes() -> Router<AppState> {
    Router::new().route("/subscriptions", get(list))
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    client_id: Option<String>,
    after: Option<String>,
    limit: Option<usize>,
}

/// Separates client id and filter in the page cursor; MQTT strings cannot contain U+0000.
const CURSOR_SEPARATOR: char = '\0';

/// The full filter text a client subscribed with.
fn full_filter(filter: &str, group: Option<&str>) -> String {
    match group {
        Some(group) => format!("$share/{group}/{filter}"),
        None => filter.to_string(),
    }
}

/// The JSON form of one subscription (also used by the session details).
pub fn entry(
    filter: &str,
    group: Option<&str>,
    client: &Arc<str>,
    options: &SubscriptionOptions,
) -> Value {
    json!({
        "client_id": &**client,
        "filter": full_filter(filter, group),
        "share_group": group,
        "qos": match options.qos {
            QoS::AtMostOnce => 0,
            QoS::AtLeastOnce => 1,
            QoS::ExactlyOnce => 2,
        },
        "no_local": options.no_local,
        "retain_as_published": options.retain_as_published,
        "retain_handling": match options.retain_handling {
            RetainForwardRule::OnEverySubscribe => 0,
            RetainForwardRule::OnNewSubscribe => 1,
            RetainForwardRule::Never => 2,
        },
        "subscription_identifier": options.identifier,
    })
}

async fn list(State(state): State<AppState>, Query(q): Query<ListQuery>) -> Response {
    let limit = match page_limit(q.limit) {
        Ok(l) => l,
        Err(bad) => return bad.into_response(),
    };
    let after = q.after.map(|a| match a.split_once(CURSOR_SEPARATOR) {
        Some((client, filter)) => (client.to_string(), filter.to_string()),
        None => (a, String::new()),
    });
    let mut page: Page<(String, String), Value> = Page::new(after, limit);
    state
        .broker
        .router
        .for_each_subscription(|filter, group, client, options| {
            if q.client_id.as_deref().is_some_and(|c| c != &**client) {
                return;
            }
            let key = (client.to_string(), full_filter(filter, group));
            page.offer(key, || entry(filter, group, client, options));
        });
    let (subscriptions, next) = page.finish();
    let next = next.map(|(client, filter)| format!("{client}{CURSOR_SEPARATOR}{filter}"));
    ok(json!({ "subscriptions": subscriptions, "next": next }))
}
