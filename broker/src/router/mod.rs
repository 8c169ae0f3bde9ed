//! The router: who is subscribed to what, which retained messages exist, and the fan-out of a
//! published message to every matching subscriber's outbound queue.
//!
//! Publishing runs on the publisher's own connection task: it takes the subscription trie's read
//! lock once, collects the matching subscribers, and pushes a [`Delivery`] into each one's bounded
//! queue with `try_send`. No router task sits in between, so a message costs no extra cross-task
//! hop, and because one publisher's messages are pushed in the order it sent them, each
//! subscriber's FIFO queue keeps that order (MQTT 4.6 ordered topics).

pub mod dispatcher;
mod inspect;
pub mod local;
pub mod retained;
mod small_map;
#[cfg(test)]
mod testing;
pub mod topic;
pub mod trie;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use parking_lot::RwLock;
use tokio::sync::{mpsc, Notify};

use crate::message::{max_qos, min_qos, Delivery, Message};
use crate::metrics::Metrics;
use crate::protocol::{QoS, RetainForwardRule};
use crate::storage::codec::instant_to_ms;
use crate::storage::{ClientKind, Enqueued, WriteBatch, WriteOp};
use retained::RetainedStore;
use topic::ParsedFilter;
use trie::SubscriptionTrie;

/// The sending side of one session's outbound queue. The router keeps these in the trie; the
/// session that owns the receiving side drains it. Bounded: see `limits.max_queued_messages`.
///
/// A *persistent* session's QoS 1/2 messages do not travel through the channel: the router turns
/// them into storage appends, and the writer wakes `stored` once they are durable, so the
/// session reads them back from its queue or log.
#[derive(Debug)]
pub struct Mailbox {
    pub client_id: Arc<str>,
    tx: mpsc::Sender<Delivery>,
    pub kind: ClientKind,
    persistent: AtomicBool,
    /// A connection is draining the queue right now.
    online: AtomicBool,
    /// A publisher recently waited for room in vain (see `mark_slow`).
    slow: AtomicBool,
    /// Woken when the draining connection goes away: publishers waiting for room give up
    /// at once instead of waiting out `slow_subscriber_wait_ms` on a queue nobody drains.
    left: Notify,
    /// Woken by the storage writer after entries for this session were committed.
    pub stored: Arc<Notify>,
}

impl Mailbox {
    /// A new mailbox with room for `capacity` deliveries, and its receiving end.
    pub fn new(
        client_id: Arc<str>,
        capacity: usize,
        kind: ClientKind,
        persistent: bool,
    ) -> (Arc<Mailbox>, mpsc::Receiver<Delivery>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let mailbox = Mailbox {
            client_id,
            tx,
            kind,
            persistent: AtomicBool::new(persistent),
            online: AtomicBool::new(false),
            slow: AtomicBool::new(false),
            left: Notify::new(),
            stored: Arc::new(Notify::new()),
        };
        (Arc::new(mailbox), rx)
    }

    /// Whether QoS 1/2 messages for this session go to durable storage.
    pub fn is_persistent(&self) -> bool {
        self.persistent.load(Ordering::Acquire)
    }

    pub fn set_persistent(&self, persistent: bool) {
        self.persistent.store(persistent, Ordering::Release);
    }

