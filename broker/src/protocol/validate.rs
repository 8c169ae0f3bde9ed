//! Raw-bytes rules a server must enforce and rumqttc's client-side readers do not.
//!
//! Every check here walks the frame without allocating (errors aside, which end the
//! connection). Once a frame passes, rumqttc's readers can build the structs and cannot read
//! outside what we checked. Rule numbers are from MQTT 5.0 unless marked 3.1.1.

use super::ProtocolError;

type Result<T> = std::result::Result<T, ProtocolError>;

/// Largest value of a Variable Byte Integer (four bytes).
pub(crate) const MAX_VARINT: u32 = 268_435_455;

/// A bounds-checked cursor over a frame. Running out of bytes is a malformed packet: the
/// frame is complete by the time we read it, so a field crossing its end is a lie in a length.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    pub(crate) fn pos(&self) -> usize {
        self.pos
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }

    pub(crate) fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(ProtocolError::Malformed(format!(
                "{what}: needs {n} bytes, {} left in packet",
                self.remaining()
            )));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    pub(crate) fn u8(&mut self, what: &'static str) -> Result<u8> {
        Ok(self.take(1, what)?[0])
    }

    pub(crate) fn u16(&mut self, what: &'static str) -> Result<u16> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    pub(crate) fn u32(&mut self, what: &'static str) -> Result<u32> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// Binary Data: two-byte length, then that many bytes (1.5.6).
    pub(crate) fn binary(&mut self, what: &'static str) -> Result<&'a [u8]> {
        let len = self.u16(what)? as usize;
        self.take(len, what)
    }

    /// UTF-8 Encoded String (1.5.4).
    pub(crate) fn utf8(&mut self, what: &'static str) -> Result<&'a str> {
        let b = self.binary(what)?;
        check_utf8(b, what)
    }

    /// Variable Byte Integer (1.5.5).
    pub(crate) fn varint(&mut self, what: &'static str) -> Result<u32> {
        match varint(&self.buf[self.pos..], what)? {
            Some((len, value)) => {
                self.pos += len;
                Ok(value)
            }
            None => Err(ProtocolError::Malformed(format!("{what}: truncated"))),
        }
    }
}

/// Decodes a Variable Byte Integer from the front of `b`: `Ok(None)` when `b` ends inside it,
/// else (bytes used, value).
pub(crate) fn varint(b: &[u8], what: &'static str) -> Result<Option<(usize, u32)>> {
    let mut value: u32 = 0;
    for (i, &byte) in b.iter().enumerate().take(4) {
        value |= u32::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            // [MQTT-1.5.5-1] the minimum number of bytes MUST be used: a zero final byte
            // after a continuation byte is an over-long encoding.
            if i > 0 && byte == 0 {
                return Err(ProtocolError::Malformed(format!(
                    "{what}: over-long variable byte integer"
                )));
            }
            return Ok(Some((i + 1, value)));
        }
    }
    if b.len() >= 4 {
        // The fourth byte still had its continuation bit set (1.5.5: at most four bytes).
        return Err(ProtocolError::Malformed(format!(
            "{what}: variable byte integer longer than 4 bytes"
        )));
    }
    Ok(None)
}

/// Fixed header at the front of `buf`: `Ok(None)` until it is complete, then
/// (first byte, fixed header length, remaining length).
pub(crate) fn fixed_header(buf: &[u8]) -> Result<Option<(u8, usize, usize)>> {
    let Some(&byte1) = buf.first() else {
        return Ok(None);
    };
    match varint(&buf[1..], "remaining length")? {
        Some((len_len, remaining)) => Ok(Some((byte1, 1 + len_len, remaining as usize))),
        None => Ok(None),
    }
}

