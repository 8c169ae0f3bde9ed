//! The HTTP endpoint over real TCP: `/metrics` after a scripted MQTT workload, metric naming
//! rules, health probes (with a storage that can be made to fail), the admin API with its bearer
//! token, and the Grafana dashboard against the scrape output.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use common::{connect5_packet, filter5, publish5_packet, start_with, Raw, WAIT};
use ferrymq::config::{ApplicationClientConfig, Config};
use ferrymq::server::Server;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;
use rumqttc::v5::mqttbytes::QoS;
use serde_json::Value;
use tokio::net::TcpStream;

const TOKEN: &str = "s3cret-admin-token";

// --- a tiny HTTP client ------------------------------------------------------------------------

struct HttpResponse {
    status: u16,
    headers: hyper::HeaderMap,
    body: String,
}

impl HttpResponse {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

async fn request(addr: SocketAddr, method: &str, path: &str, token: Option<&str>) -> HttpResponse {
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
    let req = req.body(Empty::<Bytes>::new()).unwrap();
    let resp = tokio::time::timeout(WAIT, sender.send_request(req))
        .await
        .expect("HTTP response in time")
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    HttpResponse {
        status,
        headers,
        body: String::from_utf8(body.to_vec()).unwrap(),
    }
}

async fn get(addr: SocketAddr, path: &str) -> HttpResponse {
    request(addr, "GET", path, None).await
}

async fn admin(addr: SocketAddr, method: &str, path: &str) -> HttpResponse {
    request(addr, method, path, Some(TOKEN)).await
}

// --- Prometheus text parsing -------------------------------------------------------------------

/// One sample per line: (name, labels) → value.
fn samples(text: &str) -> Vec<(String, BTreeMap<String, String>, f64)> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap();
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => {
                let inner = rest.strip_suffix('}').unwrap();
                let mut labels = BTreeMap::new();
                for pair in inner.split("\",").filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once("=\"").unwrap();
                    labels.insert(k.to_string(), v.trim_end_matches('"').to_string());
                }
                (name.to_string(), labels)
            }
            None => (series.to_string(), BTreeMap::new()),
        };
        out.push((name, labels, value.parse::<f64>().unwrap()));
    }
    out
}

/// The value of the series `name{labels}` (exactly these labels); panics when absent.
fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let want: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    samples(text)
        .into_iter()
        .find(|(n, l, _)| n == name && *l == want)
        .map(|(_, _, v)| v)
        .unwrap_or_else(|| panic!("no sample {name}{labels:?} in\n{text}"))
}

/// `# TYPE` lines: family name → type.
fn families(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| {
            let (name, kind) = l.split_once(' ').unwrap();
            (name.to_string(), kind.to_string())
        })
        .collect()
}

async fn scrape(addr: SocketAddr) -> String {
    let r = get(addr, "/metrics").await;
    assert_eq!(r.status, 200);
    let ct = r.headers["content-type"].to_str().unwrap();
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    r.body
}

