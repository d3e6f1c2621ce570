//! `affgate-edge`: flags, config, tracing; everything else is the library.

use std::path::PathBuf;
use std::process::ExitCode;

use affgate_edge::config::{Config, ProcessEnv};
use anyhow::Context;
use clap::{Parser, Subcommand};

/// affgate edge: answers click redirects (GET /c/{slug}) and conversion
/// postbacks (GET|POST /postback) at once, and keeps every event in a
/// crash-surviving ring until a collector acknowledges it.
///
/// Every config key can be overridden from the environment:
/// AFFGATE_HTTP_LISTEN for [http] listen, AFFGATE_EDGE_ID for edge_id.
/// Logs go to stderr, filtered by AFFGATE_LOG (default "info").
#[derive(Debug, Parser)]
#[command(name = "affgate-edge", version)]
struct Cli {
    /// Config file (TOML); see deploy/config/edge.toml.
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
    /// Operate on the event ring.
    Ring {
        #[command(subcommand)]
        command: RingCommand,
    },
}

#[derive(Debug, Subcommand)]
enum RingCommand {
    /// Print what the ring and spill files hold: counts, oldest unacknowledged
    /// record, and with --records every unacknowledged record. Read-only; safe
    /// while the edge runs.
    Inspect {
        /// Also print one tab-separated line per unacknowledged record.
        #[arg(long)]
        records: bool,
    },
}

fn main() -> ExitCode {
    affgate_edge::telemetry::init_tracing();
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("affgate-edge: {e:#}");
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

fn real_main(cli: Cli) -> anyhow::Result<()> {
    let cfg = load(&cli)?;
    match cli.command.unwrap_or(Command::Run) {
        Command::CheckConfig => {
            println!(
                "config ok: edge_id={} listen={} ring={}",
                cfg.edge_id,
                cfg.listen,
                cfg.ring_path.display()
            );
            Ok(())
        }
        Command::Ring {
            command: RingCommand::Inspect { records },
        } => {
            print!("{}", affgate_edge::inspect::report(&cfg, records)?);
            Ok(())
        }
        Command::Run => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("affgate-edge")
                .build()
                .context("start tokio runtime")?;
            rt.block_on(async {
                // Installed before the edge reports itself listening, so an
                // early SIGTERM drains and exits 0 instead of killing.
                let stop = shutdown_signal()?;
                affgate_edge::run(cfg, stop).await
            })
        }
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
