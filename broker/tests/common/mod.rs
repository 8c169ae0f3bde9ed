//! Test harness: an in-process broker on a free loopback port, and a raw MQTT client that sends
//! exactly the packets a test wants (rumqttc's codec on the client side) and reads the answers.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use ferrymq::config::Config;
use ferrymq::server::Server;
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

pub mod net;

pub const WAIT: Duration = Duration::from_secs(5);
pub const QUIET: Duration = Duration::from_millis(300);

/// Starts a broker on 127.0.0.1:0 with `tweak` applied to the default config.
pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> (Server, SocketAddr) {
    let mut config = Config::default();
    config.listeners[0].bind = "127.0.0.1:0".parse().unwrap();
    // Any free port: tests run side by side (`server.http_addr()` tells which).
    config.http.bind = "127.0.0.1:0".parse().unwrap();
    // Each broker gets its own storage directory (kept for post-mortems; under the system temp
    // directory).
    config.data_dir = tempfile::Builder::new()
        .prefix("ferrymq-test-")
        .tempdir()
        .unwrap()
        .keep();
    // Like the quick start without a config file: tests that are not about authentication
    // connect anonymously. Authentication tests switch it off in `tweak`.
    config.auth.allow_anonymous = true;
    tweak(&mut config);
    config.validate().unwrap();
    let server = Server::start(config).await.unwrap();
    let addr = server.local_addrs()[0];
    (server, addr)
}

pub async fn start() -> (Server, SocketAddr) {
    start_with(|_| {}).await
}

/// Any byte stream a raw client can speak over (TCP, TLS, WebSocket).
pub trait ByteStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> ByteStream for T {}

/// A client speaking raw MQTT over TCP (or, with [`Raw::over`], any byte stream).
pub struct Raw {
    pub stream: Box<dyn ByteStream>,
    buf: BytesMut,
}

impl Raw {
    pub async fn connect(addr: SocketAddr) -> Raw {
        let stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        Raw::over(stream)
    }

