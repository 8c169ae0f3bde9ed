//! Interoperability: the real `ferrymq` binary driven by independent client implementations,
//! Eclipse Mosquitto's command-line clients and Eclipse Paho for Python.
//!
//! These tests need `mosquitto_sub`/`mosquitto_pub` (Debian: `apt-get install -y
//! mosquitto-clients`) and paho-mqtt 2.x (`pip install -r broker/tests/python/requirements.txt`).
//! When either is missing the test fails and says what to install: CI installs them.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const START_TIMEOUT: Duration = Duration::from_secs(20);
const TOOL_TIMEOUT: Duration = Duration::from_secs(20);
const MOSQUITTO_INSTALL: &str =
    "install the Mosquitto clients: `apt-get install -y mosquitto-clients`";
const PAHO_INSTALL: &str =
    "install paho-mqtt 2.x: `pip install -r broker/tests/python/requirements.txt`";

/// The `ferrymq` binary on a free loopback port with a temporary data directory; killed on drop.
struct BrokerProcess {
    child: Child,
    port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl BrokerProcess {
    fn start() -> BrokerProcess {
        // The free port can be taken between probing and binding; retry a few times then.
        for _ in 0..3 {
            let port = free_port();
            let dir = tempfile::tempdir().expect("temp dir");
            let data = dir.path().join("data");
            std::fs::create_dir_all(&data).unwrap();
            let log = dir.path().join("broker.log");
            let child = Command::new(env!("CARGO_BIN_EXE_ferrymq"))
                .arg("--listen")
                .arg(format!("127.0.0.1:{port}"))
                .arg("--data-dir")
                .arg(&data)
                // Brokers of parallel tests must not share the default HTTP port.
                .arg("--http")
                .arg("127.0.0.1:0")
                .env("FERRYMQ_LOG", "debug")
                .stdin(Stdio::null())
                .stdout(File::create(&log).unwrap())
                .stderr(File::options().append(true).open(&log).unwrap())
                .spawn()
                .expect("spawning the ferrymq binary");
            let mut broker = BrokerProcess {
                child,
                port,
                log,
                _dir: dir,
            };
            let deadline = Instant::now() + START_TIMEOUT;
            loop {
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return broker;
                }
                if let Some(status) = broker.child.try_wait().unwrap() {
                    eprintln!(
                        "ferrymq exited ({status}) before accepting on {port}, retrying:\n{}",
                        broker.log_text()
                    );
                    break;
                }
                if Instant::now() > deadline {
                    panic!(
                        "ferrymq did not accept connections on {port} within {START_TIMEOUT:?}:\n{}",
                        broker.log_text()
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        panic!("could not start ferrymq on a free port");
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Fails the test with installation advice when `tool` cannot be run.
fn require(tool: &str, install: &str) {
    match Command::new(tool)
        .arg("--help")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("`{tool}` is not installed; {install}")
        }
        Err(e) => panic!("cannot run `{tool}` ({e}); {install}"),
    }
}

/// Waits for `child` with a timeout, killing it (and failing) when it overruns.
fn wait_bounded(child: &mut Child, what: &str) -> ExitStatus {
    let deadline = Instant::now() + TOOL_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {TOOL_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a command to completion (bounded), capturing its output.
fn run_bounded(mut command: Command, what: &str) -> Output {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {what}: {e}"));
    // Drain both pipes on threads so a chatty child cannot block on a full pipe.
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut out, &mut v);
        v
    });
    let err_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut err, &mut v);
        v
    });
    let status = wait_bounded(&mut child, what);
    Output {
        status,
        stdout: out_reader.join().unwrap(),
        stderr: err_reader.join().unwrap(),
    }
}

// ------------------------------------------------------------------------------ mosquitto

/// `mosquitto_pub` once; fails the test unless it exits successfully.
fn mosquitto_pub(broker: &BrokerProcess, version: &str, args: &[&str]) {
    let mut cmd = Command::new("mosquitto_pub");
    cmd.args([
        "-h",
        "127.0.0.1",
        "-p",
        &broker.port.to_string(),
        "-V",
        version,
    ]);
    cmd.args(args);
    let out = run_bounded(cmd, "mosquitto_pub");
    assert!(
        out.status.success(),
        "mosquitto_pub {args:?} failed ({}): {}{}\nbroker log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        broker.log_text()
    );
}

