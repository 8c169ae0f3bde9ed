//! One client connection: CONNECT handshake, then a single task that reads, writes and delivers.
//!
//! The task selects over the socket's read half, its write half, the session's outbound queue,
//! takeover/shutdown signals and one timer. Reads take whatever the kernel has (up to a large
//! buffer) and every complete packet in it is decoded and handled before the next wake-up;
//! responses and deliveries accumulate in one output buffer that goes out in a single `write`.
//! That is what keeps syscalls and wake-ups per message low (see docs/architecture.md).

mod connect;
pub mod transport;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use rumqttc::v5::mqttbytes::v5::Packet;
use tokio::io::AsyncWriteExt;
use tokio::sync::{oneshot, watch};

use self::transport::{Io, ReadSide, Transport, WriteSide};
use crate::auth::ClientCertificate;
use crate::broker::Broker;
use crate::drain::{self, DrainPlan, DrainSignal};
use crate::metrics::{ConnectResult, DisconnectReason, ListenerMetrics};
use crate::protocol::{
    encode, Decoder, Disconnect, DisconnectProperties, DisconnectReasonCode, Incoming,
    ProtocolVersion,
};
use crate::rate_limit::TokenBucket;
use crate::router::place_blocked;
use crate::session::machine::{Flow, Machine, PendingReply, MAX_PENDING_REPLIES};
use crate::session::registry::{Kick, KickReason, OnlineInfo};
use crate::storage::StorageError;

/// Free space made available for the first reads. Small, because an idle connection should
/// cost little memory (most IoT connections are idle most of the time).
const READ_CHUNK: usize = 1024;
/// Largest read: a busy connection's read size doubles up to this whenever a read fills the
/// buffer, so it drains many packets per syscall.
const MAX_READ_CHUNK: usize = 64 * 1024;
/// Stop taking new work (reads, deliveries) while this much output waits for the socket.
const OUTPUT_HIGH_WATER: usize = 256 * 1024;
/// Deliveries taken from the queue per wake-up before the socket gets a turn.
const DELIVERY_BATCH: usize = 256;
/// Time a closing connection waits for storage writes its unsent acks depended on.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Time allowed to flush a final DISCONNECT to a peer that is going away.
const CLOSE_FLUSH_TIMEOUT: Duration = Duration::from_secs(1);
/// Lingering close: after a server-sent DISCONNECT (or refusing CONNACK) and the shutdown of
/// our write side, what the peer still sends is read and discarded for at most this long
/// (until it closes its side). Closing a socket with unread input makes the kernel send a
/// reset, which can destroy the DISCONNECT in the peer's receive buffer before it reads it.
pub(crate) const LINGER_TIMEOUT: Duration = Duration::from_secs(1);
/// Most bytes discarded while lingering: a peer that floods past this gets its reset.
const LINGER_MAX_BYTES: usize = 1 << 20;

/// What the listener learnt about a connection before CONNECT.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The client's address: the socket peer, or the source its PROXY header named.
    pub peer: SocketAddr,
    /// The listener's name.
    pub listener: Arc<str>,
    /// The verified TLS client certificate, if one was presented.
    pub client_cert: Option<ClientCertificate>,
    /// Accepted over `limits.max_connection_rate`: its CONNECT is refused (v5 0x9F, v3 0x03).
    pub over_rate: bool,
}

/// How the server tells a connection to close: at once (`shutdown`), or at its turn of a drain.
#[derive(Clone)]
pub struct CloseSignals {
    pub shutdown: watch::Receiver<bool>,
    pub drain: DrainSignal,
}

/// Serves one accepted connection until it ends. Never panics on peer input.
pub async fn serve(
    broker: Arc<Broker>,
    transport: Transport,
    info: ConnInfo,
    signals: CloseSignals,
    listener: Arc<ListenerMetrics>,
) {
    let b = broker.clone();
    // A future is as large as its largest state, and this one lives as long as the connection.
    // The TLS and WebSocket loops hold their stream (rustls session state, WebSocket buffers)
    // by value, which made every connection's task several KiB larger, idle plain TCP ones
    // included (docs/benchmarks.md). So they run boxed, and only plain TCP runs inline.
    let result = match transport {
        Transport::Tcp(stream) => run(b, stream, &info, signals, &listener).await,
        Transport::Tls(stream) => Box::pin(run(b, *stream, &info, signals, &listener)).await,
        Transport::Ws(stream) => Box::pin(run(b, *stream, &info, signals, &listener)).await,
        Transport::Wss(stream) => Box::pin(run(b, *stream, &info, signals, &listener)).await,
    };
    if let Err(e) = result {
        tracing::debug!(peer = %info.peer, error = %e, "connection ended with an error");
    }
}

