//! The `ApplicationClient` reconciler: the client's Kafka topic, its credentials Secret and its
//! APPLICATION registration in the broker's credential store (`mqtt_credentials`), with a
//! finalizer that applies the deletion policy.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ferrymq_crds::{
    condition, condition_type as ct, reason, remove_condition, set_condition, ApplicationClient,
    ApplicationClientStatus, DeletionPolicy, KafkaPostgresStorage, MqttBroker,
};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use k8s_openapi::ByteString;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{finalizer, Event as FinalizerEvent};
use kube::{Resource, ResourceExt};

use crate::apply::{apply, replace_status};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::seam::{AppCredential, KafkaTarget, ProvisionError, TopicWanted};
use crate::{resources as res, secrets};

pub const CONTROLLER: &str = "applicationclient";
/// Held while the topic and registration may need cleaning up.
pub const FINALIZER: &str = "ferrymq.io/application-client";

const SHORT_REQUEUE: Duration = Duration::from_secs(30);

pub async fn reconcile(app: Arc<ApplicationClient>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.start(CONTROLLER);
    let ns = app
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let api: Api<ApplicationClient> = Api::namespaced(ctx.client.clone(), &ns);
    if app.metadata.deletion_timestamp.is_none() && app.finalizers().is_empty() {
        // The first finalizer, guarded by the resourceVersion (kube's helper tests the list for
        // null instead, which is equivalent on an API server; this form also works where an
        // absent key cannot be tested). The write triggers the next reconcile.
        let rv = app
            .resource_version()
            .ok_or(Error::MissingField("metadata.resourceVersion"))?;
        let patch: json_patch::Patch = serde_json::from_value(serde_json::json!([
            {"op": "test", "path": "/metadata/resourceVersion", "value": rv},
            {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]},
        ]))?;
        api.patch(
            &app.name_any(),
            &PatchParams::default(),
            &Patch::<()>::Json(patch),
        )
        .await?;
        return Ok(Action::await_change());
    }
    finalizer(&api, FINALIZER, app, |event| async {
        match event {
            FinalizerEvent::Apply(app) => apply_app(app, ctx.clone()).await,
            FinalizerEvent::Cleanup(app) => cleanup(app, ctx.clone()).await,
        }
    })
    .await
    .map_err(|e| match e {
        kube::runtime::finalizer::Error::ApplyFailed(e)
        | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        kube::runtime::finalizer::Error::AddFinalizer(e)
        | kube::runtime::finalizer::Error::RemoveFinalizer(e) => Error::Kube(e),
        other => Error::Finalizer(other.to_string()),
    })
}

/// The broker, its Kafka + PostgreSQL settings, and how to reach both.
struct Target {
    storage: KafkaPostgresStorage,
    kafka: KafkaTarget,
    broker_url: Option<String>,
    /// The settings the broker gives an APPLICATION topic it creates itself (its `[application]`
    /// retention): the base of the topic's wanted config.
    broker_topic_config: BTreeMap<String, String>,
}

/// The topic settings the broker itself gives APPLICATION topics it creates: `retention.ms` and
/// `retention.bytes` from the `[application]` section of the config the operator renders for
/// `broker` (so `spec.applicationLog` and `spec.config` overrides both count, and the broker's
/// defaults apply when neither is set). Computed with the broker's rule (`ferrymq_common`), so the two
/// cannot disagree. Without these in the wanted config, adopting a topic the broker created
/// would delete its retention (it is not in the ApplicationClient's `topic.config`).
pub fn broker_topic_config(broker: &MqttBroker) -> BTreeMap<String, String> {
    let application = crate::config::render_for(broker)
        .ok()
        .and_then(|text| text.parse::<toml::Table>().ok())
        .and_then(|t| t.get("application").and_then(|a| a.as_table()).cloned());
    let get = |key: &str, default: u64| {
        application
            .as_ref()
            .and_then(|a| a.get(key))
            .and_then(|v| v.as_integer())
            .and_then(|v| u64::try_from(v).ok())
            .unwrap_or(default)
    };
    let secs = get(
        "retention_secs",
        ferrymq_common::application::DEFAULT_RETENTION_SECS,
    );
    let bytes = get(
        "retention_bytes",
        ferrymq_common::application::DEFAULT_RETENTION_BYTES,
    );
    ferrymq_common::application::topic_config(secs.saturating_mul(1000), bytes)
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
}

