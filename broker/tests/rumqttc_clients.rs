//! The broker driven by rumqttc's high-level clients (`AsyncClient` + `EventLoop`), v3.1.1 and
//! v5: a real client library with its own keep-alive, acks and packet ids.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{start, WAIT};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Runs an event loop in a task and forwards every incoming packet (or the error that ended
/// it) to a channel. The loop stops at the first error instead of reconnecting.
macro_rules! drive {
    ($eventloop:expr, $event:path) => {{
        let mut eventloop = $eventloop;
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok($event(packet)) => {
                        if tx.send(Ok(packet)).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                        return;
                    }
                }
            }
        });
        (rx, task)
    }};
}

/// Waits for the first forwarded packet `pick` accepts, skipping the others.
async fn wait_for<P: std::fmt::Debug, T>(
    rx: &mut mpsc::UnboundedReceiver<Result<P, String>>,
    what: &str,
    mut pick: impl FnMut(P) -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(Ok(packet))) => {
                if let Some(t) = pick(packet) {
                    return t;
                }
            }
            Ok(Some(Err(e))) => panic!("event loop ended while waiting for {what}: {e}"),
            Ok(None) => panic!("event loop gone while waiting for {what}"),
            Err(_) => panic!("timed out waiting for {what}"),
        }
    }
}

mod v311 {
    use super::*;
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, Publish, QoS};

    pub struct Client {
        pub client: AsyncClient,
        pub rx: mpsc::UnboundedReceiver<Result<Packet, String>>,
        pub task: JoinHandle<()>,
        pub session_present: bool,
    }

    impl Client {
        pub async fn connect(addr: SocketAddr, id: &str, clean: bool) -> Client {
            let mut opts = MqttOptions::new(id, addr.ip().to_string(), addr.port());
            opts.set_clean_session(clean);
            opts.set_keep_alive(Duration::from_secs(30));
            let (client, eventloop) = AsyncClient::new(opts, 100);
            let (mut rx, task) = drive!(eventloop, Event::Incoming);
            let ack = wait_for(&mut rx, "CONNACK", |p| match p {
                Packet::ConnAck(a) => Some(a),
                _ => None,
            })
            .await;
            assert_eq!(ack.code, rumqttc::ConnectReturnCode::Success);
            Client {
                client,
                rx,
                task,
                session_present: ack.session_present,
            }
        }

        pub async fn subscribe(&mut self, filter: &str, qos: QoS) {
            self.client.subscribe(filter, qos).await.unwrap();
            let ack = wait_for(&mut self.rx, "SUBACK", |p| match p {
                Packet::SubAck(a) => Some(a),
                _ => None,
            })
            .await;
            assert_eq!(
                ack.return_codes,
                vec![rumqttc::SubscribeReasonCode::Success(qos)]
            );
        }

        pub async fn next_publish(&mut self) -> Publish {
            wait_for(&mut self.rx, "PUBLISH", |p| match p {
                Packet::Publish(p) => Some(p),
                _ => None,
            })
            .await
        }

        /// Publishes and, for QoS 1/2, waits until the broker completed the flow.
        pub async fn publish(&mut self, topic: &str, qos: QoS, retain: bool, payload: &[u8]) {
            self.client
                .publish(topic, qos, retain, payload.to_vec())
                .await
                .unwrap();
            match qos {
                QoS::AtMostOnce => {}
                QoS::AtLeastOnce => {
                    wait_for(&mut self.rx, "PUBACK", |p| {
                        matches!(p, Packet::PubAck(_)).then_some(())
                    })
                    .await
                }
                QoS::ExactlyOnce => {
                    wait_for(&mut self.rx, "PUBCOMP", |p| {
                        matches!(p, Packet::PubComp(_)).then_some(())
                    })
                    .await
                }
            }
        }

        /// Normal DISCONNECT, then waits for the event loop to finish.
        pub async fn disconnect(mut self) {
            self.client.disconnect().await.unwrap();
            let _ = tokio::time::timeout(WAIT, &mut self.task).await;
            self.task.abort();
        }
    }

    impl Drop for Client {
        fn drop(&mut self) {
            self.task.abort();
        }
    }
}

