//! MQTT over WebSocket and secure WebSocket: the `mqtt` subprotocol, packets that span frames and
//! frames that hold several packets, refused upgrades, and hostile frames.

mod common;

use bytes::{Bytes, BytesMut};
use common::net::*;
use common::*;
use ferrymq::config::ListenerProtocol;
use ferrymq::metrics::HandshakeStage;
use futures_util::{SinkExt, StreamExt};
use rumqttc::v5::mqttbytes::v5;
use rumqttc::v5::mqttbytes::QoS;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

fn encode5(packet: v5::Packet) -> Vec<u8> {
    let mut out = BytesMut::new();
    packet.write(&mut out, None).unwrap();
    out.to_vec()
}

async fn ws_raw(addr: std::net::SocketAddr, id: &str) -> Raw {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let ws = ws_upgrade(tcp, "/mqtt", Some("mqtt")).await.unwrap();
    let mut c = Raw::over(ws_bytes(ws));
    let ack = c.handshake5(connect5_packet(id, true, 0), None).await;
    assert_eq!(ack.code, v5::ConnectReturnCode::Success);
    c
}

#[tokio::test]
async fn publish_and_subscribe_across_websocket_and_tcp() {
    let (server, addrs, recorder) = start_listeners(
        vec![
            listener("tcp", ListenerProtocol::Mqtt),
            listener("web", ListenerProtocol::Ws),
        ],
        |_| {},
    )
    .await;
    let (tcp, ws) = (addrs[0], addrs[1]);

    let mut ws_sub = ws_raw(ws, "ws-sub").await;
    ws_sub
        .subscribe5(1, filter5("mixed/#", QoS::AtLeastOnce), None)
        .await;
    let (mut tcp_sub, _) = Raw::connect5(tcp, "tcp-sub", true, 0).await;
    tcp_sub
        .subscribe5(1, filter5("mixed/#", QoS::AtLeastOnce), None)
        .await;

    // A payload larger than one outgoing WebSocket frame (64 KiB) travels whole.
    let mut publisher = ws_raw(ws, "ws-pub").await;
    let payload = vec![3u8; 150_000];
    publisher
        .publish5(publish5_packet(
            "mixed/a",
            QoS::AtLeastOnce,
            1,
            false,
            &payload,
        ))
        .await;
    match publisher.recv5().await {
        v5::Packet::PubAck(ack) => assert_eq!(ack.pkid, 1),
        other => panic!("expected PUBACK, got {other:?}"),
    }
    for sub in [&mut ws_sub, &mut tcp_sub] {
        let got = sub.recv_publish5().await;
        assert_eq!(got.topic.as_ref(), b"mixed/a");
        assert_eq!(got.payload.len(), payload.len());
    }
    assert_eq!(recorder.last("ws-pub").unwrap().listener, "web");
    assert_eq!(recorder.last("tcp-sub").unwrap().listener, "tcp");
    server.shutdown().await;
}

