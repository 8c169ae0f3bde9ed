//! Broker counters and gauges, exported in Prometheus text format by [`crate::http`].
//!
//! Every metric is a `prometheus` type registered in a per-broker [`Registry`] (not the process
//! global one, so several brokers in one test process do not collide). Hot paths hold
//! pre-resolved children (`IntCounter` is one relaxed atomic add), never a `with_label_values`
//! lookup per message. The [`Counter`] and [`Gauge`] wrappers keep the small `inc`/`add`/`set`
//! API the data path was written against.
//!
//! Gauges that describe state the broker already holds (subscriptions, queue depths, storage
//! health) are not tracked here: [`crate::http::metrics`] computes them at scrape time.
//! See docs/metrics.md for the full reference.

use std::sync::Arc;
use std::time::Instant;

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

use crate::protocol::QoS;
use crate::storage::ClientKind;

/// A monotonically increasing count.
#[derive(Clone)]
pub struct Counter(IntCounter);

impl Counter {
    pub fn inc(&self) {
        self.0.inc();
    }
    pub fn add(&self, n: u64) {
        self.0.inc_by(n);
    }
    pub fn get(&self) -> u64 {
        self.0.get()
    }
}

/// A value that goes up and down.
#[derive(Clone)]
pub struct Gauge(IntGauge);

impl Gauge {
    pub fn inc(&self) {
        self.0.inc();
    }
    pub fn dec(&self) {
        self.0.dec();
    }
    pub fn set(&self, v: u64) {
        self.0.set(i64::try_from(v).unwrap_or(i64::MAX));
    }
    pub fn get(&self) -> u64 {
        u64::try_from(self.0.get()).unwrap_or(0)
    }
}

/// One counter per QoS level, resolved once.
#[derive(Clone)]
pub struct ByQos([IntCounter; 3]);

impl ByQos {
    pub fn inc(&self, qos: QoS) {
        self.0[qos_index(qos)].inc();
    }
    pub fn get(&self, qos: QoS) -> u64 {
        self.0[qos_index(qos)].get()
    }
}

fn qos_index(qos: QoS) -> usize {
    match qos {
        QoS::AtMostOnce => 0,
        QoS::AtLeastOnce => 1,
        QoS::ExactlyOnce => 2,
    }
}

/// How a connection attempt ended (`ferrymq_connects_total{result}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectResult {
    Accepted,
    /// Turned away at accept: `limits.max_connections` reached.
    OverConnectionLimit,
    /// No CONNECT within `limits.connect_timeout_secs`, or the peer left before sending one.
    NoConnect,
    /// The PROXY header, TLS handshake or WebSocket upgrade failed or did not finish in time
    /// (`ferrymq_handshake_failures_total` says which).
    HandshakeFailed,
    ProtocolError,
    UnsupportedProtocolVersion,
    ClientIdRejected,
    BadCredentials,
    NotAuthorized,
    BadAuthenticationMethod,
    TopicNameInvalid,
    ServerBusy,
    ServerUnavailable,
    QuotaExceeded,
    ConnectionRateExceeded,
    Banned,
    Other,
}

impl ConnectResult {
    pub const ALL: [ConnectResult; 17] = [
        ConnectResult::Accepted,
        ConnectResult::OverConnectionLimit,
        ConnectResult::NoConnect,
        ConnectResult::HandshakeFailed,
        ConnectResult::ProtocolError,
        ConnectResult::UnsupportedProtocolVersion,
        ConnectResult::ClientIdRejected,
        ConnectResult::BadCredentials,
        ConnectResult::NotAuthorized,
        ConnectResult::BadAuthenticationMethod,
        ConnectResult::TopicNameInvalid,
        ConnectResult::ServerBusy,
        ConnectResult::ServerUnavailable,
        ConnectResult::QuotaExceeded,
        ConnectResult::ConnectionRateExceeded,
        ConnectResult::Banned,
        ConnectResult::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ConnectResult::Accepted => "accepted",
            ConnectResult::OverConnectionLimit => "over_connection_limit",
            ConnectResult::NoConnect => "no_connect",
            ConnectResult::HandshakeFailed => "handshake_failed",
            ConnectResult::ProtocolError => "protocol_error",
            ConnectResult::UnsupportedProtocolVersion => "unsupported_protocol_version",
            ConnectResult::ClientIdRejected => "client_id_rejected",
            ConnectResult::BadCredentials => "bad_credentials",
            ConnectResult::NotAuthorized => "not_authorized",
            ConnectResult::BadAuthenticationMethod => "bad_authentication_method",
            ConnectResult::TopicNameInvalid => "topic_name_invalid",
            ConnectResult::ServerBusy => "server_busy",
            ConnectResult::ServerUnavailable => "server_unavailable",
            ConnectResult::QuotaExceeded => "quota_exceeded",
            ConnectResult::ConnectionRateExceeded => "connection_rate_exceeded",
            ConnectResult::Banned => "banned",
            ConnectResult::Other => "other",
        }
    }
}

