//! The command line: every subcommand and option of `tandem`, as clap definitions.
//!
//! The names here are the operator contract of DESIGN.md; scripts rely on them.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "tandem",
    version,
    about = "A high-availability event pipeline for monitoring alerts",
    long_about = "tandem carries alerts from probes through a virtual pair of proxies into two \
                  replicated aggregation stores, and never loses or doubles one while servers \
                  fail and come back.\n\nEvery command reads the pair file given by --config \
                  (default: the built-in fixtures/pair.toml). Exit codes: 0 success, 1 runtime \
                  failure, 2 usage or configuration error."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct Global {
    /// The pair file describing every component (default: the built-in fixtures/pair.toml).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The directory that the pair file's relative paths (data_dir, spool_dir, TLS files)
    /// resolve against.
    #[arg(long, global = true, value_name = "DIR", default_value = "tandem-data")]
    pub data_dir: PathBuf,
    /// Log format on standard error; the level comes from RUST_LOG (default: info).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the whole pair (AGG_P, AGG_B, PROXY_P, PROXY_B and GW) on this machine for a first run.
    Up,
    /// Run one aggregation store in the foreground.
    Store(NameArg),
    /// Run one proxy in the foreground.
    Proxy(NameArg),
    /// Run one bidirectional gateway in the foreground.
    Gateway(NameArg),
    /// Run an ingestion probe that sends to the virtual pair.
    #[command(subcommand)]
    Probe(ProbeCommand),
    /// Send JSON-lines alerts through the pair and wait until every one is acknowledged.
    Send(SendArgs),
    /// List a store's alerts.
    Alerts(AlertsArgs),
    /// Show the pair at a glance: components, roles, acting primary, resync, probes, lag.
    Status(StatusArgs),
    /// Tell the backup to send its clients back to the primary.
    Failback(FailbackArgs),
    /// Acknowledge an alert (or take the acknowledgement back with --undo).
    Ack(AckArgs),
    /// Delete an alert.
    Delete(DeleteArgs),
    /// Add a journal note to an alert.
    Journal(JournalArgs),
    /// Measure end-to-end throughput and acknowledgement latency through the pair.
    Bench(BenchArgs),
    /// Make a private CA and certificates for every component of the pair file (for tests and
    /// first use; bring your own PKI in production).
    Certs(CertsArgs),
}

#[derive(Debug, clap::Args)]
pub struct CertsArgs {
    /// Replace files that exist already.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct NameArg {
    /// The component's name in the pair file (may be left out when it has one of this kind).
    #[arg(long)]
    pub name: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum ProbeCommand {
    /// Read JSON-lines alerts from a file or standard input.
    Json {
        /// Follow the file like `tail -F`, sending each new line.
        #[arg(long)]
        follow: bool,
        /// The file to read (standard input when left out).
        file: Option<PathBuf>,
    },
    /// Listen for syslog messages (RFC 5424 and RFC 3164) over UDP and TCP.
    Syslog {
        /// UDP address to listen on.
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:5514")]
        udp: String,
        /// TCP address to listen on.
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:5514")]
        tcp: String,
    },
    /// Receive Prometheus Alertmanager webhooks over HTTP.
    Webhook {
        /// Address to listen on.
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9095")]
        listen: String,
    },
}

#[derive(Debug, Args)]
pub struct SendArgs {
    /// The JSON-lines file to send (standard input when left out).
    pub file: Option<PathBuf>,
    /// Events per second at most (default: as fast as the pair acknowledges).
    #[arg(long)]
    pub rate: Option<u64>,
    /// Give up (exit 1) when events cannot be delivered within this many seconds.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
    /// Print the summary as one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct AlertsArgs {
    /// The store to ask.
    #[arg(long)]
    pub name: Option<String>,
    /// Only alerts matching this expression, such as `severity >= 4 and node = "web1"`.
    #[arg(long, value_name = "EXPR")]
    pub filter: Option<String>,
    /// Sort by these fields, comma-separated; prefix a field with - for descending.
    #[arg(long, value_name = "FIELDS")]
    pub sort: Option<String>,
    /// Print at most this many alerts.
    #[arg(long)]
    pub limit: Option<u32>,
    /// One JSON object a line with the alert model's field names.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct FailbackArgs {
    /// Fail back even while the primary is unreachable or not resynced.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct AckArgs {
    /// The store to act on.
    #[arg(long)]
    pub name: Option<String>,
    /// The alert's identifier.
    pub identifier: String,
    /// Who acts (default: $USER).
    #[arg(long)]
    pub user: Option<String>,
    /// Remove the acknowledgement instead.
    #[arg(long)]
    pub undo: bool,
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// The store to act on.
    #[arg(long)]
    pub name: Option<String>,
    /// The alert's identifier.
    pub identifier: String,
}

#[derive(Debug, Args)]
pub struct JournalArgs {
    /// The store to act on.
    #[arg(long)]
    pub name: Option<String>,
    /// The alert's identifier.
    pub identifier: String,
    /// The note.
    pub text: String,
    /// Who writes (default: $USER).
    #[arg(long)]
    pub user: Option<String>,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Events to send in all.
    #[arg(long, default_value_t = 100_000)]
    pub events: u64,
    /// Distinct alert identifiers the events are spread over.
    #[arg(long, default_value_t = 1_000)]
    pub identifiers: u64,
    /// Concurrent probe connections.
    #[arg(long, default_value_t = 4)]
    pub probes: u32,
    /// Events per second at most, over all probes (default: unlimited).
    #[arg(long)]
    pub rate: Option<u64>,
    /// Approximate summary size in bytes.
    #[arg(long, default_value_t = 200)]
    pub size: usize,
    /// Print the result as one JSON object.
    #[arg(long)]
    pub json: bool,
}
