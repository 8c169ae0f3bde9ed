//! PostgreSQL side effects of the operator: each `MqttBroker` on Kafka + PostgreSQL gets its own
//! schema and login role, and each `ApplicationClient` a row in that broker's credential table.
//!
//! * **Schema and role** ([`ensure_broker_database`]), through an admin connection: a login role
//!   with no other attributes, owning one schema and holding nothing else beyond `CONNECT` on
//!   the database. Idempotent: a second run changes nothing; a password that no longer works
//!   (the Secret changed, or someone altered the role) is set again. The password travels as a
//!   SCRAM-SHA-256 verifier computed here, so it never appears in a statement the server could
//!   log.
//! * **The broker's tables.** The operator applies the broker's own migrations
//!   (`common/migrations/postgres/`, embedded) as the broker role, up to and including the one
//!   that creates `mqtt_credentials`, so credentials can be written before the first broker pod
//!   starts. Later migrations are left to the broker, which applies them at start: an operator
//!   older or newer than the broker image never moves the schema past what the broker knows.
//! * **Credentials** ([`upsert_application`], [`delete_application`]): the rows documented in
//!   docs/security.md "Credential store", written as the broker role. An APPLICATION client gets
//!   a user record (user name, argon2id password hash with the broker's parameters, bound to
//!   its client id, type `application`, its ACL) and a client-id registration (type
//!   `application`, no password), the same registration `ferrymq app-clients add` writes.

use std::str::FromStr;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use sqlx::migrate::{Migrate, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool, Row};

/// The broker's migrations, embedded at build time (shared with the broker through
/// `ferrymq-common`).
static BROKER_MIGRATIONS: &Migrator = &ferrymq_common::migrations::MIGRATOR;

/// The credential table the operator writes (docs/security.md).
pub const CREDENTIALS_TABLE: &str = "mqtt_credentials";

/// How long connecting may take before PostgreSQL counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// PBKDF2 iterations of the SCRAM verifier: PostgreSQL's default (`scram_iterations`).
const SCRAM_ITERATIONS: u32 = 4096;

/// What a PostgreSQL operation failed on.
#[derive(Debug, thiserror::Error)]
pub enum PostgresError {
    /// No connection (refused, timed out, TLS failure, server shutting down). Retry later.
    #[error("postgres at `{target}` is unreachable: {detail}")]
    Unreachable { target: String, detail: String },
    /// Authentication failed, or the connected role lacks a privilege the step needs.
    #[error("postgres refused to {action}: not authorised ({detail})")]
    NotAuthorized { action: String, detail: String },
    /// The server refused the statement for another reason; the detail says which.
    #[error("postgres refused to {action}: {detail}")]
    InvalidRequest { action: String, detail: String },
    /// A schema or role name the operator will not use.
    #[error("{what} `{name}` is not allowed: {reason}")]
    InvalidName {
        what: &'static str,
        name: String,
        reason: String,
    },
    /// The broker's schema has no credential table and the operator's migrations do not create
    /// one (a broker version without the PostgreSQL credential store).
    #[error(
        "schema {schema} has no {CREDENTIALS_TABLE} table: the broker's migrations this operator \
         was built with do not create it"
    )]
    CredentialTableMissing { schema: String },
}

impl PostgresError {
    /// Whether trying again later can succeed without a change to the spec or the grants.
    pub fn is_transient(&self) -> bool {
        matches!(self, PostgresError::Unreachable { .. })
    }
}

/// `host:port/database` of a connection, for messages (never the password).
fn target(options: &PgConnectOptions) -> String {
    format!(
        "{}:{}/{}",
        options.get_host(),
        options.get_port(),
        options.get_database().unwrap_or("")
    )
}

fn classify(options: &PgConnectOptions, action: &str, e: sqlx::Error) -> PostgresError {
    match e {
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
            let detail = format!("{} (SQLSTATE {code})", db.message());
            // Class 28: invalid authorization; 42501: insufficient privilege.
            if code.starts_with("28") || code == "42501" {
                PostgresError::NotAuthorized {
                    action: action.to_string(),
                    detail,
                }
            } else if code.starts_with("08") || code.starts_with("57P") {
                // Connection exceptions, server shutdown.
                PostgresError::Unreachable {
                    target: target(options),
                    detail: format!("{action}: {detail}"),
                }
            } else {
                PostgresError::InvalidRequest {
                    action: action.to_string(),
                    detail,
                }
            }
        }
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => PostgresError::Unreachable {
            target: target(options),
            detail: format!("{action}: {e}"),
        },
        e => PostgresError::InvalidRequest {
            action: action.to_string(),
            detail: e.to_string(),
        },
    }
}

