//! SIGTERM to the real `ferrymq` process with `[shutdown] drain_secs` (what a Kubernetes pod of
//! the operator gets after its preStop pause): the MQTT 5 clients are closed one by one over the
//! period with DISCONNECT 0x8B and the Server Reference, and the process then exits 0. The
//! drain's details (acks while draining, v3 clients, readiness) are in broker/tests/drain.rs;
//! this is the signal path of the binary.
//!
//! Uses `FERRYMQ_BIN` when set, else builds the release binary (`release_binary`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use ferrymq_e2e::harness::{release_binary, BrokerOptions, BrokerProcess};
use rumqttc::v5::mqttbytes::v5::{Connect, DisconnectReasonCode, Packet};

const DRAIN_SECS: u64 = 3;
const REFERENCE: &str = "core.iot.svc";

/// A v5 client on a blocking socket: CONNECT, CONNACK, then wait for the broker's DISCONNECT.
struct Client {
    stream: TcpStream,
    buf: BytesMut,
}

impl Client {
    fn connect(addr: SocketAddr, id: &str) -> Client {
        let stream = TcpStream::connect(addr).expect("connect");
        let mut c = Client {
            stream,
            buf: BytesMut::new(),
        };
        let connect = Connect {
            keep_alive: 60,
            client_id: id.to_string(),
            clean_start: true,
            properties: None,
        };
        let mut out = BytesMut::new();
        Packet::Connect(connect, None, None)
            .write(&mut out, None)
            .expect("encode CONNECT");
        c.stream.write_all(&out).expect("send CONNECT");
        match c.next(Duration::from_secs(5)) {
            Some(Packet::ConnAck(_)) => c,
            other => panic!("{id}: expected CONNACK, got {other:?}"),
        }
    }

    fn next(&mut self, wait: Duration) -> Option<Packet> {
        let deadline = Instant::now() + wait;
        loop {
            match Packet::read(&mut self.buf, None) {
                Ok(p) => return Some(p),
                Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => panic!("undecodable broker output: {e:?}"),
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            self.stream
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .ok()?;
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(n) if n > 0 => self.buf.extend_from_slice(&chunk[..n]),
                _ => return None,
            }
        }
    }
}

#[test]
fn sigterm_drains_clients_over_the_period_then_exits() {
    let config = format!(
        "[auth]\nallow_anonymous = true\n\n[shutdown]\ndrain_secs = {DRAIN_SECS}\nserver_reference = \"{REFERENCE}\"\n"
    );
    let mut broker = BrokerProcess::start(
        BrokerOptions::new("drain")
            .binary(release_binary())
            .config(config),
    )
    .expect("broker starts");
    let addr = broker.addr();
    let clients: Vec<Client> = (0..3)
        .map(|i| Client::connect(addr, &format!("drain-{i}")))
        .collect();

    let waiting: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            std::thread::spawn(move || loop {
                match c.next(Duration::from_secs(DRAIN_SECS + 10)) {
                    Some(Packet::Disconnect(d)) => break (Instant::now(), d),
                    Some(_) => continue,
                    None => panic!("closed without a DISCONNECT"),
                }
            })
        })
        .collect();
    let status = broker.stop().expect("the broker exits after its drain");
    assert!(status.success(), "exit status {status}");
    let log = broker.log_tail(200);
    assert!(
        log.contains("draining: closing connections gradually"),
        "{log}"
    );

    let mut times = Vec::new();
    for w in waiting {
        let (at, d) = w.join().expect("client thread");
        assert_eq!(d.reason_code, DisconnectReasonCode::ServerShuttingDown);
        assert_eq!(
            d.properties.and_then(|p| p.server_reference).as_deref(),
            Some(REFERENCE)
        );
        times.push(at);
    }
    times.sort();
    // Three turns over 3 s: 0, 1 and 2 s after SIGTERM. Not all at once.
    let span = times[2] - times[0];
    assert!(
        span >= Duration::from_millis(1500),
        "closes spread over only {span:?}"
    );
}
