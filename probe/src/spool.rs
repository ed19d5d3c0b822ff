//! The probe's spool: every event the probe has numbered and not yet seen acknowledged.
//!
//! The spool is what lets a probe keep G1 (no loss) and G2 (exactly once) across reconnects,
//! failovers and restarts. After any reconnect, to either store, the probe resends
//! [`Spool::unacked`]; a store that already applied one of them recognises its `(origin, seq)`
//! and only acknowledges it again.
//!
//! Invariants:
//! - **A seq is durable before it is sent.** [`Spool::push`] numbers events and, on disk, syncs
//!   them together with the next sequence number before returning them, so a crash can neither
//!   lose an event a store may have seen nor issue its number again for different content.
//! - **An event leaves the spool only when acknowledged.** Only [`Spool::ack`] removes events.
//!   Its removals are not synced: after a crash an acknowledged event may come back and be sent
//!   again, which the store deduplicates.
//! - **One origin per sequence space.** The epoch is chosen when the spool is created and kept
//!   with it; a memory spool, or a disk spool that was moved aside, starts a new origin, so
//!   numbers restart at 1 without colliding with the old ones.
//!
//! A disk spool is a fjall database with two keyspaces: `events` (seq, big-endian → event time
//! and body; the origin and seq are implied) and `meta` (`name`, `epoch`, `next_seq`). The
//! unacknowledged events are also kept in memory, so reading them never touches the disk.
//! This module touches only its own directory.

use std::collections::VecDeque;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use tandem_protocol::codec::{append_bytes, from_bytes, to_bytes};
use tandem_protocol::{CodecError, Event, EventBody, EventsFrame, Origin};

const EVENTS: &str = "events";
const META: &str = "meta";
const NAME: &str = "name";
const EPOCH: &str = "epoch";
const NEXT_SEQ: &str = "next_seq";
const SOURCE_CURSOR: &str = "source_cursor";

/// Why a spool could not be opened or written.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error(
        "event {index} of the batch is {len} bytes encoded, over the {max} bytes the pair can carry (shorten its text or extra fields, or raise max_frame_bytes in the pair file)"
    )]
    TooLarge {
        index: usize,
        len: usize,
        max: usize,
    },
    #[error(
        "cannot create spool directory {}: {source} (check that its parent exists and is writable, or set spool_dir elsewhere)",
        path.display()
    )]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "spool directory {} is in use by another process (give each probe instance its own spool_dir, or stop the other one)",
        path.display()
    )]
    Locked { path: PathBuf },
    #[error(
        "spool {}: storage failed while {action}: {source} (check free space and permissions; restart the probe to retry)",
        path.display()
    )]
    Storage {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: fjall::Error,
    },
    #[error(
        "spool directory {} belongs to probe {found:?}, not {expected:?} (give each probe instance its own spool_dir, or run this one as {found:?})",
        path.display()
    )]
    WrongName {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error(
        "spool {} holds a corrupt {what}: {detail} (move the directory aside to start a new spool; the probe then becomes a new origin and the events left in the old spool are not resent)",
        path.display()
    )]
    Corrupt {
        path: PathBuf,
        what: String,
        detail: String,
    },
    #[error("spool {}: event {seq} could not be encoded: {source}", path.display())]
    Encode {
        path: PathBuf,
        seq: u64,
        #[source]
        source: CodecError,
    },
    #[error(
        "sequence numbers are exhausted: the next is {next} and {requested} more were asked for (move the spool directory aside, or restart a memory spool, to start a new origin)"
    )]
    Exhausted { next: u64, requested: usize },
}

/// An unacknowledged event as the spool holds it: its encoding, exactly what a batch carries
/// for it (a slice of the buffer its push encoded it into).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spooled {
    pub seq: u64,
    pub bytes: Bytes,
}

impl AsRef<[u8]> for Spooled {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

impl Spooled {
    /// The event, decoded.
    pub fn event(&self) -> Result<Event, CodecError> {
        from_bytes(&self.bytes)
    }
}

/// A batch of spooled events ready to send: its `Events` frame (the events' encodings as
/// held, written out by the connection's codec) and its events' seqs, in order.
#[derive(Debug)]
pub struct Batch {
    pub frame: EventsFrame,
    pub seqs: Vec<u64>,
}

/// The events a probe has numbered and not yet seen acknowledged; see the module doc.
pub struct Spool {
    origin: Origin,
    next_seq: u64,
    /// Encoded once, when pushed: a batch is the concatenation of its events' encodings, and
    /// an acknowledgement frees a push's buffer once all of its events are gone.
    events: Held,
    /// How far the probe has read its source (a file offset, a line number), stored with the
    /// events read up to there, so a restarted probe neither reads a line twice nor skips one.
    source_cursor: Option<Vec<u8>>,
    /// `None` for a memory spool.
    disk: Option<Disk>,
    /// Bytes per event of the last push: the next push's buffer is sized from it, where one
    /// grown from a guess copied itself over as it grew.
    event_size: usize,
    /// The largest event, as encoded, that the pair can carry (see [`Spool::set_max_event`]).
    max_event: usize,
}

struct Disk {
    path: PathBuf,
    db: Database,
    events: Keyspace,
    meta: Keyspace,
}

impl Spool {
    /// Opens a spool for the probe instance `name`.
    ///
    /// `dir = None`: a memory spool (a new origin epoch each time it is opened).
    /// `dir = Some(d)`: a disk spool in directory `d` (created if missing) that survives a
    /// restart: the origin epoch is chosen when the spool is first created and kept;
    /// unacknowledged events and the next sequence number are reloaded. A spool directory
    /// created under another name is an error naming both names.
    pub fn open(dir: Option<&Path>, name: &str) -> Result<Spool, SpoolError> {
        match dir {
            None => Ok(Spool {
                origin: Origin::new(name, new_epoch()),
                next_seq: 1,
                events: Held::default(),
                source_cursor: None,
                disk: None,
                event_size: 0,
                max_event: usize::MAX,
            }),
            Some(dir) => open_disk(dir, name),
        }
    }

