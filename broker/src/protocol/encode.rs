//! Server→client encoding for the connection's version.
//!
//! v5 packets go through rumqttc's v5 writers (with two guards for its panics/omissions);
//! for 3.1/3.1.1 they are converted to rumqttc's v4 types, except PUBLISH, which we write
//! ourselves: rumqttc's v4 `Publish` owns its topic as a `String`, which would cost an
//! allocation and a copy per delivered message.

use bytes::{BufMut, BytesMut};
use rumqttc::mqttbytes::v4;

use super::validate::MAX_VARINT;
use super::{
    Auth, ConnAck, ConnectReturnCode, DisconnectReasonCode, EncodeError, Packet, ProtocolVersion,
    PubAckReason, PubRecReason, Publish, QoS, SubscribeReasonCode,
};

type Result<T> = std::result::Result<T, EncodeError>;

/// Encodes a server→client packet for `version`, appending to `out`. Returns bytes written.
///
/// For v3 the packet is converted: properties are dropped, AUTH cannot be sent, DISCONNECT
/// writes nothing (`Ok(0)`: v3 servers never send it), PUBACK/PUBREC/PUBREL/PUBCOMP carry no
/// reason — a PUBACK/PUBREC with a failure reason (≥ 0x80) is refused rather than silently
/// turned into a success (v3 has no way to say "not stored"; the caller must disconnect),
/// SUBACK codes become 0x00/0x01/0x02/0x80 and CONNACK codes the v3 return codes 0..5, with
/// session present always 0 for 3.1 (which has no such bit).
///
/// `max_packet_size` is the client's limit (v5 Maximum Packet Size): a packet that would
/// exceed it is refused with [`EncodeError::TooLarge`]. On any error nothing is written.
pub fn encode(
    packet: &Packet,
    version: ProtocolVersion,
    max_packet_size: Option<u32>,
    out: &mut BytesMut,
) -> Result<usize> {
    let start = out.len();
    let result = if version.is_v5() {
        encode_v5(packet, max_packet_size, out)
    } else {
        encode_v3(packet, version, max_packet_size, out)
    };
    match result {
        Ok(n) => {
            debug_assert_eq!(out.len() - start, n, "size mismatch encoding {packet:?}");
            Ok(n)
        }
        Err(e) => {
            out.truncate(start);
            Err(e)
        }
    }
}

/// The reason code byte of an AUTH packet. rumqttc 0.25.1 does not export the type of
/// `Auth::code` (`AuthReasonCode` lives in a private module), so callers cannot name its
/// variants; this reads it back from the encoding: 0x00 success, 0x18 continue, 0x19
/// re-authenticate.
pub fn auth_reason_code(auth: &Auth) -> u8 {
    let mut b = BytesMut::with_capacity(auth.size());
    if auth.write(&mut b).is_err() {
        return 0;
    }
    // Fixed header byte, remaining length (a Variable Byte Integer), then the reason code.
    let mut i = 1;
    while i < b.len() && b[i] & 0x80 != 0 {
        i += 1;
    }
    b.get(i + 1).copied().unwrap_or(0)
}

fn check_size(size: usize, max: Option<u32>) -> Result<()> {
    match max {
        Some(max) if size > max as usize => Err(EncodeError::TooLarge { size, max }),
        _ => Ok(()),
    }
}

fn not_representable(
    packet: &'static str,
    version: ProtocolVersion,
    why: &'static str,
) -> EncodeError {
    EncodeError::NotRepresentable {
        packet,
        version,
        why,
    }
}

fn codec(e: impl std::fmt::Display) -> EncodeError {
    EncodeError::Invalid(e.to_string())
}

fn check_publish(p: &Publish) -> Result<()> {
    if p.qos != QoS::AtMostOnce && p.pkid == 0 {
        // [MQTT-2.2.1-3]; rumqttc would fail after writing half the packet.
        return Err(EncodeError::Invalid(
            "PUBLISH with QoS > 0 needs a non-zero packet identifier".into(),
        ));
    }
    if p.topic.len() > u16::MAX as usize {
        return Err(EncodeError::Invalid("topic longer than 65535 bytes".into()));
    }
    Ok(())
}

