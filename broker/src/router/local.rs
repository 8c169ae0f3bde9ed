//! Local delivery in a cluster (`cluster.enabled`): every node reads all of the publish log
//! ([`LocalLogReader`]) and does the [`Scope::Local`] part of routing for its own connections —
//! clean-session subscribers at any QoS, QoS 0 to persistent sessions — and keeps its in-memory
//! retained store current. The dispatcher of each partition does the [`Scope::Persistent`]
//! part, on whichever node holds it, so nothing is delivered twice on a node that runs both.
//!
//! Nothing is stored: a clean subscriber's messages live in its mailbox, as on a single node.
//! Full mailboxes of connected subscribers hold the reader back for up to
//! `limits.slow_subscriber_wait_ms`, as they hold the dispatcher back on a single node.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::dispatcher::{BatchGate, Qos2Flows};
use super::{place_blocked, Router, Scope};
use crate::message::Delivery;
use crate::metrics::Metrics;
use crate::storage::log::{LocalLogReader, LogEntry, PartitionRecords};
use crate::storage::WriteBatch;

/// What local delivery needs.
pub struct LocalDelivery {
    pub router: Arc<Router>,
    pub metrics: Arc<Metrics>,
    /// `limits.slow_subscriber_wait_ms`.
    pub slow_wait: Duration,
    /// The session directory: read to its end before a batch while shared groups exist, so
    /// that this node knows every member the dispatchers know (`router::agreed_pick`).
    pub gate: Option<Arc<dyn BatchGate>>,
}

impl LocalDelivery {
    /// Delivers from the log until shutdown (or until the log cannot be read any more).
    pub async fn run(
        self,
        mut reader: Box<dyn LocalLogReader>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut flows = Qos2Flows::unpartitioned(reader.open_qos2_flows());
        loop {
            let partitions = tokio::select! {
                _ = shutdown.changed() => return,
                next = reader.next() => match next {
                    Some(p) => p,
                    None => return,
                },
            };
            self.pass_gate().await;
            let mut blocked = VecDeque::new();
            for records in partitions {
                let live_from = reader.live_from(records.partition);
                self.deliver(records, live_from, &mut flows, &mut blocked);
            }
            if !blocked.is_empty() {
                let deadline = tokio::time::Instant::now() + self.slow_wait;
                let dropped = place_blocked(&mut blocked, deadline).await;
                if dropped > 0 {
                    self.metrics.messages_dropped_queue_full.add(dropped);
                }
            }
        }
    }

    /// While shared groups exist, waits until this node has read the session directory as far
    /// as it went when the batch was read: a member that subscribed before a message was
    /// acknowledged is then known here as it is to the message's dispatcher, so both pick the
    /// same member (without it, the first messages after a member joined on another node went
    /// to two members in a CI run). A directory that cannot be read holds nothing back: local
    /// delivery goes on with the members known (the node fences itself if the outage lasts).
    async fn pass_gate(&self) {
        let Some(gate) = &self.gate else { return };
        if !self.router.has_shared_groups() {
            return;
        }
        if let Err(e) = gate.before_batch().await {
            tracing::debug!(error = %e, "local delivery goes on without a current session directory");
        }
    }

