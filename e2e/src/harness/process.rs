//! The broker as a child process: spawn, wait for the port, kill -9, restart, graceful stop.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Environment variable naming the `ferrymq` binary to run.
pub const BIN_ENV: &str = "FERRYMQ_BIN";
/// Set to `1` to keep the temporary directory (data dir, config, log) after the test.
pub const KEEP_ENV: &str = "FERRYMQ_E2E_KEEP";
/// Fault injection to prove the tests can fail: `wipe` deletes the data dir before every
/// [`BrokerProcess::restart`] (a broker that loses everything on a crash). Never set it in CI.
pub const FAULT_ENV: &str = "FERRYMQ_E2E_FAULT";

/// How a [`BrokerProcess`] is started.
#[derive(Debug, Clone)]
pub struct BrokerOptions {
    /// Shows up in the temporary directory's name and in progress lines.
    pub name: String,
    /// TOML written to `<dir>/ferrymq.toml` and passed with `--config`.
    pub config: Option<String>,
    /// Extra environment for the broker (on top of `FERRYMQ_LOG=info`).
    pub env: Vec<(String, String)>,
    /// The binary; by default [`default_binary`].
    pub binary: Option<PathBuf>,
    /// How long to wait for the port to accept TCP after a (re)start.
    pub start_timeout: Duration,
    /// How long [`BrokerProcess::stop`] waits after SIGTERM before it gives up and kills.
    pub stop_timeout: Duration,
    /// The MQTT address (`--listen`); by default a free port.
    pub listen: Option<SocketAddr>,
    /// A standby (`postgres.standby`) binds no MQTT port until it takes over: (re)starts wait
    /// for its HTTP port instead.
    pub standby: bool,
    /// A command the broker is run under, e.g. `ip netns exec <name>` (it must exec the broker,
    /// so that the child's pid is the broker's).
    pub wrapper: Vec<String>,
    /// The address both listeners (MQTT unless `listen` is set, and HTTP) bind to and are
    /// reached at; by default loopback.
    pub host: Option<IpAddr>,
}

impl BrokerOptions {
    pub fn new(name: impl Into<String>) -> BrokerOptions {
        BrokerOptions {
            name: name.into(),
            config: None,
            env: Vec::new(),
            binary: None,
            start_timeout: Duration::from_secs(20),
            stop_timeout: Duration::from_secs(20),
            listen: None,
            standby: false,
            wrapper: Vec::new(),
            host: None,
        }
    }

    /// Runs the broker as `<wrapper...> <binary> <args>`.
    pub fn wrapper<S: Into<String>>(
        mut self,
        command: impl IntoIterator<Item = S>,
    ) -> BrokerOptions {
        self.wrapper = command.into_iter().map(Into::into).collect();
        self
    }

    /// Binds the MQTT and HTTP listeners to `host` (ports picked free on loopback).
    pub fn host(mut self, host: IpAddr) -> BrokerOptions {
        self.host = Some(host);
        self
    }

    pub fn listen(mut self, addr: SocketAddr) -> BrokerOptions {
        self.listen = Some(addr);
        self
    }

    /// Starts the broker as a standby: `postgres.standby = true`, ready once HTTP answers.
    pub fn standby(mut self) -> BrokerOptions {
        self.standby = true;
        self.env("FERRYMQ_POSTGRES__STANDBY", "true")
    }

    pub fn config(mut self, toml: impl Into<String>) -> BrokerOptions {
        self.config = Some(toml.into());
        self
    }

    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> BrokerOptions {
        self.env.push((key.into(), value.into()));
        self
    }

    pub fn binary(mut self, path: impl Into<PathBuf>) -> BrokerOptions {
        self.binary = Some(path.into());
        self
    }
}

/// The workspace root (the parent of the `e2e` crate).
pub fn workspace_root() -> PathBuf {
    // The checkout being tested: cargo sets CARGO_MANIFEST_DIR for the test process. The path
    // compiled in is only a fallback: cargo may reuse this crate's artifact from another
    // checkout with the same target directory, and would then build (and test) that one.
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest.parent().unwrap_or(&manifest).to_path_buf()
}

