//! The machine's rules without a socket: packets in, bytes out, on a real broker with embedded
//! storage in a temporary directory. What the connection task adds (framing, keep-alive, the
//! select loop) is tested over TCP in `broker/tests`.

use tokio::sync::oneshot;

use super::*;
use crate::config::Config;
use crate::protocol::Filter;
use crate::storage::ClientKind;

struct Rig {
    machine: Machine,
    out: BytesMut,
    _dir: tempfile::TempDir,
}

async fn rig(version: ProtocolVersion, client_id: &str) -> Rig {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = Config {
        data_dir: dir.path().to_path_buf(),
        ..Config::default()
    };
    let broker = Broker::open(config).await.expect("broker");
    let session = Session::new(client_id.into(), 64, 0, ClientKind::Device, 0);
    let limits = ClientLimits {
        receive_maximum: 65_535,
        max_packet_size: None,
        topic_alias_maximum: 0,
        problem_information: true,
    };
    Rig {
        machine: Machine::new(broker, version, session, None, limits),
        out: BytesMut::new(),
        _dir: dir,
    }
}

impl Rig {
    fn handle(&mut self, packet: Incoming) -> Flow {
        self.machine.handle(packet, &mut self.out)
    }

    /// Every packet written so far, decoded as a client would.
    fn sent(&mut self) -> Vec<Packet> {
        let mut packets = Vec::new();
        while !self.out.is_empty() {
            match Packet::read(&mut self.out, None) {
                Ok(p) => packets.push(p),
                Err(e) => panic!("undecodable output: {e:?}"),
            }
        }
        packets
    }
}

fn publish(topic: &str, qos: QoS, pkid: u16, payload: &'static [u8]) -> Publish {
    let mut p = Publish::new(topic, qos, payload, None);
    p.pkid = pkid;
    p
}

fn puback(pkid: u16) -> Packet {
    Packet::PubAck(PubAck {
        pkid,
        reason: PubAckReason::Success,
        properties: None,
    })
}

/// Invariant 2: acks leave in the order the PUBLISHes arrived, even when the second write
/// completes first.
#[tokio::test]
async fn acks_leave_in_arrival_order_when_writes_complete_out_of_order() {
    let mut r = rig(ProtocolVersion::V5, "acks").await;
    let (first_done, first) = oneshot::channel();
    let (second_done, second) = oneshot::channel();
    r.machine
        .reply_ack(puback(1), Some(first), OnError::PubAck(1), None, &mut r.out);
    r.machine.reply_ack(
        puback(2),
        Some(second),
        OnError::PubAck(2),
        None,
        &mut r.out,
    );
    // A control packet queues behind them too.
    r.handle(Incoming::PingReq);
    second_done.send(Ok(())).expect("receiver");
    assert_eq!(r.machine.release_ready(&mut r.out), Flow::Continue);
    assert!(
        r.sent().is_empty(),
        "nothing before the first write is done"
    );
    first_done.send(Ok(())).expect("receiver");
    assert_eq!(r.machine.complete_front(Ok(()), &mut r.out), Flow::Continue);
    assert_eq!(
        r.sent(),
        vec![puback(1), puback(2), Packet::PingResp(PingResp)]
    );
    assert!(r.machine.replies.is_empty());
}

/// A failed write is never acknowledged: v5 gets 0x97 when the storage queue was full (and the
/// next ack still leaves), v3 is disconnected.
#[tokio::test]
async fn a_failed_write_is_refused_not_acknowledged() {
    let mut r = rig(ProtocolVersion::V5, "refused").await;
    let (failed_done, failed) = oneshot::channel();
    r.machine.reply_ack(
        puback(1),
        Some(failed),
        OnError::PubAck(1),
        None,
        &mut r.out,
    );
    r.machine
        .reply_ack(puback(2), None, OnError::PubAck(2), None, &mut r.out);
    failed_done
        .send(Err(StorageError::Overloaded))
        .expect("receiver");
    let flow = r
        .machine
        .complete_front(Err(StorageError::Overloaded), &mut r.out);
    assert_eq!(flow, Flow::Continue);
    let sent = r.sent();
    assert_eq!(
        sent,
        vec![
            Packet::PubAck(PubAck {
                pkid: 1,
                reason: PubAckReason::QuotaExceeded,
                properties: None,
            }),
            puback(2),
        ]
    );

    let mut v3 = rig(ProtocolVersion::V3_1_1, "refused-v3").await;
    let (_done, failed) = oneshot::channel();
    v3.machine.reply_ack(
        puback(1),
        Some(failed),
        OnError::PubAck(1),
        None,
        &mut v3.out,
    );
    let flow = v3
        .machine
        .complete_front(Err(StorageError::engine_msg("disk")), &mut v3.out);
    assert!(matches!(
        flow,
        Flow::Close(DisconnectReasonCode::UnspecifiedError, _)
    ));
}

