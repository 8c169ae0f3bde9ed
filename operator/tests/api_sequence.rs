//! The exact requests the reconcilers send, against a mocked API server that answers one
//! request at a time (kube's `ApiServerVerifier` pattern, on `tower-test`): method, path, patch
//! type, field manager and the body fields that matter, in order, and nothing after the last
//! one. `reconcile.rs` proves convergence on an in-memory cluster; these tests pin down what
//! each step writes, so that a reconcile that writes spec or metadata, or writes in the wrong
//! order, fails here.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use ferrymq_crds::{ApplicationClient, MqttBroker};
use ferrymq_operator::context::Context;
use ferrymq_operator::error::Error;
use ferrymq_operator::metrics::Metrics;
use ferrymq_operator::seam::{
    AppCredential, BrokerDatabase, KafkaTarget, ProvisionError, Provisioner, TopicState,
    TopicWanted,
};
use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::Client;
use serde_json::{json, Value};
use tokio::task::JoinHandle;

const NS: &str = "iot";
const BROKERS: &str = "/apis/ferrymq.io/v1alpha1/namespaces/iot/mqttbrokers";
const APPS: &str = "/apis/ferrymq.io/v1alpha1/namespaces/iot/applicationclients";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/iot/events";
const APPLY: &str = "application/apply-patch+yaml";
const MERGE: &str = "application/merge-patch+json";
const JSON_PATCH: &str = "application/json-patch+json";

/// A request the reconciler sent.
#[derive(Debug)]
struct Seen {
    query: BTreeMap<String, String>,
    content_type: Option<String>,
    body: Value,
}

impl Seen {
    /// Asserts a server-side apply by the operator's field manager, forced.
    fn assert_apply(&self) {
        assert_eq!(self.content_type.as_deref(), Some(APPLY), "{self:?}");
        assert_eq!(
            self.query.get("fieldManager").map(String::as_str),
            Some("ferrymq-operator"),
            "{self:?}"
        );
        assert_eq!(
            self.query.get("force").map(String::as_str),
            Some("true"),
            "{self:?}"
        );
    }
}

/// What the mocked API server answers.
enum Reply {
    /// This object.
    Object(Value),
    /// The request body, as a create or an apply that made exactly what was sent would.
    Echo,
    /// This object with the request's merge patch or JSON patch applied (a JSON patch whose
    /// `test` fails the object fails the test).
    Patched(Value),
    /// An error status with this code and reason.
    Error(u16, &'static str),
}

/// The mocked API server: each `expect` takes the next request the reconciler sent.
struct ApiServer {
    handle: tower_test::mock::Handle<Request<Body>, Response<Body>>,
}

impl ApiServer {
    /// Takes the next request, asserts its method and path, answers with `reply`.
    async fn expect(&mut self, method: Method, path: &str, reply: Reply) -> Seen {
        let next = tokio::time::timeout(Duration::from_secs(10), self.handle.next_request())
            .await
            .unwrap_or_else(|_| panic!("no request within 10 s; expected {method} {path}"));
        let Some((request, send)) = next else {
            panic!("the reconcile ended before {method} {path}");
        };
        assert_eq!(
            (request.method(), request.uri().path()),
            (&method, path),
            "unexpected request {} {}",
            request.method(),
            request.uri()
        );
        let query = request
            .uri()
            .query()
            .map(|q| {
                url::form_urlencoded::parse(q.as_bytes())
                    .into_owned()
                    .collect()
            })
            .unwrap_or_default();
        let content_type = request
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let bytes = request
            .into_body()
            .collect_bytes()
            .await
            .expect("request body");
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).expect("request body is JSON")
        };
        let (code, answer) = match reply {
            Reply::Object(v) => (200, v),
            Reply::Echo => (if method == Method::POST { 201 } else { 200 }, body.clone()),
            Reply::Patched(mut obj) => {
                match content_type.as_deref() {
                    Some(MERGE) => json_patch::merge(&mut obj, &body),
                    Some(JSON_PATCH) => {
                        let patch: json_patch::Patch =
                            serde_json::from_value(body.clone()).expect("a JSON patch");
                        json_patch::patch(&mut obj, &patch).expect("the JSON patch applies");
                    }
                    other => panic!("not a merge or JSON patch: {other:?}"),
                }
                (200, obj)
            }
            Reply::Error(code, reason) => (
                code,
                json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                       "message": format!("injected: {reason}"), "reason": reason, "code": code}),
            ),
        };
        send.send_response(
            Response::builder()
                .status(StatusCode::from_u16(code).expect("status code"))
                .body(Body::from(serde_json::to_vec(&answer).expect("json")))
                .expect("response"),
        );
        Seen {
            query,
            content_type,
            body,
        }
    }

    /// Answers a GET with 404, as for an object that does not exist yet.
    async fn expect_absent(&mut self, path: &str) {
        self.expect(Method::GET, path, Reply::Error(404, "NotFound"))
            .await;
    }

    /// Asserts that the reconcile sends nothing more: the client (held only by the reconcile's
    /// context) is dropped when the reconcile ends, which ends the request stream.
    async fn expect_end(mut self) {
        let next = tokio::time::timeout(Duration::from_secs(10), self.handle.next_request())
            .await
            .expect("the reconcile did not end");
        if let Some((request, _)) = next {
            panic!(
                "unexpected request after the last expected one: {} {}",
                request.method(),
                request.uri()
            );
        }
    }
}

