//! A real storage fault: the broker's store hits a file-size limit (RLIMIT_FSIZE, with SIGXFSZ
//! ignored, so writes fail with EFBIG the way they fail with ENOSPC on a full disk). No
//! publish whose write failed may be acknowledged; every acknowledged one must be delivered
//! after the broker restarts with room to write.

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use common::broker_bin;
use ferrymq_e2e::harness::{
    persistent, subscribe_and_leave, BrokerOptions, BrokerProcess, ConnectOptions, Connection,
    Incoming, Protocol,
};

/// A wrapper that runs the broker under the file-size limit written in `fsize_limit` next to it
/// (in KiB, or `unlimited`), with SIGXFSZ ignored (an ignored signal stays ignored across exec).
fn limited_broker(dir: &std::path::Path) -> PathBuf {
    let wrapper = dir.join("ferrymq-limited");
    let script = format!(
        "#!/bin/bash\ntrap '' XFSZ\nulimit -f \"$(cat \"$(dirname \"$0\")/fsize_limit\")\"\nexec '{}' \"$@\"\n",
        broker_bin().display()
    );
    std::fs::write(&wrapper, script).unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    wrapper
}

fn payload(i: u32) -> Bytes {
    let mut p = vec![0u8; 60 * 1024];
    p[..4].copy_from_slice(&i.to_be_bytes());
    Bytes::from(p)
}

#[test]
fn a_failed_write_is_never_acknowledged_and_every_acknowledged_message_survives() {
    let scripts = tempfile::tempdir().unwrap();
    let wrapper = limited_broker(scripts.path());
    // The broker starts with an empty store; 4 MiB holds a few dozen 60 KiB messages.
    std::fs::write(scripts.path().join("fsize_limit"), "4096").unwrap();
    let mut broker =
        BrokerProcess::start(BrokerOptions::new("disk-full").binary(wrapper)).expect("start");
    let addr = broker.addr();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let device = persistent("fault-device", Protocol::V5).session_expiry(3600);
    rt.block_on(subscribe_and_leave(addr, &device, &[("full/#", 1)]))
        .expect("subscribe");

    // v5: one QoS 1 publish at a time, so each PUBACK answers exactly one message.
    let (acked, refused) = rt.block_on(async {
        let (mut conn, _) = Connection::connect(addr, &ConnectOptions::v5("fault-pub5"))
            .await
            .expect("connect");
        let (mut acked, mut refused) = (BTreeSet::new(), BTreeSet::new());
        for i in 0..200u32 {
            let pkid = (i % 60_000 + 1) as u16;
            conn.queue_publish("full/x", 1, pkid, false, payload(i), None)
                .unwrap();
            conn.flush().await.expect("flush");
            match conn.recv_timeout(Duration::from_secs(10)).await {
                Ok(Some(Incoming::PubAck {
                    pkid: p,
                    ok,
                    reason,
                })) => {
                    assert_eq!(p, pkid);
                    if ok {
                        acked.insert(i);
                    } else {
                        if refused.is_empty() {
                            println!("first refusal: publish {i}: {reason}");
                        }
                        refused.insert(i);
                    }
                }
                other => panic!("publish {i}: expected PUBACK, got {other:?}"),
            }
        }
        (acked, refused)
    });
    println!(
        "disk full: {} acknowledged, {} refused with a v5 error reason",
        acked.len(),
        refused.len()
    );
    assert!(!acked.is_empty(), "nothing was stored before the limit");
    assert!(!refused.is_empty(), "the file-size limit was never hit");

    // v3 has no negative PUBACK: the publisher is disconnected instead of acknowledged.
    rt.block_on(async {
        let (mut conn, _) = Connection::connect(addr, &ConnectOptions::v311("fault-pub3"))
            .await
            .expect("connect");
        conn.queue_publish("full/x", 1, 1, false, payload(999_999), None)
            .unwrap();
        conn.flush().await.expect("flush");
        match conn.recv_timeout(Duration::from_secs(10)).await {
            Ok(Some(Incoming::PubAck { .. })) => panic!("v3 publish acknowledged without storage"),
            Ok(None) => panic!("v3 publisher neither acknowledged nor disconnected"),
            Ok(Some(other)) => panic!("unexpected {other:?}"),
            Err(_) => {} // connection closed
        }
    });

    // Room again: every acknowledged message, and none of the refused ones, is delivered.
    broker.kill_9().expect("kill -9");
    std::fs::write(scripts.path().join("fsize_limit"), "unlimited").unwrap();
    broker.restart().expect("restart");
    let delivered = rt.block_on(async {
        let (mut conn, ack) = Connection::connect(addr, &device).await.expect("reconnect");
        assert!(ack.session_present, "persistent session lost");
        let mut got = BTreeSet::new();
        while let Ok(Some(packet)) = conn.recv_timeout(Duration::from_secs(2)).await {
            if let Incoming::Publish(m) = packet {
                let i =
                    u32::from_be_bytes([m.payload[0], m.payload[1], m.payload[2], m.payload[3]]);
                got.insert(i);
                conn.queue_puback(m.pkid).unwrap();
                conn.flush().await.expect("flush");
            }
        }
        got
    });
    println!("after restart: {} delivered", delivered.len());
    assert_eq!(
        delivered, acked,
        "delivered set differs from acknowledged set (refused: {refused:?})"
    );
}