/// Fixed-header flags ([MQTT-2.1.3-1]; 3.1.1 [MQTT-2.2.2-1], [MQTT-2.2.2-2]): PUBREL,
/// SUBSCRIBE and UNSUBSCRIBE carry 0b0010, PUBLISH its own flags, everything else 0.
pub(crate) fn check_flags(byte1: u8) -> Result<()> {
    let flags = byte1 & 0x0F;
    let expected = match byte1 >> 4 {
        3 => return Ok(()),
        6 | 8 | 10 => 0b0010,
        _ => 0,
    };
    if flags != expected {
        return Err(ProtocolError::Malformed(format!(
            "packet type {} with fixed-header flags {flags:#06b}",
            byte1 >> 4
        )));
    }
    Ok(())
}

/// Valid UTF-8 without U+0000 ([MQTT-1.5.4-1], [MQTT-1.5.4-2]). UTF-8 never uses byte 0
/// inside a multi-byte sequence, so a byte scan finds U+0000. Surrogates (U+D800..U+DFFF)
/// are already rejected by `from_utf8`.
pub(crate) fn check_utf8<'a>(b: &'a [u8], what: &'static str) -> Result<&'a str> {
    if b.contains(&0) {
        return Err(ProtocolError::Malformed(format!("U+0000 in {what}")));
    }
    std::str::from_utf8(b).map_err(|_| ProtocolError::Malformed(format!("invalid UTF-8 in {what}")))
}

/// A Topic Name: a UTF-8 string without wildcards ([MQTT-3.3.2-2], [MQTT-4.7.0-1]).
/// Emptiness is checked by callers because its treatment depends on the packet and version.
pub(crate) fn check_topic_name<'a>(b: &'a [u8], what: &'static str) -> Result<&'a str> {
    let s = check_utf8(b, what)?;
    if b.iter().any(|&c| c == b'+' || c == b'#') {
        return Err(ProtocolError::TopicNameInvalid(format!(
            "{what} {s:?} contains a wildcard"
        )));
    }
    Ok(s)
}

/// Which packet a v5 property block belongs to (the allowed identifiers differ, 2.2.2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PropCtx {
    Connect,
    Will,
    Publish,
    /// PUBACK, PUBREC, PUBREL, PUBCOMP.
    Ack,
    Subscribe,
    Unsubscribe,
    Disconnect,
    Auth,
}

// Property identifiers (2.2.2.2).
pub(crate) const PAYLOAD_FORMAT_INDICATOR: u8 = 0x01;
pub(crate) const MESSAGE_EXPIRY_INTERVAL: u8 = 0x02;
pub(crate) const CONTENT_TYPE: u8 = 0x03;
pub(crate) const RESPONSE_TOPIC: u8 = 0x08;
pub(crate) const CORRELATION_DATA: u8 = 0x09;
pub(crate) const SUBSCRIPTION_IDENTIFIER: u8 = 0x0B;
pub(crate) const SESSION_EXPIRY_INTERVAL: u8 = 0x11;
pub(crate) const AUTHENTICATION_METHOD: u8 = 0x15;
pub(crate) const AUTHENTICATION_DATA: u8 = 0x16;
pub(crate) const REQUEST_PROBLEM_INFORMATION: u8 = 0x17;
pub(crate) const WILL_DELAY_INTERVAL: u8 = 0x18;
pub(crate) const REQUEST_RESPONSE_INFORMATION: u8 = 0x19;
pub(crate) const SERVER_REFERENCE: u8 = 0x1C;
pub(crate) const REASON_STRING: u8 = 0x1F;
pub(crate) const RECEIVE_MAXIMUM: u8 = 0x21;
pub(crate) const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
pub(crate) const TOPIC_ALIAS: u8 = 0x23;
pub(crate) const USER_PROPERTY: u8 = 0x26;
pub(crate) const MAXIMUM_PACKET_SIZE: u8 = 0x27;

