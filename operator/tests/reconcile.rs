//! The reconcilers against an in-memory API server (kube-fake-client): convergence (reconcile
//! until nothing changes; a second pass writes nothing), finalizer add and remove, the
//! ResourceConflict rule, deletion policies and error injection. Kafka and PostgreSQL sit behind
//! the `Provisioner` seam here; `provision_*` tests cover the real side effects.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use ferrymq_crds::{ApplicationClient, MqttBroker};
use ferrymq_operator::context::Context;
use ferrymq_operator::metrics::Metrics;
use ferrymq_operator::seam::{
    AppCredential, BrokerDatabase, KafkaTarget, ProvisionError, Provisioner, TopicState,
    TopicWanted,
};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::ByteString;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use kube_fake_client::{interceptor, ClientBuilder};
use serde_json::json;

const NS: &str = "iot";

/// A topic: partitions and configuration.
type Topic = (i32, BTreeMap<String, String>);

/// Kafka and PostgreSQL in memory, with switches for failures.
#[derive(Default)]
struct FakeWorld {
    topics: Mutex<BTreeMap<String, Topic>>,
    credentials: Mutex<BTreeMap<String, AppCredential>>,
    databases: Mutex<Vec<(String, BrokerDatabase, String)>>,
    kafka_down: AtomicBool,
    kafka_refuses: AtomicBool,
    /// A cluster without DescribeTopics, which reports no topic ids.
    no_topic_ids: AtomicBool,
}

#[async_trait]
impl Provisioner for FakeWorld {
    async fn check_kafka(&self, _: &KafkaTarget) -> Result<(), ProvisionError> {
        self.kafka()
    }

    async fn ensure_topic(
        &self,
        _: &KafkaTarget,
        t: &TopicWanted,
    ) -> Result<TopicState, ProvisionError> {
        self.kafka()?;
        let mut topics = self.topics.lock().unwrap();
        let mut state = TopicState::default();
        match topics.get_mut(&t.name) {
            None => {
                topics.insert(t.name.clone(), (t.partitions, t.config.clone()));
                state.created = true;
            }
            Some((partitions, config)) => {
                if *partitions > t.partitions {
                    return Err(ProvisionError::permanent(
                        "fewer partitions than the topic has",
                    ));
                }
                if *partitions < t.partitions {
                    state.grown_from = Some(*partitions);
                    *partitions = t.partitions;
                }
                if *config != t.config {
                    state.reverted = vec![format!("{config:?} -> {:?}", t.config)];
                    *config = t.config.clone();
                }
            }
        }
        state.partitions = topics[&t.name].0;
        if !self.no_topic_ids.load(Ordering::SeqCst) {
            state.topic_id = Some(format!("id-{}", t.name));
        }
        Ok(state)
    }

    async fn delete_topic(&self, _: &KafkaTarget, topic: &str) -> Result<bool, ProvisionError> {
        self.kafka()?;
        Ok(self.topics.lock().unwrap().remove(topic).is_some())
    }

    async fn ensure_broker_database(
        &self,
        admin_url: &str,
        db: &BrokerDatabase,
        password: &str,
    ) -> Result<bool, ProvisionError> {
        let mut dbs = self.databases.lock().unwrap();
        let entry = (admin_url.to_string(), db.clone(), password.to_string());
        if dbs.contains(&entry) {
            return Ok(false);
        }
        dbs.push(entry);
        Ok(true)
    }

    async fn check_postgres(&self, _: &str) -> Result<(), ProvisionError> {
        Ok(())
    }

    async fn upsert_application(
        &self,
        _: &str,
        _: &str,
        c: &AppCredential,
    ) -> Result<bool, ProvisionError> {
        let mut creds = self.credentials.lock().unwrap();
        let changed = creds.get(&c.client_id) != Some(c);
        creds.insert(c.client_id.clone(), c.clone());
        Ok(changed)
    }

    async fn delete_application(
        &self,
        _: &str,
        _: &str,
        client_id: &str,
        _: &str,
    ) -> Result<bool, ProvisionError> {
        Ok(self.credentials.lock().unwrap().remove(client_id).is_some())
    }
}

impl FakeWorld {
    fn kafka(&self) -> Result<(), ProvisionError> {
        if self.kafka_down.load(Ordering::SeqCst) {
            return Err(ProvisionError::transient(
                "kafka at `kafka:9092` is unreachable",
            ));
        }
        if self.kafka_refuses.load(Ordering::SeqCst) {
            return Err(ProvisionError::permanent("kafka refused: not authorised"));
        }
        Ok(())
    }
}

/// Writes the API server saw (creates, patches, status patches, deletes), except Events.
#[derive(Clone, Default)]
struct Writes(Arc<AtomicUsize>);

impl Writes {
    fn take(&self) -> usize {
        self.0.swap(0, Ordering::SeqCst)
    }
}

struct Harness {
    client: Client,
    world: Arc<FakeWorld>,
    ctx: Arc<Context>,
    writes: Writes,
}

