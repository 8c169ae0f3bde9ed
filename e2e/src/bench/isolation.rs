//! Client isolation under adversarial load: well-behaved publishers and subscribers next to "bad
//! neighbours", measuring how long the well-behaved clients wait for PUBACK, PUBREC and SUBACK.
//!
//! The bad neighbours:
//! * Receive Maximum 1 subscribers that never acknowledge (QoS 2 on `iso/<run>/#`);
//! * subscribers that stop reading their socket;
//! * clients that connect and vanish mid-handshake (half a CONNECT, or CONNECT and gone);
//! * overlapping `#` subscriptions at QoS 2 (one client, several filters matching everything);
//! * pairs of clients that keep taking over each other's client id;
//! * a publisher of retained messages over hundreds of topics, and short-lived Receive Maximum 1
//!   wildcard subscribers (some with persistent sessions) that take one message and leave.
//!
//! A broker isolates clients when no well-behaved client's ack waits longer than
//! `limits.slow_subscriber_wait_ms` (the bounded wait for a full subscriber queue) plus
//! scheduling slack, and the bad neighbours' in-memory queues stay within
//! `limits.max_queued_messages` (`ferrymq_queued_messages_max` on `/metrics`). Used by the e2e
//! test `e2e/tests/isolation.rs` (seconds) and `ferrymq-bench isolation` (minutes).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::harness::{ConnectOptions, Connection, Incoming};

/// What one run does.
#[derive(Debug, Clone)]
pub struct Options {
    /// Makes client ids and topics unique (several runs may share a broker).
    pub run_id: String,
    pub duration: Duration,
    /// Well-behaved publishers (v5, alternating QoS 1 and QoS 2, one message in flight).
    pub publishers: usize,
    /// Well-behaved subscribers (v5, QoS 2, acknowledge everything, re-subscribe now and then).
    pub subscribers: usize,
    /// Messages per second per well-behaved publisher.
    pub rate: f64,
    /// Run the bad neighbours next to them.
    pub bad_neighbours: bool,
    /// How many of each kind of bad neighbour.
    pub bad_per_kind: usize,
    /// The broker's HTTP endpoint: `/metrics` is sampled for the queue gauges.
    pub metrics: Option<SocketAddr>,
}

impl Options {
    pub fn new(run_id: impl Into<String>, duration: Duration) -> Options {
        Options {
            run_id: run_id.into(),
            duration,
            publishers: 4,
            subscribers: 2,
            rate: 50.0,
            bad_neighbours: true,
            bad_per_kind: 2,
            metrics: None,
        }
    }
}

/// Latency summary in microseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    pub count: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

impl Latency {
    fn from(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        Latency {
            count: h.len(),
            p50_us: h.value_at_quantile(0.5),
            p99_us: h.value_at_quantile(0.99),
            max_us: h.max(),
        }
    }

    pub fn max(&self) -> Duration {
        Duration::from_micros(self.max_us)
    }
}

/// What a run measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// Every well-behaved ack (PUBACK, PUBREC, SUBACK).
    pub all: Latency,
    pub puback: Latency,
    pub pubrec: Latency,
    pub suback: Latency,
    /// Messages the well-behaved subscribers received.
    pub good_received: u64,
    /// Highest `ferrymq_queued_messages_max` seen on `/metrics` (None without `metrics`).
    pub queued_max: Option<u64>,
    /// Highest `ferrymq_queued_messages` seen.
    pub queued_total: Option<u64>,
    /// `ferrymq_messages_dropped_total{reason="queue_full"}` at the end.
    pub dropped_queue_full: Option<u64>,
    /// Bad-neighbour activity, to show they were really there.
    pub vanished: u64,
    pub takeovers: u64,
    pub withheld: u64,
}