    pub fn over(stream: impl ByteStream + 'static) -> Raw {
        Raw {
            stream: Box::new(stream),
            buf: BytesMut::new(),
        }
    }

    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
        self.stream.flush().await.unwrap();
    }

    pub async fn send5(&mut self, packet: v5::Packet) {
        let mut out = BytesMut::new();
        packet.write(&mut out, None).unwrap();
        self.send_bytes(&out).await;
    }

    pub async fn send4(&mut self, packet: v4::Packet) {
        let mut out = BytesMut::new();
        match packet {
            v4::Packet::Connect(p) => p.write(&mut out),
            v4::Packet::Publish(p) => p.write(&mut out),
            v4::Packet::PubAck(p) => p.write(&mut out),
            v4::Packet::PubRec(p) => p.write(&mut out),
            v4::Packet::PubRel(p) => p.write(&mut out),
            v4::Packet::PubComp(p) => p.write(&mut out),
            v4::Packet::Subscribe(p) => p.write(&mut out),
            v4::Packet::Unsubscribe(p) => p.write(&mut out),
            v4::Packet::PingReq => v4::PingReq.write(&mut out),
            v4::Packet::Disconnect => v4::Disconnect.write(&mut out),
            other => panic!("a client does not send {other:?}"),
        }
        .unwrap();
        self.send_bytes(&out).await;
    }

    /// Next v5 packet, or None on timeout or close.
    pub async fn recv5_within(&mut self, wait: Duration) -> Option<v5::Packet> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match v5::Packet::read(&mut self.buf, None) {
                Ok(p) => return Some(p),
                Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => panic!("client could not decode broker output: {e:?}"),
            }
            if !self.fill(deadline).await {
                return None;
            }
        }
    }

    pub async fn recv4_within(&mut self, wait: Duration) -> Option<v4::Packet> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match v4::Packet::read(&mut self.buf, 1 << 28) {
                Ok(p) => return Some(p),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => panic!("client could not decode broker output: {e:?}"),
            }
            if !self.fill(deadline).await {
                return None;
            }
        }
    }

    pub async fn recv5(&mut self) -> v5::Packet {
        self.recv5_within(WAIT).await.expect("expected a packet")
    }

    pub async fn recv4(&mut self) -> v4::Packet {
        self.recv4_within(WAIT).await.expect("expected a packet")
    }

    /// Reads more bytes; false on timeout or EOF.
    async fn fill(&mut self, deadline: tokio::time::Instant) -> bool {
        match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
            Ok(Ok(n)) => n > 0,
            _ => false,
        }
    }

    /// True when the broker closes the connection within `wait` (any unread packets are
    /// skipped); returns the raw bytes received before the close.
    pub async fn closed_within(&mut self, wait: Duration) -> Option<Vec<u8>> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return Some(self.buf.to_vec()),
                Ok(Ok(_)) => continue,
                Err(_) => return None,
            }
        }
    }

    // --- v3.1.1 conveniences -------------------------------------------------------------

    pub async fn connect4(addr: SocketAddr, id: &str, clean: bool) -> (Raw, v4::ConnAck) {
        let mut c = Raw::connect(addr).await;
        let mut connect = v4::Connect::new(id);
        connect.clean_session = clean;
        connect.keep_alive = 30;
        c.send4(v4::Packet::Connect(connect)).await;
        match c.recv4().await {
            v4::Packet::ConnAck(ack) => (c, ack),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    pub async fn subscribe4(&mut self, pkid: u16, filter: &str, qos: rumqttc::mqttbytes::QoS) {
        let mut s = v4::Subscribe::new(filter, qos);
        s.pkid = pkid;
        self.send4(v4::Packet::Subscribe(s)).await;
        match self.recv4().await {
            v4::Packet::SubAck(ack) => assert_eq!(ack.pkid, pkid),
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    pub async fn publish4(
        &mut self,
        topic: &str,
        qos: rumqttc::mqttbytes::QoS,
        pkid: u16,
        retain: bool,
        payload: &[u8],
    ) {
        let mut p = v4::Publish::new(topic, qos, payload.to_vec());
        p.pkid = pkid;
        p.retain = retain;
        self.send4(v4::Packet::Publish(p)).await;
    }

    // --- v5 conveniences -------------------------------------------------------------------

    pub async fn connect5_with(
        addr: SocketAddr,
        connect: v5::Connect,
        will: Option<v5::LastWill>,
    ) -> (Raw, v5::ConnAck) {
        let mut c = Raw::connect(addr).await;
        let ack = c.handshake5(connect, will).await;
        (c, ack)
    }

    /// Sends CONNECT on an open stream (after a PROXY header, over TLS or WebSocket, ...) and
    /// returns the CONNACK.
    pub async fn handshake5(
        &mut self,
        connect: v5::Connect,
        will: Option<v5::LastWill>,
    ) -> v5::ConnAck {
        self.send5(v5::Packet::Connect(connect, will, None)).await;
        match self.recv5().await {
            v5::Packet::ConnAck(ack) => ack,
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    pub async fn connect5(
        addr: SocketAddr,
        id: &str,
        clean: bool,
        expiry: u32,
    ) -> (Raw, v5::ConnAck) {
        Raw::connect5_with(addr, connect5_packet(id, clean, expiry), None).await
    }

    pub async fn subscribe5(
        &mut self,
        pkid: u16,
        filter: v5::Filter,
        id: Option<usize>,
    ) -> v5::SubAck {
        let s = v5::Subscribe {
            pkid,
            filters: vec![filter],
            properties: id.map(|id| v5::SubscribeProperties {
                id: Some(id),
                user_properties: vec![],
            }),
        };
        self.send5(v5::Packet::Subscribe(s)).await;
        match self.recv5().await {
            v5::Packet::SubAck(ack) => ack,
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }
}

impl Raw {
    /// Sends a v5 PUBLISH.
    pub async fn publish5(&mut self, publish: v5::Publish) {
        self.send5(v5::Packet::Publish(publish)).await;
    }

    /// Next v5 PUBLISH (panics on anything else or on timeout).
    pub async fn recv_publish5(&mut self) -> v5::Publish {
        match self.recv5().await {
            v5::Packet::Publish(p) => p,
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }

    /// Reads until the broker sends DISCONNECT (other packets are skipped), checks that the
    /// socket is closed afterwards and returns the DISCONNECT.
    pub async fn expect_disconnect5(&mut self) -> v5::Disconnect {
        loop {
            match self.recv5_within(WAIT).await {
                Some(v5::Packet::Disconnect(d)) => {
                    assert!(
                        self.closed_within(WAIT).await.is_some(),
                        "socket still open after DISCONNECT {d:?}"
                    );
                    return d;
                }
                Some(_) => continue,
                None => panic!("connection ended (or timed out) without a DISCONNECT"),
            }
        }
    }

    /// Sends a v5 DISCONNECT with `reason` and optional session expiry.
    pub async fn disconnect5(&mut self, reason: v5::DisconnectReasonCode, expiry: Option<u32>) {
        let properties = expiry.map(|e| v5::DisconnectProperties {
            session_expiry_interval: Some(e),
            reason_string: None,
            user_properties: vec![],
            server_reference: None,
        });
        self.send5(v5::Packet::Disconnect(v5::Disconnect {
            reason_code: reason,
            properties,
        }))
        .await;
    }
}

/// A v5 PUBLISH without properties.
pub fn publish5_packet(
    topic: &str,
    qos: rumqttc::v5::mqttbytes::QoS,
    pkid: u16,
    retain: bool,
    payload: &[u8],
) -> v5::Publish {
    let mut p = v5::Publish::new(topic, qos, payload.to_vec(), None);
    p.pkid = pkid;
    p.retain = retain;
    p
}

pub fn connect5_packet(id: &str, clean: bool, expiry: u32) -> v5::Connect {
    let mut props = v5::ConnectProperties::new();
    if expiry > 0 {
        props.session_expiry_interval = Some(expiry);
    }
    v5::Connect {
        keep_alive: 30,
        client_id: id.to_string(),
        clean_start: clean,
        properties: Some(props),
    }
}

pub fn filter5(path: &str, qos: rumqttc::v5::mqttbytes::QoS) -> v5::Filter {
    v5::Filter::new(path, qos)
}