    /// Queues a delivery without waiting. A full queue hands the delivery back; a closed one
    /// means the session ended between match and send, which is not an error.
    fn offer(&self, delivery: Delivery) -> Result<(), Offer> {
        match self.tx.try_send(delivery) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(d)) => Err(Offer::Full(d)),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(Offer::Closed),
        }
    }

    /// Deliveries waiting in the in-memory queue.
    pub fn queued(&self) -> usize {
        self.tx.max_capacity().saturating_sub(self.tx.capacity())
    }

    /// Whether a connection is draining this mailbox now.
    pub fn is_online(&self) -> bool {
        self.online.load(Ordering::Acquire)
    }

    /// Marks whether a connection is draining this mailbox now. Either way the slow mark goes:
    /// it judged the connection that just ended (a publisher that gave up on it after it left
    /// may set it late), and a new connection starts with a clean slate.
    pub fn set_online(&self, online: bool) {
        self.online.store(online, Ordering::Release);
        self.slow.store(false, Ordering::Release);
        if !online {
            self.left.notify_waiters();
        }
    }

    /// Whether publishers should wait for room rather than drop: only for a connected client
    /// that has not already made a publisher wait in vain (see `limits.slow_subscriber_wait_ms`).
    fn worth_waiting_for(&self) -> bool {
        self.online.load(Ordering::Acquire) && !self.slow.load(Ordering::Acquire)
    }

    /// A publisher waited `slow_subscriber_wait_ms` for room in vain: further overflow is dropped
    /// at once until the client has drained half its queue.
    pub fn mark_slow(&self) {
        self.slow.store(true, Ordering::Release);
    }

    /// Called by the draining connection: clears the slow mark once half the queue is free.
    pub fn note_drained(&self) {
        if self.slow.load(Ordering::Relaxed) && self.tx.capacity() * 2 >= self.tx.max_capacity() {
            self.slow.store(false, Ordering::Release);
        }
    }

    /// Queues a delivery if there is room now; `false` when the queue is full (the caller
    /// drops and counts it). A closed queue (session gone) takes it silently.
    pub fn place_now(&self, delivery: Delivery) -> bool {
        !matches!(self.offer(delivery), Err(Offer::Full(_)))
    }

    /// Waits for room in the queue while a connection drains it (cancel-safe: nothing is lost
    /// when the wait is abandoned). `Err(())` when the session ended or its connection went
    /// away meanwhile: nobody will make room, so waiting on would only stall the publisher.
    pub async fn reserve(&self) -> Result<mpsc::Permit<'_, Delivery>, ()> {
        let left = self.left.notified();
        tokio::pin!(left);
        // Registered before the check, so a connection leaving right after it still wakes us.
        left.as_mut().enable();
        if !self.is_online() {
            return Err(());
        }
        tokio::select! {
            permit = self.tx.reserve() => permit.map_err(|_| ()),
            () = left => Err(()),
        }
    }
}

enum Offer {
    Full(Delivery),
    Closed,
}

/// Subscription options as granted (v5 §3.8.3.1; v3 uses only `qos`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionOptions {
    pub qos: QoS,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub retain_handling: RetainForwardRule,
    pub identifier: Option<usize>,
}

/// Trie key: a client for ordinary subscriptions, a group for shared ones.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum SubKey {
    Client(Arc<str>),
    Group(Arc<str>),
}

#[derive(Debug)]
enum Subscription {
    Direct {
        mailbox: Arc<Mailbox>,
        options: SubscriptionOptions,
    },
    Shared(SharedGroup),
}

/// The members of one `$share/{group}/{filter}`; each message goes to one of them, round-robin.
#[derive(Debug)]
struct SharedGroup {
    name: Arc<str>,
    filter: Arc<str>,
    /// Sorted by client id, so that every node lists a group's members in the same order.
    members: Vec<(Arc<Mailbox>, SubscriptionOptions)>,
    next: AtomicUsize,
}

/// Who gets a shared group's message.
enum SharedPick {
    Member(Arc<Mailbox>, SubscriptionOptions),
    /// The group's own log, from which its online APPLICATION members claim (Kafka backend).
    GroupLog,
}

/// Which part of routing a call does. One node alone does both at once (`All`); in a cluster
/// (`cluster.enabled`) the dispatcher of a record's partition does the persistent part and every
/// node's local reader (`router::local`) does the local part for its own connections, so a
/// clean subscriber on any node gets every message, and each delivery is made by exactly one of
/// the two: QoS ≥ 1 to a persistent session is persistent, everything else is local. A shared
/// group's member is picked alike by both from the record's log position ([`agreed_pick`]),
/// and each makes the part of that delivery that is its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Everything: the single-node behaviour.
    All,
    /// Storage only (DEVICE/APPLICATION appends, group-log appends, retained writes).
    Persistent,
    /// This node's connected mailboxes only (clean sessions at any QoS, QoS 0 to persistent
    /// ones) and the in-memory retained store; writes nothing.
    Local,
}

