//! The operator's Prometheus metrics, served on `/metrics` next to `/healthz` and `/readyz`.

use std::time::Instant;

use prometheus::{
    histogram_opts, opts, Encoder, HistogramVec, IntCounterVec, IntGauge, Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    /// Reconciles run, by controller.
    pub reconciles: IntCounterVec,
    /// Reconciles that returned an error, by controller and error kind.
    pub failures: IntCounterVec,
    /// Reconcile duration, seconds, by controller.
    pub duration: HistogramVec,
    /// 1 while this replica holds the leader Lease and runs the controllers.
    pub leader: IntGauge,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let reconciles = IntCounterVec::new(
            opts!(
                "ferrymq_operator_reconciles_total",
                "Reconciles run, by controller."
            ),
            &["controller"],
        )
        .expect("static metric definition");
        let failures = IntCounterVec::new(
            opts!(
                "ferrymq_operator_reconcile_failures_total",
                "Reconciles that failed, by controller and error kind."
            ),
            &["controller", "error"],
        )
        .expect("static metric definition");
        let duration = HistogramVec::new(
            histogram_opts!(
                "ferrymq_operator_reconcile_duration_seconds",
                "Time a reconcile took, seconds.",
                vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
            ),
            &["controller"],
        )
        .expect("static metric definition");
        let leader = IntGauge::new(
            "ferrymq_operator_leader",
            "1 while this replica holds the leader Lease.",
        )
        .expect("static metric definition");
        for c in [
            Box::new(reconciles.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(failures.clone()),
            Box::new(duration.clone()),
            Box::new(leader.clone()),
        ] {
            registry
                .register(c)
                .expect("metric names are unique in this registry");
        }
        Metrics {
            registry,
            reconciles,
            failures,
            duration,
            leader,
        }
    }

    /// Starts timing a reconcile of `controller`; the time is recorded when the guard drops.
    pub fn start(&self, controller: &'static str) -> ReconcileTimer<'_> {
        self.reconciles.with_label_values(&[controller]).inc();
        ReconcileTimer {
            metrics: self,
            controller,
            started: Instant::now(),
        }
    }

    pub fn failed(&self, controller: &str, error: &str) {
        self.failures.with_label_values(&[controller, error]).inc();
    }

    /// Counts a reconcile that ended without an error but with Kafka or PostgreSQL failing
    /// (those show as conditions and requeue, not as a reconcile error, so the error policy
    /// never sees them): `error="kafka"` or `error="postgres"`, once per reconcile and kind.
    pub fn provisioning_failed(&self, controller: &str, reasons: &[&str]) {
        for (reason, label) in [
            (ferrymq_crds::reason::KAFKA_ERROR, "kafka"),
            (ferrymq_crds::reason::POSTGRES_ERROR, "postgres"),
        ] {
            if reasons.contains(&reason) {
                self.failed(controller, label);
            }
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

pub struct ReconcileTimer<'a> {
    metrics: &'a Metrics,
    controller: &'static str,
    started: Instant,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.metrics
            .duration
            .with_label_values(&[self.controller])
            .observe(self.started.elapsed().as_secs_f64());
    }
}
