//! PROXY protocol v1 and v2 in front of TCP and TLS listeners: the proxied source reaches
//! authentication, and connections without a valid header are refused.

mod common;

use std::net::SocketAddr;

use common::net::*;
use common::*;
use ferrymq::config::{ListenerConfig, ListenerProtocol};
use ferrymq::metrics::{ConnectResult, HandshakeStage};
use ppp::v2::{Builder, Command, Protocol, Version};
use rumqttc::v5::mqttbytes::v5;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

fn proxied(name: &str, protocol: ListenerProtocol) -> ListenerConfig {
    ListenerConfig {
        proxy_protocol: true,
        ..listener(name, protocol)
    }
}

fn v2_header(command: Command, source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    Builder::with_addresses(
        Version::Two | command,
        Protocol::Stream,
        (source, destination),
    )
    // A TLV the broker does not use (AWS NLB and others add some).
    .write_tlv(0xEA, b"vpce-0123456789")
    .unwrap()
    .build()
    .unwrap()
}

/// Sends `header` then CONNECT; returns the CONNACK code.
async fn connect_after(addr: SocketAddr, header: &[u8], id: &str) -> v5::ConnectReturnCode {
    let mut c = Raw::connect(addr).await;
    c.send_bytes(header).await;
    c.handshake5(connect5_packet(id, true, 0), None).await.code
}

#[tokio::test]
async fn v1_and_v2_sources_reach_authentication() {
    let (server, addrs, recorder) =
        start_listeners(vec![proxied("lb", ListenerProtocol::Mqtt)], |_| {}).await;
    let addr = addrs[0];

    let code = connect_after(
        addr,
        b"PROXY TCP4 192.0.2.7 198.51.100.1 51000 1883\r\n",
        "v1-4",
    )
    .await;
    assert_eq!(code, v5::ConnectReturnCode::Success);
    assert_eq!(
        recorder.last("v1-4").unwrap().peer,
        "192.0.2.7:51000".parse().unwrap()
    );

    let code = connect_after(
        addr,
        b"PROXY TCP6 2001:db8::7 2001:db8::1 40001 1883\r\n",
        "v1-6",
    )
    .await;
    assert_eq!(code, v5::ConnectReturnCode::Success);
    assert_eq!(
        recorder.last("v1-6").unwrap().peer,
        "[2001:db8::7]:40001".parse().unwrap()
    );

    let source: SocketAddr = "203.0.113.50:61234".parse().unwrap();
    let header = v2_header(Command::Proxy, source, "10.0.0.1:1883".parse().unwrap());
    assert_eq!(
        connect_after(addr, &header, "v2").await,
        v5::ConnectReturnCode::Success
    );
    assert_eq!(recorder.last("v2").unwrap().peer, source);

    // LOCAL (a balancer's own health check): the socket peer stands.
    let header = v2_header(Command::Local, source, "10.0.0.1:1883".parse().unwrap());
    assert_eq!(
        connect_after(addr, &header, "local").await,
        v5::ConnectReturnCode::Success
    );
    assert!(recorder.last("local").unwrap().peer.ip().is_loopback());

    // Header and CONNECT in one segment: nothing after the header is lost.
    let mut c = Raw::connect(addr).await;
    let mut both = b"PROXY TCP4 192.0.2.8 198.51.100.1 51001 1883\r\n".to_vec();
    let mut connect = bytes::BytesMut::new();
    v5::Packet::Connect(connect5_packet("one-write", true, 0), None, None)
        .write(&mut connect, None)
        .unwrap();
    both.extend_from_slice(&connect);
    c.send_bytes(&both).await;
    assert!(matches!(c.recv5().await, v5::Packet::ConnAck(_)));
    assert_eq!(
        recorder.last("one-write").unwrap().peer,
        "192.0.2.8:51001".parse().unwrap()
    );
    assert_eq!(
        server
            .broker
            .metrics
            .listener("lb")
            .handshake_failures(HandshakeStage::ProxyHeader),
        0
    );
    server.shutdown().await;
}

