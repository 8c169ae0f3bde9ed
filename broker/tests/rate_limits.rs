//! Connection-rate and per-client publish-rate limits, with the reason codes clients see.

mod common;

use std::time::Duration;

use bytes::BytesMut;
use common::*;
use ferrymq::metrics::ConnectResult;
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;
use rumqttc::v5::mqttbytes::QoS;

#[tokio::test]
async fn connections_over_the_rate_get_0x9f_or_0x03() {
    let (server, addr) = start_with(|c| c.limits.max_connection_rate = 2).await;
    let metrics = &server.broker.metrics;

    let mut kept = Vec::new();
    let (mut accepted, mut refused) = (0, 0);
    for i in 0..8 {
        let (c, ack) = Raw::connect5(addr, &format!("burst-{i}"), true, 0).await;
        match ack.code {
            v5::ConnectReturnCode::Success => {
                accepted += 1;
                kept.push(c);
            }
            v5::ConnectReturnCode::ConnectionRateExceeded => refused += 1,
            other => panic!("unexpected CONNACK code {other:?}"),
        }
    }
    assert!(accepted >= 2, "the burst of two is admitted");
    assert!(
        refused >= 1,
        "eight connections at once exceed two per second"
    );

    // A 3.1.1 client has no rate code: 0x03 (server unavailable), then the socket closes.
    let mut v3_refused = false;
    for i in 0..20 {
        let (mut c, ack) = Raw::connect4(addr, &format!("v3-{i}"), true).await;
        if ack.code == v4::ConnectReturnCode::ServiceUnavailable {
            assert!(c.closed_within(WAIT).await.is_some());
            refused += 1;
            v3_refused = true;
            break;
        }
        assert_eq!(ack.code, v4::ConnectReturnCode::Success);
    }
    assert!(v3_refused);
    assert_eq!(
        metrics.listener("tcp").connection_rate_limited.get(),
        refused
    );
    assert_eq!(
        metrics.connects(ConnectResult::ConnectionRateExceeded),
        refused
    );

    // Admitted connections are unaffected, and the bucket refills.
    for c in kept.iter_mut() {
        c.send5(v5::Packet::PingReq(v5::PingReq)).await;
        assert!(matches!(c.recv5().await, v5::Packet::PingResp(_)));
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (_c, ack) = Raw::connect5(addr, "later", true, 0).await;
    assert_eq!(ack.code, v5::ConnectReturnCode::Success);
    server.shutdown().await;
}

/// `n` QoS 0 PUBLISH packets to `topic`, encoded back to back.
fn burst5(topic: &str, n: usize) -> Vec<u8> {
    let mut out = BytesMut::new();
    for i in 0..n {
        v5::Packet::Publish(publish5_packet(
            topic,
            QoS::AtMostOnce,
            0,
            false,
            format!("{i}").as_bytes(),
        ))
        .write(&mut out, None)
        .unwrap();
    }
    out.to_vec()
}

#[tokio::test]
async fn publishers_over_the_rate_are_disconnected_with_0x96() {
    let (server, addr) = start_with(|c| c.limits.max_publish_rate = 5).await;
    let metrics = &server.broker.metrics;
    let (mut sub, _) = Raw::connect5(addr, "watcher", true, 0).await;
    sub.subscribe5(1, filter5("rate/#", QoS::AtMostOnce), None)
        .await;

    // v5: twenty publishes at once; the first five (the burst) go through, then 0x96.
    let (mut fast, _) = Raw::connect5(addr, "fast", true, 0).await;
    fast.send_bytes(&burst5("rate/fast", 20)).await;
    let d = fast.expect_disconnect5().await;
    assert_eq!(d.reason_code, v5::DisconnectReasonCode::MessageRateTooHigh);
    assert!(fast.closed_within(WAIT).await.is_some());
    let mut delivered = 0;
    while let Some(p) = sub.recv5_within(QUIET).await {
        if let v5::Packet::Publish(p) = p {
            assert_eq!(p.payload.as_ref(), format!("{delivered}").as_bytes());
            delivered += 1;
        }
    }
    assert!((5..20).contains(&delivered), "delivered {delivered}");

    // v3: the same burst closes the connection (3.1.1 has no reason codes).
    let (mut old, _) = Raw::connect4(addr, "fast-v3", true).await;
    let mut out = BytesMut::new();
    for _ in 0..20 {
        v4::Publish::new("rate/v3", rumqttc::mqttbytes::QoS::AtMostOnce, "x")
            .write(&mut out)
            .unwrap();
    }
    old.send_bytes(&out).await;
    assert!(old.closed_within(WAIT).await.is_some());

    // A client below the rate stays connected.
    let (mut steady, _) = Raw::connect5(addr, "steady", true, 0).await;
    for i in 0..8 {
        steady
            .publish5(publish5_packet(
                "rate/steady",
                QoS::AtLeastOnce,
                i + 1,
                false,
                b"s",
            ))
            .await;
        match steady.recv5().await {
            v5::Packet::PubAck(ack) => assert_eq!(ack.pkid, i + 1),
            other => panic!("expected PUBACK, got {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(metrics.publish_rate_limited.get(), 2);
    assert_eq!(
        metrics.protocol_errors.get(),
        0,
        "a rate limit is not a protocol error"
    );
    server.shutdown().await;
}