/// Fails the test on any Kafka or PostgreSQL side effect: none of these scenarios may cause one.
#[derive(Default)]
struct NoSideEffects {
    calls: Mutex<Vec<String>>,
}

impl NoSideEffects {
    fn record(&self, call: String) -> ProvisionError {
        self.calls.lock().expect("lock").push(call.clone());
        ProvisionError::permanent(format!("unexpected side effect: {call}"))
    }
}

#[async_trait]
impl Provisioner for NoSideEffects {
    async fn check_kafka(&self, _: &KafkaTarget) -> Result<(), ProvisionError> {
        Err(self.record("check_kafka".into()))
    }
    async fn ensure_topic(
        &self,
        _: &KafkaTarget,
        t: &TopicWanted,
    ) -> Result<TopicState, ProvisionError> {
        Err(self.record(format!("ensure_topic {}", t.name)))
    }
    async fn delete_topic(&self, _: &KafkaTarget, topic: &str) -> Result<bool, ProvisionError> {
        Err(self.record(format!("delete_topic {topic}")))
    }
    async fn ensure_broker_database(
        &self,
        _: &str,
        db: &BrokerDatabase,
        _: &str,
    ) -> Result<bool, ProvisionError> {
        Err(self.record(format!("ensure_broker_database {}", db.schema)))
    }
    async fn check_postgres(&self, _: &str) -> Result<(), ProvisionError> {
        Err(self.record("check_postgres".into()))
    }
    async fn upsert_application(
        &self,
        _: &str,
        _: &str,
        c: &AppCredential,
    ) -> Result<bool, ProvisionError> {
        Err(self.record(format!("upsert_application {}", c.client_id)))
    }
    async fn delete_application(
        &self,
        _: &str,
        _: &str,
        client_id: &str,
        _: &str,
    ) -> Result<bool, ProvisionError> {
        Err(self.record(format!("delete_application {client_id}")))
    }
}

/// A reconcile running against the mocked API server.
struct Scenario {
    server: ApiServer,
    task: JoinHandle<Result<Action, Error>>,
    provisioner: Arc<NoSideEffects>,
}

impl Scenario {
    fn context() -> (ApiServer, Arc<Context>, Arc<NoSideEffects>, Arc<Metrics>) {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, NS);
        let provisioner = Arc::new(NoSideEffects::default());
        let metrics = Arc::new(Metrics::new());
        let ctx = Arc::new(Context::new(
            client,
            provisioner.clone(),
            metrics.clone(),
            Some("test".into()),
        ));
        (ApiServer { handle }, ctx, provisioner, metrics)
    }

    fn broker(obj: Value) -> Scenario {
        let broker: MqttBroker = serde_json::from_value(obj).expect("an MqttBroker");
        let (server, ctx, provisioner, _) = Scenario::context();
        let task = tokio::spawn(ferrymq_operator::broker::reconcile(Arc::new(broker), ctx));
        Scenario {
            server,
            task,
            provisioner,
        }
    }

    fn app(obj: Value) -> Scenario {
        let app: ApplicationClient = serde_json::from_value(obj).expect("an ApplicationClient");
        let (server, ctx, provisioner, _) = Scenario::context();
        let task = tokio::spawn(ferrymq_operator::app::reconcile(Arc::new(app), ctx));
        Scenario {
            server,
            task,
            provisioner,
        }
    }

    /// Asserts that nothing more is requested and no side effect happened; returns the result.
    async fn finish(self) -> Result<Action, Error> {
        self.server.expect_end().await;
        assert_eq!(
            *self.provisioner.calls.lock().expect("lock"),
            Vec::<String>::new(),
            "Kafka or PostgreSQL was touched"
        );
        self.task.await.expect("the reconcile panicked")
    }
}

