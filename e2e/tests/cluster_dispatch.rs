//! Two active broker processes on one Kafka cluster and one PostgreSQL schema
//! (`cluster.enabled = true`, issue 14): the partitions of `<prefix>.msg.all` are shared through
//! the consumer group `<prefix>.router`, each claimed with an epoch in PostgreSQL, and DEVICE
//! queues get every acknowledged message exactly once while partitions move between the nodes
//! (a node killed with SIGKILL mid-stream, then started again).
//!
//! The cross-node session directory is not part of this test: the DEVICE sessions are created
//! before the second node starts, so both load them from PostgreSQL at start.
//!
//! Skipped with a message where Kafka or PostgreSQL is missing, unless
//! `FERRYMQ_REQUIRE_SERVICES=1`.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use ferrymq_e2e::harness::{
    persistent, subscribe_and_leave, BrokerOptions, BrokerProcess, Expectation, Protocol,
    PublisherConfig,
};

/// How many times the node logged that it claimed publish-log partitions (the log is kept
/// across restarts).
fn claims(broker: &BrokerProcess) -> usize {
    std::fs::read_to_string(broker.log_path())
        .unwrap_or_default()
        .matches("publish log partitions claimed")
        .count()
}

/// Node A takes DEVICE subscriptions, node B joins; 4 publishers (2 on each node) publish
/// numbered QoS 1 messages; A is killed with SIGKILL mid-stream (B takes all partitions) and
/// started again (they are shared again), with two more publishers on B for each move. Every acknowledged message reaches each DEVICE
/// subscriber, reconnecting to B, exactly once apart from the copies the publishers' own
/// resends explain, in order per publisher.
#[test]
fn device_queues_get_every_message_once_while_partitions_move() {
    let _serial = serial();
    let Some(backend) = Backend::kafka_postgres() else {
        return;
    };
    const PUBLISHERS: u32 = 4;
    /// Two more publishers on B right after the kill (while A's partitions wait for the group
    /// to notice) and two more just before A comes back (during the second rebalance).
    const WAVES: u32 = 2;
    const PER_WAVE: u32 = 2;
    const PER_PUBLISHER: u64 = 1_500;
    const SUBSCRIBERS: usize = 2;
    let total = (PUBLISHERS + WAVES * PER_WAVE) as u64 * PER_PUBLISHER;
    let rt = runtime();
    let node = |id: &str| {
        let config = backend
            .config(
                "cluster-dispatch",
                &format!(
                    "[cluster]\nenabled = true\nnode_id = \"{id}\"\n\n[device]\nqueue_limit = 100000\n"
                ),
            )
            .expect("config");
        BrokerOptions::new(format!("cluster-dispatch-{id}"))
            .binary(broker_bin())
            .config(config)
    };
    let mut a = BrokerProcess::start(node("a")).expect("node a");
    wait_until("node a ready", Duration::from_secs(60), || a.is_ready());
    let subscribers: Vec<_> = (0..SUBSCRIBERS)
        .map(|i| persistent(&format!("cd-device-{i}"), Protocol::V311))
        .collect();
    for s in &subscribers {
        rt.block_on(subscribe_and_leave(a.addr(), s, &[("cd/#", 1)]))
            .expect("device subscribe");
    }
    let b = BrokerProcess::start(node("b")).expect("node b");
    wait_until("node b ready", Duration::from_secs(60), || b.is_ready());
    wait_until(
        "both nodes to claim publish-log partitions",
        Duration::from_secs(60),
        || claims(&a) > 0 && claims(&b) > 0,
    );

    let progress = Arc::new(AtomicU64::new(0));
    let publisher = |p: u32, addr| {
        let mut cfg = PublisherConfig::new(
            p,
            persistent(&format!("cd-pub-{p}"), Protocol::V311),
            1,
            PER_PUBLISHER,
            topics("cd", p, 2),
        );
        cfg.reconnect_deadline = Duration::from_secs(120);
        spawn_publisher(&rt, cfg, &progress, addr)
    };
    let mut handles: Vec<_> = (0..PUBLISHERS)
        .map(|p| publisher(p, if p % 2 == 0 { a.addr() } else { b.addr() }))
        .collect();
    wait_until("a sixth of the acks", Duration::from_secs(120), || {
        progress.load(Ordering::Relaxed) >= total / 6
    });
    a.kill_9().expect("kill -9 node a");
    let killed = Instant::now();
    handles.extend((0..PER_WAVE).map(|i| publisher(PUBLISHERS + i, b.addr())));
    // B takes every partition once the group notices A is gone (session timeout).
    wait_until(
        "node b to claim every partition",
        Duration::from_secs(90),
        || {
            std::fs::read_to_string(b.log_path())
                .unwrap_or_default()
                .lines()
                .any(|l| l.contains("publish log partitions claimed") && l.contains("[0, 1, 2, 3]"))
        },
    );
    println!(
        "node b routes every partition {:?} after the kill",
        killed.elapsed()
    );
    let a_claims = claims(&a);
    handles.extend((0..PER_WAVE).map(|i| publisher(PUBLISHERS + PER_WAVE + i, b.addr())));
    a.restart().expect("restart node a");
    wait_until("node a ready again", Duration::from_secs(60), || {
        a.is_ready()
    });
    wait_until(
        "node a to claim partitions again",
        Duration::from_secs(90),
        || claims(&a) > a_claims,
    );
    println!("node a routes again {:?} after the kill", killed.elapsed());

    let reports = join_publishers(&rt, handles, Duration::from_secs(240));
    print_publishers(&reports);
    let expect = Expectation::from_reports(&reports);
    assert_eq!(
        expect.must.len() as u64,
        total,
        "not every message was acknowledged"
    );
    // Waking an online DEVICE session on another node is not part of this change: the
    // subscribers connect once the dispatchers stored everything (the queues stop growing).
    let pg = &backend.services().expect("services").postgres;
    let queued = || -> u64 {
        pg.psql("SELECT count(*) FROM t_cluster_dispatch.device_queue")
            .ok()
            .and_then(|o| o.trim().parse().ok())
            .unwrap_or(0)
    };
    let mut last = (queued(), Instant::now());
    wait_until(
        "the DEVICE queues to be stored",
        Duration::from_secs(120),
        || {
            let now = queued();
            if now != last.0 {
                last = (now, Instant::now());
            }
            now >= SUBSCRIBERS as u64 * total && last.1.elapsed() > Duration::from_secs(2)
        },
    );
    println!("{} DEVICE entries stored", last.0);
    for s in subscribers {
        let name = s.client_id.clone();
        let (_, check, present) = drain(&rt, &name, b.addr(), s, &expect, Duration::from_secs(3));
        assert!(present, "{name}: the DEVICE session is gone");
        assert!(check.ok(), "{}", check.summary());
        assert_eq!(check.missing, 0, "{}", check.summary());
        assert_eq!(check.dup_unexplained, 0, "{}", check.summary());
    }
    let b_log = b.log_tail(2_000);
    assert!(
        !b_log.contains("router cannot store a batch"),
        "node b failed to store router batches:\n{b_log}"
    );
}
