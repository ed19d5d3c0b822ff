//! Every message on every tandem link.
//!
//! A connection opens with [`Message::Hello`] from the client; the server answers
//! [`Message::Welcome`] or [`Message::Reject`] and closes. After that the exchanges are:
//!
//! - events: `Events` → `Ack` (or `Refused` naming the bad event), from probes, proxies,
//!   operators and the gateway;
//! - liveness: `Ping` → `Pong`, both ways;
//! - directives: `Directive` from a store (passed on by proxies): fail back, redirect, leave;
//! - change log: `Subscribe` → a stream of `LogEntries`, or `LogTrimmed` when the cursor is older
//!   than the retained log; `Replicate` → `Ack` applies a peer's entries together with the new
//!   cursor; `GetCursor` → `Cursor`; `CursorReport` tells a sender how far its peer has got;
//! - full resync: `SnapshotRequest` → `SnapshotChunk` from the sender, page by page of one
//!   consistent snapshot (resumable by key while the sender holds it); `Merge` → `Ack` folds a
//!   chunk into the receiver, which records how far it got;
//! - `ResyncFinished` from the gateway → `Done`;
//! - operators: `Query` → `Alerts`, `StatusRequest` → `Status`, `Failback` → `Done`/`Error`.
//!
//! Requests that a multiplexing proxy forwards carry a `batch` id so that replies can be routed
//! back to the connection that asked.

use bytes::BytesMut;
use serde::{Deserialize, Serialize};

use crate::alert::Alert;
use crate::event::Event;
use crate::event::Version;
use crate::state::{AlertState, AppliedRanges};

/// The version of this protocol. A peer with another version is rejected in the handshake
/// with [`RejectReason::UnsupportedVersion`], never misread.
pub const PROTOCOL_VERSION: u32 = 4;

/// Who is connecting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub enum ClientKind {
    Probe,
    Proxy,
    Gateway,
    Operator,
    /// The other store of the pair, watching this one with heartbeats.
    Store,
}

/// The role a store has in the pair file; who is *acting* primary is a separate, live fact.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub enum Role {
    Primary,
    Backup,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Backup => "backup",
        }
    }
}

/// The first message of every connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Hello {
    pub version: u32,
    pub kind: ClientKind,
    pub name: String,
}

/// The server accepted the handshake.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Welcome {
    pub version: u32,
    pub name: String,
    pub role: Role,
    pub acting_primary: bool,
    /// The gateway has reported a finished resync since this store last started.
    pub resynced: bool,
}

/// Why a server refused a connection or a request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub enum RejectReason {
    /// The peer speaks a protocol version this server does not.
    UnsupportedVersion {
        supported: u32,
    },
    /// A proxy cannot reach its store; the client should use the other member of the pair.
    StoreUnavailable,
    /// This member is not the one to use now; connect to `to` instead.
    Redirect {
        to: String,
    },
    NotAuthorised,
    /// A limit (connections, in-flight events) was reached; retry later or elsewhere.
    Overloaded,
    /// The message broke the protocol (bad frame, unexpected message, bad field).
    BadRequest,
}

/// An instruction from a store (passed on by its proxy) to its clients.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub enum Directive {
    /// The primary is back and resynced: reconnect to the primary member of the pair.
    Failback,
    /// Reconnect to the named member.
    Redirect { to: String },
    /// This member cannot do its job (its store is gone): fail over now.
    Leave { reason: String },
}

/// One change-log entry: an event as a store applied it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct LogEntry {
    pub lsn: u64,
    /// The store at which the event entered the pair (from a probe or an operator); replication
    /// never sends an entry back to its source. Shared, as an origin's name is: a replicated
    /// batch names the same store in every entry.
    #[serde(deserialize_with = "crate::event::deserialize_shared_name")]
    #[cfg_attr(
        test,
        proptest(
            strategy = "proptest::strategy::Strategy::prop_map(\"[A-Z_]{0,8}\", std::sync::Arc::from)"
        )
    )]
    pub source: std::sync::Arc<str>,
    /// The alert's serial at `source` after the event, for `server_serial`.
    pub source_serial: u64,
    pub event: Event,
}

