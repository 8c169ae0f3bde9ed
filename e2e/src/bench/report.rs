//! Human tables and the markdown written into docs/benchmarks.md.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::conns::ConnResult;
use super::run::RunResult;
use super::scenario::Scenario;

pub fn fmt_rate(r: f64) -> String {
    if r >= 1e6 {
        format!("{:.2} M", r / 1e6)
    } else if r >= 1e3 {
        format!("{:.1} k", r / 1e3)
    } else {
        format!("{r:.0}")
    }
}

pub fn fmt_us(us: f64) -> String {
    if us >= 1000.0 {
        format!("{:.1} ms", us / 1000.0)
    } else {
        format!("{us:.0} µs")
    }
}

pub fn header() -> String {
    format!(
        "{:<24} {:<10} {:>10} {:>10} {:>10} {:>8} {:>6} {:>6} {:>9} {:>9} {:>9} {:>9} {:>6} {:>8} {:>6}",
        "scenario", "broker", "sent", "recv", "deliv/s", "lost", "dup", "err", "p50", "p99",
        "p99.9", "max", "bCPU", "bRSS", "gCPU"
    )
}

pub fn line(r: &RunResult) -> String {
    format!(
        "{:<24} {:<10} {:>10} {:>10} {:>10} {:>8} {:>6} {:>6} {:>9} {:>9} {:>9} {:>9} {:>6} {:>8} {:>6}",
        r.scenario,
        r.broker,
        r.sent,
        r.received,
        fmt_rate(r.deliver_rate),
        r.lost,
        r.duplicates,
        r.errors,
        fmt_us(r.latency.p50_us),
        fmt_us(r.latency.p99_us),
        fmt_us(r.latency.p999_us),
        fmt_us(r.latency.max_us),
        r.broker_cpu.map(|c| format!("{c:.2}")).unwrap_or_else(|| "-".into()),
        r.broker_peak_rss_kib
            .map(|k| format!("{:.0}M", k as f64 / 1024.0))
            .unwrap_or_else(|| "-".into()),
        format!("{:.2}", r.bench_cpu),
    )
}

/// The publisher-side publish → PUBACK/PUBCOMP latency of a QoS 1/2 run, as an indented line.
pub fn ack_line(r: &RunResult) -> Option<String> {
    r.ack_latency.as_ref().map(|a| {
        format!(
            "    publish→ack: p50 {}  p99 {}  p99.9 {}  max {}  ({} acks)",
            fmt_us(a.p50_us),
            fmt_us(a.p99_us),
            fmt_us(a.p999_us),
            fmt_us(a.max_us),
            a.count
        )
    })
}

