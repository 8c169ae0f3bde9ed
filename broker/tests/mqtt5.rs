//! MQTT 5.0 behaviour over real TCP: one test per feature, asserting reason codes and
//! properties exactly.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{connect5_packet, filter5, publish5_packet, start, start_with, Raw, QUIET, WAIT};
use rumqttc::v5::mqttbytes::v5::{
    self, ConnectReturnCode, DisconnectReasonCode, Packet, PubAckReason, PubCompReason,
    PubRecReason, PublishProperties, RetainForwardRule, SubscribeReasonCode, UnsubAckReason,
};
use rumqttc::v5::mqttbytes::QoS;

fn publish_of(p: Packet) -> v5::Publish {
    match p {
        Packet::Publish(p) => p,
        other => panic!("expected PUBLISH, got {other:?}"),
    }
}

/// A v5 CONNECT with the given properties tweaked.
fn connect_with(
    id: &str,
    clean: bool,
    tweak: impl FnOnce(&mut v5::ConnectProperties),
) -> v5::Connect {
    let mut props = v5::ConnectProperties::new();
    tweak(&mut props);
    v5::Connect {
        keep_alive: 30,
        client_id: id.to_string(),
        clean_start: clean,
        properties: Some(props),
    }
}

fn with_props(mut p: v5::Publish, props: PublishProperties) -> v5::Publish {
    p.properties = Some(props);
    p
}

fn alias_props(alias: u16) -> PublishProperties {
    PublishProperties {
        topic_alias: Some(alias),
        ..Default::default()
    }
}

async fn puback_reason(c: &mut Raw, pkid: u16) -> PubAckReason {
    match c.recv5().await {
        Packet::PubAck(a) => {
            assert_eq!(a.pkid, pkid);
            a.reason
        }
        other => panic!("expected PUBACK {pkid}, got {other:?}"),
    }
}

/// Publishes at QoS 1 and waits for the PUBACK (so the message has been routed).
async fn publish_acked(c: &mut Raw, p: v5::Publish) {
    let pkid = p.pkid;
    assert_eq!(p.qos, QoS::AtLeastOnce);
    c.publish5(p).await;
    let reason = puback_reason(c, pkid).await;
    assert!(
        matches!(
            reason,
            PubAckReason::Success | PubAckReason::NoMatchingSubscribers
        ),
        "{reason:?}"
    );
}

async fn puback(c: &mut Raw, pkid: u16) {
    c.send5(Packet::PubAck(v5::PubAck::new(pkid, None))).await;
}

#[tokio::test]
async fn connack_assigns_client_identifier_and_announces_limits() {
    let (_server, addr) = start().await;
    let (_a, ack) = Raw::connect5(addr, "", true, 0).await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    assert!(!ack.session_present);
    let props = ack.properties.expect("CONNACK properties");
    let first = props
        .assigned_client_identifier
        .expect("Assigned Client Identifier for an empty client id");
    assert!(!first.is_empty());
    assert_eq!(props.receive_max, Some(32));
    assert_eq!(props.topic_alias_max, Some(64));
    assert_eq!(props.max_packet_size, Some(1024 * 1024));
    assert_eq!(props.server_keep_alive, None);

    let (_b, ack) = Raw::connect5(addr, "", true, 0).await;
    let second = ack.properties.unwrap().assigned_client_identifier.unwrap();
    assert_ne!(first, second, "assigned identifiers must be unique");

    // A client that chose its own id is not told one.
    let (_c, ack) = Raw::connect5(addr, "mine", true, 0).await;
    assert_eq!(ack.properties.unwrap().assigned_client_identifier, None);
}

#[tokio::test]
async fn session_expiry_clean_start_and_session_present() {
    let (_server, addr) = start().await;
    let (mut publ, _) = Raw::connect5(addr, "pub", true, 0).await;

    // Expiry 2 s: the session survives a short absence and keeps queueing.
    let (mut dev, ack) = Raw::connect5(addr, "dev", true, 2).await;
    assert!(!ack.session_present);
    dev.subscribe5(1, filter5("se/t", QoS::AtLeastOnce), None)
        .await;
    dev.disconnect5(DisconnectReasonCode::NormalDisconnection, None)
        .await;
    assert!(dev.closed_within(WAIT).await.is_some());
    publish_acked(
        &mut publ,
        publish5_packet("se/t", QoS::AtLeastOnce, 1, false, b"queued"),
    )
    .await;
    let (mut dev, ack) = Raw::connect5(addr, "dev", false, 2).await;
    assert!(ack.session_present, "resumed within the expiry interval");
    let m = dev.recv_publish5().await;
    assert_eq!(&m.payload[..], b"queued");
    puback(&mut dev, m.pkid).await;

    // Gone for longer than the expiry: a new session, without the old subscription.
    dev.disconnect5(DisconnectReasonCode::NormalDisconnection, None)
        .await;
    assert!(dev.closed_within(WAIT).await.is_some());
    tokio::time::sleep(Duration::from_millis(3200)).await;
    let (mut dev, ack) = Raw::connect5(addr, "dev", false, 2).await;
    assert!(!ack.session_present, "session should have expired");
    publish_acked(
        &mut publ,
        publish5_packet("se/t", QoS::AtLeastOnce, 2, false, b"after"),
    )
    .await;
    assert!(
        dev.recv5_within(QUIET).await.is_none(),
        "subscription survived expiry"
    );

    // Clean Start discards an existing session.
    dev.subscribe5(1, filter5("se/t", QoS::AtLeastOnce), None)
        .await;
    drop(dev);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (mut dev, ack) = Raw::connect5(addr, "dev", true, 2).await;
    assert!(!ack.session_present, "Clean Start must not resume");
    publish_acked(
        &mut publ,
        publish5_packet("se/t", QoS::AtLeastOnce, 3, false, b"clean"),
    )
    .await;
    assert!(dev.recv5_within(QUIET).await.is_none());

    // Expiry 0 (absent): the session ends with the connection.
    let (mut eph, _) = Raw::connect5(addr, "eph", true, 0).await;
    eph.subscribe5(1, filter5("se/e", QoS::AtLeastOnce), None)
        .await;
    eph.disconnect5(DisconnectReasonCode::NormalDisconnection, None)
        .await;
    assert!(eph.closed_within(WAIT).await.is_some());
    let (_eph, ack) = Raw::connect5(addr, "eph", false, 0).await;
    assert!(!ack.session_present);
}

