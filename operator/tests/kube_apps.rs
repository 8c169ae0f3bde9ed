//! The ApplicationClient controller at scale against a real kube-apiserver
//! (e2e/src/harness/kube.rs): 200 ApplicationClients converge, and a resync that finds nothing
//! to change writes nothing and does not list the ApplicationClients again per object (the
//! conflict check reads the controller's reflector cache).
//!
//! Kafka and PostgreSQL are behind the `Provisioner` seam here (an in-memory implementation that
//! always succeeds): this test is about the Kubernetes side. The real Kafka and PostgreSQL side
//! effects are tested in provision_*.rs.
//!
//! Skipped where the control-plane binaries are missing (`bash e2e/services/k8s/install.sh`),
//! unless `FERRYMQ_REQUIRE_SERVICES=1`.

mod k8s;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use ferrymq_crds::ApplicationClient;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ListParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;

use k8s::{app_ready, cluster, create, runtime, start_controllers, wait_all_gone, wait_for, Fake};

const NS: &str = "default";
const APPS: usize = 200;

/// The API server's own count of LIST requests for ApplicationClients (its /metrics).
async fn apiserver_app_lists(client: &Client) -> f64 {
    let req = http::Request::get("/metrics")
        .body(Vec::new())
        .expect("request");
    let text = client.request_text(req).await.expect("/metrics");
    text.lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
        .filter(|l| l.contains("resource=\"applicationclients\"") && l.contains("verb=\"LIST\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn two_hundred_application_clients_converge_and_a_resync_writes_nothing() {
    runtime().block_on(async {
        let Some((_cp, client)) = cluster(false).await else {
            return;
        };
        fixtures(&client).await;

        let fake = Arc::new(Fake::default());
        // Resync every few seconds instead of every 5 minutes, so the test sees resyncs.
        let resync = Duration::from_secs(4);
        let controllers = start_controllers(&client, fake.clone(), NS, Some(resync));

        let apps: Api<ApplicationClient> = Api::namespaced(client.clone(), NS);
        for i in 0..APPS {
            let app: ApplicationClient = serde_json::from_value(json!({
                "apiVersion": "ferrymq.io/v1alpha1", "kind": "ApplicationClient",
                "metadata": {"name": format!("app-{i}"), "namespace": NS},
                "spec": {"brokerRef": {"name": "core"}, "clientId": format!("client-{i}")},
            }))
            .expect("app");
            apps.create(&PostParams::default(), &app)
                .await
                .expect("creating an ApplicationClient");
        }
        let started = std::time::Instant::now();
        wait_for(
            "200 ApplicationClients Ready",
            Duration::from_secs(240),
            || {
                let apps = apps.clone();
                async move {
                    let list = apps.list(&ListParams::default()).await.ok()?;
                    (list.items.len() == APPS && list.items.iter().all(app_ready)).then_some(())
                }
            },
        )
        .await;
        eprintln!(
            "{APPS} ApplicationClients Ready after {:?}",
            started.elapsed()
        );

        // Let the last writes' own watch events settle, then take a snapshot.
        tokio::time::sleep(resync).await;
        let versions = |list: Vec<ApplicationClient>| -> BTreeMap<String, String> {
            list.into_iter()
                .map(|a| (a.name_any(), a.resource_version().unwrap_or_default()))
                .collect()
        };
        let before = versions(apps.list(&ListParams::default()).await.expect("list").items);
        let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
        let secrets_before = secret_versions(&secrets).await;
        assert_eq!(
            secrets_before.len(),
            APPS + 1,
            "one credentials Secret per client"
        );
        let lists_before = apiserver_app_lists(&client).await;
        let topics_before = fake.ensure_topic.load(Ordering::Relaxed);

        // Two resync periods: every ApplicationClient is reconciled again at least once.
        tokio::time::sleep(resync * 2 + Duration::from_secs(2)).await;
        let resynced = fake.ensure_topic.load(Ordering::Relaxed) - topics_before;
        assert!(
            resynced >= APPS,
            "only {resynced} reconciles reached Kafka during the resync window"
        );
        let after = versions(apps.list(&ListParams::default()).await.expect("list").items);
        let changed: Vec<&String> = before
            .iter()
            .filter(|(k, v)| after.get(*k) != Some(*v))
            .map(|(k, _)| k)
            .collect();
        assert!(
            changed.is_empty(),
            "a resync with nothing to change wrote {} ApplicationClients: {changed:?}",
            changed.len()
        );
        let secrets_after = secret_versions(&secrets).await;
        assert_eq!(
            secrets_before, secrets_after,
            "a resync rewrote credentials Secrets"
        );
        // The test's own two lists above are the only LISTs expected: the conflict check
        // reads the reflector, it does not list per reconcile.
        let lists = apiserver_app_lists(&client).await - lists_before;
        assert!(
            lists <= 3.0,
            "{lists} LISTs of ApplicationClients during {resynced} reconciles"
        );

        controllers.shutdown().await;
    });
}

async fn fixtures(client: &Client) {
    for obj in [
        json!({"apiVersion": "v1", "kind": "Secret",
               "metadata": {"name": "pg", "namespace": NS},
               "stringData": {"url": "postgres://core:pw@127.0.0.1:5432/db"}}),
        json!({"apiVersion": "ferrymq.io/v1alpha1", "kind": "MqttBroker",
               "metadata": {"name": "core", "namespace": NS},
               "spec": {"image": "ferrymq:test", "storage": {"kafkaPostgres": {
                   "kafka": {"bootstrapServers": "kafka:9092"},
                   "postgres": {"urlSecretRef": {"name": "pg", "key": "url"}}}}}}),
    ] {
        create(client, &obj, NS).await.expect("fixture");
    }
}

/// Deletion under both policies, with the finalizer as the real API server handles it
/// (deletionTimestamp, then removal once the finalizer is gone; the in-memory API server of the
/// fast tests deletes at once), the credentials Secret owned by the ApplicationClient, and a
/// Kafka failure counted in the failures metric.
#[test]
fn deletion_policies_secret_ownership_and_kafka_failures_on_the_api_server() {
    runtime().block_on(async {
            let Some((_cp, client)) = cluster(false).await else {
                return;
            };
            fixtures(&client).await;
            let fake = Arc::new(Fake {
                failing: vec!["refused".into()],
                ..Default::default()
            });
            let controllers = start_controllers(&client, fake.clone(), NS, None);
            let metrics = controllers.metrics.clone();

            let apps: Api<ApplicationClient> = Api::namespaced(client.clone(), NS);
            for (name, policy) in [("keep", "Retain"), ("drop", "Delete"), ("refused", "Retain")] {
                let app: ApplicationClient = serde_json::from_value(json!({
                    "apiVersion": "ferrymq.io/v1alpha1", "kind": "ApplicationClient",
                    "metadata": {"name": name, "namespace": NS},
                    "spec": {"brokerRef": {"name": "core"}, "clientId": name,
                             "deletionPolicy": policy},
                }))
                .expect("app");
                apps.create(&PostParams::default(), &app).await.expect("create");
            }
            for name in ["keep", "drop"] {
                wait_for(&format!("{name} Ready"), Duration::from_secs(60), || {
                    let apps = apps.clone();
                    async move { apps.get(name).await.ok().filter(app_ready).map(|_| ()) }
                })
                .await;
            }
            let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
            let secret = secrets.get("keep-mqtt").await.expect("credentials Secret");
            let keep_uid = apps.get("keep").await.expect("keep").uid();
            assert!(
                secret
                    .owner_references()
                    .iter()
                    .any(|o| Some(&o.uid) == keep_uid.as_ref() && o.kind == "ApplicationClient"),
                "{:?}",
                secret.metadata.owner_references
            );
            assert_eq!(
                secret.data.as_ref().map(|d| d.contains_key("password")),
                Some(true)
            );

            // A Kafka refusal: Stalled with KafkaError, and counted as error="kafka".
            let refused = wait_for("refused Stalled", Duration::from_secs(60), || {
                let apps = apps.clone();
                async move {
                    let a = apps.get("refused").await.ok()?;
                    a.status
                        .as_ref()?
                        .conditions
                        .iter()
                        .any(|c| c.type_ == "Stalled" && c.reason == "KafkaError")
                        .then_some(a)
                }
            })
            .await;
            assert!(!app_ready(&refused));
            let text = metrics.render();
            assert!(
                text.contains(
                    "ferrymq_operator_reconcile_failures_total{controller=\"applicationclient\",error=\"kafka\"}"
                ),
                "{text}"
            );

            // Deletion: both go once the operator has removed its finalizer; only `Delete`
            // removes the topic and the credential rows.
            for name in ["keep", "drop", "refused"] {
                apps.delete(name, &Default::default()).await.expect("delete");
            }
            wait_all_gone(&apps).await;
            let mut deleted = fake.deleted.lock().map(|d| d.clone()).unwrap_or_default();
            deleted.sort();
            assert_eq!(
                deleted,
                vec![
                    "credentials drop".to_string(),
                    "topic ferrymq.app.drop".to_string(),
                ],
                "Retain must keep the topic and the rows"
            );
            controllers.shutdown().await;
        });
}

/// Each Secret's resource version, by name: unchanged versions mean nothing was rewritten.
async fn secret_versions(secrets: &Api<Secret>) -> BTreeMap<String, String> {
    secrets
        .list(&ListParams::default())
        .await
        .expect("list")
        .items
        .into_iter()
        .map(|s| (s.name_any(), s.resource_version().unwrap_or_default()))
        .collect()
}
