//! Durable storage of a store in fjall: the records a commit writes and what start-up reads.
//!
//! Keyspaces: `alerts` (identifier → [`Row`]), `applied` (origin → applied sequence ranges),
//! `clears` (clear key → newest resolution version), `log` (blocks of [`LogEntry`]s with
//! consecutive LSNs: `L` and the first LSN, big-endian → each entry after its u32
//! little-endian length; one key per up to [`BLOCK_ENTRIES`] entries and [`BLOCK_BYTES`],
//! because a key per event made the storage engine's per-key work a sixth of the commit thread)
//! and
//! `meta` (head LSN, next serial, housekeeping sequence, the epoch, replication cursors).
//! Everything one group commit changed goes into one fjall write batch, and the batch is synced
//! before any acknowledgement leaves, so after a crash the records always agree.
//!
//! **The log is the write-ahead log; the other records are a checkpoint.** Every commit writes
//! its log entries and cursors; only a checkpoint commit also writes the rows, applied sets and
//! clears changed since the previous checkpoint, together with `checkpoint_lsn` (the head they
//! are the fold of) and each peer's cursor as of then. Writing a hot alert's row once per
//! checkpoint instead of once per commit is what the durable rate depends on (a row is about
//! as big as an event). A periodic checkpoint is encoded under the table's lock by the commit
//! that takes it and written in a batch of its own by another thread once that commit is
//! durable (see [`Checkpoint`]); a checkpoint that holds what no log entry does (a merged
//! snapshot page) goes into its commit's batch. Start-up loads the checkpoint and replays the
//! log after `checkpoint_lsn`, so the log is never trimmed past a durable checkpoint; a full
//! resync's snapshot is the checkpoint, consistent by construction. A data directory without `checkpoint_lsn` was
//! written with every commit a checkpoint: its checkpoint is its head.

use std::path::Path;

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode, Readable, Snapshot};
use tandem_protocol::codec::{
    SnapshotPageWriter, append_bytes, decode_prefix_borrowed, from_bytes, from_bytes_native,
    from_prefix, split_prefix, to_bytes,
};
use tandem_protocol::message::{
    ENTRY_LEN_PREFIX as LEN_PREFIX, LogEntry, Records, ResyncPoint, SnapshotKey,
};

use crate::ingest::{self, Ingest};
use tandem_protocol::state::AppliedRanges;
use tandem_protocol::state::SeqRanges;
use tandem_protocol::{CodecError, Origin, Version};

use crate::engine::{LogBlock, LogBuf};
use crate::fold::ClearKey;
use crate::table::{Changes, Row, Table};

/// A storage failure.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("storage engine: {0}")]
    Engine(#[from] fjall::Error),
    #[error(
        "stored {what} record {key:?} is unreadable: {source} (the data directory may be from another tandem version or damaged; restore it or resync this store from its peer)"
    )]
    Corrupt {
        what: &'static str,
        key: String,
        #[source]
        source: CodecError,
    },
    #[error("bulk loading a full resync's rows: {0}")]
    Ingest(String),
    #[error("the storage engine did not write its memtables out within {0:?}")]
    FlushTimeout(std::time::Duration),
    #[error("record could not be encoded: {0}")]
    Encode(#[from] CodecError),
    #[error(
        "the log is missing entry {missing} (the checkpoint is at {checkpoint}, the log's head at {head}), so the stored alerts would lack acknowledged events: restore the data directory from a backup, or move it aside and start this store empty so that it resyncs from its peer"
    )]
    LogGap {
        missing: u64,
        checkpoint: u64,
        head: u64,
    },
}

/// Generic-clear keys with their newest resolution versions.
pub type Clears = Vec<(String, Version)>;

/// The keyspace a checkpoint record goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Space {
    Alerts,
    /// An alert row exactly as a peer's snapshot sent it: a full resync's bulk, which the
    /// store may ingest instead of writing through a batch ([`crate::ingest`]).
    Taken,
    Applied,
    Clears,
    Meta,
}

/// A checkpoint's records, encoded: the rows, applied sets and clears a run of commits
/// changed, each peer's cursor, and the LSN and serial it stands at.
///
/// Encoded under the table's lock, so it is a consistent cut of the table; writing it (the
/// storage engine's batch, its journal and the sync) needs no lock and can happen on another
/// thread while the next commits go on.
#[derive(Debug, Default)]
pub struct Checkpoint {
    /// Every record's key and then value, back to back.
    buf: Vec<u8>,
    /// Each record's keyspace and where its key and value end in `buf`.
    records: Vec<(Space, usize, usize)>,
    /// The LSN the checkpoint stands at: the log after it is what a start replays.
    pub lsn: u64,
    /// The log's first LSN as of the commit that built it, durable once that commit is: the
    /// space below it can be given back after the checkpoint is written
    /// ([`Db::reclaim_log`]). 0: nothing to give back.
    pub log_start: u64,
}

impl Checkpoint {
    /// Encodes the records `changes` names, as `table` holds them now, and the cursors and
    /// positions of `meta`. Reuses this checkpoint's buffers.
    pub fn encode(
        &mut self,
        table: &Table,
        changes: &Changes,
        meta: &Meta,
        cursors: &[(String, u64)],
    ) -> Result<(), DbError> {
        self.buf.clear();
        self.records.clear();
        self.lsn = meta.head_lsn;
        self.log_start = 0;
        for (id, kept) in changes.rows_with_serials() {
            let (space, key_end) = match kept {
                // A row is its serial followed by its state (see
                // `row_bytes_are_the_serial_then_the_state`). Not looked up: at a table this
                // size each lookup is a cache miss, a tenth of a resync's commit thread.
                Some((serial, state)) => {
                    self.buf.extend_from_slice(id.as_bytes());
                    let key_end = self.buf.len();
                    append_bytes(&serial, &mut self.buf)?;
                    self.buf.extend_from_slice(state);
                    (Space::Taken, key_end)
                }
                None => {
                    let Some(row) = table.row(id) else { continue };
                    self.buf.extend_from_slice(id.as_bytes());
                    let key_end = self.buf.len();
                    append_bytes(row, &mut self.buf)?;
                    (Space::Alerts, key_end)
                }
            };
            self.records.push((space, key_end, self.buf.len()));
        }
        for origin in &changes.origins {
            if let Some(set) = table.applied(origin) {
                append_bytes(origin, &mut self.buf)?;
                let key_end = self.buf.len();
                append_bytes(set, &mut self.buf)?;
                self.records.push((Space::Applied, key_end, self.buf.len()));
            }
        }
        for key in &changes.clears {
            if let Some(version) = table.clear_version(key) {
                self.buf.extend_from_slice(key.as_bytes());
                let key_end = self.buf.len();
                append_bytes(version, &mut self.buf)?;
                self.records.push((Space::Clears, key_end, self.buf.len()));
            }
        }
        for (peer, lsn) in cursors {
            self.meta(format!("{CHECKPOINT_CURSOR_PREFIX}{peer}").as_bytes(), *lsn);
        }
        self.meta(CHECKPOINT_LSN.as_bytes(), meta.head_lsn);
        self.meta(NEXT_SERIAL.as_bytes(), meta.next_serial);
        Ok(())
    }

    fn meta(&mut self, key: &[u8], value: u64) {
        self.buf.extend_from_slice(key);
        let key_end = self.buf.len();
        self.buf.extend_from_slice(&value.to_be_bytes());
        self.records.push((Space::Meta, key_end, self.buf.len()));
    }

    fn records(&self) -> impl Iterator<Item = (Space, &[u8], &[u8])> {
        let mut start = 0;
        self.records.iter().map(move |&(space, key_end, end)| {
            let record = (space, &self.buf[start..key_end], &self.buf[key_end..end]);
            start = end;
            record
        })
    }
}

const HEAD_LSN: &str = "head_lsn";
const FIRST_LSN: &str = "first_lsn";
const NEXT_SERIAL: &str = "next_serial";
const HOUSEKEEPING_SEQ: &str = "housekeeping_seq";
const EPOCH: &str = "epoch";
const CHECKPOINT_LSN: &str = "checkpoint_lsn";

/// Log entries in one stored block at most.
pub const BLOCK_ENTRIES: usize = 256;

/// Bytes in one stored block at most (unless one entry is larger). The storage engine copies
/// each block into its memtable, and a copy over 64 KiB is a large object to the allocator,
/// with pages of its own rounded up to 64 KiB slices and given back when the memtable is
/// flushed: blocks of 256 entries of ~300 bytes made each store of the pair 90 MiB larger and
/// had the kernel zero fresh pages for every memtable (docs/PERFORMANCE.md).
pub const BLOCK_BYTES: usize = 60 * 1024;
const BLOCK_TAG: u8 = b'L';

/// The size at which a keyspace's memtable is sealed and written out (fjall's default is
/// 64 MiB). Every memtable is memory the process has not held before until it is written out
/// and freed, so the default made a new store grow by 260 MiB over its first million events,
/// and the kernel's zeroing of those pages was half of its commit thread, a quarter of the
/// throughput (docs/PERFORMANCE.md). fjall records the size when it creates a keyspace: a store
/// created before keeps the size it was created with.
pub const MEMTABLE_BYTES: u64 = 16 * 1024 * 1024;

fn block_key(first_lsn: u64) -> [u8; 9] {
    let mut key = [BLOCK_TAG; 9];
    key[1..].copy_from_slice(&first_lsn.to_be_bytes());
    key
}

/// The first LSN of the block stored under `key`; None for a key from before blocks (one
/// entry under its 8-byte LSN).
fn block_first(key: &[u8]) -> Option<u64> {
    (key.len() == 9 && key[0] == BLOCK_TAG).then(|| u64_value(&key[1..]))
}

/// What a packed (compressed) log block's value starts with, from before packed values
/// counted their entries: [`PACKED`], the block's length (u32, little endian), the block
/// compressed with LZ4. Still read. A block stored as it is starts with its first entry's
/// length, which is never 4 GiB - 1 or - 2: a frame is at most 64 MiB.
const PACKED: [u8; 4] = [0xff; 4];

/// What a packed log block's value starts with: [`COUNTED`], then as little-endian u32s the
/// block's length, its number of entries and its last entry's LSN less its first's, then the
/// block compressed with LZ4. The count lets a subscriber be sent the block as it is, packed,
/// without unpacking it to count its entries (that was 4.5 % of the primary's CPU in the full
/// pair, docs/PERFORMANCE.md).
const COUNTED: [u8; 4] = [0xfe, 0xff, 0xff, 0xff];

/// What a kept log block's value starts with: [`KEPT`], then as in [`COUNTED`] the block's
/// length, its number of entries and its last LSN less its first, then the LZ4 block as the
/// peer sent it, whose entries carry the peer's LSNs (see `engine::KeptRun`). Reading it puts
/// this store's LSNs back: the block's first and on, one an entry.
const KEPT: [u8; 4] = [0xfd, 0xff, 0xff, 0xff];

/// The largest block a packed value may claim to hold: a block is at most [`BLOCK_BYTES`]
/// unless one entry is larger, and an entry is at most a frame.
const MAX_UNPACKED: usize = 128 * 1024 * 1024;