fn broker_json(name: &str) -> Value {
    json!({
        "apiVersion": "ferrymq.io/v1alpha1",
        "kind": "MqttBroker",
        "metadata": {"name": name, "namespace": NS, "uid": format!("uid-{name}"),
                     "generation": 1, "resourceVersion": "7"},
        "spec": {"image": "ferrymq:test", "storage": {"embedded": {"size": "2Gi"}}},
    })
}

fn app_json(name: &str, created: &str, finalizers: &[&str]) -> Value {
    json!({
        "apiVersion": "ferrymq.io/v1alpha1",
        "kind": "ApplicationClient",
        "metadata": {"name": name, "namespace": NS, "uid": format!("uid-{name}"),
                     "generation": 1, "resourceVersion": "11", "creationTimestamp": created,
                     "finalizers": finalizers},
        "spec": {"brokerRef": {"name": "core"}, "clientId": "shared",
                 "topic": {"partitions": 3}, "deletionPolicy": "Delete"},
    })
}

fn list(kind: &str, api_version: &str, items: Vec<Value>) -> Value {
    json!({"apiVersion": api_version, "kind": kind, "metadata": {"resourceVersion": "100"},
           "items": items})
}

fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == type_))
        .unwrap_or_else(|| panic!("no {type_} condition in {status}"))
}

/// The children of an embedded broker, each looked up and then applied, in this order.
const EMBEDDED_CHILDREN: [(&str, &str); 5] = [
    ("/api/v1/namespaces/iot/configmaps/edge-config", "ConfigMap"),
    ("/api/v1/namespaces/iot/services/edge-headless", "Service"),
    ("/api/v1/namespaces/iot/services/edge", "Service"),
    (
        "/apis/apps/v1/namespaces/iot/statefulsets/edge",
        "StatefulSet",
    ),
    (
        "/apis/policy/v1/namespaces/iot/poddisruptionbudgets/edge",
        "PodDisruptionBudget",
    ),
];
const SERVICE_MONITOR_CRD: &str =
    "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/servicemonitors.monitoring.coreos.com";

