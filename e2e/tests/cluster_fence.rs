//! A cluster node (`cluster.enabled = true`, issue 14) cut off from Kafka and PostgreSQL fences
//! itself: within a bounded time it closes its connections with v5 DISCONNECT 0x9C (Use another
//! server, with the Server Reference), refuses CONNECT with Server unavailable, reports not
//! ready, and acknowledges nothing it could not store. When both answer again it serves again,
//! and every message acknowledged before the cut reaches the DEVICE subscriber.
//!
//! The cut is made by freezing the Kafka JVM (SIGSTOP: its sockets stay open and silent, as
//! when packets are dropped) and stopping PostgreSQL, for every node alike: this machine runs
//! no network namespaces for the test, so the node under test is the only one.
//!
//! Skipped with a message where Kafka or PostgreSQL is missing, unless
//! `FERRYMQ_REQUIRE_SERVICES=1`.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use ferrymq_e2e::harness::{
    http_status, persistent, subscribe_and_leave, BrokerOptions, BrokerProcess, ConnectOptions,
    Connection, Incoming, Protocol,
};

const FENCE_AFTER_SECS: u64 = 3;
const REFERENCE: &str = "mqtt.ferrymq.example:1883";

/// Publishes QoS 1 `fence/<n>` for each n in `range`, one at a time; the number acknowledged.
async fn publish_acked(conn: &mut Connection, range: std::ops::Range<u16>) -> usize {
    let mut acked = 0;
    for n in range {
        conn.queue_publish(
            &format!("fence/{n}"),
            1,
            n,
            false,
            Bytes::from(format!("m{n}")),
            None,
        )
        .expect("queue publish");
        conn.flush().await.expect("flush");
        match conn.recv_timeout(Duration::from_secs(15)).await {
            Ok(Some(Incoming::PubAck { ok: true, .. })) => acked += 1,
            other => panic!("PUBLISH {n} not acknowledged: {other:?}"),
        }
    }
    acked
}

/// Connects `opts`, retrying while the node refuses with Server unavailable: a node that
/// turned ready again refuses a CONNECT whose claim it cannot append to the session directory,
/// which happens for a few seconds after a frozen Kafka broker resumes (KRaft fences it and
/// its partitions have no leader until it registers again). Returns the connection, the
/// CONNACK's Session Present and the number of refusals.
async fn connect_when_served(
    addr: std::net::SocketAddr,
    opts: &ConnectOptions,
) -> (Connection, bool, u32) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut refusals = 0;
    loop {
        let (conn, ack) = Connection::connect_raw(addr, opts)
            .await
            .expect("the node closed the socket instead of answering CONNECT");
        match ack.refused {
            None => return (conn, ack.session_present, refusals),
            Some(reason) if reason.contains("Unavailable") && Instant::now() < deadline => {
                refusals += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Some(reason) => panic!("CONNECT {} refused: {reason}", opts.client_id),
        }
    }
}