#[tokio::test]
async fn session_expiry_is_capped_and_announced() {
    let (_server, addr) = start_with(|c| c.session.max_session_expiry_secs = 60).await;
    let (_c, ack) = Raw::connect5(addr, "capped", true, 3600).await;
    assert_eq!(ack.properties.unwrap().session_expiry_interval, Some(60));
    let (_d, ack) = Raw::connect5(addr, "uncapped", true, 30).await;
    assert_eq!(ack.properties.unwrap().session_expiry_interval, None);
}

#[tokio::test]
async fn no_local_suppresses_own_messages_only() {
    let (_server, addr) = start().await;
    let (mut me, _) = Raw::connect5(addr, "me", true, 0).await;
    let mut f = filter5("nl/t", QoS::AtMostOnce);
    f.nolocal = true;
    let ack = me.subscribe5(1, f, None).await;
    assert_eq!(
        ack.return_codes,
        vec![SubscribeReasonCode::Success(QoS::AtMostOnce)]
    );
    let (mut other, _) = Raw::connect5(addr, "other", true, 0).await;
    other
        .subscribe5(1, filter5("nl/t", QoS::AtMostOnce), None)
        .await;

    me.publish5(publish5_packet("nl/t", QoS::AtMostOnce, 0, false, b"mine"))
        .await;
    assert_eq!(&other.recv_publish5().await.payload[..], b"mine");
    assert!(
        me.recv5_within(QUIET).await.is_none(),
        "No Local not honoured"
    );

    other
        .publish5(publish5_packet(
            "nl/t",
            QoS::AtMostOnce,
            0,
            false,
            b"theirs",
        ))
        .await;
    assert_eq!(&me.recv_publish5().await.payload[..], b"theirs");
}

#[tokio::test]
async fn subscription_identifiers_are_attached_and_merged() {
    let (_server, addr) = start().await;
    let (mut sub, _) = Raw::connect5(addr, "sub", true, 0).await;
    sub.subscribe5(1, filter5("si/+", QoS::AtMostOnce), Some(7))
        .await;
    sub.subscribe5(2, filter5("si/#", QoS::AtLeastOnce), Some(300))
        .await;
    sub.subscribe5(3, filter5("other", QoS::AtMostOnce), None)
        .await;
    let (mut publ, _) = Raw::connect5(addr, "pub", true, 0).await;

    publish_acked(
        &mut publ,
        publish5_packet("si/x", QoS::AtLeastOnce, 1, false, b"both"),
    )
    .await;
    let m = sub.recv_publish5().await;
    assert_eq!(m.qos, QoS::AtLeastOnce, "highest granted QoS");
    let mut ids = m.properties.expect("properties").subscription_identifiers;
    ids.sort_unstable();
    assert_eq!(ids, vec![7, 300]);
    puback(&mut sub, m.pkid).await;
    assert!(sub.recv5_within(QUIET).await.is_none(), "delivered twice");

    // One subscription matches: only its id.
    publ.publish5(publish5_packet("si/a/b", QoS::AtMostOnce, 0, false, b"one"))
        .await;
    let m = sub.recv_publish5().await;
    assert_eq!(m.properties.unwrap().subscription_identifiers, vec![300]);

    // No identifier on the subscription: none on the message.
    publ.publish5(publish5_packet("other", QoS::AtMostOnce, 0, false, b"none"))
        .await;
    let m = sub.recv_publish5().await;
    assert!(m
        .properties
        .map(|p| p.subscription_identifiers.is_empty())
        .unwrap_or(true));

    // Retained messages sent on SUBSCRIBE carry that subscription's identifier.
    publish_acked(
        &mut publ,
        publish5_packet("si-ret/x", QoS::AtLeastOnce, 2, true, b"kept"),
    )
    .await;
    sub.subscribe5(4, filter5("si-ret/+", QoS::AtMostOnce), Some(11))
        .await;
    let m = sub.recv_publish5().await;
    assert!(m.retain);
    assert_eq!(m.properties.unwrap().subscription_identifiers, vec![11]);
}