/// Why an established MQTT connection ended (`ferrymq_disconnects_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisconnectReason {
    /// DISCONNECT from the client (any reason code).
    Client,
    /// The socket closed or failed without DISCONNECT, or the client left output unread.
    ConnectionLost,
    KeepAliveTimeout,
    /// Malformed or illegal input from the client.
    ProtocolError,
    /// A storage failure the connection could not report otherwise.
    ServerError,
    TakenOver,
    /// Kicked through the admin API.
    Administrative,
    Shutdown,
    /// Over `limits.max_publish_rate` (v5 DISCONNECT 0x96).
    PublishRateExceeded,
}

impl DisconnectReason {
    pub const ALL: [DisconnectReason; 9] = [
        DisconnectReason::Client,
        DisconnectReason::ConnectionLost,
        DisconnectReason::KeepAliveTimeout,
        DisconnectReason::ProtocolError,
        DisconnectReason::ServerError,
        DisconnectReason::TakenOver,
        DisconnectReason::Administrative,
        DisconnectReason::Shutdown,
        DisconnectReason::PublishRateExceeded,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DisconnectReason::Client => "client",
            DisconnectReason::ConnectionLost => "connection_lost",
            DisconnectReason::KeepAliveTimeout => "keep_alive_timeout",
            DisconnectReason::ProtocolError => "protocol_error",
            DisconnectReason::ServerError => "server_error",
            DisconnectReason::TakenOver => "taken_over",
            DisconnectReason::Administrative => "administrative",
            DisconnectReason::Shutdown => "shutdown",
            DisconnectReason::PublishRateExceeded => "publish_rate_exceeded",
        }
    }
}

/// A PUBLISH (or will) refused by an ACL: one denial and one dropped message.
#[derive(Clone)]
pub struct AclDrop {
    denied: IntCounter,
    dropped: IntCounter,
}

impl AclDrop {
    pub fn inc(&self) {
        self.denied.inc();
        self.dropped.inc();
    }
    pub fn get(&self) -> u64 {
        self.denied.get()
    }
}

/// Failed authentications by reason, counted by the authentication providers.
#[derive(Clone)]
pub struct AuthFailures {
    pub bad_credentials: Counter,
    pub not_authorized: Counter,
    pub rate_limited: Counter,
}

impl AuthFailures {
    /// Refused credentials of either kind (rate-limited attempts are not counted here).
    pub fn get(&self) -> u64 {
        self.bad_credentials.get() + self.not_authorized.get()
    }
}

/// The step before CONNECT that failed (`ferrymq_handshake_failures_total{stage}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeStage {
    /// Missing, malformed or unsupported PROXY protocol header.
    ProxyHeader,
    /// TLS handshake, including refused client certificates.
    Tls,
    /// WebSocket upgrade (wrong path, no `mqtt` subprotocol, not an upgrade request).
    WebSocket,
    /// PROXY header, TLS and WebSocket handshakes not done within `limits.connect_timeout_secs`.
    Timeout,
}

