//! The PostgreSQL side effects against a real PostgreSQL (a private cluster started per test by
//! the e2e harness): the broker's schema, role and grants, idempotency, password changes, drop,
//! and the credential rows read back through the broker's own credential store code.
//!
//! Skipped with a message where the PostgreSQL server binaries are missing, unless
//! `FERRYMQ_REQUIRE_SERVICES=1` (CI), where that fails.

use std::str::FromStr;
use std::time::Duration;

use ferrymq::auth::store::{ClientType, CredentialKey, CredentialStore};
use ferrymq_e2e::harness::services::{require_services, Postgres};
use ferrymq_operator::provision::postgres::{
    broker_pool, delete_application, drop_broker_database, ensure_broker_database,
    generate_password, upsert_application, ApplicationCredential, BrokerDatabase, Change,
    PostgresError,
};
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn postgres() -> Option<Postgres> {
    if !require_services() {
        return None;
    }
    Some(Postgres::start().expect("starting PostgreSQL"))
}

fn db(name: &str) -> BrokerDatabase {
    BrokerDatabase {
        schema: name.to_string(),
        role: format!("{name}_broker"),
    }
}

async fn superuser(pg: &Postgres) -> PgConnection {
    PgConnection::connect(&pg.url())
        .await
        .expect("connect as postgres")
}

/// Connects as `role` with `password` (search_path = `schema`).
async fn login(
    pg: &Postgres,
    db: &BrokerDatabase,
    password: &str,
) -> Result<PgConnection, sqlx::Error> {
    let admin = PgConnectOptions::from_str(&pg.url()).expect("url");
    PgConnection::connect_with(&db.login_options(&admin, password)).await
}

fn sqlstate(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(d) => d.code().map(|c| c.into_owned()).unwrap_or_default(),
        _ => String::new(),
    }
}

/// The private cluster trusts every local login; make non-superusers authenticate with
/// SCRAM, so passwords matter. PostgreSQL 15 has no SQL for pg_hba.conf, but a superuser's
/// COPY … TO writes a file as the server, and pg_reload_conf() rereads it.
async fn require_scram(pg: &Postgres) {
    let mut c = superuser(pg).await;
    let hba: String = sqlx::query_scalar("SHOW hba_file")
        .fetch_one(&mut c)
        .await
        .expect("hba_file");
    sqlx::query(&format!(
        "COPY (VALUES ('local all all trust'), ('host all postgres 127.0.0.1/32 trust'), \
         ('host all all 127.0.0.1/32 scram-sha-256')) TO '{hba}'"
    ))
    .execute(&mut c)
    .await
    .expect("write pg_hba.conf");
    let ok: bool = sqlx::query_scalar("SELECT pg_reload_conf()")
        .fetch_one(&mut c)
        .await
        .expect("reload");
    assert!(ok);
    // The postmaster rereads the file asynchronously after the signal.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rules: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_hba_file_rules WHERE 'scram-sha-256' = auth_method",
    )
    .fetch_one(&mut c)
    .await
    .expect("hba rules");
    assert_eq!(rules, 1);
}