/// A running `mosquitto_sub -d -v`, its stdout streamed line by line.
struct MosquittoSub {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl MosquittoSub {
    fn spawn(broker: &BrokerProcess, version: &str, args: &[&str]) -> MosquittoSub {
        // mosquitto_sub block-buffers stdout into a pipe; line buffering lets us see the
        // SUBACK as it happens.
        let mut child = Command::new("stdbuf")
            .args(["-oL", "mosquitto_sub"])
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &broker.port.to_string(),
                "-V",
                version,
            ])
            .args(["-d", "-v"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning mosquitto_sub: {e}; {MOSQUITTO_INSTALL}"));
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        MosquittoSub {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits until the broker acknowledged the subscription.
    fn wait_subscribed(&mut self) {
        let deadline = Instant::now() + TOOL_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let done = line.contains("received SUBACK");
                    self.seen.push(line);
                    if done {
                        return;
                    }
                }
                Err(_) => panic!(
                    "mosquitto_sub got no SUBACK; output so far: {:#?}",
                    self.seen
                ),
            }
        }
    }

    /// Waits for the process to exit (it is run with `-C n -W secs`) and returns its output
    /// lines; fails unless it exited successfully.
    fn finish(mut self, broker: &BrokerProcess) -> Vec<String> {
        let status = wait_bounded(&mut self.child, "mosquitto_sub");
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(2)) {
            self.seen.push(line);
        }
        assert!(
            status.success(),
            "mosquitto_sub exited with {status}; output: {:#?}\nbroker log:\n{}",
            self.seen,
            broker.log_text()
        );
        std::mem::take(&mut self.seen)
    }
}

impl Drop for MosquittoSub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A message as mosquitto_sub reported it: the debug line's flags and the `-v` output line.
#[derive(Debug, PartialEq, Eq)]
struct Received {
    qos: u8,
    retain: bool,
    topic: String,
    payload: String,
}

/// Pairs each `received PUBLISH (d0, q1, r0, m1, 'topic', ...)` debug line with the
/// `topic payload` line printed after it.
fn received_messages(lines: &[String]) -> Vec<Received> {
    let mut out = Vec::new();
    let mut pending: Option<(u8, bool)> = None;
    for line in lines {
        if let Some(rest) = line.split("received PUBLISH (").nth(1) {
            let flags: Vec<&str> = rest.split(", ").collect();
            let qos = flags[1].trim_start_matches('q').parse().unwrap();
            let retain = flags[2] == "r1";
            pending = Some((qos, retain));
        } else if line.starts_with("Client ") || line.starts_with("Subscribed") {
            continue;
        } else if let Some((qos, retain)) = pending.take() {
            let (topic, payload) = line.split_once(' ').unwrap_or((line, ""));
            out.push(Received {
                qos,
                retain,
                topic: topic.to_string(),
                payload: payload.to_string(),
            });
        }
    }
    out
}

fn msg(qos: u8, retain: bool, topic: &str, payload: &str) -> Received {
    Received {
        qos,
        retain,
        topic: topic.into(),
        payload: payload.into(),
    }
}

fn require_mosquitto() {
    require("mosquitto_sub", MOSQUITTO_INSTALL);
    require("mosquitto_pub", MOSQUITTO_INSTALL);
    require(
        "stdbuf",
        "install GNU coreutils (`apt-get install -y coreutils`)",
    );
}

fn mosquitto_pubsub(version: &str) {
    require_mosquitto();
    let broker = BrokerProcess::start();
    let mut sub = MosquittoSub::spawn(
        &broker,
        version,
        &["-t", "mq/#", "-q", "2", "-C", "3", "-W", "15"],
    );
    sub.wait_subscribed();
    let mut low = MosquittoSub::spawn(
        &broker,
        version,
        &["-t", "mq/+", "-q", "1", "-C", "3", "-W", "15"],
    );
    low.wait_subscribed();
    for q in ["0", "1", "2"] {
        let topic = format!("mq/q{q}");
        let payload = format!("payload-{q}");
        mosquitto_pub(&broker, version, &["-t", &topic, "-q", q, "-m", &payload]);
    }
    assert_eq!(
        received_messages(&sub.finish(&broker)),
        vec![
            msg(0, false, "mq/q0", "payload-0"),
            msg(1, false, "mq/q1", "payload-1"),
            msg(2, false, "mq/q2", "payload-2"),
        ]
    );
    assert_eq!(
        received_messages(&low.finish(&broker)),
        vec![
            msg(0, false, "mq/q0", "payload-0"),
            msg(1, false, "mq/q1", "payload-1"),
            msg(1, false, "mq/q2", "payload-2"),
        ],
        "granted QoS 1 caps delivery"
    );
}