impl Scope {
    /// Whether the delivery of a shared group's pick belongs to this scope: a stored one to the
    /// dispatcher, an offer to the local reader of the node where the member is connected (on
    /// the others its session is a mirror nobody reads).
    fn owns_shared(self, stored: bool, online_here: bool) -> bool {
        match self {
            Scope::All => true,
            Scope::Persistent => stored,
            Scope::Local => !stored && online_here,
        }
    }

    /// Whether a delivery to a direct subscriber belongs to this scope; `stored`: it goes to
    /// the session's durable queue (see [`stored_delivery`]).
    fn owns_direct(self, stored: bool) -> bool {
        match self {
            Scope::All => true,
            Scope::Persistent => stored,
            Scope::Local => !stored,
        }
    }
}

/// What the router needs to know about a subscribe call's effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubscribeOutcome {
    /// The client already had a subscription with this exact filter (it was replaced).
    pub existed: bool,
}

/// Subscriptions, retained messages and fan-out. Shared by every connection.
pub struct Router {
    subscriptions: RwLock<SubscriptionTrie<SubKey, Subscription>>,
    retained: RwLock<RetainedStore<Arc<Message>>>,
    metrics: Arc<Metrics>,
    /// `device.message_ttl_secs` in milliseconds.
    device_ttl_ms: u64,
    /// APPLICATION members of shared groups get QoS 1/2 messages through the group's log
    /// (`WriteOp::AppendShared`), set when the storage backend serves them that way.
    shared_groups_in_log: AtomicBool,
    /// Shared groups with at least one member (see [`Router::has_shared_groups`]).
    shared_groups: AtomicUsize,
}

impl Router {
    pub fn new(metrics: Arc<Metrics>, device_ttl_secs: u64) -> Router {
        Router {
            subscriptions: RwLock::new(SubscriptionTrie::new()),
            retained: RwLock::new(RetainedStore::new()),
            metrics,
            device_ttl_ms: device_ttl_secs.saturating_mul(1000),
            shared_groups_in_log: AtomicBool::new(false),
            shared_groups: AtomicUsize::new(0),
        }
    }

    /// Whether any shared group has a member: in a cluster the local reader then makes the
    /// same picks as the dispatchers, which needs the session directory read first.
    pub fn has_shared_groups(&self) -> bool {
        self.shared_groups.load(Ordering::Relaxed) > 0
    }

    /// See [`crate::storage::Storage::shared_groups_in_log`].
    pub fn set_shared_groups_in_log(&self, on: bool) {
        self.shared_groups_in_log.store(on, Ordering::Relaxed);
    }

    /// Adds or replaces a subscription. `filter` has been validated by [`topic::parse_filter`].
    pub fn subscribe(
        &self,
        mailbox: &Arc<Mailbox>,
        filter: ParsedFilter<'_>,
        options: SubscriptionOptions,
    ) -> SubscribeOutcome {
        let mut trie = self.subscriptions.write();
        match filter {
            ParsedFilter::Plain(filter) => {
                let previous = trie.insert(
                    filter,
                    SubKey::Client(mailbox.client_id.clone()),
                    Subscription::Direct {
                        mailbox: mailbox.clone(),
                        options,
                    },
                );
                SubscribeOutcome {
                    existed: previous.is_some(),
                }
            }
            ParsedFilter::Shared { group, filter } => {
                let key = SubKey::Group(Arc::from(group));
                if let Some(Subscription::Shared(g)) = trie.get_mut(filter, &key) {
                    let existing = g
                        .members
                        .iter_mut()
                        .find(|(m, _)| m.client_id == mailbox.client_id);
                    if let Some(member) = existing {
                        *member = (mailbox.clone(), options);
                        return SubscribeOutcome { existed: true };
                    }
                    // In client id order: a cluster's pick (`agreed_pick`) counts on it.
                    let at = g
                        .members
                        .partition_point(|(m, _)| m.client_id < mailbox.client_id);
                    g.members.insert(at, (mailbox.clone(), options));
                    return SubscribeOutcome { existed: false };
                }
                self.shared_groups.fetch_add(1, Ordering::Relaxed);
                trie.insert(
                    filter,
                    key,
                    Subscription::Shared(SharedGroup {
                        name: Arc::from(group),
                        filter: Arc::from(filter),
                        members: vec![(mailbox.clone(), options)],
                        next: AtomicUsize::new(0),
                    }),
                );
                SubscribeOutcome { existed: false }
            }
        }
    }

