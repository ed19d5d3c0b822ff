//! Full resync, for a peer whose replication cursor is older than this store's retained log.
//!
//! Sending: [`Snapshots`] holds consistent views of the store (fjall snapshots, so a page read
//! minutes later still belongs to the same instant) and serves them page by page. A view is
//! kept while it is being read and for a while after, so a resync interrupted by a gateway
//! restart or a cut link resumes where it stopped instead of starting over.
//!
//! Receiving: [`Receiving`] folds the pages into the live table, one commit per page, while
//! probes keep writing. For each alert in the snapshot the row becomes the snapshot's state
//! plus this store's own events for it that the snapshot lacks, replayed from this store's
//! log: the log after the peer's cursor holds exactly those (everything before it, the peer
//! had applied). The result is the fold of the union of both sides' events, so tallies stay
//! exact (G2) and both stores converge (G3). Alerts the snapshot does not hold keep their
//! state: the peer never saw an event of theirs. Should this store's own log no longer reach
//! back to the peer's cursor, the two states are joined instead (see `fold::join`), which can
//! undercount but never doubles; the log says so.
//!
//! The receiver records how far it got in every page's commit; a page that does not follow on
//! (another snapshot, or a gap) is refused and the gateway resumes from the recorded point.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use fjall::Snapshot;
use tandem_protocol::codec::SnapshotPageWriter;
use tandem_protocol::message::{ResyncPoint, SnapshotChunk, SnapshotHead, SnapshotKey};
use tandem_protocol::state::{AppliedRanges, SeqRanges};
use tandem_protocol::{Event, Origin};

use crate::db::{Db, DbError, Meta, PeerWrites};
use crate::engine::{LogBuf, Reply};
use crate::fold::ClearKey;
use crate::table::{Changes, Incoming, Table};

/// Rows looked up this many ahead of their merge: see [`Table::warm`].
const LOOKAHEAD: usize = 4;

/// Most records in one page.
pub const MAX_PAGE: usize = 10_000;

/// How long an unread snapshot is kept for a resync to resume.
const HOLD_FOR: Duration = Duration::from_secs(300);

/// Longest wait for the records' memtables to be written out before a snapshot is taken; the
/// snapshot is taken then whether or not they were.
const SETTLE_WITHIN: Duration = Duration::from_secs(2);

/// Snapshots held at once; the oldest goes first.
const MAX_HELD: usize = 4;

struct Held {
    id: u64,
    peer: String,
    snap: Snapshot,
    lsn: u64,
    peer_cursor: u64,
    applied: Vec<AppliedRanges>,
    total: u64,
    last_used: Instant,
}

/// The snapshots this store is serving.
pub struct Snapshots {
    held: Mutex<Vec<Held>>,
    next_id: std::sync::atomic::AtomicU64,
}

impl Snapshots {
    pub fn new(epoch: u64) -> Snapshots {
        // Ids from the start time, so an id from before a restart never names a new snapshot.
        let start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(epoch);
        Snapshots {
            held: Mutex::new(Vec::new()),
            next_id: std::sync::atomic::AtomicU64::new(start.max(1)),
        }
    }

    /// The next page for `peer`, as a `SnapshotChunk` frame written at the end of `buf` (at
    /// most `max_frame` bytes): of snapshot `id` after `after` while it is held, else the first
    /// page of a new snapshot. On an error `buf` is left as it was. Reads the disk: call it off
    /// the async workers.
    #[allow(clippy::too_many_arguments)]
    pub fn page(
        &self,
        db: &Db,
        peer: &str,
        id: u64,
        after: Option<SnapshotKey>,
        limit: usize,
        buf: &mut bytes::BytesMut,
        max_frame: usize,
    ) -> Result<(), DbError> {
        let limit = limit.clamp(1, MAX_PAGE);
        let (snap, from, id, lsn, peer_cursor, applied, total) = {
            let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            held.retain(|h| h.last_used.elapsed() < HOLD_FOR);
            let found = held.iter_mut().find(|h| h.id == id && h.peer == peer);
            match found {
                Some(h) => {
                    h.last_used = Instant::now();
                    (
                        h.snap.clone(),
                        after,
                        h.id,
                        h.lsn,
                        h.peer_cursor,
                        h.applied.clone(),
                        h.total,
                    )
                }
                None => {
                    // A view that holds a memtable reads each page of it ten times slower
                    // than one of tables (3.5 ms against 0.35 ms a page of 1,000), so the
                    // snapshot is of tables: a full resync of 1,000,000 alerts took 5.6-6.8 s
                    // instead of 2.7-3.8 s when the last checkpoints were still in memory.
                    db.settle(SETTLE_WITHIN);
                    let snap = db.snapshot();
                    // The view may hold a checkpoint whose commit is written but not yet
                    // synced (a merged page's); a crash would lose it and reuse its LSNs, which
                    // the peer would then skip. Syncing now makes all of the view durable.
                    db.sync()?;
                    let (lsn, peer_cursor) = db.snapshot_position(&snap, peer)?;
                    let applied = db.snapshot_applied(&snap)?;
                    let id = self
                        .next_id
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let total = db.snapshot_size();
                    if held.len() >= MAX_HELD {
                        held.sort_by_key(|h| h.last_used);
                        held.remove(0);
                    }
                    tracing::info!(
                        peer,
                        snapshot = id,
                        lsn,
                        records = total,
                        "snapshot taken for a full resync"
                    );
                    held.push(Held {
                        id,
                        peer: peer.to_string(),
                        snap: snap.clone(),
                        lsn,
                        peer_cursor,
                        applied: applied.clone(),
                        total,
                        last_used: Instant::now(),
                    });
                    (snap, None, id, lsn, peer_cursor, applied, total)
                }
            }
        };
        let mut alerts = SnapshotPageWriter::begin(buf, &applied);
        let (clears, last, done) =
            db.snapshot_page(&snap, from.as_ref(), limit, max_frame, &mut alerts)?;
        if done {
            let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            held.retain(|h| h.id != id);
        }
        let head = SnapshotHead {
            snapshot: id,
            lsn,
            peer_cursor,
            next: last.or_else(|| from.clone()),
            from,
            total,
            done,
        };
        Ok(alerts.finish(max_frame, &head, &applied, &clears)?)
    }
}

