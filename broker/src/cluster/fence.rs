//! Fencing a node cut off from the shared state: a node that has not reached Kafka or
//! PostgreSQL for `cluster.fence_after_secs` stops serving. It closes every connection (v5
//! DISCONNECT 0x9C Use another server, with the configured Server Reference), refuses CONNECT
//! with Server unavailable and reports not ready, so its clients go to nodes that can serve
//! them and the load balancer stops sending it new ones.
//!
//! Why the node does this itself: the others cannot tell a dead node from a cut-off one, and a
//! cut-off node that kept its clients would hold their sessions hostage (their new connections
//! elsewhere would wait for a release it cannot send). Publishes it could not append were never
//! acknowledged (the append to `msg.all` precedes every PUBACK/PUBREC), so fencing loses
//! nothing; stored messages are not delivered because no client is left to deliver to.
//!
//! It serves again once both answer and it has read the session directory to its end, so that
//! it knows every claim made elsewhere meanwhile before it takes a client. Router batches it
//! still had in flight are refused by the partition epochs the other nodes claimed; what is not
//! fenced yet is a session write queued before the cut (docs/scale-out.md).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::Cluster;
use crate::broker::Broker;
use crate::drain::{DrainPlan, LeaveReason};

/// How often the node looks at its storage health (which the backend's probe keeps current).
const CHECK_INTERVAL: Duration = Duration::from_millis(500);
/// How long the node may take to read the directory to its end before serving again.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(10);

/// Watches the node's storage health until shutdown, fencing and unfencing the node.
pub async fn watch(
    broker: Arc<Broker>,
    cluster: Arc<Cluster>,
    drain: Arc<watch::Sender<Option<Arc<DrainPlan>>>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let fence_after = Duration::from_secs(broker.config.cluster.fence_after_secs);
    let reference: Option<Arc<str>> = broker
        .config
        .shutdown
        .server_reference
        .as_deref()
        .map(Arc::from);
    let mut tick = tokio::time::interval(CHECK_INTERVAL);
    let mut unhealthy_since: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tick.tick() => {}
        }
        match broker.storage.health() {
            Err(e) => {
                let since = *unhealthy_since.get_or_insert_with(Instant::now);
                if !cluster.is_fenced() && since.elapsed() >= fence_after {
                    tracing::error!(error = %e, after = ?fence_after, "fenced: this node cannot reach its storage; closing every connection (0x9C) and refusing clients until it can");
                    cluster.set_fenced(true);
                    broker.metrics.fenced.set(1);
                    set_fence_plan(&drain, Some(reference.clone()));
                }
            }
            Ok(()) => {
                unhealthy_since = None;
                if cluster.is_fenced() {
                    match tokio::time::timeout(CATCH_UP_TIMEOUT, cluster.directory.sync()).await {
                        Ok(Ok(())) => {
                            cluster.set_fenced(false);
                            broker.metrics.fenced.set(0);
                            set_fence_plan(&drain, None);
                            tracing::info!(
                                "storage reachable and session directory read: serving clients again"
                            );
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, "still fenced: the session directory cannot be read yet");
                        }
                        Err(_) => {
                            tracing::warn!("still fenced: reading the session directory timed out")
                        }
                    }
                }
            }
        }
    }
}

/// Publishes the fence's plan (everyone leaves at once with 0x9C) or lifts it, leaving a
/// shutdown drain alone: that one already sends everyone away, and lifting it would keep
/// clients on a node that is stopping.
fn set_fence_plan(drain: &watch::Sender<Option<Arc<DrainPlan>>>, fenced: Option<Option<Arc<str>>>) {
    drain.send_if_modified(|plan| {
        let current = plan.as_ref().map(|p| p.reason);
        if current == Some(LeaveReason::ShuttingDown) {
            return false;
        }
        match fenced {
            Some(reference) => *plan = Some(Arc::new(DrainPlan::fenced(0, reference))),
            None if current == Some(LeaveReason::Fenced) => *plan = None,
            None => return false,
        }
        true
    });
}