    /// Removes a client's subscription; returns whether it existed.
    pub fn unsubscribe(&self, client_id: &Arc<str>, filter: ParsedFilter<'_>) -> bool {
        let mut trie = self.subscriptions.write();
        match filter {
            ParsedFilter::Plain(filter) => trie
                .remove(filter, &SubKey::Client(client_id.clone()))
                .is_some(),
            ParsedFilter::Shared { group, filter } => {
                let key = SubKey::Group(Arc::from(group));
                let Some(Subscription::Shared(g)) = trie.get_mut(filter, &key) else {
                    return false;
                };
                let before = g.members.len();
                g.members.retain(|(m, _)| &m.client_id != client_id);
                let removed = g.members.len() != before;
                if g.members.is_empty() && trie.remove(filter, &key).is_some() {
                    self.shared_groups.fetch_sub(1, Ordering::Relaxed);
                }
                removed
            }
        }
    }

    /// Removes the subscription `filter` of the session that owns `mailbox`, and only of that
    /// session: a newer session of the same client id may hold the same filter by now (after a
    /// takeover or a quick reconnect), and its subscription must stay. Used when a session
    /// ends; a client's own UNSUBSCRIBE goes through [`Router::unsubscribe`].
    pub fn unsubscribe_mailbox(&self, mailbox: &Arc<Mailbox>, filter: ParsedFilter<'_>) -> bool {
        let mut trie = self.subscriptions.write();
        match filter {
            ParsedFilter::Plain(filter) => {
                let key = SubKey::Client(mailbox.client_id.clone());
                let owned = matches!(
                    trie.get_mut(filter, &key),
                    Some(Subscription::Direct { mailbox: m, .. }) if Arc::ptr_eq(m, mailbox)
                );
                owned && trie.remove(filter, &key).is_some()
            }
            ParsedFilter::Shared { group, filter } => {
                let key = SubKey::Group(Arc::from(group));
                let Some(Subscription::Shared(g)) = trie.get_mut(filter, &key) else {
                    return false;
                };
                let before = g.members.len();
                g.members.retain(|(m, _)| !Arc::ptr_eq(m, mailbox));
                let removed = g.members.len() != before;
                if g.members.is_empty() && trie.remove(filter, &key).is_some() {
                    self.shared_groups.fetch_sub(1, Ordering::Relaxed);
                }
                removed
            }
        }
    }

    /// Routes a message to every matching subscriber. Returns how many deliveries were queued
    /// (v5 PUBACK says "no matching subscribers" when this is 0 and nothing matched at all).
    ///
    /// QoS 1/2 deliveries to persistent sessions become [`WriteOp::Enqueue`] entries in `batch`
    /// (the caller submits it and acknowledges the publisher once it is durable); everything else
    /// goes straight into the subscriber's mailbox.
    pub fn publish(&self, message: &Arc<Message>, batch: &mut WriteBatch) -> RouteResult {
        self.publish_scoped(message, batch, Scope::All, None)
    }