/// Why a connection loop ended.
enum End {
    /// The client sent DISCONNECT.
    ClientDisconnect { publish_will: bool },
    /// The peer closed the socket or it failed: an abnormal end, the will is published.
    SocketClosed,
    /// We close it: v5 clients are told why.
    Close(DisconnectReasonCode, &'static str),
    /// Another connection took the session over, or the admin API kicked it.
    Kicked(Kick),
    /// The broker is shutting down.
    Shutdown,
    /// The node is draining and this connection's turn to leave came.
    Drained(Arc<DrainPlan>),
}

async fn run<S: Io>(
    broker: Arc<Broker>,
    mut stream: S,
    info: &ConnInfo,
    mut signals: CloseSignals,
    listener: &ListenerMetrics,
) -> std::io::Result<()> {
    let peer = info.peer;
    let limits = broker.config.limits.clone();
    let mut rbuf = BytesMut::with_capacity(READ_CHUNK);
    // Allocated on first use: an idle connection writes nothing after CONNACK.
    let mut wbuf = BytesMut::new();
    let mut decoder = Decoder::new(limits.max_packet_size);

    let connect_deadline = Duration::from_secs(limits.connect_timeout_secs);
    let accepted = match tokio::time::timeout(
        connect_deadline,
        connect::handshake(&broker, &mut stream, info, &mut decoder, &mut rbuf),
    )
    .await
    {
        Ok(Ok(Some(accepted))) => accepted,
        Ok(Ok(None)) => return Ok(()),
        Ok(Err(e)) => {
            broker.metrics.connect_result(ConnectResult::NoConnect);
            return Err(e);
        }
        Err(_) => {
            tracing::debug!(%peer, "no CONNECT within the connect timeout");
            broker.metrics.connect_result(ConnectResult::NoConnect);
            return Ok(());
        }
    };
    let connect::Accepted {
        machine,
        conn_id,
        kick_rx,
        keep_alive,
        session_present,
        connack,
    } = accepted;
    let mut machine = machine;
    if rbuf.is_empty() {
        // Most clients go quiet after CONNECT: hold no read buffer until they speak again.
        rbuf = BytesMut::new();
    }
    let client_id = machine.session.client_id.clone();
    broker.metrics.connect_result(ConnectResult::Accepted);
    let connected = listener.connected(machine.session.kind);
    broker.registry.set_online_info(
        &client_id,
        conn_id,
        Arc::new(OnlineInfo {
            mailbox: machine.session.mailbox.clone(),
            peer,
            listener: listener.name.clone(),
            protocol: match machine.version {
                ProtocolVersion::V3_1 => "3.1",
                ProtocolVersion::V3_1_1 => "3.1.1",
                ProtocolVersion::V5 => "5.0",
            },
            connected_at_ms: crate::storage::codec::now_ms(),
            expiry_interval: machine.session.expiry_interval,
        }),
    );
    if broker.cluster().is_some() && machine.session.mailbox.is_persistent() {
        // Another node's dispatcher may have stored entries for this session after it was
        // read at CONNECT, and their cross-node wake found no mailbox to wake while the
        // handshake ran: one more read, now that wakes reach it, closes that gap.
        machine.session.mailbox.stored.notify_one();
    }
    wbuf.extend_from_slice(&connack);
    if session_present {
        machine.resend_inflight(&mut wbuf);
    }
    tracing::debug!(%peer, client_id = %client_id, version = ?machine.version, "client connected");

    let end = event_loop(
        &broker,
        &mut stream,
        &mut machine,
        &mut decoder,
        &mut rbuf,
        &mut wbuf,
        kick_rx,
        &mut signals,
        keep_alive,
    )
    .await;

    // Nobody drains the mailbox from here on: publishers waiting for room in it give up now
    // rather than after `slow_subscriber_wait_ms`, and new ones do not start waiting.
    machine.session.mailbox.set_online(false);
    let version = machine.version;
    let mut server_reference = None;
    let (will_allowed, reason, done) = match end {
        End::ClientDisconnect { publish_will } => {
            broker.metrics.disconnect(DisconnectReason::Client);
            (publish_will, None, None)
        }
        End::SocketClosed => {
            broker.metrics.disconnect(DisconnectReason::ConnectionLost);
            (true, None, None)
        }
        End::Close(code, why) => {
            tracing::debug!(%peer, client_id = %client_id, ?code, why, "closing connection");
            let counted = if is_client_violation(code) {
                broker.metrics.protocol_errors.inc();
                DisconnectReason::ProtocolError
            } else if code == DisconnectReasonCode::KeepAliveTimeout {
                DisconnectReason::KeepAliveTimeout
            } else if code == DisconnectReasonCode::MessageRateTooHigh {
                DisconnectReason::PublishRateExceeded
            } else {
                DisconnectReason::ServerError
            };
            broker.metrics.disconnect(counted);
            (true, Some((code, why)), None)
        }
        End::Kicked(kick) => {
            let (counted, code, why) = match kick.reason {
                KickReason::TakenOver => (
                    DisconnectReason::TakenOver,
                    DisconnectReasonCode::SessionTakenOver,
                    "session taken over",
                ),
                KickReason::Administrative => (
                    DisconnectReason::Administrative,
                    DisconnectReasonCode::AdministrativeAction,
                    "disconnected by an administrator",
                ),
            };
            broker.metrics.disconnect(counted);
            (true, Some((code, why)), Some(kick.done))
        }
        End::Shutdown => {
            broker.metrics.disconnect(DisconnectReason::Shutdown);
            (
                false,
                Some((
                    DisconnectReasonCode::ServerShuttingDown,
                    "server shutting down",
                )),
                None,
            )
        }
        End::Drained(plan) => {
            // As a shutdown: the client did nothing wrong and its session goes on elsewhere,
            // so no will.
            broker.metrics.disconnect(DisconnectReason::Shutdown);
            server_reference = plan.server_reference.clone();
            let reason = match plan.reason {
                drain::LeaveReason::ShuttingDown => (
                    DisconnectReasonCode::ServerShuttingDown,
                    "server shutting down: reconnect to another node",
                ),
                drain::LeaveReason::Fenced => (
                    DisconnectReasonCode::UseAnotherServer,
                    "this node lost contact with Kafka or PostgreSQL: reconnect to another node",
                ),
            };
            (false, Some(reason), None)
        }
    };
    let closed_by_us = reason.is_some();
    if let Some((code, why)) = reason {
        if version == ProtocolVersion::V5 {
            let close = Close {
                code,
                why,
                server_reference: server_reference.as_deref(),
                max_size: machine.client_max_packet_size(),
            };
            send_disconnect(&mut stream, &mut wbuf, close).await;
        }
    }
    // Bounded: a TLS close_notify or WebSocket close frame waits on a peer that may not read.
    // For TCP this is the FIN right behind the DISCONNECT.
    let _ = tokio::time::timeout(CLOSE_FLUSH_TIMEOUT, stream.shutdown()).await;
    machine.settle_pending_writes(SETTLE_TIMEOUT).await;
    if !machine.blocked.is_empty() {
        broker
            .metrics
            .messages_dropped_queue_full
            .add(machine.blocked.len() as u64);
        machine.blocked.clear();
    }
    let (session, will) = machine.into_parts();
    broker.close_session(session, conn_id, if will_allowed { will } else { None });
    if let Some(done) = done {
        let _ = done.send(());
    }
    // Only now, with the session handed on: a takeover or shutdown never waits for the linger.
    drop(connected);
    if closed_by_us {
        linger(&mut stream).await;
    }
    tracing::debug!(%peer, client_id = %client_id, "client disconnected");
    Ok(())
}

/// The read half of a lingering close (our write side is already shut down): reads and
/// discards what the peer still sends until it closes, [`LINGER_TIMEOUT`] passes or
/// [`LINGER_MAX_BYTES`] were discarded, so the socket is closed with nothing unread and the
/// peer gets our last packet and a FIN rather than a reset.
pub(crate) async fn linger<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) {
    use tokio::io::AsyncReadExt;
    let deadline = tokio::time::Instant::now() + LINGER_TIMEOUT;
    // Allocated only here: closing connections are few, live ones hold nothing for this.
    let mut sink = vec![0u8; 4096];
    let mut discarded = 0usize;
    while discarded < LINGER_MAX_BYTES {
        match tokio::time::timeout_at(deadline, stream.read(&mut sink)).await {
            Ok(Ok(n)) if n > 0 => discarded += n,
            // End of stream, an error or the deadline: nothing more to wait for.
            _ => break,
        }
    }
}

