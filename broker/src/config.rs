//! Configuration: a TOML file, then `FERRYMQ_…` environment overrides, then command-line flags,
//! validated once at start so that a bad value is reported with the key that holds it.
//!
//! Environment overrides name a key path with `__` between levels:
//! `FERRYMQ_LIMITS__MAX_PACKET_SIZE=65536` sets `[limits] max_packet_size`. Values are parsed as
//! TOML scalars (integers, booleans, floats) and fall back to strings, so
//! `FERRYMQ_DATA_DIR=/var/lib/ferrymq` works without quoting. `FERRYMQ_LISTEN` is a comma-separated
//! list of addresses that replaces the configured TCP listeners, like the `--listen` flag.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Prefix of every environment override.
pub const ENV_PREFIX: &str = "FERRYMQ_";

/// Why a configuration could not be loaded. Every message names the offending key or source.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
    #[error("key `{key}`: {message}")]
    Key { key: String, message: String },
}

/// The whole broker configuration. Every field has a default, so an empty file is valid.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where the embedded storage keeps its files.
    pub data_dir: PathBuf,
    /// TCP listeners. One port serves MQTT 3.1, 3.1.1 and 5.0.
    pub listeners: Vec<ListenerConfig>,
    pub limits: Limits,
    pub session: SessionConfig,
    pub storage: StorageConfig,
    /// The publish log and APPLICATION logs when `storage.backend = "kafka+postgres"`.
    pub kafka: KafkaConfig,
    /// The session store and DEVICE queues when `storage.backend = "kafka+postgres"`.
    pub postgres: PostgresConfig,
    pub device: DeviceConfig,
    pub application: ApplicationConfig,
    /// Clients treated as APPLICATION clients when their credentials do not decide the type.
    pub application_clients: Vec<ApplicationClientConfig>,
    pub auth: AuthConfig,
    /// The HTTP endpoint: metrics, health probes, admin API.
    pub http: HttpConfig,
    /// Several active nodes on one Kafka cluster and PostgreSQL schema
    /// (`storage.backend = "kafka+postgres"`): see docs/scale-out.md.
    pub cluster: ClusterConfig,
    /// What the broker does on SIGTERM before it stops: drain clients over a period.
    pub shutdown: ShutdownConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("./data"),
            listeners: vec![ListenerConfig::default()],
            limits: Limits::default(),
            session: SessionConfig::default(),
            storage: StorageConfig::default(),
            kafka: KafkaConfig::default(),
            postgres: PostgresConfig::default(),
            device: DeviceConfig::default(),
            application: ApplicationConfig::default(),
            application_clients: Vec::new(),
            auth: AuthConfig::default(),
            http: HttpConfig::default(),
            cluster: ClusterConfig::default(),
            shutdown: ShutdownConfig::default(),
        }
    }
}

impl Config {
    /// Whether `client_id` is configured as an APPLICATION client.
    pub fn is_application_client(&self, client_id: &str) -> bool {
        self.application_clients
            .iter()
            .any(|a| a.client_id == client_id)
    }
}

/// Where durable state lives.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// `embedded`: a redb database under `data_dir`. `kafka+postgres`: the publish log and
    /// APPLICATION logs in Kafka, sessions and DEVICE queues in PostgreSQL (see `[kafka]` and
    /// `[postgres]`).
    pub backend: String,
    /// fsync every group commit. Turning it off trades the durability promise for speed; only
    /// for benchmarks and tests that measure that trade.
    pub fsync: bool,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            backend: "embedded".into(),
            fsync: true,
        }
    }
}

/// The storage backend names `storage.backend` accepts.
pub const BACKEND_EMBEDDED: &str = "embedded";
pub const BACKEND_KAFKA_POSTGRES: &str = "kafka+postgres";

impl StorageConfig {
    pub fn is_kafka_postgres(&self) -> bool {
        self.backend == BACKEND_KAFKA_POSTGRES
    }
}

/// Kafka: the publish log `<topic_prefix>.msg.all` and one topic per APPLICATION client.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// `host:port[,host:port…]` (librdkafka `bootstrap.servers`).
    pub bootstrap_servers: String,
    /// Prefix of every topic and consumer group the broker uses.
    pub topic_prefix: String,
    /// Partitions of `<prefix>.msg.all` when the broker creates it.
    pub msg_all_partitions: i32,
    /// Replication factor of topics the broker creates; -1 takes the cluster's
    /// `default.replication.factor`.
    pub replication_factor: i32,
    /// librdkafka `linger.ms`: how long the producer may wait to fill a batch.
    pub linger_ms: u32,
    /// librdkafka `batch.size` in bytes.
    pub batch_size: u32,
    /// A record not acknowledged by Kafka within this time fails, and so does the PUBLISH
    /// (librdkafka `message.timeout.ms`).
    pub produce_timeout_ms: u32,
    /// Records the producer may hold unacknowledged (librdkafka
    /// `queue.buffering.max.messages`); beyond it publishers get "quota exceeded".
    pub max_pending_records: u32,
    /// Create `<prefix>.app.<client>` when an APPLICATION client first needs it. When false the
    /// topic must exist (the operator provisions it) and a client without one is refused.
    pub auto_create_application_topics: bool,
    /// Partitions of a shared group topic `<prefix>.share.…` when the broker creates it: at most
    /// this many APPLICATION members of one group receive at the same time.
    pub shared_group_partitions: i32,
    /// librdkafka `session.timeout.ms` of the shared group claimers: how long the group
    /// coordinator keeps partitions with a member whose broker node died before it hands them
    /// to the online members. Kafka's default; lower means faster failover and more false
    /// evictions on a stalled node.
    pub group_session_timeout_ms: u32,
    /// Extra librdkafka properties for every client (TLS, SASL, …), passed through unchanged.
    pub properties: std::collections::BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            bootstrap_servers: "localhost:9092".into(),
            topic_prefix: "ferrymq".into(),
            msg_all_partitions: 16,
            replication_factor: -1,
            linger_ms: 1,
            batch_size: 1 << 20,
            produce_timeout_ms: 10_000,
            max_pending_records: 100_000,
            auto_create_application_topics: true,
            shared_group_partitions: 4,
            group_session_timeout_ms: 45_000,
            properties: Default::default(),
        }
    }
}