    /// The origin every event of this spool carries.
    pub fn origin(&self) -> &Origin {
        &self.origin
    }

    /// Numbers `bodies` with consecutive seqs (continuing from the last one ever issued,
    /// starting at 1) and event time `time`, stores them and returns the seqs issued.
    ///
    /// On disk, the events and the next sequence number are synced before this returns, so a
    /// crash right after can neither lose them nor reuse their numbers. On error nothing was
    /// issued.
    pub fn push(
        &mut self,
        time: i64,
        bodies: impl AsRef<[EventBody]>,
    ) -> Result<std::ops::Range<u64>, SpoolError> {
        self.push_from(time, bodies, None)
    }

    /// The source cursor stored by the last [`Spool::push_from`] that gave one.
    pub fn source_cursor(&self) -> Option<&[u8]> {
        self.source_cursor.as_deref()
    }

    /// Refuses, from now on, any event over `bytes` as encoded: one the pair could not carry
    /// (a frame holds at most `max_frame_bytes`) would otherwise wait in the spool for ever.
    pub fn set_max_event(&mut self, bytes: usize) {
        self.max_event = bytes;
    }

    /// [`Spool::push`], also recording `cursor` (how far the source has been read) in the same
    /// durable write as the events.
    pub fn push_from(
        &mut self,
        time: i64,
        bodies: impl AsRef<[EventBody]>,
        cursor: Option<&[u8]>,
    ) -> Result<std::ops::Range<u64>, SpoolError> {
        let owned = bodies;
        let bodies = owned.as_ref();
        if bodies.is_empty() && cursor.is_none() {
            return Ok(self.next_seq..self.next_seq);
        }
        let first = self.next_seq;
        let next = u64::try_from(bodies.len())
            .ok()
            .and_then(|n| first.checked_add(n))
            .ok_or(SpoolError::Exhausted {
                next: first,
                requested: bodies.len(),
            })?;
        // All of them into one buffer, each as an event encodes: the origin and seq, then the
        // time and body, which is also what the disk stores (the origin and seq are implied
        // there). One allocation per push, where an event each cost the probe a fifth of its
        // CPU to allocate and, once acknowledged, to free.
        let mut buf =
            Vec::with_capacity(bodies.len() * (self.event_size + self.event_size / 8 + 16));
        let mut spans = Vec::with_capacity(bodies.len());
        for (body, seq) in bodies.iter().zip(first..) {
            let start = buf.len();
            let stored = append_bytes(&(&self.origin, seq), &mut buf)
                .and_then(|()| {
                    let stored = buf.len();
                    append_bytes(&(time, body), &mut buf).map(|()| stored)
                })
                .map_err(|source| SpoolError::Encode {
                    path: self
                        .disk
                        .as_ref()
                        .map_or_else(|| PathBuf::from("(memory)"), |d| d.path.clone()),
                    seq,
                    source,
                })?;
            if buf.len() - start > self.max_event {
                return Err(SpoolError::TooLarge {
                    index: spans.len(),
                    len: buf.len() - start,
                    max: self.max_event,
                });
            }
            spans.push(Span {
                seq,
                start,
                stored,
                end: buf.len(),
            });
        }
        drop(owned);
        self.event_size = buf.len() / spans.len().max(1);
        let buf = Bytes::from(buf);
        if let Some(disk) = &self.disk {
            disk.write(&buf, &spans, next, cursor)?;
        }
        if let Some(cursor) = cursor {
            self.source_cursor = Some(cursor.to_vec());
        }
        // Only after the disk has them: a failed write must not advance the numbering in a
        // way the disk does not know about.
        self.next_seq = next;
        for span in spans {
            self.events.push(span.seq, buf.slice(span.start..span.end));
        }
        Ok(first..next)
    }

    /// Forgets acknowledged events. Any seqs may be given; unknown ones are ignored.
    ///
    /// On disk the removal is not synced: an event that comes back after a crash is resent and
    /// deduplicated by the store.
    pub fn ack(&mut self, seqs: &[u64]) -> Result<(), SpoolError> {
        if let Some(disk) = &self.disk {
            let known: Vec<u64> = seqs
                .iter()
                .copied()
                .filter(|&seq| self.events.contains(seq))
                .collect();
            if known.is_empty() {
                return Ok(());
            }
            // Kept in memory if the disk refused: resending an acknowledged event is harmless,
            // forgetting one the disk still holds would make the two copies disagree.
            disk.remove(&known)?;
        }
        self.events.remove(seqs);
        Ok(())
    }

