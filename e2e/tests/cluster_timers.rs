//! Several active nodes (`cluster.enabled`): a disconnected persistent session's delayed will
//! and its expiry fire once for the whole cluster (`cluster::timers`), on whichever node is
//! alive, and a client that comes back first cancels both.
//!
//! Every node mirrors every persistent session, so a timer kept in each node's memory would
//! fire once per node (a subscriber would get the will three times), and one kept only on the
//! node where the connection ended would die with that node. The test therefore kills that node
//! and counts copies at subscribers on the two others: clean subscribers (each node's local
//! reader delivers) and a persistent DEVICE subscriber (stored by the dispatcher).
//!
//! Skipped with a message where Kafka or PostgreSQL is missing, unless
//! `FERRYMQ_REQUIRE_SERVICES=1`.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use ferrymq_e2e::harness::{
    BrokerOptions, BrokerProcess, ConnectOptions, Connection, Incoming, WillOptions,
};

const FENCE_AFTER_SECS: u64 = 3;
/// `cluster::lease::lease(FENCE_AFTER_SECS)`: how long a dead node's row lives on.
const LEASE: Duration = Duration::from_secs(FENCE_AFTER_SECS + 15);

const CLUSTER: &str = "cluster-timers";

fn start_node(backend: &Backend, node: &str) -> BrokerProcess {
    start_node_with(backend, node, "")
}

/// A node with `extra` lines in its `[cluster]` section.
fn start_node_with(backend: &Backend, node: &str, extra: &str) -> BrokerProcess {
    let config = backend
        .config(
            CLUSTER,
            &format!("[cluster]\nenabled = true\nnode_id = \"{node}\"\n{extra}\n"),
        )
        .expect("a kafka+postgres config");
    BrokerProcess::start(
        BrokerOptions::new(format!("{CLUSTER}-{node}"))
            .binary(broker_bin())
            .config(config),
    )
    .expect("starting a cluster node")
}

/// A v5 persistent client with a will on `wills/<id>` (payload = the id).
fn with_will(id: &str, expiry: u32, delay: u32) -> ConnectOptions {
    ConnectOptions::v5(id)
        .persistent()
        .session_expiry(expiry)
        .will(WillOptions {
            topic: format!("wills/{id}"),
            payload: Bytes::from(id.to_string()),
            qos: 1,
            delay_secs: Some(delay),
        })
}

async fn connect(addr: std::net::SocketAddr, opts: &ConnectOptions) -> (Connection, bool) {
    let (conn, ack) = Connection::connect(addr, opts)
        .await
        .unwrap_or_else(|e| panic!("connect {}: {e:#}", opts.client_id));
    (conn, ack.session_present)
}

/// Collects will payloads (acknowledging QoS 1) until `until`; payload → copies received.
async fn collect(conn: &mut Connection, until: Instant, got: &mut BTreeMap<String, u32>) {
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        match conn.recv_timeout(left).await {
            Ok(Some(Incoming::Publish(m))) => {
                if m.qos == 1 {
                    conn.queue_puback(m.pkid).expect("queue puback");
                    conn.flush().await.expect("flush");
                }
                *got.entry(String::from_utf8_lossy(&m.payload).into_owned())
                    .or_default() += 1;
            }
            Ok(Some(_)) => {}
            Ok(None) => return,
            Err(e) => panic!("subscriber connection failed: {e:#}"),
        }
    }
}

/// * `w1` (will delay 2 s, expiry 8 s) drops its connection on node A, and A is killed with
///   SIGKILL right after: the will still comes, once, from B or C; after the expiry the session
///   is gone (a reconnect finds no session).
/// * `w2` (will delay 3 s) drops its connection on B and reconnects on C after 1 s: Session
///   Present, and its will never comes.
/// * `w3` (will delay 100 s, expiry 3 s) drops its connection on B: the session ends first, so
///   the will comes at the expiry, once.
///
/// Every subscriber (clean on B, clean on C, persistent DEVICE on C) gets `w1` and `w3` exactly
/// once and `w2` never.
#[test]
fn delayed_wills_and_expiry_fire_once_for_the_cluster_even_when_their_node_dies() {
    let _serial = serial();
    let Some(backend) = Backend::kafka_postgres() else {
        return;
    };
    let rt = runtime();
    let (mut a, b, c) = std::thread::scope(|s| {
        let a = s.spawn(|| start_node(&backend, "a"));
        let b = s.spawn(|| start_node(&backend, "b"));
        let c = s.spawn(|| start_node(&backend, "c"));
        (
            a.join().expect("node a"),
            b.join().expect("node b"),
            c.join().expect("node c"),
        )
    });
    rt.block_on(async {
        let (mut clean_b, _) = connect(b.addr(), &ConnectOptions::v5("clean-b")).await;
        clean_b
            .subscribe(1, &[("wills/#", 1)], Duration::from_secs(15))
            .await
            .expect("subscribe");
        let (mut clean_c, _) = connect(c.addr(), &ConnectOptions::v5("clean-c")).await;
        clean_c
            .subscribe(1, &[("wills/#", 1)], Duration::from_secs(15))
            .await
            .expect("subscribe");
        let device_opts = ConnectOptions::v5("device-c").persistent();
        let (mut device_c, _) = connect(c.addr(), &device_opts).await;
        device_c
            .subscribe(1, &[("wills/#", 1)], Duration::from_secs(15))
            .await
            .expect("subscribe");

        let (w1, present) = connect(a.addr(), &with_will("w1", 8, 2)).await;
        assert!(!present);
        let (w2, _) = connect(b.addr(), &with_will("w2", 60, 3)).await;
        let (w3, _) = connect(b.addr(), &with_will("w3", 3, 100)).await;
        // Connections end without DISCONNECT: every will is owed.
        let dropped = Instant::now();
        drop(w1);
        drop(w2);
        drop(w3);
        // The disconnect (with its timers) is written without anyone waiting for it; give it
        // a moment to commit before the node dies.
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        a.kill_9().expect("kill node a");
        eprintln!("node a killed {:?} after the drops", dropped.elapsed());

        let (w2_back, present) = connect(c.addr(), &with_will("w2", 60, 3)).await;
        assert!(
            present,
            "w2 came back within its will delay: Session Present"
        );
        eprintln!("w2 back on node c {:?} after its drop", dropped.elapsed());

        // w1 is due at 2 s, w3 at 3 s, w2 would have been at 3 s; then 6 s more to see doubles.
        let until = dropped + Duration::from_secs(12);
        let mut got: [BTreeMap<String, u32>; 3] = Default::default();
        let [g_b, g_c, g_d] = &mut got;
        tokio::join!(
            collect(&mut clean_b, until, g_b),
            collect(&mut clean_c, until, g_c),
            collect(&mut device_c, until, g_d),
        );
        for (who, got) in ["clean on b", "clean on c", "device on c"].iter().zip(&got) {
            eprintln!("{who}: {got:?}");
            assert_eq!(got.get("w1"), Some(&1), "{who}: w1's will once");
            assert_eq!(
                got.get("w3"),
                Some(&1),
                "{who}: w3's will once, at its expiry"
            );
            assert_eq!(got.get("w2"), None, "{who}: w2 came back: no will");
        }

        // w1's session expired 8 s after its drop.
        let left = (dropped + Duration::from_secs(10)).saturating_duration_since(Instant::now());
        tokio::time::sleep(left).await;
        let (_w1_again, present) = connect(b.addr(), &with_will("w1", 8, 2)).await;
        assert!(!present, "w1's session expired: no Session Present");
        let (_w3_again, present) = connect(c.addr(), &with_will("w3", 3, 100)).await;
        assert!(!present, "w3's session expired: no Session Present");
        drop(w2_back);
    });
    drop((b, c));
}