async fn harness(objects: Vec<serde_json::Value>, fail_statefulsets: bool) -> Harness {
    harness_with(objects, fail_statefulsets, Arc::new(FakeWorld::default())).await
}

async fn harness_with(
    objects: Vec<serde_json::Value>,
    fail_statefulsets: bool,
    world: Arc<FakeWorld>,
) -> Harness {
    let writes = Writes::default();
    let (w1, w2, w3, w4) = (
        writes.clone(),
        writes.clone(),
        writes.clone(),
        writes.clone(),
    );
    let funcs = interceptor::Funcs::new()
        .create(move |ctx| {
            if ctx.object["kind"] != "Event" {
                w1.0.fetch_add(1, Ordering::SeqCst);
            }
            Ok(None)
        })
        .patch(move |ctx| {
            if fail_statefulsets && ctx.patch["kind"] == "StatefulSet" {
                return Err(kube_fake_client::Error::Internal(
                    "injected: etcd timeout".into(),
                ));
            }
            if ctx.patch["kind"] != "Event" {
                w2.0.fetch_add(1, Ordering::SeqCst);
            }
            Ok(None)
        })
        .patch_status(move |_| {
            w3.0.fetch_add(1, Ordering::SeqCst);
            Ok(None)
        })
        .delete(move |_| {
            w4.0.fetch_add(1, Ordering::SeqCst);
            Ok(None)
        });
    let client = ClientBuilder::new()
        .with_resource::<MqttBroker>()
        .with_status_subresource::<MqttBroker>()
        .with_resource::<ApplicationClient>()
        .with_status_subresource::<ApplicationClient>()
        .with_status_subresource::<StatefulSet>()
        .with_runtime_objects(objects)
        .with_interceptor_funcs(funcs)
        .build()
        .await
        .expect("fake client");
    let ctx = Arc::new(Context::new(
        client.clone(),
        world.clone(),
        Arc::new(Metrics::new()),
        Some("test".into()),
    ));
    writes.take();
    Harness {
        client,
        world,
        ctx,
        writes,
    }
}

fn broker_json(name: &str, spec: serde_json::Value) -> serde_json::Value {
    json!({
        "apiVersion": "ferrymq.io/v1alpha1",
        "kind": "MqttBroker",
        "metadata": {"name": name, "namespace": NS, "uid": format!("uid-{name}"), "generation": 1},
        "spec": spec,
    })
}

fn secret_json(name: &str, data: &[(&str, &str)]) -> serde_json::Value {
    let data: BTreeMap<String, ByteString> = data
        .iter()
        .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
        .collect();
    json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "namespace": NS},
        "data": data,
    })
}

fn kafka_postgres_spec() -> serde_json::Value {
    json!({
        "image": "ferrymq:test",
        "replicas": 3,
        "storage": {"kafkaPostgres": {
            "kafka": {"bootstrapServers": "kafka:9092", "propertiesSecretRef": {"name": "kafka-props"}},
            "postgres": {"urlSecretRef": {"name": "pg", "key": "url"}}
        }}
    })
}

async fn reconcile_broker(h: &Harness, name: &str) -> Result<(), ferrymq_operator::error::Error> {
    let api: Api<MqttBroker> = Api::namespaced(h.client.clone(), NS);
    let broker = api.get(name).await.expect("broker exists");
    ferrymq_operator::broker::reconcile(Arc::new(broker), h.ctx.clone())
        .await
        .map(|_| ())
}

async fn broker_status(h: &Harness, name: &str) -> ferrymq_crds::MqttBrokerStatus {
    let api: Api<MqttBroker> = Api::namespaced(h.client.clone(), NS);
    api.get(name).await.unwrap().status.unwrap_or_default()
}

fn cond<'a>(
    conds: &'a [k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    t: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    conds.iter().find(|c| c.type_ == t)
}

/// What the StatefulSet controller would report once every pod runs the current template.
async fn pods_ready(h: &Harness, name: &str, replicas: i32) {
    let api: Api<StatefulSet> = Api::namespaced(h.client.clone(), NS);
    let sts = api.get(name).await.unwrap();
    let status = json!({"status": {
        "observedGeneration": sts.metadata.generation,
        "replicas": replicas, "readyReplicas": replicas, "updatedReplicas": replicas,
        "currentRevision": "r1", "updateRevision": "r1"
    }});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
}

