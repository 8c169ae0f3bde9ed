//! Outgoing QoS 1/2 state of one session: packet identifiers and the in-flight window.
//!
//! Kept in send order so that a resumed session resends in the original order
//! [MQTT-4.4.0-1] and so that in-order acknowledgements (the common case) are found at the front.

use std::collections::VecDeque;

use crate::message::Delivery;

/// Where an outgoing message is in its QoS flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InflightState {
    /// QoS 1 PUBLISH sent, waiting for PUBACK.
    AwaitingPubAck,
    /// QoS 2 PUBLISH sent, waiting for PUBREC.
    AwaitingPubRec,
    /// PUBREL sent, waiting for PUBCOMP. The message itself is no longer needed but is kept
    /// so the slot stays reserved.
    AwaitingPubComp,
}

#[derive(Debug, Clone)]
pub struct Inflight {
    pub pkid: u16,
    pub delivery: Delivery,
    pub state: InflightState,
}

/// The in-flight window. Its size is bounded by the caller (receive maximum / max_inflight).
#[derive(Debug, Default)]
pub struct Outbound {
    inflight: VecDeque<Inflight>,
    last_pkid: u16,
}

impl Outbound {
    pub fn len(&self) -> usize {
        self.inflight.len()
    }

    pub fn is_empty(&self) -> bool {
        self.inflight.is_empty()
    }

    /// Allocates the next free packet identifier (1..=65535, never one still in flight
    /// [MQTT-2.2.1-3]). Returns `None` only when all 65535 are in flight.
    pub fn next_pkid(&mut self) -> Option<u16> {
        if self.inflight.len() >= usize::from(u16::MAX) {
            return None;
        }
        loop {
            self.last_pkid = self.last_pkid.wrapping_add(1);
            if self.last_pkid == 0 {
                self.last_pkid = 1;
            }
            let candidate = self.last_pkid;
            if !self.inflight.iter().any(|i| i.pkid == candidate) {
                return Some(candidate);
            }
        }
    }

    /// Whether `pkid` is taken by a message in flight.
    pub fn in_use(&self, pkid: u16) -> bool {
        self.inflight.iter().any(|i| i.pkid == pkid)
    }

    pub fn push(&mut self, pkid: u16, delivery: Delivery, state: InflightState) {
        self.inflight.push_back(Inflight {
            pkid,
            delivery,
            state,
        });
    }

    fn position(&self, pkid: u16, state: InflightState) -> Option<usize> {
        self.inflight
            .iter()
            .position(|i| i.pkid == pkid && i.state == state)
    }

    /// PUBACK received: the QoS 1 message is done.
    pub fn puback(&mut self, pkid: u16) -> Option<Inflight> {
        let i = self.position(pkid, InflightState::AwaitingPubAck)?;
        self.inflight.remove(i)
    }

    /// PUBREC received. With a success code the message moves to AwaitingPubComp and `true` is
    /// returned (send PUBREL); with an error code (>= 0x80) the flow ends here [MQTT-4.3.3].
    /// `None` when no such message is in flight.
    pub fn pubrec(&mut self, pkid: u16, success: bool) -> Option<bool> {
        if let Some(i) = self.position(pkid, InflightState::AwaitingPubComp) {
            // A repeated PUBREC (after our PUBREL was lost) is answered with PUBREL again.
            let _ = i;
            return Some(true);
        }
        let i = self.position(pkid, InflightState::AwaitingPubRec)?;
        if success {
            self.inflight[i].state = InflightState::AwaitingPubComp;
            Some(true)
        } else {
            self.inflight.remove(i);
            Some(false)
        }
    }

    /// PUBCOMP received: the QoS 2 flow is complete.
    pub fn pubcomp(&mut self, pkid: u16) -> Option<Inflight> {
        let i = self.position(pkid, InflightState::AwaitingPubComp)?;
        self.inflight.remove(i)
    }

    /// Everything in flight, in send order, for resending on session resumption.
    pub fn iter(&self) -> impl Iterator<Item = &Inflight> {
        self.inflight.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Message, MessageProperties};
    use crate::protocol::QoS;
    use std::sync::Arc;
    use std::time::Instant;

    fn delivery() -> Delivery {
        Delivery {
            message: Arc::new(Message {
                topic: "t".into(),
                payload: "p".into(),
                qos: QoS::ExactlyOnce,
                retain: false,
                properties: MessageProperties::default(),
                received_at: Instant::now(),
                publisher: Arc::from("pub"),
            }),
            qos: QoS::ExactlyOnce,
            retain: false,
            subscription_ids: vec![],
            seq: None,
            dup: false,
        }
    }

    #[test]
    fn pkids_skip_zero_and_ids_in_flight() {
        let mut o = Outbound {
            last_pkid: 65534,
            ..Default::default()
        };
        let a = o.next_pkid().unwrap();
        assert_eq!(a, 65535);
        o.push(a, delivery(), InflightState::AwaitingPubAck);
        assert_eq!(o.next_pkid().unwrap(), 1);
        o.push(2, delivery(), InflightState::AwaitingPubAck);
        assert_eq!(o.next_pkid().unwrap(), 3, "2 is still in flight");
    }

    #[test]
    fn qos2_flow_and_error_pubrec() {
        let mut o = Outbound::default();
        o.push(1, delivery(), InflightState::AwaitingPubRec);
        o.push(2, delivery(), InflightState::AwaitingPubRec);
        assert_eq!(o.pubcomp(1).map(|i| i.pkid), None, "no PUBREC yet");
        assert_eq!(o.pubrec(1, true), Some(true));
        assert_eq!(
            o.pubrec(1, true),
            Some(true),
            "duplicate PUBREC gets PUBREL again"
        );
        assert_eq!(o.pubcomp(1).map(|i| i.pkid), Some(1));
        assert_eq!(o.pubrec(2, false), Some(false));
        assert!(o.is_empty());
        assert_eq!(o.pubrec(9, true), None);
    }
}