/// Is property `id` valid in a client-sent packet of this kind?
fn allowed(ctx: PropCtx, id: u8) -> bool {
    use PropCtx::*;
    match id {
        USER_PROPERTY => true,
        PAYLOAD_FORMAT_INDICATOR
        | MESSAGE_EXPIRY_INTERVAL
        | CONTENT_TYPE
        | RESPONSE_TOPIC
        | CORRELATION_DATA => matches!(ctx, Will | Publish),
        // Allowed in PUBLISH by the spec but never from a client; checked as a protocol
        // error below ([MQTT-3.3.4-6]).
        SUBSCRIPTION_IDENTIFIER => matches!(ctx, Publish | Subscribe),
        SESSION_EXPIRY_INTERVAL => matches!(ctx, Connect | Disconnect),
        AUTHENTICATION_METHOD | AUTHENTICATION_DATA => matches!(ctx, Connect | Auth),
        REQUEST_PROBLEM_INFORMATION
        | REQUEST_RESPONSE_INFORMATION
        | RECEIVE_MAXIMUM
        | TOPIC_ALIAS_MAXIMUM
        | MAXIMUM_PACKET_SIZE => ctx == Connect,
        WILL_DELAY_INTERVAL => ctx == Will,
        SERVER_REFERENCE => ctx == Disconnect,
        REASON_STRING => matches!(ctx, Ack | Disconnect | Auth),
        TOPIC_ALIAS => ctx == Publish,
        _ => false,
    }
}

/// What later checks need from a property block.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct PropSummary {
    pub(crate) topic_alias: Option<u16>,
    /// Bit `id` set when property `id` was present.
    pub(crate) seen: u64,
}

impl PropSummary {
    pub(crate) fn has(&self, id: u8) -> bool {
        self.seen & (1u64 << id) != 0
    }
}

