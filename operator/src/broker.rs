//! The `MqttBroker` reconciler: provisions Kafka and PostgreSQL for a Kafka + PostgreSQL broker,
//! applies the owned objects (ConfigMap, Services, StatefulSet, PodDisruptionBudget,
//! ServiceMonitor) and reports status with kstatus conditions.
//!
//! No finalizer: everything the broker owns in Kubernetes goes with it through owner references,
//! and its Kafka topics and PostgreSQL schema are kept on deletion (they hold the data).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ferrymq_crds::{
    condition, condition_type as ct, reason, remove_condition, set_condition, MqttBroker,
    MqttBrokerStatus,
};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use k8s_openapi::ByteString;
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::ResourceExt;
use sha2::{Digest, Sha256};

use crate::apply::{apply, contains, delete_if_present, replace_status, with_applied_hash};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::resources::{self as res, FIELD_MANAGER};
use crate::seam::{BrokerDatabase, KafkaTarget, TopicWanted};
use crate::{config, secrets};

pub const CONTROLLER: &str = "mqttbroker";

/// Requeue while pods are starting or a dependency is down.
const SHORT_REQUEUE: Duration = Duration::from_secs(15);

/// Something that keeps the broker from being Ready.
struct Problem {
    /// Needs a spec change (Stalled) rather than time (Reconciling).
    stalled: bool,
    reason: &'static str,
    message: String,
}

