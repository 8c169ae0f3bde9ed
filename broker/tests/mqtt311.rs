//! MQTT 3.1 / 3.1.1 behaviour over real TCP.

mod common;

use std::time::Duration;

use common::{start, start_with, Raw, QUIET, WAIT};
use rumqttc::mqttbytes::v4::{self, Packet};
use rumqttc::mqttbytes::QoS;

fn publish_of(p: Packet) -> v4::Publish {
    match p {
        Packet::Publish(p) => p,
        other => panic!("expected PUBLISH, got {other:?}"),
    }
}

#[tokio::test]
async fn qos_levels_acks_and_downgrade() {
    let (_server, addr) = start().await;
    let (mut sub2, ack) = Raw::connect4(addr, "sub2", true).await;
    assert_eq!(ack.code, v4::ConnectReturnCode::Success);
    assert!(!ack.session_present);
    sub2.subscribe4(1, "a/b", QoS::ExactlyOnce).await;
    let (mut sub0, _) = Raw::connect4(addr, "sub0", true).await;
    sub0.subscribe4(1, "a/+", QoS::AtMostOnce).await;
    let (mut publ, _) = Raw::connect4(addr, "pub", true).await;

    publ.publish4("a/b", QoS::AtMostOnce, 0, false, b"zero")
        .await;
    publ.publish4("a/b", QoS::AtLeastOnce, 7, false, b"one")
        .await;
    assert!(matches!(publ.recv4().await, Packet::PubAck(a) if a.pkid == 7));
    publ.publish4("a/b", QoS::ExactlyOnce, 8, false, b"two")
        .await;
    assert!(matches!(publ.recv4().await, Packet::PubRec(a) if a.pkid == 8));
    publ.send4(Packet::PubRel(v4::PubRel::new(8))).await;
    assert!(matches!(publ.recv4().await, Packet::PubComp(a) if a.pkid == 8));

    // The QoS 2 subscriber gets each message at the publisher's QoS, in order.
    let m = publish_of(sub2.recv4().await);
    assert_eq!((m.qos, &m.payload[..]), (QoS::AtMostOnce, &b"zero"[..]));
    let m = publish_of(sub2.recv4().await);
    assert_eq!((m.qos, &m.payload[..]), (QoS::AtLeastOnce, &b"one"[..]));
    assert_ne!(m.pkid, 0);
    sub2.send4(Packet::PubAck(v4::PubAck::new(m.pkid))).await;
    let m = publish_of(sub2.recv4().await);
    assert_eq!((m.qos, &m.payload[..]), (QoS::ExactlyOnce, &b"two"[..]));
    sub2.send4(Packet::PubRec(v4::PubRec::new(m.pkid))).await;
    assert!(matches!(sub2.recv4().await, Packet::PubRel(r) if r.pkid == m.pkid));
    sub2.send4(Packet::PubComp(v4::PubComp::new(m.pkid))).await;

    // The QoS 0 subscription downgrades everything to QoS 0.
    for expected in [&b"zero"[..], b"one", b"two"] {
        let m = publish_of(sub0.recv4().await);
        assert_eq!(
            (m.qos, &m.payload[..], m.retain),
            (QoS::AtMostOnce, expected, false)
        );
    }
}

#[tokio::test]
async fn wildcards_and_dollar_topics() {
    let (_server, addr) = start().await;
    let (mut all, _) = Raw::connect4(addr, "all", true).await;
    all.subscribe4(1, "#", QoS::AtMostOnce).await;
    let (mut sys, _) = Raw::connect4(addr, "sys", true).await;
    sys.subscribe4(1, "$SYS/#", QoS::AtMostOnce).await;
    let (mut publ, _) = Raw::connect4(addr, "pub", true).await;
    publ.publish4("$SYS/x", QoS::AtMostOnce, 0, false, b"s")
        .await;
    publ.publish4("sport/tennis", QoS::AtMostOnce, 0, false, b"t")
        .await;
    // "#" must not see the $-topic [MQTT-4.7.2-1].
    assert_eq!(publish_of(all.recv4().await).topic, "sport/tennis");
    assert_eq!(publish_of(sys.recv4().await).topic, "$SYS/x");
    assert!(all.recv4_within(QUIET).await.is_none());
}

