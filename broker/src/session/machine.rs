//! The per-connection MQTT state machine: it turns incoming packets into router calls and
//! responses, and outbound deliveries into PUBLISH packets, writing everything into the
//! connection's output buffer. No socket here, so the rules are testable on their own.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use rumqttc::v5::mqttbytes::v5::Packet;

use super::outbound::InflightState;
use super::{Session, NEVER_EXPIRES};
use crate::broker::Broker;
use crate::message::{min_qos, Delivery, Message, MessageProperties};
use crate::protocol::{
    encode, Disconnect, DisconnectReasonCode, Incoming, PingResp, ProtocolVersion, PubAck,
    PubAckReason, PubComp, PubCompReason, PubRec, PubRecReason, PubRel, PubRelReason, Publish,
    PublishProperties, QoS, RetainForwardRule, SubAck, Subscribe, SubscribeReasonCode, UnsubAck,
    UnsubAckReason, Unsubscribe, Will,
};
use crate::router::topic::{parse_filter, validate_topic_name, ParsedFilter};
use crate::router::SubscriptionOptions;

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
        }
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
                self.session.outbound.puback(ack.pkid);
                Flow::Continue
            }
            Incoming::PubRec(rec) => self.on_pubrec(rec, out),
            Incoming::PubRel(rel) => self.on_pubrel(rel, out),
            Incoming::PubComp(comp) => {
                self.session.outbound.pubcomp(comp.pkid);
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

    fn send(&self, packet: Packet, out: &mut BytesMut) {
        // Acks and control packets are tiny; only a client with an absurd Maximum Packet Size
        // could refuse them, and then dropping them is what the spec asks [MQTT-3.1.2-25].
        let _ = encode(&packet, self.version, self.client.max_packet_size, out);
    }

    fn on_publish(&mut self, mut publish: Publish, out: &mut BytesMut) -> Flow {
        let metrics = self.broker.metrics.clone();
        metrics.messages_received.inc();
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
        if message.retain {
            self.broker.router.retain(&message);
        }
        let routed = self.broker.router.publish(&message);
        if routed.matched == 0 {
            metrics.messages_dropped_no_subscribers.inc();
        }
        let no_match = routed.matched == 0 && self.v5();
        match message.qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => {
                let reason = if no_match {
                    PubAckReason::NoMatchingSubscribers
                } else {
                    PubAckReason::Success
                };
                self.send(
                    Packet::PubAck(PubAck {
                        pkid,
                        reason,
                        properties: None,
                    }),
                    out,
                );
            }
            QoS::ExactlyOnce => {
                self.session.inbound_qos2.insert(pkid);
                let reason = if no_match {
                    PubRecReason::NoMatchingSubscribers
                } else {
                    PubRecReason::Success
                };
                self.pubrec(pkid, reason, out);
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

    fn pubrec(&self, pkid: u16, reason: PubRecReason, out: &mut BytesMut) {
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
        let reason = match self.session.outbound.pubrec(rec.pkid, success) {
            Some(true) => PubRelReason::Success,
            Some(false) => return Flow::Continue,
            None => PubRelReason::PacketIdentifierNotFound,
        };
        self.send(
            Packet::PubRel(PubRel {
                pkid: rec.pkid,
                reason,
                properties: None,
            }),
            out,
        );
        Flow::Continue
    }

    fn on_pubrel(&mut self, rel: PubRel, out: &mut BytesMut) -> Flow {
        let reason = if self.session.inbound_qos2.remove(&rel.pkid) {
            PubCompReason::Success
        } else {
            PubCompReason::PacketIdentifierNotFound
        };
        self.send(
            Packet::PubComp(PubComp {
                pkid: rel.pkid,
                reason,
                properties: None,
            }),
            out,
        );
        Flow::Continue
    }

    fn on_subscribe(&mut self, subscribe: Subscribe, out: &mut BytesMut) -> Flow {
        let identifier = subscribe.properties.as_ref().and_then(|p| p.id);
        let limits = &self.broker.config.limits;
        let mut return_codes = Vec::with_capacity(subscribe.filters.len());
        let mut retained: Vec<Delivery> = Vec::new();
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
                    });
                }
            }
        }
        self.send(
            Packet::SubAck(SubAck {
                pkid: subscribe.pkid,
                return_codes,
                properties: None,
            }),
            out,
        );
        // After the SUBACK, in the order found [MQTT-3.8.4-4].
        self.pending.extend(retained);
        Flow::Continue
    }

    fn on_unsubscribe(&mut self, unsubscribe: Unsubscribe, out: &mut BytesMut) -> Flow {
        let mut reasons = Vec::with_capacity(unsubscribe.filters.len());
        for filter in &unsubscribe.filters {
            let reason = match parse_filter(filter, &self.broker.topic_limits) {
                Err(_) => UnsubAckReason::TopicFilterInvalid,
                Ok(parsed) => {
                    self.broker
                        .router
                        .unsubscribe(&self.session.client_id, parsed);
                    if self.session.subscriptions.remove(filter).is_some() {
                        UnsubAckReason::Success
                    } else {
                        UnsubAckReason::NoSubscriptionExisted
                    }
                }
            };
            reasons.push(reason);
        }
        self.send(
            Packet::UnsubAck(UnsubAck {
                pkid: unsubscribe.pkid,
                reasons,
                properties: None,
            }),
            out,
        );
        Flow::Continue
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
            self.session.expiry_interval =
                expiry.min(self.broker.config.session.max_session_expiry_secs);
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
        let metrics = self.broker.metrics.clone();
        if delivery.message.is_expired(now) {
            metrics.messages_dropped_expired.inc();
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
        let (pkid, state) = match delivery.qos {
            QoS::AtMostOnce => (0, None),
            QoS::AtLeastOnce => (
                self.session.outbound.next_pkid().unwrap_or(0),
                Some(InflightState::AwaitingPubAck),
            ),
            QoS::ExactlyOnce => (
                self.session.outbound.next_pkid().unwrap_or(0),
                Some(InflightState::AwaitingPubRec),
            ),
        };
        let publish = Publish {
            dup: false,
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
                metrics.messages_sent.inc();
                if let Some(state) = state {
                    self.session.outbound.push(pkid, delivery, state);
                }
            }
            Err(_) => {
                // Larger than the client accepts: discard as if delivered [MQTT-3.1.2-25].
                metrics.messages_dropped_too_large.inc();
                if let Some(topic) = new_alias {
                    self.outbound_aliases.remove(&topic);
                }
            }
        }
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

    /// The Session Expiry Interval in force.
    pub fn expiry_interval(&self) -> u32 {
        self.session.expiry_interval
    }

    /// Whether the session ends with this connection.
    pub fn never_expires(&self) -> bool {
        self.session.expiry_interval == NEVER_EXPIRES
    }

    /// Gives the session and will back when the connection ends.
    pub fn into_parts(self) -> (Session, Option<Will>) {
        (self.session, self.will)
    }
}

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