pub async fn reconcile(broker: Arc<MqttBroker>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.start(CONTROLLER);
    let ns = broker
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    if broker.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let generation = broker.metadata.generation;
    let now = Time(Timestamp::now());
    let old_status = broker.status.clone().unwrap_or_default();
    let mut status = old_status.clone();
    status.storage_backend = Some(broker.spec.storage_backend().into());
    status.selector = Some(res::selector_string(&broker));
    status.endpoints = res::endpoints(&broker);
    let mut problems: Vec<Problem> = Vec::new();

    let rendered = match config::render_for(&broker) {
        Ok(r) => r,
        Err(e) => {
            problems.push(Problem {
                stalled: true,
                reason: reason::INVALID_SPEC,
                message: e.to_string(),
            });
            finish_status(&broker, &ctx, &mut status, &problems, None, generation, now).await?;
            if old_status != status {
                ctx.event(
                    &*broker,
                    true,
                    reason::INVALID_SPEC,
                    "Render",
                    e.to_string(),
                )
                .await;
            }
            return Ok(Action::await_change());
        }
    };
    let config_hash = res::short_hash(rendered.as_bytes());

    // Secrets the broker reads as environment variables: their content goes into the pod
    // template's hash, so a rotated password restarts the pods.
    let secret_api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let mut secret_hasher = Sha256::new();

    if let Some(kp) = &broker.spec.storage.kafka_postgres {
        // Kafka.
        let mut properties = BTreeMap::new();
        if let Some(r) = &kp.kafka.properties_secret_ref {
            match secret_api.get_opt(&r.name).await? {
                Some(s) => {
                    properties = secrets::string_data(&s);
                    for (k, v) in &properties {
                        secret_hasher.update(format!("kafka:{k}={v}\n"));
                    }
                }
                None => problems.push(missing_secret(&r.name)),
            }
        }
        let kafka = KafkaTarget {
            bootstrap_servers: kp.kafka.bootstrap_servers.clone(),
            properties,
        };
        let topic = TopicWanted {
            name: crate::naming::publish_log_topic(&kp.kafka.topic_prefix),
            partitions: kp.kafka.msg_all_partitions,
            replication_factor: kp.kafka.replication_factor,
            config: BTreeMap::new(),
        };
        match ctx.provisioner.ensure_topic(&kafka, &topic).await {
            Ok(state) => {
                set(
                    &mut status,
                    ct::KAFKA_REACHABLE,
                    true,
                    reason::REACHABLE,
                    format!("topic {} has {} partitions", topic.name, state.partitions),
                    generation,
                    &now,
                );
                if state.created {
                    ctx.event(
                        &*broker,
                        false,
                        "TopicCreated",
                        "Provision",
                        format!(
                            "created the publish log {} with {} partitions",
                            topic.name, state.partitions
                        ),
                    )
                    .await;
                } else if let Some(from) = state.grown_from {
                    ctx.event(
                        &*broker,
                        false,
                        "TopicGrown",
                        "Provision",
                        format!(
                            "grew {} from {from} to {} partitions",
                            topic.name, state.partitions
                        ),
                    )
                    .await;
                }
            }
            Err(e) => {
                set(
                    &mut status,
                    ct::KAFKA_REACHABLE,
                    false,
                    reason::KAFKA_ERROR,
                    e.message.clone(),
                    generation,
                    &now,
                );
                problems.push(Problem {
                    stalled: !e.transient,
                    reason: reason::KAFKA_ERROR,
                    message: e.message,
                });
            }
        }

        // PostgreSQL.
        let mut broker_url = None;
        if let Some(r) = &kp.postgres.url_secret_ref {
            match secrets::read_key(&secret_api, &r.name, &r.key).await? {
                Some(url) => broker_url = Some(url),
                None => problems.push(missing_secret(&format!("{}/{}", r.name, r.key))),
            }
        } else if let Some(r) = &kp.postgres.admin_secret_ref {
            match secrets::read_key(&secret_api, &r.name, &r.key).await? {
                Some(admin_url) => {
                    match provision_database(&broker, &ctx, &secret_api, &admin_url).await {
                        Ok(url) => broker_url = Some(url),
                        Err(e) => {
                            set(
                                &mut status,
                                ct::POSTGRES_REACHABLE,
                                false,
                                reason::POSTGRES_ERROR,
                                e.message.clone(),
                                generation,
                                &now,
                            );
                            problems.push(Problem {
                                stalled: !e.transient,
                                reason: reason::POSTGRES_ERROR,
                                message: e.message,
                            });
                        }
                    }
                }
                None => problems.push(missing_secret(&format!("{}/{}", r.name, r.key))),
            }
        }
        if let Some(url) = &broker_url {
            secret_hasher.update(format!("postgres:{url}\n"));
            match ctx.provisioner.check_postgres(url).await {
                Ok(()) => set(
                    &mut status,
                    ct::POSTGRES_REACHABLE,
                    true,
                    reason::REACHABLE,
                    format!("schema {}", kp.postgres.schema),
                    generation,
                    &now,
                ),
                Err(e) => {
                    set(
                        &mut status,
                        ct::POSTGRES_REACHABLE,
                        false,
                        reason::POSTGRES_ERROR,
                        e.message.clone(),
                        generation,
                        &now,
                    );
                    problems.push(Problem {
                        stalled: !e.transient,
                        reason: reason::POSTGRES_ERROR,
                        message: e.message,
                    });
                }
            }
        }
    } else {
        remove_condition(&mut status.conditions, ct::KAFKA_REACHABLE);
        remove_condition(&mut status.conditions, ct::POSTGRES_REACHABLE);
    }
    for l in broker.spec.listeners.iter().filter(|l| l.protocol.is_tls()) {
        if let Some(r) = &l.tls_secret_ref {
            if secret_api.get_opt(&r.name).await?.is_none() {
                problems.push(missing_secret(&r.name));
            }
        }
    }
    let secret_hash: String = secret_hasher
        .finalize()
        .iter()
        .take(12)
        .map(|b| format!("{b:02x}"))
        .collect();

    // Owned objects. The StatefulSet is applied even while a dependency is down: the broker
    // retries on its own, and a config fix must reach the pods.
    ctx.metrics.provisioning_failed(
        CONTROLLER,
        &problems.iter().map(|p| p.reason).collect::<Vec<_>>(),
    );
    let (sts, cm_written) =
        match apply_children(&broker, &ctx, &ns, &rendered, &config_hash, &secret_hash).await {
            Ok(c) => c,
            Err((what, error)) => {
                // A refusal (an immutable StatefulSet field, an invalid value, RBAC) does not go
                // away by retrying: show it as Stalled with an Event naming the object, then
                // fail the reconcile so the error policy logs and counts it and backs off.
                if let Some(message) = rejection(&what, &error) {
                    let fresh = !status.conditions.iter().any(|c| {
                        c.type_ == ct::STALLED && c.status == "True" && c.message == message
                    });
                    problems.push(Problem {
                        stalled: true,
                        reason: reason::API_REJECTED,
                        message: message.clone(),
                    });
                    finish_status(&broker, &ctx, &mut status, &problems, None, generation, now)
                        .await?;
                    if fresh {
                        ctx.event(&*broker, true, reason::API_REJECTED, "Apply", message)
                            .await;
                    }
                }
                return Err(error);
            }
        };

    if cm_written
        && old_status.config_hash.is_some()
        && old_status.config_hash.as_deref() != Some(config_hash.as_str())
    {
        ctx.event(
            &*broker,
            false,
            "ConfigChanged",
            "Render",
            format!("configuration changed ({config_hash}); rolling the pods"),
        )
        .await;
    }
    status.config_hash = Some(config_hash);

    let ready = finish_status(
        &broker,
        &ctx,
        &mut status,
        &problems,
        Some(&sts),
        generation,
        now,
    )
    .await?;
    Ok(if ready {
        Action::requeue(ctx.resync)
    } else {
        Action::requeue(SHORT_REQUEUE)
    })
}