impl HandshakeStage {
    pub const ALL: [HandshakeStage; 4] = [
        HandshakeStage::ProxyHeader,
        HandshakeStage::Tls,
        HandshakeStage::WebSocket,
        HandshakeStage::Timeout,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            HandshakeStage::ProxyHeader => "proxy_header",
            HandshakeStage::Tls => "tls",
            HandshakeStage::WebSocket => "websocket",
            HandshakeStage::Timeout => "timeout",
        }
    }
}

/// Per-listener gauges and counters, resolved when the listener binds.
pub struct ListenerMetrics {
    pub name: String,
    /// Open network connections, including those still in a handshake or before CONNECT.
    pub network_connections: Gauge,
    connected: [IntGauge; 2],
    handshake_failures: [IntCounter; 4],
    /// Connections accepted over `limits.max_connection_rate` (their CONNECT is refused).
    pub connection_rate_limited: Counter,
    /// TLS certificate reloads that took effect / changed files that could not be loaded.
    pub tls_reloads: Counter,
    pub tls_reload_failures: Counter,
}

impl ListenerMetrics {
    /// Counts an accepted network connection as open until the guard is dropped.
    pub fn network_connection(&self) -> ConnectedGuard {
        self.network_connections.0.inc();
        ConnectedGuard(self.network_connections.0.clone())
    }

    pub fn handshake_failed(&self, stage: HandshakeStage) {
        // `ALL` lists the variants in declaration order (checked by a test).
        self.handshake_failures[stage as usize].inc();
    }

    pub fn handshake_failures(&self, stage: HandshakeStage) -> u64 {
        self.handshake_failures[stage as usize].get()
    }

    /// Counts a client as connected on this listener until the guard is dropped.
    pub fn connected(&self, kind: ClientKind) -> ConnectedGuard {
        let gauge = self.connected[kind_index(kind)].clone();
        gauge.inc();
        ConnectedGuard(gauge)
    }
}

/// Decrements the connected-clients gauge when the connection ends, however it ends.
pub struct ConnectedGuard(IntGauge);

impl Drop for ConnectedGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

fn kind_index(kind: ClientKind) -> usize {
    match kind {
        ClientKind::Device => 0,
        ClientKind::Application => 1,
    }
}

/// Every metric the broker keeps.
pub struct Metrics {
    registry: Registry,
    network_connections: IntGaugeVec,
    connections: IntGaugeVec,
    connects: [IntCounter; 17],
    disconnects: [IntCounter; 9],
    handshake_failures: IntCounterVec,
    connections_rate_limited: IntCounterVec,
    tls_reloads: IntCounterVec,
    /// Accepted TCP connections closed at once because `limits.max_connections` was reached.
    pub connections_refused: Counter,
    /// Clients disconnected for exceeding `limits.max_publish_rate`: the same series as
    /// `ferrymq_disconnects_total{reason="publish_rate_exceeded"}`.
    pub publish_rate_limited: Counter,
    pub sessions: Gauge,
    /// PUBLISH packets received from clients, by their QoS.
    pub messages_received: ByQos,
    /// PUBLISH packets sent to clients, by the delivery QoS.
    pub messages_sent: ByQos,
    pub messages_dropped_queue_full: Counter,
    pub messages_dropped_expired: Counter,
    pub messages_dropped_too_large: Counter,
    pub messages_dropped_no_subscribers: Counter,
    pub retained_messages: Gauge,
    pub protocol_errors: Counter,
    pub bytes_received: Counter,
    pub bytes_sent: Counter,
    /// Messages written to DEVICE queues / APPLICATION logs.
    pub device_messages_stored: Counter,
    pub application_messages_stored: Counter,
    /// Oldest entries removed because a DEVICE queue hit its limit / a log its size retention.
    pub device_messages_trimmed: Counter,
    pub application_messages_trimmed: Counter,
    /// Entries removed because their TTL / retention age passed.
    pub device_messages_expired: Counter,
    pub application_messages_expired: Counter,
    /// Storage writes a connection waited for that failed (nothing was acknowledged for them).
    pub storage_errors: Counter,
    /// 1 while this cluster node is fenced (cut off from Kafka or PostgreSQL), else 0.
    pub fenced: Gauge,
    /// Session writes refused because a newer connection owns the session (cluster).
    pub session_writes_refused: Counter,
    /// Delayed wills published and sessions expired by this node's share of the cluster timers.
    pub session_timers_fired: Counter,
    /// Failed reads of a DEVICE queue or APPLICATION log.
    pub storage_read_errors: Counter,
    pub auth_failures: AuthFailures,
    /// The same series as `auth_failures.rate_limited`.
    pub auth_rate_limited: Counter,
    /// PUBLISHes (and wills) refused by an ACL: `ferrymq_acl_denials_total{action="publish"}`
    /// and `ferrymq_messages_dropped_total{reason="acl_denied"}`.
    pub messages_dropped_acl: AclDrop,
    /// Subscription filters refused by an ACL.
    pub subscriptions_denied_acl: Counter,
    /// From PUBLISH received to PUBACK/PUBREC put on the wire (QoS 1/2, successful acks only).
    pub publish_ack_latency: Histogram,
    /// Kafka log records deleted by retention before ferrymq read them (lost to their readers).
    pub kafka_log_gaps: Counter,
    /// Kafka consumers replaced because they stopped fetching (`reader` = router, local,
    /// directory).
    pub kafka_consumer_rebuilds: IntCounterVec,
    /// What the publish log's topic offers acks=all (see [`KafkaReplication`]).
    pub kafka_replication: KafkaReplication,
}