/// Packs `block` into `scratch` as it is stored (see [`COUNTED`]). Returns the value's
/// length. A block that does not compress is stored as it is.
///
/// The store compresses each block once, on the commit thread. fjall compressed it twice: in
/// its journal (values over 4 KiB) and again in the fjall worker that wrote the memtable out;
/// its memtable held the block uncompressed (docs/PERFORMANCE.md).
fn pack_block(block: &LogBlock<'_>, scratch: &mut Vec<u8>) -> Option<usize> {
    let room = 16 + lz4_flex::block::get_maximum_output_size(block.bytes.len());
    if scratch.len() < room {
        scratch.resize(room, 0);
    }
    scratch[..16].copy_from_slice(&block_head(COUNTED, block.bytes.len(), block)?);
    let packed = 16 + lz4_flex::block::compress_into(block.bytes, &mut scratch[16..]).ok()?;
    (packed < block.bytes.len()).then_some(packed)
}

/// Writes a kept run's value into `scratch` (see [`KEPT`]): the peer's LZ4 block `lz4` of
/// `unpacked` bytes. Returns the value's length; None (stored as it is) when its lengths do
/// not fit the head.
fn kept_block(
    block: &LogBlock<'_>,
    lz4: &[u8],
    unpacked: usize,
    scratch: &mut Vec<u8>,
) -> Option<usize> {
    let head = block_head(KEPT, unpacked, block)?;
    scratch.clear();
    scratch.extend_from_slice(&head);
    scratch.extend_from_slice(lz4);
    Some(scratch.len())
}

/// The 16-byte head of a packed or kept value (see [`COUNTED`]) for `block`, `unpacked` bytes
/// unpacked; None when a length does not fit.
fn block_head(magic: [u8; 4], unpacked: usize, block: &LogBlock<'_>) -> Option<[u8; 16]> {
    let len = u32::try_from(unpacked).ok()?;
    let count = u32::try_from(block.count).ok()?;
    let span = u32::try_from(block.last.checked_sub(block.first)?).ok()?;
    let mut head = [0; 16];
    for (to, from) in head.chunks_exact_mut(4).zip([
        magic,
        len.to_le_bytes(),
        count.to_le_bytes(),
        span.to_le_bytes(),
    ]) {
        to.copy_from_slice(&from);
    }
    Some(head)
}

/// A packed block's value, read.
struct Packed<'a> {
    /// The block's length unpacked, as the value claims it.
    unpacked: usize,
    lz4: &'a [u8],
    /// Its number of entries and its last entry's LSN less its first's, when the value says.
    counted: Option<(u32, u32)>,
    /// A kept block: its entries' LSNs are the peer's.
    kept: bool,
}

/// The packed block a value holds; None for a block stored as it is.
fn packed_of(value: &[u8]) -> Result<Option<Packed<'_>>, DbError> {
    let at = |i: usize| u32_le(&value[i..i + 4]);
    let (head, kept) = match value.get(..4) {
        Some(magic) if magic == COUNTED => (16, false),
        Some(magic) if magic == KEPT => (16, true),
        Some(magic) if magic == PACKED => (8, false),
        _ => return Ok(None),
    };
    if value.len() < head {
        return Err(DbError::Corrupt {
            what: "log block",
            key: "a packed block".into(),
            source: CodecError::Decode(format!(
                "it is {} bytes, shorter than its {head}-byte head",
                value.len()
            )),
        });
    }
    Ok(Some(Packed {
        unpacked: at(4) as usize,
        lz4: &value[head..],
        counted: (head == 16).then(|| (at(8), at(12))),
        kept,
    }))
}

/// A stored block's entries as one buffer: the value itself, or the block it packs,
/// unpacked into `scratch`, with this store's LSNs from `first` on for a kept block. `scratch`
/// grows to the largest block and is not cleared: a reader of many blocks (a subscriber's page
/// of the log) neither allocates nor zeroes a buffer for each.
fn unpack_block<'a>(
    value: &'a [u8],
    first: u64,
    scratch: &'a mut Vec<u8>,
) -> Result<&'a [u8], DbError> {
    let Some(packed) = packed_of(value)? else {
        return Ok(value);
    };
    let corrupt = |why: String| DbError::Corrupt {
        what: "log block",
        key: first.to_string(),
        source: CodecError::Decode(why),
    };
    let len = packed.unpacked;
    if len > MAX_UNPACKED {
        return Err(corrupt(format!(
            "it claims {len} bytes, more than a block can hold"
        )));
    }
    // A kept block is unpacked after room for its entries with this store's LSNs: an LSN
    // takes 1 to 9 bytes, so each entry may grow by 8 (9 is room to spare).
    let count = packed.counted.map_or(0, |(count, _)| count as usize);
    // Each entry takes its length and a byte at least: a head claiming more is not believed
    // (nor sized for).
    if packed.kept && count > len / (LEN_PREFIX + 1) {
        return Err(corrupt(format!("it claims {count} entries in {len} bytes")));
    }
    let at = if packed.kept { len + 9 * count } else { 0 };
    if scratch.len() < at + len {
        scratch.resize(at + len, 0);
    }
    let n = lz4_flex::block::decompress_into(packed.lz4, &mut scratch[at..at + len])
        .map_err(|e| corrupt(e.to_string()))?;
    if n != len {
        return Err(corrupt(format!("it holds {n} bytes where it claims {len}")));
    }
    if !packed.kept {
        return Ok(&scratch[..len]);
    }
    let (out, unpacked) = scratch.split_at_mut(at);
    let written = relabel(&unpacked[..len], first, count, out).map_err(corrupt)?;
    Ok(&scratch[..written])
}

/// Writes `block`'s entries into `out` with the LSNs `first`, `first + 1` and on in their
/// heads for the ones they carry; `count` of them. Returns the bytes written.
fn relabel(block: &[u8], first: u64, count: usize, out: &mut [u8]) -> Result<usize, String> {
    let mut head = Vec::with_capacity(64);
    let (mut written, mut lsn) = (0, first);
    for record in Records::of(block) {
        let record = record.map_err(|e| e.to_string())?;
        let ((_, source, serial), used) =
            decode_prefix_borrowed::<(u64, &str, u64)>(record).map_err(|e| e.to_string())?;
        head.clear();
        append_bytes(&(lsn, source, serial), &mut head).map_err(|e| e.to_string())?;
        let event = &record[used..];
        let len = head.len() + event.len();
        let end = written + LEN_PREFIX + len;
        let Some(to) = out.get_mut(written..end) else {
            return Err(format!("it holds more than its {count} entries"));
        };
        to[..LEN_PREFIX].copy_from_slice(&(len as u32).to_le_bytes());
        to[LEN_PREFIX..LEN_PREFIX + head.len()].copy_from_slice(&head);
        to[LEN_PREFIX + head.len()..].copy_from_slice(event);
        written = end;
        lsn += 1;
    }
    if lsn - first != count as u64 {
        return Err(format!(
            "it holds {} entries where it claims {count}",
            lsn - first
        ));
    }
    Ok(written)
}

fn u32_le(bytes: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[..4]);
    u32::from_le_bytes(b)
}

/// Where [`Db::read_log_raw`] puts the log entries it reads: a subscriber's page.
pub trait LogSink {
    /// Takes one entry's encoding; false when it has no room for it.
    fn entry(&mut self, entry: &[u8]) -> bool;
    /// Takes a whole block of `count` entries, `unpacked` bytes in the stored form, as the LZ4
    /// block `lz4`; false when it has no room for it so.
    fn packed(&mut self, count: usize, unpacked: usize, lz4: &[u8]) -> bool;
}

/// The entries of a stored block, each as its encoded bytes.
fn block_entries(block: &[u8]) -> impl Iterator<Item = Result<&[u8], DbError>> {
    Records::of(block).map(|record| {
        record.map_err(|source| DbError::Corrupt {
            what: "log block",
            key: "an entry's length".into(),
            source,
        })
    })
}
const CURSOR_PREFIX: &str = "cursor:";
/// A peer's cursor as of the checkpoint (absent: 0, none of that peer's log is known to be
/// in the checkpoint).
const CHECKPOINT_CURSOR_PREFIX: &str = "checkpoint_cursor:";
const RESYNC_PREFIX: &str = "resync:";

/// What one commit records about peers: replication cursors, and full-resync progress
/// (None: the resync finished, forget it).
#[derive(Debug, Default)]
pub struct PeerWrites {
    pub cursors: Vec<(String, u64)>,
    pub resync: Vec<(String, Option<ResyncPoint>)>,
}

impl PeerWrites {
    pub fn clear(&mut self) {
        self.cursors.clear();
        self.resync.clear();
    }

    pub fn set_cursor(&mut self, peer: &str, lsn: u64) {
        self.cursors.retain(|(p, _)| p != peer);
        self.cursors.push((peer.to_string(), lsn));
    }

    pub fn set_resync(&mut self, peer: &str, point: Option<ResyncPoint>) {
        self.resync.retain(|(p, _)| p != peer);
        self.resync.push((peer.to_string(), point));
    }
}

/// Counters kept in `meta`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Meta {
    /// The LSN of the newest log entry (0: none yet).
    pub head_lsn: u64,
    /// The LSN of the oldest retained log entry (head + 1 when the log is empty).
    pub first_lsn: u64,
    pub next_serial: u64,
    pub housekeeping_seq: u64,
    /// Chosen when the data directory is created; names this store's own origin.
    pub epoch: u64,
    /// The head LSN as of the last checkpoint: the stored rows are the fold of the log up to
    /// here, and start-up replays the entries after it.
    pub checkpoint_lsn: u64,
}

pub struct Db {
    db: Database,
    alerts: Keyspace,
    applied: Keyspace,
    clears: Keyspace,
    log: Keyspace,
    meta: Keyspace,
    /// The log's first LSN as last written. Blocks wholly below it are only dropped later, a
    /// storage table at a time (see [`Db::reclaim_log`]); reads skip what they still find.
    log_start: std::sync::atomic::AtomicU64,
    /// Where the commit packs its log blocks (see [`pack_block`]); only the commit thread
    /// writes, so the lock is never contended.
    pack_scratch: std::sync::Mutex<Vec<u8>>,
    /// The full resync's rows being bulk loaded, if any (see [`crate::ingest`]). Held while a
    /// batch is routed and committed, so that whether an ingestion was open is exact.
    ingest: std::sync::Mutex<Option<Ingest>>,
}

/// Decodes a stored record, naming it when it does not decode.
fn decode<T: serde::de::DeserializeOwned>(
    what: &'static str,
    key: impl std::fmt::Display,
    bytes: &[u8],
) -> Result<T, DbError> {
    from_bytes(bytes).map_err(corrupt(what, key))
}

/// [`decode`] through bincode's own traits, for the rows a store reads back when it starts.
fn decode_native<'a, T: bincode::BorrowDecode<'a, ()>>(
    what: &'static str,
    key: impl std::fmt::Display,
    bytes: &'a [u8],
) -> Result<T, DbError> {
    from_bytes_native(bytes).map_err(corrupt(what, key))
}

/// Names a stored record that does not decode.
fn corrupt(
    what: &'static str,
    key: impl std::fmt::Display,
) -> impl FnOnce(tandem_protocol::codec::CodecError) -> DbError {
    move |source| DbError::Corrupt {
        what,
        key: key.to_string(),
        source,
    }
}

