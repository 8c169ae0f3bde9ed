//! The PostgreSQL credential store (`mqtt_credentials` in the broker's schema) against a real
//! PostgreSQL, and brokers on `storage.backend = "kafka+postgres"` using it: rows written with
//! plain SQL (as the Kubernetes operator does) are honoured at the next CONNECT, a row that
//! fails validation refuses that CONNECT with "server unavailable", the admin CLI and the admin
//! API write the table. The store lists in exactly the embedded store's order.
//!
//! Skipped with a message where Kafka or PostgreSQL is missing, unless
//! `FERRYMQ_REQUIRE_SERVICES=1` (set by `.ci/run`).

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;
use ferrymq::auth::acl::AclRules;
use ferrymq::auth::embedded::EmbeddedCredentials;
use ferrymq::auth::postgres::PgCredentials;
use ferrymq::auth::store::{
    ClientType, CredentialKey, CredentialRecord, CredentialStore, StoreError, MAX_LIST,
};
use ferrymq::config::PostgresConfig;
use ferrymq_e2e::harness::services::{require_services, Postgres};
use ferrymq_e2e::harness::{BrokerOptions, BrokerProcess, ConnectOptions, Connection};
use serde_json::{json, Value};

const TOKEN: &str = "pg-admin-token";

/// Auth on (store provider only, no anonymous clients) and the admin API.
const LOCKED_DOWN: &str = "[auth]\nallow_anonymous = false\nproviders = [\"store\"]\n\n[http]\nadmin_token = \"pg-admin-token\"\n";

fn pg_config(pg: &Postgres, schema: &str) -> PostgresConfig {
    PostgresConfig {
        url: pg.url(),
        schema: schema.into(),
        max_connections: 2,
        connect_timeout_secs: 5,
        standby: false,
    }
}

/// A broker on kafka+postgres with `extra` config; anonymous access stays off (the harness
/// turns it on by default through the environment).
fn start_broker(backend: &Backend, name: &str, extra: &str) -> BrokerProcess {
    let config = backend.config(name, extra).expect("kafka+postgres config");
    BrokerProcess::start(
        BrokerOptions::new(name)
            .binary(broker_bin())
            .config(config)
            .env("FERRYMQ_AUTH__ALLOW_ANONYMOUS", "false"),
    )
    .expect("starting the broker")
}

/// The schema `Backend::config` gives a broker named `name`.
fn schema_of(name: &str) -> String {
    let ident: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("t_{ident}")
}

/// CONNECT and the refusal, if any (`None`: accepted).
fn connect(addr: SocketAddr, opts: ConnectOptions) -> Option<String> {
    runtime().block_on(async {
        let (conn, ack) = Connection::connect_raw(addr, &opts)
            .await
            .expect("CONNECT answered");
        drop(conn);
        ack.refused
    })
}

fn v5(id: &str, user: &str, pw: &str) -> ConnectOptions {
    ConnectOptions::v5(id).login(user, pw)
}

fn v3(id: &str, user: &str, pw: &str) -> ConnectOptions {
    ConnectOptions::v311(id).login(user, pw)
}

// --- a minimal HTTP/1.1 client (one request per connection) -----------------------------------

struct Reply {
    status: u16,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

fn http(addr: SocketAddr, method: &str, path: &str, token: &str, body: Option<Value>) -> Reply {
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to the HTTP endpoint");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    let body = body.map(|v| v.to_string()).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).expect("send request");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("read response");
    let text = String::from_utf8(raw).expect("UTF-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("HTTP head");
    assert!(
        !head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "this client reads sized bodies only: {head}"
    );
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line: {head}"));
    Reply {
        status,
        body: body.to_string(),
    }
}

/// Waits until the broker's HTTP endpoint answers (it starts right after the listeners).
fn wait_for_http(addr: SocketAddr) {
    wait_until("the HTTP endpoint", Duration::from_secs(20), || {
        std::net::TcpStream::connect(addr).is_ok()
    });
}

// --- the store itself ----------------------------------------------------------------------------

fn record(key: &CredentialKey) -> CredentialRecord {
    let (username, client_id) = match key {
        CredentialKey::Username(u) => (Some(u.clone()), None),
        CredentialKey::ClientId(c) => (None, Some(c.clone())),
    };
    CredentialRecord {
        username,
        client_id,
        password_hash: None,
        client_type: Some(ClientType::Device),
        acl: AclRules {
            publish: vec!["a/${client_id}/#".into()],
            subscribe: vec![],
        },
    }
}

/// A name PostgreSQL cannot compress into its index (a pseudo-random letter soup).
fn incompressible(len: usize) -> String {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'!' + (x % 90) as u8)
        })
        .collect()
}

