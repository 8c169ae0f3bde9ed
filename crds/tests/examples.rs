//! The example manifests in docs/examples parse as our types and pass the CRDs' CEL rules, so
//! the documentation cannot show a manifest the API server would refuse.

use ferrymq_crds::{ApplicationClient, MqttBroker};
use serde::Deserialize;

#[test]
fn documented_examples_are_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("docs/examples") {
        let path = entry.expect("dir entry").path();
        let text = std::fs::read_to_string(&path).expect("readable example");
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_json::Value::deserialize(doc).expect("valid YAML");
            match value["kind"].as_str() {
                Some("MqttBroker") => {
                    let b: MqttBroker = serde_json::from_value(value)
                        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                    b.validate_cel()
                        .unwrap_or_else(|e| panic!("{}: {e:?}", path.display()));
                    seen += 1;
                }
                Some("ApplicationClient") => {
                    let a: ApplicationClient = serde_json::from_value(value)
                        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                    a.validate_cel()
                        .unwrap_or_else(|e| panic!("{}: {e:?}", path.display()));
                    seen += 1;
                }
                _ => {}
            }
        }
    }
    assert_eq!(seen, 3, "three ferrymq objects in docs/examples");
}
