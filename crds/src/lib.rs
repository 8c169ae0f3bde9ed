//! ferrymq's Kubernetes API: the `MqttBroker` and `ApplicationClient` custom resources
//! (group `ferrymq.io`, version `v1alpha1`).
//!
//! The types are the single source of the CRD schemas: `crdgen` writes `crds/*.yaml` from them,
//! and a test fails when the committed YAML drifts. Rules the API server must enforce (immutable
//! fields, cross-field constraints) are CEL `x-kubernetes-validations`, declared next to the
//! fields they guard and evaluated client-side in tests through kube's `cel` feature.

mod application_client;
mod common;
mod mqtt_broker;

pub use application_client::*;
pub use common::*;
pub use mqtt_broker::*;

/// The API group of every ferrymq resource.
pub const GROUP: &str = "ferrymq.io";
/// The served and stored version.
pub const VERSION: &str = "v1alpha1";

/// The CRDs as YAML documents, in the order `crdgen` writes them, with their file names.
pub fn crd_documents() -> Result<Vec<(&'static str, String)>, serde_yaml::Error> {
    use kube::CustomResourceExt;
    Ok(vec![
        (
            "mqttbroker.yaml",
            serde_yaml::to_string(&MqttBroker::crd())?,
        ),
        (
            "applicationclient.yaml",
            serde_yaml::to_string(&ApplicationClient::crd())?,
        ),
    ])
}
