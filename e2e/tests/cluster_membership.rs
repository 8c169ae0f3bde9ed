//! Three active broker processes on one Kafka cluster and one PostgreSQL schema
//! (`cluster.enabled = true`, issue 14) while nodes come and go under load:
//!
//! * a rolling restart of all three nodes one by one (SIGTERM with a drain, then start again),
//!   followed by a SIGKILL of one node mid-stream;
//! * scale 1 → 3 → 1 (two nodes join, later two leave with SIGTERM).
//!
//! Publishers are persistent sessions that reconnect to the next node whenever their connection
//! ends (as behind a load balancer), so their sessions move between nodes mid-flow. An offline
//! DEVICE subscriber and an APPLICATION client subscribed on one node are drained on another at
//! the end: every acknowledged message reaches both, exactly once apart from the copies the
//! publishers' own resends explain, in order per publisher.
//!
//! Skipped with a message where Kafka or PostgreSQL is missing, unless
//! `FERRYMQ_REQUIRE_SERVICES=1`.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use ferrymq_e2e::harness::{
    persistent, subscribe_and_leave, BrokerOptions, BrokerProcess, ConnectOptions, Expectation,
    Protocol, PublisherConfig, PublisherReport,
};
use tokio::runtime::Runtime;
use tokio::task::JoinHandle;

/// Partitions of `<prefix>.msg.all` in the test config (the default).
const ALL_PARTITIONS: &str = "[0, 1, 2, 3]";

/// The log lines of `broker` that say it claimed publish-log partitions (kept across starts).
fn claim_lines(broker: &BrokerProcess) -> Vec<String> {
    std::fs::read_to_string(broker.log_path())
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("publish log partitions claimed"))
        .map(str::to_owned)
        .collect()
}

/// One test's cluster: its nodes' options and the clients every test drains at the end.
struct Scenario {
    name: &'static str,
    backend: Backend,
    rt: Runtime,
    progress: Arc<AtomicU64>,
    device: ConnectOptions,
    app: ConnectOptions,
}

impl Scenario {
    fn new(name: &'static str) -> Option<Scenario> {
        let backend = Backend::kafka_postgres()?;
        Some(Scenario {
            name,
            backend,
            rt: runtime(),
            progress: Arc::new(AtomicU64::new(0)),
            device: persistent(&format!("{name}-device"), Protocol::V311),
            app: persistent(&format!("{name}-app"), Protocol::V5),
        })
    }

    fn start_node(&self, id: &str) -> BrokerProcess {
        let node = self.spawn_node(id);
        wait_until(&format!("node {id} ready"), Duration::from_secs(90), || {
            node.is_ready()
        });
        node
    }

    fn spawn_node(&self, id: &str) -> BrokerProcess {
        let config = self
            .backend
            .config(
                self.name,
                &format!(
                    "[cluster]\nenabled = true\nnode_id = \"{id}\"\n\n\
                     [shutdown]\ndrain_secs = 2\n\n\
                     [device]\nqueue_limit = 200000\n\n\
                     [[application_clients]]\nclient_id = \"{}-app\"\n",
                    self.name
                ),
            )
            .expect("config");
        BrokerProcess::start(
            BrokerOptions::new(format!("{}-{id}", self.name))
                .binary(broker_bin())
                .config(config),
        )
        .expect("start node")
    }

    /// Starts every node at once (they race to create the schema and the topics, as pods of a
    /// StatefulSet with parallel pod management do) and waits until all are ready.
    fn start_nodes(&self, ids: &[&str]) -> Vec<BrokerProcess> {
        // `BrokerProcess::start` waits for the listener: one thread per node, so that their
        // starts overlap.
        let nodes: Vec<BrokerProcess> = std::thread::scope(|scope| {
            let starting: Vec<_> = ids
                .iter()
                .map(|id| scope.spawn(move || self.spawn_node(id)))
                .collect();
            starting
                .into_iter()
                .map(|t| t.join().expect("starting a node panicked"))
                .collect()
        });
        for (id, node) in ids.iter().zip(&nodes) {
            wait_until(&format!("node {id} ready"), Duration::from_secs(90), || {
                node.is_ready()
            });
        }
        nodes
    }

