//! Bulk loading of a full resync's rows: written straight into storage tables (fjall's
//! ingestion) on a thread of their own, instead of through the journal, a memtable and the
//! flush and compaction that rewrite them.
//!
//! A full resync brings up to every alert of the peer, in key order, and most rows are taken
//! unchanged. Through write batches each of them cost the commit thread a journal write and a
//! memtable insert, and fjall's workers a flush and a compaction: three copies of a gigabyte
//! of rows (docs/PERFORMANCE.md, "Full resync").
//!
//! What an ingestion holds is not durable, nor visible in storage, until it is finished: it
//! then becomes one run of tables with a sequence number newer than every write before. So:
//! - a row written through a batch while an ingestion was open may be older, on disk, than the
//!   ingested copy of the same key; [`Ingest::finish`] hands back those keys, and the commit
//!   that finishes writes their current rows again, after the ingestion;
//! - resync progress covering ingested pages is held back and recorded only with the finish,
//!   so a store that stops before it resumes the resync from the last finished ingestion (the
//!   unfinished one's table files are removed when the storage engine next opens).

use std::collections::HashSet;
use std::sync::mpsc;
use std::thread::JoinHandle;

use fjall::Keyspace;
use tandem_protocol::message::ResyncPoint;

use crate::db::DbError;

/// Rows an open ingestion takes before it is finished, so that a store stopped during a long
/// resync redoes at most this many (about half a second of resync on a 2-core machine). A
/// finish holds the commit thread for about 20 ms; finishing every 1,000,000 rows instead
/// made no difference the benchmark could tell.
pub const FINISH_EVERY: u64 = 250_000;

/// The fewest taken rows in one checkpoint that start an ingestion: finishing one flushes the
/// keyspace's memtable and syncs the new tables (a few milliseconds), not worth it for a
/// stray row, and a resync's page is 1,000 rows by default.
pub const START_AT: usize = 32;

/// Pages waiting for the ingestion thread, at most.
const PAGES_QUEUED: usize = 8;

enum ToThread {
    Page(Page),
    Finish,
}

/// Rows for the ingestion thread: keys and values back to back in one buffer.
#[derive(Default)]
pub struct Page {
    buf: Vec<u8>,
    /// (key start, value start, value end) in `buf`, keys ascending.
    records: Vec<(usize, usize, usize)>,
}

