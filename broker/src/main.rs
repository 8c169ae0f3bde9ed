//! The `ferrymq` binary: parse flags, load configuration, run until SIGINT/SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use ferrymq::auth::cli::AdminCommand;
use ferrymq::config::{Config, Overrides};
use ferrymq::server::{Server, StartError};
use ferrymq::storage::StorageError;

/// ferrymq — a durable MQTT 3.1/3.1.1/5.0 broker.
#[derive(Debug, Parser)]
#[command(name = "ferrymq", version, about)]
struct Cli {
    /// Configuration file (TOML). Without it, defaults apply; FERRYMQ_* variables override both.
    #[arg(short, long, value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    /// TCP listener address; repeat for several. Replaces the configured listeners.
    #[arg(long = "listen", value_name = "ADDR")]
    listen: Vec<SocketAddr>,
    /// HTTP endpoint address (metrics, health, admin API); enables it. Port 0: any free port.
    #[arg(long = "http", value_name = "ADDR")]
    http: Option<SocketAddr>,
    /// Data directory for the embedded storage.
    #[arg(long, value_name = "DIR", global = true)]
    data_dir: Option<PathBuf>,
    /// Validate the configuration, print it as TOML and exit.
    #[arg(long)]
    check_config: bool,
    /// Admin commands on the configured credential store: PostgreSQL with kafka+postgres,
    /// else the data directory's file (locked while a broker runs on it).
    #[command(subcommand)]
    admin: Option<AdminCommand>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    use std::io::IsTerminal;
    let logs = tracing_subscriber::fmt().with_env_filter(
        tracing_subscriber::EnvFilter::try_from_env("FERRYMQ_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
    );
    // Admin commands print their results on stdout; keep logs out of the way. Colours only on a
    // terminal: log files and `kubectl logs` get plain text.
    if cli.admin.is_some() {
        logs.with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .init();
    } else {
        logs.with_ansi(std::io::stdout().is_terminal()).init();
    }
    let overrides = Overrides {
        listen: cli.listen.clone(),
        data_dir: cli.data_dir.clone(),
        http: cli.http,
    };
    let config = Config::load(cli.config.as_deref(), std::env::vars(), &overrides)
        .context("configuration")?;
    if let Some(admin) = cli.admin {
        return ferrymq::auth::cli::run(admin, &config);
    }
    if cli.check_config {
        println!(
            "{}",
            toml::to_string_pretty(&config).context("printing configuration")?
        );
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(run(config))
}

async fn run(config: Config) -> anyhow::Result<()> {
    let standby = config.storage.is_kafka_postgres() && config.postgres.standby;
    let server = loop {
        if standby {
            tokio::select! {
                waited = ferrymq::standby::wait_for_node_lock(&config) => waited?,
                signal = wait_for_signal() => {
                    signal?;
                    tracing::info!("shutting down (standby)");
                    return Ok(());
                }
            }
        }
        match Server::start(config.clone()).await {
            // Another standby took the lock first: stand by again.
            Err(StartError::Storage(StorageError::NodeLockHeld(_))) if standby => {
                tracing::info!("standby: another node took the node lock first");
            }
            started => break started?,
        }
    };
    tracing::info!("ferrymq {} ready", env!("CARGO_PKG_VERSION"));
    wait_for_signal().await?;
    tracing::info!("shutting down");
    server.shutdown().await;
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for SIGINT")?,
        _ = term.recv() => {}
    }
    Ok(())
}
