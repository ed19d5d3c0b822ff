//! The in-memory alert table: rows, per-origin applied sets and the generic-clear index.
//!
//! The table decides *whether* an event applies (exactly-once by `(origin, seq)`) and routes it
//! to the fold; it records what it changed so the engine can write exactly those records in the
//! commit's batch. It does no I/O.

use std::sync::Arc;

// Seeded per process (identifiers come from the network, so the hash must resist flooding)
// and several times faster than SipHash on the short keys here.
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
type HashSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;
/// The rows by identifier, in a hashbrown table: an event finds its row and the row's shared
/// key in one lookup, where std's map took two, each hashing the identifier and comparing it
/// with the key (a fifth of the commit thread). Keys are hashed with the process's [`HASHER`],
/// so that the connection that builds a snapshot's row hashes its key, and a merge prefetches
/// the row's slot from that hash a few rows ahead.
#[derive(Debug, Default)]
struct RowMap {
    table: hashbrown::HashTable<(Arc<str>, Box<Row>)>,
    slots: Slots,
}

/// An identifier's hash in the row map.
fn key_hash(id: &str) -> u64 {
    use std::hash::BuildHasher;
    HASHER.hash_one(id)
}

impl RowMap {
    fn get(&self, id: &str) -> Option<&Row> {
        self.get_key_value(id).map(|(_, row)| row)
    }

    fn get_key_value(&self, id: &str) -> Option<(&Arc<str>, &Row)> {
        let (key, row) = self.table.find(key_hash(id), |(key, _)| **key == *id)?;
        Some((key, row))
    }

    fn get_mut(&mut self, id: &str) -> Option<&mut Row> {
        let (_, row) = self.table.find_mut(key_hash(id), |(key, _)| **key == *id)?;
        Some(row)
    }

    /// The slot of the row hashed `hash` (by [`key_hash`]) and named `id`.
    fn entry(
        &mut self,
        hash: u64,
        id: &str,
    ) -> hashbrown::hash_table::Entry<'_, (Arc<str>, Box<Row>)> {
        self.table
            .entry(hash, |(key, _)| **key == *id, |(key, _)| key_hash(key))
    }

    /// Sets `id`'s row.
    fn insert(&mut self, id: Arc<str>, row: Box<Row>) {
        match self.entry(key_hash(&id), &id) {
            hashbrown::hash_table::Entry::Occupied(mut entry) => entry.get_mut().1 = row,
            hashbrown::hash_table::Entry::Vacant(entry) => {
                entry.insert((id, row));
            }
        }
    }

    fn iter(&self) -> impl Iterator<Item = (&Arc<str>, &Row)> {
        self.table.iter().map(|(key, row)| (key, &**row))
    }

    fn len(&self) -> usize {
        self.table.len()
    }

    #[cfg(test)]
    fn capacity(&self) -> usize {
        self.table.capacity()
    }

    fn reserve(&mut self, more: usize) {
        self.table.reserve(more, |(key, _)| key_hash(key));
    }

    fn try_reserve(&mut self, more: usize) {
        // Left to growth on demand when the memory is not there.
        let _ = self.table.try_reserve(more, |(key, _)| key_hash(key));
    }

    /// Starts loading the slot where the row hashed `hash` is, or will go.
    fn prefetch(&mut self, hash: u64) {
        self.slots.prefetch(&self.table, hash);
    }

    /// Starts loading the control bytes where a probe for `hash` starts.
    fn prefetch_control(&mut self, hash: u64) {
        self.slots.prefetch_control(&self.table, hash);
    }

    /// Starts loading the bucket of the row hashed `hash`, once the control bytes are in the
    /// cache ([`RowMap::prefetch_control`]). The first entry whose hash tag matches is taken
    /// without comparing its key, which would wait for the bucket and then the key's text: a
    /// wrong one, rarely, costs a useless prefetch. (The slot [`RowMap::prefetch`] loads is where
    /// the probe starts, one of the sixteen a row may be in.)
    fn prefetch_bucket(&self, hash: u64) {
        if let Some(entry) = self.table.find(hash, |_| true) {
            tandem_alloc::prefetch(entry);
        }
    }

    /// Starts loading the key and the row hashed `hash`, once its bucket is in the cache
    /// ([`RowMap::prefetch_bucket`]).
    fn prefetch_row(&self, hash: u64) {
        if let Some((key, row)) = self.table.find(hash, |_| true) {
            tandem_alloc::prefetch(key.as_ptr());
            let row: *const u8 = (&**row as *const Row).cast();
            for line in 0..std::mem::size_of::<Row>().div_ceil(64) {
                tandem_alloc::prefetch(row.wrapping_add(64 * line));
            }
        }
    }
}

use tandem_protocol::state::SeqRanges;
use tandem_protocol::{Alert, AlertState, Event, EventBody, Kind, Origin, OriginCount, Version};

use crate::fold::{self, ClearKey};

/// How far ahead of its fold each step of an event's row lookup is prefetched
/// ([`Table::warm_events`]): its identifier, control bytes, bucket, key and row. Four events
/// apart, a few microseconds of folding: more than a miss takes.
const WARM_AHEAD: [usize; 4] = [16, 12, 8, 4];

/// Longest identifier accepted, in bytes.
pub const MAX_IDENTIFIER: usize = 1024;

/// One alert's state and its store-local serial.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Row {
    pub serial: u64,
    pub state: AlertState,
    /// A hash of the newest occurrence's clear key (0: no occurrence yet), derived (not
    /// stored) so that the hot path neither rebuilds nor keeps a copy of the key's text.
    #[serde(skip)]
    clear_hash: u64,
    /// The table's [`Table::generation`] when the row last went into `Changes::rows`: it is
    /// there, once, while the two are equal. A number rather than a flag, so that starting a
    /// new commit does not look up every row the last one wrote to clear it.
    #[serde(skip)]
    marked: u64,
    /// Where in `Changes::rows` it went (`u32::MAX`: too far to keep an encoding for).
    #[serde(skip)]
    slot: u32,
    /// In the problem index under `clear_hash`. The index only grows, so a newer occurrence
    /// with the same clear key needs no index lookup. (A flag, not the hash: it fits in the
    /// row's padding, and a row one word longer moves to the allocator's next size class.)
    #[serde(skip)]
    indexed: bool,
}

/// As the serde implementation reads it: the serial, then the state (the other fields are
/// derived, not stored).
impl<'de, C> bincode::BorrowDecode<'de, C> for Row {
    fn borrow_decode<D: bincode::de::BorrowDecoder<'de, Context = C>>(
        decoder: &mut D,
    ) -> Result<Self, bincode::error::DecodeError> {
        let serial = bincode::BorrowDecode::<'de, C>::borrow_decode(decoder)?;
        let state = bincode::BorrowDecode::<'de, C>::borrow_decode(decoder)?;
        Ok(Row::new(serial, state))
    }
}

impl Row {
    pub fn new(serial: u64, state: AlertState) -> Row {
        Row {
            serial,
            state,
            clear_hash: 0,
            marked: 0,
            slot: 0,
            indexed: false,
        }
    }
}

/// An alert from a peer's snapshot, its key and row built where the page was decoded: the
/// commit thread, which a full resync keeps busy, then only links them into the table
/// instead of allocating (and faulting in) a row and a key for every alert.
pub struct Incoming {
    id: Arc<str>,
    /// `id`'s [`key_hash`].
    hash: u64,
    row: Box<Row>,
}

impl Incoming {
    pub fn new(identifier: impl Into<Arc<str>>, state: AlertState) -> Incoming {
        let mut row = Box::new(Row::new(0, state));
        // Hashed here, off the commit thread, which then neither reads the text for it nor
        // waits for it to find the row's problem-index slot.
        if !row.state.occurrences.is_empty() {
            row.clear_hash = fields_hash(&row.state.latest.value);
        }
        let id = identifier.into();
        Incoming {
            hash: key_hash(&id),
            id,
            row,
        }
    }

    pub fn identifier(&self) -> &str {
        &self.id
    }
}

/// The origins interned last, found by the allocation they arrived in. A batch or a snapshot
/// page names a few writers over and over, and the thread that decodes them (a connection's,
/// or the commit thread for a peer's entries) decodes each into one shared allocation
/// (`shared_origin`), so comparing pointers finds most origins without
/// hashing and comparing their names (a snapshot row has six or more). Each slot holds the
/// origin it arrived as, so that its address cannot be reused by another.
#[derive(Debug, Default)]
struct RecentOrigins {
    slots: [Option<(Origin, Origin)>; RECENT_ORIGINS],
    next: usize,
}

const RECENT_ORIGINS: usize = 8;

