//! The Kafka side effects against a real Apache Kafka broker (single-node KRaft, started per test
//! by the e2e harness). Skipped with a message where Kafka's jars or Java are missing, unless
//! `FERRYMQ_REQUIRE_SERVICES=1` (CI), where that fails.

use std::collections::BTreeMap;
use std::time::Duration;

use ferrymq_e2e::harness::free_port;
use ferrymq_e2e::harness::services::{require_services, Kafka};
use ferrymq_operator::provision::kafka::{
    application_topic, ConfigOp, KafkaAdmin, KafkaConnection, KafkaError, TopicAction, TopicSpec,
};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn kafka() -> Option<Kafka> {
    if !require_services() {
        return None;
    }
    Some(Kafka::start().expect("starting Kafka"))
}

/// The value of `key` on the topic once it is `wanted`, or what it is after 10 s.
async fn config_value_eventually(
    admin: &KafkaAdmin,
    topic: &str,
    key: &str,
    wanted: &str,
) -> Option<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = admin
            .describe(topic)
            .await
            .expect("describe")
            .expect("exists")
            .effective_config
            .get(key)
            .cloned();
        if now.as_deref() == Some(wanted) || tokio::time::Instant::now() >= deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn admin(kafka: &Kafka) -> KafkaAdmin {
    let mut c = KafkaConnection::new(kafka.bootstrap());
    c.timeout = Duration::from_secs(10);
    KafkaAdmin::new(c).expect("admin client")
}

