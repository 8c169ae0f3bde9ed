//! APPLICATION shared subscriptions on Kafka: `$share/<group>/<filter>` subscribed by
//! APPLICATION clients.
//!
//! The router appends each message for the group once, to the group's own topic
//! ([`group_topic`]), keyed and partitioned by publisher (so one publisher's messages stay in
//! order). Every online member runs a *claimer*: a consumer in the group's Kafka consumer group
//! (group id = the topic name), so Kafka balances the topic's partitions over the online
//! members and hands a departed member's partitions to the others. A claimer moves each record
//! it is given into its member's own APPLICATION log (with the member's granted QoS and
//! subscription identifier), then commits. From there the member's ordinary delivery path takes
//! over: acknowledgements, redelivery and the committed offset work as for its own messages,
//! and a message, once claimed, stays with that member [MQTT-4.8.2-5]. Messages wait in the
//! group topic (within its retention) while no member is online.
//!
//! **Once, not twice.** A record must not be claimed twice: not when a partition moves between
//! members before the first one committed, and not when the broker crashed between the append
//! and the commit. A claimer commits what it moved, synchronously, before it gives partitions
//! up in a rebalance (`ClaimContext::pre_rebalance`), so the next owner, on whichever node,
//! resumes after it. On one node, claims in progress are also announced per partition, and the
//! highest claimed offset per partition is kept; at start it is read back from the
//! `ferrymq.claim` header at the end of every APPLICATION topic. Not covered: a node killed
//! between a claim round's appends and its commit, when the partition goes to a member on
//! another node (that node does not read the dead member's log; a transactional claim, the
//! appends and the offset commit in one Kafka transaction, would close it). The router's own appends to group topics carry their
//! publish-log origin and are recognised like APPLICATION appends: after a crash (the ends are
//! read at start), after a failed append (one that timed out may have landed) and after this
//! node's router claimed a publish-log partition another node routed before
//! ([`SharedGroups::recheck`]): a message the router routes twice is in the group topic once.
//!
//! The embedded backend keeps MQTT's usual round robin over members, storing into the chosen
//! member's log.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::{Header, Message as _};
use rdkafka::ClientContext;
use rdkafka::{Offset, TopicPartitionList};
use sha2::{Digest, Sha256};
use tokio::sync::{oneshot, watch, Notify};

use super::app::{scan_tail, ApplicationLogs, Tag};
use super::position::{NextOffset, Step};
use super::record::{self, SubscriberPart};
use super::{hex, is_plain_name, kafka_error, Kafka};
use crate::message::min_qos;
use crate::router::topic::{parse_filter, ParsedFilter, TopicLimits};
use crate::router::SubscriptionOptions;
use crate::storage::Enqueued;
use crate::storage::{Completion, StorageError};

/// The claimer's consumer context: logs which member got or lost which partitions, and
/// commits what the claimer moved before it gives partitions up. Where a partition resumes is
/// Kafka's business: the committed offset, fetched exactly.
struct ClaimContext {
    /// The member this claimer works for (for the logs).
    member: Arc<str>,
    /// The group topic.
    topic: String,
    /// Per assigned partition, the offset the claimer expects next (known after its first
    /// record), to notice records retention deleted before anyone claimed them.
    next: parking_lot::Mutex<HashMap<i32, NextOffset>>,
    /// Per partition of the current assignment, the offset after the last record this claimer
    /// moved into its member's log.
    moved: parking_lot::Mutex<HashMap<i32, i64>>,
}

impl ClientContext for ClaimContext {}