mod v5c {
    use super::*;
    use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, Packet, Publish, SubscribeReasonCode};
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};

    pub struct Client {
        pub client: AsyncClient,
        pub rx: mpsc::UnboundedReceiver<Result<Packet, String>>,
        pub task: JoinHandle<()>,
        pub session_present: bool,
    }

    impl Client {
        pub async fn connect(addr: SocketAddr, id: &str, clean: bool, expiry: u32) -> Client {
            let mut opts = MqttOptions::new(id, addr.ip().to_string(), addr.port());
            opts.set_clean_start(clean);
            opts.set_keep_alive(Duration::from_secs(30));
            if expiry > 0 {
                opts.set_session_expiry_interval(Some(expiry));
            }
            let (client, eventloop) = AsyncClient::new(opts, 100);
            let (mut rx, task) = drive!(eventloop, Event::Incoming);
            let ack = wait_for(&mut rx, "CONNACK", |p| match p {
                Packet::ConnAck(a) => Some(a),
                _ => None,
            })
            .await;
            assert_eq!(ack.code, ConnectReturnCode::Success);
            Client {
                client,
                rx,
                task,
                session_present: ack.session_present,
            }
        }

        pub async fn subscribe(&mut self, filter: &str, qos: QoS) {
            self.client.subscribe(filter, qos).await.unwrap();
            let ack = wait_for(&mut self.rx, "SUBACK", |p| match p {
                Packet::SubAck(a) => Some(a),
                _ => None,
            })
            .await;
            assert_eq!(ack.return_codes, vec![SubscribeReasonCode::Success(qos)]);
        }

        pub async fn next_publish(&mut self) -> Publish {
            wait_for(&mut self.rx, "PUBLISH", |p| match p {
                Packet::Publish(p) => Some(p),
                _ => None,
            })
            .await
        }

        pub async fn publish(&mut self, topic: &str, qos: QoS, retain: bool, payload: &[u8]) {
            self.client
                .publish(topic, qos, retain, payload.to_vec())
                .await
                .unwrap();
            match qos {
                QoS::AtMostOnce => {}
                QoS::AtLeastOnce => {
                    wait_for(&mut self.rx, "PUBACK", |p| {
                        matches!(p, Packet::PubAck(_)).then_some(())
                    })
                    .await
                }
                QoS::ExactlyOnce => {
                    wait_for(&mut self.rx, "PUBCOMP", |p| {
                        matches!(p, Packet::PubComp(_)).then_some(())
                    })
                    .await
                }
            }
        }

        pub async fn disconnect(mut self) {
            self.client.disconnect().await.unwrap();
            let _ = tokio::time::timeout(WAIT, &mut self.task).await;
            self.task.abort();
        }
    }

    impl Drop for Client {
        fn drop(&mut self) {
            self.task.abort();
        }
    }
}

// ------------------------------------------------------------------------------ v3.1.1

