//! Group commit: one thread applies events from every connection in batches, makes each batch
//! durable with one sync, then acknowledges.
//!
//! Connections hand their work to the commit thread over a bounded channel (backpressure: a
//! full channel stops their readers). The thread takes everything that is waiting, up to
//! [`MAX_GROUP_EVENTS`], applies it to the in-memory table and writes the changed records and
//! the new log entries in one fjall batch. A sync thread then makes the batch durable,
//! publishes the new durable head LSN and only then answers, while the commit thread applies
//! the next group; that group's batch is written once the last one is durable. Queries read
//! the table under a read lock and may see a group a moment before it is durable;
//! acknowledgements and change-log subscribers never do.
//!
//! A failed write or sync leaves memory ahead of disk, which no later commit can repair; the
//! process exits and its restart reloads the last durable state, which every acknowledgement
//! already covered.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use tandem_protocol::codec::append_bytes;
use tandem_protocol::message::{LogEntryRef, PackedRun, SnapshotChunk};
use tandem_protocol::{Event, EventBody, Origin, RecordBytes};
use tokio::sync::{mpsc, oneshot, watch};

use crate::db::{Checkpoint, Db, DbError, Meta, PeerWrites};
use crate::resync::{MergeIo, Receiving, Snapshots};
use crate::table::{self, Changes, Incoming, Outcome, Table};

/// Most events applied in one group commit.
pub const MAX_GROUP_EVENTS: usize = 16_384;

/// Most events one request may carry.
pub const MAX_BATCH_EVENTS: usize = 10_000;

/// How many log entries a store keeps whatever its peer has applied.
pub const DEFAULT_LOG_RETENTION: u64 = 2_000_000;

/// How many log entries a store keeps at most while its peer has not applied them; a peer
/// further behind needs a full resync.
pub const DEFAULT_LOG_MAX: u64 = 10_000_000;

/// How much of its change log a store keeps (`log_retention_entries` and `log_max_entries`).
///
/// Entries the peer has not applied are kept past the retention, up to `max`: a full resync
/// into a store that has events of its own the peer lacks is exact only while that store's
/// log still holds them (docs/NOTES.md), and a peer that can catch up from the log needs no
/// full resync at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogLimits {
    /// Entries kept whatever the peer has applied.
    pub retention: u64,
    /// Entries kept at most, applied by the peer or not.
    pub max: u64,
}

impl Default for LogLimits {
    fn default() -> LogLimits {
        LogLimits {
            retention: DEFAULT_LOG_RETENTION,
            max: DEFAULT_LOG_MAX,
        }
    }
}

impl LogLimits {
    /// Keeps every entry: for benchmarks of the commit path alone.
    pub const ALL: LogLimits = LogLimits {
        retention: u64::MAX,
        max: u64::MAX,
    };

    /// Where a log running from `first` to `head` may start after one commit's trim, given
    /// that the peer has applied it up to `peer_cursor` and that only the log after
    /// `kept_from` is not yet covered by a durable checkpoint. A trim moves at most
    /// [`TRIM_PER_COMMIT`] entries and never passes `kept_from + 1`.
    pub fn trimmed_start(&self, first: u64, head: u64, peer_cursor: u64, kept_from: u64) -> u64 {
        let retained = head.saturating_sub(first).saturating_add(1);
        if retained <= self.retention {
            return first;
        }
        let target = first.saturating_add((retained - self.retention).min(TRIM_PER_COMMIT));
        // What the peer lacks stays, unless the log would then hold more than `max`.
        let over_max = head.saturating_add(1).saturating_sub(self.max);
        let hold = peer_cursor.saturating_add(1).max(over_max);
        target.min(hold).min(kept_from.saturating_add(1)).max(first)
    }
}

/// How long a clean shutdown waits for the storage engine to write its memtables out: only a
/// quicker next start depends on it, the journal already holds everything.
const FLUSH_WITHIN: std::time::Duration = std::time::Duration::from_secs(30);

/// Log entries one commit trims at most. A trim only moves the first LSN now (the space comes
/// back a storage table at a time, `Db::reclaim_log`); the bound keeps a log far over its
/// retention (after the setting was lowered) from being cut in one step, as it was when each
/// trimmed block was deleted in the commit.
const TRIM_PER_COMMIT: u64 = 8_192;

/// A checkpoint (see `db.rs`) at least this often while anything changes: bounds the log a
/// start-up replays to what this store took in that long.
const CHECKPOINT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

/// A checkpoint at the latest after this many log entries, or this many changed rows.
const CHECKPOINT_ENTRIES: u64 = 1_000_000;
const CHECKPOINT_ROWS: usize = 200_000;

/// The answer to a batch of events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Ack { applied: u32, duplicates: u32 },
    Refused { index: u32, reason: String },
}

/// Work for the commit thread.
pub enum Request {
    /// Events from a probe, proxy or operator, with each one's encoding as it arrived when
    /// the connection kept it (empty otherwise): logged as it came instead of encoded again.
    Events {
        events: Vec<Event>,
        encoded: RecordBytes,
        reply: oneshot::Sender<Reply>,
        /// Where the fields these events displace go to be freed: see [`Leftovers`].
        leftovers: Option<Arc<Leftovers>>,
    },
    /// A peer's log entries, applied together with the new cursor for that peer. `after` is
    /// the cursor they follow on from.
    ///
    /// The entries come as they arrived and are decoded on the commit thread, which folds them
    /// straight after: decoded on the connection's thread, each event's text was cold in the
    /// commit thread's cache, and the fields it displaced (the peer's earlier events, decoded
    /// on the commit thread too) are freed by the thread that allocated them. Together a sixth
    /// of a backup's CPU (docs/PERFORMANCE.md). The decoding is done under the table's write
    /// lock, about a millisecond for 4,096 entries (the replicated-decode bench: 275 ns an
    /// entry); a commit holds the lock while it waits for the group before to sync, too.
    Replicate {
        peer: String,
        after: u64,
        cursor: u64,
        entries: tandem_protocol::message::LogBatch,
        reply: oneshot::Sender<Reply>,
    },
    /// A page of a peer's snapshot, in a full resync.
    Merge {
        peer: String,
        /// The page without its alerts, which are `rows`.
        chunk: SnapshotChunk,
        rows: Vec<Incoming>,
        /// Each alert's state as it arrived encoded (empty when not kept), each its own
        /// reference to the frame: a row taken as it came keeps its bytes past the request.
        encoded: Vec<bytes::Bytes>,
        reply: oneshot::Sender<Reply>,
    },
    /// Changes this store makes itself (expiry, deletion of clear alerts), numbered with its
    /// own origin.
    Housekeeping { bodies: Vec<EventBody> },
}

impl Request {
    fn len(&self) -> usize {
        match self {
            Request::Events { events, .. } => events.len(),
            // The count the peer claims, not yet checked (the commit thread decodes the
            // entries): bounded, as it only sizes the group.
            Request::Replicate { entries, .. } => entries.len().min(MAX_GROUP_EVENTS),
            Request::Merge { chunk, rows, .. } => rows.len() + chunk.clears.len(),
            Request::Housekeeping { bodies } => bodies.len(),
        }
    }
}

/// What connections, the HTTP endpoints and housekeeping share with the commit thread.
pub struct Shared {
    pub name: String,
    pub table: RwLock<Table>,
    pub db: Db,
    /// The LSN of the newest durable log entry.
    pub head: watch::Sender<u64>,
    /// Which source the newest log entries came from.
    pub log_sources: LogSources,
    pub first_lsn: AtomicU64,
    pub acting_primary: AtomicBool,
    pub resynced: AtomicBool,
    pub loaded: AtomicBool,
    pub epoch: u64,
    pub events_applied: AtomicU64,
    pub duplicates: AtomicU64,
    /// How far the peer store has applied this store's log, as the gateway last reported.
    pub peer_cursor: watch::Sender<u64>,
    /// In `sync` replication, whether acknowledgements have stopped waiting for the peer
    /// because it did not confirm in time; cleared when it catches up.
    pub sync_degraded: AtomicBool,
    pub peer_up: AtomicBool,
    pub role: std::sync::Mutex<crate::role::Role>,
    /// Directives for every connected probe and proxy (fail-back).
    pub directives: tokio::sync::broadcast::Sender<tandem_protocol::Directive>,
    /// Every change of the acting flag, for connected proxies to hear at once.
    pub role_changes: tokio::sync::broadcast::Sender<bool>,
    /// Snapshots being read by a peer's full resync.
    pub snapshots: Snapshots,
    /// The alerts that exist, as of the last commit: read without the table's lock, which a
    /// stuck commit may hold (async tasks must not wait on it).
    pub alive: AtomicU64,
    /// When the commit under way started, in ms after `clock` plus one (0: none under way).
    commit_started_ms: AtomicU64,
    /// The same for the written commit waiting for its sync (see [`Syncer`]).
    sync_started_ms: AtomicU64,
    /// The monotonic origin of `commit_started_ms`: a wall-clock step must not look like a
    /// stuck commit.
    clock: std::time::Instant,
    /// The commit under way has run past the stall limit (see `watchdog`): this store then
    /// refuses probes and proxies and does not answer its peer's heartbeat.
    pub stalled: AtomicBool,
    /// The commit queue, weakly: the store's own notices go through it, without keeping the
    /// commit thread alive past shutdown.
    requests: std::sync::OnceLock<mpsc::WeakSender<Request>>,
}

impl Shared {
    /// Records what happened to the pair as an alert of its own (manager `tandem`, expiring
    /// after a day), so operators watching alerts see failovers, fail-backs and resyncs. It is
    /// an event like any other: logged, replicated, deduplicated.
    pub fn notice(
        &self,
        key: &str,
        kind: tandem_protocol::Kind,
        severity: tandem_protocol::Severity,
        summary: String,
    ) {
        let Some(tx) = self.requests.get().and_then(mpsc::WeakSender::upgrade) else {
            return;
        };
        let fields = tandem_protocol::AlertFields {
            identifier: format!("tandem:{}:{key}", self.name),
            node: self.name.clone(),
            manager: "tandem".into(),
            agent: "tandem".into(),
            alert_group: "pair".into(),
            alert_key: key.into(),
            summary,
            class: "tandem".into(),
            kind,
            severity,
            expire_seconds: 86_400,
            ..tandem_protocol::AlertFields::default()
        };
        let request = Request::Housekeeping {
            bodies: vec![EventBody::Occurrence(fields.pack())],
        };
        if tx.try_send(request).is_err() {
            tracing::warn!(key, "the commit queue is full; the notice alert is dropped");
        }
    }

