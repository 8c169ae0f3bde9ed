//! Session timers shared by the cluster: a disconnected persistent session's delayed will and
//! its expiry fire once for the whole cluster, on whichever node is alive, not on the node
//! where the connection ended (which may be gone) nor on every node that mirrors the session.
//!
//! The node where a persistent connection ends stores the timer with the session
//! (`WriteOp::PutTimer`, in the batch that marks it disconnected, carrying the connection's
//! owner epoch). Every node polls for due timers; a claim takes rows that no other node holds
//! (`FOR UPDATE SKIP LOCKED`, plus a lease so that a node dying mid-way does not strand them),
//! publishes the will through the publish log and waits until the log has it, then removes
//! the will or deletes the session under the same claim. A client that connects again first
//! deletes its timer (`Storage::own_session`), so a will or an expiry whose claim lost that race
//! changes nothing. The session's end reaches every node through the session directory.
//!
//! Exactly once, with one window: a node that dies after the will reached the log and before it
//! removed the timer leaves a claim that lapses after [`LEASE`]; another node then publishes
//! the will again (at least once, never lost).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::Cluster;
use crate::broker::Broker;
use crate::storage::codec::now_ms;
use crate::storage::DueTimer;

/// How often a node looks for due timers: the lateness of a will or an expiry, at most.
const POLL: Duration = Duration::from_millis(500);
/// Timers claimed per poll at most (the rest wait for the next poll or another node).
const BUDGET: usize = 256;
/// How long a claim keeps other nodes off a timer (long enough for a will's append).
const LEASE: Duration = Duration::from_secs(30);

/// Fires this node's share of the cluster's due session timers until shutdown. A fenced node
/// fires nothing: it could not append a will, and another node can.
pub async fn run(broker: Arc<Broker>, cluster: Arc<Cluster>, shutdown: watch::Receiver<bool>) {
    let step = || async {
        let due = broker
            .storage
            .claim_due_timers(now_ms(), BUDGET, LEASE.as_millis() as u64)
            .await?;
        for timer in due {
            fire(&broker, &cluster, timer).await;
        }
        Ok(())
    };
    super::every_tick_unfenced(
        &cluster,
        POLL,
        shutdown,
        "claiming due session timers",
        step,
    )
    .await;
}

/// Publishes the timer's will (if any), then completes it; the session's end is announced
/// when it expired.
async fn fire(broker: &Arc<Broker>, cluster: &Arc<Cluster>, mut timer: DueTimer) {
    let client = timer.client.clone();
    if let Some(mut will) = timer.will.take() {
        // Its Message Expiry counts from now, when it is published.
        will.received_at = std::time::Instant::now();
        match broker.publish_will_durably(Arc::new(will)).await {
            Ok(()) => {}
            Err(e) => {
                // The claim lapses and a node publishes it later: a will is never dropped
                // for a failed append.
                tracing::warn!(client_id = %client, error = %e, "publishing a delayed will failed; it is retried after the claim lapses");
                return;
            }
        }
    }
    match broker.storage.finish_timer(&timer).await {
        Ok(true) => {
            broker.metrics.session_timers_fired.inc();
            if timer.expires {
                tracing::debug!(client_id = %client, "session expired");
                cluster.announce_ended(&client);
            }
        }
        Ok(false) => {
            tracing::debug!(client_id = %client, "session timer cancelled or taken while firing");
        }
        Err(e) => {
            tracing::warn!(client_id = %client, error = %e, "completing a session timer failed; it fires again after the claim lapses");
        }
    }
}
