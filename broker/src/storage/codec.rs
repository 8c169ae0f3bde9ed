//! The versioned binary record format for stored messages, deliveries, sessions and
//! subscriptions.
//!
//! Every record starts with a format version byte, so a newer broker still reads what an older
//! one wrote (`decode_*` dispatch on it) and an unknown version is an error, never a misread.
//! Integers are big-endian; strings and byte strings are length-prefixed. The Kafka record format
//! of the production backend reuses the message layout.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::message::{Message, MessageProperties};
use crate::protocol::{QoS, RetainForwardRule};
use crate::router::SubscriptionOptions;

/// Current record format version.
pub const FORMAT_V1: u8 = 1;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("record truncated")]
    Truncated,
    #[error("unknown record format version {0}")]
    UnknownVersion(u8),
    #[error("invalid field: {0}")]
    Invalid(&'static str),
}

type Result<T> = std::result::Result<T, CodecError>;

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The wall-clock time (ms) at which a message held as an `Instant` was received.
pub fn instant_to_ms(at: Instant) -> u64 {
    let ago = Instant::now().saturating_duration_since(at);
    now_ms().saturating_sub(ago.as_millis() as u64)
}

/// The `Instant` matching a stored wall-clock time, clamped to "now" for the future and to the
/// oldest representable instant for the distant past.
pub fn ms_to_instant(ms: u64) -> Instant {
    let ago = Duration::from_millis(now_ms().saturating_sub(ms));
    let now = Instant::now();
    now.checked_sub(ago).unwrap_or(now)
}

fn qos_from(bits: u8) -> Result<QoS> {
    match bits {
        0 => Ok(QoS::AtMostOnce),
        1 => Ok(QoS::AtLeastOnce),
        2 => Ok(QoS::ExactlyOnce),
        _ => Err(CodecError::Invalid("qos")),
    }
}

fn put_str(out: &mut BytesMut, s: &str) {
    put_bytes(out, s.as_bytes());
}

fn put_bytes(out: &mut BytesMut, b: &[u8]) {
    out.put_u32(b.len() as u32);
    out.put_slice(b);
}

fn get_u8(buf: &mut Bytes) -> Result<u8> {
    if buf.remaining() < 1 {
        return Err(CodecError::Truncated);
    }
    Ok(buf.get_u8())
}

fn get_u16(buf: &mut Bytes) -> Result<u16> {
    if buf.remaining() < 2 {
        return Err(CodecError::Truncated);
    }
    Ok(buf.get_u16())
}

fn get_u32(buf: &mut Bytes) -> Result<u32> {
    if buf.remaining() < 4 {
        return Err(CodecError::Truncated);
    }
    Ok(buf.get_u32())
}

fn get_u64(buf: &mut Bytes) -> Result<u64> {
    if buf.remaining() < 8 {
        return Err(CodecError::Truncated);
    }
    Ok(buf.get_u64())
}

fn get_bytes(buf: &mut Bytes) -> Result<Bytes> {
    let len = get_u32(buf)? as usize;
    if buf.remaining() < len {
        return Err(CodecError::Truncated);
    }
    Ok(buf.split_to(len))
}

fn get_string(buf: &mut Bytes) -> Result<String> {
    let b = get_bytes(buf)?;
    String::from_utf8(b.to_vec()).map_err(|_| CodecError::Invalid("utf-8"))
}

// Presence bits of the optional message properties.
const P_FORMAT: u8 = 1;
const P_EXPIRY: u8 = 1 << 1;
const P_RESPONSE: u8 = 1 << 2;
const P_CORRELATION: u8 = 1 << 3;
const P_CONTENT_TYPE: u8 = 1 << 4;

/// Appends a message: version, flags (qos | retain), received-at, publisher, topic, properties,
/// payload.
pub fn encode_message(m: &Message, out: &mut BytesMut) {
    out.reserve(32 + m.topic.len() + m.payload.len() + m.publisher.len());
    out.put_u8(FORMAT_V1);
    out.put_u8(m.qos as u8 | if m.retain { 0x04 } else { 0 });
    out.put_u64(instant_to_ms(m.received_at));
    put_str(out, &m.publisher);
    put_bytes(out, &m.topic);
    let p = &m.properties;
    let mut present = 0u8;
    if p.payload_format_indicator.is_some() {
        present |= P_FORMAT;
    }
    if p.message_expiry_interval.is_some() {
        present |= P_EXPIRY;
    }
    if p.response_topic.is_some() {
        present |= P_RESPONSE;
    }
    if p.correlation_data.is_some() {
        present |= P_CORRELATION;
    }
    if p.content_type.is_some() {
        present |= P_CONTENT_TYPE;
    }
    out.put_u8(present);
    if let Some(v) = p.payload_format_indicator {
        out.put_u8(v);
    }
    if let Some(v) = p.message_expiry_interval {
        out.put_u32(v);
    }
    if let Some(v) = &p.response_topic {
        put_str(out, v);
    }
    if let Some(v) = &p.correlation_data {
        put_bytes(out, v);
    }
    if let Some(v) = &p.content_type {
        put_str(out, v);
    }
    out.put_u16(p.user_properties.len() as u16);
    for (k, v) in &p.user_properties {
        put_str(out, k);
        put_str(out, v);
    }
    put_bytes(out, &m.payload);
}