    /// Applies one partition's records: retained changes always, deliveries from `live_from`.
    fn deliver(
        &self,
        records: PartitionRecords,
        live_from: i64,
        flows: &mut Qos2Flows,
        blocked: &mut VecDeque<(Arc<super::Mailbox>, Delivery)>,
    ) {
        // The local scope writes nothing; the flows' own bookkeeping ops land here and go.
        let mut scratch = WriteBatch::default();
        let partition = records.partition;
        for record in records.records {
            let (delivery, qos2) = match record.entry {
                LogEntry::Publish { delivery, qos2 } => (delivery, qos2),
                LogEntry::Control(control) => {
                    flows.apply(partition, &control, &mut scratch);
                    continue;
                }
                LogEntry::Unreadable => continue,
            };
            // A resent copy of a QoS 2 message the dispatchers drop is dropped here too:
            // exactly once for clean subscribers as well.
            if let Some((pkid, dup)) = qos2 {
                if !flows.route(
                    partition,
                    &delivery.message.publisher,
                    pkid,
                    dup,
                    &mut scratch,
                ) {
                    continue;
                }
            }
            let message = Arc::new(delivery.message);
            if message.retain {
                self.router.restore_retained(&message);
            }
            if record.offset >= live_from {
                let routed = self.router.publish_scoped(
                    &message,
                    &mut scratch,
                    Scope::Local,
                    Some((partition, record.offset)),
                );
                blocked.extend(routed.full);
            }
            scratch.ops.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use bytes::Bytes;
    use tokio::sync::mpsc;

    use super::*;
    use crate::message::Message;
    use crate::protocol::{QoS, RetainForwardRule};
    use crate::router::topic::{parse_filter, TopicLimits};
    use crate::router::{Mailbox, SubscriptionOptions};
    use crate::storage::codec::StoredDelivery;
    use crate::storage::log::{LogControl, LogRecord};
    use crate::storage::{ClientKind, WriteOp};

    fn message(topic: &'static str, qos: QoS, retain: bool, payload: &'static str) -> Message {
        Message {
            topic: Bytes::from_static(topic.as_bytes()),
            payload: Bytes::from_static(payload.as_bytes()),
            qos,
            retain,
            properties: Default::default(),
            received_at: std::time::Instant::now(),
            publisher: "pub".into(),
        }
    }

    fn options(qos: QoS) -> SubscriptionOptions {
        SubscriptionOptions {
            qos,
            no_local: false,
            retain_as_published: false,
            retain_handling: RetainForwardRule::OnEverySubscribe,
            identifier: None,
        }
    }

    fn subscribe(router: &Router, mailbox: &Arc<Mailbox>, filter: &str, qos: QoS) {
        let limits = TopicLimits {
            max_topic_len: 1024,
            max_levels: 32,
        };
        let parsed = parse_filter(filter, &limits).expect("filter");
        router.subscribe(mailbox, parsed, options(qos));
    }

    fn mailbox(
        id: &str,
        persistent: bool,
    ) -> (Arc<Mailbox>, mpsc::Receiver<crate::message::Delivery>) {
        let (m, rx) = Mailbox::new(id.into(), 64, ClientKind::Device, persistent);
        m.set_online(true);
        (m, rx)
    }

    fn drain(rx: &mut mpsc::Receiver<crate::message::Delivery>) -> Vec<(String, QoS)> {
        let mut out = Vec::new();
        while let Ok(d) = rx.try_recv() {
            let payload = String::from_utf8_lossy(&d.message.payload).into_owned();
            out.push((payload, d.qos));
        }
        out
    }

    fn enqueued(batch: &WriteBatch) -> Vec<String> {
        batch
            .ops
            .iter()
            .filter_map(|op| match op {
                WriteOp::Enqueue { client, .. } => Some(client.to_string()),
                _ => None,
            })
            .collect()
    }

    /// The persistent and the local scope together do what `All` does, each delivery made by
    /// exactly one of them: stored QoS ≥ 1 deliveries by the dispatcher, mailbox offers (clean
    /// at any QoS, QoS 0 to a persistent session) by the local reader, and a shared group's
    /// pick made alike by both, each doing its own part: the local reader offers to a member
    /// connected to its node, never to a mirror of a member connected elsewhere.
    #[test]
    fn scopes_split_deliveries_without_overlap() {
        let router = Router::new(Arc::new(Metrics::default()), 3600);
        let (clean, mut clean_rx) = mailbox("clean", false);
        let (stored, mut stored_rx) = mailbox("stored", true);
        let (m1, mut m1_rx) = mailbox("m1", false);
        let (m2, mut m2_rx) = mailbox("m2", false);
        m1.set_online(true);
        m2.set_online(true);
        subscribe(&router, &clean, "t/#", QoS::ExactlyOnce);
        subscribe(&router, &stored, "t/#", QoS::AtLeastOnce);
        subscribe(&router, &m1, "$share/g/t/#", QoS::AtLeastOnce);
        subscribe(&router, &m2, "$share/g/t/#", QoS::AtLeastOnce);

        let mut per_member = [0usize; 2];
        for (offset, (qos, payload)) in [(QoS::AtLeastOnce, "one"), (QoS::AtMostOnce, "zero")]
            .into_iter()
            .cycle()
            .take(20)
            .enumerate()
        {
            let origin = Some((0, offset as i64));
            let msg = Arc::new(message("t/x", qos, false, payload));
            let mut persistent = WriteBatch::default();
            router.publish_scoped(&msg, &mut persistent, Scope::Persistent, origin);
            assert_eq!(
                drain(&mut m1_rx).len() + drain(&mut m2_rx).len(),
                0,
                "the dispatcher offers to no clean member"
            );
            assert!(
                drain(&mut clean_rx).is_empty(),
                "no offers to clean sessions"
            );
            assert!(drain(&mut stored_rx).is_empty());

            let mut local = WriteBatch::default();
            router.publish_scoped(&msg, &mut local, Scope::Local, origin);
            assert!(local.ops.is_empty(), "the local scope writes nothing");
            let got = [drain(&mut m1_rx).len(), drain(&mut m2_rx).len()];
            assert_eq!(got[0] + got[1], 1, "the local reader offers to one member");
            per_member[0] += got[0];
            per_member[1] += got[1];
            assert_eq!(drain(&mut clean_rx), vec![(payload.to_string(), qos)]);
            if qos == QoS::AtMostOnce {
                assert!(persistent.ops.is_empty());
                assert_eq!(drain(&mut stored_rx), vec![(payload.to_string(), qos)]);
            } else {
                assert_eq!(enqueued(&persistent), vec!["stored".to_string()]);
                assert!(drain(&mut stored_rx).is_empty());
            }
            // Another node, where both members are mirrors: the same pick, no offer.
            m1.set_online(false);
            m2.set_online(false);
            router.publish_scoped(&msg, &mut local, Scope::Local, origin);
            assert_eq!(drain(&mut m1_rx).len() + drain(&mut m2_rx).len(), 0);
            m1.set_online(true);
            m2.set_online(true);
            drain(&mut clean_rx);
            drain(&mut stored_rx);
        }
        assert!(
            per_member[0] > 0 && per_member[1] > 0,
            "both members get a share: {per_member:?}"
        );
    }

    /// A shared group of persistent members in a cluster: the dispatcher stores each QoS 1
    /// message for the member derived from its log position, the same member for the same
    /// position (a replay after a rebalance), and every member gets a share.
    #[test]
    fn cluster_picks_follow_the_log_position() {
        let router = Router::new(Arc::new(Metrics::default()), 3600);
        let (p1, _p1_rx) = mailbox("p1", true);
        let (p2, _p2_rx) = mailbox("p2", true);
        let (p3, _p3_rx) = mailbox("p3", true);
        for m in [&p3, &p1, &p2] {
            subscribe(&router, m, "$share/g/t/#", QoS::AtLeastOnce);
        }
        let msg = Arc::new(message("t/x", QoS::AtLeastOnce, false, "m"));
        let pick = |offset: i64| {
            let mut batch = WriteBatch::default();
            router.publish_scoped(&msg, &mut batch, Scope::Persistent, Some((3, offset)));
            let got = enqueued(&batch);
            assert_eq!(got.len(), 1, "one member per message");
            got[0].clone()
        };
        let mut counts = HashMap::new();
        for offset in 0..300 {
            let first = pick(offset);
            assert_eq!(first, pick(offset), "the same position, the same member");
            *counts.entry(first).or_insert(0) += 1;
        }
        assert_eq!(counts.len(), 3, "{counts:?}");
        assert!(counts.values().all(|&n| n > 60), "{counts:?}");
    }

    /// A fake log: one call's worth of records, then nothing.
    struct FakeLog {
        calls: Vec<Vec<PartitionRecords>>,
        live_from: i64,
        flows: HashMap<Arc<str>, HashSet<u16>>,
    }

    #[async_trait::async_trait]
    impl LocalLogReader for FakeLog {
        async fn next(&mut self) -> Option<Vec<PartitionRecords>> {
            if self.calls.is_empty() {
                return None;
            }
            Some(self.calls.remove(0))
        }
        fn live_from(&self, _partition: i32) -> i64 {
            self.live_from
        }
        fn open_qos2_flows(&mut self) -> HashMap<Arc<str>, HashSet<u16>> {
            std::mem::take(&mut self.flows)
        }
    }

    fn publish(offset: i64, msg: Message, qos2: Option<(u16, bool)>) -> LogRecord {
        LogRecord {
            offset,
            entry: LogEntry::Publish {
                delivery: StoredDelivery {
                    qos: msg.qos,
                    retain: msg.retain,
                    expires_at_ms: 0,
                    subscription_ids: Vec::new(),
                    message: msg,
                },
                qos2,
            },
        }
    }

    /// Records before `live_from` only update the retained store; later ones are delivered in
    /// log order; a DUP copy of an open QoS 2 flow is dropped until its PUBREL.
    #[tokio::test]
    async fn catch_up_retains_only_and_qos2_copies_are_dropped() {
        let router = Arc::new(Router::new(Arc::new(Metrics::default()), 3600));
        let (clean, mut clean_rx) = mailbox("clean", false);
        subscribe(&router, &clean, "t/#", QoS::ExactlyOnce);
        let publisher: Arc<str> = "pub".into();
        let records = vec![
            publish(10, message("t/state", QoS::AtLeastOnce, true, "old"), None),
            publish(11, message("t/x", QoS::AtLeastOnce, false, "before"), None),
            publish(
                12,
                message("t/x", QoS::ExactlyOnce, false, "a"),
                Some((5, false)),
            ),
            publish(
                13,
                message("t/x", QoS::ExactlyOnce, false, "a"),
                Some((5, true)),
            ),
            LogRecord {
                offset: 14,
                entry: LogEntry::Control(LogControl::Release {
                    publisher: publisher.clone(),
                    pkid: 5,
                }),
            },
            publish(
                15,
                message("t/x", QoS::ExactlyOnce, false, "b"),
                Some((5, true)),
            ),
            publish(16, message("t/state", QoS::AtMostOnce, true, "new"), None),
        ];
        let log = FakeLog {
            calls: vec![vec![PartitionRecords {
                partition: 0,
                epoch: 0,
                records,
            }]],
            live_from: 12,
            flows: HashMap::new(),
        };
        let delivery = LocalDelivery {
            router: router.clone(),
            metrics: Arc::new(Metrics::default()),
            slow_wait: Duration::from_millis(10),
            gate: None,
        };
        let (_tx, shutdown) = watch::channel(false);
        delivery.run(Box::new(log), shutdown).await;
        let got: Vec<String> = drain(&mut clean_rx).into_iter().map(|(p, _)| p).collect();
        assert_eq!(got, vec!["a", "b", "new"]);
        let retained = router.retained_matching("t/state", 10);
        assert_eq!(retained.len(), 1);
        assert_eq!(&retained[0].payload[..], b"new");
    }
}
