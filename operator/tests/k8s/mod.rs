//! Shared by the tests that run against a real Kubernetes API server (e2e/src/harness/kube.rs):
//! starting the control plane and the controllers, applying the CRDs and manifests, waiting for
//! conditions and Events, and standing in for a kubelet (a container's environment).
#![allow(dead_code)] // each test binary uses a part

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use ferrymq_e2e::harness::kube::{require_control_plane, ControlPlane, ControlPlaneOptions};
use ferrymq_operator::context::Context;
use ferrymq_operator::metrics::Metrics;
use ferrymq_operator::seam::{
    AppCredential, BrokerDatabase, KafkaTarget, ProvisionError, Provisioner, TopicState,
    TopicWanted,
};
use futures_util::FutureExt;
use k8s_openapi::api::core::v1::{Container, Namespace, Secret};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::Client;
use serde::Deserialize;

/// The runtime every kube test runs in: two workers, as many as the machine's cores.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Both controllers (`controller::run`, with their watches) in this process, on `provisioner`,
/// reconciling `namespace`, until the returned sender is sent `true` or dropped. `resync`
/// replaces the 5-minute resync when set, so a test sees resyncs (drift checks) in seconds.
pub fn start_controllers(
    client: &Client,
    provisioner: Arc<dyn Provisioner>,
    namespace: &str,
    resync: Option<Duration>,
) -> Controllers {
    let metrics = Arc::new(Metrics::new());
    let mut ctx = Context::new(
        client.clone(),
        provisioner,
        metrics.clone(),
        Some("operator-test".into()),
    );
    if let Some(resync) = resync {
        ctx.resync = resync;
    }
    let (stop, mut rx) = tokio::sync::watch::channel(false);
    let stopped = async move {
        let _ = rx.wait_for(|s| *s).await;
    }
    .boxed()
    .shared();
    let task = tokio::spawn(ferrymq_operator::controller::run(
        Arc::new(ctx),
        Some(namespace.into()),
        stopped,
    ));
    Controllers {
        stop,
        metrics,
        task,
    }
}

/// Controllers started by [`start_controllers`].
pub struct Controllers {
    pub stop: tokio::sync::watch::Sender<bool>,
    pub metrics: Arc<Metrics>,
    pub task: tokio::task::JoinHandle<()>,
}

impl Controllers {
    /// Stops them and waits (at most 30 s) for the reconciles in flight to finish.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(30), self.task).await;
    }
}

/// Whether the ApplicationClient is Ready for its current generation.
pub fn app_ready(a: &ferrymq_crds::ApplicationClient) -> bool {
    a.status.as_ref().is_some_and(|s| {
        s.observed_generation == a.metadata.generation
            && s.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
    })
}

/// Waits (60 s at most) until `api` lists nothing: every object deleted, finalizers done.
pub async fn wait_all_gone<K>(api: &Api<K>)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    wait_for(
        &format!("every {} gone", std::any::type_name::<K>()),
        Duration::from_secs(60),
        || {
            let api = api.clone();
            async move {
                api.list(&ListParams::default())
                    .await
                    .ok()
                    .filter(|l| l.items.is_empty())
                    .map(|_| ())
            }
        },
    )
    .await
}

/// The first Event about the object `name` with `reason`, waited for up to `timeout`.
pub async fn wait_event(client: &Client, ns: &str, name: &str, reason: &str) -> Event {
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    wait_for(
        &format!("a {reason} Event about {name}"),
        Duration::from_secs(60),
        || {
            let events = events.clone();
            async move {
                events
                    .list(&ListParams::default())
                    .await
                    .ok()?
                    .items
                    .into_iter()
                    .find(|e| {
                        e.reason.as_deref() == Some(reason)
                            && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
                    })
            }
        },
    )
    .await
}