/// Log entries in their stored form, each one's encoding after its length (u32,
/// little-endian): the form of a store's log blocks. A store sends its log in this form
/// without decoding it, and the gateway passes it to the peer untouched; only the store that
/// applies the entries decodes them.
///
/// A run of entries may come as a packed segment instead: a whole log block as the store keeps
/// it, compressed with LZ4 (see [`PACKED_SEGMENT_HEAD`]). Sent so, replication carried a
/// thirteenth of the bytes of the benchmark's events through the sender's socket, the gateway
/// and the receiver's, and the sender compresses nothing it had not compressed already.
///
/// The bytes are a `BytesMut` so that a batch decoded from a frame is a slice of that frame,
/// not a copy (the codec does this for `LogEntries` and `Replicate`), and can still be built up
/// entry by entry.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct LogBatch {
    count: u32,
    #[serde(with = "batch_bytes")]
    #[cfg_attr(
        test,
        proptest(
            strategy = "proptest::strategy::Strategy::prop_map(proptest::collection::vec(proptest::arbitrary::any::<u8>(), 0..64), |v| BytesMut::from(&v[..]))"
        )
    )]
    bytes: BytesMut,
}

/// A [`LogBatch`]'s bytes, encoded as `serde_bytes` encodes a `Vec<u8>`.
mod batch_bytes {
    use bytes::{Bytes, BytesMut};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &BytesMut, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(bytes)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<BytesMut, D::Error> {
        let vec = serde_bytes::ByteBuf::deserialize(deserializer)?.into_vec();
        // A vector's `Bytes` is its only owner: taking it back as `BytesMut` does not copy.
        Ok(Bytes::from(vec)
            .try_into_mut()
            .unwrap_or_else(|shared| BytesMut::from(&shared[..])))
    }
}

/// Bytes before each entry in a [`LogBatch`] and a stored log block: its length.
pub const ENTRY_LEN_PREFIX: usize = 4;

/// What a packed segment of a [`LogBatch`] has where an entry has its length. No entry is
/// 4 GiB long: a frame is at most 64 MiB.
const PACKED_SEGMENT: u32 = u32::MAX;

/// Bytes before a packed segment's LZ4 data: [`PACKED_SEGMENT`], the length of the entries
/// it packs, and the length of the data (each u32, little-endian).
pub const PACKED_SEGMENT_HEAD: usize = 12;

/// Appends one entry's encoding in the stored form: its length, then its bytes.
pub(crate) fn append_entry(buf: &mut BytesMut, entry: &[u8]) {
    buf.extend_from_slice(&(entry.len() as u32).to_le_bytes());
    buf.extend_from_slice(entry);
}

/// Appends a packed segment: entries in the stored form, `unpacked` bytes of them, as the LZ4
/// block `lz4`.
pub(crate) fn append_packed(buf: &mut BytesMut, unpacked: u32, lz4: &[u8]) {
    buf.extend_from_slice(&PACKED_SEGMENT.to_le_bytes());
    buf.extend_from_slice(&unpacked.to_le_bytes());
    buf.extend_from_slice(&(lz4.len() as u32).to_le_bytes());
    buf.extend_from_slice(lz4);
}

/// One part of a [`LogBatch`]'s bytes: an entry, or a packed segment of entries.
enum Segment<'a> {
    /// An entry in the stored form, its length included.
    Entry(&'a [u8]),
    Packed {
        unpacked: usize,
        lz4: &'a [u8],
    },
}

/// The segments of a batch's bytes, in order; an error where the bytes end inside one.
fn segments(
    mut rest: &[u8],
) -> impl Iterator<Item = Result<Segment<'_>, crate::codec::CodecError>> {
    std::iter::from_fn(move || next_segment(&mut rest))
}

