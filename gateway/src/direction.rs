//! One direction of the gateway: the sender's log, from the receiver's cursor, into the
//! receiver; or, when the receiver is further behind than the sender's retained log, a full
//! resync from a snapshot first.
//!
//! Log pages are pipelined: up to [`MAX_IN_FLIGHT`] `Replicate` batches wait for the
//! receiver's commit at once, each naming the cursor it follows on from, so the receiver
//! refuses any batch that would leave a gap and a failure never skips entries. Snapshot pages
//! are pipelined the same way, bounded by [`pages_in_flight`] pages of at most the
//! configured page size, so a full resync holds a few pages in memory whatever the size of the
//! store, and runs no faster than the configured rate, leaving room for live traffic. A page is
//! passed on as the sender encoded it: the gateway reads its head and decodes no record.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use tandem_probe::Connection;
use tandem_protocol::codec::{from_bytes, snapshot_head};
use tandem_protocol::message::ResyncPoint;
use tandem_protocol::{CodecError, MergeFrame, Message, ReplicateFrame};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// `Replicate` batches waiting for the receiver at once.
pub const MAX_IN_FLIGHT: usize = 8;

/// Snapshot records waiting for the receiver at once, about two of its commit groups: the
/// receiver commits every page it has queued together, so with too few queued it sits idle
/// while the next pages are read and passed on; with too many, a live batch waits longer
/// behind them (32,000 rows are some 20–30 ms of the receiver's commit thread). Eight pages of
/// the default 4,000 resynced 6 % faster than four (docs/PERFORMANCE.md).
const RECORDS_IN_FLIGHT: usize = 32_000;

/// Snapshot pages waiting for the receiver at once, for pages of `page` records: three to
/// eight (eight pages of 1,000 merged 10 % faster than three).
pub fn pages_in_flight(page: u32) -> usize {
    (RECORDS_IN_FLIGHT / (page.max(1) as usize)).clamp(3, 8)
}

/// The receiver's next answer. A store sends a `Pong` to a connection whose batches wait on a
/// slow commit (its keepalive): that says it is alive, and answers nothing.
async fn next_answer(receiver: &mut Connection) -> Result<Message, tandem_probe::ClientError> {
    loop {
        match receiver.recv().await? {
            Message::Pong { .. } => continue,
            other => return Ok(other),
        }
    }
}

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
    /// A full resync under way: records merged and in the snapshot (approximate).
    pub full_resync: Option<(u64, u64)>,
}

impl Progress {
    /// Entries the receiver still lacks.
    pub fn lag(&self) -> u64 {
        self.head.saturating_sub(self.cursor)
    }
}

/// How a direction runs.
#[derive(Clone, Debug)]
pub struct Tuning {
    pub dead_after: Duration,
    /// Records per snapshot page.
    pub page: u32,
    /// Most snapshot records merged per second (0: no limit).
    pub resync_rate: u64,
}

/// The two links of one direction and what it reports.
pub struct Direction {
    pub from: String,
    pub to: String,
    pub sender: Connection,
    pub receiver: Connection,
    pub tuning: Tuning,
    pub progress: watch::Sender<Progress>,
    pub caught_up: watch::Sender<bool>,
    pub session: CancellationToken,
}

/// Why streaming the log stopped.
enum Stopped {
    Cancelled,
    /// The receiver needs a full resync.
    Trimmed {
        first_lsn: u64,
    },
}

impl Direction {
    fn wait(&self) -> Duration {
        self.tuning.dead_after.max(Duration::from_secs(5))
    }

    pub async fn run(mut self) -> Result<(), String> {
        let (from, to) = (self.from.clone(), self.to.clone());
        let asked = Message::GetCursor { peer: from.clone() };
        let (mut cursor, resume) = match self
            .receiver
            .request(&asked, self.wait())
            .await
            .map_err(|e| format!("{to}: {e}"))?
        {
            Message::Cursor { lsn, resync, .. } => (lsn, resync),
            other => return Err(format!("{to} answered GetCursor with {}", other.name())),
        };
        self.progress.send_modify(|p| p.cursor = cursor);
        if let Some(point) = resume {
            tracing::info!(%from, %to, snapshot = point.snapshot, merged = point.merged, "resuming a full resync");
            cursor = self.full_resync(Some(point)).await?;
        }
        loop {
            match self.stream(cursor).await? {
                Stopped::Cancelled => return Ok(()),
                Stopped::Trimmed { first_lsn } => {
                    tracing::warn!(
                        %from, %to, cursor, first_lsn,
                        "{to} is behind what {from} retains of its log; starting a full resync"
                    );
                    cursor = self.full_resync(None).await?;
                }
            }
        }
    }

