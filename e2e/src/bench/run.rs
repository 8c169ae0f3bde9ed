//! Runs one [`Scenario`] against one broker address and measures it.
//!
//! Every client is one tokio task that owns its socket (no cross-task hop per message).
//! Publishers stamp each payload with (magic, publisher, sequence, send time); subscribers read
//! big, decode every whole packet in the buffer, acknowledge them with one write, and record
//! latency, losses, duplicates and reordering per publisher.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::{Buf, BytesMut};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::watch;

use super::client;
use super::codec::{self, Incoming, QoS};
use super::procstat;
use super::scenario::Scenario;

/// magic u32 | publisher u32 | sequence u64 | send time ns u64, little endian.
pub const STAMP_LEN: usize = 24;
const MAGIC: u32 = 0xFE55_BE4C;
/// Bytes a publisher encodes ahead of one `write`. Small enough that client-side queueing
/// stays far below the latencies we measure.
const MAX_BATCH: usize = 16 * 1024;
/// How long publishers wait for outstanding acks, and subscribers for outstanding messages,
/// once no more progress is seen.
const DRAIN_IDLE_QOS0: Duration = Duration::from_secs(1);
const DRAIN_IDLE_ACKED: Duration = Duration::from_secs(3);
const DRAIN_MAX: Duration = Duration::from_secs(30);
/// Sequence numbers beyond this are treated as garbage, not allocated for.
const MAX_SEQ: u64 = 1 << 32;

static EPOCH: OnceLock<Instant> = OnceLock::new();

fn now_ns() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// A growable bitset of sequence numbers.
#[derive(Default, Clone)]
struct Bits(Vec<u64>);

impl Bits {
    /// Sets bit `i`; returns whether it was already set.
    fn set(&mut self, i: u64) -> bool {
        let w = (i / 64) as usize;
        if w >= self.0.len() {
            self.0.resize((w + 1).max(self.0.len() * 2), 0);
        }
        let mask = 1u64 << (i % 64);
        let was = self.0[w] & mask != 0;
        self.0[w] |= mask;
        was
    }

    fn get(&self, i: u64) -> bool {
        self.0
            .get((i / 64) as usize)
            .is_some_and(|w| w & (1u64 << (i % 64)) != 0)
    }

    /// Bits set here and not in `other`.
    fn count_missing_from(&self, other: &Bits) -> u64 {
        self.0
            .iter()
            .enumerate()
            .map(|(i, w)| (w & !other.0.get(i).copied().unwrap_or(0)).count_ones() as u64)
            .sum()
    }
}

fn new_histogram() -> Histogram<u64> {
    // 1 ns .. 100 s at 3 significant digits.
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("static histogram bounds")
}

/// Latency summary in microseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    pub count: u64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub mean_us: f64,
}

impl Latency {
    fn from(h: &Histogram<u64>) -> Latency {
        let us = |v: u64| v as f64 / 1000.0;
        if h.is_empty() {
            return Latency::default();
        }
        Latency {
            count: h.len(),
            p50_us: us(h.value_at_quantile(0.50)),
            p90_us: us(h.value_at_quantile(0.90)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
            mean_us: h.mean() / 1000.0,
        }
    }
}

/// What one run measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunResult {
    pub scenario: String,
    pub broker: String,
    /// PUBLISH packets written by all publishers.
    pub sent: u64,
    /// QoS 1/2 publishes completed (PUBACK / PUBCOMP); equals `sent` for QoS 0.
    pub acked: u64,
    /// PUBLISH packets received by all subscribers (with duplicates).
    pub received: u64,
    /// Deliveries that should have happened (every acked/sent message × its matching subscribers).
    pub expected: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub reordered: u64,
    /// Protocol errors, unexpected packets, connections the broker closed.
    pub errors: u64,
    pub first_error: Option<String>,
    /// Seconds publishers were sending.
    pub send_secs: f64,
    /// From the start until the last delivery.
    pub deliver_secs: f64,
    /// Acked (QoS 0: sent) publishes per second.
    pub publish_rate: f64,
    /// Unique deliveries per second, over all subscribers.
    pub deliver_rate: f64,
    pub latency: Latency,
    /// Publish → PUBACK (QoS 1) / PUBCOMP (QoS 2) as the publisher sees it; `None` for QoS 0.
    /// With a persistent subscriber this includes the broker's fsync.
    pub ack_latency: Option<Latency>,
    /// Broker CPU in cores (1.0 = one core busy) over the run, when its pid is known.
    pub broker_cpu: Option<f64>,
    pub broker_peak_rss_kib: Option<u64>,
    /// Bytes the broker wrote to storage during the run (`/proc/<pid>/io` write_bytes).
    pub broker_disk_write_bytes: Option<u64>,
    /// Size of the broker's data directory after the run (filled in by the launcher).
    pub store_bytes: Option<u64>,
    /// The load generator's own CPU in cores.
    pub bench_cpu: f64,
}

