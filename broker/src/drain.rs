//! Draining a node before it stops (`[shutdown] drain_secs`): the node stops accepting and closes
//! its connections one by one, spread evenly over the drain period, so that a rolling restart of
//! a cluster moves clients to the other nodes gradually instead of in one reconnect storm.
//!
//! There is no central list of connections: the server publishes one [`DrainPlan`] to every
//! connection through a watch channel, and each connection takes the next turn from the plan's
//! counter and closes itself when its turn comes. The first to ask leaves at once, the last
//! shortly before the period ends.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// What every connection is told when the node starts draining.
#[derive(Debug)]
pub struct DrainPlan {
    start: Instant,
    period: Duration,
    /// Connections open when the drain started: the turns are spread over this many.
    expected: usize,
    next: AtomicUsize,
    /// The v5 Server Reference sent with the DISCONNECT.
    pub server_reference: Option<Arc<str>>,
    /// Why the connections leave: the reason code they are sent.
    pub reason: LeaveReason,
}

/// Why a node sends its clients away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaveReason {
    /// SIGTERM: v5 DISCONNECT 0x8B Server shutting down.
    ShuttingDown,
    /// The node lost Kafka or PostgreSQL and fenced itself (`cluster::fence`): v5 DISCONNECT
    /// 0x9C Use another server.
    Fenced,
}

impl DrainPlan {
    pub fn new(period: Duration, expected: usize, server_reference: Option<Arc<str>>) -> Self {
        DrainPlan {
            start: Instant::now(),
            period,
            expected,
            next: AtomicUsize::new(0),
            server_reference,
            reason: LeaveReason::ShuttingDown,
        }
    }

    /// Everyone at once, with 0x9C: the node is fenced.
    pub fn fenced(expected: usize, server_reference: Option<Arc<str>>) -> Self {
        DrainPlan {
            reason: LeaveReason::Fenced,
            ..DrainPlan::new(Duration::ZERO, expected, server_reference)
        }
    }

    /// The moment the next connection that asks should close: turn `k` of `expected` leaves at
    /// `start + period * k / expected`. A connection beyond the expected count (one that was
    /// still in its handshake when the count was taken) leaves at the end of the period.
    pub fn take_turn(&self) -> Instant {
        let k = self.next.fetch_add(1, Ordering::Relaxed);
        let expected = self.expected.max(1);
        let k = k.min(expected) as u128;
        let offset_ms = self.period.as_millis() * k / expected as u128;
        self.start + Duration::from_millis(u64::try_from(offset_ms).unwrap_or(u64::MAX))
    }
}

/// The receiving side: `None` while the node serves normally.
pub type DrainSignal = watch::Receiver<Option<Arc<DrainPlan>>>;

/// A channel whose receivers see no drain until the sender publishes a plan.
pub fn channel() -> (watch::Sender<Option<Arc<DrainPlan>>>, DrainSignal) {
    watch::channel(None)
}

/// Resolves when it is this connection's turn to leave. Cancel-safe: the connection's event loop
/// polls it in a `select!`, so the turn, once taken, is kept in `turn` and not taken again.
/// Never resolves when no drain comes (the sender is gone without one).
pub async fn my_turn(
    signal: &mut DrainSignal,
    turn: &mut Option<(Instant, Arc<DrainPlan>)>,
) -> Arc<DrainPlan> {
    loop {
        if let Some((at, plan)) = turn {
            tokio::time::sleep_until(*at).await;
            return plan.clone();
        }
        let current = signal.borrow_and_update().clone();
        match current {
            Some(plan) => *turn = Some((plan.take_turn(), plan)),
            None => {
                if signal.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turns_are_spread_evenly_over_the_period() {
        let plan = DrainPlan::new(Duration::from_secs(10), 4, None);
        let offsets: Vec<Duration> = (0..6).map(|_| plan.take_turn() - plan.start).collect();
        assert_eq!(
            offsets,
            [0, 2500, 5000, 7500, 10_000, 10_000].map(Duration::from_millis)
        );
        // Nobody open: a late connection still leaves within the period.
        let empty = DrainPlan::new(Duration::from_secs(3), 0, None);
        assert_eq!(empty.take_turn() - empty.start, Duration::ZERO);
        assert_eq!(empty.take_turn() - empty.start, Duration::from_secs(3));
    }

    #[tokio::test]
    async fn a_turn_is_taken_once_across_cancellations() {
        let (tx, mut rx) = channel();
        let mut turn = None;
        let within = |ms| Duration::from_millis(ms);
        // No drain yet: nothing resolves.
        let early = tokio::time::timeout(within(50), my_turn(&mut rx, &mut turn));
        assert!(early.await.is_err());
        let plan = Arc::new(DrainPlan::new(within(400), 2, None));
        tx.send(Some(plan.clone())).unwrap();
        // Turn 0 is due at once.
        let first = tokio::time::timeout(within(50), my_turn(&mut rx, &mut turn));
        assert!(first.await.is_ok());
        // A second connection gets turn 1 (due after 200 ms); cancelled before it comes, it
        // keeps that turn rather than taking another.
        let mut other = None;
        let cancelled = tokio::time::timeout(within(20), my_turn(&mut rx, &mut other));
        assert!(cancelled.await.is_err(), "turn 1 is not due yet");
        let resumed = tokio::time::timeout(within(2000), my_turn(&mut rx, &mut other));
        assert!(resumed.await.is_ok());
        assert_eq!(plan.next.load(Ordering::Relaxed), 2);
    }
}
