//! CONNECT, parsed by us for all three versions (3.1).
//!
//! rumqttc's `Connect::read` rejects MQTT 3.1 (`MQIsdp`, level 3), reads the password as a
//! `String` and does not check the flag rules a server must. We parse the layout here and
//! reuse rumqttc only for the v5 property blocks, after `validate::properties` has checked them.

use bytes::Bytes;

use super::validate::{self, check_topic_name, PropCtx, Reader};
use super::{
    ConnectPacket, ConnectProperties, LastWillProperties, ProtocolError, ProtocolVersion, QoS, Will,
};

type Result<T> = std::result::Result<T, ProtocolError>;

// Connect flags (3.1.2.3).
const RESERVED: u8 = 0b0000_0001;
const CLEAN_START: u8 = 0b0000_0010;
const WILL_FLAG: u8 = 0b0000_0100;
const WILL_QOS: u8 = 0b0001_1000;
const WILL_RETAIN: u8 = 0b0010_0000;
const PASSWORD: u8 = 0b0100_0000;
const USERNAME: u8 = 0b1000_0000;

/// Parses a CONNECT body (the frame after its fixed header; `body` is a slice of the frame, so
/// will payload and password are zero-copy).
pub(crate) fn parse(body: &Bytes) -> Result<ConnectPacket> {
    let mut r = Reader::new(body);

    // 3.1.2.1 / 3.1.2.2: protocol name and level decide the version, before anything else:
    // another version's CONNECT may be laid out differently.
    let name = r.binary("protocol name")?;
    let level = r.u8("protocol level")?;
    let version = match (name, level) {
        (b"MQIsdp", 3) => ProtocolVersion::V3_1,
        (b"MQTT", 4) => ProtocolVersion::V3_1_1,
        (b"MQTT", 5) => ProtocolVersion::V5,
        _ => {
            return Err(ProtocolError::UnsupportedProtocolVersion {
                name: String::from_utf8_lossy(name).into_owned(),
                level,
            })
        }
    };
    let v5 = version.is_v5();

    let flags = r.u8("connect flags")?;
    if flags & RESERVED != 0 {
        // [MQTT-3.1.2-3] the reserved flag MUST be 0, else malformed.
        return Err(ProtocolError::malformed("CONNECT reserved flag set"));
    }
    let will_qos = (flags & WILL_QOS) >> 3;
    if flags & WILL_FLAG == 0 {
        // [MQTT-3.1.2-11] / [MQTT-3.1.2-13] (3.1.1 [MQTT-3.1.2-13], [MQTT-3.1.2-15]): without
        // a will, Will QoS and Will Retain MUST be 0.
        if will_qos != 0 || flags & WILL_RETAIN != 0 {
            return Err(ProtocolError::malformed(
                "CONNECT will QoS/retain set without will flag",
            ));
        }
    } else if will_qos == 3 {
        // [MQTT-3.1.2-12] (3.1.1 [MQTT-3.1.2-14]) Will QoS MUST NOT be 3.
        return Err(ProtocolError::malformed("CONNECT will QoS 3"));
    }
    if !v5 && flags & PASSWORD != 0 && flags & USERNAME == 0 {
        // 3.1.1 [MQTT-3.1.2-22]: no password without a user name. v5 allows it (3.1.2.9).
        return Err(ProtocolError::malformed(
            "CONNECT password flag without user name flag",
        ));
    }
    let keep_alive = r.u16("keep alive")?;

    let properties = if v5 {
        let start = r.pos();
        validate::properties(&mut r, PropCtx::Connect)?;
        read_props(body, start, r.pos(), ConnectProperties::read)?.unwrap_or_default()
    } else {
        ConnectProperties::new()
    };

    // 3.1.3.1: the client identifier is a UTF-8 string. 3.1 limited it to 23 bytes; that
    // limit is advisory here, as in 3.1.1 ([MQTT-3.1.3-5] servers MAY accept longer ones).
    let client_id = r.utf8("client identifier")?;
    let clean_start = flags & CLEAN_START != 0;
    if client_id.is_empty() {
        match version {
            // 3.1 requires 1..23 characters.
            ProtocolVersion::V3_1 => return Err(ProtocolError::ClientIdentifierNotValid),
            // [MQTT-3.1.3-8] empty id with CleanSession 0: CONNACK 0x02, then close.
            ProtocolVersion::V3_1_1 if !clean_start => {
                return Err(ProtocolError::ClientIdentifierNotValid)
            }
            // v5 and clean 3.1.1: the server assigns one ([MQTT-3.1.3-6], [MQTT-3.1.3-7]).
            _ => {}
        }
    }
    let client_id = client_id.to_owned();

    let will = if flags & WILL_FLAG != 0 {
        let will_properties = if v5 {
            let start = r.pos();
            validate::properties(&mut r, PropCtx::Will)?;
            read_props(body, start, r.pos(), LastWillProperties::read)?
        } else {
            None
        };
        let topic = r.binary("will topic")?;
        let topic = check_topic_name(topic, "will topic")?;
        if topic.is_empty() {
            // [MQTT-4.7.3-1] topic names are at least one character long.
            return Err(ProtocolError::TopicNameInvalid("empty will topic".into()));
        }
        let topic = topic.to_owned();
        let payload = r.binary("will payload")?;
        let payload_end = r.pos();
        Some(Will {
            topic,
            payload: body.slice(payload_end - payload.len()..payload_end),
            qos: match will_qos {
                0 => QoS::AtMostOnce,
                1 => QoS::AtLeastOnce,
                _ => QoS::ExactlyOnce,
            },
            retain: flags & WILL_RETAIN != 0,
            properties: will_properties,
        })
    } else {
        None
    };

    let username = if flags & USERNAME != 0 {
        // [MQTT-3.1.3-11] a UTF-8 string.
        Some(r.utf8("user name")?.to_owned())
    } else {
        None
    };
    let password = if flags & PASSWORD != 0 {
        // 3.1.3.6: Binary Data.
        let pw = r.binary("password")?;
        let end = r.pos();
        Some(body.slice(end - pw.len()..end))
    } else {
        None
    };

    if !r.is_empty() {
        // The payload must hold exactly the fields the flags announce.
        return Err(ProtocolError::Malformed(format!(
            "{} unexpected bytes at the end of CONNECT",
            r.remaining()
        )));
    }

    Ok(ConnectPacket {
        version,
        client_id,
        clean_start,
        keep_alive,
        properties,
        will,
        username,
        password,
    })
}

/// Runs one of rumqttc's property readers over a block `validate::properties` accepted.
fn read_props<T, E: std::fmt::Display>(
    body: &Bytes,
    start: usize,
    end: usize,
    read: fn(&mut Bytes) -> std::result::Result<Option<T>, E>,
) -> Result<Option<T>> {
    let mut block = body.slice(start..end);
    read(&mut block).map_err(|e| ProtocolError::Malformed(format!("properties: {e}")))
}
