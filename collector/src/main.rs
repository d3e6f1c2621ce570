//! `affgate-collector`: flags, config, tracing; everything else is the library.

use std::path::PathBuf;
use std::process::ExitCode;

use affgate_collector::config::{Config, ProcessEnv};
use affgate_collector::migrate;
use affgate_collector::store::postgres;
use anyhow::Context;
use clap::{Parser, Subcommand};

/// affgate collector: receives event batches from edges, writes clicks to
/// ClickHouse and postbacks to PostgreSQL, and acknowledges them once
/// committed; turns postbacks into conversions with multi-level commissions
/// (mirrored to ClickHouse); serves the admin API on [admin] listen and
/// propagates its changes through [redis] url to the edges.
///
/// Every config key can be overridden from the environment:
/// AFFGATE_INGEST_UDP_LISTEN for [ingest] udp_listen, AFFGATE_SECRET for
/// secret. Logs go to stderr, filtered by AFFGATE_LOG (default "info").
#[derive(Debug, Parser)]
#[command(name = "affgate-collector", version)]
struct Cli {
    /// Config file (TOML); see deploy/config/collector.toml.
    #[arg(long, short, env = "AFFGATE_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve (the default when no command is given).
    Run,
    /// Check the config file and environment, print the result, exit.
    CheckConfig,
    /// Create or update the ClickHouse database and the PostgreSQL schema.
    /// Idempotent: applies only what is missing.
    Migrate,
}

fn main() -> ExitCode {
    affgate_collector::telemetry::init_tracing();
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("affgate-collector: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load(cli: &Cli) -> anyhow::Result<Config> {
    let path = cli
        .config
        .as_deref()
        .context("--config FILE is required (or AFFGATE_CONFIG)")?;
    Config::load(path, &ProcessEnv)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("affgate-collector")
        .build()
        .context("start tokio runtime")
}

fn real_main(cli: Cli) -> anyhow::Result<()> {
    let cfg = load(&cli)?;
    match cli.command.unwrap_or(Command::Run) {
        Command::CheckConfig => {
            println!(
                "config ok: udp_listen={} clickhouse={} database={} window={:?}/{} rows admin={}",
                cfg.udp_listen
                    .map_or_else(|| "none".to_string(), |a| a.to_string()),
                cfg.clickhouse.url,
                cfg.clickhouse.database,
                cfg.window,
                cfg.window_rows,
                cfg.admin
                    .as_ref()
                    .map_or_else(|| "none".to_string(), |a| a.listen.to_string())
            );
            Ok(())
        }
        Command::Migrate => runtime()?.block_on(async {
            let ch = migrate::clickhouse(&cfg.clickhouse).await?;
            print_report("clickhouse", &cfg.clickhouse.database, &ch);
            let pool = postgres::pool(&cfg.postgres).context("[postgres] url")?;
            let pg = migrate::postgres(&pool).await?;
            print_report("postgres", "", &pg);
            pool.close().await;
            Ok(())
        }),
        Command::Run => runtime()?.block_on(async {
            // Installed before the collector reports itself listening.
            let stop = shutdown_signal()?;
            affgate_collector::run(cfg, stop).await
        }),
    }
}

fn print_report(store: &str, database: &str, r: &migrate::Report) {
    let at = if database.is_empty() {
        String::new()
    } else {
        format!(" {database}")
    };
    if r.applied.is_empty() {
        println!(
            "{store}{at}: up to date, {} file(s) applied earlier",
            r.already.len()
        );
    } else {
        println!(
            "{store}{at}: applied {} ({} applied earlier)",
            r.applied.join(", "),
            r.already.len()
        );
    }
}

/// Resolves on SIGTERM or SIGINT; the handlers are installed when this is called.
fn shutdown_signal() -> anyhow::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("install the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("install the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}
