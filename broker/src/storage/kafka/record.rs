//! The Kafka record format of `<prefix>.msg.all` and of the APPLICATION topics.
//!
//! The record value is the MQTT payload, unchanged, and everything else travels in headers, so
//! that any Kafka consumer (a stream processor, `kcat`) can read what devices publish without
//! knowing our binary formats:
//!
//! | header | value | when |
//! |---|---|---|
//! | `ferrymq.v` | `1`: the format version | always |
//! | `mqtt.topic` | topic name (UTF-8) | always |
//! | `mqtt.qos` | `0`, `1` or `2` | always |
//! | `mqtt.retain` | `1` | RETAIN set |
//! | `ferrymq.publisher` | publishing client id | always |
//! | `ferrymq.received_ms` | when the broker received it, ms since the epoch | always |
//! | `mqtt.payload_format` | `0` or `1` | v5 Payload Format Indicator |
//! | `mqtt.expiry` | v5 Message Expiry Interval in seconds, counted from `received_ms` | set |
//! | `mqtt.content_type` / `mqtt.response_topic` | text | set |
//! | `mqtt.correlation_data` | bytes | set |
//! | `mqtt.user` | `name` `0x00` `value`, one header per user property, in order | set |
//! | `ferrymq.sub_qos` | QoS granted to this subscriber | APPLICATION topics |
//! | `ferrymq.sub_retain` | `1`: deliver with RETAIN set | APPLICATION topics |
//! | `ferrymq.sub_ids` | subscription identifiers, comma-separated | APPLICATION topics |
//! | `ferrymq.origin` | `partition:offset` of the `msg.all` record it was routed from | APPLICATION topics |
//!
//! A reader refuses a version it does not know rather than guess; new optional headers may be
//! added within a version (readers ignore headers they do not know), anything else bumps it.

use std::sync::Arc;

use bytes::Bytes;
use rdkafka::message::{Header, Headers, OwnedHeaders};

use crate::message::{Message, MessageProperties};
use crate::protocol::QoS;
use crate::storage::codec::{instant_to_ms, ms_to_instant, StoredDelivery};

pub const VERSION_HEADER: &str = "ferrymq.v";
/// APPLICATION records: `partition:offset` of the publish-log record they were routed from.
pub const ORIGIN_HEADER: &str = "ferrymq.origin";
/// APPLICATION records claimed from a shared group topic: `topic:partition:offset`.
pub const CLAIM_HEADER: &str = "ferrymq.claim";
/// QoS 2 PUBLISH records of persistent sessions: `<packet id>` or `<packet id>;dup` (the
/// publisher's DUP flag), so the router can drop a resend it already routed.
pub const QOS2_HEADER: &str = "ferrymq.qos2";
/// Control records (no MQTT message): `release:<packet id>` (the publisher released a QoS 2
/// packet id with PUBREL) or `reset` (the publisher started a new session).
pub const CONTROL_HEADER: &str = "ferrymq.control";
const PUBLISHER_HEADER: &str = "ferrymq.publisher";
const V1: &[u8] = b"1";

/// A control record of the publish log: state of a publisher's QoS 2 flows.
pub use crate::storage::log::LogControl as Control;

/// The headers of a control record.
pub fn control_headers(control: &Control) -> OwnedHeaders {
    let (publisher, value) = match control {
        Control::Release { publisher, pkid } => (publisher, format!("release:{pkid}")),
        Control::Reset { publisher } => (publisher, "reset".to_string()),
    };
    OwnedHeaders::new_with_capacity(3)
        .insert(header(VERSION_HEADER, V1))
        .insert(header(CONTROL_HEADER, value.as_bytes()))
        .insert(header(PUBLISHER_HEADER, publisher.as_bytes()))
}