pub fn conn_line(c: &ConnResult) -> String {
    format!(
        "connections {:<10} {} of {} connected ({} failed) in {:.1} s = {}/s; broker RSS {} -> {} KiB = {} per connection{}",
        c.broker,
        c.connected,
        c.target,
        c.failed,
        c.connect_secs,
        fmt_rate(c.connects_per_sec),
        c.broker_rss_before_kib.unwrap_or(0),
        c.broker_rss_after_kib.unwrap_or(0),
        c.rss_per_conn_bytes
            .map(|b| format!("{:.1} KiB", b / 1024.0))
            .unwrap_or_else(|| "?".into()),
        c.first_error
            .as_ref()
            .map(|e| format!(" (first error: {e})"))
            .unwrap_or_default()
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Medians of one (scenario, broker) over its rounds.
#[derive(Debug, Clone)]
pub struct Summary {
    pub rounds: usize,
    pub deliver_rate: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub lost: u64,
    pub expected: u64,
    pub duplicates: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub broker_cpu: f64,
    pub bench_cpu: f64,
    pub peak_rss_kib: u64,
    /// Median bytes the broker wrote to storage per run.
    pub disk_write_bytes: f64,
}

pub fn summarize(results: &[RunResult]) -> BTreeMap<(String, String), Summary> {
    let mut groups: BTreeMap<(String, String), Vec<&RunResult>> = BTreeMap::new();
    for r in results {
        groups
            .entry((r.scenario.clone(), r.broker.clone()))
            .or_default()
            .push(r);
    }
    groups
        .into_iter()
        .map(|(k, rs)| {
            let m = |f: &dyn Fn(&RunResult) -> f64| median(rs.iter().map(|r| f(r)).collect());
            let s = Summary {
                rounds: rs.len(),
                deliver_rate: m(&|r| r.deliver_rate),
                p50_us: m(&|r| r.latency.p50_us),
                p99_us: m(&|r| r.latency.p99_us),
                p999_us: m(&|r| r.latency.p999_us),
                max_us: m(&|r| r.latency.max_us),
                lost: rs.iter().map(|r| r.lost).sum(),
                expected: rs.iter().map(|r| r.expected).sum(),
                duplicates: rs.iter().map(|r| r.duplicates).sum(),
                errors: rs.iter().map(|r| r.errors).sum(),
                first_error: rs.iter().find_map(|r| r.first_error.clone()),
                broker_cpu: m(&|r| r.broker_cpu.unwrap_or(f64::NAN)),
                bench_cpu: m(&|r| r.bench_cpu),
                peak_rss_kib: rs
                    .iter()
                    .filter_map(|r| r.broker_peak_rss_kib)
                    .max()
                    .unwrap_or(0),
                disk_write_bytes: m(&|r| {
                    r.broker_disk_write_bytes
                        .map(|b| b as f64)
                        .unwrap_or(f64::NAN)
                }),
            };
            (k, s)
        })
        .collect()
}

fn ratio(a: f64, b: f64) -> String {
    if a.is_finite() && b.is_finite() && b > 0.0 {
        format!("{:.2}×", a / b)
    } else {
        "–".into()
    }
}

pub struct MarkdownInput<'a> {
    pub machine: &'a str,
    pub command: &'a str,
    pub settings: &'a str,
    pub versions: &'a [(String, String)],
    pub scenarios: &'a [Scenario],
    pub brokers: &'a [String],
    pub results: &'a [RunResult],
    pub conns: &'a [ConnResult],
}

/// The generated results section (between the markers in docs/benchmarks.md).
pub fn markdown(inp: &MarkdownInput<'_>) -> String {
    let sum = summarize(inp.results);
    let get = |sc: &str, b: &str| sum.get(&(sc.to_string(), b.to_string()));
    let mut md = String::new();
    let _ = writeln!(md, "### Machine\n\n```\n{}\n```\n", inp.machine.trim());
    let _ = writeln!(
        md,
        "### Command\n\n```\n{}\n```\n\n{}\n",
        inp.command, inp.settings
    );
    let _ = writeln!(md, "Brokers:\n");
    for (b, v) in inp.versions {
        let _ = writeln!(md, "- **{b}**: `{v}`");
    }
    let _ = writeln!(md);

    // Throughput.
    let _ = writeln!(
        md,
        "### Throughput (deliveries/s to subscribers, median of rounds)\n"
    );
    let mut head = String::from("| scenario |");
    let mut rule = String::from("|---|");
    for b in inp.brokers {
        let _ = write!(head, " {b} |");
        rule.push_str("---:|");
    }
    let others: Vec<&String> = inp.brokers.iter().filter(|b| *b != "ferrymq").collect();
    let has_ferry = inp.brokers.iter().any(|b| b == "ferrymq");
    if has_ferry {
        for o in &others {
            let _ = write!(head, " ferrymq ÷ {o} |");
            rule.push_str("---:|");
        }
    }
    let _ = writeln!(md, "{head}\n{rule}");
    for sc in inp.scenarios {
        let mut row = format!("| `{}` |", sc.name);
        for b in inp.brokers {
            match get(&sc.name, b) {
                Some(s) if s.errors == 0 => {
                    let _ = write!(row, " {} |", fmt_rate(s.deliver_rate));
                }
                Some(s) => {
                    let _ = write!(row, " {} ({} err) |", fmt_rate(s.deliver_rate), s.errors);
                }
                None => row.push_str(" – |"),
            }
        }
        if has_ferry {
            for o in &others {
                let f = get(&sc.name, "ferrymq").map(|s| s.deliver_rate);
                let x = get(&sc.name, o).map(|s| s.deliver_rate);
                let _ = write!(
                    row,
                    " {} |",
                    ratio(f.unwrap_or(f64::NAN), x.unwrap_or(f64::NAN))
                );
            }
        }
        let _ = writeln!(md, "{row}");
    }
    let _ = writeln!(md);

    // Latency.
    let _ = writeln!(
        md,
        "### End-to-end latency, publisher write → subscriber read (p50 / p99 / p99.9, median of rounds)\n"
    );
    let mut head = String::from("| scenario |");
    let mut rule = String::from("|---|");
    for b in inp.brokers {
        let _ = write!(head, " {b} |");
        rule.push_str("---:|");
    }
    let _ = writeln!(md, "{head}\n{rule}");
    for sc in inp.scenarios {
        let mut row = format!("| `{}` |", sc.name);
        for b in inp.brokers {
            match get(&sc.name, b) {
                Some(s) => {
                    let _ = write!(
                        row,
                        " {} / {} / {} |",
                        fmt_us(s.p50_us),
                        fmt_us(s.p99_us),
                        fmt_us(s.p999_us)
                    );
                }
                None => row.push_str(" – |"),
            }
        }
        let _ = writeln!(md, "{row}");
    }
    let _ = writeln!(md);

    // Integrity and resources.
    let _ = writeln!(
        md,
        "### Losses, duplicates, errors (sum over rounds) and broker resources (median CPU in cores, peak RSS)\n"
    );
    let _ = writeln!(
        md,
        "| scenario | broker | lost / expected | dup | errors | broker CPU | broker peak RSS | broker disk writes | bench CPU |\n|---|---|---:|---:|---:|---:|---:|---:|---:|"
    );
    for sc in inp.scenarios {
        for b in inp.brokers {
            if let Some(s) = get(&sc.name, b) {
                let err = match (&s.first_error, s.errors) {
                    (Some(e), n) if n > 0 => format!("{n} ({})", e.replace('|', "/")),
                    (_, n) => n.to_string(),
                };
                let _ = writeln!(
                    md,
                    "| `{}` | {} | {} / {} | {} | {} | {:.2} | {:.0} MiB | {} | {:.2} |",
                    sc.name,
                    b,
                    s.lost,
                    s.expected,
                    s.duplicates,
                    err,
                    s.broker_cpu,
                    s.peak_rss_kib as f64 / 1024.0,
                    fmt_bytes(s.disk_write_bytes),
                    s.bench_cpu
                );
            }
        }
    }
    let _ = writeln!(md);

    durable_section(&mut md, inp, &sum);

    if !inp.conns.is_empty() {
        let _ = writeln!(md, "### Connection scale (idle clean-session clients)\n");
        let _ = writeln!(
            md,
            "| broker | connected / asked | failed | connects/s | broker RSS before → after | RSS per connection |\n|---|---:|---:|---:|---:|---:|"
        );
        for c in inp.conns {
            let _ = writeln!(
                md,
                "| {} | {} / {} | {} | {} | {:.1} → {:.1} MiB | {} |",
                c.broker,
                c.connected,
                c.target,
                c.failed,
                fmt_rate(c.connects_per_sec),
                c.broker_rss_before_kib.unwrap_or(0) as f64 / 1024.0,
                c.broker_rss_after_kib.unwrap_or(0) as f64 / 1024.0,
                c.rss_per_conn_bytes
                    .map(|b| format!("{:.2} KiB", b / 1024.0))
                    .unwrap_or_else(|| "?".into())
            );
        }
        let _ = writeln!(md);
    }

    targets_section(&mut md, inp, &sum);

    let _ = writeln!(md, "### Scenarios\n");
    for sc in inp.scenarios {
        let _ = writeln!(
            md,
            "- `{}`: {}{}",
            sc.name,
            sc.description,
            if sc.application {
                " (subscriber: ferrymq APPLICATION client; clean_session=false elsewhere)"
            } else if sc.clean_subscribers {
                ""
            } else {
                " (subscribers: clean_session=false)"
            }
        );
    }
    md
}

fn fmt_bytes(bytes: f64) -> String {
    if !bytes.is_finite() {
        "–".into()
    } else if bytes == 0.0 {
        "0".into()
    } else if bytes < 1048576.0 {
        format!("{:.0} KiB", bytes / 1024.0)
    } else {
        format!("{:.1} MiB", bytes / 1048576.0)
    }
}

type Sums = BTreeMap<(String, String), Summary>;

fn sget<'a>(sum: &'a Sums, sc: &str, b: &str) -> Option<&'a Summary> {
    sum.get(&(sc.to_string(), b.to_string()))
}