impl ConsumerContext for ClaimContext {
    /// Commits, synchronously, the position after what this claimer moved from the partitions
    /// it gives up. The round's own commit is asynchronous and fails once the rebalance has
    /// begun; without this the next owner, on another node whose claim state does not know
    /// these records, started before them and moved them into a second member's log. The
    /// coordinator accepts the commit: the rebalance waits for this member to rejoin, which it
    /// does after this callback.
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if !matches!(rebalance, Rebalance::Revoke(_)) {
            return;
        }
        let moved = std::mem::take(&mut *self.moved.lock());
        if moved.is_empty() {
            return;
        }
        let mut commit = TopicPartitionList::new();
        for (partition, next) in &moved {
            let _ = commit.add_partition_offset(&self.topic, *partition, Offset::Offset(*next));
        }
        if let Err(e) = consumer.commit(&commit, CommitMode::Sync) {
            tracing::warn!(client_id = %self.member, topic = self.topic, error = %e, ?moved, "committing the claimed position before a rebalance failed; the next owner may move these records again");
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        self.next.lock().clear();
        self.moved.lock().clear();
        match rebalance {
            Rebalance::Assign(tpl) => tracing::info!(
                client_id = %self.member,
                partitions = ?partitions(tpl),
                "shared group partitions assigned"
            ),
            Rebalance::Revoke(tpl) => tracing::info!(
                client_id = %self.member,
                partitions = ?partitions(tpl),
                "shared group partitions revoked"
            ),
            Rebalance::Error(e) => {
                tracing::warn!(client_id = %self.member, error = %e, "shared group rebalance failed")
            }
        }
    }
}

fn partitions(tpl: &TopicPartitionList) -> Vec<(String, i32)> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_string(), e.partition()))
        .collect()
}

/// How long a claim round may take before the claimer counts as stuck and leaves the group
/// (a member whose log cannot be written; its partitions go to the others), unless the session
/// timeout is longer (librdkafka refuses a poll interval below it). Also the time the
/// coordinator waits for members to rejoin during a rebalance.
const GROUP_MAX_POLL_INTERVAL_MS: u32 = 30_000;

/// Records a claimer moves per round at most (one round = produce all, await all, commit).
const CLAIM_BATCH: usize = 512;
/// Backoff while a member's log cannot be written.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// The topic of one shared group: `<prefix>.share.<group>.<16 hex of sha-256(filter)>` when the
/// share name is 1 to 64 characters of `[A-Za-z0-9_-]`, else `<prefix>.share.h.<sha-256 of
/// group NUL filter>`. The share name and the filter together identify a shared subscription
/// (MQTT 5 §4.8.2), and both forms stay legal, stable topic names.
pub fn group_topic(prefix: &str, group: &str, filter: &str) -> String {
    if is_plain_name(group) {
        let digest = Sha256::digest(filter.as_bytes());
        format!("{prefix}.share.{group}.{}", hex(&digest[..8]))
    } else {
        let mut hasher = Sha256::new();
        hasher.update(group.as_bytes());
        hasher.update([0]);
        hasher.update(filter.as_bytes());
        format!("{prefix}.share.h.{}", hex(&hasher.finalize()))
    }
}

