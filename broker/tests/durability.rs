//! The durable path in one process: APPLICATION logs, DEVICE queue TTL, ordered acks across
//! storage waits, session expiry. Crash and restart behaviour is proven with real processes in
//! `e2e/tests/crash.rs`.

mod common;

use std::time::Duration;

use common::{start_with, Raw, QUIET};
use ferrymq::config::ApplicationClientConfig;
use rumqttc::mqttbytes::v4::{self, Packet};
use rumqttc::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5;

fn publish_of(p: Packet) -> v4::Publish {
    match p {
        Packet::Publish(p) => p,
        other => panic!("expected PUBLISH, got {other:?}"),
    }
}

/// Connects a v5 client with the given session expiry, subscribes at QoS 1 and leaves, so its
/// session waits offline.
async fn park_subscriber5(addr: std::net::SocketAddr, id: &str, expiry: u32, filter: &str) {
    let (mut sub, _) = Raw::connect5(addr, id, true, expiry).await;
    sub.subscribe5(
        1,
        common::filter5(filter, rumqttc::v5::mqttbytes::QoS::AtLeastOnce),
        None,
    )
    .await;
    drop(sub);
    tokio::time::sleep(Duration::from_millis(100)).await;
}

#[tokio::test]
async fn application_client_is_always_persistent_and_reads_everything_in_order() {
    let (_server, addr) = start_with(|c| {
        c.application_clients.push(ApplicationClientConfig {
            client_id: "analytics".into(),
        })
    })
    .await;
    // Even with clean_session=1 an APPLICATION client keeps its session and log.
    let (mut app, ack) = Raw::connect4(addr, "analytics", true).await;
    assert!(!ack.session_present);
    app.subscribe4(1, "telemetry/#", QoS::AtLeastOnce).await;
    app.send4(Packet::Disconnect).await;
    drop(app);

    let (mut publ, _) = Raw::connect4(addr, "dev-1", true).await;
    const N: u32 = 3_000;
    for i in 0..N {
        publ.publish4(
            &format!("telemetry/{}", i % 7),
            QoS::AtLeastOnce,
            (i % 60_000 + 1) as u16,
            false,
            &i.to_be_bytes(),
        )
        .await;
    }
    for _ in 0..N {
        assert!(matches!(publ.recv4().await, Packet::PubAck(_)));
    }

    let (mut app, ack) = Raw::connect4(addr, "analytics", true).await;
    assert!(
        ack.session_present,
        "APPLICATION sessions survive clean_session=1"
    );
    for i in 0..N {
        let m = publish_of(app.recv4().await);
        assert_eq!(
            m.payload[..],
            i.to_be_bytes(),
            "out of order or missing at {i}"
        );
        app.send4(Packet::PubAck(v4::PubAck::new(m.pkid))).await;
    }
    assert!(app.recv4_within(QUIET).await.is_none());
}

