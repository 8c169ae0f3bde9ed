//! The ordered reply queue: responses leave in the order their requests arrived, each after
//! the storage write it depends on (invariant 2), and a failed write is never acknowledged.

use super::*;

impl Machine {
    /// Sends a response now, or queues it behind responses still waiting for storage.
    pub(super) fn send(&mut self, packet: Packet, out: &mut BytesMut) {
        self.reply(packet, None, OnError::Close, out);
    }

    /// Sends `packet` once `wait` (if any) completes, after every earlier response.
    pub(super) fn reply(
        &mut self,
        packet: Packet,
        wait: Option<Completion>,
        on_error: OnError,
        out: &mut BytesMut,
    ) {
        self.reply_ack(packet, wait, on_error, None, out);
    }

    /// [`Machine::reply`] for a PUBACK/PUBREC, timed from when its PUBLISH was `received`.
    pub(super) fn reply_ack(
        &mut self,
        packet: Packet,
        wait: Option<Completion>,
        on_error: OnError,
        received: Option<Instant>,
        out: &mut BytesMut,
    ) {
        if wait.is_none() && self.replies.is_empty() {
            // Acks and control packets are tiny; only a client with an absurd Maximum Packet
            // Size could refuse them, and then dropping them is what the spec asks
            // [MQTT-3.1.2-25].
            let _ = encode(&packet, self.version, self.client.max_packet_size, out);
            if let Some(received) = received {
                self.broker.metrics.observe_ack(received);
            }
            return;
        }
        let mut bytes = BytesMut::new();
        let _ = encode(
            &packet,
            self.version,
            self.client.max_packet_size,
            &mut bytes,
        );
        self.replies.push_back(PendingReply {
            wait,
            bytes,
            on_error,
            received,
        });
    }

    /// The storage write the oldest queued reply waits for has completed with `result`: send
    /// it (or its failure form), then every following reply that is ready too.
    pub fn complete_front(&mut self, result: Result<(), StorageError>, out: &mut BytesMut) -> Flow {
        let Some(front) = self.replies.front_mut() else {
            return Flow::Continue;
        };
        front.wait = None;
        if let Err(e) = result {
            let Some(front) = self.replies.pop_front() else {
                return Flow::Continue;
            };
            if let Some(flow) = self.storage_failed(front.on_error, &e, out) {
                return flow;
            }
        }
        self.release_ready(out)
    }

    /// Sends queued replies from the front while their writes are done.
    pub(super) fn release_ready(&mut self, out: &mut BytesMut) -> Flow {
        use tokio::sync::oneshot::error::TryRecvError;
        while let Some(front) = self.replies.front_mut() {
            if let Some(rx) = front.wait.as_mut() {
                let failure = match rx.try_recv() {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(e),
                    Err(TryRecvError::Closed) => Some(StorageError::Closed),
                    // Not done yet: the connection loop awaits it.
                    Err(TryRecvError::Empty) => return Flow::Continue,
                };
                front.wait = None;
                if let Some(e) = failure {
                    let on_error = front.on_error;
                    self.replies.pop_front();
                    if let Some(flow) = self.storage_failed(on_error, &e, out) {
                        return flow;
                    }
                    continue;
                }
            }
            if let Some(front) = self.replies.pop_front() {
                out.extend_from_slice(&front.bytes);
                if let Some(received) = front.received {
                    self.broker.metrics.observe_ack(received);
                }
            }
        }
        Flow::Continue
    }

    /// A write failed: nothing it covered may be acknowledged. v5 publishers get an error
    /// reason (0x97 when the storage queue is full, 0x80 otherwise), everyone else is
    /// disconnected.
    pub(super) fn storage_failed(
        &mut self,
        on_error: OnError,
        error: &StorageError,
        out: &mut BytesMut,
    ) -> Option<Flow> {
        self.broker.metrics.storage_errors.inc();
        tracing::warn!(client_id = %self.session.client_id, error = %error, "storage write failed; not acknowledging");
        self.forget_unstored(on_error);
        let quota = matches!(error, StorageError::Overloaded);
        let refusal = match (on_error, self.v5()) {
            (OnError::PubAck(pkid), true) => Packet::PubAck(PubAck {
                pkid,
                reason: if quota {
                    PubAckReason::QuotaExceeded
                } else {
                    PubAckReason::UnspecifiedError
                },
                properties: None,
            }),
            (OnError::PubRec(pkid), true) => Packet::PubRec(PubRec {
                pkid,
                reason: if quota {
                    PubRecReason::QuotaExceeded
                } else {
                    PubRecReason::UnspecifiedError
                },
                properties: None,
            }),
            // v3 acks can only say "stored", and other replies have no failure form.
            _ => {
                let code = if quota {
                    DisconnectReasonCode::QuotaExceeded
                } else {
                    DisconnectReasonCode::UnspecifiedError
                };
                return Some(Flow::Close(code, "storage write failed"));
            }
        };
        let _ = encode(&refusal, self.version, self.client.max_packet_size, out);
        None
    }

    /// Undoes the in-memory state a failed (or abandoned) write stood for: an incoming QoS 2
    /// message that was not stored must not stay marked as received, or the client's resend
    /// would be taken for a duplicate and dropped.
    pub(super) fn forget_unstored(&mut self, on_error: OnError) {
        if let OnError::PubRec(pkid) = on_error {
            self.session.inbound_qos2.remove(&pkid);
        }
    }

    /// At the end of a connection: waits (bounded) for the writes its unsent replies depended
    /// on. An incoming QoS 2 message whose write failed must not stay marked as received, or
    /// the client's resend on the next connection would be taken for a duplicate and dropped.
    pub async fn settle_pending_writes(&mut self, within: std::time::Duration) {
        let deadline = tokio::time::Instant::now() + within;
        while let Some(reply) = self.replies.pop_front() {
            let Some(wait) = reply.wait else { continue };
            let failed = match tokio::time::timeout_at(deadline, wait).await {
                Ok(Ok(Ok(()))) => false,
                Ok(_) => true,
                // Still not written: assume the worst for QoS 2 and let a resend through.
                Err(_) => true,
            };
            if failed {
                self.forget_unstored(reply.on_error);
            }
        }
    }
}