#[tokio::test]
async fn missing_garbage_and_oversized_headers_are_refused() {
    let (server, addrs, recorder) = start_listeners(
        vec![
            proxied("lb", ListenerProtocol::Mqtt),
            listener("direct", ListenerProtocol::Mqtt),
        ],
        |c| c.limits.connect_timeout_secs = 2,
    )
    .await;
    let (addr, direct) = (addrs[0], addrs[1]);

    // A plain CONNECT where the header should be.
    let mut c = Raw::connect(addr).await;
    c.send5(v5::Packet::Connect(
        connect5_packet("no-header", true, 0),
        None,
        None,
    ))
    .await;
    assert_eq!(
        c.closed_within(WAIT).await,
        Some(Vec::new()),
        "closed without CONNACK"
    );

    // Looks like v1 but is not.
    let mut c = Raw::connect(addr).await;
    c.send_bytes(b"PROXY TCP4 999.1.1.1 198.51.100.1 1 1883\r\n")
        .await;
    assert_eq!(c.closed_within(WAIT).await, Some(Vec::new()));

    // v1 without CRLF within the 107-byte bound.
    let mut c = Raw::connect(addr).await;
    let _ = c.stream.write_all(b"PROXY ").await;
    let _ = c.stream.write_all(&[b'9'; 300]).await;
    assert!(c.closed_within(WAIT).await.is_some());

    // v2 announcing a 60 KB body.
    let mut c = Raw::connect(addr).await;
    let mut big = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    big.extend_from_slice(&[0x21, 0x11, 0xea, 0x60]);
    c.send_bytes(&big).await;
    assert!(c.closed_within(WAIT).await.is_some());

    // A header that never completes: closed at the connect timeout.
    let mut c = Raw::connect(addr).await;
    c.send_bytes(b"PROXY TCP4 192.0.2.1").await;
    assert!(c
        .closed_within(std::time::Duration::from_secs(4))
        .await
        .is_some());
    let metrics = &server.broker.metrics;
    let lb = metrics.listener("lb");
    assert_eq!(lb.handshake_failures(HandshakeStage::Timeout), 1);
    assert_eq!(lb.handshake_failures(HandshakeStage::ProxyHeader), 4);
    assert_eq!(metrics.connects(ConnectResult::HandshakeFailed), 5);
    assert!(
        recorder.seen.lock().is_empty(),
        "no refused connection reached CONNECT"
    );

    // The same broker still serves: through the balancer and directly (where a PROXY header
    // is just a bad first packet).
    let code = connect_after(
        addr,
        b"PROXY TCP4 192.0.2.9 198.51.100.1 5000 1883\r\n",
        "after",
    )
    .await;
    assert_eq!(code, v5::ConnectReturnCode::Success);
    let (_d, ack) = Raw::connect5(direct, "direct", true, 0).await;
    assert_eq!(ack.code, v5::ConnectReturnCode::Success);
    assert!(recorder.last("direct").unwrap().peer.ip().is_loopback());
    server.shutdown().await;
}

#[tokio::test]
async fn proxy_header_in_front_of_tls() {
    let ca = Ca::new("server CA");
    let files = TlsFiles::write(&ca.server("broker"), None);
    let lc = ListenerConfig {
        proxy_protocol: true,
        ..tls_listener("tls-lb", ListenerProtocol::Mqtts, &files)
    };
    let (server, addrs, recorder) = start_listeners(vec![lc], |_| {}).await;

    let source: SocketAddr = "198.18.0.77:45000".parse().unwrap();
    let mut tcp = TcpStream::connect(addrs[0]).await.unwrap();
    tcp.write_all(&v2_header(
        Command::Proxy,
        source,
        "10.0.0.1:8883".parse().unwrap(),
    ))
    .await
    .unwrap();
    let tls = tokio_rustls::TlsConnector::from(client_config(&ca.cert_der, None))
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let mut c = Raw::over(tls);
    c.handshake5(connect5_packet("tls-proxied", true, 0), None)
        .await;
    let seen = recorder.last("tls-proxied").unwrap();
    assert_eq!(seen.peer, source);
    assert_eq!(seen.listener, "tls-lb");

    // TLS without the header is refused.
    assert!(tls_connect(addrs[0], client_config(&ca.cert_der, None))
        .await
        .is_err());
    server.shutdown().await;
}
