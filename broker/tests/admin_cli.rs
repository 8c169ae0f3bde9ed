//! The admin CLI (`ferrymq credentials …`, `ferrymq app-clients …`): the real binary against a
//! temporary data directory, then a broker on that directory using what it wrote.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::{connect5_packet, start_with, Raw};
use ferrymq::config::AuthProviderKind;
use rumqttc::v5::mqttbytes::v5::{self, ConnectReturnCode, Packet};

fn ferrymq(data_dir: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferrymq"));
    cmd.args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .env("FERRYMQ_LOG", "warn")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("run ferrymq");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    child.wait_with_output().unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn connack(addr: std::net::SocketAddr, id: &str, user: &str, pw: &str) -> v5::ConnAck {
    let mut c = Raw::connect(addr).await;
    c.send5(Packet::Connect(
        connect5_packet(id, true, 0),
        None,
        Some(v5::Login::new(user, pw)),
    ))
    .await;
    match c.recv5().await {
        Packet::ConnAck(ack) => ack,
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

#[tokio::test]
async fn credentials_and_app_clients_round_trip_and_a_broker_uses_them() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    ok(&ferrymq(
        data,
        &[
            "credentials",
            "add",
            "--username",
            "alice",
            "--password-stdin",
            "--type",
            "application",
            "--pub",
            "out/${username}/#",
            "--sub",
            "in/#",
        ],
        Some("correct horse\n"),
    ));
    let out = Command::new(env!("CARGO_BIN_EXE_ferrymq"))
        .args([
            "credentials",
            "add",
            "--username",
            "bob",
            "--password-env",
            "BOB_PW",
        ])
        .arg("--data-dir")
        .arg(data)
        .env("BOB_PW", "battery staple")
        .output()
        .unwrap();
    ok(&out);
    ok(&ferrymq(data, &["app-clients", "add", "collector"], None));

    let listed = ok(&ferrymq(data, &["credentials", "list"], None));
    let lines: Vec<serde_json::Value> = listed
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON lines"))
        .collect();
    assert_eq!(lines.len(), 3, "{listed}");
    assert!(
        !listed.contains("argon2"),
        "hashes must not be printed: {listed}"
    );
    let alice = lines
        .iter()
        .find(|v| v["username"] == "alice")
        .expect("alice listed");
    assert_eq!(alice["client_type"], "application");
    assert_eq!(alice["has_password"], true);
    assert_eq!(alice["acl"]["publish"][0], "out/${username}/#");
    assert_eq!(
        ok(&ferrymq(data, &["app-clients", "list"], None)).trim(),
        "collector"
    );

    // Bad input is refused with a message, and nothing is written.
    let bad = ferrymq(
        data,
        &["credentials", "add", "--username", "eve", "--pub", "a/#/b"],
        None,
    );
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("a/#/b"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    let missing = ferrymq(
        data,
        &["credentials", "delete", "--username", "nobody"],
        None,
    );
    assert!(!missing.status.success());

    // A broker on this data directory authenticates with what the CLI wrote.
    let data_dir = data.to_path_buf();
    let (server, addr) = start_with(move |c| {
        c.data_dir = data_dir;
        c.auth.allow_anonymous = false;
        c.auth.providers = vec![AuthProviderKind::Store];
    })
    .await;
    let ack = connack(addr, "a1", "alice", "correct horse").await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    assert_eq!(
        ack.properties.and_then(|p| p.session_expiry_interval),
        Some(u32::MAX),
        "the credential made alice an APPLICATION client"
    );
    assert_eq!(
        connack(addr, "b1", "bob", "battery staple").await.code,
        ConnectReturnCode::Success
    );
    assert_eq!(
        connack(addr, "b2", "bob", "battery").await.code,
        ConnectReturnCode::BadUserNamePassword
    );

    // While the broker runs, the store is locked: the CLI says so and changes nothing.
    let locked = ferrymq(data, &["credentials", "delete", "--username", "bob"], None);
    assert!(!locked.status.success());
    let err = String::from_utf8_lossy(&locked.stderr);
    assert!(err.contains("locked"), "{err}");
    assert!(err.contains("credentials.redb"), "{err}");
    server.shutdown().await;

    ok(&ferrymq(
        data,
        &["credentials", "delete", "--username", "bob"],
        None,
    ));
    ok(&ferrymq(
        data,
        &["app-clients", "delete", "collector"],
        None,
    ));
    let listed = ok(&ferrymq(data, &["credentials", "list"], None));
    assert_eq!(listed.lines().count(), 1, "{listed}");
    assert!(ok(&ferrymq(data, &["app-clients", "list"], None)).is_empty());
}

#[test]
fn broker_flags_still_work_next_to_the_subcommands() {
    let out = Command::new(env!("CARGO_BIN_EXE_ferrymq"))
        .args(["--listen", "127.0.0.1:1999", "--check-config"])
        .env_remove("FERRYMQ_AUTH__ALLOW_ANONYMOUS")
        .output()
        .unwrap();
    let text = ok(&out);
    assert!(text.contains("127.0.0.1:1999"), "{text}");
    // Without a config file the development defaults allow anonymous clients.
    assert!(text.contains("allow_anonymous = true"), "{text}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("f.toml");
    std::fs::write(&file, "[limits]\nmax_inflight = 7\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ferrymq"))
        .arg("--config")
        .arg(&file)
        .arg("--check-config")
        .output()
        .unwrap();
    let text = ok(&out);
    assert!(text.contains("max_inflight = 7"), "{text}");
    // With a file, anonymous access is off unless the file says otherwise.
    assert!(text.contains("allow_anonymous = false"), "{text}");
}