#[tokio::test]
async fn packets_span_frames_and_frames_hold_several_packets() {
    let (server, addrs, _) =
        start_listeners(vec![listener("web", ListenerProtocol::Ws)], |_| {}).await;
    let tcp = TcpStream::connect(addrs[0]).await.unwrap();
    let mut ws = ws_upgrade(tcp, "/mqtt", Some("mqtt")).await.unwrap();

    // CONNECT in three frames, cut inside the fixed header and inside the variable header.
    let connect = encode5(v5::Packet::Connect(
        connect5_packet("framer", true, 0),
        None,
        None,
    ));
    for part in [&connect[..1], &connect[1..6], &connect[6..]] {
        ws.send(Message::Binary(Bytes::copy_from_slice(part)))
            .await
            .unwrap();
    }
    // SUBSCRIBE, PUBLISH (QoS 1) and PINGREQ in one frame, then the start of a second PUBLISH
    // whose rest follows in the next frame.
    let mut batch = encode5(v5::Packet::Subscribe(v5::Subscribe {
        pkid: 1,
        filters: vec![filter5("frames/#", QoS::AtLeastOnce)],
        properties: None,
    }));
    batch.extend(encode5(v5::Packet::Publish(publish5_packet(
        "frames/one",
        QoS::AtLeastOnce,
        2,
        false,
        b"first",
    ))));
    batch.extend(encode5(v5::Packet::PingReq(v5::PingReq)));
    let second = encode5(v5::Packet::Publish(publish5_packet(
        "frames/two",
        QoS::AtLeastOnce,
        3,
        false,
        b"second",
    )));
    batch.extend_from_slice(&second[..4]);
    ws.send(Message::Binary(batch.into())).await.unwrap();
    ws.send(Message::Binary(Bytes::copy_from_slice(&second[4..])))
        .await
        .unwrap();

    let mut buf = BytesMut::new();
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while seen.len() < 7 {
        match v5::Packet::read(&mut buf, None) {
            Ok(p) => {
                seen.push(p);
                continue;
            }
            Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => {}
            Err(e) => panic!("bad broker output: {e:?}"),
        }
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("broker answers")
            .unwrap()
            .unwrap();
        match msg {
            Message::Binary(b) => buf.extend_from_slice(&b),
            other => panic!("the broker sends binary frames only, got {other:?}"),
        }
    }
    assert!(matches!(seen[0], v5::Packet::ConnAck(_)));
    let count = |f: fn(&v5::Packet) -> bool| seen.iter().filter(|p| f(p)).count();
    assert_eq!(count(|p| matches!(p, v5::Packet::SubAck(_))), 1);
    assert_eq!(count(|p| matches!(p, v5::Packet::PingResp(_))), 1);
    assert_eq!(count(|p| matches!(p, v5::Packet::PubAck(_))), 2);
    let topics: Vec<_> = seen
        .iter()
        .filter_map(|p| match p {
            v5::Packet::Publish(p) => Some(p.topic.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(
        topics,
        vec![Bytes::from("frames/one"), Bytes::from("frames/two")]
    );
    server.shutdown().await;
}

#[tokio::test]
async fn upgrade_needs_the_mqtt_subprotocol_and_the_configured_path() {
    let mut lc = listener("web", ListenerProtocol::Ws);
    lc.path = "/broker".into();
    let (server, addrs, _) = start_listeners(vec![lc], |_| {}).await;
    let addr = addrs[0];
    let err = |r: Result<_, tokio_tungstenite::tungstenite::Error>| match r {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(e) => panic!("expected an HTTP refusal, got {e}"),
        Ok(_) => panic!("the upgrade should have been refused"),
    };
    let tcp = TcpStream::connect(addr).await.unwrap();
    assert_eq!(err(ws_upgrade(tcp, "/broker", None).await), 400);
    let tcp = TcpStream::connect(addr).await.unwrap();
    assert_eq!(err(ws_upgrade(tcp, "/broker", Some("chat")).await), 400);
    let tcp = TcpStream::connect(addr).await.unwrap();
    assert_eq!(err(ws_upgrade(tcp, "/mqtt", Some("mqtt")).await), 404);
    assert_eq!(
        server
            .broker
            .metrics
            .listener("web")
            .handshake_failures(HandshakeStage::WebSocket),
        3
    );

    // Offered among others, `mqtt` is chosen (checked inside ws_upgrade).
    let tcp = TcpStream::connect(addr).await.unwrap();
    let ws = ws_upgrade(tcp, "/broker", Some("chat, mqtt"))
        .await
        .unwrap();
    let mut c = Raw::over(ws_bytes(ws));
    c.handshake5(connect5_packet("ok", true, 0), None).await;
    server.shutdown().await;
}

#[tokio::test]
async fn text_frames_oversized_frames_and_garbage_close_only_that_connection() {
    let (server, addrs, _) = start_listeners(vec![listener("web", ListenerProtocol::Ws)], |c| {
        c.limits.max_packet_size = 1024;
    })
    .await;
    let addr = addrs[0];
    let mut bystander = ws_raw(addr, "bystander").await;

    // A text frame violates [MQTT-6.0.0-1].
    let mut text = {
        let tcp = TcpStream::connect(addr).await.unwrap();
        ws_upgrade(tcp, "/mqtt", Some("mqtt")).await.unwrap()
    };
    text.send(Message::text("hello")).await.unwrap();
    assert!(ws_closed(&mut text).await);

    // A frame far beyond the packet size bound is refused before it is buffered.
    let mut big = {
        let tcp = TcpStream::connect(addr).await.unwrap();
        ws_upgrade(tcp, "/mqtt", Some("mqtt")).await.unwrap()
    };
    let _ = big
        .send(Message::Binary(vec![0u8; 512 * 1024].into()))
        .await;
    assert!(ws_closed(&mut big).await);

    // A packet over max_packet_size inside a legal frame: a v5 protocol refusal.
    let mut oversized_packet = ws_raw(addr, "oversized").await;
    oversized_packet
        .publish5(publish5_packet(
            "t",
            QoS::AtMostOnce,
            0,
            false,
            &[1u8; 4000],
        ))
        .await;
    let d = oversized_packet.expect_disconnect5().await;
    assert_eq!(d.reason_code, v5::DisconnectReasonCode::PacketTooLarge);

    // Not HTTP at all.
    let mut junk = Raw::connect(addr).await;
    junk.send_bytes(b"\x10\x20garbage that is not an HTTP upgrade request\r\n\r\n")
        .await;
    assert!(junk.closed_within(WAIT).await.is_some());

    bystander.send5(v5::Packet::PingReq(v5::PingReq)).await;
    assert!(matches!(bystander.recv5().await, v5::Packet::PingResp(_)));
    let _ = ws_raw(addr, "newcomer").await;
    server.shutdown().await;
}

/// True when the server ends the WebSocket (close frame, EOF or error) within the wait.
async fn ws_closed<S: ByteStream>(ws: &mut tokio_tungstenite::WebSocketStream<S>) -> bool {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return false,
            Ok(None) | Ok(Some(Err(_))) | Ok(Some(Ok(Message::Close(_)))) => return true,
            Ok(Some(Ok(_))) => {}
        }
    }
}

#[tokio::test]
async fn mqtt_over_secure_websocket_with_a_client_certificate() {
    let server_ca = Ca::new("server CA");
    let client_ca = Ca::new("device CA");
    let files = TlsFiles::write(&server_ca.server("broker"), Some(&client_ca));
    let mut lc = tls_listener("wss", ListenerProtocol::Wss, &files);
    lc.client_ca_file = Some(files.client_ca.clone());
    let (server, addrs, recorder) = start_listeners(vec![lc], |_| {}).await;

    let config = client_config(&server_ca.cert_der, Some(&client_ca.client("browser-1")));
    let tls = tls_connect(addrs[0], config).await.unwrap();
    let ws = ws_upgrade(tls, "/mqtt", Some("mqtt")).await.unwrap();
    let mut c = Raw::over(ws_bytes(ws));
    c.handshake5(connect5_packet("wss-1", true, 0), None).await;
    c.subscribe5(1, filter5("secure/ws", QoS::AtLeastOnce), None)
        .await;
    c.publish5(publish5_packet(
        "secure/ws",
        QoS::AtLeastOnce,
        2,
        false,
        b"hi",
    ))
    .await;
    let mut got_ack = false;
    let mut got_msg = false;
    while !(got_ack && got_msg) {
        match c.recv5().await {
            v5::Packet::PubAck(_) => got_ack = true,
            v5::Packet::Publish(p) => {
                assert_eq!(p.payload.as_ref(), b"hi");
                got_msg = true;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let seen = recorder.last("wss-1").unwrap();
    assert_eq!(seen.cert_cn.as_deref(), Some("browser-1"));
    assert_eq!(seen.listener, "wss");
    server.shutdown().await;
}
