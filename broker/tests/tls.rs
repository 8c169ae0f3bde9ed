//! MQTT over TLS: real handshakes with certificates generated here, client-certificate
//! verification and its hand-over to authentication, hot reload of the server certificate, and
//! garbage on a TLS port.

mod common;

use std::time::Duration;

use common::net::*;
use common::*;
use ferrymq::config::ListenerProtocol;
use ferrymq::metrics::{ConnectResult, HandshakeStage};
use rumqttc::v5::mqttbytes::v5;
use rumqttc::v5::mqttbytes::QoS;

/// A broker with one `mqtts` listener serving a certificate from `server_ca`, verifying client
/// certificates against `client_ca` when given.
async fn tls_broker(
    server_ca: &Ca,
    client_ca: Option<&Ca>,
    require: bool,
) -> (
    ferrymq::server::Server,
    std::net::SocketAddr,
    std::sync::Arc<Recorder>,
    TlsFiles,
) {
    let files = TlsFiles::write(&server_ca.server("broker-1"), client_ca);
    let mut lc = tls_listener("secure", ListenerProtocol::Mqtts, &files);
    if client_ca.is_some() {
        lc.client_ca_file = Some(files.client_ca.clone());
        lc.require_client_cert = require;
    }
    lc.tls_reload_interval_secs = 1;
    let (server, addrs, recorder) = start_listeners(vec![lc], |_| {}).await;
    (server, addrs[0], recorder, files)
}

async fn connect5_over(stream: impl ByteStream + 'static, id: &str) -> (Raw, v5::ConnAck) {
    let mut c = Raw::over(stream);
    let ack = c.handshake5(connect5_packet(id, true, 0), None).await;
    (c, ack)
}

#[tokio::test]
async fn publish_and_subscribe_over_tls() {
    let ca = Ca::new("server CA");
    let (server, addr, recorder, _files) = tls_broker(&ca, None, false).await;
    let config = client_config(&ca.cert_der, None);

    let (mut sub, ack) =
        connect5_over(tls_connect(addr, config.clone()).await.unwrap(), "sub").await;
    assert_eq!(ack.code, v5::ConnectReturnCode::Success);
    sub.subscribe5(1, filter5("tls/#", QoS::AtLeastOnce), None)
        .await;

    // A 3.1.1 publisher over TLS, QoS 1, with a payload bigger than one TLS record.
    let mut publisher = Raw::over(tls_connect(addr, config).await.unwrap());
    publisher
        .send4(rumqttc::mqttbytes::v4::Packet::Connect(
            rumqttc::mqttbytes::v4::Connect::new("pub"),
        ))
        .await;
    assert!(matches!(
        publisher.recv4().await,
        rumqttc::mqttbytes::v4::Packet::ConnAck(_)
    ));
    let payload = vec![7u8; 40_000];
    publisher
        .publish4(
            "tls/a",
            rumqttc::mqttbytes::QoS::AtLeastOnce,
            1,
            false,
            &payload,
        )
        .await;
    match publisher.recv4().await {
        rumqttc::mqttbytes::v4::Packet::PubAck(ack) => assert_eq!(ack.pkid, 1),
        other => panic!("expected PUBACK, got {other:?}"),
    }
    let got = sub.recv_publish5().await;
    assert_eq!(got.topic.as_ref(), b"tls/a");
    assert_eq!(got.payload.as_ref(), payload.as_slice());

    let seen = recorder.last("sub").unwrap();
    assert_eq!(seen.listener, "secure");
    assert_eq!(seen.cert_cn, None, "no client certificate was presented");
    server.shutdown().await;
}

#[tokio::test]
async fn rumqttc_client_over_tls() {
    let ca = Ca::new("server CA");
    let (server, addr, _recorder, _files) = tls_broker(&ca, None, false).await;
    let mut options = rumqttc::MqttOptions::new("rumqttc-tls", "localhost", addr.port());
    options.set_keep_alive(Duration::from_secs(5));
    options.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(client_config(&ca.cert_der, None)),
    ));
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 10);
    client
        .subscribe("rt/echo", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    client
        .publish("rt/echo", rumqttc::QoS::AtLeastOnce, false, "over tls")
        .await
        .unwrap();
    let got = tokio::time::timeout(WAIT, async {
        loop {
            match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => return p,
                Ok(_) => {}
                Err(e) => panic!("rumqttc over TLS failed: {e}"),
            }
        }
    })
    .await
    .expect("the message comes back over TLS");
    assert_eq!(got.payload.as_ref(), b"over tls");
    server.shutdown().await;
}

