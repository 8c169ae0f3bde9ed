//! The real services the Kafka + PostgreSQL backend needs, started per test: a `tansu` broker
//! (Kafka protocol, in-memory storage) and a private PostgreSQL 15 cluster in a temporary
//! directory, each on a free loopback port and killed when dropped.
//!
//! Tests that need them call [`require_services`] first: on a machine without `tansu` or the
//! PostgreSQL server binaries the test is skipped with a message, unless
//! `FERRYMQ_REQUIRE_SERVICES=1` (set by `.ci/run`), where a missing service fails the test.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::process::free_port;

/// `1` makes a missing service a test failure instead of a skip.
pub const REQUIRE_ENV: &str = "FERRYMQ_REQUIRE_SERVICES";
/// Overrides where `tansu` is found.
pub const TANSU_ENV: &str = "FERRYMQ_TANSU_BIN";
/// Overrides the PostgreSQL server binary directory (`initdb`, `postgres`, `pg_ctl`).
pub const PG_BIN_ENV: &str = "FERRYMQ_PG_BIN";

/// The `tansu` binary: `FERRYMQ_TANSU_BIN`, `~/.cargo/bin/tansu`, or `tansu` on the PATH.
pub fn tansu_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(TANSU_ENV) {
        return Some(PathBuf::from(p));
    }
    if let Some(home) = std::env::var_os("HOME") {
        let p = Path::new(&home).join(".cargo/bin/tansu");
        if p.is_file() {
            return Some(p);
        }
    }
    which("tansu")
}

/// The directory holding `initdb` and `postgres`.
pub fn pg_bin_dir() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(PG_BIN_ENV) {
        return Some(PathBuf::from(p));
    }
    for version in ["17", "16", "15"] {
        let dir = PathBuf::from(format!("/usr/lib/postgresql/{version}/bin"));
        if dir.join("initdb").is_file() {
            return Some(dir);
        }
    }
    which("initdb").and_then(|p| p.parent().map(Path::to_path_buf))
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

/// Whether the services can run here. `false` means "skip" (a message was printed); with
/// `FERRYMQ_REQUIRE_SERVICES=1` a missing service panics instead.
pub fn require_services() -> bool {
    let mut missing = Vec::new();
    if tansu_binary().is_none() {
        missing.push("tansu (cargo install tansu --locked --features dynostore)");
    }
    if pg_bin_dir().is_none() {
        missing.push("PostgreSQL server binaries (apt-get install postgresql)");
    }
    if missing.is_empty() {
        return true;
    }
    let message = format!("Kafka/PostgreSQL test needs: {}", missing.join(", "));
    if std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1") {
        panic!("{message} ({REQUIRE_ENV}=1)");
    }
    eprintln!("SKIPPED: {message}; set {REQUIRE_ENV}=1 to make this a failure");
    false
}