#[tokio::test]
async fn v311_publish_subscribe_qos_0_1_2() {
    use rumqttc::QoS;
    let (_server, addr) = start().await;
    let mut sub = v311::Client::connect(addr, "rc4-sub", true).await;
    sub.subscribe("rc4/t", QoS::ExactlyOnce).await;
    let mut low = v311::Client::connect(addr, "rc4-low", true).await;
    low.subscribe("rc4/+", QoS::AtLeastOnce).await;
    let mut publ = v311::Client::connect(addr, "rc4-pub", true).await;
    for (qos, payload) in [
        (QoS::AtMostOnce, "q0"),
        (QoS::AtLeastOnce, "q1"),
        (QoS::ExactlyOnce, "q2"),
    ] {
        publ.publish("rc4/t", qos, false, payload.as_bytes()).await;
    }
    for (qos, payload) in [
        (QoS::AtMostOnce, "q0"),
        (QoS::AtLeastOnce, "q1"),
        (QoS::ExactlyOnce, "q2"),
    ] {
        let m = sub.next_publish().await;
        assert_eq!(
            (m.topic.as_str(), m.qos, &m.payload[..], m.retain),
            ("rc4/t", qos, payload.as_bytes(), false)
        );
    }
    // Granted QoS 1 caps delivery at QoS 1.
    for (qos, payload) in [
        (QoS::AtMostOnce, "q0"),
        (QoS::AtLeastOnce, "q1"),
        (QoS::AtLeastOnce, "q2"),
    ] {
        let m = low.next_publish().await;
        assert_eq!((m.qos, &m.payload[..]), (qos, payload.as_bytes()));
    }
    publ.disconnect().await;
}

#[tokio::test]
async fn v311_persistent_session_receives_offline_messages() {
    use rumqttc::QoS;
    let (_server, addr) = start().await;
    let mut dev = v311::Client::connect(addr, "rc4-dev", false).await;
    dev.subscribe("rc4/dev", QoS::ExactlyOnce).await;
    dev.disconnect().await;

    let mut publ = v311::Client::connect(addr, "rc4-pub", true).await;
    publ.publish("rc4/dev", QoS::AtLeastOnce, false, b"one")
        .await;
    publ.publish("rc4/dev", QoS::ExactlyOnce, false, b"two")
        .await;
    publ.publish("rc4/dev", QoS::AtMostOnce, false, b"three")
        .await;

    let mut dev = v311::Client::connect(addr, "rc4-dev", false).await;
    assert!(dev.session_present);
    for (qos, payload) in [
        (QoS::AtLeastOnce, "one"),
        (QoS::ExactlyOnce, "two"),
        (QoS::AtMostOnce, "three"),
    ] {
        let m = dev.next_publish().await;
        assert_eq!((m.qos, &m.payload[..]), (qos, payload.as_bytes()));
    }
    dev.disconnect().await;

    // Clean session ends it.
    let dev = v311::Client::connect(addr, "rc4-dev", true).await;
    assert!(!dev.session_present);
}

#[tokio::test]
async fn v311_retained_message_delivery() {
    use rumqttc::QoS;
    let (_server, addr) = start().await;
    let mut publ = v311::Client::connect(addr, "rc4-pub", true).await;
    publ.publish("rc4/ret", QoS::AtLeastOnce, true, b"state")
        .await;
    let mut sub = v311::Client::connect(addr, "rc4-sub", true).await;
    sub.subscribe("rc4/#", QoS::AtLeastOnce).await;
    let m = sub.next_publish().await;
    assert_eq!(
        (m.topic.as_str(), &m.payload[..], m.retain),
        ("rc4/ret", &b"state"[..], true)
    );
    // Clearing it: a later subscriber gets nothing.
    publ.publish("rc4/ret", QoS::AtLeastOnce, true, b"").await;
    let m = sub.next_publish().await;
    assert!(m.payload.is_empty() && !m.retain);
    let mut late = v311::Client::connect(addr, "rc4-late", true).await;
    late.subscribe("rc4/#", QoS::AtLeastOnce).await;
    publ.publish("rc4/live", QoS::AtMostOnce, false, b"live")
        .await;
    let m = late.next_publish().await;
    assert_eq!(
        m.topic, "rc4/live",
        "the deleted retained message was delivered"
    );
}

// ------------------------------------------------------------------------------ v5