fn encode_v5(packet: &Packet, max: Option<u32>, out: &mut BytesMut) -> Result<usize> {
    let connack;
    let packet = match packet {
        Packet::ConnAck(c) => match v5_connack(c) {
            Some(fixed) => {
                connack = Packet::ConnAck(fixed);
                &connack
            }
            None => packet,
        },
        Packet::Publish(p) => {
            check_publish(p)?;
            packet
        }
        Packet::Disconnect(d)
            if d.properties.is_none()
                && d.reason_code != DisconnectReasonCode::NormalDisconnection =>
        {
            // rumqttc 0.25.1 writes remaining length 1 but then a reason code *and* a
            // property length (4 bytes for a 3-byte packet). 3.14.2.2.1 lets the property
            // length be omitted when there are no properties, so write that form.
            check_size(3, max)?;
            out.put_slice(&[0xE0, 1, d.reason_code as u8]);
            return Ok(3);
        }
        Packet::Auth(a) => return v5_auth(a, max, out),
        Packet::PubAck(_)
        | Packet::PubRec(_)
        | Packet::PubRel(_)
        | Packet::PubComp(_)
        | Packet::SubAck(_)
        | Packet::UnsubAck(_)
        | Packet::PingResp(_)
        | Packet::Disconnect(_) => packet,
        Packet::Connect(..)
        | Packet::Subscribe(_)
        | Packet::Unsubscribe(_)
        | Packet::PingReq(_) => {
            return Err(not_representable(
                packet_name(packet),
                ProtocolVersion::V5,
                "not a server-to-client packet",
            ))
        }
    };
    check_size(packet.size(), max)?;
    packet.write(out, None).map_err(codec)
}

/// rumqttc's v5 CONNACK writer hits `unreachable!()` on the three v3-only return codes, and
/// does not clear session present on a refusal ([MQTT-3.2.2-6]). Returns a fixed copy when
/// needed.
fn v5_connack(c: &ConnAck) -> Option<ConnAck> {
    let code = match c.code {
        ConnectReturnCode::RefusedProtocolVersion => ConnectReturnCode::UnsupportedProtocolVersion,
        ConnectReturnCode::BadClientId => ConnectReturnCode::ClientIdentifierNotValid,
        ConnectReturnCode::ServiceUnavailable => ConnectReturnCode::ServerUnavailable,
        code => code,
    };
    let session_present = c.session_present && code == ConnectReturnCode::Success;
    if code == c.code && session_present == c.session_present {
        return None;
    }
    Some(ConnAck {
        session_present,
        code,
        properties: c.properties.clone(),
    })
}

