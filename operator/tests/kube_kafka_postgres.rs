//! A Kafka + PostgreSQL MqttBroker and its ApplicationClients end to end: the controllers
//! (`controller::run` on the production `provisioner::Real`) against a real kube-apiserver and
//! kube-controller-manager, a real single-node Kafka and a real PostgreSQL, and the real `ferrymq`
//! binary started from what the operator rendered, spoken to by real MQTT clients (rumqttc).
//!
//! What stands in for what (there is no kubelet, no container runtime and no cluster network):
//! * the broker process is started from the StatefulSet's pod template the way a kubelet would
//!   start its container: the ConfigMap's `ferrymq.toml` as the mounted config file, the
//!   environment resolved from the Secrets the template names (`container_env`);
//! * the pod's own network namespace and emptyDir: the listener, HTTP port and data directory
//!   are moved to free loopback ports and a temporary directory (`--listen`, `--http`,
//!   `--data-dir`: the pod binds 0.0.0.0:1883 in a network of its own, the test shares one);
//! * the cluster's Kafka and PostgreSQL: the test's own, named in the spec by their loopback
//!   addresses, as a cluster would name them by Service host name.
//!
//! Skipped where the control-plane binaries, Kafka or PostgreSQL are missing, unless
//! `FERRYMQ_REQUIRE_SERVICES=1` (CI), where that fails.

mod k8s;

use std::sync::Arc;
use std::time::Duration;

use ferrymq_crds::ApplicationClient;
use ferrymq_e2e::harness::services::{require_services, Services};
use ferrymq_e2e::harness::{release_binary, BrokerOptions, BrokerProcess};
use ferrymq_operator::provision::kafka::{ConfigOp, KafkaAdmin, KafkaConnection};
use ferrymq_operator::provisioner::Real;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, MqttOptions, Packet, QoS,
};
use serde_json::json;

use k8s::{
    app_ready, cluster, container_env, create, runtime, start_controllers, wait_all_gone,
    wait_event, wait_for,
};

const NS: &str = "default";
const WAIT: Duration = Duration::from_secs(90);
/// The retention the MqttBroker declares for APPLICATION logs (`spec.applicationLog`).
const RETENTION_SECS: u64 = 3600;
const RETENTION_BYTES: u64 = 50_000_000;

/// One MQTT 3.1.1 connection through rumqttc's event loop, driven by the test.
struct Mqtt {
    client: AsyncClient,
    events: EventLoop,
}

