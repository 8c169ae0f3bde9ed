//! `ferrymq-bench`: MQTT load generator and broker comparison. See docs/benchmarks.md.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use ferrymq_e2e::bench::brokers::{self, BrokerSpec, Kind};
use ferrymq_e2e::bench::scenario::{self, Layout, Scenario};
use ferrymq_e2e::bench::{compare, conns, isolation, report, run};

#[derive(Debug, Parser)]
#[command(
    name = "ferrymq-bench",
    version,
    about = "MQTT load generator: ferrymq vs Mosquitto vs rumqttd"
)]
struct Cli {
    /// Tokio worker threads of the load generator.
    #[arg(long, global = true, default_value_t = 2)]
    threads: usize,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// List the named scenarios of the suite.
    List,
    /// Run scenarios against a broker that is already running.
    Run(RunArgs),
    /// Idle-connection scale test against a running broker.
    Conns {
        #[arg(long, default_value = "127.0.0.1:1883")]
        addr: SocketAddr,
        #[arg(long, default_value_t = 100_000)]
        count: usize,
        #[arg(long, default_value_t = 256)]
        concurrency: usize,
        /// Broker pid, for RSS per connection.
        #[arg(long)]
        broker_pid: Option<u32>,
        /// Each connection also subscribes to its own `devices/<n>/cmd` (QoS 1), so the RSS
        /// per connection includes one subscription.
        #[arg(long)]
        subscribe: bool,
    },
    /// CI smoke test: start ferrymq, run every scenario for a few seconds, fail on errors or on
    /// loss where loss is not allowed.
    Smoke {
        #[arg(long, value_name = "PATH")]
        broker_bin: PathBuf,
        /// Seconds of load per scenario.
        #[arg(long, default_value_t = 2.0)]
        secs: f64,
        /// Idle connections for the connection test (0 = skip).
        #[arg(long, default_value_t = 1000)]
        conns: usize,
        /// Also fail on QoS 1/2 loss in closed-loop (overload) scenarios.
        #[arg(long)]
        strict: bool,
    },
    /// Client isolation: well-behaved publishers and subscribers, first alone, then next to
    /// bad neighbours (Receive Maximum 1 subscribers that never ack, subscribers that stop
    /// reading, clients vanishing mid-handshake, overlapping `#` QoS 2 subscriptions, client id
    /// takeovers); prints the well-behaved ack latency (PUBACK, PUBREC, SUBACK) of both runs and
    /// fails when an ack waited longer than `--bound-ms`.
    Isolation(IsolationArgs),
    /// Start each broker in turn, run every scenario against each (alternating, several rounds),
    /// write medians and ratios to markdown and JSON.
    Compare(CompareArgs),
    /// Start 1, 2, 3… active ferrymq nodes on one Kafka and PostgreSQL (started here) and run
    /// scenarios with every delivery crossing nodes (publisher i on node i % n, subscriber i on
    /// node (i + 1) % n); prints throughput, latency and deliveries per core of broker CPU.
    Cluster {
        #[arg(long, value_name = "PATH")]
        ferrymq_bin: PathBuf,
        /// Node counts to measure (repeat or comma-separate).
        #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
        nodes: Vec<usize>,
        /// Named scenarios (repeat or comma-separate).
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "pairs10-qos1-64b,pairs10-qos1-persistent"
        )]
        scenario: Vec<String>,
        /// Seconds of load per run.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        #[arg(long, default_value_t = 1)]
        rounds: usize,
    },
}