/// The control record these headers describe, if they describe one. `Err` when the record is a
/// control record this broker cannot read.
pub fn control<H: Headers>(headers: Option<&H>) -> Result<Option<Control>, RecordError> {
    let Some(headers) = headers else {
        return Ok(None);
    };
    let mut value = None;
    let mut publisher = None;
    for h in headers.iter() {
        match h.key {
            CONTROL_HEADER => value = h.value,
            PUBLISHER_HEADER => publisher = h.value,
            _ => {}
        }
    }
    let Some(value) = value else {
        return Ok(None);
    };
    let publisher: Arc<str> =
        std::str::from_utf8(publisher.ok_or(RecordError::Header(PUBLISHER_HEADER))?)
            .map_err(|_| RecordError::Header(PUBLISHER_HEADER))?
            .into();
    match value {
        b"reset" => Ok(Some(Control::Reset { publisher })),
        v => match v.strip_prefix(b"release:") {
            Some(pkid) => Ok(Some(Control::Release {
                publisher,
                pkid: number(pkid, CONTROL_HEADER)?,
            })),
            None => Err(RecordError::Header(CONTROL_HEADER)),
        },
    }
}

/// The `ferrymq.qos2` header: the publisher's packet id and DUP flag.
pub fn qos2_flow<H: Headers>(headers: Option<&H>) -> Option<(u16, bool)> {
    let h = headers?.iter().find(|h| h.key == QOS2_HEADER)?;
    let text = std::str::from_utf8(h.value?).ok()?;
    match text.strip_suffix(";dup") {
        Some(pkid) => Some((pkid.parse().ok()?, true)),
        None => Some((text.parse().ok()?, false)),
    }
}

/// Adds the `ferrymq.qos2` header to a PUBLISH record's headers.
pub fn with_qos2_flow(headers: OwnedHeaders, pkid: u16, dup: bool) -> OwnedHeaders {
    let value = if dup {
        format!("{pkid};dup")
    } else {
        pkid.to_string()
    };
    headers.insert(header(QOS2_HEADER, value.as_bytes()))
}

/// Why a record could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("record has no `ferrymq.v` header: not written by ferrymq")]
    NotOurs,
    #[error("record format version {0:?} is unknown to this broker")]
    UnknownVersion(String),
    #[error("header `{0}` is missing or invalid")]
    Header(&'static str),
}

/// What one subscriber gets, for records in an APPLICATION topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriberPart<'a> {
    pub qos: QoS,
    pub retain: bool,
    pub subscription_ids: &'a [usize],
}

/// The headers of a record carrying `message` (plus, for an APPLICATION topic, what its
/// subscriber was granted).
pub fn headers(message: &Message, sub: Option<SubscriberPart<'_>>) -> OwnedHeaders {
    let p = &message.properties;
    let mut h = OwnedHeaders::new_with_capacity(8 + p.user_properties.len())
        .insert(header(VERSION_HEADER, V1))
        .insert(header("mqtt.topic", &message.topic))
        .insert(header("mqtt.qos", qos_text(message.qos)));
    if message.retain {
        h = h.insert(header("mqtt.retain", b"1"));
    }
    h = h
        .insert(header(PUBLISHER_HEADER, message.publisher.as_bytes()))
        .insert(header(
            "ferrymq.received_ms",
            instant_to_ms(message.received_at).to_string().as_bytes(),
        ));
    if let Some(v) = p.payload_format_indicator {
        h = h.insert(header("mqtt.payload_format", v.to_string().as_bytes()));
    }
    if let Some(v) = p.message_expiry_interval {
        h = h.insert(header("mqtt.expiry", v.to_string().as_bytes()));
    }
    if let Some(v) = &p.content_type {
        h = h.insert(header("mqtt.content_type", v.as_bytes()));
    }
    if let Some(v) = &p.response_topic {
        h = h.insert(header("mqtt.response_topic", v.as_bytes()));
    }
    if let Some(v) = &p.correlation_data {
        h = h.insert(header("mqtt.correlation_data", v));
    }
    for (k, v) in &p.user_properties {
        let mut kv = Vec::with_capacity(k.len() + 1 + v.len());
        kv.extend_from_slice(k.as_bytes());
        kv.push(0);
        kv.extend_from_slice(v.as_bytes());
        h = h.insert(header("mqtt.user", &kv));
    }
    if let Some(sub) = sub {
        h = h.insert(header("ferrymq.sub_qos", qos_text(sub.qos)));
        if sub.retain {
            h = h.insert(header("ferrymq.sub_retain", b"1"));
        }
        if !sub.subscription_ids.is_empty() {
            let ids: Vec<String> = sub.subscription_ids.iter().map(|i| i.to_string()).collect();
            h = h.insert(header("ferrymq.sub_ids", ids.join(",").as_bytes()));
        }
    }
    h
}

