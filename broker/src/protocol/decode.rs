//! The per-connection decoder: framing, state (CONNECT first, once) and validation, then
//! rumqttc's readers for the structs.

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::mqttbytes::FixedHeader as V4FixedHeader;
use rumqttc::v5::mqttbytes::v5::FixedHeader;

use super::validate::{self, AckKind};
use super::{
    connect, Auth, Disconnect, DisconnectReasonCode, Filter, Incoming, ProtocolError,
    ProtocolVersion, PubAck, PubComp, PubRec, PubRel, Publish, QoS, RetainForwardRule, Subscribe,
    Unsubscribe,
};

type Result<T> = std::result::Result<T, ProtocolError>;

// Control packet types (2.1.2).
const CONNECT: u8 = 1;
const CONNACK: u8 = 2;
const PUBLISH: u8 = 3;
const PUBACK: u8 = 4;
const PUBREC: u8 = 5;
const PUBREL: u8 = 6;
const PUBCOMP: u8 = 7;
const SUBSCRIBE: u8 = 8;
const SUBACK: u8 = 9;
const UNSUBSCRIBE: u8 = 10;
const UNSUBACK: u8 = 11;
const PINGREQ: u8 = 12;
const PINGRESP: u8 = 13;
const DISCONNECT: u8 = 14;
const AUTH: u8 = 15;

/// Stateful per-connection decoder: before CONNECT only CONNECT is legal; CONNECT fixes the
/// version for the rest of the connection.
#[derive(Debug, Clone)]
pub struct Decoder {
    version: Option<ProtocolVersion>,
    max_packet_size: u32,
}

impl Decoder {
    /// `max_packet_size` bounds the whole packet, fixed header included (the v5 meaning of
    /// Maximum Packet Size, 3.1.2.11.4); it applies from the first byte, CONNECT included.
    pub fn new(max_packet_size: u32) -> Self {
        Decoder {
            version: None,
            max_packet_size,
        }
    }

    /// A decoder for a connection whose CONNECT was already read (e.g. by another decoder).
    pub fn with_version(max_packet_size: u32, version: ProtocolVersion) -> Self {
        Decoder {
            version: Some(version),
            max_packet_size,
        }
    }

    /// The version fixed by CONNECT, `None` before it.
    pub fn version(&self) -> Option<ProtocolVersion> {
        self.version
    }

    pub fn max_packet_size(&self) -> u32 {
        self.max_packet_size
    }

    /// Decodes ONE complete packet from the front of `buf` (consuming its bytes) or returns
    /// `Ok(None)`, leaving `buf` untouched, when more bytes are needed.
    ///
    /// The size limit and the packet type are checked as soon as the fixed header is in, so
    /// an oversized or illegal packet fails before its body is buffered. Nothing is allocated
    /// from a length field. After an error the connection must be closed; the buffer is then
    /// in an unspecified state.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Incoming>> {
        let Some((byte1, header_len, remaining)) = validate::fixed_header(buf)? else {
            return Ok(None);
        };
        let total = header_len + remaining;
        if total > self.max_packet_size as usize {
            return Err(ProtocolError::PacketTooLarge {
                size: total,
                max: self.max_packet_size,
            });
        }
        let ptype = byte1 >> 4;
        self.check_type(ptype)?;
        validate::check_flags(byte1)?;
        if buf.len() < total {
            return Ok(None);
        }

        let frame = buf.split_to(total).freeze();
        let Some(version) = self.version else {
            // check_type let only CONNECT through.
            let packet = connect::parse(&frame.slice(header_len..))?;
            self.version = Some(packet.version);
            return Ok(Some(Incoming::Connect(Box::new(packet))));
        };
        let body = &frame[header_len..];
        let v5 = version.is_v5();
        // rumqttc's readers take the whole frame and skip the fixed header themselves.
        let header = FixedHeader::new(byte1, header_len - 1, remaining);

