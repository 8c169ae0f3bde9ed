//! The per-connection MQTT state machine: it turns incoming packets into router calls and
//! responses, and outbound deliveries into PUBLISH packets, writing everything into the
//! connection's output buffer. No socket here, so the rules are testable on their own.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use rumqttc::v5::mqttbytes::v5::Packet;

use super::outbound::InflightState;
use super::Session;
use crate::auth::acl::Acl;
use crate::broker::Broker;
use crate::config::V3DeniedPublish;
use crate::message::{min_qos, Delivery, Message, MessageProperties};
use crate::protocol::{
    encode, Disconnect, DisconnectReasonCode, Incoming, PingResp, ProtocolVersion, PubAck,
    PubAckReason, PubComp, PubCompReason, PubRec, PubRecReason, PubRel, PubRelReason, Publish,
    PublishProperties, QoS, RetainForwardRule, SubAck, Subscribe, SubscribeReasonCode, UnsubAck,
    UnsubAckReason, Unsubscribe, Will,
};
use crate::router::topic::{parse_filter, validate_topic_name, ParsedFilter};
use crate::router::SubscriptionOptions;
use crate::storage::{
    join_completions, pkid_for_seq, Completion, QueueRead, QueuedEntry, StorageError, WriteBatch,
    WriteOp,
};

/// What the connection should do after a packet.
#[derive(Debug, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// The client sent DISCONNECT; `publish_will` unless it was a normal disconnection.
    ClientDisconnected {
        publish_will: bool,
    },
    /// The broker must end the connection: v5 clients get DISCONNECT with this reason first.
    Close(DisconnectReasonCode, &'static str),
}

/// A response held back until the storage write it depends on is durable. Responses leave in
/// the order their requests arrived, even when storage completes out of order (invariant 2).
pub struct PendingReply {
    /// The write this reply waits for; `None` once it completed (or when it needs none but
    /// queued behind one that does).
    pub wait: Option<Completion>,
    /// The encoded reply to send on success.
    pub bytes: BytesMut,
    /// What to do instead when the write failed.
    pub on_error: OnError,
    /// When the PUBLISH this PUBACK/PUBREC answers was received (publish-to-ack latency).
    pub received: Option<Instant>,
}

/// The failure path of a [`PendingReply`].
#[derive(Debug, Clone, Copy)]
pub enum OnError {
    /// v5: PUBACK with an error reason; v3: disconnect (a v3 PUBACK can only say "stored").
    PubAck(u16),
    /// v5: PUBREC with an error reason; v3: disconnect.
    PubRec(u16),
    /// Close the connection.
    Close,
}

/// Most replies a connection may have waiting on storage before it stops reading (TCP
/// backpressure on a publisher that outruns the disk).
pub const MAX_PENDING_REPLIES: usize = 1024;

/// What the client told us about itself in CONNECT that shapes what we send it.
#[derive(Debug, Clone)]
pub struct ClientLimits {
    /// v5 Receive Maximum (65535 when absent).
    pub receive_maximum: u16,
    /// v5 Maximum Packet Size; `None` = only the protocol limit.
    pub max_packet_size: Option<u32>,
    /// v5 Topic Alias Maximum: aliases we may use towards the client.
    pub topic_alias_maximum: u16,
    /// v5 Request Problem Information (reason strings allowed beyond CONNACK/DISCONNECT).
    pub problem_information: bool,
}

/// Protocol state of one live connection, owning its session.
pub struct Machine {
    broker: Arc<Broker>,
    pub version: ProtocolVersion,
    pub session: Session,
    /// The will, until it is published or cancelled by a normal DISCONNECT.
    pub will: Option<Will>,
    client: ClientLimits,
    /// Session Expiry Interval from CONNECT was 0: DISCONNECT may not raise it [MQTT-3.14.2-2].
    connected_with_zero_expiry: bool,
    /// Topic aliases the client set up towards us (at most `limits.max_topic_alias`).
    inbound_aliases: HashMap<u16, Bytes>,
    /// Topic aliases we set up towards the client (at most its Topic Alias Maximum).
    outbound_aliases: HashMap<Bytes, u16>,
    /// Deliveries created by this connection itself (retained messages on SUBSCRIBE), sent
    /// before anything else in the session queue. Bounded by `limits.max_queued_messages`.
    pending: VecDeque<Delivery>,
    /// Responses waiting for storage, in arrival order.
    pub replies: VecDeque<PendingReply>,
    /// Deliveries this connection's publishes could not place because a connected subscriber's
    /// queue was full; the connection waits for room before it reads on.
    pub blocked: VecDeque<(Arc<crate::router::Mailbox>, Delivery)>,
    /// A read of the durable queue or log that the backend answers later.
    pub stored_read: Option<tokio::sync::oneshot::Receiver<Result<Vec<QueuedEntry>, StorageError>>>,
    /// How many entries that read asked for.
    stored_asked: usize,
    /// What this client may publish and subscribe to, fixed at CONNECT.
    acl: Acl,
}