/// The API server's refusal of `what` as a status message, or `None` for an error that time may
/// fix (a conflict, a timeout, a 5xx).
fn rejection(what: &str, error: &Error) -> Option<String> {
    match error {
        Error::Kube(kube::Error::Api(e)) if matches!(e.code, 400 | 403 | 422) => Some(format!(
            "the API server refused {what}: {} ({})",
            e.message, e.reason
        )),
        _ => None,
    }
}

/// Applies the owned objects; an error comes with the object it concerns (`Kind ns/name`).
/// Returns the StatefulSet as applied and whether the ConfigMap was written.
async fn apply_children(
    broker: &MqttBroker,
    ctx: &Context,
    ns: &str,
    rendered: &str,
    config_hash: &str,
    secret_hash: &str,
) -> Result<(StatefulSet, bool), (String, Error)> {
    let name = broker.name_any();
    fn at<'a>(
        kind: &'a str,
        ns: &'a str,
        n: &'a str,
    ) -> impl FnOnce(Error) -> (String, Error) + 'a {
        move |e| (format!("{kind} {ns}/{n}"), e)
    }
    let client = ctx.client.clone();
    let cm_api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let cm_name = res::config_map_name(broker);
    let (_, cm_written) = apply(&cm_api, &cm_name, &res::config_map(broker, rendered))
        .await
        .map_err(at("ConfigMap", ns, &cm_name))?;
    let svc_api: Api<Service> = Api::namespaced(client.clone(), ns);
    let headless = res::headless_service_name(broker);
    apply(&svc_api, &headless, &res::headless_service(broker))
        .await
        .map_err(at("Service", ns, &headless))?;
    let wanted_services = res::client_services(broker);
    for svc in &wanted_services {
        apply(&svc_api, &svc.name_any(), svc)
            .await
            .map_err(at("Service", ns, &svc.name_any()))?;
    }
    // Client Services of listeners that were removed or moved to another Service.
    let selector = format!(
        "{}={},{}=client",
        res::INSTANCE_LABEL,
        name,
        res::SERVICE_ROLE_LABEL
    );
    for svc in svc_api
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(|e| (format!("Services in {ns}"), e.into()))?
    {
        let owned = svc
            .owner_references()
            .iter()
            .any(|o| Some(&o.uid) == broker.metadata.uid.as_ref());
        if owned
            && !wanted_services
                .iter()
                .any(|w| w.name_any() == svc.name_any())
        {
            delete_if_present(&svc_api, &svc.name_any())
                .await
                .map_err(at("Service", ns, &svc.name_any()))?;
        }
    }
    let sts_api: Api<StatefulSet> = Api::namespaced(client.clone(), ns);
    let (sts, _) = apply(
        &sts_api,
        &name,
        &res::stateful_set(broker, config_hash, secret_hash),
    )
    .await
    .map_err(at("StatefulSet", ns, &name))?;
    let pdb_api: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), ns);
    match res::pod_disruption_budget(broker) {
        Some(pdb) => {
            apply(&pdb_api, &name, &pdb)
                .await
                .map_err(at("PodDisruptionBudget", ns, &name))?;
        }
        None => {
            delete_if_present(&pdb_api, &name).await.map_err(at(
                "PodDisruptionBudget",
                ns,
                &name,
            ))?;
        }
    }
    reconcile_service_monitor(broker, ctx, ns)
        .await
        .map_err(at("ServiceMonitor", ns, &name))?;
    Ok((sts, cm_written))
}