fn header<'a>(key: &'a str, value: &'a [u8]) -> Header<'a, &'a [u8]> {
    Header {
        key,
        value: Some(value),
    }
}

fn qos_text(qos: QoS) -> &'static [u8] {
    match qos {
        QoS::AtMostOnce => b"0",
        QoS::AtLeastOnce => b"1",
        QoS::ExactlyOnce => b"2",
    }
}

fn qos_from(v: &[u8]) -> Option<QoS> {
    match v {
        b"0" => Some(QoS::AtMostOnce),
        b"1" => Some(QoS::AtLeastOnce),
        b"2" => Some(QoS::ExactlyOnce),
        _ => None,
    }
}

fn text(v: &[u8], name: &'static str) -> Result<String, RecordError> {
    String::from_utf8(v.to_vec()).map_err(|_| RecordError::Header(name))
}

fn number<T: std::str::FromStr>(v: &[u8], name: &'static str) -> Result<T, RecordError> {
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(RecordError::Header(name))
}

/// The `ferrymq.origin` header of an APPLICATION record.
pub fn origin<H: Headers>(headers: &H) -> Option<(i32, i64)> {
    let h = headers.iter().find(|h| h.key == ORIGIN_HEADER)?;
    let text = std::str::from_utf8(h.value?).ok()?;
    let (p, o) = text.split_once(':')?;
    Some((p.parse().ok()?, o.parse().ok()?))
}

/// The `ferrymq.claim` header of an APPLICATION record.
pub fn claim<H: Headers>(headers: &H) -> Option<(String, i32, i64)> {
    let h = headers.iter().find(|h| h.key == CLAIM_HEADER)?;
    let text = std::str::from_utf8(h.value?).ok()?;
    let (rest, o) = text.rsplit_once(':')?;
    let (topic, p) = rest.rsplit_once(':')?;
    Some((topic.to_string(), p.parse().ok()?, o.parse().ok()?))
}

