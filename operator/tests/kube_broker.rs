//! The MqttBroker controller (`controller::run`, with its watches) against a real kube-apiserver
//! and kube-controller-manager (e2e/src/harness/kube.rs): children with owner references, a
//! field removed from the spec leaving the children, the scale subresource, kstatus conditions
//! with observedGeneration, an API rejection reported as Stalled with an Event, and garbage
//! collection of the children through kube-controller-manager.
//!
//! There is no kubelet: the StatefulSet controller creates the pod, and the test sets its status
//! to Running/Ready itself (`set_pod_ready`), as a kubelet would.
//!
//! Skipped where the control-plane binaries are missing (`bash e2e/services/k8s/install.sh`),
//! unless `FERRYMQ_REQUIRE_SERVICES=1`.

mod k8s;

use std::sync::Arc;
use std::time::Duration;

use ferrymq_crds::MqttBroker;
use ferrymq_e2e::harness::kube::set_pod_ready;
use ferrymq_operator::provisioner::Real;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;

use k8s::{cluster, create, runtime, start_controllers, wait_event, wait_for};

const NS: &str = "default";
const WAIT: Duration = Duration::from_secs(60);

fn condition<'a>(
    b: &'a MqttBroker,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    b.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
}

/// Waits until `check` holds for the broker's current state.
async fn wait_broker(
    api: &Api<MqttBroker>,
    what: &str,
    check: impl Fn(&MqttBroker) -> bool,
) -> MqttBroker {
    wait_for(what, WAIT, || {
        let api = api.clone();
        let check = &check;
        async move { api.get("edge").await.ok().filter(|b| check(b)) }
    })
    .await
}

async fn wait_sts(api: &Api<StatefulSet>, what: &str, check: impl Fn(&StatefulSet) -> bool) {
    wait_for(what, WAIT, || {
        let api = api.clone();
        let check = &check;
        async move {
            api.get_opt("edge")
                .await
                .ok()
                .flatten()
                .filter(|s| check(s))
                .map(|_| ())
        }
    })
    .await;
}

fn pod_template(sts: &StatefulSet) -> serde_json::Value {
    serde_json::to_value(&sts.spec.as_ref().expect("spec").template).expect("json")
}