/// The config an ApplicationClient's topic should have: the broker's settings, overridden key
/// by key by the client's own `topic.config`.
pub fn wanted_topic_config(
    broker_config: &BTreeMap<String, String>,
    app: &ApplicationClient,
) -> BTreeMap<String, String> {
    let mut config = broker_config.clone();
    config.extend(app.spec.topic.config.clone());
    config
}

/// Why the client cannot be provisioned now.
struct Blocked {
    stalled: bool,
    reason: &'static str,
    message: String,
}

async fn target(
    app: &ApplicationClient,
    ctx: &Context,
    ns: &str,
) -> Result<Result<Target, Blocked>> {
    let brokers: Api<MqttBroker> = Api::namespaced(ctx.client.clone(), ns);
    let Some(broker) = brokers.get_opt(&app.spec.broker_ref.name).await? else {
        return Ok(Err(Blocked {
            stalled: false,
            reason: reason::BROKER_NOT_FOUND,
            message: format!("MqttBroker {} does not exist", app.spec.broker_ref.name),
        }));
    };
    let Some(storage) = broker.spec.storage.kafka_postgres.clone() else {
        return Ok(Err(Blocked {
            stalled: true,
            reason: reason::BROKER_NOT_KAFKA_POSTGRES,
            message: format!(
                "MqttBroker {} uses embedded storage; ApplicationClient needs a Kafka + PostgreSQL broker (register APPLICATION clients of an embedded broker with `ferrymq app-clients add` or [[application_clients]])",
                broker.name_any()
            ),
        }));
    };
    let secret_api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let mut properties = BTreeMap::new();
    if let Some(r) = &storage.kafka.properties_secret_ref {
        match secret_api.get_opt(&r.name).await? {
            Some(s) => properties = secrets::string_data(&s),
            None => {
                return Ok(Err(Blocked {
                    stalled: false,
                    reason: reason::SECRET_NOT_FOUND,
                    message: format!(
                        "the broker's Kafka properties Secret {} does not exist",
                        r.name
                    ),
                }))
            }
        }
    }
    let broker_url = match res::postgres_url_ref(&broker) {
        Some((name, key)) => secrets::read_key(&secret_api, &name, &key).await?,
        None => None,
    };
    Ok(Ok(Target {
        broker_topic_config: broker_topic_config(&broker),
        kafka: KafkaTarget {
            bootstrap_servers: storage.kafka.bootstrap_servers.clone(),
            properties,
        },
        storage,
        broker_url,
    }))
}

/// The ApplicationClient that owns `app`'s client id on its broker: the oldest claimant (by
/// creation time, then name), or `None` when `app` itself does.
async fn conflicting_owner(
    app: &ApplicationClient,
    ctx: &Context,
    ns: &str,
) -> Result<Option<String>> {
    let key = |a: &ApplicationClient| {
        (
            a.metadata.creation_timestamp.as_ref().map(|t| t.0),
            a.name_any(),
        )
    };
    let claimants: Vec<ApplicationClient> = match ctx.app_store.get() {
        Some(store) => store
            .state()
            .iter()
            .filter(|a| a.namespace().as_deref() == Some(ns))
            .filter(|a| a.spec.client_id == app.spec.client_id)
            .map(|a| (**a).clone())
            .collect(),
        None => {
            let api: Api<ApplicationClient> = Api::namespaced(ctx.client.clone(), ns);
            api.list(&ListParams::default()).await?.items
        }
    };
    let winner = claimants
        .into_iter()
        .filter(|o| {
            o.spec.broker_ref == app.spec.broker_ref
                && o.spec.client_id == app.spec.client_id
                // A claimant being deleted gives the id up, unless it is `app` itself (whose
                // cleanup must know whether it owned the id).
                && (o.metadata.deletion_timestamp.is_none() || o.name_any() == app.name_any())
        })
        .min_by_key(key);
    Ok(winner
        .filter(|w| w.name_any() != app.name_any())
        .map(|w| w.name_any()))
}