impl RecentOrigins {
    fn get(&self, origin: &Origin) -> Option<&Origin> {
        self.slots
            .iter()
            .flatten()
            .find(|(arrived, _)| arrived.is_same(origin))
            .map(|(_, interned)| interned)
    }

    fn put(&mut self, arrived: &Origin, interned: &Origin) {
        if let Some(slot) = self.slots.get_mut(self.next) {
            *slot = Some((arrived.clone(), interned.clone()));
        }
        self.next = (self.next + 1) % RECENT_ORIGINS;
    }
}

/// A changed row's serial and its state's encoding as a peer's snapshot sent it.
pub type Kept = (u64, bytes::Bytes);

/// What a commit must write: the records an apply touched.
#[derive(Debug, Default)]
pub struct Changes {
    /// The changed rows, each with the state's encoding as a peer's snapshot sent it when the
    /// row holds exactly that state: the checkpoint writes those bytes instead of encoding the
    /// state again. Any later change to such a row drops its encoding (in [`Table::mark`],
    /// which finds it by the row's slot, without a lookup). A kept encoding comes with the
    /// row's serial, all the checkpoint needs besides: it then writes the row without looking
    /// it up (rows are never removed, so the row is there).
    pub rows: Vec<(Arc<str>, Option<Kept>)>,
    pub origins: HashSet<Origin>,
    pub clears: HashSet<ClearKey>,
    /// A row changed without a log entry to replay it from (a duplicate that taught the row
    /// who inserted it first): the commit must be a checkpoint.
    pub unlogged: bool,
}

impl Changes {
    /// The rows to write, each with its kept encoding if it has one.
    pub fn rows(&self) -> impl Iterator<Item = (&Arc<str>, Option<&bytes::Bytes>)> {
        self.rows_with_serials()
            .map(|(id, kept)| (id, kept.map(|(_, state)| state)))
    }

    /// [`Changes::rows`], each kept encoding with the row's serial.
    pub fn rows_with_serials(
        &self,
    ) -> impl Iterator<Item = (&Arc<str>, Option<(u64, &bytes::Bytes)>)> {
        self.rows
            .iter()
            .map(|(id, kept)| (id, kept.as_ref().map(|(serial, state)| (*serial, state))))
    }

    /// The encoding kept for `id`, if any.
    pub fn kept(&self, id: &str) -> Option<&bytes::Bytes> {
        self.rows()
            .find(|(row, _)| &***row == id)
            .and_then(|(_, kept)| kept)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    Duplicate,
}

/// Why an event is refused before anything is applied.
pub fn validate(event: &Event) -> Result<(), String> {
    let id = event.identifier();
    if id.is_empty() {
        return Err("the event has no identifier: set \"identifier\" to a non-empty string".into());
    }
    if id.len() > MAX_IDENTIFIER {
        return Err(format!(
            "the identifier is {} bytes long; the limit is {MAX_IDENTIFIER}",
            id.len()
        ));
    }
    if event.origin.name().is_empty() {
        return Err("the event's origin has no name".into());
    }
    if event.seq == 0 {
        return Err("the event's seq is 0; sequence numbers start at 1".into());
    }
    if event.time < 0 {
        return Err(format!(
            "the event's time {} is before 1970; times are milliseconds since the Unix epoch",
            event.time
        ));
    }
    Ok(())
}

/// The identifiers in one bucket of the clear index: nearly always one, so no vector for it,
/// and the rare list boxed, which keeps an index entry at 24 bytes rather than 32 (the index
/// has a slot for every problem alert).
#[derive(Debug, Clone)]
#[allow(clippy::box_collection)] // the point: a thin pointer beside `One`'s wide one
enum Ids {
    One(Arc<str>),
    Many(Box<Vec<Arc<str>>>),
}

impl Ids {
    fn add(&mut self, id: &Arc<str>) {
        match self {
            Ids::One(first) if first == id => {}
            Ids::One(first) => *self = Ids::Many(Box::new(vec![first.clone(), id.clone()])),
            Ids::Many(list) => {
                if !list.contains(id) {
                    list.push(id.clone());
                }
            }
        }
    }