/// Parses a `postgres://` URL; a malformed one is an invalid request, not an outage.
pub fn parse_url(url: &str) -> Result<PgConnectOptions, PostgresError> {
    PgConnectOptions::from_str(url).map_err(|e| PostgresError::InvalidRequest {
        action: "parse the connection URL".into(),
        detail: e.to_string(),
    })
}

async fn connect(options: &PgConnectOptions, action: &str) -> Result<PgConnection, PostgresError> {
    match tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(options)).await {
        Ok(r) => r.map_err(|e| classify(options, action, e)),
        Err(_) => Err(PostgresError::Unreachable {
            target: target(options),
            detail: format!("{action}: no answer within {CONNECT_TIMEOUT:?}"),
        }),
    }
}

/// A schema or role name: a lowercase SQL identifier of at most 63 bytes that needs no
/// quoting, and not in PostgreSQL's reserved `pg_` space. The same rule as the broker's
/// `postgres.schema`.
pub fn validate_identifier(what: &'static str, name: &str) -> Result<(), PostgresError> {
    let invalid = |reason: &str| PostgresError::InvalidName {
        what,
        name: name.to_string(),
        reason: reason.to_string(),
    };
    let mut bytes = name.bytes();
    match bytes.next() {
        None => return Err(invalid("it is empty")),
        Some(b) if !(b.is_ascii_lowercase() || b == b'_') => {
            return Err(invalid("it must start with a-z or _"))
        }
        _ => {}
    }
    if name.len() > 63 {
        return Err(invalid("it is longer than 63 bytes"));
    }
    if !bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_') {
        return Err(invalid("only a-z, 0-9 and _ are allowed"));
    }
    if name.starts_with("pg_") {
        return Err(invalid("names starting with pg_ are reserved"));
    }
    if name == "public" {
        return Err(invalid("the public schema is shared by every role"));
    }
    Ok(())
}

/// A random password of 32 characters from `[A-Za-z0-9]` (190 bits), safe in a URL.
pub fn generate_password() -> Result<String, PostgresError> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut out = String::with_capacity(32);
    while out.len() < 32 {
        let mut buf = [0u8; 64];
        getrandom::getrandom(&mut buf).map_err(|e| PostgresError::InvalidRequest {
            action: "generate a password".into(),
            detail: format!("no randomness: {e}"),
        })?;
        // 248 = 4 * 62: rejecting higher bytes keeps every character equally likely.
        for b in buf {
            if b < 248 && out.len() < 32 {
                out.push(char::from(ALPHABET[usize::from(b % 62)]));
            }
        }
    }
    Ok(out)
}

/// PostgreSQL's SCRAM-SHA-256 verifier for `password` (RFC 5802 / 7677):
/// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`. Passwords are limited to
/// printable ASCII, where SASLprep (which the server applies at login) changes nothing.
pub fn scram_verifier(
    password: &str,
    salt: &[u8],
    iterations: u32,
) -> Result<String, PostgresError> {
    if password.is_empty() || !password.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(PostgresError::InvalidRequest {
            action: "set the role's password".into(),
            detail: "the password must be non-empty printable ASCII".into(),
        });
    }
    type H = Hmac<Sha256>;
    let mac = |key: &[u8], data: &[&[u8]]| -> Result<[u8; 32], PostgresError> {
        let mut m = H::new_from_slice(key).map_err(|e| PostgresError::InvalidRequest {
            action: "compute the SCRAM verifier".into(),
            detail: e.to_string(),
        })?;
        for d in data {
            m.update(d);
        }
        Ok(m.finalize().into_bytes().into())
    };
    // PBKDF2-HMAC-SHA-256, one block (32 bytes).
    let mut u = mac(password.as_bytes(), &[salt, &1u32.to_be_bytes()])?;
    let mut salted = u;
    for _ in 1..iterations {
        u = mac(password.as_bytes(), &[&u])?;
        for (s, x) in salted.iter_mut().zip(u.iter()) {
            *s ^= x;
        }
    }
    let client_key = mac(&salted, &[b"Client Key"])?;
    let stored_key = Sha256::digest(client_key);
    let server_key = mac(&salted, &[b"Server Key"])?;
    Ok(format!(
        "SCRAM-SHA-256${iterations}:{}${}:{}",
        B64.encode(salt),
        B64.encode(stored_key),
        B64.encode(server_key)
    ))
}