/// PostgreSQL: sessions, subscriptions, DEVICE queues, retained messages, in-flight state.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PostgresConfig {
    /// `postgres://user:password@host:port/database` (libpq URL syntax, as sqlx reads it).
    pub url: String,
    /// The schema holding the broker's tables; created with the migrations when missing.
    pub schema: String,
    /// Connections in the pool.
    pub max_connections: u32,
    /// Seconds to wait for a connection at start and from the pool.
    pub connect_timeout_secs: u64,
    /// When another broker node holds this schema's node lock: `false` (default) refuses to
    /// start; `true` waits as a standby (not ready, MQTT listeners closed) and takes over when
    /// the lock is released. See docs/operations.md, "Standby nodes".
    pub standby: bool,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        PostgresConfig {
            url: "postgres://localhost/ferrymq".into(),
            schema: "ferrymq".into(),
            max_connections: 8,
            connect_timeout_secs: 5,
            standby: false,
        }
    }
}

/// Cluster membership of this node.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// `true`: this node is one of several active nodes sharing the Kafka cluster and the
    /// PostgreSQL schema (no node lock, no standby). `false`: one node per schema.
    pub enabled: bool,
    /// This node's name, unique in the cluster and stable across restarts (the pod name under
    /// the operator). Empty: the `HOSTNAME` environment variable, else `ferrymq`.
    pub node_id: String,
    /// A node that has not reached Kafka or PostgreSQL for this long fences itself: it closes
    /// its connections (v5 DISCONNECT 0x9C Use another server), refuses CONNECT (Server
    /// unavailable) and is not ready until both answer again (docs/scale-out.md). Shorter than
    /// the router group's session timeout (10 s), so the node lets go of its clients before
    /// the others take its partitions.
    pub fence_after_secs: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            enabled: false,
            node_id: String::new(),
            fence_after_secs: 7,
        }
    }
}

impl ClusterConfig {
    /// The node id in force: the configured one, else `HOSTNAME`, else `ferrymq`.
    pub fn node_id(&self) -> String {
        if !self.node_id.is_empty() {
            return self.node_id.clone();
        }
        std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "ferrymq".to_string())
    }
}

/// Longest drain period accepted: an hour is already far beyond any orchestrator's patience.
pub const MAX_DRAIN_SECS: u64 = 3600;

/// Draining on SIGTERM: instead of closing every connection at once, the node stops accepting,
/// turns unready and closes its clients one by one, spread evenly over `drain_secs`, so that a
/// rolling restart moves them to the other nodes gradually rather than in one reconnect storm.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownConfig {
    /// Seconds over which connections are closed on SIGTERM; 0 (the default) closes them all at
    /// once, as a single node has nowhere to send its clients.
    pub drain_secs: u64,
    /// The v5 Server Reference sent with DISCONNECT 0x8B (Server shutting down) while draining:
    /// where the client should reconnect, e.g. the client-facing Service's host. Unset: none.
    pub server_reference: Option<String>,
}

impl ShutdownConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let key = |key: &str, message: &str| {
            Err(ConfigError::Key {
                key: key.to_string(),
                message: message.to_string(),
            })
        };
        if self.drain_secs > MAX_DRAIN_SECS {
            return key(
                "shutdown.drain_secs",
                &format!("must be at most {MAX_DRAIN_SECS}"),
            );
        }
        if let Some(r) = &self.server_reference {
            // An MQTT UTF-8 string: at most 65535 bytes, no U+0000 or other control
            // characters [MQTT-1.5.4-2]; a reference with spaces lists several servers.
            if r.trim().is_empty() {
                return key("shutdown.server_reference", "must not be empty when set");
            }
            if r.len() > 65_535 || r.chars().any(char::is_control) {
                return key(
                    "shutdown.server_reference",
                    "must be at most 65535 bytes without control characters",
                );
            }
        }
        Ok(())
    }
}

/// Persistent DEVICE sessions: their offline queue.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeviceConfig {
    /// Messages kept per DEVICE queue; beyond it the oldest are trimmed (counted).
    pub queue_limit: u64,
    /// Seconds a queued message lives; an MQTT 5 message expiry wins when shorter.
    pub message_ttl_secs: u64,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        DeviceConfig {
            queue_limit: 10_000,
            message_ttl_secs: 7 * 24 * 3600,
        }
    }
}

/// APPLICATION clients: their log.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApplicationConfig {
    /// Seconds a log entry is kept, acknowledged or not.
    pub retention_secs: u64,
    /// Bytes kept per client log; beyond it the oldest entries are removed (counted).
    pub retention_bytes: u64,
}

impl Default for ApplicationConfig {
    fn default() -> Self {
        ApplicationConfig {
            retention_secs: ferrymq_common::application::DEFAULT_RETENTION_SECS,
            retention_bytes: ferrymq_common::application::DEFAULT_RETENTION_BYTES,
        }
    }
}

/// One APPLICATION client.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplicationClientConfig {
    pub client_id: String,
}

/// One listener: plain MQTT, MQTT over TLS, over WebSocket or over secure WebSocket.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ListenerConfig {
    /// A name for logs and metrics; authentication providers see it too.
    pub name: String,
    /// Address and port to bind.
    pub bind: SocketAddr,
    /// `mqtt` (plain TCP), `mqtts` (TLS), `ws` (WebSocket) or `wss` (WebSocket over TLS).
    pub protocol: ListenerProtocol,
    /// Server certificate chain, PEM (mqtts/wss). Reloaded when the file changes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    /// Private key for `cert_file`, PEM (PKCS#8, PKCS#1 or SEC1). Reloaded with it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// CA certificates, PEM, that client certificates are verified against (mqtts/wss).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_ca_file: Option<PathBuf>,
    /// Refuse TLS clients without a certificate signed by `client_ca_file`. When false, a
    /// certificate is optional but still verified when presented.
    pub require_client_cert: bool,
    /// Seconds between checks of the certificate, key and CA files for changes.
    pub tls_reload_interval_secs: u64,
    /// Expect a PROXY protocol v1 or v2 header before anything else; connections without a
    /// valid one are closed. The proxied source address replaces the socket peer.
    pub proxy_protocol: bool,
    /// HTTP path of the WebSocket upgrade (ws/wss).
    pub path: String,
}

/// What a listener speaks on its socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerProtocol {
    Mqtt,
    Mqtts,
    Ws,
    Wss,
}

impl ListenerProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            ListenerProtocol::Mqtt => "mqtt",
            ListenerProtocol::Mqtts => "mqtts",
            ListenerProtocol::Ws => "ws",
            ListenerProtocol::Wss => "wss",
        }
    }
    pub fn is_tls(self) -> bool {
        matches!(self, ListenerProtocol::Mqtts | ListenerProtocol::Wss)
    }
    pub fn is_websocket(self) -> bool {
        matches!(self, ListenerProtocol::Ws | ListenerProtocol::Wss)
    }
}