    fn to_vec(&self) -> Vec<Arc<str>> {
        match self {
            Ids::One(id) => vec![id.clone()],
            Ids::Many(list) => list.to_vec(),
        }
    }
}

#[derive(Debug)]
pub struct Table {
    name: Arc<str>,
    /// Counts the commits [`Table::start_commit`] started; never 0, which no row is marked
    /// with.
    generation: u64,
    /// Boxed: a row is several hundred bytes, and the map's spare capacity should cost a
    /// pointer per slot, not a row.
    rows: RowMap,
    applied: HashMap<Origin, SeqRanges>,
    /// One shared copy of every origin, so versions in rows point at it instead of each
    /// holding their own allocation of the name.
    origins: HashSet<Origin>,
    recent: RecentOrigins,
    /// Newest resolution per clear key, bucketed by the key's hash.
    clears: HashMap<u64, Vec<(ClearKey, Version)>>,
    /// Problem alerts by the hash of their clear key; a hash collision only costs a comparison,
    /// since every candidate is checked against the key itself.
    by_clear: ProblemIndex,
    /// Alert fields an occurrence displaced, not yet freed: see [`Table::take_displaced`].
    displaced: Vec<tandem_protocol::PackedFields>,
    /// Where the problem index's slots lie, for the merge's prefetches.
    by_clear_slots: Slots,
    next_serial: u64,
    alive: u64,
}

impl Table {
    pub fn new(name: &str) -> Table {
        Table {
            name: name.into(),
            generation: 1,
            rows: RowMap::default(),
            applied: HashMap::default(),
            origins: HashSet::default(),
            recent: RecentOrigins::default(),
            clears: HashMap::default(),
            by_clear: ProblemIndex::default(),
            by_clear_slots: Slots::default(),
            displaced: Vec::new(),
            next_serial: 1,
            alive: 0,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Alerts that exist (tally above zero).
    pub fn alive(&self) -> u64 {
        self.alive
    }

    pub fn next_serial(&self) -> u64 {
        self.next_serial
    }

    pub fn row(&self, identifier: &str) -> Option<&Row> {
        self.rows.get(identifier)
    }

    /// The fields occurrences displaced since the last call. Freeing them (allocated on the
    /// connection tasks' threads, but for a peer's replicated entries) was a sixth of the
    /// commit thread's time; the commit thread passes them to another thread instead.
    pub fn take_displaced(&mut self) -> Vec<tandem_protocol::PackedFields> {
        std::mem::take(&mut self.displaced)
    }

    /// Collects the next displaced fields in `list`, an emptied list from an earlier
    /// [`Table::take_displaced`], rather than in memory of its own.
    pub fn recycle_displaced(&mut self, list: Vec<tandem_protocol::PackedFields>) {
        debug_assert!(list.is_empty());
        if self.displaced.is_empty() && list.capacity() > self.displaced.capacity() {
            self.displaced = list;
        }
    }

    /// How many displaced fields wait to be freed.
    pub fn displaced_len(&self) -> usize {
        self.displaced.len()
    }

    /// Moves the displaced fields from the `from`th on to `to` (appended: `to` may hold some
    /// not yet freed); the ones before stay.
    pub fn hand_displaced(&mut self, from: usize, to: &mut Vec<tandem_protocol::PackedFields>) {
        let from = from.min(self.displaced.len());
        to.extend(self.displaced.drain(from..));
    }

    /// Takes `fields` back among the displaced ones, to be freed with them.
    pub fn reclaim_displaced(&mut self, fields: &mut Vec<tandem_protocol::PackedFields>) {
        self.displaced.append(fields);
    }

    /// Makes room for `n` displaced fields, so that a commit does not grow the list (copying
    /// it) as it goes.
    pub fn reserve_displaced(&mut self, n: usize) {
        self.displaced.reserve(n);
    }

    /// The serial `identifier` has, or will get when an event creates it now.
    pub fn serial_for(&self, identifier: &str) -> u64 {
        self.rows
            .get(identifier)
            .map_or(self.next_serial, |r| r.serial)
    }

    pub fn applied(&self, origin: &Origin) -> Option<&SeqRanges> {
        self.applied.get(origin)
    }

    pub fn clear_version(&self, key: &ClearKey) -> Option<&Version> {
        let [a, b, c, d] = key.parts();
        self.clears
            .get(&clear_hash(a, b, c, d))?
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    }

    /// The newest resolution matching `fields`' clear key.
    fn clear_for(&self, hash: u64, fields: &tandem_protocol::PackedFields) -> Option<&Version> {
        clear_for(&self.clears, hash, fields)
    }

    /// Every generic-clear key with its newest resolution.
    pub fn clear_entries(&self) -> impl Iterator<Item = (&ClearKey, &Version)> {
        self.clears.values().flatten().map(|(k, v)| (k, v))
    }

    pub fn applied_sets(&self) -> impl Iterator<Item = (&Origin, &SeqRanges)> {
        self.applied.iter()
    }

    /// Rows, alive or not, with their identifiers.
    pub fn rows(&self) -> impl Iterator<Item = (&Arc<str>, &Row)> {
        self.rows.iter()
    }

    /// Room for `rows` more rows, so a start-up load does not rehash as it grows.
    pub fn reserve(&mut self, rows: usize) {
        self.rows.reserve(rows);
    }

    /// Room for `rows` rows in all, counting those already here. `rows` may come from a peer:
    /// it is capped, and a reservation that cannot be made is left to growth on demand.
    pub fn reserve_total(&mut self, rows: usize) {
        const MOST: usize = 16 << 20;
        let more = rows.min(MOST).saturating_sub(self.rows.len());
        self.rows.try_reserve(more);
        // The clear index has an entry per problem alert, most of them: grown on demand, it
        // was rehashed at every doubling on the commit thread.
        let _ = self.by_clear.try_reserve(more, |(hash, _)| *hash);
    }

    /// The alerts that exist, as operators see them.
    pub fn alerts(&self) -> impl Iterator<Item = Alert> + '_ {
        self.rows
            .iter()
            .filter(|(_, row)| fold::is_alive(&row.state))
            .map(|(id, row)| fold::to_alert(id, row.serial, &row.state))
    }

    /// Whether `(origin, seq)` has been applied.
    pub fn seen(&self, origin: &Origin, seq: u64) -> bool {
        self.applied
            .get(origin)
            .is_some_and(|set| set.contains(seq))
    }

    /// Starts loading the slots `incoming` will go to (in the row map, and in the problem
    /// index for a problem), from the hashes its connection worked out: a merge does so a few
    /// rows ahead, so that the cache misses in tables of a million entries overlap the merges
    /// before it instead of stalling its own. Prefetched, not looked up: a lookup's load still
    /// holds up what follows once the processor's window fills, and the merge's inserts are
    /// stores, whose misses the next locked instruction (a reference count) waits for.
    pub fn warm(&mut self, incoming: &Incoming) {
        self.rows.prefetch(incoming.hash);
        let row = &incoming.row;
        if row.state.latest.value.kind == Kind::Problem && row.clear_hash != 0 {
            self.by_clear_slots.prefetch(&self.by_clear, row.clear_hash);
        }
    }

    /// Starts loading the rows of the next events of a batch, `events` being those not yet
    /// folded: one step of the row lookup for each of four events ahead ([`WARM_AHEAD`]), the
    /// nearer the event the later the step, each reading only what the step before loaded
    /// for that event: its identifier, the control bytes for its hash, the bucket they point
    /// to, and the key and row the bucket points to. A table of only 10,000 rows no longer
    /// stays in the cache when other processes share the cores, and those four loads are each
    /// a miss that waits for the one before (the row lookup was a sixth of a commit thread's
    /// time).
    pub fn warm_events(&mut self, events: &[Event]) {
        let [text, control, bucket, row] = WARM_AHEAD;
        if let Some(event) = events.get(text) {
            tandem_alloc::prefetch(event.identifier_address());
        }
        if let Some(event) = events.get(control) {
            self.rows.prefetch_control(key_hash(event.identifier()));
        }
        if let Some(event) = events.get(bucket) {
            self.rows.prefetch_bucket(key_hash(event.identifier()));
        }
        if let Some(event) = events.get(row) {
            self.rows.prefetch_row(key_hash(event.identifier()));
        }
    }

    fn intern(&mut self, origin: &Origin) -> Origin {
        if let Some(shared) = self.recent.get(origin) {
            return shared.clone();
        }
        let shared = match self.origins.get(origin) {
            Some(shared) => shared.clone(),
            None => {
                self.origins.insert(origin.clone());
                origin.clone()
            }
        };
        self.recent.put(origin, &shared);
        shared
    }

    /// Points `origin` at the interned copy. Left alone when it is that copy already, as most
    /// are (the decoding thread decodes every name into one allocation, and the table
    /// interned the first one it saw): replacing it would write the reference counts of an
    /// allocation the decoding thread writes too.
    fn intern_in_place(&mut self, origin: &mut Origin) {
        if let Some(shared) = self.recent.get(origin) {
            if !shared.is_same(origin) {
                *origin = shared.clone();
            }
            return;
        }
        *origin = self.intern(origin);
    }

    /// Points every version of `state` at the interned origins.
    fn intern_state(&mut self, state: &mut AlertState) {
        for version in [
            &mut state.inserted.version,
            &mut state.latest.version,
            &mut state.severity.version,
            &mut state.acknowledged.version,
            &mut state.owner.version,
        ] {
            if !version.origin.name().is_empty() {
                self.intern_in_place(&mut version.origin);
            }
        }
        for count in state.occurrences.iter_mut().chain(state.deleted.iter_mut()) {
            self.intern_in_place(&mut count.origin);
        }
    }

    /// Restores a row at start-up.
    pub fn load_row(&mut self, identifier: &str, mut row: Row) {
        let id: Arc<str> = identifier.into();
        self.intern_state(&mut row.state);
        if fold::is_alive(&row.state) {
            self.alive += 1;
        }
        self.next_serial = self.next_serial.max(row.serial + 1);
        if !row.state.occurrences.is_empty() {
            let hash = fields_hash(&row.state.latest.value);
            if row.state.latest.value.kind == Kind::Problem {
                self.index_problem(hash, &id);
                row.indexed = true;
            }
            row.clear_hash = hash;
        }
        self.rows.insert(id, Box::new(row));
    }

    pub fn load_applied(&mut self, origin: Origin, set: SeqRanges) {
        let origin = self.intern(&origin);
        self.applied.insert(origin, set);
    }

    pub fn load_clear(&mut self, key: ClearKey, version: Version) {
        self.set_clear(key, version);
    }

    /// Records `version` as the newest resolution of `key` if it is newer; true if it was.
    fn set_clear(&mut self, key: ClearKey, version: Version) -> bool {
        let [a, b, c, d] = key.parts();
        let hash = clear_hash(a, b, c, d);
        let bucket = self.clears.entry(hash).or_default();
        match bucket.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) if *v >= version => false,
            Some((_, v)) => {
                *v = version;
                true
            }
            None => {
                bucket.push((key, version));
                true
            }
        }
    }

    fn index_problem(&mut self, hash: u64, id: &Arc<str>) {
        index_problem(&mut self.by_clear, hash, id);
    }

    pub fn set_next_serial(&mut self, next: u64) {
        self.next_serial = self.next_serial.max(next);
    }

    /// Fills in what an operator's delete saw: this store's occurrence counts now.
    pub fn resolve_delete(&self, event: &mut Event) {
        if let EventBody::Delete { identifier, seen } = &mut event.body {
            if seen.is_none() {
                let counts: Vec<OriginCount> = self
                    .rows
                    .get(identifier.as_str())
                    .map(|row| row.state.occurrences.to_vec())
                    .unwrap_or_default();
                *seen = Some(counts);
            }
        }
    }

    /// Marks the start of a new commit: rows written by the last one are clean again.
    pub fn start_commit(&mut self, changes: &mut Changes) {
        self.generation += 1;
        changes.rows.clear();
        changes.origins.clear();
        changes.clears.clear();
        changes.unlogged = false;
    }

    /// Records that a row changed. Called by every change to a row, so that no encoding kept
    /// from before the change is written for it.
    fn mark(generation: u64, changes: &mut Changes, id: &Arc<str>, row: &mut Row) {
        if row.marked == generation {
            // Only a row marked in this commit can have a kept encoding.
            if let Some((_, kept)) = changes.rows.get_mut(row.slot as usize) {
                *kept = None;
            }
        } else {
            row.marked = generation;
            row.slot = u32::try_from(changes.rows.len()).unwrap_or(u32::MAX);
            changes.rows.push((id.clone(), None));
        }
    }

    /// Applies `event` at most once, taking it so that its fields move into the row instead of
    /// being copied. `source` is where it entered the pair: `None` for here, or the peer store's
    /// name and the alert's serial there for a replicated entry.
    pub fn apply(
        &mut self,
        event: Event,
        source: Option<(&str, u64)>,
        changes: &mut Changes,
    ) -> Outcome {
        self.apply_with_serial(event, source, changes).0
    }

