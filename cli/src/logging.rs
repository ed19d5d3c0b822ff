//! Logging setup: human-readable or JSON lines on standard error, level from `RUST_LOG`.

use tracing_subscriber::EnvFilter;

use crate::args::LogFormat;

pub fn init(format: LogFormat) {
    // The storage engine narrates every open and flush at info; its warnings are what matter.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,fjall=warn,lsm_tree=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| LogSink)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    // A second init (only possible in tests) keeps the first subscriber.
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Standard error for the logs, where a write that fails is dropped. tracing-subscriber reports
/// a failed write with `eprintln!`, which panics when standard error is what failed (a
/// supervisor that went away and closed the pipe): in whichever thread logged next, so a task
/// died silently (the signal watcher's, and the process no longer stopped on SIGTERM) or the
/// store's main task panicked.
struct LogSink;

impl std::io::Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}