#[tokio::test]
async fn verified_client_certificate_reaches_authentication() {
    let server_ca = Ca::new("server CA");
    let client_ca = Ca::new("device CA");
    let (server, addr, recorder, _files) = tls_broker(&server_ca, Some(&client_ca), true).await;
    let device = client_ca.client("device-42");
    let config = client_config(&server_ca.cert_der, Some(&device));
    let (_c, ack) = connect5_over(tls_connect(addr, config).await.unwrap(), "dev").await;
    assert_eq!(ack.code, v5::ConnectReturnCode::Success);
    let seen = recorder.last("dev").unwrap();
    assert_eq!(seen.cert_cn.as_deref(), Some("device-42"));
    assert_eq!(seen.chain_len, 1);
    assert_eq!(seen.listener, "secure");
    assert!(seen.peer.ip().is_loopback());
    server.shutdown().await;
}

/// A client whose certificate the server does not accept gets no MQTT session: with TLS 1.3 the
/// client's side of the handshake may complete, but the server's alert ends the stream before
/// any CONNACK.
async fn assert_refused(addr: std::net::SocketAddr, config: std::sync::Arc<rustls::ClientConfig>) {
    let Ok(stream) = tls_connect(addr, config).await else {
        return;
    };
    let mut c = Raw::over(stream);
    let mut out = bytes::BytesMut::new();
    v5::Packet::Connect(connect5_packet("refused", true, 0), None, None)
        .write(&mut out, None)
        .unwrap();
    // The write may already fail once the alert arrived.
    let _ = tokio::io::AsyncWriteExt::write_all(&mut c.stream, &out).await;
    let _ = tokio::io::AsyncWriteExt::flush(&mut c.stream).await;
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(WAIT, tokio::io::AsyncReadExt::read(&mut c.stream, &mut buf))
        .await
        .expect("the broker closes the connection");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "no CONNACK for a refused certificate: {read:?}"
    );
}

#[tokio::test]
async fn wrong_ca_expired_and_missing_client_certificates_are_refused() {
    let server_ca = Ca::new("server CA");
    let client_ca = Ca::new("device CA");
    let (server, addr, recorder, _files) = tls_broker(&server_ca, Some(&client_ca), true).await;
    let metrics = &server.broker.metrics;

    let forged = Ca::new("device CA").client("device-42");
    assert_refused(addr, client_config(&server_ca.cert_der, Some(&forged))).await;

    let expired = client_ca.client_with("device-old", |p| {
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 1, 1);
    });
    assert_refused(addr, client_config(&server_ca.cert_der, Some(&expired))).await;

    assert_refused(addr, client_config(&server_ca.cert_der, None)).await;

    assert!(
        recorder.seen.lock().is_empty(),
        "no refused client reached authentication"
    );
    let failures = metrics
        .listener("secure")
        .handshake_failures(HandshakeStage::Tls);
    assert_eq!(failures, 3, "every refused handshake is counted");
    assert_eq!(metrics.connects(ConnectResult::HandshakeFailed), 3);

    // A good certificate still works after all that.
    let good = client_config(&server_ca.cert_der, Some(&client_ca.client("device-7")));
    let (_c, ack) = connect5_over(tls_connect(addr, good).await.unwrap(), "good").await;
    assert_eq!(ack.code, v5::ConnectReturnCode::Success);
    server.shutdown().await;
}

