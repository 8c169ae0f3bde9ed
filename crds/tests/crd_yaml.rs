//! The committed `crds/*.yaml` must equal a fresh generation from the types, so a change to the
//! Rust types cannot ship without the CRD users apply (`cargo run -p ferrymq-crds --bin crdgen`
//! regenerates them).

use std::path::Path;

#[test]
fn committed_crds_match_the_types() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (file, fresh) in ferrymq_crds::crd_documents().expect("CRDs serialize") {
        let path = dir.join(file);
        let committed = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; run `cargo run -p ferrymq-crds --bin crdgen`",
                path.display()
            )
        });
        assert!(
            committed == fresh,
            "{} differs from the generated CRD; run `cargo run -p ferrymq-crds --bin crdgen` and commit it",
            path.display()
        );
    }
}

#[test]
fn crds_have_status_scale_and_printer_columns() {
    use kube::CustomResourceExt;
    let broker = ferrymq_crds::MqttBroker::crd();
    let version = &broker.spec.versions[0];
    assert_eq!(broker.spec.group, "ferrymq.io");
    assert_eq!(version.name, "v1alpha1");
    let sub = version.subresources.as_ref().expect("subresources");
    assert!(sub.status.is_some());
    let scale = sub.scale.as_ref().expect("scale subresource");
    assert_eq!(scale.spec_replicas_path, ".spec.replicas");
    assert_eq!(scale.status_replicas_path, ".status.replicas");
    assert_eq!(
        scale.label_selector_path.as_deref(),
        Some(".status.selector")
    );
    let columns: Vec<_> = version
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(
        columns,
        [
            "Ready",
            "Replicas",
            "Available",
            "Storage",
            "Endpoint",
            "Reason",
            "Age"
        ]
    );
    assert_eq!(broker.spec.scope, "Namespaced");

    let app = ferrymq_crds::ApplicationClient::crd();
    let version = &app.spec.versions[0];
    assert!(version
        .subresources
        .as_ref()
        .and_then(|s| s.status.as_ref())
        .is_some());
    let columns: Vec<_> = version
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(
        columns,
        [
            "Ready",
            "Broker",
            "Client",
            "Topic",
            "Partitions",
            "Reason",
            "Age"
        ]
    );
}
