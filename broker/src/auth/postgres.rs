//! The PostgreSQL credential store: the table `mqtt_credentials` in the broker's schema
//! (`postgres.schema`), used with `storage.backend = "kafka+postgres"`.
//!
//! The table is an interface (docs/security.md, "Credential store"): the Kubernetes operator and
//! plain SQL write it too, so a row is checked like a written record every time it is read
//! ([`CredentialRecord::validate`]); a row that fails is [`StoreError::Corrupt`] naming its key,
//! which refuses that CONNECT with "server unavailable" rather than guessing. The CHECK
//! constraints of `common/migrations/postgres/0002_credentials.sql` refuse what SQL can see at
//! insert time.
//!
//! The key columns use the "C" collation, so `ORDER BY key_kind, key_name` is the byte order of
//! the embedded store's `c:<client id>` / `u:<username>` keys ('client_id' < 'username').

use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgPool, PgPoolOptions, PgRow};
use sqlx::Row;

use super::acl::AclRules;
use super::store::{
    ClientType, CredentialKey, CredentialRecord, CredentialStore, StoreError, MAX_LIST,
};
use crate::config::PostgresConfig;
use crate::storage::postgres::{migrate, schema_options, unreachable};
use crate::storage::StorageError;

/// Connections of the credential pool. Lookups are single-row primary-key reads, far cheaper
/// than the password check that follows them, so a few connections keep up with the hashing;
/// a separate pool keeps CONNECT storms and the message writer from queueing behind each other.
pub const POOL_CONNECTIONS: u32 = 4;

const COLUMNS: &str =
    "key_kind, key_name, client_id, password_hash, client_type, publish, subscribe";

/// The credential store in PostgreSQL.
#[derive(Clone)]
pub struct PgCredentials {
    pool: PgPool,
}

impl PgCredentials {
    /// Connects to `postgres.url`, creates the schema if missing and applies the migrations (so
    /// the admin CLI works before the first broker start, too).
    pub async fn connect(config: &PostgresConfig) -> Result<PgCredentials, StorageError> {
        let options = schema_options(config).await?;
        let pool = PgPoolOptions::new()
            .max_connections(POOL_CONNECTIONS)
            // A lookup waits this long for a connection at most; then the CONNECT is refused
            // with "server unavailable" instead of hanging while PostgreSQL is away.
            .acquire_timeout(Duration::from_secs(config.connect_timeout_secs))
            .connect_with(options)
            .await
            .map_err(|e| unreachable(config, e))?;
        migrate(&pool, &config.schema).await?;
        Ok(PgCredentials { pool })
    }

    /// A store on an existing pool whose search_path is a migrated schema.
    pub fn with_pool(pool: PgPool) -> PgCredentials {
        PgCredentials { pool }
    }
}

fn kind_name(key: &CredentialKey) -> (&'static str, &str) {
    match key {
        CredentialKey::Username(u) => ("username", u),
        CredentialKey::ClientId(c) => ("client_id", c),
    }
}

/// Names no row can have (the table refuses them): looked up, they are simply absent. Checked
/// before querying because PostgreSQL text cannot carry U+0000 at all.
fn storable(name: &str) -> bool {
    !name.is_empty() && name.len() <= 65_535 && !name.contains('\0')
}

fn type_text(client_type: Option<ClientType>) -> Option<&'static str> {
    client_type.map(ClientType::as_str)
}

fn backend(e: sqlx::Error) -> StoreError {
    StoreError::Backend(format!("postgres: {e}"))
}

/// The record a row holds, checked as a written record would be.
fn decode(row: &PgRow) -> Result<CredentialRecord, StoreError> {
    let kind: String = row.try_get(0).map_err(backend)?;
    let name: String = row.try_get(1).map_err(backend)?;
    let key = match kind.as_str() {
        "username" => CredentialKey::Username(name.clone()),
        "client_id" => CredentialKey::ClientId(name.clone()),
        other => {
            return Err(StoreError::Corrupt {
                key: format!("{other}:{name}"),
                message: format!("key_kind `{other}` is neither 'username' nor 'client_id'"),
            })
        }
    };
    let corrupt = |message: String| StoreError::Corrupt {
        key: key.encode(),
        message,
    };
    let client_id: Option<String> = row.try_get(2).map_err(|e| corrupt(e.to_string()))?;
    let password_hash: Option<String> = row.try_get(3).map_err(|e| corrupt(e.to_string()))?;
    let client_type: Option<String> = row.try_get(4).map_err(|e| corrupt(e.to_string()))?;
    let publish: Vec<String> = row
        .try_get(5)
        .map_err(|e| corrupt(format!("publish: {e}")))?;
    let subscribe: Vec<String> = row
        .try_get(6)
        .map_err(|e| corrupt(format!("subscribe: {e}")))?;
    let client_type = match client_type.as_deref() {
        None => None,
        Some("device") => Some(ClientType::Device),
        Some("application") => Some(ClientType::Application),
        Some(other) => {
            return Err(corrupt(format!(
                "client_type `{other}` is neither 'device' nor 'application'"
            )))
        }
    };
    let (username, client_id) = match &key {
        CredentialKey::Username(u) => (Some(u.clone()), client_id),
        CredentialKey::ClientId(c) => {
            if client_id.as_ref().is_some_and(|id| id != c) {
                return Err(corrupt("client_id differs from key_name".into()));
            }
            (None, Some(c.clone()))
        }
    };
    let record = CredentialRecord {
        username,
        client_id,
        password_hash,
        client_type,
        acl: AclRules { publish, subscribe },
    };
    record.validate().map_err(corrupt)?;
    Ok(record)
}

