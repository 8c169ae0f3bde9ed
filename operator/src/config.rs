//! Renders an `MqttBroker` spec as the broker's own TOML configuration file (the format of
//! `broker/src/config.rs`, documented in docs/configuration.md).
//!
//! Secrets never go into the file: the PostgreSQL URL and the librdkafka properties reach the
//! broker as `FERRYMQ_*` environment variables from Secrets (see `resources::statefulset`), and
//! TLS keys as mounted files. A test feeds the rendered file to the real `ferrymq --check-config`
//! so this module and the broker's parser cannot drift apart.

use ferrymq_crds::{ConfigOverrides, MqttBrokerSpec};
use toml::{Table, Value};

/// Where the ConfigMap is mounted in the broker container.
pub const CONFIG_DIR: &str = "/etc/ferrymq";
/// The key of the config file in the ConfigMap (and its file name under `CONFIG_DIR`).
pub const CONFIG_FILE: &str = "ferrymq.toml";
/// The broker's data directory: the PVC (embedded) or an emptyDir (Kafka + PostgreSQL, where it
/// holds nothing durable).
pub const DATA_DIR: &str = "/var/lib/ferrymq";
/// Parent of the per-listener TLS Secret mounts: `<TLS_DIR>/<listener>/tls.crt`.
pub const TLS_DIR: &str = "/etc/ferrymq/tls";

/// Top-level keys the operator derives from the spec; `spec.config` may not set them (the CRD
/// refuses them too, this is the same rule for objects that predate it). One list, in the CRD
/// crate, so the CRD's schema and rule and this check cannot disagree.
pub const OWNED_KEYS: &[&str] = &ferrymq_crds::OPERATOR_OWNED_CONFIG_KEYS;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RenderError {
    #[error("spec.config.{0} is set by the operator from the spec and may not be overridden")]
    OwnedKey(String),
    #[error("spec.config.{path}: {reason}")]
    InvalidOverride { path: String, reason: String },
    #[error("spec.config.{0} must be a table, as in the broker's configuration file")]
    NotATable(String),
    #[error("spec.replicas is {0}: embedded storage belongs to one pod, so at most 1 (use storage.kafkaPostgres for several active nodes)")]
    EmbeddedReplicas(i32),
    #[error("spec.pod.terminationGracePeriodSeconds ({grace}) must cover the preStop pause ({pre_stop} s), spec.config.shutdown.drain_secs ({drain}) and the broker's final shutdown ({SHUTDOWN_SECS} s): at least {}", pre_stop + drain + SHUTDOWN_SECS)]
    GraceTooShort {
        grace: i64,
        pre_stop: i64,
        drain: i64,
    },
}

/// Seconds the broker takes after a drain to close what is left and flush its writes (5 s for
/// connections, 5 s for pending writes, and a margin).
pub const SHUTDOWN_SECS: i64 = 15;
/// The drain period a Kafka + PostgreSQL broker gets unless `spec.config.shutdown.drain_secs`
/// says otherwise: long enough that a rolling restart moves clients to the other nodes
/// gradually, short enough that a rollout of a few pods takes minutes, not hours.
pub const DEFAULT_DRAIN_SECS: i64 = 20;
/// The `preStop` pause before the broker gets SIGTERM: the time the endpoints controller and
/// kube-proxy (or the load balancer) take to stop sending new connections to a terminating
/// pod, so that the connections it drains do not come straight back to it.
pub const PRE_STOP_SECS: i64 = 5;
/// The pod's grace period when the spec sets none and nothing drains (as before draining).
pub const DEFAULT_GRACE_SECS: i64 = 30;

/// How a broker pod stops: the `preStop` pause, the broker's drain period, and the pod's
/// `terminationGracePeriodSeconds`, which must cover both and the final shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopping {
    /// 0: no `preStop` hook.
    pub pre_stop_secs: i64,
    /// `shutdown.drain_secs` as rendered; 0: the broker closes every connection at once.
    pub drain_secs: i64,
    pub grace_secs: i64,
}