/// Reads a record back: the message, and the subscriber part when present.
pub fn decode<H: Headers>(
    headers: Option<&H>,
    payload: &[u8],
) -> Result<StoredDelivery, RecordError> {
    let headers = headers.ok_or(RecordError::NotOurs)?;
    let mut version = None;
    let mut topic = None;
    let mut qos = None;
    let mut retain = false;
    let mut publisher = None;
    let mut received_ms = None;
    let mut p = MessageProperties::default();
    let mut sub_qos = None;
    let mut sub_retain = false;
    let mut sub_ids = Vec::new();
    for h in headers.iter() {
        let v = h.value.unwrap_or_default();
        match h.key {
            VERSION_HEADER => version = Some(v),
            "mqtt.topic" => {
                std::str::from_utf8(v).map_err(|_| RecordError::Header("mqtt.topic"))?;
                topic = Some(Bytes::copy_from_slice(v));
            }
            "mqtt.qos" => qos = Some(qos_from(v).ok_or(RecordError::Header("mqtt.qos"))?),
            "mqtt.retain" => retain = v == b"1",
            "ferrymq.publisher" => publisher = Some(text(v, "ferrymq.publisher")?),
            "ferrymq.received_ms" => received_ms = Some(number::<u64>(v, "ferrymq.received_ms")?),
            "mqtt.payload_format" => {
                p.payload_format_indicator = Some(number(v, "mqtt.payload_format")?)
            }
            "mqtt.expiry" => p.message_expiry_interval = Some(number(v, "mqtt.expiry")?),
            "mqtt.content_type" => p.content_type = Some(text(v, "mqtt.content_type")?),
            "mqtt.response_topic" => p.response_topic = Some(text(v, "mqtt.response_topic")?),
            "mqtt.correlation_data" => p.correlation_data = Some(Bytes::copy_from_slice(v)),
            "mqtt.user" => {
                let at = v
                    .iter()
                    .position(|b| *b == 0)
                    .ok_or(RecordError::Header("mqtt.user"))?;
                p.user_properties.push((
                    text(&v[..at], "mqtt.user")?,
                    text(&v[at + 1..], "mqtt.user")?,
                ));
            }
            "ferrymq.sub_qos" => {
                sub_qos = Some(qos_from(v).ok_or(RecordError::Header("ferrymq.sub_qos"))?)
            }
            "ferrymq.sub_retain" => sub_retain = v == b"1",
            "ferrymq.sub_ids" => {
                for id in v.split(|b| *b == b',') {
                    sub_ids.push(number::<usize>(id, "ferrymq.sub_ids")?);
                }
            }
            _ => {}
        }
    }
    match version {
        None => return Err(RecordError::NotOurs),
        Some(V1) => {}
        Some(other) => {
            return Err(RecordError::UnknownVersion(
                String::from_utf8_lossy(other).into_owned(),
            ))
        }
    }
    let topic = topic.ok_or(RecordError::Header("mqtt.topic"))?;
    let qos = qos.ok_or(RecordError::Header("mqtt.qos"))?;
    let publisher: Arc<str> = Arc::from(publisher.ok_or(RecordError::Header("ferrymq.publisher"))?);
    let received_ms = received_ms.ok_or(RecordError::Header("ferrymq.received_ms"))?;
    let expires_at_ms = p
        .message_expiry_interval
        .map_or(0, |s| received_ms.saturating_add(u64::from(s) * 1000));
    let message = Message {
        topic,
        payload: Bytes::copy_from_slice(payload),
        qos,
        retain,
        properties: p,
        received_at: ms_to_instant(received_ms),
        publisher,
    };
    Ok(StoredDelivery {
        qos: sub_qos.unwrap_or(qos),
        retain: if sub_qos.is_some() {
            sub_retain
        } else {
            retain
        },
        expires_at_ms,
        subscription_ids: sub_ids,
        message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_records_and_qos2_flows_round_trip() {
        let publisher: Arc<str> = "meter/7".into();
        for c in [
            Control::Release {
                publisher: publisher.clone(),
                pkid: 65_535,
            },
            Control::Reset {
                publisher: publisher.clone(),
            },
        ] {
            let h = control_headers(&c);
            assert_eq!(control(Some(&h)), Ok(Some(c.clone())));
            // A control record is not a message.
            assert!(decode(Some(&h), b"").is_err());
        }
        let h = OwnedHeaders::new()
            .insert(header(VERSION_HEADER, V1))
            .insert(header(CONTROL_HEADER, b"release:x"))
            .insert(header(PUBLISHER_HEADER, b"p"));
        assert_eq!(control(Some(&h)), Err(RecordError::Header(CONTROL_HEADER)));
        let plain = OwnedHeaders::new().insert(header(VERSION_HEADER, V1));
        assert_eq!(control(Some(&plain)), Ok(None));
        assert_eq!(qos2_flow(Some(&plain)), None);
        assert_eq!(
            qos2_flow(Some(&with_qos2_flow(plain.clone(), 7, false))),
            Some((7, false))
        );
        assert_eq!(
            qos2_flow(Some(&with_qos2_flow(plain, 7, true))),
            Some((7, true))
        );
    }
    use std::time::Instant;

    fn message() -> Message {
        Message {
            topic: Bytes::from_static(b"plant/7/temp"),
            payload: Bytes::from_static(b"21.5"),
            qos: QoS::ExactlyOnce,
            retain: true,
            properties: MessageProperties {
                payload_format_indicator: Some(1),
                message_expiry_interval: Some(60),
                response_topic: Some("reply/here".into()),
                correlation_data: Some(Bytes::from_static(b"\x00\x01")),
                user_properties: vec![("a".into(), "1".into()), ("a".into(), "2".into())],
                content_type: Some("text/plain".into()),
            },
            received_at: Instant::now(),
            publisher: Arc::from("dev-1"),
        }
    }

    #[test]
    fn round_trips_with_every_property() {
        let m = message();
        let h = headers(&m, None);
        let d = decode(Some(&h), &m.payload).unwrap();
        assert_eq!(d.message.topic, m.topic);
        assert_eq!(d.message.payload, m.payload);
        assert_eq!(d.qos, QoS::ExactlyOnce);
        assert!(d.retain);
        assert_eq!(&*d.message.publisher, "dev-1");
        assert_eq!(
            d.message.properties.user_properties,
            m.properties.user_properties
        );
        assert_eq!(
            d.message.properties.correlation_data,
            m.properties.correlation_data
        );
        assert_eq!(
            d.message.properties.content_type.as_deref(),
            Some("text/plain")
        );
        assert_eq!(
            d.message.properties.response_topic.as_deref(),
            Some("reply/here")
        );
        assert_eq!(d.message.properties.payload_format_indicator, Some(1));
        assert!(d.expires_at_ms > 0);
    }

    #[test]
    fn subscriber_part_overrides_qos_and_retain() {
        let m = message();
        let ids = [3usize, 9];
        let h = headers(
            &m,
            Some(SubscriberPart {
                qos: QoS::AtLeastOnce,
                retain: false,
                subscription_ids: &ids,
            }),
        );
        let d = decode(Some(&h), &m.payload).unwrap();
        assert_eq!(d.qos, QoS::AtLeastOnce);
        assert!(!d.retain);
        assert_eq!(d.subscription_ids, vec![3, 9]);
    }

    /// A v1 record written by hand, as an older broker would have: it must keep decoding.
    #[test]
    fn hand_written_v1_record_decodes() {
        let h = OwnedHeaders::new()
            .insert(header("ferrymq.v", b"1"))
            .insert(header("mqtt.topic", b"a/b"))
            .insert(header("mqtt.qos", b"1"))
            .insert(header("ferrymq.publisher", b"old"))
            .insert(header("ferrymq.received_ms", b"1700000000000"))
            .insert(header("mqtt.user", b"k\x00v"))
            .insert(header("some.future.header", b"ignored"));
        let d = decode(Some(&h), b"payload").unwrap();
        assert_eq!(&d.message.topic[..], b"a/b");
        assert_eq!(d.qos, QoS::AtLeastOnce);
        assert!(!d.retain);
        assert_eq!(d.expires_at_ms, 0);
        assert_eq!(
            d.message.properties.user_properties,
            vec![("k".into(), "v".into())]
        );
    }

    #[test]
    fn unknown_versions_and_foreign_records_are_refused() {
        let h = OwnedHeaders::new().insert(header("ferrymq.v", b"2"));
        assert!(matches!(
            decode(Some(&h), b""),
            Err(RecordError::UnknownVersion(_))
        ));
        let h = OwnedHeaders::new().insert(header("other", b"x"));
        assert_eq!(decode(Some(&h), b"").err(), Some(RecordError::NotOurs));
        assert_eq!(
            decode::<OwnedHeaders>(None, b"").err(),
            Some(RecordError::NotOurs)
        );
        let h = OwnedHeaders::new()
            .insert(header("ferrymq.v", b"1"))
            .insert(header("mqtt.topic", b"a"))
            .insert(header("mqtt.qos", b"3"));
        assert_eq!(
            decode(Some(&h), b"").err(),
            Some(RecordError::Header("mqtt.qos"))
        );
    }
}