#[test]
fn embedded_broker_children_field_removal_scale_conditions_rejection_and_gc() {
    runtime().block_on(async {
        let Some((_cp, client)) = cluster(true).await else {
            return;
        };
        let controllers = start_controllers(&client, Arc::new(Real::new()), NS, None);
        let metrics = controllers.metrics.clone();

        let broker = json!({
            "apiVersion": "ferrymq.io/v1alpha1",
            "kind": "MqttBroker",
            "metadata": {"name": "edge", "namespace": NS},
            "spec": {
                "image": "ferrymq:test",
                "storage": {"embedded": {"size": "1Gi"}},
                "resources": {"requests": {"cpu": "100m"}, "limits": {"memory": "1Gi"}},
                "pod": {
                    "annotations": {"example.com/removed-later": "yes"},
                    "nodeSelector": {"disk": "ssd"}
                }
            }
        });
        create(&client, &broker, NS).await.expect("creating the MqttBroker");
        let brokers: Api<MqttBroker> = Api::namespaced(client.clone(), NS);
        let uid = brokers.get("edge").await.expect("edge").uid().expect("uid");

        // Children, each with the broker as controller owner.
        let sts_api: Api<StatefulSet> = Api::namespaced(client.clone(), NS);
        wait_sts(&sts_api, "StatefulSet edge", |_| true).await;
        let owned_by_broker = |refs: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference]| {
            refs.iter()
                .any(|r| r.uid == uid && r.controller == Some(true) && r.kind == "MqttBroker")
        };
        let sts = sts_api.get("edge").await.expect("sts");
        assert!(owned_by_broker(sts.owner_references()), "{:?}", sts.metadata);
        let cm: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
        assert!(owned_by_broker(
            cm.get("edge-config").await.expect("ConfigMap").owner_references()
        ));
        let svc: Api<Service> = Api::namespaced(client.clone(), NS);
        for name in ["edge", "edge-headless"] {
            let s = svc.get(name).await.unwrap_or_else(|e| panic!("Service {name}: {e}"));
            assert!(owned_by_broker(s.owner_references()), "Service {name}");
        }
        let pdb: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), NS);
        assert!(owned_by_broker(pdb.get("edge").await.expect("PDB").owner_references()));

        // kstatus: not ready yet (no pod is ready), so Reconciling=True, and every condition
        // carries the generation it was computed for.
        let b = wait_broker(&brokers, "Ready=False with Reconciling", |b| {
            condition(b, "Ready").is_some_and(|c| c.status == "False")
                && condition(b, "Reconciling").is_some_and(|c| c.status == "True")
        })
        .await;
        let generation = b.metadata.generation;
        let status = b.status.clone().expect("status");
        assert_eq!(status.observed_generation, generation);
        for c in &status.conditions {
            assert_eq!(c.observed_generation, generation, "{c:?}");
        }
        assert!(condition(&b, "Stalled").is_none());

        // kube-controller-manager's StatefulSet controller creates edge-0; no kubelet runs it,
        // so the test marks it Running and Ready, as a kubelet would.
        let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
        wait_for("pod edge-0", WAIT, || {
            let pods = pods.clone();
            async move { pods.get_opt("edge-0").await.ok().flatten().map(|_| ()) }
        })
        .await;
        set_pod_ready(&client, NS, "edge-0").await.expect("pod ready");
        let b = wait_broker(&brokers, "Ready=True", |b| {
            condition(b, "Ready").is_some_and(|c| c.status == "True")
        })
        .await;
        assert!(condition(&b, "Reconciling").is_none(), "{:?}", b.status);
        assert_eq!(b.status.as_ref().map(|s| s.ready_replicas), Some(1));

        // Fields removed from the spec leave the StatefulSet.
        let sts = sts_api.get("edge").await.expect("sts");
        let t = pod_template(&sts);
        assert_eq!(t["spec"]["nodeSelector"]["disk"], "ssd");
        assert_eq!(t["metadata"]["annotations"]["example.com/removed-later"], "yes");
        assert_eq!(t["spec"]["containers"][0]["resources"]["limits"]["memory"], "1Gi");
        brokers
            .patch(
                "edge",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {
                    "resources": {"limits": null},
                    "pod": {"annotations": null, "nodeSelector": null}
                }})),
            )
            .await
            .expect("removing fields");
        wait_sts(&sts_api, "removed fields gone from the StatefulSet", |s| {
            let t = pod_template(s);
            t["spec"]["nodeSelector"].is_null()
                && t["metadata"]["annotations"]["example.com/removed-later"].is_null()
                && t["spec"]["containers"][0]["resources"]["limits"].is_null()
                && t["spec"]["containers"][0]["resources"]["requests"]["cpu"] == "100m"
        })
        .await;

        // The scale subresource reads and writes spec.replicas and reports the selector.
        let scale = brokers.get_scale("edge").await.expect("scale");
        assert_eq!(scale.spec.and_then(|s| s.replicas), Some(1));
        let selector = scale.status.and_then(|s| s.selector).expect("scale selector");
        assert!(selector.contains("app.kubernetes.io/instance=edge"), "{selector}");
        brokers
            .patch_scale(
                "edge",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"replicas": 0}})),
            )
            .await
            .expect("scaling to 0");
        wait_sts(&sts_api, "StatefulSet scaled to 0", |s| {
            s.spec.as_ref().and_then(|s| s.replicas) == Some(0)
        })
        .await;
        // Embedded storage: the CRD refuses more than one pod through the scale subresource
        // too.
        let refused = brokers
            .patch_scale(
                "edge",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"replicas": 2}})),
            )
            .await;
        assert!(
            k8s::refusal(refused).contains("replicas > 1 needs storage.kafkaPostgres"),
            "scale to 2"
        );

        // A value the CRD accepts but the API server refuses in the StatefulSet: Stalled with
        // reason ApiRejected, and a Warning Event about the MqttBroker naming the child.
        brokers
            .patch(
                "edge",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"pod": {"labels": {"tier": "not a valid label value!"}}}})),
            )
            .await
            .expect("bad label");
        let b = wait_broker(&brokers, "Stalled=True ApiRejected", |b| {
            condition(b, "Stalled")
                .is_some_and(|c| c.status == "True" && c.reason == "ApiRejected")
        })
        .await;
        let stalled = condition(&b, "Stalled").expect("Stalled");
        assert!(stalled.message.contains("StatefulSet default/edge"), "{}", stalled.message);
        assert_eq!(stalled.observed_generation, b.metadata.generation);
        assert!(condition(&b, "Ready").is_some_and(|c| c.status == "False"));
        let event = wait_event(&client, NS, "edge", "ApiRejected").await;
        assert_eq!(event.type_.as_deref(), Some("Warning"));
        assert!(
            event.note.as_deref().unwrap_or("").contains("StatefulSet default/edge"),
            "{:?}",
            event.note
        );
        let failures = metrics.render();
        assert!(
            failures.contains("ferrymq_operator_reconcile_failures_total{controller=\"mqttbroker\",error=\"kube\"}"),
            "{failures}"
        );
        // Fixing the spec clears Stalled.
        brokers
            .patch(
                "edge",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"pod": {"labels": null}}})),
            )
            .await
            .expect("fix label");
        wait_broker(&brokers, "Stalled cleared", |b| condition(b, "Stalled").is_none()).await;

        // `spec.config` setting a key the operator renders itself: the API server accepts it
        // (no CEL rule can check a free-form object there), the operator reports
        // Stalled/InvalidSpec and leaves the children as they were.
        brokers
            .patch(
                "edge",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"config": {"listeners": [{"bind": "0.0.0.0:1"}]}}})),
            )
            .await
            .expect("config.listeners");
        let b = wait_broker(&brokers, "Stalled=True InvalidSpec", |b| {
            condition(b, "Stalled").is_some_and(|c| c.status == "True" && c.reason == "InvalidSpec")
        })
        .await;
        assert!(
            condition(&b, "Stalled").is_some_and(|c| c.message.contains("listeners")),
            "{:?}",
            b.status
        );
        brokers
            .patch(
                "edge",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"config": null}})),
            )
            .await
            .expect("fix config");
        wait_broker(&brokers, "Stalled cleared after the config fix", |b| {
            condition(b, "Stalled").is_none()
        })
        .await;

        // Deleting the MqttBroker: kube-controller-manager's garbage collector removes every
        // child through the owner references (the operator has no finalizer on brokers).
        brokers
            .delete("edge", &DeleteParams::background())
            .await
            .expect("delete");
        wait_for("children garbage-collected", Duration::from_secs(90), || {
            let (sts_api, cm, svc, pdb) = (sts_api.clone(), cm.clone(), svc.clone(), pdb.clone());
            async move {
                let gone = sts_api.get_opt("edge").await.ok()?.is_none()
                    && cm.get_opt("edge-config").await.ok()?.is_none()
                    && svc.get_opt("edge").await.ok()?.is_none()
                    && svc.get_opt("edge-headless").await.ok()?.is_none()
                    && pdb.get_opt("edge").await.ok()?.is_none();
                gone.then_some(())
            }
        })
        .await;
        controllers.shutdown().await;
    });
}