    /// How long the oldest commit under way (applying, or written and syncing) has been
    /// running; None when none is.
    pub fn commit_running_for(&self) -> Option<std::time::Duration> {
        let started = [&self.commit_started_ms, &self.sync_started_ms]
            .into_iter()
            .map(|at| at.load(Ordering::Relaxed))
            .filter(|&at| at != 0)
            .min()?;
        Some(std::time::Duration::from_millis(
            self.clock_ms().saturating_sub(started - 1),
        ))
    }

    fn clock_ms(&self) -> u64 {
        self.clock.elapsed().as_millis() as u64
    }

    /// Marks a commit as under way (`true`) or finished, for [`Shared::commit_running_for`].
    fn commit_running(&self, running: bool) {
        let at = if running { self.clock_ms() + 1 } else { 0 };
        self.commit_started_ms.store(at, Ordering::Relaxed);
    }

    fn sync_running(&self, running: bool) {
        let at = if running { self.clock_ms() + 1 } else { 0 };
        self.sync_started_ms.store(at, Ordering::Relaxed);
    }

    /// The alerts that exist, as of the last commit.
    pub fn alert_count(&self) -> u64 {
        self.alive.load(Ordering::Relaxed)
    }

    pub fn head_lsn(&self) -> u64 {
        *self.head.borrow()
    }
}

/// A running engine: what connections share, the queue to the commit thread, and the thread.
pub type Started = (
    Arc<Shared>,
    mpsc::Sender<Request>,
    std::thread::JoinHandle<()>,
);

/// Opens the data directory, loads the table and starts the commit thread.
pub fn start(
    name: &str,
    path: &Path,
    queue: usize,
    log_limits: LogLimits,
) -> Result<Started, DbError> {
    let db = Db::open(path)?;
    let mut table = Table::new(name);
    let started = Instant::now();
    let new_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    let meta = db.load(&mut table, new_epoch)?;
    let mut changes = Changes::default();
    let replayed = replay(&db, &mut table, &meta, &mut changes)?;
    drop(table.take_displaced());
    tracing::info!(
        store = name,
        alerts = table.alive(),
        head_lsn = meta.head_lsn,
        replayed,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "loaded the alert table"
    );
    let (head, _) = watch::channel(meta.head_lsn);
    let alive = table.alive();
    let shared = Arc::new(Shared {
        name: name.to_string(),
        table: RwLock::new(table),
        db,
        head,
        log_sources: LogSources::new(meta.head_lsn),
        first_lsn: AtomicU64::new(meta.first_lsn),
        acting_primary: AtomicBool::new(false),
        resynced: AtomicBool::new(false),
        loaded: AtomicBool::new(true),
        epoch: meta.epoch,
        events_applied: AtomicU64::new(0),
        duplicates: AtomicU64::new(0),
        peer_cursor: watch::channel(0).0,
        sync_degraded: AtomicBool::new(false),
        peer_up: AtomicBool::new(false),
        role: std::sync::Mutex::new(crate::role::Role::primary()),
        directives: tokio::sync::broadcast::channel(16).0,
        role_changes: tokio::sync::broadcast::channel(16).0,
        snapshots: Snapshots::new(meta.epoch),
        alive: AtomicU64::new(alive),
        commit_started_ms: AtomicU64::new(0),
        sync_started_ms: AtomicU64::new(0),
        clock: std::time::Instant::now(),
        stalled: AtomicBool::new(false),
        requests: std::sync::OnceLock::new(),
    });
    let (tx, rx) = mpsc::channel(queue);
    let _ = shared.requests.set(tx.downgrade());
    let thread_shared = shared.clone();
    let handle = std::thread::Builder::new()
        .name(format!("{name}-commit"))
        .spawn(move || commit_loop(thread_shared, rx, meta, changes, log_limits))
        .map_err(|e| DbError::Engine(fjall::Error::Io(e)))?;
    Ok((shared, tx, handle))
}

/// Applies the log entries after the checkpoint to the table loaded from it, exactly as they
/// were applied when logged (an entry is logged only when it was new, with the source and
/// serial it was applied with). Returns how many; `changes` then names the rows they changed,
/// for the next checkpoint.
pub(crate) fn replay(
    db: &Db,
    table: &mut Table,
    meta: &Meta,
    changes: &mut Changes,
) -> Result<u64, DbError> {
    let own_name = table.name().to_string();
    let mut next = meta.checkpoint_lsn + 1;
    let mut replayed = 0;
    while next <= meta.head_lsn {
        let before = next;
        for entry in db.read_log(next, 10_000)? {
            if entry.lsn != next || entry.lsn > meta.head_lsn {
                break;
            }
            let from_peer =
                (*entry.source != *own_name).then_some((&*entry.source, entry.source_serial));
            table.apply(entry.event, from_peer, changes);
            replayed += 1;
            next += 1;
        }
        if next == before {
            break;
        }
    }
    // Starting without an entry the table never got would serve, and replicate, a table that
    // silently lacks acknowledged events.
    if next <= meta.head_lsn {
        return Err(DbError::LogGap {
            missing: next,
            checkpoint: meta.checkpoint_lsn,
            head: meta.head_lsn,
        });
    }
    Ok(replayed)
}

/// Checks a whole request before any of it is applied: a batch is taken whole or not at all.
fn check<'a>(events: impl ExactSizeIterator<Item = &'a Event>) -> Result<(), (u32, String)> {
    if events.len() > MAX_BATCH_EVENTS {
        return Err((
            0,
            format!(
                "the batch has {} events; the limit is {MAX_BATCH_EVENTS}: send smaller batches",
                events.len()
            ),
        ));
    }
    for (i, event) in events.enumerate() {
        table::validate(event).map_err(|reason| (i as u32, reason))?;
    }
    Ok(())
}

/// New log entries of one group commit, encoded back to back in one reused buffer, each after
/// its length: the layout of a stored log block (see `db.rs`), so blocks are written as slices
/// of this buffer without another copy.
#[derive(Debug, Default)]
pub struct LogBuf {
    pub bytes: Vec<u8>,
    /// (LSN, end offset in `bytes`) per entry; each record starts where the previous ended.
    pub ends: Vec<(u64, usize)>,
    /// The newest entry of each source among these (see [`LogSources`]).
    sources: Vec<(String, u64)>,
    /// Runs of these entries logged as they came in a peer's packed segment, in order.
    kept: Vec<KeptRun>,
    /// Set while the entries pushed may turn out a kept run: [`LogBuf::push_encoded`] then
    /// notes an entry without its bytes, which the kept block stands for (copying them was a
    /// twentieth of the backup's CPU). [`Group::batch`] writes them after all if the run is
    /// not kept.
    deferring: bool,
}

/// Entries of a [`LogBuf`] that came in one packed segment of a peer's log and were all logged,
/// in order and as they came: stored as the peer's LZ4 block, not compressed again (the
/// backup's LZ4 was a tenth of its CPU in the pair, docs/PERFORMANCE.md). Only the LSNs in
/// the block are the peer's; a read puts this store's back (see `db.rs`).
#[derive(Debug)]
struct KeptRun {
    /// Its first entry's place in `ends`.
    from: usize,
    count: usize,
    /// The block's length unpacked, and the block.
    unpacked: usize,
    lz4: bytes::Bytes,
}

use tandem_protocol::message::ENTRY_LEN_PREFIX as LEN_PREFIX;

impl LogBuf {
    fn clear(&mut self) {
        self.bytes.clear();
        self.ends.clear();
        self.sources.clear();
        self.kept.clear();
        self.deferring = false;
    }

    /// Notes that the entries from the `from`th on are the packed segment `run`'s, logged as
    /// they came; false, keeping nothing, when no entry is from `from` on, they overlap a kept
    /// run, or the block's head could not hold its length or count.
    pub(crate) fn keep_packed(&mut self, from: usize, run: &PackedRun) -> bool {
        let count = self.ends.len().saturating_sub(from);
        if count == 0
            || u32::try_from(run.unpacked).is_err()
            || u32::try_from(count).is_err()
            || self
                .kept
                .last()
                .is_some_and(|last| last.from + last.count > from)
        {
            return false;
        }
        self.kept.push(KeptRun {
            from,
            count,
            unpacked: run.unpacked,
            lz4: run.lz4.clone(),
        });
        true
    }

    /// Notes that `lsn` came from `source`.
    fn note_source(&mut self, source: &str, lsn: u64) {
        raise(&mut self.sources, source, lsn);
    }

    /// Entries as (LSN, encoded bytes), but for those of kept runs, whose bytes only their
    /// peer's block holds: never this store's own entries.
    pub fn entries(&self) -> impl Iterator<Item = (u64, &[u8])> {
        let mut start = 0;
        self.ends.iter().filter_map(move |&(lsn, end)| {
            let whole = self.bytes.get(start..end);
            start = end;
            Some((lsn, whole?.get(LEN_PREFIX..)?))
        })
    }