fn new_verifier(password: &str) -> Result<String, PostgresError> {
    let mut salt = [0u8; 16];
    getrandom::getrandom(&mut salt).map_err(|e| PostgresError::InvalidRequest {
        action: "generate a salt".into(),
        detail: format!("no randomness: {e}"),
    })?;
    scram_verifier(password, &salt, SCRAM_ITERATIONS)
}

/// `"name"`: only ever applied to names [`validate_identifier`] accepted.
fn ident(name: &str) -> String {
    format!("\"{name}\"")
}

/// A string literal for DDL, which takes no bind parameters. Only used for SCRAM verifiers
/// (base64 and `$:`), never for user text.
fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// The schema and login role of one broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerDatabase {
    pub schema: String,
    pub role: String,
}

impl BrokerDatabase {
    fn validate(&self) -> Result<(), PostgresError> {
        validate_identifier("schema", &self.schema)?;
        validate_identifier("role", &self.role)
    }

    /// Connection options for the broker role: the admin URL's server and database, this
    /// role and password, `search_path` set to the schema (as the broker connects).
    pub fn login_options(&self, admin: &PgConnectOptions, password: &str) -> PgConnectOptions {
        admin
            .clone()
            .username(&self.role)
            .password(password)
            .options([("search_path", self.schema.as_str())])
    }
}

/// What [`ensure_broker_database`] changed; all `false`/empty on a run that found everything
/// in place.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DatabaseOutcome {
    pub role_created: bool,
    /// The role's attributes were set back (it was a superuser, could create databases, …).
    pub role_attributes_fixed: bool,
    /// The password was set (new role, or the given one did not work).
    pub password_set: bool,
    pub schema_created: bool,
    /// An existing schema owned by another role was given to the broker role (adoption).
    pub schema_owner_fixed: bool,
    pub connect_granted: bool,
    /// Versions of the broker migrations applied now.
    pub migrations_applied: Vec<i64>,
}

impl DatabaseOutcome {
    pub fn changed(&self) -> bool {
        self.role_created
            || self.role_attributes_fixed
            || self.password_set
            || self.schema_created
            || self.schema_owner_fixed
            || self.connect_granted
            || !self.migrations_applied.is_empty()
    }
}

