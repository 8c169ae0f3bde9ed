//! Helpers shared by the process-level tests: the broker binary, one test at a time, the
//! backend a test runs against (embedded, or Kafka + PostgreSQL started for the test), and the
//! publish/drain/check steps.
#![allow(dead_code)]

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ferrymq_e2e::harness::services::{require_services, Services};
use ferrymq_e2e::harness::{
    check_delivery, BrokerOptions, BrokerProcess, ConnectOptions, DeliveryCheck, Expectation,
    MsgId, Publisher, PublisherConfig, PublisherReport, Subscriber,
};
use tokio::runtime::Runtime;
use tokio::task::JoinHandle;

/// Where a test's broker keeps its state.
pub enum Backend {
    Embedded,
    /// Apache Kafka and a private PostgreSQL cluster, started for this test and stopped after it.
    KafkaPostgres(Box<Services>),
}

impl Backend {
    /// The Kafka + PostgreSQL backend, or `None` (test skipped) when the services cannot run
    /// here and `FERRYMQ_REQUIRE_SERVICES` is not set.
    pub fn kafka_postgres() -> Option<Backend> {
        if !require_services() {
            return None;
        }
        Some(Backend::KafkaPostgres(Box::new(
            Services::start().expect("starting Kafka and PostgreSQL"),
        )))
    }

    pub fn name(&self) -> &'static str {
        match self {
            Backend::Embedded => "embedded",
            Backend::KafkaPostgres(_) => "kafka+postgres",
        }
    }

    /// The config file for a broker named `name` with `extra` TOML appended.
    pub fn config(&self, name: &str, extra: &str) -> Option<String> {
        match self {
            Backend::Embedded if extra.is_empty() => None,
            Backend::Embedded => Some(extra.to_string()),
            Backend::KafkaPostgres(services) => {
                let ident: String = name
                    .chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() {
                            c.to_ascii_lowercase()
                        } else {
                            '_'
                        }
                    })
                    .collect();
                Some(format!(
                    "{}\n{extra}",
                    services.config(&format!("t_{ident}"))
                ))
            }
        }
    }

    /// Starts a broker on this backend.
    pub fn start(&self, name: &str, extra: &str) -> BrokerProcess {
        let mut opts = BrokerOptions::new(name).binary(broker_bin());
        if let Some(config) = self.config(name, extra) {
            opts = opts.config(config);
        }
        BrokerProcess::start(opts).expect("starting the broker")
    }

    pub fn services(&self) -> Option<&Services> {
        match self {
            Backend::Embedded => None,
            Backend::KafkaPostgres(s) => Some(&**s),
        }
    }

    pub fn services_mut(&mut self) -> Option<&mut Services> {
        match self {
            Backend::Embedded => None,
            Backend::KafkaPostgres(s) => Some(&mut **s),
        }
    }
}

/// The broker binary: `FERRYMQ_BIN`, or a release build made once per test binary.
pub fn broker_bin() -> PathBuf {
    ferrymq_e2e::harness::release_binary()
}