/// The replication of the publish log topic as last described: whether an acknowledged
/// PUBLISH survives the loss of a Kafka broker.
#[derive(Clone)]
pub struct KafkaReplication {
    pub replication_factor: Gauge,
    pub min_insync_replicas: Gauge,
    /// Partitions whose in-sync replicas are fewer than their replicas.
    pub under_replicated_partitions: Gauge,
    /// Partitions whose in-sync replicas are fewer than `min.insync.replicas`: appends to them
    /// fail (NOT_ENOUGH_REPLICAS) and publishers get no ack.
    pub under_min_isr_partitions: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// Buckets for the publish-to-ack latency: 100 µs (in-memory ack) up to 10 s (a stalled disk).
const ACK_LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Builds and registers the metrics. The definitions are constants, so a failure here is a
/// programming error caught by every test that starts a broker, never a runtime condition.
struct Builder {
    registry: Registry,
}

impl Builder {
    fn counter(&self, name: &str, help: &str) -> IntCounter {
        let c = IntCounter::new(name, help).expect("valid metric definition");
        self.registry
            .register(Box::new(c.clone()))
            .expect("unique metric name");
        c
    }

    fn counter_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition");
        self.registry
            .register(Box::new(c.clone()))
            .expect("unique metric name");
        c
    }

    fn gauge(&self, name: &str, help: &str) -> IntGauge {
        let g = IntGauge::new(name, help).expect("valid metric definition");
        self.registry
            .register(Box::new(g.clone()))
            .expect("unique metric name");
        g
    }