/// Walks a v5 property block (length + properties) and checks identifiers, duplicates,
/// value ranges and strings. Leaves `r` just past the block.
pub(crate) fn properties(r: &mut Reader<'_>, ctx: PropCtx) -> Result<PropSummary> {
    let len = r.varint("property length")? as usize;
    let block = r.take(len, "properties")?;
    let mut p = Reader::new(block);
    let mut summary = PropSummary::default();
    while !p.is_empty() {
        // Identifiers are Variable Byte Integers, but all defined ones are below 0x80: any
        // byte we do not know (continuation bit included) is an invalid identifier.
        let id = p.u8("property identifier")?;
        if !allowed(ctx, id) {
            return Err(ProtocolError::Malformed(format!(
                "property {id:#04x} is not valid in {ctx:?}"
            )));
        }
        let bit = 1u64 << id;
        // 2.2.2.2: only User Property (and Subscription Identifier in PUBLISH, which a
        // client may not send anyway) may appear more than once; for the others "It is a
        // Protocol Error to include ... more than once".
        if id != USER_PROPERTY && summary.seen & bit != 0 {
            return Err(ProtocolError::ProtocolViolation(format!(
                "property {id:#04x} included more than once in {ctx:?}"
            )));
        }
        summary.seen |= bit;
        match id {
            PAYLOAD_FORMAT_INDICATOR
            | REQUEST_PROBLEM_INFORMATION
            | REQUEST_RESPONSE_INFORMATION => {
                let v = p.u8("property value")?;
                if v > 1 {
                    return Err(ProtocolError::ProtocolViolation(format!(
                        "property {id:#04x} has value {v}, must be 0 or 1"
                    )));
                }
            }
            MESSAGE_EXPIRY_INTERVAL | SESSION_EXPIRY_INTERVAL | WILL_DELAY_INTERVAL => {
                p.u32("property value")?;
            }
            MAXIMUM_PACKET_SIZE => {
                if p.u32("maximum packet size")? == 0 {
                    // 3.1.2.11.4: "It is a Protocol Error to include ... the value 0".
                    return Err(ProtocolError::violation("maximum packet size 0"));
                }
            }
            RECEIVE_MAXIMUM => {
                if p.u16("receive maximum")? == 0 {
                    // 3.1.2.11.3: "It is a Protocol Error to include the value 0".
                    return Err(ProtocolError::violation("receive maximum 0"));
                }
            }
            TOPIC_ALIAS_MAXIMUM => {
                p.u16("topic alias maximum")?;
            }
            TOPIC_ALIAS => {
                // 0 and values above our Topic Alias Maximum ([MQTT-3.3.2-8], [MQTT-3.3.2-9])
                // are rejected by the session with DISCONNECT 0x94 (Topic Alias invalid).
                summary.topic_alias = Some(p.u16("topic alias")?);
            }
            CONTENT_TYPE | AUTHENTICATION_METHOD | REASON_STRING | SERVER_REFERENCE => {
                p.utf8("property string")?;
            }
            RESPONSE_TOPIC => {
                let t = p.binary("response topic")?;
                // [MQTT-3.3.2-14] / [MQTT-3.1.3-11]: a Topic Name, so no wildcards.
                if check_topic_name(t, "response topic").is_err() || t.is_empty() {
                    check_utf8(t, "response topic")?;
                    return Err(ProtocolError::violation(
                        "response topic is not a topic name",
                    ));
                }
            }
            CORRELATION_DATA | AUTHENTICATION_DATA => {
                p.binary("property data")?;
            }
            USER_PROPERTY => {
                p.utf8("user property name")?;
                p.utf8("user property value")?;
            }
            SUBSCRIPTION_IDENTIFIER => {
                let v = p.varint("subscription identifier")?;
                if ctx == PropCtx::Publish {
                    // [MQTT-3.3.4-6] a PUBLISH from a client MUST NOT contain one.
                    return Err(ProtocolError::violation(
                        "subscription identifier in PUBLISH from a client",
                    ));
                }
                if v == 0 {
                    // 3.8.2.1.2: "It is a Protocol Error if the Subscription Identifier has
                    // a value of 0".
                    return Err(ProtocolError::violation("subscription identifier 0"));
                }
            }
            // `allowed` accepted only the identifiers handled above.
            _ => {
                return Err(ProtocolError::Malformed(format!(
                    "property {id:#04x} is not valid in {ctx:?}"
                )))
            }
        }
    }
    // 3.1.2.11.10 / 3.15.2.2.3: "It is a Protocol Error to include Authentication Data if
    // there is no Authentication Method".
    if summary.has(AUTHENTICATION_DATA) && !summary.has(AUTHENTICATION_METHOD) {
        return Err(ProtocolError::violation(
            "authentication data without authentication method",
        ));
    }
    Ok(summary)
}

fn expect_end(r: &Reader<'_>, what: &'static str) -> Result<()> {
    if !r.is_empty() {
        return Err(ProtocolError::Malformed(format!(
            "{} unexpected bytes at the end of {what}",
            r.remaining()
        )));
    }
    Ok(())
}

/// Where the fields of a PUBLISH sit in its body (offsets from the end of the fixed header).
#[derive(Debug, Clone, Copy)]
pub(crate) struct PublishLayout {
    pub(crate) qos: u8,
    pub(crate) topic_start: usize,
    pub(crate) topic_end: usize,
    pub(crate) pkid: u16,
    pub(crate) payload_start: usize,
}