/// The segment `rest` starts with, taken off its front; None at its end. Bytes that end inside
/// a segment are an error, and leave `rest` empty.
fn next_segment<'a>(rest: &mut &'a [u8]) -> Option<Result<Segment<'a>, crate::codec::CodecError>> {
    if rest.is_empty() {
        return None;
    }
    let u32_at = |at: usize| {
        rest.get(at..at + 4)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(|b| u32::from_le_bytes(b) as usize)
    };
    let segment = match u32_at(0) {
        Some(len) if len != PACKED_SEGMENT as usize => ENTRY_LEN_PREFIX
            .checked_add(len)
            .and_then(|end| rest.get(..end))
            .map(|entry| (entry.len(), Segment::Entry(entry))),
        Some(_) => match (u32_at(4), u32_at(8)) {
            (Some(unpacked), Some(packed)) => PACKED_SEGMENT_HEAD
                .checked_add(packed)
                .and_then(|end| Some((end, rest.get(PACKED_SEGMENT_HEAD..end)?)))
                .map(|(end, lz4)| (end, Segment::Packed { unpacked, lz4 })),
            _ => None,
        },
        None => None,
    };
    match segment {
        Some((used, segment)) => {
            *rest = &rest[used..];
            Some(Ok(segment))
        }
        None => {
            *rest = &[];
            Some(Err(crate::codec::CodecError::Decode(
                "log entries end inside an entry".into(),
            )))
        }
    }
}

/// The most bytes an LZ4 block of `len` bytes can unpack to: a byte of a match's length
/// stands for at most 255 bytes.
fn lz4_most(len: usize) -> usize {
    len.saturating_mul(255).saturating_add(16)
}

/// `bytes` (a batch's) with every packed segment unpacked, or `None` when it has none. The
/// unpacked entries may come to at most `limit` bytes, and a segment may claim no more than
/// its data can unpack to: both are checked before anything is allocated for it, so a few
/// bytes claiming megabytes cost the receiver nothing.
fn unpack_segments(
    bytes: &[u8],
    limit: usize,
) -> Result<Option<Vec<u8>>, crate::codec::CodecError> {
    unpack_segments_noting(bytes, limit, |_, _| {})
}

/// [`unpack_segments`], calling `noted` with each packed segment's place in the unpacked bytes
/// and its LZ4 data's place in `bytes`.
fn unpack_segments_noting(
    bytes: &[u8],
    limit: usize,
    mut noted: impl FnMut(std::ops::Range<usize>, std::ops::Range<usize>),
) -> Result<Option<Vec<u8>>, crate::codec::CodecError> {
    use crate::codec::CodecError;
    let mut total = 0usize;
    let mut packed = false;
    for segment in segments(bytes) {
        total = total.saturating_add(match segment? {
            Segment::Entry(entry) => entry.len(),
            Segment::Packed { unpacked, lz4 } => {
                if unpacked > lz4_most(lz4.len()) {
                    return Err(CodecError::Decode(format!(
                        "a packed segment of a log batch claims {unpacked} bytes, more than its {} bytes of data can unpack to",
                        lz4.len()
                    )));
                }
                packed = true;
                unpacked
            }
        });
    }
    if !packed {
        return Ok(None);
    }
    if total > limit {
        return Err(CodecError::Decode(format!(
            "a log batch unpacks to {total} bytes, over the {limit} bytes a batch may hold"
        )));
    }
    let mut out = Vec::with_capacity(total);
    for segment in segments(bytes) {
        match segment? {
            Segment::Entry(entry) => out.extend_from_slice(entry),
            Segment::Packed { unpacked, lz4 } => {
                let at = out.len();
                out.resize(at + unpacked, 0);
                let n = lz4_flex::block::decompress_into(lz4, &mut out[at..]).map_err(|e| {
                    CodecError::Decode(format!(
                        "a packed segment of a log batch does not unpack: {e}"
                    ))
                })?;
                if n != unpacked {
                    return Err(CodecError::Decode(format!(
                        "a packed segment of a log batch unpacks to {n} bytes where it claims {unpacked}"
                    )));
                }
                let data = lz4.as_ptr() as usize - bytes.as_ptr() as usize;
                noted(at..at + unpacked, data..data + lz4.len());
            }
        }
    }
    Ok(Some(out))
}