/// Creates or repairs the broker's role and schema and applies the broker migrations the
/// operator needs (see the module docs). `admin_url` names the database the broker will use,
/// with a role that may create roles and schemas there (a superuser, or `CREATEROLE` with
/// `CREATE` on the database). `password` is the broker role's password (from its Secret, or
/// [`generate_password`] the first time).
pub async fn ensure_broker_database(
    admin_url: &str,
    db: &BrokerDatabase,
    password: &str,
) -> Result<DatabaseOutcome, PostgresError> {
    db.validate()?;
    let admin_options = parse_url(admin_url)?;
    let mut admin = connect(&admin_options, "connect as the admin role").await?;
    let err = |action: &str| {
        let options = admin_options.clone();
        let action = action.to_string();
        move |e: sqlx::Error| classify(&options, &action, e)
    };
    let mut outcome = DatabaseOutcome::default();

    // The role: login, nothing else.
    let role = sqlx::query(
        "SELECT rolsuper OR rolcreatedb OR rolcreaterole OR rolreplication OR rolbypassrls \
                OR NOT rolcanlogin AS wrong_attributes \
         FROM pg_roles WHERE rolname = $1",
    )
    .bind(&db.role)
    .fetch_optional(&mut admin)
    .await
    .map_err(err("look up the broker role"))?;
    const ATTRIBUTES: &str =
        "LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS INHERIT";
    match role {
        None => {
            let verifier = new_verifier(password)?;
            sqlx::query(&format!(
                "CREATE ROLE {} {ATTRIBUTES} PASSWORD {}",
                ident(&db.role),
                literal(&verifier)
            ))
            .execute(&mut admin)
            .await
            .map_err(err("create the broker role"))?;
            outcome.role_created = true;
            outcome.password_set = true;
        }
        Some(row) => {
            if row.try_get::<bool, _>("wrong_attributes").unwrap_or(true) {
                sqlx::query(&format!("ALTER ROLE {} {ATTRIBUTES}", ident(&db.role)))
                    .execute(&mut admin)
                    .await
                    .map_err(err("reset the broker role's attributes"))?;
                outcome.role_attributes_fixed = true;
            }
        }
    }

    // CREATE SCHEMA … AUTHORIZATION and ALTER … OWNER need membership in the role unless the
    // admin is a superuser.
    let needs_membership: bool = sqlx::query_scalar(
        "SELECT NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) \
                AND NOT pg_has_role(current_user, $1, 'MEMBER')",
    )
    .bind(&db.role)
    .fetch_one(&mut admin)
    .await
    .map_err(err("check the admin role's membership"))?;
    if needs_membership {
        sqlx::query(&format!("GRANT {} TO CURRENT_USER", ident(&db.role)))
            .execute(&mut admin)
            .await
            .map_err(err("grant the broker role to the admin role"))?;
    }

    // The schema, owned by the role.
    let owner: Option<String> = sqlx::query_scalar(
        "SELECT pg_get_userbyid(nspowner)::text FROM pg_namespace WHERE nspname = $1",
    )
    .bind(&db.schema)
    .fetch_optional(&mut admin)
    .await
    .map_err(err("look up the broker schema"))?;
    match owner {
        None => {
            sqlx::query(&format!(
                "CREATE SCHEMA {} AUTHORIZATION {}",
                ident(&db.schema),
                ident(&db.role)
            ))
            .execute(&mut admin)
            .await
            .map_err(err("create the broker schema"))?;
            outcome.schema_created = true;
        }
        Some(owner) if owner != db.role => {
            sqlx::query(&format!(
                "ALTER SCHEMA {} OWNER TO {}",
                ident(&db.schema),
                ident(&db.role)
            ))
            .execute(&mut admin)
            .await
            .map_err(err("give the broker schema to the broker role"))?;
            outcome.schema_owner_fixed = true;
        }
        Some(_) => {}
    }

    // CONNECT on the database (hardened databases revoke it from PUBLIC).
    let can_connect: bool =
        sqlx::query_scalar("SELECT has_database_privilege($1, current_database(), 'CONNECT')")
            .bind(&db.role)
            .fetch_one(&mut admin)
            .await
            .map_err(err("check the broker role's CONNECT privilege"))?;
    if !can_connect {
        let database: String = sqlx::query_scalar("SELECT current_database()::text")
            .fetch_one(&mut admin)
            .await
            .map_err(err("read the database name"))?;
        // The database name comes from the server; quote it as PostgreSQL would.
        let quoted: String = sqlx::query_scalar("SELECT quote_ident($1)")
            .bind(&database)
            .fetch_one(&mut admin)
            .await
            .map_err(err("quote the database name"))?;
        sqlx::query(&format!(
            "GRANT CONNECT ON DATABASE {quoted} TO {}",
            ident(&db.role)
        ))
        .execute(&mut admin)
        .await
        .map_err(err("grant CONNECT on the database"))?;
        outcome.connect_granted = true;
    }

    // The password: log in with it; set it when the server says it is wrong.
    let login = db.login_options(&admin_options, password);
    let mut broker = match connect(&login, "connect as the broker role").await {
        Ok(conn) => conn,
        Err(PostgresError::NotAuthorized { .. }) if !outcome.password_set => {
            let verifier = new_verifier(password)?;
            sqlx::query(&format!(
                "ALTER ROLE {} PASSWORD {}",
                ident(&db.role),
                literal(&verifier)
            ))
            .execute(&mut admin)
            .await
            .map_err(err("set the broker role's password"))?;
            outcome.password_set = true;
            connect(&login, "connect as the broker role with its new password").await?
        }
        Err(e) => return Err(e),
    };
    let _ = admin.close().await;

    outcome.migrations_applied = migrate(&mut broker, &login, &db.schema).await?;
    let _ = broker.close().await;
    if outcome.changed() {
        tracing::info!(schema = %db.schema, role = %db.role, ?outcome, "provisioned the broker's database");
    }
    Ok(outcome)
}