    /// The DEVICE and APPLICATION subscriptions, made on `addr` and left offline.
    fn subscribe(&self, addr: SocketAddr) {
        let filter = format!("{}/#", self.name);
        for client in [&self.device, &self.app] {
            self.rt
                .block_on(subscribe_and_leave(addr, client, &[(filter.as_str(), 1)]))
                .expect("subscribe");
        }
    }

    /// A QoS 1 publisher that starts on `addrs[0]` and moves on to the next address whenever
    /// its connection ends.
    fn publisher(
        &self,
        id: u32,
        count: u64,
        addrs: Vec<SocketAddr>,
    ) -> JoinHandle<anyhow::Result<PublisherReport>> {
        let mut cfg = PublisherConfig::new(
            id,
            persistent(&format!("{}-pub-{id}", self.name), Protocol::V5),
            1,
            count,
            topics(self.name, id, 2),
        );
        // About 40 messages a second per publisher, so that the load lasts through every
        // restart, kill and scale step of the test.
        cfg.window = 1;
        cfg.pace = Duration::from_millis(20);
        cfg.reconnect_deadline = Duration::from_secs(180);
        cfg.ack_timeout = Duration::from_secs(30);
        spawn_publisher_any(&self.rt, cfg, &self.progress, addrs)
    }

    fn wait_acks(&self, at_least: u64) {
        wait_until(
            &format!("{at_least} acknowledged messages"),
            Duration::from_secs(240),
            || self.progress.load(Ordering::Relaxed) >= at_least,
        );
    }

    /// Fails when the publishers already finished: a step meant to happen under load did not.
    fn assert_under_load(&self, total: u64, step: &str) {
        let done = self.progress.load(Ordering::Relaxed);
        assert!(
            done < total,
            "{step}: the publishers had already finished ({done} of {total} acknowledged)"
        );
        println!("{step} with {done} of {total} acknowledged");
    }

    /// Joins the publishers and drains the DEVICE and APPLICATION subscribers on `addr`: every
    /// acknowledged message arrives, none twice beyond the publishers' resends.
    fn verify(
        &self,
        handles: Vec<JoinHandle<anyhow::Result<PublisherReport>>>,
        total: u64,
        addr: SocketAddr,
    ) {
        let reports = join_publishers(&self.rt, handles, Duration::from_secs(420));
        print_publishers(&reports);
        let expect = Expectation::from_reports(&reports);
        assert_eq!(
            expect.must.len() as u64,
            total,
            "not every message was acknowledged"
        );
        for client in [&self.device, &self.app] {
            let name = client.client_id.clone();
            let (_, check, present) = drain(
                &self.rt,
                &name,
                addr,
                client.clone(),
                &expect,
                Duration::from_secs(5),
            );
            assert!(present, "{name}: the session is gone");
            assert_eq!(check.missing, 0, "{}", check.summary());
            assert_eq!(check.dup_unexplained, 0, "{}", check.summary());
            assert!(check.ok(), "{}", check.summary());
        }
    }
}