impl LogBatch {
    pub fn len(&self) -> usize {
        self.count as usize
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Appends one entry's encoding, as stored.
    pub fn push_encoded(&mut self, entry: &[u8]) {
        append_entry(&mut self.bytes, entry);
        self.count += 1;
    }

    /// Appends `count` entries as a packed segment: their stored form, `unpacked` bytes of it,
    /// compressed as the LZ4 block `lz4` (as a store keeps a log block). The receiver unpacks
    /// the segment before it decodes an entry.
    pub fn push_packed(&mut self, count: u32, unpacked: u32, lz4: &[u8]) {
        append_packed(&mut self.bytes, unpacked, lz4);
        self.count += count;
    }

    /// The entries in their stored form, as the batch goes on the wire after its count.
    pub(crate) fn stored(&self) -> &[u8] {
        &self.bytes
    }

    /// A batch of `count` entries whose stored form is `bytes` (a slice of a frame).
    pub(crate) fn from_parts(count: u32, bytes: BytesMut) -> LogBatch {
        LogBatch { count, bytes }
    }

    /// Appends one entry, encoding it.
    pub fn push(&mut self, entry: &LogEntry) -> Result<(), crate::codec::CodecError> {
        let before = self.bytes.len();
        self.bytes.extend_from_slice(&[0; ENTRY_LEN_PREFIX]);
        if let Err(e) = crate::codec::append_to_buf(entry, &mut self.bytes) {
            self.bytes.truncate(before);
            return Err(e);
        }
        let len = (self.bytes.len() - before - ENTRY_LEN_PREFIX) as u32;
        self.bytes[before..before + ENTRY_LEN_PREFIX].copy_from_slice(&len.to_le_bytes());
        self.count += 1;
        Ok(())
    }

    /// Decodes every entry for applying, keeping each event's encoding (a range of this
    /// batch's bytes, not a copy; of the unpacked entries where the batch has packed
    /// segments): the applying store logs the event as it came. The entries' LSNs are the
    /// sender's and are not kept (the batch's cursor carries the position).
    pub fn decode_keeping_event_bytes(self) -> Result<EntriesToApply, crate::codec::CodecError> {
        use crate::codec::{CodecError, RecordBytes, decode_prefix_native};
        let count = self.len();
        let frame = self.bytes.freeze();
        // Each packed segment's unpacked bytes and LZ4 data, in order.
        let mut places = Vec::new();
        let unpacked =
            unpack_segments_noting(&frame, crate::codec::MAX_FRAME_LIMIT, |at, data| {
                places.push((at, data))
            })?;
        let bytes = match unpacked {
            Some(unpacked) => bytes::Bytes::from(unpacked),
            None => frame.clone(),
        };
        let room = count.min(crate::codec::PREALLOC_LIMIT);
        let mut out = EntriesToApply {
            events: Vec::with_capacity(room),
            sources: EntrySources::with_capacity(room),
            encoded: RecordBytes::new(bytes.clone(), room),
            packed: Vec::with_capacity(places.len()),
        };
        // Only segments of whole entries are kept; a peer's store sends no other, and one that
        // splits entries across segments is decoded all the same.
        let mut places = places
            .into_iter()
            .filter(|(place, _)| !place.is_empty())
            .peekable();
        // The packed segment being decoded: its first entry, its place unpacked, its data's.
        let mut open: Option<(usize, std::ops::Range<usize>, std::ops::Range<usize>)> = None;
        let mut at = 0;
        for record in Records::of(&bytes) {
            let record = record?;
            while places.next_if(|(place, _)| place.start < at).is_some() {}
            if open.is_none() {
                if let Some((place, data)) = places.next_if(|(place, _)| place.start == at) {
                    open = Some((out.events.len(), place, data));
                }
            }
            let start = at + ENTRY_LEN_PREFIX;
            // The source as bytes: see `EntrySources::push_bytes`.
            let ((_lsn, source, source_serial), head) =
                crate::codec::decode_prefix_borrowed::<(u64, &[u8], u64)>(record)?;
            let (event, used) = decode_prefix_native::<Event>(&record[head..])?;
            if head + used != record.len() {
                return Err(CodecError::TrailingBytes {
                    extra: record.len() - head - used,
                });
            }
            out.events.push(event);
            out.sources.push_bytes(source, source_serial).map_err(|e| {
                CodecError::Decode(format!("a log entry's source is not UTF-8: {e}"))
            })?;
            out.encoded.push(start + head, start + head + used);
            at = start + record.len();
            if let Some((first, place, data)) = open.take_if(|(_, place, _)| place.end <= at) {
                if place.end == at {
                    out.packed.push(PackedRun {
                        entries: first..out.events.len(),
                        unpacked: place.len(),
                        lz4: frame.slice(data),
                    });
                }
            }
        }
        if out.events.len() != count {
            return Err(CodecError::Decode(format!(
                "a log batch said {count} entries and held {}",
                out.events.len()
            )));
        }
        Ok(out)
    }

    /// Decodes every entry.
    pub fn decode(&self) -> Result<Vec<LogEntry>, crate::codec::CodecError> {
        let unpacked = unpack_segments(&self.bytes, crate::codec::MAX_FRAME_LIMIT)?;
        let stored = unpacked.as_deref().unwrap_or(&self.bytes);
        let mut out = Vec::with_capacity(self.len().min(crate::codec::PREALLOC_LIMIT));
        for record in Records::of(stored) {
            out.push(crate::codec::from_bytes(record?)?);
        }
        if out.len() != self.len() {
            return Err(crate::codec::CodecError::Decode(format!(
                "a log batch said {} entries and held {}",
                self.len(),
                out.len()
            )));
        }
        Ok(out)
    }
}

/// The encodings of the entries in a [`LogBatch`] or a stored log block.
pub struct Records<'a> {
    rest: &'a [u8],
}