fn missing_secret(name: &str) -> Problem {
    Problem {
        stalled: false,
        reason: reason::SECRET_NOT_FOUND,
        message: format!("Secret {name} does not exist (or lacks the key)"),
    }
}

fn set(
    status: &mut MqttBrokerStatus,
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: &Time,
) {
    set_condition(
        &mut status.conditions,
        condition(type_, ok, reason, message, generation, now.clone()),
    );
}

/// Creates the broker's PostgreSQL role and schema through the admin URL and keeps the broker's
/// own URL in the Secret `<broker>-postgres`. The password is generated once and kept in that
/// Secret; the provisioner sets it again whenever it no longer works.
async fn provision_database(
    broker: &MqttBroker,
    ctx: &Context,
    secret_api: &Api<Secret>,
    admin_url: &str,
) -> Result<String, crate::seam::ProvisionError> {
    let kp =
        broker.spec.storage.kafka_postgres.as_ref().ok_or_else(|| {
            crate::seam::ProvisionError::permanent("not a Kafka + PostgreSQL broker")
        })?;
    let name = res::postgres_secret_name(broker);
    let existing = secret_api.get_opt(&name).await.map_err(|e| {
        crate::seam::ProvisionError::transient(format!("reading Secret {name}: {e}"))
    })?;
    let password = match existing
        .as_ref()
        .and_then(|s| secrets::string_data(s).remove("password"))
    {
        Some(p) => p,
        None => secrets::generate_password().map_err(|e| {
            crate::seam::ProvisionError::transient(format!("generating a password: {e}"))
        })?,
    };
    let db = BrokerDatabase {
        schema: kp.postgres.schema.clone(),
        role: format!("{}_broker", kp.postgres.schema),
    };
    let changed = ctx
        .provisioner
        .ensure_broker_database(admin_url, &db, &password)
        .await?;
    if changed {
        ctx.event(
            broker,
            false,
            "DatabaseProvisioned",
            "Provision",
            format!("role {} and schema {} are in place", db.role, db.schema),
        )
        .await;
    }
    let url = secrets::login_url(admin_url, &db.role, &password).map_err(|e| {
        crate::seam::ProvisionError::permanent(format!("the admin URL in adminSecretRef: {e}"))
    })?;
    let secret = Secret {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some(name.clone()),
            namespace: broker.namespace(),
            labels: Some(res::labels(broker)),
            owner_references: kube::Resource::controller_owner_ref(broker, &()).map(|r| vec![r]),
            ..Default::default()
        },
        data: Some(BTreeMap::from([
            (
                res::POSTGRES_URL_KEY.to_string(),
                ByteString(url.clone().into_bytes()),
            ),
            (
                "username".to_string(),
                ByteString(db.role.clone().into_bytes()),
            ),
            ("password".to_string(), ByteString(password.into_bytes())),
        ])),
        type_: Some("Opaque".into()),
        ..Default::default()
    };
    apply(secret_api, &name, &secret).await.map_err(|e| {
        crate::seam::ProvisionError::transient(format!("writing Secret {name}: {e}"))
    })?;
    Ok(url)
}