/// The partition of a group topic a publisher's messages go to (FNV-1a: stable across
/// versions, unlike std's hasher).
fn partition_for(publisher: &str, partitions: i32) -> i32 {
    let mut hash: u32 = 0x811c_9dc5;
    for b in publisher.bytes() {
        hash ^= u32::from(b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    (hash % partitions.max(1) as u32) as i32
}

type PartitionKey = (String, i32);

/// State shared by the claimers of this broker.
#[derive(Default)]
struct Claims {
    /// Per group topic partition, the highest offset moved into some member's log.
    done: HashMap<PartitionKey, i64>,
    /// Per group topic partition, the highest offset a claimer is moving right now.
    in_progress: HashMap<PartitionKey, i64>,
}

/// A running claimer; dropping it stops the claimer between two rounds.
struct Claimer {
    options: SubscriptionOptions,
    _stop: watch::Sender<()>,
}

pub struct SharedGroups {
    kafka: Arc<Kafka>,
    apps: Arc<ApplicationLogs>,
    partitions: i32,
    topic_config: Vec<(&'static str, String)>,
    /// Partition counts of the group topics known to exist.
    known: parking_lot::Mutex<HashMap<String, i32>>,
    /// Router replays: per group topic partition and publish-log partition, the highest origin
    /// found at the end of the topic (at start, after a failed append, and after this node's
    /// router claimed a partition: [`SharedGroups::recheck`]).
    skip: parking_lot::Mutex<HashMap<PartitionKey, super::Origins>>,
    /// Per group topic partition, the router claim count when its end was last read.
    checked: parking_lot::Mutex<HashMap<PartitionKey, u64>>,
    claims: Arc<parking_lot::Mutex<Claims>>,
    /// Member → group topic → claimer.
    claimers: parking_lot::Mutex<HashMap<Arc<str>, HashMap<String, Claimer>>>,
}

impl SharedGroups {
    pub fn new(
        kafka: Arc<Kafka>,
        apps: Arc<ApplicationLogs>,
        partitions: i32,
        topic_config: Vec<(&'static str, String)>,
    ) -> SharedGroups {
        SharedGroups {
            kafka,
            apps,
            partitions,
            topic_config,
            known: Default::default(),
            skip: Default::default(),
            checked: Default::default(),
            claims: Default::default(),
            claimers: Default::default(),
        }
    }

    fn topic(&self, group: &str, filter: &str) -> String {
        group_topic(&self.kafka.config.topic_prefix, group, filter)
    }

    /// The partition count of a group topic, created on first need (group topics are the
    /// broker's own, whatever `auto_create_application_topics` says: the router must never
    /// wait for an operator).
    async fn partitions_of(&self, topic: &str) -> Result<i32, StorageError> {
        if let Some(n) = self.known.lock().get(topic) {
            return Ok(*n);
        }
        self.kafka
            .ensure_topic(topic, self.partitions, &self.topic_config, true)
            .await?;
        let n = self
            .kafka
            .partitions(topic)
            .await?
            .ok_or_else(|| StorageError::MissingTopic(topic.to_string()))? as i32;
        self.known.lock().insert(topic.to_string(), n);
        Ok(n)
    }

    /// Appends a message for a group (the router's `WriteOp::AppendShared`). Resolves at once
    /// when a crashed predecessor already appended it.
    pub async fn append(
        &self,
        group: &str,
        filter: &str,
        delivery: &Enqueued,
        origin: Option<(i32, i64)>,
    ) -> Completion {
        let topic = self.topic(group, filter);
        let done = |result| {
            let (tx, rx) = oneshot::channel();
            let _ = tx.send(result);
            rx
        };
        let partitions = match self.partitions_of(&topic).await {
            Ok(n) => n,
            Err(e) => return done(Err(e)),
        };
        let publisher = delivery.message.publisher.clone();
        let partition = partition_for(&publisher, partitions);
        if let Some((p, o)) = origin {
            if super::already_appended(self.skip.lock().get(&(topic.clone(), partition)), p, o) {
                return done(Ok(()));
            }
        }
        let mut headers = record::headers(
            &delivery.message,
            Some(SubscriberPart {
                qos: delivery.qos,
                retain: delivery.retain,
                subscription_ids: &[],
            }),
        );
        if let Some((p, o)) = origin {
            headers = headers.insert(Header {
                key: record::ORIGIN_HEADER,
                value: Some(format!("{p}:{o}").as_bytes()),
            });
        }
        self.kafka.send(
            &topic,
            Some(publisher.as_bytes()),
            Some(partition),
            &delivery.message.payload,
            headers,
        )
    }

    /// Whether the group topic partition a message of `publisher` goes to was last read before
    /// this node's router claimed its latest publish-log partition (`claims` claims so far):
    /// the node that routed that partition before may have appended records this node's
    /// dispatcher is about to route again. Unknown partition counts count as unread.
    pub fn read_before_claim(
        &self,
        group: &str,
        filter: &str,
        publisher: &str,
        claims: u64,
    ) -> bool {
        if claims == 0 {
            return false;
        }
        let topic = self.topic(group, filter);
        let Some(partitions) = self.known.lock().get(&topic).copied() else {
            return true;
        };
        let key = (topic, partition_for(publisher, partitions));
        self.checked.lock().get(&key).copied().unwrap_or(0) < claims
    }

    /// The group topic partition a message of `publisher` for a group goes to (the topic is
    /// created when missing).
    pub async fn partition_of(
        &self,
        group: &str,
        filter: &str,
        publisher: &str,
    ) -> Result<(String, i32), StorageError> {
        let topic = self.topic(group, filter);
        let partitions = self.partitions_of(&topic).await?;
        let partition = partition_for(publisher, partitions);
        Ok((topic, partition))
    }

    /// Reads the end of a group topic partition and raises what [`SharedGroups::append`] skips
    /// to the origins found there. Called before appending after a failed append (one that
    /// timed out may have landed) and after a router claim, so that a record routed twice is
    /// in the group topic once, and so claimed by one member once.
    pub async fn recheck(&self, key: (String, i32), claims: u64) -> Result<(), StorageError> {
        let mut origins = super::Origins::new();
        scan_tail(&self.kafka, &key.0, key.1, |headers| {
            if let Some((p, o)) = record::origin(headers) {
                super::note_origin(&mut origins, p, o);
            }
        })
        .await?;
        self.checked.lock().insert(key.clone(), claims);
        let mut skip = self.skip.lock();
        let known = skip.entry(key).or_default();
        for (p, o) in origins {
            super::note_origin(known, p, o);
        }
        Ok(())
    }

    /// At start: reads the end of every group topic these shared subscriptions use (what a
    /// replaying router must not append again).
    pub async fn scan_group_topics(&self, filters: &[String]) {
        let mut topics: Vec<String> = filters
            .iter()
            .filter_map(|f| split_shared(f))
            .map(|(g, f)| self.topic(&g, &f))
            .collect();
        topics.sort();
        topics.dedup();
        for topic in topics {
            let partitions = match self.kafka.partitions(&topic).await {
                Ok(Some(n)) => n as i32,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(topic, error = %e, "reading a shared group topic at start failed");
                    continue;
                }
            };
            self.known.lock().insert(topic.clone(), partitions);
            for partition in 0..partitions {
                let mut origins = super::Origins::new();
                let scanned = scan_tail(&self.kafka, &topic, partition, |headers| {
                    if let Some((p, o)) = record::origin(headers) {
                        super::note_origin(&mut origins, p, o);
                    }
                })
                .await;
                if let Err(e) = scanned {
                    tracing::warn!(topic, partition, error = %e, "reading the end of a shared group topic failed");
                }
                if !origins.is_empty() {
                    self.skip.lock().insert((topic.clone(), partition), origins);
                }
            }
        }
    }

    /// At start: what the end of an APPLICATION topic says was claimed.
    pub fn claimed_at_start(&self, claims: HashMap<(String, i32), i64>) {
        let mut state = self.claims.lock();
        for (key, offset) in claims {
            let e = state.done.entry(key).or_insert(offset);
            *e = (*e).max(offset);
        }
    }

    /// Sets the shared subscriptions of an online APPLICATION member: claimers start for new
    /// ones and stop for those gone (or restart with changed options).
    pub fn set_member(
        &self,
        member: &Arc<str>,
        subscriptions: Vec<(String, SubscriptionOptions)>,
        wake: Arc<Notify>,
    ) {
        let mut wanted: HashMap<String, SubscriptionOptions> = HashMap::new();
        for (filter, options) in subscriptions {
            if let Some((g, f)) = split_shared(&filter) {
                wanted.insert(self.topic(&g, &f), options);
            }
        }
        let mut all = self.claimers.lock();
        let running = all.entry(member.clone()).or_default();
        running.retain(|topic, c| wanted.get(topic) == Some(&c.options));
        for (topic, options) in wanted {
            if running.contains_key(&topic) {
                continue;
            }
            let (stop, stopped) = watch::channel(());
            let claimer = ClaimerTask {
                kafka: self.kafka.clone(),
                apps: self.apps.clone(),
                claims: self.claims.clone(),
                member: member.clone(),
                topic: topic.clone(),
                options: options.clone(),
                wake: wake.clone(),
                partitions: self.partitions,
                topic_config: self.topic_config.clone(),
            };
            tokio::spawn(claimer.run(stopped));
            running.insert(
                topic,
                Claimer {
                    options,
                    _stop: stop,
                },
            );
        }
        if running.is_empty() {
            all.remove(member);
        }
    }

    /// The member went offline: its claimers stop (Kafka hands their partitions to the others).
    pub fn member_offline(&self, member: &str) {
        self.claimers.lock().remove(member);
    }
}

/// `$share/<group>/<filter>` → (group, filter).
fn split_shared(filter: &str) -> Option<(String, String)> {
    match parse_filter(filter, &TopicLimits::default()) {
        Ok(ParsedFilter::Shared { group, filter }) => Some((group.to_string(), filter.to_string())),
        _ => None,
    }
}

/// The settings of a claimer's consumer in the group `group`.
fn claimer_config(config: &crate::config::KafkaConfig, group: &str) -> rdkafka::ClientConfig {
    let session = config.group_session_timeout_ms;
    let mut c = Kafka::client_config(config);
    c.set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", "100")
        .set("session.timeout.ms", session.to_string())
        .set(
            "max.poll.interval.ms",
            GROUP_MAX_POLL_INTERVAL_MS.max(session).to_string(),
        );
    c
}

struct ClaimerTask {
    kafka: Arc<Kafka>,
    apps: Arc<ApplicationLogs>,
    claims: Arc<parking_lot::Mutex<Claims>>,
    member: Arc<str>,
    topic: String,
    options: SubscriptionOptions,
    wake: Arc<Notify>,
    /// For creating the group topic.
    partitions: i32,
    topic_config: Vec<(&'static str, String)>,
}

impl ClaimerTask {
    async fn run(self, mut stopped: watch::Receiver<()>) {
        // The topic may not exist yet when nobody published to the group so far.
        if let Err(e) = self
            .kafka
            .ensure_topic(&self.topic, self.partitions, &self.topic_config, true)
            .await
        {
            tracing::warn!(topic = self.topic, error = %e, "creating a shared group topic failed; the member's claimer retries");
        }
        let mut backoff = RETRY_MIN;
        loop {
            match self.consume(&mut stopped).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(client_id = %self.member, topic = self.topic, error = %e, "shared group claimer failed; restarting");
                    tokio::select! {
                        _ = stopped.changed() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(RETRY_MAX);
                }
            }
        }
    }

    /// Consumes until stopped (`Ok`) or the consumer fails.
    async fn consume(&self, stopped: &mut watch::Receiver<()>) -> Result<(), StorageError> {
        let consumer: StreamConsumer<ClaimContext> =
            claimer_config(&self.kafka.config, &self.topic)
                .create_with_context(ClaimContext {
                    member: self.member.clone(),
                    topic: self.topic.clone(),
                    next: Default::default(),
                    moved: Default::default(),
                })
                .map_err(kafka_error)?;
        consumer.subscribe(&[&self.topic]).map_err(kafka_error)?;
        let result = self.claim_rounds(&consumer, stopped).await;
        super::close_in_background(consumer);
        result
    }

    /// Claims round after round until stopped (`Ok`) or the consumer fails.
    async fn claim_rounds(
        &self,
        consumer: &StreamConsumer<ClaimContext>,
        stopped: &mut watch::Receiver<()>,
    ) -> Result<(), StorageError> {
        loop {
            let first = tokio::select! {
                _ = stopped.changed() => return Ok(()),
                next = consumer.recv() => next.map_err(kafka_error)?,
            };
            let mut round = vec![first.detach()];
            while round.len() < CLAIM_BATCH {
                match tokio::time::timeout(Duration::ZERO, consumer.recv()).await {
                    Ok(Ok(m)) => round.push(m.detach()),
                    _ => break,
                }
            }
            let fetched = round.len();
            let round = self.positioned(consumer, round);
            tracing::debug!(client_id = %self.member, topic = self.topic, fetched, kept = round.len(), first = ?round.first().map(|m| (m.partition(), m.offset())), last = ?round.last().map(|m| (m.partition(), m.offset())), "claim round");
            if round.is_empty() {
                continue;
            }
            if !self.claim(&round, stopped).await {
                // Stopped with records not moved: nothing is committed, so the next owner
                // moves them.
                return Ok(());
            }
            let mut commit = TopicPartitionList::new();
            let mut last: HashMap<i32, i64> = HashMap::new();
            for m in &round {
                let e = last.entry(m.partition()).or_insert(m.offset());
                *e = (*e).max(m.offset());
            }
            {
                let mut moved = consumer.context().moved.lock();
                for (p, o) in last {
                    let _ = commit.add_partition_offset(&self.topic, p, Offset::Offset(o + 1));
                    moved.insert(p, o + 1);
                }
            }
            // Losing a commit (rebalance, crash) only means the next owner reads records that
            // the claim state marks as done.
            let _ = consumer.commit(&commit, CommitMode::Async);
        }
    }

    /// Drops records below what the claimer already took from their partition (a refetch),
    /// and counts records retention deleted between two it got.
    fn positioned(
        &self,
        consumer: &StreamConsumer<ClaimContext>,
        round: Vec<rdkafka::message::OwnedMessage>,
    ) -> Vec<rdkafka::message::OwnedMessage> {
        let mut kept = Vec::with_capacity(round.len());
        let mut next = consumer.context().next.lock();
        for m in round {
            let p = m.partition();
            let state = next.entry(p).or_insert_with(|| NextOffset::new(m.offset()));
            match state.step(m.offset()) {
                Step::Skip => {}
                Step::Take => kept.push(m),
                Step::Gap { expected, missing } => {
                    self.kafka.metrics.kafka_log_gaps.add(missing as u64);
                    tracing::error!(
                        topic = self.topic,
                        partition = p,
                        expected,
                        got = m.offset(),
                        missing,
                        "shared group records were deleted by retention before a member claimed them; they are lost"
                    );
                    kept.push(m);
                }
            }
        }
        kept
    }

    /// Moves one round of records into the member's log; returns once all are there (retrying
    /// while the log cannot be written; `true`) or the claimer is stopped (`false` if records
    /// were left).
    async fn claim(
        &self,
        round: &[rdkafka::message::OwnedMessage],
        stopped: &mut watch::Receiver<()>,
    ) -> bool {
        let mut highest: HashMap<i32, i64> = HashMap::new();
        for m in round {
            let e = highest.entry(m.partition()).or_insert(m.offset());
            *e = (*e).max(m.offset());
        }
        // Wait while another claimer (the partition's previous owner) is still moving records
        // of these partitions, then announce ours.
        let mut waited = false;
        loop {
            let busy = {
                let mut claims = self.claims.lock();
                let busy = highest
                    .keys()
                    .any(|p| claims.in_progress.contains_key(&(self.topic.clone(), *p)));
                if !busy {
                    for (p, o) in &highest {
                        claims.in_progress.insert((self.topic.clone(), *p), *o);
                    }
                }
                busy
            };
            if !busy {
                break;
            }
            if !waited {
                waited = true;
                tracing::debug!(client_id = %self.member, topic = self.topic, "waiting for another claimer of these partitions");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let done: HashMap<i32, i64> = {
            let claims = self.claims.lock();
            highest
                .keys()
                .filter_map(|p| claims.done.get(&(self.topic.clone(), *p)).map(|o| (*p, *o)))
                .collect()
        };
        let mut records = Vec::new();
        for m in round {
            if done.get(&m.partition()).is_some_and(|d| m.offset() <= *d) {
                continue;
            }
            match record::decode(m.headers(), m.payload().unwrap_or_default()) {
                Ok(delivery) => {
                    let qos = min_qos(delivery.qos, self.options.qos);
                    let retain = self.options.retain_as_published && delivery.retain;
                    let ids: Vec<usize> = self.options.identifier.into_iter().collect();
                    let share = Enqueued {
                        message: Arc::new(delivery.message),
                        qos,
                        retain,
                        expires_at_ms: delivery.expires_at_ms,
                        subscription_ids: ids,
                    };
                    records.push((m.partition(), m.offset(), share));
                }
                Err(e) => {
                    tracing::error!(topic = self.topic, partition = m.partition(), offset = m.offset(), error = %e, "skipping unreadable shared group record");
                }
            }
        }
        tracing::debug!(client_id = %self.member, topic = self.topic, ?done, to_claim = records.len(), "claiming");
        let mut backoff = RETRY_MIN;
        while !records.is_empty() {
            let pending: Vec<Completion> = records
                .iter()
                .map(|(p, o, share)| {
                    self.apps
                        .append(&self.member, share, Tag::Claim(&self.topic, *p, *o))
                })
                .collect();
            let mut failed = None;
            for (i, p) in pending.into_iter().enumerate() {
                if let Err(e) = p.await.unwrap_or(Err(StorageError::Closed)) {
                    failed.get_or_insert((i, e));
                }
            }
            match failed {
                None => {
                    // Everything is in: an empty `records` raises the claim state below, which
                    // keeps a refetch after a rebalance out of the member's log.
                    records.clear();
                    break;
                }
                Some((i, e)) => {
                    // The log is one partition, appended in order: what precedes the first
                    // failure is in; redo from there.
                    tracing::warn!(client_id = %self.member, topic = self.topic, error = %e, "moving shared group records into the member's log failed; retrying");
                    records.drain(..i);
                    if stopped.has_changed().is_err() {
                        break;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(RETRY_MAX);
                }
            }
        }
        {
            let mut claims = self.claims.lock();
            for (p, o) in &highest {
                let key = (self.topic.clone(), *p);
                claims.in_progress.remove(&key);
                // Stopped before everything was in: the next owner claims the rest.
                if records.is_empty() {
                    let e = claims.done.entry(key).or_insert(*o);
                    *e = (*e).max(*o);
                }
            }
        }
        self.wake.notify_one();
        records.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_topics_are_legal_stable_and_distinct() {
        let a = group_topic("ferrymq", "g1", "plant/+/temp");
        let b = group_topic("ferrymq", "g1", "plant/#");
        let c = group_topic("ferrymq", "g/1", "plant/#");
        assert!(a.starts_with("ferrymq.share.g1."));
        assert_ne!(a, b);
        assert!(c.starts_with("ferrymq.share.h."));
        for t in [&a, &b, &c] {
            assert!(t.len() <= 249);
            assert!(t
                .bytes()
                .all(|x| x.is_ascii_alphanumeric() || b"._-".contains(&x)));
        }
        assert_eq!(a, group_topic("ferrymq", "g1", "plant/+/temp"));
    }

    /// librdkafka checks a consumer's settings when it is created (no connection needed): the
    /// claimer's must pass over the whole range `kafka.group_session_timeout_ms` accepts.
    #[tokio::test]
    async fn claimer_settings_are_accepted_by_librdkafka() {
        for session in [6_000, 10_000, 45_000, 300_000] {
            let config = crate::config::KafkaConfig {
                group_session_timeout_ms: session,
                ..Default::default()
            };
            let created: Result<StreamConsumer, _> = claimer_config(&config, "g").create();
            assert!(created.is_ok(), "session {session}: {:?}", created.err());
        }
    }

    #[test]
    fn a_publisher_always_lands_in_the_same_partition() {
        for n in [1, 4, 16] {
            let p = partition_for("meter-17", n);
            assert!((0..n).contains(&p));
            assert_eq!(p, partition_for("meter-17", n));
        }
        let spread: std::collections::HashSet<i32> = (0..64)
            .map(|i| partition_for(&format!("p{i}"), 4))
            .collect();
        assert_eq!(spread.len(), 4);
    }
}