fn config(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn spec(name: &str, partitions: i32, cfg: &[(&str, &str)]) -> TopicSpec {
    TopicSpec {
        name: name.to_string(),
        partitions,
        replication_factor: -1,
        config: config(cfg),
    }
}

/// Created with the spec's partitions and configuration; a second run finds it as it is and
/// changes nothing.
#[test]
fn topic_is_created_and_a_second_run_changes_nothing() {
    let Some(kafka) = kafka() else { return };
    runtime().block_on(async {
        let admin = admin(&kafka);
        admin.check().await.expect("Kafka answers");
        let name = application_topic("prov", "ingest-1");
        assert_eq!(name, "prov.app.ingest-1");
        assert!(admin.describe(&name).await.unwrap().is_none());

        let want = spec(&name, 1, &[("retention.ms", "604800000")]);
        let first = admin.ensure_topic(&want).await.expect("create");
        println!("created: {first:?}");
        assert_eq!(first.action, TopicAction::Created);
        assert!(first.changed());
        assert_eq!(first.topic.partitions, 1);
        assert!(first.topic.topic_id.is_some(), "no topic id: {first:?}");
        assert_eq!(
            first
                .topic
                .effective_config
                .get("retention.ms")
                .map(String::as_str),
            Some("604800000")
        );

        let second = admin.ensure_topic(&want).await.expect("second run");
        assert_eq!(second.action, TopicAction::Existing);
        assert!(
            !second.changed(),
            "second run changed something: {second:?}"
        );
        assert!(second.config_changes.is_empty());
        assert_eq!(second.topic.topic_id, first.topic.topic_id);
    });
}

/// A topic made by someone else is adopted: the operator does not fail on "already exists", it
/// takes the topic over and sets its configuration to the spec.
#[test]
fn existing_topic_is_adopted() {
    let Some(kafka) = kafka() else { return };
    runtime().block_on(async {
        let admin = admin(&kafka);
        let name = "prov.app.adopted";
        let made_elsewhere = spec(name, 1, &[("retention.ms", "1000")]);
        admin
            .ensure_topic(&made_elsewhere)
            .await
            .expect("out-of-band create");

        let outcome = admin
            .ensure_topic(&spec(name, 1, &[("retention.ms", "86400000")]))
            .await
            .expect("adopt");
        assert_eq!(outcome.action, TopicAction::Existing);
        assert_eq!(
            outcome
                .config_changes
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["retention.ms: 1000 -> 86400000"]
        );
        let now = admin.describe(name).await.unwrap().expect("exists");
        assert_eq!(
            now.effective_config.get("retention.ms").map(String::as_str),
            Some("86400000")
        );
    });
}

/// Configuration changed behind the operator's back is set back, and the outcome names each
/// key with the value found and the value restored (what the DriftReverted Event says).
#[test]
fn config_drift_is_reverted_and_reported() {
    let Some(kafka) = kafka() else { return };
    runtime().block_on(async {
        let admin = admin(&kafka);
        let name = "prov.app.drift";
        let want = spec(
            name,
            1,
            &[
                ("retention.ms", "604800000"),
                ("max.message.bytes", "1048576"),
            ],
        );
        admin.ensure_topic(&want).await.expect("create");

        // Someone edits the topic with kafka-configs.sh.
        admin
            .alter_config(
                name,
                &[ConfigOp::Set("retention.ms".into(), "60000".into())],
            )
            .await
            .expect("out-of-band change");
        // Kafka applies a configuration change a moment after it answers the request.
        assert_eq!(
            config_value_eventually(&admin, name, "retention.ms", "60000").await,
            Some("60000".to_string())
        );

        let outcome = admin.ensure_topic(&want).await.expect("revert");
        assert_eq!(
            outcome
                .config_changes
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["retention.ms: 60000 -> 604800000"]
        );
        assert_eq!(
            outcome
                .topic
                .effective_config
                .get("retention.ms")
                .map(String::as_str),
            Some("604800000")
        );
        assert!(!admin.ensure_topic(&want).await.unwrap().changed());
    });
}

/// Fewer partitions than the topic has is refused with an error that says why, and the topic
/// is left as it was. More partitions grow it (CreatePartitions).
#[test]
fn partitions_grow_and_shrinking_is_refused() {
    let Some(kafka) = kafka() else { return };
    runtime().block_on(async {
        let admin = admin(&kafka);
        let name = "prov.app.parts";
        admin
            .ensure_topic(&spec(name, 2, &[]))
            .await
            .expect("create");

        let err = admin
            .ensure_topic(&spec(name, 1, &[]))
            .await
            .expect_err("shrink must be refused");
        assert!(
            matches!(
                err,
                KafkaError::PartitionShrink {
                    current: 2,
                    requested: 1,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(
            err.to_string().contains("cannot remove partitions"),
            "{err}"
        );
        assert!(!err.is_transient());
        assert_eq!(admin.describe(name).await.unwrap().unwrap().partitions, 2);

        let outcome = admin.ensure_topic(&spec(name, 3, &[])).await.expect("grow");
        assert_eq!(outcome.grown_from, Some(2));
        assert_eq!(outcome.topic.partitions, 3);
    });
}

/// Delete removes the topic; deleting again reports that there was nothing to delete.
#[test]
fn topic_is_deleted() {
    let Some(kafka) = kafka() else { return };
    runtime().block_on(async {
        let admin = admin(&kafka);
        let name = "prov.app.gone";
        admin
            .ensure_topic(&spec(name, 1, &[]))
            .await
            .expect("create");
        assert!(admin.delete_topic(name).await.expect("delete"));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while admin.describe(name).await.unwrap().is_some() {
            assert!(tokio::time::Instant::now() < deadline, "topic still listed");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(!admin.delete_topic(name).await.expect("delete again"));
    });
}

/// A topic deleted and created again has a new topic id: what status.topicId exposes so a
/// recreation (and the loss of its data) is visible.
#[test]
fn recreated_topic_has_a_new_id() {
    let Some(kafka) = kafka() else { return };
    runtime().block_on(async {
        let admin = admin(&kafka);
        let name = "prov.app.again";
        let first = admin
            .ensure_topic(&spec(name, 1, &[]))
            .await
            .expect("create");
        assert!(admin.delete_topic(name).await.expect("delete"));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while admin.describe(name).await.unwrap().is_some() {
            assert!(tokio::time::Instant::now() < deadline, "topic still listed");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let second = admin
            .ensure_topic(&spec(name, 1, &[]))
            .await
            .expect("recreate");
        assert_eq!(second.action, TopicAction::Created);
        assert!(first.topic.topic_id.is_some());
        assert_ne!(first.topic.topic_id, second.topic.topic_id);
    });
}

/// Nothing listens: every call fails as Unreachable (transient), within the timeout.
#[test]
fn unreachable_cluster_is_reported_as_such() {
    runtime().block_on(async {
        let addr = free_port().expect("port");
        let mut c = KafkaConnection::new(addr.to_string());
        c.timeout = Duration::from_secs(2);
        let admin = KafkaAdmin::new(c).expect("client");
        let started = std::time::Instant::now();
        let err = admin.check().await.expect_err("nothing listens");
        assert!(matches!(err, KafkaError::Unreachable { .. }), "{err:?}");
        assert!(err.is_transient());
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
        let err = admin
            .ensure_topic(&spec("x.app.y", 1, &[]))
            .await
            .expect_err("nothing listens");
        assert!(matches!(err, KafkaError::Unreachable { .. }), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(30));
    });
}

/// An ApplicationClient whose topic the broker already created (auto-creation, before the
/// operator got to it) is adopted without touching the broker's retention: the operator wants
/// the `[application]` retention of the broker it renders, as the broker itself sets it. Before,
/// adoption deleted `retention.ms`/`retention.bytes` (back to the cluster default) because only
/// the ApplicationClient's own `topic.config` was wanted; that is checked here too.
#[test]
fn a_topic_the_broker_created_keeps_its_retention_when_adopted() {
    use ferrymq::storage::kafka::app::ApplicationLogs;
    use ferrymq_operator::app::{broker_topic_config, wanted_topic_config};
    use ferrymq_operator::provision::kafka::config_diff;

    let Some(kafka) = kafka() else { return };
    let broker: ferrymq_crds::MqttBroker = serde_json::from_value(serde_json::json!({
        "apiVersion": "ferrymq.io/v1alpha1", "kind": "MqttBroker",
        "metadata": {"name": "core", "namespace": "iot"},
        "spec": {
            "image": "ferrymq:test",
            "applicationLog": {"retentionSecs": 3600, "retentionBytes": 1000000},
            "storage": {"kafkaPostgres": {
                "kafka": {"bootstrapServers": kafka.bootstrap(), "topicPrefix": "ret"},
                "postgres": {"urlSecretRef": {"name": "pg", "key": "url"}},
            }},
        },
    }))
    .expect("MqttBroker");
    let app: ferrymq_crds::ApplicationClient = serde_json::from_value(serde_json::json!({
        "apiVersion": "ferrymq.io/v1alpha1", "kind": "ApplicationClient",
        "metadata": {"name": "a", "namespace": "iot"},
        "spec": {"brokerRef": {"name": "core"}, "clientId": "app-1"},
    }))
    .expect("ApplicationClient");
    runtime().block_on(async {
        // The broker creates the topic the way it does for an unprovisioned client.
        let config = ferrymq::config::KafkaConfig {
            bootstrap_servers: kafka.bootstrap(),
            topic_prefix: "ret".into(),
            ..Default::default()
        };
        let logs = ApplicationLogs::new(
            ferrymq::storage::kafka::Kafka::connect(&config, Default::default())
                .await
                .expect("broker's Kafka clients"),
        );
        logs.prepare(
            "app-1",
            &ApplicationLogs::topic_config(3_600_000, 1_000_000),
        )
        .await
        .expect("the broker creates the topic");
        let name = application_topic("ret", "app-1");

        let admin = admin(&kafka);
        let found = admin.describe(&name).await.unwrap().expect("exists");
        // What the operator wanted before: the ApplicationClient's own config only.
        assert_eq!(
            config_diff(&found.config, &found.effective_config, &BTreeMap::new()).len(),
            2,
            "the broker's retention is set on the topic itself: {:?}",
            found.config
        );
        let wanted = wanted_topic_config(&broker_topic_config(&broker), &app);
        let outcome = admin
            .ensure_topic(&TopicSpec {
                name: name.clone(),
                partitions: 1,
                replication_factor: -1,
                config: wanted,
            })
            .await
            .expect("adopt");
        assert_eq!(outcome.action, TopicAction::Existing);
        assert!(
            outcome.config_changes.is_empty(),
            "adoption changed {:?}",
            outcome.config_changes
        );
        let now = admin.describe(&name).await.unwrap().expect("exists");
        assert_eq!(
            now.effective_config.get("retention.ms").map(String::as_str),
            Some("3600000")
        );
        assert_eq!(
            now.effective_config
                .get("retention.bytes")
                .map(String::as_str),
            Some("1000000")
        );
    });
}
