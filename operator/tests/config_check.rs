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

/// Runs `ferrymq --config <rendered> --check-config` on what the operator renders for `spec`.
fn check(spec: serde_json::Value) -> toml::Table {
    let rendered = render(spec);
    let dir = tempfile::tempdir().expect("tempdir");
    check_rendered(&rendered, dir.path())
}

fn render(spec: serde_json::Value) -> String {
    let spec: MqttBrokerSpec = serde_json::from_value(spec).expect("valid spec");
    ferrymq_operator::config::render(&spec, "edge.default.svc").expect("renders")
}

/// Runs `ferrymq --config <dir>/ferrymq.toml --check-config` with a clean environment (a
/// `FERRYMQ_*` variable of the developer's shell must not change the outcome) and returns the
/// effective configuration it prints.
fn check_rendered(rendered: &str, dir: &Path) -> toml::Table {
    check_rendered_with_env(rendered, dir, &[])
}

/// [`check_rendered`] with the environment variables the pod would also have.
fn check_rendered_with_env(rendered: &str, dir: &Path, env: &[(&str, &str)]) -> toml::Table {
    let file = dir.join("ferrymq.toml");
    std::fs::write(&file, rendered).expect("write config");
    let out = Command::new(broker_bin())
        .arg("--config")
        .arg(&file)
        .arg("--check-config")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env.iter().copied())
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
    let spec = json!({
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
    });
    // Each pod gets its name as the node id from the downward API (checked on the rendered
    // StatefulSet in operator/tests/reconcile.rs); here the broker's own parser takes it.
    let dir = tempfile::tempdir().expect("tempdir");
    let effective = check_rendered_with_env(
        &render(spec),
        dir.path(),
        &[(ferrymq_operator::resources::NODE_ID_ENV, "edge-2")],
    );
    // Every pod is an active node of one cluster: no standby, no node lock.
    assert_eq!(effective["cluster"]["enabled"].as_bool(), Some(true));
    assert_eq!(effective["cluster"]["node_id"].as_str(), Some("edge-2"));
    assert_eq!(effective["postgres"]["standby"].as_bool(), Some(false));
    // A stopping pod drains its clients to the other nodes through the client Service.
    assert_eq!(
        effective["shutdown"]["drain_secs"].as_integer(),
        Some(ferrymq_operator::config::DEFAULT_DRAIN_SECS)
    );
    assert_eq!(
        effective["shutdown"]["server_reference"].as_str(),
        Some("edge.default.svc")
    );
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

/// TLS and WebSocket listeners: `protocol`, `cert_file` and `key_file` on `[[listeners]]`. The
/// broker's check requires the certificate and key files to exist, so the paths the operator
/// renders (where the StatefulSet mounts each listener's TLS Secret, `kubernetes.io/tls` keys)
/// are pointed at a self-signed pair made here; everything else is the rendered file as is.
#[test]
fn tls_and_websocket_listeners_are_accepted() {
    let spec = json!({
        "image": "ferrymq:test",
        "listeners": [
            {"name": "mqtt", "port": 1883},
            {"name": "mqtts", "port": 8883, "protocol": "mqtts", "tlsSecretRef": {"name": "tls"}},
            {"name": "ws", "port": 8080, "protocol": "ws"},
            {"name": "wss", "port": 8084, "protocol": "wss", "tlsSecretRef": {"name": "tls"}}
        ],
        "storage": {"embedded": {}}
    });
    let rendered = render(spec.clone());
    let tls_dir = ferrymq_operator::config::TLS_DIR;
    for listener in ["mqtts", "wss"] {
        for file in ["tls.crt", "tls.key"] {
            let path = format!("\"{tls_dir}/{listener}/{file}\"");
            assert!(rendered.contains(&path), "{path} in\n{rendered}");
        }
    }
    // The mounts the rendered paths rely on.
    let broker: ferrymq_crds::MqttBroker = serde_json::from_value(json!({
        "apiVersion": "ferrymq.io/v1alpha1", "kind": "MqttBroker",
        "metadata": {"name": "edge", "namespace": "iot"}, "spec": spec,
    }))
    .expect("broker");
    let sts = ferrymq_operator::resources::stateful_set(&broker, "c", "s");
    let pod = sts.spec.and_then(|s| s.template.spec).expect("pod spec");
    let mounts: Vec<_> = pod.containers[0]
        .volume_mounts
        .iter()
        .flatten()
        .filter(|m| m.mount_path.starts_with(tls_dir))
        .map(|m| m.mount_path.clone())
        .collect();
    assert_eq!(
        mounts,
        [format!("{tls_dir}/mqtts"), format!("{tls_dir}/wss")]
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let cert = rcgen::generate_simple_self_signed(vec!["edge.iot.svc".to_string()])
        .expect("self-signed certificate");
    for listener in ["mqtts", "wss"] {
        let d = dir.path().join("tls").join(listener);
        std::fs::create_dir_all(&d).expect("mkdir");
        std::fs::write(d.join("tls.crt"), cert.cert.pem()).expect("write cert");
        std::fs::write(d.join("tls.key"), cert.signing_key.serialize_pem()).expect("write key");
    }
    let local_tls = dir.path().join("tls");
    let local_tls = local_tls.to_str().expect("utf-8 temp path");
    let effective = check_rendered(&rendered.replace(tls_dir, local_tls), dir.path());

    let listeners = effective["listeners"].as_array().expect("listeners");
    let field = |i: usize, k: &str| listeners[i].get(k).and_then(|v| v.as_str());
    assert_eq!(field(0, "protocol"), Some("mqtt"));
    assert_eq!(field(1, "protocol"), Some("mqtts"));
    assert_eq!(
        field(1, "cert_file"),
        Some(format!("{local_tls}/mqtts/tls.crt").as_str())
    );
    assert_eq!(
        field(1, "key_file"),
        Some(format!("{local_tls}/mqtts/tls.key").as_str())
    );
    assert_eq!(field(2, "protocol"), Some("ws"));
    assert_eq!(field(2, "cert_file"), None);
    assert_eq!(field(3, "protocol"), Some("wss"));
    assert_eq!(
        field(3, "cert_file"),
        Some(format!("{local_tls}/wss/tls.crt").as_str())
    );
    for (i, port) in [1883, 8883, 8080, 8084].into_iter().enumerate() {
        assert_eq!(field(i, "bind"), Some(format!("0.0.0.0:{port}").as_str()));
    }
}