fn wait_for_port(
    addr: SocketAddr,
    timeout: Duration,
    what: &str,
    child: &mut Child,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            bail!("{what} exited during start-up: {status}");
        }
        if Instant::now() > deadline {
            bail!("{what} did not listen on {addr} within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A `tansu` Kafka-protocol broker with in-memory storage.
pub struct Tansu {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tansu {
    pub fn start() -> anyhow::Result<Tansu> {
        let binary = tansu_binary().context("tansu not found")?;
        let dir = tempfile::Builder::new()
            .prefix("ferrymq-tansu-")
            .tempdir()?;
        let addr = free_port()?;
        let log = dir.path().join("tansu.log");
        let out = std::fs::File::create(&log)?;
        let url = format!("tcp://{addr}");
        let mut child = Command::new(&binary)
            .arg("broker")
            .args(["--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "memory://tansu/"])
            .env_remove("CLUSTER_ID")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::from(out.try_clone()?))
            .stderr(Stdio::from(out))
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        wait_for_port(addr, Duration::from_secs(20), "tansu", &mut child)?;
        Ok(Tansu {
            child,
            addr,
            log,
            _dir: dir,
        })
    }

    /// `host:port` for `kafka.bootstrap_servers`.
    pub fn bootstrap(&self) -> String {
        self.addr.to_string()
    }

    /// Freezes the process (SIGSTOP): connections stay open but nothing answers, as in a
    /// network partition. Its data survives, unlike a restart of in-memory storage.
    pub fn freeze(&self) -> anyhow::Result<()> {
        signal(self.child.id(), "-STOP")
    }

    pub fn thaw(&self) -> anyhow::Result<()> {
        signal(self.child.id(), "-CONT")
    }

    pub fn log_tail(&self) -> String {
        tail(&self.log, 30)
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = signal(self.child.id(), "-CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn signal(pid: u32, sig: &str) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()?;
    if !status.success() {
        bail!("kill {sig} {pid} failed");
    }
    Ok(())
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A private PostgreSQL cluster (trust authentication on loopback).
pub struct Postgres {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
    /// Run the server as the `postgres` user (PostgreSQL refuses to run as root).
    as_postgres: bool,
}

impl Postgres {
    pub fn start() -> anyhow::Result<Postgres> {
        let bin = pg_bin_dir().context("PostgreSQL server binaries not found")?;
        let dir = tempfile::Builder::new().prefix("ferrymq-pg-").tempdir()?;
        let as_postgres = is_root();
        let data = dir.path().join("data");
        if as_postgres {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()?;
            if !status.success() {
                bail!("chown postgres {} failed", dir.path().display());
            }
        }
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let out = run_as(initdb, as_postgres)
            .output()
            .context("running initdb")?;
        if !out.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let port = free_port()?.port();
        let mut pg = Postgres {
            bin,
            dir,
            port,
            child: None,
            as_postgres,
        };
        pg.spawn()?;
        Ok(pg)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let data = self.dir.path().join("data");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("postgres.log"))?;
        let mut cmd = Command::new(self.bin.join("postgres"));
        cmd.arg("-D")
            .arg(&data)
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!(
                "unix_socket_directories={}",
                self.dir.path().display()
            ))
            .args(["-c", "fsync=off", "-c", "max_connections=200"])
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log));
        let mut child = run_as(cmd, self.as_postgres)
            .spawn()
            .context("starting postgres")?;
        let addr: SocketAddr = ([127, 0, 0, 1], self.port).into();
        wait_for_port(addr, Duration::from_secs(30), "postgres", &mut child)?;
        // The port opens a moment before the server accepts logins.
        std::thread::sleep(Duration::from_millis(300));
        self.child = Some(child);
        Ok(())
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres`
    pub fn url(&self) -> String {
        self.url_for("postgres")
    }

    /// The URL of another database of the cluster.
    pub fn url_for(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Runs `sql` with `psql` (stops at the first error) and returns its output, unaligned and
    /// without headers: one line per row, columns separated by `|`.
    pub fn psql(&self, sql: &str) -> anyhow::Result<String> {
        self.psql_in("postgres", sql)
    }

    /// [`Postgres::psql`] in another database of the cluster.
    pub fn psql_in(&self, database: &str, sql: &str) -> anyhow::Result<String> {
        let out = Command::new(self.bin.join("psql"))
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .args(["-d", &self.url_for(database), "-c", sql])
            .output()
            .context("running psql")?;
        if !out.status.success() {
            bail!(
                "psql failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Stops the server at once (SIGQUIT to the postmaster: immediate shutdown, like a crash;
    /// the data survives).
    pub fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            // The child may be `runuser`, which does not pass signals on: signal the postmaster
            // itself (first line of postmaster.pid).
            let pid = std::fs::read_to_string(self.dir.path().join("data/postmaster.pid"))
                .ok()
                .and_then(|t| t.lines().next().and_then(|l| l.trim().parse::<u32>().ok()))
                .unwrap_or(child.id());
            signal(pid, "-QUIT")?;
            child.wait()?;
        }
        Ok(())
    }

    /// Starts it again on the same port and data.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop()?;
        self.spawn()
    }

    pub fn log_tail(&self) -> String {
        tail(&self.dir.path().join("postgres.log"), 30)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Wraps `cmd` in `runuser -u postgres --` when asked.
fn run_as(cmd: Command, as_postgres: bool) -> Command {
    if !as_postgres {
        return cmd;
    }
    let mut wrapped = Command::new("runuser");
    wrapped
        .args(["-u", "postgres", "--"])
        .arg(cmd.get_program());
    wrapped.args(cmd.get_args());
    wrapped.stdout(Stdio::null());
    wrapped
}

/// Both services, plus the `[storage]`, `[kafka]` and `[postgres]` config sections that point
/// a broker at them (each broker gets its own topic prefix and schema).
pub struct Services {
    pub kafka: Tansu,
    pub postgres: Postgres,
}

impl Services {
    pub fn start() -> anyhow::Result<Services> {
        Ok(Services {
            kafka: Tansu::start()?,
            postgres: Postgres::start()?,
        })
    }

    pub fn config(&self, name: &str) -> String {
        format!(
            "[storage]\nbackend = \"kafka+postgres\"\n\n[kafka]\nbootstrap_servers = \"{}\"\ntopic_prefix = \"{name}\"\nmsg_all_partitions = 4\nproduce_timeout_ms = 3000\n\n[postgres]\nurl = \"{}\"\nschema = \"{name}\"\nmax_connections = 4\n",
            self.kafka.bootstrap(),
            self.postgres.url(),
        )
    }
}