/// A node killed with SIGKILL and never started again (scaled away while down): once its lease
/// lapses, another node closes what it held, as it would have at a restart.
/// * `p` (persistent, expiry 5 s) was connected to A: its session expires 5 s after A's lease
///   lapsed (a reconnect then finds no session), while `q` (expiry 10 min) keeps its session.
/// * `m1` on A and `m2` on B are clean members of one shared group: once A's lease lapsed,
///   every message published goes to `m2` (before, `m1` kept its share of the picks, lost).
#[test]
fn a_dead_nodes_sessions_are_closed_when_its_lease_lapses() {
    let _serial = serial();
    let Some(backend) = Backend::kafka_postgres() else {
        return;
    };
    let rt = runtime();
    let extra = format!("fence_after_secs = {FENCE_AFTER_SECS}");
    let (mut a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| start_node_with(&backend, "a", &extra));
        let b = s.spawn(|| start_node_with(&backend, "b", &extra));
        (a.join().expect("node a"), b.join().expect("node b"))
    });
    rt.block_on(async {
        let wait = Duration::from_secs(15);
        let p_opts = ConnectOptions::v5("p").persistent().session_expiry(5);
        let q_opts = ConnectOptions::v5("q").persistent().session_expiry(600);
        let (_p, _) = connect(a.addr(), &p_opts).await;
        let (_q, _) = connect(a.addr(), &q_opts).await;
        let (mut m1, _) = connect(a.addr(), &ConnectOptions::v5("m1")).await;
        m1.subscribe(1, &[("$share/g/lease/#", 1)], wait)
            .await
            .expect("subscribe m1");
        let (mut m2, _) = connect(b.addr(), &ConnectOptions::v5("m2")).await;
        m2.subscribe(1, &[("$share/g/lease/#", 1)], wait)
            .await
            .expect("subscribe m2");

        a.kill_9().expect("kill node a");
        let killed = Instant::now();
        drop(m1);
        // A's last renewal was at most a second before the kill; B looks every second.
        tokio::time::sleep(LEASE + Duration::from_secs(2)).await;

        let (mut publisher, _) = connect(b.addr(), &ConnectOptions::v5("pub")).await;
        for i in 1..=50u16 {
            publisher
                .queue_publish("lease/x", 1, i, false, Bytes::from(format!("m{i}")), None)
                .expect("queue");
            publisher.flush().await.expect("flush");
            match publisher.recv_timeout(wait).await.expect("recv") {
                Some(Incoming::PubAck { ok: true, .. }) => {}
                other => panic!("PUBLISH {i} not acknowledged: {other:?}"),
            }
        }
        let mut got = BTreeMap::new();
        collect(&mut m2, Instant::now() + Duration::from_secs(5), &mut got).await;
        eprintln!(
            "m2 got {} distinct of 50 published {:?} after the kill",
            got.len(),
            killed.elapsed()
        );
        assert_eq!(got.len(), 50, "every message to the live member: {got:?}");
        assert!(got.values().all(|&n| n == 1), "each once: {got:?}");

        // p's expiry (5 s) started when B closed A's sessions, within about a second of the
        // lapse; its timer fires within the poll after.
        let left =
            (killed + LEASE + Duration::from_secs(10)).saturating_duration_since(Instant::now());
        tokio::time::sleep(left).await;
        let (_p_again, present) = connect(b.addr(), &p_opts).await;
        assert!(!present, "p's session expired after A's lease lapsed");
        let (_q_again, present) = connect(b.addr(), &q_opts).await;
        assert!(present, "q's session is kept (its expiry has not passed)");
        eprintln!("checked {:?} after the kill", killed.elapsed());
    });
    drop(b);
}
