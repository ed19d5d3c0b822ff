//! Durable storage of a store in fjall: the records a commit writes and what start-up reads.
//!
//! Keyspaces: `alerts` (identifier → [`Row`]), `applied` (origin → applied sequence ranges),
//! `clears` (clear key → newest resolution version), `log` (LSN, big-endian → [`LogEntry`]) and
//! `meta` (head LSN, next serial, housekeeping sequence, the epoch, replication cursors).
//! Everything one group commit changed goes into one fjall write batch, and the batch is synced
//! before any acknowledgement leaves, so after a crash the records always agree.

use std::path::Path;

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use tandem_protocol::codec::{append_bytes, from_bytes, to_bytes};
use tandem_protocol::message::LogEntry;
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
const CURSOR_PREFIX: &str = "cursor:";

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
}

pub struct Db {
    db: Database,
    alerts: Keyspace,
    applied: Keyspace,
    clears: Keyspace,
    log: Keyspace,
    meta: Keyspace,
}

fn u64_value(bytes: &[u8]) -> u64 {
    bytes.try_into().map(u64::from_be_bytes).unwrap_or_default()
}

impl Db {
    pub fn open(path: &Path) -> Result<Db, DbError> {
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
            let row: Row = from_bytes(&value).map_err(|source| DbError::Corrupt {
                what: "alert",
                key: id.clone(),
                source,
            })?;
            table.load_row(&id, row);
        }
        for item in self.applied.iter() {
            let (key, value) = item.into_inner()?;
            let origin: Origin = from_bytes(&key).map_err(|source| DbError::Corrupt {
                what: "applied-set key",
                key: format!("{key:?}"),
                source,
            })?;
            let set: SeqRanges = from_bytes(&value).map_err(|source| DbError::Corrupt {
                what: "applied set",
                key: origin.to_string(),
                source,
            })?;
            table.load_applied(origin, set);
        }
        for item in self.clears.iter() {
            let (key, value) = item.into_inner()?;
            let version: Version = from_bytes(&value).map_err(|source| DbError::Corrupt {
                what: "clear",
                key: String::from_utf8_lossy(&key).into_owned(),
                source,
            })?;
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
        let meta = Meta {
            head_lsn,
            first_lsn: self.meta_u64(FIRST_LSN)?.unwrap_or(1),
            next_serial: self.meta_u64(NEXT_SERIAL)?.unwrap_or(1),
            housekeeping_seq: self.meta_u64(HOUSEKEEPING_SEQ)?.unwrap_or(0),
            epoch,
        };
        table.set_next_serial(meta.next_serial);
        Ok(meta)
    }

    /// Writes one group commit atomically and syncs it to disk.
    ///
    /// `trim_below` removes log entries with smaller LSNs in the same batch.
    #[allow(clippy::too_many_arguments)] // one commit's parts, each written once
    pub fn commit(
        &self,
        table: &Table,
        changes: &Changes,
        log: &LogBuf,
        meta: &Meta,
        cursors: &[(String, u64)],
        trim: std::ops::Range<u64>,
        scratch: &mut Vec<u8>,
    ) -> Result<(), DbError> {
        let mut batch = self.db.batch();
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
        for (lsn, bytes) in log.entries() {
            batch.insert(&self.log, lsn.to_be_bytes(), bytes);
        }
        for lsn in trim {
            batch.remove(&self.log, lsn.to_be_bytes());
        }
        for (peer, lsn) in cursors {
            batch.insert(
                &self.meta,
                format!("{CURSOR_PREFIX}{peer}"),
                lsn.to_be_bytes(),
            );
        }
        batch.insert(&self.meta, HEAD_LSN, meta.head_lsn.to_be_bytes());
        batch.insert(&self.meta, FIRST_LSN, meta.first_lsn.to_be_bytes());
        batch.insert(&self.meta, NEXT_SERIAL, meta.next_serial.to_be_bytes());
        batch.insert(
            &self.meta,
            HOUSEKEEPING_SEQ,
            meta.housekeeping_seq.to_be_bytes(),
        );
        batch.commit()?;
        self.db.persist(PersistMode::SyncAll)?;
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
            let entry: LogEntry = from_bytes(&value).map_err(|source| DbError::Corrupt {
                what: "log entry",
                key: u64_value(&key).to_string(),
                source,
            })?;
            out.push(entry);
        }
        Ok(out)
    }

    /// How far this store has applied `peer`'s log.
    pub fn cursor(&self, peer: &str) -> Result<u64, DbError> {
        Ok(self
            .meta_u64(&format!("{CURSOR_PREFIX}{peer}"))?
            .unwrap_or(0))
    }
}