/// PUBLISH (3.3). `body` is the frame after the fixed header.
pub(crate) fn publish(byte1: u8, body: &[u8], v5: bool) -> Result<PublishLayout> {
    let qos = (byte1 >> 1) & 0b11;
    if qos == 3 {
        // [MQTT-3.3.1-4] both QoS bits set is malformed.
        return Err(ProtocolError::malformed("PUBLISH with QoS 3"));
    }
    if qos == 0 && byte1 & 0b1000 != 0 {
        // [MQTT-3.3.1-2] DUP MUST be 0 for QoS 0.
        return Err(ProtocolError::malformed("PUBLISH with DUP set and QoS 0"));
    }
    let mut r = Reader::new(body);
    let topic = r.binary("topic name")?;
    let topic_end = r.pos();
    let topic_start = topic_end - topic.len();
    check_topic_name(topic, "topic name")?;
    let pkid = if qos > 0 {
        let id = r.u16("packet identifier")?;
        if id == 0 {
            // [MQTT-2.2.1-3] a QoS>0 PUBLISH MUST carry a non-zero Packet Identifier.
            return Err(ProtocolError::malformed("PUBLISH with packet identifier 0"));
        }
        id
    } else {
        0
    };
    if v5 {
        let props = properties(&mut r, PropCtx::Publish)?;
        if topic.is_empty() && props.topic_alias.is_none() {
            // 3.3.2.1: "It is a Protocol Error if the Topic Name is zero length and there is
            // no Topic Alias". With an alias the session resolves it.
            return Err(ProtocolError::violation(
                "PUBLISH with empty topic and no topic alias",
            ));
        }
    } else if topic.is_empty() {
        // 3.1.1 [MQTT-4.7.3-1] topic names are at least one character long.
        return Err(ProtocolError::malformed("PUBLISH with empty topic"));
    }
    Ok(PublishLayout {
        qos,
        topic_start,
        topic_end,
        pkid,
        payload_start: r.pos(),
    })
}

/// Which acknowledgement (the valid reason codes differ).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(clippy::enum_variant_names)] // named after the packets
pub(crate) enum AckKind {
    PubAck,
    PubRec,
    PubRel,
    PubComp,
}

/// PUBACK, PUBREC, PUBREL, PUBCOMP (3.4-3.7). Returns the packet identifier.
pub(crate) fn ack(kind: AckKind, body: &[u8], v5: bool) -> Result<u16> {
    let mut r = Reader::new(body);
    let pkid = r.u16("packet identifier")?;
    if v5 && !r.is_empty() {
        // 3.4.2.1: the reason code may be omitted (remaining length 2), and the property
        // length too (remaining length < 4).
        let reason = r.u8("reason code")?;
        let valid = match kind {
            AckKind::PubAck | AckKind::PubRec => matches!(
                reason,
                0x00 | 0x10 | 0x80 | 0x83 | 0x87 | 0x90 | 0x91 | 0x97 | 0x99
            ),
            AckKind::PubRel | AckKind::PubComp => matches!(reason, 0x00 | 0x92),
        };
        if !valid {
            return Err(ProtocolError::Malformed(format!(
                "{kind:?} with invalid reason code {reason:#04x}"
            )));
        }
        if !r.is_empty() {
            properties(&mut r, PropCtx::Ack)?;
        }
    }
    // 3.1.1: remaining length is exactly 2; v5: nothing after the properties.
    expect_end(&r, "acknowledgement")?;
    Ok(pkid)
}

fn nonzero_pkid(r: &mut Reader<'_>, what: &'static str) -> Result<u16> {
    let pkid = r.u16("packet identifier")?;
    if pkid == 0 {
        // [MQTT-2.2.1-3] (3.1.1 [MQTT-2.3.1-1]) SUBSCRIBE and UNSUBSCRIBE carry a non-zero
        // packet identifier.
        return Err(ProtocolError::Malformed(format!(
            "{what} with packet identifier 0"
        )));
    }
    Ok(pkid)
}

