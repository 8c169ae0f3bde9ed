//! `MqttBroker`: one ferrymq deployment (a StatefulSet with its Services, ConfigMap and
//! PodDisruptionBudget).

// kube's `printcolumn(type_ = ...)` repeats the same attribute key once per column.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, LocalObjectReference, PodSecurityContext, ResourceRequirements, SecurityContext,
    Toleration, TopologySpreadConstraint,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{LocalObjectRef, SecretKeyRef};

/// Desired state of a ferrymq broker.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "ferrymq.io",
    version = "v1alpha1",
    kind = "MqttBroker",
    plural = "mqttbrokers",
    shortname = "mqb",
    category = "ferrymq",
    namespaced,
    status = "MqttBrokerStatus",
    derive = "PartialEq",
    derive = "Default",
    cel,
    doc = "A ferrymq MQTT broker: a StatefulSet with its Services, ConfigMap and PodDisruptionBudget.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Replicas", type_ = "integer", json_path = ".spec.replicas"),
    printcolumn(
        name = "Available",
        type_ = "integer",
        json_path = ".status.readyReplicas"
    ),
    printcolumn(
        name = "Storage",
        type_ = "string",
        json_path = ".status.storageBackend"
    ),
    printcolumn(
        name = "Endpoint",
        type_ = "string",
        json_path = ".status.endpoints[0].url"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        priority = 1,
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.replicas <= 1 || has(self.storage.kafkaPostgres)")
        .message("replicas > 1 needs storage.kafkaPostgres: embedded storage belongs to one pod")
        .reason(Reason::FieldValueForbidden)
        .field_path(".replicas")
)]
pub struct MqttBrokerSpec {
    /// Container image of the broker, e.g. `ghcr.io/ferrymq/ferrymq:0.1.0`.
    #[schemars(length(min = 1))]
    pub image: String,
    /// Image pull policy (`Always`, `IfNotPresent`, `Never`); the Kubernetes default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<PullPolicy>,
    /// Secrets for pulling the image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<LocalObjectReference>,
    /// Broker pods. With Kafka + PostgreSQL storage every pod is an active node of one cluster
    /// (the scale subresource and an HPA set this); embedded storage allows at most 1.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0))]
    pub replicas: i32,
    /// MQTT listeners, each a container port and a port on the client Service.
    #[serde(default = "default_listeners")]
    #[schemars(length(min = 1, max = 16), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    #[x_kube(
        validation = Rule::new("self.all(l, self.exists_one(m, m.port == l.port))")
            .message("two listeners use the same port"),
    )]
    pub listeners: Vec<Listener>,
    /// CPU and memory for the broker container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Pod scheduling and metadata settings.
    #[serde(default)]
    pub pod: PodSettings,
    /// Where durable state lives: exactly one of `embedded` and `kafkaPostgres`.
    pub storage: Storage,
    /// Limits of each persistent DEVICE session's queue (`[device]` in the broker config).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_queue: Option<DeviceQueue>,
    /// Retention of each APPLICATION client's log (`[application]` in the broker config).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub application_log: Option<ApplicationLog>,
    /// Authentication (`[auth]` in the broker config).
    #[serde(default)]
    pub auth: AuthSpec,
    /// The broker's HTTP port: Prometheus metrics, health probes, admin API.
    #[serde(default)]
    pub metrics: MetricsSpec,
    /// The PodDisruptionBudget over the broker pods.
    #[serde(default)]
    pub disruption_budget: DisruptionBudget,
    /// Extra broker configuration, merged into the rendered TOML (same keys as the config file,
    /// e.g. `{"limits": {"max_inflight": 64}}`). Keys the operator owns
    /// ([`OPERATOR_OWNED_CONFIG_KEYS`]) are refused by the operator, which reports
    /// `Stalled`/`InvalidSpec`. Not by a CEL rule: the API server type-checks rules against the
    /// schema, and the fields of this free-form object are undefined there (it refused the CRD
    /// with `undefined field 'listeners'`; declaring the keys without a type, or making the object
    /// a map, was refused too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<ConfigOverrides>,
}

/// Top-level keys of the broker config that the operator renders from the spec and that
/// `spec.config` may therefore not set: the operator checks them when it renders and reports
/// `Stalled`/`InvalidSpec`.
pub const OPERATOR_OWNED_CONFIG_KEYS: [&str; 8] = [
    "listeners",
    "data_dir",
    "storage",
    "http",
    "kafka",
    "postgres",
    "application_clients",
    // Kafka + PostgreSQL pods are the nodes of one cluster; a pod outside it would fight the
    // others for the schema.
    "cluster",
];