#[tokio::test]
async fn overlapping_subscriptions_deliver_once_at_highest_qos() {
    let (_server, addr) = start().await;
    let (mut sub, _) = Raw::connect4(addr, "sub", true).await;
    sub.subscribe4(1, "x/#", QoS::AtMostOnce).await;
    sub.subscribe4(2, "x/+", QoS::AtLeastOnce).await;
    let (mut publ, _) = Raw::connect4(addr, "pub", true).await;
    publ.publish4("x/y", QoS::AtLeastOnce, 1, false, b"m").await;
    let m = publish_of(sub.recv4().await);
    assert_eq!(m.qos, QoS::AtLeastOnce);
    assert!(sub.recv4_within(QUIET).await.is_none(), "delivered twice");
}

#[tokio::test]
async fn retained_set_replace_delete() {
    let (_server, addr) = start().await;
    let (mut publ, _) = Raw::connect4(addr, "pub", true).await;
    publ.publish4("r/1", QoS::AtLeastOnce, 1, true, b"old")
        .await;
    publ.recv4().await;
    publ.publish4("r/1", QoS::AtLeastOnce, 2, true, b"new")
        .await;
    publ.recv4().await;
    publ.publish4("r/2", QoS::AtLeastOnce, 3, true, b"gone")
        .await;
    publ.recv4().await;
    publ.publish4("r/2", QoS::AtLeastOnce, 4, true, b"").await;
    publ.recv4().await;

    let (mut sub, _) = Raw::connect4(addr, "sub", true).await;
    sub.subscribe4(1, "r/+", QoS::AtLeastOnce).await;
    let m = publish_of(sub.recv4().await);
    assert_eq!(
        (&m.topic[..], &m.payload[..], m.retain),
        ("r/1", &b"new"[..], true)
    );
    sub.send4(Packet::PubAck(v4::PubAck::new(m.pkid))).await;
    assert!(
        sub.recv4_within(QUIET).await.is_none(),
        "deleted retained message was sent"
    );

    // A live message to an established subscription carries RETAIN=0 [MQTT-3.3.1-9].
    publ.publish4("r/3", QoS::AtMostOnce, 0, true, b"live")
        .await;
    let m = publish_of(sub.recv4().await);
    assert!(!m.retain);
}

#[tokio::test]
async fn will_on_abnormal_close_not_on_disconnect() {
    let (_server, addr) = start().await;
    let (mut watcher, _) = Raw::connect4(addr, "watcher", true).await;
    watcher.subscribe4(1, "wills/#", QoS::AtLeastOnce).await;

    for (id, graceful) in [("polite", true), ("crasher", false)] {
        let mut c = Raw::connect(addr).await;
        let mut connect = v4::Connect::new(id);
        connect.keep_alive = 30;
        connect.last_will = Some(v4::LastWill::new(
            format!("wills/{id}"),
            "gone",
            QoS::AtLeastOnce,
            false,
        ));
        c.send4(Packet::Connect(connect)).await;
        assert!(matches!(c.recv4().await, Packet::ConnAck(_)));
        if graceful {
            c.send4(Packet::Disconnect).await;
        }
        drop(c);
    }
    let m = publish_of(watcher.recv4().await);
    assert_eq!(m.topic, "wills/crasher");
    watcher.send4(Packet::PubAck(v4::PubAck::new(m.pkid))).await;
    assert!(
        watcher.recv4_within(QUIET).await.is_none(),
        "will sent after DISCONNECT"
    );
}