        let incoming = match ptype {
            PUBLISH => {
                let layout = validate::publish(byte1, body, v5)?;
                if v5 {
                    Incoming::Publish(Publish::read(header, frame).map_err(codec)?)
                } else {
                    // rumqttc's v4 Publish holds the topic as a String (an allocation and a
                    // copy per message); the v5 struct holds Bytes, so slice the frame.
                    Incoming::Publish(v3_publish(byte1, header_len, &layout, &frame))
                }
            }
            PUBACK => {
                let pkid = validate::ack(AckKind::PubAck, body, v5)?;
                Incoming::PubAck(if v5 {
                    PubAck::read(header, frame).map_err(codec)?
                } else {
                    PubAck::new(pkid, None)
                })
            }
            PUBREC => {
                let pkid = validate::ack(AckKind::PubRec, body, v5)?;
                Incoming::PubRec(if v5 {
                    PubRec::read(header, frame).map_err(codec)?
                } else {
                    PubRec::new(pkid, None)
                })
            }
            PUBREL => {
                let pkid = validate::ack(AckKind::PubRel, body, v5)?;
                Incoming::PubRel(if v5 {
                    PubRel::read(header, frame).map_err(codec)?
                } else {
                    PubRel::new(pkid, None)
                })
            }
            PUBCOMP => {
                let pkid = validate::ack(AckKind::PubComp, body, v5)?;
                Incoming::PubComp(if v5 {
                    PubComp::read(header, frame).map_err(codec)?
                } else {
                    PubComp::new(pkid, None)
                })
            }
            SUBSCRIBE => {
                validate::subscribe(body, v5)?;
                Incoming::Subscribe(if v5 {
                    Subscribe::read(header, frame).map_err(codec)?
                } else {
                    v3_subscribe(v4_header(byte1, header_len, remaining), frame)?
                })
            }
            UNSUBSCRIBE => {
                validate::unsubscribe(body, v5)?;
                Incoming::Unsubscribe(if v5 {
                    Unsubscribe::read(header, frame).map_err(codec)?
                } else {
                    let u = v4::Unsubscribe::read(v4_header(byte1, header_len, remaining), frame)
                        .map_err(codec)?;
                    Unsubscribe {
                        pkid: u.pkid,
                        filters: u.topics,
                        properties: None,
                    }
                })
            }
            PINGREQ => {
                validate::pingreq(body)?;
                Incoming::PingReq
            }
            DISCONNECT => {
                let reason = validate::disconnect(body, v5)?;
                Incoming::Disconnect(if remaining >= 2 {
                    Disconnect::read(header, frame).map_err(codec)?
                } else {
                    // rumqttc reads a property length even when the remaining length is 1,
                    // where 3.14.2.2.1 says it is omitted; build that case ourselves.
                    Disconnect::new(DisconnectReasonCode::try_from(reason).map_err(codec)?)
                })
            }
            AUTH => {
                // check_type rejected AUTH from v3 clients.
                let reason = validate::auth(body)?;
                Incoming::Auth(read_auth(reason, body)?)
            }
            // check_type rejected every other type.
            other => {
                return Err(ProtocolError::Malformed(format!(
                    "unexpected packet type {other}"
                )))
            }
        };
        Ok(Some(incoming))
    }

    /// Which packet types this connection may send now.
    fn check_type(&self, ptype: u8) -> Result<()> {
        let Some(version) = self.version else {
            // [MQTT-3.1.0-1] the first packet from the client MUST be CONNECT.
            return if ptype == CONNECT {
                Ok(())
            } else {
                Err(ProtocolError::FirstPacketNotConnect)
            };
        };
        match ptype {
            // [MQTT-3.1.0-2] a second CONNECT is a protocol error.
            CONNECT => Err(ProtocolError::violation("second CONNECT")),
            // Server-to-client packets.
            CONNACK | SUBACK | UNSUBACK | PINGRESP => Err(ProtocolError::ProtocolViolation(
                format!("client sent server-only packet type {ptype}"),
            )),
            // Type 15 is reserved in 3.1.1 (2.2.1, "Forbidden").
            AUTH if !version.is_v5() => Err(ProtocolError::malformed("AUTH from a v3 client")),
            // Type 0 is reserved in every version.
            0 => Err(ProtocolError::malformed("reserved packet type 0")),
            _ => Ok(()),
        }
    }
}

