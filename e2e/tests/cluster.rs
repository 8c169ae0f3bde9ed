//! Several active nodes (`cluster.enabled`) on one Apache Kafka and one PostgreSQL schema:
//! broker processes of the release binary, real MQTT connections, any node taking any client.
//!
//! Skipped with a message where Kafka or PostgreSQL is missing, unless
//! `FERRYMQ_REQUIRE_SERVICES=1` (set by `.ci/run`).

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use ferrymq_e2e::harness::{BrokerOptions, BrokerProcess, ConnectOptions, Connection, Incoming};

const WAIT: Duration = Duration::from_secs(15);

/// Starts node `node` of the cluster `cluster` (one schema and topic prefix per cluster).
fn start_node(backend: &Backend, cluster: &str, node: &str) -> BrokerProcess {
    let config = backend
        .config(
            cluster,
            &format!("[cluster]\nenabled = true\nnode_id = \"{node}\"\n"),
        )
        .expect("a kafka+postgres config");
    BrokerProcess::start(
        BrokerOptions::new(format!("{cluster}-{node}"))
            .binary(broker_bin())
            .config(config),
    )
    .expect("starting a cluster node")
}

async fn connect(addr: std::net::SocketAddr, opts: &ConnectOptions) -> (Connection, bool) {
    let (conn, ack) = Connection::connect(addr, opts)
        .await
        .unwrap_or_else(|e| panic!("connect {}: {e:#}", opts.client_id));
    (conn, ack.session_present)
}

/// Publishes QoS 1 messages `first..first+n` (payload `<tag>-<i>`) and waits for each PUBACK.
async fn publish_qos1(conn: &mut Connection, topic: &str, tag: &str, first: u16, n: u16) {
    for i in first..first + n {
        conn.queue_publish(topic, 1, i, false, Bytes::from(format!("{tag}-{i}")), None)
            .expect("queue");
        conn.flush().await.expect("flush");
        loop {
            match conn.recv_timeout(WAIT).await.expect("recv") {
                Some(Incoming::PubAck { pkid, ok: true, .. }) if pkid == i => break,
                Some(Incoming::PubAck {
                    ok: false, reason, ..
                }) => {
                    panic!("PUBLISH {i} refused: {reason}")
                }
                Some(_) => continue,
                None => panic!("no PUBACK for {i}"),
            }
        }
    }
}