fn encode_v3(
    packet: &Packet,
    version: ProtocolVersion,
    max: Option<u32>,
    out: &mut BytesMut,
) -> Result<usize> {
    let v4 = match packet {
        Packet::Publish(p) => return v3_publish(p, version, max, out),
        // v3 servers never send DISCONNECT: the connection is just closed.
        Packet::Disconnect(_) => return Ok(0),
        Packet::ConnAck(c) => {
            let code = v3_connack_code(c.code);
            v4::Packet::ConnAck(v4::ConnAck::new(
                code,
                // 3.1 has no session present bit; 3.1.1 [MQTT-3.2.2-4] clears it on refusal.
                c.session_present
                    && version == ProtocolVersion::V3_1_1
                    && code == v4::ConnectReturnCode::Success,
            ))
        }
        Packet::PubAck(a) => {
            if !matches!(
                a.reason,
                PubAckReason::Success | PubAckReason::NoMatchingSubscribers
            ) {
                return Err(not_representable(
                    "PUBACK",
                    version,
                    "failure reason code; v3 must disconnect instead",
                ));
            }
            v4::Packet::PubAck(v4::PubAck::new(a.pkid))
        }
        Packet::PubRec(a) => {
            if !matches!(
                a.reason,
                PubRecReason::Success | PubRecReason::NoMatchingSubscribers
            ) {
                return Err(not_representable(
                    "PUBREC",
                    version,
                    "failure reason code; v3 must disconnect instead",
                ));
            }
            v4::Packet::PubRec(v4::PubRec::new(a.pkid))
        }
        // PacketIdentifierNotFound has no v3 form; v3 completes the flow regardless.
        Packet::PubRel(a) => v4::Packet::PubRel(v4::PubRel::new(a.pkid)),
        Packet::PubComp(a) => v4::Packet::PubComp(v4::PubComp::new(a.pkid)),
        Packet::SubAck(s) => v4::Packet::SubAck(v4::SubAck::new(
            s.pkid,
            s.return_codes
                .iter()
                .map(|c| match c {
                    SubscribeReasonCode::Success(q) => v4::SubscribeReasonCode::Success(v4_qos(*q)),
                    // Every v5 failure is 0x80 in v3.
                    _ => v4::SubscribeReasonCode::Failure,
                })
                .collect(),
        )),
        Packet::UnsubAck(u) => v4::Packet::UnsubAck(v4::UnsubAck::new(u.pkid)),
        Packet::PingResp(_) => v4::Packet::PingResp,
        Packet::Auth(_) => {
            return Err(not_representable(
                "AUTH",
                version,
                "AUTH does not exist before MQTT 5",
            ))
        }
        Packet::Connect(..)
        | Packet::Subscribe(_)
        | Packet::Unsubscribe(_)
        | Packet::PingReq(_) => {
            return Err(not_representable(
                packet_name(packet),
                version,
                "not a server-to-client packet",
            ))
        }
    };
    check_size(v4.size(), max)?;
    v4.write(out, usize::MAX).map_err(codec)
}

/// 3.1.1 PUBLISH (3.3): fixed header, topic, packet id for QoS > 0, payload.
fn v3_publish(
    p: &Publish,
    version: ProtocolVersion,
    max: Option<u32>,
    out: &mut BytesMut,
) -> Result<usize> {
    check_publish(p)?;
    if p.topic.is_empty() {
        // Only v5 knows topic aliases; the session must have resolved the topic.
        return Err(not_representable(
            "PUBLISH",
            version,
            "empty topic (unresolved topic alias)",
        ));
    }
    let pkid_len = if p.qos == QoS::AtMostOnce { 0 } else { 2 };
    let remaining = 2 + p.topic.len() + pkid_len + p.payload.len();
    if remaining > MAX_VARINT as usize {
        return Err(EncodeError::Invalid(format!(
            "PUBLISH remaining length {remaining} exceeds {MAX_VARINT}"
        )));
    }
    let size = 1 + varint_len(remaining) + remaining;
    check_size(size, max)?;
    out.reserve(size);
    out.put_u8(0x30 | (u8::from(p.dup) << 3) | ((p.qos as u8) << 1) | u8::from(p.retain));
    put_varint(out, remaining);
    out.put_u16(p.topic.len() as u16);
    out.extend_from_slice(&p.topic);
    if pkid_len > 0 {
        out.put_u16(p.pkid);
    }
    out.extend_from_slice(&p.payload);
    Ok(size)
}

