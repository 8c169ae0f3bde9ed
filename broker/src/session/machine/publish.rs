//! Incoming PUBLISH: checks (topic, aliases, ACL, payload format, QoS 2 window), then the
//! ingest step and the acknowledgement that waits for it.

use super::*;

impl Machine {
    pub(super) fn on_publish(&mut self, mut publish: Publish, out: &mut BytesMut) -> Flow {
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
        let mut own = self.session.write_batch();
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

    pub(super) fn refuse_publish(&mut self, qos: QoS, pkid: u16, out: &mut BytesMut) -> Flow {
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
    pub(super) fn deny_publish(&mut self, qos: QoS, pkid: u16, out: &mut BytesMut) -> Flow {
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

    /// Applies a v5 Topic Alias [MQTT-3.3.2-7..12]; returns a Flow when the connection must end.
    pub(super) fn resolve_inbound_alias(&mut self, publish: &mut Publish) -> Option<Flow> {
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
}