impl Default for ListenerConfig {
    fn default() -> Self {
        ListenerConfig {
            name: "tcp".into(),
            bind: SocketAddr::from(([0, 0, 0, 0], 1883)),
            protocol: ListenerProtocol::Mqtt,
            cert_file: None,
            key_file: None,
            client_ca_file: None,
            require_client_cert: false,
            tls_reload_interval_secs: 5,
            proxy_protocol: false,
            path: "/mqtt".into(),
        }
    }
}

impl ListenerConfig {
    /// Rules for one listener; `at` is its key path (`listeners[2]`).
    fn validate(&self, at: &str) -> Result<(), ConfigError> {
        let key = |k: &str, message: String| {
            Err(ConfigError::Key {
                key: format!("{at}.{k}"),
                message,
            })
        };
        if self.name.is_empty() {
            return key("name", "must not be empty".into());
        }
        if self.protocol.is_tls() {
            for (k, file) in [("cert_file", &self.cert_file), ("key_file", &self.key_file)] {
                match file {
                    None => {
                        return key(
                            k,
                            format!("is required for protocol `{}`", self.protocol.as_str()),
                        )
                    }
                    Some(path) if !path.is_file() => {
                        return key(k, format!("{} is not a readable file", path.display()))
                    }
                    Some(_) => {}
                }
            }
            if let Some(path) = &self.client_ca_file {
                if !path.is_file() {
                    return key(
                        "client_ca_file",
                        format!("{} is not a readable file", path.display()),
                    );
                }
            }
            if self.require_client_cert && self.client_ca_file.is_none() {
                return key(
                    "require_client_cert",
                    "needs `client_ca_file` to verify client certificates against".into(),
                );
            }
            if self.tls_reload_interval_secs == 0 {
                return key("tls_reload_interval_secs", "must be at least 1".into());
            }
        } else {
            for (k, set) in [
                ("cert_file", self.cert_file.is_some()),
                ("key_file", self.key_file.is_some()),
                ("client_ca_file", self.client_ca_file.is_some()),
                ("require_client_cert", self.require_client_cert),
            ] {
                if set {
                    return key(
                        k,
                        "applies to TLS listeners only (protocol `mqtts` or `wss`)".into(),
                    );
                }
            }
        }
        if self.protocol.is_websocket() && !self.path.starts_with('/') {
            return key("path", "must start with `/`".into());
        }
        Ok(())
    }
}

/// Protocol and resource limits. Each one bounds memory or work a single client can cause.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest packet accepted from a client, in bytes (the whole packet). Told to v5 clients as
    /// Maximum Packet Size; a larger packet gets DISCONNECT 0x95 (v5) or a closed socket (v3).
    pub max_packet_size: u32,
    /// Longest client identifier accepted (CONNACK 0x85 / 0x02 beyond it).
    pub max_client_id_len: usize,
    /// Longest topic name or filter, in bytes.
    pub max_topic_len: usize,
    /// Most levels (`/`-separated parts) in a topic name or filter.
    pub max_topic_levels: usize,
    /// Most subscriptions one session may hold (SUBACK 0x97 / 0x80 beyond it).
    pub max_subscriptions_per_client: usize,
    /// Outgoing QoS 1/2 messages in flight per client (also capped by the client's v5 Receive
    /// Maximum), and the Receive Maximum the broker announces for incoming QoS 2.
    pub max_inflight: u16,
    /// Messages queued per client while it is offline or slow. When full, new messages for that
    /// client are dropped and counted (`messages_dropped_queue_full`).
    pub max_queued_messages: usize,
    /// Topic aliases a v5 client may use towards the broker (Topic Alias Maximum in CONNACK).
    pub max_topic_alias: u16,
    /// Seconds a new connection has to send CONNECT.
    pub connect_timeout_secs: u64,
    /// Upper bound on the keep-alive a client may ask for; 0 means no bound. v5 clients asking
    /// for more (or for 0) are told the bound as Server Keep Alive.
    pub max_keep_alive_secs: u16,
    /// Seconds a peer may leave our output unread before the connection is closed.
    pub write_timeout_secs: u64,
    /// Concurrent connections; further connections are closed right after accept.
    pub max_connections: usize,
    /// When a connected subscriber's queue (`max_queued_messages`) is full, the publisher stops
    /// reading and waits up to this long for room (backpressure), then drops the message for that
    /// subscriber and drops further overflow for it at once until it has drained half its queue.
    /// 0: never wait, drop at once. Offline sessions never make publishers wait.
    pub slow_subscriber_wait_ms: u64,
    /// New connections per second across all listeners (token bucket, bursts up to one second's
    /// worth). Connections over the rate are answered CONNACK 0x9F (v5) / 0x03 (v3) and closed.
    /// 0: no limit.
    pub max_connection_rate: u32,
    /// PUBLISH packets per second one client may send (token bucket, bursts up to one second's
    /// worth). A client over the rate is disconnected: v5 with DISCONNECT 0x96 (Message rate too
    /// high), v3 by closing the connection. 0: no limit.
    pub max_publish_rate: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_packet_size: 1024 * 1024,
            max_client_id_len: 256,
            max_topic_len: 65_535,
            max_topic_levels: 128,
            max_subscriptions_per_client: 1_000,
            max_inflight: 32,
            max_queued_messages: 10_000,
            max_topic_alias: 64,
            connect_timeout_secs: 10,
            max_keep_alive_secs: 0,
            write_timeout_secs: 60,
            max_connections: 1_000_000,
            slow_subscriber_wait_ms: 1_000,
            max_connection_rate: 0,
            max_publish_rate: 0,
        }
    }
}

/// Session lifetime rules.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionConfig {
    /// Upper bound on a v5 Session Expiry Interval, in seconds (v5 clients are told the bound in
    /// CONNACK). 4294967295 means "never expires" is allowed.
    pub max_session_expiry_secs: u32,
    /// Lifetime of an MQTT 3.x persistent session (clean_session=0) after its client
    /// disconnected, in seconds. v3 has no way to ask for one, so this bounds what would
    /// otherwise live forever.
    pub v3_session_expiry_secs: u32,
    /// Base of the Response Information a v5 client gets when it sets Request Response
    /// Information: `<prefix>/<client id>`, a topic it can build response topics under.
    /// Empty: no Response Information is returned (the spec allows either).
    pub response_topic_prefix: String,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            max_session_expiry_secs: u32::MAX,
            v3_session_expiry_secs: 7 * 24 * 3600,
            response_topic_prefix: "responses".into(),
        }
    }
}

// --- [auth]: authentication providers and authorization (docs/security.md) -------------------