/// A refused QoS 2 write forgets the packet id, so the client's resend is taken as new, not as
/// a duplicate to drop.
#[tokio::test]
async fn a_refused_qos2_publish_is_forgotten() {
    let mut r = rig(ProtocolVersion::V5, "qos2-refused").await;
    r.machine.session.inbound_qos2.insert(9);
    let (_done, failed) = oneshot::channel();
    let rec = Packet::PubRec(PubRec {
        pkid: 9,
        reason: PubRecReason::Success,
        properties: None,
    });
    r.machine
        .reply_ack(rec, Some(failed), OnError::PubRec(9), None, &mut r.out);
    r.machine
        .complete_front(Err(StorageError::engine_msg("disk")), &mut r.out);
    assert!(!r.machine.session.inbound_qos2.contains(&9));
    assert_eq!(
        r.sent(),
        vec![Packet::PubRec(PubRec {
            pkid: 9,
            reason: PubRecReason::UnspecifiedError,
            properties: None,
        })]
    );
}

/// QoS 2 exactly once on the way in: a resend of an id not yet released is not routed again;
/// PUBREL completes the flow once, and a second PUBREL finds nothing (0x92).
#[tokio::test]
async fn qos2_inbound_flow_is_exactly_once() {
    let mut r = rig(ProtocolVersion::V5, "qos2").await;
    let mut sub = rig(ProtocolVersion::V5, "qos2-sub").await;
    // A clean-session subscriber on the same broker sees what is routed.
    let broker = r.machine.broker.clone();
    sub.machine.broker = broker.clone();
    sub.handle(Incoming::Subscribe(Subscribe::new(
        Filter::new("t/q2", QoS::ExactlyOnce),
        None,
    )));
    assert!(matches!(sub.sent()[..], [Packet::SubAck(_)]));

    assert_eq!(
        r.handle(Incoming::Publish(publish(
            "t/q2",
            QoS::ExactlyOnce,
            5,
            b"once"
        ))),
        Flow::Continue
    );
    let mut resend = publish("t/q2", QoS::ExactlyOnce, 5, b"once");
    resend.dup = true;
    r.handle(Incoming::Publish(resend));
    let recs: Vec<Packet> = r.sent();
    assert_eq!(recs.len(), 2, "{recs:?}");
    assert!(recs.iter().all(
        |p| matches!(p, Packet::PubRec(rec) if rec.pkid == 5 && rec.reason == PubRecReason::Success)
    ));
    let routed = std::iter::from_fn(|| sub.machine.session.queue.try_recv().ok()).count();
    assert_eq!(routed, 1, "the resend is not routed again");

    r.handle(Incoming::PubRel(PubRel::new(5, None)));
    r.handle(Incoming::PubRel(PubRel::new(5, None)));
    assert_eq!(
        r.sent(),
        vec![
            Packet::PubComp(PubComp {
                pkid: 5,
                reason: PubCompReason::Success,
                properties: None,
            }),
            Packet::PubComp(PubComp {
                pkid: 5,
                reason: PubCompReason::PacketIdentifierNotFound,
                properties: None,
            }),
        ]
    );
}