#[tokio::test]
async fn embedded_broker_converges_and_a_second_pass_writes_nothing() {
    let h = harness(
        vec![broker_json(
            "edge",
            json!({"image": "ferrymq:test", "storage": {"embedded": {"size": "2Gi"}}}),
        )],
        false,
    )
    .await;
    reconcile_broker(&h, "edge").await.unwrap();
    assert!(h.writes.take() > 0);

    let cm: Api<ConfigMap> = Api::namespaced(h.client.clone(), NS);
    let cm = cm.get("edge-config").await.unwrap();
    let toml = &cm.data.as_ref().unwrap()["ferrymq.toml"];
    assert!(toml.contains("backend = \"embedded\""), "{toml}");
    assert_eq!(cm.owner_references()[0].name, "edge");

    let sts: Api<StatefulSet> = Api::namespaced(h.client.clone(), NS);
    let sts = sts.get("edge").await.unwrap();
    let spec = sts.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(1));
    assert_eq!(spec.service_name.as_deref(), Some("edge-headless"));
    let claim = &spec.volume_claim_templates.as_ref().unwrap()[0];
    assert_eq!(
        claim
            .spec
            .as_ref()
            .unwrap()
            .resources
            .as_ref()
            .unwrap()
            .requests
            .as_ref()
            .unwrap()["storage"]
            .0,
        "2Gi"
    );
    let template = spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .annotations
        .as_ref()
        .unwrap();
    assert!(template.contains_key("ferrymq.io/config-hash"));
    let container = &spec.template.spec.as_ref().unwrap().containers[0];
    let probe_path = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        p.as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap()
            .path
            .clone()
            .unwrap()
    };
    assert_eq!(probe_path(&container.liveness_probe), "/health/live");
    assert_eq!(probe_path(&container.readiness_probe), "/health/ready");

    let svc: Api<Service> = Api::namespaced(h.client.clone(), NS);
    let headless = svc.get("edge-headless").await.unwrap();
    assert_eq!(headless.spec.unwrap().cluster_ip.as_deref(), Some("None"));
    let client_svc = svc.get("edge").await.unwrap();
    assert_eq!(client_svc.spec.unwrap().ports.unwrap()[0].port, 1883);
    let pdb: Api<PodDisruptionBudget> = Api::namespaced(h.client.clone(), NS);
    assert!(pdb.get_opt("edge").await.unwrap().is_some());

    // Pods not ready yet: Reconciling, not Ready.
    let status = broker_status(&h, "edge").await;
    assert_eq!(status.observed_generation, Some(1));
    assert_eq!(cond(&status.conditions, "Ready").unwrap().status, "False");
    assert_eq!(
        cond(&status.conditions, "Reconciling").unwrap().status,
        "True"
    );
    assert!(cond(&status.conditions, "Stalled").is_none());
    assert_eq!(status.endpoints[0].url, "mqtt://edge.iot.svc:1883");
    assert_eq!(
        status.selector.as_deref(),
        Some("app.kubernetes.io/instance=edge,app.kubernetes.io/name=ferrymq")
    );

    pods_ready(&h, "edge", 1).await;
    h.writes.take();
    reconcile_broker(&h, "edge").await.unwrap();
    let status = broker_status(&h, "edge").await;
    let ready = cond(&status.conditions, "Ready").unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("True", "Reconciled")
    );
    assert_eq!(ready.observed_generation, Some(1));
    assert!(cond(&status.conditions, "Reconciling").is_none());
    assert_eq!(
        (
            status.replicas,
            status.ready_replicas,
            status.updated_replicas
        ),
        (1, 1, 1)
    );
    assert_eq!(h.writes.take(), 1, "only the status changed");

    // Fixed point: nothing to write.
    reconcile_broker(&h, "edge").await.unwrap();
    assert_eq!(h.writes.take(), 0, "a converged reconcile writes nothing");
}

#[tokio::test]
async fn a_config_change_rolls_the_pods_and_drift_is_reverted() {
    let h = harness(
        vec![broker_json(
            "edge",
            json!({"image": "ferrymq:test", "storage": {"embedded": {}}}),
        )],
        false,
    )
    .await;
    reconcile_broker(&h, "edge").await.unwrap();
    let sts_api: Api<StatefulSet> = Api::namespaced(h.client.clone(), NS);
    let hash = |sts: &StatefulSet| {
        sts.spec
            .as_ref()
            .unwrap()
            .template
            .metadata
            .as_ref()
            .unwrap()
            .annotations
            .as_ref()
            .unwrap()["ferrymq.io/config-hash"]
            .clone()
    };
    let before = hash(&sts_api.get("edge").await.unwrap());

    let api: Api<MqttBroker> = Api::namespaced(h.client.clone(), NS);
    api.patch(
        "edge",
        &PatchParams::default(),
        &Patch::Merge(&json!({"spec": {"config": {"limits": {"max_inflight": 64}}}})),
    )
    .await
    .unwrap();
    reconcile_broker(&h, "edge").await.unwrap();
    let after = hash(&sts_api.get("edge").await.unwrap());
    assert_ne!(before, after, "a new config must change the pod template");
    let cm: Api<ConfigMap> = Api::namespaced(h.client.clone(), NS);
    assert!(
        cm.get("edge-config").await.unwrap().data.unwrap()["ferrymq.toml"]
            .contains("max_inflight = 64")
    );

    // Someone scales the StatefulSet by hand: the next reconcile sets it back.
    sts_api
        .patch(
            "edge",
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"replicas": 5}})),
        )
        .await
        .unwrap();
    reconcile_broker(&h, "edge").await.unwrap();
    assert_eq!(
        sts_api.get("edge").await.unwrap().spec.unwrap().replicas,
        Some(1)
    );
}