/// Authentication and authorization.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Clients that present no credentials may connect (with `anonymous_acl`). Off by default;
    /// the built-in configuration used when no `--config` file is given turns it on for
    /// development, with a warning at start.
    pub allow_anonymous: bool,
    /// Providers asked in order; the first that recognises the credentials decides.
    pub providers: Vec<AuthProviderKind>,
    /// What anonymous clients may do. Default: everything.
    pub anonymous_acl: crate::auth::acl::AclRules,
    /// What an MQTT 3.x client's PUBLISH that its ACL denies gets: `drop` (acknowledged and
    /// discarded: v3 acks cannot say no) or `disconnect`.
    pub v3_denied_publish: V3DeniedPublish,
    /// Failed authentication attempts one source IP may make in a row; 0 disables the limit.
    pub failure_burst: u32,
    /// One more attempt is allowed per this many seconds.
    pub failure_refill_secs: u64,
    /// Source addresses remembered (bounded memory under attack).
    pub failure_tracked_ips: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt: Option<JwtConfig>,
    pub x509: X509Config,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            allow_anonymous: false,
            providers: Vec::new(),
            anonymous_acl: crate::auth::acl::AclRules::everything(),
            v3_denied_publish: V3DeniedPublish::Drop,
            failure_burst: 10,
            failure_refill_secs: 10,
            failure_tracked_ips: 100_000,
            jwt: None,
            x509: X509Config::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthProviderKind {
    /// User name / password (or client id / password) records in the credential store.
    Store,
    /// The TLS client certificate's subject CN mapped to a credential record.
    X509,
    /// A JWT bearer token in the password field.
    Jwt,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum V3DeniedPublish {
    Drop,
    Disconnect,
}

/// `[auth.jwt]`: how bearer tokens are verified.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// `HS256`, `RS256` or `ES256`; tokens signed otherwise are refused.
    pub algorithm: String,
    /// HS256 shared secret (at least 32 bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// RS256/ES256: PEM file with the public key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key_file: Option<PathBuf>,
    /// Required `iss`.
    pub issuer: String,
    /// Required `aud` (one of the token's audiences).
    pub audience: String,
    /// Clock skew tolerated on `exp` and `nbf`, seconds.
    #[serde(default = "default_jwt_leeway")]
    pub leeway_secs: u64,
}

fn default_jwt_leeway() -> u64 {
    30
}

/// `[auth.x509]`: how a client certificate maps to a credential record.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct X509Config {
    /// Regular expression the whole subject CN must match; its first capture group (or the
    /// group named `name`) is the name looked up. Empty: the CN itself.
    pub cn_regex: String,
    /// Look the name up as a `username` record or a `client_id` record.
    pub lookup: X509Lookup,
}

impl Default for X509Config {
    fn default() -> Self {
        X509Config {
            cn_regex: String::new(),
            lookup: X509Lookup::Username,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum X509Lookup {
    Username,
    ClientId,
}

impl AuthConfig {
    /// Checks `[auth]`; errors name the key.
    fn validate(&self) -> Result<(), ConfigError> {
        let key = |key: &str, message: String| {
            Err(ConfigError::Key {
                key: key.to_string(),
                message,
            })
        };
        for (i, p) in self.providers.iter().enumerate() {
            if self.providers[..i].contains(p) {
                return key("auth.providers", format!("{p:?} is listed twice"));
            }
        }
        if let Err(e) = self.anonymous_acl.validate() {
            return key("auth.anonymous_acl", e);
        }
        if self.failure_refill_secs == 0 {
            return key("auth.failure_refill_secs", "must be at least 1".into());
        }
        if self.failure_tracked_ips < 2 {
            return key("auth.failure_tracked_ips", "must be at least 2".into());
        }
        if !self.x509.cn_regex.is_empty() {
            if let Err(e) = regex::Regex::new(&self.x509.cn_regex) {
                return key("auth.x509.cn_regex", format!("not a valid regex: {e}"));
            }
        }
        if self.providers.contains(&AuthProviderKind::Jwt) && self.jwt.is_none() {
            return key(
                "auth.jwt",
                "the `jwt` provider needs an [auth.jwt] section".into(),
            );
        }
        if let Some(jwt) = &self.jwt {
            match jwt.algorithm.as_str() {
                "HS256" => match &jwt.secret {
                    Some(s) if s.len() >= 32 => {}
                    _ => {
                        return key(
                            "auth.jwt.secret",
                            "HS256 needs a secret of at least 32 bytes".into(),
                        )
                    }
                },
                "RS256" | "ES256" => {
                    if jwt.public_key_file.is_none() {
                        return key(
                            "auth.jwt.public_key_file",
                            format!("{} needs a PEM public key file", jwt.algorithm),
                        );
                    }
                }
                other => {
                    return key(
                        "auth.jwt.algorithm",
                        format!("`{other}` is not supported (HS256, RS256, ES256)"),
                    )
                }
            }
            if jwt.issuer.is_empty() {
                return key("auth.jwt.issuer", "must not be empty".into());
            }
            if jwt.audience.is_empty() {
                return key("auth.jwt.audience", "must not be empty".into());
            }
        }
        Ok(())
    }
}

/// The HTTP endpoint (`/metrics`, `/health/*`, `/api/v1/*`): one port, bounded.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Serve the endpoint at all.
    pub enabled: bool,
    /// Address and port to bind (port 0: any free port).
    pub bind: SocketAddr,
    /// Bearer token for the admin API. Neither this nor `admin_token_file`: the admin API is
    /// disabled (404). Printed redacted by `--check-config`.
    #[serde(serialize_with = "redact")]
    pub admin_token: Option<String>,
    /// File holding the admin token (surrounding whitespace ignored); read at start.
    pub admin_token_file: Option<PathBuf>,
    /// Concurrent HTTP connections; more are closed right after accept.
    pub max_connections: usize,
    /// Seconds a request may take, from its first byte to the end of the response, and the
    /// longest an idle keep-alive connection is kept.
    pub request_timeout_secs: u64,
    /// Largest request body accepted, in bytes (larger: 413).
    pub max_body_bytes: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            enabled: true,
            bind: SocketAddr::from(([0, 0, 0, 0], 8083)),
            admin_token: None,
            admin_token_file: None,
            max_connections: 64,
            request_timeout_secs: 10,
            max_body_bytes: 64 * 1024,
        }
    }
}

fn redact<S: serde::Serializer>(token: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match token {
        Some(_) => s.serialize_some("<redacted>"),
        None => s.serialize_none(),
    }
}

/// Command-line overrides applied after the file and the environment.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Vec<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    /// `--http ADDR`: the HTTP endpoint's address (and enables it).
    pub http: Option<SocketAddr>,
}