    /// Streams the sender's log after `cursor` into the receiver until cancelled or trimmed.
    async fn stream(&mut self, mut cursor: u64) -> Result<Stopped, String> {
        let (from, to) = (self.from.clone(), self.to.clone());
        let wait = self.wait();
        self.sender
            .send(&Message::Subscribe {
                from_lsn: cursor + 1,
                skip_source: Some(to.clone()),
            })
            .await
            .map_err(|e| format!("{from}: {e}"))?;
        // The sender learns at once how far the receiver is, for `sync` replication and
        // log trimming, even before there is anything new to apply.
        self.sender
            .send(&Message::CursorReport {
                peer: to.clone(),
                lsn: cursor,
            })
            .await
            .map_err(|e| format!("{from}: {e}"))?;
        tracing::info!(%from, %to, cursor, "replicating");
        // The head of this subscription, not of an earlier one: the sender may have lost its
        // data and started its log again.
        self.progress.send_modify(|p| {
            p.cursor = cursor;
            p.head = cursor;
        });
        // Batches sent and not yet acknowledged: (batch, cursor it brings, entries, sent at).
        let mut in_flight: VecDeque<(u64, u64, u64, Instant)> = VecDeque::new();
        let mut sent = cursor;
        // The sender's head, once it has told it.
        let mut head = None;
        let mut batch = 0u64;
        let dead_after = self.tuning.dead_after;
        let mut ping = tokio::time::interval(dead_after / 2);
        let mut last_heard = tokio::time::Instant::now();
        let mut last_line = Instant::now();
        loop {
            tokio::select! {
                msg = self.sender.recv(), if in_flight.len() < MAX_IN_FLIGHT => {
                    let msg = msg.map_err(|e| format!("{from}: {e}"))?;
                    last_heard = tokio::time::Instant::now();
                    match msg {
                        Message::LogEntries { entries, last_lsn, head_lsn } => {
                            head = Some(head.unwrap_or(0).max(head_lsn));
                            self.progress.send_modify(|p| p.head = head_lsn);
                            if last_lsn > sent {
                                batch += 1;
                                let n = entries.len() as u64;
                                let replicate = ReplicateFrame {
                                    batch,
                                    peer: &from,
                                    after: sent,
                                    cursor: last_lsn,
                                    entries: &entries,
                                };
                                self.receiver.send_replicate(replicate).await.map_err(|e| format!("{to}: {e}"))?;
                                in_flight.push_back((batch, last_lsn, n, Instant::now()));
                                sent = last_lsn;
                            }
                        }
                        Message::LogTrimmed { first_lsn } => {
                            // Let what is in flight land first: its cursor is worth keeping.
                            while let Some((b, lsn, n, _)) = in_flight.pop_front() {
                                let answer = tokio::time::timeout(wait, next_answer(&mut self.receiver))
                                    .await
                                    .map_err(|_| format!("{to} did not answer batch {b} within {wait:?}"))?
                                    .map_err(|e| format!("{to}: {e}"))?;
                                self.acked(answer, b, lsn, n).await?;
                            }
                            return Ok(Stopped::Trimmed { first_lsn });
                        }
                        Message::Pong { .. } => {}
                        Message::Error { message } => tracing::warn!(%from, "{message}"),
                        other => tracing::debug!(%from, message = other.name(), "unexpected message"),
                    }
                }
                answer = next_answer(&mut self.receiver), if !in_flight.is_empty() => {
                    let answer = answer.map_err(|e| format!("{to}: {e}"))?;
                    let Some((b, lsn, n, _)) = in_flight.pop_front() else { continue };
                    self.acked(answer, b, lsn, n).await?;
                    cursor = lsn;
                    let left = head.unwrap_or(0).saturating_sub(cursor);
                    if left > 0 && last_line.elapsed() >= Duration::from_secs(2) {
                        last_line = Instant::now();
                        tracing::info!(%from, %to, cursor, left, "log catch-up progress");
                    }
                }
                _ = ping.tick() => {
                    if in_flight.len() >= MAX_IN_FLIGHT {
                        // Not reading the sender while the receiver catches up is not silence.
                        last_heard = tokio::time::Instant::now();
                    }
                    if last_heard.elapsed() > dead_after.max(Duration::from_secs(2)) {
                        return Err(format!("{from} went silent"));
                    }
                    if let Some((b, _, _, at)) = in_flight.front() {
                        if at.elapsed() > wait {
                            return Err(format!("{to} did not answer batch {b} within {wait:?}"));
                        }
                    }
                    self.sender.send(&Message::Ping { nonce: cursor }).await.map_err(|e| format!("{from}: {e}"))?;
                }
                _ = self.session.cancelled() => return Ok(Stopped::Cancelled),
            }
            if in_flight.is_empty() && head.is_some_and(|head| cursor >= head) {
                self.caught_up
                    .send_if_modified(|c| !std::mem::replace(c, true));
            }
        }
    }