#[tokio::test]
async fn kafka_postgres_broker_provisions_and_hashes_its_secrets() {
    let h = harness(
        vec![
            broker_json("core", kafka_postgres_spec()),
            secret_json("pg", &[("url", "postgres://ferrymq:pw@db/ferrymq")]),
            secret_json("kafka-props", &[("security.protocol", "SASL_SSL")]),
        ],
        false,
    )
    .await;
    reconcile_broker(&h, "core").await.unwrap();
    assert_eq!(h.world.topics.lock().unwrap()["ferrymq.msg.all"].0, 16);
    let status = broker_status(&h, "core").await;
    assert_eq!(
        cond(&status.conditions, "KafkaReachable").unwrap().status,
        "True"
    );
    assert_eq!(
        cond(&status.conditions, "PostgresReachable")
            .unwrap()
            .status,
        "True"
    );
    assert_eq!(status.storage_backend.as_deref(), Some("kafka+postgres"));

    let sts_api: Api<StatefulSet> = Api::namespaced(h.client.clone(), NS);
    let sts = sts_api.get("core").await.unwrap();
    let pod = sts.spec.as_ref().unwrap().template.clone();
    let container = &pod.spec.as_ref().unwrap().containers[0];
    let env = container.env.as_ref().unwrap();
    let url_ref = env
        .iter()
        .find(|e| e.name == "FERRYMQ_POSTGRES__URL")
        .unwrap();
    let key_ref = url_ref
        .value_from
        .as_ref()
        .unwrap()
        .secret_key_ref
        .as_ref()
        .unwrap();
    assert_eq!((key_ref.name.as_str(), key_ref.key.as_str()), ("pg", "url"));
    let env_from = &container.env_from.as_ref().unwrap()[0];
    assert_eq!(
        env_from.prefix.as_deref(),
        Some("FERRYMQ_KAFKA__PROPERTIES__")
    );
    assert!(sts.spec.as_ref().unwrap().volume_claim_templates.is_none());
    let secret_hash = |sts: &StatefulSet| {
        sts.spec
            .as_ref()
            .unwrap()
            .template
            .metadata
            .as_ref()
            .unwrap()
            .annotations
            .as_ref()
            .unwrap()["ferrymq.io/secret-hash"]
            .clone()
    };
    let before = secret_hash(&sts);

    // A rotated password restarts the pods (the broker reads it once, from the environment).
    let secrets: Api<Secret> = Api::namespaced(h.client.clone(), NS);
    secrets
        .patch(
            "pg",
            &PatchParams::default(),
            &Patch::Merge(&secret_json(
                "pg",
                &[("url", "postgres://ferrymq:new@db/ferrymq")],
            )),
        )
        .await
        .unwrap();
    reconcile_broker(&h, "core").await.unwrap();
    assert_ne!(before, secret_hash(&sts_api.get("core").await.unwrap()));
}

#[tokio::test]
async fn admin_secret_provisions_the_broker_role_once() {
    let mut spec = kafka_postgres_spec();
    spec["storage"]["kafkaPostgres"]["postgres"] =
        json!({"adminSecretRef": {"name": "pg-admin", "key": "url"}});
    spec["storage"]["kafkaPostgres"]["kafka"] = json!({"bootstrapServers": "kafka:9092"});
    let h = harness(
        vec![
            broker_json("core", spec),
            secret_json("pg-admin", &[("url", "postgres://admin:root@db:5432/app")]),
        ],
        false,
    )
    .await;
    reconcile_broker(&h, "core").await.unwrap();
    let secrets: Api<Secret> = Api::namespaced(h.client.clone(), NS);
    let provisioned = secrets.get("core-postgres").await.unwrap();
    let data = ferrymq_operator::secrets::string_data(&provisioned);
    assert_eq!(data["username"], "ferrymq_broker");
    assert!(
        data["url"].starts_with("postgres://ferrymq_broker:"),
        "{}",
        data["url"]
    );
    assert!(data["url"].ends_with("@db:5432/app"));
    assert_eq!(provisioned.owner_references()[0].name, "core");
    reconcile_broker(&h, "core").await.unwrap();
    let dbs = h.world.databases.lock().unwrap();
    assert_eq!(
        dbs.len(),
        1,
        "the password is generated once and kept: {dbs:?}"
    );
    assert_eq!(dbs[0].1.schema, "ferrymq");
}