    /// [`Table::apply`], also returning the alert's serial (as [`Table::serial_for`] would
    /// have before the event): for the caller that logs the event after applying it, which
    /// saves looking the row up twice.
    pub fn apply_with_serial(
        &mut self,
        event: Event,
        source: Option<(&str, u64)>,
        changes: &mut Changes,
    ) -> (Outcome, u64) {
        let fresh = match self.applied.get_mut(&event.origin) {
            Some(set) => set.insert(event.seq),
            None => {
                let origin = self.intern(&event.origin);
                let mut set = SeqRanges::new();
                set.insert(event.seq);
                self.applied.insert(origin, set);
                true
            }
        };
        if !fresh {
            if let (EventBody::Occurrence(_), Some(at)) = (&event.body, source) {
                // Another store may have recorded itself as the inserter of this very event.
                let id = self
                    .rows
                    .get_key_value(event.identifier())
                    .map(|(id, _)| id.clone());
                if let Some((id, row)) = id.and_then(|id| self.rows.get_mut(&id).map(|r| (id, r))) {
                    let before = row.state.inserted.clone();
                    fold::merge_inserted(&mut row.state, &event.version(), at);
                    if row.state.inserted != before {
                        Self::mark(self.generation, changes, &id, row);
                        changes.unlogged = true;
                    }
                }
            }
            let serial = self.serial_for(event.identifier());
            return (Outcome::Duplicate, serial);
        }
        if !changes.origins.contains(&event.origin) {
            changes.origins.insert(event.origin.clone());
        }
        let serial = self.fold_in(event, source, changes);
        (Outcome::Applied, serial)
    }

    /// Folds an event into its row without the exactly-once check: for [`Table::apply`], and
    /// for replaying this store's own logged events onto a row taken from the peer's snapshot.
    /// Returns the row's serial.
    fn fold_in(&mut self, event: Event, source: Option<(&str, u64)>, changes: &mut Changes) -> u64 {
        let Event {
            mut origin,
            seq,
            time,
            body,
        } = event;
        // Moved into the version, and left as it is when it is the interned copy already, as
        // most are: no reference count written.
        self.intern_in_place(&mut origin);
        let version = Version { time, origin, seq };
        let occurrence_hash = match &body {
            EventBody::Occurrence(fields) => fields_hash(fields),
            _ => 0,
        };
        let mut clear_targets = None;
        let mut check_clear = None;
        let mut index_problem = None;
        let serial;
        // The row's key, taken only when the indexes below need it: a clone and a drop of it
        // for every event were a third of this function's time (each an atomic write).
        let id;
        {
            // Borrows the rows alone, so the fields used below stay reachable.
            let (key, row) = row_entry(&mut self.rows, &mut self.next_serial, body.identifier());
            serial = row.serial;
            let was_alive = fold::is_alive(&row.state);
            match body {
                EventBody::Occurrence(fields) => {
                    let at = source.unwrap_or((&*self.name, row.serial));
                    if fields.kind == Kind::Resolution {
                        clear_targets = Some(ClearKey::of(&fields));
                    }
                    let hash = occurrence_hash;
                    let displaced = fold::occurrence(&mut row.state, fields, &version, at);
                    self.displaced.push(displaced);
                    let latest = &row.state.latest.value;
                    if version == row.state.latest.version {
                        // This occurrence is the newest: its clear key is the alert's.
                        row.indexed &= row.clear_hash == hash;
                        row.clear_hash = hash;
                        if latest.kind == Kind::Problem && !row.indexed {
                            row.indexed = true;
                            index_problem = Some(hash);
                        }
                    }
                    if latest.kind == Kind::Problem {
                        check_clear = Some(row.clear_hash);
                    }
                }
                body => fold::action(&mut row.state, &body, &version),
            }
            let alive = fold::is_alive(&row.state);
            Self::mark(self.generation, changes, key, row);
            // A resolution seen earlier may postdate this problem (looked for only where the
            // clear key has any: most have none).
            check_clear = check_clear.filter(|hash| self.clears.contains_key(hash));
            id = (index_problem.is_some() || check_clear.is_some()).then(|| key.clone());
            self.account(was_alive, alive);
        }
        if let (Some(hash), Some(id)) = (index_problem, &id) {
            self.index_problem(hash, id);
        }
        if let (Some(hash), Some(id)) = (check_clear, &id) {
            if let Some(row) = self.rows.get(id) {
                if let Some(clear) = self.clear_for(hash, &row.state.latest.value).cloned() {
                    if let Some(row) = self.rows.get_mut(id) {
                        fold::generic_clear(&mut row.state, &clear);
                    }
                }
            }
        }

        if let Some(key) = clear_targets {
            self.resolve(key, version, changes);
        }
        serial
    }

    /// Records a resolution of `key` and clears the problem alerts it matches.
    fn resolve(&mut self, key: ClearKey, version: Version, changes: &mut Changes) {
        {
            if self.set_clear(key.clone(), version.clone()) {
                changes.clears.insert(key.clone());
            }
            let [a, b, c, d] = key.parts();
            let hash = clear_hash(a, b, c, d);
            let targets = self
                .by_clear
                .find(hash, |(at, _)| *at == hash)
                .map(|(_, ids)| ids.to_vec())
                .unwrap_or_default();
            for target in targets {
                let Some(row) = self.rows.get_mut(&target) else {
                    continue;
                };
                if !key.matches(&row.state.latest.value) {
                    continue;
                }
                fold::generic_clear(&mut row.state, &version);
                Self::mark(self.generation, changes, &target, row);
            }
        }
    }

    /// Takes a resolution version from the peer's snapshot.
    pub fn merge_clear(&mut self, key: ClearKey, mut version: Version, changes: &mut Changes) {
        self.intern_in_place(&mut version.origin);
        self.resolve(key, version, changes);
    }

    /// Adds the peer's applied sequence numbers of `origin` to this store's.
    pub fn merge_applied(&mut self, origin: &Origin, set: &SeqRanges, changes: &mut Changes) {
        let origin = self.intern(origin);
        let mine = self.applied.entry(origin.clone()).or_default();
        let before = mine.len();
        for &(start, end) in set.ranges() {
            mine.insert_range(start, end);
        }
        if mine.len() != before {
            changes.origins.insert(origin);
        }
    }

    /// Sets an alert's state to the one `incoming` carries from the peer's snapshot and then
    /// folds in `own`, this store's logged events for the alert since the peer's cursor, each
    /// marked whether the snapshot already holds it; or, when those are not known (`own` is
    /// None), joins the two states. A row already here keeps its serial. `stored` is the state's
    /// encoding as it arrived, if known: the checkpoint writes it when the row ends up exactly
    /// the snapshot's state.
    pub fn merge_row(
        &mut self,
        incoming: Incoming,
        stored: Option<bytes::Bytes>,
        own: Option<Vec<(Event, bool)>>,
        changes: &mut Changes,
    ) {
        // Taken as it came: replaced outright, and nothing of this store's own to fold in.
        let mut unchanged = stored.is_some() && own.as_ref().is_some_and(Vec::is_empty);
        let Incoming {
            id,
            hash: key,
            row: mut new,
        } = incoming;
        self.intern_state(&mut new.state);
        let joined = own.is_none();
        // Borrowed field by field: the row stays borrowed while the clear index is updated,
        // so the identifier is hashed and compared once.
        let Table {
            rows,
            next_serial,
            by_clear,
            clears,
            ..
        } = self;
        // A new row taken as it came has the clear key's hash its connection worked out.
        let mut hashed = false;
        let (id, row, was_alive) = match rows.entry(key, &id) {
            hashbrown::hash_table::Entry::Occupied(entry) => {
                let (id, row) = entry.into_mut();
                let id = id.clone();
                let was_alive = fold::is_alive(&row.state);
                let state = std::mem::take(&mut new.state);
                if joined {
                    fold::join(&mut row.state, state);
                } else {
                    // The state it replaces is freed with `new`'s box.
                    new.state = std::mem::replace(&mut row.state, state);
                }
                (id, row, was_alive)
            }
            hashbrown::hash_table::Entry::Vacant(entry) => {
                // `Incoming::new` built it as a new row; only its serial is this table's.
                new.serial = *next_serial;
                *next_serial += 1;
                if joined {
                    let state = std::mem::take(&mut new.state);
                    fold::join(&mut new.state, state);
                } else {
                    hashed = true;
                }
                let (id, row) = entry.insert((id, new)).into_mut();
                (id.clone(), row, false)
            }
        };
        let alive = fold::is_alive(&row.state);
        Self::mark(self.generation, changes, &id, row);
        // The merged state's newest occurrence decides the clear key, and a resolution this
        // store already knows may postdate it.
        if !row.state.occurrences.is_empty() {
            let hash = if hashed {
                row.clear_hash
            } else {
                fields_hash(&row.state.latest.value)
            };
            row.indexed &= row.clear_hash == hash;
            row.clear_hash = hash;
            if row.state.latest.value.kind == Kind::Problem {
                if !row.indexed {
                    row.indexed = true;
                    index_problem(by_clear, hash, &id);
                }
                if let Some(clear) = clear_for(clears, hash, &row.state.latest.value) {
                    fold::generic_clear(&mut row.state, clear);
                    unchanged = false;
                }
            }
        }
        if let (true, Some(stored)) = (unchanged, stored) {
            if let Some((_, kept)) = changes.rows.get_mut(row.slot as usize) {
                *kept = Some((row.serial, stored));
            }
        }
        self.account(was_alive, alive);
        for (event, in_snapshot) in own.into_iter().flatten() {
            if !in_snapshot {
                self.fold_in(event, None, changes);
            } else if let (EventBody::Occurrence(_), Some(row)) =
                (&event.body, self.rows.get_mut(&id))
            {
                // The peer has the event but may not yet know that this store recorded
                // itself as its inserter.
                let at = (&*self.name, row.serial);
                fold::merge_inserted(&mut row.state, &event.version(), at);
            }
        }
    }