/// What a kubelet gives `container` of pod `pod_name` as environment: `env` values,
/// `valueFrom.secretKeyRef` and `envFrom.secretRef` (with its prefix) resolved against the
/// Secrets in the API server, and `valueFrom.fieldRef` `metadata.name` (the pod's name), as the
/// pod would see them. Anything else (ConfigMap refs, other field refs) panics: the operator
/// sets none today, and a test must not silently drop what a pod would get.
pub async fn container_env(
    client: &Client,
    ns: &str,
    container: &Container,
    pod_name: &str,
) -> Vec<(String, String)> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let read = |name: String| {
        let secrets = secrets.clone();
        async move {
            let secret = secrets
                .get(&name)
                .await
                .unwrap_or_else(|e| panic!("Secret {name} the pod refers to: {e}"));
            let mut data: BTreeMap<String, String> = BTreeMap::new();
            for (k, v) in secret.data.unwrap_or_default() {
                let text = String::from_utf8(v.0).expect("UTF-8 Secret value");
                data.insert(k, text);
            }
            for (k, v) in secret.string_data.unwrap_or_default() {
                data.insert(k, v);
            }
            data
        }
    };
    let mut env = Vec::new();
    for from in container.env_from.iter().flatten() {
        let secret = from
            .secret_ref
            .as_ref()
            .unwrap_or_else(|| panic!("envFrom other than secretRef: {from:?}"));
        let prefix = from.prefix.clone().unwrap_or_default();
        for (k, v) in read(secret.name.clone()).await {
            env.push((format!("{prefix}{k}"), v));
        }
    }
    for var in container.env.iter().flatten() {
        let value = match (&var.value, &var.value_from) {
            (Some(v), None) => v.clone(),
            // The downward API's pod name (the cluster node id).
            (None, Some(from))
                if from
                    .field_ref
                    .as_ref()
                    .is_some_and(|f| f.field_path == "metadata.name") =>
            {
                pod_name.to_string()
            }
            (None, Some(from)) => {
                let r = from.secret_key_ref.as_ref().unwrap_or_else(|| {
                    panic!("valueFrom other than secretKeyRef or metadata.name: {var:?}")
                });
                read(r.name.clone())
                    .await
                    .remove(&r.key)
                    .unwrap_or_else(|| panic!("Secret {} has no key {}", r.name, r.key))
            }
            other => panic!("env {} with {other:?}", var.name),
        };
        env.push((var.name.clone(), value));
    }
    env
}

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// The control plane, or `None` when the test should be skipped (a message was printed).
pub async fn control_plane(controller_manager: bool) -> Option<ControlPlane> {
    if !require_control_plane() {
        return None;
    }
    Some(
        ControlPlane::start(ControlPlaneOptions { controller_manager })
            .await
            .expect("starting the control plane"),
    )
}

/// A control plane with this project's CRDs Established and an admin client of it, or `None`
/// when the test should be skipped (a message was printed). Keep the [`ControlPlane`]: dropping
/// it stops the API server.
pub async fn cluster(controller_manager: bool) -> Option<(ControlPlane, Client)> {
    let cp = control_plane(controller_manager).await?;
    let client = cp.client().await.expect("client");
    apply_crds(&client).await;
    Some((cp, client))
}

/// Polls `check` every 200 ms until it returns `Some`, or panics after `timeout` with `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every YAML document of `text`, empty ones left out.
pub fn yaml_docs(text: &str) -> Vec<serde_json::Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| serde_json::Value::deserialize(d).expect("valid YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

/// Applies the CRDs users apply (the committed `crds/*.yaml`, which a test keeps equal to
/// crdgen's output) and waits until both are Established.
pub async fn apply_crds(client: &Client) {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for file in ["mqttbroker.yaml", "applicationclient.yaml"] {
        let text = std::fs::read_to_string(repo().join("crds").join(file)).expect("crd file");
        let crd: CustomResourceDefinition = serde_yaml::from_str(&text).expect("CRD YAML");
        let name = crd.metadata.name.clone().expect("CRD name");
        api.patch(
            &name,
            &PatchParams::apply("e2e").force(),
            &Patch::Apply(&crd),
        )
        .await
        .unwrap_or_else(|e| panic!("the API server refused the CRD {file}: {e}"));
    }
    for name in ["mqttbrokers.ferrymq.io", "applicationclients.ferrymq.io"] {
        wait_for(
            &format!("CRD {name} Established"),
            Duration::from_secs(30),
            || {
                let api = api.clone();
                async move {
                    let crd = api.get(name).await.ok()?;
                    crd.status?
                        .conditions?
                        .iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                        .then_some(())
                }
            },
        )
        .await;
    }
    // The discovery of a new CRD reaches the API server's handlers a moment after Established.
    let brokers: Api<ferrymq_crds::MqttBroker> = Api::all(client.clone());
    wait_for("MqttBroker served", Duration::from_secs(30), || {
        let brokers = brokers.clone();
        async move { brokers.list(&Default::default()).await.ok().map(|_| ()) }
    })
    .await;
}

pub async fn create_namespace(client: &Client, name: &str) {
    let api: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace =
        serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).expect("ns");
    match api.create(&PostParams::default(), &ns).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => panic!("creating namespace {name}: {e}"),
    }
}

/// The `ApiResource` of a kind this project's manifests use.
pub fn resource_of(api_version: &str, kind: &str) -> ApiResource {
    use k8s_openapi::api::{apps, core, rbac};
    match (api_version, kind) {
        ("v1", "Secret") => ApiResource::erase::<core::v1::Secret>(&()),
        ("v1", "ConfigMap") => ApiResource::erase::<core::v1::ConfigMap>(&()),
        ("v1", "Service") => ApiResource::erase::<core::v1::Service>(&()),
        ("v1", "ServiceAccount") => ApiResource::erase::<core::v1::ServiceAccount>(&()),
        ("apps/v1", "Deployment") => ApiResource::erase::<apps::v1::Deployment>(&()),
        ("autoscaling/v2", "HorizontalPodAutoscaler") => {
            ApiResource::erase::<k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler>(&())
        }
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
            ApiResource::erase::<rbac::v1::ClusterRole>(&())
        }
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            ApiResource::erase::<rbac::v1::ClusterRoleBinding>(&())
        }
        ("rbac.authorization.k8s.io/v1", "Role") => ApiResource::erase::<rbac::v1::Role>(&()),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => {
            ApiResource::erase::<rbac::v1::RoleBinding>(&())
        }
        ("ferrymq.io/v1alpha1", "MqttBroker") => {
            ApiResource::erase::<ferrymq_crds::MqttBroker>(&())
        }
        ("ferrymq.io/v1alpha1", "ApplicationClient") => {
            ApiResource::erase::<ferrymq_crds::ApplicationClient>(&())
        }
        other => panic!("no ApiResource for {other:?} in this test"),
    }
}