    /// Handles the receiver's answer to batch `batch`, which brought the cursor to `lsn`.
    async fn acked(&mut self, answer: Message, batch: u64, lsn: u64, n: u64) -> Result<(), String> {
        let (from, to) = (&self.from, &self.to);
        match answer {
            Message::Ack { batch: b, .. } if b == batch => {}
            Message::Ack { batch: b, .. } => {
                return Err(format!(
                    "{to} answered batch {b} of Replicate while batch {batch} was the oldest waiting"
                ));
            }
            Message::Refused { reason, index, .. } => {
                return Err(format!(
                    "{to} refused entry {index} of {from}'s log: {reason}"
                ));
            }
            other => {
                return Err(format!(
                    "{to} answered batch {batch} of Replicate with {}",
                    other.name()
                ));
            }
        }
        metrics::counter!("tandem_gateway_entries_applied_total").increment(n);
        self.sender
            .send(&Message::CursorReport {
                peer: to.clone(),
                lsn,
            })
            .await
            .map_err(|e| format!("{from}: {e}"))?;
        self.progress.send_modify(|p| {
            p.cursor = lsn;
            p.applied += n;
        });
        Ok(())
    }

    /// Brings the receiver level with a snapshot of the sender, resuming `resume` if the
    /// sender still holds that snapshot. Returns the sender's LSN the receiver now has.
    async fn full_resync(&mut self, resume: Option<ResyncPoint>) -> Result<u64, String> {
        let (from, to) = (self.from.clone(), self.to.clone());
        let wait = self.wait();
        let (mut snapshot, mut after, mut merged) = match &resume {
            Some(p) => (p.snapshot, p.after.clone(), p.merged),
            None => (0, None, 0),
        };
        let started = Instant::now();
        let mut start_merged = merged;
        // Records asked for since `started`, for the rate limit.
        let mut requested = 0u64;
        let mut last_line = Instant::now();
        let mut total = resume.as_ref().map_or(0, |p| p.total);
        self.progress
            .send_modify(|p| p.full_resync = Some((merged, total)));
        // Pages sent to the receiver and not yet acknowledged: (batch, done, lsn).
        let mut in_flight: VecDeque<(u64, bool, u64)> = VecDeque::new();
        let mut batch = 0u64;
        let mut requested_done = false;
        let window = pages_in_flight(self.tuning.page);
        loop {
            // Ask for the next page while there is room; merges run meanwhile.
            if !requested_done && in_flight.len() < window {
                let ask = Message::SnapshotRequest {
                    peer: to.clone(),
                    snapshot,
                    after: after.clone(),
                    limit: self.tuning.page,
                };
                // The page is passed on as the sender encoded it: only its head is read here.
                let frame = self
                    .sender
                    .request_frame(&ask, wait)
                    .await
                    .map_err(|e| format!("{from}: {e}"))?;
                let Some(head) = snapshot_head(&frame) else {
                    return Err(match from_bytes::<Message>(&frame) {
                        Ok(Message::Error { message }) => format!("{from}: {message}"),
                        Ok(other) => {
                            format!("{from} answered SnapshotRequest with {}", other.name())
                        }
                        Err(e) => format!(
                            "{from} answered SnapshotRequest with an undecodable frame: {e}"
                        ),
                    });
                };
                if head.snapshot != snapshot && snapshot != 0 {
                    tracing::warn!(%from, %to, old = snapshot, new = head.snapshot, "the snapshot being resumed is no longer held; starting again from a new one");
                    merged = 0;
                    start_merged = 0;
                }
                snapshot = head.snapshot;
                total = head.total;
                after = head.next.clone();
                requested_done = head.done;
                batch += 1;
                let merge = MergeFrame {
                    batch,
                    peer: &from,
                    snapshot_frame: &frame,
                };
                self.receiver.send_merge(merge).await.map_err(|e| match e {
                    tandem_probe::ClientError::Codec {
                        source: e @ (CodecError::Decode(_) | CodecError::Encode(_)),
                        ..
                    } => {
                        format!("{from}: a snapshot page could not be passed on: {e}")
                    }
                    e => format!("{to}: {e}"),
                })?;
                in_flight.push_back((batch, head.done, head.lsn));
                // Paced on the records asked for: a page holds at most that many.
                requested += u64::from(self.tuning.page);
                self.pace(started, requested).await;
                continue;
            }
            let Some((b, done, lsn)) = in_flight.pop_front() else {
                return Err(format!(
                    "the full resync from {from} to {to} ended without a last page"
                ));
            };
            let answer = tokio::select! {
                answer = tokio::time::timeout(wait, next_answer(&mut self.receiver)) => answer
                    .map_err(|_| format!("{to} did not answer page {b} of the snapshot within {wait:?}"))?
                    .map_err(|e| format!("{to}: {e}"))?,
                _ = self.session.cancelled() => return Err("the session ended".into()),
            };
            // The receiver's count of what it merged: the gateway does not decode the page.
            let records = match answer {
                Message::Ack { batch, applied, .. } if batch == b => u64::from(applied),
                Message::Refused { reason, .. } => {
                    return Err(format!(
                        "{to} refused a page of {from}'s snapshot: {reason}"
                    ));
                }
                other => {
                    return Err(format!("{to} answered Merge with {}", other.name()));
                }
            };
            merged += records;
            metrics::counter!("tandem_gateway_resync_records_total").increment(records);
            self.progress
                .send_modify(|p| p.full_resync = Some((merged, total.max(merged))));
            if done {
                tracing::info!(
                    %from, %to, records = merged, lsn,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "full resync done; replicating the log from the snapshot on"
                );
                self.progress.send_modify(|p| {
                    p.full_resync = None;
                    p.cursor = lsn;
                });
                return Ok(lsn);
            }
            if last_line.elapsed() >= Duration::from_secs(2) {
                last_line = Instant::now();
                let secs = started.elapsed().as_secs_f64().max(1e-3);
                tracing::info!(
                    %from, %to, merged, total,
                    left = total.saturating_sub(merged),
                    records_per_s = (merged.saturating_sub(start_merged) as f64 / secs) as u64,
                    "full resync progress"
                );
            }
        }
    }