#[tokio::test]
async fn persistent_session_queues_and_redelivers_with_dup() {
    let (_server, addr) = start().await;
    let (mut sub, ack) = Raw::connect4(addr, "dev", false).await;
    assert!(!ack.session_present);
    sub.subscribe4(1, "q", QoS::AtLeastOnce).await;
    let (mut publ, _) = Raw::connect4(addr, "pub", true).await;
    publ.publish4("q", QoS::AtLeastOnce, 1, false, b"m1").await;
    publ.recv4().await;
    // Received but never acknowledged, then the connection drops.
    let m1 = publish_of(sub.recv4().await);
    assert!(!m1.dup);
    drop(sub);
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Published while offline.
    publ.publish4("q", QoS::AtLeastOnce, 2, false, b"m2").await;
    publ.recv4().await;

    let (mut sub, ack) = Raw::connect4(addr, "dev", false).await;
    assert!(ack.session_present);
    let again = publish_of(sub.recv4().await);
    assert_eq!(
        (&again.payload[..], again.dup, again.pkid),
        (&b"m1"[..], true, m1.pkid)
    );
    sub.send4(Packet::PubAck(v4::PubAck::new(again.pkid))).await;
    let m2 = publish_of(sub.recv4().await);
    assert_eq!((&m2.payload[..], m2.dup), (&b"m2"[..], false));
    sub.send4(Packet::PubAck(v4::PubAck::new(m2.pkid))).await;

    // A clean session throws it all away.
    drop(sub);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (_sub, ack) = Raw::connect4(addr, "dev", true).await;
    assert!(!ack.session_present);
}

#[tokio::test]
async fn qos2_duplicate_publish_is_routed_once() {
    let (_server, addr) = start().await;
    let (mut sub, _) = Raw::connect4(addr, "sub", true).await;
    sub.subscribe4(1, "e", QoS::AtMostOnce).await;
    let (mut publ, _) = Raw::connect4(addr, "pub", true).await;
    publ.publish4("e", QoS::ExactlyOnce, 5, false, b"once")
        .await;
    assert!(matches!(publ.recv4().await, Packet::PubRec(_)));
    let mut dup = v4::Publish::new("e", QoS::ExactlyOnce, b"once".to_vec());
    dup.pkid = 5;
    dup.dup = true;
    publ.send4(Packet::Publish(dup)).await;
    assert!(matches!(publ.recv4().await, Packet::PubRec(r) if r.pkid == 5));
    publ.send4(Packet::PubRel(v4::PubRel::new(5))).await;
    assert!(matches!(publ.recv4().await, Packet::PubComp(_)));
    publish_of(sub.recv4().await);
    assert!(
        sub.recv4_within(QUIET).await.is_none(),
        "QoS 2 delivered twice"
    );
}

#[tokio::test]
async fn session_takeover_closes_the_old_connection() {
    let (_server, addr) = start().await;
    let (mut first, _) = Raw::connect4(addr, "same", false).await;
    first.subscribe4(1, "t", QoS::AtLeastOnce).await;
    let (mut second, ack) = Raw::connect4(addr, "same", false).await;
    assert!(
        ack.session_present,
        "the session moves to the new connection"
    );
    assert!(first.closed_within(WAIT).await.is_some());
    let (mut publ, _) = Raw::connect4(addr, "pub", true).await;
    publ.publish4("t", QoS::AtMostOnce, 0, false, b"x").await;
    assert_eq!(publish_of(second.recv4().await).topic, "t");
}

#[tokio::test]
async fn client_identifier_rules() {
    let (_server, addr) = start().await;
    // 3.1.1: empty id with clean session is assigned one.
    let (_c, ack) = Raw::connect4(addr, "", true).await;
    assert_eq!(ack.code, v4::ConnectReturnCode::Success);
    // 3.1.1: empty id with a persistent session is rejected with 0x02 [MQTT-3.1.3-8].
    let (mut c, ack) = Raw::connect4(addr, "", false).await;
    assert_eq!(ack.code, v4::ConnectReturnCode::BadClientId);
    assert!(c.closed_within(WAIT).await.is_some());
}