fn pod_ready_now(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// A Kafka + PostgreSQL broker with two pods (one active, one standby), Kafka and PostgreSQL
/// behind the `Provisioner` seam: its StatefulSet (Parallel, OnDelete), its conditions, and an
/// image change rolled standbys first, then the active pod, with kube-controller-manager
/// re-creating the pods. No kubelet: the test marks pods Running/Ready itself, as a kubelet
/// would (the active pod ready, the standby running but never ready, as the broker's standby
/// reports itself).
#[test]
fn kafka_postgres_broker_rolls_standbys_first_on_the_api_server() {
    runtime().block_on(async {
        let Some((_cp, client)) = cluster(true).await else {
            return;
        };
        for obj in [
            json!({"apiVersion": "v1", "kind": "Secret",
                   "metadata": {"name": "pg", "namespace": NS},
                   "stringData": {"url": "postgres://core:pw@127.0.0.1:5432/db"}}),
            json!({"apiVersion": "ferrymq.io/v1alpha1", "kind": "MqttBroker",
                   "metadata": {"name": "core", "namespace": NS},
                   "spec": {"image": "ferrymq:1", "replicas": 2,
                            "storage": {"kafkaPostgres": {
                                "kafka": {"bootstrapServers": "kafka:9092"},
                                "postgres": {"urlSecretRef": {"name": "pg", "key": "url"}}}}}}),
        ] {
            create(&client, &obj, NS).await.expect("fixture");
        }
        let controllers = start_controllers(&client, Arc::new(k8s::Fake::default()), NS, None);

        let sts_api: Api<StatefulSet> = Api::namespaced(client.clone(), NS);
        let sts = wait_for("StatefulSet core", WAIT, || {
            let sts_api = sts_api.clone();
            async move { sts_api.get_opt("core").await.ok().flatten() }
        })
        .await;
        let spec = sts.spec.as_ref().expect("spec");
        assert_eq!(spec.replicas, Some(2));
        assert_eq!(spec.pod_management_policy.as_deref(), Some("Parallel"));
        assert_eq!(
            spec.update_strategy
                .as_ref()
                .and_then(|u| u.type_.as_deref()),
            Some("OnDelete")
        );

        // kube-controller-manager creates both pods at once (Parallel). core-0 turns active
        // (ready); core-1 runs as a standby (not ready).
        let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
        for name in ["core-0", "core-1"] {
            wait_for(&format!("pod {name}"), WAIT, || {
                let pods = pods.clone();
                async move { pods.get_opt(name).await.ok().flatten().map(|_| ()) }
            })
            .await;
        }
        set_pod_ready(&client, NS, "core-0")
            .await
            .expect("core-0 ready");
        set_running(&client, "core-1").await;
        let brokers: Api<MqttBroker> = Api::namespaced(client.clone(), NS);
        let b = wait_for("core Ready with one active pod", WAIT, || {
            let brokers = brokers.clone();
            async move {
                let b = brokers.get("core").await.ok()?;
                condition(&b, "Ready")
                    .is_some_and(|c| c.status == "True")
                    .then_some(b)
            }
        })
        .await;
        assert_eq!(
            condition(&b, "Ready").map(|c| c.message.as_str()),
            Some("1 active pod, 1 standby")
        );
        for t in ["KafkaReachable", "PostgresReachable"] {
            assert!(condition(&b, t).is_some_and(|c| c.status == "True"), "{t}");
        }

        // A new image: the standby is replaced first, the active pod only once the other pod
        // runs the new template.
        let mut old_uids = Vec::new();
        for n in ["core-0", "core-1"] {
            old_uids.push(pods.get(n).await.expect("pod").uid().expect("uid"));
        }
        brokers
            .patch(
                "core",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"image": "ferrymq:2"}})),
            )
            .await
            .expect("new image");
        // core-1 (the standby) is deleted and re-created with the new template first.
        wait_for("core-1 replaced", WAIT, || {
            let pods = pods.clone();
            let old = old_uids[1].clone();
            async move {
                let p = pods.get_opt("core-1").await.ok()??;
                (p.uid().as_deref() != Some(old.as_str())).then_some(())
            }
        })
        .await;
        let active = pods.get("core-0").await.expect("core-0");
        assert_eq!(
            active.uid().as_deref(),
            Some(old_uids[0].as_str()),
            "the active pod went before the standby was replaced"
        );
        assert!(pod_ready_now(&active));
        // The new core-1 runs; then the operator replaces the active pod.
        set_running(&client, "core-1").await;
        wait_for("core-0 replaced", WAIT, || {
            let pods = pods.clone();
            let old = old_uids[0].clone();
            async move {
                let p = pods.get_opt("core-0").await.ok()??;
                (p.uid().as_deref() != Some(old.as_str())).then_some(())
            }
        })
        .await;
        let events: Api<Event> = Api::namespaced(client.clone(), NS);
        let reasons: Vec<String> = events
            .list(&ListParams::default())
            .await
            .expect("events")
            .items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("core"))
            .filter_map(|e| e.reason)
            .collect();
        for r in ["ReplacingStandbys", "ReplacingActive"] {
            assert!(reasons.iter().any(|x| x == r), "{r} not in {reasons:?}");
        }
        controllers.shutdown().await;
    });
}

/// Marks a pod Running but not Ready: how a broker standby looks (live, never ready).
async fn set_running(client: &Client, name: &str) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    pods.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Running"}})),
    )
    .await
    .unwrap_or_else(|e| panic!("pod {name} Running: {e}"));
}
