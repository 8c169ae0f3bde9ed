//! A raw MQTT client over tokio `TcpStream` using rumqttc's `mqttbytes` codecs (v3.1.1 and v5).
//!
//! Nothing happens behind the test's back: no automatic acks, retries, pings or packet ids. The
//! test decides which packet goes out when, so it knows exactly what the broker acknowledged.
//! Outgoing packets are encoded into a buffer (`queue_*`) and written by [`Connection::flush`];
//! incoming packets are decoded from a read buffer by [`Connection::recv`].

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest packet we accept from the broker.
const MAX_PACKET: usize = 16 * 1024 * 1024;

/// Protocol version spoken on a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    V311,
    V5,
}

/// CONNECT parameters.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    pub client_id: String,
    pub protocol: Protocol,
    /// v3 clean session / v5 clean start.
    pub clean: bool,
    pub keep_alive: u16,
    /// v5 Session Expiry Interval (ignored for v3).
    pub session_expiry: Option<u32>,
    /// How long to wait for the TCP connection and the CONNACK.
    pub timeout: Duration,
    /// User name and password for CONNECT.
    pub login: Option<(String, String)>,
    /// v5 Receive Maximum (ignored for v3): QoS 1/2 messages the broker may have in flight to
    /// this client.
    pub receive_maximum: Option<u16>,
    /// The will: published by the server when the connection ends without DISCONNECT.
    pub will: Option<WillOptions>,
}

/// A CONNECT's will message.
#[derive(Debug, Clone)]
pub struct WillOptions {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    /// v5 Will Delay Interval in seconds (ignored for v3).
    pub delay_secs: Option<u32>,
}

impl ConnectOptions {
    /// v3.1.1, clean session, keep-alive 300 s.
    pub fn v311(client_id: impl Into<String>) -> ConnectOptions {
        ConnectOptions {
            client_id: client_id.into(),
            protocol: Protocol::V311,
            clean: true,
            keep_alive: 300,
            session_expiry: None,
            timeout: Duration::from_secs(10),
            login: None,
            receive_maximum: None,
            will: None,
        }
    }

    /// v5, clean start, no session expiry, keep-alive 300 s.
    pub fn v5(client_id: impl Into<String>) -> ConnectOptions {
        ConnectOptions {
            protocol: Protocol::V5,
            ..ConnectOptions::v311(client_id)
        }
    }

    /// v3: clean_session=false. v5: clean_start=false and `session_expiry` 1 day unless set.
    pub fn persistent(mut self) -> ConnectOptions {
        self.clean = false;
        if self.protocol == Protocol::V5 && self.session_expiry.is_none() {
            self.session_expiry = Some(86_400);
        }
        self
    }

    pub fn clean(mut self, clean: bool) -> ConnectOptions {
        self.clean = clean;
        self
    }

    pub fn receive_maximum(mut self, max: u16) -> ConnectOptions {
        self.receive_maximum = Some(max);
        self
    }

    pub fn will(mut self, will: WillOptions) -> ConnectOptions {
        self.will = Some(will);
        self
    }

    pub fn session_expiry(mut self, secs: u32) -> ConnectOptions {
        self.session_expiry = Some(secs);
        self
    }

    pub fn login(
        mut self,
        username: impl Into<String>,
        password: impl Into<String>,
    ) -> ConnectOptions {
        self.login = Some((username.into(), password.into()));
        self
    }
}

/// CONNACK, reduced to what tests look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnAckInfo {
    pub session_present: bool,
    /// `None` for success, else the refusal reason (Debug of the codec's enum).
    pub refused: Option<String>,
}

/// An application message as received (or sent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub dup: bool,
    pub retain: bool,
    pub pkid: u16,
    /// v5 Message Expiry Interval.
    pub message_expiry: Option<u32>,
}

/// A packet from the broker, the same shape for both protocol versions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    ConnAck(ConnAckInfo),
    Publish(Message),
    /// `ok` is false when a v5 reason code >= 0x80 came with it.
    PubAck {
        pkid: u16,
        ok: bool,
        reason: String,
    },
    PubRec {
        pkid: u16,
        ok: bool,
        reason: String,
    },
    PubRel {
        pkid: u16,
        ok: bool,
    },
    PubComp {
        pkid: u16,
        ok: bool,
    },
    /// Granted QoS per filter; `None` for a refused filter.
    SubAck {
        pkid: u16,
        granted: Vec<Option<u8>>,
    },
    UnsubAck {
        pkid: u16,
    },
    PingResp,
    Disconnect {
        reason: String,
    },
    /// Anything else (a server never sends CONNECT/SUBSCRIBE/...; kept for diagnostics).
    Other(String),
}

