//! The admin API's credential and APPLICATION client endpoints on the embedded backend, over
//! real HTTP, with MQTT clients connecting with what the API wrote while the broker runs (the
//! running broker holds `credentials.redb`, so the API is the way to change it live). The same
//! round trip on PostgreSQL is in `e2e/tests/pg_credentials.rs`.

mod common;

use std::net::SocketAddr;

use bytes::Bytes;
use common::{connect5_packet, start_with, Raw, WAIT};
use ferrymq::config::AuthProviderKind;
use ferrymq::server::Server;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use rumqttc::v5::mqttbytes::v5::{self, ConnectReturnCode, Packet};
use serde_json::{json, Value};
use tokio::net::TcpStream;

const TOKEN: &str = "cred-admin-token";

struct Reply {
    status: u16,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> Reply {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost");
    if let Some(token) = token {
        req = req.header("authorization", format!("Bearer {token}"));
    }
    let bytes = match body {
        Some(v) => {
            req = req.header("content-type", "application/json");
            Bytes::from(v.to_string())
        }
        None => Bytes::new(),
    };
    let req = req.body(Full::new(bytes)).unwrap();
    let resp = tokio::time::timeout(WAIT, sender.send_request(req))
        .await
        .expect("HTTP response in time")
        .unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        body: String::from_utf8(body.to_vec()).unwrap(),
    }
}

async fn api(addr: SocketAddr, method: &str, path: &str, body: Option<Value>) -> Reply {
    call(addr, method, path, Some(TOKEN), body).await
}

