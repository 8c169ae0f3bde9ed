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
}

/// The broker configuration file for `spec`.
pub fn render(spec: &MqttBrokerSpec) -> Result<String, RenderError> {
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
        // Every pod runs this config: one takes the schema's node lock and serves, the others
        // wait as standbys and take over when it goes away (see `broker::roll_pods`).
        postgres.insert("standby".into(), true.into());
        root.insert("postgres".into(), postgres.into());
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
        let toml: Table = render(&s).unwrap().parse().unwrap();
        assert_eq!(toml["limits"]["max_inflight"].as_integer(), Some(64));
        assert_eq!(toml["auth"]["failure_burst"].as_integer(), Some(3));
        assert_eq!(toml["auth"]["allow_anonymous"].as_bool(), Some(true));

        let s = spec(json!({"image": "x", "storage": {"embedded": {}}, "config": {"http": {}}}));
        assert_eq!(render(&s), Err(RenderError::OwnedKey("http".into())));
        let s = spec(json!({"image": "x", "storage": {"embedded": {}}, "config": {"limits": 3}}));
        assert_eq!(render(&s), Err(RenderError::NotATable("limits".into())));
        let s = spec(
            json!({"image": "x", "storage": {"embedded": {}}, "config": {"limits": {"a": null}}}),
        );
        assert!(matches!(
            render(&s),
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
        let rendered = render(&s).unwrap();
        let toml: Table = rendered.parse().unwrap();
        assert!(toml["postgres"].get("url").is_none());
        assert!(toml["kafka"].get("properties").is_none());
        assert!(!rendered.contains("pg"));
    }
}
