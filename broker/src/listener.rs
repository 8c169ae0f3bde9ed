//! Accept loops. One TCP port serves MQTT 3.1, 3.1.1 and 5.0.

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use crate::broker::Broker;
use crate::config::ListenerConfig;
use crate::connection;

/// A bound listener, ready to accept.
pub struct Listener {
    pub config: ListenerConfig,
    listener: TcpListener,
}

impl Listener {
    /// Binds now, so that a port conflict is reported at start, before anything else runs.
    pub async fn bind(config: &ListenerConfig) -> std::io::Result<Listener> {
        let listener = TcpListener::bind(config.bind).await?;
        Ok(Listener {
            config: config.clone(),
            listener,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts until shutdown. Connections beyond `limits.max_connections` are closed at once;
    /// accept errors (out of file descriptors, say) are logged and retried after a pause instead
    /// of spinning.
    pub async fn run(
        self,
        broker: Arc<Broker>,
        connections: Arc<Semaphore>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let name: Arc<str> = Arc::from(self.config.name.as_str());
        let listener_metrics = broker.metrics.listener(&self.config.name);
        loop {
            let accepted = tokio::select! {
                _ = shutdown.changed() => return,
                accepted = self.listener.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(listener = %self.config.name, error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = connections.clone().try_acquire_owned() else {
                broker.metrics.connections_refused.inc();
                drop(stream);
                continue;
            };
            let broker = broker.clone();
            let shutdown = shutdown.clone();
            let name = name.clone();
            let listener_metrics = listener_metrics.clone();
            tokio::spawn(async move {
                connection::serve(broker, stream, peer, name, shutdown, listener_metrics).await;
                drop(permit);
            });
        }
    }
}