    /// [`Router::publish`], limited to one part of routing (see [`Scope`]). `origin` is the
    /// message's place in the publish log (partition, offset): with the `Persistent` and `Local`
    /// scopes each shared group's member is derived from it ([`agreed_pick`]), so that the
    /// dispatcher and every node's local reader pick the same member without talking.
    pub fn publish_scoped(
        &self,
        message: &Arc<Message>,
        batch: &mut WriteBatch,
        scope: Scope,
        origin: Option<(i32, i64)>,
    ) -> RouteResult {
        let topic = message.topic_str();
        let mut direct: Vec<Target> = Vec::new();
        let mut shared: Vec<(Arc<Mailbox>, QoS, bool, Option<usize>)> = Vec::new();
        let mut group_logs: Vec<(Arc<str>, Arc<str>)> = Vec::new();
        let in_log = self.shared_groups_in_log.load(Ordering::Relaxed);
        let mut matched = 0usize;
        {
            let trie = self.subscriptions.read();
            trie.for_each_match(topic, |_, sub| match sub {
                Subscription::Direct { mailbox, options } => {
                    matched += 1;
                    // v5 No Local: never back to the publisher [MQTT-3.8.3-3].
                    if options.no_local && mailbox.client_id == message.publisher {
                        return;
                    }
                    direct.push(Target {
                        mailbox: mailbox.clone(),
                        qos: min_qos(message.qos, options.qos),
                        retain: options.retain_as_published && message.retain,
                        ids: options.identifier.into_iter().collect(),
                    });
                }
                // In a cluster every scope makes the same pick and does its own part of it: the
                // dispatcher stores (or appends to the group log), the local reader of the node
                // the member is connected to offers.
                Subscription::Shared(group) if scope != Scope::All => {
                    matched += 1;
                    match agreed_pick(group, in_log, message.qos, origin.unwrap_or_default()) {
                        Some(SharedPick::Member(mailbox, options)) => {
                            let qos = min_qos(message.qos, options.qos);
                            let stored = stored_delivery(&mailbox, qos);
                            if scope.owns_shared(stored, mailbox.is_online()) {
                                shared.push((
                                    mailbox,
                                    qos,
                                    options.retain_as_published && message.retain,
                                    options.identifier,
                                ));
                            }
                        }
                        Some(SharedPick::GroupLog) if scope == Scope::Persistent => {
                            group_logs.push((group.name.clone(), group.filter.clone()));
                        }
                        Some(SharedPick::GroupLog) | None => {}
                    }
                }
                Subscription::Shared(group) => {
                    matched += 1;
                    match pick_member(group, in_log, message.qos) {
                        Some(SharedPick::Member(mailbox, options)) => shared.push((
                            mailbox,
                            min_qos(message.qos, options.qos),
                            options.retain_as_published && message.retain,
                            options.identifier,
                        )),
                        Some(SharedPick::GroupLog) => {
                            group_logs.push((group.name.clone(), group.filter.clone()));
                        }
                        None => {}
                    }
                }
            });
        }
        let mut result = RouteResult {
            matched,
            ..RouteResult::default()
        };
        // A client subscribed through several overlapping filters gets the message once, at the
        // highest QoS, with every subscription identifier [MQTT-3.3.4-2], [MQTT-3.3.4-3].
        if direct.len() > 1 {
            direct.sort_by_key(|t| Arc::as_ptr(&t.mailbox) as *const u8 as usize);
            direct.dedup_by(|later, kept| {
                if Arc::ptr_eq(&later.mailbox, &kept.mailbox) {
                    kept.qos = max_qos(kept.qos, later.qos);
                    kept.retain |= later.retain;
                    kept.ids.append(&mut later.ids);
                    true
                } else {
                    false
                }
            });
        }
        for target in direct {
            // Decided once: the session may turn persistent meanwhile, and a delivery this
            // scope declined must not be stored by it either.
            let stored = stored_delivery(&target.mailbox, target.qos);
            if !scope.owns_direct(stored) {
                continue;
            }
            let delivery = Delivery {
                message: message.clone(),
                qos: target.qos,
                retain: target.retain,
                subscription_ids: target.ids,
                seq: None,
                dup: false,
            };
            self.deliver(&target.mailbox, delivery, stored, batch, &mut result);
        }
        for (mailbox, qos, retain, id) in shared {
            // Only the receiving member's own identifier [MQTT-3.3.4-3 ff., v5 §3.3.4].
            let delivery = Delivery {
                message: message.clone(),
                qos,
                retain,
                subscription_ids: id.into_iter().collect(),
                seq: None,
                dup: false,
            };
            let stored = stored_delivery(&mailbox, qos);
            self.deliver(&mailbox, delivery, stored, batch, &mut result);
        }
        for (group, filter) in group_logs {
            let expires_at_ms = self.expiry_deadline(ClientKind::Application, message);
            batch.push(WriteOp::AppendShared {
                group,
                filter,
                delivery: Enqueued {
                    message: message.clone(),
                    qos: message.qos,
                    retain: message.retain,
                    expires_at_ms,
                    subscription_ids: Vec::new(),
                },
                origin: None,
            });
        }
        result
    }