/// Applies the broker migrations up to the one creating the credential table, as the broker
/// role (so it owns the tables), with sqlx's own bookkeeping table and lock: the broker's
/// `sqlx::migrate!` at start finds them applied.
async fn migrate(
    conn: &mut PgConnection,
    options: &PgConnectOptions,
    schema: &str,
) -> Result<Vec<i64>, PostgresError> {
    let mig = |action: &'static str| {
        let options = options.clone();
        move |e: sqlx::migrate::MigrateError| match e {
            sqlx::migrate::MigrateError::Execute(e) => classify(&options, action, e),
            e => PostgresError::InvalidRequest {
                action: action.to_string(),
                detail: e.to_string(),
            },
        }
    };
    let last = BROKER_MIGRATIONS
        .iter()
        .filter(|m| m.migration_type.is_up_migration())
        .find(|m| m.sql.contains(&format!("CREATE TABLE {CREDENTIALS_TABLE}")))
        .map(|m| m.version)
        .ok_or_else(|| PostgresError::CredentialTableMissing {
            schema: schema.to_string(),
        })?;
    conn.lock()
        .await
        .map_err(mig("lock the broker migrations"))?;
    let result = async {
        conn.ensure_migrations_table()
            .await
            .map_err(mig("create the migrations table"))?;
        let applied = conn
            .list_applied_migrations()
            .await
            .map_err(mig("list applied migrations"))?;
        let mut done = Vec::new();
        for m in BROKER_MIGRATIONS
            .iter()
            .filter(|m| m.migration_type.is_up_migration() && m.version <= last)
        {
            match applied.iter().find(|a| a.version == m.version) {
                Some(a) if a.checksum != m.checksum => {
                    return Err(PostgresError::InvalidRequest {
                        action: format!("apply broker migration {}", m.version),
                        detail: "it was applied with different contents (a broker from another \
                                 release?)"
                            .into(),
                    })
                }
                Some(_) => {}
                None => {
                    conn.apply(m)
                        .await
                        .map_err(mig("apply a broker migration"))?;
                    done.push(m.version);
                }
            }
        }
        Ok(done)
    }
    .await;
    conn.unlock()
        .await
        .map_err(mig("unlock the broker migrations"))?;
    result
}

/// What [`drop_broker_database`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DropOutcome {
    pub schema_dropped: bool,
    pub role_dropped: bool,
}

/// Drops the broker's schema with everything in it, then its role. For a broker whose data is
/// to go (deletion policy Delete); the broker's pods should be gone first.
pub async fn drop_broker_database(
    admin_url: &str,
    db: &BrokerDatabase,
) -> Result<DropOutcome, PostgresError> {
    db.validate()?;
    let options = parse_url(admin_url)?;
    let mut admin = connect(&options, "connect as the admin role").await?;
    let err = |action: &'static str| {
        let options = options.clone();
        move |e: sqlx::Error| classify(&options, action, e)
    };
    let mut outcome = DropOutcome::default();
    let schema_exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
            .bind(&db.schema)
            .fetch_one(&mut admin)
            .await
            .map_err(err("look up the broker schema"))?;
    if schema_exists {
        sqlx::query(&format!("DROP SCHEMA {} CASCADE", ident(&db.schema)))
            .execute(&mut admin)
            .await
            .map_err(err("drop the broker schema"))?;
        outcome.schema_dropped = true;
    }
    let role_exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)")
            .bind(&db.role)
            .fetch_one(&mut admin)
            .await
            .map_err(err("look up the broker role"))?;
    if role_exists {
        // Grants and anything else the role still owns in this database.
        sqlx::query(&format!("DROP OWNED BY {}", ident(&db.role)))
            .execute(&mut admin)
            .await
            .map_err(err("drop what the broker role owns"))?;
        sqlx::query(&format!("DROP ROLE {}", ident(&db.role)))
            .execute(&mut admin)
            .await
            .map_err(err("drop the broker role"))?;
        outcome.role_dropped = true;
    }
    let _ = admin.close().await;
    tracing::info!(schema = %db.schema, role = %db.role, ?outcome, "dropped the broker's database");
    Ok(outcome)
}

