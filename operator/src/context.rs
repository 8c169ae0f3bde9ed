//! What every reconcile gets: the Kubernetes client, the side-effect seam, metrics and the
//! Event recorder.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ferrymq_crds::ApplicationClient;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::Store;
use kube::{Client, Resource};

use crate::metrics::Metrics;
use crate::seam::Provisioner;

pub struct Context {
    pub client: Client,
    pub provisioner: Arc<dyn Provisioner>,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
    /// How often a healthy object is reconciled again, which is when out-of-band drift in Kafka
    /// or PostgreSQL is found and reverted.
    pub resync: Duration,
    /// The ApplicationClient controller's own cache (its reflector), set when the controllers
    /// start. The conflict check reads every claimant of a client id from it instead of listing
    /// all ApplicationClients of the namespace on each reconcile (n reconciles x n objects).
    /// Unset (a reconcile called directly, as the fast tests do): the check lists.
    pub app_store: OnceLock<Store<ApplicationClient>>,
}

impl Context {
    pub fn new(
        client: Client,
        provisioner: Arc<dyn Provisioner>,
        metrics: Arc<Metrics>,
        instance: Option<String>,
    ) -> Context {
        let reporter = Reporter {
            controller: "ferrymq-operator".into(),
            instance,
        };
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            provisioner,
            metrics,
            resync: Duration::from_secs(300),
            app_store: OnceLock::new(),
        }
    }

    /// Publishes an Event about `obj`. A failure to publish is logged, never fatal: Events are
    /// a courtesy, the status is the record.
    pub async fn event<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        warning: bool,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let event = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &obj.object_ref(&())).await {
            tracing::warn!(error = %e, reason, "cannot publish event");
        }
    }
}