impl<'a> Records<'a> {
    /// Over bytes in the stored form (a log block).
    pub fn of(bytes: &'a [u8]) -> Records<'a> {
        Records { rest: bytes }
    }
}

impl<'a> Iterator for Records<'a> {
    type Item = Result<&'a [u8], crate::codec::CodecError>;

    fn next(&mut self) -> Option<Self::Item> {
        Some(match next_segment(&mut self.rest)? {
            Ok(Segment::Entry(entry)) => Ok(&entry[ENTRY_LEN_PREFIX..]),
            Ok(Segment::Packed { .. }) => {
                self.rest = &[];
                Err(crate::codec::CodecError::Decode(
                    "a packed segment where log entries are stored as they are".into(),
                ))
            }
            Err(e) => Err(e),
        })
    }
}

/// A [`LogEntry`] by reference: encodes to exactly the same bytes, without owning the event.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct LogEntryRef<'a> {
    pub lsn: u64,
    pub source: &'a str,
    pub source_serial: u64,
    pub event: &'a Event,
}

/// A log batch's entries as the applying store needs them, in order: each event, the store
/// it entered the pair at with its serial there, and its encoding as it came. Separate
/// vectors rather than a `LogEntry` each: an `Event` alone is moved without a `memcpy` call,
/// a whole entry is not.
#[derive(Debug, Default)]
pub struct EntriesToApply {
    pub events: Vec<Event>,
    pub sources: EntrySources,
    pub encoded: crate::codec::RecordBytes,
    /// The batch's packed segments, in order: a store that logs all of a segment's entries
    /// keeps the sender's compressed block rather than compress them again.
    pub packed: Vec<PackedRun>,
}

/// For each entry of a decoded [`LogBatch`], the store it entered the pair at and its serial
/// there. The names are kept by runs: a batch names one store in almost every entry, and a
/// shared name cloned for each entry on the decoding thread and dropped on the commit thread
/// moved its count between the two cores every time (3 % of a backup's CPU, when a
/// connection's thread decoded the entries).
#[derive(Debug, Default)]
pub struct EntrySources {
    /// Each run's name and the index of the entry after it.
    names: Vec<(std::sync::Arc<str>, usize)>,
    serials: Vec<u64>,
}

impl EntrySources {
    pub(crate) fn with_capacity(entries: usize) -> EntrySources {
        EntrySources {
            names: Vec::new(),
            serials: Vec::with_capacity(entries),
        }
    }

    pub(crate) fn push(&mut self, name: &str, serial: u64) {
        self.serials.push(serial);
        let end = self.serials.len();
        match self.names.last_mut() {
            Some((last, last_end)) if **last == *name => *last_end = end,
            _ => self.names.push((crate::event::shared_name(name), end)),
        }
    }