/// The target directory: `CARGO_TARGET_DIR` when set, else `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                workspace_root().join(dir)
            }
        }
        None => workspace_root().join("target"),
    }
}

/// `FERRYMQ_BIN` when set, else `<target>/<profile>/ferrymq` where the profile is the one this
/// crate was built with (`debug` or `release`). Nothing is built here: run
/// `cargo build -p ferrymq-broker [--release]` first (the tests in `e2e/tests` do that themselves).
pub fn default_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os(BIN_ENV) {
        return PathBuf::from(bin);
    }
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    target_dir().join(profile).join("ferrymq")
}

/// `FERRYMQ_BIN` when set, else the release build of the broker, made once per test process
/// with `cargo build -p ferrymq-broker --release` (the command of the e2e tests and the
/// operator's broker tests, so one build serves them all; a debug build of the broker alone
/// would resolve features differently from a workspace test build and compile it once more).
pub fn release_binary() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os(BIN_ENV) {
            return PathBuf::from(bin);
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let started = Instant::now();
        let status = Command::new(cargo)
            .args(["build", "-p", "ferrymq-broker", "--release"])
            .current_dir(workspace_root())
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => panic!("cargo build -p ferrymq-broker --release failed: {s}"),
            Err(e) => panic!("running cargo build -p ferrymq-broker --release: {e}"),
        }
        println!("broker release build took {:?}", started.elapsed());
        target_dir().join("release").join("ferrymq")
    })
    .clone()
}

/// A free loopback port: bind 127.0.0.1:0, read the port, release it.
pub fn free_port() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    let addr = listener.local_addr().context("reading the bound port")?;
    drop(listener);
    Ok(addr)
}

/// A `ferrymq` child process with its own temporary data dir, loopback port, config file and log.
///
/// Dropping it kills the broker (SIGKILL). When the drop happens during a panic (a failed test),
/// the tail of the broker log is printed first.
pub struct BrokerProcess {
    opts: BrokerOptions,
    binary: PathBuf,
    dir: Option<tempfile::TempDir>,
    root: PathBuf,
    data_dir: PathBuf,
    config_path: Option<PathBuf>,
    log_path: PathBuf,
    addr: SocketAddr,
    http_addr: SocketAddr,
    child: Option<Child>,
    starts: u32,
    kills: u32,
}

impl BrokerProcess {
    /// Creates the temporary directory, writes the config, picks a free port and starts the broker.
    pub fn start(opts: BrokerOptions) -> anyhow::Result<BrokerProcess> {
        let binary = opts.binary.clone().unwrap_or_else(default_binary);
        if !binary.is_file() {
            bail!(
                "broker binary {} not found: run `cargo build -p ferrymq-broker` (add --release \
                 for release tests) or set {BIN_ENV}",
                binary.display()
            );
        }
        let dir = tempfile::Builder::new()
            .prefix(&format!("ferrymq-e2e-{}-", opts.name))
            .tempdir()
            .context("creating the temporary directory")?;
        let root = dir.path().to_path_buf();
        let data_dir = root.join("data");
        std::fs::create_dir_all(&data_dir).context("creating the data dir")?;
        let config_path = match &opts.config {
            Some(text) => {
                let path = root.join("ferrymq.toml");
                std::fs::write(&path, text).context("writing the config file")?;
                Some(path)
            }
            None => None,
        };
        let log_path = root.join("broker.log");
        let on_host = |addr: SocketAddr| match opts.host {
            Some(host) => SocketAddr::new(host, addr.port()),
            None => addr,
        };
        let addr = match opts.listen {
            Some(addr) => addr,
            None => on_host(free_port()?),
        };
        let mut http_addr = on_host(free_port()?);
        while http_addr.port() == addr.port() {
            http_addr = on_host(free_port()?);
        }
        let mut broker = BrokerProcess {
            opts,
            binary,
            dir: Some(dir),
            root,
            data_dir,
            config_path,
            log_path,
            addr,
            http_addr,
            child: None,
            starts: 0,
            kills: 0,
        };
        broker.spawn()?;
        Ok(broker)
    }