/// A log entry's LSN, its first field, without decoding the rest.
fn entry_lsn(block: u64, bytes: &[u8]) -> Result<u64, DbError> {
    from_prefix(bytes).map_err(|source| DbError::Corrupt {
        what: "log entry",
        key: format!("in the block at LSN {block}"),
        source,
    })
}

fn u64_value(bytes: &[u8]) -> u64 {
    bytes.try_into().map(u64::from_be_bytes).unwrap_or_default()
}

impl Db {
    /// Opens the store's data directory, creating it (whole or not at all) if it does not
    /// exist.
    pub fn open(path: &Path) -> Result<Db, DbError> {
        let io = |e: std::io::Error| DbError::Engine(fjall::Error::Io(e));
        tandem_config::make_dir_atomically(
            path,
            |staging| {
                let made = Db::open_existing(staging)?;
                made.db.persist(PersistMode::SyncAll)?;
                Ok(())
            },
            io,
        )?;
        Db::open_existing(path)
    }

    fn open_existing(path: &Path) -> Result<Db, DbError> {
        // A smaller journal than fjall's 512 MiB default bounds what a start after a crash has
        // to replay. The journal compresses only values over 4 KiB, which are the log's blocks,
        // and those come packed (`pack_block`): compressing them again was wasted.
        let db = Database::builder(path)
            .max_journaling_size(128 * 1024 * 1024)
            .journal_compression(fjall::CompressionType::None)
            .open()?;
        // fjall compresses only from its third level of tables, and the alerts' first tables
        // after a full resync hold every row: compressed at every level, a full resync is
        // faster (docs/PERFORMANCE.md). The log's blocks come packed; its tables are not
        // compressed again. As with the memtable size, a keyspace keeps what it was created
        // with.
        //
        // Only the log and the meta keyspace are ever read by key; the others are read whole
        // (at start, or page by page for a resync), so a filter of their keys is work at every
        // flush and bulk load, and pinned memory, that no read uses.
        let open = |name: &str, compression, filtered: bool| {
            db.keyspace(name, || {
                let options = KeyspaceCreateOptions::default()
                    .max_memtable_size(MEMTABLE_BYTES)
                    .data_block_compression_policy(fjall::config::CompressionPolicy::all(
                        compression,
                    ));
                if filtered {
                    options
                } else {
                    options.filter_policy(fjall::config::FilterPolicy::disabled())
                }
            })
        };
        let lz4 = fjall::CompressionType::Lz4;
        Ok(Db {
            alerts: open("alerts", lz4, false)?,
            applied: open("applied", lz4, false)?,
            clears: open("clears", lz4, false)?,
            log: open("log", fjall::CompressionType::None, true)?,
            meta: open("meta", lz4, true)?,
            db,
            log_start: std::sync::atomic::AtomicU64::new(1),
            pack_scratch: std::sync::Mutex::new(Vec::new()),
            ingest: std::sync::Mutex::new(None),
        })
    }

    fn meta_u64(&self, key: &str) -> Result<Option<u64>, DbError> {
        Ok(self.meta.get(key)?.map(|v| u64_value(&v)))
    }

    /// Reads everything back into `table`; returns the counters.
    pub fn load(&self, table: &mut Table, new_epoch: u64) -> Result<Meta, DbError> {
        self.convert_log()?;
        table.reserve(self.alerts.approximate_len());
        for item in self.alerts.iter() {
            let (key, value) = item.into_inner()?;
            let id = String::from_utf8_lossy(&key).into_owned();
            let row: Row = decode_native("alert", &id, &value)?;
            table.load_row(&id, row);
        }
        for item in self.applied.iter() {
            let (key, value) = item.into_inner()?;
            let origin: Origin = decode("applied-set key", format!("{key:?}"), &key)?;
            let set: SeqRanges = decode("applied set", &origin, &value)?;
            table.load_applied(origin, set);
        }
        for item in self.clears.iter() {
            let (key, value) = item.into_inner()?;
            let version: Version = decode("clear", String::from_utf8_lossy(&key), &value)?;
            table.load_clear(ClearKey::from_bytes(&key), version);
        }
        let head_lsn = self.meta_u64(HEAD_LSN)?.unwrap_or(0);
        let epoch = match self.meta_u64(EPOCH)? {
            Some(epoch) => epoch,
            None => {
                self.meta.insert(EPOCH, new_epoch.to_be_bytes())?;
                self.db.persist(PersistMode::SyncAll)?;
                new_epoch
            }
        };
        let checkpoint_lsn = match self.meta_u64(CHECKPOINT_LSN)? {
            Some(lsn) => lsn,
            None => self.mark_checkpoint(head_lsn)?,
        };
        let meta = Meta {
            head_lsn,
            checkpoint_lsn,
            first_lsn: self.meta_u64(FIRST_LSN)?.unwrap_or(1),
            next_serial: self.meta_u64(NEXT_SERIAL)?.unwrap_or(1),
            housekeeping_seq: self.meta_u64(HOUSEKEEPING_SEQ)?.unwrap_or(0),
            epoch,
        };
        table.set_next_serial(meta.next_serial);
        self.log_start
            .store(meta.first_lsn, std::sync::atomic::Ordering::Relaxed);
        Ok(meta)
    }

    /// Records that everything stored is a checkpoint as of `head_lsn`: for a data directory
    /// written before checkpoints, where every commit wrote every record it changed.
    fn mark_checkpoint(&self, head_lsn: u64) -> Result<u64, DbError> {
        let mut batch = self.db.batch();
        for item in self.meta.prefix(CURSOR_PREFIX) {
            let (key, value) = item.into_inner()?;
            let peer = String::from_utf8_lossy(&key[CURSOR_PREFIX.len()..]).into_owned();
            batch.insert(
                &self.meta,
                format!("{CHECKPOINT_CURSOR_PREFIX}{peer}"),
                value.to_vec(),
            );
        }
        batch.insert(&self.meta, CHECKPOINT_LSN, head_lsn.to_be_bytes());
        batch.commit()?;
        self.db.persist(PersistMode::SyncAll)?;
        Ok(head_lsn)
    }