    /// Stores a delivery for a persistent session, or hands it to the mailbox.
    fn deliver(
        &self,
        mailbox: &Arc<Mailbox>,
        delivery: Delivery,
        stored: bool,
        batch: &mut WriteBatch,
        result: &mut RouteResult,
    ) {
        if !stored {
            self.offer(mailbox, delivery, result);
            return;
        }
        let expires_at_ms = self.expiry_deadline(mailbox.kind, &delivery.message);
        batch.push(WriteOp::Enqueue {
            client: mailbox.client_id.clone(),
            kind: mailbox.kind,
            delivery: Enqueued {
                message: delivery.message,
                qos: delivery.qos,
                retain: delivery.retain,
                expires_at_ms,
                subscription_ids: delivery.subscription_ids,
            },
            notify: Some(mailbox.stored.clone()),
            origin: None,
        });
    }

    /// When a stored delivery expires (ms since epoch; 0 = never): the DEVICE TTL or the MQTT 5
    /// message expiry, whichever comes first. APPLICATION logs age out by retention instead.
    fn expiry_deadline(&self, kind: ClientKind, message: &Message) -> u64 {
        let received = instant_to_ms(message.received_at);
        let message_expiry = message
            .properties
            .message_expiry_interval
            .map(|s| received + u64::from(s) * 1000);
        let ttl = match kind {
            ClientKind::Device => Some(received + self.device_ttl_ms),
            ClientKind::Application => None,
        };
        match (message_expiry, ttl) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => 0,
        }
    }

    fn offer(&self, mailbox: &Arc<Mailbox>, delivery: Delivery, result: &mut RouteResult) {
        match mailbox.offer(delivery) {
            Ok(()) => {}
            // A connected subscriber that is keeping up is worth waiting for: the publisher
            // holds the delivery and stops reading until there is room (backpressure instead
            // of loss).
            Err(Offer::Full(delivery)) if mailbox.worth_waiting_for() => {
                result.full.push((mailbox.clone(), delivery));
            }
            Err(Offer::Full(_)) => self.metrics.messages_dropped_queue_full.inc(),
            Err(Offer::Closed) => {}
        }
    }

    /// Stores, replaces or (empty payload) deletes the retained message for its topic
    /// [MQTT-3.3.1-5], [MQTT-3.3.1-10].
    /// The change is also added to `batch`, so it survives a restart.
    pub fn retain(&self, message: &Arc<Message>, batch: &mut WriteBatch) {
        self.retain_stored(message, batch);
        self.restore_retained(message);
    }

    /// The storage half of [`Router::retain`]: the change goes into `batch` only (in a cluster
    /// every node's local reader keeps its own in-memory store current).
    pub fn retain_stored(&self, message: &Arc<Message>, batch: &mut WriteBatch) {
        let topic = message.topic_str().to_string();
        if message.payload.is_empty() {
            batch.push(WriteOp::DeleteRetained { topic });
        } else {
            let mut record = bytes::BytesMut::new();
            crate::storage::codec::encode_message(message, &mut record);
            batch.push(WriteOp::PutRetained {
                topic,
                record: record.to_vec(),
            });
        }
    }

    /// Sets or deletes a retained message in memory only (used when restoring from storage).
    pub fn restore_retained(&self, message: &Message) {
        let mut store = self.retained.write();
        if message.payload.is_empty() {
            store.remove(message.topic_str());
        } else {
            store.insert(message.topic_str(), Arc::new(detached(message)));
        }
        self.metrics.retained_messages.set(store.len() as u64);
    }

    /// Live retained messages matching `filter`, oldest-expiry dropped on the way [MQTT-3.3.2-5].
    pub fn retained_matching(&self, filter: &str, limit: usize) -> Vec<Arc<Message>> {
        let now = Instant::now();
        let mut out = Vec::new();
        let store = self.retained.read();
        store.for_each_match(filter, |_, m| {
            if out.len() < limit && !m.is_expired(now) {
                out.push(m.clone());
            }
        });
        out
    }

    /// Drops expired retained messages, in memory and (through `batch`) in storage. Called
    /// periodically.
    pub fn purge_expired_retained(&self, batch: &mut WriteBatch) {
        let now = Instant::now();
        let mut store = self.retained.write();
        store.retain(|topic, m| {
            let keep = !m.is_expired(now);
            if !keep {
                batch.push(WriteOp::DeleteRetained {
                    topic: topic.to_string(),
                });
            }
            keep
        });
        self.metrics.retained_messages.set(store.len() as u64);
    }
}

