//! Reads of the session's durable queue or log: when to read, how much, and what an entry
//! becomes when it arrives.

use super::*;

impl Machine {
    /// The client finished with a delivery; if it came from durable storage, record that.
    pub(super) fn stored_done(&mut self, seq: Option<u64>) {
        let Some(seq) = seq else { return };
        if let Some(op) = self.session.ack_stored(seq) {
            // Not awaited: losing this write only means a redelivery (with DUP) after a crash.
            let mut batch = self.session.write_batch();
            batch.push(op);
            self.broker.storage.submit_detached(batch);
        }
    }

    /// Whether durable entries may be waiting and the window has room for them.
    pub fn wants_stored(&self) -> bool {
        self.session.stored_pending && self.window_open()
    }

    /// Reads the next durable entries of this session's queue or log (as many as the in-flight
    /// window allows) and sends them. Entries written before a restart carry DUP=1; entries
    /// whose PUBREC was already received get PUBREL instead of PUBLISH. A backend that reads
    /// over the network answers later: the read is parked in `stored_read` and the connection
    /// hands its result to [`Machine::stored_arrived`].
    pub fn fetch_stored(&mut self, out: &mut BytesMut, now: Instant) -> Flow {
        if self.stored_read.is_some() {
            return Flow::Continue;
        }
        let room = self.stored_room();
        if room == 0 {
            return Flow::Continue;
        }
        self.stored_asked = room;
        match self.broker.storage.read_queue(
            &self.session.client_id,
            self.session.kind,
            self.session.cursor,
            room,
        ) {
            QueueRead::Ready(result) => self.stored_arrived(result, out, now),
            QueueRead::Pending(rx) => {
                self.stored_read = Some(rx);
                Flow::Continue
            }
        }
    }

    pub(super) fn stored_room(&self) -> usize {
        let window = usize::from(
            self.client
                .receive_maximum
                .min(self.broker.config.limits.max_inflight),
        );
        window.saturating_sub(self.session.outbound.len())
    }

    /// Sends what a read of the queue or log returned.
    pub fn stored_arrived(
        &mut self,
        result: Result<Vec<QueuedEntry>, StorageError>,
        out: &mut BytesMut,
        now: Instant,
    ) -> Flow {
        self.stored_read = None;
        let entries = match result {
            Ok(entries) => entries,
            Err(e) => {
                self.broker.metrics.storage_read_errors.inc();
                tracing::error!(client_id = %self.session.client_id, error = %e, "reading stored messages failed");
                return Flow::Close(
                    DisconnectReasonCode::UnspecifiedError,
                    "storage read failed",
                );
            }
        };
        // Fewer than asked for: the queue is drained for now.
        if entries.len() < self.stored_asked {
            self.session.stored_pending = false;
        }
        for entry in entries {
            let pkid = pkid_for_seq(entry.seq);
            if self.session.outbound.in_use(pkid) {
                // 65535 entries further on, the id is still taken: wait for its ack.
                self.session.stored_pending = true;
                break;
            }
            // Entries skipped on the way (expired, removed by retention) need no ack: the
            // APPLICATION commit point follows the read cursor (see Session::ack_stored).
            self.session.cursor = entry.seq + 1;
            let delivery = Delivery {
                message: Arc::new(entry.delivery.message),
                qos: entry.delivery.qos,
                retain: entry.delivery.retain,
                subscription_ids: entry.delivery.subscription_ids,
                seq: Some(entry.seq),
                dup: entry.seq < self.session.dup_below,
            };
            if entry.released {
                self.session
                    .outbound
                    .push(pkid, delivery, InflightState::AwaitingPubComp);
                let _ = encode(
                    &Packet::PubRel(PubRel {
                        pkid,
                        reason: PubRelReason::Success,
                        properties: None,
                    }),
                    self.version,
                    self.client.max_packet_size,
                    out,
                );
                continue;
            }
            self.deliver(delivery, out, now);
        }
        let sent = self.session.cursor.saturating_sub(1);
        if self.session.stored && sent > self.session.sent_upto {
            self.session.sent_upto = sent;
            let mut batch = self.session.write_batch();
            batch.push(WriteOp::MarkSent {
                client: self.session.client_id.clone(),
                upto: sent,
            });
            self.broker.storage.submit_detached(batch);
        }
        Flow::Continue
    }
}
