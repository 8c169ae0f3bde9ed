//! The QoS 2 handshakes in both directions: PUBREC/PUBREL/PUBCOMP for incoming messages, and
//! PUBREC received for outgoing ones.

use super::*;

impl Machine {
    pub(super) fn pubrec(&mut self, pkid: u16, reason: PubRecReason, out: &mut BytesMut) {
        self.send(
            Packet::PubRec(PubRec {
                pkid,
                reason,
                properties: None,
            }),
            out,
        );
    }

    pub(super) fn on_pubrec(&mut self, rec: PubRec, out: &mut BytesMut) -> Flow {
        let success = (rec_code(rec.reason)) < 0x80;
        let seq = self
            .session
            .outbound
            .iter()
            .find(|i| i.pkid == rec.pkid)
            .and_then(|i| i.delivery.seq);
        let (reason, wait) = match self.session.outbound.pubrec(rec.pkid, success) {
            Some(true) => {
                // A stored QoS 2 entry must be marked released before PUBREL goes out: after a
                // crash the broker then resends PUBREL, never the PUBLISH the client already
                // completed (which it would take as a new message).
                let wait = seq.and_then(|seq| {
                    let mut batch = self.session.write_batch();
                    batch.push(WriteOp::MarkReleased {
                        client: self.session.client_id.clone(),
                        kind: self.session.kind,
                        seq,
                    });
                    self.broker.storage.submit_nonempty(batch)
                });
                (PubRelReason::Success, wait)
            }
            Some(false) => {
                self.stored_done(seq);
                return Flow::Continue;
            }
            None => (PubRelReason::PacketIdentifierNotFound, None),
        };
        self.reply(
            Packet::PubRel(PubRel {
                pkid: rec.pkid,
                reason,
                properties: None,
            }),
            wait,
            OnError::Close,
            out,
        );
        Flow::Continue
    }

    pub(super) fn on_pubrel(&mut self, rel: PubRel, out: &mut BytesMut) -> Flow {
        let known = self.session.inbound_qos2.remove(&rel.pkid);
        let reason = if known {
            PubCompReason::Success
        } else {
            PubCompReason::PacketIdentifierNotFound
        };
        // The stored packet id must be gone before PUBCOMP: otherwise a crash could leave it
        // behind and a later message reusing the id would be taken for a duplicate and lost.
        let mut wait = if known && self.session.stored {
            let mut batch = self.session.write_batch();
            batch.push(WriteOp::DeleteInboundQos2 {
                client: self.session.client_id.clone(),
                pkid: rel.pkid,
            });
            self.broker.storage.submit_nonempty(batch)
        } else {
            None
        };
        // Through a publish log the dispatcher keeps the packet ids of routed QoS 2 messages
        // too (`Ingest::release_qos2`). Also for an unknown id: a crash may have kept the
        // dispatcher's copy while the stored one was deleted.
        if self.session.stored {
            if let Some(released) = self
                .broker
                .ingest
                .release_qos2(&self.session.client_id, rel.pkid)
            {
                wait = Some(match wait {
                    Some(deleted) => join_completions(deleted, released),
                    None => released,
                });
            }
        }
        self.reply(
            Packet::PubComp(PubComp {
                pkid: rel.pkid,
                reason,
                properties: None,
            }),
            wait,
            OnError::Close,
            out,
        );
        Flow::Continue
    }
}

/// A completion that resolves when both resolve, with the first error.
fn rec_code(reason: PubRecReason) -> u8 {
    match reason {
        PubRecReason::Success => 0x00,
        PubRecReason::NoMatchingSubscribers => 0x10,
        PubRecReason::UnspecifiedError => 0x80,
        PubRecReason::ImplementationSpecificError => 0x83,
        PubRecReason::NotAuthorized => 0x87,
        PubRecReason::TopicNameInvalid => 0x90,
        PubRecReason::PacketIdentifierInUse => 0x91,
        PubRecReason::QuotaExceeded => 0x97,
        PubRecReason::PayloadFormatInvalid => 0x99,
    }
}