/// Free-form broker configuration overrides (a TOML document as JSON). Its schema is an object
/// whose content the API server keeps as given; the operator checks it against the broker's
/// config format when it renders the ConfigMap.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(transparent)]
pub struct ConfigOverrides(pub BTreeMap<String, serde_json::Value>);

impl JsonSchema for ConfigOverrides {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "ConfigOverrides".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "object",
            "x-kubernetes-preserve-unknown-fields": true
        })
    }
}

/// A broker on embedded storage with the default listener and no image: what serde fills in
/// for every defaulted field (the image has no default, so this alone is not a valid spec).
impl Default for MqttBrokerSpec {
    fn default() -> Self {
        MqttBrokerSpec {
            image: String::new(),
            image_pull_policy: None,
            image_pull_secrets: Vec::new(),
            replicas: default_replicas(),
            listeners: default_listeners(),
            resources: None,
            pod: PodSettings::default(),
            storage: Storage {
                embedded: Some(EmbeddedStorage {
                    size: default_pvc_size(),
                    storage_class_name: None,
                    fsync: true,
                }),
                kafka_postgres: None,
            },
            device_queue: None,
            application_log: None,
            auth: AuthSpec::default(),
            metrics: MetricsSpec::default(),
            disruption_budget: DisruptionBudget::default(),
            config: None,
        }
    }
}

fn default_replicas() -> i32 {
    1
}

fn default_listeners() -> Vec<Listener> {
    vec![Listener {
        name: "mqtt".into(),
        port: 1883,
        protocol: ListenerProtocol::Mqtt,
        tls_secret_ref: None,
        service: ListenerService::default(),
    }]
}

/// Image pull policy.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

impl PullPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        }
    }
}

/// One MQTT listener.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("(self.protocol == 'mqtts' || self.protocol == 'wss') == has(self.tlsSecretRef)")
        .message("tlsSecretRef is required for mqtts and wss listeners and not allowed for mqtt and ws")
)]
pub struct Listener {
    /// Listener name: a DNS label, used as the port name on the pods and Services.
    #[schemars(
        length(min = 1, max = 15),
        regex(pattern = r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Port the broker binds in the pod and the Service exposes.
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// Transport: `mqtt` (TCP), `mqtts` (TLS), `ws` (WebSocket), `wss` (WebSocket over TLS).
    #[serde(default)]
    pub protocol: ListenerProtocol,
    /// Secret of type `kubernetes.io/tls` (`tls.crt`, `tls.key`) for `mqtts` and `wss`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_secret_ref: Option<LocalObjectRef>,
    /// How the client Service exposes this listener.
    #[serde(default)]
    pub service: ListenerService,
}

/// Listener transport.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ListenerProtocol {
    #[default]
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
}

/// Service settings of a listener. Listeners with the same type and annotations share one
/// client Service.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ListenerService {
    /// Service type: `ClusterIP` (default), `NodePort` or `LoadBalancer`.
    #[serde(default, rename = "type")]
    pub type_: ServiceType,
    /// Annotations on the Service (cloud load-balancer settings, for instance).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// `spec.loadBalancerClass` of a `LoadBalancer` Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer_class: Option<String>,
}

/// Kubernetes Service type.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, JsonSchema,
)]
pub enum ServiceType {
    #[default]
    ClusterIP,
    NodePort,
    LoadBalancer,
}

impl ServiceType {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceType::ClusterIP => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
        }
    }
}

/// Pod settings copied into the StatefulSet's pod template.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodSettings {
    /// Extra labels on the pods (the operator's own selector labels win).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Extra annotations on the pods.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub topology_spread_constraints: Vec<TopologySpreadConstraint>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    /// Pod security context; the operator defaults to non-root with a read-only root file system
    /// when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_context: Option<PodSecurityContext>,
    /// Security context of the broker container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_security_context: Option<SecurityContext>,
    /// Seconds a pod has to shut down (the broker needs about 10 s: 5 s for connections, 5 s for
    /// pending writes, after its drain). Default 30; with Kafka + PostgreSQL, the preStop
    /// pause + `shutdown.drain_secs` + 15 (40 by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub termination_grace_period_seconds: Option<i64>,
}