#[tokio::test]
async fn kafka_failures_set_reconciling_or_stalled() {
    let h = harness(
        vec![
            broker_json("core", kafka_postgres_spec()),
            secret_json("pg", &[("url", "postgres://x:y@db/z")]),
            secret_json("kafka-props", &[]),
        ],
        false,
    )
    .await;
    h.world.kafka_down.store(true, Ordering::SeqCst);
    reconcile_broker(&h, "core").await.unwrap();
    let status = broker_status(&h, "core").await;
    let kafka = cond(&status.conditions, "KafkaReachable").unwrap();
    assert_eq!(
        (kafka.status.as_str(), kafka.reason.as_str()),
        ("False", "KafkaError")
    );
    assert_eq!(
        cond(&status.conditions, "Ready").unwrap().reason,
        "KafkaError"
    );
    assert_eq!(
        cond(&status.conditions, "Reconciling").unwrap().status,
        "True"
    );
    assert!(cond(&status.conditions, "Stalled").is_none());
    // The StatefulSet is still applied: the broker retries Kafka on its own.
    let sts: Api<StatefulSet> = Api::namespaced(h.client.clone(), NS);
    assert!(sts.get_opt("core").await.unwrap().is_some());

    h.world.kafka_down.store(false, Ordering::SeqCst);
    h.world.kafka_refuses.store(true, Ordering::SeqCst);
    reconcile_broker(&h, "core").await.unwrap();
    let status = broker_status(&h, "core").await;
    assert_eq!(
        cond(&status.conditions, "Stalled").unwrap().reason,
        "KafkaError"
    );
    assert!(cond(&status.conditions, "Reconciling").is_none());
}

#[tokio::test]
async fn missing_secret_and_invalid_overrides_are_reported() {
    let h = harness(vec![broker_json("core", kafka_postgres_spec())], false).await;
    reconcile_broker(&h, "core").await.unwrap();
    let status = broker_status(&h, "core").await;
    assert_eq!(
        cond(&status.conditions, "Ready").unwrap().reason,
        "SecretNotFound"
    );

    // An override of an operator-owned key (an object created before the CEL rule existed).
    let h = harness(
        vec![broker_json(
            "edge",
            json!({"image": "x", "storage": {"embedded": {}}, "config": {"listeners": []}}),
        )],
        false,
    )
    .await;
    reconcile_broker(&h, "edge").await.unwrap();
    let status = broker_status(&h, "edge").await;
    let stalled = cond(&status.conditions, "Stalled").unwrap();
    assert_eq!(
        (stalled.status.as_str(), stalled.reason.as_str()),
        ("True", "InvalidSpec")
    );
    let sts: Api<StatefulSet> = Api::namespaced(h.client.clone(), NS);
    assert!(
        sts.get_opt("edge").await.unwrap().is_none(),
        "nothing is rolled out from an invalid spec"
    );
}

#[tokio::test]
async fn api_errors_fail_the_reconcile() {
    let h = harness(
        vec![broker_json(
            "edge",
            json!({"image": "x", "storage": {"embedded": {}}}),
        )],
        true,
    )
    .await;
    let err = reconcile_broker(&h, "edge").await.unwrap_err();
    assert!(err.to_string().contains("etcd timeout"), "{err}");
    assert_eq!(err.metric_label(), "kube");
}

fn app_json(name: &str, client_id: &str, created: &str, policy: &str) -> serde_json::Value {
    json!({
        "apiVersion": "ferrymq.io/v1alpha1",
        "kind": "ApplicationClient",
        "metadata": {"name": name, "namespace": NS, "uid": format!("uid-{name}"), "generation": 1,
                     "creationTimestamp": created},
        "spec": {"brokerRef": {"name": "core"}, "clientId": client_id,
                 "topic": {"partitions": 3, "config": {"retention.ms": "3600000"}},
                 "deletionPolicy": policy},
    })
}

async fn reconcile_app(h: &Harness, name: &str) -> Result<(), ferrymq_operator::error::Error> {
    let api: Api<ApplicationClient> = Api::namespaced(h.client.clone(), NS);
    let app = api.get(name).await.expect("app exists");
    ferrymq_operator::app::reconcile(Arc::new(app), h.ctx.clone())
        .await
        .map(|_| ())
}

async fn app_status(h: &Harness, name: &str) -> ferrymq_crds::ApplicationClientStatus {
    let api: Api<ApplicationClient> = Api::namespaced(h.client.clone(), NS);
    api.get(name).await.unwrap().status.unwrap_or_default()
}

/// `kubectl delete` of an object with finalizers: the API server only sets
/// `deletionTimestamp`. kube-fake-client 0.3 removes objects at once whatever their finalizers,
/// so the cluster is rebuilt with the object as the API server would hold it (same Kafka and
/// PostgreSQL world).
async fn delete_app(h: Harness, name: &str) -> Harness {
    let mut objects = Vec::new();
    let brokers: Api<MqttBroker> = Api::namespaced(h.client.clone(), NS);
    for b in brokers.list(&Default::default()).await.unwrap() {
        objects.push(serde_json::to_value(b).unwrap());
    }
    let secrets: Api<Secret> = Api::namespaced(h.client.clone(), NS);
    for s in secrets.list(&Default::default()).await.unwrap() {
        objects.push(serde_json::to_value(s).unwrap());
    }
    let apps: Api<ApplicationClient> = Api::namespaced(h.client.clone(), NS);
    for a in apps.list(&Default::default()).await.unwrap() {
        let mut v = serde_json::to_value(&a).unwrap();
        if a.name_any() == name {
            assert!(
                !a.finalizers().is_empty(),
                "{name} has no finalizer to hold it"
            );
            v["metadata"]["deletionTimestamp"] = json!("2026-06-01T00:00:00Z");
        }
        objects.push(v);
    }
    for o in &mut objects {
        if let Some(m) = o["metadata"].as_object_mut() {
            m.remove("resourceVersion");
        }
    }
    harness_with(objects, false, h.world.clone()).await
}