impl Page {
    /// A page with room for `records` rows of `bytes` in all, so that filling it does not
    /// copy what it holds each time it grows (a page of 1,000 rows is about 300 KB).
    pub fn with_capacity(bytes: usize, records: usize) -> Page {
        Page {
            buf: Vec::with_capacity(bytes),
            records: Vec::with_capacity(records),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

/// What a finished ingestion leaves to its commit.
pub struct Finished {
    /// Keys written through write batches while it was open: write them again.
    pub written: HashSet<Box<[u8]>>,
    /// Resync progress it held: record it now.
    pub held: Vec<(String, ResyncPoint)>,
}

/// An open ingestion into one keyspace.
pub struct Ingest {
    pages: Option<mpsc::SyncSender<ToThread>>,
    thread: Option<JoinHandle<Result<(), String>>>,
    /// The last key taken: an ingestion takes keys in ascending order only.
    last: Vec<u8>,
    rows: u64,
    /// Keys written through write batches while this was open.
    written: HashSet<Box<[u8]>>,
    /// Resync progress to record once this is finished.
    held: Vec<(String, ResyncPoint)>,
}

impl Ingest {
    /// Opens an ingestion into `keyspace` on a thread named `name`.
    pub fn start(keyspace: &Keyspace, name: &str) -> Result<Ingest, DbError> {
        let keyspace = keyspace.clone();
        let (pages, rx) = mpsc::sync_channel(PAGES_QUEUED);
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || run(&keyspace, &rx))
            .map_err(|e| DbError::Ingest(format!("starting its thread: {e}")))?;
        Ok(Ingest {
            pages: Some(pages),
            thread: Some(thread),
            last: Vec::new(),
            rows: 0,
            written: HashSet::new(),
            held: Vec::new(),
        })
    }

    /// Whether `key` comes after every key taken so far, so that it can be taken.
    pub fn is_past(&self, key: &[u8]) -> bool {
        key > self.last.as_slice()
    }

    /// Adds a row to `page` if it can be ingested now (its key is past every key taken so
    /// far); otherwise it must go through a write batch.
    pub fn take(&mut self, key: &[u8], value: &[u8], page: &mut Page) -> bool {
        if !self.is_past(key) {
            return false;
        }
        let start = page.buf.len();
        page.buf.extend_from_slice(key);
        let value_start = page.buf.len();
        page.buf.extend_from_slice(value);
        page.records.push((start, value_start, page.buf.len()));
        self.last.clear();
        self.last.extend_from_slice(key);
        self.rows += 1;
        true
    }

    /// Hands `page` to the ingestion thread.
    pub fn send(&mut self, page: Page) -> Result<(), DbError> {
        if page.is_empty() {
            return Ok(());
        }
        let sent = self
            .pages
            .as_ref()
            .is_some_and(|pages| pages.send(ToThread::Page(page)).is_ok());
        if sent { Ok(()) } else { Err(self.failed()) }
    }

    /// Notes keys written through a write batch while this is open.
    pub fn note_written<'a>(&mut self, keys: impl IntoIterator<Item = &'a [u8]>) {
        for key in keys {
            if !self.written.contains(key) {
                self.written.insert(key.into());
            }
        }
    }

    /// Holds `peer`'s resync progress until this is finished.
    pub fn hold(&mut self, peer: &str, point: ResyncPoint) {
        self.held.retain(|(p, _)| p != peer);
        self.held.push((peer.to_string(), point));
    }

    /// The resync progress held for `peer`.
    pub fn held(&self, peer: &str) -> Option<&ResyncPoint> {
        self.held
            .iter()
            .find(|(p, _)| p == peer)
            .map(|(_, point)| point)
    }

    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Finishes the ingestion: its rows are in storage, durable, newer than every write before.
    pub fn finish(mut self) -> Result<Finished, DbError> {
        let asked = self
            .pages
            .take()
            .is_some_and(|pages| pages.send(ToThread::Finish).is_ok());
        if !asked {
            return Err(self.failed());
        }
        self.join()?;
        Ok(Finished {
            written: std::mem::take(&mut self.written),
            held: std::mem::take(&mut self.held),
        })
    }

    fn join(&mut self) -> Result<(), DbError> {
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(Ok(()))) => Ok(()),
            Some(Ok(Err(e))) => Err(DbError::Ingest(e)),
            Some(Err(_)) => Err(DbError::Ingest("its thread panicked".into())),
            None => Err(DbError::Ingest("it was already finished".into())),
        }
    }

    /// Why the thread stopped taking pages.
    fn failed(&mut self) -> DbError {
        self.pages = None;
        match self.join() {
            Err(e) => e,
            Ok(()) => DbError::Ingest("its thread stopped early".into()),
        }
    }
}

/// Dropped unfinished (a store stopping during a resync): the thread drops the ingestion, whose
/// table files the storage engine removes when it next opens.
impl Drop for Ingest {
    fn drop(&mut self) {
        self.pages = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(keyspace: &Keyspace, pages: &mpsc::Receiver<ToThread>) -> Result<(), String> {
    let mut ingestion = keyspace
        .start_ingestion()
        .map_err(|e| format!("opening it: {e}"))?;
    loop {
        match pages.recv() {
            Ok(ToThread::Page(page)) => {
                for &(key, value, end) in &page.records {
                    ingestion
                        .write(&page.buf[key..value], &page.buf[value..end])
                        .map_err(|e| format!("writing a row: {e}"))?;
                }
            }
            Ok(ToThread::Finish) => {
                return ingestion.finish().map_err(|e| format!("finishing it: {e}"));
            }
            // Abandoned: dropping the ingestion leaves table files nothing refers to.
            Err(mpsc::RecvError) => return Err("abandoned".into()),
        }
    }
}