async fn apply_app(app: Arc<ApplicationClient>, ctx: Arc<Context>) -> Result<Action> {
    let ns = app
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let generation = app.metadata.generation;
    let now = Time(Timestamp::now());
    let mut status = app.status.clone().unwrap_or_default();
    let secret_name = app.secret_name();

    if app.spec.suspend {
        set(
            &mut status,
            ct::READY,
            false,
            reason::SUSPENDED,
            "spec.suspend is true: the operator leaves Kafka, PostgreSQL and the Secret alone"
                .into(),
            generation,
            &now,
        );
        remove_condition(&mut status.conditions, ct::RECONCILING);
        remove_condition(&mut status.conditions, ct::STALLED);
        write_status(&app, &ctx, status, generation).await?;
        return Ok(Action::await_change());
    }

    if let Some(owner) = conflicting_owner(&app, &ctx, &ns).await? {
        let message = format!(
            "client id {} on broker {} is managed by ApplicationClient {ns}/{owner}",
            app.spec.client_id, app.spec.broker_ref.name
        );
        let fresh = !ferrymq_crds::is_true(&status.conditions, ct::STALLED);
        block(
            &mut status,
            &Blocked {
                stalled: true,
                reason: reason::RESOURCE_CONFLICT,
                message: message.clone(),
            },
            generation,
            &now,
        );
        write_status(&app, &ctx, status, generation).await?;
        if fresh {
            ctx.event(&*app, true, reason::RESOURCE_CONFLICT, "Claim", message)
                .await;
        }
        // The owner may go away; look again now and then.
        return Ok(Action::requeue(ctx.resync));
    }

    let target = match target(&app, &ctx, &ns).await? {
        Ok(t) => t,
        Err(blocked) => {
            block(&mut status, &blocked, generation, &now);
            write_status(&app, &ctx, status, generation).await?;
            return Ok(Action::requeue(SHORT_REQUEUE));
        }
    };

    // The topic.
    let topic_name =
        crate::naming::application_topic(&target.storage.kafka.topic_prefix, &app.spec.client_id);
    let wanted = TopicWanted {
        name: topic_name.clone(),
        partitions: app.spec.topic.partitions,
        replication_factor: match app.spec.topic.replication_factor {
            -1 => target.storage.kafka.replication_factor,
            rf => rf,
        },
        config: wanted_topic_config(&target.broker_topic_config, &app),
    };
    status.topic_name = Some(topic_name.clone());
    let mut problems: Vec<Blocked> = Vec::new();
    match ctx.provisioner.ensure_topic(&target.kafka, &wanted).await {
        Ok(state) => {
            if state.created {
                ctx.event(
                    &*app,
                    false,
                    "TopicCreated",
                    "Provision",
                    format!("created {topic_name} with {} partitions", state.partitions),
                )
                .await;
            }
            if let Some(from) = state.grown_from {
                ctx.event(
                    &*app,
                    false,
                    "TopicGrown",
                    "Provision",
                    format!(
                        "grew {topic_name} from {from} to {} partitions",
                        state.partitions
                    ),
                )
                .await;
            }
            if !state.reverted.is_empty() {
                ctx.event(
                    &*app,
                    true,
                    "DriftReverted",
                    "Provision",
                    format!(
                        "set {topic_name} back to the spec: {}",
                        state.reverted.join(", ")
                    ),
                )
                .await;
            }
            if let (Some(old), Some(new)) = (&status.topic_id, &state.topic_id) {
                if old != new {
                    ctx.event(&*app, true, "TopicRecreated", "Provision", format!("{topic_name} has a new topic id: it was deleted and created again, its earlier data is gone")).await;
                }
            }
            status.topic_id = state.topic_id.clone();
            status.partitions = Some(state.partitions);
            match state.replication_factor_differs {
                Some((found, want)) => {
                    let b = Blocked { stalled: true, reason: reason::NOT_SUPPORTED, message: format!("{topic_name} has replication factor {found}, the spec asks for {want}; Kafka cannot change it in place") };
                    set(
                        &mut status,
                        ct::TOPIC_READY,
                        false,
                        b.reason,
                        b.message.clone(),
                        generation,
                        &now,
                    );
                    problems.push(b);
                }
                None => set(
                    &mut status,
                    ct::TOPIC_READY,
                    true,
                    reason::PROVISIONED,
                    format!("{topic_name} with {} partitions", state.partitions),
                    generation,
                    &now,
                ),
            }
        }
        Err(e) => {
            let b = provision_problem(e, reason::KAFKA_ERROR);
            set(
                &mut status,
                ct::TOPIC_READY,
                false,
                b.reason,
                b.message.clone(),
                generation,
                &now,
            );
            problems.push(b);
        }
    }

    // The credentials.
    status.secret_name = Some(secret_name.clone());
    match credentials(&app, &ctx, &ns, &target, &secret_name).await? {
        Ok(changed) => {
            if changed {
                ctx.event(
                    &*app,
                    false,
                    "CredentialsRegistered",
                    "Provision",
                    format!(
                        "{} is registered as APPLICATION; credentials in Secret {secret_name}",
                        app.spec.client_id
                    ),
                )
                .await;
            }
            set(
                &mut status,
                ct::CREDENTIALS_READY,
                true,
                reason::PROVISIONED,
                format!("Secret {secret_name}; registered as APPLICATION"),
                generation,
                &now,
            );
        }
        Err(b) => {
            set(
                &mut status,
                ct::CREDENTIALS_READY,
                false,
                b.reason,
                b.message.clone(),
                generation,
                &now,
            );
            problems.push(b);
        }
    }

    let ready = problems.is_empty();
    ctx.metrics.provisioning_failed(
        CONTROLLER,
        &problems.iter().map(|p| p.reason).collect::<Vec<_>>(),
    );
    match problems.iter().find(|p| p.stalled).or(problems.first()) {
        Some(p) => block(&mut status, p, generation, &now),
        None => {
            set(
                &mut status,
                ct::READY,
                true,
                reason::PROVISIONED,
                format!("topic {topic_name}, Secret {secret_name}"),
                generation,
                &now,
            );
            remove_condition(&mut status.conditions, ct::RECONCILING);
            remove_condition(&mut status.conditions, ct::STALLED);
        }
    }
    write_status(&app, &ctx, status, generation).await?;
    Ok(if ready {
        Action::requeue(ctx.resync)
    } else {
        Action::requeue(SHORT_REQUEUE)
    })
}