fn app_world(apps: Vec<serde_json::Value>) -> Vec<serde_json::Value> {
    let mut objects = vec![
        broker_json("core", kafka_postgres_spec()),
        secret_json("pg", &[("url", "postgres://ferrymq:pw@db/ferrymq")]),
        secret_json("kafka-props", &[]),
    ];
    objects.extend(apps);
    objects
}

#[tokio::test]
async fn application_client_provisions_converges_and_deletes() {
    let h = harness(
        app_world(vec![app_json(
            "analytics",
            "analytics",
            "2026-01-01T00:00:00Z",
            "Delete",
        )]),
        false,
    )
    .await;
    // First pass adds the finalizer, the next does the work.
    reconcile_app(&h, "analytics").await.unwrap();
    let api: Api<ApplicationClient> = Api::namespaced(h.client.clone(), NS);
    assert_eq!(
        api.get("analytics").await.unwrap().finalizers(),
        ["ferrymq.io/application-client"]
    );
    reconcile_app(&h, "analytics").await.unwrap();

    let topics = h.world.topics.lock().unwrap().clone();
    assert_eq!(topics["ferrymq.app.analytics"].0, 3);
    let status = app_status(&h, "analytics").await;
    assert_eq!(status.topic_name.as_deref(), Some("ferrymq.app.analytics"));
    assert_eq!(status.partitions, Some(3));
    assert_eq!(status.secret_name.as_deref(), Some("analytics-mqtt"));
    for t in ["Ready", "TopicReady", "CredentialsReady"] {
        assert_eq!(cond(&status.conditions, t).unwrap().status, "True", "{t}");
    }
    let secrets: Api<Secret> = Api::namespaced(h.client.clone(), NS);
    let secret = secrets.get("analytics-mqtt").await.unwrap();
    assert_eq!(secret.owner_references()[0].name, "analytics");
    let password = ferrymq_operator::secrets::string_data(&secret)["password"].clone();
    let cred = h.world.credentials.lock().unwrap()["analytics"].clone();
    assert_eq!(cred.password, password);
    assert_eq!(cred.subscribe, ["#"]);

    h.writes.take();
    reconcile_app(&h, "analytics").await.unwrap();
    assert_eq!(h.writes.take(), 0, "a converged reconcile writes nothing");

    // Out-of-band drift in Kafka is set back on the next resync.
    h.world
        .topics
        .lock()
        .unwrap()
        .get_mut("ferrymq.app.analytics")
        .unwrap()
        .1
        .clear();
    reconcile_app(&h, "analytics").await.unwrap();
    assert_eq!(
        h.world.topics.lock().unwrap()["ferrymq.app.analytics"].1["retention.ms"],
        "3600000"
    );

    // Partitions grow.
    api.patch(
        "analytics",
        &PatchParams::default(),
        &Patch::Merge(&json!({"spec": {"topic": {"partitions": 6}}})),
    )
    .await
    .unwrap();
    reconcile_app(&h, "analytics").await.unwrap();
    assert_eq!(app_status(&h, "analytics").await.partitions, Some(6));

    // Delete: the topic and the credential rows go, then the finalizer.
    let h = delete_app(h, "analytics").await;
    let api: Api<ApplicationClient> = Api::namespaced(h.client.clone(), NS);
    reconcile_app(&h, "analytics").await.unwrap();
    assert!(h
        .world
        .topics
        .lock()
        .unwrap()
        .get("ferrymq.app.analytics")
        .is_none());
    assert!(h.world.credentials.lock().unwrap().is_empty());
    assert!(
        api.get_opt("analytics").await.unwrap().is_none(),
        "finalizer removed, object gone"
    );
}

#[tokio::test]
async fn a_status_field_that_becomes_empty_is_cleared() {
    let h = harness(
        app_world(vec![app_json(
            "analytics",
            "analytics",
            "2026-01-01T00:00:00Z",
            "Retain",
        )]),
        false,
    )
    .await;
    reconcile_app(&h, "analytics").await.unwrap();
    reconcile_app(&h, "analytics").await.unwrap();
    let status = app_status(&h, "analytics").await;
    assert_eq!(status.topic_id.as_deref(), Some("id-ferrymq.app.analytics"));

    // Kafka moves to servers without DescribeTopics: the topic no longer has a known id, and
    // the old one must not stay in the status as if it were current.
    h.world.no_topic_ids.store(true, Ordering::SeqCst);
    h.writes.take();
    reconcile_app(&h, "analytics").await.unwrap();
    assert_eq!(h.writes.take(), 1, "one status write");
    let api: Api<ApplicationClient> = Api::namespaced(h.client.clone(), NS);
    let raw = serde_json::to_value(api.get("analytics").await.unwrap()).unwrap();
    assert!(
        raw["status"].get("topicId").is_none(),
        "topicId is gone: {}",
        raw["status"]
    );
    // The rest of the status is still there.
    let status = app_status(&h, "analytics").await;
    assert_eq!(status.topic_name.as_deref(), Some("ferrymq.app.analytics"));
    assert_eq!(status.partitions, Some(3));
    assert_eq!(cond(&status.conditions, "Ready").unwrap().status, "True");
}

