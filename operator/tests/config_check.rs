//! The ConfigMap the operator renders, fed to the real broker: `ferrymq --check-config` must
//! accept it and print back the values the spec asked for. This is what keeps the operator and
//! the broker's configuration format from drifting apart.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use ferrymq_crds::MqttBrokerSpec;
use serde_json::json;

/// The broker binary: `FERRYMQ_BIN` when set (CI can point it at a build it already has), else
/// a build of this workspace's `ferrymq-broker`, located through cargo's own JSON output so it
/// works whatever `CARGO_TARGET_DIR` is.
fn broker_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("FERRYMQ_BIN") {
            return PathBuf::from(bin);
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let out = Command::new(cargo)
            .args([
                "build",
                "-p",
                "ferrymq-broker",
                "--bin",
                "ferrymq",
                "--message-format=json-render-diagnostics",
            ])
            .current_dir(&workspace)
            .output()
            .expect("running cargo build -p ferrymq-broker");
        assert!(
            out.status.success(),
            "cargo build -p ferrymq-broker failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "ferrymq")
            .find_map(|m| m["executable"].as_str().map(PathBuf::from))
            .expect("cargo reported the ferrymq executable")
    })
    .clone()
}

/// Runs `ferrymq --config <rendered> --check-config` with a clean environment (a `FERRYMQ_*`
/// variable of the developer's shell must not change the outcome) and returns the effective
/// configuration it prints.
fn check(spec: serde_json::Value) -> toml::Table {
    let spec: MqttBrokerSpec = serde_json::from_value(spec).expect("valid spec");
    let rendered = ferrymq_operator::config::render(&spec).expect("renders");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("ferrymq.toml");
    std::fs::write(&file, &rendered).expect("write config");
    let out = Command::new(broker_bin())
        .arg("--config")
        .arg(&file)
        .arg("--check-config")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .output()
        .expect("running ferrymq --check-config");
    assert!(
        out.status.success(),
        "ferrymq --check-config refused the rendered config:\n{rendered}\n--- stderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .parse()
        .expect("--check-config prints TOML")
}

#[test]
fn embedded_broker_config_is_accepted() {
    let effective = check(json!({
        "image": "ferrymq:test",
        "listeners": [{"name": "mqtt", "port": 1883}, {"name": "internal", "port": 1884}],
        "storage": {"embedded": {"size": "5Gi", "fsync": true}},
        "deviceQueue": {"queueLimit": 500, "messageTtlSecs": 3600},
        "applicationLog": {"retentionSecs": 7200, "retentionBytes": 1048576},
        "auth": {"allowAnonymous": false, "providers": ["store", "jwt"]},
        "metrics": {"port": 9100},
        "config": {
            "limits": {"max_inflight": 64},
            "auth": {"jwt": {"algorithm": "HS256", "secret": "0123456789abcdef0123456789abcdef",
                             "issuer": "https://issuer", "audience": "ferrymq"}}
        }
    }));
    assert_eq!(effective["data_dir"].as_str(), Some("/var/lib/ferrymq"));
    let listeners = effective["listeners"].as_array().unwrap();
    assert_eq!(listeners.len(), 2);
    assert_eq!(listeners[0]["name"].as_str(), Some("mqtt"));
    assert_eq!(listeners[0]["bind"].as_str(), Some("0.0.0.0:1883"));
    assert_eq!(listeners[1]["bind"].as_str(), Some("0.0.0.0:1884"));
    assert_eq!(effective["storage"]["backend"].as_str(), Some("embedded"));
    assert_eq!(effective["device"]["queue_limit"].as_integer(), Some(500));
    assert_eq!(
        effective["device"]["message_ttl_secs"].as_integer(),
        Some(3600)
    );
    assert_eq!(
        effective["application"]["retention_secs"].as_integer(),
        Some(7200)
    );
    assert_eq!(effective["limits"]["max_inflight"].as_integer(), Some(64));
    assert_eq!(effective["auth"]["allow_anonymous"].as_bool(), Some(false));
    let providers: Vec<_> = effective["auth"]["providers"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p.as_str())
        .collect();
    assert_eq!(providers, ["store", "jwt"]);
    assert_eq!(effective["http"]["bind"].as_str(), Some("0.0.0.0:9100"));
    assert_eq!(effective["http"]["enabled"].as_bool(), Some(true));
}

#[test]
fn kafka_postgres_broker_config_is_accepted() {
    let effective = check(json!({
        "image": "ferrymq:test",
        "replicas": 3,
        "storage": {"kafkaPostgres": {
            "kafka": {"bootstrapServers": "kafka-0:9092,kafka-1:9092", "topicPrefix": "prod",
                      "msgAllPartitions": 32, "replicationFactor": 3,
                      "autoCreateApplicationTopics": false,
                      "propertiesSecretRef": {"name": "kafka-props"}},
            "postgres": {"urlSecretRef": {"name": "pg", "key": "url"}, "schema": "ferrymq_prod",
                         "maxConnections": 16}
        }}
    }));
    assert_eq!(
        effective["storage"]["backend"].as_str(),
        Some("kafka+postgres")
    );
    let kafka = &effective["kafka"];
    assert_eq!(
        kafka["bootstrap_servers"].as_str(),
        Some("kafka-0:9092,kafka-1:9092")
    );
    assert_eq!(kafka["topic_prefix"].as_str(), Some("prod"));
    assert_eq!(kafka["msg_all_partitions"].as_integer(), Some(32));
    assert_eq!(kafka["replication_factor"].as_integer(), Some(3));
    assert_eq!(
        kafka["auto_create_application_topics"].as_bool(),
        Some(false)
    );
    assert_eq!(
        effective["postgres"]["schema"].as_str(),
        Some("ferrymq_prod")
    );
    assert_eq!(
        effective["postgres"]["max_connections"].as_integer(),
        Some(16)
    );
}

/// TLS and WebSocket listeners: `protocol`, `cert_file` and `key_file` on `[[listeners]]`.
/// Main gained these keys minutes before this branch's deadline; this test has not yet been run
/// against that broker (which may also require the certificate files to exist at check time).
#[test]
#[ignore = "not yet run against the broker with TLS/WebSocket listeners (merged from main at the deadline)"]
fn tls_and_websocket_listeners_are_accepted() {
    let effective = check(json!({
        "image": "ferrymq:test",
        "listeners": [
            {"name": "mqtt", "port": 1883},
            {"name": "mqtts", "port": 8883, "protocol": "mqtts", "tlsSecretRef": {"name": "tls"}},
            {"name": "ws", "port": 8080, "protocol": "ws"},
            {"name": "wss", "port": 8084, "protocol": "wss", "tlsSecretRef": {"name": "tls"}}
        ],
        "storage": {"embedded": {}}
    }));
    let listeners = effective["listeners"].as_array().unwrap();
    assert_eq!(listeners[1]["protocol"].as_str(), Some("mqtts"));
    assert_eq!(
        listeners[1]["cert_file"].as_str(),
        Some("/etc/ferrymq/tls/mqtts/tls.crt")
    );
    assert_eq!(
        listeners[1]["key_file"].as_str(),
        Some("/etc/ferrymq/tls/mqtts/tls.key")
    );
    assert_eq!(listeners[2]["protocol"].as_str(), Some("ws"));
    assert_eq!(listeners[3]["protocol"].as_str(), Some("wss"));
}