fn provision_problem(e: ProvisionError, reason: &'static str) -> Blocked {
    Blocked {
        stalled: !e.transient,
        reason,
        message: e.message,
    }
}

/// Writes the credentials Secret (password generated once, then kept) and the credential rows.
/// Returns whether the rows changed, or why it could not.
async fn credentials(
    app: &ApplicationClient,
    ctx: &Context,
    ns: &str,
    target: &Target,
    secret_name: &str,
) -> Result<Result<bool, Blocked>> {
    let Some(broker_url) = &target.broker_url else {
        return Ok(Err(Blocked {
            stalled: false,
            reason: reason::SECRET_NOT_FOUND,
            message: format!(
                "the PostgreSQL URL of broker {} is not available yet",
                app.spec.broker_ref.name
            ),
        }));
    };
    let secret_api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let existing = secret_api.get_opt(secret_name).await?;
    if let Some(s) = &existing {
        let ours = s
            .owner_references()
            .iter()
            .any(|o| Some(&o.uid) == app.metadata.uid.as_ref());
        if !ours {
            return Ok(Err(Blocked {
                stalled: true,
                reason: reason::RESOURCE_CONFLICT,
                message: format!(
                    "Secret {secret_name} exists and is not owned by this ApplicationClient"
                ),
            }));
        }
    }
    let password = match existing
        .as_ref()
        .and_then(|s| secrets::string_data(s).remove("password"))
    {
        Some(p) => p,
        None => match secrets::generate_password() {
            Ok(p) => p,
            Err(e) => {
                return Ok(Err(Blocked {
                    stalled: false,
                    reason: reason::PROGRESSING,
                    message: format!("no randomness for a password: {e}"),
                }))
            }
        },
    };
    let username = app.spec.client_id.clone();
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(secret_name.to_string()),
            namespace: Some(ns.to_string()),
            labels: Some(BTreeMap::from([
                (
                    "app.kubernetes.io/managed-by".to_string(),
                    "ferrymq-operator".to_string(),
                ),
                (
                    res::INSTANCE_LABEL.to_string(),
                    app.spec.broker_ref.name.clone(),
                ),
            ])),
            owner_references: app.controller_owner_ref(&()).map(|r| vec![r]),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([
            (
                "clientId".to_string(),
                ByteString(app.spec.client_id.clone().into_bytes()),
            ),
            (
                "username".to_string(),
                ByteString(username.clone().into_bytes()),
            ),
            (
                "password".to_string(),
                ByteString(password.clone().into_bytes()),
            ),
        ])),
        type_: Some("Opaque".into()),
        ..Secret::default()
    };
    apply(&secret_api, secret_name, &secret).await?;
    let credential = AppCredential {
        client_id: app.spec.client_id.clone(),
        username,
        password,
        publish: app.spec.acl.publish.clone(),
        subscribe: app.spec.acl.subscribe.clone(),
    };
    Ok(
        match ctx
            .provisioner
            .upsert_application(broker_url, &target.storage.postgres.schema, &credential)
            .await
        {
            Ok(changed) => Ok(changed),
            Err(e) => Err(provision_problem(e, reason::POSTGRES_ERROR)),
        },
    )
}