    /// Writes the last `entries` entries' bytes, noted without them while deferring: each
    /// one's LSN, source, serial and event encoding, in order.
    fn undefer<'a>(
        &mut self,
        entries: impl ExactSizeIterator<Item = (u64, &'a str, u64, &'a [u8])>,
    ) {
        self.ends
            .truncate(self.ends.len().saturating_sub(entries.len()));
        for (lsn, source, serial, event) in entries {
            self.push_encoded(lsn, source, serial, event);
        }
    }

    /// Runs of consecutive entries: at most `max_entries` entries and `max_bytes` bytes,
    /// except that an entry larger than that is a block of its own; and each kept run (see
    /// [`KeptRun`]) as a block of its own, with the peer's block.
    pub fn blocks(
        &self,
        max_entries: usize,
        max_bytes: usize,
    ) -> impl Iterator<Item = LogBlock<'_>> {
        let (mut start, mut next) = (0, 0);
        let mut kept = self.kept.iter().peekable();
        std::iter::from_fn(move || {
            let &(first, mut end) = self.ends.get(next)?;
            let mut last = first;
            let from = next;
            let mut packed = None;
            let run = kept.next_if(|run| run.from == from);
            let run_end = run.and_then(|run| Some((run, *self.ends.get(from + run.count - 1)?)));
            if let Some((run, (lsn, to))) = run_end {
                (last, end, next) = (lsn, to, from + run.count);
                packed = Some((&run.lz4[..], run.unpacked));
            } else {
                let stop = kept.peek().map_or(usize::MAX, |run| run.from);
                next += 1;
                while let Some(&(lsn, to)) = self.ends.get(next) {
                    if next >= stop || next - from >= max_entries || to - start > max_bytes {
                        break;
                    }
                    (last, end) = (lsn, to);
                    next += 1;
                }
            }
            let bytes = &self.bytes[start..end];
            // Only a kept run's entries are noted without their bytes.
            debug_assert!(packed.is_some() || bytes.len() >= (next - from) * (LEN_PREFIX + 1));
            start = end;
            Some(LogBlock {
                first,
                last,
                count: next - from,
                bytes,
                packed,
            })
        })
    }

    /// Logs an event from its encoding: a log entry is its head (LSN, source, serial) and
    /// then the event's encoding, so the event need not be encoded again.
    fn push_encoded(&mut self, lsn: u64, source: &str, source_serial: u64, event: &[u8]) {
        if self.deferring {
            self.ends.push((lsn, self.bytes.len()));
            self.note_source(source, lsn);
            return;
        }
        let before = self.bytes.len();
        self.bytes.extend_from_slice(&[0; LEN_PREFIX]);
        if let Err(e) = append_bytes(&(lsn, source, source_serial), &mut self.bytes) {
            tracing::error!(error = %e, lsn, "log entry not encodable");
            self.bytes.truncate(before);
            return;
        }
        self.bytes.extend_from_slice(event);
        let len = (self.bytes.len() - before - LEN_PREFIX) as u32;
        self.bytes[before..before + LEN_PREFIX].copy_from_slice(&len.to_le_bytes());
        self.ends.push((lsn, self.bytes.len()));
        self.note_source(source, lsn);
    }

    pub(crate) fn push(&mut self, entry: LogEntryRef<'_>) {
        let before = self.bytes.len();
        self.bytes.extend_from_slice(&[0; LEN_PREFIX]);
        if let Err(e) = append_bytes(&entry, &mut self.bytes) {
            // Encoding to memory cannot fail for these types; if it ever does, the entry is
            // not logged rather than logged half.
            tracing::error!(error = %e, lsn = entry.lsn, "log entry not encodable");
            self.bytes.truncate(before);
            return;
        }
        let len = (self.bytes.len() - before - LEN_PREFIX) as u32;
        self.bytes[before..before + LEN_PREFIX].copy_from_slice(&len.to_le_bytes());
        self.ends.push((entry.lsn, self.bytes.len()));
        self.note_source(entry.source, entry.lsn);
    }
}

/// A run of log entries stored as one block (see [`LogBuf::blocks`]).
#[derive(Debug, Clone, Copy)]
pub struct LogBlock<'a> {
    /// The LSNs of its first and last entries.
    pub first: u64,
    pub last: u64,
    pub count: usize,
    /// The entries, each after its length.
    pub bytes: &'a [u8],
    /// For a kept run: the peer's LZ4 block of the same entries with the peer's LSNs, and its
    /// length unpacked.
    pub packed: Option<(&'a [u8], usize)>,
}

/// The newest log entry of each source, for a subscriber that leaves one source out: the
/// gateway never sends a store its own entries back, so on the backup nearly every entry is
/// one its subscriber skips. When none of the entries it has not had came from another
/// source, it is told its new position without the log being read (reading and unpacking
/// every block the backup wrote, to find nothing, was a twentieth of its CPU). Entries logged
/// before this process started count as from every source.
#[derive(Debug)]
pub struct LogSources {
    /// The head when the store started.
    floor: u64,
    newest: std::sync::Mutex<Vec<(String, u64)>>,
}

impl LogSources {
    fn new(floor: u64) -> LogSources {
        LogSources {
            floor,
            newest: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// The newest entries from `source` and from any other, as far as this store knows.
    /// Noted before the entries become durable, so they never lag the head a subscriber reads
    /// first.
    pub fn newest(&self, source: &str) -> Newest {
        let Ok(newest) = self.newest.lock() else {
            // Nothing known: every entry may be from anyone.
            return Newest {
                from: u64::MAX,
                others: u64::MAX,
            };
        };
        let mut found = Newest {
            from: self.floor,
            others: self.floor,
        };
        for (s, lsn) in newest.iter() {
            let slot = if s == source {
                &mut found.from
            } else {
                &mut found.others
            };
            *slot = (*slot).max(*lsn);
        }
        found
    }

    /// Notes a written group's sources.
    fn note(&self, group: &[(String, u64)]) {
        if group.is_empty() {
            return;
        }
        let Ok(mut newest) = self.newest.lock() else {
            return;
        };
        for (source, lsn) in group {
            raise(&mut newest, source, *lsn);
        }
    }
}

/// The newest log entries of one source and of all the others ([`LogSources::newest`]).
#[derive(Clone, Copy, Debug)]
pub struct Newest {
    pub from: u64,
    pub others: u64,
}

/// Raises `source`'s newest LSN in `list` to `lsn`: a group logs one or two sources, so a
/// scan of those is a comparison or two.
fn raise(list: &mut Vec<(String, u64)>, source: &str, lsn: u64) {
    match list.iter_mut().find(|(s, _)| s == source) {
        Some((_, newest)) => *newest = (*newest).max(lsn),
        None => list.push((source.to_string(), lsn)),
    }
}

/// One group commit's in-memory work: applying batches to the table and logging them.
struct Group<'a> {
    table: &'a mut Table,
    own_name: &'a str,
    meta: &'a mut Meta,
    changes: &'a mut Changes,
    log: &'a mut LogBuf,
    receiving: &'a mut Receiving,
    applied: u64,
    duplicates: u64,
}

impl Group<'_> {
    /// Applies a batch whole or refuses it whole, as `check` found all of it (`checked`): the
    /// events, for replicated entries the store each entered at and its serial there, and
    /// each event's encoding when it arrived encoded. The events' rows are looked up a few
    /// events ahead of their fold ([`Table::warm_events`]).
    fn batch<'a>(
        &mut self,
        checked: Result<(), (u32, String)>,
        events: Vec<Event>,
        mut sources: impl Iterator<Item = (&'a str, u64)>,
        mut encodings: impl Iterator<Item = &'a [u8]>,
        packed: &[PackedRun],
    ) -> Reply {
        if let Err((index, reason)) = checked {
            return Reply::Refused { index, reason };
        }
        let (mut applied, mut duplicates) = (0u32, 0u32);
        let mut events = events.into_iter();
        let mut packed = packed.iter().peekable();
        // The packed segment under way: it, where its entries start in the log, and whether
        // each so far was logged as it came.
        let mut run: Option<(&PackedRun, usize, bool)> = None;
        // While it is: its entries, logged without their bytes (see `LogBuf::deferring`).
        let mut deferred: Vec<(u64, &str, u64, &[u8])> = Vec::new();
        let mut at = 0;
        loop {
            self.table.warm_events(events.as_slice());
            let Some(mut event) = events.next() else {
                break;
            };
            if run.is_none() {
                if let Some(next) = packed.next_if(|p| p.entries.start == at) {
                    run = Some((next, self.log.ends.len(), true));
                }
            }
            at += 1;
            let source = sources.next();
            let mut encoded = encodings.next();
            if matches!(event.body, EventBody::Delete { .. }) {
                // Resolving a delete changes the event: its encoding is no longer its own.
                encoded = None;
                self.table.resolve_delete(&mut event);
            }
            // Logged as it came only from its encoding, with the peer's head.
            let as_came =
                encoded.is_some() && source.is_some_and(|(name, _)| name != self.own_name);
            let logged = self.log.ends.len();
            // A full resync under way must replay what this store logs for itself meanwhile.
            let noted = (source.is_none() && self.receiving.active())
                .then(|| event.identifier().to_string());
            let whole_so_far = run.as_ref().is_some_and(|(_, _, whole)| *whole);
            if whole_so_far && !as_came {
                // Not kept after all: what it deferred is written, ahead of this entry, as it
                // would have been.
                self.log.undefer(deferred.drain(..));
            }
            self.log.deferring = whole_so_far && as_came;
            let outcome = apply_one(
                self.table,
                event,
                encoded,
                source,
                self.own_name,
                self.meta,
                self.changes,
                self.log,
            );
            self.log.deferring = false;
            match outcome {
                Outcome::Applied => {
                    applied += 1;
                    if let Some(id) = noted {
                        self.receiving.note_own(&id, self.meta.head_lsn);
                    }
                }
                Outcome::Duplicate => duplicates += 1,
            }
            if let Some((_, _, whole)) = &mut run {
                *whole &= as_came && self.log.ends.len() == logged + 1;
                match (*whole, source, encoded) {
                    (true, Some((name, serial)), Some(event)) => {
                        deferred.push((self.meta.head_lsn, name, serial, event))
                    }
                    // A duplicate, which logged nothing: the deferred entries are the last.
                    _ => self.log.undefer(deferred.drain(..)),
                }
            }
            if let Some((segment, from, whole)) = run.take_if(|(p, ..)| p.entries.end == at) {
                // Whole: each of its entries logged one entry, so the run is all of them.
                if whole && self.log.keep_packed(from, segment) {
                    deferred.clear();
                }
                self.log.undefer(deferred.drain(..));
            }
        }
        // A run the batch's events ended inside (never from a peer's store) is not kept.
        self.log.undefer(deferred.drain(..));
        debug_assert!(!self.log.deferring);
        self.applied += u64::from(applied);
        self.duplicates += u64::from(duplicates);
        Reply::Ack {
            applied,
            duplicates,
        }
    }
}

