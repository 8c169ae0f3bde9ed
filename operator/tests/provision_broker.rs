//! What the operator provisions is what the broker uses: the real `ferrymq` binary on
//! Kafka + PostgreSQL, started with only what the operator made — the broker role's URL and
//! schema, the publish log and the APPLICATION topic (automatic topic creation off), and the
//! credential rows — and an APPLICATION client that logs in with the operator's credential.
//!
//! Skipped with a message where Kafka or PostgreSQL is missing, unless
//! `FERRYMQ_REQUIRE_SERVICES=1` (CI), where that fails.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use ferrymq_e2e::harness::services::{require_services, Services};
use ferrymq_e2e::harness::{
    release_binary, BrokerOptions, BrokerProcess, ConnectOptions, Connection,
};
use ferrymq_operator::provision::kafka::{
    application_topic, publish_log_topic, KafkaAdmin, KafkaConnection, TopicSpec,
};
use ferrymq_operator::provision::postgres::{
    broker_pool, ensure_broker_database, generate_password, upsert_application,
    ApplicationCredential, BrokerDatabase, Change,
};
use sqlx::postgres::PgConnectOptions;

#[test]
fn broker_runs_on_what_the_operator_provisioned() {
    if !require_services() {
        return;
    }
    let services = Services::start().expect("starting Kafka and PostgreSQL");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let prefix = "op";
    let db = BrokerDatabase {
        schema: "op_broker".into(),
        role: "op_broker_role".into(),
    };
    let broker_password = generate_password().unwrap();
    let app = ApplicationCredential {
        client_id: "analytics".into(),
        username: "analytics".into(),
        password: generate_password().unwrap(),
        publish: vec!["results/#".into()],
        subscribe: vec!["plant/#".into()],
    };

    // What the controllers do for an MqttBroker and an ApplicationClient.
    rt.block_on(async {
        ensure_broker_database(&services.postgres.url(), &db, &broker_password)
            .await
            .expect("schema and role");
        let admin = PgConnectOptions::from_str(&services.postgres.url()).unwrap();
        let pool = broker_pool(&db.login_options(&admin, &broker_password))
            .await
            .expect("pool as the broker role");
        assert_eq!(
            upsert_application(&pool, &db.schema, &app).await.unwrap(),
            Change::Created
        );
        pool.close().await;

        let kafka = KafkaAdmin::new(KafkaConnection::new(services.kafka.bootstrap())).unwrap();
        for (name, partitions) in [
            (publish_log_topic(prefix), 4),
            (application_topic(prefix, &app.client_id), 1),
        ] {
            kafka
                .ensure_topic(&TopicSpec {
                    name,
                    partitions,
                    replication_factor: -1,
                    config: BTreeMap::new(),
                })
                .await
                .expect("topic");
        }
    });

    // The broker connects as the provisioned role, with no rights to create anything outside
    // its schema and no permission to create Kafka topics on its own.
    let port = services.postgres.url();
    let port = port
        .rsplit(':')
        .next()
        .and_then(|p| p.split('/').next())
        .expect("port");
    let config = format!(
        "[storage]\nbackend = \"kafka+postgres\"\n\n\
         [kafka]\nbootstrap_servers = \"{}\"\ntopic_prefix = \"{prefix}\"\nmsg_all_partitions = 4\n\
         auto_create_application_topics = false\n\n\
         [postgres]\nurl = \"postgres://{}:{}@127.0.0.1:{port}/postgres\"\nschema = \"{}\"\n\
         max_connections = 4\n\n\
         [auth]\nallow_anonymous = false\nproviders = [\"store\"]\n",
        services.kafka.bootstrap(),
        db.role,
        broker_password,
        db.schema,
    );
    let mut broker = BrokerProcess::start(
        BrokerOptions::new("operator-provisioned")
            .binary(release_binary())
            .config(config)
            // The harness turns anonymous access on for its own tests; not here.
            .env("FERRYMQ_AUTH__ALLOW_ANONYMOUS", "false"),
    )
    .expect("the broker starts on the provisioned database and topics");
    let addr = broker.addr();

    rt.block_on(async {
        // The operator's credential logs in, with MQTT 3.1.1 (user name + password) and 5.
        let v3 = ConnectOptions::v311(&app.client_id).login(&app.username, &app.password);
        let (conn, ack) = Connection::connect_raw(addr, &v3)
            .await
            .expect("v3 connect");
        assert_eq!(
            ack.refused,
            None,
            "v3 login refused:\n{}",
            broker.log_tail(30)
        );
        conn.disconnect().await.ok();
        let v5 = ConnectOptions::v5(&app.client_id).login(&app.username, &app.password);
        let (mut conn, ack) = Connection::connect_raw(addr, &v5)
            .await
            .expect("v5 connect");
        assert_eq!(
            ack.refused,
            None,
            "v5 login refused:\n{}",
            broker.log_tail(30)
        );
        // The ACL the operator wrote applies: plant/# may be subscribed, other/# not.
        conn.subscribe(1, &[("plant/#", 1)], Duration::from_secs(10))
            .await
            .expect("plant/# is in the subscribe ACL");
        let refused = conn
            .subscribe(2, &[("other/#", 1)], Duration::from_secs(10))
            .await
            .expect_err("other/# is outside the subscribe ACL");
        assert!(refused.to_string().contains("refused"), "{refused}");
        conn.disconnect().await.ok();

        // A wrong password is refused (0x86), and so is a client without credentials.
        let bad = ConnectOptions::v5(&app.client_id).login(&app.username, "not-the-password");
        let (_, ack) = Connection::connect_raw(addr, &bad).await.expect("connect");
        assert!(ack.refused.is_some(), "wrong password accepted");
        let anon = ConnectOptions::v5("anonymous-1");
        let (_, ack) = Connection::connect_raw(addr, &anon).await.expect("connect");
        assert!(ack.refused.is_some(), "anonymous client accepted");
    });

    // The topic is what makes the client's APPLICATION log, under exactly the name the
    // operator computes: a second registered client is refused while its topic is missing
    // (automatic creation is off) and accepted once the operator has made it.
    rt.block_on(async {
        let second = ApplicationCredential {
            client_id: "plant/7 ünïcode".into(),
            username: "plant-7".into(),
            ..app.clone()
        };
        let admin = PgConnectOptions::from_str(&services.postgres.url()).unwrap();
        let pool = broker_pool(&db.login_options(&admin, &broker_password))
            .await
            .unwrap();
        upsert_application(&pool, &db.schema, &second)
            .await
            .unwrap();
        let opts = ConnectOptions::v5(&second.client_id).login(&second.username, &second.password);
        let (_, ack) = Connection::connect_raw(addr, &opts).await.expect("connect");
        println!("without its topic: {:?}", ack.refused);
        assert!(
            ack.refused.is_some(),
            "an APPLICATION client without its topic was accepted:\n{}",
            broker.log_tail(30)
        );
        let topic = application_topic(prefix, &second.client_id);
        assert!(topic.starts_with("op.app.h."), "{topic}");
        let kafka = KafkaAdmin::new(KafkaConnection::new(services.kafka.bootstrap())).unwrap();
        kafka
            .ensure_topic(&TopicSpec {
                name: topic,
                partitions: 1,
                replication_factor: -1,
                config: BTreeMap::new(),
            })
            .await
            .expect("topic");
        let (_, ack) = Connection::connect_raw(addr, &opts).await.expect("connect");
        assert_eq!(
            ack.refused,
            None,
            "refused with the operator-made topic:\n{}",
            broker.log_tail(30)
        );
    });
    assert!(broker.is_running());
}