    /// Unacknowledged events in seq order, at most `max`, starting after seq `after`
    /// (0 = from the start).
    pub fn unacked(&self, after: u64, max: usize) -> Vec<Spooled> {
        self.events
            .after(after)
            .take(max)
            .map(|(seq, bytes)| Spooled {
                seq,
                bytes: bytes.clone(),
            })
            .collect()
    }

    /// An `Events` frame for batch `batch` of the unacknowledged events after seq `after`, at
    /// most `max` of them and no more than fit `max_bytes` (at least one), as
    /// [`Spool::unacked`] would give them, and their seqs. `None` when there are none.
    pub fn batch_frame(
        &self,
        after: u64,
        max: usize,
        max_bytes: usize,
        batch: u64,
    ) -> Option<Batch> {
        let mut seqs = Vec::new();
        let mut events = Vec::new();
        let mut bytes_in = 0;
        for (seq, bytes) in self.events.after(after).take(max) {
            // Each event's length prefix is a varint of at most 10 bytes.
            bytes_in += bytes.len() + 10;
            if bytes_in > max_bytes && !events.is_empty() {
                break;
            }
            seqs.push(seq);
            events.push(bytes.clone());
        }
        if events.is_empty() {
            return None;
        }
        Some(Batch {
            frame: EventsFrame::Encoded { batch, events },
            seqs,
        })
    }

    /// How many events are unacknowledged.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.len() == 0
    }

    /// The next seq that [`Spool::push`] will issue.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }
}

/// The unacknowledged events in seq order.
///
/// Seqs are issued in order and acknowledged mostly oldest first, so a deque of slots does what
/// a map would, without a node per event and with the slot of a seq found by subtraction. An
/// event acknowledged out of order leaves an empty slot that goes with the events before it; the
/// slots therefore never outnumber the events pushed since the oldest one still held.
#[derive(Default)]
struct Held {
    /// Strictly increasing seqs, each with its event's encoding; the first slot, when there
    /// is one, is full.
    slots: VecDeque<(u64, Option<Bytes>)>,
    /// Full slots.
    len: usize,
}

impl Held {
    /// Deques this long (in slots, 16 bytes each) give memory back once mostly empty.
    const SHRINK_ABOVE: usize = 1 << 16;

    /// Appends an event numbered after every one held.
    fn push(&mut self, seq: u64, event: Bytes) {
        debug_assert!(self.slots.back().is_none_or(|(last, _)| *last < seq));
        self.slots.push_back((seq, Some(event)));
        self.len += 1;
    }

    fn position(&self, seq: u64) -> Option<usize> {
        let &(first, _) = self.slots.front()?;
        // Consecutive seqs, the usual case: the slot is where the subtraction says.
        if let Some(i) = seq
            .checked_sub(first)
            .and_then(|i| usize::try_from(i).ok())
            .filter(|&i| self.slots.get(i).is_some_and(|(s, _)| *s == seq))
        {
            return Some(i);
        }
        let i = self.slots.partition_point(|(s, _)| *s < seq);
        self.slots
            .get(i)
            .is_some_and(|(s, _)| *s == seq)
            .then_some(i)
    }

    fn contains(&self, seq: u64) -> bool {
        self.position(seq)
            .is_some_and(|i| self.slots.get(i).is_some_and(|(_, e)| e.is_some()))
    }

    /// Forgets the events of `seqs` that are held, then drops the empty slots at the front and
    /// memory a burst left behind.
    fn remove(&mut self, seqs: &[u64]) {
        for &seq in seqs {
            let Some(i) = self.position(seq) else {
                continue;
            };
            if let Some((_, slot)) = self.slots.get_mut(i) {
                if slot.take().is_some() {
                    self.len -= 1;
                }
            }
        }
        while self.slots.front().is_some_and(|(_, e)| e.is_none()) {
            self.slots.pop_front();
        }
        let capacity = self.slots.capacity();
        if capacity > Self::SHRINK_ABOVE && self.slots.len() < capacity / 4 {
            self.slots.shrink_to(self.slots.len() * 2);
        }
    }

    /// The events held after seq `after`, in order.
    fn after(&self, after: u64) -> impl Iterator<Item = (u64, &Bytes)> {
        let from = self.slots.partition_point(|(s, _)| *s <= after);
        self.slots
            .range(from..)
            .filter_map(|(seq, e)| e.as_ref().map(|e| (*seq, e)))
    }

    fn len(&self) -> usize {
        self.len
    }
}

impl fmt::Debug for Spool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Spool")
            .field("origin", &self.origin)
            .field("dir", &self.disk.as_ref().map(|disk| &disk.path))
            .field("unacked", &self.events.len())
            .field("next_seq", &self.next_seq)
            .finish()
    }
}

/// Where one pushed event lies in its push's buffer: `start..end` is its encoding, and
/// `stored..end` the time and body a disk spool keeps.
struct Span {
    seq: u64,
    start: usize,
    stored: usize,
    end: usize,
}

