//! Housekeeping: expiry and deletion of clear alerts, on the acting primary only (G6).
//!
//! Each pass reads the table, decides which alerts are due and hands the changes to the commit
//! thread as this store's own events, so they are logged and replicate like any other change
//! and a store that is not acting primary gets them from its peer instead of making its own.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tandem_protocol::EventBody;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::engine::{Request, Shared};
use crate::fold;

/// Most changes one pass makes, so a backlog is worked off without one huge commit.
const MAX_PER_PASS: usize = 5_000;

pub async fn run(
    shared: Arc<Shared>,
    tx: mpsc::Sender<Request>,
    interval: Duration,
    clear_delete_after: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        if !shared.acting_primary.load(Ordering::Relaxed) {
            continue;
        }
        // Off the async workers: it scans the table, under the lock a commit holds.
        let scan = shared.clone();
        let bodies =
            tokio::task::spawn_blocking(move || due(&scan, crate::now_ms(), clear_delete_after))
                .await
                .unwrap_or_default();
        if bodies.is_empty() {
            continue;
        }
        tracing::debug!(changes = bodies.len(), "housekeeping");
        if tx.send(Request::Housekeeping { bodies }).await.is_err() {
            return;
        }
    }
}

/// The expiries and deletions due at `now`.
pub fn due(shared: &Shared, now: i64, clear_delete_after: Duration) -> Vec<EventBody> {
    let Ok(table) = shared.table.read() else {
        return Vec::new();
    };
    let delete_after = clear_delete_after.as_millis() as i64;
    let mut bodies = Vec::new();
    for (id, row) in table.rows() {
        if bodies.len() >= MAX_PER_PASS {
            break;
        }
        let state = &row.state;
        if !fold::is_alive(state) {
            continue;
        }
        let expire = i64::from(state.latest.value.expire_seconds) * 1000;
        if state.severity.value.is_clear() {
            if now - state.state_change >= delete_after {
                bodies.push(EventBody::Delete {
                    identifier: id.to_string(),
                    seen: None,
                });
            }
        } else if expire > 0 && now - state.last_occurrence >= expire {
            bodies.push(EventBody::Expire {
                identifier: id.to_string(),
            });
        }
    }
    bodies
}