#[derive(Debug, Args)]
struct RunArgs {
    #[arg(long, default_value = "127.0.0.1:1883")]
    addr: SocketAddr,
    /// Publishers connect here instead of `--addr`, round-robin (repeat or comma-separate):
    /// nodes of one cluster.
    #[arg(long, value_delimiter = ',')]
    pub_addr: Vec<SocketAddr>,
    /// Subscribers connect here instead of `--addr`, round-robin.
    #[arg(long, value_delimiter = ',')]
    sub_addr: Vec<SocketAddr>,
    /// Broker pid: enables broker CPU and peak RSS.
    #[arg(long)]
    broker_pid: Option<u32>,
    /// Label for the report.
    #[arg(long, default_value = "broker")]
    broker: String,
    /// Named scenario(s) from `list` (repeat or comma-separate); `all` for the whole suite.
    /// Without it, a custom scenario from the flags below.
    #[arg(long, value_delimiter = ',')]
    scenario: Vec<String>,
    /// Seconds of load.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    #[arg(long, default_value_t = 1)]
    pubs: usize,
    #[arg(long, default_value_t = 1)]
    subs: usize,
    #[arg(long, value_enum, default_value_t = Layout::Pairs)]
    layout: Layout,
    #[arg(long, default_value_t = 1)]
    qos: u8,
    /// Payload bytes (at least 24: the stamp).
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Messages/s per publisher (open loop). Without it: closed loop, as fast as possible.
    #[arg(long)]
    rate: Option<f64>,
    /// QoS 1/2 messages in flight per publisher.
    #[arg(long, default_value_t = 20)]
    window: usize,
    /// Subscribers use clean_session=false.
    #[arg(long)]
    persistent: bool,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct IsolationArgs {
    #[arg(long, default_value = "127.0.0.1:1883")]
    addr: SocketAddr,
    /// The broker's HTTP endpoint, for the queue gauges on /metrics.
    #[arg(long)]
    http: Option<SocketAddr>,
    /// Seconds of load per run (one run without, one with bad neighbours).
    #[arg(long, default_value_t = 120.0)]
    duration: f64,
    /// Well-behaved publishers.
    #[arg(long, default_value_t = 4)]
    pubs: usize,
    /// Well-behaved subscribers.
    #[arg(long, default_value_t = 2)]
    subs: usize,
    /// Messages/s per well-behaved publisher.
    #[arg(long, default_value_t = 50.0)]
    rate: f64,
    /// Bad neighbours of each kind.
    #[arg(long, default_value_t = 2)]
    bad: usize,
    /// Fail when a well-behaved ack waited longer (the broker's `slow_subscriber_wait_ms` plus
    /// slack).
    #[arg(long, default_value_t = 2500)]
    bound_ms: u64,
    /// Fail when `ferrymq_queued_messages_max` exceeded this (`limits.max_queued_messages`).
    #[arg(long)]
    max_queued: Option<u64>,
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct CompareArgs {
    #[arg(long, value_name = "PATH", default_value = "target/release/ferrymq")]
    ferrymq_bin: PathBuf,
    /// Default: `mosquitto` on PATH or /usr/sbin.
    #[arg(long, value_name = "PATH")]
    mosquitto_bin: Option<PathBuf>,
    /// Default: `rumqttd` on PATH or ~/.cargo/bin.
    #[arg(long, value_name = "PATH")]
    rumqttd_bin: Option<PathBuf>,
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "ferrymq,mosquitto,rumqttd"
    )]
    brokers: Vec<Kind>,
    /// Named scenarios (comma-separated); default: the whole suite.
    #[arg(long, value_delimiter = ',')]
    scenarios: Vec<String>,
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds of load per scenario run.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Idle connections for the scale test (capped by the open-file limit; 0 = skip).
    #[arg(long, default_value_t = 100_000)]
    conns: usize,
    #[arg(long, default_value_t = 256)]
    conn_concurrency: usize,
    /// Markdown file whose generated section is replaced.
    #[arg(long, default_value = "docs/benchmarks.md")]
    out: PathBuf,
    #[arg(long)]
    json: Option<PathBuf>,
}

fn pick(names: &[String], duration: Duration) -> anyhow::Result<Vec<Scenario>> {
    let suite = scenario::suite(duration);
    if names.is_empty() || names.iter().any(|n| n == "all") {
        return Ok(suite);
    }
    names
        .iter()
        .map(|n| {
            suite
                .iter()
                .find(|s| &s.name == n)
                .cloned()
                .with_context(|| format!("no scenario named {n}; see `ferrymq-bench list`"))
        })
        .collect()
}

fn secs(s: f64) -> anyhow::Result<Duration> {
    if !(s.is_finite() && s > 0.0) {
        bail!("durations must be positive");
    }
    Ok(Duration::from_secs_f64(s))
}

