//! The CRDs and the documented manifests against a real kube-apiserver (e2e/src/harness/kube.rs):
//! the CRDs crdgen writes are accepted and Established, every example users copy is accepted,
//! and every CEL rule refuses a bad object with its documented message, as the API server (not
//! kube's client-side `validate_cel`, which neither type-checks nor applies defaults) sees it.
//! Skipped where the control-plane binaries are missing (`bash e2e/services/k8s/install.sh`),
//! unless `FERRYMQ_REQUIRE_SERVICES=1`.

mod k8s;

use ferrymq_crds::{ApplicationClient, MqttBroker};
use kube::api::{Api, Patch, PatchParams};
use kube::Client;
use serde_json::{json, Value};

use k8s::{cluster, create, create_namespace, refusal, render_chart, repo, runtime, yaml_docs};

/// The MqttBroker sample in the chart's NOTES.txt (the lines between `<<'YAML'` and `YAML`).
fn notes_sample(notes: &str) -> Value {
    let mut lines = notes.lines().skip_while(|l| !l.contains("<<'YAML'"));
    lines.next();
    let body: Vec<&str> = lines
        .take_while(|l| l.trim() != "YAML")
        .map(|l| l.strip_prefix("  ").unwrap_or(l))
        .collect();
    serde_yaml::from_str(&body.join("\n")).expect("the NOTES sample is YAML")
}

#[test]
fn crds_are_established_and_every_documented_manifest_is_accepted() {
    runtime().block_on(async {
        let Some((_cp, client)) = cluster(false).await else {
            return;
        };
        create_namespace(&client, "iot").await;

        let mut accepted = Vec::new();
        let dir = repo().join("docs/examples");
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .expect("docs/examples")
            .map(|e| e.expect("entry").path())
            .collect();
        files.sort();
        for path in files {
            let text = std::fs::read_to_string(&path).expect("example");
            for doc in yaml_docs(&text) {
                let what = format!("{} {}", path.display(), doc["kind"]);
                create(&client, &doc, "iot")
                    .await
                    .unwrap_or_else(|e| panic!("the API server refused {what}: {e}"));
                accepted.push(what);
            }
        }
        assert_eq!(accepted.len(), 6, "{accepted:?}");

        // The sample NOTES.txt prints after `helm install`.
        if let Some(rendered) = render_chart("ferrymq-system", json!({})) {
            let sample = notes_sample(rendered["notes"].as_str().expect("notes"));
            assert_eq!(sample["kind"], "MqttBroker");
            create(&client, &sample, "default")
                .await
                .unwrap_or_else(|e| panic!("the API server refused the NOTES.txt sample: {e}"));
        }
        // The API server applied the schema's defaults (not the operator's serde defaults).
        let brokers: Api<MqttBroker> = Api::namespaced(client.clone(), "iot");
        let edge = brokers.get("edge").await.expect("edge");
        assert_eq!(
            edge.spec.storage.embedded.as_ref().map(|e| e.fsync),
            Some(true)
        );
    });
}

fn broker(name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "ferrymq.io/v1alpha1",
        "kind": "MqttBroker",
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
    })
}

fn kafka_spec() -> Value {
    json!({
        "image": "ferrymq:test",
        "storage": {"kafkaPostgres": {
            "kafka": {"bootstrapServers": "kafka:9092"},
            "postgres": {"urlSecretRef": {"name": "pg", "key": "url"}},
        }},
    })
}

fn app(name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "ferrymq.io/v1alpha1",
        "kind": "ApplicationClient",
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
    })
}

async fn refused_create(client: &Client, obj: Value, message: &str) {
    let name = obj["metadata"]["name"].clone();
    let got = refusal(create(client, &obj, "default").await);
    assert!(
        got.contains(message),
        "creating {name}: expected {message:?} in {got:?}"
    );
}

/// Creates `obj`, then merge-patches it with `patch` and expects the refusal `message`.
async fn refused_update(client: &Client, obj: Value, patch: Value, message: &str) {
    let name = obj["metadata"]["name"].as_str().expect("name").to_string();
    create(client, &obj, "default")
        .await
        .unwrap_or_else(|e| panic!("creating {name}: {e}"));
    let got = match obj["kind"].as_str() {
        Some("MqttBroker") => {
            let api: Api<MqttBroker> = Api::namespaced(client.clone(), "default");
            refusal(
                api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await,
            )
        }
        _ => {
            let api: Api<ApplicationClient> = Api::namespaced(client.clone(), "default");
            refusal(
                api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await,
            )
        }
    };
    assert!(
        got.contains(message),
        "updating {name} with {patch}: expected {message:?} in {got:?}"
    );
}