/// Applies one event that entered the pair here or came from the peer, logging it first.
#[allow(clippy::too_many_arguments)]
fn apply_one(
    table: &mut Table,
    event: Event,
    encoded: Option<&[u8]>,
    source: Option<(&str, u64)>,
    own_name: &str,
    meta: &mut Meta,
    changes: &mut Changes,
    log: &mut LogBuf,
) -> Outcome {
    // Logged after the fold, and only if the fold took it: the fold's own duplicate check is
    // the only one, and for an own event it finds the row and so its serial (looking the row
    // up for the serial first was a seventh of the commit thread). Not for an own entry back
    // from the peer: that is folded as this store's but logged with the peer's serial.
    if let Some(encoded) = encoded.filter(|_| source.is_none_or(|(name, _)| name != own_name)) {
        let (outcome, serial) = table.apply_with_serial(event, source, changes);
        if outcome == Outcome::Applied {
            meta.head_lsn += 1;
            let (name, serial) = source.unwrap_or((own_name, serial));
            log.push_encoded(meta.head_lsn, name, serial, encoded);
        }
        return outcome;
    }
    if table.seen(&event.origin, event.seq) {
        // Still folded: a duplicate from the peer may carry who inserted the alert first.
        return table.apply(event, source, changes);
    }
    meta.head_lsn += 1;
    let (source, source_serial) =
        source.unwrap_or((own_name, table.serial_for(event.identifier())));
    match encoded {
        Some(encoded) => log.push_encoded(meta.head_lsn, source, source_serial, encoded),
        None => log.push(LogEntryRef {
            lsn: meta.head_lsn,
            source,
            source_serial,
            event: &event,
        }),
    }
    let from_peer = (source != own_name).then_some((source, source_serial));
    table.apply(event, from_peer, changes)
}

/// Writes the periodic checkpoints off the commit thread, so that the next commits do not wait
/// behind a checkpoint's batch and sync (it holds every changed row: 150-200 ms for 10,000 rows
/// on a loaded 2-core machine, a stall for every probe). One at a time, and the commit thread
/// builds the next only once the last is durable, so they land in order: an older
/// checkpoint landing after a newer one would put older rows back.
struct Checkpointer {
    /// None once stopping.
    jobs: Option<std::sync::mpsc::Sender<Checkpoint>>,
    thread: Option<std::thread::JoinHandle<()>>,
    done: std::sync::mpsc::Receiver<(Checkpoint, Result<(), DbError>)>,
    /// The LSN of the checkpoint being written, if any.
    writing: Option<u64>,
    /// The newest checkpoint known durable: the log must be kept after it.
    durable: u64,
    /// A checkpoint's buffers back from the writer, for the next one.
    spare: Checkpoint,
}

impl Checkpointer {
    /// `meta` as loaded: its checkpoint and first LSN are durable.
    fn start(shared: Arc<Shared>, meta: &Meta) -> std::io::Result<Checkpointer> {
        let (jobs, rx) = std::sync::mpsc::channel::<Checkpoint>();
        let (tx, done) = std::sync::mpsc::channel();
        let loaded_log_start = meta.first_lsn;
        let thread = std::thread::Builder::new()
            .name(format!("{}-checkpoint", shared.name))
            .spawn(move || {
                // What was trimmed before the last stop (or hidden by tombstones, before trims
                // dropped tables whole): here rather than in the start, which a failover waits
                // for, while dropping tables may wait for a compaction of the log.
                reclaim_log(&shared, loaded_log_start);
                for checkpoint in rx {
                    #[cfg(test)]
                    tests::hold_checkpoints_of(&shared.name);
                    let written = shared.db.write_checkpoint(&checkpoint);
                    let log_start = checkpoint.log_start;
                    if tx.send((checkpoint, written)).is_err() {
                        return;
                    }
                    // After the answer: dropping tables may wait for a compaction of the log,
                    // which the commit thread has no reason to wait for.
                    reclaim_log(&shared, log_start);
                }
            })?;
        Ok(Checkpointer {
            jobs: Some(jobs),
            thread: Some(thread),
            done,
            writing: None,
            durable: meta.checkpoint_lsn,
            spare: Checkpoint::default(),
        })
    }

    /// Takes in a finished checkpoint; with `block`, waits for the one being written.
    fn collect(&mut self, block: bool) {
        let Some(lsn) = self.writing else { return };
        let finished = if block {
            self.done.recv().ok()
        } else {
            match self.done.try_recv() {
                Ok(finished) => Some(finished),
                Err(std::sync::mpsc::TryRecvError::Empty) => return,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => None,
            }
        };
        match finished {
            Some((checkpoint, Ok(()))) => {
                self.writing = None;
                self.durable = lsn;
                self.spare = checkpoint;
            }
            Some((_, Err(e))) => {
                tracing::error!(error = %e, "writing a checkpoint failed; exiting so a restart reloads the last durable state");
                std::process::exit(1);
            }
            None => {
                tracing::error!(
                    "the checkpoint writer stopped; exiting so a restart reloads the last durable state"
                );
                std::process::exit(1);
            }
        }
    }

    fn write(&mut self, checkpoint: Checkpoint) {
        self.writing = Some(checkpoint.lsn);
        let sent = self.jobs.as_ref().map(|jobs| jobs.send(checkpoint));
        if !matches!(sent, Some(Ok(()))) {
            // Reported by the next `collect`.
            tracing::error!("the checkpoint writer stopped");
        }
    }
}

/// A failure costs only space, and the next checkpoint tries again.
fn reclaim_log(shared: &Shared, log_start: u64) {
    if let Err(e) = shared.db.reclaim_log(log_start) {
        tracing::warn!(error = %e, "giving back the trimmed log's space failed; the next checkpoint tries again");
    }
}

impl Drop for Checkpointer {
    /// The writer holds the store's database: it is gone when the commit thread is.
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One group commit's answers.
type Replies = Vec<(oneshot::Sender<Reply>, Reply)>;

/// A written group commit on its way to disk.
struct SyncJob {
    head: u64,
    replies: Replies,
    started: Instant,
}

/// What the checkpoints gain once the commit being synced is durable.
#[derive(Default)]
struct InFlight {
    /// A periodic checkpoint the commit built: its writer may only start after the sync.
    periodic: Option<Checkpoint>,
    /// A checkpoint in the commit's own batch: durable with it.
    forced: Option<Checkpoint>,
}

/// Syncs each written group commit on a thread of its own, then publishes the new head and
/// answers, while the commit thread applies the next group: the sync (a few milliseconds of
/// waiting on the disk) overlaps with the next group's work instead of adding to it. One
/// commit is in flight at most, and the next is written only after it is durable, so commits
/// reach the disk, the head and the answers in order. A sync that fails exits the process,
/// like a failed write.
struct Syncer {
    /// None once stopping.
    jobs: Option<std::sync::mpsc::SyncSender<SyncJob>>,
    done: std::sync::mpsc::Receiver<()>,
    thread: Option<std::thread::JoinHandle<()>>,
    in_flight: Option<InFlight>,
}

impl Syncer {
    fn start(shared: Arc<Shared>) -> std::io::Result<Syncer> {
        let (jobs, rx) = std::sync::mpsc::sync_channel::<SyncJob>(1);
        let (tx, done) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("{}-sync", shared.name))
            .spawn(move || {
                for job in rx {
                    if let Err(e) = shared.db.sync() {
                        tracing::error!(error = %e, "syncing a commit failed; exiting so a restart reloads the last durable state");
                        std::process::exit(1);
                    }
                    metrics::histogram!("tandem_store_commit_seconds")
                        .record(job.started.elapsed().as_secs_f64());
                    shared.head.send_replace(job.head);
                    for (reply, answer) in job.replies {
                        // A connection that went away no longer wants its answer; the events
                        // are durable.
                        let _ = reply.send(answer);
                    }
                    shared.sync_running(false);
                    if tx.send(()).is_err() {
                        return;
                    }
                }
            })?;
        Ok(Syncer {
            jobs: Some(jobs),
            done,
            thread: Some(thread),
            in_flight: None,
        })
    }

    fn send(&mut self, shared: &Shared, job: SyncJob, in_flight: InFlight) {
        shared.sync_running(true);
        self.in_flight = Some(in_flight);
        let sent = self.jobs.as_ref().map(|jobs| jobs.send(job));
        if !matches!(sent, Some(Ok(()))) {
            tracing::error!(
                "the sync thread stopped; exiting so a restart reloads the last durable state"
            );
            std::process::exit(1);
        }
    }