    fn account(&mut self, was_alive: bool, alive: bool) {
        match (was_alive, alive) {
            (false, true) => self.alive += 1,
            (true, false) => self.alive = self.alive.saturating_sub(1),
            _ => {}
        }
    }
}

/// The hash of a clear key's parts; never 0, which marks "no clear key".
fn clear_hash(node: &str, alert_key: &str, alert_group: &str, manager: &str) -> u64 {
    use std::hash::BuildHasher;
    HASHER
        .hash_one((node, alert_key, alert_group, manager))
        .max(1)
}

/// The hash of `f`'s clear key.
fn fields_hash(f: &tandem_protocol::PackedFields) -> u64 {
    clear_hash(f.node(), f.alert_key(), f.alert_group(), f.manager())
}

/// The newest resolution in `clears` matching `fields`' clear key, whose hash is `hash`.
fn clear_for<'a>(
    clears: &'a HashMap<u64, Vec<(ClearKey, Version)>>,
    hash: u64,
    fields: &tandem_protocol::PackedFields,
) -> Option<&'a Version> {
    clears
        .get(&hash)?
        .iter()
        .find(|(k, _)| k.matches(fields))
        .map(|(_, v)| v)
}

/// Adds problem alert `id` to the clear index under its clear key's `hash`.
fn index_problem(by_clear: &mut ProblemIndex, hash: u64, id: &Arc<str>) {
    // One probe of a map as large as the table: a lookup then an insert was two.
    match by_clear.entry(hash, |(at, _)| *at == hash, |(at, _)| *at) {
        hashbrown::hash_table::Entry::Occupied(mut entry) => entry.get_mut().1.add(id),
        hashbrown::hash_table::Entry::Vacant(slot) => {
            slot.insert((hash, Ids::One(id.clone())));
        }
    }
}

/// The problem index: each problem alert under its clear key's hash. The hash is the table's
/// own hash too (it is a hash already), which lets a merge find an entry's slot to prefetch.
type ProblemIndex = hashbrown::HashTable<(u64, Ids)>;

/// The tables' hasher (identifiers and clear keys), one for the process: the connection that
/// decodes a snapshot page hashes each row's key and clear key where it builds the row, and
/// the table finds the row's slots by those hashes. Seeded at random, as each table's was.
static HASHER: std::sync::LazyLock<foldhash::fast::RandomState> =
    std::sync::LazyLock::new(foldhash::fast::RandomState::default);

/// Where a hashbrown table keeps the slot for a hash, to prefetch it. hashbrown stores its
/// buckets backwards from its control bytes and starts a probe at the hash masked to the
/// table's size, but gives the address of neither; the control bytes' address is worked out
/// from one full bucket's, again whenever the table's size changes. A wrong guess costs only a
/// useless prefetch: nothing is read or written through these addresses.
#[derive(Debug, Default, Clone, Copy)]
struct Slots {
    ctrl: usize,
    buckets: usize,
}

impl Slots {
    /// Starts loading the control bytes a probe for `hash` reads first.
    fn prefetch_control<T>(&mut self, table: &hashbrown::HashTable<T>, hash: u64) {
        if let Some((ctrl, _)) = self.slot(table, hash) {
            tandem_alloc::prefetch(std::ptr::without_provenance::<u8>(ctrl));
        }
    }

    /// Starts loading the control bytes and the first bucket a probe for `hash` reads.
    fn prefetch<T>(&mut self, table: &hashbrown::HashTable<T>, hash: u64) {
        if let Some((ctrl, bucket)) = self.slot(table, hash) {
            tandem_alloc::prefetch(std::ptr::without_provenance::<u8>(ctrl));
            tandem_alloc::prefetch(std::ptr::without_provenance::<u8>(bucket));
        }
    }

    /// The addresses of the control byte and the bucket where a probe for `hash` starts; None
    /// while the table is empty.
    fn slot<T>(&mut self, table: &hashbrown::HashTable<T>, hash: u64) -> Option<(usize, usize)> {
        // Wrapping arithmetic: should the layout not be what this expects, the addresses are
        // wrong (and the prefetches useless), never an overflow on the commit thread.
        let size = std::mem::size_of::<T>();
        let buckets = table.num_buckets();
        if buckets != self.buckets || self.ctrl == 0 {
            let full = table.iter_buckets().next()?;
            let at = table.get_bucket(full)? as *const T as usize;
            self.ctrl = at.wrapping_add(full.wrapping_add(1).wrapping_mul(size));
            self.buckets = buckets;
        }
        let pos = (hash as usize) & buckets.wrapping_sub(1);
        Some((
            self.ctrl.wrapping_add(pos),
            self.ctrl
                .wrapping_sub(pos.wrapping_add(1).wrapping_mul(size)),
        ))
    }
}