impl Report {
    /// One line per ack kind for a terminal.
    pub fn lines(&self) -> String {
        let l = |name: &str, x: &Latency| {
            format!(
                "{name:<7} n={:<7} p50={:>8.3} ms  p99={:>8.3} ms  max={:>8.3} ms",
                x.count,
                x.p50_us as f64 / 1000.0,
                x.p99_us as f64 / 1000.0,
                x.max_us as f64 / 1000.0
            )
        };
        format!(
            "{}\n{}\n{}\n{}\nreceived by well-behaved subscribers: {}; queued max/total: {:?}/{:?}; \
             dropped (queue full): {:?}; vanished handshakes: {}; takeovers: {}; messages withheld: {}",
            l("all", &self.all),
            l("PUBACK", &self.puback),
            l("PUBREC", &self.pubrec),
            l("SUBACK", &self.suback),
            self.good_received,
            self.queued_max,
            self.queued_total,
            self.dropped_queue_full,
            self.vanished,
            self.takeovers,
            self.withheld
        )
    }
}

fn histogram() -> Histogram<u64> {
    // 1 µs .. 1000 s, 3 significant digits.
    Histogram::new_with_bounds(1, 1_000_000_000, 3).expect("static histogram bounds")
}

/// Longest a well-behaved client waits for any single answer before the run fails: far above
/// any bound a broker should meet, so a stall shows up as a number, not as a hang.
const STALL: Duration = Duration::from_secs(60);

#[derive(Default)]
struct Counters {
    received: AtomicU64,
    vanished: AtomicU64,
    takeovers: AtomicU64,
    withheld: AtomicU64,
}

/// Which ack a sample measured.
enum Ack {
    Puback,
    Pubrec,
    Suback,
}

type Sample = (Ack, Duration);