/// SUBSCRIBE (3.8).
pub(crate) fn subscribe(body: &[u8], v5: bool) -> Result<()> {
    let mut r = Reader::new(body);
    nonzero_pkid(&mut r, "SUBSCRIBE")?;
    if v5 {
        properties(&mut r, PropCtx::Subscribe)?;
    }
    if r.is_empty() {
        // [MQTT-3.8.3-2] (3.1.1 [MQTT-3.8.3-3]) at least one topic filter.
        return Err(ProtocolError::violation("SUBSCRIBE without topic filters"));
    }
    while !r.is_empty() {
        let filter = r.utf8("topic filter")?;
        let options = r.u8("subscription options")?;
        if options & 0b11 == 3 {
            // 3.1.1 [MQTT-3-8.3-4]: requested QoS 3 is malformed. 5.0 (3.8.3.1) calls the same
            // thing "a Protocol Error".
            return Err(if v5 {
                ProtocolError::violation("SUBSCRIBE with maximum QoS 3")
            } else {
                ProtocolError::malformed("SUBSCRIBE with requested QoS 3")
            });
        }
        if v5 {
            if options & 0b1100_0000 != 0 {
                // [MQTT-3.8.3-5] reserved bits MUST be 0.
                return Err(ProtocolError::malformed(
                    "SUBSCRIBE options with reserved bits set",
                ));
            }
            if (options >> 4) & 0b11 == 3 {
                // 3.8.3.1: "It is a Protocol Error to send a Retain Handling value of 3".
                return Err(ProtocolError::violation("SUBSCRIBE with retain handling 3"));
            }
            if options & 0b100 != 0 && filter.starts_with("$share/") {
                // [MQTT-3.8.3-4] No Local on a shared subscription is a protocol error.
                return Err(ProtocolError::violation(
                    "No Local set on a shared subscription",
                ));
            }
        } else if options & 0b1111_1100 != 0 {
            // 3.1.1 [MQTT-3-8.3-4] the upper 6 bits MUST be 0.
            return Err(ProtocolError::malformed(
                "SUBSCRIBE options with reserved bits set",
            ));
        }
    }
    Ok(())
}

/// UNSUBSCRIBE (3.10).
pub(crate) fn unsubscribe(body: &[u8], v5: bool) -> Result<()> {
    let mut r = Reader::new(body);
    nonzero_pkid(&mut r, "UNSUBSCRIBE")?;
    if v5 {
        properties(&mut r, PropCtx::Unsubscribe)?;
    }
    if r.is_empty() {
        // [MQTT-3.10.3-2] at least one topic filter.
        return Err(ProtocolError::violation(
            "UNSUBSCRIBE without topic filters",
        ));
    }
    while !r.is_empty() {
        r.utf8("topic filter")?;
    }
    Ok(())
}

/// PINGREQ (3.12): no variable header, no payload.
pub(crate) fn pingreq(body: &[u8]) -> Result<()> {
    expect_end(&Reader::new(body), "PINGREQ")
}

/// DISCONNECT (3.14). Returns the reason code byte (0 when omitted).
pub(crate) fn disconnect(body: &[u8], v5: bool) -> Result<u8> {
    let mut r = Reader::new(body);
    if !v5 {
        return expect_end(&r, "DISCONNECT").map(|()| 0);
    }
    if r.is_empty() {
        // 3.14.2.1: remaining length 0 means Normal disconnection.
        return Ok(0);
    }
    let reason = r.u8("reason code")?;
    if super::DisconnectReasonCode::try_from(reason).is_err() {
        return Err(ProtocolError::Malformed(format!(
            "DISCONNECT with invalid reason code {reason:#04x}"
        )));
    }
    if !r.is_empty() {
        // 3.14.2.2.1: the property length is omitted when the remaining length is below 2.
        properties(&mut r, PropCtx::Disconnect)?;
    }
    expect_end(&r, "DISCONNECT")?;
    Ok(reason)
}

/// AUTH (3.15), v5 only. Returns the reason code byte (0 when omitted).
pub(crate) fn auth(body: &[u8]) -> Result<u8> {
    let mut r = Reader::new(body);
    if r.is_empty() {
        // 3.15.2.1: remaining length 0 means Success with no properties.
        return Ok(0);
    }
    let reason = r.u8("reason code")?;
    if !matches!(reason, 0x00 | 0x18 | 0x19) {
        return Err(ProtocolError::Malformed(format!(
            "AUTH with invalid reason code {reason:#04x}"
        )));
    }
    if !r.is_empty() {
        properties(&mut r, PropCtx::Auth)?;
    }
    expect_end(&r, "AUTH")?;
    Ok(reason)
}