/// First run: role, schema owned by it, the broker's migrations up to the credential table.
/// Second run: nothing to do. The role holds nothing beyond its own schema.
#[test]
fn schema_and_role_are_created_idempotently_with_least_privilege() {
    let Some(pg) = postgres() else { return };
    runtime().block_on(async {
        let one = db("fleet_a");
        let password = generate_password().unwrap();
        let first = ensure_broker_database(&pg.url(), &one, &password)
            .await
            .expect("provision");
        println!("first run: {first:?}");
        assert!(first.role_created && first.schema_created && first.password_set);
        assert_eq!(first.migrations_applied, [1, 2]);

        let second = ensure_broker_database(&pg.url(), &one, &password)
            .await
            .expect("second run");
        assert!(!second.changed(), "second run changed: {second:?}");

        let mut su = superuser(&pg).await;
        let (owner, attrs): (String, bool) = sqlx::query_as(
            "SELECT pg_get_userbyid(n.nspowner)::text, \
                    r.rolsuper OR r.rolcreatedb OR r.rolcreaterole OR r.rolreplication \
                    OR r.rolbypassrls OR NOT r.rolcanlogin \
             FROM pg_namespace n, pg_roles r WHERE n.nspname = $1 AND r.rolname = $2",
        )
        .bind(&one.schema)
        .bind(&one.role)
        .fetch_one(&mut su)
        .await
        .unwrap();
        assert_eq!(owner, one.role);
        assert!(!attrs, "the broker role has attributes beyond LOGIN");
        let table_owner: String = sqlx::query_scalar(
            "SELECT tableowner::text FROM pg_tables WHERE schemaname = $1 AND tablename = 'mqtt_credentials'",
        )
        .bind(&one.schema)
        .fetch_one(&mut su)
        .await
        .expect("mqtt_credentials exists");
        assert_eq!(table_owner, one.role, "the broker must own its tables");

        // A second broker next to it.
        let two = db("fleet_b");
        ensure_broker_database(&pg.url(), &two, &generate_password().unwrap())
            .await
            .expect("second broker");

        let mut as_one = login(&pg, &one, &password).await.expect("login");
        sqlx::query("CREATE TABLE own_scratch (x int)")
            .execute(&mut as_one)
            .await
            .expect("the role can create in its own schema");
        let e = sqlx::query("CREATE TABLE public.intruder (x int)")
            .execute(&mut as_one)
            .await
            .expect_err("no CREATE in public");
        assert_eq!(sqlstate(&e), "42501", "{e}");
        let e = sqlx::query("SELECT count(*) FROM fleet_b.sessions")
            .execute(&mut as_one)
            .await
            .expect_err("no access to another broker's schema");
        assert_eq!(sqlstate(&e), "42501", "{e}");
        let e = sqlx::query("CREATE SCHEMA elsewhere")
            .execute(&mut as_one)
            .await
            .expect_err("no CREATE on the database");
        assert_eq!(sqlstate(&e), "42501", "{e}");
    });
}

/// With password authentication on: the SCRAM verifier the operator computes is one the
/// server accepts, an unchanged password is left alone, a new one is applied (the old one
/// stops working), and attributes granted out of band are taken back.
#[test]
fn changed_password_and_attributes_are_applied() {
    let Some(pg) = postgres() else { return };
    runtime().block_on(async {
        require_scram(&pg).await;
        let one = db("fleet_pw");
        let old = generate_password().unwrap();
        ensure_broker_database(&pg.url(), &one, &old)
            .await
            .expect("provision");
        login(&pg, &one, &old)
            .await
            .expect("login with the first password");
        let e = login(&pg, &one, "wrong").await.expect_err("wrong password");
        assert_eq!(sqlstate(&e), "28P01", "{e}");

        let again = ensure_broker_database(&pg.url(), &one, &old).await.unwrap();
        assert!(!again.changed(), "{again:?}");

        let new = generate_password().unwrap();
        let changed = ensure_broker_database(&pg.url(), &one, &new).await.unwrap();
        assert!(changed.password_set, "{changed:?}");
        assert!(!changed.role_created && !changed.schema_created);
        login(&pg, &one, &new)
            .await
            .expect("login with the new password");
        let e = login(&pg, &one, &old)
            .await
            .expect_err("old password still works");
        assert_eq!(sqlstate(&e), "28P01", "{e}");

        let mut su = superuser(&pg).await;
        sqlx::query(&format!("ALTER ROLE {} CREATEDB", one.role))
            .execute(&mut su)
            .await
            .unwrap();
        let fixed = ensure_broker_database(&pg.url(), &one, &new).await.unwrap();
        assert!(
            fixed.role_attributes_fixed && !fixed.password_set,
            "{fixed:?}"
        );
        let createdb: bool =
            sqlx::query_scalar("SELECT rolcreatedb FROM pg_roles WHERE rolname = $1")
                .bind(&one.role)
                .fetch_one(&mut su)
                .await
                .unwrap();
        assert!(!createdb);
    });
}