/// Any error from rumqttc's readers after our validation passed: malformed.
fn codec(e: impl std::fmt::Display) -> ProtocolError {
    ProtocolError::Malformed(e.to_string())
}

fn v4_header(byte1: u8, header_len: usize, remaining: usize) -> V4FixedHeader {
    V4FixedHeader::new(byte1, header_len - 1, remaining)
}

fn v3_publish(
    byte1: u8,
    header_len: usize,
    layout: &validate::PublishLayout,
    frame: &Bytes,
) -> Publish {
    Publish {
        dup: byte1 & 0b1000 != 0,
        qos: qos(layout.qos),
        retain: byte1 & 0b0001 != 0,
        topic: frame.slice(header_len + layout.topic_start..header_len + layout.topic_end),
        pkid: layout.pkid,
        payload: frame.slice(header_len + layout.payload_start..),
        properties: None,
    }
}

fn v3_subscribe(header: V4FixedHeader, frame: Bytes) -> Result<Subscribe> {
    let s = v4::Subscribe::read(header, frame).map_err(codec)?;
    Ok(Subscribe {
        pkid: s.pkid,
        filters: s
            .filters
            .into_iter()
            .map(|f| Filter {
                path: f.path,
                qos: qos(f.qos as u8),
                // v3 subscriptions have the v5 defaults for the options v3 lacks.
                nolocal: false,
                preserve_retain: false,
                retain_forward_rule: RetainForwardRule::OnEverySubscribe,
            })
            .collect(),
        properties: None,
    })
}

/// A QoS the validator already accepted (0..=2).
fn qos(q: u8) -> QoS {
    match q {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

/// AUTH (3.15). rumqttc 0.25.1 cannot read it: its reader requires the reason byte that
/// 3.15.2.1 lets a client omit, and its property reader forgets the two length bytes of the
/// method and reason strings, so it reads past the block. We take the reason code from
/// rumqttc (its type is not exported, so we cannot name it) and fill the properties ourselves.
fn read_auth(reason: u8, body: &[u8]) -> Result<Auth> {
    let mut auth = Auth::read(
        FixedHeader::new(0xF0, 1, 2),
        Bytes::copy_from_slice(&[0xF0, 2, reason, 0]),
    )
    .map_err(codec)?;
    let mut r = validate::Reader::new(body);
    if r.remaining() < 2 {
        return Ok(auth);
    }
    r.u8("reason code")?;
    let len = r.varint("property length")? as usize;
    if len == 0 {
        return Ok(auth);
    }
    let mut p = validate::Reader::new(r.take(len, "properties")?);
    let props = auth.properties.get_or_insert_with(Default::default);
    while !p.is_empty() {
        match p.u8("property identifier")? {
            validate::AUTHENTICATION_METHOD => {
                props.method = Some(p.utf8("authentication method")?.to_owned())
            }
            validate::AUTHENTICATION_DATA => {
                props.data = Some(Bytes::copy_from_slice(p.binary("authentication data")?))
            }
            validate::REASON_STRING => props.reason = Some(p.utf8("reason string")?.to_owned()),
            validate::USER_PROPERTY => {
                let k = p.utf8("user property name")?.to_owned();
                let v = p.utf8("user property value")?.to_owned();
                props.user_properties.push((k, v));
            }
            id => {
                return Err(ProtocolError::Malformed(format!(
                    "property {id:#04x} is not valid in AUTH"
                )))
            }
        }
    }
    Ok(auth)
}