    /// Waits for the commit in flight, if any, to be durable, and passes on its checkpoint.
    fn wait(&mut self, checkpointer: &mut Checkpointer) {
        let Some(in_flight) = self.in_flight.take() else {
            return;
        };
        if self.done.recv().is_err() {
            tracing::error!(
                "the sync thread stopped; exiting so a restart reloads the last durable state"
            );
            std::process::exit(1);
        }
        if let Some(forced) = in_flight.forced {
            checkpointer.durable = forced.lsn;
            checkpointer.spare = forced;
        }
        if let Some(periodic) = in_flight.periodic {
            checkpointer.write(periodic);
        }
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Frees, on a thread of its own, the alert fields the commits displaced that no connection
/// takes back (see [`Leftovers`] and [`Table::take_displaced`]: a resync's merges, the store's
/// own housekeeping), and hands the emptied lists back for the next commits: a new list each
/// commit was memory the process had never touched, a quarter of the page faults of a new
/// store (docs/PERFORMANCE.md).
struct Freeing {
    batches: std::sync::mpsc::SyncSender<Vec<tandem_protocol::PackedFields>>,
    emptied: std::sync::mpsc::Receiver<Vec<tandem_protocol::PackedFields>>,
}

impl Freeing {
    fn start(name: &str) -> Option<Freeing> {
        let (batches, rx) = std::sync::mpsc::sync_channel::<Vec<tandem_protocol::PackedFields>>(4);
        let (back, emptied) = std::sync::mpsc::sync_channel(4);
        let started = std::thread::Builder::new()
            .name(format!("{name}-free"))
            .spawn(move || {
                for mut batch in rx {
                    batch.clear();
                    // Full: the commits have lists enough, and this one is freed.
                    let _ = back.try_send(batch);
                }
            });
        match started {
            Ok(_) => Some(Freeing { batches, emptied }),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start a thread to free displaced alert fields; the commit thread frees them");
                None
            }
        }
    }

    /// Passes a commit's displaced fields on; when the freeing thread is behind, they are
    /// freed right here.
    fn free(&self, displaced: Vec<tandem_protocol::PackedFields>) {
        let _ = self.batches.try_send(displaced);
    }

    /// An emptied list to collect the next commit's displaced fields in, if one is back.
    fn emptied(&self) -> Option<Vec<tandem_protocol::PackedFields>> {
        self.emptied.try_recv().ok()
    }
}

/// The alert fields a connection's events displaced, handed back to that connection to free
/// (for `Request::Events`: the commit thread decodes a peer's entries and frees theirs).
///
/// A connection's task decodes its events, so its thread allocated their fields; freed on the
/// commit thread or the freeing thread, each was a free from another thread, which mimalloc
/// makes the allocating thread collect again (together a tenth of a store's CPU under load,
/// docs/PERFORMANCE.md). Freed on the connection's task they are mostly the same thread's.
#[derive(Default)]
pub struct Leftovers {
    fields: std::sync::Mutex<Vec<tandem_protocol::PackedFields>>,
}

/// The longest emptied list a connection keeps for the next fields: one that grew past it
/// (a client that stopped reading its answers) is freed rather than held while the
/// connection lasts.
const LEFTOVERS_KEPT: usize = 4 * MAX_BATCH_EVENTS;

impl Leftovers {
    /// Moves the fields `table` displaced from its `from`th on in here: the commit thread,
    /// after each request that names this, with where the list stood before the request, so
    /// that fields other requests displaced go to the freeing thread. When the connection is
    /// gone (this is the last reference), they stay in the table for the freeing thread too,
    /// with any this still holds, so that dropping this frees nothing under the table's lock.
    fn take_from(self: &Arc<Self>, table: &mut Table, from: usize) {
        let mut fields = self.fields.lock().unwrap_or_else(|p| p.into_inner());
        if Arc::strong_count(self) == 1 {
            table.reclaim_displaced(&mut fields);
        } else {
            table.hand_displaced(from, &mut fields);
        }
    }