/// A copy of `message` that owns its bytes. Incoming topic and payload are slices of a
/// connection's read buffer; a retained message can live for months, and keeping a slice alive
/// would pin that whole buffer, so retained messages get their own allocation.
fn detached(message: &Message) -> Message {
    Message {
        topic: Bytes::copy_from_slice(&message.topic),
        payload: Bytes::copy_from_slice(&message.payload),
        qos: message.qos,
        retain: message.retain,
        properties: message.properties.clone(),
        received_at: message.received_at,
        publisher: message.publisher.clone(),
    }
}

/// Whether a delivery at `qos` to this session goes to its durable queue. QoS 0 is never
/// stored for anyone; an offline persistent session may miss it.
fn stored_delivery(mailbox: &Mailbox, qos: QoS) -> bool {
    qos != QoS::AtMostOnce && mailbox.is_persistent()
}

struct Target {
    mailbox: Arc<Mailbox>,
    qos: QoS,
    retain: bool,
    ids: Vec<usize>,
}

/// Round-robin over a shared group's members [MQTT-4.8.2]. Members whose queue is closed (the
/// session is gone) are skipped; fullness is handled by the caller's normal drop accounting.
///
/// With `in_log` (Kafka backend), the group's APPLICATION members together take one turn of
/// the round robin for QoS 1/2 messages: those go to the group's log, and Kafka balances it
/// over the online members. QoS 0 is never stored, so it goes to one of them directly.
fn pick_member(group: &SharedGroup, in_log: bool, qos: QoS) -> Option<SharedPick> {
    let is_app = |m: &Arc<Mailbox>| m.kind == ClientKind::Application;
    let via_log = in_log && qos != QoS::AtMostOnce && group.members.iter().any(|(m, _)| is_app(m));
    let candidates: Vec<&(Arc<Mailbox>, SubscriptionOptions)> = group
        .members
        .iter()
        .filter(|(m, _)| !(via_log && is_app(m)))
        .collect();
    let slots = candidates.len() + usize::from(via_log);
    if slots == 0 {
        return None;
    }
    let start = group.next.fetch_add(1, Ordering::Relaxed);
    for i in 0..slots {
        let slot = (start + i) % slots;
        let Some((mailbox, options)) = candidates.get(slot) else {
            return Some(SharedPick::GroupLog);
        };
        if mailbox.tx.is_closed() || mailbox.tx.capacity() == 0 {
            continue;
        }
        return Some(SharedPick::Member(mailbox.clone(), options.clone()));
    }
    // Everyone is full: pick the scheduled one so the drop is counted against it.
    match candidates.get(start % slots) {
        Some((mailbox, options)) => Some(SharedPick::Member(mailbox.clone(), options.clone())),
        None => Some(SharedPick::GroupLog),
    }
}