#[tokio::test]
async fn mqtt31_connect_is_accepted() {
    let (_server, addr) = start().await;
    let mut c = Raw::connect(addr).await;
    // CONNECT, protocol name "MQIsdp", level 3, clean session, keep-alive 10, client id
    // longer than 3.1's advisory 23 bytes.
    let id = b"a-client-id-longer-than-23-bytes";
    let mut body = vec![
        0x00, 0x06, b'M', b'Q', b'I', b's', b'd', b'p', 0x03, 0x02, 0x00, 0x0a,
    ];
    body.extend_from_slice(&(id.len() as u16).to_be_bytes());
    body.extend_from_slice(id);
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend_from_slice(&body);
    c.send_bytes(&packet).await;
    match c.recv4().await {
        Packet::ConnAck(ack) => {
            assert_eq!(ack.code, v4::ConnectReturnCode::Success);
            assert!(!ack.session_present);
        }
        other => panic!("{other:?}"),
    }
    c.subscribe4(1, "t31", QoS::AtLeastOnce).await;
    c.publish4("t31", QoS::AtLeastOnce, 3, false, b"hi").await;
    let mut got_puback = false;
    let mut got_publish = false;
    for _ in 0..2 {
        match c.recv4().await {
            Packet::PubAck(_) => got_puback = true,
            Packet::Publish(p) => got_publish = p.payload[..] == b"hi"[..],
            other => panic!("{other:?}"),
        }
    }
    assert!(got_puback && got_publish);
}

/// CONNECT with protocol name `name` and level `level`, clean session, keep-alive 10, id "x".
fn connect_with_level(name: &[u8], level: u8) -> Vec<u8> {
    let mut body = vec![0x00, name.len() as u8];
    body.extend_from_slice(name);
    body.extend_from_slice(&[level, 0x02, 0x00, 0x0a, 0x00, 0x01, b'x']);
    let mut frame = vec![0x10, body.len() as u8];
    frame.extend_from_slice(&body);
    frame
}

#[tokio::test]
async fn unknown_protocol_level_gets_v5_connack_0x84_then_close() {
    let (_server, addr) = start().await;
    // A level nobody defined (not 3, 4 or 5) comes from a client newer than 3.1.1: it gets
    // the v5 CONNACK 0x84 (Unsupported Protocol Version), then the connection closes.
    for level in [0u8, 2, 6, 7, 255] {
        let mut c = Raw::connect(addr).await;
        c.send_bytes(&connect_with_level(b"MQTT", level)).await;
        let bytes = c.closed_within(WAIT).await.expect("connection closed");
        assert_eq!(bytes, vec![0x20, 0x03, 0x00, 0x84, 0x00], "level {level}");
    }
    // A 3.x level under the other version's name is an old client: v3 CONNACK 0x01.
    for (name, level) in [(&b"MQTT"[..], 3u8), (&b"MQIsdp"[..], 4)] {
        let mut c = Raw::connect(addr).await;
        c.send_bytes(&connect_with_level(name, level)).await;
        let bytes = c.closed_within(WAIT).await.expect("connection closed");
        assert_eq!(bytes, vec![0x20, 0x02, 0x00, 0x01], "level {level}");
    }
}

#[tokio::test]
async fn malformed_input_closes_the_connection() {
    let (_server, addr) = start().await;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        // SUBSCRIBE with fixed-header flags 0 instead of 0b0010.
        (
            "subscribe flags",
            vec![0x80, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x00],
        ),
        // PUBLISH with QoS 3.
        (
            "publish qos 3",
            vec![0x36, 0x05, 0x00, 0x01, b'a', 0x00, 0x01],
        ),
        // PUBLISH with a wildcard in the topic.
        ("publish wildcard", vec![0x30, 0x03, 0x00, 0x01, b'#']),
        // Remaining length with five continuation bytes.
        ("remaining length", vec![0x30, 0xff, 0xff, 0xff, 0xff, 0x7f]),
        // A second CONNECT.
        (
            "second connect",
            vec![
                0x10, 0x0d, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x0a, 0x00, 0x01,
                b'y',
            ],
        ),
    ];
    for (what, bytes) in cases {
        let (mut c, _) = Raw::connect4(addr, "bad", true).await;
        c.send_bytes(&bytes).await;
        assert!(c.closed_within(WAIT).await.is_some(), "{what}: not closed");
    }
    // And the broker still serves others.
    let (mut ok, ack) = Raw::connect4(addr, "good", true).await;
    assert_eq!(ack.code, v4::ConnectReturnCode::Success);
    ok.subscribe4(1, "still/alive", QoS::AtMostOnce).await;
}

