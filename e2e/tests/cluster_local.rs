//! Issue 14, local delivery: two broker processes of this build in one cluster
//! (`cluster.enabled`, distinct `cluster.node_id`, one Kafka, one PostgreSQL schema and topic
//! prefix). Each node reads all of `msg.all` for its own connections, so a clean-session
//! subscriber gets every message wherever it was published, once; every node's retained store
//! sees every retained message; a node's writer wakes sessions on other nodes through
//! PostgreSQL NOTIFY.
//!
//! Needs Kafka and PostgreSQL (`FERRYMQ_REQUIRE_SERVICES=1`) and the broker binary
//! (`FERRYMQ_BIN`, else a release build).

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{broker_bin, serial, wait_until, Backend};
use ferrymq_e2e::harness::{BrokerOptions, BrokerProcess};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};

/// Messages published on node A in the ordering test.
const MESSAGES: usize = 300;

/// Starts one cluster node; both nodes share the schema and topic prefix (`cluster`).
fn node(backend: &Backend, node_id: &str) -> BrokerProcess {
    let extra = format!("[cluster]\nenabled = true\nnode_id = \"{node_id}\"\n");
    let config = backend.config("cluster", &extra).expect("config");
    let broker = match BrokerProcess::start(
        BrokerOptions::new(format!("cluster-{node_id}"))
            .binary(broker_bin())
            .config(config),
    ) {
        Ok(b) => b,
        Err(e) => panic!("starting cluster node {node_id}: {e:#}"),
    };
    wait_until(
        &format!("node {node_id} to be ready"),
        Duration::from_secs(60),
        || broker.is_ready(),
    );
    broker
}

/// What a subscriber received: payload, QoS, retain flag.
type Received = Arc<Mutex<Vec<(String, QoS, bool)>>>;

/// A connected MQTT 3.1.1 client whose event loop runs in the background, recording every
/// PUBLISH it gets and counting acknowledgements of its own publishes.
struct Client {
    client: AsyncClient,
    received: Received,
    acks: Arc<Mutex<usize>>,
    subacks: Arc<Mutex<usize>>,
}

impl Client {
    fn connect(rt: &tokio::runtime::Runtime, id: &str, addr: std::net::SocketAddr) -> Client {
        let mut options = MqttOptions::new(id, addr.ip().to_string(), addr.port());
        options.set_clean_session(true);
        options.set_keep_alive(Duration::from_secs(30));
        options.set_inflight(50);
        let (client, eventloop) = AsyncClient::new(options, 1_024);
        let received: Received = Arc::default();
        let acks = Arc::new(Mutex::new(0));
        let subacks = Arc::new(Mutex::new(0));
        rt.spawn(drive(
            eventloop,
            received.clone(),
            acks.clone(),
            subacks.clone(),
        ));
        Client {
            client,
            received,
            acks,
            subacks,
        }
    }

    fn subscribe(&self, rt: &tokio::runtime::Runtime, filter: &str, qos: QoS) {
        let before = *self.subacks.lock().unwrap();
        rt.block_on(self.client.subscribe(filter, qos))
            .expect("subscribe");
        wait_until("SUBACK", Duration::from_secs(10), || {
            *self.subacks.lock().unwrap() > before
        });
    }

    fn received(&self) -> Vec<(String, QoS, bool)> {
        self.received.lock().unwrap().clone()
    }
}

async fn drive(
    mut eventloop: EventLoop,
    received: Received,
    acks: Arc<Mutex<usize>>,
    subacks: Arc<Mutex<usize>>,
) {
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let payload = String::from_utf8_lossy(&p.payload).into_owned();
                received.lock().unwrap().push((payload, p.qos, p.retain));
            }
            Ok(Event::Incoming(Packet::PubAck(_))) | Ok(Event::Incoming(Packet::PubComp(_))) => {
                *acks.lock().unwrap() += 1;
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => *subacks.lock().unwrap() += 1,
            Ok(_) => {}
            Err(e) => {
                eprintln!("client event loop ended: {e}");
                return;
            }
        }
    }
}

