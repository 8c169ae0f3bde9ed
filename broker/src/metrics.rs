//! Broker counters and gauges.
//!
//! Plain atomics so the hot path pays one relaxed add per event; the Prometheus exposition
//! (security/operations issue) reads these same values.

use std::sync::atomic::{AtomicU64, Ordering};

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Every metric the broker keeps. Names follow the Prometheus names they will be exported as.
#[derive(Debug, Default)]
pub struct Metrics {
    pub connections: Gauge,
    pub connections_refused: Counter,
    pub sessions: Gauge,
    pub messages_received: Counter,
    pub messages_sent: Counter,
    pub messages_dropped_queue_full: Counter,
    pub messages_dropped_expired: Counter,
    pub messages_dropped_too_large: Counter,
    pub messages_dropped_no_subscribers: Counter,
    pub retained_messages: Gauge,
    pub protocol_errors: Counter,
    pub bytes_received: Counter,
    pub bytes_sent: Counter,
    /// Messages written to DEVICE queues / APPLICATION logs.
    pub device_messages_stored: Counter,
    pub application_messages_stored: Counter,
    /// Oldest entries removed because a DEVICE queue hit its limit / a log its size retention.
    pub device_messages_trimmed: Counter,
    pub application_messages_trimmed: Counter,
    /// Entries removed because their TTL / retention age passed.
    pub device_messages_expired: Counter,
    pub application_messages_expired: Counter,
    /// Storage writes that failed (nothing was acknowledged for them).
    pub storage_errors: Counter,
    /// Connections over `limits.max_connection_rate` (refused at CONNECT).
    pub connections_rate_limited: Counter,
    /// Clients disconnected for exceeding `limits.max_publish_rate`.
    pub publish_rate_limited: Counter,
    /// Connections closed before CONNECT: bad or missing PROXY header, failed TLS handshake,
    /// failed WebSocket upgrade, or any of these not finished within the connect timeout.
    pub proxy_header_failures: Counter,
    pub tls_handshake_failures: Counter,
    pub ws_handshake_failures: Counter,
    pub handshake_timeouts: Counter,
    /// TLS certificate reloads that took effect / that failed (old certificate kept).
    pub tls_reloads: Counter,
    pub tls_reload_failures: Counter,
}