    /// Writes one group commit atomically, with `checkpoint` in the same batch when given. A
    /// crash keeps all of it or none, and it is durable only after the next [`Db::sync`]; reads
    /// see it at once, a trim (`meta.first_lsn` moved on) included. The trimmed entries' space
    /// comes back with [`Db::reclaim_log`].
    ///
    /// Rows a peer's snapshot sent, in a page-sized run, are bulk loaded instead of written
    /// through the batch (see [`crate::ingest`]). The commit that finishes the resync, or that
    /// brings the open ingestion to [`ingest::FINISH_EVERY`] rows, finishes it first and
    /// then writes again, from `table`, every row written through a batch meanwhile.
    pub fn write(
        &self,
        log: &LogBuf,
        meta: &Meta,
        peers: &PeerWrites,
        checkpoint: Option<&Checkpoint>,
        table: &Table,
    ) -> Result<(), DbError> {
        // Sized for a merged snapshot page's checkpoint, a record per alert: grown on demand,
        // the batch's list was copied at every doubling on the commit thread.
        let records = checkpoint.map_or(0, |c| c.records.len());
        // Written out to the OS at commit, as `Database::batch` would have it.
        let mut batch = fjall::OwnedWriteBatch::with_capacity(self.db.clone(), records + 16)
            .durability(Some(PersistMode::Buffer));
        let mut ingest = self
            .ingest
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let resync_done = peers.resync.iter().any(|(_, point)| point.is_none());
        if let Some(checkpoint) = checkpoint {
            let mut taken = checkpoint
                .records()
                .filter(|(space, ..)| matches!(space, Space::Taken));
            // A resync started over (on a new snapshot) brings keys the open ingestion is
            // past: finish it now rather than send them all through batches, to be written
            // again at its finish.
            let first = taken.next().map(|(_, key, _)| key);
            if let Some(key) = first.filter(|key| ingest.as_ref().is_some_and(|i| !i.is_past(key)))
            {
                tracing::debug!(key = %String::from_utf8_lossy(key), "a resync's pages went back; finishing the open ingestion");
                if let Some(done) = ingest.take() {
                    self.finish_ingest(done, &mut batch, table, peers)?;
                }
            }
            let taken = usize::from(first.is_some()) + taken.count();
            if ingest.is_none() && !resync_done && taken >= ingest::START_AT {
                *ingest = Some(Ingest::start(&self.alerts, "ingest")?);
            }
            self.insert_checkpoint(&mut batch, checkpoint, ingest.as_mut())?;
        }
        {
            let mut scratch = self
                .pack_scratch
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for block in log.blocks(BLOCK_ENTRIES, BLOCK_BYTES) {
                let key = block_key(block.first);
                match block.packed {
                    // A kept run's entries are only in the peer's block (`LogBuf::deferring`):
                    // there is nothing to store in its place.
                    Some((lz4, unpacked)) => {
                        let len =
                            kept_block(&block, lz4, unpacked, &mut scratch).ok_or_else(|| {
                                CodecError::Encode(format!(
                                    "the kept log block at LSN {} does not fit its head",
                                    block.first
                                ))
                            })?;
                        batch.insert(&self.log, key, &scratch[..len])
                    }
                    None => match pack_block(&block, &mut scratch) {
                        Some(len) => batch.insert(&self.log, key, &scratch[..len]),
                        None => batch.insert(&self.log, key, block.bytes),
                    },
                }
            }
        }
        for (peer, lsn) in &peers.cursors {
            batch.insert(
                &self.meta,
                format!("{CURSOR_PREFIX}{peer}"),
                lsn.to_be_bytes(),
            );
        }
        let finish = ingest
            .as_ref()
            .is_some_and(|i| resync_done || i.rows() >= ingest::FINISH_EVERY);
        if let Some(done) = ingest.take_if(|_| finish) {
            self.finish_ingest(done, &mut batch, table, peers)?;
        }
        for (peer, point) in &peers.resync {
            let key = format!("{RESYNC_PREFIX}{peer}");
            match (point, ingest.as_mut()) {
                // Not yet durable: the pages it covers are in the open ingestion.
                (Some(point), Some(open)) => open.hold(peer, point.clone()),
                (Some(point), None) => batch.insert(&self.meta, key, to_bytes(point)?),
                (None, _) => batch.remove(&self.meta, key),
            }
        }
        batch.insert(&self.meta, HEAD_LSN, meta.head_lsn.to_be_bytes());
        batch.insert(&self.meta, FIRST_LSN, meta.first_lsn.to_be_bytes());
        batch.insert(
            &self.meta,
            HOUSEKEEPING_SEQ,
            meta.housekeeping_seq.to_be_bytes(),
        );
        batch.commit()?;
        self.log_start
            .fetch_max(meta.first_lsn, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Finishes `done` and adds to `batch` what must follow it: every row written through a
    /// batch while it was open, as `table` holds it now, and the resync progress it held
    /// (unless `peers` brings newer).
    fn finish_ingest(
        &self,
        done: Ingest,
        batch: &mut fjall::OwnedWriteBatch,
        table: &Table,
        peers: &PeerWrites,
    ) -> Result<(), DbError> {
        let (rows, started) = (done.rows(), std::time::Instant::now());
        let ingest::Finished { written, held } = done.finish()?;
        tracing::info!(
            rows,
            rewritten = written.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "bulk loaded a full resync's rows"
        );
        let mut row = Vec::new();
        for key in written {
            let current = std::str::from_utf8(&key).ok().and_then(|id| table.row(id));
            if let Some(current) = current {
                row.clear();
                append_bytes(current, &mut row)?;
                batch.insert(&self.alerts, &*key, row.as_slice());
            }
        }
        for (peer, point) in held {
            if !peers.resync.iter().any(|(p, _)| *p == peer) {
                batch.insert(
                    &self.meta,
                    format!("{RESYNC_PREFIX}{peer}"),
                    to_bytes(&point)?,
                );
            }
        }
        Ok(())
    }

    /// Makes everything written so far durable.
    pub fn sync(&self) -> Result<(), DbError> {
        self.db.persist(PersistMode::SyncAll)?;
        Ok(())
    }

    /// Writes a checkpoint on its own, atomically, and syncs it: for a checkpoint written
    /// after the commit that built it, off the commit thread. The log up to its LSN must
    /// already be durable.
    pub fn write_checkpoint(&self, checkpoint: &Checkpoint) -> Result<(), DbError> {
        let mut batch = self.db.batch();
        {
            let mut ingest = self
                .ingest
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // Through the batch only: an ingestion takes the resync's pages, in order.
            if let Some(open) = ingest.as_mut() {
                open.note_written(
                    checkpoint
                        .records()
                        .filter(|(space, ..)| matches!(space, Space::Alerts | Space::Taken))
                        .map(|(_, key, _)| key),
                );
            }
            self.insert_checkpoint(&mut batch, checkpoint, None)?;
            batch.commit()?;
        }
        self.db.persist(PersistMode::SyncAll)?;
        Ok(())
    }

    /// Adds `checkpoint`'s records to `batch`, or the rows a peer's snapshot sent to `ingest`
    /// when one is open and takes them, and notes in `ingest` every other row's key. If this
    /// batch then finishes the ingestion, those rows are written twice in it, the same both
    /// times: as the table holds them now.
    fn insert_checkpoint(
        &self,
        batch: &mut fjall::OwnedWriteBatch,
        checkpoint: &Checkpoint,
        mut ingest: Option<&mut Ingest>,
    ) -> Result<(), DbError> {
        // Sized for every record: when an ingestion is open, nearly all are rows it takes.
        let mut page = match ingest {
            Some(_) => ingest::Page::with_capacity(checkpoint.buf.len(), checkpoint.records.len()),
            None => ingest::Page::default(),
        };
        let mut written = Vec::new();
        for (space, key, value) in checkpoint.records() {
            let keyspace = match space {
                Space::Taken | Space::Alerts => {
                    if let Some(open) = ingest.as_deref_mut() {
                        if matches!(space, Space::Taken) && open.take(key, value, &mut page) {
                            continue;
                        }
                        written.push(key);
                    }
                    &self.alerts
                }
                Space::Applied => &self.applied,
                Space::Clears => &self.clears,
                Space::Meta => &self.meta,
            };
            batch.insert(keyspace, key, value);
        }
        if let Some(open) = ingest {
            open.send(page)?;
            open.note_written(written);
        }
        Ok(())
    }

    /// Gives back the space of the log below `first_lsn`, which must be durable as the log's
    /// first LSN: drops every storage table wholly below the block holding it.
    ///
    /// Trimming does not delete blocks one by one. A tombstone lands in the memtable next to
    /// the newest blocks, so every table flushed from it spanned the whole log and overlapped
    /// every table below: each flush rewrote the retained log, and the tombstones in front of
    /// it made every scan from its start longer. Once the log reached its retention a store
    /// slowed down with every million events (760,000 events/s falling to 120,000 over six
    /// million, its log keyspace at 1.6 GB for 500 MB retained). Without tombstones the log's
    /// tables never overlap, compaction only moves them, and whole tables are dropped here.
    /// Blocks in a table that also holds retained ones stay until a later call; reads skip
    /// them.
    pub fn reclaim_log(&self, first_lsn: u64) -> Result<(), DbError> {
        use fjall::AbstractTree as _;
        let Some(keep) = self.block_holding(first_lsn)? else {
            return Ok(());
        };
        self.log
            .tree
            .drop_range(..block_key(keep))
            .map_err(fjall::Error::from)?;
        Ok(())
    }

    /// Writes every memtable out, so the next start opens tables instead of replaying the
    /// journal. For a clean shutdown; after a crash the journal replay is what recovers.
    ///
    /// The journal is synced first, so nothing depends on the tables being written: if the
    /// storage engine's flush cannot finish (a worker that failed on an I/O error never takes
    /// its memtable), this gives up after `within` instead of holding the shutdown forever.
    pub fn flush(&self, within: std::time::Duration) -> Result<(), DbError> {
        self.db.persist(PersistMode::SyncAll)?;
        self.write_out(
            &[
                &self.alerts,
                &self.applied,
                &self.clears,
                &self.log,
                &self.meta,
            ],
            within,
        )?;
        self.db.persist(PersistMode::SyncAll)?;
        Ok(())
    }

    /// Seals the memtables of `keyspaces` and waits, at most `within`, until the storage
    /// engine has written them out as tables.
    fn write_out(
        &self,
        keyspaces: &[&Keyspace],
        within: std::time::Duration,
    ) -> Result<(), DbError> {
        for keyspace in keyspaces {
            keyspace.rotate_memtable()?;
        }
        let deadline = std::time::Instant::now() + within;
        while keyspaces.iter().any(|k| k.sealed_memtable_count() > 0) {
            // Fails once the engine is poisoned by a failed write or flush.
            self.db.persist(PersistMode::Buffer)?;
            if std::time::Instant::now() > deadline {
                return Err(DbError::FlushTimeout(within));
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        Ok(())
    }

    /// Where a read of the log from `from` starts: nothing before the log's first LSN is
    /// read, though its block may still be stored.
    fn log_from(&self, from: u64) -> u64 {
        from.max(self.log_start.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Calls `visit` with each stored block from the one holding `from` on, as (its first LSN,
    /// its value as stored, a buffer to unpack it in), until it returns false or the log ends.
    fn scan_blocks(
        &self,
        from: u64,
        mut visit: impl FnMut(u64, &[u8], &mut Vec<u8>) -> Result<bool, DbError>,
    ) -> Result<(), DbError> {
        let start = self.block_holding(from)?.unwrap_or(from);
        let mut scratch = Vec::new();
        for item in self.log.range(block_key(start)..) {
            let (key, value) = item.into_inner()?;
            let Some(first) = block_first(&key) else {
                break;
            };
            if !visit(first, &value, &mut scratch)? {
                break;
            }
        }
        Ok(())
    }

    /// Calls `visit` with each log entry from `from` on, as (LSN, encoding), until it
    /// returns false or the log ends.
    fn scan_log(
        &self,
        from: u64,
        mut visit: impl FnMut(u64, &[u8]) -> Result<bool, DbError>,
    ) -> Result<(), DbError> {
        let from = self.log_from(from);
        self.scan_blocks(from, |first, value, scratch| {
            for bytes in block_entries(unpack_block(value, first, scratch)?) {
                let bytes = bytes?;
                let lsn = entry_lsn(first, bytes)?;
                if lsn >= from && !visit(lsn, bytes)? {
                    return Ok(false);
                }
            }
            Ok(true)
        })
    }

    /// Log entries with LSN >= `from`, at most `max`.
    pub fn read_log(&self, from: u64, max: usize) -> Result<Vec<LogEntry>, DbError> {
        let mut out = Vec::new();
        self.scan_log(from, |lsn, bytes| {
            out.push(decode("log entry", lsn, bytes)?);
            Ok(out.len() < max)
        })?;
        Ok(out)
    }

    /// Hands `sink` the log entries from `from` on as stored, at most `max` looked at (more
    /// only when the page's first block is larger), leaving out those whose source is
    /// `skip_source`: for a subscriber, without decoding them. A block that lies wholly from
    /// `from` on and leaves nothing out goes to the sink as stored, packed, if the sink takes
    /// it so; otherwise entry by entry.
    /// A page ends before a block that would take it past `max`, so that the next starts at a
    /// block, which it can send packed. The sink answers false for what it has no room for,
    /// which ends the read there. Returns the first and last LSN looked at (None: nothing from
    /// `from` on).
    pub fn read_log_raw(
        &self,
        from: u64,
        max: usize,
        skip_source: Option<&str>,
        sink: &mut impl LogSink,
    ) -> Result<Option<(u64, u64)>, DbError> {
        let from = self.log_from(from);
        let mut seen: Option<(u64, u64)> = None;
        let mut looked = 0;
        let skipped = |lsn: u64, bytes: &[u8]| -> Result<bool, DbError> {
            let Some(skip) = skip_source else {
                return Ok(false);
            };
            // Borrowed: a log entry's source is read for every entry a subscriber is sent.
            let (_, source): (u64, &str) =
                from_prefix(bytes).map_err(|source| DbError::Corrupt {
                    what: "log entry",
                    key: lsn.to_string(),
                    source,
                })?;
            Ok(source == skip)
        };
        self.scan_blocks(from, |first, value, scratch| {
            // How much of `scratch` holds this block, once it is unpacked.
            let mut unpacked = None;
            // A kept block carries the peer's LSNs: never sent as it is.
            if let Some(packed) = packed_of(value)?.filter(|p| !p.kept && first >= from) {
                // Counted, and nothing to leave out: sent as it is, not unpacked. A block's
                // LSNs run without a gap; a header that says otherwise is not trusted with the
                // subscriber's position, and the block is read instead. (Sent unread, a block
                // damaged on disk is found by the subscriber's store, which refuses it.)
                let counted = packed.counted.filter(|&(count, span)| {
                    skip_source.is_none() && u64::from(span) + 1 == u64::from(count)
                });
                let (count, last, whole) = match counted {
                    Some((count, span)) => (count as usize, first + u64::from(span), true),
                    None => {
                        let (mut count, mut last, mut whole) = (0usize, first, true);
                        let block = unpack_block(value, first, scratch)?;
                        // A packed block unpacks into the front of `scratch`.
                        unpacked = Some(block.len());
                        for bytes in block_entries(block) {
                            let bytes = bytes?;
                            last = entry_lsn(first, bytes)?;
                            whole &= !skipped(last, bytes)?;
                            count += 1;
                        }
                        (count, last, whole)
                    }
                };
                if whole && count > 0 {
                    if looked > 0 && looked + count > max {
                        return Ok(false);
                    }
                    if sink.packed(count, packed.unpacked, packed.lz4) {
                        seen = Some((seen.map_or(first, |(first, _)| first), last));
                        looked += count;
                        return Ok(looked < max);
                    }
                    if looked > 0 {
                        return Ok(false);
                    }
                    // Too large for the page packed: entry by entry, as far as they fit.
                }
            }
            let block = match unpacked {
                Some(len) => &scratch[..len],
                None => unpack_block(value, first, scratch)?,
            };
            for bytes in block_entries(block) {
                let bytes = bytes?;
                let lsn = entry_lsn(first, bytes)?;
                if lsn < from {
                    continue;
                }
                if !skipped(lsn, bytes)? && !sink.entry(bytes) {
                    return Ok(false);
                }
                seen = Some((seen.map_or(lsn, |(first, _)| first), lsn));
                looked += 1;
                if looked >= max {
                    return Ok(false);
                }
            }
            Ok(true)
        })?;
        Ok(seen)
    }

    /// The first LSN of the block that holds `lsn`, if any block starts at or before it.
    fn block_holding(&self, lsn: u64) -> Result<Option<u64>, DbError> {
        match self.log.range(..=block_key(lsn)).next_back() {
            Some(item) => Ok(block_first(&item.key()?)),
            None => Ok(None),
        }
    }

    /// One log entry, if retained.
    pub fn log_entry(&self, lsn: u64) -> Result<Option<LogEntry>, DbError> {
        if lsn < self.log_start.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(None);
        }
        let Some(first) = self.block_holding(lsn)? else {
            return Ok(None);
        };
        let Some(value) = self.log.get(block_key(first))? else {
            return Ok(None);
        };
        let mut scratch = Vec::new();
        let block = unpack_block(&value, first, &mut scratch)?;
        for bytes in block_entries(block) {
            let bytes = bytes?;
            if entry_lsn(first, bytes)? == lsn {
                return Ok(Some(decode("log entry", lsn, bytes)?));
            }
        }
        Ok(None)
    }

    /// Rewrites a log stored one entry per key (before blocks) as blocks, a few hundred
    /// blocks per atomic batch: the two kinds of key never collide, so a start interrupted
    /// half-way finishes the job the next time.
    fn convert_log(&self) -> Result<(), DbError> {
        let mut converted = 0u64;
        loop {
            let mut batch = self.db.batch();
            let mut block = Vec::new();
            let mut first = None;
            let mut keys = 0;
            for item in self.log.iter().take(BLOCK_ENTRIES * 256) {
                let (key, value) = item.into_inner()?;
                if block_first(&key).is_some() {
                    break;
                }
                if key.len() != 8 {
                    return Err(DbError::Corrupt {
                        what: "log",
                        key: format!("{:?}", &key[..]),
                        source: CodecError::Decode(format!(
                            "a log key of {} bytes, neither a block's 9 nor an entry's 8",
                            key.len()
                        )),
                    });
                }
                let lsn = u64_value(&key);
                if first.is_some() && (keys % BLOCK_ENTRIES == 0) {
                    batch.insert(&self.log, block_key(first.unwrap_or(lsn)), block.as_slice());
                    block.clear();
                    first = None;
                }
                first.get_or_insert(lsn);
                block.extend_from_slice(&(value.len() as u32).to_le_bytes());
                block.extend_from_slice(&value);
                batch.remove(&self.log, key);
                keys += 1;
            }
            if keys == 0 {
                break;
            }
            if let Some(first) = first {
                batch.insert(&self.log, block_key(first), block.as_slice());
            }
            batch.commit()?;
            converted += keys as u64;
        }
        if converted > 0 {
            self.db.persist(PersistMode::SyncAll)?;
            tracing::info!(entries = converted, "stored the log in blocks");
        }
        Ok(())
    }

    /// A full resync from `peer` that is under way here.
    ///
    /// While an ingestion is open the recorded point lags the pages it holds: this answers with
    /// the newest, which this store makes durable as long as it keeps running. A store that
    /// stops first starts again from the recorded one.
    pub fn resync_point(&self, peer: &str) -> Result<Option<ResyncPoint>, DbError> {
        let held = self
            .ingest
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .and_then(|open| open.held(peer).cloned());
        if held.is_some() {
            return Ok(held);
        }
        let key = format!("{RESYNC_PREFIX}{peer}");
        let Some(value) = self.meta.get(&key)? else {
            return Ok(None);
        };
        Ok(Some(decode("resync point", key, &value)?))
    }

    /// Writes the records' memtables out to tables, waiting at most `within`, so that a
    /// snapshot taken next reads tables only: for a full resync. A memtable that cannot be
    /// written out in time is read from, only slower.
    pub fn settle(&self, within: std::time::Duration) {
        if let Err(e) = self.write_out(&[&self.alerts, &self.clears], within) {
            tracing::warn!(error = %e, "the records' memtables were not written out before a snapshot; it reads them, slower");
        }
    }

    /// A consistent view of everything stored, as of the last commit.
    pub fn snapshot(&self) -> Snapshot {
        self.db.snapshot()
    }

    /// What a snapshot's records are consistent with: the checkpoint's LSN, and how far
    /// `peer`'s log had been applied at that checkpoint.
    pub fn snapshot_position(&self, snap: &Snapshot, peer: &str) -> Result<(u64, u64), DbError> {
        let read = |key: &str| -> Result<Option<u64>, DbError> {
            Ok(snap.get(&self.meta, key)?.map(|v| u64_value(&v)))
        };
        Ok((
            read(CHECKPOINT_LSN)?.unwrap_or(0),
            read(&format!("{CHECKPOINT_CURSOR_PREFIX}{peer}"))?.unwrap_or(0),
        ))
    }

    /// Records in a snapshot (clears and alerts), approximately: for progress only.
    pub fn snapshot_size(&self) -> u64 {
        (self.alerts.approximate_len() + self.clears.approximate_len()) as u64
    }

    /// Every origin's applied set in a snapshot.
    pub fn snapshot_applied(&self, snap: &Snapshot) -> Result<Vec<AppliedRanges>, DbError> {
        let mut out = Vec::new();
        for item in snap.iter(&self.applied) {
            let (key, value) = item.into_inner()?;
            let origin: Origin = decode("applied-set key", format!("{key:?}"), &key)?;
            let ranges: SeqRanges = decode("applied set", &origin, &value)?;
            out.push(AppliedRanges { origin, ranges });
        }
        Ok(out)
    }

    /// Up to `limit` records of a snapshot after `after`: clears first, then alerts, each in
    /// key order, and no more alerts than fit a frame of `max_frame` bytes (at least one). Alert
    /// states go into `alerts` as stored (a row's bytes after its serial), never decoded: a
    /// resync's sender only copies them. Returns the clears, the last key and whether the
    /// snapshot has nothing after it.
    pub fn snapshot_page(
        &self,
        snap: &Snapshot,
        after: Option<&SnapshotKey>,
        limit: usize,
        max_frame: usize,
        alerts: &mut SnapshotPageWriter<'_>,
    ) -> Result<(Clears, Option<SnapshotKey>, bool), DbError> {
        use std::ops::Bound;
        let mut clears = Vec::new();
        let mut last = None;
        let after_bound = |key: &str| Bound::Excluded(key.as_bytes().to_vec());
        let clear_from = match after {
            None => Some(Bound::Unbounded),
            Some(SnapshotKey::Clear(key)) => Some(after_bound(key)),
            Some(SnapshotKey::Alert(_)) => None,
        };
        // The clears' share of the page's head, besides the room the writer left for it.
        let mut clear_bytes = 0;
        if let Some(from) = clear_from {
            for item in snap
                .range(&self.clears, (from, Bound::Unbounded))
                .take(limit)
            {
                let (key, value) = item.into_inner()?;
                let key = String::from_utf8_lossy(&key).into_owned();
                let version: Version = decode("clear", &key, &value)?;
                clear_bytes += key.len() + value.len() + 20;
                last = Some(SnapshotKey::Clear(key.clone()));
                clears.push((key, version));
            }
            if clears.len() == limit {
                return Ok((clears, last, false));
            }
        }
        let from = match after {
            Some(SnapshotKey::Alert(key)) => after_bound(key),
            _ => Bound::Unbounded,
        };
        let mut last_key = None;
        let mut done = true;
        let alerts_from = snap.range(&self.alerts, (from, Bound::Unbounded));
        for (taken, item) in (clears.len()..).zip(alerts_from) {
            if taken == limit {
                done = false;
                break;
            }
            let (key, value) = item.into_inner()?;
            let id = std::str::from_utf8(&key).map_err(|e| DbError::Corrupt {
                what: "alert key",
                key: String::from_utf8_lossy(&key).into_owned(),
                source: CodecError::Decode(e.to_string()),
            })?;
            let (_serial, state) =
                split_prefix::<u64>(&value).map_err(|source| DbError::Corrupt {
                    what: "alert",
                    key: id.to_string(),
                    source,
                })?;
            // Cut where the frame would be over the limit: a page of large alerts is sent
            // in parts rather than refused whole, which would stall the resync.
            if !alerts.has_room(id.len() + state.len(), clear_bytes, max_frame) {
                done = false;
                break;
            }
            alerts.push_alert(id, state)?;
            last_key = Some(key);
        }
        if let Some(key) = last_key {
            last = Some(SnapshotKey::Alert(
                String::from_utf8_lossy(&key).into_owned(),
            ));
        }
        Ok((clears, last, done))
    }

    /// How far this store has applied `peer`'s log.
    pub fn cursor(&self, peer: &str) -> Result<u64, DbError> {
        Ok(self
            .meta_u64(&format!("{CURSOR_PREFIX}{peer}"))?
            .unwrap_or(0))
    }
}

#[cfg(test)]
impl Db {
    /// Each stored log block's first LSN and how it is stored: "plain", "packed" (by this
    /// store) or "kept" (the peer's block).
    pub(crate) fn log_kinds(&self) -> Vec<(u64, &'static str)> {
        self.log
            .iter()
            .map(|item| {
                let (key, value) = item.into_inner().unwrap();
                let kind = match packed_of(&value).unwrap() {
                    None => "plain",
                    Some(p) if p.kept => "kept",
                    Some(_) => "packed",
                };
                (block_first(&key).unwrap(), kind)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::sync::Arc;
    use tandem_protocol::AlertState;
    use tandem_protocol::message::SnapshotHead;

    #[test]
    fn a_first_start_killed_half_way_does_not_stop_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agg_p");
        // What a store killed while creating its directory leaves: the temporary directory
        // with a journal file in it, and no data directory.
        let staging = dir.path().join(".agg_p.creating");
        std::fs::create_dir_all(&staging).unwrap();
        std::fs::write(staging.join("0.jnl"), b"half").unwrap();
        let db = Db::open(&path).unwrap();
        let meta = db.load(&mut Table::new("AGG_P"), 42).unwrap();
        assert_eq!(meta.epoch, 42);
        drop(db);
        assert!(!staging.exists());
        // Opened again, it is the same store.
        let db = Db::open(&path).unwrap();
        assert_eq!(db.load(&mut Table::new("AGG_P"), 7).unwrap().epoch, 42);
    }

    #[test]
    fn an_empty_directory_made_beforehand_becomes_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agg_b");
        std::fs::create_dir_all(&path).unwrap();
        let db = Db::open(&path).unwrap();
        assert_eq!(db.load(&mut Table::new("AGG_B"), 9).unwrap().head_lsn, 0);
    }

    fn event(seq: u64) -> tandem_protocol::Event {
        tandem_protocol::Event {
            origin: Origin::new("probe", 1),
            seq,
            time: 1,
            body: tandem_protocol::EventBody::Occurrence(
                tandem_protocol::AlertFields {
                    identifier: format!("alert-{seq}"),
                    ..Default::default()
                }
                .pack(),
            ),
        }
    }

    /// Commits the entries `lsns` as one group, trimming the log to `first_lsn`.
    fn commit(db: &Db, meta: &mut Meta, lsns: std::ops::RangeInclusive<u64>, first_lsn: u64) {
        commit_from(db, meta, lsns, first_lsn, |_| "AGG_P");
    }

    /// [`commit`], each entry from the source `source` names for its LSN.
    fn commit_from(
        db: &Db,
        meta: &mut Meta,
        lsns: std::ops::RangeInclusive<u64>,
        first_lsn: u64,
        source: impl Fn(u64) -> &'static str,
    ) {
        let mut log = LogBuf::default();
        for lsn in lsns {
            let e = event(lsn);
            log.push(tandem_protocol::message::LogEntryRef {
                lsn,
                source: source(lsn),
                source_serial: lsn,
                event: &e,
            });
            meta.head_lsn = lsn;
        }
        meta.first_lsn = first_lsn;
        db.write(
            &log,
            meta,
            &PeerWrites::default(),
            None,
            &Table::new("AGG_P"),
        )
        .and_then(|()| db.sync())
        .unwrap();
    }

    fn lsns(entries: &[LogEntry]) -> Vec<u64> {
        entries.iter().map(|e| e.lsn).collect()
    }

    #[test]
    fn the_log_reads_back_from_any_lsn_across_blocks_and_commits() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("s")).unwrap();
        let mut meta = db.load(&mut Table::new("AGG_P"), 1).unwrap();
        // Groups of 1, 300, 700 and 5 entries: blocks at 1, 2, 258, 302, 558, 814 and 1002.
        commit(&db, &mut meta, 1..=1, 1);
        commit(&db, &mut meta, 2..=301, 1);
        commit(&db, &mut meta, 302..=1001, 1);
        commit(&db, &mut meta, 1002..=1006, 1);
        for from in [
            1, 2, 3, 257, 258, 301, 302, 557, 558, 813, 814, 1001, 1002, 1006,
        ] {
            let all = db.read_log(from, 10_000).unwrap();
            assert_eq!(lsns(&all), (from..=1006).collect::<Vec<_>>(), "from {from}");
            assert_eq!(all[0].event, event(from));
            let some = db.read_log(from, 7).unwrap();
            assert_eq!(lsns(&some), (from..=1006).take(7).collect::<Vec<_>>());
        }
        assert!(db.read_log(1007, 10).unwrap().is_empty());
        for lsn in 1..=1006 {
            assert_eq!(db.log_entry(lsn).unwrap().map(|e| e.lsn), Some(lsn));
        }
        assert!(db.log_entry(1007).unwrap().is_none());

        // Trimmed to 600: reads start there at once.
        commit(&db, &mut meta, 1007..=1010, 600);
        assert!(db.log_entry(599).unwrap().is_none());
        assert!(db.log_entry(2).unwrap().is_none());
        assert_eq!(db.log_entry(600).unwrap().map(|e| e.lsn), Some(600));
        for from in [1, 599, 600] {
            assert_eq!(
                lsns(&db.read_log(from, 10_000).unwrap()),
                (600..=1010).collect::<Vec<_>>()
            );
        }
        let blocks = |db: &Db| -> Vec<u64> {
            db.log
                .iter()
                .map(|item| block_first(&item.key().unwrap()).unwrap())
                .collect()
        };
        // The space comes back a storage table at a time: none is wholly below 600 yet.
        db.reclaim_log(600).unwrap();
        assert_eq!(blocks(&db), [1, 2, 258, 302, 558, 814, 1002, 1007]);

        // A table of 1..=1010, then one of what follows: trimmed past the first, it goes.
        db.log.rotate_memtable_and_wait().unwrap();
        commit(&db, &mut meta, 1011..=1400, 600);
        db.log.rotate_memtable_and_wait().unwrap();
        commit(&db, &mut meta, 1401..=1401, 1200);
        db.reclaim_log(1200).unwrap();
        assert_eq!(blocks(&db), [1011, 1267, 1401]);
        assert_eq!(
            lsns(&db.read_log(1, 10_000).unwrap()),
            (1200..=1401).collect::<Vec<_>>()
        );

        // And a reopened store reads from its first LSN too.
        drop(db);
        let db = Db::open(&dir.path().join("s")).unwrap();
        assert_eq!(
            db.load(&mut Table::new("AGG_P"), 1).unwrap().first_lsn,
            1200
        );
        assert!(db.log_entry(1199).unwrap().is_none());
        assert_eq!(
            lsns(&db.read_log(1, 10_000).unwrap()),
            (1200..=1401).collect::<Vec<_>>()
        );
    }

    /// A subscriber's page as [`Db::read_log_raw`] fills it, taking whole blocks packed only
    /// if `packs`.
    #[derive(Default)]
    struct Page {
        batch: tandem_protocol::message::LogBatch,
        /// The entries of each block it took packed.
        packed: Vec<usize>,
        packs: bool,
    }

    impl LogSink for Page {
        fn entry(&mut self, entry: &[u8]) -> bool {
            self.batch.push_encoded(entry);
            true
        }
        fn packed(&mut self, count: usize, unpacked: usize, lz4: &[u8]) -> bool {
            if self.packs {
                self.batch.push_packed(count as u32, unpacked as u32, lz4);
                self.packed.push(count);
            }
            self.packs
        }
    }

    /// Reads the log from `from` page by page, as a subscriber does, until the head. Returns
    /// the entries and the packed blocks' entry counts, page by page.
    fn pages(
        db: &Db,
        mut from: u64,
        max: usize,
        skip: Option<&str>,
        packs: bool,
    ) -> (Vec<LogEntry>, Vec<Vec<usize>>) {
        let (mut entries, mut packed) = (Vec::new(), Vec::new());
        for _ in 0..10_000 {
            let mut page = Page {
                packs,
                ..Page::default()
            };
            let Some((first, last)) = db.read_log_raw(from, max, skip, &mut page).unwrap() else {
                return (entries, packed);
            };
            assert_eq!(first, from, "a page starts where it was asked to");
            entries.extend(page.batch.decode().unwrap());
            packed.push(page.packed);
            from = last + 1;
        }
        panic!("the log did not end");
    }

    #[test]
    fn a_subscriber_gets_whole_blocks_packed_and_the_rest_entry_by_entry() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("s")).unwrap();
        let mut meta = db.load(&mut Table::new("AGG_P"), 1).unwrap();
        // Blocks at 1, 2 (256 entries), 258 (44), 302 (256), 558 (256), 814 (188), 1002 (5)
        // and 1007 (3, stored unpacked); entry 600 came from the peer.
        let source = |lsn| if lsn == 600 { "AGG_B" } else { "AGG_P" };
        commit_from(&db, &mut meta, 1..=1, 1, source);
        commit_from(&db, &mut meta, 2..=301, 1, source);
        commit_from(&db, &mut meta, 302..=1001, 1, source);
        commit_from(&db, &mut meta, 1002..=1006, 1, source);
        // And a block stored as it is, as one that did not compress would be: 1007..=1009.
        let mut plain = LogBuf::default();
        let events: Vec<_> = (1007..=1009).map(event).collect();
        for (lsn, e) in (1007..=1009).zip(&events) {
            plain.push(tandem_protocol::message::LogEntryRef {
                lsn,
                source: "AGG_P",
                source_serial: lsn,
                event: e,
            });
        }
        for block in plain.blocks(BLOCK_ENTRIES, BLOCK_BYTES) {
            db.log.insert(block_key(block.first), block.bytes).unwrap();
        }
        let all = db.read_log(1, 10_000).unwrap();
        assert_eq!(all.len(), 1009);

        // From a block's start: every block whole and packed, pages ending between blocks.
        let (got, packed) = pages(&db, 2, 1_000, None, true);
        assert_eq!(got, all[1..]);
        assert_eq!(packed, [vec![256, 44, 256, 256, 188], vec![5]]);
        // A page of 300 takes 2..=301 (two blocks) and ends before the block of 256 it has
        // no room for; a page of 100 takes a block of 256 whole rather than cut it.
        let (got, packed) = pages(&db, 2, 300, None, true);
        assert_eq!(got, all[1..]);
        assert_eq!(packed, [vec![256, 44], vec![256], vec![256], vec![188, 5]]);
        let (got, packed) = pages(&db, 2, 100, None, true);
        assert_eq!(got, all[1..]);
        assert_eq!(packed[..2], [vec![256], vec![44]]);

        // From inside a block: its rest entry by entry, then whole blocks.
        let (got, packed) = pages(&db, 100, 10_000, None, true);
        assert_eq!(got, all[99..]);
        assert_eq!(packed, [vec![44, 256, 256, 188, 5]]);

        // Leaving out the peer's entry: its block entry by entry, without it.
        let (got, packed) = pages(&db, 2, 10_000, Some("AGG_B"), true);
        let without: Vec<_> = all[1..].iter().filter(|e| e.lsn != 600).cloned().collect();
        assert_eq!(got, without);
        assert_eq!(
            packed,
            [vec![256, 44, 256, 188, 5]],
            "all but the block at 558 whole"
        );

        // A page with no room for a block packed gets it entry by entry.
        let (got, packed) = pages(&db, 2, 10_000, None, false);
        assert_eq!(got, all[1..]);
        assert!(packed.iter().all(Vec::is_empty));
    }

    /// A subscriber is sent a block as stored, without it being unpacked, from the count its
    /// head keeps; blocks from before heads kept a count, and a head whose count and LSNs
    /// disagree, are unpacked and counted instead, so its position is always the entries'.
    #[test]
    fn a_block_is_sent_by_its_count_and_an_uncounted_or_doubtful_one_by_its_entries() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("s")).unwrap();
        let mut meta = db.load(&mut Table::new("AGG_P"), 1).unwrap();
        // Blocks at 1 (256 entries), 257 (256), 513 (88).
        commit(&db, &mut meta, 1..=600, 1);
        let all = db.read_log(1, 10_000).unwrap();
        let (got, packed) = pages(&db, 1, 10_000, None, true);
        assert_eq!(got, all);
        assert_eq!(packed, [vec![256, 256, 88]]);

        let stored = |first: u64| db.log.get(block_key(first)).unwrap().unwrap().to_vec();
        for first in [1, 257, 513] {
            assert_eq!(stored(first)[..4], COUNTED);
        }
        // 1: a head claiming a span its count does not have (believed, the subscriber would
        // skip to 1001).
        let mut doubtful = stored(1);
        doubtful[12..16].copy_from_slice(&1000u32.to_le_bytes());
        db.log.insert(block_key(1), &doubtful).unwrap();
        // 257: a head claiming 300 entries where its LSNs would span 256.
        let mut doubtful = stored(257);
        doubtful[8..12].copy_from_slice(&300u32.to_le_bytes());
        db.log.insert(block_key(257), &doubtful).unwrap();
        // 513: the layout from before the count, [PACKED], length, LZ4.
        let counted = stored(513);
        let mut old = PACKED.to_vec();
        old.extend_from_slice(&counted[4..8]);
        old.extend_from_slice(&counted[16..]);
        db.log.insert(block_key(513), &old).unwrap();

        let (got, packed) = pages(&db, 1, 10_000, None, true);
        assert_eq!(got, all, "every entry, once, in order");
        assert_eq!(
            packed,
            [vec![256, 256, 88]],
            "each block counted by its entries"
        );
        let (got, _) = pages(&db, 300, 10_000, None, true);
        assert_eq!(got, all[299..]);
    }

    /// Entries logged as they came in a peer's packed segment are stored as the peer's LZ4
    /// block, and read back with this store's LSNs by every reader: as what the store would
    /// have written itself, never sent on packed (the block's LSNs are the peer's), and
    /// refused when the block does not hold what its head says.
    #[test]
    fn a_kept_peer_block_reads_back_with_this_stores_lsns() {
        use tandem_protocol::message::{LogEntryRef, PackedRun};
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("s")).unwrap();
        let mut meta = db.load(&mut Table::new("AGG_B"), 1).unwrap();
        let events: Vec<_> = (1..=200).map(event).collect();
        // The peer's block: its entries 1..=200, its LSNs.
        let mut peer = LogBuf::default();
        for (lsn, e) in (1..=200).zip(&events) {
            peer.push(LogEntryRef {
                lsn,
                source: "AGG_P",
                source_serial: lsn * 3,
                event: e,
            });
        }
        let peer_block = peer.blocks(BLOCK_ENTRIES, BLOCK_BYTES).next().unwrap();
        assert_eq!(peer_block.count, 200);
        let lz4 = lz4_flex::block::compress(peer_block.bytes);
        // This store logs one of its own (998), then the peer's 200 as 999..=1198, another of
        // its own (1199).
        let mut log = LogBuf::default();
        let own = event(5_000);
        let entry = |lsn, source, source_serial, event| LogEntryRef {
            lsn,
            source,
            source_serial,
            event,
        };
        log.push(entry(998, "AGG_B", 1, &own));
        let from = log.ends.len();
        for (lsn, e) in (999..).zip(&events) {
            log.push(entry(lsn, "AGG_P", (lsn - 998) * 3, e));
        }
        log.keep_packed(
            from,
            &PackedRun {
                entries: 0..200,
                unpacked: peer_block.bytes.len(),
                lz4: bytes::Bytes::from(lz4.clone()),
            },
        );
        log.push(entry(1199, "AGG_B", 2, &own));
        let blocks: Vec<_> = log.blocks(BLOCK_ENTRIES, BLOCK_BYTES).collect();
        assert_eq!(
            blocks
                .iter()
                .map(|b| (b.first, b.count))
                .collect::<Vec<_>>(),
            [(998, 1), (999, 200), (1199, 1)],
            "a kept run is a block of its own"
        );
        let ours = blocks[1].bytes.to_vec();
        (meta.first_lsn, meta.head_lsn) = (998, 1199);
        db.write(
            &log,
            &meta,
            &PeerWrites::default(),
            None,
            &Table::new("AGG_B"),
        )
        .and_then(|()| db.sync())
        .unwrap();

        let value = db.log.get(block_key(999)).unwrap().unwrap().to_vec();
        assert_eq!(value[..4], KEPT);
        assert_eq!(
            &value[16..],
            &lz4[..],
            "the peer's block, not compressed again"
        );
        assert_eq!(
            unpack_block(&value, 999, &mut Vec::new()).unwrap(),
            &ours[..],
            "read back as this store would have written it"
        );
        let all = db.read_log(998, 10_000).unwrap();
        assert_eq!(lsns(&all), (998..=1199).collect::<Vec<_>>());
        for (entry, e) in all[1..201].iter().zip(&events) {
            assert_eq!((&*entry.source, &entry.event), ("AGG_P", e));
            assert_eq!(entry.source_serial, (entry.lsn - 998) * 3);
        }
        let one = db.log_entry(1100).unwrap().unwrap();
        assert_eq!((one.lsn, one.event.seq), (1100, 102));
        let (got, packed) = pages(&db, 998, 10_000, None, true);
        assert_eq!(got, all);
        assert_eq!(
            packed,
            [Vec::<usize>::new()],
            "a kept block goes entry by entry"
        );
        let (got, _) = pages(&db, 1050, 10_000, Some("AGG_B"), true);
        assert_eq!(lsns(&got), (1050..=1198).collect::<Vec<_>>());

        // A head that claims another count, or a block that does not unpack, is an error.
        for claimed in [199, u32::MAX] {
            let mut lying = value.clone();
            lying[8..12].copy_from_slice(&claimed.to_le_bytes());
            assert!(matches!(
                unpack_block(&lying, 999, &mut Vec::new()),
                Err(DbError::Corrupt { .. })
            ));
        }
        let mut cut = value.clone();
        cut.truncate(value.len() - 10);
        assert!(unpack_block(&cut, 999, &mut Vec::new()).is_err());
    }

