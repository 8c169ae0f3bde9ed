//! Server-side apply of owned objects, skipping the request when the object already holds
//! everything the operator wants *and* was last applied from the same desired object, so a
//! reconcile that finds the cluster in place writes nothing, while a field removed from the spec
//! still leaves the child.

use kube::api::{Api, Patch, PatchParams};
use kube::Resource;
use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::error::Result;
use crate::resources::FIELD_MANAGER;

/// On every applied child: a hash of the whole object the operator last applied. "The live
/// object contains every wanted field" alone cannot see a field that is no longer wanted (an
/// annotation, a nodeSelector or a resource limit removed from the MqttBroker): the live object
/// still contains everything wanted, so the apply that would remove the field (server-side apply
/// drops fields its manager owned and no longer sends) would be skipped for ever. With the hash
/// in the wanted object, any change of the desired object, removals included, forces the apply.
pub const APPLIED_HASH_ANNOTATION: &str = "ferrymq.io/applied-hash";

/// Whether every field of `want` is present in `have` with the same value. Objects compare key
/// by key (extra keys in `have` are the API server's defaults and other managers' fields);
/// arrays compare element by element and must have the same length.
pub fn contains(have: &Value, want: &Value) -> bool {
    match (have, want) {
        (Value::Object(h), Value::Object(w)) => w
            .iter()
            .all(|(k, wv)| wv.is_null() || h.get(k).is_some_and(|hv| contains(hv, wv))),
        (Value::Array(h), Value::Array(w)) => {
            h.len() == w.len() && h.iter().zip(w).all(|(hv, wv)| contains(hv, wv))
        }
        (h, w) => h == w,
    }
}

/// `obj` as JSON with [`APPLIED_HASH_ANNOTATION`] set to the hash of `obj` itself.
pub fn with_applied_hash<T: Serialize>(obj: &T) -> Result<Value> {
    let mut want = serde_json::to_value(obj)?;
    // serde_json's maps are sorted (no preserve_order), so equal objects hash equally.
    let hash: String = Sha256::digest(serde_json::to_vec(&want)?)
        .iter()
        .take(12)
        .map(|b| format!("{b:02x}"))
        .collect();
    if let Some(map) = want.as_object_mut() {
        let meta = map
            .entry("metadata")
            .or_insert_with(|| Value::Object(Default::default()));
        if let Some(meta) = meta.as_object_mut() {
            let annotations = meta
                .entry("annotations")
                .or_insert_with(|| Value::Object(Default::default()));
            if !annotations.is_object() {
                *annotations = Value::Object(Default::default());
            }
            if let Some(a) = annotations.as_object_mut() {
                a.insert(APPLIED_HASH_ANNOTATION.into(), Value::String(hash));
            }
        }
    }
    Ok(want)
}

/// Applies `obj` (named `name`) with the operator's field manager unless the live object
/// already contains it, as last applied (see [`APPLIED_HASH_ANNOTATION`]). Returns the live
/// object and whether a write was made.
pub async fn apply<K>(api: &Api<K>, name: &str, obj: &K) -> Result<(K, bool)>
where
    K: Resource + Clone + Serialize + DeserializeOwned + std::fmt::Debug,
{
    let want = with_applied_hash(obj)?;
    if let Some(live) = api.get_opt(name).await? {
        if contains(&serde_json::to_value(&live)?, &want) {
            return Ok((live, false));
        }
    }
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let live = api.patch(name, &params, &Patch::Apply(&want)).await?;
    Ok((live, true))
}

/// Replaces the status of `name` with `status`: a JSON merge patch that names every field of the
/// status type, the empty ones as `null`. A merge patch leaves keys it does not mention alone,
/// so without the nulls a field that became empty (a topic id the cluster no longer reports, the
/// last endpoint, the last condition) would keep its old value for ever; lists (conditions,
/// endpoints) are replaced whole by a merge patch. The field list comes from the type's schema,
/// not from the status the operator last read, so a stale cache cannot leave a field behind.
/// (Server-side apply would clear only fields this field manager already owns, not ones an
/// earlier writer left.)
pub async fn replace_status<K, S>(api: &Api<K>, name: &str, status: &S) -> Result<K>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
    S: Serialize + JsonSchema,
{
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PatchParams::default()
    };
    let patch = serde_json::json!({ "status": full_status(status)? });
    Ok(api
        .patch_status(name, &params, &Patch::Merge(&patch))
        .await?)
}

/// `status` as JSON with every top-level field of its type present, `null` where it has no
/// value.
pub fn full_status<S: Serialize + JsonSchema>(status: &S) -> Result<Value> {
    let mut value = serde_json::to_value(status)?;
    let schema = schemars::schema_for!(S);
    if let (Some(fields), Some(props)) = (
        value.as_object_mut(),
        schema
            .as_value()
            .get("properties")
            .and_then(Value::as_object),
    ) {
        for key in props.keys() {
            fields.entry(key.clone()).or_insert(Value::Null);
        }
    }
    Ok(value)
}

/// Deletes `name` if it exists; returns whether it did.
pub async fn delete_if_present<K>(api: &Api<K>, name: &str) -> Result<bool>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    if api.get_opt(name).await?.is_none() {
        return Ok(false);
    }
    match api.delete(name, &Default::default()).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(false),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::{contains, full_status};
    use ferrymq_crds::{ApplicationClientStatus, MqttBrokerStatus};
    use serde_json::json;

    #[test]
    fn a_full_status_names_every_field_and_nulls_the_empty_ones() {
        let app = ApplicationClientStatus {
            topic_name: Some("ferrymq.app.a".into()),
            ..Default::default()
        };
        assert_eq!(
            full_status(&app).unwrap(),
            json!({"observedGeneration": null, "topicName": "ferrymq.app.a", "topicId": null,
                   "partitions": null, "secretName": null, "conditions": null})
        );
        let broker = full_status(&MqttBrokerStatus::default()).unwrap();
        for key in [
            "endpoints",
            "conditions",
            "configHash",
            "selector",
            "storageBackend",
        ] {
            assert_eq!(broker[key], json!(null), "{key}");
        }
        assert_eq!(broker["replicas"], json!(0));
    }

    #[test]
    fn contains_ignores_server_defaults_but_not_changes() {
        let have = json!({"a": 1, "b": {"c": [1, {"d": 2, "e": 3}]}, "x": "server"});
        assert!(contains(&have, &json!({"a": 1, "b": {"c": [1, {"d": 2}]}})));
        assert!(!contains(&have, &json!({"a": 2})));
        assert!(!contains(&have, &json!({"b": {"c": [1]}})));
        assert!(!contains(&have, &json!({"new": true})));
    }
}
