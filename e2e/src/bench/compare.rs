//! `compare`: every scenario against every broker, alternating, several rounds; and `smoke`:
//! every scenario briefly against ferrymq, failing on errors or forbidden loss.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::Context;

use super::brokers::{self, BrokerSpec, Kind, StartOpts};
use super::conns::{self, ConnResult};
use super::report;
use super::run::{self, RunResult};
use super::scenario::Scenario;

pub struct CompareOpts {
    pub brokers: Vec<BrokerSpec>,
    pub scenarios: Vec<Scenario>,
    pub rounds: usize,
    pub conns: usize,
    pub conn_concurrency: usize,
    pub out_md: Option<PathBuf>,
    pub out_json: Option<PathBuf>,
    pub command: String,
}

fn machine_description() -> String {
    let sh = |cmd: &str| {
        Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let tmp = std::env::temp_dir().display().to_string();
    format!(
        "$ nproc\n{}\n$ lscpu | head -n 15\n{}\n$ uname -sr\n{}\n$ free -m | head -n 2\n{}\n$ ulimit -n; ulimit -Hn\n{}\n{}\n$ df -T {tmp}   # brokers' data directories\n{}",
        sh("nproc"),
        sh("lscpu | head -n 15"),
        sh("uname -sr"),
        sh("free -m | head -n 2"),
        super::procstat::raise_nofile_limit(),
        sh("ulimit -Hn"),
        sh(&format!("df -T {tmp}")),
    )
}

pub async fn compare(opts: CompareOpts) -> anyhow::Result<()> {
    let mut results: Vec<RunResult> = Vec::new();
    let mut conn_results: Vec<ConnResult> = Vec::new();
    let n = opts.brokers.len();
    println!("{}", report::header());
    for round in 0..opts.rounds {
        for (si, sc) in opts.scenarios.iter().enumerate() {
            // Alternate who goes first so that no broker always runs on a warmer or colder box.
            for k in 0..n {
                let spec = &opts.brokers[(k + round + si) % n];
                let r = run_once(spec, sc).await;
                println!("{}", report::line(&r));
                if let Some(ack) = report::ack_line(&r) {
                    println!("{ack}");
                }
                if let Some(e) = &r.first_error {
                    println!("    first error: {e}");
                }
                results.push(r);
            }
        }
    }
    if opts.conns > 0 {
        for spec in &opts.brokers {
            let c = match brokers::start(spec, &StartOpts::default()) {
                Ok(mut b) => {
                    let c = conns::connection_scale(
                        b.addr,
                        spec.kind.name(),
                        opts.conns,
                        opts.conn_concurrency,
                        Some(b.pid()),
                        Duration::from_secs(2),
                        false,
                    )
                    .await;
                    if !b.alive() {
                        eprintln!("{} died during the connection test", spec.kind.name());
                    }
                    c
                }
                Err(e) => ConnResult {
                    broker: spec.kind.name().into(),
                    first_error: Some(format!("{e:#}")),
                    ..ConnResult::default()
                },
            };
            println!("{}", report::conn_line(&c));
            conn_results.push(c);
            // Let the kernel retire the sockets (TIME_WAIT) before the next broker.
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }

    let versions: Vec<(String, String)> = opts
        .brokers
        .iter()
        .map(|b| (b.kind.name().to_string(), b.version()))
        .collect();
    if let Some(path) = &opts.out_json {
        let json = serde_json::json!({
            "versions": versions,
            "scenarios": opts.scenarios,
            "runs": results,
            "connections": conn_results,
        });
        std::fs::write(path, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    if let Some(path) = &opts.out_md {
        let names: Vec<String> = opts
            .brokers
            .iter()
            .map(|b| b.kind.name().to_string())
            .collect();
        let dur = opts
            .scenarios
            .first()
            .map(|s| s.duration.as_secs_f64())
            .unwrap_or(0.0);
        let settings = format!(
            "{} round(s); {dur:.0} s of load per scenario per broker; each run starts a fresh broker \
             process with a fresh data directory (ferrymq `--data-dir`, Mosquitto \
             `persistence_location`); brokers take turns (the first broker rotates per scenario \
             and round); connection test: {} connections asked, {} connecting at once, 1 round.",
            opts.rounds, opts.conns, opts.conn_concurrency
        );
        let section = report::markdown(&report::MarkdownInput {
            machine: &machine_description(),
            command: &opts.command,
            settings: &settings,
            versions: &versions,
            scenarios: &opts.scenarios,
            brokers: &names,
            results: &results,
            conns: &conn_results,
        });
        let doc = std::fs::read_to_string(path).unwrap_or_default();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).ok();
        }
        std::fs::write(path, report::splice(&doc, &section))
            .with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// One scenario against a fresh broker process. Failures become an error row, never a panic.
async fn run_once(spec: &BrokerSpec, sc: &Scenario) -> RunResult {
    let failed = |e: anyhow::Error| RunResult {
        scenario: sc.name.clone(),
        broker: spec.kind.name().into(),
        errors: 1,
        first_error: Some(format!("{e:#}")),
        ..RunResult::default()
    };
    // A fresh process and a fresh data directory for every run.
    let mut b = match brokers::start(spec, &StartOpts::for_scenarios([sc])) {
        Ok(b) => b,
        Err(e) => return failed(e),
    };
    let limit = sc.duration + Duration::from_secs(90);
    let r = tokio::time::timeout(
        limit,
        run::run_scenario(b.addr, sc, spec.kind.name(), Some(b.pid())),
    )
    .await;
    let mut r = match r {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => failed(e),
        Err(_) => failed(anyhow::anyhow!("run did not finish within {limit:?}")),
    };
    if !b.alive() {
        r.errors += 1;
        r.first_error
            .get_or_insert_with(|| "the broker process died".into());
    }
    r.store_bytes = Some(b.data_bytes());
    r
}

/// Every scenario for `secs` against one ferrymq process, plus a small connection test.
/// Returns whether everything passed.
///
/// QoS 1/2 loss always fails a paced (open-loop) scenario. In a closed-loop scenario it is the
/// broker's documented full-queue policy (drop and count) under overload: a warning, unless
/// `strict`.
pub async fn smoke(
    bin: PathBuf,
    scenarios: Vec<Scenario>,
    conns: usize,
    strict: bool,
) -> anyhow::Result<bool> {
    let spec = BrokerSpec {
        kind: Kind::Ferrymq,
        bin,
    };
    let mut broker = brokers::start(&spec, &StartOpts::for_scenarios(&scenarios))?;
    let mut ok = true;
    println!("{}", report::header());
    for sc in &scenarios {
        let r = match tokio::time::timeout(
            sc.duration + Duration::from_secs(60),
            run::run_scenario(broker.addr, sc, "ferrymq", Some(broker.pid())),
        )
        .await
        {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                println!("{:<24} FAILED: {e:#}", sc.name);
                ok = false;
                continue;
            }
            Err(_) => {
                println!("{:<24} FAILED: did not finish", sc.name);
                ok = false;
                continue;
            }
        };
        println!("{}", report::line(&r));
        if let Some(ack) = report::ack_line(&r) {
            println!("{ack}");
        }
        // Persistent scenarios must go through the durable store: QoS 1/2 to a persistent
        // session is written (and fsynced) before PUBACK, so the broker must have written.
        if sc.persistent() && sc.qos > 0 {
            let wrote = r.broker_disk_write_bytes.unwrap_or(0);
            let store = broker
                .data_dir()
                .join(brokers::FERRYMQ_STORE_FILE)
                .metadata()
                .map(|m| m.len())
                .unwrap_or(0);
            println!(
                "    durable path: broker wrote {:.1} MiB during the run, {} is {:.1} MiB",
                wrote as f64 / 1048576.0,
                brokers::FERRYMQ_STORE_FILE,
                store as f64 / 1048576.0
            );
            if wrote == 0 || store == 0 {
                println!("    FAILED: the persistent scenario did not write the durable store");
                ok = false;
            }
        }
        let overflow = r.errors == 0 && r.lost > 0 && sc.overload() && !strict;
        if overflow && !sc.loss_allowed() {
            println!(
                "    WARNING: lost {} of {} QoS {} deliveries under closed-loop overload \
                 (full subscriber queue); --strict makes this a failure",
                r.lost, r.expected, sc.qos
            );
        } else if !r.ok(sc.loss_allowed()) || !broker.alive() {
            println!(
                "    FAILED: lost {} of {} (loss {}allowed), {} errors{}",
                r.lost,
                r.expected,
                if sc.loss_allowed() { "" } else { "not " },
                r.errors,
                r.first_error
                    .as_ref()
                    .map(|e| format!(", first: {e}"))
                    .unwrap_or_default()
            );
            ok = false;
        }
    }
    if conns > 0 {
        let c = conns::connection_scale(
            broker.addr,
            "ferrymq",
            conns,
            64,
            Some(broker.pid()),
            Duration::from_millis(200),
            false,
        )
        .await;
        println!("{}", report::conn_line(&c));
        if c.connected < c.target || !broker.alive() {
            println!("    FAILED: connection test");
            ok = false;
        }
    }
    Ok(ok)
}