impl Machine {
    pub fn new(
        broker: Arc<Broker>,
        version: ProtocolVersion,
        session: Session,
        will: Option<Will>,
        client: ClientLimits,
    ) -> Machine {
        let connected_with_zero_expiry = session.expiry_interval == 0;
        Machine {
            broker,
            version,
            session,
            will,
            client,
            connected_with_zero_expiry,
            inbound_aliases: HashMap::new(),
            outbound_aliases: HashMap::new(),
            pending: VecDeque::new(),
            replies: VecDeque::new(),
            blocked: VecDeque::new(),
            stored_read: None,
            stored_asked: 0,
            acl: Acl::allow_all(),
        }
    }

    /// Sets the client's authorization rules (everything is allowed until then). A resumed
    /// session may hold subscriptions and in-flight messages authorized for whoever used this
    /// client id before: what this client may not read is removed now (queued messages are
    /// checked as they are delivered).
    pub fn set_acl(&mut self, acl: Acl) {
        self.acl = acl;
        if self.acl.reads_everything() {
            return;
        }
        let limits = &self.broker.topic_limits;
        let denied: Vec<String> = self
            .session
            .subscriptions
            .keys()
            .filter(|f| {
                parse_filter(f, limits).is_ok_and(|p| !self.acl.may_subscribe(p.topic_filter()))
            })
            .cloned()
            .collect();
        let mut batch = WriteBatch::default();
        for filter in denied {
            if let Ok(parsed) = parse_filter(&filter, &self.broker.topic_limits) {
                self.broker
                    .router
                    .unsubscribe(&self.session.client_id, parsed);
            }
            self.session.subscriptions.remove(&filter);
            self.broker.metrics.subscriptions_denied_acl.inc();
            if self.session.stored {
                batch.push(WriteOp::DeleteSubscription {
                    client: self.session.client_id.clone(),
                    filter,
                });
            }
        }
        if !batch.is_empty() {
            self.broker.storage.submit_detached(batch);
        }
        let unreadable: Vec<(u16, InflightState, Option<u64>)> = self
            .session
            .outbound
            .iter()
            .filter(|i| i.state != InflightState::AwaitingPubComp && !self.may_receive(&i.delivery))
            .map(|i| (i.pkid, i.state, i.delivery.seq))
            .collect();
        for (pkid, state, seq) in unreadable {
            match state {
                InflightState::AwaitingPubAck => {
                    self.session.outbound.puback(pkid);
                }
                InflightState::AwaitingPubRec => {
                    self.session.outbound.pubrec(pkid, false);
                }
                InflightState::AwaitingPubComp => continue,
            }
            self.broker.metrics.messages_dropped_acl.inc();
            self.stored_done(seq);
        }
    }

    fn may_receive(&self, delivery: &Delivery) -> bool {
        self.acl.reads_everything()
            || std::str::from_utf8(&delivery.message.topic).is_ok_and(|t| self.acl.may_receive(t))
    }

    fn v5(&self) -> bool {
        self.version == ProtocolVersion::V5
    }

    /// Outgoing QoS 1/2 messages we may still start: min(client Receive Maximum, our limit).
    pub fn window_open(&self) -> bool {
        let window = self
            .client
            .receive_maximum
            .min(self.broker.config.limits.max_inflight);
        self.session.outbound.len() < usize::from(window)
    }

    /// Handles one packet from the client.
    pub fn handle(&mut self, packet: Incoming, out: &mut BytesMut) -> Flow {
        match packet {
            Incoming::Publish(p) => self.on_publish(p, out),
            Incoming::PubAck(ack) => {
                if let Some(done) = self.session.outbound.puback(ack.pkid) {
                    self.stored_done(done.delivery.seq);
                }
                Flow::Continue
            }
            Incoming::PubRec(rec) => self.on_pubrec(rec, out),
            Incoming::PubRel(rel) => self.on_pubrel(rel, out),
            Incoming::PubComp(comp) => {
                if let Some(done) = self.session.outbound.pubcomp(comp.pkid) {
                    self.stored_done(done.delivery.seq);
                }
                Flow::Continue
            }
            Incoming::Subscribe(s) => self.on_subscribe(s, out),
            Incoming::Unsubscribe(u) => self.on_unsubscribe(u, out),
            Incoming::PingReq => {
                self.send(Packet::PingResp(PingResp), out);
                Flow::Continue
            }
            Incoming::Disconnect(d) => self.on_disconnect(d),
            // Enhanced authentication is refused at CONNECT (0x8C), so an AUTH afterwards is out
            // of sequence [MQTT-4.12.0-1].
            Incoming::Auth(_) => Flow::Close(
                DisconnectReasonCode::ProtocolError,
                "AUTH without an authentication method",
            ),
            Incoming::Connect(_) => {
                Flow::Close(DisconnectReasonCode::ProtocolError, "second CONNECT")
            }
        }
    }

    /// Sends a response now, or queues it behind responses still waiting for storage.
    fn send(&mut self, packet: Packet, out: &mut BytesMut) {
        self.reply(packet, None, OnError::Close, out);
    }

    /// Sends `packet` once `wait` (if any) completes, after every earlier response.
    fn reply(
        &mut self,
        packet: Packet,
        wait: Option<Completion>,
        on_error: OnError,
        out: &mut BytesMut,
    ) {
        self.reply_ack(packet, wait, on_error, None, out);
    }

