//! Read-mostly access to the router's state for the admin API and the metrics endpoint. Every
//! walk holds the relevant read lock for its duration, so callers bound what they keep, not
//! what they visit (see the admin API's keyset pagination).

use std::sync::Arc;

use super::{Router, SubKey, Subscription, SubscriptionOptions};
use crate::message::Message;
use crate::storage::{WriteBatch, WriteOp};

impl Router {
    /// Subscription entries in the trie: one per (filter, client), one per shared group.
    pub fn subscription_count(&self) -> usize {
        self.subscriptions.read().len()
    }

    /// Calls `f(filter, share_group, client_id, options)` for every subscription; a shared group
    /// is visited once per member, with its plain filter and the group name.
    pub fn for_each_subscription<F>(&self, mut f: F)
    where
        F: FnMut(&str, Option<&str>, &Arc<str>, &SubscriptionOptions),
    {
        let trie = self.subscriptions.read();
        trie.for_each_with_filter(|filter, key, sub| match (key, sub) {
            (_, Subscription::Direct { mailbox, options }) => {
                f(filter, None, &mailbox.client_id, options)
            }
            (SubKey::Group(group), Subscription::Shared(g)) => {
                for (mailbox, options) in &g.members {
                    f(filter, Some(group), &mailbox.client_id, options);
                }
            }
            (SubKey::Client(_), Subscription::Shared(_)) => {}
        });
    }

    /// Calls `f(topic, message)` for every retained message (expired ones not yet purged
    /// included).
    pub fn for_each_retained<F: FnMut(&str, &Arc<Message>)>(&self, f: F) {
        self.retained.read().for_each(f);
    }

    /// The retained message of `topic`.
    pub fn retained_get(&self, topic: &str) -> Option<Arc<Message>> {
        self.retained.read().get(topic).cloned()
    }

    /// Deletes the retained message of `topic` in memory and (through `batch`) in storage, as an
    /// empty retained PUBLISH would. Returns whether there was one.
    pub fn delete_retained(&self, topic: &str, batch: &mut WriteBatch) -> bool {
        let mut store = self.retained.write();
        let existed = store.remove(topic).is_some();
        if existed {
            batch.push(WriteOp::DeleteRetained {
                topic: topic.to_string(),
            });
        }
        self.metrics.retained_messages.set(store.len() as u64);
        existed
    }
}