/// The row of `identifier` and its shared key, creating the row (numbered from `next_serial`)
/// when missing.
fn row_entry<'a>(
    rows: &'a mut RowMap,
    next_serial: &mut u64,
    identifier: &str,
) -> (&'a Arc<str>, &'a mut Row) {
    let (id, row) = match rows.entry(key_hash(identifier), identifier) {
        hashbrown::hash_table::Entry::Occupied(entry) => entry.into_mut(),
        hashbrown::hash_table::Entry::Vacant(entry) => {
            let serial = *next_serial;
            *next_serial += 1;
            let row = Box::new(Row::new(serial, AlertState::default()));
            entry.insert((Arc::from(identifier), row)).into_mut()
        }
    };
    (id, row)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;
    use tandem_protocol::{AlertFields, Severity};

    use super::*;

    fn event(origin: &str, seq: u64, time: i64, body: EventBody) -> Event {
        Event {
            origin: Origin::new(origin, 7),
            seq,
            time,
            body,
        }
    }

    fn problem(id: &str, node: &str, severity: u8, kind: Kind) -> EventBody {
        EventBody::Occurrence(
            AlertFields {
                identifier: id.into(),
                node: node.into(),
                alert_key: "k".into(),
                summary: format!("{id} {severity}"),
                severity: Severity::new(severity).unwrap(),
                kind,
                ..AlertFields::default()
            }
            .pack(),
        )
    }

    fn snapshot(table: &Table) -> BTreeMap<String, Alert> {
        table
            .alerts()
            .map(|mut a| {
                a.serial = 0;
                a.server_serial = 0;
                (a.identifier.clone(), a)
            })
            .collect()
    }

    #[test]
    fn duplicates_are_acknowledged_and_not_applied() {
        let mut t = Table::new("AGG_P");
        let mut ch = Changes::default();
        let e = event("p", 1, 10, problem("a", "n", 4, Kind::Problem));
        assert_eq!(t.apply(e.clone(), None, &mut ch), Outcome::Applied);
        assert_eq!(t.apply(e.clone(), None, &mut ch), Outcome::Duplicate);
        assert_eq!(t.alerts().next().unwrap().tally, 1);
    }

    /// What a commit writes: every row changed since the last commit started, each once, and
    /// after `start_commit` only the rows changed again.
    #[test]
    fn a_commit_lists_each_changed_row_once_and_forgets_the_last_commits() {
        let mut t = Table::new("AGG_P");
        let mut ch = Changes::default();
        let ids = |ch: &Changes| {
            let mut ids: Vec<String> = ch.rows().map(|(id, _)| id.to_string()).collect();
            ids.sort();
            ids
        };
        for (seq, id) in [(1, "a"), (2, "b"), (3, "a")] {
            t.apply(
                event("p", seq, 10, problem(id, "n", 4, Kind::Problem)),
                None,
                &mut ch,
            );
        }
        assert_eq!(ids(&ch), ["a", "b"]);
        t.start_commit(&mut ch);
        assert!(ch.rows.is_empty());
        t.apply(
            event("p", 4, 11, problem("b", "n", 4, Kind::Problem)),
            None,
            &mut ch,
        );
        t.apply(
            event("p", 5, 11, problem("c", "n", 4, Kind::Problem)),
            None,
            &mut ch,
        );
        t.apply(
            event("p", 6, 12, problem("b", "n", 4, Kind::Problem)),
            None,
            &mut ch,
        );
        assert_eq!(ids(&ch), ["b", "c"]);
        t.start_commit(&mut ch);
        t.apply(
            event("p", 7, 13, problem("a", "n", 4, Kind::Problem)),
            None,
            &mut ch,
        );
        assert_eq!(ids(&ch), ["a"]);
    }

    #[test]
    fn origins_intern_to_one_copy_whatever_name_allocation_they_arrive_with() {
        let mut t = Table::new("AGG_P");
        let first = t.intern(&Origin::new("probe-a", 1));
        // The same writer again in an allocation of its own, and the same name with another
        // epoch: a new writer.
        let again = t.intern(&Origin::new("probe-a", 1));
        assert!(first.is_same(&again));
        let arrived = Origin::new("probe-b", 1);
        let b1 = t.intern(&arrived);
        let b2 = t.intern(&Origin::new(arrived.name(), 2));
        assert_eq!((b1.epoch(), b2.epoch()), (1, 2));
        assert_eq!(t.intern(&arrived), Origin::new("probe-b", 1));
        // More writers than the recent slots hold: each still interns to its first copy.
        let firsts: Vec<Origin> = (0..3 * RECENT_ORIGINS)
            .map(|n| t.intern(&Origin::new(format!("p{n}"), 5)))
            .collect();
        for (n, first) in firsts.iter().enumerate() {
            let later = t.intern(&Origin::new(format!("p{n}"), 5));
            assert!(first.is_same(&later), "p{n}");
            assert_eq!(later, *first);
        }
    }

    /// A store holds a row and a clear-index slot for every alert: a row one word longer moves
    /// to the allocator's next size class (384 bytes), and the memory of a million alerts, which
    /// a start and a full resync fault in, grows by a tenth.
    #[test]
    fn a_row_and_its_index_entry_keep_their_size() {
        assert!(
            std::mem::size_of::<Row>() <= 320,
            "{}",
            std::mem::size_of::<Row>()
        );
        assert_eq!(std::mem::size_of::<(u64, Ids)>(), 24);
        assert_eq!(std::mem::size_of::<Origin>(), 8);
    }

    /// The snapshot's size comes from the peer: an absurd one must neither panic nor reserve
    /// without bound, and a table already holding rows reserves only for the rest.
    /// The merge prefetches the row map's and the problem index's slots at addresses it works
    /// out from hashbrown's layout, which hashbrown does not promise: should a new version
    /// change it, this fails instead of the prefetches quietly missing.
    #[test]
    fn the_slots_a_merge_prefetches_are_where_the_entries_are() {
        use std::hash::BuildHasher;
        let mut index = ProblemIndex::default();
        let mut rows = RowMap::default();
        assert_eq!(
            Slots::default().slot(&index, 1),
            None,
            "an empty table has no slots to find"
        );
        let ids: Vec<Arc<str>> = (0..10_000)
            .map(|i| Arc::from(format!("alert-{i}")))
            .collect();
        let clear_hashes: Vec<u64> = (0..10_000u32).map(|i| HASHER.hash_one(i).max(1)).collect();
        for (id, &hash) in ids.iter().zip(&clear_hashes) {
            index_problem(&mut index, hash, id);
            rows.insert(id.clone(), Box::default());
        }
        let key_hashes: Vec<u64> = ids.iter().map(|id| key_hash(id)).collect();
        check_slots(&index, &clear_hashes, |hash| {
            index.find_bucket_index(hash, |(h, _)| *h == hash)
        });
        let table = &rows.table;
        check_slots(table, &key_hashes, |hash| {
            table.find_bucket_index(hash, |(id, _)| key_hash(id) == hash)
        });
    }

    #[test]
    fn the_rows_a_batch_prefetches_are_nearly_always_the_rows_it_folds() {
        // `RowMap::prefetch_bucket` and `prefetch_row` take the first entry whose hash tag
        // matches, without comparing keys: right unless another key in the probe's group
        // shares the tag (7 bits of the hash).
        let mut rows = RowMap::default();
        let ids: Vec<Arc<str>> = (0..10_000)
            .map(|i| Arc::from(format!("alert-{i}")))
            .collect();
        for id in &ids {
            rows.insert(id.clone(), Box::default());
        }
        let right = ids
            .iter()
            .filter(|id| {
                rows.table
                    .find(key_hash(id), |_| true)
                    .is_some_and(|(key, _)| Arc::ptr_eq(key, id))
            })
            .count();
        assert!(
            right >= 9_000,
            "only {right} of 10,000 rows found by their hash tag alone"
        );
    }

    /// Checks that `table`'s entry hashed each of `hashes` is where [`Slots`] puts it: a probe
    /// for the hash starts at the hash masked to the table's size, bucket `j` lies `j + 1`
    /// buckets before the control bytes, and at this load nearly every entry sits in the group
    /// its probe starts with.
    fn check_slots<T>(
        table: &hashbrown::HashTable<T>,
        hashes: &[u64],
        find: impl Fn(u64) -> Option<usize>,
    ) {
        let size = std::mem::size_of::<T>();
        let mask = table.num_buckets() - 1;
        let mut slots = Slots::default();
        let mut in_first_group = 0;
        for &hash in hashes {
            let at = find(hash).expect("in the table");
            let bucket = table.get_bucket(at).expect("full") as *const T as usize;
            let (ctrl, first) = slots.slot(table, hash).expect("a full table");
            let pos = hash as usize & mask;
            let ctrl_bytes = ctrl - pos;
            assert_eq!(first, ctrl_bytes - (pos + 1) * size);
            assert_eq!(bucket, ctrl_bytes - (at + 1) * size);
            if at.wrapping_sub(pos) & mask < 16 {
                in_first_group += 1;
            }
        }
        assert!(
            in_first_group * 100 >= hashes.len() * 95,
            "{in_first_group} of {}",
            hashes.len()
        );
    }

    #[test]
    fn reserving_for_a_snapshot_takes_any_size() {
        let mut t = Table::new("AGG_B");
        let mut ch = Changes::default();
        t.reserve_total(usize::MAX);
        assert!(t.rows.capacity() >= 16 << 20 && t.rows.capacity() < 64 << 20);
        // The clear index with it: most alerts are problems, each with an entry there.
        assert!(t.by_clear.capacity() >= 16 << 20 && t.by_clear.capacity() < 64 << 20);
        let mut t = Table::new("AGG_B");
        let e = event("p", 1, 10, problem("a", "n", 4, Kind::Problem));
        assert_eq!(t.apply(e, None, &mut ch), Outcome::Applied);
        t.reserve_total(1_000);
        let capacity = t.rows.capacity();
        assert!((1_000..2_000).contains(&capacity), "{capacity}");
        t.reserve_total(1);
        assert_eq!(t.rows.capacity(), capacity);
        assert_eq!(t.alerts().count(), 1);
    }

    /// A commit's displaced fields go to another thread to be freed, and the emptied list comes
    /// back: the next commit collects in it rather than in memory the process never touched.
    #[test]
    fn a_recycled_list_collects_the_next_displaced_fields() {
        let mut t = Table::new("AGG_P");
        let mut ch = Changes::default();
        t.reserve_displaced(8);
        for seq in 1..=3 {
            let e = event(
                "p",
                seq,
                10 + seq as i64,
                problem("a", "n", 4, Kind::Problem),
            );
            assert_eq!(t.apply(e, None, &mut ch), Outcome::Applied);
        }
        let mut list = t.take_displaced();
        // The first occurrence displaced nothing worth freeing but an empty row's fields.
        assert_eq!(list.len(), 3);
        list.clear();
        let (at, capacity) = (list.as_ptr(), list.capacity());
        t.recycle_displaced(list);
        t.reserve_displaced(capacity);
        let e = event("p", 4, 20, problem("a", "n", 3, Kind::Problem));
        assert_eq!(t.apply(e, None, &mut ch), Outcome::Applied);
        let next = t.take_displaced();
        assert_eq!((next.as_ptr(), next.len()), (at, 1));
        assert_eq!(next[0].severity, Severity::new(4).unwrap());
    }

    /// A request's connection takes only the fields that request displaced; what an earlier
    /// request in the commit displaced stays for the freeing thread, and fields taken back
    /// join it.
    #[test]
    fn a_connection_takes_only_the_fields_its_request_displaced() {
        let mut t = Table::new("AGG_P");
        let mut ch = Changes::default();
        let occur = |seq: u64, severity: u8| {
            event(
                "p",
                seq,
                10 + seq as i64,
                problem("a", "n", severity, Kind::Problem),
            )
        };
        assert_eq!(t.apply(occur(1, 3), None, &mut ch), Outcome::Applied);
        let from = t.displaced_len();
        assert_eq!(from, 1);
        for seq in 2..=3 {
            assert_eq!(
                t.apply(occur(seq, seq as u8), None, &mut ch),
                Outcome::Applied
            );
        }
        let mut taken = Vec::new();
        t.hand_displaced(from, &mut taken);
        let severities: Vec<_> = taken.iter().map(|f| f.severity).collect();
        assert_eq!(
            severities,
            [Severity::new(3).unwrap(), Severity::new(2).unwrap()]
        );
        assert_eq!(t.displaced_len(), 1, "the first request's field stays");
        t.reclaim_displaced(&mut taken);
        assert!(taken.is_empty());
        assert_eq!(t.take_displaced().len(), 3);
    }

    #[test]
    fn a_resolution_clears_earlier_problems_in_either_order() {
        for resolution_first in [false, true] {
            let mut t = Table::new("AGG_P");
            let mut ch = Changes::default();
            let p = event("p", 1, 10, problem("down", "web1", 5, Kind::Problem));
            let r = event("p", 2, 20, problem("up", "web1", 1, Kind::Resolution));
            let later = event("q", 1, 5, problem("down", "web1", 5, Kind::Problem));
            let order = if resolution_first {
                vec![&r, &p, &later]
            } else {
                vec![&p, &later, &r]
            };
            for e in order {
                t.apply(e.clone(), None, &mut ch);
            }
            let alerts = snapshot(&t);
            assert_eq!(
                alerts["down"].severity,
                Severity::CLEAR,
                "{resolution_first}"
            );
            assert_eq!(alerts["down"].tally, 2);
            assert_eq!(alerts["up"].severity, Severity::CLEAR);
        }
    }

    #[test]
    fn a_newer_problem_survives_an_older_resolution() {
        let mut t = Table::new("AGG_P");
        let mut ch = Changes::default();
        t.apply(
            event("p", 2, 30, problem("down", "web1", 5, Kind::Problem)),
            None,
            &mut ch,
        );
        t.apply(
            event("p", 1, 20, problem("up", "web1", 1, Kind::Resolution)),
            None,
            &mut ch,
        );
        assert_eq!(snapshot(&t)["down"].severity, Severity::CRITICAL);
    }

    #[test]
    fn operator_delete_sees_current_counts() {
        let mut t = Table::new("AGG_P");
        let mut ch = Changes::default();
        t.apply(
            event("p", 1, 10, problem("a", "n", 4, Kind::Problem)),
            None,
            &mut ch,
        );
        let mut del = event(
            "op",
            1,
            11,
            EventBody::Delete {
                identifier: "a".into(),
                seen: None,
            },
        );
        t.resolve_delete(&mut del);
        t.apply(del, None, &mut ch);
        assert_eq!(t.alive(), 0);
        t.apply(
            event("p", 2, 12, problem("a", "n", 4, Kind::Problem)),
            None,
            &mut ch,
        );
        assert_eq!(t.alive(), 1);
        assert_eq!(snapshot(&t)["a"].tally, 1);
    }

    fn arb_event() -> impl Strategy<Value = Event> {
        let ids = prop::sample::select(vec!["a", "b", "c", "d"]);
        // As real probe rules do, the identifier fixes node and kind: a and b are problems of
        // n1 and n2, c resolves n1, d is information on n2.
        let occurrence_ids = prop::sample::select(vec![
            ("a", "n1", Kind::Problem),
            ("b", "n2", Kind::Problem),
            ("c", "n1", Kind::Resolution),
            ("d", "n2", Kind::Information),
        ]);
        let origins = prop::sample::select(vec!["p1", "p2", "op"]);
        let body = prop_oneof![
            6 => (occurrence_ids, 0u8..=5)
                .prop_map(|((id, node, kind), sev)| problem(id, node, sev, kind)),
            1 => (ids.clone(), any::<bool>()).prop_map(|(id, ack)| EventBody::Acknowledge { identifier: id.into(), acknowledged: ack, user: "u".into() }),
            1 => (ids.clone(), "[a-c]{1,2}").prop_map(|(id, owner)| EventBody::SetOwner { identifier: id.into(), owner }),
            1 => (ids.clone(), 0u8..=5).prop_map(|(id, s)| EventBody::SetSeverity { identifier: id.into(), severity: Severity::new(s).unwrap() }),
            1 => (ids.clone(), "[x-z]{1,3}").prop_map(|(id, text)| EventBody::Journal { identifier: id.into(), user: "u".into(), text }),
            1 => ids.clone().prop_map(|id| EventBody::Expire { identifier: id.into() }),
            1 => (ids, 0u64..4, 0u64..4).prop_map(|(id, c1, c2)| EventBody::Delete {
                identifier: id.into(),
                seen: Some(vec![
                    OriginCount { origin: Origin::new("p1", 7), count: c1 },
                    OriginCount { origin: Origin::new("p2", 7), count: c2 },
                ]),
            }),
        ];
        (origins, 0i64..40, body).prop_map(|(origin, time, body)| event(origin, 0, time, body))
    }

    proptest! {
        /// The store logs an event after applying it, with the serial the fold reports: it must
        /// be the one the row had (or was about to get) before, as a lookup first would say.
        #[test]
        fn apply_reports_the_serial_the_row_had_before(
            raw in prop::collection::vec(arb_event(), 1..60),
        ) {
            let mut t = Table::new("AGG_P");
            let mut ch = Changes::default();
            for (seq, mut e) in raw.into_iter().enumerate() {
                e.seq = seq as u64 + 1;
                let before = t.serial_for(e.identifier());
                let (outcome, serial) = t.apply_with_serial(e.clone(), None, &mut ch);
                prop_assert_eq!(serial, before);
                prop_assert_eq!(t.serial_for(e.identifier()), before);
                let (again, serial) = t.apply_with_serial(e, None, &mut ch);
                prop_assert_eq!((outcome, again, serial), (Outcome::Applied, Outcome::Duplicate, before));
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// G3: the same events, in two orders and with duplicates, give identical tables.
        #[test]
        fn order_and_duplicates_do_not_change_the_result(
            raw in prop::collection::vec(arb_event(), 1..60),
            shuffle in any::<prop::sample::Index>(),
            dups in prop::collection::vec(any::<prop::sample::Index>(), 0..20),
        ) {
            // Number each origin's events 1, 2, 3, ... like a real writer.
            let mut next: HashMap<Origin, u64> = HashMap::default();
            let events: Vec<Event> = raw.into_iter().map(|mut e| {
                let seq = next.entry(e.origin.clone()).or_insert(0);
                *seq += 1;
                e.seq = *seq;
                e
            }).collect();

            let mut a = Table::new("AGG_P");
            let mut ch = Changes::default();
            for e in &events {
                a.apply(e.clone(), None, &mut ch);
            }

            let mut reordered: Vec<&Event> = events.iter().collect();
            // A deterministic permutation chosen by proptest (rotate, then reverse halves).
            let k = shuffle.index(reordered.len());
            reordered.rotate_left(k);
            let mid = reordered.len() / 2;
            reordered[..mid].reverse();
            for d in &dups {
                let pick = events.get(d.index(events.len())).unwrap();
                let at = d.index(reordered.len() + 1);
                reordered.insert(at, pick);
            }
            let mut b = Table::new("AGG_P");
            for e in reordered {
                b.apply(e.clone(), None, &mut ch);
            }
            prop_assert_eq!(snapshot(&a), snapshot(&b));
            prop_assert_eq!(a.alive(), b.alive());
        }
    }

    /// Numbers each origin's events 1, 2, 3, ... like a real writer.
    fn numbered(raw: Vec<Event>) -> Vec<Event> {
        let mut next: HashMap<Origin, u64> = HashMap::default();
        raw.into_iter()
            .map(|mut e| {
                let seq = next.entry(e.origin.clone()).or_insert(0);
                *seq += 1;
                e.seq = *seq;
                e
            })
            .collect()
    }

    /// Folds a sender's table into a receiver's the way a full resync does: applied sets and
    /// clears first, then every sender row with the receiver's own events the sender lacks
    /// (`exact`), or joined (`!exact`).
    fn resync(
        sender: &Table,
        receiver: &mut Table,
        receiver_events: &[Event],
        exact: bool,
    ) -> Changes {
        let mut ch = Changes::default();
        for (origin, set) in sender.applied_sets() {
            receiver.merge_applied(origin, set, &mut ch);
        }
        for (key, version) in sender.clear_entries() {
            receiver.merge_clear(key.clone(), version.clone(), &mut ch);
        }
        for (id, row) in sender.rows() {
            let own = exact.then(|| {
                receiver_events
                    .iter()
                    .filter(|e| e.identifier() == &**id)
                    .map(|e| (e.clone(), sender.seen(&e.origin, e.seq)))
                    .collect()
            });
            // The state's bytes as a snapshot page carries them.
            let stored = tandem_protocol::codec::to_bytes(&row.state)
                .ok()
                .map(bytes::Bytes::from);
            receiver.merge_row(
                Incoming::new(id.clone(), row.state.clone()),
                stored,
                own,
                &mut ch,
            );
        }
        ch
    }

    /// Every state a checkpoint would write from the bytes a snapshot sent is the row's state
    /// now: a kept encoding is never stale.
    fn kept_encodings_are_current(table: &Table, ch: &Changes) -> Result<(), TestCaseError> {
        for (id, (serial, bytes)) in ch
            .rows_with_serials()
            .filter_map(|(id, kept)| Some(id).zip(kept))
        {
            let row = table.row(id);
            prop_assert!(row.is_some(), "{id} kept but not in the table");
            let row = row.unwrap();
            // The checkpoint writes a kept row from these two alone.
            prop_assert_eq!(serial, row.serial, "{} kept another serial", id);
            let now = tandem_protocol::codec::to_bytes(&row.state).unwrap();
            prop_assert_eq!(&now[..], &bytes[..], "{} kept a stale encoding", id);
        }
        Ok(())
    }

    #[test]
    fn row_bytes_are_the_serial_then_the_state() {
        // What a snapshot page copies out of a row, and how a merged row is written back.
        let mut t = Table::new("AGG_P");
        let mut ch = Changes::default();
        t.apply(
            event("p", 1, 10, problem("a", "n", 5, Kind::Problem)),
            None,
            &mut ch,
        );
        let row = t.row("a").unwrap();
        let mut want = tandem_protocol::codec::to_bytes(&row.serial).unwrap();
        want.extend(tandem_protocol::codec::to_bytes(&row.state).unwrap());
        assert_eq!(tandem_protocol::codec::to_bytes(row).unwrap(), want);
        // And what a store reads back when it starts.
        let back: Row = tandem_protocol::codec::from_bytes_native(&want).unwrap();
        assert_eq!((back.serial, &back.state), (row.serial, &row.state));
        let serde: Row = tandem_protocol::codec::from_bytes(&want).unwrap();
        assert_eq!(back, serde);
    }

    /// A sender holding one problem alert, "a", and a receiver that took it by a full
    /// resync, with that resync's changes.
    fn one_problem_resynced() -> (Table, Table, Changes) {
        let mut sender = Table::new("AGG_P");
        let mut ch = Changes::default();
        sender.apply(
            event("p", 1, 10, problem("a", "n", 5, Kind::Problem)),
            None,
            &mut ch,
        );
        let mut receiver = Table::new("AGG_B");
        let ch = resync(&sender, &mut receiver, &[], true);
        (sender, receiver, ch)
    }

    #[test]
    fn a_merged_row_keeps_its_snapshot_encoding_until_it_changes() {
        let (sender, mut receiver, mut ch) = one_problem_resynced();
        assert!(
            ch.kept("a").is_some(),
            "a row taken as sent keeps its encoding"
        );
        receiver.apply(
            event("q", 1, 20, problem("a", "n", 4, Kind::Problem)),
            None,
            &mut ch,
        );
        assert!(
            ch.kept("a").is_none(),
            "a changed row must be encoded again"
        );
        // Cleared on arrival by a resolution only the receiver has: not as sent.
        let mut resolved = Table::new("AGG_B");
        let mut rch = Changes::default();
        let clear = event("q", 1, 20, problem("a-clear", "n", 0, Kind::Resolution));
        resolved.apply(clear, None, &mut rch);
        let ch = resync(&sender, &mut resolved, &[], true);
        assert_ne!(
            resolved.row("a").map(|r| &r.state),
            sender.row("a").map(|r| &r.state),
            "the receiver's resolution clears the problem as it arrives"
        );
        assert!(
            ch.kept("a").is_none(),
            "a row cleared on arrival must be encoded again"
        );
        // Joined (the receiver's own events unknown): never kept.
        let mut other = Table::new("AGG_B");
        let ch = resync(&sender, &mut other, &[], false);
        assert!(ch.rows().all(|(_, kept)| kept.is_none()));
    }

    /// A problem taken from a snapshot is in the receiver's problem index under the clear
    /// key hashed where its page was decoded: a resolution that arrives later finds it.
    #[test]
    fn a_resolution_clears_a_problem_taken_from_a_snapshot() {
        let (_, mut receiver, mut ch) = one_problem_resynced();
        assert!(ch.kept("a").is_some(), "taken as sent");
        let severity = |t: &Table| t.row("a").map(|r| r.state.severity.value);
        assert_ne!(severity(&receiver), Some(Severity::CLEAR));
        let clear = event("q", 1, 20, problem("a-clear", "n", 0, Kind::Resolution));
        receiver.apply(clear, None, &mut ch);
        assert_eq!(severity(&receiver), Some(Severity::CLEAR));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// A full resync gives the receiver the fold of both stores' events: identical to a
        /// table that saw them all, however they were split between the two.
        #[test]
        fn a_snapshot_merge_equals_the_fold_of_the_union(
            raw in prop::collection::vec(arb_event(), 1..60),
            sides in prop::collection::vec(0u8..3, 60),
        ) {
            let events = numbered(raw);
            let (mut sender, mut receiver, mut all) =
                (Table::new("AGG_P"), Table::new("AGG_P"), Table::new("AGG_P"));
            let mut mine = Vec::new();
            let mut ch = Changes::default();
            for (e, side) in events.iter().zip(&sides) {
                // 0: the sender only, 1: the receiver only, 2: both.
                if *side != 1 {
                    sender.apply(e.clone(), None, &mut ch);
                }
                if *side != 0 {
                    receiver.apply(e.clone(), None, &mut ch);
                    mine.push(e.clone());
                }
                all.apply(e.clone(), None, &mut ch);
            }
            let mut kept = resync(&sender, &mut receiver, &mine, true);
            prop_assert_eq!(snapshot(&receiver), snapshot(&all));
            prop_assert_eq!(receiver.alive(), all.alive());
            kept_encodings_are_current(&receiver, &kept)?;
            // What arrives after the page, before its checkpoint: the events again (the
            // duplicates may teach a row its inserter), then new ones from another origin.
            for e in &events {
                receiver.apply(e.clone(), Some(("AGG_B", 1)), &mut kept);
            }
            for e in events.iter().take(10) {
                let mut later = e.clone();
                later.origin = Origin::new("later", 1);
                receiver.apply(later, None, &mut kept);
            }
            kept_encodings_are_current(&receiver, &kept)?;
        }

        /// Without the receiver's own log, the join never counts an occurrence twice.
        #[test]
        fn a_joined_snapshot_never_exceeds_the_truth(
            raw in prop::collection::vec(arb_event(), 1..60),
            sides in prop::collection::vec(0u8..3, 60),
        ) {
            let events = numbered(raw);
            let (mut sender, mut receiver, mut all) =
                (Table::new("AGG_P"), Table::new("AGG_P"), Table::new("AGG_P"));
            let mut ch = Changes::default();
            for (e, side) in events.iter().zip(&sides) {
                if *side != 1 {
                    sender.apply(e.clone(), None, &mut ch);
                }
                if *side != 0 {
                    receiver.apply(e.clone(), None, &mut ch);
                }
                all.apply(e.clone(), None, &mut ch);
            }
            resync(&sender, &mut receiver, &[], false);
            for (id, row) in all.rows() {
                let joined = receiver.row(id).map_or(0, |r| fold::tally(&r.state));
                prop_assert!(joined <= fold::tally(&row.state), "{id}: {joined} > {}", fold::tally(&row.state));
            }
        }
    }
}
#[cfg(test)]
mod row_size {
    /// Every alert is a boxed row: one word more than 512 bytes puts each in the allocator's
    /// next size class (640), 128 bytes more per alert against the memory target of 1 KiB
    /// beyond the alert's text (docs/PERFORMANCE.md).
    #[test]
    fn a_row_fits_the_allocators_512_byte_class() {
        let size = std::mem::size_of::<super::Row>();
        assert!(size <= 512, "a row is {size} bytes");
    }
}
