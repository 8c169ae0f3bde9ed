//! Outgoing PUBLISH: the in-flight window, topic aliases towards the client, expiry, and
//! resending in-flight messages on a resumed session.

use super::*;

impl Machine {
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

    /// Uses or establishes a topic alias towards a v5 client that allows them. Returns the topic
    /// of a newly established alias (so a failed send can undo it).
    pub(super) fn outbound_alias(
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
}
