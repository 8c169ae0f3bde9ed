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
    /// CONNECTs refused for their credentials (bad, unknown, not authorized, none given).
    pub auth_failures: Counter,
    /// CONNECTs refused because their source address failed too often.
    pub auth_rate_limited: Counter,
    /// PUBLISHes (and wills at CONNECT) refused by the client's ACL.
    pub messages_dropped_acl: Counter,
    /// Subscription filters refused by the client's ACL.
    pub subscriptions_denied_acl: Counter,
}