/// One TCP connection speaking MQTT.
pub struct Connection {
    stream: TcpStream,
    protocol: Protocol,
    rbuf: BytesMut,
    wbuf: BytesMut,
}

fn qos4(qos: u8) -> anyhow::Result<v4::QoS> {
    Ok(match qos {
        0 => v4::QoS::AtMostOnce,
        1 => v4::QoS::AtLeastOnce,
        2 => v4::QoS::ExactlyOnce,
        _ => bail!("invalid QoS {qos}"),
    })
}

fn qos5(qos: u8) -> anyhow::Result<v5::QoS> {
    rumqttc::v5::mqttbytes::qos(qos).ok_or_else(|| anyhow!("invalid QoS {qos}"))
}

mod v4 {
    pub use rumqttc::mqttbytes::v4::*;
    pub use rumqttc::mqttbytes::{Protocol, QoS};
}

mod v5 {
    pub use rumqttc::v5::mqttbytes::v5::*;
    pub use rumqttc::v5::mqttbytes::QoS;
}

impl Connection {
    /// Opens TCP, sends CONNECT, waits for CONNACK. A refused CONNACK is an error.
    pub async fn connect(
        addr: SocketAddr,
        opts: &ConnectOptions,
    ) -> anyhow::Result<(Connection, ConnAckInfo)> {
        let (conn, ack) = Connection::connect_raw(addr, opts).await?;
        if let Some(reason) = &ack.refused {
            bail!("CONNECT {} refused: {reason}", opts.client_id);
        }
        Ok((conn, ack))
    }

    /// Like [`Connection::connect`] but returns a refused CONNACK instead of failing.
    pub async fn connect_raw(
        addr: SocketAddr,
        opts: &ConnectOptions,
    ) -> anyhow::Result<(Connection, ConnAckInfo)> {
        let stream = tokio::time::timeout(opts.timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| anyhow!("TCP connect to {addr} timed out"))?
            .with_context(|| format!("TCP connect to {addr}"))?;
        stream.set_nodelay(true).context("TCP_NODELAY")?;
        let mut conn = Connection {
            stream,
            protocol: opts.protocol,
            rbuf: BytesMut::with_capacity(64 * 1024),
            wbuf: BytesMut::with_capacity(64 * 1024),
        };
        match opts.protocol {
            Protocol::V311 => {
                let connect = v4::Connect {
                    protocol: v4::Protocol::V4,
                    keep_alive: opts.keep_alive,
                    client_id: opts.client_id.clone(),
                    clean_session: opts.clean,
                    last_will: match &opts.will {
                        Some(w) => Some(v4::LastWill::new(
                            w.topic.as_str(),
                            w.payload.clone(),
                            qos4(w.qos)?,
                            false,
                        )),
                        None => None,
                    },
                    login: opts
                        .login
                        .as_ref()
                        .map(|(u, p)| v4::Login::new(u.as_str(), p.as_str())),
                };
                conn.encode4(v4::Packet::Connect(connect))?;
            }
            Protocol::V5 => {
                let properties = (opts.session_expiry.is_some() || opts.receive_maximum.is_some())
                    .then(|| {
                        let mut p = v5::ConnectProperties::new();
                        p.session_expiry_interval = opts.session_expiry;
                        p.receive_maximum = opts.receive_maximum;
                        p
                    });
                let connect = v5::Connect {
                    keep_alive: opts.keep_alive,
                    client_id: opts.client_id.clone(),
                    clean_start: opts.clean,
                    properties,
                };
                let login = opts
                    .login
                    .as_ref()
                    .map(|(u, p)| v5::Login::new(u.as_str(), p.as_str()));
                let will = match &opts.will {
                    Some(w) => Some(v5::LastWill {
                        topic: Bytes::from(w.topic.clone()),
                        message: w.payload.clone(),
                        qos: qos5(w.qos)?,
                        retain: false,
                        properties: w.delay_secs.map(|delay| v5::LastWillProperties {
                            delay_interval: Some(delay),
                            payload_format_indicator: None,
                            message_expiry_interval: None,
                            content_type: None,
                            response_topic: None,
                            correlation_data: None,
                            user_properties: Vec::new(),
                        }),
                    }),
                    None => None,
                };
                conn.encode5(v5::Packet::Connect(connect, will, login))?;
            }
        }
        conn.flush().await?;
        let packet = conn
            .recv_timeout(opts.timeout)
            .await?
            .ok_or_else(|| anyhow!("no CONNACK within {:?}", opts.timeout))?;
        match packet {
            Incoming::ConnAck(ack) => Ok((conn, ack)),
            other => bail!("expected CONNACK, got {other:?}"),
        }
    }

    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    fn encode4(&mut self, packet: v4::Packet) -> anyhow::Result<()> {
        packet
            .write(&mut self.wbuf, MAX_PACKET)
            .map_err(|e| anyhow!("encoding {packet:?}: {e}"))?;
        Ok(())
    }

