//! The credential store: the interface every backend implements (embedded redb file now,
//! PostgreSQL table `mqtt_credentials` with the Kafka/PostgreSQL backend, and what the
//! Kubernetes operator writes). The record format is documented in docs/security.md,
//! "Credential store"; keep the two in step.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::acl::AclRules;
use crate::storage::ClientKind;

/// How a record is found: by the user name a client presents, or by its client id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CredentialKey {
    Username(String),
    ClientId(String),
}

impl CredentialKey {
    /// The stored key text: `u:<username>` or `c:<client id>` (the two namespaces sort apart).
    pub fn encode(&self) -> String {
        match self {
            CredentialKey::Username(u) => format!("u:{u}"),
            CredentialKey::ClientId(c) => format!("c:{c}"),
        }
    }

    pub fn decode(text: &str) -> Option<CredentialKey> {
        if let Some(u) = text.strip_prefix("u:") {
            return Some(CredentialKey::Username(u.to_string()));
        }
        text.strip_prefix("c:")
            .map(|c| CredentialKey::ClientId(c.to_string()))
    }
}

impl std::fmt::Display for CredentialKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CredentialKey::Username(u) => write!(f, "username `{u}`"),
            CredentialKey::ClientId(c) => write!(f, "client id `{c}`"),
        }
    }
}

/// The client type as stored (`"device"` / `"application"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientType {
    Device,
    Application,
}

impl ClientType {
    pub fn kind(self) -> ClientKind {
        match self {
            ClientType::Device => ClientKind::Device,
            ClientType::Application => ClientKind::Application,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ClientType::Device => "device",
            ClientType::Application => "application",
        }
    }

    pub fn parse(text: &str) -> Option<ClientType> {
        match text.to_ascii_lowercase().as_str() {
            "device" => Some(ClientType::Device),
            "application" => Some(ClientType::Application),
            _ => None,
        }
    }
}

/// One credential. Stored as this JSON object (unknown fields are refused, absent ones take
/// their defaults), so other writers (the operator, SQL) can produce it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialRecord {
    /// The user name a client logs in with. When set, the record is keyed by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// With a user name: the only client id that user may connect as. Without one: the
    /// client id this record is for (and its key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// PHC string of an argon2id hash (`$argon2id$v=19$...`), or a bcrypt hash (`$2b$...`,
    /// imports). `None`: the record cannot be logged in with; it only gives its client id a
    /// client type and ACL when the client is authenticated otherwise (X.509 mapping,
    /// APPLICATION registrations).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_hash: Option<String>,
    /// `None`: the type comes from the APPLICATION registrations and the config, else DEVICE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_type: Option<ClientType>,
    /// Publish/subscribe patterns. Empty lists allow nothing.
    #[serde(default)]
    pub acl: AclRules,
}

impl CredentialRecord {
    /// The key this record is stored under; `None` when it has neither a user name nor a
    /// client id.
    pub fn key(&self) -> Option<CredentialKey> {
        match (&self.username, &self.client_id) {
            (Some(u), _) => Some(CredentialKey::Username(u.clone())),
            (None, Some(c)) => Some(CredentialKey::ClientId(c.clone())),
            (None, None) => None,
        }
    }

    /// Checks what a writer must respect; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        let key = self
            .key()
            .ok_or("a record needs a username or a client_id")?;
        let name = match &key {
            CredentialKey::Username(u) => u,
            CredentialKey::ClientId(c) => c,
        };
        if name.is_empty() || name.len() > 65_535 || name.contains('\0') {
            return Err(format!("{key}: must be 1 to 65535 bytes without U+0000"));
        }
        if let Some(hash) = &self.password_hash {
            super::password::check_format(hash).map_err(|e| format!("password_hash: {e}"))?;
        }
        self.acl.validate().map_err(|e| format!("acl: {e}"))
    }
}

impl CredentialRecord {
    /// The record as shown to people (CLI, admin API): the JSON format without
    /// `password_hash`, plus `has_password`. Hashes never leave the store.
    pub fn redacted(&self) -> serde_json::Value {
        let mut json = serde_json::json!({
            "acl": { "publish": self.acl.publish, "subscribe": self.acl.subscribe },
            "has_password": self.password_hash.is_some(),
        });
        if let Some(obj) = json.as_object_mut() {
            if let Some(u) = &self.username {
                obj.insert("username".into(), u.clone().into());
            }
            if let Some(c) = &self.client_id {
                obj.insert("client_id".into(), c.clone().into());
            }
            if let Some(t) = self.client_type {
                obj.insert("client_type".into(), t.as_str().into());
            }
        }
        json
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("credential store: {0}")]
    Backend(String),
    #[error("invalid credential record: {0}")]
    Invalid(String),
    #[error("stored credential {key} is unreadable: {message}")]
    Corrupt { key: String, message: String },
}

/// Most records one [`CredentialStore::list`] call returns.
pub const MAX_LIST: usize = 10_000;

/// Where credentials live. Small on purpose: each backend (redb, PostgreSQL) implements these
/// five calls, and everything else (password checks, ACLs, the admin CLI and API) is built on
/// top.
#[async_trait]
pub trait CredentialStore: Send + Sync + 'static {
    async fn get(&self, key: &CredentialKey) -> Result<Option<CredentialRecord>, StoreError>;
    /// Inserts or replaces the record under its key (validated first).
    async fn put(&self, record: CredentialRecord) -> Result<(), StoreError>;
    /// Inserts the record (validated first) unless its key is taken, atomically; whether it
    /// was inserted.
    async fn create(&self, record: CredentialRecord) -> Result<bool, StoreError>;
    /// Whether a record was there.
    async fn delete(&self, key: &CredentialKey) -> Result<bool, StoreError>;
    /// Up to `limit` (at most [`MAX_LIST`]) records in key order, starting after `after`.
    async fn list(
        &self,
        after: Option<&CredentialKey>,
        limit: usize,
    ) -> Result<Vec<CredentialRecord>, StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_json_is_the_documented_format() {
        let text = r#"{"username":"bob","password_hash":"$2b$04$abcdefghijklmnopqrstuu5Ur8wUbOxjVt3EOszWWbJ6qgF0DxF.S","client_type":"application","acl":{"publish":["a/#"],"subscribe":[]}}"#;
        let r: CredentialRecord = serde_json::from_str(text).unwrap();
        assert_eq!(r.key(), Some(CredentialKey::Username("bob".into())));
        assert_eq!(r.client_type, Some(ClientType::Application));
        assert!(serde_json::from_str::<CredentialRecord>(r#"{"client_id":"x","typo":1}"#).is_err());
        let minimal: CredentialRecord = serde_json::from_str(r#"{"client_id":"x"}"#).unwrap();
        assert_eq!(minimal.acl, AclRules::default());
        assert!(minimal.validate().is_ok());
        assert!(serde_json::from_str::<CredentialRecord>("{}")
            .unwrap()
            .validate()
            .is_err());
    }

    #[test]
    fn keys_round_trip() {
        for k in [
            CredentialKey::Username("a:b".into()),
            CredentialKey::ClientId("u:x".into()),
        ] {
            assert_eq!(CredentialKey::decode(&k.encode()), Some(k));
        }
    }
}