/// What each broker promises when it acknowledges a QoS 1 message to a persistent session.
fn durability_of(broker: &str) -> &'static str {
    match broker {
        "ferrymq" => "written to its redb store and fsynced (group commit) before PUBACK",
        "mosquitto" => {
            "`persistence true`, `autosave_interval 1`: the in-memory database is snapshotted to \
             disk once a second; nothing is written before PUBACK, so messages acknowledged since \
             the last snapshot are lost in a crash"
        }
        "rumqttd" => "no disk persistence at all: everything is in memory and lost in a crash",
        "ferrymq-kafka" => {
            "appended to Kafka's publish log with acks=all before PUBACK (single-node test \
             cluster: one replica, the page cache, no fsync per message, as Kafka runs); the \
             broker itself writes nothing to disk, so its disk-write column is 0"
        }
        _ => "unknown",
    }
}

/// Non-durable references for the "durable ≥ Mosquitto's non-durable QoS 1" target.
const DURABLE_VS_PLAIN: [(&str, &str); 2] = [
    ("p2p-qos1-persistent", "p2p-qos1-64b"),
    ("pairs10-qos1-persistent", "pairs10-qos1-64b"),
];

/// Persistent-subscriber scenarios side by side, with what each broker wrote to disk.
fn durable_section(md: &mut String, inp: &MarkdownInput<'_>, sum: &Sums) {
    let persistent: Vec<&Scenario> = inp
        .scenarios
        .iter()
        .filter(|s| s.persistent() && s.qos > 0)
        .collect();
    if persistent.is_empty() {
        return;
    }
    let _ = writeln!(
        md,
        "### Durable: QoS 1 to persistent subscribers (deliveries/s / p99 / bytes the broker wrote to disk per run; medians)\n"
    );
    for b in inp.brokers {
        let _ = writeln!(md, "- **{b}**: {}.", durability_of(b));
    }
    let _ = writeln!(md);
    let mut head = String::from("| scenario |");
    let mut rule = String::from("|---|");
    for b in inp.brokers {
        let _ = write!(head, " {b} |");
        rule.push_str("---:|");
    }
    let _ = writeln!(md, "{head}\n{rule}");
    let mut rows: Vec<(String, &str)> = persistent
        .iter()
        .map(|s| (format!("`{}`", s.name), s.name.as_str()))
        .collect();
    for (durable, plain) in DURABLE_VS_PLAIN {
        if persistent.iter().any(|s| s.name == durable)
            && inp.scenarios.iter().any(|s| s.name == plain)
        {
            rows.push((
                format!("`{plain}` (clean session, nothing durable; reference)"),
                plain,
            ));
        }
    }
    for (label, name) in rows {
        let mut row = format!("| {label} |");
        for b in inp.brokers {
            match sget(sum, name, b) {
                Some(s) => {
                    let _ = write!(
                        row,
                        " {} / {} / {} |",
                        fmt_rate(s.deliver_rate),
                        fmt_us(s.p99_us),
                        fmt_bytes(s.disk_write_bytes)
                    );
                }
                None => row.push_str(" – |"),
            }
        }
        let _ = writeln!(md, "{row}");
    }
    let _ = writeln!(md);
}