/// The stopping timings of `spec`. Kafka + PostgreSQL brokers drain (their clients have other
/// nodes to go to) for [`DEFAULT_DRAIN_SECS`], or for `spec.config.shutdown.drain_secs`; an
/// explicit grace period shorter than the default drain shortens the drain to fit, but one
/// shorter than an explicit drain is refused. Embedded brokers drain only when asked to.
pub fn stopping(spec: &MqttBrokerSpec) -> Result<Stopping, RenderError> {
    let explicit_drain =
        match spec
            .config
            .as_ref()
            .and_then(|c| c.0.get("shutdown"))
            .and_then(|s| s.get("drain_secs"))
        {
            None => None,
            Some(v) => Some(v.as_i64().filter(|d| *d >= 0).ok_or_else(|| {
                RenderError::InvalidOverride {
                    path: "shutdown.drain_secs".into(),
                    reason: "must be a whole number of seconds".into(),
                }
            })?),
        };
    let grace = spec.pod.termination_grace_period_seconds;
    let default_drain = if spec.storage.kafka_postgres.is_some() {
        DEFAULT_DRAIN_SECS
    } else {
        0
    };
    let drain = match (explicit_drain, grace) {
        (Some(d), _) => d,
        // Fit the default drain into the grace period the user chose.
        (None, Some(g)) => default_drain.min(g - PRE_STOP_SECS - SHUTDOWN_SECS).max(0),
        (None, None) => default_drain,
    };
    let pre_stop = if drain > 0 { PRE_STOP_SECS } else { 0 };
    let needed = pre_stop + drain + SHUTDOWN_SECS;
    let grace_secs = match grace {
        Some(g) if drain > 0 && g < needed => {
            return Err(RenderError::GraceTooShort {
                grace: g,
                pre_stop,
                drain,
            })
        }
        Some(g) => g,
        None if drain > 0 => needed,
        None => DEFAULT_GRACE_SECS,
    };
    Ok(Stopping {
        pre_stop_secs: pre_stop,
        drain_secs: drain,
        grace_secs,
    })
}

/// The broker configuration file for `broker`. Its draining pods refer v5 clients to its
/// client Service when every listener is behind the same one (a client keeps its port, which
/// that Service exposes); one reference cannot name several Services, so then none.
pub fn render_for(broker: &ferrymq_crds::MqttBroker) -> Result<String, RenderError> {
    let mut hosts: Vec<String> = crate::resources::endpoints(broker)
        .into_iter()
        .map(|e| e.host)
        .collect();
    hosts.sort();
    hosts.dedup();
    let host = match hosts.as_slice() {
        [one] => one.as_str(),
        _ => "",
    };
    render(&broker.spec, host)
}