    fn encode5(&mut self, packet: v5::Packet) -> anyhow::Result<()> {
        packet
            .write(&mut self.wbuf, None)
            .map_err(|e| anyhow!("encoding {packet:?}: {e}"))?;
        Ok(())
    }

    /// Queues a PUBLISH. `message_expiry` is sent as a v5 property (ignored for v3).
    pub fn queue_publish(
        &mut self,
        topic: &str,
        qos: u8,
        pkid: u16,
        dup: bool,
        payload: Bytes,
        message_expiry: Option<u32>,
    ) -> anyhow::Result<()> {
        let pkid = if qos == 0 { 0 } else { pkid };
        match self.protocol {
            Protocol::V311 => {
                let mut p = v4::Publish::from_bytes(topic, qos4(qos)?, payload);
                p.pkid = pkid;
                p.dup = dup;
                self.encode4(v4::Packet::Publish(p))
            }
            Protocol::V5 => {
                let properties = message_expiry.map(|secs| v5::PublishProperties {
                    message_expiry_interval: Some(secs),
                    ..Default::default()
                });
                let mut p = v5::Publish::new(topic, qos5(qos)?, payload, properties);
                p.pkid = pkid;
                p.dup = dup;
                self.encode5(v5::Packet::Publish(p))
            }
        }
    }

    /// Queues a PUBLISH with RETAIN set.
    pub fn queue_retained(
        &mut self,
        topic: &str,
        qos: u8,
        pkid: u16,
        payload: Bytes,
    ) -> anyhow::Result<()> {
        let pkid = if qos == 0 { 0 } else { pkid };
        match self.protocol {
            Protocol::V311 => {
                let mut p = v4::Publish::from_bytes(topic, qos4(qos)?, payload);
                p.pkid = pkid;
                p.retain = true;
                self.encode4(v4::Packet::Publish(p))
            }
            Protocol::V5 => {
                let mut p = v5::Publish::new(topic, qos5(qos)?, payload, None);
                p.pkid = pkid;
                p.retain = true;
                self.encode5(v5::Packet::Publish(p))
            }
        }
    }

    pub fn queue_puback(&mut self, pkid: u16) -> anyhow::Result<()> {
        match self.protocol {
            Protocol::V311 => self.encode4(v4::Packet::PubAck(v4::PubAck::new(pkid))),
            Protocol::V5 => self.encode5(v5::Packet::PubAck(v5::PubAck::new(pkid, None))),
        }
    }

    pub fn queue_pubrec(&mut self, pkid: u16) -> anyhow::Result<()> {
        match self.protocol {
            Protocol::V311 => self.encode4(v4::Packet::PubRec(v4::PubRec::new(pkid))),
            Protocol::V5 => self.encode5(v5::Packet::PubRec(v5::PubRec::new(pkid, None))),
        }
    }

    pub fn queue_pubrel(&mut self, pkid: u16) -> anyhow::Result<()> {
        match self.protocol {
            Protocol::V311 => self.encode4(v4::Packet::PubRel(v4::PubRel::new(pkid))),
            Protocol::V5 => self.encode5(v5::Packet::PubRel(v5::PubRel::new(pkid, None))),
        }
    }

    pub fn queue_pubcomp(&mut self, pkid: u16) -> anyhow::Result<()> {
        match self.protocol {
            Protocol::V311 => self.encode4(v4::Packet::PubComp(v4::PubComp::new(pkid))),
            Protocol::V5 => self.encode5(v5::Packet::PubComp(v5::PubComp::new(pkid, None))),
        }
    }

    /// Queues a SUBSCRIBE for `filters` (topic filter, maximum QoS).
    pub fn queue_subscribe(&mut self, pkid: u16, filters: &[(&str, u8)]) -> anyhow::Result<()> {
        match self.protocol {
            Protocol::V311 => {
                let mut filters4 = Vec::new();
                for (path, qos) in filters {
                    filters4.push(v4::SubscribeFilter::new(path.to_string(), qos4(*qos)?));
                }
                self.encode4(v4::Packet::Subscribe(v4::Subscribe {
                    pkid,
                    filters: filters4,
                }))
            }
            Protocol::V5 => {
                let mut filters5 = Vec::new();
                for (path, qos) in filters {
                    filters5.push(v5::Filter::new(*path, qos5(*qos)?));
                }
                let mut sub = v5::Subscribe::new_many(filters5, None);
                sub.pkid = pkid;
                self.encode5(v5::Packet::Subscribe(sub))
            }
        }
    }