impl Disk {
    fn write(
        &self,
        buf: &[u8],
        spans: &[Span],
        next_seq: u64,
        cursor: Option<&[u8]>,
    ) -> Result<(), SpoolError> {
        let mut batch = self.db.batch().durability(Some(PersistMode::SyncAll));
        for span in spans {
            // Origin and seq are implied by the spool and the key: storing them again would
            // only give them a chance to disagree.
            let value = buf.get(span.stored..span.end).unwrap_or_default();
            batch.insert(&self.events, span.seq.to_be_bytes(), value);
        }
        // In the same batch as the events: either both survive a crash or neither does.
        batch.insert(&self.meta, NEXT_SEQ, next_seq.to_be_bytes());
        if let Some(cursor) = cursor {
            batch.insert(&self.meta, SOURCE_CURSOR, cursor);
        }
        batch
            .commit()
            .map_err(storage_error(&self.path, "storing new events"))
    }

    fn remove(&self, seqs: &[u64]) -> Result<(), SpoolError> {
        // The default batch durability only hands the journal to the OS: see `Spool::ack`.
        let mut batch = self.db.batch();
        for seq in seqs {
            batch.remove(&self.events, seq.to_be_bytes());
        }
        batch
            .commit()
            .map_err(storage_error(&self.path, "removing acknowledged events"))
    }
}

fn open_disk(path: &Path, name: &str) -> Result<Spool, SpoolError> {
    // Made whole or not at all: a probe killed while making it must be able to start again.
    let create_dir = |source| SpoolError::CreateDir {
        path: path.to_owned(),
        source,
    };
    tandem_config::make_dir_atomically(
        path,
        |staging| {
            let db = Database::builder(staging)
                .open()
                .map_err(storage_error(path, "creating"))?;
            for keyspace in [EVENTS, META] {
                db.keyspace(keyspace, KeyspaceCreateOptions::default)
                    .map_err(storage_error(path, "creating a keyspace"))?;
            }
            db.persist(PersistMode::SyncAll)
                .map_err(storage_error(path, "creating"))
        },
        create_dir,
    )?;
    let db = Database::builder(path)
        .open()
        .map_err(storage_error(path, "opening"))?;
    let events = db
        .keyspace(EVENTS, KeyspaceCreateOptions::default)
        .map_err(storage_error(path, "opening the events keyspace"))?;
    let meta = db
        .keyspace(META, KeyspaceCreateOptions::default)
        .map_err(storage_error(path, "opening the meta keyspace"))?;
    let disk = Disk {
        path: path.to_owned(),
        db,
        events,
        meta,
    };

    let stored_name = disk
        .meta
        .get(NAME)
        .map_err(storage_error(path, "reading the spool's name"))?;
    let (epoch, next_seq) = match stored_name {
        None => create(&disk, name)?,
        Some(stored) => {
            let stored = std::str::from_utf8(&stored)
                .map_err(|e| corrupt(path, "name record", e.to_string()))?;
            if stored != name {
                return Err(SpoolError::WrongName {
                    path: path.to_owned(),
                    found: stored.to_owned(),
                    expected: name.to_owned(),
                });
            }
            let epoch = read_u64(&disk, EPOCH)?;
            let next_seq = read_u64(&disk, NEXT_SEQ)?;
            if next_seq == 0 {
                return Err(corrupt(path, "next_seq record", "it is 0".to_owned()));
            }
            (epoch, next_seq)
        }
    };

    let origin = Origin::new(name, epoch);
    let events = load_events(&disk, &origin, next_seq)?;
    let source_cursor = disk
        .meta
        .get(SOURCE_CURSOR)
        .map_err(storage_error(path, "reading the source cursor"))?
        .map(|c| c.to_vec());
    Ok(Spool {
        origin,
        next_seq,
        events,
        source_cursor,
        disk: Some(disk),
        event_size: 0,
        max_event: usize::MAX,
    })
}

/// Initialises a fresh spool directory; returns its epoch and next seq.
fn create(disk: &Disk, name: &str) -> Result<(u64, u64), SpoolError> {
    // The name is written with the first epoch and next_seq, before any event, so a directory
    // without a name but with other records was not made here: reinitialising it would drop
    // events or reuse numbers.
    let leftover = !disk
        .events
        .is_empty()
        .map_err(storage_error(&disk.path, "reading unacknowledged events"))?
        || disk
            .meta
            .contains_key(EPOCH)
            .map_err(storage_error(&disk.path, "reading the epoch"))?
        || disk.meta.contains_key(NEXT_SEQ).map_err(storage_error(
            &disk.path,
            "reading the next sequence number",
        ))?;
    if leftover {
        return Err(corrupt(
            &disk.path,
            "name record",
            "it is missing but the spool holds other records".to_owned(),
        ));
    }
    let epoch = new_epoch();
    let next_seq = 1u64;
    // Synced so that the origin is fixed before any event can be numbered under it.
    let mut batch = disk.db.batch().durability(Some(PersistMode::SyncAll));
    batch.insert(&disk.meta, NAME, name.as_bytes());
    batch.insert(&disk.meta, EPOCH, epoch.to_be_bytes());
    batch.insert(&disk.meta, NEXT_SEQ, next_seq.to_be_bytes());
    batch
        .commit()
        .map_err(storage_error(&disk.path, "creating the spool"))?;
    Ok((epoch, next_seq))
}

