//! No client can stall another (issue 13): well-behaved publishers and subscribers next to bad
//! neighbours (Receive Maximum 1 subscribers that never acknowledge, subscribers that stop
//! reading, clients that vanish mid-handshake, overlapping `#` subscriptions at QoS 2, clients
//! taking over each other's id). Real TCP, the workload of `ferrymq_e2e::bench::isolation`
//! (also `ferrymq-bench isolation`), against a broker in this process with small queues, so
//! the bad neighbours fill theirs within seconds.
//!
//! The property: no well-behaved PUBACK, PUBREC or SUBACK waits longer than
//! `limits.slow_subscriber_wait_ms` plus scheduling slack, and no session's in-memory queue
//! grows past `limits.max_queued_messages` (`ferrymq_queued_messages_max` on /metrics).

use std::time::Duration;

use ferrymq::config::Config;
use ferrymq::server::Server;
use ferrymq_e2e::bench::isolation::{self, Options};

const MAX_QUEUED: usize = 50;
const SLOW_WAIT_MS: u64 = 500;
/// Scheduling slack on top of the bounded wait: a loaded 2-core CI runner that also runs the
/// clients. Generous next to the stalls this catches (10 s and more).
const SLACK: Duration = Duration::from_millis(1500);

async fn start() -> Server {
    let mut config = Config::default();
    config.listeners[0].bind = "127.0.0.1:0".parse().unwrap();
    config.http.bind = "127.0.0.1:0".parse().unwrap();
    config.data_dir = tempfile::Builder::new()
        .prefix("ferrymq-isolation-")
        .tempdir()
        .unwrap()
        .keep();
    config.auth.allow_anonymous = true;
    config.limits.max_queued_messages = std::env::var("ISO_MAXQ")
        .map(|v| v.parse().unwrap())
        .unwrap_or(MAX_QUEUED);
    config.limits.slow_subscriber_wait_ms = std::env::var("ISO_SLOW")
        .map(|v| v.parse().unwrap())
        .unwrap_or(SLOW_WAIT_MS);
    config.validate().unwrap();
    Server::start(config).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn well_behaved_acks_are_bounded_next_to_bad_neighbours() {
    let server = start().await;
    let addr = server.local_addrs()[0];
    let mut opts = Options::new(
        "ci",
        Duration::from_secs(
            std::env::var("ISO_SECS")
                .map(|v| v.parse().unwrap())
                .unwrap_or(6),
        ),
    );
    opts.metrics = server.http_addr();
    let report = isolation::run(addr, &opts).await.expect("isolation run");
    println!("{}", report.lines());

    let bound = Duration::from_millis(SLOW_WAIT_MS) + SLACK;
    assert!(
        report.all.max() <= bound,
        "a well-behaved ack waited {:?} (bound {bound:?})\n{}",
        report.all.max(),
        report.lines()
    );
    // The workload really ran, and the bad neighbours were really there.
    assert!(
        report.puback.count > 20 && report.pubrec.count > 20,
        "{}",
        report.lines()
    );
    assert!(report.suback.count > 10, "{}", report.lines());
    assert!(report.good_received > 100, "{}", report.lines());
    assert!(
        report.vanished > 50 && report.takeovers > 10,
        "{}",
        report.lines()
    );
    // Their queues filled up, to the limit and not beyond.
    let queued_max = report.queued_max.expect("ferrymq_queued_messages_max");
    assert!(queued_max <= MAX_QUEUED as u64, "{}", report.lines());
    assert!(
        queued_max >= MAX_QUEUED as u64 / 2,
        "bad neighbours never filled a queue\n{}",
        report.lines()
    );
    assert!(
        report.dropped_queue_full.unwrap_or(0) > 0,
        "{}",
        report.lines()
    );
    server.shutdown().await;
}