/// Storage backend: exactly one of the two.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.embedded) != has(self.kafkaPostgres)")
        .message("set exactly one of storage.embedded and storage.kafkaPostgres"),
    validation = Rule::new("has(self.embedded) == has(oldSelf.embedded)")
        .message("the storage backend cannot be changed; create a new MqttBroker")
)]
pub struct Storage {
    /// Embedded storage (redb) on a PersistentVolumeClaim per pod: one replica only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embedded: Option<EmbeddedStorage>,
    /// Kafka (publish log, APPLICATION logs) + PostgreSQL (everything else).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka_postgres: Option<KafkaPostgresStorage>,
}

/// The PersistentVolumeClaim of embedded storage.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
// `self == oldSelf` on an optional field runs only when the old and the new object both have it,
// so it cannot refuse unset -> set (or set -> unset); this rule on the parent does.
#[x_kube(
    validation = Rule::new("has(self.storageClassName) == has(oldSelf.storageClassName)")
        .message("storageClassName is immutable")
)]
pub struct EmbeddedStorage {
    /// Requested volume size, e.g. `10Gi`. Immutable here; grow the PVC itself if the storage
    /// class allows it.
    #[serde(default = "default_pvc_size")]
    #[x_kube(validation = Rule::new("self == oldSelf").message("size is immutable"))]
    pub size: Quantity,
    /// Storage class of the claim; the cluster default when absent. Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self == oldSelf").message("storageClassName is immutable"))]
    pub storage_class_name: Option<String>,
    /// fsync every group commit. Leave on: an acknowledged message must survive a crash.
    #[serde(default = "default_true")]
    pub fsync: bool,
}

fn default_pvc_size() -> Quantity {
    Quantity("1Gi".into())
}

fn default_true() -> bool {
    true
}

/// Kafka + PostgreSQL storage.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct KafkaPostgresStorage {
    pub kafka: KafkaSpec,
    pub postgres: PostgresSpec,
}

/// The broker's Kafka cluster (`[kafka]` in the broker config).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct KafkaSpec {
    /// `host:port[,host:port…]`.
    #[schemars(length(min = 1))]
    pub bootstrap_servers: String,
    /// Prefix of every topic (`<prefix>.msg.all`, `<prefix>.app.<client>`) and consumer group.
    /// Immutable: a new prefix is a new, empty broker.
    #[serde(default = "default_topic_prefix")]
    #[schemars(length(min = 1, max = 150), regex(pattern = r"^[a-zA-Z0-9._-]+$"))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("topicPrefix is immutable"))]
    pub topic_prefix: String,
    /// Partitions of `<prefix>.msg.all`, which the operator creates. May grow, never shrink.
    #[serde(default = "default_msg_all_partitions")]
    #[schemars(range(min = 1, max = 10000))]
    #[x_kube(validation = Rule::new("self >= oldSelf").message("msgAllPartitions may grow, never shrink"))]
    pub msg_all_partitions: i32,
    /// Replication factor of the topics the broker and operator create; -1 takes the cluster's
    /// `default.replication.factor`. Use 3 in production.
    #[serde(default = "default_replication_factor")]
    #[schemars(range(min = -1, max = 32767))]
    pub replication_factor: i32,
    /// Create `<prefix>.app.<client>` when an APPLICATION client first connects. With `false`
    /// only ApplicationClient resources (or an administrator) create those topics.
    #[serde(default = "default_true")]
    pub auto_create_application_topics: bool,
    /// A Secret whose keys are librdkafka properties (`security.protocol`, `sasl.username`,
    /// `sasl.password`, `ssl.ca.pem`…) for the broker and the operator. `bootstrap.servers`,
    /// `acks` and `enable.idempotence` are refused (the broker sets them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub properties_secret_ref: Option<LocalObjectRef>,
}

fn default_topic_prefix() -> String {
    "ferrymq".into()
}

fn default_msg_all_partitions() -> i32 {
    16
}

fn default_replication_factor() -> i32 {
    -1
}

/// The broker's PostgreSQL database (`[postgres]` in the broker config).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.urlSecretRef) != has(self.adminSecretRef)")
        .message("set exactly one of urlSecretRef (an existing role) and adminSecretRef (the operator provisions a role)")
)]
pub struct PostgresSpec {
    /// The broker's connection URL (`postgres://user:password@host:port/db`) in a Secret key.
    /// The role must own (or be able to create) `schema`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_secret_ref: Option<SecretKeyRef>,
    /// An administrator's connection URL in a Secret key. The operator then creates a role
    /// `<schema>_broker` and the schema owned by it, and writes the broker's URL into the Secret
    /// `<broker name>-postgres` (key `url`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_secret_ref: Option<SecretKeyRef>,
    /// The schema holding the broker's tables. One broker per schema. Immutable.
    #[serde(default = "default_schema")]
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z_][a-z0-9_]*$"))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("schema is immutable"))]
    pub schema: String,
    /// Connection pool size of each broker pod, at least 2.
    #[serde(default = "default_pg_max_connections")]
    #[schemars(range(min = 2, max = 1000))]
    pub max_connections: u32,
}