fn read_u64(disk: &Disk, key: &'static str) -> Result<u64, SpoolError> {
    let value = disk
        .meta
        .get(key)
        .map_err(storage_error(&disk.path, "reading the spool's counters"))?
        .ok_or_else(|| {
            corrupt(
                &disk.path,
                &format!("{key} record"),
                "it is missing".to_owned(),
            )
        })?;
    <[u8; 8]>::try_from(&*value)
        .map(u64::from_be_bytes)
        .map_err(|_| {
            corrupt(
                &disk.path,
                &format!("{key} record"),
                format!("it has {} bytes instead of 8", value.len()),
            )
        })
}

fn load_events(disk: &Disk, origin: &Origin, next_seq: u64) -> Result<Held, SpoolError> {
    // fjall iterates keys in order, and big-endian seqs sort as numbers.
    let mut events = Held::default();
    for item in disk.events.iter() {
        let (key, value) = item
            .into_inner()
            .map_err(storage_error(&disk.path, "reading unacknowledged events"))?;
        let seq = <[u8; 8]>::try_from(&*key)
            .map(u64::from_be_bytes)
            .map_err(|_| {
                corrupt(
                    &disk.path,
                    "event key",
                    format!("{:?} has {} bytes instead of 8", &*key, key.len()),
                )
            })?;
        let what = || format!("event record {seq}");
        // An event at or past next_seq would be numbered again by the next push.
        if seq == 0 || seq >= next_seq {
            return Err(corrupt(
                &disk.path,
                &what(),
                format!("its seq is outside 1..{next_seq}, the range issued so far"),
            ));
        }
        // Decoded only to check it: a record that does not decode would fail every batch.
        from_bytes::<(i64, EventBody)>(&value)
            .map_err(|e| corrupt(&disk.path, &what(), e.to_string()))?;
        if events.slots.back().is_some_and(|&(last, _)| last >= seq) {
            return Err(corrupt(
                &disk.path,
                &what(),
                "it is out of order in the events keyspace".to_owned(),
            ));
        }
        let mut encoded =
            to_bytes(&(origin, seq)).map_err(|e| corrupt(&disk.path, &what(), e.to_string()))?;
        encoded.extend_from_slice(&value);
        events.push(seq, Bytes::from(encoded));
    }
    Ok(events)
}

fn corrupt(path: &Path, what: &str, detail: String) -> SpoolError {
    SpoolError::Corrupt {
        path: path.to_owned(),
        what: what.to_owned(),
        detail,
    }
}

fn storage_error(path: &Path, action: &'static str) -> impl FnOnce(fjall::Error) -> SpoolError {
    let path = path.to_owned();
    move |source| match source {
        fjall::Error::Locked => SpoolError::Locked { path },
        source => SpoolError::Storage {
            path,
            action,
            source,
        },
    }
}