/// Deletion: `Retain` leaves the topic and the credential rows; `Delete` removes both. The
/// Secret goes with the resource (owner reference). A client that lost a conflict owns nothing,
/// and a suspended one is detached: neither touches Kafka or PostgreSQL.
async fn cleanup(app: Arc<ApplicationClient>, ctx: Arc<Context>) -> Result<Action> {
    let ns = app
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    if app.spec.deletion_policy == DeletionPolicy::Retain || app.spec.suspend {
        return Ok(Action::await_change());
    }
    if conflicting_owner(&app, &ctx, &ns).await?.is_some() {
        return Ok(Action::await_change());
    }
    let target = match target(&app, &ctx, &ns).await? {
        Ok(t) => t,
        Err(b)
            if b.reason == reason::BROKER_NOT_FOUND
                || b.reason == reason::BROKER_NOT_KAFKA_POSTGRES =>
        {
            ctx.event(
                &*app,
                true,
                "CleanupSkipped",
                "Delete",
                format!("{}: nothing to delete", b.message),
            )
            .await;
            return Ok(Action::await_change());
        }
        Err(b) => {
            ctx.event(
                &*app,
                true,
                reason::DELETION_BLOCKED,
                "Delete",
                b.message.clone(),
            )
            .await;
            return Err(ProvisionError::transient(b.message).into());
        }
    };
    let topic =
        crate::naming::application_topic(&target.storage.kafka.topic_prefix, &app.spec.client_id);
    let result: Result<(), ProvisionError> = async {
        ctx.provisioner.delete_topic(&target.kafka, &topic).await?;
        if let Some(url) = &target.broker_url {
            ctx.provisioner
                .delete_application(
                    url,
                    &target.storage.postgres.schema,
                    &app.spec.client_id,
                    &app.spec.client_id,
                )
                .await?;
        }
        Ok(())
    }
    .await;
    match result {
        Ok(()) => {
            ctx.event(
                &*app,
                false,
                "Deleted",
                "Delete",
                format!(
                    "deleted topic {topic} and the credential rows of {}",
                    app.spec.client_id
                ),
            )
            .await;
            Ok(Action::await_change())
        }
        Err(e) => {
            ctx.event(
                &*app,
                true,
                reason::DELETION_BLOCKED,
                "Delete",
                e.message.clone(),
            )
            .await;
            Err(e.into())
        }
    }
}