impl Mqtt {
    /// Connects and waits for the CONNACK; `Err` carries the refusal. Returns the session-present
    /// flag with the connection.
    async fn connect(
        port: u16,
        client_id: &str,
        login: (&str, &str),
        clean: bool,
    ) -> Result<(Mqtt, bool), ConnectionError> {
        let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
        options.set_credentials(login.0, login.1);
        options.set_clean_session(clean);
        options.set_keep_alive(Duration::from_secs(30));
        let (client, mut events) = AsyncClient::new(options, 64);
        let present = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                if let Event::Incoming(Packet::ConnAck(ack)) = events.poll().await? {
                    return Ok::<bool, ConnectionError>(ack.session_present);
                }
            }
        })
        .await
        .expect("no CONNACK within 20 s")?;
        Ok((Mqtt { client, events }, present))
    }

    async fn subscribe(&mut self, filter: &str) {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .expect("queue SUBSCRIBE");
        self.until("SUBACK", |p| matches!(p, Packet::SubAck(_)))
            .await;
    }

    /// Publishes at QoS 1 and waits for the PUBACK: the broker has made it durable.
    async fn publish(&mut self, topic: &str, payload: &str) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.as_bytes().to_vec())
            .await
            .expect("queue PUBLISH");
        self.until("PUBACK", |p| matches!(p, Packet::PubAck(_)))
            .await;
    }

    /// The next `n` PUBLISH payloads (rumqttc acknowledges each).
    async fn receive(&mut self, n: usize) -> Vec<String> {
        let mut got = Vec::new();
        while got.len() < n {
            let packet = self
                .until(&format!("message {} of {n}", got.len() + 1), |p| {
                    matches!(p, Packet::Publish(_))
                })
                .await;
            if let Packet::Publish(p) = packet {
                got.push(String::from_utf8_lossy(&p.payload).into_owned());
            }
        }
        got
    }

    async fn until(&mut self, what: &str, wanted: impl Fn(&Packet) -> bool) -> Packet {
        tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                match self.events.poll().await {
                    Ok(Event::Incoming(p)) if wanted(&p) => return p,
                    Ok(_) => {}
                    Err(e) => panic!("connection failed while waiting for {what}: {e}"),
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no {what} within 30 s"))
    }

    async fn disconnect(mut self) {
        self.client.disconnect().await.expect("queue DISCONNECT");
        let _ = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match self.events.poll().await {
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
    }
}

/// The credentials Secret of an ApplicationClient: (clientId, username, password).
async fn credentials(client: &Client, name: &str) -> (String, String, String) {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    let secret = secrets.get(name).await.expect("credentials Secret");
    let data = secret.data.unwrap_or_default();
    let get = |k: &str| {
        String::from_utf8(
            data.get(k)
                .unwrap_or_else(|| panic!("{name} has no {k}"))
                .0
                .clone(),
        )
        .expect("UTF-8")
    };
    (get("clientId"), get("username"), get("password"))
}

/// The topic's configuration once `key` has `value` (Kafka applies a change a moment after it
/// answers), or what it has after 30 s.
async fn topic_config_eventually(
    admin: &KafkaAdmin,
    topic: &str,
    key: &str,
    value: &str,
) -> Option<String> {
    let mut last = None;
    for _ in 0..150 {
        last = admin
            .describe(topic)
            .await
            .expect("describe")
            .and_then(|d| d.effective_config.get(key).cloned());
        if last.as_deref() == Some(value) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    last
}

#[test]
fn kafka_postgres_broker_serves_application_clients_the_operator_provisioned() {
    if !require_services() {
        return;
    }
    let bin = release_binary();
    let services = Services::start().expect("starting Kafka and PostgreSQL");
    runtime().block_on(async {
        let Some((_cp, client)) = cluster(true).await else {
            return;
        };
        // Resync every 3 s instead of every 5 minutes, so the drift check below runs soon.
        let controllers = start_controllers(
            &client,
            Arc::new(Real::new()),
            NS,
            Some(Duration::from_secs(3)),
        );

        // The docs/examples/mqttbroker-kafka-postgres.yaml shape, on this test's services: the
        // operator creates the role and schema with the admin URL, Kafka client properties come
        // from a Secret (each key one librdkafka property), automatic topic creation is off so
        // only the operator makes APPLICATION topics.
        for obj in [
            json!({"apiVersion": "v1", "kind": "Secret",
                   "metadata": {"name": "pg-admin", "namespace": NS},
                   "stringData": {"url": services.postgres.url()}}),
            json!({"apiVersion": "v1", "kind": "Secret",
                   "metadata": {"name": "kafka-client", "namespace": NS},
                   "stringData": {"socket.keepalive.enable": "true"}}),
            json!({"apiVersion": "ferrymq.io/v1alpha1", "kind": "MqttBroker",
                   "metadata": {"name": "core", "namespace": NS},
                   "spec": {
                       "image": "ghcr.io/ferrymq/ferrymq:0.1.0",
                       "listeners": [{"name": "mqtt", "port": 1883}],
                       "storage": {"kafkaPostgres": {
                           "kafka": {"bootstrapServers": services.kafka.bootstrap(),
                                     "topicPrefix": "kp", "msgAllPartitions": 2,
                                     "replicationFactor": 1,
                                     "autoCreateApplicationTopics": false,
                                     "propertiesSecretRef": {"name": "kafka-client"}},
                           "postgres": {"adminSecretRef": {"name": "pg-admin", "key": "url"},
                                        "schema": "kp"}}},
                       "applicationLog": {"retentionSecs": RETENTION_SECS,
                                          "retentionBytes": RETENTION_BYTES}}}),
            // The consumer, kept on deletion; the producer, removed with its topic and rows.
            json!({"apiVersion": "ferrymq.io/v1alpha1", "kind": "ApplicationClient",
                   "metadata": {"name": "analytics", "namespace": NS},
                   "spec": {"brokerRef": {"name": "core"}, "clientId": "analytics",
                            "acl": {"publish": [], "subscribe": ["plant/#"]},
                            "deletionPolicy": "Retain"}}),
            json!({"apiVersion": "ferrymq.io/v1alpha1", "kind": "ApplicationClient",
                   "metadata": {"name": "ingest", "namespace": NS},
                   "spec": {"brokerRef": {"name": "core"}, "clientId": "ingest",
                            "acl": {"publish": ["plant/#"], "subscribe": []},
                            "deletionPolicy": "Delete"}}),
        ] {
            create(&client, &obj, NS).await.expect("creating a fixture");
        }
        let apps: Api<ApplicationClient> = Api::namespaced(client.clone(), NS);
        for name in ["analytics", "ingest"] {
            wait_for(&format!("{name} Ready"), WAIT, || {
                let apps = apps.clone();
                async move { apps.get(name).await.ok().filter(app_ready).map(|_| ()) }
            })
            .await;
        }

        // Kafka: the publish log, and each client's topic with the retention the MqttBroker
        // declares (not the broker's 7-day default).
        let kafka = KafkaAdmin::new(KafkaConnection::new(services.kafka.bootstrap()))
            .expect("admin client");
        let log = kafka.describe("kp.msg.all").await.expect("describe");
        assert_eq!(log.map(|d| d.partitions), Some(2), "the publish log");
        for topic in ["kp.app.analytics", "kp.app.ingest"] {
            let d = kafka
                .describe(topic)
                .await
                .expect("describe")
                .unwrap_or_else(|| panic!("{topic} was not created"));
            assert_eq!(d.partitions, 1, "{topic}");
            assert_eq!(
                d.config.get("retention.ms"),
                Some(&(RETENTION_SECS * 1000).to_string()),
                "{topic}: {:?}",
                d.config
            );
            assert_eq!(
                d.config.get("retention.bytes"),
                Some(&RETENTION_BYTES.to_string()),
                "{topic}: {:?}",
                d.config
            );
        }
        let analytics = apps.get("analytics").await.expect("analytics");
        let status = analytics.status.as_ref().expect("status");
        assert_eq!(status.topic_name.as_deref(), Some("kp.app.analytics"));
        assert_eq!(status.secret_name.as_deref(), Some("analytics-mqtt"));

        // PostgreSQL: the broker's role owns the schema; each client has an APPLICATION row.
        let owner = services
            .postgres
            .psql("SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = 'kp'")
            .expect("psql");
        assert_eq!(owner.trim(), "kp_broker", "owner of schema kp");
        let rows = |client_id: &str| {
            services
                .postgres
                .psql(&format!(
                    "SELECT key_kind || ':' || coalesce(client_type, '-') FROM kp.mqtt_credentials \
                     WHERE key_name = '{client_id}' OR client_id = '{client_id}' ORDER BY 1"
                ))
                .expect("psql")
        };
        let analytics_rows = rows("analytics");
        assert!(
            analytics_rows.contains("application"),
            "credential rows of analytics: {analytics_rows:?}"
        );

        // The credentials Secret, owned by the ApplicationClient (so it goes with it).
        let (client_id, username, password) = credentials(&client, "analytics-mqtt").await;
        assert_eq!(
            (client_id.as_str(), username.as_str()),
            ("analytics", "analytics")
        );
        assert!(password.len() >= 32, "a generated password");
        let (_, ingest_user, ingest_password) = credentials(&client, "ingest-mqtt").await;

        // The broker pod, as a kubelet would start it (see the module doc).
        let sts: Api<StatefulSet> = Api::namespaced(client.clone(), NS);
        let sts = sts.get("core").await.expect("StatefulSet core");
        let pod = sts.spec.as_ref().expect("spec").template.clone();
        let pod_spec = pod.spec.expect("pod spec");
        let container = pod_spec
            .containers
            .iter()
            .find(|c| c.name == "ferrymq")
            .expect("the ferrymq container");
        assert_eq!(
            container.args.as_deref(),
            Some(
                &[
                    "--config".to_string(),
                    "/etc/ferrymq/ferrymq.toml".to_string()
                ][..]
            ),
            "the container reads the config from the ConfigMap mount"
        );
        let config_map = pod_spec
            .volumes
            .iter()
            .flatten()
            .find_map(|v| v.config_map.as_ref().map(|c| c.name.clone()))
            .expect("a ConfigMap volume");
        let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
        let config = config_maps
            .get(&config_map)
            .await
            .expect("the rendered ConfigMap")
            .data
            .and_then(|mut d| d.remove("ferrymq.toml"))
            .expect("ferrymq.toml in the ConfigMap");
        let env = container_env(&client, NS, container, "core-0").await;
        assert!(
            env.iter().any(|(k, _)| k == "FERRYMQ_POSTGRES__URL"),
            "the broker's PostgreSQL URL comes from a Secret: {:?}",
            env.iter().map(|(k, _)| k).collect::<Vec<_>>()
        );
        // Every pod is a cluster node named after itself.
        assert!(
            env.iter()
                .any(|(k, v)| k == "FERRYMQ_CLUSTER__NODE_ID" && v == "core-0"),
            "the node id is the pod name"
        );
        let parsed: toml::Table = config.parse().expect("the ConfigMap holds TOML");
        let anonymous = parsed
            .get("auth")
            .and_then(|a| a.get("allow_anonymous"))
            .and_then(|v| v.as_bool())
            .expect("auth.allow_anonymous rendered");
        assert!(
            !anonymous,
            "the default MqttBroker refuses anonymous clients"
        );
        let mut options = BrokerOptions::new("kube-kafka-postgres")
            .binary(bin)
            .config(config)
            // The harness allows anonymous clients for its own tests; a pod has no such
            // variable, so the ConfigMap's value is put back.
            .env("FERRYMQ_AUTH__ALLOW_ANONYMOUS", anonymous.to_string());
        for (k, v) in env {
            options = options.env(k, v);
        }
        options.start_timeout = Duration::from_secs(60);
        let broker = tokio::task::spawn_blocking(move || BrokerProcess::start(options))
            .await
            .expect("join")
            .expect("the broker starts from the rendered ConfigMap and the Secrets");
        let port = broker.addr().port();

        // The Secret's credentials log in as the APPLICATION client; a wrong password does not.
        match Mqtt::connect(port, "analytics", ("analytics", "not-the-password"), true).await {
            Err(ConnectionError::ConnectionRefused(code)) => {
                assert_eq!(code, ConnectReturnCode::BadUserNamePassword)
            }
            Err(e) => panic!("a wrong password: {e}"),
            Ok(_) => panic!("a wrong password was accepted"),
        }
        let (mut consumer, _) = Mqtt::connect(port, &client_id, (&username, &password), false)
            .await
            .unwrap_or_else(|e| panic!("analytics refused: {e}\n{}", broker.log_tail(30)));
        consumer.subscribe("plant/#").await;
        consumer.disconnect().await;

        // Published while the APPLICATION client is offline: kept in its Kafka log.
        let (mut producer, _) =
            Mqtt::connect(port, "ingest", (&ingest_user, &ingest_password), true)
                .await
                .unwrap_or_else(|e| panic!("ingest refused: {e}\n{}", broker.log_tail(30)));
        for i in 1..=3 {
            producer
                .publish("plant/7/temp", &format!("offline-{i}"))
                .await;
        }
        let (mut consumer, present) =
            Mqtt::connect(port, &client_id, (&username, &password), false)
                .await
                .expect("analytics reconnects");
        assert!(present, "the APPLICATION session survived the disconnect");
        assert_eq!(
            consumer.receive(3).await,
            ["offline-1", "offline-2", "offline-3"],
            "messages published while the APPLICATION client was offline, in order"
        );
        producer.publish("plant/7/temp", "online").await;
        assert_eq!(consumer.receive(1).await, ["online"]);
        consumer.disconnect().await;
        producer.disconnect().await;

        // Someone changes the topic behind the operator's back (kafka-configs.sh): the next
        // resync sets it back and says so with a Warning Event on the ApplicationClient.
        let wanted_ms = (RETENTION_SECS * 1000).to_string();
        kafka
            .alter_config(
                "kp.app.analytics",
                &[ConfigOp::Set("retention.ms".into(), "60000".into())],
            )
            .await
            .expect("the out-of-band change");
        let event = wait_event(&client, NS, "analytics", "DriftReverted").await;
        assert_eq!(event.type_.as_deref(), Some("Warning"));
        let note = event.note.unwrap_or_default();
        assert!(note.contains("retention.ms"), "{note}");
        assert_eq!(
            topic_config_eventually(&kafka, "kp.app.analytics", "retention.ms", &wanted_ms).await,
            Some(wanted_ms.clone()),
            "the drift was reverted"
        );

        // Deletion. Retain keeps the topic and the rows (the client can still log in, to an
        // unmanaged registration); Delete removes both (the client is refused). Both Secrets go
        // with their ApplicationClient (kube-controller-manager's garbage collector).
        for name in ["analytics", "ingest"] {
            apps.delete(name, &Default::default())
                .await
                .expect("delete");
        }
        wait_all_gone(&apps).await;
        assert!(
            kafka
                .describe("kp.app.analytics")
                .await
                .expect("describe")
                .is_some(),
            "Retain deleted the topic"
        );
        assert_eq!(rows("analytics"), analytics_rows, "Retain changed the rows");
        wait_for("kp.app.ingest deleted", WAIT, || {
            let kafka = &kafka;
            async move {
                kafka
                    .describe("kp.app.ingest")
                    .await
                    .ok()
                    .filter(|d| d.is_none())
                    .map(|_| ())
            }
        })
        .await;
        assert_eq!(rows("ingest").trim(), "", "Delete left credential rows");
        let (consumer, _) = Mqtt::connect(port, &client_id, (&username, &password), false)
            .await
            .expect("a retained registration still logs in");
        consumer.disconnect().await;
        match Mqtt::connect(port, "ingest", (&ingest_user, &ingest_password), true).await {
            Err(ConnectionError::ConnectionRefused(_)) => {}
            Err(e) => panic!("ingest after deletion: {e}"),
            Ok(_) => panic!("a deleted registration still logs in"),
        }
        let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
        wait_for("both credentials Secrets collected", WAIT, || {
            let secrets = secrets.clone();
            async move {
                let left: Vec<String> = secrets
                    .list(&ListParams::default())
                    .await
                    .ok()?
                    .items
                    .iter()
                    .map(|s| s.name_any())
                    .filter(|n| n.ends_with("-mqtt"))
                    .collect();
                left.is_empty().then_some(())
            }
        })
        .await;

        controllers.shutdown().await;
        drop(broker);
    });
}