    /// [`EntrySources::push`] for a name read as bytes, checked as UTF-8 only when it starts
    /// a run: the same bytes as the run's valid name are valid.
    pub(crate) fn push_bytes(
        &mut self,
        name: &[u8],
        serial: u64,
    ) -> Result<(), std::str::Utf8Error> {
        match self.names.last_mut() {
            Some((last, last_end)) if last.as_bytes() == name => {
                self.serials.push(serial);
                *last_end = self.serials.len();
            }
            _ => self.push(std::str::from_utf8(name)?, serial),
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.serials.len()
    }

    pub fn is_empty(&self) -> bool {
        self.serials.is_empty()
    }

    /// Each entry's source and serial, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, u64)> {
        self.names
            .iter()
            .scan(0, |start, (name, end)| {
                let run = *start..*end;
                *start = *end;
                Some(std::iter::repeat_n(&**name, run.len()))
            })
            .flatten()
            .zip(self.serials.iter().copied())
    }
}

/// One packed segment of a [`LogBatch`], as [`LogBatch::decode_keeping_event_bytes`] found it.
#[derive(Debug, Clone)]
pub struct PackedRun {
    /// Its entries' places among the batch's events.
    pub entries: std::ops::Range<usize>,
    /// Its entries' length in the stored form, LSNs as the sender logged them.
    pub unpacked: usize,
    /// The LZ4 block of them, a slice of the frame.
    pub lz4: bytes::Bytes,
}

/// A position in a snapshot: its records are the generic-clear versions, then the alerts,
/// each in key order.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub enum SnapshotKey {
    Clear(String),
    Alert(String),
}

/// Where a page of a snapshot stands, without its records: the leading fields of a
/// [`SnapshotChunk`], so that a gateway reads them from the head of the frame and passes the
/// records on undecoded.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct SnapshotHead {
    /// The snapshot's id at the sender; pages of one id are one consistent view.
    pub snapshot: u64,
    /// The sender's log position the snapshot is consistent with.
    pub lsn: u64,
    /// How far the sender had applied the requester's log, in the same view.
    pub peer_cursor: u64,
    /// Where this page starts (after this key; None: at the beginning).
    pub from: Option<SnapshotKey>,
    /// Where it ends: the key to ask after next.
    pub next: Option<SnapshotKey>,
    /// Records (clears and alerts) in the whole snapshot, for progress; approximate.
    pub total: u64,
    pub done: bool,
}

/// One page of a store's snapshot, consistent with its log at `head.lsn`. A nested struct
/// encodes as its fields in line, so the head's fields are the frame's first.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct SnapshotChunk {
    pub head: SnapshotHead,
    /// Every origin's applied set; in the first page only.
    pub applied: Vec<AppliedRanges>,
    /// Generic-clear keys and their newest resolution versions.
    pub clears: Vec<(String, Version)>,
    /// Each identifier in the shared form a store keys its table with, so that the receiver
    /// takes it as decoded rather than copying it again.
    #[cfg_attr(
        test,
        proptest(
            strategy = "proptest::strategy::Strategy::prop_map(proptest::prelude::any::<Vec<(String, AlertState)>>(), |alerts| alerts.into_iter().map(|(id, state)| (std::sync::Arc::from(id), state)).collect())"
        )
    )]
    pub alerts: Vec<(std::sync::Arc<str>, AlertState)>,
}

/// How far a receiver has merged a peer's snapshot, so that a resync resumes there.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct ResyncPoint {
    pub snapshot: u64,
    pub lsn: u64,
    pub peer_cursor: u64,
    pub after: Option<SnapshotKey>,
    /// Records merged so far.
    pub merged: u64,
    pub total: u64,
}

/// Sort direction of a query key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct SortKey {
    pub field: String,
    pub descending: bool,
}

/// An operator's query: a filter expression (empty for all), sort keys, an optional limit.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Query {
    pub filter: String,
    pub sort: Vec<SortKey>,
    pub limit: Option<u32>,
}

/// A store's view of itself, for `tandem status` and the ops endpoints.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct StoreStatus {
    pub name: String,
    pub role: Option<Role>,
    pub acting_primary: bool,
    pub resynced: bool,
    pub peer_up: bool,
    pub alerts: u64,
    pub lsn: u64,
    /// Lowest LSN still retained in the change log.
    pub first_lsn: u64,
    pub clients: u32,
}