#[tokio::test]
async fn retain_keeps_the_topic_and_a_failed_delete_keeps_the_finalizer() {
    let h = harness(
        app_world(vec![
            app_json("keep", "keep", "2026-01-01T00:00:00Z", "Retain"),
            app_json("drop", "drop", "2026-01-01T00:00:00Z", "Delete"),
        ]),
        false,
    )
    .await;
    for name in ["keep", "drop"] {
        reconcile_app(&h, name).await.unwrap();
        reconcile_app(&h, name).await.unwrap();
    }
    let h = delete_app(h, "keep").await;
    let api: Api<ApplicationClient> = Api::namespaced(h.client.clone(), NS);
    reconcile_app(&h, "keep").await.unwrap();
    assert!(api.get_opt("keep").await.unwrap().is_none());
    assert!(h
        .world
        .topics
        .lock()
        .unwrap()
        .contains_key("ferrymq.app.keep"));

    h.world.kafka_down.store(true, Ordering::SeqCst);
    let h = delete_app(h, "drop").await;
    let api: Api<ApplicationClient> = Api::namespaced(h.client.clone(), NS);
    assert!(reconcile_app(&h, "drop").await.is_err());
    assert!(
        api.get_opt("drop").await.unwrap().is_some(),
        "the finalizer holds while Kafka is down"
    );
    h.world.kafka_down.store(false, Ordering::SeqCst);
    reconcile_app(&h, "drop").await.unwrap();
    assert!(api.get_opt("drop").await.unwrap().is_none());
    assert!(!h
        .world
        .topics
        .lock()
        .unwrap()
        .contains_key("ferrymq.app.drop"));
}

#[tokio::test]
async fn the_older_claim_on_a_client_id_wins() {
    let h = harness(
        app_world(vec![
            app_json("first", "shared", "2026-01-01T00:00:00Z", "Delete"),
            app_json("second", "shared", "2026-02-01T00:00:00Z", "Delete"),
        ]),
        false,
    )
    .await;
    for _ in 0..2 {
        reconcile_app(&h, "second").await.unwrap();
        reconcile_app(&h, "first").await.unwrap();
    }
    let loser = app_status(&h, "second").await;
    let ready = cond(&loser.conditions, "Ready").unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "ResourceConflict")
    );
    assert!(ready.message.contains("iot/first"), "{}", ready.message);
    assert_eq!(
        cond(&app_status(&h, "first").await.conditions, "Ready")
            .unwrap()
            .status,
        "True"
    );

    // Deleting the loser leaves the winner's topic alone.
    let h = delete_app(h, "second").await;
    let api: Api<ApplicationClient> = Api::namespaced(h.client.clone(), NS);
    reconcile_app(&h, "second").await.unwrap();
    assert!(h
        .world
        .topics
        .lock()
        .unwrap()
        .contains_key("ferrymq.app.shared"));
    assert!(api.get_opt("second").await.unwrap().is_none());
}

#[tokio::test]
async fn suspend_and_missing_broker() {
    let mut suspended = app_json("paused", "paused", "2026-01-01T00:00:00Z", "Delete");
    suspended["spec"]["suspend"] = json!(true);
    let mut orphan = app_json("orphan", "orphan", "2026-01-01T00:00:00Z", "Retain");
    orphan["spec"]["brokerRef"]["name"] = json!("nowhere");
    let h = harness(app_world(vec![suspended, orphan]), false).await;
    for name in ["paused", "orphan"] {
        reconcile_app(&h, name).await.unwrap();
        reconcile_app(&h, name).await.unwrap();
    }
    assert_eq!(
        cond(&app_status(&h, "paused").await.conditions, "Ready")
            .unwrap()
            .reason,
        "Suspended"
    );
    assert!(h.world.topics.lock().unwrap().is_empty());
    let orphan = app_status(&h, "orphan").await;
    assert_eq!(
        cond(&orphan.conditions, "Ready").unwrap().reason,
        "BrokerNotFound"
    );
    assert_eq!(
        cond(&orphan.conditions, "Reconciling").unwrap().status,
        "True"
    );
}

