//! Applies cross-node wakes (`storage::wake`, only in a cluster): another node's writer stored
//! entries for a session connected here, so the session reads its DEVICE queue or APPLICATION
//! log now instead of at its next local wake.

use std::sync::Arc;

use tokio::sync::{mpsc, watch};

use crate::router::Mailbox;
use crate::session::registry::{Registry, SlotView};
use crate::storage::wake::Wake;

/// Wakes the sessions named by `wakes` until shutdown (or until the listener stops).
pub async fn run(
    broker: Arc<crate::broker::Broker>,
    mut wakes: mpsc::Receiver<Wake>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let wake = tokio::select! {
            _ = shutdown.changed() => return,
            wake = wakes.recv() => match wake {
                Some(w) => w,
                None => return,
            },
        };
        for mailbox in online(&broker.registry, &wake) {
            mailbox.stored.notify_one();
        }
    }
}

/// The mailboxes of this node's online sessions that `wake` names (persistent ones only: a
/// clean session stores nothing).
fn online(registry: &Registry, wake: &Wake) -> Vec<Arc<Mailbox>> {
    let mailbox = |view: SlotView<'_>| match view {
        SlotView::Online(Some(info)) if info.mailbox.is_persistent() => Some(info.mailbox.clone()),
        _ => None,
    };
    match wake {
        Wake::Client(client) => registry
            .with_view(client, mailbox)
            .flatten()
            .into_iter()
            .collect(),
        Wake::Everyone => {
            let mut all = Vec::new();
            registry.for_each_view(|_, view| all.extend(mailbox(view)));
            all
        }
    }
}