    /// Frees what is here, on the calling thread, outside the lock so that the commit thread
    /// does not wait for it.
    pub fn free(&self) {
        let mut taken = {
            let mut fields = self.fields.lock().unwrap_or_else(|p| p.into_inner());
            if fields.is_empty() {
                return;
            }
            std::mem::take(&mut *fields)
        };
        taken.clear();
        if taken.capacity() > LEFTOVERS_KEPT {
            return;
        }
        // The emptied list goes back to be filled again without growing; what came meanwhile
        // moves into it (only the list's items move under the lock: no field is freed there).
        let spare = {
            let mut fields = self.fields.lock().unwrap_or_else(|p| p.into_inner());
            taken.append(&mut fields);
            std::mem::replace(&mut *fields, taken)
        };
        drop(spare);
    }
}

/// Adds the requests already waiting to `group`, while it holds fewer than
/// [`MAX_GROUP_EVENTS`] events (`events` counts them).
fn take_waiting(rx: &mut mpsc::Receiver<Request>, group: &mut Vec<Request>, events: &mut usize) {
    while *events < MAX_GROUP_EVENTS {
        let Ok(req) = rx.try_recv() else { break };
        *events += req.len();
        group.push(req);
    }
}

fn commit_loop(
    shared: Arc<Shared>,
    mut rx: mpsc::Receiver<Request>,
    mut meta: Meta,
    mut changes: Changes,
    log_limits: LogLimits,
) {
    let log_retention = log_limits.retention;
    let own_origin = Origin::new(format!("{}/housekeeping", shared.name), meta.epoch);
    let own_name = shared.name.clone();
    let mut log = LogBuf::default();
    // Peers whose cursor moved since the last checkpoint, with where it is now.
    let mut checkpoint_cursors: Vec<(String, u64)> = Vec::new();
    // Trimming stops at the checkpoint: checkpoint well within the retained log, so a short
    // retention is not overrun while the log waits for the next checkpoint.
    let checkpoint_entries = CHECKPOINT_ENTRIES.min((log_retention / 4).max(1));
    let mut last_checkpoint = Instant::now();
    // Said once each time the log starts dropping entries the peer has not applied.
    let mut warned_past_peer = false;
    // The dirty set is kept from checkpoint to checkpoint: replayed rows are its first members.
    let mut checkpointed = false;
    let mut checkpointer = match Checkpointer::start(shared.clone(), &meta) {
        Ok(checkpointer) => checkpointer,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the checkpoint writer; stopping");
            std::process::exit(1);
        }
    };
    let mut syncer = match Syncer::start(shared.clone()) {
        Ok(syncer) => syncer,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the sync thread; stopping");
            std::process::exit(1);
        }
    };
    let freeing = Freeing::start(&shared.name);
    let mut group: Vec<Request> = Vec::new();
    let mut replies: Replies = Vec::new();
    let mut peers = PeerWrites::default();
    let mut receiving = Receiving::default();
    // Each peer's cursor as of the commit being built, read from disk once.
    let mut known_cursors: std::collections::HashMap<String, u64> = Default::default();
    // The fields a peer's entries displaced, which this thread's decoding allocated: freed here,
    // without the cross-thread work of handing them on, once the table is unlocked.
    let mut freed_here: Vec<tandem_protocol::PackedFields> = Vec::new();

    loop {
        let first = match rx.try_recv() {
            Ok(first) => first,
            Err(mpsc::error::TryRecvError::Disconnected) => break,
            Err(mpsc::error::TryRecvError::Empty) => {
                // Nothing to overlap with: finish the commit in flight first, so that its
                // periodic checkpoint goes to its writer now rather than after a quiet spell.
                syncer.wait(&mut checkpointer);
                match rx.blocking_recv() {
                    Some(first) => first,
                    None => break,
                }
            }
        };
        shared.commit_running(true);
        let mut events = first.len();
        group.push(first);
        take_waiting(&mut rx, &mut group, &mut events);
        let started = Instant::now();
        checkpointer.collect(false);
        let (applied_total, dup_total);
        let displaced;
        let mut in_flight = InFlight::default();
        // The connections' lists this group used, dropped once the table is unlocked: the
        // last reference to a closed connection's list frees what it holds.
        let mut connections: Vec<Arc<Leftovers>> = Vec::new();
        {
            let Ok(mut table) = shared.table.write() else {
                tracing::error!("the alert table lock is poisoned; stopping");
                std::process::exit(1);
            };
            if checkpointed {
                table.start_commit(&mut changes);
            }
            if let Some(list) = freeing.as_ref().and_then(Freeing::emptied) {
                table.recycle_displaced(list);
            }
            table.reserve_displaced(events);
            let mut merged = false;
            let mut work = Group {
                table: &mut table,
                own_name: &own_name,
                meta: &mut meta,
                changes: &mut changes,
                log: &mut log,
                receiving: &mut receiving,
                applied: 0,
                duplicates: 0,
            };
            loop {
                for req in group.drain(..) {
                    match req {
                        Request::Events {
                            events,
                            encoded,
                            reply,
                            leftovers,
                        } => {
                            let checked = check(events.iter());
                            let from = work.table.displaced_len();
                            let answer = work.batch(
                                checked,
                                events,
                                std::iter::empty(),
                                encoded.iter(),
                                &[],
                            );
                            if let Some(leftovers) = leftovers {
                                leftovers.take_from(work.table, from);
                                connections.push(leftovers);
                            }
                            replies.push((reply, answer));
                        }
                        Request::Replicate {
                            peer,
                            after,
                            cursor,
                            entries,
                            reply,
                        } => {
                            let known = match known_cursors.get(&peer) {
                                Some(&lsn) => lsn,
                                None => shared.db.cursor(&peer).unwrap_or(0),
                            };
                            if after > known {
                                // Applying these would skip the entries in between for good.
                                let reason = format!(
                                    "these entries of {peer}'s log follow LSN {after}, but this store has applied it only up to {known}; resubscribe from the cursor"
                                );
                                replies.push((reply, Reply::Refused { index: 0, reason }));
                                continue;
                            }
                            // Decoded here, folded next while in cache: see `Request::Replicate`.
                            let entries = match entries.decode_keeping_event_bytes() {
                                Ok(decoded) => decoded,
                                Err(e) => {
                                    let reason = format!("the log entries do not decode: {e}");
                                    replies.push((reply, Reply::Refused { index: 0, reason }));
                                    continue;
                                }
                            };
                            let checked = check(entries.events.iter());
                            let from = work.table.displaced_len();
                            let answer = work.batch(
                                checked,
                                entries.events,
                                entries.sources.iter(),
                                entries.encoded.iter(),
                                &entries.packed,
                            );
                            work.table.hand_displaced(from, &mut freed_here);
                            if matches!(answer, Reply::Ack { .. }) && cursor > known {
                                // Never backwards: a second gateway may replay older pages.
                                known_cursors.insert(peer.clone(), cursor);
                                peers.set_cursor(&peer, cursor);
                            }
                            replies.push((reply, answer));
                        }
                        Request::Merge {
                            peer,
                            chunk,
                            rows,
                            encoded,
                            reply,
                        } => {
                            // Snapshot records are not logged: only a checkpoint keeps them.
                            merged = true;
                            let io = MergeIo {
                                db: &shared.db,
                                log: work.log,
                                meta: work.meta,
                                own_name: &own_name,
                                changes: work.changes,
                                writes: &mut peers,
                            };
                            let answer = match work
                                .receiving
                                .merge(&peer, chunk, rows, encoded, work.table, io)
                            {
                                Ok((answer, finished)) => {
                                    if let Some(lsn) = finished {
                                        // Exactly the snapshot's position, even if lower: the peer
                                        // may have lost its data and started its log again.
                                        known_cursors.insert(peer.clone(), lsn);
                                        peers.set_cursor(&peer, lsn);
                                    }
                                    answer
                                }
                                Err(e) => Reply::Refused {
                                    index: 0,
                                    reason: format!("merging the snapshot failed: {e}"),
                                },
                            };
                            replies.push((reply, answer));
                        }
                        Request::Housekeeping { bodies } => {
                            let now = crate::now_ms();
                            let first = work.meta.housekeeping_seq;
                            work.meta.housekeeping_seq += bodies.len() as u64;
                            let events: Vec<Event> = bodies
                                .into_iter()
                                .zip(first + 1..)
                                .map(|(body, seq)| Event {
                                    origin: own_origin.clone(),
                                    seq,
                                    time: now,
                                    body,
                                })
                                .collect();
                            let checked = check(events.iter());
                            work.batch(
                                checked,
                                events,
                                std::iter::empty(),
                                std::iter::empty(),
                                &[],
                            );
                        }
                    }
                }
                // Applied while the last group synced: written only once that one is durable,
                // and the checkpoint decisions below need to know what is.
                if syncer.in_flight.is_none() {
                    break;
                }
                syncer.wait(&mut checkpointer);
                // What arrived meanwhile joins this group: fewer, larger commits.
                take_waiting(&mut rx, &mut group, &mut events);
                if group.is_empty() {
                    break;
                }
            }
            (applied_total, dup_total) = (work.applied, work.duplicates);
            // Usually empty now that connections take theirs back: sent on only when not.
            displaced = (table.displaced_len() > 0).then(|| table.take_displaced());
            shared.alive.store(table.alive(), Ordering::Relaxed);
            for (peer, lsn) in &peers.cursors {
                checkpoint_cursors.retain(|(p, _)| p != peer);
                checkpoint_cursors.push((peer.clone(), *lsn));
            }
            let retained = meta.head_lsn.saturating_sub(meta.first_lsn) + 1;
            let unchanged = changes.rows.is_empty()
                && changes.origins.is_empty()
                && changes.clears.is_empty()
                && checkpoint_cursors.is_empty()
                && meta.head_lsn == meta.checkpoint_lsn;
            // What only a checkpoint keeps must be in this commit's batch, acknowledged with it.
            let forced = merged || changes.unlogged;
            // Trimming never passes the checkpoint; when it would, checkpoint now.
            let due = !unchanged
                && (last_checkpoint.elapsed() >= CHECKPOINT_INTERVAL
                    || meta.head_lsn - meta.checkpoint_lsn >= checkpoint_entries
                    || changes.rows.len() >= CHECKPOINT_ROWS
                    || (retained > log_retention && meta.first_lsn > meta.checkpoint_lsn));
            if forced {
                // In order: the one being written holds older rows.
                checkpointer.collect(true);
            }
            // A periodic checkpoint waits while the last is still being written.
            let checkpoint = forced || (due && checkpointer.writing.is_none());
            let mut encoded = None;
            if checkpoint {
                meta.next_serial = table.next_serial();
                meta.checkpoint_lsn = meta.head_lsn;
                let mut next = std::mem::take(&mut checkpointer.spare);
                if let Err(e) = next.encode(&table, &changes, &meta, &checkpoint_cursors) {
                    tracing::error!(error = %e, "encoding a checkpoint failed; exiting so a restart reloads the last durable state");
                    std::process::exit(1);
                }
                encoded = Some(next);
            }
            // A resync being received replays this store's own entries: keep them till done.
            if retained > log_retention && !receiving.active() {
                // Only a durable checkpoint covers the log before it.
                let kept_from = if forced {
                    meta.checkpoint_lsn
                } else {
                    checkpointer.durable
                };
                let peer_cursor = *shared.peer_cursor.borrow();
                meta.first_lsn =
                    log_limits.trimmed_start(meta.first_lsn, meta.head_lsn, peer_cursor, kept_from);
                let dropping_unapplied = meta.first_lsn > peer_cursor.saturating_add(1);
                if dropping_unapplied && !warned_past_peer {
                    tracing::warn!(
                        first_lsn = meta.first_lsn,
                        peer_cursor,
                        log_max_entries = log_limits.max,
                        "the log is at log_max_entries and is trimming entries the peer has not applied: the peer will need a full resync, which may undercount alerts both stores counted apart (docs/NOTES.md); raise log_max_entries or bring the peer back"
                    );
                }
                warned_past_peer = dropping_unapplied;
            }
            if let Some(encoded) = encoded.as_mut() {
                encoded.log_start = meta.first_lsn;
            }
            let written = shared.db.write(
                &log,
                &meta,
                &peers,
                encoded.as_ref().filter(|_| forced),
                &table,
            );
            if let Err(e) = written {
                tracing::error!(error = %e, "commit failed; exiting so a restart reloads the last durable state");
                std::process::exit(1);
            }
            // Before the sync publishes the new head.
            shared.log_sources.note(&log.sources);
            if let Some(encoded) = encoded {
                checkpoint_cursors.clear();
                last_checkpoint = Instant::now();
                if forced {
                    in_flight.forced = Some(encoded);
                } else {
                    in_flight.periodic = Some(encoded);
                }
            }
            checkpointed = checkpoint;
        }
        metrics::histogram!("tandem_store_batch_events").record(events as f64);
        metrics::counter!("tandem_store_events_applied_total").increment(applied_total);
        metrics::counter!("tandem_store_duplicates_total").increment(dup_total);
        shared
            .events_applied
            .fetch_add(applied_total, Ordering::Relaxed);
        shared.duplicates.fetch_add(dup_total, Ordering::Relaxed);
        shared.first_lsn.store(meta.first_lsn, Ordering::Relaxed);
        let job = SyncJob {
            head: meta.head_lsn,
            replies: std::mem::take(&mut replies),
            started,
        };
        syncer.send(&shared, job, in_flight);
        shared.commit_running(false);
        if let (Some(freeing), Some(displaced)) = (&freeing, displaced) {
            freeing.free(displaced);
        }
        drop(connections);
        freed_here.clear();
        log.clear();
        peers.clear();
    }
    syncer.wait(&mut checkpointer);
    drop(syncer);
    let started = Instant::now();
    checkpointer.collect(true);
    // A last checkpoint, so the next start has no log to replay.
    if meta.head_lsn != meta.checkpoint_lsn
        || !changes.rows.is_empty()
        || !checkpoint_cursors.is_empty()
        || changes.unlogged
    {
        if let Ok(table) = shared.table.read() {
            meta.next_serial = table.next_serial();
            meta.checkpoint_lsn = meta.head_lsn;
            log.clear();
            peers.clear();
            let mut last = std::mem::take(&mut checkpointer.spare);
            let written = last
                .encode(&table, &changes, &meta, &checkpoint_cursors)
                .and_then(|()| shared.db.write(&log, &meta, &peers, Some(&last), &table))
                .and_then(|()| shared.db.sync());
            if let Err(e) = written {
                tracing::warn!(error = %e, "the last checkpoint failed; the next start replays the log");
            }
        }
    }
    match shared.db.flush(FLUSH_WITHIN) {
        Ok(()) => tracing::info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "flushed the storage engine for a quick start"
        ),
        Err(e) => {
            tracing::warn!(error = %e, "flush at shutdown failed; the next start replays the journal")
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use tandem_protocol::{AlertFields, Severity};

    use super::*;

    /// Stores whose checkpoint writer waits before writing: a checkpoint the commit thread has
    /// built but that is not on disk, as at a crash in the middle of writing it.
    static HELD: Mutex<Vec<String>> = Mutex::new(Vec::new());

    pub(super) fn hold_checkpoints_of(store: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while HELD.lock().unwrap().iter().any(|s| s == store) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn log_blocks_keep_to_both_limits_and_cover_every_entry_in_order() {
        // Entries of 10 to ~3,000 bytes, and one of 9,000 that is larger than a block may be.
        let mut log = LogBuf::default();
        for lsn in 1..=400u64 {
            let size = if lsn == 200 {
                9_000
            } else {
                10 + (lsn * 7_919 % 3_000) as usize
            };
            log.push_encoded(lsn, "P", lsn, &vec![b'x'; size]);
        }
        let (max_entries, max_bytes) = (16, 8_192);
        let blocks: Vec<LogBlock<'_>> = log.blocks(max_entries, max_bytes).collect();
        let joined: Vec<u8> = blocks
            .iter()
            .flat_map(|b| b.bytes.iter().copied())
            .collect();
        assert_eq!(
            joined, log.bytes,
            "the blocks are the log's bytes, in order, once"
        );
        let mut lsns = log.ends.iter().map(|&(lsn, _)| lsn).peekable();
        for &LogBlock {
            first,
            last,
            count,
            bytes: block,
            ..
        } in &blocks
        {
            assert_eq!(
                Some(first),
                lsns.next(),
                "a block is keyed by its first entry"
            );
            // Walk the block's entries by their length prefixes.
            let (mut at, mut entries) = (0, 0);
            while at < block.len() {
                let len = u32::from_le_bytes(block[at..at + LEN_PREFIX].try_into().unwrap());
                at += LEN_PREFIX + len as usize;
                entries += 1;
            }
            assert_eq!(at, block.len(), "a block ends on an entry's end");
            assert_eq!(count, entries, "a block counts its entries");
            let mut newest = first;
            for _ in 1..entries {
                newest = lsns.next().unwrap();
            }
            assert_eq!(last, newest, "a block knows its last entry");
            assert!(entries <= max_entries);
            assert!(
                block.len() <= max_bytes || entries == 1,
                "a block of {} bytes with {entries} entries",
                block.len()
            );
        }
        assert_eq!(lsns.next(), None);
        assert!(blocks.iter().any(|b| b.bytes.len() > max_bytes));
        // Small entries fill a block up to the entry limit.
        let mut small = LogBuf::default();
        for lsn in 1..=40u64 {
            small.push_encoded(lsn, "P", lsn, b"e");
        }
        let firsts: Vec<u64> = small.blocks(16, 8_192).map(|b| b.first).collect();
        assert_eq!(firsts, vec![1, 17, 33]);
    }

    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy_dir(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), target).unwrap();
            }
        }
    }

    fn event(seq: u64) -> Event {
        Event {
            origin: Origin::new("probe", 1),
            seq,
            time: 1_700_000_000_000 + seq as i64,
            body: EventBody::Occurrence(
                AlertFields {
                    identifier: format!("alert-{seq}"),
                    node: "host".into(),
                    summary: format!("event {seq}"),
                    severity: Severity::MINOR,
                    ..AlertFields::default()
                }
                .pack(),
            ),
        }
    }

    /// A log of `n` entries, whatever the peer has applied.
    fn only(n: u64) -> LogLimits {
        LogLimits {
            retention: n,
            max: n,
        }
    }

    fn send(tx: &mpsc::Sender<Request>, seq: u64) {
        let (reply, rx) = oneshot::channel();
        tx.blocking_send(Request::Events {
            events: vec![event(seq)],
            encoded: RecordBytes::default(),
            reply,
            leftovers: None,
        })
        .unwrap();
        assert!(matches!(rx.blocking_recv().unwrap(), Reply::Ack { .. }));
    }

    /// The fields a connection's events displace come back to that connection, to be freed
    /// on its own thread.
    #[test]
    fn displaced_fields_go_back_to_the_connection_that_sent_their_events() {
        let dir = tempfile::tempdir().unwrap();
        let (shared, tx, thread) =
            start("LEFTOVERS", &dir.path().join("store"), 16, only(1_000)).unwrap();
        let leftovers = Arc::new(Leftovers::default());
        let occurrence = |seq: u64, summary: &str| {
            let mut e = event(seq);
            e.body = EventBody::Occurrence(
                AlertFields {
                    identifier: "disk:/var".into(),
                    node: "host".into(),
                    summary: summary.into(),
                    severity: Severity::MINOR,
                    ..AlertFields::default()
                }
                .pack(),
            );
            e
        };
        let request = |events: Vec<Event>| {
            let (reply, rx) = oneshot::channel();
            tx.blocking_send(Request::Events {
                events,
                encoded: RecordBytes::default(),
                reply,
                leftovers: Some(leftovers.clone()),
            })
            .unwrap();
            assert!(matches!(rx.blocking_recv().unwrap(), Reply::Ack { .. }));
        };
        let held = || held(&leftovers);
        request(vec![occurrence(1, "91% full")]);
        // The first occurrence displaced only the new row's empty fields.
        assert_eq!(held(), 1);
        request(vec![occurrence(2, "92% full"), occurrence(3, "92% full")]);
        assert_eq!(held(), 3, "one displaced field per occurrence");
        leftovers.free();
        assert_eq!(held(), 0);
        let row = shared
            .table
            .read()
            .unwrap()
            .row("disk:/var")
            .unwrap()
            .state
            .clone();
        assert_eq!(row.latest.value.summary(), "92% full");
        assert_eq!(crate::fold::tally(&row), 3);
        drop(tx);
        drop(shared);
        thread.join().unwrap();
    }

    /// Once its connection is gone, a list's fields go back to the table for the freeing
    /// thread, with the ones it still held, instead of being freed with the list.
    #[test]
    fn a_closed_connections_fields_go_back_to_the_table() {
        let mut table = Table::new("GONE");
        let mut changes = table::Changes::default();
        let leftovers = Arc::new(Leftovers::default());
        let connection = leftovers.clone();
        assert_eq!(table.apply(event(1), None, &mut changes), Outcome::Applied);
        leftovers.take_from(&mut table, 0);
        assert_eq!((table.displaced_len(), held(&leftovers)), (0, 1));
        drop(connection);
        let from = table.displaced_len();
        assert_eq!(table.apply(event(2), None, &mut changes), Outcome::Applied);
        leftovers.take_from(&mut table, from);
        assert_eq!((table.displaced_len(), held(&leftovers)), (2, 0));
    }

    fn held(leftovers: &Leftovers) -> usize {
        leftovers.fields.lock().unwrap().len()
    }

    /// A checkpoint falls due every `CHECKPOINT_INTERVAL` while anything changes, and it must
    /// be written even if nothing else arrives after the commit that took it: a crash in the
    /// quiet spell would otherwise replay the whole log since the last one.
    #[test]
    fn a_checkpoint_is_written_when_the_store_falls_quiet() {
        let dir = tempfile::tempdir().unwrap();
        let (shared, tx, thread) =
            start("QUIET", &dir.path().join("store"), 16, only(1_000)).unwrap();
        send(&tx, 1);
        std::thread::sleep(CHECKPOINT_INTERVAL + Duration::from_millis(200));
        send(&tx, 2);
        let deadline = Instant::now() + Duration::from_secs(30);
        let checkpoint = || {
            shared
                .db
                .snapshot_position(&shared.db.snapshot(), "-")
                .unwrap()
                .0
        };
        while checkpoint() < 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(checkpoint(), 2, "the due checkpoint was not written");
        drop(tx);
        drop(shared);
        thread.join().unwrap();
    }

    /// The log keeps what the peer has not applied past its retention, up to its maximum, and
    /// lets it go once the peer has applied it.
    #[test]
    fn the_log_keeps_what_the_peer_lacks_up_to_its_maximum() {
        let dir = tempfile::tempdir().unwrap();
        let limits = LogLimits {
            retention: 20,
            max: 200,
        };
        let (shared, tx, thread) = start("HOLD", &dir.path().join("store"), 16, limits).unwrap();
        let first = || shared.first_lsn.load(Ordering::Relaxed);
        // Trimming follows commits and durable checkpoints, so each step sends until the log
        // has moved as far as it may, or a bound is reached.
        let mut seq = 0;
        let mut send_until =
            |last: u64, done: &dyn Fn() -> bool, most_first: &dyn Fn(u64) -> u64| {
                while seq < last && !done() {
                    seq += 1;
                    send(&tx, seq);
                    assert!(
                        first() <= most_first(seq),
                        "at head {seq} the log starts at {}, past {}",
                        first(),
                        most_first(seq)
                    );
                }
            };

        // No peer has said how far it got: nothing is trimmed up to the maximum.
        send_until(150, &|| false, &|_| 1);
        assert_eq!(first(), 1);

        // The peer has applied up to 100: the log may start at 101, no further.
        shared.peer_cursor.send_replace(100);
        send_until(200, &|| first() == 101, &|_| 101);
        assert_eq!(
            first(),
            101,
            "the entries the peer applied were not trimmed"
        );

        // Past the maximum, the oldest entries go even though the peer lacks them.
        send_until(400, &|| false, &|head| {
            101.max((head + 1).saturating_sub(200))
        });
        assert!(
            first() > 101,
            "a log over its maximum kept everything the peer lacks"
        );

        // Once the peer has applied everything, the log shrinks to its retention.
        shared.peer_cursor.send_replace(400);
        send_until(
            1_000,
            &|| *shared.head.borrow() + 1 - first() <= 40,
            &|head| head + 1 - 20,
        );
        assert!(
            *shared.head.borrow() + 1 - first() <= 40,
            "the log kept {} entries after the peer applied them",
            *shared.head.borrow() + 1 - first()
        );
        drop(tx);
        drop(shared);
        thread.join().unwrap();
    }

    proptest::proptest! {
        /// One commit's trim keeps the retention, what the peer lacks (up to the maximum) and
        /// what no durable checkpoint covers, and moves at most `TRIM_PER_COMMIT`; and it goes
        /// as far as those rules allow: one entry more would break one of them.
        #[test]
        fn a_trim_keeps_what_it_must_and_no_more(
            retention in 1u64..50,
            extra in 0u64..100,
            first in 1u64..500,
            len in 0u64..20_000,
            peer in 0u64..21_000,
            kept in 0u64..21_000,
        ) {
            let limits = LogLimits { retention, max: retention + extra };
            let head = first + len - 1;
            let next = limits.trimmed_start(first, head, peer, kept);
            proptest::prop_assert!(next >= first);
            if next > first {
                let kept_after = head + 1 - next;
                proptest::prop_assert!(next - first <= TRIM_PER_COMMIT);
                proptest::prop_assert!(kept_after >= retention);
                proptest::prop_assert!(next <= kept + 1);
                if next > peer + 1 {
                    proptest::prop_assert!(kept_after >= limits.max);
                }
            }
            let further = next + 1;
            let left = (head + 1).saturating_sub(further);
            proptest::prop_assert!(
                further - first > TRIM_PER_COMMIT
                    || further > head + 1
                    || left < retention
                    || further > kept + 1
                    || (further > peer + 1 && left < limits.max)
            );
        }
    }

    /// The log before a checkpoint may only be trimmed once that checkpoint is on disk: rows
    /// are written by checkpoints alone, so a log trimmed up to a checkpoint still being
    /// written would leave a crash at that moment with neither. The writer is held, the data
    /// directory copied as a crash would leave it, and the copy must hold every acknowledged
    /// event.
    #[test]
    fn the_log_is_kept_until_the_checkpoint_that_covers_it_is_durable() {
        const STORE: &str = "HELD_CHECKPOINTS";
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        HELD.lock().unwrap().push(STORE.to_string());
        let (shared, tx, thread) = start(STORE, &path, 16, only(20)).unwrap();
        let sent = 200u64;
        for seq in 1..=sent {
            send(&tx, seq);
        }
        let (head, first) = (
            *shared.head.borrow(),
            shared.first_lsn.load(Ordering::Relaxed),
        );
        assert_eq!(head, sent);
        assert_eq!(
            first, 1,
            "the log was trimmed while its checkpoint was not durable"
        );
        let crashed = dir.path().join("crashed");
        copy_dir(&path, &crashed);
        HELD.lock().unwrap().clear();
        drop(tx);
        drop(shared);
        thread.join().unwrap();

        let (shared, tx, thread) = start(STORE, &crashed, 16, only(20)).unwrap();
        assert_eq!(shared.alert_count(), sent);
        assert_eq!(*shared.head.borrow(), sent);
        drop(tx);
        drop(shared);
        thread.join().unwrap();
    }

    /// A store, AGG_B, that logged two events of its own (LSNs 1 and 2) and was then sent the
    /// peer's log of `events` in one `Replicate` batch, as packed blocks of 100 entries: entry
    /// n (from 1) came to the peer from `source(n)`, with serial n.
    struct Replicated {
        dir: tempfile::TempDir,
        path: std::path::PathBuf,
        shared: Arc<Shared>,
        tx: mpsc::Sender<Request>,
        thread: std::thread::JoinHandle<()>,
        reply: Reply,
        /// Its log as read back.
        log: Vec<tandem_protocol::message::LogEntry>,
    }

    fn replicate_peer_log(events: &[Event], source: impl Fn(u64) -> &'static str) -> Replicated {
        use tandem_protocol::message::LogBatch;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let (shared, tx, thread) = start("AGG_B", &path, 16, only(1_000_000)).unwrap();
        send(&tx, 1);
        send(&tx, 2);
        let mut peer = LogBuf::default();
        for (lsn, e) in (1..).zip(events) {
            peer.push(LogEntryRef {
                lsn,
                source: source(lsn),
                source_serial: lsn,
                event: e,
            });
        }
        let mut batch = LogBatch::default();
        for block in peer.blocks(100, usize::MAX) {
            let lz4 = lz4_flex::block::compress(block.bytes);
            batch.push_packed(block.count as u32, block.bytes.len() as u32, &lz4);
        }
        let decoded = batch.clone().decode_keeping_event_bytes().unwrap();
        let runs: Vec<_> = decoded.packed.iter().map(|p| p.entries.clone()).collect();
        let blocks: Vec<_> = (0..events.len())
            .step_by(100)
            .map(|a| a..(a + 100).min(events.len()))
            .collect();
        assert_eq!(runs, blocks, "each block found as a packed segment");
        let (reply, rx) = oneshot::channel();
        tx.blocking_send(Request::Replicate {
            peer: "AGG_P".into(),
            after: 0,
            cursor: events.len() as u64,
            entries: batch,
            reply,
        })
        .unwrap();
        let reply = rx.blocking_recv().unwrap();
        let log = shared.db.read_log(1, 10_000).unwrap();
        Replicated {
            dir,
            path,
            shared,
            tx,
            thread,
            reply,
            log,
        }
    }

    impl Replicated {
        /// Checks that the log holds this store's two events and then each of the peer's
        /// `events` but the `duplicates` (their serials), in order, under consecutive LSNs, each
        /// as sent (but a delete, which is logged resolved).
        fn assert_logged(&self, events: &[Event], duplicates: &[u64]) {
            let lsns: Vec<u64> = self.log.iter().map(|e| e.lsn).collect();
            let expected = 2 + events.len() - duplicates.len();
            assert_eq!(lsns, (1..=expected as u64).collect::<Vec<_>>());
            assert_eq!(*self.shared.head.borrow(), expected as u64);
            let logged: Vec<u64> = self.log[2..].iter().map(|e| e.source_serial).collect();
            let peers: Vec<u64> = (1..=events.len() as u64)
                .filter(|n| !duplicates.contains(n))
                .collect();
            assert_eq!(logged, peers, "every entry but the duplicates, in order");
            for entry in &self.log[2..] {
                let sent = &events[entry.source_serial as usize - 1];
                if !matches!(sent.body, EventBody::Delete { .. }) {
                    assert_eq!(&entry.event, sent);
                }
            }
        }

        /// Checks that a store restarted from a copy of this one's files (nothing checkpointed,
        /// so all of the log replayed) holds the same alerts, head and log.
        fn assert_replays(self) {
            let alerts = self.shared.alert_count();
            let head = *self.shared.head.borrow();
            let crashed = self.dir.path().join("crashed");
            copy_dir(&self.path, &crashed);
            drop(self.tx);
            drop(self.shared);
            self.thread.join().unwrap();

            let (shared, tx, thread) = start("AGG_B", &crashed, 16, only(1_000_000)).unwrap();
            assert_eq!(shared.alert_count(), alerts);
            assert_eq!(*shared.head.borrow(), head);
            assert_eq!(shared.db.read_log(1, 10_000).unwrap(), self.log);
            drop(tx);
            drop(shared);
            thread.join().unwrap();
        }
    }

    /// The peer's `n` events from its own probe, but where `change` says otherwise.
    fn peer_events(n: u64, change: impl Fn(u64) -> Option<Event>) -> Vec<Event> {
        (1..=n)
            .map(|n| {
                change(n).unwrap_or_else(|| {
                    let mut e = event(n);
                    e.origin = Origin::new("peer-probe", 1);
                    e
                })
            })
            .collect()
    }

    /// A delete of the peer's event `n`'s alert, from the peer's probe.
    fn peer_delete(n: u64, of: u64) -> Event {
        let mut e = event(n);
        e.origin = Origin::new("peer-probe", 1);
        e.body = EventBody::Delete {
            identifier: format!("alert-{of}"),
            seen: None,
        };
        e
    }

    /// A replicated batch's packed segments are logged as the peer's blocks when every entry
    /// of one was logged as it came, and re-encoded when one was not (a duplicate here, a
    /// delete, whose resolution changes it, an entry under this store's own name); the log
    /// reads back in order with this store's LSNs, and a store restarted from it (nothing
    /// checkpointed, so all of it replayed) holds the same alerts.
    #[test]
    fn a_replicated_segment_is_logged_as_the_peers_block_and_replays() {
        // The peer's 500 entries in five blocks; the 150th is this store's event 2 again,
        // the 350th a delete, the 450th came from this store.
        let events = peer_events(500, |n| match n {
            150 => Some(event(2)),
            350 => Some(peer_delete(n, 349)),
            _ => None,
        });
        let store = replicate_peer_log(&events, |n| if n == 450 { "AGG_B" } else { "AGG_P" });
        assert!(matches!(
            store.reply,
            Reply::Ack {
                applied: 499,
                duplicates: 1
            }
        ));
        store.assert_logged(&events, &[150]);
        assert_eq!(
            store.shared.db.log_kinds(),
            [
                (1, "plain"),
                (2, "plain"),
                (3, "kept"),
                (103, "packed"),
                (202, "kept"),
                (302, "packed")
            ],
            "the segments with the duplicate, the delete and this store's entry packed again \
             (the last two together, as blocks of the store's own)"
        );
        store.assert_replays();
    }

    /// The edges of the runs that are not kept: a duplicate first in one and last in another,
    /// an entry of the store's own first in one and last in another, a delete first; and two
    /// kept runs side by side. Every entry is logged once, in order, and replays.
    #[test]
    fn runs_broken_at_their_first_or_last_entry_are_logged_whole_and_neighbours_kept() {
        // Eight blocks of 100: the 1st entry is this store's event 1 again, the 200th its
        // event 2, the 601st a delete; the 201st and the 600th came from this store.
        let events = peer_events(800, |n| match n {
            1 => Some(event(1)),
            200 => Some(event(2)),
            601 => Some(peer_delete(n, 5)),
            _ => None,
        });
        let store = replicate_peer_log(&events, |n| {
            if n == 201 || n == 600 {
                "AGG_B"
            } else {
                "AGG_P"
            }
        });
        assert!(
            matches!(
                store.reply,
                Reply::Ack {
                    applied: 798,
                    duplicates: 2
                }
            ),
            "{:?}",
            store.reply
        );
        store.assert_logged(&events, &[1, 200]);
        let kept: Vec<u64> = store
            .shared
            .db
            .log_kinds()
            .into_iter()
            .filter(|(_, kind)| *kind == "kept")
            .map(|(first, _)| first)
            .collect();
        assert_eq!(
            kept,
            [301, 401, 701],
            "the whole blocks kept, side by side too"
        );
        store.assert_replays();
    }

    /// A peer's batch that does not decode (a count it does not hold, data that does not
    /// unpack) is refused whole, as it was before the commit thread decoded batches: nothing
    /// applied, logged or moved on, and the next good batch applies from the same cursor.
    #[test]
    fn a_replicated_batch_that_does_not_decode_is_refused_and_changes_nothing() {
        use tandem_protocol::message::LogBatch;
        let dir = tempfile::tempdir().unwrap();
        let (shared, tx, thread) = start("AGG_B", dir.path(), 16, only(1_000_000)).unwrap();
        send(&tx, 1);
        let replicate = |entries: LogBatch, cursor: u64| {
            let (reply, rx) = oneshot::channel();
            tx.blocking_send(Request::Replicate {
                peer: "AGG_P".into(),
                after: 0,
                cursor,
                entries,
                reply,
            })
            .unwrap();
            rx.blocking_recv().unwrap()
        };
        let mut lying = LogBatch::default();
        lying.push_packed(u32::MAX, 64, &[0xF0; 16]);
        let mut good = LogBatch::default();
        for lsn in 1..=3 {
            let mut e = event(100 + lsn);
            e.origin = Origin::new("peer-probe", 1);
            good.push(&tandem_protocol::message::LogEntry {
                lsn,
                source: "AGG_P".into(),
                source_serial: lsn,
                event: e,
            })
            .unwrap();
        }
        let mut short = good.clone();
        short.push_packed(1, 0, &[]);
        for bad in [lying, short] {
            match replicate(bad, 4) {
                Reply::Refused { index: 0, reason } => {
                    assert!(reason.contains("do not decode"), "{reason}")
                }
                other => panic!("a batch that does not decode was answered {other:?}"),
            }
            assert_eq!(*shared.head.borrow(), 1, "nothing logged");
            assert_eq!(shared.alert_count(), 1, "nothing applied");
            assert_eq!(
                shared.db.cursor("AGG_P").unwrap_or(0),
                0,
                "the cursor stays"
            );
        }
        assert_eq!(
            replicate(good, 3),
            Reply::Ack {
                applied: 3,
                duplicates: 0
            }
        );
        assert_eq!(*shared.head.borrow(), 4);
        assert_eq!(shared.alert_count(), 4);
        assert_eq!(
            shared.db.cursor("AGG_P").unwrap_or(0),
            3,
            "the cursor moves with it"
        );
        drop(tx);
        drop(shared);
        thread.join().unwrap();
    }

    /// A kept block's head holds its length and count as u32s: a run they would not fit is
    /// logged entry by entry rather than kept under a head that lies.
    #[test]
    fn a_run_too_long_for_a_block_head_is_not_kept() {
        let mut log = LogBuf::default();
        let e = event(1);
        log.push(LogEntryRef {
            lsn: 1,
            source: "AGG_P",
            source_serial: 1,
            event: &e,
        });
        let huge = PackedRun {
            entries: 0..1,
            unpacked: u32::MAX as usize + 1,
            lz4: bytes::Bytes::from_static(b"x"),
        };
        assert!(!log.keep_packed(0, &huge));
        assert_eq!(
            log.blocks(256, usize::MAX)
                .filter(|b| b.packed.is_some())
                .count(),
            0
        );
        assert!(log.keep_packed(
            0,
            &PackedRun {
                unpacked: 64,
                ..huge
            }
        ));
    }
}