async fn connack(addr: SocketAddr, id: &str, user: &str, pw: &str) -> v5::ConnAck {
    let mut c = Raw::connect(addr).await;
    c.send5(Packet::Connect(
        connect5_packet(id, true, 0),
        None,
        Some(v5::Login::new(user, pw)),
    ))
    .await;
    match c.recv5().await {
        Packet::ConnAck(ack) => ack,
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

async fn start_locked_down() -> (Server, SocketAddr, SocketAddr) {
    let (server, addr) = start_with(|c| {
        c.http.admin_token = Some(TOKEN.into());
        c.auth.allow_anonymous = false;
        c.auth.providers = vec![AuthProviderKind::Store];
    })
    .await;
    let http = server.http_addr().expect("HTTP endpoint enabled");
    (server, addr, http)
}

#[tokio::test]
async fn credentials_crud_over_http_and_clients_log_in_with_them() {
    let (server, addr, http) = start_locked_down().await;

    // The token guards every credential endpoint.
    for token in [None, Some("wrong")] {
        let r = call(http, "GET", "/api/v1/credentials", token, None).await;
        assert_eq!(r.status, 401, "{token:?}: {}", r.body);
        let r = call(
            http,
            "POST",
            "/api/v1/credentials",
            token,
            Some(json!({"username": "mallory", "password": "x"})),
        )
        .await;
        assert_eq!(r.status, 401, "{}", r.body);
    }
    assert_eq!(
        api(http, "GET", "/api/v1/credentials/username/mallory", None)
            .await
            .status,
        404,
        "a refused request wrote nothing"
    );

    // Create: the broker hashes the password; no hash ever comes back.
    let alice = json!({
        "username": "alice", "client_id": "alice-1", "password": "correct horse",
        "client_type": "device",
        "acl": {"publish": ["out/${username}/#"], "subscribe": ["in/#"]}
    });
    let r = api(http, "POST", "/api/v1/credentials", Some(alice.clone())).await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(
        r.json(),
        json!({"username": "alice", "client_id": "alice-1", "client_type": "device",
               "has_password": true,
               "acl": {"publish": ["out/${username}/#"], "subscribe": ["in/#"]}})
    );
    let r = api(http, "POST", "/api/v1/credentials", Some(alice)).await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(r.json()["error"].as_str().unwrap().contains("alice"));

    // Bad bodies: 400 with a message, nothing stored.
    for (body, says) in [
        (
            json!({"username": "eve", "password": "a", "password_hash": "b"}),
            "not both",
        ),
        (json!({"username": "eve", "password": ""}), "empty"),
        (
            json!({"username": "eve", "acl": {"publish": ["a/#/b"]}}),
            "a/#/b",
        ),
        (
            json!({"username": "eve", "password_hash": "plain"}),
            "password_hash",
        ),
        (json!({"username": "eve", "typo": 1}), "typo"),
        (json!({"password": "x"}), "username or a client_id"),
        (json!({"username": "eve", "client_type": "robot"}), "robot"),
    ] {
        let r = api(http, "POST", "/api/v1/credentials", Some(body.clone())).await;
        assert_eq!(r.status, 400, "{body}: {}", r.body);
        assert!(
            r.json()["error"].as_str().unwrap().contains(says),
            "{body}: {}",
            r.body
        );
    }
    let r = call(http, "POST", "/api/v1/credentials", Some(TOKEN), None).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(
        api(http, "GET", "/api/v1/credentials/username/eve", None)
            .await
            .status,
        404
    );

    // The running broker uses it at once.
    assert_eq!(
        connack(addr, "alice-1", "alice", "correct horse")
            .await
            .code,
        ConnectReturnCode::Success
    );
    assert_eq!(
        connack(addr, "alice-1", "alice", "wrong").await.code,
        ConnectReturnCode::BadUserNamePassword
    );
    assert_eq!(
        connack(addr, "other-id", "alice", "correct horse")
            .await
            .code,
        ConnectReturnCode::NotAuthorized,
        "the record binds alice to client id alice-1"
    );

    // Get.
    let r = api(http, "GET", "/api/v1/credentials/username/alice", None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["has_password"], true);
    assert!(!r.body.contains("argon2"), "{}", r.body);
    assert_eq!(
        api(http, "GET", "/api/v1/credentials/client_id/alice", None)
            .await
            .status,
        404,
        "user names and client ids are separate namespaces"
    );
    assert_eq!(
        api(http, "GET", "/api/v1/credentials/groups/alice", None)
            .await
            .status,
        404
    );

    // Replace (PUT): the new password works, the old one no longer does.
    let r = api(
        http,
        "PUT",
        "/api/v1/credentials/username/alice",
        Some(json!({"password": "battery staple", "acl": {"publish": ["#"], "subscribe": ["#"]}})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["username"], "alice");
    assert_eq!(
        r.json()["client_id"],
        Value::Null,
        "the binding was replaced too"
    );
    assert_eq!(
        connack(addr, "any", "alice", "correct horse").await.code,
        ConnectReturnCode::BadUserNamePassword
    );
    assert_eq!(
        connack(addr, "any", "alice", "battery staple").await.code,
        ConnectReturnCode::Success
    );
    let r = api(
        http,
        "PUT",
        "/api/v1/credentials/username/alice",
        Some(json!({"username": "bob"})),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.body);

    // PUT creates (201), with a hash given as is; key names with reserved characters are
    // percent-encoded in the path.
    let hash = ferrymq::auth::password::hash(b"s3cret").unwrap();
    let r = api(
        http,
        "PUT",
        "/api/v1/credentials/username/b%2Fob",
        Some(json!({"password_hash": hash, "client_type": "application"})),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.json()["username"], "b/ob");
    let ack = connack(addr, "bob-app", "b/ob", "s3cret").await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    assert_eq!(
        ack.properties.and_then(|p| p.session_expiry_interval),
        Some(u32::MAX),
        "the credential made the client an APPLICATION client"
    );
    let r = api(
        http,
        "PUT",
        "/api/v1/credentials/client_id/sensor-9",
        Some(json!({"client_id": "other"})),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.body);
    for id in ["sensor-9", "sensor-10", "a"] {
        let r = api(
            http,
            "PUT",
            &format!("/api/v1/credentials/client_id/{id}"),
            Some(json!({"client_type": "device"})),
        )
        .await;
        assert_eq!(r.status, 201, "{}", r.body);
    }

    // List, page by page: client ids first, then user names, each in byte order.
    let mut keys = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let path = match &after {
            Some(a) => format!("/api/v1/credentials?limit=2&after={}", urlencode(a)),
            None => "/api/v1/credentials?limit=2".to_string(),
        };
        let r = api(http, "GET", &path, None).await;
        assert_eq!(r.status, 200, "{}", r.body);
        let page = r.json();
        assert!(!r.body.contains("argon2"), "{}", r.body);
        for c in page["credentials"].as_array().unwrap() {
            keys.push(match c["username"].as_str() {
                Some(u) => format!("u:{u}"),
                None => format!("c:{}", c["client_id"].as_str().unwrap()),
            });
        }
        match page["next"].as_str() {
            Some(n) => after = Some(n.to_string()),
            None => break,
        }
    }
    assert_eq!(
        keys,
        ["c:a", "c:sensor-10", "c:sensor-9", "u:alice", "u:b/ob"],
        "paged listing"
    );
    assert_eq!(
        api(http, "GET", "/api/v1/credentials?limit=0", None)
            .await
            .status,
        400
    );
    assert_eq!(
        api(http, "GET", "/api/v1/credentials?after=bogus", None)
            .await
            .status,
        400
    );

    // Delete.
    let r = api(http, "DELETE", "/api/v1/credentials/username/alice", None).await;
    assert_eq!(r.status, 204, "{}", r.body);
    let r = api(http, "DELETE", "/api/v1/credentials/username/alice", None).await;
    assert_eq!(r.status, 404, "{}", r.body);
    assert_eq!(
        connack(addr, "any", "alice", "battery staple").await.code,
        ConnectReturnCode::BadUserNamePassword
    );
    server.shutdown().await;
}

#[tokio::test]
async fn application_clients_over_http_decide_the_session_kind() {
    let (server, addr, http) = start_locked_down().await;
    let hash = ferrymq::auth::password::hash(b"pw").unwrap();
    let r = api(
        http,
        "POST",
        "/api/v1/credentials",
        Some(json!({"username": "svc", "password_hash": hash, "acl": {"publish": ["#"], "subscribe": ["#"]}})),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    // Without a type in the credential and without a registration: DEVICE.
    let ack = connack(addr, "collector", "svc", "pw").await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    assert_eq!(ack.properties.and_then(|p| p.session_expiry_interval), None);

    let r = api(http, "PUT", "/api/v1/application-clients/collector", None).await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(
        r.json(),
        json!({"client_id": "collector", "registered": true})
    );
    let r = api(http, "PUT", "/api/v1/application-clients/collector", None).await;
    assert_eq!(r.status, 200, "registering twice is no change: {}", r.body);
    let r = api(http, "PUT", "/api/v1/application-clients/zeta", None).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let r = api(http, "GET", "/api/v1/application-clients", None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.json(),
        json!({"application_clients": ["collector", "zeta"], "next": null})
    );
    let r = api(http, "GET", "/api/v1/application-clients?limit=1", None).await;
    assert_eq!(
        r.json(),
        json!({"application_clients": ["collector"], "next": "collector"})
    );
    let r = api(
        http,
        "GET",
        "/api/v1/application-clients?limit=1&after=collector",
        None,
    )
    .await;
    assert_eq!(
        r.json(),
        json!({"application_clients": ["zeta"], "next": null})
    );

    // The next CONNECT of the registered client id gets an APPLICATION session.
    let ack = connack(addr, "collector", "svc", "pw").await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    assert_eq!(
        ack.properties.and_then(|p| p.session_expiry_interval),
        Some(u32::MAX),
        "a registered client id is an APPLICATION client"
    );
    let r = call(
        http,
        "PUT",
        "/api/v1/application-clients/intruder",
        Some("wrong"),
        None,
    )
    .await;
    assert_eq!(r.status, 401);

    let r = api(
        http,
        "DELETE",
        "/api/v1/application-clients/collector",
        None,
    )
    .await;
    assert_eq!(r.status, 204, "{}", r.body);
    let r = api(
        http,
        "DELETE",
        "/api/v1/application-clients/collector",
        None,
    )
    .await;
    assert_eq!(r.status, 404, "{}", r.body);
    let ack = connack(addr, "collector", "svc", "pw").await;
    assert_eq!(ack.properties.and_then(|p| p.session_expiry_interval), None);

    // A client-id credential with a password keeps it across registration and removal.
    let r = api(
        http,
        "PUT",
        "/api/v1/credentials/client_id/zeta",
        Some(json!({"password": "z", "client_type": "application"})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = api(http, "DELETE", "/api/v1/application-clients/zeta", None).await;
    assert_eq!(r.status, 204, "{}", r.body);
    let r = api(http, "GET", "/api/v1/credentials/client_id/zeta", None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.json(),
        json!({"client_id": "zeta", "has_password": true, "acl": {"publish": [], "subscribe": []}})
    );
    let r = api(http, "GET", "/api/v1/application-clients", None).await;
    assert_eq!(r.json(), json!({"application_clients": [], "next": null}));
    server.shutdown().await;
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