/// Reads a message written by [`encode_message`] (any known version).
pub fn decode_message(buf: &mut Bytes) -> Result<Message> {
    match get_u8(buf)? {
        FORMAT_V1 => decode_message_v1(buf),
        v => Err(CodecError::UnknownVersion(v)),
    }
}

fn decode_message_v1(buf: &mut Bytes) -> Result<Message> {
    let flags = get_u8(buf)?;
    let qos = qos_from(flags & 0x03)?;
    let retain = flags & 0x04 != 0;
    let received_ms = get_u64(buf)?;
    let publisher: Arc<str> = Arc::from(get_string(buf)?);
    let topic = get_bytes(buf)?;
    if std::str::from_utf8(&topic).is_err() {
        return Err(CodecError::Invalid("topic utf-8"));
    }
    let present = get_u8(buf)?;
    let mut p = MessageProperties::default();
    if present & P_FORMAT != 0 {
        p.payload_format_indicator = Some(get_u8(buf)?);
    }
    if present & P_EXPIRY != 0 {
        p.message_expiry_interval = Some(get_u32(buf)?);
    }
    if present & P_RESPONSE != 0 {
        p.response_topic = Some(get_string(buf)?);
    }
    if present & P_CORRELATION != 0 {
        p.correlation_data = Some(get_bytes(buf)?);
    }
    if present & P_CONTENT_TYPE != 0 {
        p.content_type = Some(get_string(buf)?);
    }
    let n = get_u16(buf)?;
    for _ in 0..n {
        let k = get_string(buf)?;
        let v = get_string(buf)?;
        p.user_properties.push((k, v));
    }
    let payload = get_bytes(buf)?;
    Ok(Message {
        topic,
        payload,
        qos,
        retain,
        properties: p,
        received_at: ms_to_instant(received_ms),
        publisher,
    })
}

/// A queued delivery: version, effective qos | retain flag, expiry deadline, subscription ids,
/// then the message.
pub fn encode_delivery(
    qos: QoS,
    retain: bool,
    expires_at_ms: u64,
    subscription_ids: &[usize],
    message: &Message,
) -> Vec<u8> {
    let mut out = BytesMut::with_capacity(48 + message.payload.len() + message.topic.len());
    out.put_u8(FORMAT_V1);
    out.put_u8(qos as u8 | if retain { 0x04 } else { 0 });
    out.put_u64(expires_at_ms);
    out.put_u16(subscription_ids.len() as u16);
    for id in subscription_ids {
        out.put_u32(*id as u32);
    }
    encode_message(message, &mut out);
    out.to_vec()
}

/// The expiry deadline of an encoded delivery without decoding it (0: none, or unreadable).
/// The sweepers of both backends read it for every queued entry they look at.
pub fn delivery_expires_at(record: &[u8]) -> u64 {
    // version(1) flags(1) expires(8): see `encode_delivery`.
    record.get(2..10).map_or(0, |mut b| b.get_u64())
}

/// A decoded queued delivery.
#[derive(Debug)]
pub struct StoredDelivery {
    pub qos: QoS,
    pub retain: bool,
    pub expires_at_ms: u64,
    pub subscription_ids: Vec<usize>,
    pub message: Message,
}

pub fn decode_delivery(mut buf: Bytes) -> Result<StoredDelivery> {
    match get_u8(&mut buf)? {
        FORMAT_V1 => {
            let flags = get_u8(&mut buf)?;
            let qos = qos_from(flags & 0x03)?;
            let retain = flags & 0x04 != 0;
            let expires_at_ms = get_u64(&mut buf)?;
            let n = get_u16(&mut buf)?;
            let mut subscription_ids = Vec::with_capacity(usize::from(n));
            for _ in 0..n {
                subscription_ids.push(get_u32(&mut buf)? as usize);
            }
            let message = decode_message(&mut buf)?;
            Ok(StoredDelivery {
                qos,
                retain,
                expires_at_ms,
                subscription_ids,
                message,
            })
        }
        v => Err(CodecError::UnknownVersion(v)),
    }
}