/// Everything that can cross a tandem link.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub enum Message {
    Hello(Hello),
    Welcome(Welcome),
    Reject {
        reason: RejectReason,
        message: String,
    },
    Events {
        batch: u64,
        events: Vec<Event>,
    },
    /// Every event of the batch is durable (applied now or earlier: `duplicates` of them were).
    Ack {
        batch: u64,
        applied: u32,
        duplicates: u32,
    },
    /// The batch was refused whole: `index` names the offending event, `reason` says why.
    /// Nothing of the batch was applied.
    Refused {
        batch: u64,
        index: u32,
        reason: String,
    },
    Ping {
        nonce: u64,
    },
    Pong {
        nonce: u64,
    },
    Directive(Directive),
    Subscribe {
        from_lsn: u64,
        /// Leave out entries whose source is this store (the receiver), so nothing loops.
        skip_source: Option<String>,
    },
    LogEntries {
        entries: LogBatch,
        /// The highest LSN this page covers, entries left out included: the subscriber's new
        /// position even when every entry was filtered away.
        last_lsn: u64,
        head_lsn: u64,
    },
    /// The requested LSN is no longer retained: a full resync is needed.
    LogTrimmed {
        first_lsn: u64,
    },
    /// Apply a peer's entries and store `cursor` (the peer's LSN reached) in the same commit.
    /// `after` is the cursor the entries follow: a receiver whose cursor is below it would get
    /// a gap, and refuses the batch.
    Replicate {
        batch: u64,
        peer: String,
        after: u64,
        cursor: u64,
        entries: LogBatch,
    },
    GetCursor {
        peer: String,
    },
    Cursor {
        peer: String,
        lsn: u64,
        /// A full resync from `peer` that is under way, to be resumed.
        resync: Option<ResyncPoint>,
    },
    CursorReport {
        peer: String,
        lsn: u64,
    },
    /// Ask for the next page of a consistent snapshot for the store `peer`: of snapshot
    /// `snapshot` after `after`, or of a new snapshot when `snapshot` is 0 or no longer held.
    SnapshotRequest {
        peer: String,
        snapshot: u64,
        after: Option<SnapshotKey>,
        limit: u32,
    },
    SnapshotChunk(Box<SnapshotChunk>),
    /// Fold a chunk of `peer`'s snapshot into this store (answered `Ack` or `Refused`).
    Merge {
        batch: u64,
        peer: String,
        chunk: Box<SnapshotChunk>,
    },
    ResyncFinished {
        gateway: String,
    },
    Query(Query),
    Alerts {
        alerts: Vec<Alert>,
        /// Matches before the limit was applied.
        total: u64,
    },
    StatusRequest,
    Status(StoreStatus),
    Failback {
        force: bool,
    },
    Done {
        message: String,
    },
    Error {
        message: String,
    },
}

impl Message {
    /// The variant's name, for logs and errors (never the payload, which may be large).
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello(_) => "Hello",
            Message::Welcome(_) => "Welcome",
            Message::Reject { .. } => "Reject",
            Message::Events { .. } => "Events",
            Message::Ack { .. } => "Ack",
            Message::Refused { .. } => "Refused",
            Message::Ping { .. } => "Ping",
            Message::Pong { .. } => "Pong",
            Message::Directive(_) => "Directive",
            Message::Subscribe { .. } => "Subscribe",
            Message::LogEntries { .. } => "LogEntries",
            Message::LogTrimmed { .. } => "LogTrimmed",
            Message::Replicate { .. } => "Replicate",
            Message::GetCursor { .. } => "GetCursor",
            Message::Cursor { .. } => "Cursor",
            Message::CursorReport { .. } => "CursorReport",
            Message::SnapshotRequest { .. } => "SnapshotRequest",
            Message::SnapshotChunk(_) => "SnapshotChunk",
            Message::Merge { .. } => "Merge",
            Message::ResyncFinished { .. } => "ResyncFinished",
            Message::Query(_) => "Query",
            Message::Alerts { .. } => "Alerts",
            Message::StatusRequest => "StatusRequest",
            Message::Status(_) => "Status",
            Message::Failback { .. } => "Failback",
            Message::Done { .. } => "Done",
            Message::Error { .. } => "Error",
        }
    }
}