/// The broker configuration file for `spec`. `service_host` is the in-cluster DNS name of the
/// broker's client Service, where a draining pod sends its v5 clients (Server Reference), or
/// empty for none.
pub fn render(spec: &MqttBrokerSpec, service_host: &str) -> Result<String, RenderError> {
    if spec.storage.kafka_postgres.is_none() && spec.replicas > 1 {
        // The CRD refuses this too; this catches objects that predate the rule.
        return Err(RenderError::EmbeddedReplicas(spec.replicas));
    }
    let stopping = stopping(spec)?;
    let mut root = Table::new();
    root.insert("data_dir".into(), DATA_DIR.into());

    let listeners = spec
        .listeners
        .iter()
        .map(|l| {
            let mut t = Table::new();
            t.insert("name".into(), l.name.clone().into());
            t.insert("bind".into(), format!("0.0.0.0:{}", l.port).into());
            // Plain MQTT is the broker's default protocol; leaving the key out keeps the file
            // readable by brokers that predate the other transports.
            if l.protocol != ferrymq_crds::ListenerProtocol::Mqtt {
                t.insert("protocol".into(), l.protocol.as_str().into());
            }
            if l.protocol.is_tls() {
                t.insert(
                    "cert_file".into(),
                    format!("{TLS_DIR}/{}/tls.crt", l.name).into(),
                );
                t.insert(
                    "key_file".into(),
                    format!("{TLS_DIR}/{}/tls.key", l.name).into(),
                );
            }
            Value::Table(t)
        })
        .collect();
    root.insert("listeners".into(), Value::Array(listeners));

    let mut storage = Table::new();
    storage.insert("backend".into(), spec.storage_backend().into());
    if let Some(embedded) = &spec.storage.embedded {
        storage.insert("fsync".into(), embedded.fsync.into());
    }
    root.insert("storage".into(), storage.into());

    if let Some(kp) = &spec.storage.kafka_postgres {
        let mut kafka = Table::new();
        kafka.insert(
            "bootstrap_servers".into(),
            kp.kafka.bootstrap_servers.clone().into(),
        );
        kafka.insert("topic_prefix".into(), kp.kafka.topic_prefix.clone().into());
        kafka.insert(
            "msg_all_partitions".into(),
            i64::from(kp.kafka.msg_all_partitions).into(),
        );
        kafka.insert(
            "replication_factor".into(),
            i64::from(kp.kafka.replication_factor).into(),
        );
        kafka.insert(
            "auto_create_application_topics".into(),
            kp.kafka.auto_create_application_topics.into(),
        );
        root.insert("kafka".into(), kafka.into());

        let mut postgres = Table::new();
        postgres.insert("schema".into(), kp.postgres.schema.clone().into());
        postgres.insert(
            "max_connections".into(),
            i64::from(kp.postgres.max_connections).into(),
        );
        root.insert("postgres".into(), postgres.into());

        // Every pod is an active node of one cluster (docs/scale-out.md): `replicas` is the
        // number of active nodes. Each pod's node id is its name, which the StatefulSet keeps
        // stable across restarts; it reaches the broker as FERRYMQ_CLUSTER__NODE_ID from the
        // downward API (`resources::stateful_set`), not from this file, which all pods share.
        let mut cluster = Table::new();
        cluster.insert("enabled".into(), true.into());
        root.insert("cluster".into(), cluster.into());
    }

    if stopping.drain_secs > 0 {
        let mut shutdown = Table::new();
        shutdown.insert("drain_secs".into(), stopping.drain_secs.into());
        if !service_host.is_empty() {
            shutdown.insert("server_reference".into(), service_host.into());
        }
        root.insert("shutdown".into(), shutdown.into());
    }

    if let Some(device) = &spec.device_queue {
        let mut t = Table::new();
        insert_u64(&mut t, "queue_limit", device.queue_limit);
        insert_u64(&mut t, "message_ttl_secs", device.message_ttl_secs);
        if !t.is_empty() {
            root.insert("device".into(), t.into());
        }
    }
    if let Some(app) = &spec.application_log {
        let mut t = Table::new();
        insert_u64(&mut t, "retention_secs", app.retention_secs);
        insert_u64(&mut t, "retention_bytes", app.retention_bytes);
        if !t.is_empty() {
            root.insert("application".into(), t.into());
        }
    }

    let mut auth = Table::new();
    auth.insert("allow_anonymous".into(), spec.auth.allow_anonymous.into());
    auth.insert(
        "providers".into(),
        Value::Array(
            spec.auth
                .providers
                .iter()
                .map(|p| p.as_str().into())
                .collect(),
        ),
    );
    root.insert("auth".into(), auth.into());

    let mut http = Table::new();
    http.insert("enabled".into(), true.into());
    http.insert(
        "bind".into(),
        format!("0.0.0.0:{}", spec.metrics.port).into(),
    );
    root.insert("http".into(), http.into());

    if let Some(overrides) = &spec.config {
        merge_overrides(&mut root, overrides)?;
    }

    let body = toml::to_string(&root).map_err(|e| RenderError::InvalidOverride {
        path: String::new(),
        reason: e.to_string(),
    })?;
    Ok(format!(
        "# Rendered by ferrymq-operator from the MqttBroker spec; edits here are overwritten.\n{body}"
    ))
}

fn insert_u64(t: &mut Table, key: &str, value: Option<u64>) {
    if let Some(v) = value {
        // TOML integers are i64; the CRD bounds these far below i64::MAX, and a larger value
        // saturates (the broker then reports it as out of range with the key's name).
        t.insert(key.into(), i64::try_from(v).unwrap_or(i64::MAX).into());
    }
}