impl Config {
    /// Loads `path` (or the defaults when `None`), applies the environment given as `(name, value)`
    /// pairs and the flags, and validates the result.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &Overrides,
    ) -> Result<Config, ConfigError> {
        let mut table = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                text.parse::<toml::Table>()
                    .map_err(|e| ConfigError::Parse {
                        path: path.to_path_buf(),
                        message: e.to_string(),
                    })?
            }
            // No file: the development configuration. Anonymous access is on (with a warning at
            // start) so the quick start works; any file starts from `allow_anonymous = false`.
            None => {
                let mut auth = toml::Table::new();
                auth.insert("allow_anonymous".into(), toml::Value::Boolean(true));
                let mut table = toml::Table::new();
                table.insert("auth".into(), toml::Value::Table(auth));
                table
            }
        };
        for (var, value) in env {
            apply_env(&mut table, &var, &value)?;
        }
        // Going through the text form lets toml report errors with the key path
        // (`limits.max_packet_size`), whichever layer the bad value came from.
        let text = toml::to_string(&table).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        let mut config: Config =
            toml::from_str(&text).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if !overrides.listen.is_empty() {
            config.listeners = listeners_from(&overrides.listen);
        }
        if let Some(dir) = &overrides.data_dir {
            config.data_dir = dir.clone();
        }
        if let Some(addr) = overrides.http {
            config.http.bind = addr;
            config.http.enabled = true;
        }
        config.validate()?;
        Ok(config)
    }

    /// Parses a TOML document (used by tests and the config-check mode).
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<string>"),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks cross-field and range rules serde cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let key = |key: &str, message: &str| {
            Err(ConfigError::Key {
                key: key.to_string(),
                message: message.to_string(),
            })
        };
        if self.listeners.is_empty() {
            return key("listeners", "at least one listener is required");
        }
        let mut seen = std::collections::HashSet::new();
        let mut names = std::collections::HashSet::new();
        for (i, listener) in self.listeners.iter().enumerate() {
            listener.validate(&format!("listeners[{i}]"))?;
            if !names.insert(listener.name.as_str()) {
                return key(
                    &format!("listeners[{i}].name"),
                    &format!("`{}` is used by another listener", listener.name),
                );
            }
            // Port 0 asks the system for a free port, so several such listeners never clash.
            if listener.bind.port() != 0 && !seen.insert(listener.bind) {
                return key(
                    &format!("listeners[{i}].bind"),
                    &format!("{} is bound by another listener", listener.bind),
                );
            }
        }
        if self.data_dir.as_os_str().is_empty() {
            return key("data_dir", "must not be empty");
        }
        let l = &self.limits;
        // The smallest legal packet that can carry a useful PUBLISH is a few bytes; below 64 the
        // broker could not even send its own CONNACK with properties.
        if l.max_packet_size < 64 || l.max_packet_size > 268_435_455 {
            return key(
                "limits.max_packet_size",
                "must be between 64 and 268435455 (the MQTT maximum)",
            );
        }
        if l.max_client_id_len < 23 || l.max_client_id_len > 65_535 {
            return key(
                "limits.max_client_id_len",
                "must be between 23 (the MQTT minimum a server must accept) and 65535",
            );
        }
        if l.max_topic_len == 0 || l.max_topic_len > 65_535 {
            return key("limits.max_topic_len", "must be between 1 and 65535");
        }
        if l.max_topic_levels == 0 {
            return key("limits.max_topic_levels", "must be at least 1");
        }
        if l.max_subscriptions_per_client == 0 {
            return key("limits.max_subscriptions_per_client", "must be at least 1");
        }
        if l.max_inflight == 0 {
            return key(
                "limits.max_inflight",
                "must be at least 1 (it is the v5 Receive Maximum)",
            );
        }
        if l.max_queued_messages == 0 {
            return key("limits.max_queued_messages", "must be at least 1");
        }
        if l.connect_timeout_secs == 0 {
            return key("limits.connect_timeout_secs", "must be at least 1");
        }
        if l.write_timeout_secs == 0 {
            return key("limits.write_timeout_secs", "must be at least 1");
        }
        if l.max_connections == 0 {
            return key("limits.max_connections", "must be at least 1");
        }
        if self.storage.backend != BACKEND_EMBEDDED && !self.storage.is_kafka_postgres() {
            return key(
                "storage.backend",
                &format!(
                    "`{}` is not a backend; use `{BACKEND_EMBEDDED}` or `{BACKEND_KAFKA_POSTGRES}`",
                    self.storage.backend
                ),
            );
        }
        if self.storage.is_kafka_postgres() {
            self.validate_kafka_postgres()?;
        } else if self.cluster.enabled {
            return key(
                "cluster.enabled",
                "needs storage.backend = \"kafka+postgres\": nodes share state through Kafka and PostgreSQL",
            );
        }
        if self.device.queue_limit == 0 {
            return key("device.queue_limit", "must be at least 1");
        }
        if self.device.message_ttl_secs == 0 {
            return key("device.message_ttl_secs", "must be at least 1");
        }
        if self.application.retention_secs == 0 {
            return key("application.retention_secs", "must be at least 1");
        }
        if self.application.retention_bytes == 0 {
            return key("application.retention_bytes", "must be at least 1");
        }
        if self.session.v3_session_expiry_secs == 0 {
            return key(
                "session.v3_session_expiry_secs",
                "must be at least 1 (clean_session=0 asks for a session that outlives the connection)",
            );
        }
        let prefix = &self.session.response_topic_prefix;
        if prefix.contains(['+', '#', '\0']) || prefix.ends_with('/') {
            return key(
                "session.response_topic_prefix",
                "must be a topic name without wildcards and without a trailing `/`",
            );
        }
        let h = &self.http;
        if h.admin_token.is_some() && h.admin_token_file.is_some() {
            return key(
                "http.admin_token_file",
                "set either http.admin_token or http.admin_token_file, not both",
            );
        }
        if h.admin_token
            .as_deref()
            .is_some_and(|t| t.trim().is_empty())
        {
            return key("http.admin_token", "must not be empty");
        }
        if h.max_connections == 0 {
            return key("http.max_connections", "must be at least 1");
        }
        if h.request_timeout_secs == 0 {
            return key("http.request_timeout_secs", "must be at least 1");
        }
        if h.max_body_bytes == 0 {
            return key("http.max_body_bytes", "must be at least 1");
        }
        self.shutdown.validate()?;
        let mut ids = std::collections::HashSet::new();
        for (i, app) in self.application_clients.iter().enumerate() {
            if app.client_id.is_empty() {
                return key(
                    &format!("application_clients[{i}].client_id"),
                    "must not be empty",
                );
            }
            if !ids.insert(app.client_id.as_str()) {
                return key(
                    &format!("application_clients[{i}].client_id"),
                    &format!("`{}` is listed twice", app.client_id),
                );
            }
        }
        self.auth.validate()
    }
}

