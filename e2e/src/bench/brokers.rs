//! Starting and stopping the brokers under comparison, each on its own loopback port with the
//! settings in `e2e/bench/` (equivalent limits).
//!
//! Durability per broker, for scenarios with persistent subscribers ([`StartOpts::persistent`]):
//! * ferrymq always runs with its durable store in a fresh `--data-dir` per start (QoS 1/2 to
//!   persistent sessions is fsynced before PUBACK); APPLICATION clients come from a generated
//!   `--config` file.
//! * Mosquitto gets `persistence true` with `autosave_interval 1` (a snapshot of its in-memory
//!   database every second: acknowledged messages since the last snapshot are lost in a crash);
//!   `persistence false` otherwise.
//! * rumqttd has no disk persistence at all.
//! * `ferrymq-kafka` is ferrymq on its production backend: a single-node Apache Kafka and a
//!   private PostgreSQL cluster are started for each run (see `harness::services`) on the same
//!   machine, so they share its cores with the broker and the load generator.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

const MOSQUITTO_CONF: &str = include_str!("../../bench/mosquitto.conf");
const RUMQTTD_CONF: &str = include_str!("../../bench/rumqttd.toml");
/// Mosquitto's best persistence: snapshot every second (its default is every 1,800 s). It has no
/// per-message write, let alone an fsync before PUBACK.
const MOSQUITTO_PERSISTENCE: &str = "persistence true\npersistence_location @DIR@/\n\
     persistence_file mosquitto.db\nautosave_interval 1\nautosave_on_changes false";
/// ferrymq's store file inside its data directory.
pub const FERRYMQ_STORE_FILE: &str = "ferrymq.redb";

/// How to start a broker for a set of scenarios.
#[derive(Debug, Clone, Default)]
pub struct StartOpts {
    /// Subscribers keep sessions (clean_session=false): turn on the broker's disk persistence
    /// where it is optional (Mosquitto); ferrymq's store is always on.
    pub persistent: bool,
    /// ferrymq `[[application_clients]]` client ids.
    pub application_clients: Vec<String>,
}

impl StartOpts {
    pub fn for_scenarios<'a>(
        scenarios: impl IntoIterator<Item = &'a super::scenario::Scenario>,
    ) -> StartOpts {
        let mut o = StartOpts::default();
        for sc in scenarios {
            o.persistent |= sc.persistent();
            o.application_clients.extend(sc.application_client_ids());
        }
        o
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Ferrymq,
    /// ferrymq with `storage.backend = "kafka+postgres"`.
    FerrymqKafka,
    Mosquitto,
    Rumqttd,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Ferrymq => "ferrymq",
            Kind::FerrymqKafka => "ferrymq-kafka",
            Kind::Mosquitto => "mosquitto",
            Kind::Rumqttd => "rumqttd",
        }
    }
}

#[derive(Debug, Clone)]
pub struct BrokerSpec {
    pub kind: Kind,
    pub bin: PathBuf,
}