    /// [`Machine::reply`] for a PUBACK/PUBREC, timed from when its PUBLISH was `received`.
    fn reply_ack(
        &mut self,
        packet: Packet,
        wait: Option<Completion>,
        on_error: OnError,
        received: Option<Instant>,
        out: &mut BytesMut,
    ) {
        if wait.is_none() && self.replies.is_empty() {
            // Acks and control packets are tiny; only a client with an absurd Maximum Packet
            // Size could refuse them, and then dropping them is what the spec asks
            // [MQTT-3.1.2-25].
            let _ = encode(&packet, self.version, self.client.max_packet_size, out);
            if let Some(received) = received {
                self.broker.metrics.observe_ack(received);
            }
            return;
        }
        let mut bytes = BytesMut::new();
        let _ = encode(
            &packet,
            self.version,
            self.client.max_packet_size,
            &mut bytes,
        );
        self.replies.push_back(PendingReply {
            wait,
            bytes,
            on_error,
            received,
        });
    }

    /// The storage write the oldest queued reply waits for has completed with `result`: send
    /// it (or its failure form), then every following reply that is ready too.
    pub fn complete_front(&mut self, result: Result<(), StorageError>, out: &mut BytesMut) -> Flow {
        let Some(front) = self.replies.front_mut() else {
            return Flow::Continue;
        };
        front.wait = None;
        if let Err(e) = result {
            let Some(front) = self.replies.pop_front() else {
                return Flow::Continue;
            };
            if let Some(flow) = self.storage_failed(front.on_error, &e, out) {
                return flow;
            }
        }
        self.release_ready(out)
    }

    /// Sends queued replies from the front while their writes are done.
    fn release_ready(&mut self, out: &mut BytesMut) -> Flow {
        use tokio::sync::oneshot::error::TryRecvError;
        while let Some(front) = self.replies.front_mut() {
            if let Some(rx) = front.wait.as_mut() {
                let failure = match rx.try_recv() {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(e),
                    Err(TryRecvError::Closed) => Some(StorageError::Closed),
                    // Not done yet: the connection loop awaits it.
                    Err(TryRecvError::Empty) => return Flow::Continue,
                };
                front.wait = None;
                if let Some(e) = failure {
                    let on_error = front.on_error;
                    self.replies.pop_front();
                    if let Some(flow) = self.storage_failed(on_error, &e, out) {
                        return flow;
                    }
                    continue;
                }
            }
            if let Some(front) = self.replies.pop_front() {
                out.extend_from_slice(&front.bytes);
                if let Some(received) = front.received {
                    self.broker.metrics.observe_ack(received);
                }
            }
        }
        Flow::Continue
    }

    /// A write failed: nothing it covered may be acknowledged. v5 publishers get an error
    /// reason (0x97 when the storage queue is full, 0x80 otherwise), everyone else is
    /// disconnected.
    fn storage_failed(
        &mut self,
        on_error: OnError,
        error: &StorageError,
        out: &mut BytesMut,
    ) -> Option<Flow> {
        self.broker.metrics.storage_errors.inc();
        tracing::warn!(client_id = %self.session.client_id, error = %error, "storage write failed; not acknowledging");
        self.forget_unstored(on_error);
        let quota = matches!(error, StorageError::Overloaded);
        let refusal = match (on_error, self.v5()) {
            (OnError::PubAck(pkid), true) => Packet::PubAck(PubAck {
                pkid,
                reason: if quota {
                    PubAckReason::QuotaExceeded
                } else {
                    PubAckReason::UnspecifiedError
                },
                properties: None,
            }),
            (OnError::PubRec(pkid), true) => Packet::PubRec(PubRec {
                pkid,
                reason: if quota {
                    PubRecReason::QuotaExceeded
                } else {
                    PubRecReason::UnspecifiedError
                },
                properties: None,
            }),
            // v3 acks can only say "stored", and other replies have no failure form.
            _ => {
                let code = if quota {
                    DisconnectReasonCode::QuotaExceeded
                } else {
                    DisconnectReasonCode::UnspecifiedError
                };
                return Some(Flow::Close(code, "storage write failed"));
            }
        };
        let _ = encode(&refusal, self.version, self.client.max_packet_size, out);
        None
    }

    /// Undoes the in-memory state a failed (or abandoned) write stood for: an incoming QoS 2
    /// message that was not stored must not stay marked as received, or the client's resend
    /// would be taken for a duplicate and dropped.
    fn forget_unstored(&mut self, on_error: OnError) {
        if let OnError::PubRec(pkid) = on_error {
            self.session.inbound_qos2.remove(&pkid);
        }
    }

    /// At the end of a connection: waits (bounded) for the writes its unsent replies depended
    /// on. An incoming QoS 2 message whose write failed must not stay marked as received, or
    /// the client's resend on the next connection would be taken for a duplicate and dropped.
    pub async fn settle_pending_writes(&mut self, within: std::time::Duration) {
        let deadline = tokio::time::Instant::now() + within;
        while let Some(reply) = self.replies.pop_front() {
            let Some(wait) = reply.wait else { continue };
            let failed = match tokio::time::timeout_at(deadline, wait).await {
                Ok(Ok(Ok(()))) => false,
                Ok(_) => true,
                // Still not written: assume the worst for QoS 2 and let a resend through.
                Err(_) => true,
            };
            if failed {
                self.forget_unstored(reply.on_error);
            }
        }
    }

    /// Submits a batch unless it is empty.
    fn submit(&self, batch: WriteBatch) -> Option<Completion> {
        (!batch.is_empty()).then(|| self.broker.storage.submit(batch))
    }