/// v5 publish checks: no subscriber is 0x10, a payload that breaks its Payload Format Indicator
/// is 0x99, and a topic with a wildcard closes the connection.
#[tokio::test]
async fn publish_checks_answer_with_the_spec_reason_codes() {
    let mut r = rig(ProtocolVersion::V5, "checks").await;
    r.handle(Incoming::Publish(publish(
        "nobody/here",
        QoS::AtLeastOnce,
        1,
        b"x",
    )));
    let mut bad = publish("t/utf8", QoS::AtLeastOnce, 2, b"\xff\xfe");
    bad.properties = Some(PublishProperties {
        payload_format_indicator: Some(1),
        ..Default::default()
    });
    r.handle(Incoming::Publish(bad));
    assert_eq!(
        r.sent(),
        vec![
            Packet::PubAck(PubAck {
                pkid: 1,
                reason: PubAckReason::NoMatchingSubscribers,
                properties: None,
            }),
            Packet::PubAck(PubAck {
                pkid: 2,
                reason: PubAckReason::PayloadFormatInvalid,
                properties: None,
            }),
        ]
    );
    let flow = r.handle(Incoming::Publish(publish("t/+", QoS::AtMostOnce, 0, b"x")));
    assert!(matches!(flow, Flow::Close(_, _)), "{flow:?}");
}

/// SUBSCRIBE: a bad filter is refused per filter (0x8F) while the good one is granted, at most
/// at the broker's maximum QoS.
#[tokio::test]
async fn subscribe_grants_and_refuses_per_filter() {
    let mut r = rig(ProtocolVersion::V5, "subs").await;
    let subscribe = Subscribe {
        pkid: 3,
        filters: vec![
            Filter::new("a/#", QoS::AtLeastOnce),
            Filter::new("a/#/b", QoS::AtLeastOnce),
        ],
        properties: None,
    };
    r.handle(Incoming::Subscribe(subscribe));
    match &r.sent()[..] {
        [Packet::SubAck(ack)] => {
            assert_eq!(ack.pkid, 3);
            assert_eq!(
                ack.return_codes,
                vec![
                    SubscribeReasonCode::Success(QoS::AtLeastOnce),
                    SubscribeReasonCode::TopicFilterInvalid,
                ]
            );
        }
        other => panic!("expected one SUBACK, got {other:?}"),
    }
    assert_eq!(r.machine.session.subscriptions.len(), 1);
}

/// The outgoing window: with Receive Maximum 1, a second QoS 1 delivery waits until the first
/// is acknowledged.
#[tokio::test]
async fn deliveries_respect_the_clients_receive_maximum() {
    let mut r = rig(ProtocolVersion::V5, "window").await;
    r.machine.client.receive_maximum = 1;
    let message = Arc::new(Message {
        topic: Bytes::from_static(b"w"),
        payload: Bytes::from_static(b"1"),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: MessageProperties::default(),
        received_at: Instant::now(),
        publisher: "p".into(),
    });
    let delivery = Delivery {
        message,
        qos: QoS::AtLeastOnce,
        retain: false,
        subscription_ids: Vec::new(),
        seq: None,
        dup: false,
    };
    assert!(r.machine.window_open());
    r.machine
        .deliver(delivery.clone(), &mut r.out, Instant::now());
    assert!(
        !r.machine.window_open(),
        "one in flight fills a window of 1"
    );
    let pkid = match &r.sent()[..] {
        [Packet::Publish(p)] => p.pkid,
        other => panic!("expected one PUBLISH, got {other:?}"),
    };
    r.handle(Incoming::PubAck(PubAck {
        pkid,
        reason: PubAckReason::Success,
        properties: None,
    }));
    assert!(r.machine.window_open(), "the PUBACK opens it again");
}

/// A session that ends after a newer session of its client id subscribed to the same filter
/// (a takeover, or a clean client reconnecting quickly) takes only its own subscription away.
/// Before, subscriptions were removed by client id, and the newer session silently stopped
/// getting messages.
#[tokio::test]
async fn an_ended_session_leaves_the_newer_sessions_subscription_alone() {
    let subscribe =
        || Incoming::Subscribe(Subscribe::new(Filter::new("t/same", QoS::AtMostOnce), None));
    let mut old = rig(ProtocolVersion::V5, "same-id").await;
    let broker = old.machine.broker.clone();
    let mut new = rig(ProtocolVersion::V5, "same-id").await;
    new.machine.broker = broker.clone();
    let mut publisher = rig(ProtocolVersion::V5, "pub").await;
    publisher.machine.broker = broker.clone();
    old.handle(subscribe());
    new.handle(subscribe());
    let (old_session, _) = old.machine.into_parts();
    broker.discard(old_session);
    publisher.handle(Incoming::Publish(publish(
        "t/same",
        QoS::AtMostOnce,
        0,
        b"still",
    )));
    let got = new.machine.session.queue.try_recv();
    assert!(got.is_ok(), "the newer session lost its subscription");
}
