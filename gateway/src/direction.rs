//! One direction of the gateway: the sender's log, from the receiver's cursor, into the
//! receiver.

use std::time::Duration;

use tandem_probe::Connection;
use tandem_protocol::Message;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Where one direction stands.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    pub from: String,
    pub to: String,
    /// The sender's LSN the receiver has applied up to.
    pub cursor: u64,
    /// The sender's newest LSN as last seen.
    pub head: u64,
    /// Entries applied by this gateway in this session.
    pub applied: u64,
}

impl Progress {
    /// Entries the receiver still lacks.
    pub fn lag(&self) -> u64 {
        self.head.saturating_sub(self.cursor)
    }
}

#[allow(clippy::too_many_arguments)] // the two ends, their names, and where to report
pub async fn run(
    from: String,
    to: String,
    mut sender: Connection,
    mut receiver: Connection,
    dead_after: Duration,
    progress: watch::Sender<Progress>,
    caught_up: watch::Sender<bool>,
    session: CancellationToken,
) -> Result<(), String> {
    let wait = dead_after.max(Duration::from_secs(5));
    let cursor = match receiver
        .request(&Message::GetCursor { peer: from.clone() }, wait)
        .await
        .map_err(|e| format!("{to}: {e}"))?
    {
        Message::Cursor { lsn, .. } => lsn,
        other => return Err(format!("{to} answered GetCursor with {}", other.name())),
    };
    progress.send_modify(|p| p.cursor = cursor);
    sender
        .send(&Message::Subscribe {
            from_lsn: cursor + 1,
            skip_source: Some(to.clone()),
        })
        .await
        .map_err(|e| format!("{from}: {e}"))?;
    tracing::info!(%from, %to, cursor, "replicating");
    let mut cursor = cursor;
    let mut batch = 0u64;
    let mut ping = tokio::time::interval(dead_after / 2);
    let mut last_heard = tokio::time::Instant::now();
    loop {
        let msg = tokio::select! {
            msg = sender.recv() => msg.map_err(|e| format!("{from}: {e}"))?,
            _ = ping.tick() => {
                if last_heard.elapsed() > dead_after.max(Duration::from_secs(2)) {
                    return Err(format!("{from} went silent"));
                }
                sender.send(&Message::Ping { nonce: cursor }).await.map_err(|e| format!("{from}: {e}"))?;
                continue;
            }
            _ = session.cancelled() => return Ok(()),
        };
        last_heard = tokio::time::Instant::now();
        match msg {
            Message::LogEntries {
                entries,
                last_lsn,
                head_lsn,
            } => {
                let n = entries.len() as u64;
                if last_lsn > cursor {
                    batch += 1;
                    let replicate = Message::Replicate {
                        batch,
                        peer: from.clone(),
                        cursor: last_lsn,
                        entries,
                    };
                    match receiver
                        .request(&replicate, wait)
                        .await
                        .map_err(|e| format!("{to}: {e}"))?
                    {
                        Message::Ack { .. } => {}
                        Message::Refused { reason, index, .. } => {
                            return Err(format!(
                                "{to} refused entry {index} of {from}'s log: {reason}"
                            ));
                        }
                        other => {
                            return Err(format!("{to} answered Replicate with {}", other.name()));
                        }
                    }
                    cursor = last_lsn;
                    metrics::counter!("tandem_gateway_entries_applied_total").increment(n);
                    sender
                        .send(&Message::CursorReport {
                            peer: to.clone(),
                            lsn: cursor,
                        })
                        .await
                        .map_err(|e| format!("{from}: {e}"))?;
                }
                progress.send_modify(|p| {
                    p.cursor = cursor;
                    p.head = p.head.max(head_lsn);
                    p.applied += n;
                });
                if cursor >= head_lsn {
                    caught_up.send_if_modified(|c| !std::mem::replace(c, true));
                }
            }
            Message::LogTrimmed { first_lsn } => {
                return Err(format!(
                    "{to} is behind {from}'s retained log (cursor {cursor}, oldest retained {first_lsn}): a full resync is needed, which this version cannot do yet; raise log_retention_entries"
                ));
            }
            Message::Pong { .. } => {}
            Message::Error { message } => tracing::warn!(%from, "{message}"),
            other => tracing::debug!(%from, message = other.name(), "unexpected message"),
        }
    }
}