    /// The client finished with a delivery; if it came from durable storage, record that.
    fn stored_done(&mut self, seq: Option<u64>) {
        let Some(seq) = seq else { return };
        if let Some(op) = self.session.ack_stored(seq) {
            // Not awaited: losing this write only means a redelivery (with DUP) after a crash.
            self.broker
                .storage
                .submit_detached(WriteBatch { ops: vec![op] });
        }
    }

    fn on_publish(&mut self, mut publish: Publish, out: &mut BytesMut) -> Flow {
        self.broker.metrics.messages_received.inc(publish.qos);
        if let Some(flow) = self.resolve_inbound_alias(&mut publish) {
            return flow;
        }
        let Ok(topic) = std::str::from_utf8(&publish.topic) else {
            return Flow::Close(DisconnectReasonCode::MalformedPacket, "topic is not UTF-8");
        };
        if validate_topic_name(topic, &self.broker.topic_limits).is_err() {
            return Flow::Close(
                DisconnectReasonCode::TopicNameInvalid,
                "topic name invalid or over the configured limits",
            );
        }
        if !self.acl.may_publish(topic) {
            return self.deny_publish(publish.qos, publish.pkid, out);
        }
        let pkid = publish.pkid;
        if publish.qos == QoS::ExactlyOnce {
            if self.session.inbound_qos2.contains(&pkid) {
                // Resent before our PUBREC arrived: already routed, just acknowledge again.
                self.pubrec(pkid, PubRecReason::Success, out);
                return Flow::Continue;
            }
            if self.session.inbound_qos2.len()
                >= usize::from(self.broker.config.limits.max_inflight)
            {
                return Flow::Close(
                    DisconnectReasonCode::ReceiveMaximumExceeded,
                    "more unacknowledged QoS 2 publishes than Receive Maximum",
                );
            }
        }
        let properties = MessageProperties::from_publish(publish.properties.take());
        // Payload Format Indicator 1 promises UTF-8; we check it rather than forward a lie.
        if properties.payload_format_indicator == Some(1)
            && std::str::from_utf8(&publish.payload).is_err()
        {
            return self.refuse_publish(publish.qos, pkid, out);
        }
        let message = Arc::new(Message {
            topic: publish.topic,
            payload: publish.payload,
            qos: publish.qos,
            retain: publish.retain,
            properties,
            received_at: Instant::now(),
            publisher: self.session.client_id.clone(),
        });
        let mut own = WriteBatch::default();
        if message.qos == QoS::ExactlyOnce {
            self.session.inbound_qos2.insert(pkid);
            if self.session.stored {
                own.push(WriteOp::PutInboundQos2 {
                    client: self.session.client_id.clone(),
                    pkid,
                });
            }
        }
        // Through a publish log, a persistent session's QoS 2 PUBLISH carries its packet id:
        // after a crash between the append and the stored packet id, the publisher's resend is
        // appended again, and the dispatcher recognises and drops it (clean sessions have
        // nothing to resume).
        let qos2 =
            (message.qos == QoS::ExactlyOnce && self.session.stored).then_some((pkid, publish.dup));
        // Durable before ack: the PUBACK/PUBREC waits for this (invariant 1).
        let accepted = self
            .broker
            .ingest
            .publish(self.broker.parts(), &message, own, qos2);
        self.blocked.extend(accepted.blocked);
        let wait = accepted.wait;
        let no_match = accepted.matched == Some(0) && self.v5();
        match message.qos {
            // Nothing to acknowledge; retained changes were submitted without waiting.
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => {
                let reason = if no_match {
                    PubAckReason::NoMatchingSubscribers
                } else {
                    PubAckReason::Success
                };
                self.reply_ack(
                    Packet::PubAck(PubAck {
                        pkid,
                        reason,
                        properties: None,
                    }),
                    wait,
                    OnError::PubAck(pkid),
                    Some(message.received_at),
                    out,
                );
            }
            QoS::ExactlyOnce => {
                let reason = if no_match {
                    PubRecReason::NoMatchingSubscribers
                } else {
                    PubRecReason::Success
                };
                self.reply_ack(
                    Packet::PubRec(PubRec {
                        pkid,
                        reason,
                        properties: None,
                    }),
                    wait,
                    OnError::PubRec(pkid),
                    Some(message.received_at),
                    out,
                );
            }
        }
        Flow::Continue
    }