/// The connected phase. Returns why it ended.
#[allow(clippy::too_many_arguments)]
async fn event_loop<S: Io>(
    broker: &Arc<Broker>,
    stream: &mut S,
    machine: &mut Machine,
    decoder: &mut Decoder,
    rbuf: &mut BytesMut,
    wbuf: &mut BytesMut,
    mut kick_rx: oneshot::Receiver<Kick>,
    signals: &mut CloseSignals,
    keep_alive: u16,
) -> End {
    let metrics = broker.metrics.clone();
    let write_timeout = Duration::from_secs(broker.config.limits.write_timeout_secs);
    // Keep-alive is enforced at one and a half times the interval [MQTT-3.1.2-24]; 0 disables it.
    let idle_limit = (keep_alive > 0).then(|| Duration::from_millis(u64::from(keep_alive) * 1500));
    let mut last_read = Instant::now();
    let mut write_stalled_since: Option<Instant> = None;
    let timer = tokio::time::sleep(next_check(idle_limit, last_read, write_timeout));
    tokio::pin!(timer);
    let max_publish_rate = broker.config.limits.max_publish_rate;
    let mut publish_rate =
        (max_publish_rate > 0).then(|| TokenBucket::new(max_publish_rate, Instant::now()));
    // Packets that arrived in the same read as CONNECT are already buffered.
    if let Some(end) = handle_buffered(decoder, rbuf, machine, wbuf, &mut publish_rate) {
        return end;
    }
    let (mut reader, mut writer) = stream.halves();
    // Output a TLS or WebSocket layer still holds after `write` took it.
    let mut unflushed = false;
    let mut read_size = READ_CHUNK;
    let slow_wait = Duration::from_millis(broker.config.limits.slow_subscriber_wait_ms);
    let mut blocked_since: Option<tokio::time::Instant> = None;
    let mut kick_closed = false;
    // This connection's turn to leave once the node drains; kept across loop turns.
    let mut drain_turn = None;

    loop {
        let now = Instant::now();
        fill_output(machine, wbuf, now);
        if wbuf.is_empty() {
            write_stalled_since = None;
        } else if write_stalled_since.is_none() {
            write_stalled_since = Some(now);
        }
        if let Flow::Close(code, why) = fill_stored(machine, wbuf, now) {
            return End::Close(code, why);
        }
        let room = wbuf.len() < OUTPUT_HIGH_WATER;
        let can_read =
            room && machine.replies.len() < MAX_PENDING_REPLIES && machine.blocked.is_empty();
        if machine.blocked.is_empty() {
            blocked_since = None;
        } else if blocked_since.is_none() {
            blocked_since = Some(tokio::time::Instant::now());
        }
        let blocked_deadline = blocked_since.unwrap_or_else(tokio::time::Instant::now) + slow_wait;
        let watch_stored = !machine.session.stored_pending && machine.session.stored;
        let can_deliver = room && machine.window_open() && !machine.has_pending();

        tokio::select! {
            biased;
            kick = &mut kick_rx, if !kick_closed => match kick {
                Ok(kick) => return End::Kicked(kick),
                // The registry dropped the sender without kicking (it is shutting down this
                // slot); nothing to wait for any more.
                Err(_) => kick_closed = true,
            },
            _ = signals.shutdown.changed() => return End::Shutdown,
            plan = drain::my_turn(&mut signals.drain, &mut drain_turn) => return End::Drained(plan),
            pushed = push(&mut writer, wbuf), if !wbuf.is_empty() || unflushed => match pushed {
                Ok(Some(0)) | Err(_) => return End::SocketClosed,
                Ok(Some(n)) => {
                    metrics.bytes_sent.add(n as u64);
                    wbuf.advance(n);
                    write_stalled_since = None;
                    unflushed = S::BUFFERED;
                }
                Ok(None) => unflushed = false,
            },
            done = front_completion(&mut machine.replies), if !machine.replies.is_empty() => {
                if let Flow::Close(code, why) = machine.complete_front(done, wbuf) {
                    return End::Close(code, why);
                }
            }
            dropped = place_blocked(&mut machine.blocked, blocked_deadline), if !machine.blocked.is_empty() => {
                if dropped > 0 {
                    metrics.messages_dropped_queue_full.add(dropped);
                }
            }
            _ = machine.session.mailbox.stored.notified(), if watch_stored => {
                machine.session.stored_pending = true;
            }
            read = stored_read(&mut machine.stored_read), if machine.stored_read.is_some() => {
                if let Flow::Close(code, why) = machine.stored_arrived(read, wbuf, Instant::now()) {
                    return End::Close(code, why);
                }
            }
            // On plain TCP this waits for readability first and takes buffer space only then:
            // an idle connection holds no read buffer at all.
            read = reader.read_into(rbuf, read_size), if can_read => {
                let (n, filled) = match read {
                    Ok((0, _)) | Err(_) => return End::SocketClosed,
                    Ok(read) => read,
                };
                {
                    metrics.bytes_received.add(n as u64);
                    last_read = Instant::now();
                    if filled {
                        read_size = (read_size * 2).min(MAX_READ_CHUNK);
                    }
                    if let Some(end) = handle_buffered(decoder, rbuf, machine, wbuf, &mut publish_rate) {
                        return end;
                    }
                    // A quiet connection gives its (small) buffer back between packets.
                    if rbuf.is_empty() && read_size == READ_CHUNK {
                        *rbuf = BytesMut::new();
                    }
                }
            }
            delivery = machine.session.queue.recv(), if can_deliver => {
                if let Some(delivery) = delivery {
                    let now = Instant::now();
                    machine.deliver(delivery, wbuf, now);
                    machine.session.mailbox.note_drained();
                    // Take what else is already queued, so it leaves in the same write.
                    for _ in 1..DELIVERY_BATCH {
                        if !machine.window_open() || wbuf.len() >= OUTPUT_HIGH_WATER {
                            break;
                        }
                        match machine.session.queue.try_recv() {
                            Ok(d) => machine.deliver(d, wbuf, now),
                            Err(_) => break,
                        }
                    }
                }
            }
            _ = &mut timer => {
                let now = Instant::now();
                if let Some(limit) = idle_limit {
                    if now.duration_since(last_read) >= limit {
                        return End::Close(DisconnectReasonCode::KeepAliveTimeout, "keep alive timeout");
                    }
                }
                if let Some(since) = write_stalled_since {
                    if now.duration_since(since) >= write_timeout {
                        return End::SocketClosed;
                    }
                }
                let next = next_check(idle_limit, last_read, write_timeout);
                timer.as_mut().reset(tokio::time::Instant::now() + next);
            }
        }
    }
}