/// A pod of `broker` on template `revision`, `ready` or not (starting), running.
fn pod_json(name: &str, labels: &BTreeMap<String, String>, revision: &str, ready: bool) -> Pod {
    let mut labels = labels.clone();
    labels.insert("controller-revision-hash".into(), revision.into());
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": labels, "uid": format!("uid-{name}-{revision}")},
        "spec": {"containers": [{"name": "ferrymq", "image": "ferrymq:test"}]},
        "status": {"phase": "Running", "conditions": [
            {"type": "Ready", "status": if ready { "True" } else { "False" }}
        ]},
    }))
    .unwrap()
}

/// Kafka + PostgreSQL: every pod is an active cluster node (`[cluster] enabled`, its node id
/// its pod name, no `postgres.standby`), so the StatefulSet rolls them itself (RollingUpdate,
/// bounded by the PodDisruptionBudget) and the operator touches no pod. Each pod drains before
/// it stops: a `preStop` pause, then the broker's drain, inside the grace period. Ready means
/// every pod ready on the current template.
#[tokio::test]
async fn kafka_postgres_pods_are_active_nodes_rolled_by_the_statefulset() {
    let h = harness(app_world(Vec::new()), false).await;
    reconcile_broker(&h, "core").await.unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(h.client.clone(), NS);
    let cm = cms.get("core-config").await.unwrap();
    let rendered: toml::Table = cm.data.unwrap()["ferrymq.toml"].parse().unwrap();
    assert_eq!(rendered["cluster"]["enabled"].as_bool(), Some(true));
    assert!(rendered["postgres"].get("standby").is_none());
    let drain = rendered["shutdown"]["drain_secs"].as_integer().unwrap();
    assert!(drain > 0);
    assert_eq!(
        rendered["shutdown"]["server_reference"].as_str(),
        Some(format!("core.{NS}.svc").as_str())
    );

    let sts_api: Api<StatefulSet> = Api::namespaced(h.client.clone(), NS);
    let sts = sts_api.get("core").await.unwrap();
    let spec = sts.spec.clone().unwrap();
    assert_eq!(spec.replicas, Some(3));
    assert_eq!(
        spec.update_strategy.unwrap().type_.as_deref(),
        Some("RollingUpdate")
    );
    assert_eq!(spec.pod_management_policy.as_deref(), Some("Parallel"));
    let pod_spec = spec.template.spec.clone().unwrap();
    let container = &pod_spec.containers[0];
    let node_id = container
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "FERRYMQ_CLUSTER__NODE_ID")
        .expect("node id variable");
    assert_eq!(
        node_id
            .value_from
            .as_ref()
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.as_str()),
        Some("metadata.name")
    );
    let pre_stop = container
        .lifecycle
        .as_ref()
        .and_then(|l| l.pre_stop.as_ref())
        .and_then(|p| p.sleep.as_ref())
        .expect("preStop sleep")
        .seconds;
    let grace = pod_spec.termination_grace_period_seconds.unwrap();
    assert!(
        grace > pre_stop + drain,
        "grace {grace} s does not cover preStop {pre_stop} s + drain {drain} s"
    );
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(h.client.clone(), NS);
    let pdb = pdbs.get("core").await.unwrap().spec.unwrap();
    assert_eq!(pdb.max_unavailable, Some(IntOrString::Int(1)));
    assert_eq!(
        pdb.unhealthy_pod_eviction_policy.as_deref(),
        Some("AlwaysAllow")
    );

    // A template change is half rolled out by the StatefulSet controller: the operator leaves
    // the pods alone and reports the rollout.
    let labels = spec.selector.match_labels.unwrap();
    let set_sts = |ready: i32, updated: i32, current: &'static str| {
        let api = sts_api.clone();
        let generation = sts.metadata.generation;
        async move {
            let status = json!({"status": {
                "observedGeneration": generation, "replicas": 3, "readyReplicas": ready,
                "updatedReplicas": updated, "currentRevision": current, "updateRevision": "r2"
            }});
            api.patch_status("core", &PatchParams::default(), &Patch::Merge(&status))
                .await
                .unwrap();
        }
    };
    set_sts(2, 1, "r1").await;
    let pods: Api<Pod> = Api::namespaced(h.client.clone(), NS);
    let pp = kube::api::PostParams::default();
    for (name, revision, ready) in [
        ("core-0", "r1", true),
        ("core-1", "r1", true),
        ("core-2", "r2", false),
    ] {
        pods.create(&pp, &pod_json(name, &labels, revision, ready))
            .await
            .unwrap();
    }
    reconcile_broker(&h, "core").await.unwrap();
    assert_eq!(pods.list(&Default::default()).await.unwrap().items.len(), 3);
    let status = broker_status(&h, "core").await;
    let ready = cond(&status.conditions, "Ready").unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "RollingOut")
    );

    // Rolled out: every pod ready on r2.
    set_sts(3, 3, "r2").await;
    reconcile_broker(&h, "core").await.unwrap();
    let status = broker_status(&h, "core").await;
    let ready = cond(&status.conditions, "Ready").unwrap();
    assert_eq!(ready.status, "True", "{ready:?}");
    assert_eq!(ready.message, "3 of 3 pods ready");
}