#[tokio::test]
async fn shared_subscription_carries_identifier_and_retain_as_published() {
    let (_server, addr) = start().await;
    let (mut member, _) = Raw::connect5(addr, "member", true, 0).await;
    let mut f = filter5("$share/grp/sh/+", QoS::AtLeastOnce);
    f.preserve_retain = true;
    let ack = member.subscribe5(1, f, Some(5)).await;
    assert_eq!(
        ack.return_codes,
        vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    let (mut publ, _) = Raw::connect5(addr, "pub", true, 0).await;
    publish_acked(
        &mut publ,
        publish5_packet("sh/x", QoS::AtLeastOnce, 1, true, b"shared"),
    )
    .await;
    let m = member.recv_publish5().await;
    assert_eq!(&m.payload[..], b"shared");
    assert_eq!(
        m.properties.map(|p| p.subscription_identifiers),
        Some(vec![5]),
        "subscription identifier of the member's shared subscription"
    );
    assert!(m.retain, "Retain As Published on the shared subscription");
}

#[tokio::test]
async fn topic_alias_inbound() {
    let (_server, addr) = start_with(|c| c.limits.max_topic_alias = 4).await;
    let (mut sub, _) = Raw::connect5(addr, "sub", true, 0).await;
    sub.subscribe5(1, filter5("ta/#", QoS::AtMostOnce), None)
        .await;

    let (mut publ, ack) = Raw::connect5(addr, "pub", true, 0).await;
    assert_eq!(ack.properties.unwrap().topic_alias_max, Some(4));
    publ.publish5(with_props(
        publish5_packet("ta/one", QoS::AtMostOnce, 0, false, b"1"),
        alias_props(4),
    ))
    .await;
    publ.publish5(with_props(
        publish5_packet("", QoS::AtMostOnce, 0, false, b"2"),
        alias_props(4),
    ))
    .await;
    // Re-mapping an alias to another topic is allowed.
    publ.publish5(with_props(
        publish5_packet("ta/two", QoS::AtMostOnce, 0, false, b"3"),
        alias_props(4),
    ))
    .await;
    publ.publish5(with_props(
        publish5_packet("", QoS::AtLeastOnce, 9, false, b"4"),
        alias_props(4),
    ))
    .await;
    assert_eq!(puback_reason(&mut publ, 9).await, PubAckReason::Success);
    for (topic, payload) in [
        ("ta/one", "1"),
        ("ta/one", "2"),
        ("ta/two", "3"),
        ("ta/two", "4"),
    ] {
        let m = sub.recv_publish5().await;
        assert_eq!(
            (&m.topic[..], &m.payload[..]),
            (topic.as_bytes(), payload.as_bytes())
        );
        assert_eq!(
            m.properties.and_then(|p| p.topic_alias),
            None,
            "alias is per hop"
        );
    }

    // Above the broker's Topic Alias Maximum: 0x94.
    let (mut bad, _) = Raw::connect5(addr, "bad-high", true, 0).await;
    bad.publish5(with_props(
        publish5_packet("ta/x", QoS::AtMostOnce, 0, false, b"x"),
        alias_props(5),
    ))
    .await;
    assert_eq!(
        bad.expect_disconnect5().await.reason_code,
        DisconnectReasonCode::TopicAliasInvalid
    );

    // Alias 0: 0x94.
    let (mut bad, _) = Raw::connect5(addr, "bad-zero", true, 0).await;
    bad.publish5(with_props(
        publish5_packet("ta/x", QoS::AtMostOnce, 0, false, b"x"),
        alias_props(0),
    ))
    .await;
    assert_eq!(
        bad.expect_disconnect5().await.reason_code,
        DisconnectReasonCode::TopicAliasInvalid
    );

    // Empty topic with an alias never set up on this connection: protocol error.
    let (mut bad, _) = Raw::connect5(addr, "bad-unknown", true, 0).await;
    bad.publish5(with_props(
        publish5_packet("", QoS::AtMostOnce, 0, false, b"x"),
        alias_props(2),
    ))
    .await;
    assert_eq!(
        bad.expect_disconnect5().await.reason_code,
        DisconnectReasonCode::ProtocolError
    );
    assert!(sub.recv5_within(QUIET).await.is_none());
}

#[tokio::test]
async fn topic_alias_outbound() {
    let (_server, addr) = start().await;
    let (mut sub, _) = Raw::connect5_with(
        addr,
        connect_with("sub", true, |p| p.topic_alias_max = Some(2)),
        None,
    )
    .await;
    sub.subscribe5(1, filter5("out/#", QoS::AtMostOnce), None)
        .await;
    let (mut plain, _) = Raw::connect5(addr, "plain", true, 0).await;
    plain
        .subscribe5(1, filter5("out/#", QoS::AtMostOnce), None)
        .await;
    let (mut publ, _) = Raw::connect5(addr, "pub", true, 0).await;
    for (topic, payload) in [
        ("out/a", "1"),
        ("out/a", "2"),
        ("out/b", "3"),
        ("out/c", "4"),
        ("out/b", "5"),
    ] {
        publ.publish5(publish5_packet(
            topic,
            QoS::AtMostOnce,
            0,
            false,
            payload.as_bytes(),
        ))
        .await;
    }

    let m = sub.recv_publish5().await;
    assert_eq!((&m.topic[..], &m.payload[..]), (&b"out/a"[..], &b"1"[..]));
    let a = m
        .properties
        .and_then(|p| p.topic_alias)
        .expect("alias set up");
    let m = sub.recv_publish5().await;
    assert_eq!(
        (&m.topic[..], &m.payload[..]),
        (&b""[..], &b"2"[..]),
        "alias used"
    );
    assert_eq!(m.properties.and_then(|p| p.topic_alias), Some(a));
    let m = sub.recv_publish5().await;
    assert_eq!(&m.topic[..], b"out/b");
    let b = m
        .properties
        .and_then(|p| p.topic_alias)
        .expect("second alias");
    assert_ne!(a, b);
    assert!(
        (1..=2).contains(&a) && (1..=2).contains(&b),
        "within the client's maximum"
    );
    // Beyond the client's maximum of 2: full topic, no alias.
    let m = sub.recv_publish5().await;
    assert_eq!(&m.topic[..], b"out/c");
    assert_eq!(m.properties.and_then(|p| p.topic_alias), None);
    let m = sub.recv_publish5().await;
    assert_eq!((&m.topic[..], &m.payload[..]), (&b""[..], &b"5"[..]));
    assert_eq!(m.properties.and_then(|p| p.topic_alias), Some(b));

    // A client that did not allow aliases never gets one.
    for _ in 0..5 {
        let m = plain.recv_publish5().await;
        assert!(!m.topic.is_empty());
        assert_eq!(m.properties.and_then(|p| p.topic_alias), None);
    }
}

#[tokio::test]
async fn receive_maximum_outbound_limits_unacked_publishes() {
    let (_server, addr) = start().await;
    let (mut sub, _) = Raw::connect5_with(
        addr,
        connect_with("sub", true, |p| p.receive_maximum = Some(2)),
        None,
    )
    .await;
    sub.subscribe5(1, filter5("rm", QoS::AtLeastOnce), None)
        .await;
    let (mut publ, _) = Raw::connect5(addr, "pub", true, 0).await;
    for i in 0..5u8 {
        publish_acked(
            &mut publ,
            publish5_packet("rm", QoS::AtLeastOnce, u16::from(i) + 1, false, &[i]),
        )
        .await;
    }
    let m0 = sub.recv_publish5().await;
    let m1 = sub.recv_publish5().await;
    assert_eq!((m0.payload[0], m1.payload[0]), (0, 1));
    assert!(
        sub.recv5_within(QUIET).await.is_none(),
        "more than Receive Maximum in flight"
    );
    puback(&mut sub, m0.pkid).await;
    let m2 = sub.recv_publish5().await;
    assert_eq!(m2.payload[0], 2);
    assert!(sub.recv5_within(QUIET).await.is_none());
    puback(&mut sub, m1.pkid).await;
    puback(&mut sub, m2.pkid).await;
    let m3 = sub.recv_publish5().await;
    let m4 = sub.recv_publish5().await;
    assert_eq!((m3.payload[0], m4.payload[0]), (3, 4));
}

#[tokio::test]
async fn receive_maximum_inbound_is_announced_and_enforced() {
    let (_server, addr) = start_with(|c| c.limits.max_inflight = 3).await;
    let (mut publ, ack) = Raw::connect5(addr, "pub", true, 0).await;
    assert_eq!(ack.properties.unwrap().receive_max, Some(3));
    for pkid in 1..=3 {
        publ.publish5(publish5_packet("rmi", QoS::ExactlyOnce, pkid, false, b"x"))
            .await;
        assert!(matches!(publ.recv5().await, Packet::PubRec(r) if r.pkid == pkid));
    }
    // Completing one frees a slot.
    publ.send5(Packet::PubRel(v5::PubRel::new(1, None))).await;
    assert!(matches!(publ.recv5().await, Packet::PubComp(c) if c.pkid == 1));
    publ.publish5(publish5_packet("rmi", QoS::ExactlyOnce, 4, false, b"x"))
        .await;
    assert!(matches!(publ.recv5().await, Packet::PubRec(r) if r.pkid == 4));
    // A fourth unreleased QoS 2 PUBLISH exceeds the Receive Maximum of 3.
    publ.publish5(publish5_packet("rmi", QoS::ExactlyOnce, 5, false, b"x"))
        .await;
    assert_eq!(
        publ.expect_disconnect5().await.reason_code,
        DisconnectReasonCode::ReceiveMaximumExceeded
    );
}

#[tokio::test]
async fn client_maximum_packet_size_skips_larger_messages() {
    let (_server, addr) = start().await;
    let (mut sub, _) = Raw::connect5_with(
        addr,
        connect_with("sub", true, |p| p.max_packet_size = Some(128)),
        None,
    )
    .await;
    sub.subscribe5(1, filter5("mps", QoS::AtLeastOnce), None)
        .await;
    let (mut publ, _) = Raw::connect5(addr, "pub", true, 0).await;
    publish_acked(
        &mut publ,
        publish5_packet("mps", QoS::AtLeastOnce, 1, false, &[b'L'; 200]),
    )
    .await;
    publish_acked(
        &mut publ,
        publish5_packet("mps", QoS::AtLeastOnce, 2, false, &[b's'; 10]),
    )
    .await;
    publ.publish5(publish5_packet(
        "mps",
        QoS::AtMostOnce,
        0,
        false,
        &[b'L'; 200],
    ))
    .await;
    publ.publish5(publish5_packet(
        "mps",
        QoS::AtMostOnce,
        0,
        false,
        &[b't'; 100],
    ))
    .await;
    let m = sub.recv_publish5().await;
    assert_eq!(&m.payload[..], &[b's'; 10][..]);
    puback(&mut sub, m.pkid).await;
    let m = sub.recv_publish5().await;
    assert_eq!(
        &m.payload[..],
        &[b't'; 100][..],
        "100 bytes payload still fits in 128"
    );
    assert!(sub.recv5_within(QUIET).await.is_none());
}

#[tokio::test]
async fn broker_maximum_packet_size_is_enforced() {
    let (_server, addr) = start_with(|c| c.limits.max_packet_size = 1024).await;
    let (mut publ, ack) = Raw::connect5(addr, "pub", true, 0).await;
    assert_eq!(ack.properties.unwrap().max_packet_size, Some(1024));
    publ.publish5(publish5_packet("ok", QoS::AtLeastOnce, 1, false, &[0; 900]))
        .await;
    assert_eq!(
        puback_reason(&mut publ, 1).await,
        PubAckReason::NoMatchingSubscribers
    );
    publ.publish5(publish5_packet(
        "big",
        QoS::AtLeastOnce,
        2,
        false,
        &[0; 2000],
    ))
    .await;
    assert_eq!(
        publ.expect_disconnect5().await.reason_code,
        DisconnectReasonCode::PacketTooLarge
    );
}

#[tokio::test]
async fn message_expiry_drops_and_decrements() {
    let (_server, addr) = start().await;
    let (mut publ, _) = Raw::connect5(addr, "pub", true, 0).await;
    let expiring = |secs| PublishProperties {
        message_expiry_interval: Some(secs),
        ..Default::default()
    };
    // An offline persistent subscriber.
    let (mut dev, _) = Raw::connect5(addr, "dev", true, 60).await;
    dev.subscribe5(1, filter5("mx/q/#", QoS::AtLeastOnce), None)
        .await;
    drop(dev);
    tokio::time::sleep(Duration::from_millis(100)).await;

    publish_acked(
        &mut publ,
        with_props(
            publish5_packet("mx/r/short", QoS::AtLeastOnce, 1, true, b"short"),
            expiring(1),
        ),
    )
    .await;
    publish_acked(
        &mut publ,
        with_props(
            publish5_packet("mx/r/long", QoS::AtLeastOnce, 2, true, b"long"),
            expiring(60),
        ),
    )
    .await;
    publish_acked(
        &mut publ,
        with_props(
            publish5_packet("mx/q/short", QoS::AtLeastOnce, 3, false, b"qshort"),
            expiring(1),
        ),
    )
    .await;
    publish_acked(
        &mut publ,
        with_props(
            publish5_packet("mx/q/long", QoS::AtLeastOnce, 4, false, b"qlong"),
            expiring(60),
        ),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(2100)).await;

    // Retained: the expired one is gone, the other carries its remaining lifetime.
    let (mut sub, _) = Raw::connect5(addr, "sub", true, 0).await;
    sub.subscribe5(1, filter5("mx/r/+", QoS::AtMostOnce), None)
        .await;
    let m = sub.recv_publish5().await;
    assert_eq!(&m.topic[..], b"mx/r/long");
    assert!(m.retain);
    let left = m.properties.unwrap().message_expiry_interval.unwrap();
    assert!(
        (55..=58).contains(&left),
        "remaining expiry {left}, expected about 58"
    );
    assert!(
        sub.recv5_within(QUIET).await.is_none(),
        "expired retained message delivered"
    );

    // Queued for an offline session: same rules.
    let (mut dev, ack) = Raw::connect5(addr, "dev", false, 60).await;
    assert!(ack.session_present);
    let m = dev.recv_publish5().await;
    assert_eq!(&m.topic[..], b"mx/q/long");
    let left = m.properties.unwrap().message_expiry_interval.unwrap();
    assert!(
        (55..=58).contains(&left),
        "remaining expiry {left}, expected about 58"
    );
    puback(&mut dev, m.pkid).await;
    assert!(
        dev.recv5_within(QUIET).await.is_none(),
        "expired queued message delivered"
    );
}

#[tokio::test]
async fn publish_properties_pass_through_unchanged() {
    let (_server, addr) = start().await;
    let (mut sub, _) = Raw::connect5(addr, "sub", true, 0).await;
    sub.subscribe5(1, filter5("pp", QoS::AtLeastOnce), None)
        .await;
    let (mut publ, _) = Raw::connect5(addr, "pub", true, 0).await;
    let props = PublishProperties {
        payload_format_indicator: Some(1),
        message_expiry_interval: None,
        topic_alias: None,
        response_topic: Some("reply/here".into()),
        correlation_data: Some(Bytes::from_static(&[0, 1, 2, 0xff])),
        user_properties: vec![
            ("k".into(), "v1".into()),
            ("k".into(), "v2".into()),
            ("ünï".into(), "côdé".into()),
        ],
        subscription_identifiers: vec![],
        content_type: Some("application/json".into()),
    };
    publish_acked(
        &mut publ,
        with_props(
            publish5_packet("pp", QoS::AtLeastOnce, 1, false, br#"{"a":1}"#),
            props.clone(),
        ),
    )
    .await;
    let m = sub.recv_publish5().await;
    assert_eq!(&m.payload[..], br#"{"a":1}"#);
    assert_eq!(m.properties, Some(props));

    // Payload Format Indicator 1 with a payload that is not UTF-8: PUBACK 0x99.
    publ.publish5(with_props(
        publish5_packet("pp", QoS::AtLeastOnce, 2, false, &[0xff, 0xfe]),
        PublishProperties {
            payload_format_indicator: Some(1),
            ..Default::default()
        },
    ))
    .await;
    assert_eq!(
        puback_reason(&mut publ, 2).await,
        PubAckReason::PayloadFormatInvalid
    );
    puback(&mut sub, m.pkid).await;
    assert!(sub.recv5_within(QUIET).await.is_none());
}

#[tokio::test]
async fn retain_handling_and_retain_as_published() {
    let (_server, addr) = start().await;
    let (mut publ, _) = Raw::connect5(addr, "pub", true, 0).await;
    publish_acked(
        &mut publ,
        publish5_packet("rh/t", QoS::AtLeastOnce, 1, true, b"kept"),
    )
    .await;

    let filter = |rule: RetainForwardRule, rap: bool| {
        let mut f = filter5("rh/+", QoS::AtMostOnce);
        f.retain_forward_rule = rule;
        f.preserve_retain = rap;
        f
    };
    async fn retained_count(c: &mut Raw) -> usize {
        let mut n = 0;
        while let Some(p) = c.recv5_within(QUIET).await {
            let m = publish_of(p);
            assert!(m.retain, "retained message sent on subscribe has RETAIN=1");
            assert_eq!(&m.payload[..], b"kept");
            n += 1;
        }
        n
    }

    // 0: on every subscribe.
    let (mut c0, _) = Raw::connect5(addr, "c0", true, 0).await;
    c0.subscribe5(1, filter(RetainForwardRule::OnEverySubscribe, false), None)
        .await;
    assert_eq!(retained_count(&mut c0).await, 1);
    c0.subscribe5(2, filter(RetainForwardRule::OnEverySubscribe, false), None)
        .await;
    assert_eq!(retained_count(&mut c0).await, 1, "0: again on re-subscribe");

    // 1: only when the subscription is new.
    let (mut c1, _) = Raw::connect5(addr, "c1", true, 0).await;
    c1.subscribe5(1, filter(RetainForwardRule::OnNewSubscribe, false), None)
        .await;
    assert_eq!(retained_count(&mut c1).await, 1);
    c1.subscribe5(2, filter(RetainForwardRule::OnNewSubscribe, false), None)
        .await;
    assert_eq!(retained_count(&mut c1).await, 0, "1: not on re-subscribe");

    // 2: never, and Retain As Published keeps RETAIN on live messages.
    let (mut c2, _) = Raw::connect5(addr, "c2", true, 0).await;
    c2.subscribe5(1, filter(RetainForwardRule::Never, true), None)
        .await;
    assert_eq!(retained_count(&mut c2).await, 0, "2: never");

    publ.publish5(publish5_packet(
        "rh/live",
        QoS::AtMostOnce,
        0,
        true,
        b"live",
    ))
    .await;
    let m = c2.recv_publish5().await;
    assert_eq!(
        (&m.payload[..], m.retain),
        (&b"live"[..], true),
        "Retain As Published"
    );
    let m = c1.recv_publish5().await;
    assert_eq!(
        (&m.payload[..], m.retain),
        (&b"live"[..], false),
        "RETAIN cleared"
    );
    let m = c0.recv_publish5().await;
    assert_eq!((&m.payload[..], m.retain), (&b"live"[..], false));
}

fn will(topic: &str, payload: &str, delay: Option<u32>) -> v5::LastWill {
    v5::LastWill::new(
        topic,
        payload.as_bytes().to_vec(),
        QoS::AtLeastOnce,
        false,
        Some(v5::LastWillProperties {
            delay_interval: delay,
            payload_format_indicator: None,
            message_expiry_interval: None,
            content_type: Some("text/plain".into()),
            response_topic: None,
            correlation_data: None,
            user_properties: vec![("why".into(), "test".into())],
        }),
    )
}

#[tokio::test]
async fn will_message_rules() {
    let (_server, addr) = start().await;
    let (mut watcher, _) = Raw::connect5(addr, "watcher", true, 0).await;
    watcher
        .subscribe5(1, filter5("w5/#", QoS::AtLeastOnce), None)
        .await;

    // Normal DISCONNECT: no will.
    let (mut c, _) = Raw::connect5_with(
        addr,
        connect5_packet("polite", true, 0),
        Some(will("w5/polite", "x", None)),
    )
    .await;
    c.disconnect5(DisconnectReasonCode::NormalDisconnection, None)
        .await;
    assert!(c.closed_within(WAIT).await.is_some());
    assert!(
        watcher.recv5_within(QUIET).await.is_none(),
        "will after normal DISCONNECT"
    );

    // Abnormal close: the will, with its properties.
    let (c, _) = Raw::connect5_with(
        addr,
        connect5_packet("crasher", true, 0),
        Some(will("w5/crasher", "crashed", None)),
    )
    .await;
    drop(c);
    let m = watcher.recv_publish5().await;
    assert_eq!(
        (&m.topic[..], &m.payload[..]),
        (&b"w5/crasher"[..], &b"crashed"[..])
    );
    assert_eq!(m.qos, QoS::AtLeastOnce);
    let props = m.properties.expect("will properties forwarded");
    assert_eq!(props.content_type.as_deref(), Some("text/plain"));
    assert_eq!(
        props.user_properties,
        vec![("why".to_string(), "test".to_string())]
    );
    puback(&mut watcher, m.pkid).await;

    // DISCONNECT with 0x04: the will is sent.
    let (mut c, _) = Raw::connect5_with(
        addr,
        connect5_packet("asks", true, 0),
        Some(will("w5/asks", "asked", None)),
    )
    .await;
    c.disconnect5(DisconnectReasonCode::DisconnectWithWillMessage, None)
        .await;
    let m = watcher.recv_publish5().await;
    assert_eq!(&m.topic[..], b"w5/asks");
    puback(&mut watcher, m.pkid).await;

    // A Will Delay longer than a zero Session Expiry: the session ends now, so does the wait.
    let (c, _) = Raw::connect5_with(
        addr,
        connect5_packet("short-session", true, 0),
        Some(will("w5/short", "now", Some(30))),
    )
    .await;
    drop(c);
    let m = watcher.recv_publish5().await;
    assert_eq!(&m.topic[..], b"w5/short");
    puback(&mut watcher, m.pkid).await;
    assert!(watcher.recv5_within(QUIET).await.is_none());
}

#[tokio::test]
async fn will_delay_interval() {
    let (_server, addr) = start().await;
    let (mut watcher, _) = Raw::connect5(addr, "watcher", true, 0).await;
    watcher
        .subscribe5(1, filter5("wd/#", QoS::AtLeastOnce), None)
        .await;

    // Sent after the delay.
    let (c, _) = Raw::connect5_with(
        addr,
        connect5_packet("late", true, 30),
        Some(will("wd/late", "late", Some(1))),
    )
    .await;
    let dropped_at = Instant::now();
    drop(c);
    assert!(
        watcher
            .recv5_within(Duration::from_millis(600))
            .await
            .is_none(),
        "will sent before its delay"
    );
    let m = watcher.recv_publish5().await;
    assert_eq!(&m.topic[..], b"wd/late");
    assert!(dropped_at.elapsed() >= Duration::from_millis(900));
    puback(&mut watcher, m.pkid).await;

    // Not sent when the client comes back within the delay.
    let (c, _) = Raw::connect5_with(
        addr,
        connect5_packet("back", true, 30),
        Some(will("wd/back", "back", Some(2))),
    )
    .await;
    drop(c);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (mut c, ack) = Raw::connect5(addr, "back", false, 30).await;
    assert!(ack.session_present);
    assert!(
        watcher
            .recv5_within(Duration::from_millis(3000))
            .await
            .is_none(),
        "will sent although the client reconnected within the delay"
    );
    c.disconnect5(DisconnectReasonCode::NormalDisconnection, None)
        .await;
}

#[tokio::test]
async fn server_keep_alive_is_announced() {
    let (_server, addr) = start_with(|c| c.limits.max_keep_alive_secs = 5).await;
    for (asked, told) in [(30u16, Some(5u16)), (3, None), (5, None), (0, Some(5))] {
        let mut connect = connect5_packet(&format!("ka{asked}"), true, 0);
        connect.keep_alive = asked;
        let (_c, ack) = Raw::connect5_with(addr, connect, None).await;
        assert_eq!(
            ack.properties.unwrap().server_keep_alive,
            told,
            "keep alive {asked}"
        );
    }
}

#[tokio::test]
async fn session_takeover_sends_disconnect_8e() {
    let (_server, addr) = start().await;
    let (mut first, _) = Raw::connect5(addr, "same", true, 30).await;
    first
        .subscribe5(1, filter5("tk", QoS::AtMostOnce), None)
        .await;
    let (mut second, ack) = Raw::connect5(addr, "same", false, 30).await;
    assert!(ack.session_present);
    assert_eq!(
        first.expect_disconnect5().await.reason_code,
        DisconnectReasonCode::SessionTakenOver
    );
    let (mut publ, _) = Raw::connect5(addr, "pub", true, 0).await;
    publ.publish5(publish5_packet("tk", QoS::AtMostOnce, 0, false, b"x"))
        .await;
    assert_eq!(&second.recv_publish5().await.topic[..], b"tk");
}

#[tokio::test]
async fn shutdown_sends_disconnect_8b() {
    let (server, addr) = start().await;
    let (mut c5, _) = Raw::connect5(addr, "v5", true, 0).await;
    let (mut c4, _) = Raw::connect4(addr, "v4", true).await;
    let stopping = tokio::spawn(server.shutdown());
    assert_eq!(
        c5.expect_disconnect5().await.reason_code,
        DisconnectReasonCode::ServerShuttingDown
    );
    // v3 clients have no DISCONNECT from the server: the socket just closes.
    assert_eq!(c4.closed_within(WAIT).await, Some(vec![]));
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .expect("shutdown finished")
        .unwrap();
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "still accepting"
    );
}

#[tokio::test]
async fn no_matching_subscribers_reason_codes() {
    let (_server, addr) = start().await;
    let (mut publ, _) = Raw::connect5(addr, "pub", true, 0).await;
    publ.publish5(publish5_packet("nobody", QoS::AtLeastOnce, 1, false, b"x"))
        .await;
    assert_eq!(
        puback_reason(&mut publ, 1).await,
        PubAckReason::NoMatchingSubscribers
    );
    publ.publish5(publish5_packet("nobody", QoS::ExactlyOnce, 2, false, b"x"))
        .await;
    match publ.recv5().await {
        Packet::PubRec(r) => {
            assert_eq!((r.pkid, r.reason), (2, PubRecReason::NoMatchingSubscribers))
        }
        other => panic!("{other:?}"),
    }
    let (mut sub, _) = Raw::connect5(addr, "sub", true, 0).await;
    sub.subscribe5(1, filter5("somebody", QoS::AtMostOnce), None)
        .await;
    publ.publish5(publish5_packet(
        "somebody",
        QoS::AtLeastOnce,
        3,
        false,
        b"x",
    ))
    .await;
    assert_eq!(puback_reason(&mut publ, 3).await, PubAckReason::Success);
}

#[tokio::test]
async fn authentication_method_is_refused() {
    let (_server, addr) = start().await;
    let mut c = Raw::connect(addr).await;
    let connect = connect_with("auth", true, |p| {
        p.authentication_method = Some("SCRAM-SHA-256".into());
        p.authentication_data = Some(Bytes::from_static(b"client-first"));
    });
    c.send5(Packet::Connect(connect, None, None)).await;
    match c.recv5().await {
        Packet::ConnAck(ack) => {
            assert_eq!(ack.code, ConnectReturnCode::BadAuthenticationMethod);
            assert!(!ack.session_present);
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }
    assert!(c.closed_within(WAIT).await.is_some());
}

#[tokio::test]
async fn disconnect_may_not_raise_zero_session_expiry() {
    let (_server, addr) = start().await;
    let (mut c, _) = Raw::connect5(addr, "zero", true, 0).await;
    c.disconnect5(DisconnectReasonCode::NormalDisconnection, Some(10))
        .await;
    assert_eq!(
        c.expect_disconnect5().await.reason_code,
        DisconnectReasonCode::ProtocolError
    );

    // Lowering a non-zero expiry to 0 is fine and ends the session.
    let (mut c, _) = Raw::connect5(addr, "lower", true, 30).await;
    c.disconnect5(DisconnectReasonCode::NormalDisconnection, Some(0))
        .await;
    assert_eq!(
        c.closed_within(WAIT).await,
        Some(vec![]),
        "no DISCONNECT back"
    );
    let (_c, ack) = Raw::connect5(addr, "lower", false, 30).await;
    assert!(
        !ack.session_present,
        "expiry 0 from DISCONNECT ends the session"
    );
}

#[tokio::test]
async fn shared_subscription_with_no_local_is_a_protocol_error() {
    let (_server, addr) = start().await;
    let (mut c, _) = Raw::connect5(addr, "c", true, 0).await;
    let mut f = filter5("$share/g/t", QoS::AtMostOnce);
    f.nolocal = true;
    c.send5(Packet::Subscribe(v5::Subscribe {
        pkid: 1,
        filters: vec![f],
        properties: None,
    }))
    .await;
    assert_eq!(
        c.expect_disconnect5().await.reason_code,
        DisconnectReasonCode::ProtocolError
    );
}

#[tokio::test]
async fn suback_reason_codes() {
    let (_server, addr) = start_with(|c| c.limits.max_subscriptions_per_client = 2).await;
    let (mut c, _) = Raw::connect5(addr, "c", true, 0).await;
    c.send5(Packet::Subscribe(v5::Subscribe {
        pkid: 4,
        filters: vec![
            filter5("a/#/b", QoS::AtMostOnce),
            filter5("one", QoS::AtLeastOnce),
            filter5("two", QoS::ExactlyOnce),
            filter5("three", QoS::AtMostOnce),
            // Replacing an existing subscription does not count against the limit.
            filter5("one", QoS::AtMostOnce),
        ],
        properties: None,
    }))
    .await;
    match c.recv5().await {
        Packet::SubAck(ack) => {
            assert_eq!(ack.pkid, 4);
            assert_eq!(
                ack.return_codes,
                vec![
                    SubscribeReasonCode::TopicFilterInvalid,
                    SubscribeReasonCode::Success(QoS::AtLeastOnce),
                    SubscribeReasonCode::Success(QoS::ExactlyOnce),
                    SubscribeReasonCode::QuotaExceeded,
                    SubscribeReasonCode::Success(QoS::AtMostOnce),
                ]
            );
        }
        other => panic!("expected SUBACK, got {other:?}"),
    }
}

#[tokio::test]
async fn unsuback_reason_codes() {
    let (_server, addr) = start().await;
    let (mut c, _) = Raw::connect5(addr, "c", true, 0).await;
    c.subscribe5(1, filter5("yes", QoS::AtMostOnce), None).await;
    let mut u = v5::Unsubscribe::new("yes", None);
    u.pkid = 2;
    u.filters.push("never".into());
    c.send5(Packet::Unsubscribe(u)).await;
    match c.recv5().await {
        Packet::UnsubAck(ack) => {
            assert_eq!(ack.pkid, 2);
            assert_eq!(
                ack.reasons,
                vec![
                    UnsubAckReason::Success,
                    UnsubAckReason::NoSubscriptionExisted
                ]
            );
        }
        other => panic!("expected UNSUBACK, got {other:?}"),
    }
}

#[tokio::test]
async fn pubrel_for_unknown_packet_id_gets_pubcomp_92() {
    let (_server, addr) = start().await;
    let (mut c, _) = Raw::connect5(addr, "c", true, 0).await;
    c.send5(Packet::PubRel(v5::PubRel::new(42, None))).await;
    match c.recv5().await {
        Packet::PubComp(comp) => assert_eq!(
            (comp.pkid, comp.reason),
            (42, PubCompReason::PacketIdentifierNotFound)
        ),
        other => panic!("expected PUBCOMP, got {other:?}"),
    }
}

#[tokio::test]
async fn qos2_exactly_once_with_duplicate_publish() {
    let (_server, addr) = start().await;
    let (mut sub, _) = Raw::connect5(addr, "sub", true, 0).await;
    sub.subscribe5(1, filter5("eo", QoS::ExactlyOnce), None)
        .await;
    let (mut publ, _) = Raw::connect5(addr, "pub", true, 0).await;
    publ.publish5(publish5_packet("eo", QoS::ExactlyOnce, 5, false, b"once"))
        .await;
    match publ.recv5().await {
        Packet::PubRec(r) => assert_eq!((r.pkid, r.reason), (5, PubRecReason::Success)),
        other => panic!("{other:?}"),
    }
    let mut dup = publish5_packet("eo", QoS::ExactlyOnce, 5, false, b"once");
    dup.dup = true;
    publ.publish5(dup).await;
    match publ.recv5().await {
        Packet::PubRec(r) => assert_eq!((r.pkid, r.reason), (5, PubRecReason::Success)),
        other => panic!("{other:?}"),
    }
    publ.send5(Packet::PubRel(v5::PubRel::new(5, None))).await;
    match publ.recv5().await {
        Packet::PubComp(c) => assert_eq!((c.pkid, c.reason), (5, PubCompReason::Success)),
        other => panic!("{other:?}"),
    }

    // The subscriber gets it once, and the outbound QoS 2 flow completes.
    let m = sub.recv_publish5().await;
    assert_eq!(
        (m.qos, &m.payload[..], m.dup),
        (QoS::ExactlyOnce, &b"once"[..], false)
    );
    sub.send5(Packet::PubRec(v5::PubRec::new(m.pkid, None)))
        .await;
    match sub.recv5().await {
        Packet::PubRel(r) => assert_eq!(r.pkid, m.pkid),
        other => panic!("expected PUBREL, got {other:?}"),
    }
    sub.send5(Packet::PubComp(v5::PubComp::new(m.pkid, None)))
        .await;
    assert!(
        sub.recv5_within(QUIET).await.is_none(),
        "QoS 2 delivered twice"
    );

    // After PUBCOMP the packet id is free again: a new PUBLISH with it is a new message.
    publ.publish5(publish5_packet("eo", QoS::ExactlyOnce, 5, false, b"again"))
        .await;
    assert!(matches!(publ.recv5().await, Packet::PubRec(r) if r.pkid == 5));
    publ.send5(Packet::PubRel(v5::PubRel::new(5, None))).await;
    assert!(matches!(publ.recv5().await, Packet::PubComp(_)));
    assert_eq!(&sub.recv_publish5().await.payload[..], b"again");
}

#[tokio::test]
async fn response_information_when_requested() {
    let (_server, addr) = common::start().await;
    let mut connect = common::connect5_packet("asker", true, 0);
    if let Some(p) = connect.properties.as_mut() {
        p.request_response_info = Some(1);
    }
    let (_c, ack) = Raw::connect5_with(addr, connect, None).await;
    assert_eq!(
        ack.properties
            .and_then(|p| p.response_information)
            .as_deref(),
        Some("responses/asker")
    );
    let (_c, ack) = Raw::connect5(addr, "quiet", true, 0).await;
    assert_eq!(ack.properties.and_then(|p| p.response_information), None);
}

/// Lingering close: keeps sending PINGREQ for a while after the broker decided to close (as a
/// client that has not read the DISCONNECT yet does), then reads to the end. Every write must
/// succeed, the DISCONNECT with `expected` must arrive, and the connection must end with a FIN,
/// not a reset.
async fn keeps_sending_then_gets_disconnect(c: &mut Raw, expected: DisconnectReasonCode) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    for i in 0..20 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if let Err(e) = c.stream.write_all(&[0xC0, 0x00]).await {
            panic!("write {i} after the close failed (reset instead of a lingering close): {e}");
        }
    }
    let mut bytes = Vec::new();
    let end = tokio::time::timeout(WAIT, c.stream.read_to_end(&mut bytes))
        .await
        .expect("the broker closes its side");
    if let Err(e) = end {
        panic!(
            "connection reset instead of closed ({} bytes read): {e}",
            bytes.len()
        );
    }
    let mut buf = bytes::BytesMut::from(&bytes[..]);
    let mut codes = Vec::new();
    while let Ok(packet) = Packet::read(&mut buf, None) {
        if let Packet::Disconnect(d) = packet {
            codes.push(d.reason_code);
        }
    }
    assert_eq!(codes, vec![expected]);
}

#[tokio::test]
async fn lingering_close_after_protocol_error_disconnect() {
    let (_server, addr) = start_with(|c| c.limits.max_inflight = 1).await;
    let (mut publ, _) = Raw::connect5(addr, "linger-93", true, 0).await;
    publ.publish5(publish5_packet("lg", QoS::ExactlyOnce, 1, false, b"x"))
        .await;
    assert!(matches!(publ.recv5().await, Packet::PubRec(r) if r.pkid == 1));
    // A second unreleased QoS 2 PUBLISH exceeds Receive Maximum 1: DISCONNECT 0x93.
    publ.publish5(publish5_packet("lg", QoS::ExactlyOnce, 2, false, b"x"))
        .await;
    keeps_sending_then_gets_disconnect(&mut publ, DisconnectReasonCode::ReceiveMaximumExceeded)
        .await;
}

#[tokio::test]
async fn lingering_close_after_takeover_disconnect() {
    let (_server, addr) = start().await;
    let (mut first, _) = Raw::connect5(addr, "linger-8e", true, 0).await;
    let (_second, _) = Raw::connect5(addr, "linger-8e", true, 0).await;
    keeps_sending_then_gets_disconnect(&mut first, DisconnectReasonCode::SessionTakenOver).await;
}

#[tokio::test]
async fn lingering_close_after_shutdown_disconnect() {
    let (server, addr) = start().await;
    let (mut c, _) = Raw::connect5(addr, "linger-8b", true, 0).await;
    let stopping = tokio::spawn(server.shutdown());
    keeps_sending_then_gets_disconnect(&mut c, DisconnectReasonCode::ServerShuttingDown).await;
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .expect("shutdown finished")
        .unwrap();
}