/// A fresh origin epoch: nanoseconds since the Unix epoch XOR the process id.
///
/// Unique enough across processes; within one process, epochs are also made strictly
/// increasing, so two spools opened in the same clock tick still get different origins.
fn new_epoch() -> u64 {
    static LAST: AtomicU64 = AtomicU64::new(0);
    // Truncation keeps the low, fast-changing bits, which are the ones that matter here.
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_nanos() as u64)
        .unwrap_or_default();
    let candidate = nanos ^ u64::from(std::process::id());
    let mut last = LAST.load(Ordering::Relaxed);
    loop {
        let epoch = if candidate > last {
            candidate
        } else {
            last.wrapping_add(1)
        };
        match LAST.compare_exchange_weak(last, epoch, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return epoch,
            Err(seen) => last = seen,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;
    use tandem_protocol::Message;
    use tokio_util::codec::Encoder;

    fn body(n: u64) -> EventBody {
        EventBody::Expire {
            identifier: format!("alert-{n}"),
        }
    }

    fn bodies(range: std::ops::Range<u64>) -> Vec<EventBody> {
        range.map(body).collect()
    }

    fn seqs(events: &[Spooled]) -> Vec<u64> {
        events.iter().map(|event| event.seq).collect()
    }

    /// The events held, decoded; each must decode, and carry the seq it is held under.
    fn decoded(events: &[Spooled]) -> Vec<Event> {
        events
            .iter()
            .map(|held| {
                let event = held.event().unwrap();
                assert_eq!(event.seq, held.seq);
                event
            })
            .collect()
    }

    #[test]
    fn the_source_cursor_is_kept_with_the_events() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut spool = Spool::open(Some(dir.path()), "json").unwrap();
            assert_eq!(spool.source_cursor(), None);
            spool
                .push_from(1, vec![body(1)], Some(&7u64.to_be_bytes()))
                .unwrap();
        }
        let spool = Spool::open(Some(dir.path()), "json").unwrap();
        assert_eq!(spool.source_cursor(), Some(&7u64.to_be_bytes()[..]));
        assert_eq!(spool.len(), 1);
    }

    #[test]
    fn a_memory_spool_numbers_from_one_and_forgets_what_is_acked() {
        let mut spool = Spool::open(None, "probe-a").unwrap();
        assert_eq!(spool.origin().name(), "probe-a");
        assert!(spool.is_empty());
        assert_eq!(spool.next_seq(), 1);

        assert_eq!(spool.push(10, bodies(0..3)).unwrap(), 1..4);
        let first = decoded(&spool.unacked(0, usize::MAX));
        assert_eq!(first.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2, 3]);
        assert!(
            first
                .iter()
                .all(|e| e.time == 10 && e.origin == *spool.origin())
        );
        assert_eq!(first[1].body, body(1));
        assert_eq!(spool.push(20, bodies(3..5)).unwrap(), 4..6);
        assert_eq!(spool.next_seq(), 6);
        assert_eq!(spool.len(), 5);

        spool.ack(&[2, 4, 4, 99, 0]).unwrap();
        assert_eq!(seqs(&spool.unacked(0, usize::MAX)), [1, 3, 5]);
        assert_eq!(
            decoded(&spool.unacked(0, 1))[0],
            first[0],
            "events come back as issued"
        );
        spool.ack(&[1, 3, 5]).unwrap();
        assert!(spool.is_empty());
        assert_eq!(spool.next_seq(), 6, "acking never makes a number reusable");

        assert!(spool.push(30, Vec::new()).unwrap().is_empty());
        assert!(spool.is_empty());
        assert_eq!(spool.next_seq(), 6);
    }

    #[test]
    fn every_memory_spool_is_a_new_origin() {
        let a = Spool::open(None, "probe-a").unwrap();
        let b = Spool::open(None, "probe-a").unwrap();
        assert_ne!(a.origin(), b.origin());
    }

    #[test]
    fn a_disk_spool_survives_a_reopen_without_reusing_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool");
        let (origin, pushed) = {
            let mut spool = Spool::open(Some(&path), "probe-a").unwrap();
            spool.push(10, bodies(0..4)).unwrap();
            let pushed = spool.unacked(0, usize::MAX);
            spool.ack(&[1, 3]).unwrap();
            (spool.origin().clone(), pushed)
        };

        let mut spool = Spool::open(Some(&path), "probe-a").unwrap();
        assert_eq!(*spool.origin(), origin, "the epoch is kept");
        assert_eq!(spool.next_seq(), 5);
        assert_eq!(
            spool.unacked(0, usize::MAX),
            [pushed[1].clone(), pushed[3].clone()]
        );
        assert_eq!(spool.push(11, bodies(4..5)).unwrap(), 5..6);
        drop(spool);

        let spool = Spool::open(Some(&path), "probe-a").unwrap();
        assert_eq!(*spool.origin(), origin);
        assert_eq!(seqs(&spool.unacked(0, usize::MAX)), [2, 4, 5]);
        assert_eq!(spool.next_seq(), 6);
    }

    #[test]
    fn a_spool_acked_empty_keeps_its_next_seq_across_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut spool = Spool::open(Some(dir.path()), "probe-a").unwrap();
            spool.push(1, bodies(0..3)).unwrap();
            spool.ack(&[1, 2, 3]).unwrap();
            assert!(spool.is_empty());
        }
        let mut spool = Spool::open(Some(dir.path()), "probe-a").unwrap();
        assert!(spool.is_empty());
        assert_eq!(spool.next_seq(), 4);
        assert_eq!(spool.push(2, bodies(3..4)).unwrap(), 4..5);
    }

    #[test]
    fn a_spool_directory_of_another_probe_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(Spool::open(Some(dir.path()), "probe-a").unwrap());
        let err = Spool::open(Some(dir.path()), "probe-b").unwrap_err();
        assert!(matches!(err, SpoolError::WrongName { .. }), "{err}");
        let message = err.to_string();
        assert!(message.contains("\"probe-a\"") && message.contains("\"probe-b\""));
        assert!(message.contains(&dir.path().display().to_string()));
        // The refusal changed nothing: the right probe still opens it.
        Spool::open(Some(dir.path()), "probe-a").unwrap();
    }

    #[test]
    fn a_spool_directory_in_use_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _held = Spool::open(Some(dir.path()), "probe-a").unwrap();
        let err = Spool::open(Some(dir.path()), "probe-a").unwrap_err();
        assert!(matches!(err, SpoolError::Locked { .. }), "{err}");
    }

    #[test]
    fn a_corrupt_record_is_an_error_that_names_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut spool = Spool::open(Some(dir.path()), "probe-a").unwrap();
            spool.push(1, bodies(0..2)).unwrap();
        }
        {
            let db = Database::builder(dir.path()).open().unwrap();
            let events = db.keyspace(EVENTS, KeyspaceCreateOptions::default).unwrap();
            events.insert(2u64.to_be_bytes(), [0xff; 3]).unwrap();
            db.persist(PersistMode::SyncAll).unwrap();
        }
        let err = Spool::open(Some(dir.path()), "probe-a").unwrap_err();
        assert!(matches!(err, SpoolError::Corrupt { .. }), "{err}");
        let message = err.to_string();
        assert!(
            message.contains(&dir.path().display().to_string()),
            "{message}"
        );
        assert!(message.contains("event record 2"), "{message}");
        assert!(message.contains("move the directory aside"), "{message}");
    }

    #[test]
    fn an_event_numbered_past_next_seq_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        drop(Spool::open(Some(dir.path()), "probe-a").unwrap());
        {
            let db = Database::builder(dir.path()).open().unwrap();
            let events = db.keyspace(EVENTS, KeyspaceCreateOptions::default).unwrap();
            let value = to_bytes(&(1i64, body(0))).unwrap();
            events.insert(1u64.to_be_bytes(), value).unwrap();
            db.persist(PersistMode::SyncAll).unwrap();
        }
        let err = Spool::open(Some(dir.path()), "probe-a").unwrap_err();
        assert!(matches!(err, SpoolError::Corrupt { .. }), "{err}");
    }

    #[test]
    fn unacked_pages_after_a_seq() {
        let mut spool = Spool::open(None, "probe-a").unwrap();
        spool.push(1, bodies(0..10)).unwrap();
        spool.ack(&[4, 5]).unwrap();
        assert_eq!(seqs(&spool.unacked(0, 3)), [1, 2, 3]);
        assert_eq!(seqs(&spool.unacked(3, 3)), [6, 7, 8]);
        assert_eq!(seqs(&spool.unacked(4, 1)), [6], "after need not be unacked");
        assert_eq!(seqs(&spool.unacked(8, 3)), [9, 10]);
        assert!(spool.unacked(10, 3).is_empty());
        assert!(spool.unacked(0, 0).is_empty());
        assert!(spool.unacked(u64::MAX, 3).is_empty());

        // A batch frame is an `Events` message of the same page.
        let Batch { frame, seqs } = spool.batch_frame(3, 3, usize::MAX, 7).unwrap();
        assert_eq!(seqs, [6, 7, 8]);
        let want = Message::Events {
            batch: 7,
            events: decoded(&spool.unacked(3, 3)),
        };
        let mut sent = bytes::BytesMut::new();
        tandem_protocol::MessageCodec::default()
            .encode(frame, &mut sent)
            .unwrap();
        assert_eq!(sent[4..], to_bytes(&want).unwrap());
        assert!(spool.batch_frame(10, 3, usize::MAX, 8).is_none());
    }

    /// A batch stops short of its count when its events would be over the byte budget (the
    /// frame limit), but always holds one; an event over the limit is refused when pushed,
    /// with nothing of its push spooled.
    #[test]
    fn batches_fit_the_frame_and_an_event_over_it_is_refused() {
        let mut spool = Spool::open(None, "probe-a").unwrap();
        spool.push(1, bodies(0..10)).unwrap();
        let one = spool.unacked(0, 1)[0].bytes.len() + 10;
        let Batch { seqs, .. } = spool.batch_frame(0, 10, 3 * one, 1).unwrap();
        assert_eq!(seqs, [1, 2, 3]);
        let Batch { seqs, .. } = spool.batch_frame(0, 10, 1, 2).unwrap();
        assert_eq!(seqs, [1], "a batch holds at least one event");

        spool.set_max_event(200);
        let big = EventBody::Expire {
            identifier: "x".repeat(300),
        };
        match spool.push(2, vec![body(10), big, body(11)]) {
            Err(SpoolError::TooLarge { index, len, max }) => {
                assert_eq!((index, max), (1, 200));
                assert!(len > 300, "{len}");
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
        assert_eq!(spool.len(), 10, "nothing of the refused push is spooled");
        assert_eq!(spool.push(3, bodies(12..13)).unwrap(), 11..12);
    }

    #[test]
    fn events_acknowledged_out_of_order_leave_no_memory_behind() {
        let mut spool = Spool::open(None, "probe-a").unwrap();
        let n = 3 * Held::SHRINK_ABOVE as u64;
        spool.push(1, bodies(0..n)).unwrap();
        // Everything but the oldest: its slot keeps the others' until it goes too.
        spool.ack(&(2..=n).collect::<Vec<_>>()).unwrap();
        assert_eq!(spool.len(), 1);
        assert_eq!(seqs(&spool.unacked(0, usize::MAX)), [1]);
        assert!(spool.unacked(1, usize::MAX).is_empty());
        spool.ack(&[1]).unwrap();
        assert!(spool.is_empty());
        assert!(spool.events.slots.is_empty());
        assert!(
            spool.events.slots.capacity() <= Held::SHRINK_ABOVE,
            "a burst's deque is given back: {} slots",
            spool.events.slots.capacity()
        );
        // Numbering goes on, and the fast path still finds every seq after the holes.
        assert_eq!(spool.push(2, bodies(0..3)).unwrap(), n + 1..n + 4);
        spool.ack(&[n + 2]).unwrap();
        assert_eq!(seqs(&spool.unacked(0, usize::MAX)), [n + 1, n + 3]);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Push {
            time: i64,
            count: u64,
        },
        /// Picks among the unacked seqs by index; `unknown` adds seqs never issued.
        Ack {
            picks: Vec<prop::sample::Index>,
            unknown: bool,
        },
        /// Acknowledges a run of consecutive seqs, `skip` after the oldest unacked one
        /// (`skip` 0: the oldest first, as batches are), `len` long.
        AckRun {
            skip: u64,
            len: u64,
        },
        Page {
            after: u64,
            max: usize,
        },
        Reopen,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0i64..100, 0u64..4).prop_map(|(time, count)| Op::Push { time, count }),
            3 => (prop::collection::vec(any::<prop::sample::Index>(), 0..4), any::<bool>())
                .prop_map(|(picks, unknown)| Op::Ack { picks, unknown }),
            3 => (prop_oneof![Just(0u64), 0u64..3], 0u64..6)
                .prop_map(|(skip, len)| Op::AckRun { skip, len }),
            1 => (0u64..40, 0usize..5).prop_map(|(after, max)| Op::Page { after, max }),
            1 => Just(Op::Reopen),
        ]
    }

    proptest! {
        // Each case opens a database several times and syncs on every push: keep it small.
        #![proptest_config(ProptestConfig::with_cases(32))]

        /// A disk spool, reopened at random, and a memory spool (never reopened) behave like a
        /// map of unacked events plus a counter that only grows.
        #[test]
        fn spools_match_a_simple_model(ops in prop::collection::vec(op(), 1..30)) {
            let dir = tempfile::tempdir().unwrap();
            let mut disk = Some(Spool::open(Some(dir.path()), "probe-a").unwrap());
            let origin = disk.as_ref().unwrap().origin().clone();
            let mut memory = Spool::open(None, "probe-a").unwrap();
            let mut model: BTreeMap<u64, (i64, EventBody)> = BTreeMap::new();
            let mut next_seq = 1u64;

            for op in ops {
                if matches!(op, Op::Reopen) {
                    // Dropped first: fjall holds a lock on the directory.
                    drop(disk.take());
                    disk = Some(Spool::open(Some(dir.path()), "probe-a").unwrap());
                }
                let spool = disk.as_mut().unwrap();
                match op {
                    Op::Push { time, count } => {
                        let want: Vec<u64> = (next_seq..next_seq + count).collect();
                        for seq in &want {
                            model.insert(*seq, (time, body(*seq)));
                        }
                        next_seq += count;
                        for s in [&mut *spool, &mut memory] {
                            let got = s.push(time, want.iter().copied().map(body).collect::<Vec<_>>()).unwrap();
                            prop_assert_eq!(got.collect::<Vec<_>>(), want.clone());
                        }
                    }
                    Op::Ack { picks, unknown } => {
                        let keys: Vec<u64> = model.keys().copied().collect();
                        let mut acked: Vec<u64> = if keys.is_empty() {
                            Vec::new()
                        } else {
                            picks.iter().map(|i| keys[i.index(keys.len())]).collect()
                        };
                        if unknown {
                            acked.extend([0, next_seq, next_seq + 7]);
                        }
                        for seq in &acked {
                            model.remove(seq);
                        }
                        spool.ack(&acked).unwrap();
                        memory.ack(&acked).unwrap();
                    }
                    Op::AckRun { skip, len } => {
                        // From the oldest unacked seq, or from 1 with nothing unacked.
                        let from = model.keys().next().copied().unwrap_or(1) + skip;
                        let acked: Vec<u64> = (from..from + len).collect();
                        for seq in &acked {
                            model.remove(seq);
                        }
                        spool.ack(&acked).unwrap();
                        memory.ack(&acked).unwrap();
                    }
                    Op::Page { after, max } => {
                        let want: Vec<u64> = model
                            .range(after + 1..)
                            .take(max)
                            .map(|(seq, _)| *seq)
                            .collect();
                        prop_assert_eq!(seqs(&spool.unacked(after, max)), want.clone());
                        prop_assert_eq!(seqs(&memory.unacked(after, max)), want);
                    }
                    Op::Reopen => {}
                }

                let want: Vec<Event> = model
                    .iter()
                    .map(|(seq, (time, body))| Event {
                        origin: origin.clone(),
                        seq: *seq,
                        time: *time,
                        body: body.clone(),
                    })
                    .collect();
                prop_assert_eq!(spool.origin(), &origin);
                prop_assert_eq!(decoded(&spool.unacked(0, usize::MAX)), want.clone());
                prop_assert_eq!(spool.len(), model.len());
                prop_assert_eq!(spool.next_seq(), next_seq);
                let in_memory: Vec<Event> = want
                    .iter()
                    .map(|event| Event { origin: memory.origin().clone(), ..event.clone() })
                    .collect();
                prop_assert_eq!(decoded(&memory.unacked(0, usize::MAX)), in_memory);
                prop_assert_eq!(memory.next_seq(), next_seq);
            }
        }
    }

    #[test]
    fn a_probe_killed_while_making_its_spool_starts_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool");
        // What a probe killed while creating its spool leaves behind.
        let staging = dir.path().join(".spool.creating");
        std::fs::create_dir_all(&staging).unwrap();
        std::fs::write(staging.join("0.jnl"), b"half").unwrap();
        let mut spool = Spool::open(Some(&path), "probe-a").unwrap();
        spool.push(10, bodies(0..1)).unwrap();
        drop(spool);
        assert!(!staging.exists());
        assert_eq!(Spool::open(Some(&path), "probe-a").unwrap().len(), 1);
    }
}