/// Decodes and handles every complete packet in `rbuf`. `Some` when the connection must end.
/// A PUBLISH over `limits.max_publish_rate` ends the connection with 0x96 (Message rate too
/// high), before it is handled.
fn handle_buffered(
    decoder: &mut Decoder,
    rbuf: &mut BytesMut,
    machine: &mut Machine,
    wbuf: &mut BytesMut,
    publish_rate: &mut Option<TokenBucket>,
) -> Option<End> {
    loop {
        match decoder.decode(rbuf) {
            Ok(Some(packet)) => match publish_limited(&packet, publish_rate) {
                true => {
                    return Some(End::Close(
                        DisconnectReasonCode::MessageRateTooHigh,
                        "message rate too high",
                    ))
                }
                false => match machine.handle(packet, wbuf) {
                    Flow::Continue => {}
                    Flow::ClientDisconnected { publish_will } => {
                        return Some(End::ClientDisconnect { publish_will })
                    }
                    Flow::Close(code, why) => return Some(End::Close(code, why)),
                },
            },
            Ok(None) => return None,
            Err(e) => {
                tracing::debug!(error = %e, "protocol error");
                return Some(End::Close(e.disconnect_reason(), "protocol error"));
            }
        }
    }
}

/// Writes some of `wbuf` (`Some(bytes taken)`), or with `wbuf` empty flushes what a TLS or
/// WebSocket layer holds (`None`).
async fn push<W: WriteSide>(writer: &mut W, wbuf: &[u8]) -> std::io::Result<Option<usize>> {
    if wbuf.is_empty() {
        writer.flush().await.map(|()| None)
    } else {
        writer.write(wbuf).await.map(Some)
    }
}