/// Scrapes until `check` passes (counters driven by other tasks settle shortly after the
/// packets that caused them were answered), then returns the text.
async fn scrape_until(addr: SocketAddr, check: impl Fn(&str) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let text = scrape(addr).await;
        if check(&text) || tokio::time::Instant::now() >= deadline {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn http_addr(server: &Server) -> SocketAddr {
    server.http_addr().expect("HTTP endpoint enabled")
}

fn size5(packet: v5::Packet) -> usize {
    let mut out = BytesMut::new();
    packet.write(&mut out, None).unwrap();
    out.len()
}

// --- tests ---------------------------------------------------------------------------------------

async fn subscribe_and_leave(addr: SocketAddr, id: &str, qos: QoS) {
    let (mut c, _) = Raw::connect5(addr, id, true, 3600).await;
    c.subscribe5(1, filter5("w/#", qos), None).await;
    c.disconnect5(v5::DisconnectReasonCode::NormalDisconnection, None)
        .await;
    assert!(c.closed_within(WAIT).await.is_some());
}

#[tokio::test]
async fn scrape_after_a_scripted_workload_matches_what_was_sent() {
    let (server, addr) = start_with(|c| {
        c.application_clients.push(ApplicationClientConfig {
            client_id: "app1".into(),
        })
    })
    .await;
    let http = http_addr(&server);

    // A persistent DEVICE session and an APPLICATION session, both offline: their QoS 1/2
    // messages are stored.
    subscribe_and_leave(addr, "dev1", QoS::AtLeastOnce).await;
    subscribe_and_leave(addr, "app1", QoS::AtLeastOnce).await;
    // A connected clean subscriber.
    let (mut sub, _) = Raw::connect5(addr, "sub", true, 0).await;
    let mut sub_sent = 0;
    let subscribe = v5::Subscribe {
        pkid: 1,
        filters: vec![filter5("w/#", QoS::ExactlyOnce)],
        properties: None,
    };
    sub_sent += size5(v5::Packet::Subscribe(subscribe.clone()));
    sub.send5(v5::Packet::Subscribe(subscribe)).await;
    assert!(matches!(sub.recv5().await, v5::Packet::SubAck(_)));

    let (mut publisher, _) = Raw::connect5(addr, "pub", true, 0).await;
    let mut pub_sent = 0;
    let mut script: Vec<v5::Publish> = Vec::new();
    for _ in 0..3 {
        script.push(publish5_packet("w/zero", QoS::AtMostOnce, 0, false, b"q0"));
    }
    script.push(publish5_packet("w/one", QoS::AtLeastOnce, 1, false, b"q1"));
    script.push(publish5_packet("w/one", QoS::AtLeastOnce, 2, false, b"q1"));
    script.push(publish5_packet("w/two", QoS::ExactlyOnce, 3, false, b"q2"));
    // Nobody subscribes to these: both count as dropped for no subscribers.
    script.push(publish5_packet(
        "nobody/here",
        QoS::AtLeastOnce,
        4,
        false,
        b"x",
    ));
    script.push(publish5_packet(
        "r/kept",
        QoS::AtLeastOnce,
        5,
        true,
        b"retained",
    ));
    for p in script {
        pub_sent += size5(v5::Packet::Publish(p.clone()));
        publisher.publish5(p).await;
    }
    // Acks: PUBACK 1, 2; PUBREC 3 → PUBREL → PUBCOMP; PUBACK 4, 5.
    let (mut acked, mut completed) = (0, false);
    while acked < 5 || !completed {
        match publisher.recv5().await {
            v5::Packet::PubAck(_) => acked += 1,
            v5::Packet::PubRec(rec) => {
                acked += 1;
                let rel = v5::PubRel::new(rec.pkid, None);
                pub_sent += size5(v5::Packet::PubRel(rel.clone()));
                publisher.send5(v5::Packet::PubRel(rel)).await;
            }
            v5::Packet::PubComp(_) => completed = true,
            other => panic!("unexpected {other:?}"),
        }
    }
    // The subscriber gets 3 + 2 + 1 and acknowledges them.
    let mut by_qos = [0; 3];
    for _ in 0..6 {
        let p = sub.recv_publish5().await;
        by_qos[p.qos as usize] += 1;
        match p.qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => {
                let ack = v5::PubAck::new(p.pkid, None);
                sub_sent += size5(v5::Packet::PubAck(ack.clone()));
                sub.send5(v5::Packet::PubAck(ack)).await;
            }
            QoS::ExactlyOnce => {
                let rec = v5::PubRec::new(p.pkid, None);
                sub_sent += size5(v5::Packet::PubRec(rec.clone()));
                sub.send5(v5::Packet::PubRec(rec)).await;
                assert!(matches!(sub.recv5().await, v5::Packet::PubRel(_)));
                let comp = v5::PubComp::new(p.pkid, None);
                sub_sent += size5(v5::Packet::PubComp(comp.clone()));
                sub.send5(v5::Packet::PubComp(comp)).await;
            }
        }
    }
    assert_eq!(by_qos, [3, 2, 1]);
    // A refused CONNECT: 3.1.1 with an empty client id and a persistent session (0x02).
    let mut refused = Raw::connect(addr).await;
    let mut connect = v4::Connect::new("");
    connect.clean_session = false;
    refused.send4(v4::Packet::Connect(connect)).await;
    match refused.recv4().await {
        v4::Packet::ConnAck(ack) => {
            assert_eq!(ack.code, v4::ConnectReturnCode::BadClientId)
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }
    // The broker closed its side and lingers (reading) until the client closes too.
    assert!(refused.closed_within(WAIT).await.is_some());
    drop(refused);
    // The publisher leaves normally.
    let disconnect = v5::Disconnect::new(v5::DisconnectReasonCode::NormalDisconnection);
    pub_sent += size5(v5::Packet::Disconnect(disconnect.clone()));
    publisher.send5(v5::Packet::Disconnect(disconnect)).await;
    assert!(publisher.closed_within(WAIT).await.is_some());

    // dev1 and app1 sent SUBSCRIBE (+ DISCONNECT) after their CONNECT too.
    let subscribe_dev = v5::Subscribe {
        pkid: 1,
        filters: vec![filter5("w/#", QoS::AtLeastOnce)],
        properties: None,
    };
    let parked = 2
        * (size5(v5::Packet::Subscribe(subscribe_dev))
            + size5(v5::Packet::Disconnect(v5::Disconnect::new(
                v5::DisconnectReasonCode::NormalDisconnection,
            ))));
    let received_bytes = (parked + sub_sent + pub_sent) as f64;
    let text = scrape_until(http, |t| {
        value(t, "ferrymq_received_bytes_total", &[]) == received_bytes
            && value(t, "ferrymq_sessions", &[]) == 3.0
            && value(t, "ferrymq_device_queue_messages", &[]) == 3.0
    })
    .await;

    let v = |name: &str, labels: &[(&str, &str)]| value(&text, name, labels);
    assert_eq!(v("ferrymq_connects_total", &[("result", "accepted")]), 4.0);
    assert_eq!(
        v(
            "ferrymq_connects_total",
            &[("result", "client_id_rejected")]
        ),
        1.0
    );
    assert_eq!(v("ferrymq_disconnects_total", &[("reason", "client")]), 3.0);
    assert_eq!(
        v(
            "ferrymq_connections",
            &[("listener", "tcp"), ("client_type", "device")]
        ),
        1.0,
        "only `sub` is still connected"
    );
    assert_eq!(
        v(
            "ferrymq_connections",
            &[("listener", "tcp"), ("client_type", "application")]
        ),
        0.0
    );
    assert_eq!(
        v("ferrymq_network_connections", &[("listener", "tcp")]),
        1.0
    );
    assert_eq!(v("ferrymq_messages_received_total", &[("qos", "0")]), 3.0);
    assert_eq!(v("ferrymq_messages_received_total", &[("qos", "1")]), 4.0);
    assert_eq!(v("ferrymq_messages_received_total", &[("qos", "2")]), 1.0);
    assert_eq!(v("ferrymq_messages_sent_total", &[("qos", "0")]), 3.0);
    assert_eq!(v("ferrymq_messages_sent_total", &[("qos", "1")]), 2.0);
    assert_eq!(v("ferrymq_messages_sent_total", &[("qos", "2")]), 1.0);
    assert_eq!(
        v(
            "ferrymq_messages_dropped_total",
            &[("reason", "no_subscribers")]
        ),
        2.0
    );
    for reason in ["queue_full", "expired", "too_large", "acl_denied"] {
        assert_eq!(
            v("ferrymq_messages_dropped_total", &[("reason", reason)]),
            0.0
        );
    }
    assert_eq!(v("ferrymq_received_bytes_total", &[]), received_bytes);
    assert!(v("ferrymq_sent_bytes_total", &[]) > 6.0 * 2.0);
    assert_eq!(v("ferrymq_sessions", &[]), 3.0, "sub, dev1, app1");
    assert_eq!(v("ferrymq_subscriptions", &[]), 3.0);
    assert_eq!(v("ferrymq_retained_messages", &[]), 1.0);
    // QoS 1 and 2 messages for the offline persistent sessions: 2 x QoS 1 + 1 x QoS 2 each.
    assert_eq!(
        v(
            "ferrymq_stored_messages_total",
            &[("client_type", "device")]
        ),
        3.0
    );
    assert_eq!(
        v(
            "ferrymq_stored_messages_total",
            &[("client_type", "application")]
        ),
        3.0
    );
    assert_eq!(v("ferrymq_device_queue_messages", &[]), 3.0);
    assert_eq!(v("ferrymq_application_log_messages", &[]), 3.0);
    assert_eq!(v("ferrymq_application_lag_messages", &[]), 3.0);
    // One latency observation per PUBACK/PUBREC: 4 QoS 1 and 1 QoS 2.
    assert_eq!(v("ferrymq_publish_ack_latency_seconds_count", &[]), 5.0);
    assert_eq!(
        v(
            "ferrymq_publish_ack_latency_seconds_bucket",
            &[("le", "+Inf")]
        ),
        5.0
    );
    assert_eq!(v("ferrymq_storage_healthy", &[]), 1.0);
    assert_eq!(
        v("ferrymq_storage_errors_total", &[("operation", "write")]),
        0.0
    );
    // The decoder rejects the empty persistent client id as a CONNECT violation.
    assert_eq!(v("ferrymq_protocol_errors_total", &[]), 1.0);
    for reason in ["bad_credentials", "not_authorized", "rate_limited"] {
        assert_eq!(v("ferrymq_auth_failures_total", &[("reason", reason)]), 0.0);
    }

    // The APPLICATION client comes back and reads its log: the lag drains to 0.
    let (mut app, _) = Raw::connect5(addr, "app1", false, 3600).await;
    for _ in 0..3 {
        let p = app.recv_publish5().await;
        app.send5(v5::Packet::PubAck(v5::PubAck::new(p.pkid, None)))
            .await;
    }
    let text = scrape_until(http, |t| {
        value(t, "ferrymq_application_lag_messages", &[]) == 0.0
    })
    .await;
    assert_eq!(value(&text, "ferrymq_application_lag_messages", &[]), 0.0);
    assert_eq!(
        value(&text, "ferrymq_application_log_messages", &[]),
        3.0,
        "acknowledged entries stay until retention"
    );
    assert_eq!(
        value(
            &text,
            "ferrymq_connections",
            &[("listener", "tcp"), ("client_type", "application")]
        ),
        1.0
    );
    drop(app);
    drop(sub);
    server.shutdown().await;
}

#[tokio::test]
async fn metric_names_follow_prometheus_rules() {
    let (server, addr) = start_with(|_| {}).await;
    let (_c, _) = Raw::connect5(addr, "c", true, 0).await;
    let text = scrape(http_addr(&server)).await;
    let families = families(&text);
    assert!(families.len() >= 20, "{families:?}");
    for (name, kind) in &families {
        assert!(
            name.starts_with("ferrymq_"),
            "{name} lacks the ferrymq_ prefix"
        );
        assert!(
            name.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
            "{name}: snake_case only"
        );
        match kind.as_str() {
            "counter" => assert!(
                name.ends_with("_total"),
                "counter {name} must end in _total"
            ),
            "gauge" => assert!(
                !name.ends_with("_total"),
                "gauge {name} must not end in _total"
            ),
            "histogram" => assert!(
                name.ends_with("_seconds") || name.ends_with("_bytes"),
                "histogram {name} must be in base units"
            ),
            other => panic!("{name}: unexpected type {other}"),
        }
        for unit in ["_milliseconds", "_ms", "_kb", "_mb", "_minutes"] {
            assert!(!name.contains(unit), "{name}: use base units");
        }
    }
    // Every sample belongs to a declared family.
    for (name, _, _) in samples(&text) {
        let family = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| families.contains_key(*f)))
            .unwrap_or(&name);
        assert!(families.contains_key(family), "{name} has no # TYPE");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn grafana_dashboard_is_valid_json_and_queries_only_exported_metrics() {
    let (server, addr) = start_with(|_| {}).await;
    let (_c, _) = Raw::connect5(addr, "c", true, 0).await;
    let text = scrape(http_addr(&server)).await;
    let families = families(&text);
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/grafana/ferrymq-dashboard.json"
    );
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap())
        .expect("the dashboard is valid JSON");
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    assert!(exprs.len() >= 10, "{exprs:?}");
    let mut used = BTreeSet::new();
    for expr in &exprs {
        let mut rest = expr.as_str();
        while let Some(i) = rest.find("ferrymq_") {
            let name: String = rest[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[i + name.len()..];
            used.insert(name);
        }
    }
    assert!(!used.is_empty());
    for name in used {
        let family = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(&name);
        assert!(
            families.contains_key(family),
            "the dashboard queries {name}, which /metrics does not export"
        );
    }
    server.shutdown().await;
}

fn collect_exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                if k == "expr" {
                    if let Value::String(s) = v {
                        out.push(s.clone());
                    }
                }
                collect_exprs(v, out);
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

/// Delegates to the embedded storage, with a health check the test can fail.
struct FlakyStorage {
    inner: Arc<dyn ferrymq::storage::Storage>,
    healthy: Arc<AtomicBool>,
}

#[async_trait::async_trait]
impl ferrymq::storage::Storage for FlakyStorage {
    fn submit(&self, batch: ferrymq::storage::WriteBatch) -> ferrymq::storage::Completion {
        self.inner.submit(batch)
    }
    fn flush(&self) -> ferrymq::storage::Completion {
        self.inner.flush()
    }
    async fn load(&self) -> Result<ferrymq::storage::Snapshot, ferrymq::storage::StorageError> {
        self.inner.load().await
    }
    fn read_queue(
        &self,
        client: &Arc<str>,
        kind: ferrymq::storage::ClientKind,
        from: u64,
        limit: usize,
    ) -> ferrymq::storage::QueueRead {
        self.inner.read_queue(client, kind, from, limit)
    }
    async fn sweep(
        &self,
        now_ms: u64,
        budget: usize,
    ) -> Result<ferrymq::storage::SweepStats, ferrymq::storage::StorageError> {
        self.inner.sweep(now_ms, budget).await
    }
    fn health(&self) -> Result<(), ferrymq::storage::StorageError> {
        if self.healthy.load(Ordering::Acquire) {
            self.inner.health()
        } else {
            Err(ferrymq::storage::StorageError::engine_msg(
                "database unreachable (test)",
            ))
        }
    }
}

#[tokio::test]
async fn health_probes_follow_listeners_and_storage() {
    let mut config = Config::default();
    config.listeners[0].bind = "127.0.0.1:0".parse().unwrap();
    config.http.bind = "127.0.0.1:0".parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    config.data_dir = dir.path().to_path_buf();
    let metrics = Arc::new(ferrymq::metrics::Metrics::default());
    let embedded = ferrymq::storage::embedded::EmbeddedStorage::open(
        dir.path(),
        Default::default(),
        metrics.clone(),
    )
    .unwrap();
    let healthy = Arc::new(AtomicBool::new(true));
    let storage = Arc::new(FlakyStorage {
        inner: Arc::new(embedded),
        healthy: healthy.clone(),
    });
    let broker = ferrymq::broker::Broker::with_parts(
        config,
        Arc::new(ferrymq::auth::AllowAll),
        storage,
        metrics,
        None,
    );
    let server = Server::start_with(broker).await.unwrap();
    let http = http_addr(&server);

    let live = get(http, "/health/live").await;
    assert_eq!(live.status, 200);
    let ready = get(http, "/health/ready").await;
    assert_eq!(ready.status, 200, "{}", ready.body);
    assert_eq!(ready.json()["status"], "ready");

    healthy.store(false, Ordering::Release);
    let ready = get(http, "/health/ready").await;
    assert_eq!(ready.status, 503);
    let body = ready.json();
    assert_eq!(body["status"], "not ready");
    assert_eq!(body["checks"]["listeners"]["ready"], true);
    assert_eq!(body["checks"]["storage"]["ready"], false);
    assert!(
        body["checks"]["storage"]["reason"]
            .as_str()
            .unwrap()
            .contains("database unreachable"),
        "{body}"
    );
    assert_eq!(get(http, "/health/live").await.status, 200, "still alive");
    let text = scrape(http).await;
    assert_eq!(value(&text, "ferrymq_storage_healthy", &[]), 0.0);

    healthy.store(true, Ordering::Release);
    assert_eq!(get(http, "/health/ready").await.status, 200);
    assert_eq!(get(http, "/no/such/thing").await.status, 404);
    server.shutdown().await;
}

#[tokio::test]
async fn http_endpoint_can_be_disabled() {
    let (server, _) = start_with(|c| c.http.enabled = false).await;
    assert!(server.http_addr().is_none());
    server.shutdown().await;
}

#[tokio::test]
async fn admin_api_is_absent_without_a_token() {
    let (server, _) = start_with(|_| {}).await;
    let http = http_addr(&server);
    let r = admin(http, "GET", "/api/v1/sessions").await;
    assert_eq!(r.status, 404);
    assert!(r.json()["error"].as_str().unwrap().contains("disabled"));
    server.shutdown().await;
}

#[tokio::test]
async fn admin_api_requires_the_bearer_token() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let (server, _) = start_with(|c| c.http.admin_token_file = Some(token_file)).await;
    let http = http_addr(&server);
    let none = request(http, "GET", "/api/v1/sessions", None).await;
    assert_eq!(none.status, 401);
    assert!(none.headers.contains_key("www-authenticate"));
    let wrong = request(http, "GET", "/api/v1/sessions", Some("s3cret-admin-tokem")).await;
    assert_eq!(wrong.status, 401);
    let short = request(http, "GET", "/api/v1/sessions", Some("s3cret")).await;
    assert_eq!(short.status, 401);
    let right = admin(http, "GET", "/api/v1/sessions").await;
    assert_eq!(right.status, 200, "{}", right.body);
    assert_eq!(right.json()["sessions"], Value::Array(vec![]));
    // Metrics and probes stay open.
    assert_eq!(get(http, "/metrics").await.status, 200);
    server.shutdown().await;
}

