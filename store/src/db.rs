//! Durable storage of a store in fjall: the records a commit writes and what start-up reads.
//!
//! Keyspaces: `alerts` (identifier → [`Row`]), `applied` (origin → applied sequence ranges),
//! `clears` (clear key → newest resolution version), `log` (LSN, big-endian → [`LogEntry`]) and
//! `meta` (head LSN, next serial, housekeeping sequence, the epoch, replication cursors).
//! Everything one group commit changed goes into one fjall write batch, and the batch is synced
//! before any acknowledgement leaves, so after a crash the records always agree.
//!
//! **The log is the write-ahead log; the other records are a checkpoint.** Every commit writes
//! its log entries and cursors; only a checkpoint commit also writes the rows, applied sets and
//! clears changed since the previous checkpoint, together with `checkpoint_lsn` (the head they
//! are the fold of) and each peer's cursor as of then. Writing a hot alert's row once per
//! checkpoint instead of once per commit is what the durable rate depends on (a row is about
//! as big as an event). Start-up loads the checkpoint and replays the log after
//! `checkpoint_lsn`, so the log is never trimmed past it; a full resync's snapshot is the
//! checkpoint, consistent by construction. A data directory without `checkpoint_lsn` was
//! written with every commit a checkpoint: its checkpoint is its head.

use std::path::Path;

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode, Readable, Snapshot};
use tandem_protocol::AlertState;
use tandem_protocol::codec::{append_bytes, from_bytes, to_bytes};
use tandem_protocol::message::{LogEntry, ResyncPoint, SnapshotKey};
use tandem_protocol::state::AppliedRanges;
use tandem_protocol::state::SeqRanges;
use tandem_protocol::{CodecError, Origin, Version};

use crate::engine::LogBuf;
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
    #[error("record could not be encoded: {0}")]
    Encode(#[from] CodecError),
}

const HEAD_LSN: &str = "head_lsn";
const FIRST_LSN: &str = "first_lsn";
const NEXT_SERIAL: &str = "next_serial";
const HOUSEKEEPING_SEQ: &str = "housekeeping_seq";
const EPOCH: &str = "epoch";
const CHECKPOINT_LSN: &str = "checkpoint_lsn";
const CURSOR_PREFIX: &str = "cursor:";
/// A peer's cursor as of the checkpoint (absent: the same as `cursor:`).
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
}