/// Runs the workload against `addr` and returns the measurements. Fails when a well-behaved
/// client sees an error (a refused ack, a closed connection, an ack missing for [`STALL`]).
pub async fn run(addr: SocketAddr, opts: &Options) -> anyhow::Result<Report> {
    let stop = Arc::new(AtomicBool::new(false));
    let counters = Arc::new(Counters::default());
    let mut good: JoinSet<anyhow::Result<Vec<Sample>>> = JoinSet::new();
    let mut bad: JoinSet<anyhow::Result<()>> = JoinSet::new();
    let run = opts.run_id.clone();

    if opts.bad_neighbours {
        for k in 0..opts.bad_per_kind {
            let (r, s, c) = (run.clone(), stop.clone(), counters.clone());
            bad.spawn(async move { never_acks(addr, &r, k, &s, &c).await });
            let (r, s) = (run.clone(), stop.clone());
            bad.spawn(async move { stops_reading(addr, &r, k, &s).await });
            let (r, s, c) = (run.clone(), stop.clone(), counters.clone());
            bad.spawn(async move { vanishes(addr, &r, k, &s, &c).await });
            let (r, s) = (run.clone(), stop.clone());
            bad.spawn(async move { overlapping(addr, &r, k, &s).await });
            let (r, s) = (run.clone(), stop.clone());
            bad.spawn(async move { retains(addr, &r, k, &s).await });
            let (r, s) = (run.clone(), stop.clone());
            bad.spawn(async move { comes_and_goes(addr, &r, k, &s).await });
            for twin in 0..2 {
                let (r, s, c) = (run.clone(), stop.clone(), counters.clone());
                bad.spawn(async move { takes_over(addr, &r, k, twin, &s, &c).await });
            }
        }
        // Let them settle in (subscribed, windows full) before measuring.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    for i in 0..opts.subscribers {
        let (r, s, c) = (run.clone(), stop.clone(), counters.clone());
        good.spawn(async move { good_subscriber(addr, &r, i, &s, &c).await });
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    for i in 0..opts.publishers {
        let (r, s, rate) = (run.clone(), stop.clone(), opts.rate);
        good.spawn(async move { good_publisher(addr, &r, i, rate, &s).await });
    }

    let mut queued_max = None::<u64>;
    let mut queued_total = None::<u64>;
    let end = Instant::now() + opts.duration;
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(250).min(opts.duration)).await;
        if let Some(http) = opts.metrics {
            let text = scrape(http).await?;
            if let Some(v) = gauge(&text, "ferrymq_queued_messages_max") {
                queued_max = Some(queued_max.unwrap_or(0).max(v));
            }
            if let Some(v) = gauge(&text, "ferrymq_queued_messages") {
                queued_total = Some(queued_total.unwrap_or(0).max(v));
            }
        }
        if good.is_empty() {
            break;
        }
    }
    stop.store(true, Ordering::Release);

    let (mut all, mut puback, mut pubrec, mut suback) =
        (histogram(), histogram(), histogram(), histogram());
    let mut first_error = None;
    while let Some(joined) = good.join_next().await {
        match joined.context("a well-behaved client panicked")? {
            Ok(samples) => {
                for (kind, took) in samples {
                    let us = (took.as_micros() as u64).max(1);
                    let _ = all.record(us);
                    let _ = match kind {
                        Ack::Puback => puback.record(us),
                        Ack::Pubrec => pubrec.record(us),
                        Ack::Suback => suback.record(us),
                    };
                }
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    // Bad neighbours end at `stop` (or fail: that is their business, not the measurement's).
    bad.abort_all();
    while bad.join_next().await.is_some() {}
    if let Some(e) = first_error {
        return Err(e.context("a well-behaved client failed"));
    }
    let dropped_queue_full = match opts.metrics {
        Some(http) => {
            let text = scrape(http).await?;
            sample(
                &text,
                "ferrymq_messages_dropped_total{reason=\"queue_full\"}",
            )
        }
        None => None,
    };
    Ok(Report {
        all: Latency::from(&all),
        puback: Latency::from(&puback),
        pubrec: Latency::from(&pubrec),
        suback: Latency::from(&suback),
        good_received: counters.received.load(Ordering::Relaxed),
        queued_max,
        queued_total,
        dropped_queue_full,
        vanished: counters.vanished.load(Ordering::Relaxed),
        takeovers: counters.takeovers.load(Ordering::Relaxed),
        withheld: counters.withheld.load(Ordering::Relaxed),
    })
}

/// The next packet, failing after [`STALL`].
async fn next(conn: &mut Connection, what: &str) -> anyhow::Result<Incoming> {
    match conn.recv_timeout(STALL).await? {
        Some(p) => Ok(p),
        None => bail!("nothing from the broker for {STALL:?} while waiting for {what}"),
    }
}

/// v5, clean start, one message in flight: QoS 1 and QoS 2 in turn to its own topic, paced at
/// `rate`. Measures PUBACK and PUBREC from the PUBLISH's write to the ack's arrival.
async fn good_publisher(
    addr: SocketAddr,
    run: &str,
    i: usize,
    rate: f64,
    stop: &AtomicBool,
) -> anyhow::Result<Vec<Sample>> {
    let opts = ConnectOptions::v5(format!("iso-{run}-gp{i}"));
    let (mut conn, _) = Connection::connect(addr, &opts).await?;
    let topic = format!("iso/{run}/good/{i}");
    let interval = Duration::from_secs_f64(1.0 / rate.max(0.1));
    let mut samples = Vec::new();
    let mut pkid: u16 = 0;
    let mut n: u64 = 0;
    let mut due = tokio::time::Instant::now();
    while !stop.load(Ordering::Acquire) {
        tokio::time::sleep_until(due).await;
        due += interval;
        pkid = pkid % u16::MAX + 1;
        let qos = 1 + (n % 2) as u8;
        n += 1;
        conn.queue_publish(&topic, qos, pkid, false, Bytes::from_static(b"good"), None)?;
        let sent = Instant::now();
        conn.flush().await?;
        match next(&mut conn, "PUBACK/PUBREC").await? {
            Incoming::PubAck {
                pkid: p,
                ok,
                reason,
            } if p == pkid && qos == 1 => {
                if !ok {
                    bail!("PUBACK {pkid} refused: {reason}");
                }
                samples.push((Ack::Puback, sent.elapsed()));
            }
            Incoming::PubRec {
                pkid: p,
                ok,
                reason,
            } if p == pkid && qos == 2 => {
                if !ok {
                    bail!("PUBREC {pkid} refused: {reason}");
                }
                samples.push((Ack::Pubrec, sent.elapsed()));
                conn.queue_pubrel(pkid)?;
                conn.flush().await?;
                match next(&mut conn, "PUBCOMP").await? {
                    Incoming::PubComp { pkid: p, .. } if p == pkid => {}
                    other => bail!("expected PUBCOMP {pkid}, got {other:?}"),
                }
            }
            other => bail!("expected the ack of {pkid}, got {other:?}"),
        }
    }
    let _ = conn.disconnect().await;
    Ok(samples)
}

/// v5, clean start, QoS 2 on every well-behaved topic; acknowledges everything at once and
/// subscribes once more (to a topic of its own) every 200 ms, measuring each SUBACK.
async fn good_subscriber(
    addr: SocketAddr,
    run: &str,
    i: usize,
    stop: &AtomicBool,
    counters: &Counters,
) -> anyhow::Result<Vec<Sample>> {
    let opts = ConnectOptions::v5(format!("iso-{run}-gs{i}"));
    let (mut conn, _) = Connection::connect(addr, &opts).await?;
    let mut samples = Vec::new();
    let filter = format!("iso/{run}/good/#");
    let sent = Instant::now();
    conn.subscribe(1, &[(filter.as_str(), 2)], STALL).await?;
    samples.push((Ack::Suback, sent.elapsed()));
    let mut pending: Option<(u16, Instant)> = None;
    let mut next_sub = Instant::now() + Duration::from_millis(200);
    let mut sub_pkid: u16 = 1;
    let own = format!("iso/{run}/own/{i}");
    while !stop.load(Ordering::Acquire) {
        if pending.is_none() && Instant::now() >= next_sub {
            sub_pkid = sub_pkid % u16::MAX + 1;
            conn.queue_subscribe(sub_pkid, &[(own.as_str(), 1)])?;
            conn.flush().await?;
            pending = Some((sub_pkid, Instant::now()));
            next_sub = Instant::now() + Duration::from_millis(200);
        }
        if let Some((p, at)) = pending {
            if at.elapsed() > STALL {
                bail!("no SUBACK {p} for {STALL:?}");
            }
        }
        let Some(packet) = conn.recv_timeout(Duration::from_millis(50)).await? else {
            continue;
        };
        match packet {
            Incoming::Publish(m) => {
                counters.received.fetch_add(1, Ordering::Relaxed);
                match m.qos {
                    1 => conn.queue_puback(m.pkid)?,
                    2 => conn.queue_pubrec(m.pkid)?,
                    _ => {}
                }
                conn.flush().await?;
            }
            Incoming::PubRel { pkid, .. } => {
                conn.queue_pubcomp(pkid)?;
                conn.flush().await?;
            }
            Incoming::SubAck { pkid, granted } => match pending {
                Some((p, at)) if p == pkid => {
                    if granted.iter().any(Option::is_none) {
                        bail!("subscription refused");
                    }
                    samples.push((Ack::Suback, at.elapsed()));
                    pending = None;
                }
                _ => bail!("unexpected SUBACK {pkid}"),
            },
            other => bail!("unexpected {other:?}"),
        }
    }
    let _ = conn.disconnect().await;
    Ok(samples)
}

/// Receive Maximum 1, QoS 2 on everything of the run and on `#`; takes what arrives and never
/// acknowledges it.
async fn never_acks(
    addr: SocketAddr,
    run: &str,
    k: usize,
    stop: &AtomicBool,
    counters: &Counters,
) -> anyhow::Result<()> {
    let opts = ConnectOptions::v5(format!("iso-{run}-rm1-{k}")).receive_maximum(1);
    let (mut conn, _) = Connection::connect(addr, &opts).await?;
    let all = format!("iso/{run}/#");
    conn.subscribe(1, &[(all.as_str(), 2), ("#", 2)], STALL)
        .await?;
    while !stop.load(Ordering::Acquire) {
        if let Some(Incoming::Publish(_)) = conn.recv_timeout(Duration::from_millis(100)).await? {
            counters.withheld.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(())
}

/// Subscribes to everything of the run (QoS 1, v3.1.1) and then never reads its socket again.
async fn stops_reading(
    addr: SocketAddr,
    run: &str,
    k: usize,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    let opts = ConnectOptions::v311(format!("iso-{run}-deaf-{k}"));
    let (mut conn, _) = Connection::connect(addr, &opts).await?;
    let all = format!("iso/{run}/#");
    conn.subscribe(1, &[(all.as_str(), 1)], STALL).await?;
    while !stop.load(Ordering::Acquire) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(conn);
    Ok(())
}

/// Opens connections and leaves in the middle of the handshake: half a CONNECT; a whole CONNECT
/// and gone before the CONNACK; nothing at all.
async fn vanishes(
    addr: SocketAddr,
    run: &str,
    k: usize,
    stop: &AtomicBool,
    counters: &Counters,
) -> anyhow::Result<()> {
    let id = format!("iso-{run}-ghost-{k}");
    // CONNECT v3.1.1, clean session, keep-alive 30.
    let mut connect = vec![
        0x10,
        (12 + id.len()) as u8,
        0,
        4,
        b'M',
        b'Q',
        b'T',
        b'T',
        4,
        2,
        0,
        30,
    ];
    connect.extend_from_slice(&(id.len() as u16).to_be_bytes());
    connect.extend_from_slice(id.as_bytes());
    let mut n = 0usize;
    while !stop.load(Ordering::Acquire) {
        if let Ok(mut s) = TcpStream::connect(addr).await {
            let _ = match n % 3 {
                0 => s.write_all(&connect[..connect.len() / 2]).await,
                1 => s.write_all(&connect).await,
                _ => Ok(()),
            };
            drop(s);
            counters.vanished.fetch_add(1, Ordering::Relaxed);
        }
        n += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// One client, several QoS 2 filters that all match the run's topics (`#` among them); it
/// acknowledges with PUBREC but completes nothing, so its window stays full.
async fn overlapping(
    addr: SocketAddr,
    run: &str,
    k: usize,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    let opts = ConnectOptions::v5(format!("iso-{run}-overlap-{k}")).receive_maximum(10);
    let (mut conn, _) = Connection::connect(addr, &opts).await?;
    let filters = [
        "#".to_string(),
        "iso/#".to_string(),
        format!("iso/{run}/#"),
        format!("iso/{run}/good/+"),
        format!("iso/{run}/+/+"),
    ];
    let refs: Vec<(&str, u8)> = filters.iter().map(|f| (f.as_str(), 2)).collect();
    conn.subscribe(1, &refs, STALL).await?;
    while !stop.load(Ordering::Acquire) {
        if let Some(Incoming::Publish(m)) = conn.recv_timeout(Duration::from_millis(100)).await? {
            if m.qos == 2 {
                conn.queue_pubrec(m.pkid)?;
                conn.flush().await?;
            }
        }
    }
    Ok(())
}

/// Publishes retained messages (QoS 1, then QoS 2) over a few hundred topics of the run, so
/// every new wildcard subscription gets a retained backlog; never completes its QoS 2 flows
/// beyond PUBREC (its own window, its own problem).
async fn retains(addr: SocketAddr, run: &str, k: usize, stop: &AtomicBool) -> anyhow::Result<()> {
    let opts = ConnectOptions::v5(format!("iso-{run}-retainer-{k}"));
    let (mut conn, _) = Connection::connect(addr, &opts).await?;
    let mut n: u64 = 0;
    while !stop.load(Ordering::Acquire) {
        let topic = format!("iso/{run}/retained/{k}/{}", n % 300);
        let pkid = (n % 1000) as u16 + 1;
        conn.queue_retained(&topic, 1, pkid, Bytes::from_static(b"retained"))?;
        conn.flush().await?;
        let _ = conn.recv_timeout(Duration::from_secs(5)).await?;
        n += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// Short-lived clients: Receive Maximum 1, a wildcard QoS 2 subscription over the run (retained
/// backlog included), sometimes a persistent session; takes one message, acknowledges nothing
/// and leaves (with DISCONNECT, or by dropping the socket).
async fn comes_and_goes(
    addr: SocketAddr,
    run: &str,
    k: usize,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    let all = format!("iso/{run}/#");
    let mut n: u64 = 0;
    while !stop.load(Ordering::Acquire) {
        let mut opts =
            ConnectOptions::v5(format!("iso-{run}-brief-{k}-{}", n % 20)).receive_maximum(1);
        if n % 3 == 0 {
            opts = opts.persistent().session_expiry(5);
        }
        n += 1;
        if let Ok((mut conn, _)) = Connection::connect(addr, &opts).await {
            let _ = conn
                .subscribe(1, &[(all.as_str(), 2)], Duration::from_secs(5))
                .await;
            let _ = conn.recv_timeout(Duration::from_millis(50)).await;
            if n % 2 == 0 {
                let _ = conn.disconnect().await;
            }
        }
    }
    Ok(())
}

/// Two of these share a client id: each connects (clean start, subscribes to the run at QoS
/// 1), lingers a moment and connects again, taking the session over from its twin.
async fn takes_over(
    addr: SocketAddr,
    run: &str,
    k: usize,
    twin: usize,
    stop: &AtomicBool,
    counters: &Counters,
) -> anyhow::Result<()> {
    let id = format!("iso-{run}-twin-{k}");
    let all = format!("iso/{run}/#");
    let mut n = 0u64;
    while !stop.load(Ordering::Acquire) {
        let opts = if (n + twin as u64) % 2 == 0 {
            ConnectOptions::v5(id.clone())
        } else {
            ConnectOptions::v311(id.clone())
        };
        n += 1;
        // Refusals (CONNACK "server busy" while the twin hands over) are part of the game.
        if let Ok((mut conn, _)) = Connection::connect(addr, &opts).await {
            counters.takeovers.fetch_add(1, Ordering::Relaxed);
            let _ = conn
                .subscribe(1, &[(all.as_str(), 1)], Duration::from_secs(5))
                .await;
            let _ = conn
                .recv_timeout(Duration::from_millis(30 + 20 * twin as u64))
                .await;
        }
    }
    Ok(())
}

/// `GET /metrics` over plain HTTP/1.0.
async fn scrape(http: SocketAddr) -> anyhow::Result<String> {
    let mut s = TcpStream::connect(http)
        .await
        .context("connecting to /metrics")?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: ferrymq\r\n\r\n")
        .await?;
    let mut body = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut body))
        .await
        .context("/metrics timed out")??;
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// The value of an unlabelled gauge.
fn gauge(text: &str, name: &str) -> Option<u64> {
    sample(text, name)
}

/// The value of the sample written exactly as `series` (name with labels, if any).
fn sample(text: &str, series: &str) -> Option<u64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse::<f64>()
                .ok()
        })
        .map(|v| v as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_found_by_exact_series() {
        let text = "# HELP x\nferrymq_queued_messages 12\nferrymq_queued_messages_max 7\n\
                    ferrymq_messages_dropped_total{reason=\"queue_full\"} 3\n";
        assert_eq!(gauge(text, "ferrymq_queued_messages"), Some(12));
        assert_eq!(gauge(text, "ferrymq_queued_messages_max"), Some(7));
        assert_eq!(
            sample(
                text,
                "ferrymq_messages_dropped_total{reason=\"queue_full\"}"
            ),
            Some(3)
        );
        assert_eq!(gauge(text, "ferrymq_nothing"), None);
    }
}