    #[test]
    fn a_snapshot_for_a_resync_is_taken_of_tables_and_holds_every_row() {
        use fjall::AbstractTree as _;
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("s")).unwrap();
        let mut table = Table::new("AGG_P");
        let mut meta = db.load(&mut table, 1).unwrap();
        let mut changes = Changes::default();
        for seq in 1..=2_500 {
            table.apply(event(seq), None, &mut changes);
        }
        meta.head_lsn = 2_500;
        let mut checkpoint = Checkpoint::default();
        checkpoint.encode(&table, &changes, &meta, &[]).unwrap();
        db.write_checkpoint(&checkpoint).unwrap();
        assert!(!db.alerts.tree.active_memtable().is_empty());

        db.settle(std::time::Duration::from_secs(30));
        assert!(db.alerts.tree.active_memtable().is_empty());
        assert_eq!(db.alerts.tree.sealed_memtable_count(), 0);
        assert!(db.alerts.tree.table_count() > 0);

        let snap = db.snapshot();
        let (mut after, mut ids) = (None, Vec::new());
        loop {
            let mut buf = bytes::BytesMut::new();
            let mut page = SnapshotPageWriter::begin(&mut buf, &[]);
            let (clears, last, _) = db
                .snapshot_page(&snap, after.as_ref(), 1_000, usize::MAX, &mut page)
                .unwrap();
            assert!(clears.is_empty());
            let n = page.alerts();
            page.finish(usize::MAX, &SnapshotHead::default(), &[], &clears)
                .unwrap();
            let chunk = match tandem_protocol::codec::from_bytes(&buf[4..]).unwrap() {
                tandem_protocol::Message::SnapshotChunk(chunk) => chunk,
                other => panic!("{other:?}"),
            };
            ids.extend(chunk.alerts.into_iter().map(|(id, _)| id.to_string()));
            if n < 1_000 {
                break;
            }
            after = last;
        }
        let mut want: Vec<String> = (1..=2_500).map(|seq| format!("alert-{seq}")).collect();
        want.sort();
        assert_eq!(ids, want);