#[test]
fn every_cel_rule_refuses_a_bad_object_with_its_message() {
    runtime().block_on(async {
        let Some((_cp, c)) = cluster(false).await else {
            return;
        };
        let embedded = json!({"image": "ferrymq:test", "storage": {"embedded": {}}});

        // Create-time rules.
        let mut spec = embedded.clone();
        spec["replicas"] = json!(2);
        refused_create(&c, broker("r", spec), "replicas > 1 needs storage.kafkaPostgres").await;
        let mut spec = embedded.clone();
        spec["listeners"] = json!([{"name": "a", "port": 1883}, {"name": "b", "port": 1883}]);
        refused_create(&c, broker("p", spec), "two listeners use the same port").await;
        let mut spec = embedded.clone();
        spec["listeners"] = json!([{"name": "a", "port": 8883, "protocol": "mqtts"}]);
        refused_create(&c, broker("t", spec), "tlsSecretRef is required for mqtts").await;
        let mut spec = embedded.clone();
        spec["listeners"] =
            json!([{"name": "a", "port": 1883, "tlsSecretRef": {"name": "x"}}]);
        refused_create(&c, broker("t2", spec), "not allowed for mqtt and ws").await;
        let mut spec = kafka_spec();
        spec["storage"]["embedded"] = json!({});
        refused_create(&c, broker("s", spec), "set exactly one of storage.embedded").await;
        let mut spec = kafka_spec();
        spec["storage"]["kafkaPostgres"]["postgres"]["adminSecretRef"] =
            json!({"name": "a", "key": "url"});
        refused_create(&c, broker("pg", spec), "set exactly one of urlSecretRef").await;
        let mut spec = embedded.clone();
        spec["disruptionBudget"] = json!({"minAvailable": 1, "maxUnavailable": 1});
        refused_create(&c, broker("d", spec), "minAvailable").await;
        // `spec.config` is free-form for the API server (a CEL rule over it cannot be
        // type-checked there); the operator refuses its own keys (kube_broker.rs checks the
        // Stalled/InvalidSpec it reports). The content is kept as given, not pruned.
        let mut spec = embedded.clone();
        spec["config"] = json!({"limits": {"max_inflight": 64}, "listeners": [{"x": 1}]});
        let ok = create(&c, &broker("cfg", spec), "default")
            .await
            .expect("spec.config is free-form");
        assert_eq!(
            ok.data["spec"]["config"]["limits"]["max_inflight"],
            json!(64)
        );
        assert_eq!(ok.data["spec"]["config"]["listeners"][0]["x"], json!(1));

        // Update rules (transition rules), including unset -> set of optional fields.
        refused_update(
            &c,
            broker("u1", embedded.clone()),
            json!({"spec": {"storage": {"embedded": {"size": "5Gi"}}}}),
            "size is immutable",
        )
        .await;
        refused_update(
            &c,
            broker("u2", embedded.clone()),
            json!({"spec": {"storage": {"embedded": {"storageClassName": "fast"}}}}),
            "storageClassName is immutable",
        )
        .await;
        let mut with_class = embedded.clone();
        with_class["storage"]["embedded"]["storageClassName"] = json!("slow");
        refused_update(
            &c,
            broker("u3", with_class.clone()),
            json!({"spec": {"storage": {"embedded": {"storageClassName": "fast"}}}}),
            "storageClassName is immutable",
        )
        .await;
        refused_update(
            &c,
            broker("u4", with_class),
            json!({"spec": {"storage": {"embedded": {"storageClassName": null}}}}),
            "storageClassName is immutable",
        )
        .await;
        refused_update(
            &c,
            broker("u5", embedded.clone()),
            json!({"spec": {"storage": {"embedded": null, "kafkaPostgres": kafka_spec()["storage"]["kafkaPostgres"]}}}),
            "the storage backend cannot be changed",
        )
        .await;
        refused_update(
            &c,
            broker("u6", kafka_spec()),
            json!({"spec": {"storage": {"kafkaPostgres": {"kafka": {"topicPrefix": "other"}}}}}),
            "topicPrefix is immutable",
        )
        .await;
        refused_update(
            &c,
            broker("u7", kafka_spec()),
            json!({"spec": {"storage": {"kafkaPostgres": {"kafka": {"msgAllPartitions": 8}}}}}),
            "msgAllPartitions may grow, never shrink",
        )
        .await;
        refused_update(
            &c,
            broker("u8", kafka_spec()),
            json!({"spec": {"storage": {"kafkaPostgres": {"postgres": {"schema": "other"}}}}}),
            "schema is immutable",
        )
        .await;
        refused_update(
            &c,
            broker("u9", embedded.clone()),
            json!({"spec": {"replicas": 3}}),
            "replicas > 1 needs storage.kafkaPostgres",
        )
        .await;

        let a = json!({"brokerRef": {"name": "core"}, "clientId": "c1"});
        refused_update(
            &c,
            app("a1", a.clone()),
            json!({"spec": {"brokerRef": {"name": "other"}}}),
            "brokerRef is immutable",
        )
        .await;
        refused_update(
            &c,
            app("a2", a.clone()),
            json!({"spec": {"clientId": "c2"}}),
            "clientId is immutable",
        )
        .await;
        refused_update(
            &c,
            app("a3", a.clone()),
            json!({"spec": {"credentialsSecretName": "later"}}),
            "credentialsSecretName is immutable",
        )
        .await;
        let mut named = a.clone();
        named["credentialsSecretName"] = json!("first");
        refused_update(
            &c,
            app("a4", named.clone()),
            json!({"spec": {"credentialsSecretName": "second"}}),
            "credentialsSecretName is immutable",
        )
        .await;
        refused_update(
            &c,
            app("a5", named),
            json!({"spec": {"credentialsSecretName": null}}),
            "credentialsSecretName is immutable",
        )
        .await;
        let mut three = a.clone();
        three["topic"] = json!({"partitions": 3});
        refused_update(
            &c,
            app("a6", three),
            json!({"spec": {"topic": {"partitions": 2}}}),
            "partitions may grow, never shrink",
        )
        .await;
        refused_update(
            &c,
            app("a7", a.clone()),
            json!({"spec": {"topic": {"replicationFactor": 3}}}),
            "replicationFactor is immutable",
        )
        .await;

        // Growing what may grow is accepted.
        let apps: Api<ApplicationClient> = Api::namespaced(c.clone(), "default");
        let mut grow = a.clone();
        grow["topic"] = json!({"partitions": 1});
        create(&c, &app("a8", grow), "default").await.expect("a8");
        apps.patch(
            "a8",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"topic": {"partitions": 4}}})),
        )
        .await
        .expect("partitions may grow");
    });
}