/// An admin that is not a superuser (CREATEROLE, CREATE on the database), as managed
/// PostgreSQL services hand out, provisions the same; a schema someone created before is
/// adopted (given to the broker role).
#[test]
fn non_superuser_admin_and_existing_schema() {
    let Some(pg) = postgres() else { return };
    runtime().block_on(async {
        let mut su = superuser(&pg).await;
        for sql in [
            "CREATE ROLE ops LOGIN CREATEROLE PASSWORD 'ops'",
            "GRANT CREATE ON DATABASE postgres TO ops",
            "CREATE SCHEMA fleet_c AUTHORIZATION ops",
        ] {
            sqlx::query(sql).execute(&mut su).await.expect(sql);
        }
        let admin_url = pg.url().replace("postgres@", "ops:ops@");
        let one = db("fleet_c");
        let outcome = ensure_broker_database(&admin_url, &one, &generate_password().unwrap())
            .await
            .expect("provision as ops");
        assert!(outcome.role_created, "{outcome:?}");
        assert!(
            !outcome.schema_created && outcome.schema_owner_fixed,
            "{outcome:?}"
        );
        assert_eq!(outcome.migrations_applied, [1, 2]);
        let owner: String = sqlx::query_scalar(
            "SELECT pg_get_userbyid(nspowner)::text FROM pg_namespace WHERE nspname = 'fleet_c'",
        )
        .fetch_one(&mut su)
        .await
        .unwrap();
        assert_eq!(owner, one.role);
    });
}

/// Drop removes the schema with its tables and the role; a second drop finds nothing.
#[test]
fn drop_removes_schema_and_role() {
    let Some(pg) = postgres() else { return };
    runtime().block_on(async {
        let one = db("fleet_gone");
        ensure_broker_database(&pg.url(), &one, &generate_password().unwrap())
            .await
            .expect("provision");
        let dropped = drop_broker_database(&pg.url(), &one).await.expect("drop");
        assert!(dropped.schema_dropped && dropped.role_dropped);
        let mut su = superuser(&pg).await;
        let left: i64 = sqlx::query_scalar(
            "SELECT (SELECT count(*) FROM pg_namespace WHERE nspname = $1) \
                  + (SELECT count(*) FROM pg_roles WHERE rolname = $2)",
        )
        .bind(&one.schema)
        .bind(&one.role)
        .fetch_one(&mut su)
        .await
        .unwrap();
        assert_eq!(left, 0);
        let again = drop_broker_database(&pg.url(), &one)
            .await
            .expect("drop again");
        assert!(!again.schema_dropped && !again.role_dropped);
    });
}

/// Unreachable server and bad names give the typed errors a controller maps to conditions.
#[test]
fn errors_say_what_failed() {
    runtime().block_on(async {
        let port = ferrymq_e2e::harness::free_port().unwrap().port();
        let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
        let e = ensure_broker_database(&url, &db("fleet_x"), "pw")
            .await
            .expect_err("nothing listens");
        assert!(matches!(e, PostgresError::Unreachable { .. }), "{e:?}");
        assert!(e.is_transient());
        assert!(
            e.to_string()
                .contains(&format!("127.0.0.1:{port}/postgres")),
            "{e}"
        );
        let bad = BrokerDatabase {
            schema: "Robert'); DROP TABLE x;--".into(),
            role: "r".into(),
        };
        let e = ensure_broker_database(&url, &bad, "pw")
            .await
            .expect_err("bad schema name");
        assert!(
            matches!(e, PostgresError::InvalidName { what: "schema", .. }),
            "{e:?}"
        );
    });
}