async fn main_async(cli: Cli) -> anyhow::Result<bool> {
    match cli.cmd {
        Cmd::List => {
            for s in scenario::suite(Duration::from_secs(10)) {
                println!("{:<24} {}", s.name, s.description);
            }
            Ok(true)
        }
        Cmd::Run(a) => {
            let duration = secs(a.duration)?;
            let scenarios = if a.scenario.is_empty() {
                vec![Scenario {
                    name: "custom".into(),
                    description: "from the command line".into(),
                    publishers: a.pubs,
                    subscribers: a.subs,
                    layout: a.layout,
                    qos: a.qos,
                    payload: a.payload,
                    rate: a.rate,
                    window: a.window,
                    clean_subscribers: !a.persistent,
                    application: false,
                    duration,
                }]
            } else {
                pick(&a.scenario, duration)?
            };
            println!("{}", report::header());
            let mut all = Vec::new();
            let mut ok = true;
            for sc in &scenarios {
                let or_addr = |list: &Vec<SocketAddr>| {
                    if list.is_empty() {
                        vec![a.addr]
                    } else {
                        list.clone()
                    }
                };
                let (pubs, subs) = (or_addr(&a.pub_addr), or_addr(&a.sub_addr));
                let r = run::run_scenario_at(&pubs, &subs, sc, &a.broker, a.broker_pid).await?;
                println!("{}", report::line(&r));
                if let Some(ack) = report::ack_line(&r) {
                    println!("{ack}");
                }
                if let Some(e) = &r.first_error {
                    println!("    first error: {e}");
                }
                ok &= r.ok(sc.loss_allowed());
                all.push(r);
            }
            if let Some(path) = a.json {
                let json = serde_json::json!({ "scenarios": scenarios, "runs": all });
                std::fs::write(&path, serde_json::to_string_pretty(&json)?)?;
            }
            Ok(ok)
        }
        Cmd::Conns {
            addr,
            count,
            concurrency,
            broker_pid,
            subscribe,
        } => {
            let c = conns::connection_scale(
                addr,
                "broker",
                count,
                concurrency,
                broker_pid,
                Duration::from_secs(2),
                subscribe,
            )
            .await;
            println!("{}", report::conn_line(&c));
            println!("{}", serde_json::to_string_pretty(&c)?);
            Ok(c.connected == c.target)
        }
        Cmd::Smoke {
            broker_bin,
            secs: s,
            conns,
            strict,
        } => {
            let scenarios = scenario::suite(secs(s)?);
            let ok = compare::smoke(broker_bin, scenarios, conns, strict).await?;
            println!("smoke: {}", if ok { "PASSED" } else { "FAILED" });
            Ok(ok)
        }
        Cmd::Isolation(a) => {
            let duration = secs(a.duration)?;
            let run_id = format!("{}", std::process::id());
            let mut reports = Vec::new();
            let mut ok = true;
            for bad in [false, true] {
                let mut opts = isolation::Options::new(
                    format!("{run_id}-{}", if bad { "bad" } else { "alone" }),
                    duration,
                );
                opts.publishers = a.pubs;
                opts.subscribers = a.subs;
                opts.rate = a.rate;
                opts.bad_neighbours = bad;
                opts.bad_per_kind = a.bad;
                opts.metrics = a.http;
                let r = isolation::run(a.addr, &opts).await?;
                println!(
                    "{} bad neighbours:\n{}\n",
                    if bad { "with" } else { "without" },
                    r.lines()
                );
                if r.all.max() > Duration::from_millis(a.bound_ms) {
                    println!(
                        "FAILED: an ack waited {:?} > {} ms",
                        r.all.max(),
                        a.bound_ms
                    );
                    ok = false;
                }
                if let (Some(limit), Some(seen)) = (a.max_queued, r.queued_max) {
                    if seen > limit {
                        println!("FAILED: a session queue held {seen} > {limit}");
                        ok = false;
                    }
                }
                reports.push(serde_json::json!({ "bad_neighbours": bad, "report": r }));
            }
            if let Some(path) = a.json {
                std::fs::write(&path, serde_json::to_string_pretty(&reports)?)?;
            }
            Ok(ok)
        }
        Cmd::Cluster {
            ferrymq_bin,
            nodes,
            scenario,
            duration,
            rounds,
        } => {
            let results =
                ferrymq_e2e::bench::cluster::cluster(ferrymq_e2e::bench::cluster::ClusterOpts {
                    bin: ferrymq_bin,
                    nodes,
                    scenarios: pick(&scenario, secs(duration)?)?,
                    rounds,
                })
                .await?;
            Ok(results.iter().all(|r| r.run.errors == 0))
        }
        Cmd::Compare(a) => {
            let duration = secs(a.duration)?;
            let mut specs = Vec::new();
            for kind in &a.brokers {
                let bin = match kind {
                    Kind::Ferrymq | Kind::FerrymqKafka => Some(a.ferrymq_bin.clone()),
                    Kind::Mosquitto => a
                        .mosquitto_bin
                        .clone()
                        .or_else(|| brokers::find_bin("mosquitto")),
                    Kind::Rumqttd => a
                        .rumqttd_bin
                        .clone()
                        .or_else(|| brokers::find_bin("rumqttd")),
                };
                let bin = bin.with_context(|| {
                    format!("{} not found; pass --{}-bin", kind.name(), kind.name())
                })?;
                specs.push(BrokerSpec { kind: *kind, bin });
            }
            let command = std::env::var("FERRYMQ_BENCH_COMMAND")
                .unwrap_or_else(|_| std::env::args().collect::<Vec<_>>().join(" "));
            compare::compare(compare::CompareOpts {
                brokers: specs,
                scenarios: pick(&a.scenarios, duration)?,
                rounds: a.rounds.max(1),
                conns: a.conns,
                conn_concurrency: a.conn_concurrency,
                out_md: Some(a.out),
                out_json: a.json,
                command,
            })
            .await?;
            Ok(true)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.threads.max(1))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ferrymq-bench: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(main_async(cli)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("ferrymq-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