/// A small pool connected as the broker role (`login` from [`BrokerDatabase::login_options`]),
/// for the credential functions.
pub async fn broker_pool(login: &PgConnectOptions) -> Result<PgPool, PostgresError> {
    PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(CONNECT_TIMEOUT)
        .connect_with(login.clone())
        .await
        .map_err(|e| classify(login, "connect as the broker role", e))
}

/// The MQTT credentials of one APPLICATION client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplicationCredential {
    pub client_id: String,
    /// The user name it logs in with (MQTT 3.1.1 needs one to send a password).
    pub username: String,
    pub password: String,
    /// Topic patterns it may publish to / subscribe to; empty allows nothing.
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
}

/// What a credential write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Created,
    Updated,
    Unchanged,
}

fn credential_error(pool: &PgPool, schema: &str, action: &str, e: sqlx::Error) -> PostgresError {
    if let sqlx::Error::Database(db) = &e {
        if db.code().as_deref() == Some("42P01") {
            return PostgresError::CredentialTableMissing {
                schema: schema.to_string(),
            };
        }
    }
    classify(&pool.connect_options(), action, e)
}

/// Writes the user record and the APPLICATION registration of `credential`, in one
/// transaction. Idempotent: a stored hash that still verifies the password is kept (argon2
/// salts are random, so rehashing would change the row every time).
pub async fn upsert_application(
    pool: &PgPool,
    schema: &str,
    credential: &ApplicationCredential,
) -> Result<Change, PostgresError> {
    if credential.client_id.is_empty() || credential.username.is_empty() {
        return Err(PostgresError::InvalidRequest {
            action: "write an APPLICATION credential".into(),
            detail: "client id and user name must not be empty".into(),
        });
    }
    let e = |action: &'static str| move |e: sqlx::Error| credential_error(pool, schema, action, e);
    let mut tx = pool.begin().await.map_err(e("begin a transaction"))?;
    let existing = sqlx::query(
        "SELECT client_id, password_hash, client_type, publish, subscribe FROM mqtt_credentials \
         WHERE key_kind = 'username' AND key_name = $1 FOR UPDATE",
    )
    .bind(&credential.username)
    .fetch_optional(&mut *tx)
    .await
    .map_err(e("read the user record"))?;
    let stored_hash: Option<String> = existing.as_ref().and_then(|r| {
        r.try_get::<Option<String>, _>("password_hash")
            .ok()
            .flatten()
    });
    let hash = match stored_hash {
        Some(h) if verify(&credential.password, &h).await => h,
        _ => hash(&credential.password).await?,
    };
    let unchanged = existing.as_ref().is_some_and(|r| {
        r.try_get::<Option<String>, _>("client_id")
            .ok()
            .flatten()
            .as_deref()
            == Some(credential.client_id.as_str())
            && r.try_get::<Option<String>, _>("password_hash")
                .ok()
                .flatten()
                .as_deref()
                == Some(hash.as_str())
            && r.try_get::<Option<String>, _>("client_type")
                .ok()
                .flatten()
                .as_deref()
                == Some("application")
            && r.try_get::<Vec<String>, _>("publish").ok().as_ref() == Some(&credential.publish)
            && r.try_get::<Vec<String>, _>("subscribe").ok().as_ref() == Some(&credential.subscribe)
    });
    let mut change = match (&existing, unchanged) {
        (None, _) => Change::Created,
        (Some(_), false) => Change::Updated,
        (Some(_), true) => Change::Unchanged,
    };
    if change != Change::Unchanged {
        sqlx::query(
            "INSERT INTO mqtt_credentials \
                 (key_kind, key_name, client_id, password_hash, client_type, publish, subscribe) \
             VALUES ('username', $1, $2, $3, 'application', $4, $5) \
             ON CONFLICT (key_kind, key_name) DO UPDATE SET client_id = EXCLUDED.client_id, \
                 password_hash = EXCLUDED.password_hash, client_type = EXCLUDED.client_type, \
                 publish = EXCLUDED.publish, subscribe = EXCLUDED.subscribe",
        )
        .bind(&credential.username)
        .bind(&credential.client_id)
        .bind(&hash)
        .bind(&credential.publish)
        .bind(&credential.subscribe)
        .execute(&mut *tx)
        .await
        .map_err(e("write the user record"))?;
    }
    // The registration: a client-id record of type application. An existing client-id
    // credential keeps its password and ACL; only its type is set (as `app-clients add`).
    let registered = sqlx::query(
        "INSERT INTO mqtt_credentials (key_kind, key_name, client_id, client_type) \
         VALUES ('client_id', $1, $1, 'application') \
         ON CONFLICT (key_kind, key_name) DO UPDATE SET client_type = 'application' \
         WHERE mqtt_credentials.client_type IS DISTINCT FROM 'application'",
    )
    .bind(&credential.client_id)
    .execute(&mut *tx)
    .await
    .map_err(e("write the APPLICATION registration"))?;
    if registered.rows_affected() > 0 && change == Change::Unchanged {
        change = Change::Updated;
    }
    tx.commit().await.map_err(e("commit the credential"))?;
    Ok(change)
}