    fn gauge_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric definition");
        self.registry
            .register(Box::new(g.clone()))
            .expect("unique metric name");
        g
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let b = Builder {
            registry: Registry::new(),
        };
        let build_info = b.gauge_vec(
            "ferrymq_build_info",
            "Always 1; the label carries the broker version.",
            &["version"],
        );
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let network_connections = b.gauge_vec(
            "ferrymq_network_connections",
            "Open network connections per listener, including those that have not sent CONNECT yet.",
            &["listener"],
        );
        let connections = b.gauge_vec(
            "ferrymq_connections",
            "Connected MQTT clients (CONNECT accepted) per listener and client type.",
            &["listener", "client_type"],
        );
        let connects = b.counter_vec(
            "ferrymq_connects_total",
            "Connection attempts by result: accepted, or why they were refused.",
            &["result"],
        );
        let connections_refused =
            Counter(connects.with_label_values(&[ConnectResult::OverConnectionLimit.as_str()]));
        let connects = ConnectResult::ALL.map(|r| connects.with_label_values(&[r.as_str()]));
        let disconnects_vec = b.counter_vec(
            "ferrymq_disconnects_total",
            "Ended MQTT connections (after CONNECT was accepted) by reason.",
            &["reason"],
        );
        let disconnects =
            DisconnectReason::ALL.map(|r| disconnects_vec.with_label_values(&[r.as_str()]));
        let publish_rate_limited = Counter(
            disconnects_vec.with_label_values(&[DisconnectReason::PublishRateExceeded.as_str()]),
        );
        let handshake_failures = b.counter_vec(
            "ferrymq_handshake_failures_total",
            "Connections closed before CONNECT because the PROXY header, TLS handshake or WebSocket upgrade failed or timed out, per listener and stage.",
            &["listener", "stage"],
        );
        let connections_rate_limited = b.counter_vec(
            "ferrymq_connections_rate_limited_total",
            "Connections over limits.max_connection_rate, per listener: their CONNECT is refused (v5 0x9F, v3 0x03).",
            &["listener"],
        );
        let tls_reloads = b.counter_vec(
            "ferrymq_tls_certificate_reloads_total",
            "Changed TLS certificate files per listener: loaded (success) or not loadable, old certificate kept (failure).",
            &["listener", "result"],
        );
        let received = b.counter_vec(
            "ferrymq_messages_received_total",
            "PUBLISH packets received from clients, by QoS.",
            &["qos"],
        );
        let sent = b.counter_vec(
            "ferrymq_messages_sent_total",
            "PUBLISH packets sent to clients, by delivery QoS (first sends, not resends).",
            &["qos"],
        );
        let by_qos = |v: &IntCounterVec| {
            ByQos([
                v.with_label_values(&["0"]),
                v.with_label_values(&["1"]),
                v.with_label_values(&["2"]),
            ])
        };
        let dropped = b.counter_vec(
            "ferrymq_messages_dropped_total",
            "Messages not delivered (per subscriber, except no_subscribers and acl_denied which count per PUBLISH), by reason.",
            &["reason"],
        );
        let drop = |reason: &str| Counter(dropped.with_label_values(&[reason]));
        let stored = b.counter_vec(
            "ferrymq_stored_messages_total",
            "Entries written to DEVICE queues and APPLICATION logs (one per persistent subscriber).",
            &["client_type"],
        );
        let trimmed = b.counter_vec(
            "ferrymq_stored_messages_trimmed_total",
            "Oldest stored entries removed by device.queue_limit or application.retention_bytes.",
            &["client_type"],
        );
        let expired = b.counter_vec(
            "ferrymq_stored_messages_expired_total",
            "Stored entries removed by TTL, message expiry or application.retention_secs.",
            &["client_type"],
        );
        let per_kind =
            |v: &IntCounterVec, kind: ClientKind| Counter(v.with_label_values(&[kind.as_str()]));
        let storage_errors = b.counter_vec(
            "ferrymq_storage_errors_total",
            "Failed storage operations a client depended on (nothing was acknowledged for a failed write).",
            &["operation"],
        );
        let auth = b.counter_vec(
            "ferrymq_auth_failures_total",
            "Failed authentication attempts by reason.",
            &["reason"],
        );
        let acl = b.counter_vec(
            "ferrymq_acl_denials_total",
            "Operations refused by an ACL, by action.",
            &["action"],
        );
        let publish_ack_latency = Histogram::with_opts(
            HistogramOpts::new(
                "ferrymq_publish_ack_latency_seconds",
                "Time from a QoS 1/2 PUBLISH received to its PUBACK/PUBREC written to the output (includes the durable write).",
            )
            .buckets(ACK_LATENCY_BUCKETS.to_vec()),
        )
        .expect("valid metric definition");
        b.registry
            .register(Box::new(publish_ack_latency.clone()))
            .expect("unique metric name");
        Metrics {
            network_connections,
            connections,
            connects,
            disconnects,
            handshake_failures,
            connections_rate_limited,
            tls_reloads,
            connections_refused,
            publish_rate_limited,
            sessions: Gauge(b.gauge(
                "ferrymq_sessions",
                "Sessions held by this node, connected or not (persistent sessions survive their connection).",
            )),
            messages_received: by_qos(&received),
            messages_sent: by_qos(&sent),
            messages_dropped_queue_full: drop("queue_full"),
            messages_dropped_expired: drop("expired"),
            messages_dropped_too_large: drop("too_large"),
            messages_dropped_no_subscribers: drop("no_subscribers"),
            fenced: Gauge(b.gauge(
                "ferrymq_cluster_fenced",
                "1 while this cluster node is fenced: it could not reach Kafka or PostgreSQL for cluster.fence_after_secs, so it serves no client.",
            )),
            session_writes_refused: Counter(b.counter(
                "ferrymq_cluster_session_writes_refused_total",
                "Batches of session writes refused because another connection took the session over since (its owner epoch is newer): a node that lost a session writes nothing to it.",
            )),
            session_timers_fired: Counter(b.counter(
                "ferrymq_cluster_session_timers_fired_total",
                "Session timers (delayed wills, session expiry) this node fired for the cluster; each timer fires on one node.",
            )),
            retained_messages: Gauge(b.gauge(
                "ferrymq_retained_messages",
                "Retained messages held (one per topic).",
            )),
            protocol_errors: Counter(b.counter(
                "ferrymq_protocol_errors_total",
                "Connections closed for malformed or illegal client input.",
            )),
            bytes_received: Counter(b.counter(
                "ferrymq_received_bytes_total",
                "Bytes read from MQTT client connections after CONNECT.",
            )),
            bytes_sent: Counter(b.counter(
                "ferrymq_sent_bytes_total",
                "Bytes written to MQTT client connections after CONNACK.",
            )),
            device_messages_stored: per_kind(&stored, ClientKind::Device),
            application_messages_stored: per_kind(&stored, ClientKind::Application),
            device_messages_trimmed: per_kind(&trimmed, ClientKind::Device),
            application_messages_trimmed: per_kind(&trimmed, ClientKind::Application),
            device_messages_expired: per_kind(&expired, ClientKind::Device),
            application_messages_expired: per_kind(&expired, ClientKind::Application),
            storage_errors: Counter(storage_errors.with_label_values(&["write"])),
            storage_read_errors: Counter(storage_errors.with_label_values(&["read"])),
            auth_failures: AuthFailures {
                bad_credentials: Counter(auth.with_label_values(&["bad_credentials"])),
                not_authorized: Counter(auth.with_label_values(&["not_authorized"])),
                rate_limited: Counter(auth.with_label_values(&["rate_limited"])),
            },
            auth_rate_limited: Counter(auth.with_label_values(&["rate_limited"])),
            messages_dropped_acl: AclDrop {
                denied: acl.with_label_values(&["publish"]),
                dropped: dropped.with_label_values(&["acl_denied"]),
            },
            subscriptions_denied_acl: Counter(acl.with_label_values(&["subscribe"])),
            publish_ack_latency,
            kafka_log_gaps: Counter(b.counter(
                "ferrymq_kafka_log_gap_records_total",
                "Kafka log records deleted by retention before ferrymq read them; lost to their readers.",
            )),
            kafka_consumer_rebuilds: b.counter_vec(
                "ferrymq_kafka_consumer_rebuilds_total",
                "Kafka consumers replaced because they fetched nothing while records waited, or stayed out of their group (reader: router, local, directory).",
                &["reader"],
            ),
            kafka_replication: KafkaReplication {
                replication_factor: Gauge(b.gauge(
                    "ferrymq_kafka_publish_log_replication_factor",
                    "Replicas of each partition of the publish log topic (Kafka + PostgreSQL backend).",
                )),
                min_insync_replicas: Gauge(b.gauge(
                    "ferrymq_kafka_publish_log_min_insync_replicas",
                    "min.insync.replicas of the publish log topic: the replicas acks=all waits for. Below 2, one Kafka broker failure can lose acknowledged messages.",
                )),
                under_replicated_partitions: Gauge(b.gauge(
                    "ferrymq_kafka_publish_log_under_replicated_partitions",
                    "Partitions of the publish log with fewer in-sync replicas than replicas.",
                )),
                under_min_isr_partitions: Gauge(b.gauge(
                    "ferrymq_kafka_publish_log_under_min_isr_partitions",
                    "Partitions of the publish log with fewer in-sync replicas than min.insync.replicas: publishes to them fail.",
                )),
            },
            registry: b.registry,
        }
    }

    /// The registry the HTTP endpoint gathers from.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The gauges of listener `name` (created on first use; a listener resolves them once).
    pub fn listener(&self, name: &str) -> Arc<ListenerMetrics> {
        Arc::new(ListenerMetrics {
            name: name.to_string(),
            network_connections: Gauge(self.network_connections.with_label_values(&[name])),
            connected: [
                self.connections
                    .with_label_values(&[name, ClientKind::Device.as_str()]),
                self.connections
                    .with_label_values(&[name, ClientKind::Application.as_str()]),
            ],
            handshake_failures: HandshakeStage::ALL.map(|s| {
                self.handshake_failures
                    .with_label_values(&[name, s.as_str()])
            }),
            connection_rate_limited: Counter(
                self.connections_rate_limited.with_label_values(&[name]),
            ),
            tls_reloads: Counter(self.tls_reloads.with_label_values(&[name, "success"])),
            tls_reload_failures: Counter(self.tls_reloads.with_label_values(&[name, "failure"])),
        })
    }

    /// Counts the outcome of a connection attempt.
    pub fn connect_result(&self, result: ConnectResult) {
        // `ALL` lists the variants in declaration order (checked by a test).
        self.connects[result as usize].inc();
    }

    /// How many connection attempts ended with `result`.
    pub fn connects(&self, result: ConnectResult) -> u64 {
        self.connects[result as usize].get()
    }

    /// Counts the end of an established connection.
    pub fn disconnect(&self, reason: DisconnectReason) {
        self.disconnects[reason as usize].inc();
    }

    /// Records a PUBACK/PUBREC leaving for a PUBLISH received at `received`.
    pub fn observe_ack(&self, received: Instant) {
        self.publish_ack_latency
            .observe(received.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_tables_are_in_declaration_order() {
        for (i, r) in ConnectResult::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{r:?}");
        }
        for (i, r) in DisconnectReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{r:?}");
        }
        for (i, s) in HandshakeStage::ALL.iter().enumerate() {
            assert_eq!(*s as usize, i, "{s:?}");
        }
    }

    #[test]
    fn counters_land_in_their_labelled_series() {
        let m = Metrics::new();
        m.connect_result(ConnectResult::BadCredentials);
        m.disconnect(DisconnectReason::Administrative);
        m.messages_received.inc(QoS::ExactlyOnce);
        m.messages_dropped_acl.inc();
        m.auth_rate_limited.inc();
        m.publish_rate_limited.inc();
        let l = m.listener("tls");
        l.handshake_failed(HandshakeStage::WebSocket);
        l.connection_rate_limited.inc();
        l.tls_reload_failures.inc();
        let text = {
            let mut out = Vec::new();
            prometheus::Encoder::encode(
                &prometheus::TextEncoder::new(),
                &m.registry().gather(),
                &mut out,
            )
            .unwrap();
            String::from_utf8(out).unwrap()
        };
        for line in [
            "ferrymq_connects_total{result=\"bad_credentials\"} 1",
            "ferrymq_disconnects_total{reason=\"administrative\"} 1",
            "ferrymq_messages_received_total{qos=\"2\"} 1",
            "ferrymq_messages_dropped_total{reason=\"acl_denied\"} 1",
            "ferrymq_acl_denials_total{action=\"publish\"} 1",
            "ferrymq_auth_failures_total{reason=\"rate_limited\"} 1",
            "ferrymq_disconnects_total{reason=\"publish_rate_exceeded\"} 1",
            "ferrymq_handshake_failures_total{listener=\"tls\",stage=\"websocket\"} 1",
            "ferrymq_handshake_failures_total{listener=\"tls\",stage=\"tls\"} 0",
            "ferrymq_connections_rate_limited_total{listener=\"tls\"} 1",
            "ferrymq_tls_certificate_reloads_total{listener=\"tls\",result=\"failure\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
    }
}
