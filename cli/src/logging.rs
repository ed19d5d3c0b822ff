//! Logging setup: human-readable or JSON lines on standard error, level from `RUST_LOG`.

use tracing_subscriber::EnvFilter;

use crate::args::LogFormat;

pub fn init(format: LogFormat) {
    // The storage engine narrates every open and flush at info; its warnings are what matter.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,fjall=warn,lsm_tree=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    // A second init (only possible in tests) keeps the first subscriber.
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