async fn all_keys(store: &dyn CredentialStore, page: usize) -> Vec<String> {
    let mut keys = Vec::new();
    let mut after: Option<CredentialKey> = None;
    loop {
        let records = store.list(after.as_ref(), page).await.expect("list");
        for r in &records {
            keys.push(r.key().expect("keyed").encode());
        }
        if records.len() < page {
            return keys;
        }
        after = records.last().and_then(|r| r.key());
    }
}

/// Both stores given the same records answer the same: same listing order (byte order of the
/// `c:`/`u:` keys, whatever the database's collation), same paging, same create/put/delete
/// results. Rows written by SQL are read back (NULL `client_id` on a client-id row included);
/// rows that break the documented constraints are refused by the table; a row the table takes
/// but the broker's rules refuse is reported as corrupt, naming its key.
#[test]
fn postgres_store_behaves_like_the_embedded_store() {
    let _serial = serial();
    if !require_services() {
        return;
    }
    let pg = Postgres::start().expect("PostgreSQL");
    // A database whose default collation is linguistic (ICU en-US: "a" < "B"), unlike byte
    // order ("B" < "a"): the store must still list in byte order.
    pg.psql(
        "CREATE DATABASE icu TEMPLATE template0 ENCODING 'UTF8' LOCALE_PROVIDER icu \
         ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'",
    )
    .expect("create an ICU database");
    let mut config = pg_config(&pg, "creds");
    config.url = pg.url_for("icu");
    assert_eq!(
        pg.psql_in("icu", "SELECT 'a' < 'B'")
            .expect("compare")
            .trim(),
        "t",
        "the test database does not sort linguistically"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = runtime();
    rt.block_on(async {
        let pgs = PgCredentials::connect(&config)
            .await
            .expect("connect the PostgreSQL store");
        let emb = EmbeddedCredentials::open(dir.path()).expect("open the embedded store");
        let names = [
            "a", "B", "b", "é", "a b", "aa", "a-", "Z", "~", "日本", "a\u{7f}", "x", "ab/c", "A",
            "z", "ß", "a\u{1}",
        ];
        let mut keys = Vec::new();
        for n in names {
            keys.push(CredentialKey::Username(n.to_string()));
            keys.push(CredentialKey::ClientId(n.to_string()));
        }
        for key in &keys {
            for store in [&pgs as &dyn CredentialStore, &emb] {
                assert!(store.create(record(key)).await.expect("create"), "{key}");
                assert!(!store.create(record(key)).await.expect("create twice"));
            }
        }
        let expected = {
            let mut k: Vec<String> = keys.iter().map(|k| k.encode()).collect();
            k.sort();
            k
        };
        for page in [1, 3, 7, MAX_LIST] {
            assert_eq!(
                all_keys(&pgs, page).await,
                expected,
                "postgres, pages of {page}"
            );
            assert_eq!(
                all_keys(&emb, page).await,
                expected,
                "embedded, pages of {page}"
            );
        }
        for key in &keys {
            let (a, b) = (pgs.get(key).await.unwrap(), emb.get(key).await.unwrap());
            assert_eq!(a, b, "{key}");
            assert_eq!(a, Some(record(key)));
        }
        // A cursor that is not a stored key (with U+0000, which PostgreSQL text cannot hold).
        let odd = CredentialKey::Username("a\0z".into());
        assert_eq!(
            pgs.list(Some(&odd), 100).await.unwrap(),
            emb.list(Some(&odd), 100).await.unwrap()
        );
        assert_eq!(pgs.get(&odd).await.unwrap(), None);
        assert!(!pgs.delete(&odd).await.unwrap());

        // Replace and delete.
        let bob = CredentialKey::Username("b".into());
        let mut changed = record(&bob);
        changed.client_id = Some("bound".into());
        changed.password_hash = Some(ferrymq::auth::password::hash(b"pw").unwrap());
        changed.client_type = None;
        pgs.put(changed.clone()).await.unwrap();
        assert_eq!(pgs.get(&bob).await.unwrap(), Some(changed));
        assert!(pgs.delete(&bob).await.unwrap());
        assert!(!pgs.delete(&bob).await.unwrap());
        assert_eq!(pgs.get(&bob).await.unwrap(), None);

        // Invalid records are refused before PostgreSQL sees them; a key too big for the
        // index is refused by PostgreSQL, as invalid too (not as an outage).
        let mut bad = record(&CredentialKey::Username("eve".into()));
        bad.acl.publish = vec!["a/#/b".into()];
        assert!(matches!(pgs.put(bad).await, Err(StoreError::Invalid(_))));
        let huge = record(&CredentialKey::Username(incompressible(60_000)));
        match pgs.put(huge).await {
            Err(StoreError::Invalid(m)) => assert!(m.contains("PostgreSQL"), "{m}"),
            other => panic!("a 60 kB key: {other:?}"),
        }
    });

    // Rows written with SQL.
    let t = "creds.mqtt_credentials";
    pg.psql_in("icu", &format!(
        "INSERT INTO {t} (key_kind, key_name, client_type) VALUES ('client_id', 'sql-app', 'application')"
    ))
    .expect("a registration row");
    pg.psql_in("icu", &format!(
        "INSERT INTO {t} (key_kind, key_name, publish) VALUES ('username', 'sql-bad', '{{\"a/#/b\"}}')"
    ))
    .expect("the table takes what only the broker's rules refuse");
    for (row, why) in [
        ("('user', 'k', NULL, NULL, NULL)", "key_kind"),
        ("('username', '', NULL, NULL, NULL)", "key_name"),
        ("('client_id', 'c1', 'c2', NULL, NULL)", "client_id"),
        ("('username', 'k', NULL, 'md5abc', NULL)", "password_hash"),
        ("('username', 'k', NULL, NULL, 'Device')", "client_type"),
    ] {
        let err = pg
            .psql_in("icu", &format!(
                "INSERT INTO {t} (key_kind, key_name, client_id, password_hash, client_type) VALUES {row}"
            ))
            .expect_err(row);
        assert!(err.to_string().contains(why), "{row}: {err}");
    }
    for (arr, why) in [
        ("ARRAY[NULL]::text[]", "publish"),
        ("ARRAY[['a'],['b']]", "publish"),
        (
            "(SELECT array_agg(g::text) FROM generate_series(1, 257) g)",
            "publish",
        ),
    ] {
        let err = pg
            .psql_in(
                "icu",
                &format!(
                    "INSERT INTO {t} (key_kind, key_name, publish) VALUES ('username', 'k', {arr})"
                ),
            )
            .expect_err(arr);
        assert!(err.to_string().contains(why), "{arr}: {err}");
    }
    let err = pg
        .psql_in(
            "icu",
            &format!(
                "INSERT INTO {t} (key_kind, key_name, publish) VALUES ('username', 'k', NULL)"
            ),
        )
        .expect_err("NULL publish");
    assert!(err.to_string().contains("null value"), "{err}");
    rt.block_on(async {
        let pgs = PgCredentials::connect(&config).await.expect("reconnect");
        let app = pgs
            .get(&CredentialKey::ClientId("sql-app".into()))
            .await
            .unwrap()
            .expect("the SQL row");
        assert_eq!(app.client_id.as_deref(), Some("sql-app"));
        assert_eq!(app.client_type, Some(ClientType::Application));
        assert_eq!(app.acl, AclRules::default());
        match pgs.get(&CredentialKey::Username("sql-bad".into())).await {
            Err(StoreError::Corrupt { key, message }) => {
                assert_eq!(key, "u:sql-bad");
                assert!(message.contains("a/#/b"), "{message}");
            }
            other => panic!("a row breaking the ACL rules: {other:?}"),
        }
    });
}

// --- brokers on kafka+postgres ------------------------------------------------------------------

/// A broker on kafka+postgres authenticates from rows inserted with plain SQL into its schema,
/// sees changes at the next CONNECT, takes APPLICATION registrations from the table, and
/// refuses a CONNECT whose row breaks the rules with 0x88 (v3 0x03), logging the key, while it
/// keeps serving everyone else.
#[test]
fn broker_authenticates_from_rows_written_with_sql() {
    let _serial = serial();
    let Some(backend) = Backend::kafka_postgres() else {
        return;
    };
    let name = "pg-sql-rows";
    let broker = start_broker(&backend, name, LOCKED_DOWN);
    let addr = broker.addr();
    let pg = &backend.services().expect("services").postgres;
    let t = format!("{}.mqtt_credentials", schema_of(name));
    let hash = ferrymq::auth::password::hash(b"from-sql").unwrap();
    let before = connect(addr, v5("meter-1", "meter", "from-sql"));
    assert_eq!(before.as_deref(), Some("BadUserNamePassword"));
    pg.psql(&format!(
        "INSERT INTO {t} (key_kind, key_name, client_id, password_hash, client_type, publish, subscribe) \
         VALUES ('username', 'meter', 'meter-1', '{hash}', NULL, '{{\"meters/${{client_id}}/#\"}}', '{{}}')"
    ))
    .expect("insert a credential");
    assert_eq!(connect(addr, v5("meter-1", "meter", "from-sql")), None);
    assert_eq!(connect(addr, v3("meter-1", "meter", "from-sql")), None);
    assert_eq!(
        connect(addr, v5("meter-1", "meter", "wrong")).as_deref(),
        Some("BadUserNamePassword")
    );
    assert_eq!(
        connect(addr, v5("meter-2", "meter", "from-sql")).as_deref(),
        Some("NotAuthorized"),
        "the row binds the user to client id meter-1"
    );

    // An APPLICATION registration by SQL decides the session kind of the next CONNECT.
    pg.psql(&format!(
        "INSERT INTO {t} (key_kind, key_name, client_type) VALUES ('client_id', 'meter-1', 'application')"
    ))
    .expect("insert a registration");
    let http_addr = broker.http_addr();
    wait_for_http(http_addr);
    runtime().block_on(async {
        let opts = v5("meter-1", "meter", "from-sql");
        let (conn, ack) = Connection::connect(addr, &opts).await.expect("connect");
        assert_eq!(ack.refused, None);
        let session = http(http_addr, "GET", "/api/v1/sessions/meter-1", TOKEN, None);
        assert_eq!(session.status, 200, "{}", session.body);
        assert_eq!(
            session.json()["client_type"],
            "application",
            "{}",
            session.body
        );
        drop(conn);
    });

    // A changed hash applies at the next CONNECT.
    let new_hash = ferrymq::auth::password::hash(b"rotated").unwrap();
    pg.psql(&format!(
        "UPDATE {t} SET password_hash = '{new_hash}' WHERE key_kind = 'username' AND key_name = 'meter'"
    ))
    .expect("rotate");
    assert_eq!(
        connect(addr, v5("meter-1", "meter", "from-sql")).as_deref(),
        Some("BadUserNamePassword")
    );
    assert_eq!(connect(addr, v5("meter-1", "meter", "rotated")), None);

    // A row the broker's rules refuse: 0x88 / 0x03, an error log naming the key, no panic.
    pg.psql(&format!(
        "INSERT INTO {t} (key_kind, key_name, password_hash, publish) \
         VALUES ('username', 'broken-row', '{hash}', '{{\"a/#/b\"}}')"
    ))
    .expect("insert a row breaking the ACL rules");
    assert_eq!(
        connect(addr, v5("b1", "broken-row", "from-sql")).as_deref(),
        Some("ServerUnavailable")
    );
    assert_eq!(
        connect(addr, v3("b1", "broken-row", "from-sql")).as_deref(),
        Some("ServiceUnavailable")
    );
    let log = broker.log_tail(400);
    assert!(
        log.lines()
            .any(|l| l.contains("ERROR") && l.contains("u:broken-row") && l.contains("a/#/b")),
        "no error log naming the bad row:\n{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
    assert_eq!(
        connect(addr, v5("meter-1", "meter", "rotated")),
        None,
        "others are still served"
    );
}

/// Runs the broker binary as the admin CLI with `config` (no FERRYMQ_* variables leak in).
fn cli(config: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(broker_bin());
    cmd.arg("--config").arg(config).args(args);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("FERRYMQ_") {
            cmd.env_remove(&key);
        }
    }
    cmd.env("FERRYMQ_LOG", "warn")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("run ferrymq")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ferrymq credentials …` / `ferrymq app-clients …` with a kafka+postgres config write the
/// PostgreSQL table, before any broker ran on the schema (the CLI creates it) and while one
/// runs (no lock, unlike the embedded file); the broker uses what they wrote.
#[test]
fn admin_cli_writes_the_postgres_table() {
    let _serial = serial();
    let Some(backend) = Backend::kafka_postgres() else {
        return;
    };
    let name = "pg-cli";
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("ferrymq.toml");
    std::fs::write(&config, backend.config(name, LOCKED_DOWN).unwrap()).expect("config");
    let pg = &backend.services().expect("services").postgres;
    let t = format!("{}.mqtt_credentials", schema_of(name));

    ok(&cli(
        &config,
        &[
            "credentials",
            "add",
            "--username",
            "cli-user",
            "--password-env",
            "CLI_PW",
            "--type",
            "device",
            "--pub",
            "t/${username}/#",
            "--sub",
            "t/#",
        ],
        &[("CLI_PW", "cli secret")],
    ));
    let row = pg
        .psql(&format!(
            "SELECT key_kind, key_name, client_type, publish, subscribe, password_hash LIKE '$argon2id$%' FROM {t}"
        ))
        .expect("select");
    assert_eq!(
        row.trim(),
        "username|cli-user|device|{\"t/${username}/#\"}|{t/#}|t"
    );
    ok(&cli(&config, &["app-clients", "add", "cli-app"], &[]));
    let bad = cli(
        &config,
        &["credentials", "add", "--username", "eve", "--pub", "a/#/b"],
        &[],
    );
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("a/#/b"));

    let broker = start_broker(&backend, name, LOCKED_DOWN);
    let addr = broker.addr();
    assert_eq!(connect(addr, v5("c1", "cli-user", "cli secret")), None);
    assert_eq!(
        connect(addr, v5("c1", "cli-user", "nope")).as_deref(),
        Some("BadUserNamePassword")
    );

    // While the broker runs.
    ok(&cli(
        &config,
        &[
            "credentials",
            "add",
            "--username",
            "late",
            "--password-env",
            "P",
        ],
        &[("P", "late pw")],
    ));
    assert_eq!(connect(addr, v5("c2", "late", "late pw")), None);
    let listed = ok(&cli(&config, &["credentials", "list"], &[]));
    let lines: Vec<Value> = listed
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON lines"))
        .collect();
    assert_eq!(
        lines,
        vec![
            json!({"client_id": "cli-app", "client_type": "application", "has_password": false,
                   "acl": {"publish": [], "subscribe": []}}),
            json!({"username": "cli-user", "client_type": "device", "has_password": true,
                   "acl": {"publish": ["t/${username}/#"], "subscribe": ["t/#"]}}),
            json!({"username": "late", "has_password": true,
                   "acl": {"publish": [], "subscribe": []}}),
        ],
        "{listed}"
    );
    assert_eq!(
        ok(&cli(&config, &["app-clients", "list"], &[])).trim(),
        "cli-app"
    );
    ok(&cli(&config, &["app-clients", "delete", "cli-app"], &[]));
    assert!(!cli(&config, &["app-clients", "delete", "cli-app"], &[])
        .status
        .success());
    ok(&cli(
        &config,
        &["credentials", "delete", "--username", "late"],
        &[],
    ));
    assert!(!cli(
        &config,
        &["credentials", "delete", "--username", "late"],
        &[]
    )
    .status
    .success());
    assert_eq!(
        connect(addr, v5("c2", "late", "late pw")).as_deref(),
        Some("BadUserNamePassword")
    );
    assert_eq!(
        pg.psql(&format!("SELECT key_name FROM {t} ORDER BY 1"))
            .expect("select")
            .trim(),
        "cli-user"
    );
}

/// The admin API on a kafka+postgres broker: credentials and APPLICATION registrations created,
/// read, replaced and deleted over HTTP land in the table (hashed with argon2id, never shown),
/// a client connects with them, and a wrong token gets 401.
#[test]
fn admin_api_writes_the_postgres_table() {
    let _serial = serial();
    let Some(backend) = Backend::kafka_postgres() else {
        return;
    };
    let name = "pg-api";
    let broker = start_broker(&backend, name, LOCKED_DOWN);
    let addr = broker.addr();
    let api = broker.http_addr();
    wait_for_http(api);
    let pg = &backend.services().expect("services").postgres;
    let t = format!("{}.mqtt_credentials", schema_of(name));

    let r = http(
        api,
        "POST",
        "/api/v1/credentials",
        "wrong-token",
        Some(json!({"username": "intruder", "password": "x"})),
    );
    assert_eq!(r.status, 401, "{}", r.body);
    assert_eq!(
        http(api, "GET", "/api/v1/credentials", "", None).status,
        401
    );

    let r = http(
        api,
        "POST",
        "/api/v1/credentials",
        TOKEN,
        Some(
            json!({"username": "api-user", "password": "api pw", "client_type": "application",
                    "acl": {"publish": ["x/#"], "subscribe": ["y/#"]}}),
        ),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    assert!(!r.body.contains("argon2"), "{}", r.body);
    let r = http(
        api,
        "POST",
        "/api/v1/credentials",
        TOKEN,
        Some(json!({"username": "api-user", "password": "again"})),
    );
    assert_eq!(r.status, 409, "{}", r.body);
    let row = pg
        .psql(&format!(
            "SELECT key_kind, key_name, client_type, publish, subscribe, password_hash LIKE '$argon2id$v=19$%' FROM {t}"
        ))
        .expect("select");
    assert_eq!(row.trim(), "username|api-user|application|{x/#}|{y/#}|t");
    assert_eq!(connect(addr, v5("a1", "api-user", "api pw")), None);
    assert_eq!(
        connect(addr, v5("a1", "api-user", "wrong")).as_deref(),
        Some("BadUserNamePassword")
    );

    let r = http(
        api,
        "GET",
        "/api/v1/credentials/username/api-user",
        TOKEN,
        None,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.json(),
        json!({"username": "api-user", "client_type": "application", "has_password": true,
               "acl": {"publish": ["x/#"], "subscribe": ["y/#"]}})
    );
    let r = http(
        api,
        "PUT",
        "/api/v1/credentials/username/api-user",
        TOKEN,
        Some(json!({"password": "new pw", "client_id": "a1"})),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        connect(addr, v5("a1", "api-user", "api pw")).as_deref(),
        Some("BadUserNamePassword")
    );
    assert_eq!(connect(addr, v5("a1", "api-user", "new pw")), None);
    assert_eq!(
        connect(addr, v5("a2", "api-user", "new pw")).as_deref(),
        Some("NotAuthorized")
    );

    let r = http(
        api,
        "PUT",
        "/api/v1/application-clients/api-app",
        TOKEN,
        None,
    );
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(
        pg.psql(&format!(
            "SELECT client_type FROM {t} WHERE key_kind = 'client_id' AND key_name = 'api-app'"
        ))
        .expect("select")
        .trim(),
        "application"
    );
    let r = http(api, "GET", "/api/v1/application-clients", TOKEN, None);
    assert_eq!(
        r.json(),
        json!({"application_clients": ["api-app"], "next": null})
    );
    let r = http(api, "GET", "/api/v1/credentials?limit=1", TOKEN, None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["next"], "c:api-app");
    let r = http(
        api,
        "GET",
        "/api/v1/credentials?limit=1&after=c:api-app",
        TOKEN,
        None,
    );
    assert_eq!(r.json()["credentials"][0]["username"], "api-user");
    assert_eq!(r.json()["next"], Value::Null);

    let r = http(
        api,
        "DELETE",
        "/api/v1/application-clients/api-app",
        TOKEN,
        None,
    );
    assert_eq!(r.status, 204, "{}", r.body);
    let r = http(
        api,
        "DELETE",
        "/api/v1/credentials/username/api-user",
        TOKEN,
        None,
    );
    assert_eq!(r.status, 204, "{}", r.body);
    let r = http(
        api,
        "DELETE",
        "/api/v1/credentials/username/api-user",
        TOKEN,
        None,
    );
    assert_eq!(r.status, 404, "{}", r.body);
    assert_eq!(
        pg.psql(&format!("SELECT count(*) FROM {t}"))
            .expect("select")
            .trim(),
        "0"
    );
    assert_eq!(
        connect(addr, v5("a1", "api-user", "new pw")).as_deref(),
        Some("BadUserNamePassword")
    );
}