fn set(
    status: &mut ApplicationClientStatus,
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

/// Ready=False for `b`, with Stalled or Reconciling as kstatus wants.
fn block(status: &mut ApplicationClientStatus, b: &Blocked, generation: Option<i64>, now: &Time) {
    set(
        status,
        ct::READY,
        false,
        b.reason,
        b.message.clone(),
        generation,
        now,
    );
    if b.stalled {
        set(
            status,
            ct::STALLED,
            true,
            b.reason,
            b.message.clone(),
            generation,
            now,
        );
        remove_condition(&mut status.conditions, ct::RECONCILING);
    } else {
        set(
            status,
            ct::RECONCILING,
            true,
            b.reason,
            b.message.clone(),
            generation,
            now,
        );
        remove_condition(&mut status.conditions, ct::STALLED);
    }
}

async fn write_status(
    app: &ApplicationClient,
    ctx: &Context,
    mut status: ApplicationClientStatus,
    generation: Option<i64>,
) -> Result<()> {
    status.observed_generation = generation;
    if app.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let api: Api<ApplicationClient> = Api::namespaced(
        ctx.client.clone(),
        &app.namespace()
            .ok_or(Error::MissingField("metadata.namespace"))?,
    );
    replace_status(&api, &app.name_any(), &status).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{broker_topic_config, wanted_topic_config};
    use crate::provision::kafka::config_diff;
    use ferrymq_crds::{ApplicationClient, MqttBroker};
    use serde_json::json;
    use std::collections::BTreeMap;

    fn broker(extra: serde_json::Value) -> MqttBroker {
        let mut spec = json!({
            "image": "ferrymq:test",
            "storage": {"kafkaPostgres": {
                "kafka": {"bootstrapServers": "kafka:9092"},
                "postgres": {"urlSecretRef": {"name": "pg", "key": "url"}},
            }},
        });
        if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
            s.extend(e.clone());
        }
        serde_json::from_value(json!({
            "apiVersion": "ferrymq.io/v1alpha1", "kind": "MqttBroker",
            "metadata": {"name": "core", "namespace": "iot"}, "spec": spec,
        }))
        .expect("broker")
    }

    fn app(config: serde_json::Value) -> ApplicationClient {
        serde_json::from_value(json!({
            "apiVersion": "ferrymq.io/v1alpha1", "kind": "ApplicationClient",
            "metadata": {"name": "a", "namespace": "iot"},
            "spec": {"brokerRef": {"name": "core"}, "clientId": "a", "topic": {"config": config}},
        }))
        .expect("app")
    }

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn adopting_a_topic_the_broker_created_keeps_its_retention() {
        let b = broker(json!({"applicationLog": {"retentionSecs": 3600, "retentionBytes": 1000}}));
        let from_broker = broker_topic_config(&b);
        assert_eq!(
            from_broker,
            map(&[("retention.bytes", "1000"), ("retention.ms", "3600000")])
        );
        // The topic as the broker created it: its own settings are the broker's retention.
        let created_by_broker = from_broker.clone();
        let wanted = wanted_topic_config(&from_broker, &app(json!({})));
        assert_eq!(
            config_diff(&created_by_broker, &created_by_broker, &wanted),
            vec![],
            "adoption must change nothing"
        );
        // What the operator did before: the ApplicationClient's config alone, which deleted
        // both retention settings on adoption.
        assert_eq!(
            config_diff(&created_by_broker, &created_by_broker, &BTreeMap::new()).len(),
            2
        );
        // The client's own topic.config wins key by key.
        let wanted = wanted_topic_config(
            &from_broker,
            &app(json!({"retention.bytes": "5000", "cleanup.policy": "delete"})),
        );
        assert_eq!(
            wanted,
            map(&[
                ("cleanup.policy", "delete"),
                ("retention.bytes", "5000"),
                ("retention.ms", "3600000")
            ])
        );
    }

    #[test]
    fn broker_retention_comes_from_defaults_or_config_overrides() {
        let defaults = ferrymq::config::ApplicationConfig::default();
        assert_eq!(
            broker_topic_config(&broker(json!({}))),
            map(&[
                ("retention.bytes", &defaults.retention_bytes.to_string()),
                (
                    "retention.ms",
                    &(defaults.retention_secs * 1000).to_string()
                ),
            ])
        );
        let overridden = broker(json!({"config": {"application": {"retention_secs": 60}}}));
        assert_eq!(broker_topic_config(&overridden)["retention.ms"], "60000");
    }
}
