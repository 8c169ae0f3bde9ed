//! Accept loops. Every listener serves MQTT 3.1, 3.1.1 and 5.0, over plain TCP, TLS, WebSocket or
//! WebSocket over TLS, optionally behind a PROXY protocol header.
//!
//! The accept loop only accepts and counts; everything that waits on the peer (PROXY header,
//! TLS and WebSocket handshakes) runs in the connection's own task, bounded by
//! `limits.connect_timeout_secs`, so a slow or hostile client never holds up the others.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::auth::ClientCertificate;
use crate::broker::Broker;
use crate::config::{ListenerConfig, ListenerProtocol};
use crate::connection::transport::Transport;
use crate::connection::{self, CloseSignals, ConnInfo};
use crate::metrics::{ConnectResult, HandshakeStage, ListenerMetrics};
use crate::rate_limit::ConnectionRate;
use crate::tls::{TlsError, TlsReloader};
use crate::{proxy_protocol, tls, websocket};

/// Why a listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    #[error("{0}")]
    Bind(std::io::Error),
    #[error("TLS configuration: {0}")]
    Tls(TlsError),
}

/// A bound listener, ready to accept.
pub struct Listener {
    pub config: ListenerConfig,
    listener: TcpListener,
    context: Arc<Context>,
}

/// What every connection of one listener needs before CONNECT.
struct Context {
    config: ListenerConfig,
    name: Arc<str>,
    tls: Option<Arc<TlsReloader>>,
}

