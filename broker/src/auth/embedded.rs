//! The embedded credential store: a redb file of its own, `<data_dir>/credentials.redb`, next to
//! (and independent of) the message storage in `ferrymq.redb`.
//!
//! One table, `credentials`: key `u:<username>` or `c:<client id>` ([`CredentialKey::encode`]),
//! value the record as JSON ([`CredentialRecord`]). redb holds an exclusive lock on the file
//! while it is open, so the admin CLI can only write it while no broker runs on the same data
//! directory; [`EmbeddedCredentials::open`] reports that case as [`OpenError::Locked`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::store::{CredentialKey, CredentialRecord, CredentialStore, StoreError, MAX_LIST};

pub const FILE_NAME: &str = "credentials.redb";
const CREDENTIALS: TableDefinition<&str, &[u8]> = TableDefinition::new("credentials");

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(
        "{path} is locked by another process (a running broker holds it for its whole life); \
         stop the broker or use its admin API to change credentials"
    )]
    Locked { path: PathBuf },
    #[error("cannot open {path}: {message}")]
    Other { path: PathBuf, message: String },
}

/// The credential store in a redb file.
#[derive(Clone)]
pub struct EmbeddedCredentials {
    db: Arc<Database>,
}

impl EmbeddedCredentials {
    /// Opens (creating if needed) `<dir>/credentials.redb`.
    pub fn open(dir: &Path) -> Result<EmbeddedCredentials, OpenError> {
        let path = dir.join(FILE_NAME);
        let other = |message: String| OpenError::Other {
            path: path.clone(),
            message,
        };
        std::fs::create_dir_all(dir).map_err(|e| other(e.to_string()))?;
        let db = Database::create(&path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => OpenError::Locked { path: path.clone() },
            e => other(e.to_string()),
        })?;
        // Create the table once, so readers never see "table does not exist".
        let txn = db.begin_write().map_err(|e| other(e.to_string()))?;
        txn.open_table(CREDENTIALS)
            .map_err(|e| other(e.to_string()))?;
        txn.commit().map_err(|e| other(e.to_string()))?;
        Ok(EmbeddedCredentials { db: Arc::new(db) })
    }

    pub fn get_blocking(
        &self,
        key: &CredentialKey,
    ) -> Result<Option<CredentialRecord>, StoreError> {
        let txn = self.db.begin_read().map_err(backend)?;
        let table = txn.open_table(CREDENTIALS).map_err(backend)?;
        let k = key.encode();
        match table.get(k.as_str()).map_err(backend)? {
            Some(v) => decode(&k, v.value()).map(Some),
            None => Ok(None),
        }
    }

    pub fn put_blocking(&self, record: &CredentialRecord) -> Result<(), StoreError> {
        record.validate().map_err(StoreError::Invalid)?;
        let Some(key) = record.key() else {
            return Err(StoreError::Invalid("no key".into()));
        };
        let value = serde_json::to_vec(record).map_err(|e| StoreError::Invalid(e.to_string()))?;
        let txn = self.db.begin_write().map_err(backend)?;
        {
            let mut table = txn.open_table(CREDENTIALS).map_err(backend)?;
            table
                .insert(key.encode().as_str(), value.as_slice())
                .map_err(backend)?;
        }
        txn.commit().map_err(backend)
    }

    pub fn create_blocking(&self, record: &CredentialRecord) -> Result<bool, StoreError> {
        record.validate().map_err(StoreError::Invalid)?;
        let Some(key) = record.key() else {
            return Err(StoreError::Invalid("no key".into()));
        };
        let value = serde_json::to_vec(record).map_err(|e| StoreError::Invalid(e.to_string()))?;
        let k = key.encode();
        // Check and insert in one write transaction: redb has one writer at a time.
        let txn = self.db.begin_write().map_err(backend)?;
        let inserted = {
            let mut table = txn.open_table(CREDENTIALS).map_err(backend)?;
            let taken = table.get(k.as_str()).map_err(backend)?.is_some();
            if !taken {
                table
                    .insert(k.as_str(), value.as_slice())
                    .map_err(backend)?;
            }
            !taken
        };
        txn.commit().map_err(backend)?;
        Ok(inserted)
    }

    pub fn delete_blocking(&self, key: &CredentialKey) -> Result<bool, StoreError> {
        let txn = self.db.begin_write().map_err(backend)?;
        let existed = {
            let mut table = txn.open_table(CREDENTIALS).map_err(backend)?;
            let removed = table.remove(key.encode().as_str()).map_err(backend)?;
            removed.is_some()
        };
        txn.commit().map_err(backend)?;
        Ok(existed)
    }

    pub fn list_blocking(
        &self,
        after: Option<&CredentialKey>,
        limit: usize,
    ) -> Result<Vec<CredentialRecord>, StoreError> {
        let limit = limit.min(MAX_LIST);
        let txn = self.db.begin_read().map_err(backend)?;
        let table = txn.open_table(CREDENTIALS).map_err(backend)?;
        let start = after.map(|k| k.encode());
        let range = match &start {
            Some(s) => table.range::<&str>((
                std::ops::Bound::Excluded(s.as_str()),
                std::ops::Bound::Unbounded,
            )),
            None => table.range::<&str>(..),
        }
        .map_err(backend)?;
        let mut out = Vec::new();
        for entry in range.take(limit) {
            let (k, v) = entry.map_err(backend)?;
            out.push(decode(k.value(), v.value())?);
        }
        Ok(out)
    }
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn decode(key: &str, value: &[u8]) -> Result<CredentialRecord, StoreError> {
    serde_json::from_slice(value).map_err(|e| StoreError::Corrupt {
        key: key.to_string(),
        message: e.to_string(),
    })
}