fn default_schema() -> String {
    "ferrymq".into()
}

fn default_pg_max_connections() -> u32 {
    8
}

/// `[device]` limits.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceQueue {
    /// Entries kept per DEVICE queue; beyond it the oldest is dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub queue_limit: Option<u64>,
    /// Lifetime of a queued entry, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub message_ttl_secs: Option<u64>,
}

/// `[application]` retention.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApplicationLog {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub retention_secs: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub retention_bytes: Option<u64>,
}

/// `[auth]` settings the operator renders; the rest (`jwt`, `x509`, ACLs) go in `config`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthSpec {
    /// Let clients without credentials connect.
    #[serde(default)]
    pub allow_anonymous: bool,
    /// Providers asked in order.
    #[serde(default = "default_providers")]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub providers: Vec<AuthProvider>,
}

impl Default for AuthSpec {
    fn default() -> Self {
        AuthSpec {
            allow_anonymous: false,
            providers: default_providers(),
        }
    }
}

fn default_providers() -> Vec<AuthProvider> {
    vec![AuthProvider::Store]
}

/// An authentication provider.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AuthProvider {
    Store,
    X509,
    Jwt,
}

impl AuthProvider {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthProvider::Store => "store",
            AuthProvider::X509 => "x509",
            AuthProvider::Jwt => "jwt",
        }
    }
}

/// The broker's HTTP endpoint.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct MetricsSpec {
    /// Port of `/metrics`, `/health/live`, `/health/ready` and the admin API.
    #[serde(default = "default_http_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// A Prometheus Operator ServiceMonitor for the broker pods. Created only when its CRD
    /// (`monitoring.coreos.com/v1`) is installed; otherwise the broker reports it in an Event.
    #[serde(default)]
    pub service_monitor: ServiceMonitorSpec,
}

impl Default for MetricsSpec {
    fn default() -> Self {
        MetricsSpec {
            port: default_http_port(),
            service_monitor: ServiceMonitorSpec::default(),
        }
    }
}

fn default_http_port() -> i32 {
    8083
}

/// ServiceMonitor settings.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceMonitorSpec {
    #[serde(default)]
    pub enabled: bool,
    /// Scrape interval, e.g. `30s`; Prometheus' default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(ms|s|m|h)$"))]
    pub interval: Option<String>,
    /// Labels on the ServiceMonitor (for a Prometheus `serviceMonitorSelector`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// The PodDisruptionBudget.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!(has(self.minAvailable) && has(self.maxUnavailable))")
        .message("set at most one of minAvailable and maxUnavailable")
)]
pub struct DisruptionBudget {
    /// Create the PodDisruptionBudget.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// `minAvailable` of the budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_available: Option<IntOrString>,
    /// `maxUnavailable` of the budget; 1 when neither is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_unavailable: Option<IntOrString>,
}

impl Default for DisruptionBudget {
    fn default() -> Self {
        DisruptionBudget {
            enabled: true,
            min_available: None,
            max_unavailable: None,
        }
    }
}

/// Observed state of a broker.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct MqttBrokerStatus {
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Pods of the StatefulSet (the scale subresource reads it).
    #[serde(default)]
    pub replicas: i32,
    #[serde(default)]
    pub ready_replicas: i32,
    /// Pods running the current pod template.
    #[serde(default)]
    pub updated_replicas: i32,
    /// Label selector of the pods, as a string (the scale subresource reads it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// `embedded` or `kafka+postgres`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_backend: Option<String>,
    /// Where clients connect, one per listener.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<Endpoint>,
    /// Hash of the rendered configuration the pods run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_hash: Option<String>,
    /// Ready, Reconciling, Stalled, KafkaReachable, PostgresReachable.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// A client endpoint of a listener.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    pub listener: String,
    /// In-cluster DNS name of the client Service.
    pub host: String,
    pub port: i32,
    /// `mqtt://host:port` (or `mqtts`, `ws`, `wss`).
    pub url: String,
}

impl MqttBrokerSpec {
    /// The broker's `storage.backend` value.
    pub fn storage_backend(&self) -> &'static str {
        if self.storage.kafka_postgres.is_some() {
            "kafka+postgres"
        } else {
            "embedded"
        }
    }
}
