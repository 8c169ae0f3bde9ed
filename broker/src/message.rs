//! The application message as it travels from a publisher to its subscribers.
//!
//! A [`Message`] is built once per PUBLISH and shared behind an `Arc` by every subscriber it
//! reaches; its topic and payload are `Bytes` slices of the publisher's read buffer, so fan-out
//! copies neither.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::protocol::{LastWillProperties, PublishProperties, QoS};

/// One application message, immutable once routed.
#[derive(Debug)]
pub struct Message {
    /// Topic name (already validated as UTF-8 without wildcards).
    pub topic: Bytes,
    pub payload: Bytes,
    /// QoS the publisher sent it with; each subscriber gets min(this, its subscription's QoS).
    pub qos: QoS,
    /// The RETAIN flag as published (needed for v5 Retain As Published).
    pub retain: bool,
    /// v5 properties that travel with the message (no topic alias, no subscription ids: those
    /// are per hop).
    pub properties: MessageProperties,
    /// When the broker received it; message expiry counts from here.
    pub received_at: Instant,
    /// Publishing client, for v5 No Local.
    pub publisher: Arc<str>,
}

/// The v5 PUBLISH properties that are forwarded unchanged to subscribers [MQTT-3.3.2-*].
#[derive(Debug, Default, Clone)]
pub struct MessageProperties {
    pub payload_format_indicator: Option<u8>,
    pub message_expiry_interval: Option<u32>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    pub user_properties: Vec<(String, String)>,
    pub content_type: Option<String>,
}

impl MessageProperties {
    /// Takes the forwardable properties out of an incoming PUBLISH's properties.
    pub fn from_publish(props: Option<PublishProperties>) -> MessageProperties {
        match props {
            None => MessageProperties::default(),
            Some(p) => MessageProperties {
                payload_format_indicator: p.payload_format_indicator,
                message_expiry_interval: p.message_expiry_interval,
                response_topic: p.response_topic,
                correlation_data: p.correlation_data,
                user_properties: p.user_properties,
                content_type: p.content_type,
            },
        }
    }

    /// The same properties taken from a will (v5 §3.1.3.2): a will is published like a
    /// PUBLISH carrying them.
    pub fn from_will(props: Option<LastWillProperties>) -> MessageProperties {
        Self::from_publish(props.map(|p| PublishProperties {
            payload_format_indicator: p.payload_format_indicator,
            message_expiry_interval: p.message_expiry_interval,
            response_topic: p.response_topic,
            correlation_data: p.correlation_data,
            user_properties: p.user_properties,
            content_type: p.content_type,
            ..PublishProperties::default()
        }))
    }

    fn is_empty(&self) -> bool {
        self.payload_format_indicator.is_none()
            && self.message_expiry_interval.is_none()
            && self.response_topic.is_none()
            && self.correlation_data.is_none()
            && self.user_properties.is_empty()
            && self.content_type.is_none()
    }
}

impl Message {
    /// The topic as text. The decoder checked UTF-8; a failure here would be a bug, so it
    /// degrades to an empty topic rather than panicking.
    pub fn topic_str(&self) -> &str {
        std::str::from_utf8(&self.topic).unwrap_or("")
    }

    /// Seconds of life left, or `None` when the message never expires. `Some(0)` means expired.
    pub fn remaining_expiry(&self, now: Instant) -> Option<u32> {
        let interval = self.properties.message_expiry_interval?;
        let elapsed = now.saturating_duration_since(self.received_at);
        let total = Duration::from_secs(u64::from(interval));
        if elapsed >= total {
            Some(0)
        } else {
            // Round up so a message with 0.4 s left is not reported as already expired.
            let left = total - elapsed;
            Some(left.as_secs_f64().ceil() as u32)
        }
    }

    pub fn is_expired(&self, now: Instant) -> bool {
        self.remaining_expiry(now) == Some(0)
    }

    /// v5 properties for forwarding this message, with the remaining expiry interval
    /// [MQTT-3.3.2-6] and this subscriber's subscription identifiers. `None` when there are none,
    /// so the common case encodes no property block at all.
    pub fn forward_properties(
        &self,
        now: Instant,
        subscription_ids: &[usize],
    ) -> Option<PublishProperties> {
        if self.properties.is_empty() && subscription_ids.is_empty() {
            return None;
        }
        let p = &self.properties;
        Some(PublishProperties {
            payload_format_indicator: p.payload_format_indicator,
            message_expiry_interval: self.remaining_expiry(now),
            topic_alias: None,
            response_topic: p.response_topic.clone(),
            correlation_data: p.correlation_data.clone(),
            user_properties: p.user_properties.clone(),
            subscription_identifiers: subscription_ids.to_vec(),
            content_type: p.content_type.clone(),
        })
    }
}

/// A message addressed to one subscriber: what sits in a client's outbound queue.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub message: Arc<Message>,
    /// min(publish QoS, granted QoS) — already downgraded [MQTT-3.8.4-8].
    pub qos: QoS,
    /// RETAIN flag to send: set for retained messages sent on subscribe, and for v5 Retain As
    /// Published subscriptions; clear otherwise [MQTT-3.3.1-9].
    pub retain: bool,
    /// v5 subscription identifiers of every matching subscription of this client.
    pub subscription_ids: Vec<usize>,
    /// Position in the session's durable queue or log, when it came from there.
    pub seq: Option<u64>,
    /// Send with DUP=1: it may have been sent before a restart.
    pub dup: bool,
}

/// Lower of two QoS levels.
pub fn min_qos(a: QoS, b: QoS) -> QoS {
    if (a as u8) <= (b as u8) {
        a
    } else {
        b
    }
}

/// Higher of two QoS levels.
pub fn max_qos(a: QoS, b: QoS) -> QoS {
    if (a as u8) >= (b as u8) {
        a
    } else {
        b
    }
}