/// The issue's targets, computed from the medians.
fn targets_section(md: &mut String, inp: &MarkdownInput<'_>, sum: &Sums) {
    let rate = |sc: &str, b: &str| sget(sum, sc, b).map(|s| s.deliver_rate);
    let p99 = |sc: &str, b: &str| sget(sum, sc, b).map(|s| s.p99_us);
    let yes = |ok: bool| if ok { "yes" } else { "**no**" };
    let mut rows: Vec<(String, String, String)> = Vec::new();
    for (sc, label) in [
        (
            "p2p-qos0-64b",
            "non-persistent QoS 0 p2p ≥ rumqttd and ≥ 2× Mosquitto",
        ),
        (
            "p2p-qos1-64b",
            "non-persistent QoS 1 p2p ≥ rumqttd and ≥ 2× Mosquitto",
        ),
        (
            "pairs10-qos1-64b",
            "non-persistent QoS 1, 10 pairs ≥ rumqttd and ≥ 2× Mosquitto",
        ),
    ] {
        if let (Some(f), Some(m), Some(r)) = (
            rate(sc, "ferrymq"),
            rate(sc, "mosquitto"),
            rate(sc, "rumqttd"),
        ) {
            let lost = sget(sum, sc, "ferrymq")
                .filter(|s| s.lost > 0)
                .map(|s| format!("; ferrymq lost {} of {}", s.lost, s.expected))
                .unwrap_or_default();
            rows.push((
                format!("{label} (`{sc}`)"),
                format!(
                    "{} = {:.2}× rumqttd ({}), {:.2}× Mosquitto ({}){lost}",
                    fmt_rate(f),
                    f / r,
                    fmt_rate(r),
                    f / m,
                    fmt_rate(m)
                ),
                yes(f >= r && f >= 2.0 * m).into(),
            ));
        }
    }
    for sc in ["latency-qos0-20k", "latency-qos1-10k"] {
        if let (Some(f), Some(m)) = (p99(sc, "ferrymq"), p99(sc, "mosquitto")) {
            rows.push((
                format!("p99 ≤ Mosquitto's at equal offered load (`{sc}`)"),
                format!("{} vs {}", fmt_us(f), fmt_us(m)),
                yes(f <= m).into(),
            ));
        }
    }
    for (durable, plain) in DURABLE_VS_PLAIN {
        if let (Some(f), Some(m)) = (rate(durable, "ferrymq"), rate(plain, "mosquitto")) {
            rows.push((
                format!(
                    "durable QoS 1 to persistent subscribers ≥ Mosquitto's non-durable QoS 1 \
                     (ferrymq `{durable}` vs Mosquitto `{plain}`)"
                ),
                format!("{} vs {} = {:.2}×", fmt_rate(f), fmt_rate(m), f / m),
                yes(f >= m).into(),
            ));
        }
    }
    if let Some(c) = inp.conns.iter().find(|c| c.broker == "ferrymq") {
        if let Some(b) = c.rss_per_conn_bytes {
            rows.push((
                "idle memory ≤ 8 KiB per connection".into(),
                format!("{:.2} KiB ({} connections)", b / 1024.0, c.connected),
                yes(b <= 8.0 * 1024.0).into(),
            ));
        }
        rows.push((
            "100 000 concurrent connections".into(),
            format!(
                "{} of {} asked (open-file limit {}; the broker and the generator need one \
                 descriptor per connection each)",
                c.connected, c.target, c.nofile_limit
            ),
            if c.connected >= 100_000 {
                "yes".into()
            } else if c.connected == c.target {
                "not testable here (all asked connected)".into()
            } else {
                "**no**".into()
            },
        ));
    }
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(md, "### Targets (computed from the medians above)\n");
    let _ = writeln!(md, "| target | measured | met? |\n|---|---|---|");
    for (t, m, ok) in rows {
        let _ = writeln!(md, "| {t} | {m} | {ok} |");
    }
    let _ = writeln!(md);
}

pub const BEGIN: &str =
    "<!-- ferrymq-bench results: begin (generated by `ferrymq-bench compare`) -->";
pub const END: &str = "<!-- ferrymq-bench results: end -->";

/// Replaces the generated section of `doc` (or appends one).
pub fn splice(doc: &str, section: &str) -> String {
    match (doc.find(BEGIN), doc.find(END)) {
        (Some(b), Some(e)) if e > b => {
            format!(
                "{}{BEGIN}\n\n{section}\n{END}{}",
                &doc[..b],
                &doc[e + END.len()..]
            )
        }
        _ => {
            let mut out = if doc.is_empty() {
                "# Benchmarks\n\n".to_string()
            } else {
                format!("{}\n\n", doc.trim_end())
            };
            let _ = write!(out, "## Results\n\n{BEGIN}\n\n{section}\n{END}\n");
            out
        }
    }
}