fn qos_of(i: usize) -> QoS {
    match i % 3 {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

/// Clean subscribers on node B and on node A get QoS 0/1/2 messages published on node A in
/// order and exactly once (B through its local reader; A through its local reader while its
/// dispatcher only stores, so no double delivery); a retained message published on A reaches a
/// new subscriber on B.
#[test]
fn clean_subscribers_on_every_node_get_each_message_once_in_order() {
    let _serial = serial();
    let Some(backend) = Backend::kafka_postgres() else {
        return;
    };
    let rt = common::runtime();
    let a = node(&backend, "a");
    let b = node(&backend, "b");

    let on_b = Client::connect(&rt, "sub-b", b.addr());
    on_b.subscribe(&rt, "cl/#", QoS::ExactlyOnce);
    let on_a = Client::connect(&rt, "sub-a", a.addr());
    on_a.subscribe(&rt, "cl/#", QoS::ExactlyOnce);
    let publisher = Client::connect(&rt, "pub-a", a.addr());

    rt.block_on(async {
        publisher
            .client
            .publish("ret/state", QoS::AtLeastOnce, true, "on")
            .await
            .expect("publish retained");
        for i in 0..MESSAGES {
            publisher
                .client
                .publish("cl/x", qos_of(i), false, i.to_string())
                .await
                .expect("publish");
        }
    });
    let acked = 1
        + (0..MESSAGES)
            .filter(|i| qos_of(*i) != QoS::AtMostOnce)
            .count();
    wait_until(
        "every publish acknowledged",
        Duration::from_secs(60),
        || *publisher.acks.lock().unwrap() >= acked,
    );
    for (name, sub) in [("B", &on_b), ("A", &on_a)] {
        wait_until(
            &format!("the subscriber on node {name} to get {MESSAGES} messages"),
            Duration::from_secs(60),
            || sub.received().len() >= MESSAGES,
        );
    }
    // Time for a second copy to arrive, if there were one.
    std::thread::sleep(Duration::from_secs(3));
    let expected: Vec<(String, QoS, bool)> = (0..MESSAGES)
        .map(|i| (i.to_string(), qos_of(i), false))
        .collect();
    for (name, sub) in [("B", &on_b), ("A", &on_a)] {
        let got = sub.received();
        assert_eq!(
            got.len(),
            MESSAGES,
            "the subscriber on node {name} got {} messages for {MESSAGES} published",
            got.len()
        );
        assert_eq!(
            got, expected,
            "node {name}: not each message once, in order, at its QoS"
        );
    }

    // The retained message was published on A before the stream; B's local reader applied it.
    let late = Client::connect(&rt, "late-b", b.addr());
    late.subscribe(&rt, "ret/#", QoS::AtLeastOnce);
    wait_until(
        "the retained message on node B",
        Duration::from_secs(10),
        || !late.received().is_empty(),
    );
    assert_eq!(
        late.received(),
        vec![("on".to_string(), QoS::AtLeastOnce, true)]
    );
    drop((a, b));
}

/// A persistent MQTT 3.1.1 client (clean session off).
fn persistent(rt: &tokio::runtime::Runtime, id: &str, addr: std::net::SocketAddr) -> Client {
    let mut options = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    options.set_clean_session(false);
    options.set_keep_alive(Duration::from_secs(30));
    let (client, eventloop) = AsyncClient::new(options, 64);
    let received: Received = Arc::default();
    let acks = Arc::new(Mutex::new(0));
    let subacks = Arc::new(Mutex::new(0));
    rt.spawn(drive(
        eventloop,
        received.clone(),
        acks.clone(),
        subacks.clone(),
    ));
    Client {
        client,
        received,
        acks,
        subacks,
    }
}

/// Cross-node wake through PostgreSQL NOTIFY, on one node (until dispatch runs in a consumer
/// group every node stores every partition, so another node's store cannot be isolated yet):
/// the writer's transaction notifies `ferrymq_wake.<schema>` with the DEVICE client it stored
/// for, and an entry put into an online DEVICE session's queue by someone else (here `psql`,
/// standing in for another node's writer) is delivered once its NOTIFY arrives: nothing on this
/// node wakes the session but the listener.
#[test]
fn notify_wakes_an_online_device_session() {
    let _serial = serial();
    let Some(backend) = Backend::kafka_postgres() else {
        return;
    };
    let rt = common::runtime();
    let extra = "[cluster]\nenabled = true\nnode_id = \"w\"\n";
    let config = backend.config("wake", extra).expect("config");
    let schema = "t_wake";
    let channel = format!("ferrymq_wake.{schema}");
    let broker = BrokerProcess::start(
        BrokerOptions::new("cluster-wake")
            .binary(broker_bin())
            .config(config),
    )
    .expect("starting the node");
    wait_until("the node to be ready", Duration::from_secs(60), || {
        broker.is_ready()
    });
    let pg = &backend.services().expect("services").postgres;

    // "other" leaves a stored entry behind; "dev" stays online.
    let other = persistent(&rt, "other", broker.addr());
    other.subscribe(&rt, "w/#", QoS::AtLeastOnce);
    rt.block_on(other.client.disconnect()).expect("disconnect");
    let dev = persistent(&rt, "dev", broker.addr());
    dev.subscribe(&rt, "w/#", QoS::AtLeastOnce);
    let publisher = Client::connect(&rt, "pub", broker.addr());

    // The writer notifies the DEVICE clients it stores for, at commit. Two commands, so the
    // LISTEN is committed before the sleep; psql prints what arrived after each command.
    let listen = || {
        let bin = ferrymq_e2e::harness::services::pg_bin_dir().expect("PostgreSQL binaries");
        let out = std::process::Command::new(bin.join("psql"))
            .args(["-X", "-d", &pg.url()])
            .args(["-c", &format!("LISTEN \"{channel}\"")])
            .args(["-c", "SELECT pg_sleep(8)"])
            .output()
            .expect("running psql");
        assert!(out.status.success(), "psql: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let heard = std::thread::scope(|s| {
        let listener = s.spawn(listen);
        std::thread::sleep(Duration::from_secs(2));
        rt.block_on(
            publisher
                .client
                .publish("w/x", QoS::AtLeastOnce, false, "stored"),
        )
        .expect("publish");
        listener.join().expect("psql thread")
    });
    for client in ["dev", "other"] {
        assert!(
            heard.contains(&format!("payload \"{client}\"")),
            "no NOTIFY for {client}: {heard}"
        );
    }
    wait_until(
        "dev to get the message live",
        Duration::from_secs(10),
        || dev.received().len() == 1,
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(dev.received().len(), 1);

    // Another writer's entry for "dev": a copy of the entry stored for "other", then NOTIFY.
    let copy = format!(
        "BEGIN; \
         INSERT INTO {schema}.device_queue (client_id, seq, expires_at_ms, record) \
           SELECT 'dev', 1000000, 0, record FROM {schema}.device_queue \
           WHERE client_id = 'other' ORDER BY seq LIMIT 1; \
         SELECT pg_notify('{channel}', 'dev'); \
         COMMIT;"
    );
    pg.psql(&copy).expect("psql copy");
    wait_until(
        "dev to be woken by the NOTIFY",
        Duration::from_secs(10),
        || dev.received().len() == 2,
    );
    assert_eq!(dev.received()[1].0, "stored");
    drop(broker);
}
