//! Which client ids have a session, and who holds each one right now.
//!
//! A session is either *online* (a connection task owns it and can be asked to give it up) or
//! *offline* (parked here, with its expiry and delayed will). Session takeover is a message to the
//! old owner, never a reach into its state: the old connection closes itself, parks the session
//! and answers, and the new connection then claims the parked session.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};

use super::Session;
use crate::protocol::Will;

/// A request to an online connection to give up its session (takeover or admin kick).
#[derive(Debug)]
pub struct Kick {
    /// Signalled once the session has been parked (or discarded).
    pub done: oneshot::Sender<()>,
}

/// A will waiting for its delay to pass (v5 Will Delay Interval).
#[derive(Debug, Clone)]
pub struct PendingWill {
    pub will: Will,
}

enum Slot {
    Online {
        conn_id: u64,
        kick: mpsc::Sender<Kick>,
    },
    Offline {
        session: Box<Session>,
        /// Distinguishes this offline period from later ones, so that a timer armed for an old
        /// period cannot expire a session that reconnected and left again.
        epoch: u64,
        will: Option<PendingWill>,
    },
}

/// The outcome of claiming a client id for a new connection.
pub enum Claim {
    /// No session existed (or it was online and has been handed over: see `Busy`).
    Fresh,
    /// The parked session, and its pending will if one was waiting.
    Resumed(Box<Session>, Option<PendingWill>),
    /// Someone holds it online: kick them with this sender and try again.
    Busy(mpsc::Sender<Kick>),
}

/// All sessions by client id.
#[derive(Default)]
pub struct Registry {
    slots: Mutex<HashMap<Arc<str>, Slot>>,
    next_id: AtomicU64,
}

impl Registry {
    /// A process-unique id for connections and offline epochs.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Marks `client_id` as owned by connection `conn_id` unless someone else holds it online.
    pub fn claim(&self, client_id: &Arc<str>, conn_id: u64, kick: &mpsc::Sender<Kick>) -> Claim {
        let mut slots = self.slots.lock();
        let online = Slot::Online {
            conn_id,
            kick: kick.clone(),
        };
        match slots.remove(client_id) {
            None => {
                slots.insert(client_id.clone(), online);
                Claim::Fresh
            }
            Some(Slot::Offline { session, will, .. }) => {
                slots.insert(client_id.clone(), online);
                Claim::Resumed(session, will)
            }
            Some(Slot::Online {
                conn_id: other,
                kick: other_kick,
            }) => {
                let sender = other_kick.clone();
                slots.insert(
                    client_id.clone(),
                    Slot::Online {
                        conn_id: other,
                        kick: other_kick,
                    },
                );
                Claim::Busy(sender)
            }
        }
    }

    /// Parks a persistent session after its connection closed. Returns the epoch to arm the
    /// expiry/will timer with, or `None` if `conn_id` no longer owned the slot.
    pub fn park(&self, session: Session, conn_id: u64, will: Option<PendingWill>) -> Option<u64> {
        let mut slots = self.slots.lock();
        let owned = matches!(slots.get(&session.client_id), Some(Slot::Online { conn_id: c, .. }) if *c == conn_id);
        if !owned {
            return None;
        }
        let epoch = self.next_id();
        slots.insert(
            session.client_id.clone(),
            Slot::Offline {
                session: Box::new(session),
                epoch,
                will,
            },
        );
        Some(epoch)
    }

    /// Parks a session restored from storage at start; returns its offline epoch.
    pub fn restore(&self, session: Session) -> u64 {
        let epoch = self.next_id();
        self.slots.lock().insert(
            session.client_id.clone(),
            Slot::Offline {
                session: Box::new(session),
                epoch,
                will: None,
            },
        );
        epoch
    }

    /// Releases the slot of a non-persistent session whose connection closed.
    pub fn release(&self, client_id: &Arc<str>, conn_id: u64) {
        let mut slots = self.slots.lock();
        if matches!(slots.get(client_id), Some(Slot::Online { conn_id: c, .. }) if *c == conn_id) {
            slots.remove(client_id);
        }
    }

    /// Takes the pending will of an offline session if it is still in the same offline epoch.
    pub fn take_due_will(&self, client_id: &Arc<str>, epoch: u64) -> Option<PendingWill> {
        let mut slots = self.slots.lock();
        match slots.get_mut(client_id) {
            Some(Slot::Offline { epoch: e, will, .. }) if *e == epoch => will.take(),
            _ => None,
        }
    }

    /// Removes an offline session whose expiry passed, if it is still in the same offline epoch.
    pub fn expire(
        &self,
        client_id: &Arc<str>,
        epoch: u64,
    ) -> Option<(Session, Option<PendingWill>)> {
        let mut slots = self.slots.lock();
        match slots.get(client_id) {
            Some(Slot::Offline { epoch: e, .. }) if *e == epoch => match slots.remove(client_id) {
                Some(Slot::Offline { session, will, .. }) => Some((*session, will)),
                _ => None,
            },
            _ => None,
        }
    }

    /// Kick senders of every online connection (for shutdown and admin use).
    pub fn online_count(&self) -> usize {
        self.slots
            .lock()
            .values()
            .filter(|s| matches!(s, Slot::Online { .. }))
            .count()
    }

    /// Number of sessions, online and offline.
    pub fn len(&self) -> usize {
        self.slots.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