/// Subscription options: version, qos | no_local | retain_as_published | retain handling,
/// optional identifier.
pub fn encode_options(o: &SubscriptionOptions) -> Vec<u8> {
    let mut out = BytesMut::with_capacity(8);
    out.put_u8(FORMAT_V1);
    let handling = match o.retain_handling {
        RetainForwardRule::OnEverySubscribe => 0u8,
        RetainForwardRule::OnNewSubscribe => 1,
        RetainForwardRule::Never => 2,
    };
    out.put_u8(
        o.qos as u8
            | if o.no_local { 0x04 } else { 0 }
            | if o.retain_as_published { 0x08 } else { 0 }
            | handling << 4,
    );
    match o.identifier {
        Some(id) => {
            out.put_u8(1);
            out.put_u32(id as u32);
        }
        None => out.put_u8(0),
    }
    out.to_vec()
}

pub fn decode_options(mut buf: Bytes) -> Result<SubscriptionOptions> {
    match get_u8(&mut buf)? {
        FORMAT_V1 => {
            let flags = get_u8(&mut buf)?;
            let retain_handling = match (flags >> 4) & 0x03 {
                0 => RetainForwardRule::OnEverySubscribe,
                1 => RetainForwardRule::OnNewSubscribe,
                2 => RetainForwardRule::Never,
                _ => return Err(CodecError::Invalid("retain handling")),
            };
            let identifier = match get_u8(&mut buf)? {
                0 => None,
                _ => Some(get_u32(&mut buf)? as usize),
            };
            Ok(SubscriptionOptions {
                qos: qos_from(flags & 0x03)?,
                no_local: flags & 0x04 != 0,
                retain_as_published: flags & 0x08 != 0,
                retain_handling,
                identifier,
            })
        }
        v => Err(CodecError::UnknownVersion(v)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Message {
        Message {
            topic: Bytes::from_static(b"a/b"),
            payload: Bytes::from_static(b"payload"),
            qos: QoS::ExactlyOnce,
            retain: true,
            properties: MessageProperties {
                payload_format_indicator: Some(1),
                message_expiry_interval: Some(60),
                response_topic: Some("r".into()),
                correlation_data: Some(Bytes::from_static(b"c")),
                user_properties: vec![("k".into(), "v".into())],
                content_type: Some("text/plain".into()),
            },
            received_at: Instant::now(),
            publisher: Arc::from("pub"),
        }
    }

    #[test]
    fn delivery_round_trip() {
        let m = sample();
        let bytes = encode_delivery(QoS::AtLeastOnce, true, 42, &[7, 9], &m);
        let d = decode_delivery(Bytes::from(bytes)).unwrap();
        assert_eq!(
            (d.qos, d.retain, d.expires_at_ms),
            (QoS::AtLeastOnce, true, 42)
        );
        assert_eq!(d.subscription_ids, vec![7, 9]);
        assert_eq!(d.message.topic, m.topic);
        assert_eq!(d.message.payload, m.payload);
        assert_eq!(d.message.qos, QoS::ExactlyOnce);
        assert!(d.message.retain);
        assert_eq!(
            d.message.properties.user_properties,
            m.properties.user_properties
        );
        assert_eq!(d.message.properties.content_type, m.properties.content_type);
        assert_eq!(&*d.message.publisher, "pub");
    }

    /// A v1 record written byte by byte, as a broker of this version stores it: later versions
    /// must keep decoding it.
    #[test]
    fn v1_record_still_decodes() {
        let mut r = vec![1u8, 0x01, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0];
        r.extend_from_slice(&[1, 0x01]); // message v1, qos 1, no retain
        r.extend_from_slice(&1_000u64.to_be_bytes());
        r.extend_from_slice(&[0, 0, 0, 1, b'p', 0, 0, 0, 1, b't', 0, 0, 0]);
        r.extend_from_slice(&[0, 0, 0, 2, b'h', b'i']);
        let d = decode_delivery(Bytes::from(r)).unwrap();
        assert_eq!(d.expires_at_ms, 5);
        assert_eq!(&d.message.topic[..], b"t");
        assert_eq!(&d.message.payload[..], b"hi");
        assert_eq!(d.message.qos, QoS::AtLeastOnce);
    }

    #[test]
    fn bad_records_are_errors_not_panics() {
        assert_eq!(
            decode_delivery(Bytes::from_static(&[9])).unwrap_err(),
            CodecError::UnknownVersion(9)
        );
        let m = sample();
        let full = encode_delivery(QoS::AtLeastOnce, false, 0, &[], &m);
        for cut in 0..full.len() {
            assert!(decode_delivery(Bytes::copy_from_slice(&full[..cut])).is_err());
        }
    }

    #[test]
    fn options_round_trip() {
        let o = SubscriptionOptions {
            qos: QoS::AtLeastOnce,
            no_local: true,
            retain_as_published: true,
            retain_handling: RetainForwardRule::Never,
            identifier: Some(77),
        };
        assert_eq!(decode_options(Bytes::from(encode_options(&o))).unwrap(), o);
    }
}