#[tokio::test]
async fn admin_lists_inspects_kicks_and_deletes_sessions() {
    let (server, addr) = start_with(|c| {
        c.http.admin_token = Some(TOKEN.into());
        c.application_clients.push(ApplicationClientConfig {
            client_id: "app1".into(),
        });
    })
    .await;
    let http = http_addr(&server);
    // Offline persistent DEVICE session with 2 QoS 0 messages in memory for it.
    subscribe_and_leave(addr, "parked", QoS::AtLeastOnce).await;
    let (mut v5c, _) = Raw::connect5(addr, "v5-client", true, 600).await;
    v5c.subscribe5(1, filter5("a/+", QoS::AtLeastOnce), Some(7))
        .await;
    v5c.subscribe5(2, filter5("$share/g/b/#", QoS::AtMostOnce), None)
        .await;
    let (mut v3c, _) = Raw::connect4(addr, "v3-client", true).await;
    let (_app, _) = Raw::connect5(addr, "app1", true, 0).await;
    for _ in 0..2 {
        v3c.publish4("w/x", rumqttc::mqttbytes::QoS::AtMostOnce, 0, false, b"m")
            .await;
    }
    // v3c's own round trip proves its QoS 0 publishes were routed.
    v3c.send4(v4::Packet::PingReq).await;
    assert!(matches!(v3c.recv4().await, v4::Packet::PingResp));

    let all = admin(http, "GET", "/api/v1/sessions").await.json();
    let ids: Vec<&str> = all["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["client_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["app1", "parked", "v3-client", "v5-client"], "sorted");
    assert_eq!(all["next"], Value::Null);

    let page1 = admin(http, "GET", "/api/v1/sessions?limit=2").await.json();
    assert_eq!(page1["sessions"].as_array().unwrap().len(), 2);
    assert_eq!(page1["next"], "parked");
    let page2 = admin(http, "GET", "/api/v1/sessions?limit=2&after=parked")
        .await
        .json();
    assert_eq!(page2["sessions"][0]["client_id"], "v3-client");
    assert_eq!(page2["next"], Value::Null);
    assert_eq!(
        admin(http, "GET", "/api/v1/sessions?limit=5000")
            .await
            .status,
        400
    );

    let offline = admin(http, "GET", "/api/v1/sessions?connected=false")
        .await
        .json();
    assert_eq!(offline["sessions"].as_array().unwrap().len(), 1);
    assert_eq!(offline["sessions"][0]["client_id"], "parked");
    assert_eq!(offline["sessions"][0]["queued_messages"], 2);
    assert_eq!(offline["sessions"][0]["subscription_count"], 1);
    let apps = admin(http, "GET", "/api/v1/sessions?client_type=application")
        .await
        .json();
    assert_eq!(apps["sessions"].as_array().unwrap().len(), 1);
    assert_eq!(apps["sessions"][0]["client_id"], "app1");
    assert_eq!(apps["sessions"][0]["session_expiry_secs"], "never");
    assert_eq!(
        admin(http, "GET", "/api/v1/sessions?client_type=robot")
            .await
            .status,
        400
    );

    let one = admin(http, "GET", "/api/v1/sessions/v5-client").await;
    assert_eq!(one.status, 200, "{}", one.body);
    let one = one.json();
    assert_eq!(one["connected"], true);
    assert_eq!(one["client_type"], "device");
    assert_eq!(one["persistent"], true);
    assert_eq!(one["session_expiry_secs"], 600);
    assert_eq!(one["connection"]["protocol"], "5.0");
    assert_eq!(one["connection"]["listener"], "tcp");
    let subs = one["subscriptions"].as_array().unwrap();
    assert_eq!(subs.len(), 2, "{one}");
    assert_eq!(subs[0]["filter"], "$share/g/b/#");
    assert_eq!(subs[0]["share_group"], "g");
    assert_eq!(subs[1]["filter"], "a/+");
    assert_eq!(subs[1]["qos"], 1);
    assert_eq!(subs[1]["subscription_identifier"], 7);
    assert_eq!(
        admin(http, "GET", "/api/v1/sessions/nobody").await.status,
        404
    );

    let subs = admin(http, "GET", "/api/v1/subscriptions?limit=2")
        .await
        .json();
    assert_eq!(subs["subscriptions"].as_array().unwrap().len(), 2);
    let next = subs["next"].as_str().unwrap().to_string();
    let rest = admin(
        http,
        "GET",
        &format!("/api/v1/subscriptions?after={}", urlencode(&next)),
    )
    .await
    .json();
    assert_eq!(rest["subscriptions"].as_array().unwrap().len(), 1);
    assert_eq!(rest["next"], Value::Null);
    let mine = admin(http, "GET", "/api/v1/subscriptions?client_id=parked")
        .await
        .json();
    assert_eq!(mine["subscriptions"][0]["filter"], "w/#");

    // Kick the v5 client: it is told 0x98, its persistent session stays, offline.
    let kicked = admin(http, "POST", "/api/v1/sessions/v5-client/kick").await;
    assert_eq!(kicked.status, 200, "{}", kicked.body);
    let d = v5c.expect_disconnect5().await;
    assert_eq!(
        d.reason_code,
        v5::DisconnectReasonCode::AdministrativeAction
    );
    let after = admin(http, "GET", "/api/v1/sessions/v5-client")
        .await
        .json();
    assert_eq!(after["connected"], false);
    // The v3 client has no DISCONNECT to receive: its socket closes, its clean session ends.
    assert_eq!(
        admin(http, "POST", "/api/v1/sessions/v3-client/kick")
            .await
            .status,
        200
    );
    assert!(v3c.closed_within(WAIT).await.is_some());
    assert_eq!(
        admin(http, "GET", "/api/v1/sessions/v3-client")
            .await
            .status,
        404
    );
    // Only connected clients can be kicked.
    assert_eq!(
        admin(http, "POST", "/api/v1/sessions/parked/kick")
            .await
            .status,
        404
    );
    let text = scrape(http).await;
    assert_eq!(
        value(
            &text,
            "ferrymq_disconnects_total",
            &[("reason", "administrative")]
        ),
        2.0
    );

    // Deleting ends the session for good; the client reconnects to a fresh one.
    assert_eq!(
        admin(http, "DELETE", "/api/v1/sessions/v5-client")
            .await
            .status,
        204
    );
    assert_eq!(
        admin(http, "GET", "/api/v1/sessions/v5-client")
            .await
            .status,
        404
    );
    assert_eq!(
        admin(http, "DELETE", "/api/v1/sessions/v5-client")
            .await
            .status,
        404
    );
    let (_again, ack) = Raw::connect5(addr, "v5-client", false, 600).await;
    assert!(!ack.session_present, "the deleted session is gone");
    let mine = admin(http, "GET", "/api/v1/subscriptions?client_id=v5-client")
        .await
        .json();
    assert_eq!(mine["subscriptions"], Value::Array(vec![]));
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

#[tokio::test]
async fn admin_lists_and_deletes_retained_messages() {
    let (server, addr) = start_with(|c| c.http.admin_token = Some(TOKEN.into())).await;
    let http = http_addr(&server);
    let (mut p, _) = Raw::connect5(addr, "p", true, 0).await;
    for (i, topic) in ["r/b", "r/a", "$sys/x", "other/c"].iter().enumerate() {
        p.publish5(publish5_packet(
            topic,
            QoS::AtLeastOnce,
            i as u16 + 1,
            true,
            format!("v{i}").as_bytes(),
        ))
        .await;
        assert!(matches!(p.recv5().await, v5::Packet::PubAck(_)));
    }
    let all = admin(http, "GET", "/api/v1/retained").await.json();
    let topics: Vec<&str> = all["retained"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["topic"].as_str().unwrap())
        .collect();
    assert_eq!(topics, ["$sys/x", "other/c", "r/a", "r/b"]);
    assert_eq!(all["retained"][2]["payload"], "v1");
    assert_eq!(all["retained"][2]["payload_bytes"], 2);
    assert_eq!(all["retained"][2]["publisher"], "p");

    let page = admin(http, "GET", "/api/v1/retained?prefix=r/&limit=1")
        .await
        .json();
    assert_eq!(page["retained"][0]["topic"], "r/a");
    assert_eq!(page["next"], "r/a");
    let page = admin(
        http,
        "GET",
        "/api/v1/retained?prefix=r/&limit=1&after=r%2Fa",
    )
    .await
    .json();
    assert_eq!(page["retained"][0]["topic"], "r/b");
    assert_eq!(page["next"], Value::Null);

    assert_eq!(
        admin(http, "DELETE", "/api/v1/retained?topic=r%2Fa")
            .await
            .status,
        204
    );
    assert_eq!(
        admin(http, "DELETE", "/api/v1/retained?topic=r%2Fa")
            .await
            .status,
        404
    );
    assert_eq!(admin(http, "DELETE", "/api/v1/retained").await.status, 400);
    // A new subscriber gets only what is left.
    let (mut s, _) = Raw::connect5(addr, "s", true, 0).await;
    s.subscribe5(1, filter5("r/#", QoS::AtMostOnce), None).await;
    let got = s.recv_publish5().await;
    assert_eq!(&got.topic[..], b"r/b");
    assert!(s.recv5_within(common::QUIET).await.is_none());
    let text = scrape(http).await;
    assert_eq!(value(&text, "ferrymq_retained_messages", &[]), 3.0);
    server.shutdown().await;
}

#[tokio::test]
async fn admin_kick_ends_a_clean_session() {
    let (server, addr) = start_with(|c| c.http.admin_token = Some(TOKEN.into())).await;
    let http = http_addr(&server);
    let (mut c, _) = Raw::connect5_with(addr, connect5_packet("k", true, 0), None).await;
    assert_eq!(
        admin(http, "POST", "/api/v1/sessions/k/kick").await.status,
        200
    );
    assert_eq!(
        c.expect_disconnect5().await.reason_code,
        v5::DisconnectReasonCode::AdministrativeAction
    );
    assert_eq!(
        admin(http, "POST", "/api/v1/sessions/k/kick").await.status,
        404,
        "a clean session ends with its connection"
    );
    server.shutdown().await;
}