/// Creates `obj` (any kind [`resource_of`] knows) in its namespace, or `default_ns`.
pub async fn create(
    client: &Client,
    obj: &serde_json::Value,
    default_ns: &str,
) -> Result<DynamicObject, kube::Error> {
    let ar = resource_of(
        obj["apiVersion"].as_str().expect("apiVersion"),
        obj["kind"].as_str().expect("kind"),
    );
    let dynamic: DynamicObject = serde_json::from_value(obj.clone()).expect("object");
    let cluster_scoped = matches!(
        obj["kind"].as_str(),
        Some("ClusterRole" | "ClusterRoleBinding")
    );
    let api: Api<DynamicObject> = if cluster_scoped {
        Api::all_with(client.clone(), &ar)
    } else {
        let ns = obj["metadata"]["namespace"].as_str().unwrap_or(default_ns);
        Api::namespaced_with(client.clone(), ns, &ar)
    };
    api.create(&PostParams::default(), &dynamic).await
}

/// The message of an API error (panics on success or another error kind).
pub fn refusal<T: std::fmt::Debug>(result: Result<T, kube::Error>) -> String {
    match result {
        Err(kube::Error::Api(e)) => e.message,
        other => panic!("expected the API server to refuse, got {other:?}"),
    }
}

/// The chart rendered with `values` for release `fmq` in `namespace` (charts/render.py, through
/// helm-python-sdk as charts/test_chart.py uses it): `{"objects": [...], "notes": "..."}`. `None`
/// (skip, with a message) where helm-python-sdk is not installed, unless
/// `FERRYMQ_REQUIRE_SERVICES=1`.
pub fn render_chart(namespace: &str, values: serde_json::Value) -> Option<serde_json::Value> {
    let out = Command::new("python3")
        .arg(repo().join("charts/render.py"))
        .args(["fmq", namespace, &values.to_string()])
        .output()
        .expect("running python3 charts/render.py");
    if out.status.code() == Some(3) {
        let msg = "helm-python-sdk is not installed (pip install helm-python-sdk)";
        if std::env::var("FERRYMQ_REQUIRE_SERVICES").is_ok_and(|v| v == "1") {
            panic!("{msg}");
        }
        eprintln!("SKIPPED: {msg}");
        return None;
    }
    assert!(
        out.status.success(),
        "render.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(serde_json::from_slice(&out.stdout).expect("render.py JSON"))
}

/// Kafka and PostgreSQL that answer and already hold what is asked for; topics of clients
/// named in `failing` fail with a permanent Kafka error; deletions are recorded.
#[derive(Default)]
pub struct Fake {
    pub ensure_topic: AtomicUsize,
    pub failing: Vec<String>,
    pub deleted: std::sync::Mutex<Vec<String>>,
}

#[async_trait]
impl Provisioner for Fake {
    async fn check_kafka(&self, _: &KafkaTarget) -> Result<(), ProvisionError> {
        Ok(())
    }
    async fn ensure_topic(
        &self,
        _: &KafkaTarget,
        topic: &TopicWanted,
    ) -> Result<TopicState, ProvisionError> {
        self.ensure_topic.fetch_add(1, Ordering::Relaxed);
        if self
            .failing
            .iter()
            .any(|c| topic.name.ends_with(c.as_str()))
        {
            return Err(ProvisionError::permanent(format!(
                "TopicAuthorizationFailed on {}",
                topic.name
            )));
        }
        Ok(TopicState {
            topic_id: Some(format!("id-{}", topic.name)),
            partitions: topic.partitions,
            ..Default::default()
        })
    }
    async fn delete_topic(&self, _: &KafkaTarget, topic: &str) -> Result<bool, ProvisionError> {
        if let Ok(mut d) = self.deleted.lock() {
            d.push(format!("topic {topic}"));
        }
        Ok(true)
    }
    async fn ensure_broker_database(
        &self,
        _: &str,
        _: &BrokerDatabase,
        _: &str,
    ) -> Result<bool, ProvisionError> {
        Ok(false)
    }
    async fn check_postgres(&self, _: &str) -> Result<(), ProvisionError> {
        Ok(())
    }
    async fn upsert_application(
        &self,
        _: &str,
        _: &str,
        _: &AppCredential,
    ) -> Result<bool, ProvisionError> {
        Ok(false)
    }
    async fn delete_application(
        &self,
        _: &str,
        _: &str,
        client_id: &str,
        _: &str,
    ) -> Result<bool, ProvisionError> {
        if let Ok(mut d) = self.deleted.lock() {
            d.push(format!("credentials {client_id}"));
        }
        Ok(true)
    }
}
