//! Which client ids have a session, and who holds each one right now.
//!
//! A session is either *online* (a connection task owns it and can be asked to give it up) or
//! *offline* (parked here, with its expiry and delayed will). Session takeover is a message to the
//! old owner, never a reach into its state: the old connection closes itself, parks the session
//! and answers, and the new connection then claims the parked session.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::oneshot;

use super::Session;
use crate::protocol::Will;

/// A request to an online connection to give up its session (takeover or admin kick).
#[derive(Debug)]
pub struct Kick {
    /// Signalled once the session has been parked (or discarded).
    pub done: oneshot::Sender<()>,
    pub reason: KickReason,
}

/// Why a connection is asked to close (v5 DISCONNECT 0x8E or 0x98).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KickReason {
    /// A new connection with the same client id.
    TakenOver,
    /// The admin API.
    Administrative,
}

/// What the admin API may see of a connected client; set once, after CONNACK.
#[derive(Debug)]
pub struct OnlineInfo {
    pub mailbox: Arc<crate::router::Mailbox>,
    pub peer: std::net::SocketAddr,
    pub listener: String,
    pub protocol: &'static str,
    /// Milliseconds since the epoch.
    pub connected_at_ms: u64,
    /// Session Expiry Interval in force at CONNECT (`u32::MAX`: never).
    pub expiry_interval: u32,
}

/// A read-only look at one registry slot.
pub enum SlotView<'a> {
    /// Connected; `None` while the handshake is still finishing.
    Online(Option<&'a OnlineInfo>),
    /// Parked, with whether a delayed will is waiting.
    Offline(&'a Session, bool),
}

/// A will waiting for its delay to pass (v5 Will Delay Interval).
#[derive(Debug, Clone)]
pub struct PendingWill {
    /// Boxed: every session's registry slot is as large as its largest variant.
    pub will: Box<Will>,
}

fn view(slot: &Slot) -> SlotView<'_> {
    match slot {
        Slot::Online { info, .. } => SlotView::Online(info.as_deref()),
        Slot::Offline { session, will, .. } => SlotView::Offline(session, will.is_some()),
    }
}

enum Slot {
    Online {
        conn_id: u64,
        /// Taken by the first connection that wants the session; a oneshot because a
        /// connection is kicked at most once (and it costs far less memory than a channel).
        kick: Option<oneshot::Sender<Kick>>,
        info: Option<Arc<OnlineInfo>>,
    },
    Offline {
        session: Box<Session>,
        /// Distinguishes this offline period from later ones, so that a timer armed for an old
        /// period cannot expire a session that reconnected and left again.
        epoch: u64,
        will: Option<PendingWill>,
        /// Keys of this period's entries in `Registry::deadlines`, removed when it ends.
        deadlines: Vec<DeadlineKey>,
    },
}

type DeadlineKey = (u64, u64, u8);

/// The outcome of claiming a client id for a new connection.
pub enum Claim {
    /// No session existed (or it was online and has been handed over: see `Busy`).
    Fresh,
    /// The parked session, and its pending will if one was waiting.
    Resumed(Box<Session>, Option<PendingWill>),
    /// Someone holds it online: kick them with this sender (`None` when another connection is
    /// already kicking them) and try again.
    Busy(Option<oneshot::Sender<Kick>>),
}

/// What falls due for an offline session at a deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// The delayed will is to be published.
    Will,
    /// The session expires.
    Expiry,
}

/// All sessions by client id, and the deadlines of the offline ones.
#[derive(Default)]
pub struct Registry {
    slots: Mutex<HashMap<Arc<str>, Slot>>,
    /// (deadline in ms since epoch, offline epoch) → client. One sweeper pops what is due, a
    /// bounded number per tick, instead of a sleeping task per offline session.
    deadlines: Mutex<BTreeMap<DeadlineKey, (Arc<str>, Due)>>,
    next_id: AtomicU64,
}