#[async_trait]
impl CredentialStore for PgCredentials {
    async fn get(&self, key: &CredentialKey) -> Result<Option<CredentialRecord>, StoreError> {
        let (kind, name) = kind_name(key);
        if !storable(name) {
            return Ok(None);
        }
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM mqtt_credentials WHERE key_kind = $1 AND key_name = $2"
        ))
        .bind(kind)
        .bind(name)
        .fetch_optional(&self.pool)
        .await
        .map_err(backend)?;
        row.as_ref().map(decode).transpose()
    }

    async fn put(&self, record: CredentialRecord) -> Result<(), StoreError> {
        record.validate().map_err(StoreError::Invalid)?;
        let key = record
            .key()
            .ok_or_else(|| StoreError::Invalid("no key".into()))?;
        let (kind, name) = kind_name(&key);
        sqlx::query(&format!(
            "INSERT INTO mqtt_credentials ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT (key_kind, key_name) DO UPDATE SET client_id = EXCLUDED.client_id, \
             password_hash = EXCLUDED.password_hash, client_type = EXCLUDED.client_type, \
             publish = EXCLUDED.publish, subscribe = EXCLUDED.subscribe"
        ))
        .bind(kind)
        .bind(name)
        .bind(&record.client_id)
        .bind(&record.password_hash)
        .bind(type_text(record.client_type))
        .bind(&record.acl.publish)
        .bind(&record.acl.subscribe)
        .execute(&self.pool)
        .await
        .map_err(|e| write_error(&key, e))?;
        Ok(())
    }

    async fn create(&self, record: CredentialRecord) -> Result<bool, StoreError> {
        record.validate().map_err(StoreError::Invalid)?;
        let key = record
            .key()
            .ok_or_else(|| StoreError::Invalid("no key".into()))?;
        let (kind, name) = kind_name(&key);
        let done = sqlx::query(&format!(
            "INSERT INTO mqtt_credentials ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT (key_kind, key_name) DO NOTHING"
        ))
        .bind(kind)
        .bind(name)
        .bind(&record.client_id)
        .bind(&record.password_hash)
        .bind(type_text(record.client_type))
        .bind(&record.acl.publish)
        .bind(&record.acl.subscribe)
        .execute(&self.pool)
        .await
        .map_err(|e| write_error(&key, e))?;
        Ok(done.rows_affected() > 0)
    }

    async fn delete(&self, key: &CredentialKey) -> Result<bool, StoreError> {
        let (kind, name) = kind_name(key);
        if !storable(name) {
            return Ok(false);
        }
        let done =
            sqlx::query("DELETE FROM mqtt_credentials WHERE key_kind = $1 AND key_name = $2")
                .bind(kind)
                .bind(name)
                .execute(&self.pool)
                .await
                .map_err(backend)?;
        Ok(done.rows_affected() > 0)
    }

    async fn list(
        &self,
        after: Option<&CredentialKey>,
        limit: usize,
    ) -> Result<Vec<CredentialRecord>, StoreError> {
        let limit = limit.min(MAX_LIST) as i64;
        let rows = match after.map(kind_name) {
            // Row comparison on the primary key: the index order, "C" collation.
            Some((kind, name)) => sqlx::query(&format!(
                "SELECT {COLUMNS} FROM mqtt_credentials WHERE (key_kind, key_name) > ($1, $2) \
                 ORDER BY key_kind, key_name LIMIT $3"
            ))
            .bind(kind)
            // No stored name holds U+0000, so the keys after `a\0b` are the keys after `a`.
            .bind(name.split('\0').next().unwrap_or_default())
            .bind(limit)
            .fetch_all(&self.pool)
            .await
            .map_err(backend)?,
            None => sqlx::query(&format!(
                "SELECT {COLUMNS} FROM mqtt_credentials ORDER BY key_kind, key_name LIMIT $1"
            ))
            .bind(limit)
            .fetch_all(&self.pool)
            .await
            .map_err(backend)?,
        };
        rows.iter().map(decode).collect()
    }
}

/// Constraint violations (what `validate` cannot see, such as an index entry too large for
/// PostgreSQL's B-tree) are the record's fault, not the store's.
fn write_error(key: &CredentialKey, e: sqlx::Error) -> StoreError {
    if let sqlx::Error::Database(db) = &e {
        let code = db.code();
        // 23xxx: integrity constraint violation; 54000: program limit exceeded (index row size).
        if code
            .as_deref()
            .is_some_and(|c| c.starts_with("23") || c == "54000")
        {
            return StoreError::Invalid(format!("{key}: refused by PostgreSQL: {}", db.message()));
        }
    }
    backend(e)
}