/// Removes the user record (when it is still bound to `client_id`) and the APPLICATION
/// registration of `client_id` (a bare registration is deleted; a client-id credential with a
/// password or ACL of its own only loses its type). `false` when there was nothing to remove.
pub async fn delete_application(
    pool: &PgPool,
    schema: &str,
    client_id: &str,
    username: &str,
) -> Result<bool, PostgresError> {
    let e = |action: &'static str| move |e: sqlx::Error| credential_error(pool, schema, action, e);
    let mut tx = pool.begin().await.map_err(e("begin a transaction"))?;
    let users = sqlx::query(
        "DELETE FROM mqtt_credentials \
         WHERE key_kind = 'username' AND key_name = $1 AND client_id = $2",
    )
    .bind(username)
    .bind(client_id)
    .execute(&mut *tx)
    .await
    .map_err(e("delete the user record"))?;
    let bare = sqlx::query(
        "DELETE FROM mqtt_credentials \
         WHERE key_kind = 'client_id' AND key_name = $1 AND client_type = 'application' \
           AND password_hash IS NULL AND publish = '{}' AND subscribe = '{}'",
    )
    .bind(client_id)
    .execute(&mut *tx)
    .await
    .map_err(e("delete the APPLICATION registration"))?;
    let typed = sqlx::query(
        "UPDATE mqtt_credentials SET client_type = NULL \
         WHERE key_kind = 'client_id' AND key_name = $1 AND client_type = 'application'",
    )
    .bind(client_id)
    .execute(&mut *tx)
    .await
    .map_err(e("clear the APPLICATION registration"))?;
    tx.commit().await.map_err(e("commit the deletion"))?;
    Ok(users.rows_affected() + bare.rows_affected() + typed.rows_affected() > 0)
}

/// argon2id with the broker's parameters, on the blocking pool (tens of milliseconds).
async fn hash(password: &str) -> Result<String, PostgresError> {
    let password = password.as_bytes().to_vec();
    tokio::task::spawn_blocking(move || ferrymq_common::password::hash(&password))
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()))
        .map_err(|detail| PostgresError::InvalidRequest {
            action: "hash the password".into(),
            detail,
        })
}

async fn verify(password: &str, hash: &str) -> bool {
    let password = password.as_bytes().to_vec();
    let hash = hash.to_string();
    tokio::task::spawn_blocking(move || ferrymq_common::password::verify_blocking(&password, &hash))
        .await
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers() {
        for ok in ["ferrymq", "broker_1", "_x", &"a".repeat(63)] {
            validate_identifier("schema", ok).unwrap();
        }
        for bad in [
            "",
            "1abc",
            "Abc",
            "a-b",
            "a\"b",
            "pg_catalog",
            "public",
            &"a".repeat(64),
        ] {
            assert!(validate_identifier("schema", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn generated_passwords_are_long_and_plain() {
        let a = generate_password().unwrap();
        let b = generate_password().unwrap();
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(a, b);
    }

    /// RFC 7677's example input (password "pencil", salt "W22ZaJ0SNY7soEsUEjb6gQ==", 4096
    /// iterations); the expected keys were computed independently with Python's hashlib
    /// (pbkdf2_hmac, hmac, sha256). The real-server test logs in with such a verifier.
    #[test]
    fn scram_verifier_matches_rfc_7677() {
        let salt = B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let v = scram_verifier("pencil", &salt, 4096).unwrap();
        assert_eq!(
            v,
            "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU="
        );
        assert!(scram_verifier("pénčil", &salt, 4096).is_err());
        assert!(scram_verifier("", &salt, 4096).is_err());
    }
}