#[tokio::test]
async fn broker_first_reconcile_applies_children_then_writes_status() {
    let broker = broker_json("edge");
    let mut s = Scenario::broker(broker.clone());
    // No finalizer comes first: an MqttBroker holds none (its children go with it through
    // owner references, its data stays), so the object itself is never written.
    for (i, (path, kind)) in EMBEDDED_CHILDREN.iter().enumerate() {
        s.server.expect_absent(path).await;
        let apply = s.server.expect(Method::PATCH, path, Reply::Echo).await;
        apply.assert_apply();
        assert_eq!(apply.body["kind"], *kind);
        let owner = &apply.body["metadata"]["ownerReferences"][0];
        assert_eq!(
            (&owner["kind"], &owner["uid"], &owner["controller"]),
            (&json!("MqttBroker"), &json!("uid-edge"), &json!(true)),
            "{path}"
        );
        if i == 2 {
            // Client Services of removed listeners are found by label and deleted; none here.
            let listed = s
                .server
                .expect(
                    Method::GET,
                    "/api/v1/namespaces/iot/services",
                    Reply::Object(list("ServiceList", "v1", vec![])),
                )
                .await;
            assert_eq!(
                listed.query["labelSelector"],
                "app.kubernetes.io/instance=edge,ferrymq.io/service=client"
            );
        }
    }
    // The ServiceMonitor CRD is looked up by name (a narrow RBAC grant); not wanted, not made.
    s.server.expect_absent(SERVICE_MONITOR_CRD).await;
    let status = s
        .server
        .expect(
            Method::PATCH,
            &format!("{BROKERS}/edge/status"),
            Reply::Patched(broker),
        )
        .await;
    assert_eq!(status.content_type.as_deref(), Some(MERGE));
    assert_eq!(
        status.query.get("fieldManager").map(String::as_str),
        Some("ferrymq-operator")
    );
    assert_eq!(
        status
            .body
            .as_object()
            .map(|o| o.keys().collect::<Vec<_>>()),
        Some(vec![&"status".to_string()]),
        "a status write carries nothing but the status: {}",
        status.body
    );
    let st = &status.body["status"];
    assert_eq!(st["observedGeneration"], 1);
    // The whole status is replaced: every field is named, an empty one as null.
    let mut fields: Vec<_> = st.as_object().expect("status").keys().cloned().collect();
    fields.sort();
    assert_eq!(
        fields,
        [
            "conditions",
            "configHash",
            "endpoints",
            "observedGeneration",
            "readyReplicas",
            "replicas",
            "selector",
            "storageBackend",
            "updatedReplicas"
        ]
    );
    assert_eq!(st["storageBackend"], "embedded");
    assert_eq!(st["endpoints"][0]["url"], "mqtt://edge.iot.svc:1883");
    let ready = condition(st, "Ready");
    assert_eq!(
        (&ready["status"], &ready["observedGeneration"]),
        (&json!("False"), &json!(1))
    );
    assert_eq!(condition(st, "Reconciling")["status"], "True");
    let action = s.finish().await.expect("reconcile succeeds");
    assert_eq!(action, Action::requeue(Duration::from_secs(15)));
}

#[tokio::test]
async fn deleting_a_broker_writes_nothing() {
    let mut broker = broker_json("edge");
    broker["metadata"]["deletionTimestamp"] = json!("2026-06-01T00:00:00Z");
    let s = Scenario::broker(broker);
    assert_eq!(s.finish().await.expect("reconcile"), Action::await_change());
}

#[tokio::test]
async fn application_client_first_reconcile_only_adds_the_finalizer() {
    let app = app_json("first", "2026-01-01T00:00:00Z", &[]);
    let mut s = Scenario::app(app.clone());
    let patch = s
        .server
        .expect(Method::PATCH, &format!("{APPS}/first"), Reply::Patched(app))
        .await;
    assert_eq!(patch.content_type.as_deref(), Some(JSON_PATCH));
    assert_eq!(
        patch.body,
        json!([
            {"op": "test", "path": "/metadata/resourceVersion", "value": "11"},
            {"op": "add", "path": "/metadata/finalizers", "value": ["ferrymq.io/application-client"]},
        ])
    );
    assert_eq!(s.finish().await.expect("reconcile"), Action::await_change());
}

#[tokio::test]
async fn deleting_a_retained_application_client_only_removes_the_finalizer() {
    let mut app = app_json(
        "first",
        "2026-01-01T00:00:00Z",
        &["ferrymq.io/application-client"],
    );
    app["metadata"]["deletionTimestamp"] = json!("2026-06-01T00:00:00Z");
    app["spec"]["deletionPolicy"] = json!("Retain");
    let mut s = Scenario::app(app.clone());
    let patch = s
        .server
        .expect(Method::PATCH, &format!("{APPS}/first"), Reply::Patched(app))
        .await;
    assert_eq!(patch.content_type.as_deref(), Some(JSON_PATCH));
    assert_eq!(
        patch.body,
        json!([
            {"op": "test", "path": "/metadata/finalizers/0", "value": "ferrymq.io/application-client"},
            {"op": "remove", "path": "/metadata/finalizers/0"},
        ])
    );
    assert_eq!(s.finish().await.expect("reconcile"), Action::await_change());
}