/// The three nodes start together on an empty schema. Each node in turn is stopped with SIGTERM (its clients drained over 2 s) and started again
/// while 4 publishers run; then one node is killed with SIGKILL mid-stream and its clients
/// reconnect to the others. The DEVICE and APPLICATION subscribers made on node a are drained
/// on node c.
#[test]
fn rolling_restart_and_a_kill_of_three_nodes_under_load_lose_nothing() {
    let _serial = serial();
    let Some(s) = Scenario::new("cluster-roll") else {
        return;
    };
    const PUBLISHERS: u32 = 4;
    const PER_PUBLISHER: u64 = 2_500;
    let total = u64::from(PUBLISHERS) * PER_PUBLISHER;
    let mut nodes = s.start_nodes(&["a", "b", "c"]);
    s.subscribe(nodes[0].addr());
    let addrs: Vec<SocketAddr> = nodes.iter().map(BrokerProcess::addr).collect();
    let handles: Vec<_> = (0..PUBLISHERS)
        .map(|p| {
            let mut rotated = addrs.clone();
            rotated.rotate_left(p as usize % addrs.len());
            s.publisher(p, PER_PUBLISHER, rotated)
        })
        .collect();

    let started = Instant::now();
    for (i, node) in nodes.iter_mut().enumerate() {
        s.wait_acks(total * (i as u64 + 1) / 6);
        let claims = claim_lines(node).len();
        s.assert_under_load(total, &format!("rolling restart of node {i}"));
        let status = node.stop().expect("SIGTERM");
        assert!(status.success(), "node {i} exited with {status} on SIGTERM");
        node.restart().expect("restart");
        wait_until("the node ready again", Duration::from_secs(90), || {
            node.is_ready()
        });
        wait_until(
            "the node to claim partitions again",
            Duration::from_secs(90),
            || claim_lines(node).len() > claims,
        );
        println!("node {i} rolled, {:?} into the run", started.elapsed());
    }

    s.wait_acks(total * 4 / 6);
    s.assert_under_load(total, "kill -9 of node b");
    nodes[1].kill_9().expect("kill -9 node b");
    let killed = Instant::now();
    wait_until(
        "the other nodes to claim b's partitions",
        Duration::from_secs(90),
        || {
            let a = claim_lines(&nodes[0]);
            let c = claim_lines(&nodes[2]);
            // After the rebalance a and c hold all four partitions between them.
            let last = |lines: &[String]| lines.last().cloned().unwrap_or_default();
            let (la, lc) = (last(&a), last(&c));
            (0..4).all(|p| {
                let needle = p.to_string();
                partitions_of(&la).contains(&needle) || partitions_of(&lc).contains(&needle)
            })
        },
    );
    println!(
        "a and c route every partition {:?} after the kill",
        killed.elapsed()
    );
    s.verify(handles, total, nodes[2].addr());
}

/// The partition numbers in a "publish log partitions claimed" log line.
fn partitions_of(line: &str) -> Vec<String> {
    let Some(start) = line.find("partitions=[").map(|i| i + "partitions=".len()) else {
        return Vec::new();
    };
    let Some(end) = line[start..].find(']') else {
        return Vec::new();
    };
    line[start + 1..start + end]
        .split(',')
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
        .collect()
}

/// One node under load; two more join (the partitions spread over three), later those two
/// leave with SIGTERM (node a routes every partition again). Publishers started after the
/// scale-up begin on the new nodes and follow their sessions back to node a.
#[test]
fn scale_one_to_three_and_back_under_load_loses_nothing() {
    let _serial = serial();
    let Some(s) = Scenario::new("cluster-scale") else {
        return;
    };
    const PER_PUBLISHER: u64 = 2_500;
    let total = 4 * PER_PUBLISHER;
    let a = s.start_node("a");
    s.subscribe(a.addr());
    let mut handles = vec![
        s.publisher(0, PER_PUBLISHER, vec![a.addr()]),
        s.publisher(1, PER_PUBLISHER, vec![a.addr()]),
    ];
    s.wait_acks(total / 8);

    s.assert_under_load(total, "scale 1 -> 3");
    let mut b = s.start_node("b");
    let mut c = s.start_node("c");
    wait_until(
        "the new nodes to claim partitions",
        Duration::from_secs(90),
        || !claim_lines(&b).is_empty() && !claim_lines(&c).is_empty(),
    );
    println!("scaled to 3");
    handles.push(s.publisher(2, PER_PUBLISHER, vec![b.addr(), a.addr()]));
    handles.push(s.publisher(3, PER_PUBLISHER, vec![c.addr(), a.addr()]));
    s.wait_acks(total / 2);

    let a_claims = claim_lines(&a).len();
    s.assert_under_load(total, "scale 3 -> 1");
    for node in [&mut c, &mut b] {
        let status = node.stop().expect("SIGTERM");
        assert!(status.success(), "a leaving node exited with {status}");
    }
    wait_until(
        "node a to claim every partition again",
        Duration::from_secs(90),
        || {
            claim_lines(&a)
                .iter()
                .skip(a_claims)
                .any(|l| l.contains(ALL_PARTITIONS))
        },
    );
    println!("scaled back to 1");
    s.verify(handles, total, a.addr());
}