/// A resync from one peer, as the receiving commit thread tracks it.
struct Resync {
    point: ResyncPoint,
    /// This store's own log entries after the peer's cursor, by identifier; None when the log
    /// no longer reaches back that far.
    own: Option<HashMap<String, Vec<u64>>>,
}

/// Full resyncs this store is receiving, at most one per peer.
#[derive(Default)]
pub struct Receiving {
    by_peer: HashMap<String, Resync>,
}

/// What a merge reads and writes besides the table.
pub struct MergeIo<'a> {
    pub db: &'a Db,
    pub log: &'a LogBuf,
    pub meta: &'a Meta,
    pub own_name: &'a str,
    pub changes: &'a mut Changes,
    pub writes: &'a mut PeerWrites,
}

impl Receiving {
    pub fn active(&self) -> bool {
        !self.by_peer.is_empty()
    }

    /// Notes an event this store logged for itself while a resync is under way: a snapshot
    /// page that comes later must replay it.
    pub fn note_own(&mut self, identifier: &str, lsn: u64) {
        for resync in self.by_peer.values_mut() {
            if let Some(own) = &mut resync.own {
                own.entry(identifier.to_string()).or_default().push(lsn);
            }
        }
    }

    /// Folds one page of `peer`'s snapshot into `table`: `chunk` without its alerts, which
    /// come as `rows`. Returns the answer for the gateway and, when this page finished the
    /// resync, the peer LSN now reached.
    pub fn merge(
        &mut self,
        peer: &str,
        chunk: SnapshotChunk,
        rows: Vec<Incoming>,
        encoded: Vec<bytes::Bytes>,
        table: &mut Table,
        io: MergeIo<'_>,
    ) -> Result<(Reply, Option<u64>), DbError> {
        if chunk.head.from.is_none() {
            let point = ResyncPoint {
                snapshot: chunk.head.snapshot,
                lsn: chunk.head.lsn,
                peer_cursor: chunk.head.peer_cursor,
                after: None,
                merged: 0,
                total: chunk.head.total,
            };
            tracing::info!(
                peer,
                snapshot = chunk.head.snapshot,
                lsn = chunk.head.lsn,
                records = chunk.head.total,
                "full resync started"
            );
            let own = own_entries(&io, point.peer_cursor)?;
            // Room for the whole snapshot at once: grown page by page, the row map would be
            // rehashed into a table twice the size at every doubling, all on the commit thread.
            table.reserve_total(usize::try_from(point.total).unwrap_or(0));
            self.by_peer.insert(peer.to_string(), Resync { point, own });
        } else if !self.by_peer.contains_key(peer) {
            // After a restart: pick up the recorded point.
            if let Some(point) = io.db.resync_point(peer)? {
                let own = own_entries(&io, point.peer_cursor)?;
                self.by_peer.insert(peer.to_string(), Resync { point, own });
            }
        }
        let Some(resync) = self.by_peer.get_mut(peer) else {
            return Ok((refuse(peer, &chunk, None), None));
        };
        if resync.point.snapshot != chunk.head.snapshot || chunk.head.from > resync.point.after {
            return Ok((refuse(peer, &chunk, Some(&resync.point)), None));
        }
        let fresh = chunk.head.from == resync.point.after;
        let records = (chunk.clears.len() + rows.len()) as u32;
        let MergeIo {
            db,
            log,
            changes,
            writes,
            ..
        } = io;
        for set in &chunk.applied {
            table.merge_applied(&set.origin, &set.ranges, changes);
        }
        for (key, version) in chunk.clears {
            table.merge_clear(ClearKey::from_bytes(key.as_bytes()), version, changes);
        }
        let applied: HashMap<&Origin, &SeqRanges> = chunk
            .applied
            .iter()
            .map(|set| (&set.origin, &set.ranges))
            .collect();
        // Each state's bytes, when the connection kept them: a row taken unchanged is written
        // as they came instead of encoded again.
        let mut encoded = (encoded.len() == rows.len()).then(|| encoded.into_iter());
        let mut rows = rows.into_iter();
        let mut ahead = std::collections::VecDeque::with_capacity(LOOKAHEAD);
        loop {
            while ahead.len() < LOOKAHEAD {
                let Some(next) = rows.next() else { break };
                table.warm(&next);
                ahead.push_back(next);
            }
            let Some(incoming) = ahead.pop_front() else {
                break;
            };
            let stored = encoded.as_mut().and_then(Iterator::next);
            let own = match &resync.own {
                None => None,
                Some(index) => {
                    let mut events = Vec::new();
                    let id = incoming.identifier();
                    for &lsn in index.get(id).map(Vec::as_slice).unwrap_or_default() {
                        let Some(event) = own_event(db, log, lsn)? else {
                            continue;
                        };
                        let in_snapshot = applied
                            .get(&event.origin)
                            .is_some_and(|set| set.contains(event.seq));
                        events.push((event, in_snapshot));
                    }
                    Some(events)
                }
            };
            table.merge_row(incoming, stored, own, changes);
        }
        if fresh {
            resync.point.merged += u64::from(records);
        }
        if chunk.head.next > resync.point.after {
            resync.point.after = chunk.head.next;
        }
        if chunk.head.done {
            let lsn = resync.point.lsn;
            tracing::info!(
                peer,
                lsn,
                records = resync.point.merged,
                exact = resync.own.is_some(),
                "full resync merged"
            );
            self.by_peer.remove(peer);
            writes.set_resync(peer, None);
            return Ok((
                Reply::Ack {
                    applied: records,
                    duplicates: 0,
                },
                Some(lsn),
            ));
        }
        writes.set_resync(peer, Some(resync.point.clone()));
        Ok((
            Reply::Ack {
                applied: records,
                duplicates: 0,
            },
            None,
        ))
    }
}

