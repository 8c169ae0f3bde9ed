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
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::ResourceExt;
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
    wait_sts_named(api, "edge", what, check).await
}

async fn wait_sts_named(
    api: &Api<StatefulSet>,
    name: &str,
    what: &str,
    check: impl Fn(&StatefulSet) -> bool,
) {
    wait_for(what, WAIT, || {
        let api = api.clone();
        let check = &check;
        async move {
            api.get_opt(name)
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

/// The pod's uid, once the StatefulSet controller has created it.
async fn pod_uid(pods: &Api<Pod>, name: &str) -> String {
    wait_for(&format!("pod {name}"), WAIT, || {
        let pods = pods.clone();
        async move { pods.get_opt(name).await.ok().flatten()?.uid() }
    })
    .await
}

/// Waits until pod `name` exists with a uid other than `old` (the StatefulSet controller
/// replaced it) and returns the new uid.
async fn replaced(pods: &Api<Pod>, name: &str, old: &str) -> String {
    wait_for(&format!("{name} replaced"), WAIT, || {
        let pods = pods.clone();
        async move {
            let uid = pods.get_opt(name).await.ok()??.uid()?;
            (uid != old).then_some(uid)
        }
    })
    .await
}

/// A Kafka + PostgreSQL broker (Kafka and PostgreSQL behind the `Provisioner` seam) whose pods
/// are all active cluster nodes: its config (`[cluster] enabled`, the node id from the pod
/// name, a drain), its StatefulSet (RollingUpdate, a preStop pause inside the grace period)
/// and PodDisruptionBudget (maxUnavailable 1) as the API server stores them; `kubectl scale`
/// (a patch of the scale subresource) changing the StatefulSet's replicas; and an image change
/// rolled by kube-controller-manager's StatefulSet controller one pod at a time, highest
/// ordinal first, each replaced pod turning ready before the next goes. No kubelet: the test
/// marks pods Running/Ready itself, as a kubelet would.
#[test]
fn kafka_postgres_pods_are_active_nodes_scaled_and_rolled_on_the_api_server() {
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
            Some("RollingUpdate")
        );
        // The pod template as the API server validated and stored it (the preStop sleep
        // action included).
        let template = pod_template(&sts);
        let container = &template["spec"]["containers"][0];
        let node_id = container["env"]
            .as_array()
            .and_then(|env| env.iter().find(|e| e["name"] == "FERRYMQ_CLUSTER__NODE_ID"))
            .expect("node id variable");
        assert_eq!(
            node_id["valueFrom"]["fieldRef"]["fieldPath"],
            "metadata.name"
        );
        let pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
            .as_i64()
            .expect("preStop sleep");
        let grace = template["spec"]["terminationGracePeriodSeconds"]
            .as_i64()
            .expect("grace period");
        let cms: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
        let config: toml::Table = cms
            .get("core-config")
            .await
            .expect("config")
            .data
            .expect("data")["ferrymq.toml"]
            .parse()
            .expect("toml");
        assert_eq!(config["cluster"]["enabled"].as_bool(), Some(true));
        assert!(config["postgres"].get("standby").is_none(), "no standbys");
        let drain = config["shutdown"]["drain_secs"]
            .as_integer()
            .expect("drain");
        assert!(
            drain > 0 && grace > pre_stop + drain,
            "grace {grace}, preStop {pre_stop}, drain {drain}"
        );
        assert_eq!(
            config["shutdown"]["server_reference"].as_str(),
            Some(format!("core.{NS}.svc").as_str())
        );
        let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), NS);
        let pdb = pdbs
            .get("core")
            .await
            .expect("PodDisruptionBudget")
            .spec
            .expect("spec");
        assert_eq!(pdb.max_unavailable, Some(IntOrString::Int(1)));
        assert_eq!(pdb.min_available, None);
        // The client Service selects every broker pod (the endpoints controller then keeps
        // the ready ones), not one active pod.
        let svc: Api<Service> = Api::namespaced(client.clone(), NS);
        let client_svc = svc.get("core").await.expect("client Service");
        assert_eq!(
            client_svc.spec.and_then(|s| s.selector),
            spec.selector.match_labels.clone()
        );

        // kube-controller-manager creates both pods at once (Parallel); both turn ready.
        let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
        for name in ["core-0", "core-1"] {
            pod_uid(&pods, name).await;
            set_pod_ready(&client, NS, name).await.expect("pod ready");
        }
        let brokers: Api<MqttBroker> = Api::namespaced(client.clone(), NS);
        let ready_with = |n: usize| {
            let brokers = brokers.clone();
            async move {
                wait_for(&format!("core Ready with {n} pods"), WAIT, || {
                    let brokers = brokers.clone();
                    async move {
                        let b = brokers.get("core").await.ok()?;
                        condition(&b, "Ready")
                            .is_some_and(|c| {
                                c.status == "True" && c.message == format!("{n} of {n} pods ready")
                            })
                            .then_some(b)
                    }
                })
                .await
            }
        };
        let b = ready_with(2).await;
        for t in ["KafkaReachable", "PostgresReachable"] {
            assert!(condition(&b, t).is_some_and(|c| c.status == "True"), "{t}");
        }

        // `kubectl scale mqttbroker/core --replicas=3`: the scale subresource changes the
        // number of active nodes.
        brokers
            .patch_scale(
                "core",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"replicas": 3}})),
            )
            .await
            .expect("scaling to 3");
        wait_sts_named(&sts_api, "core", "StatefulSet scaled to 3", |s| {
            s.spec.as_ref().and_then(|s| s.replicas) == Some(3)
        })
        .await;
        let mut uids = Vec::new();
        for name in ["core-0", "core-1"] {
            uids.push(pod_uid(&pods, name).await);
        }
        uids.push(pod_uid(&pods, "core-2").await);
        set_pod_ready(&client, NS, "core-2")
            .await
            .expect("core-2 ready");
        ready_with(3).await;
        let scale = brokers.get_scale("core").await.expect("scale");
        assert_eq!(scale.status.map(|s| s.replicas), Some(3));

        // A new image: the StatefulSet controller replaces one pod at a time, highest ordinal
        // first, and the next only once the replacement is ready. The operator deletes nothing.
        brokers
            .patch(
                "core",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"image": "ferrymq:2"}})),
            )
            .await
            .expect("new image");
        let new2 = replaced(&pods, "core-2", &uids[2]).await;
        // The replacement is not ready yet: nobody else goes.
        tokio::time::sleep(Duration::from_secs(3)).await;
        for (i, name) in ["core-0", "core-1"].iter().enumerate() {
            assert_eq!(
                pods.get(name).await.expect("pod").uid().as_deref(),
                Some(uids[i].as_str()),
                "{name} went while core-2's replacement was not ready"
            );
        }
        set_pod_ready(&client, NS, "core-2")
            .await
            .expect("new core-2 ready");
        replaced(&pods, "core-1", &uids[1]).await;
        assert_eq!(
            pods.get("core-0").await.expect("core-0").uid().as_deref(),
            Some(uids[0].as_str()),
            "core-0 went before core-1"
        );
        assert_eq!(
            pods.get("core-2").await.expect("core-2").uid().as_deref(),
            Some(new2.as_str())
        );
        set_pod_ready(&client, NS, "core-1")
            .await
            .expect("new core-1 ready");
        replaced(&pods, "core-0", &uids[0]).await;
        set_pod_ready(&client, NS, "core-0")
            .await
            .expect("new core-0 ready");
        let b = ready_with(3).await;
        assert_eq!(b.status.as_ref().map(|s| s.updated_replicas), Some(3));
        for name in ["core-0", "core-1", "core-2"] {
            let pod = pods.get(name).await.expect("pod");
            let image = pod.spec.and_then(|s| s.containers[0].image.clone());
            assert_eq!(image.as_deref(), Some("ferrymq:2"), "{name}");
        }
        controllers.shutdown().await;
    });
}