fn mosquitto_retained(version: &str) {
    require_mosquitto();
    let broker = BrokerProcess::start();
    mosquitto_pub(
        &broker,
        version,
        &["-t", "ret/a", "-q", "1", "-r", "-m", "kept-a"],
    );
    mosquitto_pub(
        &broker,
        version,
        &["-t", "ret/b", "-q", "2", "-r", "-m", "kept-b"],
    );
    mosquitto_pub(&broker, version, &["-t", "ret/b", "-q", "1", "-r", "-n"]);
    mosquitto_pub(
        &broker,
        version,
        &["-t", "ret/c", "-q", "0", "-r", "-m", "kept-c"],
    );
    let sub = MosquittoSub::spawn(
        &broker,
        version,
        &["-t", "ret/+", "-q", "2", "-C", "2", "-W", "15"],
    );
    let mut got = received_messages(&sub.finish(&broker));
    got.sort_by(|a, b| a.topic.cmp(&b.topic));
    assert_eq!(
        got,
        vec![
            msg(1, true, "ret/a", "kept-a"),
            msg(0, true, "ret/c", "kept-c")
        ],
        "retained messages (ret/b was deleted)"
    );
}

fn mosquitto_persistent_session(version: &str) {
    require_mosquitto();
    let broker = BrokerProcess::start();
    let mut session: Vec<&str> = vec!["-c", "-i", "mosq-dev", "-t", "dev/in", "-q", "2"];
    if version == "mqttv5" {
        session.extend(["-x", "60"]);
    }
    // Subscribe, then leave (-E exits after the SUBACK).
    let first = MosquittoSub::spawn(&broker, version, &[&session[..], &["-E"]].concat());
    first.finish(&broker);
    mosquitto_pub(
        &broker,
        version,
        &["-t", "dev/in", "-q", "1", "-m", "offline-1"],
    );
    mosquitto_pub(
        &broker,
        version,
        &["-t", "dev/in", "-q", "2", "-m", "offline-2"],
    );
    let back = MosquittoSub::spawn(
        &broker,
        version,
        &[&session[..], &["-C", "2", "-W", "15"]].concat(),
    );
    let lines = back.finish(&broker);
    // Published while the client was away: only the resumed session can deliver them.
    assert_eq!(
        received_messages(&lines),
        vec![
            msg(1, false, "dev/in", "offline-1"),
            msg(2, false, "dev/in", "offline-2"),
        ]
    );
}

#[test]
fn mosquitto_clients_v311_qos_0_1_2() {
    mosquitto_pubsub("mqttv311");
}

#[test]
fn mosquitto_clients_v5_qos_0_1_2() {
    mosquitto_pubsub("mqttv5");
}

#[test]
fn mosquitto_clients_v311_retained() {
    mosquitto_retained("mqttv311");
}

#[test]
fn mosquitto_clients_v5_retained() {
    mosquitto_retained("mqttv5");
}

#[test]
fn mosquitto_clients_v311_persistent_session() {
    mosquitto_persistent_session("mqttv311");
}

#[test]
fn mosquitto_clients_v5_persistent_session() {
    mosquitto_persistent_session("mqttv5");
}

// ------------------------------------------------------------------------------ paho (python)

fn python_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("python")
        .join(name)
}

#[test]
fn paho_python_v311_and_v5() {
    require(
        "python3",
        "install Python 3 (`apt-get install -y python3 python3-pip`)",
    );
    let probe = Command::new("python3")
        .args([
            "-c",
            "import paho.mqtt, sys; sys.exit(0 if int(paho.mqtt.__version__.split('.')[0]) >= 2 else 1)",
        ])
        .output()
        .expect("running python3");
    assert!(
        probe.status.success(),
        "paho-mqtt 2.x is not available to python3 ({}); {PAHO_INSTALL}",
        String::from_utf8_lossy(&probe.stderr).trim()
    );
    let broker = BrokerProcess::start();
    let mut cmd = Command::new("python3");
    cmd.arg(python_script("paho_interop.py"))
        .arg(broker.port.to_string());
    let out = run_bounded(cmd, "paho_interop.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "paho interop script failed ({}):\n{stdout}{stderr}\nbroker log:\n{}",
        out.status,
        broker.log_text()
    );
    // Every check reported itself.
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("ok ")).count(),
        9,
        "{stdout}"
    );
}