#[test]
fn a_node_cut_off_from_kafka_and_postgres_fences_itself_and_comes_back() {
    let _serial = serial();
    let Some(mut backend) = Backend::kafka_postgres() else {
        return;
    };
    let rt = runtime();
    let config = backend
        .config(
            "cluster-fence",
            &format!(
                "[cluster]\nenabled = true\nnode_id = \"a\"\nfence_after_secs = {FENCE_AFTER_SECS}\n\n\
                 [shutdown]\nserver_reference = \"{REFERENCE}\"\n"
            ),
        )
        .expect("config");
    let node = BrokerProcess::start(
        BrokerOptions::new("cluster-fence-a")
            .binary(broker_bin())
            .config(config),
    )
    .expect("start node");
    let addr = node.addr();
    wait_until("node ready", Duration::from_secs(90), || node.is_ready());
    let device = persistent("fence-device", Protocol::V311);
    rt.block_on(subscribe_and_leave(addr, &device, &[("fence/#", 1)]))
        .expect("device subscribe");
    let (mut held, mut publisher) = rt.block_on(async {
        let (held, _) = Connection::connect(addr, &ConnectOptions::v5("fence-held"))
            .await
            .expect("connect");
        let (mut publisher, _) = Connection::connect(addr, &ConnectOptions::v5("fence-pub"))
            .await
            .expect("connect");
        assert_eq!(publish_acked(&mut publisher, 1..11).await, 10);
        (held, publisher)
    });

    // The cut.
    let services = backend.services_mut().expect("services");
    services.kafka.freeze().expect("freeze kafka");
    services.postgres.stop().expect("stop postgres");
    let cut = Instant::now();

    rt.block_on(async {
        // A PUBLISH sent into the cut is never acknowledged as stored.
        publisher
            .queue_publish("fence/100", 1, 100, false, Bytes::from("m100"), None)
            .expect("queue publish");
        publisher.flush().await.expect("flush");
        // The held connection is sent away with 0x9C and the Server Reference.
        match held.recv_timeout(Duration::from_secs(60)).await {
            Ok(Some(Incoming::Disconnect { reason })) => {
                assert!(reason.contains("UseAnotherServer"), "reason {reason}");
                assert!(reason.contains(REFERENCE), "no server reference: {reason}");
            }
            other => panic!("the fenced node did not send DISCONNECT 0x9C: {other:?}"),
        }
        println!("fenced {:?} after the cut", cut.elapsed());
        loop {
            match publisher.recv_timeout(Duration::from_secs(30)).await {
                Ok(Some(Incoming::PubAck { ok: true, pkid, .. })) => {
                    panic!("PUBLISH {pkid} acknowledged while the node was cut off")
                }
                Ok(Some(Incoming::PubAck { ok: false, .. })) => continue,
                Ok(Some(Incoming::Disconnect { reason })) => {
                    assert!(reason.contains("UseAnotherServer"), "reason {reason}");
                    break;
                }
                Ok(None) | Err(_) => break,
                Ok(Some(other)) => panic!("unexpected: {other:?}"),
            }
        }
        // New clients are refused while fenced.
        let (_, ack) = Connection::connect_raw(addr, &ConnectOptions::v5("fence-new"))
            .await
            .expect("the fenced node closed the socket instead of refusing");
        let refused = ack.refused.unwrap_or_default();
        assert!(
            refused.contains("ServerUnavailable"),
            "CONNACK: {refused:?}"
        );
        let (_, ack) = Connection::connect_raw(addr, &ConnectOptions::v311("fence-new3"))
            .await
            .expect("the fenced node closed the socket instead of refusing (v3)");
        let refused = ack.refused.unwrap_or_default();
        assert!(refused.contains("Unavailable"), "v3 CONNACK: {refused:?}");
    });
    assert_eq!(
        http_status(node.http_addr(), "/health/ready"),
        Some(503),
        "a fenced node must not be ready"
    );
    let log = node.log_tail(400);
    assert!(
        log.contains("fenced: this node cannot reach its storage"),
        "{log}"
    );

    // Kafka and PostgreSQL come back: the node serves again.
    let services = backend.services_mut().expect("services");
    services.kafka.thaw().expect("thaw kafka");
    services.postgres.restart().expect("restart postgres");
    let back = Instant::now();
    wait_until("node ready again", Duration::from_secs(120), || {
        node.is_ready()
    });
    println!(
        "serving again {:?} after the services returned",
        back.elapsed()
    );
    rt.block_on(async {
        let (mut publisher, _, refusals) =
            connect_when_served(addr, &ConnectOptions::v5("fence-pub2")).await;
        println!("CONNECT refused {refusals} times (Server unavailable) after the node was ready");
        assert_eq!(publish_acked(&mut publisher, 11..16).await, 5);
    });
    // Every acknowledged message reaches the DEVICE subscriber; the one sent into the cut may
    // or may not (it was never acknowledged).
    rt.block_on(async {
        let (mut sub, session_present, _) = connect_when_served(addr, &device).await;
        assert!(session_present, "the DEVICE session is gone");
        let mut got = std::collections::BTreeSet::new();
        // Messages 1-10 may still be in the publish log only: after the outage the router's
        // consumer group has to find its coordinator again (up to a session timeout, 10 s,
        // and a rejoin) before it stores them for the DEVICE session.
        let deadline = Instant::now() + Duration::from_secs(90);
        while Instant::now() < deadline {
            let incoming = match sub.recv_timeout(Duration::from_secs(5)).await {
                Ok(Some(incoming)) => incoming,
                Ok(None) => continue,
                Err(e) => panic!("the DEVICE connection failed: {e:#}"),
            };
            if let Incoming::Publish(m) = incoming {
                if m.qos > 0 {
                    sub.queue_puback(m.pkid).expect("queue puback");
                    sub.flush().await.expect("flush");
                }
                got.insert(m.topic.clone());
            }
            if (1..16).all(|n| got.contains(&format!("fence/{n}"))) {
                break;
            }
        }
        let missing: Vec<u16> = (1..16)
            .filter(|n| !got.contains(&format!("fence/{n}")))
            .collect();
        assert!(
            missing.is_empty(),
            "acknowledged but not delivered: {missing:?}"
        );
    });
}
