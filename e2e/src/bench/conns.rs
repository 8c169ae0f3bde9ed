//! Connection scale: open as many idle MQTT connections as the box allows, measure the connect
//! rate and the broker's RSS per connection.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::codec::QoS;
use super::{client, procstat};

#[derive(Debug, Clone, Default, Serialize)]
pub struct ConnResult {
    pub broker: String,
    /// Connections asked for (after capping to the file-descriptor limit).
    pub target: usize,
    pub connected: usize,
    pub failed: usize,
    pub first_error: Option<String>,
    pub connect_secs: f64,
    pub connects_per_sec: f64,
    pub broker_rss_before_kib: Option<u64>,
    pub broker_rss_after_kib: Option<u64>,
    /// (RSS after - RSS before) / connected, bytes.
    pub rss_per_conn_bytes: Option<f64>,
    /// The open-file limit that capped `target` (shared by the broker we spawn).
    pub nofile_limit: u64,
}

/// Source addresses to spread connections over: one loopback address has ~28k ephemeral ports.
fn local_addr(addr: SocketAddr, i: usize) -> Option<IpAddr> {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_loopback() => {
            Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + (i / 20_000) as u8)))
        }
        _ => None,
    }
}

pub async fn connection_scale(
    addr: SocketAddr,
    broker: &str,
    count: usize,
    concurrency: usize,
    broker_pid: Option<u32>,
    hold: Duration,
    subscribe: bool,
) -> ConnResult {
    let nofile = procstat::raise_nofile_limit();
    // Leave room for the broker's and our own other descriptors.
    let target = count.min(nofile.saturating_sub(256) as usize);
    let before = broker_pid.and_then(procstat::rss_kib);
    let next = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency.max(1) {
        let next = next.clone();
        workers.push(tokio::spawn(async move {
            let mut held = Vec::new();
            let (mut failed, mut first_error) = (0usize, None);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= target {
                    break;
                }
                let id = format!("fmqb-c{}-{i}", std::process::id());
                let connected = match client::connect(addr, local_addr(addr, i), &id, true).await {
                    // A device's command subscription: what every node of a cluster would
                    // hold for each connected device (docs/scale-out.md).
                    Ok((mut stream, mut buf)) if subscribe => {
                        let filter = format!("devices/{i}/cmd");
                        client::subscribe(&mut stream, &mut buf, &filter, QoS::AtLeastOnce)
                            .await
                            .map(|()| stream)
                    }
                    Ok((stream, _)) => Ok(stream),
                    Err(e) => Err(e),
                };
                match connected {
                    Ok(stream) => held.push(stream),
                    Err(e) => {
                        failed += 1;
                        first_error.get_or_insert_with(|| format!("{e:#}"));
                        if failed > 100 {
                            break;
                        }
                    }
                }
            }
            (held, failed, first_error)
        }));
    }
    let mut held = Vec::new();
    let mut r = ConnResult {
        broker: broker.to_string(),
        target,
        nofile_limit: nofile,
        broker_rss_before_kib: before,
        ..ConnResult::default()
    };
    for w in workers {
        if let Ok((h, failed, err)) = w.await {
            held.extend(h);
            r.failed += failed;
            if r.first_error.is_none() {
                r.first_error = err;
            }
        }
    }
    r.connect_secs = t0.elapsed().as_secs_f64();
    r.connected = held.len();
    r.connects_per_sec = r.connected as f64 / r.connect_secs.max(1e-9);
    // Let the broker settle (lazy allocations, deferred frees) before measuring.
    tokio::time::sleep(hold).await;
    r.broker_rss_after_kib = broker_pid.and_then(procstat::rss_kib);
    if let (Some(b), Some(a)) = (before, r.broker_rss_after_kib) {
        if r.connected > 0 {
            r.rss_per_conn_bytes = Some((a as f64 - b as f64) * 1024.0 / r.connected as f64);
        }
    }
    drop(held);
    r
}
