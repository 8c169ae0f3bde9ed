//! The real `ferrymq` binary with TLS and WebSocket listeners from a config file, driven by
//! independent clients: Mosquitto's command-line clients over TLS with client certificates (the
//! only credential: the X.509 provider maps their CN to a record the admin CLI wrote), and
//! Eclipse Paho for Python over WebSocket and secure WebSocket.
//!
//! Needs `mosquitto_pub`/`mosquitto_sub` (`apt-get install -y mosquitto-clients`) and paho-mqtt
//! 2.x (`pip install -r broker/tests/python/requirements.txt`); CI installs both.

mod common;

use std::fs::File;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::net::{Ca, Leaf};

const TOOL_TIMEOUT: Duration = Duration::from_secs(30);

struct Broker {
    child: Child,
    log: PathBuf,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Broker {
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Starts the binary with `config` and waits until every port in `ports` accepts.
fn start(dir: &Path, config: &str, ports: &[u16]) -> Broker {
    let config_path = write(dir, "ferrymq.toml", config);
    let log = dir.join("broker.log");
    let child = Command::new(env!("CARGO_BIN_EXE_ferrymq"))
        .arg("--config")
        .arg(&config_path)
        .env("FERRYMQ_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(File::create(&log).unwrap())
        .stderr(File::options().append(true).open(&log).unwrap())
        .spawn()
        .expect("spawning the ferrymq binary");
    let broker = Broker { child, log };
    let deadline = Instant::now() + Duration::from_secs(20);
    for port in ports {
        while TcpStream::connect(("127.0.0.1", *port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "broker did not listen on {port}:\n{}",
                broker.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    broker
}

/// Runs `command` to completion within the tool timeout.
fn run(mut command: Command, what: &str) -> Output {
    command.stdin(Stdio::null());
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => panic!(
            "cannot run {what} ({e}); install mosquitto-clients and paho-mqtt 2.x (see .ci/run)"
        ),
    };
    let deadline = Instant::now() + TOOL_TIMEOUT;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{what} did not finish within {TOOL_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

struct Pki {
    dir: tempfile::TempDir,
    server_ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_ca: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    /// Signed by the client CA, but its CN has no credential record.
    stranger_cert: PathBuf,
    stranger_key: PathBuf,
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let server_ca = Ca::new("interop server CA");
    let client_ca = Ca::new("interop device CA");
    let server: Leaf = server_ca.server("ferrymq");
    let device: Leaf = client_ca.client("device-interop");
    let stranger: Leaf = client_ca.client("device-unknown");
    Pki {
        server_ca: write(dir.path(), "server-ca.pem", &server_ca.cert_pem),
        server_cert: write(dir.path(), "server.pem", &server.cert_pem),
        server_key: write(dir.path(), "server.key", &server.key_pem),
        client_ca: write(dir.path(), "client-ca.pem", &client_ca.cert_pem),
        client_cert: write(dir.path(), "device.pem", &device.cert_pem),
        client_key: write(dir.path(), "device.key", &device.key_pem),
        stranger_cert: write(dir.path(), "stranger.pem", &stranger.cert_pem),
        stranger_key: write(dir.path(), "stranger.key", &stranger.key_pem),
        dir,
    }
}

fn tls_listener(name: &str, protocol: &str, port: u16, pki: &Pki, require: bool) -> String {
    format!(
        "[[listeners]]\nname = \"{name}\"\nbind = \"127.0.0.1:{port}\"\nprotocol = \"{protocol}\"\n\
         cert_file = {cert:?}\nkey_file = {key:?}\nclient_ca_file = {ca:?}\nrequire_client_cert = {require}\n\n",
        cert = pki.server_cert,
        key = pki.server_key,
        ca = pki.client_ca,
    )
}

/// The data directory, and the HTTP endpoint on a free port (the default 8083 may be taken).
fn base(pki: &Pki) -> String {
    format!(
        "data_dir = {:?}\n\n[http]\nbind = \"127.0.0.1:{}\"\n\n",
        pki.dir.path().join("data"),
        free_port()
    )
}

#[test]
fn mosquitto_clients_over_tls_with_client_certificates() {
    let pki = pki();
    let port = free_port();
    // The certificate's CN is mapped to a credential record written with the admin CLI; with
    // no other provider and anonymous access off, the certificate is the only way in.
    let data = pki.dir.path().join("data");
    let mut add = Command::new(env!("CARGO_BIN_EXE_ferrymq"));
    add.args([
        "credentials",
        "add",
        "--username",
        "device-interop",
        "--pub",
        "interop/#",
        "--sub",
        "interop/#",
        "--data-dir",
    ])
    .arg(&data)
    .env("FERRYMQ_LOG", "warn");
    let out = run(add, "ferrymq credentials add");
    assert!(
        out.status.success(),
        "credentials add failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let config = base(&pki)
        + "[auth]\nproviders = [\"x509\"]\nallow_anonymous = false\n\n"
        + &tls_listener("tls", "mqtts", port, &pki, true);
    let broker = start(pki.dir.path(), &config, &[port]);
    let tls_args = |cert: Option<(&Path, &Path)>| {
        let mut args = vec![
            "-h".to_string(),
            "localhost".into(),
            "-p".into(),
            port.to_string(),
            "--cafile".into(),
            pki.server_ca.display().to_string(),
        ];
        if let Some((cert, key)) = cert {
            args.extend([
                "--cert".to_string(),
                cert.display().to_string(),
                "--key".into(),
                key.display().to_string(),
            ]);
        }
        args
    };

    // A retained message, so the subscriber started afterwards gets it without a race.
    let mut publish = Command::new("mosquitto_pub");
    publish
        .args(tls_args(Some((&pki.client_cert, &pki.client_key))))
        .args([
            "-V",
            "mqttv311",
            "-i",
            "mosq-pub",
            "-q",
            "1",
            "-r",
            "-t",
            "interop/tls",
            "-m",
            "over tls",
        ]);
    let out = run(publish, "mosquitto_pub");
    assert!(
        out.status.success(),
        "mosquitto_pub over TLS failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        broker.log_text()
    );

    let mut subscribe = Command::new("mosquitto_sub");
    subscribe
        .args(tls_args(Some((&pki.client_cert, &pki.client_key))))
        .args([
            "-V",
            "mqttv5",
            "-i",
            "mosq-sub",
            "-q",
            "1",
            "-t",
            "interop/tls",
            "-C",
            "1",
            "-W",
            "10",
        ]);
    let out = run(subscribe, "mosquitto_sub");
    assert!(
        out.status.success(),
        "mosquitto_sub over TLS failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        broker.log_text()
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "over tls");

    // Without a client certificate the handshake is refused.
    let mut refused = Command::new("mosquitto_pub");
    refused.args(tls_args(None)).args([
        "-V",
        "mqttv311",
        "-i",
        "mosq-nocert",
        "-t",
        "interop/tls",
        "-m",
        "x",
    ]);
    let out = run(refused, "mosquitto_pub without a certificate");
    assert!(
        !out.status.success(),
        "a client without a certificate got in"
    );

    // A certificate the listener accepts, but whose CN maps to no credential: CONNACK 0x05.
    let mut unknown = Command::new("mosquitto_pub");
    unknown
        .args(tls_args(Some((&pki.stranger_cert, &pki.stranger_key))))
        .args([
            "-V",
            "mqttv311",
            "-i",
            "mosq-stranger",
            "-t",
            "interop/tls",
            "-m",
            "x",
        ]);
    let out = run(unknown, "mosquitto_pub with an unmapped certificate");
    assert!(
        !out.status.success(),
        "a certificate without a credential record got in"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .to_lowercase()
            .contains("not authori"),
        "expected a not-authorized CONNACK: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn paho_over_websocket_and_secure_websocket() {
    let pki = pki();
    let (ws, wss) = (free_port(), free_port());
    // Anonymous access on: this test is about the transports, not authentication.
    let config = base(&pki)
        + "[auth]\nallow_anonymous = true\n\n"
        + &format!(
            "[[listeners]]\nname = \"ws\"\nbind = \"127.0.0.1:{ws}\"\nprotocol = \"ws\"\n\n"
        )
        + &tls_listener("wss", "wss", wss, &pki, false);
    let broker = start(pki.dir.path(), &config, &[ws, wss]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/paho_listeners.py");
    let mut paho = Command::new("python3");
    paho.arg(script)
        .arg(ws.to_string())
        .arg(wss.to_string())
        .arg(&pki.server_ca)
        .arg(&pki.client_cert)
        .arg(&pki.client_key);
    let out = run(paho, "paho_listeners.py");
    assert!(
        out.status.success(),
        "paho over ws/wss failed ({}): {}{}\nbroker log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        broker.log_text()
    );
    let log = broker.log_text();
    assert!(
        log.contains("paho-wss-pub"),
        "the wss client connected:\n{log}"
    );
}