#[tokio::test]
async fn acks_leave_in_arrival_order_when_some_wait_for_storage() {
    let (_server, addr) = start_with(|_| {}).await;
    // "p" reaches a persistent subscriber (its PUBACK waits for an fsync); "c" only a clean one
    // (its PUBACK could go at once, but must not overtake).
    let (mut persistent, _) = Raw::connect4(addr, "durable-sub", false).await;
    persistent.subscribe4(1, "p", QoS::AtLeastOnce).await;
    let (mut clean, _) = Raw::connect4(addr, "clean-sub", true).await;
    clean.subscribe4(1, "c", QoS::AtLeastOnce).await;
    let (mut publ, _) = Raw::connect4(addr, "pub", true).await;
    for pkid in 1..=200u16 {
        let topic = if pkid % 2 == 0 { "p" } else { "c" };
        publ.publish4(topic, QoS::AtLeastOnce, pkid, false, b"x")
            .await;
    }
    for expected in 1..=200u16 {
        match publ.recv4().await {
            Packet::PubAck(ack) => assert_eq!(ack.pkid, expected, "acks out of order"),
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test]
async fn device_queue_ttl_and_message_expiry() {
    let (_server, addr) = start_with(|c| c.device.message_ttl_secs = 1).await;
    park_subscriber5(addr, "meter", 3600, "m").await;
    let (mut publ, _) = Raw::connect4(addr, "pub", true).await;
    publ.publish4("m", QoS::AtLeastOnce, 1, false, b"old").await;
    publ.recv4().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    publ.publish4("m", QoS::AtLeastOnce, 2, false, b"fresh")
        .await;
    publ.recv4().await;

    let (mut sub, ack) = Raw::connect5(addr, "meter", false, 3600).await;
    assert!(ack.session_present);
    match sub.recv5().await {
        v5::Packet::Publish(p) => assert_eq!(&p.payload[..], b"fresh"),
        other => panic!("{other:?}"),
    }
    assert!(
        sub.recv5_within(QUIET).await.is_none(),
        "a message past the DEVICE TTL was delivered"
    );
}

#[tokio::test]
async fn shorter_message_expiry_wins_over_the_device_ttl() {
    let (_server, addr) = start_with(|_| {}).await;
    park_subscriber5(addr, "meter", 3600, "m").await;
    let (mut publ, _) = Raw::connect5(addr, "pub5", true, 0).await;
    for (pkid, expiry, body) in [(1u16, Some(1u32), "short"), (2, None, "long")] {
        let properties = expiry.map(|e| v5::PublishProperties {
            message_expiry_interval: Some(e),
            ..Default::default()
        });
        let mut p = v5::Publish::new(
            "m",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            body,
            properties,
        );
        p.pkid = pkid;
        publ.send5(v5::Packet::Publish(p)).await;
        publ.recv5().await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (mut sub, _) = Raw::connect5(addr, "meter", false, 3600).await;
    match sub.recv5().await {
        v5::Packet::Publish(p) => assert_eq!(&p.payload[..], b"long"),
        other => panic!("{other:?}"),
    }
    assert!(sub.recv5_within(QUIET).await.is_none());
}

#[tokio::test]
async fn expired_session_is_gone_with_its_queue() {
    let (_server, addr) = start_with(|_| {}).await;
    park_subscriber5(addr, "brief", 1, "e").await;
    let (mut publ, _) = Raw::connect4(addr, "pub", true).await;
    publ.publish4("e", QoS::AtLeastOnce, 1, false, b"late")
        .await;
    publ.recv4().await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (mut sub, ack) = Raw::connect5(addr, "brief", false, 60).await;
    assert!(!ack.session_present, "session outlived its expiry");
    assert!(sub.recv5_within(QUIET).await.is_none());
}

#[tokio::test]
async fn application_client_cannot_end_its_session_on_disconnect() {
    let (_server, addr) = start_with(|c| {
        c.application_clients.push(ApplicationClientConfig {
            client_id: "app5".into(),
        })
    })
    .await;
    let (mut app, ack) = Raw::connect5(addr, "app5", true, 0).await;
    // Told that its session never expires.
    assert_eq!(
        ack.properties.and_then(|p| p.session_expiry_interval),
        Some(u32::MAX)
    );
    app.subscribe5(
        1,
        common::filter5("a", rumqttc::v5::mqttbytes::QoS::AtLeastOnce),
        None,
    )
    .await;
    app.send5(v5::Packet::Disconnect(v5::Disconnect {
        reason_code: v5::DisconnectReasonCode::NormalDisconnection,
        properties: Some(v5::DisconnectProperties {
            session_expiry_interval: Some(0),
            reason_string: None,
            user_properties: vec![],
            server_reference: None,
        }),
    }))
    .await;
    drop(app);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (mut publ, _) = Raw::connect4(addr, "pub", true).await;
    publ.publish4("a", QoS::AtLeastOnce, 1, false, b"kept")
        .await;
    publ.recv4().await;
    let (mut app, ack) = Raw::connect5(addr, "app5", true, 0).await;
    assert!(
        ack.session_present,
        "DISCONNECT with expiry 0 ended an APPLICATION session"
    );
    match app.recv5().await {
        v5::Packet::Publish(p) => assert_eq!(&p.payload[..], b"kept"),
        other => panic!("{other:?}"),
    }
}