    pub fn queue_pingreq(&mut self) -> anyhow::Result<()> {
        match self.protocol {
            Protocol::V311 => self.encode4(v4::Packet::PingReq),
            Protocol::V5 => self.encode5(v5::Packet::PingReq(v5::PingReq)),
        }
    }

    pub fn queue_disconnect(&mut self) -> anyhow::Result<()> {
        match self.protocol {
            Protocol::V311 => self.encode4(v4::Packet::Disconnect),
            Protocol::V5 => self.encode5(v5::Packet::Disconnect(v5::Disconnect::new(
                v5::DisconnectReasonCode::NormalDisconnection,
            ))),
        }
    }

    /// Bytes queued but not yet written.
    pub fn pending_output(&self) -> usize {
        self.wbuf.len()
    }

    /// Writes everything queued.
    pub async fn flush(&mut self) -> anyhow::Result<()> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        self.stream
            .write_all(&self.wbuf)
            .await
            .context("writing to the broker")?;
        self.wbuf.clear();
        Ok(())
    }

    /// Subscribes and waits for the SUBACK; fails when a filter is refused.
    pub async fn subscribe(
        &mut self,
        pkid: u16,
        filters: &[(&str, u8)],
        timeout: Duration,
    ) -> anyhow::Result<Vec<u8>> {
        self.queue_subscribe(pkid, filters)?;
        self.flush().await?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.recv_timeout(left).await? {
                Some(Incoming::SubAck { pkid: got, granted }) if got == pkid => {
                    return granted
                        .iter()
                        .zip(filters)
                        .map(|(g, (f, _))| g.ok_or_else(|| anyhow!("subscription {f} refused")))
                        .collect();
                }
                // Messages of a resumed session may come first; they stay unacknowledged
                // (the broker redelivers them) so nothing is lost by skipping them here.
                Some(Incoming::Publish(_)) | Some(Incoming::PubRel { .. }) => {}
                Some(other) => bail!("expected SUBACK {pkid}, got {other:?}"),
                None => bail!("no SUBACK within {timeout:?}"),
            }
        }
    }

    /// Sends DISCONNECT and closes the socket.
    pub async fn disconnect(mut self) -> anyhow::Result<()> {
        self.queue_disconnect()?;
        self.flush().await?;
        let _ = self.stream.shutdown().await;
        Ok(())
    }

    /// Decodes one packet already in the read buffer, if a whole one is there.
    pub fn try_decode(&mut self) -> anyhow::Result<Option<Incoming>> {
        if self.rbuf.is_empty() {
            return Ok(None);
        }
        match self.protocol {
            Protocol::V311 => match v4::Packet::read(&mut self.rbuf, MAX_PACKET) {
                Ok(p) => Ok(Some(from4(p))),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
                Err(e) => Err(anyhow!("malformed packet from the broker: {e}")),
            },
            Protocol::V5 => match v5::Packet::read(&mut self.rbuf, Some(MAX_PACKET as u32)) {
                Ok(p) => Ok(Some(from5(p))),
                Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
                Err(e) => Err(anyhow!("malformed packet from the broker: {e}")),
            },
        }
    }

    /// Whether the read buffer already holds a whole packet (nothing is consumed).
    pub fn has_buffered_packet(&self) -> bool {
        if self.rbuf.len() < 2 {
            return false;
        }
        let mut len: usize = 0;
        let mut shift = 0;
        for (i, byte) in self.rbuf[1..].iter().take(4).enumerate() {
            len += ((byte & 0x7F) as usize) << shift;
            shift += 7;
            if byte & 0x80 == 0 {
                return self.rbuf.len() >= 1 + (i + 1) + len;
            }
        }
        false
    }

    /// The next packet; an error when the connection closes or breaks. Cancel-safe.
    pub async fn recv(&mut self) -> anyhow::Result<Incoming> {
        loop {
            if let Some(packet) = self.try_decode()? {
                return Ok(packet);
            }
            self.rbuf.reserve(16 * 1024);
            let n = self
                .stream
                .read_buf(&mut self.rbuf)
                .await
                .context("reading from the broker")?;
            if n == 0 {
                bail!("connection closed by the broker");
            }
        }
    }

    /// The next packet, or `None` when none arrives within `timeout`.
    pub async fn recv_timeout(&mut self, timeout: Duration) -> anyhow::Result<Option<Incoming>> {
        match tokio::time::timeout(timeout, self.recv()).await {
            Ok(result) => result.map(Some),
            Err(_) => Ok(None),
        }
    }
}

