//! `tandem`: one binary that runs every component of the pair and the operator commands.
//!
//! This file parses the command line, sets up logging and maps failures to the exit codes of
//! the operator contract: 0 success, 1 runtime failure, 2 usage or configuration error.

#![forbid(unsafe_code)]

/// `println!` for what the commands print, through [`say`].
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::say(format_args!($($arg)*))
    };
}

/// `eprintln!` that never panics, through [`tell`].
macro_rules! tell {
    ($($arg:tt)*) => {
        $crate::tell(format_args!($($arg)*))
    };
}

mod alert_json;
mod args;
mod bench_cmd;
mod certs_cmd;
mod gateway_cmd;
mod logging;
mod operator;
mod ops;
mod probe_config;
mod probe_json;
mod proxy_cmd;
mod runtime;
mod send_cmd;
mod status_cmd;
mod store_cmd;
mod tls;
mod up_cmd;

use std::process::ExitCode;

use anyhow::Result;
use clap::Parser;
use tandem_config::{ConfigError, PairFile};
use tandem_protocol::EventBody;

use args::{Cli, Command, Global, ProbeCommand};

#[global_allocator]
static GLOBAL: tandem_alloc::MiMalloc = tandem_alloc::MiMalloc;

/// Prints a line on standard output. A reader that went away (`tandem status | head -1`) has
/// what it wanted, and any other failure to write is reported once on standard error:
/// `println!` would panic, and for `tandem up` that left its components running unsupervised.
pub fn say(line: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    static REPORTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if let Err(e) = writeln!(std::io::stdout().lock(), "{line}") {
        if e.kind() != std::io::ErrorKind::BrokenPipe
            && !REPORTED.swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            tell!("tandem: cannot write to standard output: {e}");
        }
    }
}

/// Writes a line on standard error, dropping it if that fails: `eprintln!` would panic when
/// standard error is gone (`tandem up`'s pipe to a terminal that closed), and there is nowhere
/// else to say so.
pub fn tell(line: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// A mistake in the command line that clap cannot see (exit 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

fn main() -> ExitCode {
    // Before any thread starts (tandem-alloc says why).
    tandem_alloc::tune();
    let cli = Cli::parse();
    logging::init(cli.global.log_format);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tell!("tandem: {err:#}");
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

fn act(global: &Global, name: Option<&str>, body: EventBody, verb: &str, id: &str) -> Result<()> {
    let pair = load(global)?;
    pair.select_store(name)?;
    let tls = tls::user_client(&pair, &global.data_dir)?;
    let store = runtime::runtime()?.block_on(operator::act(&pair, tls.as_deref(), name, body))?;
    say!("{verb} {id:?} on {store}");
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    let global = &cli.global;
    match &cli.command {
        Command::Up => up_cmd::run(&load(global)?, global),
        Command::Store(args) => store_cmd::run(&load(global)?, global, args.name.as_deref()),
        Command::Proxy(args) => {
            proxy_cmd::run(&load(global)?, &global.data_dir, args.name.as_deref())
        }
        Command::Gateway(args) => {
            gateway_cmd::run(&load(global)?, &global.data_dir, args.name.as_deref())
        }
        Command::Probe(probe) => {
            let pair = load(global)?;
            pair.probe_section()?;
            match probe {
                ProbeCommand::Json { follow, file } => {
                    probe_json::run(&pair, &global.data_dir, *follow, file.as_deref())
                }
                ProbeCommand::Syslog { .. } => not_built("probe syslog"),
                ProbeCommand::Webhook { .. } => not_built("probe webhook"),
            }
        }
        Command::Send(args) => send_cmd::run(&load(global)?, &global.data_dir, args),
        Command::Alerts(args) => {
            let pair = load(global)?;
            pair.select_store(args.name.as_deref())?;
            let query =
                operator::build_query(args.filter.as_deref(), args.sort.as_deref(), args.limit)?;
            let tls = tls::user_client(&pair, &global.data_dir)?;
            let (alerts, total) = runtime::runtime()?.block_on(operator::query(
                &pair,
                tls.as_deref(),
                args.name.as_deref(),
                query,
            ))?;
            operator::print_alerts(&alerts, total, args.json)
        }
        Command::Status(args) => {
            let pair = load(global)?;
            let tls = tls::user_client(&pair, &global.data_dir)?;
            let status = runtime::runtime()?.block_on(status_cmd::collect(&pair, tls.as_deref()));
            status_cmd::print(&status, args.json);
            Ok(())
        }
        Command::Failback(args) => {
            let pair = load(global)?;
            let tls = tls::user_client(&pair, &global.data_dir)?;
            let done = runtime::runtime()?.block_on(status_cmd::failback(
                &pair,
                tls.as_deref(),
                args.force,
            ))?;
            say!("{done}");
            Ok(())
        }
        Command::Ack(args) => {
            let body = EventBody::Acknowledge {
                identifier: args.identifier.clone(),
                acknowledged: !args.undo,
                user: operator::user_or(args.user.as_ref()),
            };
            let verb = if args.undo {
                "unacknowledged"
            } else {
                "acknowledged"
            };
            act(global, args.name.as_deref(), body, verb, &args.identifier)
        }
        Command::Delete(args) => {
            let body = EventBody::Delete {
                identifier: args.identifier.clone(),
                seen: None,
            };
            act(
                global,
                args.name.as_deref(),
                body,
                "deleted",
                &args.identifier,
            )
        }
        Command::Journal(args) => {
            let body = EventBody::Journal {
                identifier: args.identifier.clone(),
                user: operator::user_or(args.user.as_ref()),
                text: args.text.clone(),
            };
            act(
                global,
                args.name.as_deref(),
                body,
                "journalled",
                &args.identifier,
            )
        }
        Command::Bench(args) => {
            if args.probes == 0 || args.identifiers == 0 {
                return Err(UsageError(
                    "bench: --probes and --identifiers must be at least 1".into(),
                )
                .into());
            }
            if args.rate == Some(0) {
                return Err(UsageError(
                    "bench: --rate must be at least 1 event/s; leave it out to send as fast as \
                     the pair acknowledges"
                        .into(),
                )
                .into());
            }
            let pair = load(global)?;
            pair.probe_section()?;
            bench_cmd::run(&pair, &global.data_dir, args)
        }
        Command::Certs(args) => {
            for line in certs_cmd::run(&load(global)?, &global.data_dir, args.force)? {
                say!("{line}");
            }
            Ok(())
        }
    }
}