impl RunResult {
    /// Whether the run is acceptable: no errors, and no loss where loss is not allowed.
    pub fn ok(&self, loss_allowed: bool) -> bool {
        self.errors == 0 && (loss_allowed || self.lost == 0) && self.expected > 0
    }
}

struct PubOutcome {
    sent: u64,
    acked: u64,
    /// Publish → acknowledgement latency, ns.
    ack_hist: Histogram<u64>,
    /// Sequence numbers that were acknowledged (QoS 1/2).
    acked_bits: Bits,
    errors: u64,
    first_error: Option<String>,
}

struct SubOutcome {
    received: u64,
    per_pub: Vec<Bits>,
    duplicates: u64,
    reordered: u64,
    errors: u64,
    first_error: Option<String>,
    last_rx_ns: u64,
    hist: Histogram<u64>,
}

struct Errors {
    count: u64,
    first: Option<String>,
}

impl Errors {
    fn new() -> Errors {
        Errors {
            count: 0,
            first: None,
        }
    }
    fn add(&mut self, msg: impl FnOnce() -> String) {
        self.count += 1;
        if self.first.is_none() {
            self.first = Some(msg());
        }
    }
}

static RUN_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Runs `sc` against the broker at `addr`. `broker_pid` enables CPU/RSS measurement.
pub async fn run_scenario(
    addr: SocketAddr,
    sc: &Scenario,
    broker: &str,
    broker_pid: Option<u32>,
) -> anyhow::Result<RunResult> {
    run_scenario_at(&[addr], &[addr], sc, broker, broker_pid).await
}