/// The credential rows, read back through the broker's own PostgreSQL credential store (which
/// checks every row it reads as it checks records it writes): created, unchanged on a second
/// write, updated when the ACL or password changes, and deleted.
#[test]
fn application_credentials_round_trip_through_the_brokers_store() {
    let Some(pg) = postgres() else { return };
    runtime().block_on(async {
        let one = db("fleet_cred");
        let password = generate_password().unwrap();
        ensure_broker_database(&pg.url(), &one, &password)
            .await
            .expect("provision");
        let admin = PgConnectOptions::from_str(&pg.url()).unwrap();
        let pool = broker_pool(&one.login_options(&admin, &password))
            .await
            .expect("pool");
        let store = ferrymq::auth::postgres::PgCredentials::with_pool(pool.clone());

        let mut cred = ApplicationCredential {
            client_id: "ingest-1".into(),
            username: "ingest-1".into(),
            password: generate_password().unwrap(),
            publish: vec![],
            subscribe: vec!["plant/#".into()],
        };
        assert_eq!(
            upsert_application(&pool, &one.schema, &cred).await.unwrap(),
            Change::Created
        );
        assert_eq!(
            upsert_application(&pool, &one.schema, &cred).await.unwrap(),
            Change::Unchanged
        );

        let user = store
            .get(&CredentialKey::Username("ingest-1".into()))
            .await
            .expect("the broker reads the row")
            .expect("user record");
        assert_eq!(user.client_id.as_deref(), Some("ingest-1"));
        assert_eq!(user.client_type, Some(ClientType::Application));
        let hash = user.password_hash.clone().expect("hash");
        assert!(
            hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{hash}"
        );
        assert!(ferrymq::auth::password::verify_blocking(
            cred.password.as_bytes(),
            &hash
        ));
        let registration = store
            .get(&CredentialKey::ClientId("ingest-1".into()))
            .await
            .unwrap()
            .expect("registration");
        assert!(ferrymq::auth::applications::is_registration(&registration));
        assert!(registration.password_hash.is_none());

        cred.publish = vec!["results/ingest-1/#".into()];
        assert_eq!(
            upsert_application(&pool, &one.schema, &cred).await.unwrap(),
            Change::Updated
        );
        let old_password = cred.password.clone();
        cred.password = generate_password().unwrap();
        assert_eq!(
            upsert_application(&pool, &one.schema, &cred).await.unwrap(),
            Change::Updated
        );
        let hash = store
            .get(&CredentialKey::Username("ingest-1".into()))
            .await
            .unwrap()
            .and_then(|r| r.password_hash)
            .unwrap();
        assert!(ferrymq::auth::password::verify_blocking(
            cred.password.as_bytes(),
            &hash
        ));
        assert!(!ferrymq::auth::password::verify_blocking(
            old_password.as_bytes(),
            &hash
        ));

        assert!(
            delete_application(&pool, &one.schema, "ingest-1", "ingest-1")
                .await
                .unwrap()
        );
        assert!(store
            .get(&CredentialKey::Username("ingest-1".into()))
            .await
            .unwrap()
            .is_none());
        assert!(store
            .get(&CredentialKey::ClientId("ingest-1".into()))
            .await
            .unwrap()
            .is_none());
        assert!(
            !delete_application(&pool, &one.schema, "ingest-1", "ingest-1")
                .await
                .unwrap()
        );
    });
}

/// What the controllers do, through the production provisioner (`provisioner::Real`): the
/// broker's URL is the one the MqttBroker controller writes into `<broker>-postgres`
/// (`secrets::login_url`: the admin URL with the broker role's name and password, nothing
/// else), and the role is named `<schema>_broker`, so the role's default search_path
/// (`"$user", public`) does not reach the schema. The credential rows must still land in the
/// broker's schema, and be deleted from it.
#[test]
fn the_production_provisioner_writes_credentials_into_the_brokers_schema() {
    use ferrymq_operator::provisioner::Real;
    use ferrymq_operator::seam::{AppCredential, Provisioner};

    let Some(pg) = postgres() else { return };
    runtime().block_on(async {
        let one = db("ferrymq");
        let password = generate_password().unwrap();
        let real = Real::new();
        let seam_db = ferrymq_operator::seam::BrokerDatabase {
            schema: one.schema.clone(),
            role: one.role.clone(),
        };
        real.ensure_broker_database(&pg.url(), &seam_db, &password)
            .await
            .expect("provision");
        let url = ferrymq_operator::secrets::login_url(&pg.url(), &one.role, &password)
            .expect("the broker's URL");
        let cred = AppCredential {
            client_id: "analytics".into(),
            username: "analytics".into(),
            password: generate_password().unwrap(),
            publish: vec![],
            subscribe: vec!["plant/#".into()],
        };
        assert!(
            real.upsert_application(&url, &one.schema, &cred)
                .await
                .expect("credentials written through the broker's URL"),
            "a new registration is a change"
        );
        let rows = pg
            .psql("SELECT key_kind || ':' || client_type FROM ferrymq.mqtt_credentials ORDER BY 1")
            .expect("psql");
        assert_eq!(
            rows.lines().collect::<Vec<_>>(),
            ["client_id:application", "username:application"]
        );
        assert!(
            !real
                .upsert_application(&url, &one.schema, &cred)
                .await
                .expect("second write"),
            "a second write with nothing new changes nothing"
        );
        assert!(real
            .delete_application(&url, &one.schema, "analytics", "analytics")
            .await
            .expect("delete"));
        let rows = pg
            .psql("SELECT count(*) FROM ferrymq.mqtt_credentials")
            .expect("psql");
        assert_eq!(rows.trim(), "0");
    });
}
