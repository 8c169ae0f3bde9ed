//! Server-side apply of owned objects, skipping the request when the object already holds
//! everything the operator wants, so a reconcile that finds the cluster in place writes
//! nothing.

use kube::api::{Api, Patch, PatchParams};
use kube::Resource;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::error::Result;
use crate::resources::FIELD_MANAGER;

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

/// Applies `obj` (named `name`) with the operator's field manager unless the live object
/// already contains it. Returns the live object and whether a write was made.
pub async fn apply<K>(api: &Api<K>, name: &str, obj: &K) -> Result<(K, bool)>
where
    K: Resource + Clone + Serialize + DeserializeOwned + std::fmt::Debug,
{
    let want = serde_json::to_value(obj)?;
    if let Some(live) = api.get_opt(name).await? {
        if contains(&serde_json::to_value(&live)?, &want) {
            return Ok((live, false));
        }
    }
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let live = api.patch(name, &params, &Patch::Apply(obj)).await?;
    Ok((live, true))
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
    use super::contains;
    use serde_json::json;

    #[test]
    fn contains_ignores_server_defaults_but_not_changes() {
        let have = json!({"a": 1, "b": {"c": [1, {"d": 2, "e": 3}]}, "x": "server"});
        assert!(contains(&have, &json!({"a": 1, "b": {"c": [1, {"d": 2}]}})));
        assert!(!contains(&have, &json!({"a": 2})));
        assert!(!contains(&have, &json!({"b": {"c": [1]}})));
        assert!(!contains(&have, &json!({"new": true})));
    }
}
