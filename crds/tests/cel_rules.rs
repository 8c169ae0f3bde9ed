//! The CRDs' CEL rules (`x-kubernetes-validations`), evaluated client-side with kube's `cel`
//! feature: what the API server would accept and refuse on create and on update.

use ferrymq_crds::{ApplicationClient, MqttBroker};
use serde_json::json;

fn broker(spec: serde_json::Value) -> MqttBroker {
    serde_json::from_value(json!({
        "apiVersion": "ferrymq.io/v1alpha1",
        "kind": "MqttBroker",
        "metadata": {"name": "b", "namespace": "ns"},
        "spec": spec,
    }))
    .expect("valid MqttBroker")
}

fn embedded() -> serde_json::Value {
    json!({"image": "ferrymq:test", "storage": {"embedded": {"size": "1Gi"}}})
}

fn kafka_postgres() -> serde_json::Value {
    json!({
        "image": "ferrymq:test",
        "replicas": 3,
        "storage": {"kafkaPostgres": {
            "kafka": {"bootstrapServers": "kafka:9092"},
            "postgres": {"urlSecretRef": {"name": "pg", "key": "url"}}
        }}
    })
}

fn errors(result: Result<(), impl std::fmt::Debug>) -> String {
    match result {
        Ok(()) => String::new(),
        Err(e) => format!("{e:?}"),
    }
}

#[test]
fn valid_brokers_pass() {
    assert_eq!(errors(broker(embedded()).validate_cel()), "");
    assert_eq!(errors(broker(kafka_postgres()).validate_cel()), "");
}

#[test]
fn replicas_above_one_need_kafka_postgres() {
    let mut spec = embedded();
    spec["replicas"] = json!(2);
    let e = errors(broker(spec).validate_cel());
    assert!(
        e.contains("replicas > 1 needs storage.kafkaPostgres"),
        "{e}"
    );
    let mut spec = embedded();
    spec["replicas"] = json!(0);
    assert_eq!(errors(broker(spec).validate_cel()), "");
}

#[test]
fn storage_is_exactly_one_backend_and_cannot_change() {
    let mut spec = kafka_postgres();
    spec["storage"]["embedded"] = json!({"size": "1Gi"});
    spec["replicas"] = json!(1);
    let e = errors(broker(spec).validate_cel());
    assert!(e.contains("set exactly one of storage.embedded"), "{e}");

    let mut spec = kafka_postgres();
    spec["storage"] = json!({});
    let e = errors(broker(spec).validate_cel());
    assert!(e.contains("set exactly one of storage.embedded"), "{e}");

    let mut new = kafka_postgres();
    new["replicas"] = json!(1);
    let e = errors(broker(new).validate_cel_update(&broker(embedded())));
    assert!(e.contains("storage backend cannot be changed"), "{e}");
}

#[test]
fn tls_listeners_need_a_secret_and_plain_ones_refuse_it() {
    let mut spec = embedded();
    spec["listeners"] = json!([{"name": "mqtts", "port": 8883, "protocol": "mqtts"}]);
    let e = errors(broker(spec.clone()).validate_cel());
    assert!(e.contains("tlsSecretRef is required"), "{e}");
    spec["listeners"][0]["tlsSecretRef"] = json!({"name": "tls"});
    assert_eq!(errors(broker(spec.clone()).validate_cel()), "");
    spec["listeners"][0]["protocol"] = json!("mqtt");
    let e = errors(broker(spec).validate_cel());
    assert!(e.contains("tlsSecretRef is required"), "{e}");
}

#[test]
fn listener_ports_are_unique() {
    let mut spec = embedded();
    spec["listeners"] = json!([
        {"name": "a", "port": 1883},
        {"name": "b", "port": 1883, "protocol": "ws"}
    ]);
    let e = errors(broker(spec.clone()).validate_cel());
    assert!(e.contains("two listeners use the same port"), "{e}");
    spec["listeners"][1]["port"] = json!(8080);
    assert_eq!(errors(broker(spec).validate_cel()), "");
}