/// Applies the ServiceMonitor when asked for and its CRD is installed; removes it when no longer
/// asked for.
async fn reconcile_service_monitor(broker: &MqttBroker, ctx: &Context, ns: &str) -> Result<()> {
    let wanted = broker.spec.metrics.service_monitor.enabled;
    // The CRD, not API discovery: a plain GET that RBAC can grant narrowly (resourceNames).
    let crds: Api<CustomResourceDefinition> = Api::all(ctx.client.clone());
    let installed = crds
        .get_opt("servicemonitors.monitoring.coreos.com")
        .await?
        .is_some();
    if !installed {
        if wanted {
            ctx.event(broker, true, "ServiceMonitorUnavailable", "Monitor", "spec.metrics.serviceMonitor.enabled is true but the monitoring.coreos.com/v1 ServiceMonitor CRD is not installed".into()).await;
        }
        return Ok(());
    }
    let api: Api<DynamicObject> =
        Api::namespaced_with(ctx.client.clone(), ns, &res::service_monitor_resource());
    if wanted {
        let sm = res::service_monitor(broker);
        let want = with_applied_hash(&sm)?;
        let live = api.get_opt(&broker.name_any()).await?;
        if !live
            .map(|l| serde_json::to_value(&l))
            .transpose()?
            .is_some_and(|l| contains(&l, &want))
        {
            api.patch(
                &broker.name_any(),
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&want),
            )
            .await?;
        }
    } else {
        delete_if_present(&api, &broker.name_any()).await?;
    }
    Ok(())
}

/// Computes Ready / Reconciling / Stalled from the problems and the StatefulSet, and writes the
/// status if it changed. Returns whether the broker is Ready.
async fn finish_status(
    broker: &MqttBroker,
    ctx: &Context,
    status: &mut MqttBrokerStatus,
    problems: &[Problem],
    sts: Option<&StatefulSet>,
    generation: Option<i64>,
    now: Time,
) -> Result<bool> {
    let desired = broker.spec.replicas;
    if let Some(sts) = sts {
        let s = sts.status.clone().unwrap_or_default();
        status.replicas = s.replicas;
        status.ready_replicas = s.ready_replicas.unwrap_or(0);
        status.updated_replicas = s.updated_replicas.unwrap_or(0);
    }
    let sts_current = sts.is_some_and(|sts| {
        let s = sts.status.as_ref();
        s.and_then(|s| s.observed_generation) == sts.metadata.generation
            && s.and_then(|s| s.update_revision.as_ref())
                == s.and_then(|s| s.current_revision.as_ref())
    });
    // Every pod is active (Kafka + PostgreSQL: one node of the cluster each), so every pod
    // turns ready, on both backends.
    let rolled_out = sts_current
        && status.replicas == desired
        && status.ready_replicas == desired
        && status.updated_replicas == desired;

    let stalled = problems.iter().find(|p| p.stalled);
    let waiting = problems.iter().find(|p| !p.stalled);
    let (ready, ready_reason, ready_message) = match (stalled, waiting) {
        (Some(p), _) | (None, Some(p)) => (false, p.reason, p.message.clone()),
        (None, None) if rolled_out => (
            true,
            reason::RECONCILED,
            format!("{desired} of {desired} pods ready"),
        ),
        (None, None) => (
            false,
            if status.updated_replicas < desired {
                reason::ROLLING_OUT
            } else {
                reason::PODS_NOT_READY
            },
            format!(
                "{} of {desired} pods ready, {} updated",
                status.ready_replicas, status.updated_replicas
            ),
        ),
    };
    set(
        status,
        ct::READY,
        ready,
        ready_reason,
        ready_message.clone(),
        generation,
        &now,
    );
    match stalled {
        Some(p) => set(
            status,
            ct::STALLED,
            true,
            p.reason,
            p.message.clone(),
            generation,
            &now,
        ),
        None => {
            remove_condition(&mut status.conditions, ct::STALLED);
        }
    }
    if !ready && stalled.is_none() {
        set(
            status,
            ct::RECONCILING,
            true,
            ready_reason,
            ready_message,
            generation,
            &now,
        );
    } else {
        remove_condition(&mut status.conditions, ct::RECONCILING);
    }
    status.observed_generation = generation;

    if broker.status.as_ref() != Some(status) {
        let api: Api<MqttBroker> = Api::namespaced(
            ctx.client.clone(),
            &broker
                .namespace()
                .ok_or(Error::MissingField("metadata.namespace"))?,
        );
        replace_status(&api, &broker.name_any(), status).await?;
    }
    Ok(ready)
}