impl Registry {
    /// A process-unique id for connections and offline epochs.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Marks `client_id` as owned by connection `conn_id` unless someone else holds it online.
    /// On success the connection's kick sender (taken from `kick`) moves into the slot.
    pub fn claim(
        &self,
        client_id: &Arc<str>,
        conn_id: u64,
        kick: &mut Option<oneshot::Sender<Kick>>,
    ) -> Claim {
        let mut slots = self.slots.lock();
        match slots.get_mut(client_id) {
            Some(Slot::Online { kick: other, .. }) => {
                // Only one kicker at a time takes the sender; later ones wait for the slot.
                return Claim::Busy(other.take());
            }
            None | Some(Slot::Offline { .. }) => {}
        }
        let online = Slot::Online {
            conn_id,
            kick: kick.take(),
            info: None,
        };
        match slots.insert(client_id.clone(), online) {
            Some(Slot::Offline {
                session,
                will,
                deadlines,
                ..
            }) => {
                self.forget_deadlines(&deadlines);
                Claim::Resumed(session, will)
            }
            _ => Claim::Fresh,
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
                deadlines: Vec::new(),
            },
        );
        Some(epoch)
    }

    /// Puts this node's copy of a session another node holds in place of the one parked here
    /// (which is returned, with its deadlines dropped). `Err` gives the session back when the
    /// client id is online on this node.
    pub fn mirror(&self, session: Session) -> Result<(u64, Option<Box<Session>>), Box<Session>> {
        let mut slots = self.slots.lock();
        if matches!(slots.get(&session.client_id), Some(Slot::Online { .. })) {
            return Err(Box::new(session));
        }
        let epoch = self.next_id();
        let old = slots.insert(
            session.client_id.clone(),
            Slot::Offline {
                session: Box::new(session),
                epoch,
                will: None,
                deadlines: Vec::new(),
            },
        );
        match old {
            Some(Slot::Offline {
                session, deadlines, ..
            }) => {
                self.forget_deadlines(&deadlines);
                Ok((epoch, Some(session)))
            }
            _ => Ok((epoch, None)),
        }
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
                deadlines: Vec::new(),
            },
        );
        epoch
    }

    /// Schedules `due` for the offline period `epoch` of `client_id` at `deadline_ms` (nothing
    /// when that period is already over).
    pub fn schedule(&self, client_id: &Arc<str>, epoch: u64, deadline_ms: u64, due: Due) {
        let tag = match due {
            Due::Will => 0,
            Due::Expiry => 1,
        };
        let key = (deadline_ms, epoch, tag);
        let mut slots = self.slots.lock();
        if let Some(Slot::Offline {
            epoch: e,
            deadlines,
            ..
        }) = slots.get_mut(client_id)
        {
            if *e == epoch {
                deadlines.push(key);
                self.deadlines.lock().insert(key, (client_id.clone(), due));
            }
        }
    }

    fn forget_deadlines(&self, keys: &[DeadlineKey]) {
        if keys.is_empty() {
            return;
        }
        let mut deadlines = self.deadlines.lock();
        for key in keys {
            deadlines.remove(key);
        }
    }

    /// Takes up to `budget` deadlines that passed by `now_ms`, earliest first. An entry whose
    /// session came back online or started a new offline period is simply stale: the epoch
    /// checks in [`Registry::take_due_will`] and [`Registry::expire`] ignore it (entries of a
    /// period that ended are normally removed with it).
    pub fn take_due(&self, now_ms: u64, budget: usize) -> Vec<(Arc<str>, u64, Due)> {
        let mut deadlines = self.deadlines.lock();
        let mut due = Vec::new();
        while due.len() < budget {
            let Some(entry) = deadlines.first_entry() else {
                break;
            };
            if entry.key().0 > now_ms {
                break;
            }
            let ((_, epoch, _), (client, what)) = entry.remove_entry();
            due.push((client, epoch, what));
        }
        due
    }

    /// Records what the admin API shows about connection `conn_id`, if it still owns the slot.
    pub fn set_online_info(&self, client_id: &Arc<str>, conn_id: u64, online: Arc<OnlineInfo>) {
        let mut slots = self.slots.lock();
        if let Some(Slot::Online {
            conn_id: c, info, ..
        }) = slots.get_mut(client_id)
        {
            if *c == conn_id {
                *info = Some(online);
            }
        }
    }

    /// For an admin kick: `None` when `client_id` is not online, `Some(None)` when another
    /// connection or kick already took the sender.
    pub fn take_kick(&self, client_id: &str) -> Option<Option<oneshot::Sender<Kick>>> {
        match self.slots.lock().get_mut(client_id) {
            Some(Slot::Online { kick, .. }) => Some(kick.take()),
            _ => None,
        }
    }

    /// Removes an offline session (admin delete); `None` when it is online or unknown.
    pub fn remove_offline(&self, client_id: &str) -> Option<(Session, Option<PendingWill>)> {
        let mut slots = self.slots.lock();
        if !matches!(slots.get(client_id), Some(Slot::Offline { .. })) {
            return None;
        }
        match slots.remove(client_id) {
            Some(Slot::Offline {
                session,
                will,
                deadlines,
                ..
            }) => {
                self.forget_deadlines(&deadlines);
                Some((*session, will))
            }
            _ => None,
        }
    }

    /// Calls `f` for every session, under the registry lock: keep `f` cheap (the admin API
    /// only compares ids and copies the few it returns).
    pub fn for_each_view<F: FnMut(&Arc<str>, SlotView<'_>)>(&self, mut f: F) {
        for (id, slot) in self.slots.lock().iter() {
            f(id, view(slot));
        }
    }

    /// Applies `f` to the session of `client_id`, if there is one.
    pub fn with_view<R>(&self, client_id: &str, f: impl FnOnce(SlotView<'_>) -> R) -> Option<R> {
        self.slots.lock().get(client_id).map(|slot| f(view(slot)))
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
                Some(Slot::Offline {
                    session,
                    will,
                    deadlines,
                    ..
                }) => {
                    self.forget_deadlines(&deadlines);
                    Some((*session, will))
                }
                _ => None,
            },
            _ => None,
        }
    }
}