#[tokio::test]
async fn optional_client_certificate_is_verified_when_presented() {
    let server_ca = Ca::new("server CA");
    let client_ca = Ca::new("device CA");
    let (server, addr, recorder, _files) = tls_broker(&server_ca, Some(&client_ca), false).await;

    let (_a, ack) = connect5_over(
        tls_connect(addr, client_config(&server_ca.cert_der, None))
            .await
            .unwrap(),
        "anon",
    )
    .await;
    assert_eq!(ack.code, v5::ConnectReturnCode::Success);
    assert_eq!(recorder.last("anon").unwrap().cert_cn, None);

    let device = client_ca.client("sensor-9");
    let config = client_config(&server_ca.cert_der, Some(&device));
    let (_b, ack) = connect5_over(tls_connect(addr, config).await.unwrap(), "cert").await;
    assert_eq!(ack.code, v5::ConnectReturnCode::Success);
    assert_eq!(
        recorder.last("cert").unwrap().cert_cn.as_deref(),
        Some("sensor-9")
    );

    let forged = Ca::new("other CA").client("sensor-9");
    assert_refused(addr, client_config(&server_ca.cert_der, Some(&forged))).await;
    server.shutdown().await;
}

#[tokio::test]
async fn certificate_files_are_reloaded_and_a_bad_file_keeps_the_old_one() {
    let ca = Ca::new("server CA");
    let (server, addr, _recorder, files) = tls_broker(&ca, None, false).await;
    let config = client_config(&ca.cert_der, None);
    let first = tls_connect(addr, config.clone()).await.unwrap();
    let old = server_cert(&first);
    // A connection made before the reload keeps working afterwards.
    let (mut kept, _) = connect5_over(first, "kept").await;

    let renewed = ca.server("broker-2");
    files.replace(&renewed);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let s = tls_connect(addr, config.clone()).await.unwrap();
        if server_cert(&s) == renewed.cert_der {
            break;
        }
        assert_eq!(server_cert(&s), old);
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let listener_metrics = server.broker.metrics.listener("secure");
    assert!(listener_metrics.tls_reloads.get() >= 1);

    // A broken certificate file: logged and counted, the renewed certificate stays.
    replace_file(
        &files.cert,
        b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n",
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while listener_metrics.tls_reload_failures.get() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the bad file was never noticed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let s = tls_connect(addr, config).await.unwrap();
    assert_eq!(server_cert(&s), renewed.cert_der);
    let (_c, ack) = connect5_over(s, "after-bad-file").await;
    assert_eq!(ack.code, v5::ConnectReturnCode::Success);

    kept.send5(v5::Packet::PingReq(v5::PingReq)).await;
    assert!(matches!(kept.recv5().await, v5::Packet::PingResp(_)));
    server.shutdown().await;
}

#[tokio::test]
async fn garbage_and_plain_mqtt_on_a_tls_port_are_dropped() {
    let ca = Ca::new("server CA");
    let (server, addr, _recorder, _files) = tls_broker(&ca, None, false).await;

    let mut plain = Raw::connect(addr).await;
    plain
        .send5(v5::Packet::Connect(
            connect5_packet("plain", true, 0),
            None,
            None,
        ))
        .await;
    assert!(plain.closed_within(WAIT).await.is_some());

    let mut junk = Raw::connect(addr).await;
    let noise: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    // The broker may close while we are still writing.
    let _ = tokio::io::AsyncWriteExt::write_all(&mut junk.stream, &noise).await;
    assert!(junk.closed_within(WAIT).await.is_some());

    // A TLS record header announcing a huge record.
    let mut huge = Raw::connect(addr).await;
    huge.send_bytes(&[0x16, 0x03, 0x01, 0xff, 0xff]).await;
    let _ = tokio::io::AsyncWriteExt::write_all(&mut huge.stream, &[0u8; 1024]).await;
    assert!(huge.closed_within(WAIT).await.is_some());

    assert!(
        server
            .broker
            .metrics
            .listener("secure")
            .handshake_failures(HandshakeStage::Tls)
            >= 3
    );
    let (_c, ack) = connect5_over(
        tls_connect(addr, client_config(&ca.cert_der, None))
            .await
            .unwrap(),
        "still-served",
    )
    .await;
    assert_eq!(ack.code, v5::ConnectReturnCode::Success);
    server.shutdown().await;
}