/// Receives PUBLISHes until `want` distinct payloads arrived or nothing comes for `quiet`;
/// acknowledges each unless `ack` says no. Returns payload → (times received, DUP flags).
async fn receive(
    conn: &mut Connection,
    want: usize,
    quiet: Duration,
    mut ack: impl FnMut(&str) -> bool,
) -> BTreeMap<String, Vec<bool>> {
    let mut got: BTreeMap<String, Vec<bool>> = BTreeMap::new();
    while got.len() < want {
        match conn.recv_timeout(quiet).await {
            Ok(Some(Incoming::Publish(m))) => {
                let text = String::from_utf8_lossy(&m.payload).into_owned();
                if m.qos == 1 && ack(&text) {
                    conn.queue_puback(m.pkid).expect("queue puback");
                    conn.flush().await.expect("flush");
                }
                if m.qos == 2 {
                    conn.queue_pubrec(m.pkid).expect("queue pubrec");
                    conn.flush().await.expect("flush");
                }
                got.entry(text).or_default().push(m.dup);
            }
            Ok(Some(Incoming::PubRel { pkid, .. })) => {
                conn.queue_pubcomp(pkid).expect("queue pubcomp");
                conn.flush().await.expect("flush");
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    got
}

/// A persistent DEVICE subscriber moves from node A to node B in the middle of a QoS 1 flow
/// (five messages unacknowledged), and a publisher moves in the middle of a QoS 2 flow (after
/// PUBREC, before PUBREL; and once more with a DUP resend of the PUBLISH itself):
/// * A closes the old connection with v5 DISCONNECT 0x8E (Session taken over);
/// * B reports Session Present, redelivers the unacknowledged messages with DUP=1, and delivers
///   what was published after the move;
/// * the QoS 2 messages reach the subscriber exactly once.
#[test]
fn takeover_between_nodes_mid_qos1_and_qos2_flows() {
    let _serial = serial();
    let Some(backend) = Backend::kafka_postgres() else {
        return;
    };
    let rt = runtime();
    let a = start_node(&backend, "takeover", "node-a");
    let b = start_node(&backend, "takeover", "node-b");
    rt.block_on(async {
        let sub = ConnectOptions::v5("mover")
            .persistent()
            .receive_maximum(100);
        let (mut on_a, present) = connect(a.addr(), &sub).await;
        assert!(!present);
        on_a.subscribe(1, &[("move/#", 1)], WAIT)
            .await
            .expect("subscribe");

        // 20 messages through node A; the subscriber acknowledges all but the last five.
        let (mut publisher, _) = connect(a.addr(), &ConnectOptions::v5("mover-pub")).await;
        publish_qos1(&mut publisher, "move/1", "m", 1, 20).await;
        let unacked = |t: &str| {
            t.strip_prefix("m-")
                .and_then(|n| n.parse::<u16>().ok())
                .is_some_and(|n| n > 15)
        };
        let first = receive(&mut on_a, 20, WAIT, |t| !unacked(t)).await;
        assert_eq!(first.len(), 20, "node A delivered {first:?}");

        // The same client id connects to node B: A lets go, B continues the session.
        let started = Instant::now();
        let (mut on_b, present) = connect(b.addr(), &sub).await;
        println!("takeover across nodes took {:?}", started.elapsed());
        assert!(present, "node B did not continue the session");
        let closed = on_a.recv_timeout(WAIT).await;
        match closed {
            Ok(Some(Incoming::Disconnect { reason })) => {
                assert!(reason.contains("SessionTakenOver"), "reason {reason}")
            }
            other => panic!("node A did not send DISCONNECT 0x8E: {other:?}"),
        }

        publish_qos1(&mut publisher, "move/1", "m", 21, 10).await;
        let second = receive(&mut on_b, 15, WAIT, |_| true).await;
        for n in 16..=20 {
            let dups = second
                .get(&format!("m-{n}"))
                .unwrap_or_else(|| panic!("unacknowledged m-{n} not redelivered: {second:?}"));
            assert_eq!(dups, &vec![true], "m-{n} must come once more, with DUP");
        }
        for n in 21..=30 {
            assert_eq!(
                second.get(&format!("m-{n}")).map(Vec::len),
                Some(1),
                "m-{n} after the move: {second:?}"
            );
        }
        for n in 1..=15 {
            assert!(
                !second.contains_key(&format!("m-{n}")),
                "acknowledged m-{n} delivered again: {second:?}"
            );
        }

        // QoS 2: PUBREC on node A, PUBREL on node B.
        let p2 = ConnectOptions::v5("mover-q2").persistent();
        let (mut q2_a, _) = connect(a.addr(), &p2).await;
        for (pkid, text) in [(7u16, "q2-released-on-b"), (8, "q2-resent-on-b")] {
            q2_a.queue_publish("move/q2", 2, pkid, false, Bytes::from(text), None)
                .expect("queue");
            q2_a.flush().await.expect("flush");
            match q2_a.recv_timeout(WAIT).await.expect("recv") {
                Some(Incoming::PubRec {
                    pkid: p, ok: true, ..
                }) if p == pkid => {}
                other => panic!("no PUBREC for {pkid}: {other:?}"),
            }
        }
        let (mut q2_b, present) = connect(b.addr(), &p2).await;
        assert!(present);
        // The client lost the PUBREC of 8: it sends the PUBLISH again, with DUP.
        q2_b.queue_publish("move/q2", 2, 8, true, Bytes::from("q2-resent-on-b"), None)
            .expect("queue");
        q2_b.flush().await.expect("flush");
        match q2_b.recv_timeout(WAIT).await.expect("recv") {
            Some(Incoming::PubRec {
                pkid: 8, ok: true, ..
            }) => {}
            other => panic!("no PUBREC for the resent 8: {other:?}"),
        }
        for pkid in [7u16, 8] {
            q2_b.queue_pubrel(pkid).expect("queue");
            q2_b.flush().await.expect("flush");
            match q2_b.recv_timeout(WAIT).await.expect("recv") {
                Some(Incoming::PubComp { pkid: p, ok: true }) if p == pkid => {}
                other => panic!("no PUBCOMP for {pkid}: {other:?}"),
            }
        }
        let third = receive(&mut on_b, 3, Duration::from_secs(5), |_| true).await;
        assert_eq!(
            third.get("q2-released-on-b").map(Vec::len),
            Some(1),
            "{third:?}"
        );
        assert_eq!(
            third.get("q2-resent-on-b").map(Vec::len),
            Some(1),
            "{third:?}"
        );
    });
    drop((a, b));
}

/// A persistent session that subscribed on node A, went offline, and is published to through
/// node B gets its messages when it comes back on node C: every node's dispatcher knows every
/// persistent session's subscriptions (the session directory), and a subscription acknowledged
/// on one node is in force for a PUBLISH that another node acknowledges after it.
#[test]
fn a_subscription_on_one_node_is_in_force_on_the_others() {
    let _serial = serial();
    let Some(backend) = Backend::kafka_postgres() else {
        return;
    };
    let rt = runtime();
    let a = start_node(&backend, "directory", "node-a");
    let b = start_node(&backend, "directory", "node-b");
    let c = start_node(&backend, "directory", "node-c");
    rt.block_on(async {
        let device = ConnectOptions::v311("roamer").persistent();
        let (mut on_a, _) = connect(a.addr(), &device).await;
        on_a.subscribe(1, &[("roam/#", 1)], WAIT)
            .await
            .expect("subscribe");
        // Right after the SUBACK, through another node.
        let (mut publisher, _) = connect(b.addr(), &ConnectOptions::v311("roam-pub")).await;
        publish_qos1(&mut publisher, "roam/x", "r", 1, 5).await;
        let online = receive(&mut on_a, 5, WAIT, |_| true).await;
        assert_eq!(online.len(), 5, "online on node A: {online:?}");
        on_a.disconnect().await.expect("disconnect");

        publish_qos1(&mut publisher, "roam/x", "r", 6, 5).await;
        let (mut on_c, present) = connect(c.addr(), &device).await;
        assert!(present, "node C did not find the session");
        let offline = receive(&mut on_c, 5, WAIT, |_| true).await;
        let want: std::collections::BTreeSet<String> = (6..=10).map(|i| format!("r-{i}")).collect();
        assert_eq!(
            offline
                .keys()
                .cloned()
                .collect::<std::collections::BTreeSet<_>>(),
            want,
            "queued while offline: {offline:?}"
        );
        assert!(offline.values().all(|d| d.len() == 1), "{offline:?}");
    });
    drop((a, b, c));
}