#[tokio::test]
async fn keep_alive_is_enforced_at_one_and_a_half_times() {
    let (_server, addr) = start().await;
    let mut c = Raw::connect(addr).await;
    let mut connect = v4::Connect::new("sleepy");
    connect.keep_alive = 1;
    c.send4(Packet::Connect(connect)).await;
    c.recv4().await;
    let started = std::time::Instant::now();
    assert!(c.closed_within(Duration::from_secs(4)).await.is_some());
    assert!(started.elapsed() >= Duration::from_millis(1400));

    // Keep-alive 0 means no timeout.
    let mut c = Raw::connect(addr).await;
    let mut connect = v4::Connect::new("forever");
    connect.keep_alive = 0;
    c.send4(Packet::Connect(connect)).await;
    c.recv4().await;
    assert!(c.closed_within(Duration::from_secs(2)).await.is_none());
}

#[tokio::test]
async fn connect_timeout_closes_silent_sockets() {
    let (_server, addr) = start_with(|c| c.limits.connect_timeout_secs = 1).await;
    let mut c = Raw::connect(addr).await;
    assert!(c.closed_within(Duration::from_secs(3)).await.is_some());
}

#[tokio::test]
async fn shared_subscription_round_robin() {
    let (_server, addr) = start().await;
    let (mut a, _) = Raw::connect4(addr, "a", true).await;
    a.subscribe4(1, "$share/g/jobs/#", QoS::AtMostOnce).await;
    let (mut b, _) = Raw::connect4(addr, "b", true).await;
    b.subscribe4(1, "$share/g/jobs/#", QoS::AtMostOnce).await;
    let (mut publ, _) = Raw::connect4(addr, "pub", true).await;
    for i in 0..10u8 {
        publ.publish4("jobs/x", QoS::AtMostOnce, 0, false, &[i])
            .await;
    }
    let mut counts = [0, 0];
    for (i, c) in [&mut a, &mut b].into_iter().enumerate() {
        while let Some(p) = c.recv4_within(QUIET).await {
            publish_of(p);
            counts[i] += 1;
        }
    }
    assert_eq!(counts, [5, 5]);
}