#[test]
fn postgres_takes_a_url_or_an_admin_secret() {
    let mut spec = kafka_postgres();
    spec["storage"]["kafkaPostgres"]["postgres"]["adminSecretRef"] =
        json!({"name": "a", "key": "url"});
    let e = errors(broker(spec.clone()).validate_cel());
    assert!(e.contains("set exactly one of urlSecretRef"), "{e}");
    spec["storage"]["kafkaPostgres"]["postgres"] =
        json!({"adminSecretRef": {"name": "a", "key": "url"}});
    assert_eq!(errors(broker(spec).validate_cel()), "");
}

#[test]
fn disruption_budget_takes_one_bound() {
    let mut spec = embedded();
    spec["disruptionBudget"] = json!({"minAvailable": 1, "maxUnavailable": 1});
    let e = errors(broker(spec).validate_cel());
    assert!(e.contains("at most one of minAvailable"), "{e}");
}

#[test]
fn broker_transition_rules() {
    let old = broker(kafka_postgres());
    let mut spec = kafka_postgres();
    spec["storage"]["kafkaPostgres"]["kafka"]["topicPrefix"] = json!("other");
    let e = errors(broker(spec).validate_cel_update(&old));
    assert!(e.contains("topicPrefix is immutable"), "{e}");

    let mut spec = kafka_postgres();
    spec["storage"]["kafkaPostgres"]["kafka"]["msgAllPartitions"] = json!(8);
    let e = errors(broker(spec).validate_cel_update(&old));
    assert!(e.contains("msgAllPartitions may grow"), "{e}");

    let mut spec = kafka_postgres();
    spec["storage"]["kafkaPostgres"]["kafka"]["msgAllPartitions"] = json!(32);
    spec["replicas"] = json!(5);
    assert_eq!(errors(broker(spec).validate_cel_update(&old)), "");

    let old = broker(embedded());
    let mut spec = embedded();
    spec["storage"]["embedded"]["size"] = json!("2Gi");
    let e = errors(broker(spec).validate_cel_update(&old));
    assert!(e.contains("size is immutable"), "{e}");

    // Unset -> set of an optional immutable field (the rule on the parent object; a field's own
    // `self == oldSelf` does not run when the old object lacks the field).
    let mut spec = embedded();
    spec["storage"]["embedded"]["storageClassName"] = json!("fast");
    let e = errors(broker(spec).validate_cel_update(&old));
    assert!(e.contains("storageClassName is immutable"), "{e}");
}

fn app(spec: serde_json::Value) -> ApplicationClient {
    serde_json::from_value(json!({
        "apiVersion": "ferrymq.io/v1alpha1",
        "kind": "ApplicationClient",
        "metadata": {"name": "a", "namespace": "ns"},
        "spec": spec,
    }))
    .expect("valid ApplicationClient")
}

fn app_spec() -> serde_json::Value {
    json!({
        "brokerRef": {"name": "b"},
        "clientId": "analytics",
        "topic": {"partitions": 3, "replicationFactor": 1, "config": {"retention.ms": "3600000"}}
    })
}

#[test]
fn application_client_rules() {
    let old = app(app_spec());
    assert_eq!(errors(old.validate_cel()), "");
    assert_eq!(errors(app(app_spec()).validate_cel_update(&old)), "");

    let mut spec = app_spec();
    spec["clientId"] = json!("other");
    let e = errors(app(spec).validate_cel_update(&old));
    assert!(e.contains("clientId is immutable"), "{e}");

    let mut spec = app_spec();
    spec["topic"]["partitions"] = json!(2);
    let e = errors(app(spec).validate_cel_update(&old));
    assert!(e.contains("partitions may grow, never shrink"), "{e}");

    let mut spec = app_spec();
    spec["topic"]["partitions"] = json!(6);
    assert_eq!(errors(app(spec).validate_cel_update(&old)), "");

    let mut spec = app_spec();
    spec["topic"]["replicationFactor"] = json!(3);
    let e = errors(app(spec).validate_cel_update(&old));
    assert!(e.contains("replicationFactor is immutable"), "{e}");

    let mut spec = app_spec();
    spec["credentialsSecretName"] = json!("later");
    let e = errors(app(spec).validate_cel_update(&old));
    assert!(e.contains("credentialsSecretName is immutable"), "{e}");

    let mut spec = app_spec();
    spec["brokerRef"]["name"] = json!("c");
    let e = errors(app(spec).validate_cel_update(&old));
    assert!(e.contains("brokerRef is immutable"), "{e}");
}