        // Under a frame limit the pages are cut to fit it, with room for a gateway's head:
        // every row still comes, in order, and only the last page says it is the last.
        let max_frame = 64 * 1024;
        let (mut after, mut cut_ids, mut pages) = (None, Vec::new(), 0);
        loop {
            let mut buf = bytes::BytesMut::new();
            let mut page = SnapshotPageWriter::begin(&mut buf, &[]);
            let (clears, last, done) = db
                .snapshot_page(&snap, after.as_ref(), 1_000, max_frame, &mut page)
                .unwrap();
            page.finish(max_frame, &SnapshotHead::default(), &[], &clears)
                .unwrap();
            assert!(
                buf.len() <= max_frame - tandem_protocol::codec::PAGE_HEAD_ROOM,
                "{}",
                buf.len()
            );
            let chunk = match tandem_protocol::codec::from_bytes(&buf[4..]).unwrap() {
                tandem_protocol::Message::SnapshotChunk(chunk) => chunk,
                other => panic!("{other:?}"),
            };
            assert!(done || !chunk.alerts.is_empty());
            cut_ids.extend(chunk.alerts.into_iter().map(|(id, _)| id.to_string()));
            pages += 1;
            if done {
                break;
            }
            after = last;
        }
        assert!(pages > 3, "{pages} pages");
        assert_eq!(cut_ids, want);
    }

    /// A receiving store's resync, as the commit thread drives it: `pages` of the sender's
    /// rows merged as taken (their states as encoded bytes), each page one forced checkpoint
    /// with its progress; the last page ends the resync.
    struct Receiver {
        db: Db,
        table: Table,
        meta: Meta,
        changes: Changes,
    }

    impl Receiver {
        fn open(path: &Path) -> Receiver {
            let db = Db::open(path).unwrap();
            let mut table = Table::new("AGG_B");
            let meta = db.load(&mut table, 2).unwrap();
            Receiver {
                db,
                table,
                meta,
                changes: Changes::default(),
            }
        }

        fn commit(&mut self, resync: Option<Option<ResyncPoint>>) {
            let mut peers = PeerWrites::default();
            if let Some(point) = resync {
                peers.set_resync("AGG_P", point);
            }
            let mut checkpoint = Checkpoint::default();
            checkpoint
                .encode(&self.table, &self.changes, &self.meta, &[])
                .unwrap();
            self.db
                .write(
                    &LogBuf::default(),
                    &self.meta,
                    &peers,
                    Some(&checkpoint),
                    &self.table,
                )
                .and_then(|()| self.db.sync())
                .unwrap();
            self.table.start_commit(&mut self.changes);
        }

        fn merge(&mut self, rows: &[(Arc<str>, AlertState)], point: Option<ResyncPoint>) {
            for (id, state) in rows {
                let stored = bytes::Bytes::from(to_bytes(state).unwrap());
                let incoming = crate::table::Incoming::new(id.clone(), state.clone());
                self.table
                    .merge_row(incoming, Some(stored), Some(Vec::new()), &mut self.changes);
            }
            self.commit(Some(point));
        }

        /// Every row as stored, read back by a fresh start.
        fn reloaded(path: &Path) -> (Vec<(String, u64, AlertState)>, Option<ResyncPoint>) {
            let again = Receiver::open(path);
            let point = again.db.resync_point("AGG_P").unwrap();
            (rows_of(&again.table), point)
        }
    }

    fn rows_of(table: &Table) -> Vec<(String, u64, AlertState)> {
        let mut rows: Vec<_> = table
            .rows()
            .map(|(id, row)| (id.to_string(), row.serial, row.state.clone()))
            .collect();
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        rows
    }

    /// A sender's rows in key order, as its snapshot pages bring them.
    fn snapshot_rows(n: u64) -> Vec<(Arc<str>, AlertState)> {
        let mut sender = Table::new("AGG_P");
        let mut changes = Changes::default();
        for seq in 1..=n {
            sender.apply(event(seq), None, &mut changes);
        }
        let mut rows: Vec<_> = sender
            .rows()
            .map(|(id, row)| (id.clone(), row.state.clone()))
            .collect();
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        rows
    }

    fn point(merged: u64) -> ResyncPoint {
        ResyncPoint {
            snapshot: 7,
            lsn: 300,
            peer_cursor: 0,
            after: None,
            merged,
            total: 300,
        }
    }

    /// The rows a full resync takes unchanged are bulk loaded; a row written through a batch
    /// meanwhile (a live event on a row the snapshot brought) keeps its newer state on disk;
    /// the progress is recorded once the rows are durable, and reported meanwhile.
    #[test]
    fn a_resyncs_rows_are_bulk_loaded_and_a_row_changed_meanwhile_stays_newer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let rows = snapshot_rows(300);
        let mut receiver = Receiver::open(&path);
        receiver.merge(&rows[..100], Some(point(100)));
        assert!(receiver.db.ingest.lock().unwrap().is_some(), "no ingestion");
        assert_eq!(receiver.db.resync_point("AGG_P").unwrap(), Some(point(100)));
        let recorded = receiver
            .db
            .meta
            .get(format!("{RESYNC_PREFIX}AGG_P"))
            .unwrap();
        assert!(
            recorded.is_none(),
            "progress recorded before its rows are durable"
        );

        // A live event on a merged row, its checkpoint written through a batch.
        let changed = rows[10].0.to_string();
        let mut live = event(1);
        live.origin = Origin::new("live", 1);
        live.time = 99;
        if let tandem_protocol::EventBody::Occurrence(fields) = &mut live.body {
            let mut f = fields.unpack();
            f.identifier = changed.clone();
            f.summary = "newer".into();
            *fields = f.pack();
        }
        receiver.table.apply(live, None, &mut receiver.changes);
        receiver.commit(None);

        receiver.merge(&rows[100..200], Some(point(200)));
        receiver.merge(&rows[200..], None);
        assert!(receiver.db.ingest.lock().unwrap().is_none(), "not finished");
        let want = rows_of(&receiver.table);
        assert_eq!(want.len(), 300);
        let summary = |rows: &[(String, u64, AlertState)]| {
            let row = rows.iter().find(|(id, ..)| *id == changed).unwrap();
            row.2.latest.value.summary().to_string()
        };
        assert_eq!(summary(&want), "newer");
        drop(receiver);

        let (stored, point) = Receiver::reloaded(&path);
        assert_eq!(point, None, "the finished resync is forgotten");
        assert_eq!(
            summary(&stored),
            "newer",
            "the ingested copy hid the newer row"
        );
        assert_eq!(stored, want);
    }

    /// A store that stops with an ingestion open keeps what its commits made durable: the
    /// rows written through batches, not the unfinished ingestion's, and the progress recorded
    /// before it, from which the resync resumes.
    #[test]
    fn a_store_stopped_during_a_bulk_load_resumes_from_its_last_durable_progress() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let rows = snapshot_rows(300);
        let mut receiver = Receiver::open(&path);
        // Small pages go through batches; the first big one opens an ingestion.
        receiver.merge(&rows[..20], Some(point(20)));
        assert!(receiver.db.ingest.lock().unwrap().is_none());
        receiver.merge(&rows[20..150], Some(point(150)));
        assert!(receiver.db.ingest.lock().unwrap().is_some());
        drop(receiver);

        let (stored, point) = Receiver::reloaded(&path);
        assert_eq!(point, Some(self::point(20)));
        let ids: Vec<&str> = stored.iter().map(|(id, ..)| id.as_str()).collect();
        let want: Vec<&str> = rows[..20].iter().map(|(id, _)| &**id).collect();
        assert_eq!(ids, want);
    }

    /// A resync that starts over on a new snapshot brings keys the open ingestion is past: it
    /// finishes that one (its rows durable) and opens another for the new pages, instead of
    /// writing them all through batches.
    #[test]
    fn a_resync_that_starts_over_finishes_the_open_bulk_load_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let rows = snapshot_rows(300);
        let mut receiver = Receiver::open(&path);
        receiver.merge(&rows[100..200], Some(point(100)));
        // The new snapshot's first page: keys before the ones taken.
        receiver.merge(&rows[..60], Some(point(60)));
        assert!(receiver.db.ingest.lock().unwrap().is_some());
        drop(receiver);

        // Stopped with the second open: the first's rows are durable, the second's are not,
        // nor the new snapshot's progress (the old one's is moot).
        let (stored, point) = Receiver::reloaded(&path);
        assert_eq!(point, None);
        let ids: Vec<&str> = stored.iter().map(|(id, ..)| id.as_str()).collect();
        let want: Vec<&str> = rows[100..200].iter().map(|(id, _)| &**id).collect();
        assert_eq!(ids, want);
    }

    #[test]
    fn trimming_the_log_leaves_no_tombstones_that_make_its_tables_overlap() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("s")).unwrap();
        let mut meta = db.load(&mut Table::new("AGG_P"), 1).unwrap();
        // Twenty memtables' worth of log, trimmed to the last 1,000 entries as it grows, the
        // way a store past its retention runs.
        for round in 0..20u64 {
            let first = round * 1000 + 1;
            commit(
                &db,
                &mut meta,
                first..=first + 999,
                first.saturating_sub(1000).max(1),
            );
            db.log.rotate_memtable_and_wait().unwrap();
            db.reclaim_log(meta.first_lsn).unwrap();
        }
        // Every table but the one straddling the first LSN, and the newest, went whole.
        use fjall::AbstractTree as _;
        let tables = db.log.tree.table_count();
        assert!(
            tables <= 3,
            "{tables} log tables for 2,000 retained entries"
        );
        assert_eq!(
            lsns(&db.read_log(1, 100_000).unwrap()),
            (19_001 - 1000..=20_000).collect::<Vec<_>>()
        );
    }

    /// The log's blocks are stored compressed, and read back as they were: fjall would leave
    /// the log's tables as they are, and a store wrote 286 MB of them for a million events.
    #[test]
    fn the_logs_blocks_are_stored_compressed() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("s")).unwrap();
        let mut meta = db.load(&mut Table::new("AGG_P"), 1).unwrap();
        commit(&db, &mut meta, 1..=20_000, 1);
        db.log.rotate_memtable_and_wait().unwrap();
        let (mut stored, mut blocks) = (0u64, 0u64);
        for item in db.log.iter() {
            let value = item.into_inner().unwrap().1;
            assert_eq!(value[..4], COUNTED, "every block of this log compresses");
            stored += value.len() as u64;
            blocks += unpack_block(&value, 1, &mut Vec::new()).unwrap().len() as u64;
        }
        let on_disk = db.log.disk_space();
        assert!(
            stored * 2 < blocks && on_disk * 2 < blocks,
            "{blocks} bytes of log blocks stored as {stored}, {on_disk} on disk"
        );
        assert_eq!(
            lsns(&db.read_log(1, 100_000).unwrap()),
            (1..=20_000).collect::<Vec<_>>()
        );
        assert_eq!(db.log_entry(12_345).unwrap().map(|e| e.lsn), Some(12_345));
    }

    /// A packed block that lies about its size, or does not decompress, is a clear error, and
    /// a block stored as it is (by an earlier version, or one that did not compress) still
    /// reads.
    #[test]
    fn a_bad_packed_block_is_an_error_and_a_plain_one_reads() {
        let block = b"\x03\x00\x00\x00abc";
        assert_eq!(unpack_block(block, 1, &mut Vec::new()).unwrap(), block);
        let mut scratch = Vec::new();
        let packed = vec![7u8; 4096];
        let block = LogBlock {
            first: 1,
            last: 1,
            count: 1,
            bytes: &packed,
            packed: None,
        };
        let len = pack_block(&block, &mut scratch).expect("it compresses");
        assert_eq!(
            unpack_block(&scratch[..len], 1, &mut Vec::new()).unwrap(),
            &packed[..]
        );
        let mut lying = scratch[..len].to_vec();
        lying[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            unpack_block(&lying, 1, &mut Vec::new()),
            Err(DbError::Corrupt { .. })
        ));
        let mut short = scratch[..len].to_vec();
        short[4..8].copy_from_slice(&5000u32.to_le_bytes());
        assert!(matches!(
            unpack_block(&short, 1, &mut Vec::new()),
            Err(DbError::Corrupt { .. })
        ));
        let mut garbage = scratch[..len].to_vec();
        garbage.truncate(10);
        assert!(unpack_block(&garbage, 1, &mut Vec::new()).is_err());
    }

    #[test]
    fn a_log_stored_one_entry_per_key_is_converted_to_blocks_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        {
            let db = Db::open(&path).unwrap();
            for lsn in 1..=600u64 {
                let entry = LogEntry {
                    lsn,
                    source: "AGG_P".into(),
                    source_serial: lsn,
                    event: event(lsn),
                };
                db.log
                    .insert(lsn.to_be_bytes(), to_bytes(&entry).unwrap())
                    .unwrap();
            }
            db.meta.insert(HEAD_LSN, 600u64.to_be_bytes()).unwrap();
            db.db.persist(PersistMode::SyncAll).unwrap();
        }
        let db = Db::open(&path).unwrap();
        let meta = db.load(&mut Table::new("AGG_P"), 1).unwrap();
        assert_eq!(meta.head_lsn, 600);
        let all = db.read_log(1, 10_000).unwrap();
        assert_eq!(lsns(&all), (1..=600).collect::<Vec<_>>());
        assert_eq!(all[599].event, event(600));
        let keys: Vec<Option<u64>> = db
            .log
            .iter()
            .map(|item| block_first(&item.key().unwrap()))
            .collect();
        assert_eq!(keys, vec![Some(1), Some(257), Some(513)]);
    }

    #[test]
    fn a_log_missing_entries_after_the_checkpoint_stops_the_start_and_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("s")).unwrap();
        let mut meta = db.load(&mut Table::new("AGG_P"), 1).unwrap();
        commit(&db, &mut meta, 1..=1, 1);
        commit(&db, &mut meta, 2..=301, 1);
        commit(&db, &mut meta, 302..=310, 1);
        let replay = |db: &Db, meta: &Meta| {
            crate::engine::replay(db, &mut Table::new("AGG_P"), meta, &mut Changes::default())
        };
        assert_eq!(replay(&db, &meta).unwrap(), 310);
        // The block holding 258..=301 is lost.
        db.log.remove(block_key(258)).unwrap();
        let err = replay(&db, &meta).unwrap_err();
        assert!(matches!(err, DbError::LogGap { missing: 258, .. }), "{err}");
        assert!(err.to_string().contains("resyncs from its peer"), "{err}");
        // So is the end of the log.
        commit(&db, &mut meta, 311..=311, 1);
        db.log.remove(block_key(311)).unwrap();
        db.log.remove(block_key(302)).unwrap();
        db.log.remove(block_key(2)).unwrap();
        let err = replay(&db, &meta).unwrap_err();
        assert!(matches!(err, DbError::LogGap { missing: 2, .. }), "{err}");
    }

    #[test]
    fn a_log_key_of_no_known_layout_is_reported_not_read_as_an_entry() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        {
            let db = Db::open(&path).unwrap();
            db.log.insert([1u8, 2, 3, 4, 5], b"x").unwrap();
            db.db.persist(PersistMode::SyncAll).unwrap();
        }
        let err = Db::open(&path)
            .and_then(|db| db.load(&mut Table::new("AGG_P"), 1).map(|_| ()))
            .unwrap_err();
        assert!(err.to_string().contains("a log key of 5 bytes"), "{err}");
    }
}