/// Deep-merges `spec.config` into the rendered table: tables merge key by key, anything else
/// replaces. Keys the operator owns are refused.
fn merge_overrides(root: &mut Table, overrides: &ConfigOverrides) -> Result<(), RenderError> {
    for (key, value) in &overrides.0 {
        if OWNED_KEYS.contains(&key.as_str()) {
            return Err(RenderError::OwnedKey(key.clone()));
        }
        let value = json_to_toml(key, value)?;
        if !value.is_table() {
            return Err(RenderError::NotATable(key.clone()));
        }
        merge_value(root, key, value);
    }
    Ok(())
}

fn merge_value(into: &mut Table, key: &str, value: Value) {
    match (into.get_mut(key), value) {
        (Some(Value::Table(existing)), Value::Table(new)) => {
            for (k, v) in new {
                merge_value(existing, &k, v);
            }
        }
        (_, value) => {
            into.insert(key.to_string(), value);
        }
    }
}

fn json_to_toml(path: &str, value: &serde_json::Value) -> Result<Value, RenderError> {
    use serde_json::Value as J;
    Ok(match value {
        J::Null => {
            return Err(RenderError::InvalidOverride {
                path: path.into(),
                reason: "null has no TOML form; leave the key out for its default".into(),
            })
        }
        J::Bool(b) => Value::Boolean(*b),
        J::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::Integer(i)
            } else if let Some(f) = n.as_f64().filter(|_| !n.is_u64()) {
                Value::Float(f)
            } else {
                return Err(RenderError::InvalidOverride {
                    path: path.into(),
                    reason: format!("{n} is out of the TOML integer range"),
                });
            }
        }
        J::String(s) => Value::String(s.clone()),
        J::Array(items) => Value::Array(
            items
                .iter()
                .enumerate()
                .map(|(i, v)| json_to_toml(&format!("{path}[{i}]"), v))
                .collect::<Result<_, _>>()?,
        ),
        J::Object(map) => {
            let mut t = Table::new();
            for (k, v) in map {
                t.insert(k.clone(), json_to_toml(&format!("{path}.{k}"), v)?);
            }
            Value::Table(t)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(v: serde_json::Value) -> MqttBrokerSpec {
        serde_json::from_value(v).expect("valid spec")
    }

    #[test]
    fn overrides_merge_into_tables_and_owned_keys_are_refused() {
        let s = spec(json!({
            "image": "x",
            "storage": {"embedded": {}},
            "auth": {"allowAnonymous": true},
            "config": {"limits": {"max_inflight": 64}, "auth": {"failure_burst": 3}}
        }));
        let toml: Table = render(&s, "edge.default.svc").unwrap().parse().unwrap();
        assert_eq!(toml["limits"]["max_inflight"].as_integer(), Some(64));
        assert_eq!(toml["auth"]["failure_burst"].as_integer(), Some(3));
        assert_eq!(toml["auth"]["allow_anonymous"].as_bool(), Some(true));

        let s = spec(json!({"image": "x", "storage": {"embedded": {}}, "config": {"http": {}}}));
        assert_eq!(
            render(&s, "edge.default.svc"),
            Err(RenderError::OwnedKey("http".into()))
        );
        let s = spec(json!({"image": "x", "storage": {"embedded": {}}, "config": {"limits": 3}}));
        assert_eq!(
            render(&s, "edge.default.svc"),
            Err(RenderError::NotATable("limits".into()))
        );
        let s = spec(
            json!({"image": "x", "storage": {"embedded": {}}, "config": {"limits": {"a": null}}}),
        );
        assert!(matches!(
            render(&s, "edge.default.svc"),
            Err(RenderError::InvalidOverride { path, .. }) if path == "limits.a"
        ));
    }

    #[test]
    fn secrets_stay_out_of_the_file() {
        let s = spec(json!({
            "image": "x",
            "storage": {"kafkaPostgres": {
                "kafka": {"bootstrapServers": "k:9092", "propertiesSecretRef": {"name": "kp"}},
                "postgres": {"urlSecretRef": {"name": "pg", "key": "url"}}
            }}
        }));
        let rendered = render(&s, "edge.default.svc").unwrap();
        let toml: Table = rendered.parse().unwrap();
        assert!(toml["postgres"].get("url").is_none());
        assert!(toml["kafka"].get("properties").is_none());
        assert!(!rendered.contains("pg"));
    }

    fn kafka_postgres(extra: serde_json::Value) -> MqttBrokerSpec {
        let mut v = json!({
            "image": "x",
            "replicas": 3,
            "storage": {"kafkaPostgres": {
                "kafka": {"bootstrapServers": "k:9092"},
                "postgres": {"urlSecretRef": {"name": "pg", "key": "url"}}
            }}
        });
        for (k, val) in extra.as_object().unwrap() {
            v[k] = val.clone();
        }
        spec(v)
    }

    #[test]
    fn kafka_postgres_pods_are_active_cluster_nodes_that_drain() {
        let toml: Table = render(&kafka_postgres(json!({})), "edge.default.svc")
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(toml["cluster"]["enabled"].as_bool(), Some(true));
        // The node id comes from the pod name (environment), not from the shared file.
        assert!(toml["cluster"].get("node_id").is_none());
        assert!(toml["postgres"].get("standby").is_none());
        assert_eq!(
            toml["shutdown"]["drain_secs"].as_integer(),
            Some(DEFAULT_DRAIN_SECS)
        );
        assert_eq!(
            toml["shutdown"]["server_reference"].as_str(),
            Some("edge.default.svc")
        );
        // No single client Service: no reference.
        let toml: Table = render(&kafka_postgres(json!({})), "")
            .unwrap()
            .parse()
            .unwrap();
        assert!(toml["shutdown"].get("server_reference").is_none());
        // Embedded: one node, nowhere to drain to; nothing changes.
        let embedded = spec(json!({"image": "x", "storage": {"embedded": {}}}));
        let toml: Table = render(&embedded, "edge.default.svc")
            .unwrap()
            .parse()
            .unwrap();
        assert!(toml.get("cluster").is_none());
        assert!(toml.get("shutdown").is_none());
    }

    #[test]
    fn embedded_storage_refuses_more_than_one_replica() {
        let s = spec(json!({"image": "x", "replicas": 2, "storage": {"embedded": {}}}));
        assert_eq!(render(&s, ""), Err(RenderError::EmbeddedReplicas(2)));
    }

    #[test]
    fn the_grace_period_covers_pre_stop_drain_and_shutdown() {
        let timing = |extra| stopping(&kafka_postgres(extra));
        assert_eq!(
            timing(json!({})),
            Ok(Stopping {
                pre_stop_secs: PRE_STOP_SECS,
                drain_secs: DEFAULT_DRAIN_SECS,
                grace_secs: PRE_STOP_SECS + DEFAULT_DRAIN_SECS + SHUTDOWN_SECS,
            })
        );
        // A shorter grace period chosen by the user shortens the default drain to fit ...
        let short = timing(json!({"pod": {"terminationGracePeriodSeconds": 30}})).unwrap();
        assert_eq!((short.drain_secs, short.grace_secs), (10, 30));
        // ... or turns it off when nothing fits.
        let none = timing(json!({"pod": {"terminationGracePeriodSeconds": 10}})).unwrap();
        assert_eq!((none.pre_stop_secs, none.drain_secs), (0, 0));
        // An explicit drain sets the default grace period ...
        let long = timing(json!({"config": {"shutdown": {"drain_secs": 60}}})).unwrap();
        assert_eq!(long.grace_secs, PRE_STOP_SECS + 60 + SHUTDOWN_SECS);
        // ... and one that does not fit in an explicit grace period is refused.
        assert_eq!(
            timing(json!({"config": {"shutdown": {"drain_secs": 60}},
                          "pod": {"terminationGracePeriodSeconds": 30}})),
            Err(RenderError::GraceTooShort {
                grace: 30,
                pre_stop: PRE_STOP_SECS,
                drain: 60
            })
        );
        assert!(matches!(
            timing(json!({"config": {"shutdown": {"drain_secs": "soon"}}})),
            Err(RenderError::InvalidOverride { path, .. }) if path == "shutdown.drain_secs"
        ));
        // Embedded: the grace period as before.
        let embedded = spec(json!({"image": "x", "storage": {"embedded": {}}}));
        assert_eq!(stopping(&embedded).unwrap().grace_secs, DEFAULT_GRACE_SECS);
    }
}