fn refuse(peer: &str, chunk: &SnapshotChunk, at: Option<&ResyncPoint>) -> Reply {
    let reason = match at {
        None => format!(
            "no full resync from {peer} is under way here, so a page that does not start the snapshot cannot be merged; restart the resync"
        ),
        Some(point) => format!(
            "this page of {peer}'s snapshot {} does not follow on: this store has merged snapshot {} up to {:?}; resume from there",
            chunk.head.snapshot, point.snapshot, point.after
        ),
    };
    Reply::Refused { index: 0, reason }
}

/// This store's own log entries after `peer_cursor`, by identifier; None when trimmed away.
fn own_entries(
    io: &MergeIo<'_>,
    peer_cursor: u64,
) -> Result<Option<HashMap<String, Vec<u64>>>, DbError> {
    let from = peer_cursor + 1;
    if io.meta.first_lsn > from {
        tracing::warn!(
            first_lsn = io.meta.first_lsn,
            needed_from = from,
            "this store's own log no longer reaches back to what its peer has applied: the resync joins states, which cannot double a tally but may undercount alerts both stores changed apart; raise log_max_entries"
        );
        return Ok(None);
    }
    let mut own: HashMap<String, Vec<u64>> = HashMap::new();
    let mut next = from;
    loop {
        let page = io.db.read_log(next, 10_000)?;
        let Some(last) = page.last().map(|e| e.lsn) else {
            break;
        };
        for entry in page {
            if *entry.source == *io.own_name {
                own.entry(entry.event.identifier().to_string())
                    .or_default()
                    .push(entry.lsn);
            }
        }
        next = last + 1;
    }
    for (lsn, bytes) in io.log.entries() {
        if lsn < next {
            continue;
        }
        if let Ok(entry) =
            tandem_protocol::codec::from_bytes::<tandem_protocol::message::LogEntry>(bytes)
        {
            if *entry.source == *io.own_name {
                own.entry(entry.event.identifier().to_string())
                    .or_default()
                    .push(lsn);
            }
        }
    }
    Ok(Some(own))
}

/// One of this store's own logged events, from disk or from the commit being built.
fn own_event(db: &Db, log: &LogBuf, lsn: u64) -> Result<Option<Event>, DbError> {
    if let Some(entry) = db.log_entry(lsn)? {
        return Ok(Some(entry.event));
    }
    Ok(log
        .entries()
        .find(|(l, _)| *l == lsn)
        .and_then(|(_, bytes)| {
            tandem_protocol::codec::from_bytes::<tandem_protocol::message::LogEntry>(bytes).ok()
        })
        .map(|entry| entry.event))
}
