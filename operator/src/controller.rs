//! Runs both controllers: watches, owned-object triggers, error policy with backoff.

use std::sync::Arc;
use std::time::Duration;

use ferrymq_crds::{ApplicationClient, MqttBroker};
use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher::Config;

use crate::context::Context;
use crate::error::Error;
use crate::{app, broker};

/// Backoff after a failed reconcile: 5 s doubling per consecutive failure of the same object is
/// kube-runtime's job (its scheduler deduplicates); this is the base delay, kept short for
/// transient API errors and long enough not to hammer Kafka or PostgreSQL.
const ERROR_REQUEUE: Duration = Duration::from_secs(10);

/// What the controllers do with a failed reconcile: log it, count it by error kind, requeue.
pub fn error_policy<K: kube::Resource>(
    controller: &'static str,
) -> impl Fn(Arc<K>, &Error, Arc<Context>) -> Action {
    move |obj, error, ctx| {
        // Which object: without it the log line cannot be acted on.
        tracing::warn!(
            controller,
            namespace = obj.meta().namespace.as_deref().unwrap_or(""),
            name = obj.meta().name.as_deref().unwrap_or(""),
            %error,
            "reconcile failed"
        );
        ctx.metrics.failed(controller, error.metric_label());
        Action::requeue(ERROR_REQUEUE)
    }
}

/// Runs until `shutdown` resolves; in-flight reconciles finish first.
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static + Clone,
) {
    let client = ctx.client.clone();
    fn api<K>(client: &kube::Client, ns: &Option<String>) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
        K::DynamicType: Default,
    {
        match ns {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    let owned = Config::default().labels("app.kubernetes.io/managed-by=ferrymq-operator");
    let brokers = Controller::new(
        api::<MqttBroker>(&client, &namespace),
        Config::default().any_semantic(),
    )
    .owns(api::<StatefulSet>(&client, &namespace), owned.clone())
    .owns(api::<Service>(&client, &namespace), owned.clone())
    .owns(api::<ConfigMap>(&client, &namespace), owned.clone())
    .owns(
        api::<PodDisruptionBudget>(&client, &namespace),
        owned.clone(),
    )
    .owns(api::<Secret>(&client, &namespace), owned.clone())
    .graceful_shutdown_on(shutdown.clone())
    .run(
        broker::reconcile,
        error_policy::<MqttBroker>(broker::CONTROLLER),
        ctx.clone(),
    )
    .for_each(|r| async move {
        if let Err(e) = r {
            tracing::debug!(error = %e, "mqttbroker controller");
        }
    });
    let apps = Controller::new(
        api::<ApplicationClient>(&client, &namespace),
        Config::default().any_semantic(),
    );
    // The conflict check reads the controller's cache; the first reconcile runs only once the
    // controller's initial list has filled it.
    let _ = ctx.app_store.set(apps.store());
    let apps = apps
        .owns(api::<Secret>(&client, &namespace), owned)
        .graceful_shutdown_on(shutdown)
        .run(
            app::reconcile,
            error_policy::<ApplicationClient>(app::CONTROLLER),
            ctx,
        )
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "applicationclient controller");
            }
        });
    futures_util::future::join(brokers, apps).await;
}