#[tokio::test]
async fn a_newer_claim_on_a_client_id_gets_only_a_conflict_status() {
    let fin = ["ferrymq.io/application-client"];
    let older = app_json("first", "2026-01-01T00:00:00Z", &fin);
    let newer = app_json("second", "2026-02-01T00:00:00Z", &fin);
    let mut s = Scenario::app(newer.clone());
    let status_reply = Reply::Patched(newer.clone());
    s.server
        .expect(
            Method::GET,
            APPS,
            Reply::Object(list(
                "ApplicationClientList",
                "ferrymq.io/v1alpha1",
                vec![newer, older],
            )),
        )
        .await;
    // No broker lookup, no Secret, no topic, no credential rows: only the status.
    let status = s
        .server
        .expect(
            Method::PATCH,
            &format!("{APPS}/second/status"),
            status_reply,
        )
        .await;
    assert_eq!(status.content_type.as_deref(), Some(MERGE));
    assert_eq!(
        status.query.get("fieldManager").map(String::as_str),
        Some("ferrymq-operator")
    );
    let st = &status.body["status"];
    let ready = condition(st, "Ready");
    assert_eq!(
        (&ready["status"], &ready["reason"]),
        (&json!("False"), &json!("ResourceConflict"))
    );
    assert!(
        ready["message"]
            .as_str()
            .is_some_and(|m| m.contains("iot/first")),
        "{ready}"
    );
    assert_eq!(condition(st, "Stalled")["status"], "True");
    // A client that lost the claim reports no topic (null clears one it may have had).
    assert_eq!(st.get("topicName"), Some(&Value::Null), "{st}");
    let event = s.server.expect(Method::POST, EVENTS, Reply::Echo).await;
    assert_eq!(
        (
            &event.body["type"],
            &event.body["reason"],
            &event.body["regarding"]["name"]
        ),
        (
            &json!("Warning"),
            &json!("ResourceConflict"),
            &json!("second")
        )
    );
    // The owner may go away: look again at the resync period.
    assert_eq!(
        s.finish().await.expect("reconcile"),
        Action::requeue(Duration::from_secs(300))
    );
}

#[tokio::test]
async fn a_failed_write_fails_the_reconcile_and_goes_to_the_error_policy() {
    // 500 on the first write: nothing after it is attempted.
    let mut s = Scenario::broker(broker_json("edge"));
    let (cm, _) = EMBEDDED_CHILDREN[0];
    s.server.expect_absent(cm).await;
    s.server
        .expect(Method::PATCH, cm, Reply::Error(500, "InternalError"))
        .await;
    let err = s.finish().await.expect_err("a 500 fails the reconcile");
    assert!(
        matches!(&err, Error::Kube(kube::Error::Api(st)) if st.code == 500),
        "{err:?}"
    );

    // The error policy requeues after its base delay and counts the failure by kind.
    let (_server, ctx, _, metrics) = Scenario::context();
    let broker: MqttBroker = serde_json::from_value(broker_json("edge")).expect("broker");
    let policy = ferrymq_operator::controller::error_policy::<MqttBroker>("mqttbroker");
    assert_eq!(
        policy(Arc::new(broker), &err, ctx),
        Action::requeue(Duration::from_secs(10))
    );
    assert_eq!(
        metrics
            .failures
            .with_label_values(&["mqttbroker", "kube"])
            .get(),
        1
    );

    // 409 on the status write: the children are in place, the reconcile still fails.
    let mut s = Scenario::broker(broker_json("edge"));
    for (i, (path, _)) in EMBEDDED_CHILDREN.iter().enumerate() {
        s.server.expect_absent(path).await;
        s.server.expect(Method::PATCH, path, Reply::Echo).await;
        if i == 2 {
            s.server
                .expect(
                    Method::GET,
                    "/api/v1/namespaces/iot/services",
                    Reply::Object(list("ServiceList", "v1", vec![])),
                )
                .await;
        }
    }
    s.server.expect_absent(SERVICE_MONITOR_CRD).await;
    s.server
        .expect(
            Method::PATCH,
            &format!("{BROKERS}/edge/status"),
            Reply::Error(409, "Conflict"),
        )
        .await;
    let err = s.finish().await.expect_err("a 409 fails the reconcile");
    assert!(
        matches!(&err, Error::Kube(kube::Error::Api(st)) if st.code == 409),
        "{err:?}"
    );
    assert_eq!(err.metric_label(), "kube");
}