impl BrokerSpec {
    /// `<bin> --version` (or the closest thing), for the report.
    pub fn version(&self) -> String {
        let arg = match self.kind {
            Kind::Mosquitto => "-h",
            _ => "--version",
        };
        Command::new(&self.bin)
            .arg(arg)
            .output()
            .ok()
            .and_then(|o| {
                let text = String::from_utf8_lossy(&o.stdout).to_string();
                text.lines().next().map(|l| l.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into())
    }
}

/// A running broker; killed when dropped.
pub struct Running {
    pub kind: Kind,
    pub addr: SocketAddr,
    child: Child,
    _dir: TempDir,
    /// Kafka and PostgreSQL of a `ferrymq-kafka` run; stopped after the broker.
    _services: Option<crate::harness::services::Services>,
}

impl Running {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The broker's data directory (ferrymq `--data-dir`, Mosquitto `persistence_location`).
    pub fn data_dir(&self) -> PathBuf {
        self._dir.0.join("data")
    }

    /// Bytes of the broker's files in its data directory (ferrymq: `ferrymq.redb`).
    pub fn data_bytes(&self) -> u64 {
        std::fs::read_dir(self.data_dir())
            .map(|rd| {
                rd.filter_map(|e| e.ok()?.metadata().ok())
                    .filter(|m| m.is_file())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    }

    /// Whether the process is still alive (a crash during a run is reported, not hidden).
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A scratch directory removed on drop.
pub(crate) struct TempDir(pub(crate) PathBuf);

impl TempDir {
    pub(crate) fn new(tag: &str) -> anyhow::Result<TempDir> {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ferrymq-bench-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A free loopback port (bound and released; good enough for a benchmark).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub fn start(spec: &BrokerSpec, opts: &StartOpts) -> anyhow::Result<Running> {
    let port = free_port()?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    // A fresh directory per start, under the system temp dir (the results show its file system:
    // on a tmpfs fsync would be free).
    let dir = TempDir::new(spec.kind.name())?;
    let data = dir.0.join("data");
    std::fs::create_dir_all(&data)?;
    // The broker runs in its scratch directory: resolve a relative path first.
    let bin = std::fs::canonicalize(&spec.bin).unwrap_or_else(|_| spec.bin.clone());
    let mut cmd = Command::new(bin);
    let mut services = None;
    match spec.kind {
        Kind::Ferrymq | Kind::FerrymqKafka => {
            // Benchmark clients connect without credentials.
            let mut text =
                String::from("# generated by ferrymq-bench\n[auth]\nallow_anonymous = true\n");
            if spec.kind == Kind::FerrymqKafka {
                let started = crate::harness::services::Services::start()
                    .context("starting Kafka and PostgreSQL for ferrymq-kafka")?;
                text.push_str(&started.config("bench"));
                services = Some(started);
            }
            for id in &opts.application_clients {
                text.push_str(&format!(
                    "\n[[application_clients]]\nclient_id = \"{id}\"\n"
                ));
            }
            let conf = dir.0.join("ferrymq.toml");
            std::fs::write(&conf, text)?;
            cmd.arg("--config").arg(conf);
            cmd.arg("--listen")
                .arg(addr.to_string())
                .arg("--data-dir")
                .arg(&data)
                .arg("--http")
                .arg("127.0.0.1:0")
                .env("FERRYMQ_LOG", "warn");
        }
        Kind::Mosquitto => {
            let conf = dir.0.join("mosquitto.conf");
            // Started as root, Mosquitto drops to the `mosquitto` user and could not write its
            // snapshots into our directory ("Error: Permission denied" once a second).
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o777))?;
            }
            let persistence = if opts.persistent {
                MOSQUITTO_PERSISTENCE.replace("@DIR@", &data.display().to_string())
            } else {
                "persistence false".to_string()
            };
            std::fs::write(
                &conf,
                MOSQUITTO_CONF
                    .replace("@PORT@", &port.to_string())
                    .replace("@PERSISTENCE@", &persistence),
            )?;
            cmd.arg("-c").arg(conf);
        }
        Kind::Rumqttd => {
            let conf = dir.0.join("rumqttd.toml");
            std::fs::write(&conf, RUMQTTD_CONF.replace("@PORT@", &port.to_string()))?;
            cmd.arg("--quiet").arg("-c").arg(conf);
        }
    }
    let log = std::fs::File::create(dir.0.join("broker.log"))?;
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .current_dir(&dir.0);
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {} ({})", spec.kind.name(), spec.bin.display()))?;
    let mut running = Running {
        kind: spec.kind,
        addr,
        child,
        _dir: dir,
        _services: services,
    };
    wait_listening(&mut running)?;
    Ok(running)
}

fn wait_listening(r: &mut Running) -> anyhow::Result<()> {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(15) {
        if !r.alive() {
            let log = std::fs::read_to_string(r._dir.0.join("broker.log")).unwrap_or_default();
            bail!("{} exited at startup:\n{log}", r.kind.name());
        }
        if TcpStream::connect_timeout(&r.addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{} did not listen on {} within 15 s", r.kind.name(), r.addr)
}

/// Looks a program up on PATH (and in ~/.cargo/bin for rumqttd).
pub fn find_bin(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(Path::new(&home).join(".cargo/bin"));
    }
    dirs.push("/usr/sbin".into());
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}
