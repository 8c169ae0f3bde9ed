//! Cross-node wake in a cluster (`cluster.enabled`): the node whose dispatcher stores entries
//! for a session may not be the node the session is connected to. The PostgreSQL writer sends
//! `pg_notify(channel, client id)` in the transaction that stores a DEVICE entry or moves an
//! APPLICATION log on (PostgreSQL delivers notifications at commit, so a woken session finds
//! the entries), and every node listens ([`listen`]) and wakes its own online session
//! (`Mailbox::stored`).
//!
//! A notification can be lost while the listener reconnects; then every local persistent
//! session is woken once ([`Wake::Everyone`]). A lost wake never loses a message: the entries
//! are stored, and the session reads them at its next wake or reconnect.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use sqlx::{Postgres, Transaction};
use tokio::sync::mpsc;

use super::StorageError;

/// PostgreSQL's limit on a notification payload is 8,000 bytes; a longer client id is sent as
/// the empty payload, which wakes every local persistent session.
const MAX_PAYLOAD: usize = 7_999;
/// Wakes waiting for the broker to apply them; the listener waits when they are not taken.
pub const WAKE_QUEUE: usize = 1_024;
/// Pause before reconnecting a listener whose connection failed.
const RECONNECT_PAUSE: Duration = Duration::from_secs(1);

/// Whom to wake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wake {
    /// This session, if it is online on this node.
    Client(String),
    /// Every online persistent session of this node (a notification may have been lost).
    Everyone,
}

/// The notification channel of a schema. Channels are per database, so the schema is part of
/// the name; a name past PostgreSQL's 63-byte identifier limit uses a stable hash of it (FNV-1a:
/// the same on every node and every build).
pub fn channel(schema: &str) -> String {
    let name = format!("ferrymq_wake.{schema}");
    if name.len() <= 63 {
        return name;
    }
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in schema.bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("ferrymq_wake.{hash:016x}")
}

/// Sends one notification per client in `txn` (PostgreSQL folds duplicates within a
/// transaction).
pub async fn notify(
    txn: &mut Transaction<'static, Postgres>,
    channel: &str,
    clients: &[String],
) -> Result<(), StorageError> {
    if clients.is_empty() {
        return Ok(());
    }
    let payloads: Vec<&str> = clients
        .iter()
        .map(|c| {
            if c.len() > MAX_PAYLOAD {
                ""
            } else {
                c.as_str()
            }
        })
        .collect();
    sqlx::query("SELECT pg_notify($1, c) FROM UNNEST($2::text[]) AS c")
        .bind(channel)
        .bind(&payloads)
        .execute(&mut **txn)
        .await
        .map_err(|e| StorageError::engine("postgres", e))?;
    Ok(())
}

/// Listens on `channel` until `wakes` is closed, reconnecting after failures; after every
/// (re)connection it sends [`Wake::Everyone`], since notifications sent meanwhile are lost.
pub async fn listen(options: PgConnectOptions, channel: String, wakes: mpsc::Sender<Wake>) {
    loop {
        match listen_once(&options, &channel, &wakes).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(channel, error = %e, "wake listener lost its connection; reconnecting (local persistent sessions are woken once then)");
                tokio::time::sleep(RECONNECT_PAUSE).await;
            }
        }
    }
}

/// One connection's worth of listening: `Ok` when the broker stopped taking wakes.
async fn listen_once(
    options: &PgConnectOptions,
    channel: &str,
    wakes: &mpsc::Sender<Wake>,
) -> Result<(), sqlx::Error> {
    // A pool of its own: the listener holds its connection for good, and must not take one
    // from the writer's pool.
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(options.clone())
        .await?;
    let mut listener = PgListener::connect_with(&pool).await?;
    listener.listen(channel).await?;
    tracing::info!(channel, "listening for cross-node wakes");
    if wakes.send(Wake::Everyone).await.is_err() {
        return Ok(());
    }
    loop {
        // `None`: the connection was lost (and notifications with it); the next call
        // reconnects and listens again.
        let wake = match listener.try_recv().await? {
            Some(n) if n.payload().is_empty() => Wake::Everyone,
            Some(n) => Wake::Client(n.payload().to_string()),
            None => {
                tracing::warn!(channel, "wake listener reconnecting");
                Wake::Everyone
            }
        };
        if wakes.send(wake).await.is_err() {
            return Ok(());
        }
    }
}