/// Whether `packet` is a PUBLISH beyond the client's rate.
fn publish_limited(packet: &Incoming, bucket: &mut Option<TokenBucket>) -> bool {
    match (packet, bucket) {
        (Incoming::Publish(_), Some(bucket)) => !bucket.try_take(Instant::now()),
        _ => false,
    }
}

/// Whether a close reason blames the client's input (as opposed to a keep-alive timeout or a
/// storage failure), for the `protocol_errors` counter.
fn is_client_violation(code: DisconnectReasonCode) -> bool {
    matches!(
        code,
        DisconnectReasonCode::MalformedPacket
            | DisconnectReasonCode::ProtocolError
            | DisconnectReasonCode::TopicNameInvalid
            | DisconnectReasonCode::TopicAliasInvalid
            | DisconnectReasonCode::ReceiveMaximumExceeded
            | DisconnectReasonCode::PacketTooLarge
    )
}

/// Reads durable entries into the output while the window allows.
fn fill_stored(machine: &mut Machine, wbuf: &mut BytesMut, now: Instant) -> Flow {
    if machine.wants_stored() && wbuf.len() < OUTPUT_HIGH_WATER && !machine.has_pending() {
        return machine.fetch_stored(wbuf, now);
    }
    Flow::Continue
}

/// Waits for a read of the durable queue the backend answers later.
async fn stored_read(
    pending: &mut Option<
        oneshot::Receiver<Result<Vec<crate::storage::QueuedEntry>, crate::storage::StorageError>>,
    >,
) -> Result<Vec<crate::storage::QueuedEntry>, crate::storage::StorageError> {
    match pending.as_mut() {
        Some(rx) => rx
            .await
            .unwrap_or(Err(crate::storage::StorageError::Closed)),
        None => std::future::pending().await,
    }
}