/// One crash test at a time.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Polls `cond` every 5 ms until it holds; panics with `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let started = Instant::now();
    while !cond() {
        assert!(
            started.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub fn topics(prefix: &str, publisher: u32, n: usize) -> Vec<String> {
    (0..n)
        .map(|k| format!("{prefix}/p{publisher}/t{k}"))
        .collect()
}

pub fn spawn_publisher(
    rt: &Runtime,
    cfg: PublisherConfig,
    progress: &Arc<AtomicU64>,
    addr: std::net::SocketAddr,
) -> JoinHandle<anyhow::Result<PublisherReport>> {
    rt.spawn(Publisher::new(cfg, progress.clone()).run(addr))
}

/// A publisher that reconnects to the next of `addrs` whenever its connection ends.
pub fn spawn_publisher_any(
    rt: &Runtime,
    cfg: PublisherConfig,
    progress: &Arc<AtomicU64>,
    addrs: Vec<std::net::SocketAddr>,
) -> JoinHandle<anyhow::Result<PublisherReport>> {
    rt.spawn(Publisher::new(cfg, progress.clone()).run_any(addrs))
}

pub fn join_publishers(
    rt: &Runtime,
    handles: Vec<JoinHandle<anyhow::Result<PublisherReport>>>,
    timeout: Duration,
) -> Vec<PublisherReport> {
    rt.block_on(async {
        tokio::time::timeout(timeout, async {
            let mut reports = Vec::new();
            for h in handles {
                reports.push(
                    h.await
                        .expect("publisher task panicked")
                        .expect("publisher"),
                );
            }
            reports
        })
        .await
        .expect("publishers did not finish in time")
    })
}

pub fn print_publishers(reports: &[PublisherReport]) {
    for r in reports {
        println!(
            "  publisher {}: {} acked, {} completed, {} connections, {} messages resent with DUP, \
             {} PUBREL resent, {} retried, {} rejected, {} unexpected acks, sessions lost {}, {:?}",
            r.id,
            r.acked_count(),
            r.completed,
            r.connections,
            r.resent_dup,
            r.resent_pubrel,
            r.retried(),
            r.rejected,
            r.unexpected_acks,
            r.sessions_lost,
            r.elapsed
        );
    }
}

pub fn report_drain(
    name: &str,
    sub: &Subscriber,
    session_present: bool,
    elapsed: Duration,
    check: &DeliveryCheck,
) {
    let timing = match sub.done_after {
        Some(busy) => format!(
            "all expected after {busy:?} ({:.0} msg/s)",
            sub.received.len() as f64 / busy.as_secs_f64().max(1e-3)
        ),
        None => "NOT all expected arrived".to_string(),
    };
    println!(
        "{name}: session_present={session_present} | {} delivered, {timing}, {} connections, \
         {elapsed:?} in all | {}",
        sub.received.len(),
        sub.connections,
        check.summary()
    );
}

/// Connects a persistent subscriber, reads until every `must` message arrived and then `idle`
/// passes quietly, and checks the result.
pub fn drain(
    rt: &Runtime,
    name: &str,
    addr: std::net::SocketAddr,
    opts: ConnectOptions,
    expect: &Expectation,
    idle: Duration,
) -> (Subscriber, DeliveryCheck, bool) {
    let mut sub = Subscriber::new(opts);
    let started = Instant::now();
    let ack = rt
        .block_on(sub.connect(addr, Duration::from_secs(20)))
        .expect("subscriber connect");
    let must = expect.must.clone();
    let result = rt.block_on(sub.receive_until(
        addr,
        move |s| {
            s.received.len() >= must.len() && {
                let got: HashSet<MsgId> = s.received.iter().map(|r| r.id).collect();
                must.iter().all(|id| got.contains(id))
            }
        },
        idle,
        Duration::from_secs(120),
    ));
    if let Err(e) = &result {
        println!("{name}: {e:#}");
    }
    let elapsed = started.elapsed();
    let check = check_delivery(name, &sub.received, expect);
    report_drain(name, &sub, ack.session_present, elapsed, &check);
    (sub, check, ack.session_present)
}

/// Like [`drain`] but with a fast "everything arrived" test for large runs.
pub fn drain_large(
    rt: &Runtime,
    name: &str,
    addr: std::net::SocketAddr,
    opts: ConnectOptions,
    expect: &Expectation,
) -> (Subscriber, DeliveryCheck, bool) {
    let mut sub = Subscriber::new(opts);
    let started = Instant::now();
    let ack = rt
        .block_on(sub.connect(addr, Duration::from_secs(20)))
        .expect("subscriber connect");
    let must = expect.must.len();
    let result = rt.block_on(sub.receive_until(
        addr,
        move |s| s.received.len() >= must && s.unique() >= must,
        Duration::from_secs(2),
        Duration::from_secs(150),
    ));
    if let Err(e) = &result {
        println!("{name}: {e:#}");
    }
    let elapsed = started.elapsed();
    let check = check_delivery(name, &sub.received, expect);
    report_drain(name, &sub, ack.session_present, elapsed, &check);
    (sub, check, ack.session_present)
}

pub fn ids(publisher: u32, seqs: std::ops::Range<u64>) -> Expectation {
    let mut e = Expectation {
        exactly_once: true,
        ..Default::default()
    };
    for seq in seqs {
        let id = MsgId { publisher, seq };
        e.must.insert(id);
        e.may.insert(id, 1);
    }
    e
}

pub fn publish_all(
    rt: &Runtime,
    addr: std::net::SocketAddr,
    cfg: PublisherConfig,
) -> PublisherReport {
    let progress = Arc::new(AtomicU64::new(0));
    let handle = spawn_publisher(rt, cfg, &progress, addr);
    let mut reports = join_publishers(rt, vec![handle], Duration::from_secs(60));
    let report = reports.remove(0);
    assert_eq!(report.acked_count(), report.sends.len() as u64);
    report
}