/// Decodes a stored record, naming it when it does not decode.
fn decode<T: serde::de::DeserializeOwned>(
    what: &'static str,
    key: impl std::fmt::Display,
    bytes: &[u8],
) -> Result<T, DbError> {
    from_bytes(bytes).map_err(|source| DbError::Corrupt {
        what,
        key: key.to_string(),
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
        // to replay.
        let db = Database::builder(path)
            .max_journaling_size(128 * 1024 * 1024)
            .open()?;
        let open = |name: &str| db.keyspace(name, KeyspaceCreateOptions::default);
        Ok(Db {
            alerts: open("alerts")?,
            applied: open("applied")?,
            clears: open("clears")?,
            log: open("log")?,
            meta: open("meta")?,
            db,
        })
    }

    fn meta_u64(&self, key: &str) -> Result<Option<u64>, DbError> {
        Ok(self.meta.get(key)?.map(|v| u64_value(&v)))
    }

    /// Reads everything back into `table`; returns the counters.
    pub fn load(&self, table: &mut Table, new_epoch: u64) -> Result<Meta, DbError> {
        table.reserve(self.alerts.approximate_len());
        for item in self.alerts.iter() {
            let (key, value) = item.into_inner()?;
            let id = String::from_utf8_lossy(&key).into_owned();
            let row: Row = decode("alert", &id, &value)?;
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

    /// Writes one group commit atomically and syncs it to disk. With `checkpoint`, also the
    /// records `changes` names and each peer's cursor as of now (`cursors`: every peer whose
    /// cursor moved since the previous checkpoint).
    ///
    /// `trim` removes those log entries in the same batch.
    #[allow(clippy::too_many_arguments)] // one commit's parts, each written once
    pub fn commit(
        &self,
        table: &Table,
        changes: &Changes,
        log: &LogBuf,
        meta: &Meta,
        peers: &PeerWrites,
        trim: std::ops::Range<u64>,
        scratch: &mut Vec<u8>,
        checkpoint: Option<&[(String, u64)]>,
    ) -> Result<(), DbError> {
        let mut batch = self.db.batch();
        if let Some(cursors) = checkpoint {
            self.write_checkpoint(&mut batch, table, changes, meta, cursors, scratch)?;
        }
        for (lsn, bytes) in log.entries() {
            batch.insert(&self.log, lsn.to_be_bytes(), bytes);
        }
        for lsn in trim {
            batch.remove(&self.log, lsn.to_be_bytes());
        }
        for (peer, lsn) in &peers.cursors {
            batch.insert(
                &self.meta,
                format!("{CURSOR_PREFIX}{peer}"),
                lsn.to_be_bytes(),
            );
        }
        for (peer, point) in &peers.resync {
            let key = format!("{RESYNC_PREFIX}{peer}");
            match point {
                Some(point) => batch.insert(&self.meta, key, to_bytes(point)?),
                None => batch.remove(&self.meta, key),
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
        self.db.persist(PersistMode::SyncAll)?;
        Ok(())
    }

    fn write_checkpoint(
        &self,
        batch: &mut fjall::OwnedWriteBatch,
        table: &Table,
        changes: &Changes,
        meta: &Meta,
        cursors: &[(String, u64)],
        scratch: &mut Vec<u8>,
    ) -> Result<(), DbError> {
        for id in &changes.rows {
            if let Some(row) = table.row(id) {
                scratch.clear();
                append_bytes(row, scratch)?;
                batch.insert(&self.alerts, id.as_bytes(), scratch.as_slice());
            }
        }
        for origin in &changes.origins {
            if let Some(set) = table.applied(origin) {
                batch.insert(&self.applied, to_bytes(origin)?, to_bytes(set)?);
            }
        }
        for key in &changes.clears {
            if let Some(version) = table.clear_version(key) {
                batch.insert(&self.clears, key.as_bytes(), to_bytes(version)?);
            }
        }
        for (peer, lsn) in cursors {
            batch.insert(
                &self.meta,
                format!("{CHECKPOINT_CURSOR_PREFIX}{peer}"),
                lsn.to_be_bytes(),
            );
        }
        batch.insert(&self.meta, CHECKPOINT_LSN, meta.head_lsn.to_be_bytes());
        batch.insert(&self.meta, NEXT_SERIAL, meta.next_serial.to_be_bytes());
        Ok(())
    }

    /// Writes every memtable out, so the next start opens tables instead of replaying the
    /// journal. For a clean shutdown; after a crash the journal replay is what recovers.
    pub fn flush(&self) -> Result<(), DbError> {
        for keyspace in [
            &self.alerts,
            &self.applied,
            &self.clears,
            &self.log,
            &self.meta,
        ] {
            keyspace.rotate_memtable_and_wait()?;
        }
        self.db.persist(PersistMode::SyncAll)?;
        Ok(())
    }

    /// Log entries with LSN >= `from`, at most `max`.
    pub fn read_log(&self, from: u64, max: usize) -> Result<Vec<LogEntry>, DbError> {
        let mut out = Vec::new();
        for item in self.log.range(from.to_be_bytes()..).take(max) {
            let (key, value) = item.into_inner()?;
            let entry: LogEntry = decode("log entry", u64_value(&key), &value)?;
            out.push(entry);
        }
        Ok(out)
    }

    /// One log entry, if retained.
    pub fn log_entry(&self, lsn: u64) -> Result<Option<LogEntry>, DbError> {
        let Some(value) = self.log.get(lsn.to_be_bytes())? else {
            return Ok(None);
        };
        let entry = decode("log entry", lsn, &value)?;
        Ok(Some(entry))
    }

    /// A full resync from `peer` that is under way here.
    pub fn resync_point(&self, peer: &str) -> Result<Option<ResyncPoint>, DbError> {
        let key = format!("{RESYNC_PREFIX}{peer}");
        let Some(value) = self.meta.get(&key)? else {
            return Ok(None);
        };
        Ok(Some(decode("resync point", key, &value)?))
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
    /// key order. Returns them and the key of the last one (None when there were none).
    #[allow(clippy::type_complexity)] // a page: clears, alerts, where it ended
    pub fn snapshot_page(
        &self,
        snap: &Snapshot,
        after: Option<&SnapshotKey>,
        limit: usize,
    ) -> Result<
        (
            Vec<(String, Version)>,
            Vec<(String, AlertState)>,
            Option<SnapshotKey>,
        ),
        DbError,
    > {
        use std::ops::Bound;
        let mut clears = Vec::new();
        let mut alerts = Vec::new();
        let mut last = None;
        let after_bound = |key: &str| Bound::Excluded(key.as_bytes().to_vec());
        let clear_from = match after {
            None => Some(Bound::Unbounded),
            Some(SnapshotKey::Clear(key)) => Some(after_bound(key)),
            Some(SnapshotKey::Alert(_)) => None,
        };
        if let Some(from) = clear_from {
            for item in snap
                .range(&self.clears, (from, Bound::Unbounded))
                .take(limit)
            {
                let (key, value) = item.into_inner()?;
                let key = String::from_utf8_lossy(&key).into_owned();
                let version: Version = decode("clear", &key, &value)?;
                last = Some(SnapshotKey::Clear(key.clone()));
                clears.push((key, version));
            }
        }
        let room = limit - clears.len();
        if room > 0 {
            let from = match after {
                Some(SnapshotKey::Alert(key)) => after_bound(key),
                _ => Bound::Unbounded,
            };
            for item in snap
                .range(&self.alerts, (from, Bound::Unbounded))
                .take(room)
            {
                let (key, value) = item.into_inner()?;
                let id = String::from_utf8_lossy(&key).into_owned();
                let row: Row = decode("alert", &id, &value)?;
                last = Some(SnapshotKey::Alert(id.clone()));
                alerts.push((id, row.state));
            }
        }
        Ok((clears, alerts, last))
    }

    /// How far this store has applied `peer`'s log.
    pub fn cursor(&self, peer: &str) -> Result<u64, DbError> {
        Ok(self
            .meta_u64(&format!("{CURSOR_PREFIX}{peer}"))?
            .unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

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
}