    fn refuse_publish(&mut self, qos: QoS, pkid: u16, out: &mut BytesMut) -> Flow {
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.send(
                Packet::PubAck(PubAck {
                    pkid,
                    reason: PubAckReason::PayloadFormatInvalid,
                    properties: None,
                }),
                out,
            ),
            QoS::ExactlyOnce => self.pubrec(pkid, PubRecReason::PayloadFormatInvalid, out),
        }
        Flow::Continue
    }

    /// A PUBLISH the client's ACL does not allow: v5 publishers are told (PUBACK/PUBREC 0x87;
    /// QoS 0 has no answer), v3 acks can only say yes, so per `auth.v3_denied_publish` the
    /// message is acknowledged and dropped, or the client is disconnected.
    fn deny_publish(&mut self, qos: QoS, pkid: u16, out: &mut BytesMut) -> Flow {
        self.broker.metrics.messages_dropped_acl.inc();
        tracing::debug!(client_id = %self.session.client_id, "publish denied by ACL");
        if !self.v5() && self.broker.config.auth.v3_denied_publish == V3DeniedPublish::Disconnect {
            return Flow::Close(
                DisconnectReasonCode::NotAuthorized,
                "publish not authorized",
            );
        }
        let (ack, rec) = if self.v5() {
            (PubAckReason::NotAuthorized, PubRecReason::NotAuthorized)
        } else {
            (PubAckReason::Success, PubRecReason::Success)
        };
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.send(
                Packet::PubAck(PubAck {
                    pkid,
                    reason: ack,
                    properties: None,
                }),
                out,
            ),
            // Not marked as received: the v3 PUBREL that follows gets a plain PUBCOMP.
            QoS::ExactlyOnce => self.pubrec(pkid, rec, out),
        }
        Flow::Continue
    }

    fn pubrec(&mut self, pkid: u16, reason: PubRecReason, out: &mut BytesMut) {
        self.send(
            Packet::PubRec(PubRec {
                pkid,
                reason,
                properties: None,
            }),
            out,
        );
    }

    /// Applies a v5 Topic Alias [MQTT-3.3.2-7..12]; returns a Flow when the connection must end.
    fn resolve_inbound_alias(&mut self, publish: &mut Publish) -> Option<Flow> {
        let alias = publish.properties.as_ref().and_then(|p| p.topic_alias);
        let Some(alias) = alias else {
            if publish.topic.is_empty() {
                return Some(Flow::Close(
                    DisconnectReasonCode::ProtocolError,
                    "empty topic without a topic alias",
                ));
            }
            return None;
        };
        if alias == 0 || alias > self.broker.config.limits.max_topic_alias {
            return Some(Flow::Close(
                DisconnectReasonCode::TopicAliasInvalid,
                "topic alias out of range",
            ));
        }
        if publish.topic.is_empty() {
            match self.inbound_aliases.get(&alias) {
                Some(topic) => publish.topic = topic.clone(),
                None => {
                    return Some(Flow::Close(
                        DisconnectReasonCode::ProtocolError,
                        "unknown topic alias",
                    ))
                }
            }
        } else {
            self.inbound_aliases.insert(alias, publish.topic.clone());
        }
        None
    }

    fn on_pubrec(&mut self, rec: PubRec, out: &mut BytesMut) -> Flow {
        let success = (rec_code(rec.reason)) < 0x80;
        let seq = self
            .session
            .outbound
            .iter()
            .find(|i| i.pkid == rec.pkid)
            .and_then(|i| i.delivery.seq);
        let (reason, wait) = match self.session.outbound.pubrec(rec.pkid, success) {
            Some(true) => {
                // A stored QoS 2 entry must be marked released before PUBREL goes out: after a
                // crash the broker then resends PUBREL, never the PUBLISH the client already
                // completed (which it would take as a new message).
                let wait = seq.and_then(|seq| {
                    let mut batch = WriteBatch::default();
                    batch.push(WriteOp::MarkReleased {
                        client: self.session.client_id.clone(),
                        kind: self.session.kind,
                        seq,
                    });
                    self.submit(batch)
                });
                (PubRelReason::Success, wait)
            }
            Some(false) => {
                self.stored_done(seq);
                return Flow::Continue;
            }
            None => (PubRelReason::PacketIdentifierNotFound, None),
        };
        self.reply(
            Packet::PubRel(PubRel {
                pkid: rec.pkid,
                reason,
                properties: None,
            }),
            wait,
            OnError::Close,
            out,
        );
        Flow::Continue
    }

    fn on_pubrel(&mut self, rel: PubRel, out: &mut BytesMut) -> Flow {
        let known = self.session.inbound_qos2.remove(&rel.pkid);
        let reason = if known {
            PubCompReason::Success
        } else {
            PubCompReason::PacketIdentifierNotFound
        };
        // The stored packet id must be gone before PUBCOMP: otherwise a crash could leave it
        // behind and a later message reusing the id would be taken for a duplicate and lost.
        let mut wait = if known && self.session.stored {
            let mut batch = WriteBatch::default();
            batch.push(WriteOp::DeleteInboundQos2 {
                client: self.session.client_id.clone(),
                pkid: rel.pkid,
            });
            self.submit(batch)
        } else {
            None
        };
        // Through a publish log the dispatcher keeps the packet ids of routed QoS 2 messages
        // too (`Ingest::release_qos2`). Also for an unknown id: a crash may have kept the
        // dispatcher's copy while the stored one was deleted.
        if self.session.stored {
            if let Some(released) = self
                .broker
                .ingest
                .release_qos2(&self.session.client_id, rel.pkid)
            {
                wait = Some(match wait {
                    Some(deleted) => join_completions(deleted, released),
                    None => released,
                });
            }
        }
        self.reply(
            Packet::PubComp(PubComp {
                pkid: rel.pkid,
                reason,
                properties: None,
            }),
            wait,
            OnError::Close,
            out,
        );
        Flow::Continue
    }

    fn on_subscribe(&mut self, subscribe: Subscribe, out: &mut BytesMut) -> Flow {
        let identifier = subscribe.properties.as_ref().and_then(|p| p.id);
        let limits = &self.broker.config.limits;
        let mut return_codes = Vec::with_capacity(subscribe.filters.len());
        let mut retained: Vec<Delivery> = Vec::new();
        let mut batch = WriteBatch::default();
        for filter in &subscribe.filters {
            let parsed = match parse_filter(&filter.path, &self.broker.topic_limits) {
                Ok(parsed) => parsed,
                Err(_) => {
                    return_codes.push(if self.v5() {
                        SubscribeReasonCode::TopicFilterInvalid
                    } else {
                        SubscribeReasonCode::Failure
                    });
                    continue;
                }
            };
            // `$share/{group}/{filter}` is authorized on `{filter}`.
            if !self.acl.may_subscribe(parsed.topic_filter()) {
                self.broker.metrics.subscriptions_denied_acl.inc();
                return_codes.push(if self.v5() {
                    SubscribeReasonCode::NotAuthorized
                } else {
                    SubscribeReasonCode::Failure
                });
                continue;
            }
            let is_shared = matches!(parsed, ParsedFilter::Shared { .. });
            if is_shared && filter.nolocal {
                return Flow::Close(
                    DisconnectReasonCode::ProtocolError,
                    "No Local on a shared subscription",
                );
            }
            if !self.session.subscriptions.contains_key(&filter.path)
                && self.session.subscriptions.len() >= limits.max_subscriptions_per_client
            {
                return_codes.push(if self.v5() {
                    SubscribeReasonCode::QuotaExceeded
                } else {
                    SubscribeReasonCode::Failure
                });
                continue;
            }
            let options = SubscriptionOptions {
                qos: filter.qos,
                no_local: filter.nolocal,
                retain_as_published: filter.preserve_retain,
                retain_handling: filter.retain_forward_rule.clone(),
                identifier,
            };
            if self.session.stored {
                batch.push(WriteOp::PutSubscription {
                    client: self.session.client_id.clone(),
                    filter: filter.path.clone(),
                    options: options.clone(),
                });
            }
            let outcome =
                self.broker
                    .router
                    .subscribe(&self.session.mailbox, parsed, options.clone());
            self.session
                .subscriptions
                .insert(filter.path.clone(), options);
            return_codes.push(SubscribeReasonCode::Success(filter.qos));
            // Retained messages go to new subscriptions per Retain Handling; never to shared
            // subscriptions (v5 §4.8.2).
            let send_retained = !is_shared
                && match filter.retain_forward_rule {
                    RetainForwardRule::OnEverySubscribe => true,
                    RetainForwardRule::OnNewSubscribe => !outcome.existed,
                    RetainForwardRule::Never => false,
                };
            if let (true, ParsedFilter::Plain(plain)) = (send_retained, parsed) {
                let room = limits
                    .max_queued_messages
                    .saturating_sub(self.pending.len() + retained.len());
                for message in self.broker.router.retained_matching(plain, room) {
                    retained.push(Delivery {
                        qos: min_qos(message.qos, filter.qos),
                        message,
                        retain: true,
                        subscription_ids: identifier.into_iter().collect(),
                        seq: None,
                        dup: false,
                    });
                }
            }
        }
        if subscribe
            .filters
            .iter()
            .any(|f| f.path.starts_with("$share/"))
        {
            self.shared_subscriptions_changed();
        }
        // A persistent session's SUBACK waits until the subscription is durable.
        let wait = self.submit(batch);
        self.reply(
            Packet::SubAck(SubAck {
                pkid: subscribe.pkid,
                return_codes,
                properties: None,
            }),
            wait,
            OnError::Close,
            out,
        );
        // After the SUBACK, in the order found [MQTT-3.8.4-4].
        self.pending.extend(retained);
        Flow::Continue
    }

    fn on_unsubscribe(&mut self, unsubscribe: Unsubscribe, out: &mut BytesMut) -> Flow {
        let mut reasons = Vec::with_capacity(unsubscribe.filters.len());
        let mut batch = WriteBatch::default();
        for filter in &unsubscribe.filters {
            let reason = match parse_filter(filter, &self.broker.topic_limits) {
                Err(_) => UnsubAckReason::TopicFilterInvalid,
                Ok(parsed) => {
                    self.broker
                        .router
                        .unsubscribe(&self.session.client_id, parsed);
                    if self.session.stored {
                        batch.push(WriteOp::DeleteSubscription {
                            client: self.session.client_id.clone(),
                            filter: filter.clone(),
                        });
                    }
                    if self.session.subscriptions.remove(filter).is_some() {
                        UnsubAckReason::Success
                    } else {
                        UnsubAckReason::NoSubscriptionExisted
                    }
                }
            };
            reasons.push(reason);
        }
        if unsubscribe.filters.iter().any(|f| f.starts_with("$share/")) {
            self.shared_subscriptions_changed();
        }
        let wait = self.submit(batch);
        self.reply(
            Packet::UnsubAck(UnsubAck {
                pkid: unsubscribe.pkid,
                reasons,
                properties: None,
            }),
            wait,
            OnError::Close,
            out,
        );
        Flow::Continue
    }

    /// Tells the storage backend the APPLICATION client's shared subscriptions (see
    /// `Storage::application_shared`).
    fn shared_subscriptions_changed(&self) {
        if self.session.kind == crate::storage::ClientKind::Application {
            self.broker.application_shared(&self.session);
        }
    }

    fn on_disconnect(&mut self, disconnect: Disconnect) -> Flow {
        if let Some(expiry) = disconnect
            .properties
            .as_ref()
            .and_then(|p| p.session_expiry_interval)
        {
            if self.connected_with_zero_expiry && expiry != 0 {
                return Flow::Close(
                    DisconnectReasonCode::ProtocolError,
                    "session expiry raised from 0 in DISCONNECT",
                );
            }
            // APPLICATION sessions are always persistent: a client cannot end its own log by
            // lowering the expiry on the way out.
            if self.session.kind == crate::storage::ClientKind::Device {
                self.session.expiry_interval =
                    expiry.min(self.broker.config.session.max_session_expiry_secs);
            }
        }
        // Only a Normal Disconnection (0x00) discards the will [MQTT-3.1.2-10].
        let publish_will = disconnect.reason_code != DisconnectReasonCode::NormalDisconnection;
        Flow::ClientDisconnected { publish_will }
    }

    /// True when something is waiting to be sent and the window allows it.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Sends deliveries the connection created itself (retained on subscribe) while the window
    /// allows.
    pub fn flush_pending(&mut self, out: &mut BytesMut, now: Instant) {
        while self.window_open() {
            let Some(delivery) = self.pending.pop_front() else {
                break;
            };
            self.deliver(delivery, out, now);
        }
    }

    /// Encodes one delivery as a PUBLISH to this client.
    pub fn deliver(&mut self, delivery: Delivery, out: &mut BytesMut, now: Instant) {
        if delivery.message.is_expired(now) {
            self.broker.metrics.messages_dropped_expired.inc();
            self.stored_done(delivery.seq);
            return;
        }
        if !self.may_receive(&delivery) {
            self.broker.metrics.messages_dropped_acl.inc();
            self.stored_done(delivery.seq);
            return;
        }
        let mut properties = if self.v5() {
            delivery
                .message
                .forward_properties(now, &delivery.subscription_ids)
        } else {
            None
        };
        let mut topic = delivery.message.topic.clone();
        let new_alias = self.outbound_alias(&mut topic, &mut properties);
        // Stored entries use the packet id derived from their position, so a resend after a
        // restart carries the id the client saw before.
        let pkid = match (delivery.qos, delivery.seq) {
            (QoS::AtMostOnce, _) => 0,
            (_, Some(seq)) => pkid_for_seq(seq),
            (_, None) => self.session.outbound.next_pkid().unwrap_or(0),
        };
        let state = match delivery.qos {
            QoS::AtMostOnce => None,
            QoS::AtLeastOnce => Some(InflightState::AwaitingPubAck),
            QoS::ExactlyOnce => Some(InflightState::AwaitingPubRec),
        };
        let publish = Publish {
            dup: delivery.dup && delivery.qos != QoS::AtMostOnce,
            qos: delivery.qos,
            retain: delivery.retain,
            topic,
            pkid,
            payload: delivery.message.payload.clone(),
            properties,
        };
        match encode(
            &Packet::Publish(publish),
            self.version,
            self.client.max_packet_size,
            out,
        ) {
            Ok(_) => {
                self.broker.metrics.messages_sent.inc(delivery.qos);
                match state {
                    Some(state) => self.session.outbound.push(pkid, delivery, state),
                    // A stored entry granted QoS 0 (an APPLICATION shared group member that
                    // subscribed at QoS 0) is done once it is sent.
                    None => self.stored_done(delivery.seq),
                }
            }
            Err(_) => {
                // Larger than the client accepts: discard as if delivered [MQTT-3.1.2-25].
                self.broker.metrics.messages_dropped_too_large.inc();
                if let Some(topic) = new_alias {
                    self.outbound_aliases.remove(&topic);
                }
                self.stored_done(delivery.seq);
            }
        }
    }

    /// Whether durable entries may be waiting and the window has room for them.
    pub fn wants_stored(&self) -> bool {
        self.session.stored_pending && self.window_open()
    }

    /// Reads the next durable entries of this session's queue or log (as many as the in-flight
    /// window allows) and sends them. Entries written before a restart carry DUP=1; entries
    /// whose PUBREC was already received get PUBREL instead of PUBLISH. A backend that reads
    /// over the network answers later: the read is parked in `stored_read` and the connection
    /// hands its result to [`Machine::stored_arrived`].
    pub fn fetch_stored(&mut self, out: &mut BytesMut, now: Instant) -> Flow {
        if self.stored_read.is_some() {
            return Flow::Continue;
        }
        let room = self.stored_room();
        if room == 0 {
            return Flow::Continue;
        }
        self.stored_asked = room;
        match self.broker.storage.read_queue(
            &self.session.client_id,
            self.session.kind,
            self.session.cursor,
            room,
        ) {
            QueueRead::Ready(result) => self.stored_arrived(result, out, now),
            QueueRead::Pending(rx) => {
                self.stored_read = Some(rx);
                Flow::Continue
            }
        }
    }

    fn stored_room(&self) -> usize {
        let window = usize::from(
            self.client
                .receive_maximum
                .min(self.broker.config.limits.max_inflight),
        );
        window.saturating_sub(self.session.outbound.len())
    }

    /// Sends what a read of the queue or log returned.
    pub fn stored_arrived(
        &mut self,
        result: Result<Vec<QueuedEntry>, StorageError>,
        out: &mut BytesMut,
        now: Instant,
    ) -> Flow {
        self.stored_read = None;
        let entries = match result {
            Ok(entries) => entries,
            Err(e) => {
                self.broker.metrics.storage_read_errors.inc();
                tracing::error!(client_id = %self.session.client_id, error = %e, "reading stored messages failed");
                return Flow::Close(
                    DisconnectReasonCode::UnspecifiedError,
                    "storage read failed",
                );
            }
        };
        // Fewer than asked for: the queue is drained for now.
        if entries.len() < self.stored_asked {
            self.session.stored_pending = false;
        }
        for entry in entries {
            let pkid = pkid_for_seq(entry.seq);
            if self.session.outbound.in_use(pkid) {
                // 65535 entries further on, the id is still taken: wait for its ack.
                self.session.stored_pending = true;
                break;
            }
            // Entries skipped on the way (expired, removed by retention) need no ack: the
            // APPLICATION commit point follows the read cursor (see Session::ack_stored).
            self.session.cursor = entry.seq + 1;
            let delivery = Delivery {
                message: Arc::new(entry.delivery.message),
                qos: entry.delivery.qos,
                retain: entry.delivery.retain,
                subscription_ids: entry.delivery.subscription_ids,
                seq: Some(entry.seq),
                dup: entry.seq < self.session.dup_below,
            };
            if entry.released {
                self.session
                    .outbound
                    .push(pkid, delivery, InflightState::AwaitingPubComp);
                let _ = encode(
                    &Packet::PubRel(PubRel {
                        pkid,
                        reason: PubRelReason::Success,
                        properties: None,
                    }),
                    self.version,
                    self.client.max_packet_size,
                    out,
                );
                continue;
            }
            self.deliver(delivery, out, now);
        }
        let sent = self.session.cursor.saturating_sub(1);
        if self.session.stored && sent > self.session.sent_upto {
            self.session.sent_upto = sent;
            self.broker.storage.submit_detached(WriteBatch {
                ops: vec![WriteOp::MarkSent {
                    client: self.session.client_id.clone(),
                    upto: sent,
                }],
            });
        }
        Flow::Continue
    }

    /// Uses or establishes a topic alias towards a v5 client that allows them. Returns the topic
    /// of a newly established alias (so a failed send can undo it).
    fn outbound_alias(
        &mut self,
        topic: &mut Bytes,
        properties: &mut Option<PublishProperties>,
    ) -> Option<Bytes> {
        if !self.v5() || self.client.topic_alias_maximum == 0 {
            return None;
        }
        if let Some(&alias) = self.outbound_aliases.get(topic) {
            properties
                .get_or_insert_with(PublishProperties::default)
                .topic_alias = Some(alias);
            *topic = Bytes::new();
            return None;
        }
        // First come, first aliased: simple, and the hot topics of a connection usually show up
        // first. Topics beyond the client's maximum are sent in full.
        if self.outbound_aliases.len() >= usize::from(self.client.topic_alias_maximum) {
            return None;
        }
        let alias = self.outbound_aliases.len() as u16 + 1;
        self.outbound_aliases.insert(topic.clone(), alias);
        properties
            .get_or_insert_with(PublishProperties::default)
            .topic_alias = Some(alias);
        Some(topic.clone())
    }

    /// On session resumption, resends every unacknowledged PUBLISH with DUP=1 and every PUBREL,
    /// in the original order [MQTT-4.4.0-1].
    pub fn resend_inflight(&mut self, out: &mut BytesMut) {
        let now = Instant::now();
        let mut packets = Vec::with_capacity(self.session.outbound.len());
        for inflight in self.session.outbound.iter() {
            let packet = match inflight.state {
                InflightState::AwaitingPubComp => Packet::PubRel(PubRel {
                    pkid: inflight.pkid,
                    reason: PubRelReason::Success,
                    properties: None,
                }),
                InflightState::AwaitingPubAck | InflightState::AwaitingPubRec => {
                    let d = &inflight.delivery;
                    Packet::Publish(Publish {
                        dup: true,
                        qos: d.qos,
                        retain: d.retain,
                        topic: d.message.topic.clone(),
                        pkid: inflight.pkid,
                        payload: d.message.payload.clone(),
                        properties: if self.v5() {
                            d.message.forward_properties(now, &d.subscription_ids)
                        } else {
                            None
                        },
                    })
                }
            };
            packets.push(packet);
        }
        for packet in packets {
            self.send(packet, out);
        }
    }

    /// Gives the session and will back when the connection ends.
    pub fn into_parts(self) -> (Session, Option<Will>) {
        (self.session, self.will)
    }
}

/// A completion that resolves when both resolve, with the first error.
fn rec_code(reason: PubRecReason) -> u8 {
    match reason {
        PubRecReason::Success => 0x00,
        PubRecReason::NoMatchingSubscribers => 0x10,
        PubRecReason::UnspecifiedError => 0x80,
        PubRecReason::ImplementationSpecificError => 0x83,
        PubRecReason::NotAuthorized => 0x87,
        PubRecReason::TopicNameInvalid => 0x90,
        PubRecReason::PacketIdentifierInUse => 0x91,
        PubRecReason::QuotaExceeded => 0x97,
        PubRecReason::PayloadFormatInvalid => 0x99,
    }
}
