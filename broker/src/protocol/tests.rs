//! Raw-bytes tests: hand-built frames in, exact error variants / reason codes / bytes out.

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5 as rv5;

use super::*;

// ---------------------------------------------------------------- helpers

/// Builds a frame: first byte, remaining length, body.
fn frame(byte1: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![byte1];
    let mut n = body.len();
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        v.push(b);
        if n == 0 {
            break;
        }
    }
    v.extend_from_slice(body);
    v
}

/// A two-byte length-prefixed string/binary.
fn s(x: &[u8]) -> Vec<u8> {
    let mut v = (x.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(x);
    v
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

fn connect_frame(name: &[u8], level: u8, flags: u8, rest: &[u8]) -> Vec<u8> {
    frame(0x10, &cat(&[&s(name), &[level, flags, 0, 60], rest]))
}

const V3_1_1_CONNECT: &[u8] = &[
    0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 1, b'a',
];

fn decode_one(d: &mut Decoder, bytes: &[u8]) -> Result<Option<Incoming>, ProtocolError> {
    let mut buf = BytesMut::from(bytes);
    d.decode(&mut buf)
}

fn connected(version: ProtocolVersion) -> Decoder {
    Decoder::with_version(1 << 20, version)
}

fn decode_v(version: ProtocolVersion, bytes: &[u8]) -> Result<Option<Incoming>, ProtocolError> {
    decode_one(&mut connected(version), bytes)
}

fn err_v(version: ProtocolVersion, bytes: &[u8]) -> ProtocolError {
    match decode_v(version, bytes) {
        Err(e) => e,
        Ok(p) => panic!("expected an error, got {p:?}"),
    }
}

fn ok_v(version: ProtocolVersion, bytes: &[u8]) -> Incoming {
    match decode_v(version, bytes) {
        Ok(Some(p)) => p,
        other => panic!("expected a packet, got {other:?}"),
    }
}

fn connect_ok(bytes: &[u8]) -> ConnectPacket {
    match decode_one(&mut Decoder::new(1 << 20), bytes) {
        Ok(Some(Incoming::Connect(c))) => *c,
        other => panic!("expected CONNECT, got {other:?}"),
    }
}

fn connect_err(bytes: &[u8]) -> ProtocolError {
    match decode_one(&mut Decoder::new(1 << 20), bytes) {
        Err(e) => e,
        other => panic!("expected an error, got {other:?}"),
    }
}

fn assert_malformed(e: &ProtocolError) {
    assert!(matches!(e, ProtocolError::Malformed(_)), "{e:?}");
    assert_eq!(e.disconnect_reason(), DisconnectReasonCode::MalformedPacket);
}

fn assert_violation(e: &ProtocolError) {
    assert!(matches!(e, ProtocolError::ProtocolViolation(_)), "{e:?}");
    assert_eq!(e.disconnect_reason(), DisconnectReasonCode::ProtocolError);
}

fn enc(p: &Packet, v: ProtocolVersion) -> Vec<u8> {
    let mut out = BytesMut::new();
    let n = encode(p, v, None, &mut out).expect("encode");
    assert_eq!(n, out.len());
    out.to_vec()
}

use ProtocolVersion::{V3_1, V3_1_1, V5};

// ---------------------------------------------------------------- CONNECT

#[test]
fn connect_v3_1_mqisdp_level_3_accepted_with_long_client_id() {
    // 3.1 limited client ids to 23 bytes; we treat that as advisory.
    let id = b"a-client-id-longer-than-23-bytes";
    let c = connect_ok(&connect_frame(b"MQIsdp", 3, 0x02, &s(id)));
    assert_eq!(c.version, V3_1);
    assert_eq!(c.client_id.as_bytes(), id);
    assert!(c.clean_start);
    assert_eq!(c.keep_alive, 60);
    assert!(c.will.is_none() && c.username.is_none() && c.password.is_none());
}

#[test]
fn connect_v3_1_1_with_will_username_and_binary_password() {
    // will flag, will QoS 1, will retain, username, password.
    let flags = 0x04 | 0x08 | 0x20 | 0x80 | 0x40;
    let c = connect_ok(&connect_frame(
        b"MQTT",
        4,
        flags,
        &cat(&[
            &s(b"id"),
            &s(b"will/t"),
            &s(b"bye"),
            &s(b"user"),
            &s(&[0xFF, 0x00, 0x80]),
        ]),
    ));
    assert_eq!(c.version, V3_1_1);
    assert!(!c.clean_start);
    let will = c.will.expect("will");
    assert_eq!(will.topic, "will/t");
    assert_eq!(&will.payload[..], b"bye");
    assert_eq!(will.qos, QoS::AtLeastOnce);
    assert!(will.retain && will.properties.is_none());
    assert_eq!(c.username.as_deref(), Some("user"));
    // Password is binary data, not a string.
    assert_eq!(c.password.as_deref(), Some(&[0xFF, 0x00, 0x80][..]));
    assert_eq!(c.properties, ConnectProperties::new());
}

#[test]
fn connect_v5_properties_and_will_properties_parsed() {
    let props = cat(&[
        &[0x11, 0, 0, 0, 30], // session expiry 30
        &[0x21, 0, 10],       // receive maximum 10
        &[0x27, 0, 0, 4, 0],  // maximum packet size 1024
        &[0x26],
        &s(b"k"),
        &s(b"v"), // user property
        &[0x26],
        &s(b"k"),
        &s(b"v2"), // user properties may repeat
    ]);
    let will_props = cat(&[&[0x18, 0, 0, 0, 5], &[0x01, 1]]);
    let body = cat(&[
        &[props.len() as u8],
        &props,
        &s(b"cid"),
        &[will_props.len() as u8],
        &will_props,
        &s(b"w"),
        &s(b"payload"),
        &s(b"pw-only"), // v5 allows a password without a user name (3.1.2.9)
    ]);
    let c = connect_ok(&connect_frame(b"MQTT", 5, 0x04 | 0x40 | 0x02, &body));
    assert_eq!(c.version, V5);
    assert_eq!(c.properties.session_expiry_interval, Some(30));
    assert_eq!(c.properties.receive_maximum, Some(10));
    assert_eq!(c.properties.max_packet_size, Some(1024));
    assert_eq!(c.properties.user_properties.len(), 2);
    let w = c.will.expect("will");
    let wp = w.properties.expect("will properties");
    assert_eq!(wp.delay_interval, Some(5));
    assert_eq!(wp.payload_format_indicator, Some(1));
    assert_eq!(c.username, None);
    assert_eq!(c.password.as_deref(), Some(&b"pw-only"[..]));
}

#[test]
fn connect_unknown_protocol_name_closes_without_connack() {
    let e = connect_err(&connect_frame(b"MQTX", 4, 0x02, &s(b"a")));
    assert!(
        matches!(e, ProtocolError::UnsupportedProtocolVersion { ref name, level: 4 } if name == "MQTX")
    );
    assert_eq!(e.connack_code(), None);
}

#[test]
fn connect_unknown_level_answers_connack_0x84_v5_and_mismatched_name_0x01_v3() {
    let e = connect_err(&connect_frame(b"MQTT", 3, 0x02, &s(b"a")));
    assert!(matches!(
        e,
        ProtocolError::UnsupportedProtocolVersion { level: 3, .. }
    ));
    let code = e.connack_code().expect("CONNACK");
    assert_eq!(e.connack_version(), Some(V3_1_1));
    let ack = Packet::ConnAck(ConnAck {
        session_present: false,
        code,
        properties: None,
    });
    assert_eq!(enc(&ack, V3_1_1), [0x20, 2, 0, 0x01]);

    let e = connect_err(&connect_frame(b"MQTT", 6, 0x02, &s(b"a")));
    assert_eq!(e.connack_version(), Some(V5));
    let ack = Packet::ConnAck(ConnAck {
        session_present: false,
        code: e.connack_code().expect("CONNACK"),
        properties: None,
    });
    assert_eq!(enc(&ack, V5), [0x20, 3, 0, 0x84, 0]);

    let e = connect_err(&connect_frame(b"MQIsdp", 4, 0x02, &s(b"a")));
    assert_eq!(
        e.connack_code(),
        Some(ConnectReturnCode::UnsupportedProtocolVersion)
    );
    assert_eq!(e.connack_version(), Some(V3_1_1));

    // Levels nobody defined (not 3, 4 or 5), below as above: v5 format, 0x84.
    for level in [0, 1, 2, 6, 7, 255] {
        let e = connect_err(&connect_frame(b"MQTT", level, 0x02, &s(b"a")));
        assert_eq!(e.connack_version(), Some(V5), "level {level}");
        assert_eq!(
            e.connack_code(),
            Some(ConnectReturnCode::UnsupportedProtocolVersion)
        );
    }
}

#[test]
fn connect_reserved_flag_is_malformed() {
    assert_malformed(&connect_err(&connect_frame(b"MQTT", 4, 0x03, &s(b"a"))));
}

#[test]
fn connect_will_qos_or_retain_without_will_flag_is_malformed() {
    assert_malformed(&connect_err(&connect_frame(
        b"MQTT",
        4,
        0x02 | 0x08,
        &s(b"a"),
    )));
    assert_malformed(&connect_err(&connect_frame(
        b"MQTT",
        4,
        0x02 | 0x20,
        &s(b"a"),
    )));
}

#[test]
fn connect_will_qos_3_is_malformed() {
    let rest = cat(&[&s(b"a"), &s(b"t"), &s(b"p")]);
    assert_malformed(&connect_err(&connect_frame(
        b"MQTT",
        4,
        0x02 | 0x04 | 0x18,
        &rest,
    )));
}

#[test]
fn connect_v3_password_without_username_is_malformed() {
    let rest = cat(&[&s(b"a"), &s(b"pw")]);
    assert_malformed(&connect_err(&connect_frame(b"MQTT", 4, 0x02 | 0x40, &rest)));
    assert_malformed(&connect_err(&connect_frame(
        b"MQIsdp",
        3,
        0x02 | 0x40,
        &rest,
    )));
}

#[test]
fn connect_trailing_garbage_is_malformed() {
    let rest = cat(&[&s(b"a"), &[0xAB]]);
    assert_malformed(&connect_err(&connect_frame(b"MQTT", 4, 0x02, &rest)));
}

#[test]
fn connect_missing_announced_field_is_malformed() {
    // Username flag set but no username follows.
    assert_malformed(&connect_err(&connect_frame(
        b"MQTT",
        4,
        0x02 | 0x80,
        &s(b"a"),
    )));
}

#[test]
fn connect_nul_or_bad_utf8_in_strings_is_malformed() {
    assert_malformed(&connect_err(&connect_frame(b"MQTT", 4, 0x02, &s(b"a\0b"))));
    assert_malformed(&connect_err(&connect_frame(
        b"MQTT",
        4,
        0x02,
        &s(&[0xC3, 0x28]),
    )));
    let rest = cat(&[&s(b"a"), &s(b"us\0er")]);
    assert_malformed(&connect_err(&connect_frame(b"MQTT", 4, 0x02 | 0x80, &rest)));
    let rest = cat(&[&s(b"a"), &s(b"wi\0ll"), &s(b"p")]);
    assert_malformed(&connect_err(&connect_frame(b"MQTT", 4, 0x02 | 0x04, &rest)));
}

#[test]
fn connect_will_topic_with_wildcard_is_topic_name_invalid() {
    let rest = cat(&[&s(b"a"), &s(b"will/#"), &s(b"p")]);
    let e = connect_err(&connect_frame(b"MQTT", 4, 0x02 | 0x04, &rest));
    assert!(matches!(e, ProtocolError::TopicNameInvalid(_)), "{e:?}");
}

#[test]
fn connect_v5_duplicate_property_is_protocol_error() {
    let props = [0x11, 0, 0, 0, 1, 0x11, 0, 0, 0, 2];
    let body = cat(&[&[props.len() as u8], &props, &s(b"a")]);
    assert_violation(&connect_err(&connect_frame(b"MQTT", 5, 0x02, &body)));
}

#[test]
fn connect_v5_property_not_valid_for_connect_is_malformed() {
    let props = [0x23, 0, 1]; // topic alias belongs to PUBLISH
    let body = cat(&[&[props.len() as u8], &props, &s(b"a")]);
    assert_malformed(&connect_err(&connect_frame(b"MQTT", 5, 0x02, &body)));
}

#[test]
fn connect_v5_receive_maximum_zero_is_protocol_error() {
    let props = [0x21, 0, 0];
    let body = cat(&[&[props.len() as u8], &props, &s(b"a")]);
    assert_violation(&connect_err(&connect_frame(b"MQTT", 5, 0x02, &body)));
}

#[test]
fn connect_v5_nul_in_user_property_is_malformed() {
    let props = cat(&[&[0x26], &s(b"k"), &s(b"v\0")]);
    let body = cat(&[&[props.len() as u8], &props, &s(b"a")]);
    assert_malformed(&connect_err(&connect_frame(b"MQTT", 5, 0x02, &body)));
}

#[test]
fn connect_v5_nul_in_will_property_string_is_malformed() {
    let wprops = cat(&[&[0x03], &s(b"text\0")]); // content type
    let body = cat(&[
        &[0],
        &s(b"a"),
        &[wprops.len() as u8],
        &wprops,
        &s(b"t"),
        &s(b"p"),
    ]);
    assert_malformed(&connect_err(&connect_frame(b"MQTT", 5, 0x02 | 0x04, &body)));
}

#[test]
fn connect_v3_1_1_empty_client_id_needs_clean_session() {
    let e = connect_err(&connect_frame(b"MQTT", 4, 0x00, &s(b"")));
    assert!(matches!(e, ProtocolError::ClientIdentifierNotValid));
    assert_eq!(
        e.connack_code(),
        Some(ConnectReturnCode::ClientIdentifierNotValid)
    );
    let ack = Packet::ConnAck(ConnAck {
        session_present: false,
        code: ConnectReturnCode::ClientIdentifierNotValid,
        properties: None,
    });
    assert_eq!(
        enc(&ack, e.connack_version().expect("version")),
        [0x20, 2, 0, 0x02]
    );
    // With clean session the server assigns one; v5 always allows it.
    assert_eq!(
        connect_ok(&connect_frame(b"MQTT", 4, 0x02, &s(b""))).client_id,
        ""
    );
    assert_eq!(
        connect_ok(&connect_frame(b"MQTT", 5, 0x00, &cat(&[&[0], &s(b"")]))).client_id,
        ""
    );
}

#[test]
fn connect_fixed_header_flags_must_be_zero() {
    let mut f = V3_1_1_CONNECT.to_vec();
    f[0] = 0x11;
    assert_malformed(&connect_err(&f));
}

#[test]
fn first_packet_not_connect_is_an_error() {
    let e = connect_err(&[0xC0, 0]); // PINGREQ
    assert!(matches!(e, ProtocolError::FirstPacketNotConnect));
    assert_eq!(e.connack_code(), None);
    // Detected from the fixed header alone, before the body arrives.
    let e = connect_err(&[0x30, 100, 0]);
    assert!(matches!(e, ProtocolError::FirstPacketNotConnect));
}

#[test]
fn second_connect_is_protocol_error() {
    let mut d = Decoder::new(1 << 20);
    let mut buf = BytesMut::from(&[V3_1_1_CONNECT, V3_1_1_CONNECT].concat()[..]);
    assert!(matches!(d.decode(&mut buf), Ok(Some(Incoming::Connect(_)))));
    assert_eq!(d.version(), Some(V3_1_1));
    assert_violation(&d.decode(&mut buf).unwrap_err());
}

// ---------------------------------------------------------------- framing

#[test]
fn fixed_header_flags_checked_per_type() {
    for v in [V3_1_1, V5] {
        assert_malformed(&err_v(v, &frame(0x80, &cat(&[&[0, 1], &s(b"a"), &[0]])))); // SUBSCRIBE 0
        assert_malformed(&err_v(v, &frame(0xA0, &cat(&[&[0, 1], &s(b"a")])))); // UNSUBSCRIBE 0
        assert_malformed(&err_v(v, &[0x60, 2, 0, 1])); // PUBREL 0
        assert_malformed(&err_v(v, &[0x42, 2, 0, 1])); // PUBACK 2
        assert_malformed(&err_v(v, &[0x52, 2, 0, 1])); // PUBREC 2
        assert_malformed(&err_v(v, &[0x71, 2, 0, 1])); // PUBCOMP 1
        assert_malformed(&err_v(v, &[0xC1, 0])); // PINGREQ 1
        assert_malformed(&err_v(v, &[0xE8, 0])); // DISCONNECT 8
    }
    assert_malformed(&err_v(V5, &[0xF1, 0])); // AUTH 1
    assert!(matches!(ok_v(V3_1_1, &[0x62, 2, 0, 1]), Incoming::PubRel(r) if r.pkid == 1));
}

#[test]
fn server_only_packet_types_are_protocol_errors() {
    for v in [V3_1, V3_1_1, V5] {
        assert_violation(&err_v(v, &[0x20, 2, 0, 0])); // CONNACK
        assert_violation(&err_v(v, &[0x90, 3, 0, 1, 0])); // SUBACK
        assert_violation(&err_v(v, &[0xB0, 2, 0, 1])); // UNSUBACK
        assert_violation(&err_v(v, &[0xD0, 0])); // PINGRESP
        assert_malformed(&err_v(v, &[0x00, 0])); // reserved type 0
    }
}

#[test]
fn auth_from_v3_client_is_malformed() {
    assert_malformed(&err_v(V3_1_1, &[0xF0, 0]));
    assert_malformed(&err_v(V3_1, &[0xF0, 0]));
}

#[test]
fn remaining_length_longer_than_four_bytes_is_malformed() {
    assert_malformed(&err_v(V5, &[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]));
    // Over-long encoding of a small value ([MQTT-1.5.5-1]).
    assert_malformed(&err_v(V5, &[0xC0, 0x80, 0x00]));
}

#[test]
fn packet_larger_than_max_fails_before_the_body_is_buffered() {
    let mut d = Decoder::with_version(100, V5);
    // Only the fixed header is here: 0x30, remaining length 200 (0xC8 0x01).
    let mut buf = BytesMut::from(&[0x30, 0xC8, 0x01][..]);
    let e = d.decode(&mut buf).unwrap_err();
    assert_eq!(
        e,
        ProtocolError::PacketTooLarge {
            size: 203,
            max: 100
        }
    );
    assert_eq!(e.disconnect_reason(), DisconnectReasonCode::PacketTooLarge);
    // The limit counts the whole packet: remaining 98 + 2 header bytes = 100 fits.
    let body = cat(&[&s(b"t"), &[0], &[7u8; 94]]);
    assert_eq!(body.len(), 98);
    assert!(matches!(
        d.decode(&mut BytesMut::from(&frame(0x30, &body)[..])),
        Ok(Some(Incoming::Publish(_)))
    ));
    let body = cat(&[&s(b"t"), &[0], &[7u8; 95]]);
    assert!(matches!(
        d.decode(&mut BytesMut::from(&frame(0x30, &body)[..])),
        Err(ProtocolError::PacketTooLarge {
            size: 101,
            max: 100
        })
    ));
    // Also before CONNECT.
    let mut d = Decoder::new(10);
    assert!(matches!(
        d.decode(&mut BytesMut::from(V3_1_1_CONNECT)),
        Err(ProtocolError::PacketTooLarge { size: 15, max: 10 })
    ));
}

#[test]
fn truncated_packet_returns_none_and_leaves_buffer_intact() {
    let full = frame(0x32, &cat(&[&s(b"a/b"), &[0, 7], &[0], b"hello"]));
    for cut in 0..full.len() {
        let mut d = connected(V5);
        let mut buf = BytesMut::from(&full[..cut]);
        assert!(matches!(d.decode(&mut buf), Ok(None)), "cut at {cut}");
        assert_eq!(&buf[..], &full[..cut]);
    }
}

#[test]
fn bytes_after_a_packet_belong_to_the_next_one() {
    let mut d = Decoder::new(1 << 20);
    let publish = frame(0x30, &cat(&[&s(b"t"), b"x"]));
    let stream = [V3_1_1_CONNECT, &publish, &[0xC0, 0], &[0xE0]].concat();
    let mut buf = BytesMut::from(&stream[..]);
    assert!(matches!(d.decode(&mut buf), Ok(Some(Incoming::Connect(_)))));
    assert!(matches!(d.decode(&mut buf), Ok(Some(Incoming::Publish(p))) if &p.payload[..] == b"x"));
    assert!(matches!(d.decode(&mut buf), Ok(Some(Incoming::PingReq))));
    assert!(matches!(d.decode(&mut buf), Ok(None)));
    assert_eq!(&buf[..], &[0xE0]);
    buf.extend_from_slice(&[0]);
    assert!(matches!(
        d.decode(&mut buf),
        Ok(Some(Incoming::Disconnect(_)))
    ));
    assert!(buf.is_empty());
}

#[test]
fn byte_at_a_time_feeding_decodes_the_same() {
    let publish = frame(0x3B, &cat(&[&s(b"t/1"), &[0, 9], b"payload"]));
    let stream = [V3_1_1_CONNECT, &publish].concat();
    let mut d = Decoder::new(1 << 20);
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    for b in stream {
        buf.extend_from_slice(&[b]);
        while let Some(p) = d.decode(&mut buf).unwrap() {
            got.push(p);
        }
    }
    assert_eq!(got.len(), 2);
    let Incoming::Publish(p) = &got[1] else {
        panic!()
    };
    assert!(p.dup && p.retain && p.qos == QoS::AtLeastOnce && p.pkid == 9);
}

// ---------------------------------------------------------------- PUBLISH

#[test]
fn publish_v3_decodes_to_v5_type_without_copying_payload() {
    let f = frame(0x34, &cat(&[&s(b"a/b"), &[0x12, 0x34], b"data"]));
    let mut buf = BytesMut::from(&f[..]);
    let range = buf.as_ptr() as usize..buf.as_ptr() as usize + buf.len();
    let Ok(Some(Incoming::Publish(p))) = connected(V3_1_1).decode(&mut buf) else {
        panic!()
    };
    assert_eq!(&p.topic[..], b"a/b");
    assert_eq!(p.qos, QoS::ExactlyOnce);
    assert_eq!(p.pkid, 0x1234);
    assert_eq!(&p.payload[..], b"data");
    assert!(p.properties.is_none());
    // Payload and topic are slices of the read buffer.
    assert!(range.contains(&(p.payload.as_ptr() as usize)));
    assert!(range.contains(&(p.topic.as_ptr() as usize)));
}

#[test]
fn publish_v5_with_properties() {
    let props = cat(&[
        &[0x02, 0, 0, 0, 10],
        &[0x23, 0, 3],
        &[0x26],
        &s(b"k"),
        &s(b"v"),
    ]);
    let f = frame(
        0x32,
        &cat(&[&s(b"a"), &[0, 1], &[props.len() as u8], &props, b"x"]),
    );
    let Incoming::Publish(p) = ok_v(V5, &f) else {
        panic!()
    };
    let pp = p.properties.expect("properties");
    assert_eq!(pp.message_expiry_interval, Some(10));
    assert_eq!(pp.topic_alias, Some(3));
    assert_eq!(pp.user_properties, vec![("k".into(), "v".into())]);
    assert_eq!(&p.payload[..], b"x");
}

#[test]
fn publish_qos_3_is_malformed() {
    for v in [V3_1_1, V5] {
        assert_malformed(&err_v(v, &frame(0x36, &cat(&[&s(b"a"), &[0, 1], &[0]]))));
    }
}

#[test]
fn publish_dup_with_qos_0_is_malformed() {
    for v in [V3_1, V3_1_1, V5] {
        assert_malformed(&err_v(v, &frame(0x38, &cat(&[&s(b"a"), &[0]]))));
    }
}

#[test]
fn publish_wildcard_topic_is_topic_name_invalid() {
    for topic in [&b"a/+"[..], b"#", b"a/#/b"] {
        let e = err_v(V5, &frame(0x30, &cat(&[&s(topic), &[0]])));
        assert!(matches!(e, ProtocolError::TopicNameInvalid(_)), "{e:?}");
        assert_eq!(
            e.disconnect_reason(),
            DisconnectReasonCode::TopicNameInvalid
        );
        let e = err_v(V3_1_1, &frame(0x30, &s(topic)));
        assert!(matches!(e, ProtocolError::TopicNameInvalid(_)), "{e:?}");
    }
}

#[test]
fn publish_empty_topic_v3_malformed_v5_needs_topic_alias() {
    assert_malformed(&err_v(V3_1_1, &frame(0x30, &cat(&[&s(b""), b"x"]))));
    assert_violation(&err_v(V5, &frame(0x30, &cat(&[&s(b""), &[0], b"x"]))));
    let Incoming::Publish(p) = ok_v(V5, &frame(0x30, &cat(&[&s(b""), &[3, 0x23, 0, 5], b"x"])))
    else {
        panic!()
    };
    assert!(p.topic.is_empty());
    assert_eq!(p.properties.and_then(|pp| pp.topic_alias), Some(5));
}

#[test]
fn publish_packet_id_zero_with_qos_is_malformed() {
    assert_malformed(&err_v(V3_1_1, &frame(0x32, &cat(&[&s(b"a"), &[0, 0]]))));
    assert_malformed(&err_v(V5, &frame(0x34, &cat(&[&s(b"a"), &[0, 0], &[0]]))));
}

#[test]
fn publish_nul_or_invalid_utf8_in_topic_is_malformed() {
    assert_malformed(&err_v(V3_1_1, &frame(0x30, &s(b"a\0b"))));
    assert_malformed(&err_v(
        V5,
        &frame(0x30, &cat(&[&s(&[0xED, 0xA0, 0x80]), &[0]])),
    )); // surrogate
    assert_malformed(&err_v(V5, &frame(0x30, &cat(&[&s(&[0xFF]), &[0]]))));
}

#[test]
fn publish_topic_length_past_the_packet_is_malformed() {
    assert_malformed(&err_v(V3_1_1, &frame(0x30, &[0, 9, b'a'])));
}

#[test]
fn publish_v5_duplicate_property_is_protocol_error() {
    let props = [0x02, 0, 0, 0, 1, 0x02, 0, 0, 0, 2];
    assert_violation(&err_v(
        V5,
        &frame(0x30, &cat(&[&s(b"a"), &[props.len() as u8], &props])),
    ));
}

#[test]
fn publish_v5_topic_alias_zero_is_left_to_the_session() {
    // The session answers alias 0 with DISCONNECT 0x94, like an alias above its maximum.
    let Incoming::Publish(p) = ok_v(V5, &frame(0x30, &cat(&[&s(b"a"), &[3, 0x23, 0, 0]]))) else {
        panic!()
    };
    assert_eq!(p.properties.and_then(|pp| pp.topic_alias), Some(0));
}

#[test]
fn publish_v5_subscription_identifier_from_client_is_protocol_error() {
    assert_violation(&err_v(V5, &frame(0x30, &cat(&[&s(b"a"), &[2, 0x0B, 1]]))));
}

#[test]
fn publish_v5_property_not_valid_for_publish_is_malformed() {
    // Session Expiry Interval belongs to CONNECT/DISCONNECT; 0x7F is no property at all.
    assert_malformed(&err_v(
        V5,
        &frame(0x30, &cat(&[&s(b"a"), &[5, 0x11, 0, 0, 0, 1]])),
    ));
    assert_malformed(&err_v(V5, &frame(0x30, &cat(&[&s(b"a"), &[2, 0x7F, 0]]))));
}

#[test]
fn publish_v5_nul_in_user_property_is_malformed() {
    let props = cat(&[&[0x26], &s(b"k\0"), &s(b"v")]);
    assert_malformed(&err_v(
        V5,
        &frame(0x30, &cat(&[&s(b"a"), &[props.len() as u8], &props])),
    ));
}

#[test]
fn publish_v5_property_length_past_packet_or_mid_property_is_malformed() {
    assert_malformed(&err_v(V5, &frame(0x30, &cat(&[&s(b"a"), &[9, 0x01, 1]]))));
    // Length 2 cuts the 4-byte message expiry interval short.
    assert_malformed(&err_v(
        V5,
        &frame(0x30, &cat(&[&s(b"a"), &[2, 0x02, 0, 0, 0, 1]])),
    ));
}

#[test]
fn publish_v5_payload_format_indicator_out_of_range_is_protocol_error() {
    assert_violation(&err_v(V5, &frame(0x30, &cat(&[&s(b"a"), &[2, 0x01, 2]]))));
}

// ---------------------------------------------------------------- SUBSCRIBE / UNSUBSCRIBE

#[test]
fn subscribe_v3_decodes_to_v5_filters() {
    let f = frame(0x82, &cat(&[&[0, 5], &s(b"a/+"), &[1], &s(b"b/#"), &[2]]));
    let Incoming::Subscribe(sub) = ok_v(V3_1_1, &f) else {
        panic!()
    };
    assert_eq!(sub.pkid, 5);
    assert_eq!(sub.filters.len(), 2);
    assert_eq!(sub.filters[0].path, "a/+");
    assert_eq!(sub.filters[0].qos, QoS::AtLeastOnce);
    assert_eq!(sub.filters[1].qos, QoS::ExactlyOnce);
    assert!(!sub.filters[0].nolocal);
}

#[test]
fn subscribe_without_filters_is_protocol_error() {
    assert_violation(&err_v(V3_1_1, &frame(0x82, &[0, 1])));
    assert_violation(&err_v(V5, &frame(0x82, &[0, 1, 0])));
}

#[test]
fn subscribe_requested_qos_3() {
    // 3.1.1 [MQTT-3-8.3-4]: malformed. 5.0 3.8.3.1 calls it a protocol error.
    assert_malformed(&err_v(
        V3_1_1,
        &frame(0x82, &cat(&[&[0, 1], &s(b"a"), &[3]])),
    ));
    assert_violation(&err_v(
        V5,
        &frame(0x82, &cat(&[&[0, 1, 0], &s(b"a"), &[3]])),
    ));
}

#[test]
fn subscribe_v5_reserved_option_bits_are_malformed() {
    assert_malformed(&err_v(
        V5,
        &frame(0x82, &cat(&[&[0, 1, 0], &s(b"a"), &[0x40]])),
    ));
    assert_malformed(&err_v(
        V5,
        &frame(0x82, &cat(&[&[0, 1, 0], &s(b"a"), &[0x80]])),
    ));
}

#[test]
fn subscribe_v5_retain_handling_3_is_protocol_error() {
    assert_violation(&err_v(
        V5,
        &frame(0x82, &cat(&[&[0, 1, 0], &s(b"a"), &[0x30]])),
    ));
}

#[test]
fn subscribe_v5_no_local_on_shared_subscription_is_protocol_error() {
    assert_violation(&err_v(
        V5,
        &frame(0x82, &cat(&[&[0, 1, 0], &s(b"$share/g/a"), &[0x04]])),
    ));
}

#[test]
fn subscribe_v3_upper_option_bits_are_malformed() {
    for bits in [0x04, 0x08, 0x10, 0x80] {
        assert_malformed(&err_v(
            V3_1_1,
            &frame(0x82, &cat(&[&[0, 1], &s(b"a"), &[bits]])),
        ));
    }
}

#[test]
fn subscribe_packet_id_zero_is_malformed() {
    assert_malformed(&err_v(
        V3_1_1,
        &frame(0x82, &cat(&[&[0, 0], &s(b"a"), &[0]])),
    ));
    assert_malformed(&err_v(
        V5,
        &frame(0x82, &cat(&[&[0, 0, 0], &s(b"a"), &[0]])),
    ));
}

#[test]
fn subscribe_v5_subscription_identifier_zero_or_twice_is_protocol_error() {
    assert_violation(&err_v(
        V5,
        &frame(0x82, &cat(&[&[0, 1, 2, 0x0B, 0], &s(b"a"), &[0]])),
    ));
    assert_violation(&err_v(
        V5,
        &frame(0x82, &cat(&[&[0, 1, 4, 0x0B, 1, 0x0B, 2], &s(b"a"), &[0]])),
    ));
    let Incoming::Subscribe(sub) = ok_v(
        V5,
        &frame(
            0x82,
            &cat(&[&[0, 1, 3, 0x0B, 0x80, 0x01], &s(b"a"), &[0x2D]]),
        ),
    ) else {
        panic!()
    };
    assert_eq!(sub.properties.and_then(|p| p.id), Some(128));
    let f = &sub.filters[0];
    assert!(f.nolocal && f.preserve_retain && f.retain_forward_rule == RetainForwardRule::Never);
}

#[test]
fn subscribe_nul_in_filter_is_malformed() {
    assert_malformed(&err_v(
        V3_1_1,
        &frame(0x82, &cat(&[&[0, 1], &s(b"a\0"), &[0]])),
    ));
}

#[test]
fn subscribe_filter_without_options_byte_is_malformed() {
    assert_malformed(&err_v(V3_1_1, &frame(0x82, &cat(&[&[0, 1], &s(b"a")]))));
}

#[test]
fn unsubscribe_rules() {
    assert_violation(&err_v(V3_1_1, &frame(0xA2, &[0, 1])));
    assert_violation(&err_v(V5, &frame(0xA2, &[0, 1, 0])));
    assert_malformed(&err_v(V3_1_1, &frame(0xA2, &cat(&[&[0, 0], &s(b"a")]))));
    assert_malformed(&err_v(V5, &frame(0xA2, &cat(&[&[0, 1, 0], &s(b"a\0")]))));
    let Incoming::Unsubscribe(u) =
        ok_v(V3_1_1, &frame(0xA2, &cat(&[&[0, 3], &s(b"a"), &s(b"b/#")])))
    else {
        panic!()
    };
    assert_eq!(
        (u.pkid, u.filters),
        (3, vec!["a".to_string(), "b/#".to_string()])
    );
}

// ---------------------------------------------------------------- acks, ping, disconnect, auth

#[test]
fn acks_v3_must_be_exactly_two_bytes() {
    assert!(matches!(ok_v(V3_1_1, &[0x40, 2, 0, 7]), Incoming::PubAck(a) if a.pkid == 7));
    assert_malformed(&err_v(V3_1_1, &[0x40, 3, 0, 7, 0]));
    assert_malformed(&err_v(V3_1_1, &[0x50, 1, 0]));
    assert_malformed(&err_v(V3_1_1, &[0x70, 3, 0, 7, 0]));
}

#[test]
fn acks_v5_reason_codes_and_properties() {
    let Incoming::PubAck(a) = ok_v(V5, &[0x40, 3, 0, 7, 0x10]) else {
        panic!()
    };
    assert_eq!(a.reason, PubAckReason::NoMatchingSubscribers);
    let f = frame(0x50, &cat(&[&[0, 7, 0x80], &[4, 0x1F], &s(b"x")]));
    let Incoming::PubRec(r) = ok_v(V5, &f) else {
        panic!()
    };
    assert_eq!(r.reason, PubRecReason::UnspecifiedError);
    assert_eq!(
        r.properties.and_then(|p| p.reason_string).as_deref(),
        Some("x")
    );
    let Incoming::PubComp(c) = ok_v(V5, &[0x70, 3, 0, 7, 0x92]) else {
        panic!()
    };
    assert_eq!(c.reason, PubCompReason::PacketIdentifierNotFound);
    // A reason code the packet does not define, and trailing bytes.
    assert_malformed(&err_v(V5, &[0x40, 3, 0, 7, 0x92]));
    assert_malformed(&err_v(V5, &[0x62, 3, 0, 7, 0x10]));
    assert_malformed(&err_v(V5, &[0x40, 5, 0, 7, 0, 0, 9]));
    // Reason string twice.
    let f = frame(
        0x40,
        &cat(&[&[0, 7, 0, 8, 0x1F], &s(b"x"), &[0x1F], &s(b"y")]),
    );
    assert_violation(&err_v(V5, &f));
}

#[test]
fn pingreq_with_body_is_malformed() {
    assert!(matches!(ok_v(V5, &[0xC0, 0]), Incoming::PingReq));
    assert_malformed(&err_v(V3_1_1, &[0xC0, 1, 0]));
}

#[test]
fn disconnect_rules() {
    assert!(matches!(ok_v(V3_1_1, &[0xE0, 0]), Incoming::Disconnect(_)));
    assert_malformed(&err_v(V3_1_1, &[0xE0, 1, 0]));
    // v5 reason code without property length (3.14.2.2.1): rumqttc cannot read this alone.
    let Incoming::Disconnect(d) = ok_v(V5, &[0xE0, 1, 0x04]) else {
        panic!()
    };
    assert_eq!(
        d.reason_code,
        DisconnectReasonCode::DisconnectWithWillMessage
    );
    let Incoming::Disconnect(d) = ok_v(V5, &[0xE0, 7, 0x00, 5, 0x11, 0, 0, 0, 9]) else {
        panic!()
    };
    assert_eq!(
        d.properties.and_then(|p| p.session_expiry_interval),
        Some(9)
    );
    assert_malformed(&err_v(V5, &[0xE0, 1, 0x01])); // not a DISCONNECT reason
    assert_malformed(&err_v(V5, &[0xE0, 4, 0x00, 2, 0x23, 0])); // topic alias not allowed
}

#[test]
fn auth_v5_rules() {
    let Incoming::Auth(a) = ok_v(V5, &[0xF0, 0]) else {
        panic!()
    };
    assert_eq!(auth_reason_code(&a), 0x00);
    let f = frame(0xF0, &cat(&[&[0x18, 6, 0x15], &s(b"SCR")]));
    let Incoming::Auth(a) = ok_v(V5, &f) else {
        panic!()
    };
    assert_eq!(auth_reason_code(&a), 0x18);
    assert_eq!(
        a.properties.as_ref().and_then(|p| p.method.as_deref()),
        Some("SCR")
    );
    // Our AUTH encoder writes it back byte for byte (rumqttc's miscounts property lengths).
    assert_eq!(enc(&Packet::Auth(a), V5), f);
    assert_malformed(&err_v(V5, &[0xF0, 2, 0x01, 0]));
    // Authentication data without a method.
    assert_violation(&err_v(
        V5,
        &frame(0xF0, &cat(&[&[0x18, 4, 0x16], &s(b"x")])),
    ));
}

// ---------------------------------------------------------------- encode

fn v5_publish(qos: QoS, dup: bool, retain: bool, pkid: u16) -> Publish {
    Publish {
        dup,
        qos,
        retain,
        topic: Bytes::from_static(b"a/b"),
        pkid,
        payload: Bytes::from_static(b"hi"),
        properties: Some(PublishProperties {
            message_expiry_interval: Some(5),
            ..Default::default()
        }),
    }
}

#[test]
fn encode_publish_for_v3_drops_properties() {
    let p = |q, d, r, id| Packet::Publish(v5_publish(q, d, r, id));
    assert_eq!(
        enc(&p(QoS::AtMostOnce, false, false, 0), V3_1_1),
        [0x30, 7, 0, 3, b'a', b'/', b'b', b'h', b'i']
    );
    assert_eq!(
        enc(&p(QoS::AtMostOnce, false, true, 0), V3_1),
        [0x31, 7, 0, 3, b'a', b'/', b'b', b'h', b'i']
    );
    assert_eq!(
        enc(&p(QoS::AtLeastOnce, true, false, 0x0102), V3_1_1),
        [0x3A, 9, 0, 3, b'a', b'/', b'b', 1, 2, b'h', b'i']
    );
    assert_eq!(
        enc(&p(QoS::ExactlyOnce, true, true, 9), V3_1_1),
        [0x3D, 9, 0, 3, b'a', b'/', b'b', 0, 9, b'h', b'i']
    );
    // Same bytes as rumqttc's own v4 writer.
    for (q4, q5) in [
        (rumqttc::mqttbytes::QoS::AtMostOnce, QoS::AtMostOnce),
        (rumqttc::mqttbytes::QoS::AtLeastOnce, QoS::AtLeastOnce),
        (rumqttc::mqttbytes::QoS::ExactlyOnce, QoS::ExactlyOnce),
    ] {
        let mut theirs = v4::Publish::new("a/b", q4, vec![7u8; 300]);
        theirs.pkid = if q5 == QoS::AtMostOnce { 0 } else { 300 };
        theirs.retain = true;
        let mut want = BytesMut::new();
        theirs.write(&mut want).unwrap();
        let mut ours = v5_publish(q5, false, true, theirs.pkid);
        ours.payload = Bytes::from(vec![7u8; 300]);
        assert_eq!(enc(&Packet::Publish(ours), V3_1_1), want.to_vec());
    }
}

#[test]
fn encode_publish_v3_refuses_empty_topic_and_pkid_zero() {
    let mut p = v5_publish(QoS::AtMostOnce, false, false, 0);
    p.topic = Bytes::new();
    let mut out = BytesMut::from(&b"keep"[..]);
    assert!(matches!(
        encode(&Packet::Publish(p), V3_1_1, None, &mut out),
        Err(EncodeError::NotRepresentable { .. })
    ));
    let p = v5_publish(QoS::AtLeastOnce, false, false, 0);
    for v in [V3_1_1, V5] {
        assert!(matches!(
            encode(&Packet::Publish(p.clone()), v, None, &mut out),
            Err(EncodeError::Invalid(_))
        ));
    }
    assert_eq!(&out[..], b"keep");
}

#[test]
fn encode_connack_per_version() {
    let ack = |session_present, code| {
        Packet::ConnAck(ConnAck {
            session_present,
            code,
            properties: None,
        })
    };
    assert_eq!(
        enc(&ack(true, ConnectReturnCode::Success), V3_1),
        [0x20, 2, 0, 0]
    );
    assert_eq!(
        enc(&ack(true, ConnectReturnCode::Success), V3_1_1),
        [0x20, 2, 1, 0]
    );
    assert_eq!(
        enc(&ack(true, ConnectReturnCode::Success), V5),
        [0x20, 3, 1, 0, 0]
    );
    assert_eq!(
        enc(&ack(false, ConnectReturnCode::BadUserNamePassword), V3_1_1),
        [0x20, 2, 0, 4]
    );
    assert_eq!(
        enc(&ack(false, ConnectReturnCode::BadUserNamePassword), V5),
        [0x20, 3, 0, 0x86, 0]
    );
    assert_eq!(
        enc(&ack(false, ConnectReturnCode::NotAuthorized), V3_1),
        [0x20, 2, 0, 5]
    );
    assert_eq!(
        enc(&ack(false, ConnectReturnCode::ServerBusy), V3_1_1),
        [0x20, 2, 0, 3]
    );
    assert_eq!(
        enc(&ack(false, ConnectReturnCode::Banned), V3_1_1),
        [0x20, 2, 0, 5]
    );
    // Session present is cleared on refusal ([MQTT-3.2.2-4], [MQTT-3.2.2-6]).
    assert_eq!(
        enc(&ack(true, ConnectReturnCode::NotAuthorized), V3_1_1),
        [0x20, 2, 0, 5]
    );
    assert_eq!(
        enc(&ack(true, ConnectReturnCode::NotAuthorized), V5),
        [0x20, 3, 0, 0x87, 0]
    );
    // rumqttc's v5 writer panics (unreachable!) on v3-only codes; we map them.
    assert_eq!(
        enc(&ack(false, ConnectReturnCode::RefusedProtocolVersion), V5),
        [0x20, 3, 0, 0x84, 0]
    );
    assert_eq!(
        enc(&ack(false, ConnectReturnCode::BadClientId), V5),
        [0x20, 3, 0, 0x85, 0]
    );
    assert_eq!(
        enc(&ack(false, ConnectReturnCode::ServiceUnavailable), V5),
        [0x20, 3, 0, 0x88, 0]
    );
}

#[test]
fn encode_suback_code_mapping_for_v3() {
    let suback = Packet::SubAck(SubAck {
        pkid: 10,
        return_codes: vec![
            SubscribeReasonCode::Success(QoS::AtMostOnce),
            SubscribeReasonCode::Success(QoS::AtLeastOnce),
            SubscribeReasonCode::Success(QoS::ExactlyOnce),
            SubscribeReasonCode::NotAuthorized,
            SubscribeReasonCode::TopicFilterInvalid,
            SubscribeReasonCode::Failure,
        ],
        properties: Some(SubAckProperties {
            reason_string: Some("r".into()),
            user_properties: vec![],
        }),
    });
    assert_eq!(
        enc(&suback, V3_1_1),
        [0x90, 8, 0, 10, 0, 1, 2, 0x80, 0x80, 0x80]
    );
    assert_eq!(
        enc(&suback, V5),
        [0x90, 13, 0, 10, 4, 0x1F, 0, 1, b'r', 0, 1, 2, 0x87, 0x8F, 0x80]
    );
}

#[test]
fn encode_acks_v3_drop_reasons_and_refuse_failures() {
    let puback = |reason| {
        Packet::PubAck(PubAck {
            pkid: 3,
            reason,
            properties: None,
        })
    };
    assert_eq!(enc(&puback(PubAckReason::Success), V3_1_1), [0x40, 2, 0, 3]);
    assert_eq!(
        enc(&puback(PubAckReason::NoMatchingSubscribers), V3_1_1),
        [0x40, 2, 0, 3]
    );
    assert_eq!(
        enc(&puback(PubAckReason::NoMatchingSubscribers), V5),
        [0x40, 4, 0, 3, 0x10, 0]
    );
    let mut out = BytesMut::new();
    assert!(matches!(
        encode(&puback(PubAckReason::QuotaExceeded), V3_1_1, None, &mut out),
        Err(EncodeError::NotRepresentable { .. })
    ));
    assert!(out.is_empty());
    let pubrec = Packet::PubRec(PubRec {
        pkid: 3,
        reason: PubRecReason::Success,
        properties: None,
    });
    assert_eq!(enc(&pubrec, V3_1_1), [0x50, 2, 0, 3]);
    let pubrel = Packet::PubRel(PubRel {
        pkid: 3,
        reason: PubRelReason::PacketIdentifierNotFound,
        properties: None,
    });
    assert_eq!(enc(&pubrel, V3_1_1), [0x62, 2, 0, 3]);
    assert_eq!(enc(&pubrel, V5), [0x62, 4, 0, 3, 0x92, 0]);
    let pubcomp = Packet::PubComp(PubComp {
        pkid: 3,
        reason: PubCompReason::Success,
        properties: None,
    });
    assert_eq!(enc(&pubcomp, V3_1), [0x70, 2, 0, 3]);
    let unsuback = Packet::UnsubAck(UnsubAck {
        pkid: 4,
        reasons: vec![UnsubAckReason::Success],
        properties: None,
    });
    assert_eq!(enc(&unsuback, V3_1_1), [0xB0, 2, 0, 4]);
    assert_eq!(enc(&Packet::PingResp(PingResp), V3_1_1), [0xD0, 0]);
    assert_eq!(enc(&Packet::PingResp(PingResp), V5), [0xD0, 0]);
}

#[test]
fn encode_disconnect_v3_writes_nothing_auth_v3_refused() {
    let d = Packet::Disconnect(Disconnect::new(DisconnectReasonCode::ServerShuttingDown));
    let mut out = BytesMut::new();
    assert_eq!(encode(&d, V3_1_1, None, &mut out), Ok(0));
    assert!(out.is_empty());
    // rumqttc would write [0xE0, 1, 0x8B, 0] (remaining length 1, two bytes follow).
    assert_eq!(enc(&d, V5), [0xE0, 1, 0x8B]);
    let mut buf = BytesMut::from(&enc(&d, V5)[..]);
    let Ok(Some(Incoming::Disconnect(back))) = connected(V5).decode(&mut buf) else {
        panic!()
    };
    assert_eq!(back.reason_code, DisconnectReasonCode::ServerShuttingDown);
    let normal = Packet::Disconnect(Disconnect::new(DisconnectReasonCode::NormalDisconnection));
    assert_eq!(enc(&normal, V5), [0xE0, 0]);
    let Incoming::Auth(a) = ok_v(V5, &[0xF0, 0]) else {
        panic!()
    };
    assert!(matches!(
        encode(&Packet::Auth(a), V3_1_1, None, &mut out),
        Err(EncodeError::NotRepresentable { .. })
    ));
    assert!(matches!(
        encode(&Packet::PingReq(PingReq), V5, None, &mut out),
        Err(EncodeError::NotRepresentable { .. })
    ));
}

#[test]
fn encode_respects_client_maximum_packet_size() {
    let p = Packet::Publish(v5_publish(QoS::AtLeastOnce, false, false, 1));
    let size = enc(&p, V5).len();
    let mut out = BytesMut::from(&b"x"[..]);
    assert_eq!(encode(&p, V5, Some(size as u32), &mut out), Ok(size));
    assert_eq!(
        encode(&p, V5, Some(size as u32 - 1), &mut out),
        Err(EncodeError::TooLarge {
            size,
            max: size as u32 - 1
        })
    );
    let v3_size = enc(&p, V3_1_1).len();
    assert!(matches!(
        encode(&p, V3_1_1, Some(v3_size as u32 - 1), &mut out),
        Err(EncodeError::TooLarge { .. })
    ));
    assert_eq!(out.len(), 1 + size);
}

// ---------------------------------------------------------------- round trips

fn roundtrip(version: ProtocolVersion, bytes: BytesMut) -> Incoming {
    let mut d = connected(version);
    let mut buf = bytes;
    let p = d.decode(&mut buf).expect("decode").expect("complete");
    assert!(buf.is_empty());
    p
}

#[test]
fn roundtrip_rumqttc_v4_client_packets() {
    let mut connect = v4::Connect::new("client-1");
    connect.keep_alive = 30;
    connect.clean_session = false;
    connect.last_will = Some(v4::LastWill::new(
        "w",
        "gone",
        rumqttc::mqttbytes::QoS::ExactlyOnce,
        true,
    ));
    connect.set_login("u", "p");
    let mut buf = BytesMut::new();
    connect.write(&mut buf).unwrap();
    let c = connect_ok(&buf);
    assert_eq!(
        (c.version, c.client_id.as_str(), c.keep_alive, c.clean_start),
        (V3_1_1, "client-1", 30, false)
    );
    let w = c.will.unwrap();
    assert_eq!(
        (w.topic.as_str(), &w.payload[..], w.qos, w.retain),
        ("w", &b"gone"[..], QoS::ExactlyOnce, true)
    );
    assert_eq!(
        (c.username.as_deref(), c.password.as_deref()),
        (Some("u"), Some(&b"p"[..]))
    );

    let mut publish = v4::Publish::new("t/1", rumqttc::mqttbytes::QoS::AtLeastOnce, "body");
    publish.pkid = 42;
    let mut buf = BytesMut::new();
    publish.write(&mut buf).unwrap();
    let Incoming::Publish(p) = roundtrip(V3_1_1, buf) else {
        panic!()
    };
    assert_eq!(
        (&p.topic[..], p.pkid, &p.payload[..]),
        (&b"t/1"[..], 42, &b"body"[..])
    );

    let mut sub = v4::Subscribe::new("a/#", rumqttc::mqttbytes::QoS::AtLeastOnce);
    sub.pkid = 1;
    let mut buf = BytesMut::new();
    sub.write(&mut buf).unwrap();
    let Incoming::Subscribe(s) = roundtrip(V3_1_1, buf) else {
        panic!()
    };
    assert_eq!(
        (s.filters[0].path.as_str(), s.filters[0].qos),
        ("a/#", QoS::AtLeastOnce)
    );

    let mut unsub = v4::Unsubscribe::new("a/#");
    unsub.pkid = 2;
    let mut buf = BytesMut::new();
    unsub.write(&mut buf).unwrap();
    assert!(matches!(roundtrip(V3_1_1, buf), Incoming::Unsubscribe(u) if u.pkid == 2));

    for (packet, check) in [
        (v4::Packet::PubAck(v4::PubAck::new(5)), 4u8),
        (v4::Packet::PubRec(v4::PubRec::new(5)), 5),
        (v4::Packet::PubRel(v4::PubRel::new(5)), 6),
        (v4::Packet::PubComp(v4::PubComp::new(5)), 7),
        (v4::Packet::PingReq, 12),
        (v4::Packet::Disconnect, 14),
    ] {
        let mut buf = BytesMut::new();
        packet.write(&mut buf, 1 << 20).unwrap();
        assert_eq!(buf[0] >> 4, check);
        roundtrip(V3_1_1, buf);
    }
}

#[test]
fn roundtrip_rumqttc_v5_client_packets() {
    let connect = rv5::Connect {
        keep_alive: 10,
        client_id: "c5".into(),
        clean_start: true,
        properties: Some(ConnectProperties {
            session_expiry_interval: Some(100),
            topic_alias_max: Some(8),
            user_properties: vec![("a".into(), "b".into())],
            ..ConnectProperties::new()
        }),
    };
    let will = rv5::LastWill::new(
        "will",
        "x",
        QoS::AtLeastOnce,
        false,
        Some(LastWillProperties {
            delay_interval: Some(3),
            payload_format_indicator: None,
            message_expiry_interval: None,
            content_type: Some("text/plain".into()),
            response_topic: None,
            correlation_data: None,
            user_properties: vec![],
        }),
    );
    let login = rv5::Login::new("user", "pass");
    let mut buf = BytesMut::new();
    Packet::Connect(connect, Some(will), Some(login))
        .write(&mut buf, None)
        .unwrap();
    let c = connect_ok(&buf);
    assert_eq!(c.version, V5);
    assert_eq!(c.properties.session_expiry_interval, Some(100));
    assert_eq!(c.properties.topic_alias_max, Some(8));
    let w = c.will.unwrap();
    assert_eq!(
        w.properties.unwrap().content_type.as_deref(),
        Some("text/plain")
    );
    assert_eq!(c.password.as_deref(), Some(&b"pass"[..]));

    let mut publish = v5_publish(QoS::ExactlyOnce, false, true, 77);
    publish.properties = Some(PublishProperties {
        response_topic: Some("resp".into()),
        correlation_data: Some(Bytes::from_static(b"cd")),
        user_properties: vec![("k".into(), "v".into())],
        content_type: Some("ct".into()),
        payload_format_indicator: Some(1),
        ..Default::default()
    });
    let mut buf = BytesMut::new();
    Packet::Publish(publish.clone())
        .write(&mut buf, None)
        .unwrap();
    let Incoming::Publish(p) = roundtrip(V5, buf) else {
        panic!()
    };
    assert_eq!(p, publish);

    let sub = Subscribe {
        pkid: 9,
        filters: vec![Filter {
            path: "x/+".into(),
            qos: QoS::AtLeastOnce,
            nolocal: true,
            preserve_retain: true,
            retain_forward_rule: RetainForwardRule::OnNewSubscribe,
        }],
        properties: Some(SubscribeProperties {
            id: Some(12),
            user_properties: vec![],
        }),
    };
    let mut buf = BytesMut::new();
    Packet::Subscribe(sub.clone())
        .write(&mut buf, None)
        .unwrap();
    let Incoming::Subscribe(s) = roundtrip(V5, buf) else {
        panic!()
    };
    assert_eq!(s, sub);

    let unsub = Unsubscribe {
        pkid: 4,
        filters: vec!["x/+".into()],
        properties: None,
    };
    let mut buf = BytesMut::new();
    Packet::Unsubscribe(unsub.clone())
        .write(&mut buf, None)
        .unwrap();
    let Incoming::Unsubscribe(u) = roundtrip(V5, buf) else {
        panic!()
    };
    assert_eq!(u, unsub);

    let pubrec = PubRec {
        pkid: 8,
        reason: PubRecReason::QuotaExceeded,
        properties: None,
    };
    let mut buf = BytesMut::new();
    Packet::PubRec(pubrec.clone())
        .write(&mut buf, None)
        .unwrap();
    let Incoming::PubRec(r) = roundtrip(V5, buf) else {
        panic!()
    };
    assert_eq!(r, pubrec);

    let disconnect = Disconnect {
        reason_code: DisconnectReasonCode::DisconnectWithWillMessage,
        properties: Some(DisconnectProperties {
            session_expiry_interval: Some(0),
            reason_string: Some("bye".into()),
            user_properties: vec![],
            server_reference: None,
        }),
    };
    let mut buf = BytesMut::new();
    Packet::Disconnect(disconnect.clone())
        .write(&mut buf, None)
        .unwrap();
    let Incoming::Disconnect(d) = roundtrip(V5, buf) else {
        panic!()
    };
    assert_eq!(d, disconnect);
}

#[test]
fn roundtrip_server_encoded_publish_through_our_decoder() {
    // What we encode for a client decodes back to the same v5 packet (minus properties for v3).
    for v in [V3_1, V3_1_1, V5] {
        let publish = v5_publish(QoS::AtLeastOnce, true, false, 5);
        let mut buf = BytesMut::from(&enc(&Packet::Publish(publish.clone()), v)[..]);
        let Ok(Some(Incoming::Publish(p))) = connected(v).decode(&mut buf) else {
            panic!()
        };
        if v.is_v5() {
            assert_eq!(p, publish);
        } else {
            assert_eq!(
                p,
                Publish {
                    properties: None,
                    ..publish
                }
            );
        }
    }
}

#[test]
fn encode_v5_connack_and_unsuback_with_properties_are_consistent() {
    // The debug assertion in `encode` checks rumqttc's size() against what it wrote; reading
    // the bytes back with rumqttc checks the layout.
    let props = ConnAckProperties {
        session_expiry_interval: Some(60),
        receive_max: Some(100),
        max_qos: Some(1),
        retain_available: Some(1),
        max_packet_size: Some(1 << 20),
        assigned_client_identifier: Some("auto-1".into()),
        topic_alias_max: Some(10),
        reason_string: Some("ok".into()),
        user_properties: vec![("k".into(), "v".into())],
        wildcard_subscription_available: Some(1),
        subscription_identifiers_available: Some(1),
        shared_subscription_available: Some(0),
        server_keep_alive: Some(30),
        response_information: None,
        server_reference: None,
        authentication_method: None,
        authentication_data: None,
    };
    let ack = ConnAck {
        session_present: true,
        code: ConnectReturnCode::Success,
        properties: Some(props),
    };
    let mut buf = BytesMut::from(&enc(&Packet::ConnAck(ack.clone()), V5)[..]);
    assert_eq!(Packet::read(&mut buf, None).unwrap(), Packet::ConnAck(ack));

    let unsuback = UnsubAck {
        pkid: 3,
        reasons: vec![
            UnsubAckReason::Success,
            UnsubAckReason::NoSubscriptionExisted,
        ],
        properties: Some(UnsubAckProperties {
            reason_string: Some("r".into()),
            user_properties: vec![("a".into(), "b".into())],
        }),
    };
    let mut buf = BytesMut::from(&enc(&Packet::UnsubAck(unsuback.clone()), V5)[..]);
    assert_eq!(
        Packet::read(&mut buf, None).unwrap(),
        Packet::UnsubAck(unsuback)
    );
}
