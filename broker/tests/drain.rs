//! Draining on shutdown (`[shutdown] drain_secs`), with real TCP clients speaking MQTT 5 and
//! 3.1.1: the node turns unready and stops accepting at once, closes its clients one by one
//! spread over the period (v5: DISCONNECT 0x8B with the Server Reference; v3.1.1: a plain
//! close), and keeps acknowledging and routing for the clients still connected.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{filter5, publish5_packet, Raw, WAIT};
use rumqttc::v5::mqttbytes::v5::{DisconnectReasonCode, Packet};
use rumqttc::v5::mqttbytes::QoS;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

const DRAIN_SECS: u64 = 4;
const REFERENCE: &str = "other-node.example:1883";

/// What one v5 client saw.
struct Seen {
    closed_at: Instant,
    reason: DisconnectReasonCode,
    server_reference: Option<String>,
    /// PUBACKs and PUBLISHes from others received after the drain began.
    acks_while_draining: usize,
    routed_while_draining: usize,
}

/// Publishes QoS 1 every 100 ms and reads everything until the broker's DISCONNECT.
async fn publish_until_closed(mut c: Raw, id: String, drain_began: Instant) -> Seen {
    let mut pkid = 1u16;
    let mut acks = 0;
    let mut routed = 0;
    let mut next_publish = Instant::now();
    loop {
        if Instant::now() >= next_publish {
            c.publish5(publish5_packet(
                &format!("drain/{id}"),
                QoS::AtLeastOnce,
                pkid,
                false,
                b"x",
            ))
            .await;
            pkid = pkid % 1000 + 1;
            next_publish = Instant::now() + Duration::from_millis(100);
        }
        let got = c.recv5_within(Duration::from_millis(100)).await;
        let draining = Instant::now() > drain_began;
        match got {
            Some(Packet::PubAck(_)) if draining => acks += 1,
            Some(Packet::Publish(p)) if draining && !p.topic.ends_with(id.as_bytes()) => {
                routed += 1
            }
            Some(Packet::Disconnect(d)) => {
                let closed_at = Instant::now();
                assert!(
                    c.closed_within(WAIT).await.is_some(),
                    "{id}: socket open after DISCONNECT"
                );
                return Seen {
                    closed_at,
                    reason: d.reason_code,
                    server_reference: d.properties.and_then(|p| p.server_reference),
                    acks_while_draining: acks,
                    routed_while_draining: routed,
                };
            }
            _ => {}
        }
    }
}

async fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes()).await.ok()?;
    let mut head = vec![0u8; 12];
    s.read_exact(&mut head).await.ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drain_spreads_closes_with_8b_and_server_reference() {
    let (server, addr) = common::start_with(|c| {
        c.shutdown.drain_secs = DRAIN_SECS;
        c.shutdown.server_reference = Some(REFERENCE.into());
    })
    .await;
    let http = server.http_addr().expect("http endpoint");
    assert_eq!(http_status(http, "/health/ready").await, Some(200));

    let mut clients = Vec::new();
    for i in 0..4 {
        let id = format!("v5-{i}");
        let (mut c, _) = Raw::connect5(addr, &id, true, 0).await;
        c.subscribe5(1, filter5("drain/#", QoS::AtMostOnce), None)
            .await;
        clients.push((id, c));
    }
    let (mut v3, _) = Raw::connect4(addr, "v3", true).await;

    let drain_began = Instant::now();
    let stopping = tokio::spawn(server.shutdown());
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|(id, c)| tokio::spawn(publish_until_closed(c, id, drain_began)))
        .collect();

    // Unready and not accepting from the start of the drain.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(http_status(http, "/health/ready").await, Some(503));
    let refused = match tokio::net::TcpStream::connect(addr).await {
        Err(_) => true,
        Ok(mut s) => {
            // Accepted by the kernel's backlog at most: nobody serves it.
            let mut byte = [0u8; 1];
            s.write_all(&[0x10, 0x00]).await.ok();
            matches!(
                tokio::time::timeout(Duration::from_secs(1), s.read(&mut byte)).await,
                Ok(Ok(0)) | Ok(Err(_)) | Err(_)
            )
        }
    };
    assert!(refused, "a new connection was served during the drain");

    let mut seen = Vec::new();
    for t in tasks {
        seen.push(
            tokio::time::timeout(Duration::from_secs(DRAIN_SECS + 5), t)
                .await
                .expect("every v5 client is closed within the drain period")
                .expect("client task"),
        );
    }
    // The v3.1.1 client gets no DISCONNECT from a server: its socket just closes.
    let v3_closed = v3.closed_within(Duration::from_secs(DRAIN_SECS + 5)).await;
    assert_eq!(v3_closed, Some(vec![]), "v3.1.1 client: plain close");
    let v3_closed_at = Instant::now();

    for s in &seen {
        assert_eq!(s.reason, DisconnectReasonCode::ServerShuttingDown);
        assert_eq!(s.server_reference.as_deref(), Some(REFERENCE));
    }
    // Spread over the period: five connections, turns 0.8 s apart over 4 s. Not in one
    // instant: the first and the last close at least 2 s apart.
    let mut times: Vec<Instant> = seen.iter().map(|s| s.closed_at).collect();
    times.push(v3_closed_at);
    times.sort();
    let span = *times.last().unwrap() - *times.first().unwrap();
    assert!(
        span >= Duration::from_secs(2),
        "closes spread over only {span:?}"
    );
    assert!(
        span <= Duration::from_secs(DRAIN_SECS + 2),
        "closes took {span:?}, beyond the period"
    );
    // Until the last client left, the node acknowledged and routed: the last v5 client to go
    // got PUBACKs and the others' messages while the node drained.
    let last = seen.iter().max_by_key(|s| s.closed_at).expect("v5 clients");
    assert!(last.acks_while_draining > 0, "no PUBACK while draining");
    assert!(
        last.routed_while_draining > 0,
        "nothing routed while draining"
    );

    tokio::time::timeout(Duration::from_secs(DRAIN_SECS + 15), stopping)
        .await
        .expect("shutdown finished after the drain")
        .unwrap();
}

/// Without `drain_secs` (the default) shutdown closes everyone at once, as before, and a v5
/// client gets no Server Reference.
#[tokio::test]
async fn without_drain_shutdown_closes_at_once() {
    let (server, addr) = common::start().await;
    let (mut c5, _) = Raw::connect5(addr, "v5", true, 0).await;
    let stopping = tokio::spawn(server.shutdown());
    let d = c5.expect_disconnect5().await;
    assert_eq!(d.reason_code, DisconnectReasonCode::ServerShuttingDown);
    assert_eq!(d.properties.and_then(|p| p.server_reference), None);
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .expect("shutdown finished")
        .unwrap();
}