    /// Whether `/health/ready` answers 200 now.
    pub fn is_ready(&self) -> bool {
        http_status(self.http_addr, "/health/ready") == Some(200)
    }

    /// The address clients connect to (stays the same across restarts).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The HTTP endpoint (metrics, health, admin API); stays the same across restarts.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The config file the broker was started with, if any.
    pub fn config_path(&self) -> Option<&Path> {
        self.config_path.as_deref()
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Number of times the broker process was started (1 after [`BrokerProcess::start`]).
    pub fn starts(&self) -> u32 {
        self.starts
    }

    /// Number of SIGKILLs sent by [`BrokerProcess::kill_9`].
    pub fn kills(&self) -> u32 {
        self.kills
    }

    /// The operating system pid of the running broker.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Replaces the config file; the next [`BrokerProcess::restart`] reads it.
    pub fn set_config(&mut self, toml: &str) -> anyhow::Result<()> {
        let path = self.root.join("ferrymq.toml");
        std::fs::write(&path, toml).context("writing the config file")?;
        self.opts.config = Some(toml.to_string());
        self.config_path = Some(path);
        Ok(())
    }

    /// Whether the child is still running (reaps it when it has exited).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            bail!("the broker is already running");
        }
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .context("opening the broker log")?;
        self.starts += 1;
        writeln!(
            log,
            "==== ferrymq-e2e: start #{} of {} on {} ====",
            self.starts,
            self.binary.display(),
            self.addr
        )
        .context("writing the broker log")?;
        let mut cmd = match self.opts.wrapper.split_first() {
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(&self.binary);
                cmd
            }
            None => Command::new(&self.binary),
        };
        cmd.arg("--listen")
            .arg(self.addr.to_string())
            .arg("--data-dir")
            .arg(&self.data_dir)
            // Brokers started side by side must not fight over the default HTTP port.
            .arg("--http")
            .arg(self.http_addr.to_string());
        if let Some(path) = &self.config_path {
            cmd.arg("--config").arg(path);
        }
        // The broker reads FERRYMQ_* variables as configuration: keep the test's own variables
        // (FERRYMQ_BIN, FERRYMQ_E2E_SEED, ...) away from it.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("FERRYMQ_") {
                cmd.env_remove(&key);
            }
        }
        cmd.env(
            "FERRYMQ_LOG",
            std::env::var("FERRYMQ_E2E_LOG").unwrap_or_else(|_| "info".into()),
        );
        // A config file turns anonymous access off by default; these clients connect without
        // credentials (a test's own env can override it).
        cmd.env("FERRYMQ_AUTH__ALLOW_ANONYMOUS", "true");
        for (key, value) in &self.opts.env {
            cmd.env(key, value);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(
                log.try_clone().context("duplicating the log handle")?,
            ))
            .stderr(Stdio::from(log));
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {}", self.binary.display()))?;
        self.child = Some(child);
        if let Err(e) = self.wait_ready() {
            let tail = self.log_tail(40);
            return Err(e.context(format!("broker log tail:\n{tail}")));
        }
        Ok(())
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait().context("polling the broker")? {
                    self.child = None;
                    bail!("broker exited during startup: {status}");
                }
            }
            let probe = if self.opts.standby {
                self.http_addr
            } else {
                self.addr
            };
            if TcpStream::connect_timeout(&probe, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if started.elapsed() > self.opts.start_timeout {
                self.kill_child();
                bail!(
                    "broker did not accept TCP on {} within {:?}",
                    self.addr,
                    self.opts.start_timeout
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill_child(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        // Child::kill is SIGKILL on Unix.
        let _ = child.kill();
        child.wait().ok()
    }

    /// SIGKILL, then wait for the process to be gone. No shutdown code runs in the broker.
    pub fn kill_9(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            bail!("kill_9: the broker is not running");
        };
        if let Ok(Some(status)) = child.try_wait() {
            bail!("kill_9: the broker had already exited: {status}");
        }
        child.kill().context("sending SIGKILL")?;
        child.wait().context("waiting for the killed broker")?;
        self.kills += 1;
        self.note(&format!("killed with SIGKILL (kill #{})", self.kills));
        Ok(())
    }

    /// Starts the broker again on the same port with the same data dir and config. The previous
    /// process must be gone ([`BrokerProcess::kill_9`] or [`BrokerProcess::stop`]).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        if self.is_running() {
            bail!("restart: the broker is still running; kill_9() or stop() it first");
        }
        self.child = None;
        if std::env::var(FAULT_ENV).is_ok_and(|v| v == "wipe") {
            eprintln!("{FAULT_ENV}=wipe: deleting the data dir before the restart");
            self.wipe_data_dir()?;
        }
        let deadline = Instant::now() + self.opts.start_timeout;
        // The port was ours a moment ago; retry briefly in case the kernel is still releasing it.
        loop {
            match self.spawn() {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() < deadline && self.log_tail(5).contains("in use") => {
                    eprintln!("restart: {e:#}; retrying");
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Deletes and recreates the (empty) data dir. The broker must not be running.
    pub fn wipe_data_dir(&mut self) -> anyhow::Result<()> {
        if self.is_running() {
            bail!("wipe_data_dir: the broker is running");
        }
        std::fs::remove_dir_all(&self.data_dir).context("removing the data dir")?;
        std::fs::create_dir_all(&self.data_dir).context("creating the data dir")?;
        Ok(())
    }

    /// SIGTERM, then wait (up to the stop timeout) for a graceful exit. Returns the exit status;
    /// an error when the broker had to be killed.
    pub fn stop(&mut self) -> anyhow::Result<ExitStatus> {
        let Some(mut child) = self.child.take() else {
            bail!("stop: the broker is not running");
        };
        let pid = libc::pid_t::try_from(child.id()).context("pid out of range")?;
        // SAFETY: kill(2) with a pid we spawned and have not reaped yet.
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            let _ = child.kill();
            let _ = child.wait();
            bail!("sending SIGTERM: {err}");
        }
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait().context("waiting for the broker")? {
                self.note(&format!("stopped with SIGTERM: {status}"));
                return Ok(status);
            }
            if started.elapsed() > self.opts.stop_timeout {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "broker did not exit within {:?} of SIGTERM; killed it",
                    self.opts.stop_timeout
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn note(&self, line: &str) {
        if let Ok(mut log) = OpenOptions::new().append(true).open(&self.log_path) {
            let _ = writeln!(log, "==== ferrymq-e2e: {line} ====");
        }
    }

    /// The last `lines` lines of the broker log (all starts).
    pub fn log_tail(&self, lines: usize) -> String {
        let Ok(mut file) = File::open(&self.log_path) else {
            return String::from("(no broker log)");
        };
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let from = len.saturating_sub(64 * 1024);
        if file.seek(SeekFrom::Start(from)).is_err() {
            return String::from("(broker log unreadable)");
        }
        let mut bytes = Vec::new();
        if file.read_to_end(&mut bytes).is_err() {
            return String::from("(broker log unreadable)");
        }
        let text = String::from_utf8_lossy(&bytes);
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Keeps the temporary directory after drop and returns its path.
    pub fn keep_dir(&mut self) -> PathBuf {
        if let Some(dir) = self.dir.take() {
            let _ = dir.keep();
        }
        self.root.clone()
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        self.kill_child();
        if std::thread::panicking() {
            eprintln!(
                "---- ferrymq broker log tail ({}) ----\n{}\n---- end of broker log ----",
                self.log_path.display(),
                self.log_tail(60)
            );
        }
        if std::env::var(KEEP_ENV).is_ok_and(|v| v == "1") {
            let root = self.keep_dir();
            eprintln!("ferrymq-e2e: kept {}", root.display());
        }
    }
}

/// The status of a plain HTTP/1.0 GET of `path` (`None`: no answer within 2 s).
pub fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_whitespace().nth(1)?.parse().ok()
}
