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
    join_completions, pkid_for_seq, Completion, QueueRead, QueuedEntry, StorageError, WriteOp,
};

mod acks;
mod delivery;
mod publish;
mod qos2;
mod stored;
mod subscribe;
#[cfg(test)]
mod tests;

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
    /// The client's v5 Maximum Packet Size (`None`: only the protocol limit); what the
    /// connection may send it when it closes.
    pub fn client_max_packet_size(&self) -> Option<u32> {
        self.client.max_packet_size
    }

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
        let mut batch = self.session.write_batch();
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

    /// Gives the session and will back when the connection ends.
    pub fn into_parts(self) -> (Session, Option<Will>) {
        (self.session, self.will)
    }
}