/// A cluster's pick of a shared group's member for the message at `origin` in the publish log:
/// a function of the origin and of the members' client ids only, so the dispatcher of the
/// record's partition and the local reader of every node, each reading the record, pick the
/// same member, and a replay after a rebalance picks it again. Unlike [`pick_member`] it cannot
/// skip a closed or full member (nodes would not agree on that); a full member's delivery is
/// dropped and counted as for any subscriber. The group's APPLICATION members take one slot
/// together for QoS 1/2 (the group log), as in [`pick_member`].
///
/// Nodes agree as long as they know the same members. While a member joins or leaves, a node
/// that has not applied the change yet may pick differently, so a message in that window can
/// reach no member or two (see docs/scale-out.md, "Shared subscriptions").
fn agreed_pick(
    group: &SharedGroup,
    in_log: bool,
    qos: QoS,
    origin: (i32, i64),
) -> Option<SharedPick> {
    let is_app = |m: &Arc<Mailbox>| m.kind == ClientKind::Application;
    let via_log = in_log && qos != QoS::AtMostOnce && group.members.iter().any(|(m, _)| is_app(m));
    // Members are kept in client id order: no list to build or sort per message.
    let candidates = || {
        group
            .members
            .iter()
            .filter(move |(m, _)| !(via_log && is_app(m)))
    };
    let slots = candidates().count() + usize::from(via_log);
    if slots == 0 {
        return None;
    }
    let slot = (spread(origin) % slots as u64) as usize;
    match candidates().nth(slot) {
        Some((mailbox, options)) => Some(SharedPick::Member(mailbox.clone(), options.clone())),
        None => Some(SharedPick::GroupLog),
    }
}

/// Mixes a log position into 64 well-spread bits (SplitMix64's finaliser): consecutive offsets
/// of one partition land on different members. The same on every node and every build, unlike
/// the standard library's seeded hasher.
fn spread((partition, offset): (i32, i64)) -> u64 {
    let mut z = ((partition as u32 as u64) << 48) ^ (offset as u64);
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Outcome of routing one message.
#[derive(Debug, Default)]
pub struct RouteResult {
    /// Subscriptions (and shared groups) whose filter matched.
    pub matched: usize,
    /// Deliveries for connected subscribers whose queue was full: the publisher's connection
    /// waits for room (bounded by `limits.slow_subscriber_wait_ms`) before reading on.
    pub full: Vec<(Arc<Mailbox>, Delivery)>,
}

/// Places deliveries that found a subscriber's queue full, waiting for room until `deadline`
/// and only while the subscriber is connected; what is still unplaced then is dropped and its
/// subscriber marked slow. Returns how many were dropped. Cancel-safe: a delivery leaves
/// `blocked` only when it is placed or dropped.
pub async fn place_blocked(
    blocked: &mut std::collections::VecDeque<(Arc<Mailbox>, crate::message::Delivery)>,
    deadline: tokio::time::Instant,
) -> u64 {
    let mut dropped = 0;
    while let Some((mailbox, _)) = blocked.front() {
        let mailbox = mailbox.clone();
        let reserved = tokio::time::timeout_at(deadline, mailbox.reserve()).await;
        match reserved {
            Ok(Ok(permit)) => {
                if let Some((_, delivery)) = blocked.pop_front() {
                    permit.send(delivery);
                }
            }
            // The session ended, or its connection went away: nobody drains the queue now,
            // and a full offline queue drops the newest message (counted).
            Ok(Err(())) => {
                if let Some((_, delivery)) = blocked.pop_front() {
                    if !mailbox.place_now(delivery) {
                        dropped += 1;
                    }
                }
            }
            // Time is up for every delivery still waiting (they share the deadline): each goes
            // in if room appeared meanwhile, else it is dropped and its subscriber marked slow.
            Err(_) => {
                for (mailbox, delivery) in blocked.drain(..) {
                    if !mailbox.place_now(delivery) {
                        mailbox.mark_slow();
                        dropped += 1;
                    }
                }
            }
        }
    }
    dropped
}