/// Runs `sc` with publisher `i` connected to `pub_addrs[i % len]` and subscriber `i` to
/// `sub_addrs[i % len]`: several nodes of one cluster, publishers and subscribers on
/// different nodes to measure the cross-node hop.
pub async fn run_scenario_at(
    pub_addrs: &[SocketAddr],
    sub_addrs: &[SocketAddr],
    sc: &Scenario,
    broker: &str,
    broker_pid: Option<u32>,
) -> anyhow::Result<RunResult> {
    anyhow::ensure!(
        !pub_addrs.is_empty() && !sub_addrs.is_empty(),
        "no broker address"
    );
    sc.validate()?;
    let run_id = format!(
        "{}x{}",
        std::process::id(),
        RUN_COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let sc = Arc::new(sc.clone());
    let qos = sc.qos();
    now_ns();

    // Subscribers first, all subscribed before anyone publishes.
    let mut sub_setups = Vec::new();
    for i in 0..sc.subscribers {
        let (sc, run_id) = (sc.clone(), run_id.clone());
        let addr = sub_addrs[i % sub_addrs.len()];
        sub_setups.push(tokio::spawn(async move {
            let id = sc.subscriber_id(&run_id, i);
            let (mut stream, mut buf) = client::connect(addr, None, &id, !sc.persistent()).await?;
            client::subscribe(&mut stream, &mut buf, &sc.layout.filter(&run_id, i), qos).await?;
            anyhow::Ok((stream, buf))
        }));
    }
    let mut sub_conns = Vec::new();
    for s in sub_setups {
        sub_conns.push(s.await.context("subscriber setup task")??);
    }
    let mut pub_setups = Vec::new();
    for i in 0..sc.publishers {
        let run_id = run_id.clone();
        let addr = pub_addrs[i % pub_addrs.len()];
        pub_setups.push(tokio::spawn(async move {
            client::connect(addr, None, &format!("fmqb-{run_id}-p{i}"), true).await
        }));
    }
    let mut pub_conns = Vec::new();
    for p in pub_setups {
        pub_conns.push(p.await.context("publisher setup task")??);
    }

    let received_total = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = watch::channel(false);
    let cpu0 = broker_pid.and_then(procstat::cpu_seconds);
    let io0 = broker_pid.and_then(procstat::io_write_bytes);
    let self_cpu0 = procstat::cpu_seconds(std::process::id()).unwrap_or(0.0);
    let sampler = broker_pid.map(procstat::RssSampler::start);

    let mut subs = Vec::new();
    for (i, (stream, buf)) in sub_conns.into_iter().enumerate() {
        let (rd, wr) = stream.into_split();
        let (sc, total, stop) = (sc.clone(), received_total.clone(), stop_rx.clone());
        subs.push(tokio::spawn(subscriber(i, rd, wr, buf, sc, total, stop)));
    }
    let start = Instant::now() + Duration::from_millis(50);
    let start_ns = now_ns() + 50_000_000;
    let deadline = start + sc.duration;
    let mut pubs = Vec::new();
    for (i, (stream, buf)) in pub_conns.into_iter().enumerate() {
        let (rd, wr) = stream.into_split();
        let topic = sc.layout.topic(&run_id, i).into_bytes();
        pubs.push(tokio::spawn(publisher(
            i,
            rd,
            wr,
            buf,
            topic,
            sc.clone(),
            start,
            deadline,
        )));
    }
    let mut pub_out = Vec::new();
    for p in pubs {
        pub_out.push(p.await.context("publisher task")?);
    }
    let send_end = Instant::now().min(deadline).max(start);

    // Deliveries owed: each completed publish times its matching subscribers.
    let mut expected = 0u64;
    for (p, out) in pub_out.iter().enumerate() {
        let done = if qos == QoS::AtMostOnce {
            out.sent
        } else {
            out.acked
        };
        let matching = (0..sc.subscribers)
            .filter(|&s| sc.layout.matches(s, p))
            .count() as u64;
        expected += done * matching;
    }
    let idle = if qos == QoS::AtMostOnce {
        DRAIN_IDLE_QOS0
    } else {
        DRAIN_IDLE_ACKED
    };
    let drain_start = Instant::now();
    let (mut last, mut last_change) = (received_total.load(Ordering::Relaxed), Instant::now());
    while received_total.load(Ordering::Relaxed) < expected
        && last_change.elapsed() < idle
        && drain_start.elapsed() < DRAIN_MAX
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = received_total.load(Ordering::Relaxed);
        if now != last {
            (last, last_change) = (now, Instant::now());
        }
    }
    let _ = stop_tx.send(true);
    let mut sub_out = Vec::new();
    for s in subs {
        sub_out.push(s.await.context("subscriber task")?);
    }
    let wall = start.elapsed().as_secs_f64();
    let broker_cpu = match (broker_pid.and_then(procstat::cpu_seconds), cpu0) {
        (Some(c1), Some(c0)) => Some((c1 - c0) / wall),
        _ => None,
    };
    let broker_disk_write_bytes = match (broker_pid.and_then(procstat::io_write_bytes), io0) {
        (Some(w1), Some(w0)) => Some(w1.saturating_sub(w0)),
        _ => None,
    };
    let bench_cpu = (procstat::cpu_seconds(std::process::id()).unwrap_or(0.0) - self_cpu0) / wall;
    let broker_peak_rss_kib = sampler.map(|s| s.finish());

    let mut r = RunResult {
        scenario: sc.name.clone(),
        broker: broker.to_string(),
        expected,
        broker_cpu,
        broker_peak_rss_kib,
        broker_disk_write_bytes,
        bench_cpu,
        ..RunResult::default()
    };
    let mut errors = Errors::new();
    let mut ack_hist = new_histogram();
    for p in &pub_out {
        r.sent += p.sent;
        r.acked += p.acked;
        let _ = ack_hist.add(&p.ack_hist);
        errors.count += p.errors;
        if errors.first.is_none() {
            errors.first.clone_from(&p.first_error);
        }
    }
    let mut hist = new_histogram();
    let mut last_rx = start_ns;
    let mut unique = 0u64;
    for (s, out) in sub_out.iter().enumerate() {
        r.received += out.received;
        r.duplicates += out.duplicates;
        r.reordered += out.reordered;
        errors.count += out.errors;
        if errors.first.is_none() {
            errors.first.clone_from(&out.first_error);
        }
        last_rx = last_rx.max(out.last_rx_ns);
        let _ = hist.add(&out.hist);
        for (p, po) in pub_out.iter().enumerate() {
            if !sc.layout.matches(s, p) {
                continue;
            }
            let got = out.per_pub.get(p).cloned().unwrap_or_default();
            let lost = if qos == QoS::AtMostOnce {
                (0..po.sent).filter(|&q| !got.get(q)).count() as u64
            } else {
                po.acked_bits.count_missing_from(&got)
            };
            r.lost += lost;
            unique += if qos == QoS::AtMostOnce {
                po.sent - lost
            } else {
                po.acked - lost
            };
        }
    }
    r.errors = errors.count;
    r.first_error = errors.first;
    r.send_secs = send_end.duration_since(start).as_secs_f64();
    r.deliver_secs = (last_rx.saturating_sub(start_ns)) as f64 / 1e9;
    r.publish_rate = if qos == QoS::AtMostOnce {
        r.sent
    } else {
        r.acked
    } as f64
        / r.send_secs.max(1e-9);
    r.deliver_rate = unique as f64 / r.deliver_secs.max(r.send_secs).max(1e-9);
    r.latency = Latency::from(&hist);
    if qos != QoS::AtMostOnce && !ack_hist.is_empty() {
        r.ack_latency = Some(Latency::from(&ack_hist));
    }
    Ok(r)
}