#[tokio::test]
async fn invalid_filter_gets_failure_return_code() {
    let (_server, addr) = start().await;
    let (mut c, _) = Raw::connect4(addr, "c", true).await;
    let mut s = v4::Subscribe::new("a/#/b", QoS::AtMostOnce);
    s.pkid = 3;
    s.filters
        .push(v4::SubscribeFilter::new("ok/+".into(), QoS::AtLeastOnce));
    c.send4(Packet::Subscribe(s)).await;
    match c.recv4().await {
        Packet::SubAck(ack) => assert_eq!(
            ack.return_codes,
            vec![
                v4::SubscribeReasonCode::Failure,
                v4::SubscribeReasonCode::Success(QoS::AtLeastOnce)
            ]
        ),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn order_is_kept_per_publisher_and_topic() {
    let (_server, addr) = start_with(|c| c.limits.max_inflight = 100).await;
    let (mut sub, _) = Raw::connect4(addr, "sub", true).await;
    sub.subscribe4(1, "seq", QoS::AtLeastOnce).await;
    let (mut publ, _) = Raw::connect4(addr, "pub", true).await;
    const N: u32 = 2_000;
    for i in 0..N {
        publ.publish4(
            "seq",
            QoS::AtLeastOnce,
            (i % 60_000 + 1) as u16,
            false,
            &i.to_be_bytes(),
        )
        .await;
    }
    for i in 0..N {
        let m = publish_of(sub.recv4().await);
        assert_eq!(m.payload[..], i.to_be_bytes());
        sub.send4(Packet::PubAck(v4::PubAck::new(m.pkid))).await;
    }
}

#[tokio::test]
async fn offline_device_queue_keeps_the_newest_up_to_its_limit() {
    let (_server, addr) = start_with(|c| c.device.queue_limit = 5).await;
    let (mut sub, _) = Raw::connect4(addr, "dev", false).await;
    sub.subscribe4(1, "b", QoS::AtLeastOnce).await;
    drop(sub);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (mut publ, _) = Raw::connect4(addr, "pub", true).await;
    for i in 0..20u8 {
        publ.publish4("b", QoS::AtLeastOnce, u16::from(i) + 1, false, &[i])
            .await;
        publ.recv4().await;
    }
    let (mut sub, _) = Raw::connect4(addr, "dev", false).await;
    let mut got = Vec::new();
    while let Some(p) = sub.recv4_within(QUIET).await {
        let m = publish_of(p);
        got.push(m.payload[0]);
        sub.send4(Packet::PubAck(v4::PubAck::new(m.pkid))).await;
    }
    // The oldest were trimmed when the queue passed its limit.
    assert_eq!(got, vec![15, 16, 17, 18, 19]);
}

#[tokio::test]
async fn clean_session_queue_is_bounded_and_drops_newest() {
    // A slow clean-session subscriber's in-memory queue: when full, new messages are dropped.
    let (_server, addr) = start_with(|c| {
        c.limits.max_queued_messages = 5;
        c.limits.max_inflight = 1;
    })
    .await;
    let (mut sub, _) = Raw::connect4(addr, "slow", true).await;
    sub.subscribe4(1, "b", QoS::AtLeastOnce).await;
    let (mut publ, _) = Raw::connect4(addr, "pub", true).await;
    for i in 0..20u8 {
        publ.publish4("b", QoS::AtLeastOnce, u16::from(i) + 1, false, &[i])
            .await;
        publ.recv4().await;
    }
    let mut got = Vec::new();
    while let Some(p) = sub.recv4_within(QUIET).await {
        let m = publish_of(p);
        got.push(m.payload[0]);
        sub.send4(Packet::PubAck(v4::PubAck::new(m.pkid))).await;
    }
    // One in flight, five queued; the rest were dropped.
    assert_eq!(got, vec![0, 1, 2, 3, 4, 5]);
}

#[tokio::test]
async fn a_connected_subscriber_that_keeps_up_loses_nothing_under_overload() {
    // Queue of 5 and one message in flight: a publisher that floods must be held back (it stops
    // being read) rather than have its messages dropped for a subscriber that is reading.
    let (_server, addr) = start_with(|c| {
        c.limits.max_queued_messages = 5;
        c.limits.max_inflight = 1;
    })
    .await;
    let (mut sub, _) = Raw::connect4(addr, "reader", true).await;
    sub.subscribe4(1, "flood", QoS::AtLeastOnce).await;
    let (mut publ, _) = Raw::connect4(addr, "flooder", true).await;
    const N: u16 = 300;
    let publisher = tokio::spawn(async move {
        for i in 0..N {
            publ.publish4("flood", QoS::AtLeastOnce, i + 1, false, &i.to_be_bytes())
                .await;
        }
        for _ in 0..N {
            assert!(matches!(publ.recv4().await, Packet::PubAck(_)));
        }
    });
    for i in 0..N {
        let m = publish_of(sub.recv4().await);
        assert_eq!(m.payload[..], i.to_be_bytes(), "lost or reordered at {i}");
        sub.send4(Packet::PubAck(v4::PubAck::new(m.pkid))).await;
    }
    publisher.await.unwrap();
}

#[tokio::test]
async fn packets_pipelined_behind_connect_are_handled() {
    let (_server, addr) = start().await;
    let mut c = Raw::connect(addr).await;
    let mut bytes = bytes::BytesMut::new();
    let mut connect = v4::Connect::new("pipeliner");
    connect.keep_alive = 30;
    connect.write(&mut bytes).unwrap();
    let mut sub = v4::Subscribe::new("pipe", QoS::AtMostOnce);
    sub.pkid = 1;
    sub.write(&mut bytes).unwrap();
    v4::Publish::new("pipe", QoS::AtMostOnce, b"same segment".to_vec())
        .write(&mut bytes)
        .unwrap();
    // One write: CONNECT, SUBSCRIBE and PUBLISH arrive together, and nothing follows.
    c.send_bytes(&bytes).await;
    assert!(matches!(c.recv4().await, Packet::ConnAck(_)));
    assert!(matches!(c.recv4().await, Packet::SubAck(_)));
    assert_eq!(&publish_of(c.recv4().await).payload[..], b"same segment");
}