    /// Sleeps while `records` asked for since `started` are ahead of the rate limit.
    async fn pace(&self, started: Instant, records: u64) {
        if self.tuning.resync_rate == 0 {
            return;
        }
        let due = Duration::from_secs_f64(records as f64 / self.tuning.resync_rate as f64);
        if let Some(ahead) = due.checked_sub(started.elapsed()) {
            tokio::time::sleep(ahead).await;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a test that cannot set itself up should fail

    use futures::{SinkExt, StreamExt};
    use tandem_protocol::{
        ClientKind, DEFAULT_MAX_FRAME, MessageCodec, PROTOCOL_VERSION, Role, Welcome,
    };
    use tokio_util::codec::Framed;

    use super::*;

    /// A receiver whose commit is behind sends keepalives before it answers: the gateway must
    /// wait for the answer, not take the keepalive for it (and drop its session).
    #[tokio::test]
    async fn a_receivers_keepalive_is_not_its_answer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut conn = Framed::new(tcp, MessageCodec::new(DEFAULT_MAX_FRAME));
            let _hello = conn.next().await;
            let welcome = Message::Welcome(Welcome {
                version: PROTOCOL_VERSION,
                name: "AGG_B".into(),
                role: Role::Backup,
                acting_primary: false,
                resynced: true,
            });
            conn.send(&welcome).await.unwrap();
            for _ in 0..3 {
                conn.send(&Message::Pong { nonce: 0 }).await.unwrap();
            }
            let ack = Message::Ack {
                batch: 7,
                applied: 1,
                duplicates: 0,
            };
            conn.send(&ack).await.unwrap();
            // Held open until the client has read.
            let _ = conn.next().await;
        });
        let mut receiver = Connection::connect(
            addr,
            ClientKind::Gateway,
            "GW",
            DEFAULT_MAX_FRAME,
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        let got = tokio::time::timeout(Duration::from_secs(10), next_answer(&mut receiver))
            .await
            .unwrap()
            .unwrap();
        assert!(
            matches!(got, Message::Ack { batch: 7, .. }),
            "answered {got:?}"
        );
    }
}