fn stamp(buf: &mut [u8], publisher: u32, seq: u64) {
    buf[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    buf[4..8].copy_from_slice(&publisher.to_le_bytes());
    buf[8..16].copy_from_slice(&seq.to_le_bytes());
    buf[16..24].copy_from_slice(&now_ns().to_le_bytes());
}

fn unstamp(payload: &[u8]) -> Option<(u32, u64, u64)> {
    let word = |r: std::ops::Range<usize>| payload.get(r);
    if u32::from_le_bytes(word(0..4)?.try_into().ok()?) != MAGIC {
        return None;
    }
    Some((
        u32::from_le_bytes(word(4..8)?.try_into().ok()?),
        u64::from_le_bytes(word(8..16)?.try_into().ok()?),
        u64::from_le_bytes(word(16..24)?.try_into().ok()?),
    ))
}

#[allow(clippy::too_many_arguments)]
async fn publisher(
    idx: usize,
    mut rd: OwnedReadHalf,
    mut wr: OwnedWriteHalf,
    mut rbuf: BytesMut,
    topic: Vec<u8>,
    sc: Arc<Scenario>,
    start: Instant,
    deadline: Instant,
) -> PubOutcome {
    let qos = sc.qos();
    let window = if qos == QoS::AtMostOnce {
        usize::MAX
    } else {
        sc.window
    };
    // packet id -> sequence number of the message in flight under it.
    let mut by_pkid: Vec<u64> = if qos == QoS::AtMostOnce {
        Vec::new()
    } else {
        vec![u64::MAX; 65536]
    };
    // packet id -> when that publish was queued for writing (ns on the process clock).
    let mut sent_at: Vec<u64> = if qos == QoS::AtMostOnce {
        Vec::new()
    } else {
        vec![0; 65536]
    };
    let mut next_pkid: u16 = 1;
    let mut inflight = 0usize;
    let mut out = PubOutcome {
        sent: 0,
        acked: 0,
        ack_hist: new_histogram(),
        acked_bits: Bits::default(),
        errors: 0,
        first_error: None,
    };
    let mut errors = Errors::new();
    let mut wbuf = BytesMut::with_capacity(MAX_BATCH + 4096);
    rbuf.reserve(64 * 1024);
    let interval = sc.rate.map(|r| Duration::from_secs_f64(1.0 / r));
    let mut last_progress = Instant::now();
    tokio::time::sleep_until(start.into()).await;

    loop {
        let now = Instant::now();
        let sending = now < deadline;
        if sending {
            let due = match sc.rate {
                Some(r) => (now.duration_since(start).as_secs_f64() * r) as u64 + 1,
                None => u64::MAX,
            };
            while out.sent < due && wbuf.len() < MAX_BATCH && inflight < window {
                let seq = out.sent;
                let pkid = if qos == QoS::AtMostOnce {
                    0
                } else {
                    while by_pkid[next_pkid as usize] != u64::MAX {
                        next_pkid = next_pkid.checked_add(1).unwrap_or(1);
                    }
                    let p = next_pkid;
                    by_pkid[p as usize] = seq;
                    sent_at[p as usize] = now_ns();
                    next_pkid = next_pkid.checked_add(1).unwrap_or(1);
                    inflight += 1;
                    p
                };
                codec::publish(&mut wbuf, &topic, qos, pkid, sc.payload, |b| {
                    stamp(b, idx as u32, seq)
                });
                out.sent += 1;
            }
        } else if inflight == 0 && wbuf.is_empty() {
            break;
        } else if last_progress.elapsed() > DRAIN_IDLE_ACKED || now > deadline + DRAIN_MAX {
            errors.add(|| format!("publisher {idx}: {inflight} publishes never acknowledged"));
            break;
        }

        if rbuf.capacity() - rbuf.len() < 16 * 1024 {
            rbuf.reserve(64 * 1024);
        }
        let read = if !wbuf.is_empty() {
            tokio::select! {
                biased;
                r = rd.read_buf(&mut rbuf) => Some(r),
                r = wr.write(&wbuf) => match r {
                    Ok(n) => { wbuf.advance(n); None }
                    Err(e) => { errors.add(|| format!("publisher {idx}: write: {e}")); break; }
                },
                _ = tokio::time::sleep_until((deadline + DRAIN_MAX).into()) => {
                    errors.add(|| format!("publisher {idx}: the broker stopped reading"));
                    break;
                }
            }
        } else {
            let wake = if !sending {
                now + Duration::from_millis(100)
            } else if let (Some(iv), true) = (interval, inflight < window) {
                // Next message due (open loop).
                start + iv.mul_f64((out.sent) as f64)
            } else {
                deadline
            };
            tokio::select! {
                r = rd.read_buf(&mut rbuf) => Some(r),
                _ = tokio::time::sleep_until(wake.min(deadline.max(now)).into()) => None,
            }
        };
        match read {
            None => {}
            Some(Ok(0)) => {
                errors.add(|| format!("publisher {idx}: broker closed the connection"));
                break;
            }
            Some(Err(e)) => {
                errors.add(|| format!("publisher {idx}: read: {e}"));
                break;
            }
            Some(Ok(_)) => {
                let mut used_total = 0;
                loop {
                    match codec::decode(&rbuf[used_total..]) {
                        Ok(Some((packet, used))) => {
                            used_total += used;
                            let completed = match packet {
                                Incoming::PubAck(p) if qos == QoS::AtLeastOnce => Some(p),
                                Incoming::PubComp(p) if qos == QoS::ExactlyOnce => Some(p),
                                Incoming::PubRec(p) if qos == QoS::ExactlyOnce => {
                                    codec::pubrel(&mut wbuf, p);
                                    None
                                }
                                Incoming::PingResp => None,
                                other => {
                                    errors.add(|| format!("publisher {idx}: unexpected {other:?}"));
                                    None
                                }
                            };
                            if let Some(p) = completed {
                                let seq = std::mem::replace(&mut by_pkid[p as usize], u64::MAX);
                                if seq == u64::MAX {
                                    errors
                                        .add(|| format!("publisher {idx}: ack for unknown id {p}"));
                                } else {
                                    let took = now_ns().saturating_sub(sent_at[p as usize]);
                                    let _ = out.ack_hist.record(took.max(1));
                                    out.acked_bits.set(seq);
                                    out.acked += 1;
                                    inflight -= 1;
                                    last_progress = Instant::now();
                                }
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            errors.add(|| format!("publisher {idx}: {e}"));
                            out.errors = errors.count;
                            out.first_error = errors.first;
                            return out;
                        }
                    }
                }
                rbuf.advance(used_total);
            }
        }
    }
    if qos == QoS::AtMostOnce {
        out.acked = out.sent;
    }
    let mut bye = BytesMut::new();
    codec::disconnect(&mut bye);
    let _ = wr.write_all(&bye).await;
    out.errors = errors.count;
    out.first_error = errors.first;
    out
}

async fn subscriber(
    idx: usize,
    mut rd: OwnedReadHalf,
    mut wr: OwnedWriteHalf,
    mut rbuf: BytesMut,
    sc: Arc<Scenario>,
    total: Arc<AtomicU64>,
    mut stop: watch::Receiver<bool>,
) -> SubOutcome {
    let mut out = SubOutcome {
        received: 0,
        per_pub: vec![Bits::default(); sc.publishers],
        duplicates: 0,
        reordered: 0,
        errors: 0,
        first_error: None,
        last_rx_ns: 0,
        hist: new_histogram(),
    };
    let mut max_seq = vec![0u64; sc.publishers];
    let mut errors = Errors::new();
    let mut wbuf = BytesMut::with_capacity(16 * 1024);
    rbuf.reserve(256 * 1024);
    'outer: loop {
        // Bytes left from setup are processed before the first read.
        let now = now_ns();
        let mut used_total = 0;
        let mut count = 0u64;
        loop {
            match codec::decode(&rbuf[used_total..]) {
                Ok(Some((packet, used))) => {
                    used_total += used;
                    match packet {
                        Incoming::Publish {
                            qos, pkid, payload, ..
                        } => {
                            count += 1;
                            match qos {
                                1 => codec::puback(&mut wbuf, pkid),
                                2 => codec::pubrec(&mut wbuf, pkid),
                                _ => {}
                            }
                            match unstamp(payload) {
                                Some((p, seq, ts))
                                    if (p as usize) < sc.publishers && seq < MAX_SEQ =>
                                {
                                    let p = p as usize;
                                    if out.per_pub[p].set(seq) {
                                        out.duplicates += 1;
                                    } else {
                                        if seq < max_seq[p] {
                                            out.reordered += 1;
                                        }
                                        max_seq[p] = max_seq[p].max(seq);
                                    }
                                    out.hist.saturating_record(now.saturating_sub(ts).max(1));
                                }
                                _ => errors.add(|| {
                                    format!("subscriber {idx}: a payload that is not ours")
                                }),
                            }
                        }
                        Incoming::PubRel(p) => codec::pubcomp(&mut wbuf, p),
                        Incoming::PingResp => {}
                        other => errors.add(|| format!("subscriber {idx}: unexpected {other:?}")),
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    errors.add(|| format!("subscriber {idx}: {e}"));
                    break 'outer;
                }
            }
        }
        rbuf.advance(used_total);
        if count > 0 {
            out.received += count;
            out.last_rx_ns = now;
            total.fetch_add(count, Ordering::Relaxed);
        }
        if !wbuf.is_empty() {
            if let Err(e) = wr.write_all(&wbuf).await {
                errors.add(|| format!("subscriber {idx}: write: {e}"));
                break;
            }
            wbuf.clear();
        }
        if rbuf.capacity() - rbuf.len() < 64 * 1024 {
            rbuf.reserve(256 * 1024);
        }
        tokio::select! {
            r = rd.read_buf(&mut rbuf) => match r {
                Ok(0) => {
                    errors.add(|| format!("subscriber {idx}: broker closed the connection"));
                    break;
                }
                Ok(_) => {}
                Err(e) => {
                    errors.add(|| format!("subscriber {idx}: read: {e}"));
                    break;
                }
            },
            _ = stop.changed() => break,
        }
    }
    let mut bye = BytesMut::new();
    codec::disconnect(&mut bye);
    let _ = wr.write_all(&bye).await;
    out.errors = errors.count;
    out.first_error = errors.first;
    out
}