impl Listener {
    /// Loads TLS files and binds now, so that a bad certificate or a port conflict is reported
    /// at start, before anything else runs.
    pub async fn bind(config: &ListenerConfig) -> Result<Listener, ListenerError> {
        let tls = if config.protocol.is_tls() {
            Some(Arc::new(
                TlsReloader::load(config).map_err(ListenerError::Tls)?,
            ))
        } else {
            None
        };
        let listener = TcpListener::bind(config.bind)
            .await
            .map_err(ListenerError::Bind)?;
        Ok(Listener {
            config: config.clone(),
            listener,
            context: Arc::new(Context {
                config: config.clone(),
                name: Arc::from(config.name.as_str()),
                tls,
            }),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts until shutdown. Connections beyond `limits.max_connections` are closed at once;
    /// connections over `limits.max_connection_rate` are marked so that their CONNECT is refused
    /// with a reason. Accept errors (out of file descriptors, say) are logged and retried after
    /// a pause instead of spinning.
    pub async fn run(
        self,
        broker: Arc<Broker>,
        connections: Arc<Semaphore>,
        rate: Arc<ConnectionRate>,
        signals: CloseSignals,
    ) {
        let mut shutdown = signals.shutdown.clone();
        // A shutdown drain stops the accepting too; the connections keep their own copy to wait
        // for their turn. A fenced node keeps accepting, to answer CONNECT with Server
        // unavailable rather than a refused TCP connect (and to serve again once unfenced).
        let mut draining = signals.drain.clone();
        let listener_metrics = broker.metrics.listener(&self.config.name);
        if let Some(tls) = &self.context.tls {
            tokio::spawn(
                tls.clone()
                    .watch(listener_metrics.clone(), shutdown.clone()),
            );
        }
        loop {
            let accepted = tokio::select! {
                _ = shutdown.changed() => return,
                changed = draining.changed() => {
                    let shutting_down = changed.is_err() || draining.borrow_and_update().as_ref().is_some_and(|plan| {
                        plan.reason == crate::drain::LeaveReason::ShuttingDown
                    });
                    if shutting_down {
                        return;
                    }
                    continue;
                }
                accepted = self.listener.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(listener = %self.config.name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = connections.clone().try_acquire_owned() else {
                broker.metrics.connections_refused.inc();
                drop(stream);
                continue;
            };
            let over_rate = !rate.admit();
            if over_rate {
                listener_metrics.connection_rate_limited.inc();
            }
            let _ = stream.set_nodelay(true);
            let broker = broker.clone();
            let signals = signals.clone();
            let context = self.context.clone();
            let metrics = listener_metrics.clone();
            tokio::spawn(connection_task(
                broker, context, metrics, stream, peer, over_rate, signals, permit,
            ));
        }
    }
}

/// One accepted connection's task: the handshakes the listener asks for, then the MQTT
/// connection until it ends. Holds `permit` (one of `limits.max_connections`) throughout.
#[allow(clippy::too_many_arguments)]
async fn connection_task(
    broker: Arc<Broker>,
    context: Arc<Context>,
    metrics: Arc<ListenerMetrics>,
    stream: TcpStream,
    peer: SocketAddr,
    over_rate: bool,
    signals: CloseSignals,
    permit: OwnedSemaphorePermit,
) {
    // Open from accept on: the gauge includes connections still in a handshake.
    let _open = metrics.network_connection();
    let deadline = Duration::from_secs(broker.config.limits.connect_timeout_secs);
    // Boxed: the TLS and WebSocket handshake futures are several KiB, and kept inline they
    // would size this task for the connection's whole life (a future is as large as its
    // largest state). Boxed, they are freed once the handshakes are done.
    let established = tokio::time::timeout(
        deadline,
        Box::pin(establish(&context, &broker, &metrics, stream, peer)),
    )
    .await;
    match established {
        Ok(Some((transport, peer, client_cert))) => {
            let info = ConnInfo {
                peer,
                listener: context.name.clone(),
                client_cert,
                over_rate,
            };
            connection::serve(broker, transport, info, signals, metrics.clone()).await;
        }
        Ok(None) => {}
        Err(_) => {
            metrics.handshake_failed(HandshakeStage::Timeout);
            broker
                .metrics
                .connect_result(ConnectResult::HandshakeFailed);
            tracing::debug!(listener = %context.name, %peer, "handshake timed out");
        }
    }
    drop(permit);
}

/// Reads the PROXY header and runs the TLS and WebSocket handshakes the listener asks for.
/// `None` when one failed (logged and counted).
async fn establish(
    context: &Context,
    broker: &Broker,
    metrics: &ListenerMetrics,
    mut stream: TcpStream,
    mut peer: SocketAddr,
) -> Option<(Transport, SocketAddr, Option<ClientCertificate>)> {
    let config = &context.config;
    let failed = |stage: HandshakeStage| {
        metrics.handshake_failed(stage);
        broker
            .metrics
            .connect_result(ConnectResult::HandshakeFailed);
    };
    if config.proxy_protocol {
        match proxy_protocol::read_header(&mut stream).await {
            Ok(Some(source)) => peer = source,
            Ok(None) => {}
            Err(e) => {
                failed(HandshakeStage::ProxyHeader);
                tracing::debug!(listener = %context.name, %peer, error = %e, "PROXY header refused");
                return None;
            }
        }
    }
    let max_packet = broker.config.limits.max_packet_size;
    let ws_failed = |e: tokio_tungstenite::tungstenite::Error| {
        failed(HandshakeStage::WebSocket);
        tracing::debug!(listener = %context.name, %peer, error = %e, "WebSocket upgrade failed");
    };
    match config.protocol {
        ListenerProtocol::Mqtt => Some((Transport::Tcp(stream), peer, None)),
        ListenerProtocol::Ws => match websocket::accept(stream, &config.path, max_packet).await {
            Ok(ws) => Some((Transport::Ws(Box::new(ws)), peer, None)),
            Err(e) => {
                ws_failed(e);
                None
            }
        },
        ListenerProtocol::Mqtts | ListenerProtocol::Wss => {
            let acceptor = context.tls.as_ref()?.acceptor();
            let stream = match acceptor.accept(stream).await {
                Ok(stream) => stream,
                Err(e) => {
                    failed(HandshakeStage::Tls);
                    tracing::debug!(listener = %context.name, %peer, error = %e, "TLS handshake failed");
                    return None;
                }
            };
            let client_cert = tls::client_certificate(stream.get_ref().1);
            if config.protocol == ListenerProtocol::Mqtts {
                return Some((Transport::Tls(Box::new(stream)), peer, client_cert));
            }
            match websocket::accept(stream, &config.path, max_packet).await {
                Ok(ws) => Some((Transport::Wss(Box::new(ws)), peer, client_cert)),
                Err(e) => {
                    ws_failed(e);
                    None
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future an async fn returns, without calling it.
    fn future_size<F, A, B, C, D, E, G, H, I, Fut>(_: &F) -> usize
    where
        F: FnOnce(A, B, C, D, E, G, H, I) -> Fut,
    {
        std::mem::size_of::<Fut>()
    }

    /// Every connection's task is allocated at this size for the connection's whole life, so it
    /// is most of what an idle connection costs (docs/benchmarks.md). It was about 4 KiB (debug
    /// and release alike) after the TLS/WebSocket loops and handshakes were boxed; holding them
    /// inline had made it 11.5 KiB. The bound leaves room for ordinary growth and catches that.
    #[test]
    fn connection_task_future_stays_small() {
        let size = future_size(&connection_task);
        assert!(
            size <= 6 * 1024,
            "the connection task's future is {size} bytes: is a large stream, buffer or \
             handshake held inline across an .await? (see docs/benchmarks.md)"
        );
    }
}
