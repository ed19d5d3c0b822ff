//! `tandem`: one binary that runs every component of the pair and the operator commands.
//!
//! This file parses the command line, sets up logging and maps failures to the exit codes of
//! the operator contract: 0 success, 1 runtime failure, 2 usage or configuration error.

#![forbid(unsafe_code)]

mod args;
mod logging;

use std::process::ExitCode;

use anyhow::Result;
use clap::Parser;
use tandem_config::{ConfigError, PairFile};

use args::{Cli, Command, Global, ProbeCommand};

/// A mistake in the command line that clap cannot see (exit 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UsageError(String);

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.global.log_format);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("tandem: {err:#}");
            ExitCode::from(exit_code(&err))
        }
    }
}

fn exit_code(err: &anyhow::Error) -> u8 {
    let usage = err
        .chain()
        .any(|cause| cause.is::<ConfigError>() || cause.is::<UsageError>());
    if usage { 2 } else { 1 }
}

fn load(global: &Global) -> Result<PairFile> {
    Ok(PairFile::load(global.config.as_deref())?)
}

fn not_built(command: &str) -> Result<()> {
    anyhow::bail!("`tandem {command}` is not built yet in this version")
}

fn run(cli: Cli) -> Result<()> {
    let global = &cli.global;
    match &cli.command {
        Command::Up => {
            load(global)?;
            not_built("up")
        }
        Command::Store(args) => {
            let pair = load(global)?;
            pair.select_store(args.name.as_deref())?;
            not_built("store")
        }
        Command::Proxy(args) => {
            let pair = load(global)?;
            pair.select_proxy(args.name.as_deref())?;
            not_built("proxy")
        }
        Command::Gateway(args) => {
            let pair = load(global)?;
            pair.select_gateway(args.name.as_deref())?;
            not_built("gateway")
        }
        Command::Probe(probe) => {
            let pair = load(global)?;
            pair.probe_section()?;
            match probe {
                ProbeCommand::Json { .. } => not_built("probe json"),
                ProbeCommand::Syslog { .. } => not_built("probe syslog"),
                ProbeCommand::Webhook { .. } => not_built("probe webhook"),
            }
        }
        Command::Send(_) => {
            load(global)?.probe_section()?;
            not_built("send")
        }
        Command::Alerts(args) => {
            load(global)?.select_store(args.name.as_deref())?;
            not_built("alerts")
        }
        Command::Status(_) => {
            load(global)?;
            not_built("status")
        }
        Command::Failback(_) => {
            load(global)?;
            not_built("failback")
        }
        Command::Ack(args) => {
            load(global)?.select_store(args.name.as_deref())?;
            not_built("ack")
        }
        Command::Delete(args) => {
            load(global)?.select_store(args.name.as_deref())?;
            not_built("delete")
        }
        Command::Journal(args) => {
            load(global)?.select_store(args.name.as_deref())?;
            not_built("journal")
        }
        Command::Bench(args) => {
            if args.probes == 0 || args.identifiers == 0 {
                return Err(UsageError(
                    "bench: --probes and --identifiers must be at least 1".into(),
                )
                .into());
            }
            load(global)?.probe_section()?;
            not_built("bench")
        }
        Command::Certs => {
            load(global)?;
            not_built("certs")
        }
    }
}