impl Config {
    fn validate_kafka_postgres(&self) -> Result<(), ConfigError> {
        let key = |key: &str, message: &str| {
            Err(ConfigError::Key {
                key: key.to_string(),
                message: message.to_string(),
            })
        };
        let k = &self.kafka;
        if k.bootstrap_servers.trim().is_empty() {
            return key("kafka.bootstrap_servers", "must name at least one broker");
        }
        // Kafka topic names: [a-zA-Z0-9._-], at most 249 characters; the prefix leaves room for
        // `.app.<64 hex digits>`.
        if k.topic_prefix.is_empty()
            || k.topic_prefix.len() > 150
            || !k
                .topic_prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            return key(
                "kafka.topic_prefix",
                "must be 1 to 150 characters of a-z, A-Z, 0-9, `.`, `_`, `-`",
            );
        }
        if k.msg_all_partitions < 1 {
            return key("kafka.msg_all_partitions", "must be at least 1");
        }
        if k.shared_group_partitions < 1 {
            return key("kafka.shared_group_partitions", "must be at least 1");
        }
        if k.replication_factor == 0 || k.replication_factor < -1 {
            return key(
                "kafka.replication_factor",
                "must be -1 (cluster default) or at least 1",
            );
        }
        if !(6_000..=300_000).contains(&k.group_session_timeout_ms) {
            // The range Kafka's group coordinator accepts by default
            // (group.min/max.session.timeout.ms).
            return key(
                "kafka.group_session_timeout_ms",
                "must be between 6000 and 300000 (Kafka's group.min/max.session.timeout.ms)",
            );
        }
        if k.produce_timeout_ms < 100 {
            return key("kafka.produce_timeout_ms", "must be at least 100");
        }
        if k.max_pending_records == 0 {
            return key("kafka.max_pending_records", "must be at least 1");
        }
        if self.cluster.enabled && self.postgres.standby {
            return key(
                "postgres.standby",
                "has no meaning with cluster.enabled = true: every node is active",
            );
        }
        if !(1..=60).contains(&self.cluster.fence_after_secs) {
            return key(
                "cluster.fence_after_secs",
                "must be between 1 and 60 (a node cut off from storage must let its clients go in bounded time)",
            );
        }
        let node = self.cluster.node_id();
        if node.len() > 200
            || !node
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            return key(
                "cluster.node_id",
                "must be 1 to 200 characters of a-z, A-Z, 0-9, `.`, `_`, `-` (it names Kafka topics)",
            );
        }
        for reserved in ["bootstrap.servers", "acks", "enable.idempotence"] {
            if k.properties.contains_key(reserved) {
                return key(
                    &format!("kafka.properties.\"{reserved}\""),
                    "is set by the broker (acks=all and idempotence are what make an acknowledged PUBLISH durable)",
                );
            }
        }
        let p = &self.postgres;
        if !(p.url.starts_with("postgres://") || p.url.starts_with("postgresql://")) {
            return key("postgres.url", "must be a postgres:// or postgresql:// URL");
        }
        let schema_ok = p.schema.len() <= 63
            && p.schema
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
            && p.schema
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !schema_ok {
            return key(
                "postgres.schema",
                "must be a lowercase SQL identifier: a-z, 0-9, `_`, not starting with a digit, at most 63 characters",
            );
        }
        if p.max_connections < 2 {
            return key(
                "postgres.max_connections",
                "must be at least 2 (one connection holds the node lock)",
            );
        }
        if p.connect_timeout_secs == 0 {
            return key("postgres.connect_timeout_secs", "must be at least 1");
        }
        Ok(())
    }
}

fn listeners_from(addrs: &[SocketAddr]) -> Vec<ListenerConfig> {
    addrs
        .iter()
        .enumerate()
        .map(|(i, bind)| ListenerConfig {
            name: if i == 0 {
                "tcp".into()
            } else {
                format!("tcp{i}")
            },
            bind: *bind,
            ..ListenerConfig::default()
        })
        .collect()
}