/// Waits for the storage write the oldest queued reply depends on.
async fn front_completion(replies: &mut VecDeque<PendingReply>) -> Result<(), StorageError> {
    match replies.front_mut().and_then(|r| r.wait.as_mut()) {
        Some(rx) => rx.await.unwrap_or(Err(StorageError::Closed)),
        None => Ok(()),
    }
}

/// Moves connection-local deliveries (retained on subscribe) into the output while allowed.
fn fill_output(machine: &mut Machine, wbuf: &mut BytesMut, now: Instant) {
    if machine.has_pending() && wbuf.len() < OUTPUT_HIGH_WATER {
        machine.flush_pending(wbuf, now);
    }
}

/// Time until the timer should look again: the keep-alive deadline, but at least every
/// `write_timeout` so a stalled writer is noticed even without keep-alive.
fn next_check(
    idle_limit: Option<Duration>,
    last_read: Instant,
    write_timeout: Duration,
) -> Duration {
    match idle_limit {
        Some(limit) => {
            let left = limit.saturating_sub(last_read.elapsed());
            left.min(write_timeout).max(Duration::from_millis(10))
        }
        None => write_timeout,
    }
}

/// Writes a v5 DISCONNECT after whatever output is pending, giving the peer a moment to take it.
/// A server-sent v5 DISCONNECT.
struct Close<'a> {
    code: DisconnectReasonCode,
    why: &'static str,
    /// Where the client should go instead (v5 Server Reference).
    server_reference: Option<&'a str>,
    /// The client's Maximum Packet Size.
    max_size: Option<u32>,
}

async fn send_disconnect<S: Io>(stream: &mut S, wbuf: &mut BytesMut, close: Close<'_>) {
    let packet = Packet::Disconnect(Disconnect {
        reason_code: close.code,
        properties: Some(DisconnectProperties {
            session_expiry_interval: None,
            reason_string: Some(close.why.to_string()),
            user_properties: Vec::new(),
            server_reference: close.server_reference.map(str::to_string),
        }),
    });
    if encode(&packet, ProtocolVersion::V5, close.max_size, wbuf).is_err() {
        // Too large for the client's Maximum Packet Size [MQTT-3.1.2-24]: the reason code
        // alone still says why.
        let bare = Packet::Disconnect(Disconnect {
            reason_code: close.code,
            properties: None,
        });
        let _ = encode(&bare, ProtocolVersion::V5, close.max_size, wbuf);
    }
    let _ = tokio::time::timeout(CLOSE_FLUSH_TIMEOUT, async {
        stream.write_all(wbuf).await?;
        stream.flush().await
    })
    .await;
    wbuf.clear();
}
