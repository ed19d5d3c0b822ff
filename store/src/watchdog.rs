//! The commit watchdog: a store whose commit has been running far longer than any slow disk
//! explains (a hung disk, a stuck file system) stops looking alive, so that the pair moves
//! away from it instead of waiting on it.
//!
//! Its connection tasks would otherwise go on answering heartbeats (and, while batches wait,
//! sending keepalives), so probes connected straight to it would wait forever and its backup
//! would never take over. While stalled the store tells every probe and proxy to leave,
//! refuses new ones, sends no keepalives and answers its peer's heartbeat with an error, which
//! the backup counts as a miss. All of it ends when the commit finishes.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tandem_protocol::Directive;
use tokio_util::sync::CancellationToken;

use crate::engine::Shared;

/// Checks the commit under way every fifth of `stall_after` until `shutdown`.
pub async fn run(shared: Arc<Shared>, stall_after: Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval((stall_after / 5).max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let running = shared.commit_running_for();
        let stuck = running.is_some_and(|r| r > stall_after);
        if stuck && !shared.stalled.swap(true, Ordering::Relaxed) {
            let ms = running.unwrap_or_default().as_millis() as u64;
            tracing::error!(
                store = %shared.name,
                running_ms = ms,
                "a commit has been running for {ms} ms (a hung disk?): telling probes and proxies to leave, refusing new ones and failing the peer's heartbeat until it finishes"
            );
            metrics::counter!("tandem_store_stalls_total").increment(1);
            let _ = shared.directives.send(Directive::Leave {
                reason: format!("{}'s commits are stuck; use the other member", shared.name),
            });
        } else if !stuck && shared.stalled.swap(false, Ordering::Relaxed) {
            tracing::info!(store = %shared.name, "commits go through again: taking probes and proxies again");
        }
    }
}