fn from4(packet: v4::Packet) -> Incoming {
    match packet {
        v4::Packet::ConnAck(ack) => Incoming::ConnAck(ConnAckInfo {
            session_present: ack.session_present,
            refused: match ack.code {
                v4::ConnectReturnCode::Success => None,
                other => Some(format!("{other:?}")),
            },
        }),
        v4::Packet::Publish(p) => Incoming::Publish(Message {
            topic: p.topic,
            payload: p.payload,
            qos: p.qos as u8,
            dup: p.dup,
            retain: p.retain,
            pkid: p.pkid,
            message_expiry: None,
        }),
        v4::Packet::PubAck(a) => Incoming::PubAck {
            pkid: a.pkid,
            ok: true,
            reason: String::new(),
        },
        v4::Packet::PubRec(a) => Incoming::PubRec {
            pkid: a.pkid,
            ok: true,
            reason: String::new(),
        },
        v4::Packet::PubRel(a) => Incoming::PubRel {
            pkid: a.pkid,
            ok: true,
        },
        v4::Packet::PubComp(a) => Incoming::PubComp {
            pkid: a.pkid,
            ok: true,
        },
        v4::Packet::SubAck(a) => Incoming::SubAck {
            pkid: a.pkid,
            granted: a
                .return_codes
                .iter()
                .map(|c| match c {
                    v4::SubscribeReasonCode::Success(q) => Some(*q as u8),
                    v4::SubscribeReasonCode::Failure => None,
                })
                .collect(),
        },
        v4::Packet::UnsubAck(a) => Incoming::UnsubAck { pkid: a.pkid },
        v4::Packet::PingResp => Incoming::PingResp,
        v4::Packet::Disconnect => Incoming::Disconnect {
            reason: String::new(),
        },
        other => Incoming::Other(format!("{other:?}")),
    }
}

fn from5(packet: v5::Packet) -> Incoming {
    match packet {
        v5::Packet::ConnAck(ack) => Incoming::ConnAck(ConnAckInfo {
            session_present: ack.session_present,
            refused: match ack.code {
                v5::ConnectReturnCode::Success => None,
                other => Some(format!("{other:?}")),
            },
        }),
        v5::Packet::Publish(p) => Incoming::Publish(Message {
            topic: String::from_utf8_lossy(&p.topic).into_owned(),
            payload: p.payload,
            qos: p.qos as u8,
            dup: p.dup,
            retain: p.retain,
            pkid: p.pkid,
            message_expiry: p.properties.and_then(|p| p.message_expiry_interval),
        }),
        v5::Packet::PubAck(a) => Incoming::PubAck {
            pkid: a.pkid,
            ok: matches!(
                a.reason,
                v5::PubAckReason::Success | v5::PubAckReason::NoMatchingSubscribers
            ),
            reason: format!("{:?}", a.reason),
        },
        v5::Packet::PubRec(a) => Incoming::PubRec {
            pkid: a.pkid,
            ok: matches!(
                a.reason,
                v5::PubRecReason::Success | v5::PubRecReason::NoMatchingSubscribers
            ),
            reason: format!("{:?}", a.reason),
        },
        v5::Packet::PubRel(a) => Incoming::PubRel {
            pkid: a.pkid,
            ok: a.reason == v5::PubRelReason::Success,
        },
        v5::Packet::PubComp(a) => Incoming::PubComp {
            pkid: a.pkid,
            ok: a.reason == v5::PubCompReason::Success,
        },
        v5::Packet::SubAck(a) => Incoming::SubAck {
            pkid: a.pkid,
            granted: a
                .return_codes
                .iter()
                .map(|c| match c {
                    v5::SubscribeReasonCode::Success(q) => Some(*q as u8),
                    _ => None,
                })
                .collect(),
        },
        v5::Packet::UnsubAck(a) => Incoming::UnsubAck { pkid: a.pkid },
        v5::Packet::PingResp(_) => Incoming::PingResp,
        v5::Packet::Disconnect(d) => Incoming::Disconnect {
            reason: match d.properties.and_then(|p| p.server_reference) {
                Some(reference) => format!("{:?} (server reference {reference})", d.reason_code),
                None => format!("{:?}", d.reason_code),
            },
        },
        other => Incoming::Other(format!("{other:?}")),
    }
}