/// Runs a blocking store call on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Backend(e.to_string()))?
}

#[async_trait]
impl CredentialStore for EmbeddedCredentials {
    async fn get(&self, key: &CredentialKey) -> Result<Option<CredentialRecord>, StoreError> {
        let (this, key) = (self.clone(), key.clone());
        blocking(move || this.get_blocking(&key)).await
    }

    async fn put(&self, record: CredentialRecord) -> Result<(), StoreError> {
        let this = self.clone();
        blocking(move || this.put_blocking(&record)).await
    }

    async fn create(&self, record: CredentialRecord) -> Result<bool, StoreError> {
        let this = self.clone();
        blocking(move || this.create_blocking(&record)).await
    }

    async fn delete(&self, key: &CredentialKey) -> Result<bool, StoreError> {
        let (this, key) = (self.clone(), key.clone());
        blocking(move || this.delete_blocking(&key)).await
    }

    async fn list(
        &self,
        after: Option<&CredentialKey>,
        limit: usize,
    ) -> Result<Vec<CredentialRecord>, StoreError> {
        let (this, after) = (self.clone(), after.cloned());
        blocking(move || this.list_blocking(after.as_ref(), limit)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::acl::AclRules;
    use crate::auth::store::ClientType;

    fn record(user: Option<&str>, client: Option<&str>) -> CredentialRecord {
        CredentialRecord {
            username: user.map(Into::into),
            client_id: client.map(Into::into),
            password_hash: None,
            client_type: Some(ClientType::Device),
            acl: AclRules::everything(),
        }
    }

    #[tokio::test]
    async fn crud_and_paging() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedCredentials::open(dir.path()).unwrap();
        store.put(record(Some("bob"), None)).await.unwrap();
        store.put(record(None, Some("dev1"))).await.unwrap();
        store.put(record(None, Some("dev2"))).await.unwrap();
        let bob = CredentialKey::Username("bob".into());
        assert_eq!(
            store.get(&bob).await.unwrap(),
            Some(record(Some("bob"), None))
        );
        assert_eq!(
            store
                .get(&CredentialKey::ClientId("bob".into()))
                .await
                .unwrap(),
            None
        );
        let first = store.list(None, 2).await.unwrap();
        assert_eq!(first.len(), 2);
        let rest = store.list(first[1].key().as_ref(), 10).await.unwrap();
        assert_eq!(rest, vec![record(Some("bob"), None)]);
        assert!(store.delete(&bob).await.unwrap());
        assert!(!store.delete(&bob).await.unwrap());
        assert!(store.put(record(None, None)).await.is_err());
    }

    #[test]
    fn second_open_reports_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let _held = EmbeddedCredentials::open(dir.path()).unwrap();
        match EmbeddedCredentials::open(dir.path()) {
            Err(OpenError::Locked { path }) => assert!(path.ends_with(FILE_NAME)),
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("opened twice"),
        }
    }
}
