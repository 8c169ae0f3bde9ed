//! Publishers that retry what the broker did not acknowledge, subscribers that record what they
//! got (with DUP flags), and the checker that compares the two.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::mqtt::{ConnAckInfo, ConnectOptions, Connection, Incoming, Protocol};
use super::payload::{self, MsgId};

/// Connects, retrying refused/failed attempts every 50 ms until `deadline` (the broker may be
/// restarting).
pub async fn connect_retry(
    addr: SocketAddr,
    opts: &ConnectOptions,
    deadline: Duration,
) -> anyhow::Result<(Connection, ConnAckInfo)> {
    connect_any(&[addr], &mut 0, opts, deadline).await
}

/// Connects to the first of `addrs` that takes the connection, starting at `addrs[*next]`
/// and going round them (a load balancer in front of cluster nodes), retrying until
/// `deadline`; `*next` is left after the address that answered, so the next reconnect tries
/// another node first.
pub async fn connect_any(
    addrs: &[SocketAddr],
    next: &mut usize,
    opts: &ConnectOptions,
    deadline: Duration,
) -> anyhow::Result<(Connection, ConnAckInfo)> {
    if addrs.is_empty() {
        bail!("{}: no address to connect to", opts.client_id);
    }
    let started = Instant::now();
    let mut attempts = 0u32;
    loop {
        let addr = addrs[*next % addrs.len()];
        *next = (*next + 1) % addrs.len();
        attempts += 1;
        match Connection::connect(addr, opts).await {
            Ok(ok) => return Ok(ok),
            Err(e) if started.elapsed() < deadline => {
                if attempts % 100 == 0 {
                    eprintln!(
                        "{}: still connecting ({attempts} attempts, last {addr}): {e:#}",
                        opts.client_id
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => {
                return Err(e.context(format!(
                    "{}: no connection after {attempts} attempts in {deadline:?}",
                    opts.client_id
                )))
            }
        }
    }
}

/// Connects, subscribes to `filters` and disconnects: leaves an offline persistent subscription.
pub async fn subscribe_and_leave(
    addr: SocketAddr,
    opts: &ConnectOptions,
    filters: &[(&str, u8)],
) -> anyhow::Result<()> {
    let (mut conn, _) = Connection::connect(addr, opts).await?;
    conn.subscribe(1, filters, Duration::from_secs(10)).await?;
    conn.disconnect().await
}

/// What a [`Publisher`] sends.
#[derive(Debug, Clone)]
pub struct PublisherConfig {
    /// Goes into every payload; must be unique among the publishers of a test.
    pub id: u32,
    pub connect: ConnectOptions,
    /// 1 or 2.
    pub qos: u8,
    /// Sequence numbers `first_seq .. first_seq + count` are published.
    pub first_seq: u64,
    pub count: u64,
    /// Message `seq` goes to `topics[seq % topics.len()]`.
    pub topics: Vec<String>,
    /// Unacknowledged messages in flight at most.
    pub window: usize,
    /// Filler bytes after the 16-byte payload header.
    pub pad: usize,
    /// v5 Message Expiry Interval on every message.
    pub message_expiry: Option<u32>,
    /// Give up when no connection succeeds for this long.
    pub reconnect_deadline: Duration,
    /// A connection on which nothing arrives for this long (with messages in flight) is dropped and
    /// re-established.
    pub ack_timeout: Duration,
    /// A pause after each round of acknowledgements, to spread a run over time (zero: as fast
    /// as the window allows).
    pub pace: Duration,
}

impl PublisherConfig {
    pub fn new(id: u32, connect: ConnectOptions, qos: u8, count: u64, topics: Vec<String>) -> Self {
        PublisherConfig {
            id,
            connect,
            qos,
            first_seq: 0,
            count,
            topics,
            window: 32,
            pad: 48,
            message_expiry: None,
            reconnect_deadline: Duration::from_secs(60),
            ack_timeout: Duration::from_secs(30),
            pace: Duration::ZERO,
        }
    }

    pub fn topic_of(&self, seq: u64) -> &str {
        &self.topics[(seq % self.topics.len() as u64) as usize]
    }
}

/// What a publisher did: per message, how often it was sent and whether the broker accepted it.
#[derive(Debug, Clone)]
pub struct PublisherReport {
    pub id: u32,
    pub first_seq: u64,
    /// PUBLISH packets sent per message (index `seq - first_seq`).
    pub sends: Vec<u32>,
    /// Broker accepted the message (PUBACK, or PUBREC for QoS 2).
    pub acked: Vec<bool>,
    /// Whole flow finished (PUBACK, or PUBCOMP for QoS 2).
    pub completed: u64,
    /// PUBLISHes resent with DUP=1 after a reconnect.
    pub resent_dup: u64,
    /// PUBRELs resent after a reconnect.
    pub resent_pubrel: u64,
    /// Connections made (1 when the broker never went away).
    pub connections: u32,
    /// Reconnects of a persistent session where the broker answered session_present=0.
    pub sessions_lost: u32,
    /// Negative v5 acks (message sent again).
    pub rejected: u64,
    /// Acks for packet ids that were not in flight.
    pub unexpected_acks: u64,
    pub elapsed: Duration,
}

impl PublisherReport {
    /// `(message, times sent)` for every message sent at least once.
    pub fn sent(&self) -> impl Iterator<Item = (MsgId, u32)> + '_ {
        self.sends
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(i, n)| {
                (
                    MsgId {
                        publisher: self.id,
                        seq: self.first_seq + i as u64,
                    },
                    *n,
                )
            })
    }

    /// Every message the broker acknowledged.
    pub fn acked_ids(&self) -> impl Iterator<Item = MsgId> + '_ {
        self.acked
            .iter()
            .enumerate()
            .filter(|(_, a)| **a)
            .map(|(i, _)| MsgId {
                publisher: self.id,
                seq: self.first_seq + i as u64,
            })
    }

    pub fn acked_count(&self) -> u64 {
        self.acked.iter().filter(|a| **a).count() as u64
    }

    /// Messages sent more than once.
    pub fn retried(&self) -> u64 {
        self.sends.iter().filter(|n| **n > 1).count() as u64
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// PUBLISH sent, waiting for PUBACK (QoS 1) or PUBREC (QoS 2).
    Published,
    /// QoS 2: PUBREL sent, waiting for PUBCOMP.
    Released,
}

#[derive(Debug, Clone, Copy)]
struct InFlight {
    pkid: u16,
    stage: Stage,
}

/// A QoS 1/2 publisher that survives broker restarts: it reconnects, resends every PUBLISH not yet
/// acknowledged with DUP=1 and the same packet id, and resends PUBREL for QoS 2 messages that got
/// PUBREC but no PUBCOMP, in the original order (MQTT 4.4).
pub struct Publisher {
    cfg: PublisherConfig,
    /// Messages accepted by the broker so far, summed over all publishers sharing the counter.
    progress: Arc<AtomicU64>,
    report: PublisherReport,
    inflight: BTreeMap<u64, InFlight>,
    by_pkid: HashMap<u16, u64>,
    next_pkid: u16,
    next_seq: u64,
}

impl Publisher {
    pub fn new(cfg: PublisherConfig, progress: Arc<AtomicU64>) -> Publisher {
        let count = cfg.count as usize;
        Publisher {
            report: PublisherReport {
                id: cfg.id,
                first_seq: cfg.first_seq,
                sends: vec![0; count],
                acked: vec![false; count],
                completed: 0,
                resent_dup: 0,
                resent_pubrel: 0,
                connections: 0,
                sessions_lost: 0,
                rejected: 0,
                unexpected_acks: 0,
                elapsed: Duration::ZERO,
            },
            next_seq: cfg.first_seq,
            cfg,
            progress,
            inflight: BTreeMap::new(),
            by_pkid: HashMap::new(),
            next_pkid: 1,
        }
    }

    /// Publishes everything, riding out broker restarts, and reports.
    pub async fn run(self, addr: SocketAddr) -> anyhow::Result<PublisherReport> {
        self.run_any(vec![addr]).await
    }

    /// As [`Publisher::run`], reconnecting to the next of `addrs` that answers whenever a
    /// connection ends (the nodes of a cluster: the session moves with the client).
    pub async fn run_any(mut self, addrs: Vec<SocketAddr>) -> anyhow::Result<PublisherReport> {
        let mut next = 0;
        let started = Instant::now();
        if !(1..=2).contains(&self.cfg.qos) || self.cfg.topics.is_empty() || self.cfg.window == 0 {
            bail!(
                "publisher {}: needs QoS 1/2, topics and a window",
                self.cfg.id
            );
        }
        let end = self.cfg.first_seq + self.cfg.count;
        while self.report.completed < self.cfg.count {
            let (mut conn, ack) = connect_any(
                &addrs,
                &mut next,
                &self.cfg.connect,
                self.cfg.reconnect_deadline,
            )
            .await?;
            self.report.connections += 1;
            if self.report.connections > 1 && !self.cfg.connect.clean && !ack.session_present {
                self.report.sessions_lost += 1;
            }
            match self.session(&mut conn, end).await {
                Ok(()) => {
                    let _ = conn.disconnect().await;
                }
                Err(e) => {
                    eprintln!(
                        "publisher {}: connection {} ended: {e:#} ({} of {} done, {} in flight)",
                        self.cfg.id,
                        self.report.connections,
                        self.report.completed,
                        self.cfg.count,
                        self.inflight.len()
                    );
                }
            }
        }
        self.report.elapsed = started.elapsed();
        Ok(self.report)
    }

    fn alloc_pkid(&mut self) -> anyhow::Result<u16> {
        for _ in 0..=u16::MAX {
            let pkid = self.next_pkid;
            self.next_pkid = if self.next_pkid == u16::MAX {
                1
            } else {
                self.next_pkid + 1
            };
            if !self.by_pkid.contains_key(&pkid) {
                return Ok(pkid);
            }
        }
        bail!("no free packet id")
    }

    fn queue_message(
        &mut self,
        conn: &mut Connection,
        seq: u64,
        pkid: u16,
        dup: bool,
    ) -> anyhow::Result<()> {
        let id = MsgId {
            publisher: self.cfg.id,
            seq,
        };
        let body = payload::encode(id, self.cfg.pad);
        let topic = self.cfg.topic_of(seq).to_string();
        conn.queue_publish(
            &topic,
            self.cfg.qos,
            pkid,
            dup,
            body,
            self.cfg.message_expiry,
        )?;
        self.report.sends[(seq - self.cfg.first_seq) as usize] += 1;
        Ok(())
    }

    /// One connection's worth of work: resend, then keep the window full until done.
    async fn session(&mut self, conn: &mut Connection, end: u64) -> anyhow::Result<()> {
        // Retransmit in the original order: PUBLISH (DUP=1) or PUBREL.
        let pending: Vec<(u64, InFlight)> = self.inflight.iter().map(|(s, f)| (*s, *f)).collect();
        for (seq, f) in pending {
            match f.stage {
                Stage::Published => {
                    self.queue_message(conn, seq, f.pkid, true)?;
                    self.report.resent_dup += 1;
                }
                Stage::Released => {
                    conn.queue_pubrel(f.pkid)?;
                    self.report.resent_pubrel += 1;
                }
            }
        }
        loop {
            while self.inflight.len() < self.cfg.window && self.next_seq < end {
                let seq = self.next_seq;
                let pkid = self.alloc_pkid()?;
                self.queue_message(conn, seq, pkid, false)?;
                self.inflight.insert(
                    seq,
                    InFlight {
                        pkid,
                        stage: Stage::Published,
                    },
                );
                self.by_pkid.insert(pkid, seq);
                self.next_seq += 1;
            }
            conn.flush().await?;
            if self.report.completed >= self.cfg.count {
                return Ok(());
            }
            let Some(packet) = conn.recv_timeout(self.cfg.ack_timeout).await? else {
                bail!("no ack within {:?}", self.cfg.ack_timeout);
            };
            self.handle(conn, packet)?;
            while let Some(packet) = conn.try_decode()? {
                self.handle(conn, packet)?;
            }
            if !self.cfg.pace.is_zero() {
                tokio::time::sleep(self.cfg.pace).await;
            }
        }
    }

    fn accepted(&mut self, seq: u64) {
        let i = (seq - self.cfg.first_seq) as usize;
        if !self.report.acked[i] {
            self.report.acked[i] = true;
            self.progress.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn complete(&mut self, seq: u64, pkid: u16) {
        self.inflight.remove(&seq);
        self.by_pkid.remove(&pkid);
        self.report.completed += 1;
    }

    fn handle(&mut self, conn: &mut Connection, packet: Incoming) -> anyhow::Result<()> {
        match packet {
            Incoming::PubAck { pkid, ok, reason } if self.cfg.qos == 1 => {
                let Some(&seq) = self.by_pkid.get(&pkid) else {
                    self.report.unexpected_acks += 1;
                    return Ok(());
                };
                if ok {
                    self.accepted(seq);
                    self.complete(seq, pkid);
                } else {
                    self.rejected(conn, seq, pkid, &reason)?;
                }
            }
            Incoming::PubRec { pkid, ok, reason } if self.cfg.qos == 2 => {
                let Some(&seq) = self.by_pkid.get(&pkid) else {
                    self.report.unexpected_acks += 1;
                    // Unknown id: release it anyway so the broker can forget it.
                    conn.queue_pubrel(pkid)?;
                    return Ok(());
                };
                if !ok {
                    return self.rejected(conn, seq, pkid, &reason);
                }
                self.accepted(seq);
                if let Some(f) = self.inflight.get_mut(&seq) {
                    f.stage = Stage::Released;
                }
                conn.queue_pubrel(pkid)?;
            }
            Incoming::PubComp { pkid, .. } if self.cfg.qos == 2 => match self.by_pkid.get(&pkid) {
                Some(&seq) if self.inflight.get(&seq).map(|f| f.stage) == Some(Stage::Released) => {
                    self.complete(seq, pkid)
                }
                _ => self.report.unexpected_acks += 1,
            },
            Incoming::Disconnect { reason } => bail!("broker sent DISCONNECT {reason}"),
            Incoming::PingResp | Incoming::Publish(_) => {}
            other => {
                self.report.unexpected_acks += 1;
                eprintln!("publisher {}: unexpected {other:?}", self.cfg.id);
            }
        }
        Ok(())
    }

    fn rejected(
        &mut self,
        conn: &mut Connection,
        seq: u64,
        pkid: u16,
        reason: &str,
    ) -> anyhow::Result<()> {
        self.report.rejected += 1;
        if self.report.rejected > 1000 {
            bail!(
                "publisher {}: more than 1000 rejected messages (last: {reason})",
                self.cfg.id
            );
        }
        // The flow for this packet id is over; publish the message again as new.
        self.queue_message(conn, seq, pkid, false)
    }
}

/// One message handed to the subscribing application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub id: MsgId,
    pub topic: String,
    pub qos: u8,
    pub dup: bool,
    pub retain: bool,
    pub message_expiry: Option<u32>,
    /// Which connection of the subscriber (1-based) it arrived on.
    pub connection: u32,
}

/// A subscriber that acknowledges properly and records every delivery with its DUP flag.
///
/// QoS 2 is handled as the receiver side of MQTT 4.3.3 (method B): a message is handed to the
/// application on the first PUBLISH of a packet id; repeats of that id are answered with PUBREC
/// but not delivered again until PUBREL frees the id. The set of unreleased ids is kept across
/// reconnects (it is session state) and dropped only when the broker says session_present=0.
pub struct Subscriber {
    pub opts: ConnectOptions,
    conn: Option<Connection>,
    /// Everything delivered to the application, in arrival order.
    pub received: Vec<Received>,
    /// PUBLISH packets seen (including QoS 2 repeats that were not delivered).
    pub publishes: u64,
    /// QoS 2 PUBLISH repeats of an unreleased packet id (answered, not delivered).
    pub qos2_repeats: u64,
    /// Payloads that were not ours.
    pub garbage: u64,
    pub connections: u32,
    /// Reconnects of a persistent session answered with session_present=0.
    pub sessions_lost: u32,
    /// Delay before acknowledging each message (a slow consumer).
    pub ack_delay: Option<Duration>,
    /// Count of delivered messages, readable from other tasks.
    pub progress: Arc<AtomicU64>,
    /// When [`Subscriber::receive_until`] saw its condition hold (time since it started).
    pub done_after: Option<Duration>,
    /// [`Subscriber::receive_until`] gives up when nothing arrives for this long (default 20 s).
    pub stall_timeout: Duration,
    unreleased: HashSet<u16>,
}

impl Subscriber {
    pub fn new(opts: ConnectOptions) -> Subscriber {
        Subscriber {
            opts,
            conn: None,
            received: Vec::new(),
            publishes: 0,
            qos2_repeats: 0,
            garbage: 0,
            connections: 0,
            sessions_lost: 0,
            ack_delay: None,
            progress: Arc::new(AtomicU64::new(0)),
            done_after: None,
            stall_timeout: Duration::from_secs(20),
            unreleased: HashSet::new(),
        }
    }

    pub fn is_connected(&self) -> bool {
        self.conn.is_some()
    }

    /// Connects (retrying until `deadline`) and returns the CONNACK.
    pub async fn connect(
        &mut self,
        addr: SocketAddr,
        deadline: Duration,
    ) -> anyhow::Result<ConnAckInfo> {
        self.conn = None;
        let (conn, ack) = connect_retry(addr, &self.opts, deadline).await?;
        self.connections += 1;
        if !ack.session_present {
            if self.connections > 1 && !self.opts.clean {
                self.sessions_lost += 1;
            }
            self.unreleased.clear();
        }
        self.conn = Some(conn);
        Ok(ack)
    }

    pub async fn subscribe(&mut self, filters: &[(&str, u8)]) -> anyhow::Result<Vec<u8>> {
        let conn = self.conn.as_mut().context("subscribe: not connected")?;
        conn.subscribe(1, filters, Duration::from_secs(10)).await
    }

    /// Closes the TCP connection without a DISCONNECT packet, as a killed client's socket is
    /// closed: the session stays, and what was sent but not acknowledged is redelivered with
    /// DUP when the client comes back.
    pub fn drop_connection(&mut self) {
        self.conn = None;
    }

    pub async fn disconnect(&mut self) -> anyhow::Result<()> {
        match self.conn.take() {
            Some(conn) => conn.disconnect().await,
            None => Ok(()),
        }
    }

    /// Handles packets until none arrives for `idle`. Returns the number of messages delivered.
    /// On a connection error the connection is dropped and the error returned.
    pub async fn pump(&mut self, idle: Duration) -> anyhow::Result<u64> {
        self.pump_for(idle, Duration::MAX).await
    }

    /// Like [`Subscriber::pump`], but returns after `max` at the latest.
    pub async fn pump_for(&mut self, idle: Duration, max: Duration) -> anyhow::Result<u64> {
        let before = self.received.len();
        let started = Instant::now();
        loop {
            let left = max.saturating_sub(started.elapsed());
            if left.is_zero() {
                return Ok((self.received.len() - before) as u64);
            }
            let conn = self.conn.as_mut().context("pump: not connected")?;
            let packet = match conn.recv_timeout(idle.min(left)).await {
                Ok(Some(p)) => p,
                Ok(None) => return Ok((self.received.len() - before) as u64),
                Err(e) => {
                    self.conn = None;
                    return Err(e);
                }
            };
            if let Err(e) = self.handle(packet).await {
                self.conn = None;
                return Err(e);
            }
        }
    }

    async fn handle(&mut self, packet: Incoming) -> anyhow::Result<()> {
        let connection = self.connections;
        let conn = self.conn.as_mut().context("not connected")?;
        match packet {
            Incoming::Publish(msg) => {
                self.publishes += 1;
                let deliver = match msg.qos {
                    2 => self.unreleased.insert(msg.pkid),
                    _ => true,
                };
                if !deliver {
                    self.qos2_repeats += 1;
                }
                if deliver {
                    match payload::decode(&msg.payload) {
                        Some(id) => {
                            self.received.push(Received {
                                id,
                                topic: msg.topic.clone(),
                                qos: msg.qos,
                                dup: msg.dup,
                                retain: msg.retain,
                                message_expiry: msg.message_expiry,
                                connection,
                            });
                            self.progress.fetch_add(1, Ordering::Relaxed);
                        }
                        None => self.garbage += 1,
                    }
                }
                if let Some(delay) = self.ack_delay {
                    tokio::time::sleep(delay).await;
                }
                match msg.qos {
                    1 => conn.queue_puback(msg.pkid)?,
                    2 => conn.queue_pubrec(msg.pkid)?,
                    _ => {}
                }
            }
            Incoming::PubRel { pkid, .. } => {
                self.unreleased.remove(&pkid);
                conn.queue_pubcomp(pkid)?;
            }
            Incoming::Disconnect { reason } => bail!("broker sent DISCONNECT {reason}"),
            Incoming::PingResp => {}
            other => eprintln!("{}: unexpected {other:?}", self.opts.client_id),
        }
        // Write acks once the read buffer holds no further whole packet: one write per burst.
        if conn.pending_output() > 32 * 1024 || !has_whole_packet(conn) {
            conn.flush().await?;
        }
        Ok(())
    }

    /// Receives until `done(self)` holds and then nothing more arrives for `idle` (to catch late
    /// duplicates), reconnecting whenever the connection breaks. Fails after `overall`, or when
    /// `done` does not hold and nothing was delivered for [`Subscriber::stall_timeout`].
    pub async fn receive_until(
        &mut self,
        addr: SocketAddr,
        done: impl Fn(&Subscriber) -> bool,
        idle: Duration,
        overall: Duration,
    ) -> anyhow::Result<()> {
        let started = Instant::now();
        let mut last_progress = Instant::now();
        let mut quiet_since: Option<Instant> = None;
        loop {
            if started.elapsed() > overall {
                bail!(
                    "{}: not done after {overall:?} ({} delivered)",
                    self.opts.client_id,
                    self.received.len()
                );
            }
            if self.conn.is_none() {
                let left = overall.saturating_sub(started.elapsed());
                self.connect(addr, left).await?;
            }
            let is_done = done(self);
            if is_done && self.done_after.is_none() {
                self.done_after = Some(started.elapsed());
            }
            if !is_done && last_progress.elapsed() > self.stall_timeout {
                bail!(
                    "{}: stalled, nothing delivered for {:?} ({} delivered)",
                    self.opts.client_id,
                    self.stall_timeout,
                    self.received.len()
                );
            }
            match self.pump_for(idle, Duration::from_millis(250)).await {
                Ok(0) => {
                    let since = *quiet_since.get_or_insert_with(Instant::now);
                    if is_done && since.elapsed() >= idle {
                        return Ok(());
                    }
                    // Keep the connection alive while waiting.
                    if let Some(conn) = self.conn.as_mut() {
                        conn.queue_pingreq()?;
                        if conn.flush().await.is_err() {
                            self.conn = None;
                        }
                    }
                }
                Ok(_) => {
                    last_progress = Instant::now();
                    quiet_since = None;
                }
                Err(e) => eprintln!(
                    "{}: connection {} ended: {e:#} ({} delivered)",
                    self.opts.client_id,
                    self.connections,
                    self.received.len()
                ),
            }
        }
    }

    /// Distinct messages delivered.
    pub fn unique(&self) -> usize {
        self.received
            .iter()
            .map(|r| r.id)
            .collect::<HashSet<_>>()
            .len()
    }
}

fn has_whole_packet(conn: &mut Connection) -> bool {
    // Connection keeps its buffer private; a cheap proxy is to ask the decoder without consuming.
    conn.has_buffered_packet()
}

/// What a subscriber must and may receive.
#[derive(Debug, Clone, Default)]
pub struct Expectation {
    /// Every one of these must arrive (at least once).
    pub must: BTreeSet<MsgId>,
    /// Messages that may arrive, with how often the publisher sent each. Anything else is
    /// unexpected. Should contain `must`.
    pub may: HashMap<MsgId, u32>,
    /// Any second copy is an error (QoS 2, or runs without failures).
    pub exactly_once: bool,
}

impl Expectation {
    /// Must: everything the publishers got acknowledged. May: everything they sent.
    pub fn from_reports<'a>(reports: impl IntoIterator<Item = &'a PublisherReport>) -> Expectation {
        let mut e = Expectation::default();
        for r in reports {
            e.must.extend(r.acked_ids());
            e.may.extend(r.sent());
        }
        e
    }
}

/// The verdict on one subscriber's deliveries.
#[derive(Debug, Clone, Default)]
pub struct DeliveryCheck {
    pub name: String,
    pub expected: usize,
    pub received: usize,
    pub unique: usize,
    pub missing: usize,
    pub missing_sample: Vec<MsgId>,
    pub unexpected: usize,
    pub unexpected_sample: Vec<MsgId>,
    /// Extra copies that arrived with DUP=1 (a broker redelivery).
    pub dup_flagged: usize,
    /// Extra copies with DUP=0 that the publisher's own resends explain (the broker stored the
    /// message, died before acking, and stored the resend as a new message).
    pub dup_by_publisher_retry: usize,
    /// Extra copies nothing explains.
    pub dup_unexplained: usize,
    pub dup_unexplained_sample: Vec<MsgId>,
    /// Any extra copy when exactly-once was required.
    pub exactly_once_violations: usize,
    /// First deliveries that already carried DUP=1. For a subscriber that had never been sent
    /// the message before, MQTT-3.3.1-1 wants DUP=0; reported, not judged by [`Self::ok`].
    pub first_with_dup: usize,
    /// A few duplicated messages: id, publisher sends, and the DUP flag of each copy.
    pub dup_sample: Vec<String>,
    /// First occurrences out of order for a (publisher, topic).
    pub order_violations: usize,
    pub order_sample: Vec<String>,
}

impl DeliveryCheck {
    pub fn ok(&self) -> bool {
        self.missing == 0
            && self.unexpected == 0
            && self.dup_unexplained == 0
            && self.exactly_once_violations == 0
            && self.order_violations == 0
    }

    pub fn summary(&self) -> String {
        let mut s = format!(
            "{}: expected {} | received {} ({} unique) | missing {} | unexpected {} | duplicates: \
             {} DUP=1, {} by publisher retry, {} unexplained | exactly-once violations {} | \
             order violations {} | first deliveries with DUP=1: {}",
            self.name,
            self.expected,
            self.received,
            self.unique,
            self.missing,
            self.unexpected,
            self.dup_flagged,
            self.dup_by_publisher_retry,
            self.dup_unexplained,
            self.exactly_once_violations,
            self.order_violations,
            self.first_with_dup
        );
        let ids = |v: &[MsgId]| {
            v.iter()
                .map(|m| m.to_string())
                .collect::<Vec<_>>()
                .join(" ")
        };
        if !self.missing_sample.is_empty() {
            s += &format!("\n  missing e.g.: {}", ids(&self.missing_sample));
        }
        if !self.unexpected_sample.is_empty() {
            s += &format!("\n  unexpected e.g.: {}", ids(&self.unexpected_sample));
        }
        if !self.dup_unexplained_sample.is_empty() {
            s += &format!(
                "\n  unexplained duplicates e.g.: {}",
                ids(&self.dup_unexplained_sample)
            );
        }
        if !self.dup_sample.is_empty() {
            s += &format!("\n  duplicates e.g.: {}", self.dup_sample.join(", "));
        }
        for o in &self.order_sample {
            s += &format!("\n  order: {o}");
        }
        s
    }
}

const SAMPLE: usize = 10;

/// Compares what a subscriber got with what it should have got.
///
/// * missing: a `must` message that never arrived;
/// * unexpected: a message not in `may` (never sent, or expired/trimmed when `may` says so);
/// * duplicates: extra copies with DUP=1 are allowed; extra DUP=0 copies are allowed up to the
///   number of times the publisher sent the message minus one; beyond that they are unexplained;
///   with `exactly_once` every extra copy is a violation;
/// * order: per (publisher, topic), first occurrences must have increasing sequence numbers.
pub fn check_delivery(name: &str, received: &[Received], expect: &Expectation) -> DeliveryCheck {
    let mut check = DeliveryCheck {
        name: name.to_string(),
        expected: expect.must.len(),
        received: received.len(),
        ..Default::default()
    };
    let mut copies_dup0: HashMap<MsgId, u32> = HashMap::new();
    let mut seen: HashSet<MsgId> = HashSet::new();
    let mut last: HashMap<(u32, &str), u64> = HashMap::new();
    for r in received {
        let first = seen.insert(r.id);
        if first && r.dup {
            check.first_with_dup += 1;
        }
        if first {
            let key = (r.id.publisher, r.topic.as_str());
            if let Some(prev) = last.get(&key) {
                if r.id.seq <= *prev {
                    check.order_violations += 1;
                    if check.order_sample.len() < SAMPLE {
                        check.order_sample.push(format!(
                            "{} on {} after p{}#{}",
                            r.id, r.topic, r.id.publisher, prev
                        ));
                    }
                }
            }
            last.insert(key, r.id.seq);
        }
        let Some(&sends) = expect.may.get(&r.id) else {
            if first {
                check.unexpected += 1;
                if check.unexpected_sample.len() < SAMPLE {
                    check.unexpected_sample.push(r.id);
                }
            }
            continue;
        };
        let n0 = if r.dup {
            None
        } else {
            let n = copies_dup0.entry(r.id).or_insert(0);
            *n += 1;
            Some(*n)
        };
        if first {
            continue;
        }
        if expect.exactly_once {
            check.exactly_once_violations += 1;
        }
        match n0 {
            None => check.dup_flagged += 1,
            Some(n) if n <= sends => check.dup_by_publisher_retry += 1,
            Some(_) => {
                check.dup_unexplained += 1;
                if check.dup_unexplained_sample.len() < SAMPLE {
                    check.dup_unexplained_sample.push(r.id);
                }
            }
        }
    }
    check.unique = seen.len();
    let mut copies: BTreeMap<MsgId, Vec<&Received>> = BTreeMap::new();
    for r in received {
        copies.entry(r.id).or_default().push(r);
    }
    for (id, list) in copies.iter().filter(|(_, l)| l.len() > 1).take(SAMPLE) {
        let flags: Vec<String> = list
            .iter()
            .map(|r| format!("dup={} conn={}", u8::from(r.dup), r.connection))
            .collect();
        let sends = expect.may.get(id).copied().unwrap_or(0);
        check
            .dup_sample
            .push(format!("{id} sent {sends}x [{}]", flags.join("; ")));
    }
    for id in &expect.must {
        if !seen.contains(id) {
            check.missing += 1;
            if check.missing_sample.len() < SAMPLE {
                check.missing_sample.push(*id);
            }
        }
    }
    check
}

/// Convenience for tests: `ConnectOptions` for a persistent v3.1.1 or v5 client.
pub fn persistent(client_id: &str, protocol: Protocol) -> ConnectOptions {
    match protocol {
        Protocol::V311 => ConnectOptions::v311(client_id).persistent(),
        Protocol::V5 => ConnectOptions::v5(client_id).persistent(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rx(publisher: u32, seq: u64, topic: &str, dup: bool) -> Received {
        Received {
            id: MsgId { publisher, seq },
            topic: topic.into(),
            qos: 1,
            dup,
            retain: false,
            message_expiry: None,
            connection: 1,
        }
    }

    fn expect(sends: &[(u64, u32)]) -> Expectation {
        let mut e = Expectation::default();
        for (seq, n) in sends {
            let id = MsgId {
                publisher: 0,
                seq: *seq,
            };
            e.must.insert(id);
            e.may.insert(id, *n);
        }
        e
    }

    #[test]
    fn clean_run_passes() {
        let e = expect(&[(0, 1), (1, 1), (2, 1)]);
        let got = [
            rx(0, 0, "a", false),
            rx(0, 1, "b", false),
            rx(0, 2, "a", false),
        ];
        let c = check_delivery("t", &got, &e);
        assert!(c.ok(), "{}", c.summary());
        assert_eq!(c.unique, 3);
    }

    #[test]
    fn missing_unexpected_and_order_are_caught() {
        let e = expect(&[(0, 1), (1, 1), (2, 1)]);
        let got = [
            rx(0, 2, "a", false),
            rx(0, 0, "a", false),
            rx(9, 0, "a", false),
        ];
        let c = check_delivery("t", &got, &e);
        assert_eq!(c.missing, 1);
        assert_eq!(c.unexpected, 1);
        assert_eq!(c.order_violations, 1);
        assert!(!c.ok());
    }

    #[test]
    fn duplicates_are_classified() {
        // seq 0 sent twice by the publisher: one DUP=0 copy is explained, a third is not.
        let e = expect(&[(0, 2), (1, 1)]);
        let got = [
            rx(0, 0, "a", false),
            rx(0, 0, "a", false),
            rx(0, 1, "a", false),
            rx(0, 1, "a", true),
            rx(0, 0, "a", false),
        ];
        let c = check_delivery("t", &got, &e);
        assert_eq!(c.dup_by_publisher_retry, 1);
        assert_eq!(c.dup_flagged, 1);
        assert_eq!(c.dup_unexplained, 1);
        assert!(!c.ok());
        let mut e2 = expect(&[(0, 1)]);
        e2.exactly_once = true;
        let c2 = check_delivery("t", &[rx(0, 0, "a", false), rx(0, 0, "a", true)], &e2);
        assert_eq!(c2.exactly_once_violations, 1);
        assert!(!c2.ok());
    }
}