/// Applies one environment variable to the TOML tree when it carries our prefix.
fn apply_env(table: &mut toml::Table, var: &str, value: &str) -> Result<(), ConfigError> {
    let Some(path) = var.strip_prefix(ENV_PREFIX) else {
        return Ok(());
    };
    let env_err = |message: String| ConfigError::Env {
        var: var.to_string(),
        message,
    };
    if path == "LISTEN" {
        let mut listeners = toml::value::Array::new();
        for (i, addr) in value.split(',').map(str::trim).enumerate() {
            let bind: SocketAddr = addr
                .parse()
                .map_err(|e| env_err(format!("`{addr}` is not an address: {e}")))?;
            let mut t = toml::Table::new();
            t.insert(
                "name".into(),
                toml::Value::String(if i == 0 {
                    "tcp".into()
                } else {
                    format!("tcp{i}")
                }),
            );
            t.insert("bind".into(), toml::Value::String(bind.to_string()));
            listeners.push(toml::Value::Table(t));
        }
        table.insert("listeners".into(), toml::Value::Array(listeners));
        return Ok(());
    }
    // Variables we do not know (FERRYMQ_LOG, say) are not config keys; only paths whose first
    // level is a known top-level key are applied, so a typo in a nested key still fails loudly
    // through `deny_unknown_fields`.
    let keys: Vec<String> = path.split("__").map(|k| k.to_ascii_lowercase()).collect();
    const TOP_LEVEL: &[&str] = &[
        "data_dir",
        "limits",
        "session",
        "storage",
        "kafka",
        "postgres",
        "device",
        "application",
        "auth",
        "http",
        "cluster",
        "shutdown",
    ];
    if !TOP_LEVEL.contains(&keys[0].as_str()) {
        return Ok(());
    }
    let mut node = table;
    for k in &keys[..keys.len() - 1] {
        let entry = node
            .entry(k.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        node = entry
            .as_table_mut()
            .ok_or_else(|| env_err(format!("`{k}` is not a table")))?;
    }
    let leaf = keys[keys.len() - 1].clone();
    // Paths and names are text even when they look like numbers (FERRYMQ_DATA_DIR=1234).
    let text_keys = [
        "data_dir",
        "backend",
        "name",
        "bootstrap_servers",
        "topic_prefix",
        "url",
        "schema",
        "algorithm",
        "secret",
        "public_key_file",
        "issuer",
        "audience",
        "cn_regex",
        "bind",
        "admin_token",
        "admin_token_file",
    ];
    let parsed =
        if keys[0] == "auth" && (leaf == "providers" || leaf == "publish" || leaf == "subscribe") {
            // Lists from the environment are comma-separated: FERRYMQ_AUTH__PROVIDERS=store,jwt.
            toml::Value::Array(
                value
                    .split(',')
                    .map(str::trim)
                    .filter(|v| !v.is_empty())
                    .map(|v| toml::Value::String(v.to_string()))
                    .collect(),
            )
        // librdkafka properties are strings whatever they look like (`enable.ssl.certificate.verification=false`).
        } else if text_keys.contains(&leaf.as_str())
            || keys[0] == "kafka" && keys.get(1).is_some_and(|k| k == "properties")
        {
            toml::Value::String(value.to_string())
        } else {
            scalar(value)
        };
    node.insert(leaf, parsed);
    Ok(())
}

/// Interprets an environment value as the TOML scalar it looks like.
fn scalar(value: &str) -> toml::Value {
    if let Ok(i) = value.parse::<i64>() {
        return toml::Value::Integer(i);
    }
    if let Ok(b) = value.parse::<bool>() {
        return toml::Value::Boolean(b);
    }
    if let Ok(f) = value.parse::<f64>() {
        return toml::Value::Float(f);
    }
    toml::Value::String(value.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_are_valid() {
        let c = Config::load(None, Vec::new(), &Overrides::default()).unwrap();
        assert_eq!(c.listeners[0].bind.port(), 1883);
        assert_eq!(c.data_dir, PathBuf::from("./data"));
        assert_eq!(c.limits.max_queued_messages, 10_000);
    }

    #[test]
    fn env_overrides_file_and_flags_override_env() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.toml");
        std::fs::write(
            &path,
            "[limits]\nmax_inflight = 10\nmax_queued_messages = 5\n",
        )
        .unwrap();
        let c = Config::load(
            Some(&path),
            env(&[
                ("FERRYMQ_LIMITS__MAX_INFLIGHT", "20"),
                ("FERRYMQ_DATA_DIR", "/tmp/x"),
                ("HOME", "/root"),
                ("FERRYMQ_LISTEN", "127.0.0.1:1999"),
            ]),
            &Overrides {
                listen: vec!["127.0.0.1:2000".parse().unwrap()],
                data_dir: None,
                http: None,
            },
        )
        .unwrap();
        assert_eq!(c.limits.max_inflight, 20);
        assert_eq!(c.limits.max_queued_messages, 5);
        assert_eq!(c.data_dir, PathBuf::from("/tmp/x"));
        assert_eq!(c.listeners.len(), 1);
        assert_eq!(c.listeners[0].bind.port(), 2000);
    }

    #[test]
    fn errors_name_the_key() {
        let err = Config::from_toml_str("[limits]\nmax_inflight = 0\n").unwrap_err();
        assert!(err.to_string().contains("limits.max_inflight"), "{err}");
        let err = Config::from_toml_str("[limits]\nmax_inflite = 3\n").unwrap_err();
        assert!(err.to_string().contains("max_inflite"), "{err}");
        let err = Config::load(
            None,
            env(&[("FERRYMQ_LIMITS__MAX_PACKET_SIZE", "banana")]),
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("max_packet_size"), "{err}");
        let err = Config::load(
            None,
            env(&[("FERRYMQ_LISTEN", "nowhere")]),
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("FERRYMQ_LISTEN"), "{err}");
    }

    #[test]
    fn listener_errors_name_the_key() {
        let check = |text: &str, key: &str| {
            let err = Config::from_toml_str(text).unwrap_err().to_string();
            assert!(err.contains(key), "{err} should name {key}");
        };
        let tls = "[[listeners]]\nname = \"s\"\nbind = \"127.0.0.1:8883\"\nprotocol = \"mqtts\"\n";
        check(tls, "listeners[0].cert_file");
        check(
            &format!(
                "{tls}cert_file = \"/nonexistent/c.pem\"\nkey_file = \"/nonexistent/k.pem\"\n"
            ),
            "listeners[0].cert_file",
        );
        check(
            "[[listeners]]\nname = \"p\"\nbind = \"127.0.0.1:1883\"\nrequire_client_cert = true\n",
            "listeners[0].require_client_cert",
        );
        check(
            "[[listeners]]\nname = \"p\"\nbind = \"127.0.0.1:1883\"\nprotocol = \"quic\"\n",
            "protocol",
        );
        check(
            "[[listeners]]\nname = \"w\"\nbind = \"127.0.0.1:8080\"\nprotocol = \"ws\"\npath = \"mqtt\"\n",
            "listeners[0].path",
        );
        check(
            "[[listeners]]\nname = \"a\"\nbind = \"127.0.0.1:1\"\n[[listeners]]\nname = \"a\"\nbind = \"127.0.0.1:2\"\n",
            "listeners[1].name",
        );
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("c.pem");
        std::fs::write(&cert, "x").unwrap();
        check(
            &format!(
                "{tls}cert_file = {c:?}\nkey_file = {c:?}\nrequire_client_cert = true\n",
                c = cert
            ),
            "listeners[0].require_client_cert",
        );
    }

    #[test]
    fn anonymous_access_only_in_the_development_defaults() {
        let c = Config::load(None, Vec::new(), &Overrides::default()).unwrap();
        assert!(c.auth.allow_anonymous);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.toml");
        std::fs::write(&path, "data_dir = \"/tmp/x\"\n").unwrap();
        let c = Config::load(Some(&path), Vec::new(), &Overrides::default()).unwrap();
        assert!(!c.auth.allow_anonymous);
        assert!(!Config::default().auth.allow_anonymous);
        let c = Config::load(
            None,
            env(&[("FERRYMQ_AUTH__ALLOW_ANONYMOUS", "false")]),
            &Overrides::default(),
        )
        .unwrap();
        assert!(!c.auth.allow_anonymous);
    }

    #[test]
    fn auth_from_the_environment() {
        let c = Config::load(
            None,
            env(&[
                ("FERRYMQ_AUTH__PROVIDERS", "jwt, store"),
                ("FERRYMQ_AUTH__JWT__ALGORITHM", "HS256"),
                (
                    "FERRYMQ_AUTH__JWT__SECRET",
                    "12345678901234567890123456789012",
                ),
                ("FERRYMQ_AUTH__JWT__ISSUER", "iss"),
                ("FERRYMQ_AUTH__JWT__AUDIENCE", "aud"),
                ("FERRYMQ_AUTH__ANONYMOUS_ACL__PUBLISH", "a/#,b"),
            ]),
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(
            c.auth.providers,
            vec![AuthProviderKind::Jwt, AuthProviderKind::Store]
        );
        let jwt = c.auth.jwt.unwrap();
        assert_eq!(
            jwt.secret.as_deref(),
            Some("12345678901234567890123456789012")
        );
        assert_eq!(c.auth.anonymous_acl.publish, vec!["a/#", "b"]);
    }

    #[test]
    fn auth_errors_name_the_key() {
        let cases = [
            ("[auth]\nproviders = [\"jwt\"]\n", "auth.jwt"),
            (
                "[auth.jwt]\nalgorithm = \"HS256\"\nsecret = \"short\"\nissuer = \"i\"\naudience = \"a\"\n",
                "auth.jwt.secret",
            ),
            (
                "[auth.jwt]\nalgorithm = \"none\"\nissuer = \"i\"\naudience = \"a\"\n",
                "auth.jwt.algorithm",
            ),
            (
                "[auth.jwt]\nalgorithm = \"ES256\"\nissuer = \"i\"\naudience = \"a\"\n",
                "auth.jwt.public_key_file",
            ),
            ("[auth.x509]\ncn_regex = \"(\"\n", "auth.x509.cn_regex"),
            ("[auth.anonymous_acl]\npublish = [\"a/#/b\"]\n", "auth.anonymous_acl"),
            ("[auth]\nproviders = [\"store\", \"store\"]\n", "auth.providers"),
            ("[auth]\nfailure_refill_secs = 0\n", "auth.failure_refill_secs"),
            ("[auth]\nproviders = [\"ldap\"]\n", "ldap"),
        ];
        for (text, key) in cases {
            let err = Config::from_toml_str(text).unwrap_err();
            assert!(err.to_string().contains(key), "{text}: {err}");
        }
    }

    #[test]
    fn http_section_env_and_flag() {
        let c = Config::load(
            None,
            env(&[
                ("FERRYMQ_HTTP__BIND", "127.0.0.1:9100"),
                ("FERRYMQ_HTTP__ADMIN_TOKEN", "12345"),
                ("FERRYMQ_HTTP__ENABLED", "false"),
            ]),
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(c.http.bind.port(), 9100);
        assert!(!c.http.enabled);
        assert_eq!(c.http.admin_token.as_deref(), Some("12345"));
        let printed = toml::to_string(&c).unwrap();
        assert!(!printed.contains("12345"), "{printed}");
        let c = Config::load(
            None,
            env(&[("FERRYMQ_HTTP__ENABLED", "false")]),
            &Overrides {
                http: Some("127.0.0.1:0".parse().unwrap()),
                ..Overrides::default()
            },
        )
        .unwrap();
        assert!(c.http.enabled, "--http enables the endpoint");
        let err = Config::from_toml_str("[http]\nadmin_token = \"a\"\nadmin_token_file = \"/f\"\n")
            .unwrap_err();
        assert!(err.to_string().contains("http.admin_token_file"), "{err}");
        let err = Config::from_toml_str("[http]\nmax_connections = 0\n").unwrap_err();
        assert!(err.to_string().contains("http.max_connections"), "{err}");
    }

    #[test]
    fn example_config_in_repo_is_valid() {
        let text = include_str!("../../ferrymq.example.toml");
        Config::from_toml_str(text).unwrap();
    }

    #[test]
    fn kafka_postgres_sections_are_validated() {
        let base = "[storage]\nbackend = \"kafka+postgres\"\n";
        let c = Config::from_toml_str(base).unwrap();
        assert!(c.storage.is_kafka_postgres());
        assert_eq!(c.kafka.topic_prefix, "ferrymq");
        for (extra, key) in [
            ("[kafka.properties]\nacks = \"1\"\n", "kafka.properties"),
            ("[kafka]\ntopic_prefix = \"a/b\"\n", "kafka.topic_prefix"),
            (
                "[kafka]\nreplication_factor = 0\n",
                "kafka.replication_factor",
            ),
            ("[postgres]\nschema = \"Bad-Schema\"\n", "postgres.schema"),
            ("[postgres]\nurl = \"mysql://x\"\n", "postgres.url"),
            (
                "[postgres]\nmax_connections = 1\n",
                "postgres.max_connections",
            ),
        ] {
            let err = Config::from_toml_str(&format!("{base}{extra}")).unwrap_err();
            assert!(err.to_string().contains(key), "{extra}: {err}");
        }
        let err = Config::from_toml_str("[storage]\nbackend = \"kafka\"\n").unwrap_err();
        assert!(err.to_string().contains("storage.backend"), "{err}");
        // The embedded backend ignores the sections entirely.
        Config::from_toml_str("[kafka.properties]\nacks = \"1\"\n").unwrap();
    }

    #[test]
    fn kafka_properties_from_the_environment_stay_text() {
        let c = Config::load(
            None,
            env(&[
                ("FERRYMQ_STORAGE__BACKEND", "kafka+postgres"),
                (
                    "FERRYMQ_KAFKA__PROPERTIES__ENABLE.SSL.CERTIFICATE.VERIFICATION",
                    "false",
                ),
                ("FERRYMQ_KAFKA__MSG_ALL_PARTITIONS", "3"),
                ("FERRYMQ_POSTGRES__SCHEMA", "edge_1"),
            ]),
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(
            c.kafka
                .properties
                .get("enable.ssl.certificate.verification")
                .map(String::as_str),
            Some("false")
        );
        assert_eq!(c.kafka.msg_all_partitions, 3);
        assert_eq!(c.postgres.schema, "edge_1");
    }

    #[test]
    fn shutdown_drain_is_validated() {
        let c = Config::from_toml_str(
            "[shutdown]\ndrain_secs = 30\nserver_reference = \"mqtt.example.svc:1883\"\n",
        )
        .unwrap();
        assert_eq!(c.shutdown.drain_secs, 30);
        assert_eq!(
            c.shutdown.server_reference.as_deref(),
            Some("mqtt.example.svc:1883")
        );
        assert_eq!(Config::default().shutdown.drain_secs, 0);
        // The operator sets the node id per pod from the environment.
        let c = Config::load(
            None,
            env(&[
                ("FERRYMQ_SHUTDOWN__DRAIN_SECS", "15"),
                ("FERRYMQ_CLUSTER__NODE_ID", "edge-2"),
            ]),
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(c.shutdown.drain_secs, 15);
        assert_eq!(c.cluster.node_id, "edge-2");
        for bad in [
            "[shutdown]\ndrain_secs = 3601\n",
            "[shutdown]\nserver_reference = \" \"\n",
            "[shutdown]\nserver_reference = \"a\\u0000b\"\n",
        ] {
            let err = Config::from_toml_str(bad).unwrap_err();
            assert!(err.to_string().contains("shutdown."), "{bad}: {err}");
        }
    }
}