/// AUTH (3.15). rumqttc 0.25.1 miscomputes the length of AUTH properties (it forgets the
/// string length prefixes), so any AUTH with properties would be written with a wrong
/// remaining length; we write it ourselves.
fn v5_auth(a: &Auth, max: Option<u32>, out: &mut BytesMut) -> Result<usize> {
    let code = auth_reason_code(a);
    let mut props = BytesMut::new();
    if let Some(p) = &a.properties {
        if let Some(m) = &p.method {
            props.put_u8(0x15);
            put_str_raw(&mut props, m.as_bytes())?;
        }
        if let Some(d) = &p.data {
            props.put_u8(0x16);
            put_str_raw(&mut props, d)?;
        }
        if let Some(r) = &p.reason {
            props.put_u8(0x1F);
            put_str_raw(&mut props, r.as_bytes())?;
        }
        for (k, v) in &p.user_properties {
            props.put_u8(0x26);
            put_str_raw(&mut props, k.as_bytes())?;
            put_str_raw(&mut props, v.as_bytes())?;
        }
    }
    let remaining = 1 + varint_len(props.len()) + props.len();
    if remaining > MAX_VARINT as usize {
        return Err(EncodeError::Invalid("AUTH too long".into()));
    }
    let size = 1 + varint_len(remaining) + remaining;
    check_size(size, max)?;
    out.reserve(size);
    out.put_u8(0xF0);
    put_varint(out, remaining);
    out.put_u8(code);
    put_varint(out, props.len());
    out.put_slice(&props);
    Ok(size)
}

fn put_str_raw(out: &mut BytesMut, s: &[u8]) -> Result<()> {
    if s.len() > u16::MAX as usize {
        return Err(EncodeError::Invalid("string longer than 65535".into()));
    }
    out.put_u16(s.len() as u16);
    out.put_slice(s);
    Ok(())
}

fn varint_len(n: usize) -> usize {
    match n {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

fn put_varint(out: &mut BytesMut, mut n: usize) {
    loop {
        let mut byte = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            byte |= 0x80;
        }
        out.put_u8(byte);
        if n == 0 {
            break;
        }
    }
}

/// v5 CONNACK reason → v3 return code (3.2.2.3 of 3.1.1 has only 0..5).
fn v3_connack_code(code: ConnectReturnCode) -> v4::ConnectReturnCode {
    use v4::ConnectReturnCode as V3;
    use ConnectReturnCode::*;
    match code {
        Success => V3::Success,
        RefusedProtocolVersion | UnsupportedProtocolVersion => V3::RefusedProtocolVersion,
        BadClientId | ClientIdentifierNotValid => V3::BadClientId,
        BadUserNamePassword => V3::BadUserNamePassword,
        NotAuthorized | Banned | BadAuthenticationMethod => V3::NotAuthorized,
        // Everything else is "the server cannot serve you now" in v3's vocabulary.
        ServiceUnavailable
        | ServerUnavailable
        | ServerBusy
        | UnspecifiedError
        | MalformedPacket
        | ProtocolError
        | ImplementationSpecificError
        | TopicNameInvalid
        | PacketTooLarge
        | QuotaExceeded
        | PayloadFormatInvalid
        | RetainNotSupported
        | QoSNotSupported
        | UseAnotherServer
        | ServerMoved
        | ConnectionRateExceeded => V3::ServiceUnavailable,
    }
}

fn v4_qos(q: QoS) -> rumqttc::mqttbytes::QoS {
    match q {
        QoS::AtMostOnce => rumqttc::mqttbytes::QoS::AtMostOnce,
        QoS::AtLeastOnce => rumqttc::mqttbytes::QoS::AtLeastOnce,
        QoS::ExactlyOnce => rumqttc::mqttbytes::QoS::ExactlyOnce,
    }
}

fn packet_name(p: &Packet) -> &'static str {
    match p {
        Packet::Auth(_) => "AUTH",
        Packet::Connect(..) => "CONNECT",
        Packet::ConnAck(_) => "CONNACK",
        Packet::Publish(_) => "PUBLISH",
        Packet::PubAck(_) => "PUBACK",
        Packet::PingReq(_) => "PINGREQ",
        Packet::PingResp(_) => "PINGRESP",
        Packet::Subscribe(_) => "SUBSCRIBE",
        Packet::SubAck(_) => "SUBACK",
        Packet::PubRec(_) => "PUBREC",
        Packet::PubRel(_) => "PUBREL",
        Packet::PubComp(_) => "PUBCOMP",
        Packet::Unsubscribe(_) => "UNSUBSCRIBE",
        Packet::UnsubAck(_) => "UNSUBACK",
        Packet::Disconnect(_) => "DISCONNECT",
    }
}