#[tokio::test]
async fn v5_publish_subscribe_qos_0_1_2() {
    use rumqttc::v5::mqttbytes::QoS;
    let (_server, addr) = start().await;
    let mut sub = v5c::Client::connect(addr, "rc5-sub", true, 0).await;
    sub.subscribe("rc5/t", QoS::ExactlyOnce).await;
    let mut low = v5c::Client::connect(addr, "rc5-low", true, 0).await;
    low.subscribe("rc5/+", QoS::AtMostOnce).await;
    let mut publ = v5c::Client::connect(addr, "rc5-pub", true, 0).await;
    for (qos, payload) in [
        (QoS::AtMostOnce, "q0"),
        (QoS::AtLeastOnce, "q1"),
        (QoS::ExactlyOnce, "q2"),
    ] {
        publ.publish("rc5/t", qos, false, payload.as_bytes()).await;
    }
    for (qos, payload) in [
        (QoS::AtMostOnce, "q0"),
        (QoS::AtLeastOnce, "q1"),
        (QoS::ExactlyOnce, "q2"),
    ] {
        let m = sub.next_publish().await;
        assert_eq!(
            (&m.topic[..], m.qos, &m.payload[..], m.retain),
            (&b"rc5/t"[..], qos, payload.as_bytes(), false)
        );
    }
    for payload in ["q0", "q1", "q2"] {
        let m = low.next_publish().await;
        assert_eq!(
            (m.qos, &m.payload[..]),
            (QoS::AtMostOnce, payload.as_bytes())
        );
    }
    publ.disconnect().await;
}

#[tokio::test]
async fn v5_persistent_session_receives_offline_messages() {
    use rumqttc::v5::mqttbytes::QoS;
    let (_server, addr) = start().await;
    let mut dev = v5c::Client::connect(addr, "rc5-dev", true, 60).await;
    assert!(!dev.session_present);
    dev.subscribe("rc5/dev", QoS::ExactlyOnce).await;
    dev.disconnect().await;

    let mut publ = v5c::Client::connect(addr, "rc5-pub", true, 0).await;
    publ.publish("rc5/dev", QoS::AtLeastOnce, false, b"one")
        .await;
    publ.publish("rc5/dev", QoS::ExactlyOnce, false, b"two")
        .await;
    publ.publish("rc5/dev", QoS::AtMostOnce, false, b"three")
        .await;

    let mut dev = v5c::Client::connect(addr, "rc5-dev", false, 60).await;
    assert!(dev.session_present);
    for (qos, payload) in [
        (QoS::AtLeastOnce, "one"),
        (QoS::ExactlyOnce, "two"),
        (QoS::AtMostOnce, "three"),
    ] {
        let m = dev.next_publish().await;
        assert_eq!((m.qos, &m.payload[..]), (qos, payload.as_bytes()));
    }
    dev.disconnect().await;

    let dev = v5c::Client::connect(addr, "rc5-dev", true, 0).await;
    assert!(!dev.session_present, "Clean Start must discard the session");
}

#[tokio::test]
async fn v5_retained_message_delivery() {
    use rumqttc::v5::mqttbytes::QoS;
    let (_server, addr) = start().await;
    let mut publ = v5c::Client::connect(addr, "rc5-pub", true, 0).await;
    publ.publish("rc5/ret", QoS::ExactlyOnce, true, b"state")
        .await;
    let mut sub = v5c::Client::connect(addr, "rc5-sub", true, 0).await;
    sub.subscribe("rc5/#", QoS::AtLeastOnce).await;
    let m = sub.next_publish().await;
    assert_eq!(
        (&m.topic[..], &m.payload[..], m.retain, m.qos),
        (&b"rc5/ret"[..], &b"state"[..], true, QoS::AtLeastOnce)
    );
    publ.publish("rc5/ret", QoS::AtLeastOnce, true, b"").await;
    let m = sub.next_publish().await;
    assert!(m.payload.is_empty() && !m.retain);
    let mut late = v5c::Client::connect(addr, "rc5-late", true, 0).await;
    late.subscribe("rc5/#", QoS::AtLeastOnce).await;
    publ.publish("rc5/live", QoS::AtMostOnce, false, b"live")
        .await;
    let m = late.next_publish().await;
    assert_eq!(
        &m.topic[..],
        b"rc5/live",
        "the deleted retained message was delivered"
    );
}
