//! The real services the Kafka + PostgreSQL backend needs, started per test: an Apache Kafka
//! broker (single-node KRaft, from the jars `e2e/services/kafka/install.sh` caches) and a
//! private PostgreSQL cluster, each in a temporary directory on free loopback ports and killed
//! when dropped.
//!
//! Tests that need them call [`require_services`] first: on a machine without Kafka's jars, Java or the
//! PostgreSQL server binaries the test is skipped with a message, unless
//! `FERRYMQ_REQUIRE_SERVICES=1` (set by `.ci/run`), where a missing service fails the test.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::process::free_port;

/// `1` makes a missing service a test failure instead of a skip.
pub const REQUIRE_ENV: &str = "FERRYMQ_REQUIRE_SERVICES";
/// Overrides the PostgreSQL server binary directory (`initdb`, `postgres`, `pg_ctl`).
pub const PG_BIN_ENV: &str = "FERRYMQ_PG_BIN";

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
    if kafka_libs().is_none() {
        missing.push("Apache Kafka's jars (bash e2e/services/kafka/install.sh)");
    }
    if java_binary().is_none() {
        missing.push("java 17 or newer (apt-get install openjdk-17-jre-headless)");
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

/// A single-node Apache Kafka broker (KRaft, broker and controller roles in one JVM) on free
/// loopback ports, with its log dir in a temporary directory. Dropping it kills the JVM.
///
/// [`Kafka::stop`] and [`Kafka::start_again`] take it down and bring it back on the same ports
/// and log dir, as an outage or a crash of a real cluster would.
pub struct Kafka {
    child: Option<Child>,
    java: PathBuf,
    libs: PathBuf,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

/// Times [`Kafka::start`] tries afresh when Kafka finds a port taken.
const KAFKA_START_ATTEMPTS: u32 = 3;

impl Kafka {
    /// Starts a fresh single-node Kafka on free loopback ports. The ports are picked before the
    /// JVM binds them, seconds later; on a busy machine another process (any outgoing
    /// connection takes an ephemeral port) can take one in between. Kafka then exits with
    /// "Address already in use", and this starts over with new ports and a new directory.
    pub fn start() -> anyhow::Result<Kafka> {
        Kafka::start_on(Ipv4Addr::LOCALHOST.into())
    }

    /// [`Kafka::start`] with the client listener bound to and advertised as `host` (a local
    /// address of this machine) instead of loopback; the controller stays on loopback.
    pub fn start_on(host: IpAddr) -> anyhow::Result<Kafka> {
        let mut attempt = 1;
        loop {
            match Kafka::start_once(host) {
                Err(e)
                    if attempt < KAFKA_START_ATTEMPTS
                        && format!("{e:#}").contains("Address already in use") =>
                {
                    eprintln!("kafka: a port was taken during start-up, starting again");
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    fn start_once(host: IpAddr) -> anyhow::Result<Kafka> {
        let libs =
            kafka_libs().context("Kafka jars not found (bash e2e/services/kafka/install.sh)")?;
        let java = java_binary().context("java not found")?;
        let dir = tempfile::Builder::new()
            .prefix("ferrymq-kafka-")
            .tempdir()?;
        let addr = SocketAddr::new(host, free_port()?.port());
        let controller = free_port()?;
        let logs = dir.path().join("logs");
        std::fs::write(
            dir.path().join("server.properties"),
            server_properties(addr, controller, &logs),
        )?;
        std::fs::write(dir.path().join("log4j2.properties"), LOG4J2_PROPERTIES)?;
        let format = Command::new(&java)
            .args(JVM_OPTS)
            .arg("-cp")
            .arg(libs.join("*"))
            .arg(log4j_config(dir.path()))
            .args(["kafka.tools.StorageTool", "format"])
            .args(["-t", KAFKA_CLUSTER_ID, "-c"])
            .arg(dir.path().join("server.properties"))
            .stdout(Stdio::null())
            .output()
            .context("running kafka.tools.StorageTool format")?;
        if !format.status.success() {
            bail!(
                "kafka-storage format failed: {}",
                String::from_utf8_lossy(&format.stderr)
            );
        }
        let mut kafka = Kafka {
            child: None,
            java,
            libs,
            addr,
            dir,
        };
        kafka.spawn()?;
        Ok(kafka)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let log_path = self.dir.path().join("kafka.log");
        // Each (re)start appends to the same log: wait for one more "started" line than now.
        let starts_before = count_in(&log_path, KAFKA_STARTED);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let mut child = Command::new(&self.java)
            .args(JVM_OPTS)
            .arg("-cp")
            .arg(self.libs.join("*"))
            .arg(log4j_config(self.dir.path()))
            .arg("kafka.Kafka")
            .arg(self.dir.path().join("server.properties"))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .context("starting kafka.Kafka")?;
        if let Err(e) = wait_until_logged(&log_path, starts_before, &mut child) {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{e:#}\n{}", self.log_tail());
        }
        self.child = Some(child);
        Ok(())
    }

    /// `host:port` for `kafka.bootstrap_servers`.
    pub fn bootstrap(&self) -> String {
        self.addr.to_string()
    }

    /// Freezes the JVM (SIGSTOP): connections stay open but nothing answers, as in a network
    /// partition.
    pub fn freeze(&self) -> anyhow::Result<()> {
        signal(self.pid()?, "-STOP")
    }

    pub fn thaw(&self) -> anyhow::Result<()> {
        signal(self.pid()?, "-CONT")
    }

    /// Kills the JVM (SIGKILL): a crash. The log dir stays for [`Kafka::start_again`].
    pub fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            let _ = signal(child.id(), "-CONT");
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Starts the broker again on the same ports and log dir.
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        self.kill()?;
        self.spawn()
    }

    fn pid(&self) -> anyhow::Result<u32> {
        self.child
            .as_ref()
            .map(Child::id)
            .context("kafka is not running")
    }

    pub fn log_tail(&self) -> String {
        tail(&self.dir.path().join("kafka.log"), 30)
    }

    /// The broker's `log.dirs`: one directory per topic partition, holding its segment files.
    pub fn log_dir(&self) -> PathBuf {
        self.dir.path().join("logs")
    }
}

impl Drop for Kafka {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// The Kafka version `e2e/services/kafka/install.sh` fetches; change both together.
pub const KAFKA_VERSION: &str = "4.4.0";
/// Overrides the directory holding the Kafka broker's jars.
pub const KAFKA_LIBS_ENV: &str = "FERRYMQ_KAFKA_LIBS";
/// Overrides the `java` that runs it (17 or newer).
pub const JAVA_ENV: &str = "FERRYMQ_JAVA";

/// Any fixed id will do (a base64 UUID): every test broker is a cluster of its own.
const KAFKA_CLUSTER_ID: &str = "ZmVycnltcS10ZXN0LWthZg";
/// A JVM start on a busy 2-core machine takes 5-30 s.
const KAFKA_START_TIMEOUT: Duration = Duration::from_secs(120);
/// What `kafka.Kafka` logs once the broker serves requests.
const KAFKA_STARTED: &str = "[KafkaRaftServer nodeId=1] Kafka Server started";
/// A small heap: the tests write megabytes, not gigabytes.
const JVM_OPTS: &[&str] = &["-Xms64m", "-Xmx512m", "-Djava.awt.headless=true"];

const LOG4J2_PROPERTIES: &str = "\
status = warn
appender.file.type = Console
appender.file.name = OUT
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = info
rootLogger.appenderRef.out.ref = OUT
logger.kafka.name = kafka
logger.kafka.level = info
logger.apache.name = org.apache.kafka
logger.apache.level = warn
";

/// The port opens before the broker has caught up with its metadata log and registered with the
/// controller, and requests fail until then; the "started" log line says it is serving.
fn wait_until_logged(log: &Path, starts_before: usize, child: &mut Child) -> anyhow::Result<()> {
    let deadline = Instant::now() + KAFKA_START_TIMEOUT;
    loop {
        if count_in(log, KAFKA_STARTED) > starts_before {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            bail!("kafka exited during start-up: {status}");
        }
        if Instant::now() > deadline {
            bail!("kafka did not log \"{KAFKA_STARTED}\" within {KAFKA_START_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn count_in(path: &Path, needle: &str) -> usize {
    std::fs::read_to_string(path)
        .map(|t| t.matches(needle).count())
        .unwrap_or(0)
}

fn log4j_config(dir: &Path) -> String {
    format!(
        "-Dlog4j2.configurationFile={}",
        dir.join("log4j2.properties").display()
    )
}

/// A single-node KRaft cluster. Replication factor 1 for the internal topics (one broker), no
/// initial rebalance delay (tests join groups all the time), and no fsync beyond Kafka's
/// default (it relies on replication, not fsync; a SIGKILL of the JVM keeps the page cache).
fn server_properties(addr: SocketAddr, controller: SocketAddr, logs: &Path) -> String {
    format!(
        "process.roles=broker,controller
node.id=1
controller.quorum.voters=1@{controller}
listeners=PLAINTEXT://{addr},CONTROLLER://{controller}
advertised.listeners=PLAINTEXT://{addr}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs={logs}
num.partitions=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
",
        logs = logs.display()
    )
}

/// The broker's jars: `FERRYMQ_KAFKA_LIBS`, else where `install.sh` caches them.
pub fn kafka_libs() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(KAFKA_LIBS_ENV) {
        return Some(PathBuf::from(p));
    }
    let cache = match std::env::var_os("FERRYMQ_CACHE") {
        Some(c) => PathBuf::from(c),
        None => Path::new(&std::env::var_os("HOME")?).join(".cache/ferrymq"),
    };
    let libs = cache.join(format!("kafka-{KAFKA_VERSION}/lib"));
    libs.join(format!("kafka_2.13-{KAFKA_VERSION}.jar"))
        .is_file()
        .then_some(libs)
}

fn java_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(JAVA_ENV) {
        return Some(PathBuf::from(p));
    }
    if let Some(home) = std::env::var_os("JAVA_HOME") {
        let p = Path::new(&home).join("bin/java");
        if p.is_file() {
            return Some(p);
        }
    }
    which("java")
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
    /// The address in its URL; it listens there and on loopback.
    host: IpAddr,
    child: Option<Child>,
    /// Run the server as the `postgres` user (PostgreSQL refuses to run as root).
    as_postgres: bool,
}

impl Postgres {
    pub fn start() -> anyhow::Result<Postgres> {
        Postgres::start_on(Ipv4Addr::LOCALHOST.into(), None)
    }

    /// [`Postgres::start`] listening on `host` (a local address of this machine) as well as on
    /// loopback, its URL naming `host`, with trust authentication also for clients from the
    /// network `trust` (a CIDR such as `10.1.2.0/30`).
    pub fn start_on(host: IpAddr, trust: Option<&str>) -> anyhow::Result<Postgres> {
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
        if let Some(net) = trust {
            let hba = data.join("pg_hba.conf");
            let mut text = std::fs::read_to_string(&hba).context("reading pg_hba.conf")?;
            text.push_str(&format!("host all all {net} trust\n"));
            std::fs::write(&hba, text).context("writing pg_hba.conf")?;
        }
        let port = free_port()?.port();
        let mut pg = Postgres {
            bin,
            dir,
            port,
            host,
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
            .arg("-c")
            .arg(if self.host.is_loopback() {
                "listen_addresses=127.0.0.1".to_string()
            } else {
                format!("listen_addresses=127.0.0.1,{}", self.host)
            })
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

    /// `postgres://postgres@127.0.0.1:<port>/postgres` (the host of [`Postgres::start_on`])
    pub fn url(&self) -> String {
        self.url_for("postgres")
    }

    /// The URL of another database of the cluster.
    pub fn url_for(&self, database: &str) -> String {
        let addr = SocketAddr::new(self.host, self.port);
        format!("postgres://postgres@{addr}/{database}")
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
    pub kafka: Kafka,
    pub postgres: Postgres,
}

impl Services {
    pub fn start() -> anyhow::Result<Services> {
        Ok(Services {
            kafka: Kafka::start()?,
            postgres: Postgres::start()?,
        })
    }

    /// Both services reachable at `host`, a local address of this machine other than loopback
    /// (for brokers in another network namespace): Kafka bound to and advertised as `host`,
    /// PostgreSQL listening there too and trusting clients from the network `trust`.
    pub fn start_on(host: IpAddr, trust: &str) -> anyhow::Result<Services> {
        Ok(Services {
            kafka: Kafka::start_on(host)?,
            postgres: Postgres::start_on(host, Some(trust))?,
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
