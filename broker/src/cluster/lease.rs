//! Node leases in PostgreSQL: how the other nodes learn that a node is gone for good.
//!
//! Kafka's consumer group already moves a dead node's `msg.all` partitions, and a restarted
//! node closes what its previous life left open (`Cluster::close_sessions_of`, at its start). What neither
//! covers is a node that dies and never comes back (scaled away while down): the session
//! directory would show its clients connected for ever, so their persistent sessions would
//! never start to expire, and their shared-group memberships would keep taking a share of the
//! messages. Each node renews a row in `nodes` every second; once a row's lease has lapsed,
//! the first node to take it (a `DELETE … RETURNING`, so one node) closes the dead node's
//! sessions as that node would have at its restart.
//!
//! The lease is longer than the time a cut-off node takes to fence itself (`fence`), so a node
//! that is alive but cut off has closed its connections before the others close its sessions.
//! A node that comes back after its row was taken registers again; the sessions closed for it
//! are those claimed before its row was taken (directory offsets below what the taker had
//! applied then), never the connections of its new life.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::Cluster;
use crate::broker::Broker;
use crate::storage::codec::now_ms;

/// How often a node renews its lease and looks for lapsed ones.
const RENEW: Duration = Duration::from_secs(1);
/// The lease beyond the fence bound: probe interval (2 s) + Kafka request timeout (5 s) + 0.5 s
/// of fence checks, plus a margin for a slow renewal.
const BEYOND_FENCE: Duration = Duration::from_secs(15);

/// The lease a node takes: longer than the time it needs to fence itself when cut off.
pub fn lease(fence_after_secs: u64) -> Duration {
    Duration::from_secs(fence_after_secs) + BEYOND_FENCE
}

/// Renews this node's lease and closes the sessions of lapsed nodes until shutdown. A fenced
/// node does neither: it cannot reach PostgreSQL, and its own lease lapsing is the point.
pub async fn run(broker: Arc<Broker>, cluster: Arc<Cluster>, shutdown: watch::Receiver<bool>) {
    let lease = lease(broker.config.cluster.fence_after_secs).as_millis() as u64;
    let node = cluster.directory.node().to_string();
    let step = || async {
        let now = now_ms();
        broker.storage.renew_lease(&node, now + lease).await?;
        for dead in broker.storage.take_lapsed_nodes(&node, now).await? {
            // Claims applied before the row was taken: the dead node's, never those of a new
            // life that registered after it.
            let below = cluster.directory.applied();
            tracing::warn!(node = %dead, "a cluster node's lease lapsed; closing the sessions it held");
            cluster.close_sessions_of(&broker, &dead, below).await;
        }
        Ok(())
    };
    super::every_tick_unfenced(
        &cluster,
        RENEW,
        shutdown,
        "renewing this node's lease",
        step,
    )
    .await;
}
