//! Framing and serialisation: the one place that knows the bytes.
//!
//! A frame is a 4-byte big-endian length followed by that many bytes of bincode (2.0.1, serde
//! path, standard configuration with variable-length integers). [`MessageCodec`] is a tokio-util
//! codec for `Framed`; [`to_bytes`] and [`from_bytes`] serve storage formats that want the same
//! encoding. Swapping the serialiser means changing this module only.
//!
//! Decoding never trusts the peer and no input panics. Two kinds of failure differ in what they
//! leave behind:
//! - a frame that arrived whole but whose body does not decode (a bad field, an unknown
//!   variant, bytes left over) is *yielded* as `Err` inside the item: the byte stream is still
//!   in step, so a server can answer with an error naming the problem and keep the connection;
//! - a frame longer than the configured maximum (refused before its body is buffered) or an I/O
//!   error is returned as the decoder's error, which ends the stream: the connection must close.

use bytes::{BufMut, Bytes, BytesMut};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::codec::{Decoder, Encoder, LengthDelimitedCodec};

use crate::event::Version;
use crate::message::{Message, SnapshotHead};
use crate::state::AppliedRanges;

/// Largest frame accepted or sent unless configured otherwise: 16 MiB.
pub const DEFAULT_MAX_FRAME: usize = 16 * 1024 * 1024;

/// The largest frame any configuration may allow: 64 MiB.
///
/// It doubles as bincode's decode limit. bincode allocates a string's buffer from its announced
/// length before reading it, so without a limit a 10-byte frame announcing an exabyte string
/// aborts the process; with it, the announcement is refused first.
pub const MAX_FRAME_LIMIT: usize = 64 * 1024 * 1024;

const LENGTH_FIELD: usize = 4;

/// Bytes of a frame a page leaves for the head of the message that passes it on: a gateway
/// hands a `LogEntries` page on in a `Replicate` frame, and a `SnapshotChunk` page in a `Merge`
/// frame, to a receiver with the same limit.
pub const PAGE_HEAD_ROOM: usize = 4096;

/// The largest event, as encoded, that frames of at most `max_frame` bytes carry all the way:
/// in a batch, and alone in a page of a store's log with the head a gateway adds.
pub fn max_event(max_frame: usize) -> usize {
    max_frame
        .min(MAX_FRAME_LIMIT)
        .saturating_sub(PAGE_HEAD_ROOM)
}

/// What went wrong reading or writing a frame.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error(
        "frame of {len} bytes is over the maximum of {max} bytes (raise max_frame_bytes on both sides, or send smaller batches)"
    )]
    FrameTooLarge { len: usize, max: usize },
    #[error("frame does not decode as a tandem message: {0}")]
    Decode(String),
    #[error("frame has {extra} bytes after the message")]
    TrailingBytes { extra: usize },
    #[error("message could not be encoded: {0}")]
    Encode(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

type Config = bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<MAX_FRAME_LIMIT>,
>;

fn config() -> Config {
    bincode::config::standard().with_limit::<MAX_FRAME_LIMIT>()
}

/// Writes bincode output straight into the frame buffer: no intermediate `Vec`.
struct BufWriter<'a>(&'a mut BytesMut);

impl bincode::enc::write::Writer for BufWriter<'_> {
    // As `append_bytes`'s writer: most writes are a byte.
    #[inline]
    fn write(&mut self, bytes: &[u8]) -> Result<(), bincode::error::EncodeError> {
        match *bytes {
            [b] => self.0.put_u8(b),
            _ => self.0.extend_from_slice(bytes),
        }
        Ok(())
    }
}

/// How many bytes `value` takes with the wire encoding, without writing them.
pub fn encoded_len<T: Serialize + ?Sized>(value: &T) -> Result<usize, CodecError> {
    let mut size = bincode::enc::write::SizeWriter::default();
    bincode::serde::encode_into_writer(value, &mut size, config())
        .map_err(|e| CodecError::Encode(e.to_string()))?;
    Ok(size.bytes_written)
}

/// Serialises any value with the wire encoding (for storage records).
pub fn to_bytes<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    bincode::serde::encode_to_vec(value, config()).map_err(|e| CodecError::Encode(e.to_string()))
}

/// Appends the encoding of `value` to `out`: for hot paths that reuse one buffer.
pub fn append_bytes<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) -> Result<(), CodecError> {
    struct VecWriter<'a>(&'a mut Vec<u8>);
    impl bincode::enc::write::Writer for VecWriter<'_> {
        // Most writes are a varint's byte or two: a call to `memcpy` for each was most of a
        // probe's encoding time.
        #[inline]
        fn write(&mut self, bytes: &[u8]) -> Result<(), bincode::error::EncodeError> {
            match *bytes {
                [b] => self.0.push(b),
                _ => self.0.extend_from_slice(bytes),
            }
            Ok(())
        }
    }
    bincode::serde::encode_into_writer(value, VecWriter(out), config())
        .map_err(|e| CodecError::Encode(e.to_string()))
}

/// Serialises `value` onto the end of `out`.
pub(crate) fn append_to_buf<T: Serialize + ?Sized>(
    value: &T,
    out: &mut BytesMut,
) -> Result<(), CodecError> {
    bincode::serde::encode_into_writer(value, BufWriter(out), config())
        .map_err(|e| CodecError::Encode(e.to_string()))
}

/// Deserialises a value written by [`to_bytes`]; the whole slice must be used.
pub fn from_bytes<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (value, used) = bincode::serde::decode_from_slice::<T, _>(bytes, config())
        .map_err(|e| CodecError::Decode(e.to_string()))?;
    whole(value, used, bytes)
}

/// `value`, decoded from the first `used` bytes of `bytes`, if that was all of them.
fn whole<T>(value: T, used: usize, bytes: &[u8]) -> Result<T, CodecError> {
    match bytes.len() - used {
        0 => Ok(value),
        extra => Err(CodecError::TrailingBytes { extra }),
    }
}

/// [`from_bytes`] through bincode's own traits (see [`decode_prefix_native`]): for a store's
/// rows, a million of which it reads back when it starts.
pub fn from_bytes_native<'a, T: bincode::BorrowDecode<'a, ()>>(
    bytes: &'a [u8],
) -> Result<T, CodecError> {
    let (value, used) = decode_prefix_native::<T>(bytes)?;
    whole(value, used, bytes)
}

/// The most items a decoder reserves room for on a peer's word; beyond it vectors grow as
/// items actually decode.
pub(crate) const PREALLOC_LIMIT: usize = 4096;

/// Deserialises the value at the start of `bytes`, ignoring what follows: to read the first
/// field of a record (a log entry's LSN) without decoding the rest. The value may borrow from
/// `bytes` (a `&str` instead of a `String`).
pub fn from_prefix<'a, T: serde::Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, CodecError> {
    bincode::serde::borrow_decode_from_slice::<T, _>(bytes, config())
        .map(|(value, _)| value)
        .map_err(|e| CodecError::Decode(e.to_string()))
}

/// Deserialises the value at the start of `bytes` and says how many bytes it took.
pub(crate) fn decode_prefix<T: DeserializeOwned>(bytes: &[u8]) -> Result<(T, usize), CodecError> {
    bincode::serde::decode_from_slice::<T, _>(bytes, config())
        .map_err(|e| CodecError::Decode(e.to_string()))
}

/// [`decode_prefix`] through bincode's own traits rather than serde's: the same bytes and
/// the same value (held equal by the proptests), without serde's visitors, which were a third
/// of decoding an event or an alert state. For the records decoded by the million: events
/// and alert states.
pub(crate) fn decode_prefix_native<'a, T: bincode::BorrowDecode<'a, ()>>(
    bytes: &'a [u8],
) -> Result<(T, usize), CodecError> {
    bincode::borrow_decode_from_slice::<T, _>(bytes, config())
        .map_err(|e| CodecError::Decode(e.to_string()))
}

/// [`decode_prefix`] for a value that borrows from `bytes`.
pub fn decode_prefix_borrowed<'a, T: serde::Deserialize<'a>>(
    bytes: &'a [u8],
) -> Result<(T, usize), CodecError> {
    bincode::serde::borrow_decode_from_slice::<T, _>(bytes, config())
        .map_err(|e| CodecError::Decode(e.to_string()))
}

/// A string field, borrowed from the input where the format allows.
pub(crate) fn borrow_cow_str<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<std::borrow::Cow<'de, str>, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(transparent)]
    struct Borrowed<'a>(#[serde(borrow)] std::borrow::Cow<'a, str>);
    <Borrowed as serde::Deserialize>::deserialize(deserializer).map(|b| b.0)
}

/// Decodes an `Events` frame event by event, keeping each event's encoding (a slice of the
/// frame, not a copy) next to it. Equivalent to decoding the frame as a [`Message`].
fn decode_events(frame: Bytes) -> Result<(Message, RecordBytes), CodecError> {
    let ((_, batch, count), mut at) = decode_prefix::<(u32, u64, u64)>(&frame)?;
    // The count comes from the peer: reserve for what it says only up to a bound, so a
    // lying count costs a bad-frame error, not an allocation of its choosing.
    let room = (count as usize).min(frame.len() - at).min(PREALLOC_LIMIT);
    let mut events = Vec::with_capacity(room);
    let mut encoded = RecordBytes::new(frame.clone(), room);
    for _ in 0..count {
        let (event, used) = decode_prefix_native::<crate::Event>(&frame[at..])?;
        encoded.push(at, at + used);
        events.push(event);
        at += used;
    }
    if at != frame.len() {
        return Err(CodecError::TrailingBytes {
            extra: frame.len() - at,
        });
    }
    Ok((Message::Events { batch, events }, encoded))
}

/// Decodes a `Merge` frame record by record, keeping each alert state's encoding (a slice of
/// the frame) next to it, so a receiver can store a state it takes unchanged as it came.
/// Equivalent to decoding the frame as a [`Message`].
fn decode_merge(frame: Bytes) -> Result<(Message, RecordBytes), CodecError> {
    type Head = (
        u32,
        u64,
        String,
        SnapshotHead,
        Vec<AppliedRanges>,
        Vec<(String, Version)>,
        u64,
    );
    let ((_, batch, peer, head, applied, clears, count), mut at) = decode_prefix::<Head>(&frame)?;
    let room = (count as usize).min(frame.len() - at).min(PREALLOC_LIMIT);
    let mut alerts = Vec::with_capacity(room);
    let mut encoded = RecordBytes::new(frame.clone(), room);
    for _ in 0..count {
        let (identifier, used) = decode_prefix_native::<&str>(&frame[at..])?;
        at += used;
        let identifier = std::sync::Arc::from(identifier);
        let (state, used) = decode_prefix_native::<crate::state::AlertState>(&frame[at..])?;
        encoded.push(at, at + used);
        alerts.push((identifier, state));
        at += used;
    }
    if at != frame.len() {
        return Err(CodecError::TrailingBytes {
            extra: frame.len() - at,
        });
    }
    let chunk = crate::message::SnapshotChunk {
        head,
        applied,
        clears,
        alerts,
    };
    Ok((
        Message::Merge {
            batch,
            peer,
            chunk: Box::new(chunk),
        },
        encoded,
    ))
}

/// Decodes a whole frame body (as [`FrameCodec`] yields it) as a [`Message`]. A `LogEntries` or
/// `Replicate` frame's log batch is a slice of the frame, not a copy: both carry up to
/// thousands of entries, which the gateway passes on and the receiver keeps slices of.
pub fn decode_frame(mut frame: BytesMut) -> Result<Message, CodecError> {
    use crate::message::LogBatch;
    // A log batch is its count, then its bytes as `serde_bytes` writes them: a length, then
    // the bytes.
    let batch_at = |frame: &BytesMut, at: usize, len: u64| {
        usize::try_from(len)
            .ok()
            .and_then(|len| at.checked_add(len))
            .filter(|&end| end <= frame.len())
            .ok_or_else(|| {
                CodecError::Decode(format!(
                    "a log batch of {len} bytes in a frame of {}",
                    frame.len()
                ))
            })
    };
    match peek_variant(&frame) {
        Some(LOG_ENTRIES) => {
            let ((_, count, len), at) = decode_prefix::<(u32, u32, u64)>(&frame)?;
            let end = batch_at(&frame, at, len)?;
            let (last_lsn, head_lsn) = from_bytes::<(u64, u64)>(&frame[end..])?;
            frame.truncate(end);
            let bytes = frame.split_off(at);
            Ok(Message::LogEntries {
                entries: LogBatch::from_parts(count, bytes),
                last_lsn,
                head_lsn,
            })
        }
        Some(REPLICATE) => {
            type Head = (u32, u64, String, u64, u64, u32, u64);
            let ((_, batch, peer, after, cursor, count, len), at) = decode_prefix::<Head>(&frame)?;
            let end = batch_at(&frame, at, len)?;
            if end != frame.len() {
                return Err(CodecError::TrailingBytes {
                    extra: frame.len() - end,
                });
            }
            let bytes = frame.split_off(at);
            Ok(Message::Replicate {
                batch,
                peer,
                after,
                cursor,
                entries: LogBatch::from_parts(count, bytes),
            })
        }
        _ => from_bytes(&frame),
    }
}

/// Length-delimited bincode frames carrying [`Message`]s.
/// The records of one frame (the events of an `Events` message, the alert states of a
/// `Merge`, the events of a log batch), each a range of the frame: one reference to the frame
/// for all of them. A `Bytes` per record cost an atomic increment of the frame's shared count
/// on the decoding thread and a decrement on the commit thread for every event.
#[derive(Clone, Debug, Default)]
pub struct RecordBytes {
    frame: Bytes,
    spans: Vec<(usize, usize)>,
}

impl RecordBytes {
    pub(crate) fn new(frame: Bytes, records: usize) -> RecordBytes {
        RecordBytes {
            frame,
            spans: Vec::with_capacity(records),
        }
    }

    /// Records `frame[start..end]`, which the decoder has just read.
    pub(crate) fn push(&mut self, start: usize, end: usize) {
        self.spans.push((start, end));
    }

    pub fn len(&self) -> usize {
        self.spans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// Each record's bytes, in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = &[u8]> {
        self.spans
            .iter()
            .map(|&(start, end)| self.frame.get(start..end).unwrap_or_default())
    }

    /// Each record as its own `Bytes`, for records kept past the message (a merged row's
    /// state, written at a later checkpoint).
    pub fn into_bytes(self) -> impl ExactSizeIterator<Item = Bytes> {
        let RecordBytes { frame, spans } = self;
        spans
            .into_iter()
            .map(move |(start, end)| frame.slice(start..end))
    }
}

#[derive(Debug)]
pub struct MessageCodec {
    frames: LengthDelimitedCodec,
    max_frame: usize,
    /// Keep the encodings of the events of each `Events` message decoded (a store logs them
    /// as they came instead of encoding them again), and of the alert states of each `Merge`
    /// (a store writes a state it takes unchanged as it came).
    keep_record_bytes: bool,
    record_bytes: RecordBytes,
}

impl MessageCodec {
    /// A codec that refuses frames over `max_frame` bytes (at most [`MAX_FRAME_LIMIT`]), in
    /// both directions.
    pub fn new(max_frame: usize) -> Self {
        let max_frame = max_frame.min(MAX_FRAME_LIMIT);
        MessageCodec {
            frames: LengthDelimitedCodec::builder()
                .length_field_length(LENGTH_FIELD)
                .max_frame_length(max_frame)
                .new_codec(),
            max_frame,
            keep_record_bytes: false,
            record_bytes: RecordBytes::default(),
        }
    }

    /// This codec, also keeping the encoding of every event of each `Events` message and of
    /// every alert state of each `Merge` it decodes, for [`MessageCodec::take_record_bytes`].
    pub fn keeping_record_bytes(mut self) -> Self {
        self.keep_record_bytes = true;
        self
    }

    /// The encodings of the events (or, for a `Merge`, the alert states) of the message decoded
    /// last, in order (empty unless the codec keeps them). Take them before decoding the next
    /// frame.
    pub fn take_record_bytes(&mut self) -> RecordBytes {
        std::mem::take(&mut self.record_bytes)
    }

    pub fn max_frame(&self) -> usize {
        self.max_frame
    }
}

impl Default for MessageCodec {
    fn default() -> Self {
        MessageCodec::new(DEFAULT_MAX_FRAME)
    }
}

/// Recovers the batch id of an `Events`, `Replicate` or `Merge` frame whose body does not decode, so
/// the refusal can name the batch and the sender can stop waiting for it.
// Variant indices of Message::Events, Replicate and Merge; each starts with `batch`.
const EVENTS: u32 = 3;
const LOG_ENTRIES: u32 = 10;
const REPLICATE: u32 = 12;
const MERGE: u32 = 18;

fn peek_variant(frame: &[u8]) -> Option<u32> {
    bincode::serde::decode_from_slice::<u32, _>(frame, config())
        .ok()
        .map(|(variant, _)| variant)
}

pub fn peek_batch(frame: &[u8]) -> Option<u64> {
    let ((variant, batch), _) =
        bincode::serde::decode_from_slice::<(u32, u64), _>(frame, config()).ok()?;
    matches!(variant, EVENTS | REPLICATE | MERGE).then_some(batch)
}

/// A frame that arrived whole but could not be used.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct BadFrame {
    pub error: CodecError,
    /// The batch id, when the frame was an `Events`, `Replicate` or `Merge` message.
    pub batch: Option<u64>,
}

/// Decodes a frame keeping each record's encoding ([`decode_events`], [`decode_merge`]).
type KeepingDecoder = fn(Bytes) -> Result<(Message, RecordBytes), CodecError>;

/// A frame decoded as a [`Message`], or why it is not one (with its batch id, if it names one).
fn decode_message(frame: &[u8]) -> Result<Message, BadFrame> {
    from_bytes(frame).map_err(|error| BadFrame {
        error,
        batch: peek_batch(frame),
    })
}

impl Decoder for MessageCodec {
    type Item = Result<Message, BadFrame>;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, CodecError> {
        let announced = (src.len() >= LENGTH_FIELD)
            .then(|| u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize);
        match self.frames.decode(src) {
            Ok(Some(frame)) => {
                let decode: KeepingDecoder = match peek_variant(&frame) {
                    Some(LOG_ENTRIES | REPLICATE) => {
                        let batch = peek_batch(&frame);
                        return Ok(Some(
                            decode_frame(frame).map_err(|error| BadFrame { error, batch }),
                        ));
                    }
                    Some(EVENTS) if self.keep_record_bytes => decode_events,
                    Some(MERGE) if self.keep_record_bytes => decode_merge,
                    _ => return Ok(Some(decode_message(&frame))),
                };
                let frame = frame.freeze();
                let batch = peek_batch(&frame);
                Ok(Some(match decode(frame) {
                    Ok((message, encoded)) => {
                        self.record_bytes = encoded;
                        Ok(message)
                    }
                    Err(error) => Err(BadFrame { error, batch }),
                }))
            }
            Ok(None) => Ok(None),
            Err(e)
                if e.get_ref().is_some_and(|inner| {
                    inner.is::<tokio_util::codec::LengthDelimitedCodecError>()
                }) =>
            {
                Err(CodecError::FrameTooLarge {
                    len: announced.unwrap_or(0),
                    max: self.max_frame,
                })
            }
            Err(e) => Err(CodecError::Io(e)),
        }
    }
}

impl Encoder<&Message> for MessageCodec {
    type Error = CodecError;

    fn encode(&mut self, item: &Message, dst: &mut BytesMut) -> Result<(), CodecError> {
        let start = start_frame(dst, item)?;
        self.finish_frame(dst, start)
    }
}

/// Starts a frame after whatever `dst` holds: a length field to fill in later
/// ([`MessageCodec::finish_frame`]), then `head` encoded. Returns where the frame starts; on
/// an error `dst` is as it was.
fn start_frame<T: Serialize>(dst: &mut BytesMut, head: T) -> Result<usize, CodecError> {
    let start = dst.len();
    dst.put_u32(0);
    if let Err(e) = bincode::serde::encode_into_writer(head, BufWriter(dst), config()) {
        dst.truncate(start);
        return Err(CodecError::Encode(e.to_string()));
    }
    Ok(start)
}

impl MessageCodec {
    /// Fills in the length field of the frame written at `start`, or takes the frame back out
    /// of `dst` if it is over the limit.
    fn finish_frame(&self, dst: &mut BytesMut, start: usize) -> Result<(), CodecError> {
        let len = dst.len() - start - LENGTH_FIELD;
        if len > self.max_frame {
            dst.truncate(start);
            return Err(CodecError::FrameTooLarge {
                len,
                max: self.max_frame,
            });
        }
        // len <= max_frame, and max_frame fits the length field or the codec refuses it above.
        let field = u32::try_from(len).map_err(|_| CodecError::FrameTooLarge {
            len,
            max: u32::MAX as usize,
        })?;
        dst[start..start + LENGTH_FIELD].copy_from_slice(&field.to_be_bytes());
        Ok(())
    }
}

impl Encoder<Message> for MessageCodec {
    type Error = CodecError;

    fn encode(&mut self, item: Message, dst: &mut BytesMut) -> Result<(), CodecError> {
        self.encode(&item, dst)
    }
}

/// Frames without decoding them: for a proxy, which passes event batches on as bytes.
///
/// Decodes to whole frame bodies (the same framing and limit as [`MessageCodec`]); encodes
/// messages and raw frames like it.
#[derive(Debug, Default)]
pub struct FrameCodec {
    messages: MessageCodec,
}

impl FrameCodec {
    pub fn new(max_frame: usize) -> Self {
        FrameCodec {
            messages: MessageCodec::new(max_frame),
        }
    }

    pub fn max_frame(&self) -> usize {
        self.messages.max_frame
    }
}

impl Decoder for FrameCodec {
    type Item = BytesMut;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, CodecError> {
        let announced = (src.len() >= LENGTH_FIELD)
            .then(|| u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize);
        let max = self.messages.max_frame;
        self.messages.frames.decode(src).map_err(|e| {
            if e.get_ref()
                .is_some_and(|inner| inner.is::<tokio_util::codec::LengthDelimitedCodecError>())
            {
                CodecError::FrameTooLarge {
                    len: announced.unwrap_or(0),
                    max,
                }
            } else {
                CodecError::Io(e)
            }
        })
    }
}

impl Encoder<&Message> for FrameCodec {
    type Error = CodecError;

    fn encode(&mut self, item: &Message, dst: &mut BytesMut) -> Result<(), CodecError> {
        self.messages.encode(item, dst)
    }
}

impl Encoder<Message> for FrameCodec {
    type Error = CodecError;

    fn encode(&mut self, item: Message, dst: &mut BytesMut) -> Result<(), CodecError> {
        self.messages.encode(&item, dst)
    }
}

/// The head of an `Events` frame: what a proxy needs to route it without decoding the events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventsHead {
    pub batch: u64,
    /// How many events the batch says it has (checked by the store when it decodes them).
    pub events: u64,
    /// Where the batch id ends in the frame.
    head_len: usize,
}

const EVENTS_VARIANT: u32 = 3;

/// Reads the head of an `Events` frame; `None` for any other message.
pub fn events_head(frame: &[u8]) -> Option<EventsHead> {
    let ((variant, batch), head_len) =
        bincode::serde::decode_from_slice::<(u32, u64), _>(frame, config()).ok()?;
    if variant != EVENTS_VARIANT {
        return None;
    }
    let ((_, _, events), _) =
        bincode::serde::decode_from_slice::<(u32, u64, u64), _>(frame, config()).ok()?;
    Some(EventsHead {
        batch,
        events,
        head_len,
    })
}

/// An `Events` frame (as [`Message::Events`] encodes) from its parts, written straight into
/// the connection's write buffer: a batch is never laid out in a buffer of its own only to be
/// copied again (that copy was a tenth of a probe's CPU).
#[derive(Clone, Debug)]
pub enum EventsFrame {
    /// A probe's batch: its id and its events' encodings, in order. Sent without decoding or
    /// encoding any event again.
    Encoded { batch: u64, events: Vec<Bytes> },
    /// A batch passed on under another id (a proxy's): the frame as it came and its head.
    Renumbered {
        batch: u64,
        frame: Bytes,
        head: EventsHead,
    },
}

impl EventsFrame {
    /// A `Renumbered` frame's length field and new head, and the rest of the frame as it came,
    /// for a vectored write: a proxy then passes a batch on without copying it (that copy was a
    /// quarter of a proxy's CPU). `None` for an `Encoded` frame, whose events lie apart.
    pub fn split(&self, max_frame: usize) -> Option<Result<(BytesMut, &[u8]), CodecError>> {
        match self {
            EventsFrame::Renumbered { batch, frame, head } => {
                Some(renumbered(*batch, frame, head, max_frame))
            }
            EventsFrame::Encoded { .. } => None,
        }
    }
}

/// See [`EventsFrame::split`].
fn renumbered<'a>(
    batch: u64,
    frame: &'a Bytes,
    head: &EventsHead,
    max_frame: usize,
) -> Result<(BytesMut, &'a [u8]), CodecError> {
    let rest = frame.get(head.head_len..).unwrap_or_default();
    // The variant and the batch id: at most 5 + 10 bytes.
    let mut out = BytesMut::with_capacity(LENGTH_FIELD + 15);
    start_frame(&mut out, (EVENTS_VARIANT, batch))?;
    let len = out.len() - LENGTH_FIELD + rest.len();
    out[..LENGTH_FIELD].copy_from_slice(&length_field(len, max_frame)?);
    Ok((out, rest))
}

impl Encoder<EventsFrame> for MessageCodec {
    type Error = CodecError;

    fn encode(&mut self, item: EventsFrame, dst: &mut BytesMut) -> Result<(), CodecError> {
        let (batch, events) = match &item {
            EventsFrame::Renumbered { batch, frame, head } => {
                put_split(renumbered(*batch, frame, head, self.max_frame)?, dst);
                return Ok(());
            }
            EventsFrame::Encoded { batch, events } => (*batch, events),
        };
        // The head is a few varints: at most 4 + 10 + 10 bytes.
        dst.reserve(LENGTH_FIELD + 24 + events.iter().map(Bytes::len).sum::<usize>());
        let start = start_frame(dst, (EVENTS_VARIANT, batch, events.len() as u64))?;
        for event in events {
            dst.extend_from_slice(event);
        }
        self.finish_frame(dst, start)
    }
}

/// A `LogEntries` frame (as [`Message::LogEntries`] encodes it) written in place at the end of a
/// connection's write buffer, entry by entry or block by block as a store reads its log: a
/// page of the log is never laid out in a batch of its own only to be copied into the frame
/// (that copy was over a tenth of a primary's CPU while it served the gateway).
///
/// A page is bounded twice: as sent, by the frame limit, and as the receiver holds it once its
/// packed segments are unpacked, by the same limit, so that a receiver never holds more for a
/// page than a frame (it refuses a batch that unpacks to more than [`MAX_FRAME_LIMIT`]).
///
/// The frame's head (length, variant, entry count, byte count) is known only once the last
/// entry is in, so room for the longest head is left before the entries and the head is
/// written at its end. Dropped before [`LogEntriesFrame::finish`], the frame takes itself back
/// out of the buffer.
pub struct LogEntriesFrame<'a> {
    frame: InPlace<'a>,
    count: u32,
    /// The entries' bytes once the receiver has unpacked the packed segments.
    unpacked: usize,
}

/// The longest head of a `LogEntries` frame: the length field, then varints for the variant,
/// the entry count (a `u32`) and the entries' byte count (a `u64`).
const LOG_ENTRIES_HEAD_ROOM: usize = LENGTH_FIELD + 5 + 5 + 9;

/// The longest tail of a `LogEntries` frame: varints for its last LSN and the head.
const LOG_ENTRIES_TAIL_ROOM: usize = 20;

impl<'a> LogEntriesFrame<'a> {
    /// Starts a frame after whatever `dst` holds.
    pub fn begin(dst: &'a mut BytesMut) -> Self {
        LogEntriesFrame {
            frame: InPlace::begin(dst, LOG_ENTRIES_HEAD_ROOM),
            count: 0,
            unpacked: 0,
        }
    }

    /// Appends one entry's encoding, as stored (see [`crate::message::LogBatch::push_encoded`]).
    pub fn push_encoded(&mut self, entry: &[u8]) {
        crate::message::append_entry(self.frame.dst, entry);
        self.count += 1;
        self.unpacked += crate::message::ENTRY_LEN_PREFIX + entry.len();
    }

    /// Appends `count` entries as one packed segment (see
    /// [`crate::message::LogBatch::push_packed`]), if the page has room for it both as sent
    /// and unpacked. Returns whether it did.
    pub fn push_packed(
        &mut self,
        count: u32,
        unpacked: usize,
        lz4: &[u8],
        max_frame: usize,
    ) -> bool {
        let sent = crate::message::PACKED_SEGMENT_HEAD + lz4.len();
        let Ok(unpacked_field) = u32::try_from(unpacked) else {
            return false;
        };
        if !self.fits(sent, unpacked, max_frame) {
            return false;
        }
        crate::message::append_packed(self.frame.dst, unpacked_field, lz4);
        self.count += count;
        self.unpacked += unpacked;
        true
    }

    /// Whether `sent` more bytes keep the frame within `max_frame` bytes, and `unpacked` more
    /// keep the page within it once unpacked, each with [`PAGE_HEAD_ROOM`] to spare.
    fn fits(&self, sent: usize, unpacked: usize, max_frame: usize) -> bool {
        let held = LOG_ENTRIES_HEAD_ROOM
            + LOG_ENTRIES_TAIL_ROOM
            + PAGE_HEAD_ROOM
            + self.unpacked.saturating_add(unpacked);
        self.frame
            .would_fit(sent + LOG_ENTRIES_TAIL_ROOM, max_frame)
            && held <= max_frame.min(MAX_FRAME_LIMIT)
    }

    /// Entries appended so far.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// Whether an entry of `len` bytes still fits a frame of at most `max_frame` bytes, as sent
    /// and unpacked, with [`PAGE_HEAD_ROOM`] to spare. A first entry always does: a page holds
    /// at least one.
    pub fn has_room(&self, len: usize, max_frame: usize) -> bool {
        let stored = crate::message::ENTRY_LEN_PREFIX + len;
        self.count == 0 || self.fits(stored + 10, stored, max_frame)
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Completes the frame with its cursor; if it is over `max_frame` bytes it is taken back
    /// out of the buffer and the error says so.
    pub fn finish(self, max_frame: usize, last_lsn: u64, head_lsn: u64) -> Result<(), CodecError> {
        let entries = self.frame.body_len();
        let mut tail = [0u8; 20];
        let tail_len = encode_into(&(last_lsn, head_lsn), &mut tail)?;
        let mut head = [0u8; LOG_ENTRIES_HEAD_ROOM];
        let head_len = LENGTH_FIELD
            + encode_into(
                &(LOG_ENTRIES, self.count, entries as u64),
                &mut head[LENGTH_FIELD..],
            )?;
        let len = head_len - LENGTH_FIELD + entries + tail_len;
        // Over the limit: dropping the frame takes it back out.
        head[..LENGTH_FIELD].copy_from_slice(&length_field(len, max_frame)?);
        self.frame.dst.extend_from_slice(&tail[..tail_len]);
        self.frame.finish(&head[..head_len]);
        Ok(())
    }
}

/// A frame written in place at the end of a buffer from `start`, with `room` bytes left before
/// its body for a head known only once the body is in. Dropped before [`InPlace::finish`], it
/// takes itself back out of the buffer.
struct InPlace<'a> {
    dst: &'a mut BytesMut,
    start: usize,
    room: usize,
}

impl<'a> InPlace<'a> {
    fn begin(dst: &'a mut BytesMut, room: usize) -> Self {
        let start = dst.len();
        dst.put_bytes(0, room);
        InPlace { dst, start, room }
    }

    /// Bytes written after the room so far.
    fn body_len(&self) -> usize {
        self.dst.len() - self.start - self.room
    }

    /// Whether `more` bytes of body keep the frame, head room included, within `max_frame`
    /// bytes with [`PAGE_HEAD_ROOM`] to spare.
    fn would_fit(&self, more: usize, max_frame: usize) -> bool {
        self.room + self.body_len() + more + PAGE_HEAD_ROOM <= max_frame.min(MAX_FRAME_LIMIT)
    }

    /// Puts `head` (its length field included) right before everything written after the
    /// room. A head larger than the room moves that along.
    fn finish(mut self, head: &[u8]) {
        let body_at = self.start + self.room;
        if let Some(gap) = self.room.checked_sub(head.len()) {
            self.dst[self.start + gap..body_at].copy_from_slice(head);
            if self.start == 0 {
                // The usual case, a buffer the last frame left empty: the unused room is
                // stepped over, not copied into.
                bytes::Buf::advance(self.dst, gap);
            } else {
                let end = self.dst.len();
                self.dst.copy_within(self.start + gap..end, self.start);
                self.dst.truncate(end - gap);
            }
        } else {
            let more = head.len() - self.room;
            let end = self.dst.len();
            self.dst.resize(end + more, 0);
            self.dst.copy_within(body_at..end, body_at + more);
            self.dst[self.start..self.start + head.len()].copy_from_slice(head);
        }
        self.start = usize::MAX;
    }
}

impl Drop for InPlace<'_> {
    fn drop(&mut self) {
        if self.start != usize::MAX {
            self.dst.truncate(self.start);
        }
    }
}

/// The length field of a frame whose body is `len` bytes, or the error if that is over
/// `max_frame` (itself at most [`MAX_FRAME_LIMIT`], so that the length fits the field).
fn length_field(len: usize, max_frame: usize) -> Result<[u8; LENGTH_FIELD], CodecError> {
    let max = max_frame.min(MAX_FRAME_LIMIT);
    if len > max {
        return Err(CodecError::FrameTooLarge { len, max });
    }
    Ok((len as u32).to_be_bytes())
}

/// Encodes `value` at the start of `out`, returning the bytes written.
fn encode_into<T: Serialize>(value: &T, out: &mut [u8]) -> Result<usize, CodecError> {
    bincode::serde::encode_into_slice(value, out, config())
        .map_err(|e| CodecError::Encode(e.to_string()))
}

const SNAPSHOT_CHUNK: u32 = 17;
const PONG: u32 = 7;

/// Whether `frame` is a `Pong`: for a client that reads answers as frames and skips the Pong
/// of a heartbeat sent earlier.
pub fn is_pong(frame: &[u8]) -> bool {
    peek_variant(frame) == Some(PONG)
}

/// The value at the start of `bytes` and the rest after it: to step over a record's leading
/// field (a row's serial) without decoding what follows.
pub fn split_prefix<T: DeserializeOwned>(bytes: &[u8]) -> Result<(T, &[u8]), CodecError> {
    let (value, used) = decode_prefix::<T>(bytes)?;
    Ok((value, bytes.get(used..).unwrap_or_default()))
}

/// Reads where a `SnapshotChunk` frame's page stands; `None` for any other message.
pub fn snapshot_head(frame: &[u8]) -> Option<SnapshotHead> {
    let (variant, rest) = split_prefix::<u32>(frame).ok()?;
    if variant != SNAPSHOT_CHUNK {
        return None;
    }
    from_prefix::<SnapshotHead>(rest).ok()
}

/// The `Merge` frame that hands the page in a `SnapshotChunk` frame to a receiver: the page's
/// bytes are neither decoded and encoded again nor copied into a frame of their own (that copy
/// and the one into the connection's buffer were 6 % of a full resync's CPU). A gateway writes
/// the head and the page to the socket together ([`MergeFrame::split`]).
#[derive(Clone, Copy, Debug)]
pub struct MergeFrame<'a> {
    pub batch: u64,
    /// The store the page comes from.
    pub peer: &'a str,
    /// The `SnapshotChunk` frame's body, as it came.
    pub snapshot_frame: &'a [u8],
}

impl<'a> MergeFrame<'a> {
    /// The frame's length field and head, and the page that follows them: written to a socket
    /// from where the page lies (a vectored write), the page is not copied into a buffer at
    /// all. Refuses a frame that is not a `SnapshotChunk` or would be over `max_frame` bytes.
    pub fn split(&self, max_frame: usize) -> Result<(BytesMut, &'a [u8]), CodecError> {
        let (variant, page) = split_prefix::<u32>(self.snapshot_frame)?;
        if variant != SNAPSHOT_CHUNK {
            return Err(CodecError::Decode(format!(
                "a Merge wraps a SnapshotChunk frame, not message variant {variant}"
            )));
        }
        // The head is the variant, the batch and the name: at most 5 + 10 + 10 bytes and the
        // name's.
        let mut head = BytesMut::with_capacity(LENGTH_FIELD + 25 + self.peer.len());
        start_frame(&mut head, (MERGE, self.batch, self.peer))?;
        let len = head.len() - LENGTH_FIELD + page.len();
        head[..LENGTH_FIELD].copy_from_slice(&length_field(len, max_frame)?);
        Ok((head, page))
    }
}

impl Encoder<MergeFrame<'_>> for MessageCodec {
    type Error = CodecError;

    fn encode(&mut self, item: MergeFrame<'_>, dst: &mut BytesMut) -> Result<(), CodecError> {
        put_split(item.split(self.max_frame)?, dst);
        Ok(())
    }
}

/// Appends a frame split into its head and page (where a socket is not written to directly).
fn put_split((head, page): (BytesMut, &[u8]), dst: &mut BytesMut) {
    dst.reserve(head.len() + page.len());
    dst.extend_from_slice(&head);
    dst.extend_from_slice(page);
}

/// The `Replicate` frame that hands a `LogEntries` page on to the receiver: as with
/// [`MergeFrame`], a gateway writes its head and the page to the socket together, the page from
/// where it lies in the frame it came in (copying it into the write buffer was a tenth of a
/// gateway's CPU while replicating).
#[derive(Clone, Copy, Debug)]
pub struct ReplicateFrame<'a> {
    pub batch: u64,
    /// The store the entries come from.
    pub peer: &'a str,
    /// The cursor the entries follow on from, and the one they bring the receiver to.
    pub after: u64,
    pub cursor: u64,
    pub entries: &'a crate::message::LogBatch,
}

impl<'a> ReplicateFrame<'a> {
    /// The frame's length field and head, and the page that follows them; the same bytes as
    /// the typed `Message::Replicate`. Refuses a frame over `max_frame` bytes.
    pub fn split(&self, max_frame: usize) -> Result<(BytesMut, &'a [u8]), CodecError> {
        let page = self.entries.stored();
        let count = u32::try_from(self.entries.len()).unwrap_or(u32::MAX);
        // The variant, four numbers, the name, the count and the page's length.
        let mut head = BytesMut::with_capacity(LENGTH_FIELD + 5 + 50 + self.peer.len());
        let fields = (REPLICATE, self.batch, self.peer, self.after, self.cursor);
        start_frame(&mut head, (fields, count, page.len() as u64))?;
        let len = head.len() - LENGTH_FIELD + page.len();
        head[..LENGTH_FIELD].copy_from_slice(&length_field(len, max_frame)?);
        Ok((head, page))
    }
}

impl Encoder<ReplicateFrame<'_>> for MessageCodec {
    type Error = CodecError;

    fn encode(&mut self, item: ReplicateFrame<'_>, dst: &mut BytesMut) -> Result<(), CodecError> {
        put_split(item.split(self.max_frame)?, dst);
        Ok(())
    }
}

/// A `SnapshotChunk` frame built from alert states that are already encoded (as a store keeps
/// them on disk), written in place at the end of a connection's write buffer: the same bytes as
/// encoding the typed message, without decoding a state, and without laying the page out in a
/// buffer of its own first (that buffer, copied into the frame and then into the connection's
/// buffer, was 3 % of a full resync's CPU, on the sender that the gateway waits for).
///
/// The frame's head (the page's position, the applied sets, its clears and the alert count)
/// comes before the alerts but is known only once the last alert is in, so room is left for it
/// and the head is written at the end of that room; a head larger than the room (a page of
/// many clears) moves the alerts along instead. Dropped before [`SnapshotPageWriter::finish`],
/// the frame takes itself back out of the buffer.
pub struct SnapshotPageWriter<'a> {
    frame: InPlace<'a>,
    count: u64,
}

/// Room left for a page's head besides its applied sets: the length field, the variant, the
/// head's numbers and keys, a few clears and the count.
const SNAPSHOT_HEAD_ROOM: usize = 1024;

impl<'a> SnapshotPageWriter<'a> {
    /// Starts a frame after whatever `dst` holds, for a snapshot whose applied sets are
    /// `applied` (each page repeats them).
    pub fn begin(dst: &'a mut BytesMut, applied: &[AppliedRanges]) -> Self {
        // Each range is two varints of at most 10 bytes; each origin a name and an epoch.
        let room = SNAPSHOT_HEAD_ROOM
            + applied
                .iter()
                .map(|set| 20 + set.origin.name().len() + 20 * set.ranges.ranges().len())
                .sum::<usize>();
        SnapshotPageWriter {
            frame: InPlace::begin(dst, room),
            count: 0,
        }
    }

    /// Adds an alert: its identifier and its `AlertState` as encoded by [`to_bytes`].
    pub fn push_alert(&mut self, identifier: &str, state: &[u8]) -> Result<(), CodecError> {
        bincode::serde::encode_into_writer(identifier, BufWriter(self.frame.dst), config())
            .map_err(|e| CodecError::Encode(e.to_string()))?;
        self.frame.dst.extend_from_slice(state);
        self.count += 1;
        Ok(())
    }

    /// Alerts added so far.
    pub fn alerts(&self) -> u64 {
        self.count
    }

    /// Whether an alert of `len` bytes (identifier and state) still fits a frame of at most
    /// `max_frame` bytes, with `head` bytes of the page's head beyond the room left for it
    /// (its clears) and [`PAGE_HEAD_ROOM`] to spare. A first alert always does.
    pub fn has_room(&self, len: usize, head: usize, max_frame: usize) -> bool {
        self.count == 0 || self.frame.would_fit(len + 10 + head, max_frame)
    }

    /// Completes the frame; if it is over `max_frame` bytes it is taken back out of the buffer
    /// and the error says so.
    pub fn finish(
        self,
        max_frame: usize,
        head: &SnapshotHead,
        applied: &[AppliedRanges],
        clears: &[(String, Version)],
    ) -> Result<(), CodecError> {
        let mut prefix = Vec::with_capacity(self.frame.room);
        prefix.extend_from_slice(&[0; LENGTH_FIELD]);
        append_bytes(
            &(SNAPSHOT_CHUNK, head, applied, clears, self.count),
            &mut prefix,
        )?;
        let len = prefix.len() - LENGTH_FIELD + self.frame.body_len();
        // Over the limit: dropping the frame takes it back out.
        prefix[..LENGTH_FIELD].copy_from_slice(&length_field(len, max_frame)?);
        self.frame.finish(&prefix);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::message::{ClientKind, Hello, PROTOCOL_VERSION};

    fn encode(msg: &Message) -> BytesMut {
        let mut buf = BytesMut::new();
        MessageCodec::default().encode(msg, &mut buf).unwrap();
        buf
    }

    /// `bytes` with each edit made in turn: a byte replaced (0), inserted (1) or removed.
    fn damaged(mut bytes: Vec<u8>, edits: &[(prop::sample::Index, u8, u8)]) -> Vec<u8> {
        for &(at, byte, op) in edits {
            if bytes.is_empty() {
                bytes.push(byte);
                continue;
            }
            let i = at.index(bytes.len());
            match op {
                0 => bytes[i] = byte,
                1 => bytes.insert(i, byte),
                _ => {
                    bytes.remove(i);
                }
            }
        }
        bytes
    }

    fn decode_all(
        codec: &mut MessageCodec,
        buf: &mut BytesMut,
    ) -> Result<Vec<Message>, CodecError> {
        let mut out = Vec::new();
        while let Some(item) = codec.decode(buf)? {
            out.push(item.map_err(|bad| bad.error)?);
        }
        Ok(out)
    }

    fn hello() -> Message {
        Message::Hello(Hello {
            version: PROTOCOL_VERSION,
            kind: ClientKind::Probe,
            name: "syslog-1".into(),
        })
    }

    #[test]
    fn a_frame_arriving_byte_by_byte_decodes_once_complete() {
        let frame = encode(&hello());
        let mut codec = MessageCodec::default();
        let mut buf = BytesMut::new();
        for (i, byte) in frame.iter().enumerate() {
            buf.put_u8(*byte);
            let got = codec.decode(&mut buf).unwrap();
            assert_eq!(got.is_some(), i + 1 == frame.len());
        }
    }

    #[test]
    fn an_oversized_announced_frame_is_refused_before_buffering() {
        let mut codec = MessageCodec::new(1024);
        let mut buf = BytesMut::new();
        buf.put_u32(1_000_000);
        buf.put_slice(&[0; 16]);
        match codec.decode(&mut buf) {
            Err(CodecError::FrameTooLarge { len, max }) => {
                assert_eq!((len, max), (1_000_000, 1024))
            }
            other => panic!("expected FrameTooLarge, got {other:?}"),
        }
    }

    #[test]
    fn an_oversized_message_is_not_sent() {
        let big = Message::Error {
            message: "x".repeat(2000),
        };
        let mut buf = BytesMut::from(&b"kept"[..]);
        let err = MessageCodec::new(1024).encode(&big, &mut buf).unwrap_err();
        assert!(
            matches!(err, CodecError::FrameTooLarge { max: 1024, .. }),
            "{err}"
        );
        assert_eq!(
            &buf[..],
            b"kept",
            "a refused message leaves the buffer as it was"
        );
    }

    #[test]
    fn trailing_bytes_in_a_frame_are_an_error() {
        let mut frame = encode(&Message::Ping { nonce: 7 });
        frame.put_u8(0);
        let len = (frame.len() - LENGTH_FIELD) as u32;
        frame[..4].copy_from_slice(&len.to_be_bytes());
        let bad = MessageCodec::default()
            .decode(&mut frame)
            .unwrap()
            .unwrap()
            .unwrap_err();
        assert!(
            matches!(bad.error, CodecError::TrailingBytes { extra: 1 }),
            "{bad}"
        );
        assert!(
            frame.is_empty(),
            "the bad frame is consumed, the stream stays in step"
        );
    }

    #[test]
    fn an_out_of_range_severity_does_not_decode() {
        let fields = crate::alert::AlertFields {
            identifier: "x".into(),
            severity: crate::alert::Severity::CRITICAL,
            ..Default::default()
        };
        let msg = Message::Events {
            batch: 1,
            events: vec![crate::event::Event {
                origin: crate::event::Origin::new("p", 1),
                seq: 1,
                time: 0,
                body: crate::event::EventBody::Occurrence(fields.pack()),
            }],
        };
        let mut frame = encode(&msg);
        // The severity byte of this message is the only 5 in it; make it 9.
        let pos = frame.iter().rposition(|&b| b == 5).unwrap();
        frame[pos] = 9;
        frame.extend_from_slice(&encode(&Message::Ping { nonce: 3 }));
        let mut codec = MessageCodec::default();
        let bad = codec.decode(&mut frame).unwrap().unwrap().unwrap_err();
        assert!(
            bad.to_string().contains("severity 9 is out of range"),
            "{bad}"
        );
        assert_eq!(bad.batch, Some(1), "the refusal can name the batch");
        let next = codec.decode(&mut frame).unwrap().unwrap().unwrap();
        assert_eq!(
            next,
            Message::Ping { nonce: 3 },
            "the next frame still decodes"
        );
    }

    #[test]
    fn only_a_snapshot_page_can_become_a_merge_and_a_pong_is_recognised() {
        let pong = to_bytes(&Message::Pong { nonce: 9 }).unwrap();
        assert!(is_pong(&pong));
        assert!(!is_pong(&to_bytes(&Message::Ping { nonce: 9 }).unwrap()));
        assert_eq!(snapshot_head(&pong), None);
        let mut out = BytesMut::from(&b"before"[..]);
        let err = MessageCodec::default()
            .encode(
                MergeFrame {
                    batch: 1,
                    peer: "AGG_P",
                    snapshot_frame: &pong,
                },
                &mut out,
            )
            .unwrap_err();
        assert!(err.to_string().contains("SnapshotChunk"), "{err}");
        assert_eq!(&out[..], b"before");
    }

    /// The body of the one frame `item` encodes to, its length field checked.
    fn body_of(item: EventsFrame) -> Vec<u8> {
        let mut out = BytesMut::from(&b"before"[..]);
        MessageCodec::default().encode(item, &mut out).unwrap();
        assert_eq!(
            &out[..6],
            b"before",
            "the frame goes after what the buffer held"
        );
        let len = u32::from_be_bytes(out[6..10].try_into().unwrap()) as usize;
        assert_eq!(len, out.len() - 10);
        out[10..].to_vec()
    }

    #[test]
    fn an_events_frame_over_the_maximum_is_refused_and_leaves_the_buffer_as_it_was() {
        let events = vec![Bytes::from(vec![0u8; 600]), Bytes::from(vec![0u8; 600])];
        let mut out = BytesMut::from(&b"before"[..]);
        let err = MessageCodec::new(1_000)
            .encode(EventsFrame::Encoded { batch: 1, events }, &mut out)
            .unwrap_err();
        assert!(
            matches!(err, CodecError::FrameTooLarge { max: 1_000, .. }),
            "{err}"
        );
        assert_eq!(&out[..], b"before");
    }

    /// `entries` written into a buffer holding `before` by a [`LogEntriesFrame`].
    fn log_frame_of(
        before: &[u8],
        entries: &[Vec<u8>],
        max_frame: usize,
        last_lsn: u64,
        head_lsn: u64,
    ) -> (BytesMut, Result<(), CodecError>) {
        let mut out = BytesMut::from(before);
        let mut frame = LogEntriesFrame::begin(&mut out);
        for entry in entries {
            frame.push_encoded(entry);
        }
        assert_eq!(frame.len(), entries.len());
        let finished = frame.finish(max_frame, last_lsn, head_lsn);
        (out, finished)
    }

    proptest! {
        #[test]
        fn a_log_entries_frame_written_in_place_is_the_message_encoded(
            before in proptest::collection::vec(any::<u8>(), 0..3),
            entries in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..40),
            last_lsn in any::<u64>(),
            head_lsn in any::<u64>(),
        ) {
            let (mut written, finished) =
                log_frame_of(&before, &entries, DEFAULT_MAX_FRAME, last_lsn, head_lsn);
            finished.unwrap();
            let mut batch = crate::message::LogBatch::default();
            for entry in &entries {
                batch.push_encoded(entry);
            }
            let message = Message::LogEntries { entries: batch, last_lsn, head_lsn };
            let mut codec = MessageCodec::default();
            let mut encoded = BytesMut::from(&before[..]);
            codec.encode(&message, &mut encoded).unwrap();
            prop_assert_eq!(&written[..], &encoded[..]);
            let mut frame = written.split_off(before.len());
            let decoded = codec.decode(&mut frame).unwrap().unwrap().unwrap();
            prop_assert_eq!(decoded, message);
            prop_assert!(frame.is_empty());
        }
    }

    #[test]
    fn a_log_entries_frame_with_long_counts_is_the_message_encoded() {
        // Over 250 entries and over 64 KiB: the count and the byte count take longer varints
        // than the property test reaches, so the head's room is used differently.
        let mut entries = vec![vec![1u8; 70_000]];
        entries.extend((0..300u32).map(|i| i.to_le_bytes().to_vec()));
        let (written, finished) = log_frame_of(b"xy", &entries, DEFAULT_MAX_FRAME, 1 << 40, 7);
        finished.unwrap();
        let mut batch = crate::message::LogBatch::default();
        for entry in &entries {
            batch.push_encoded(entry);
        }
        let mut encoded = BytesMut::from(&b"xy"[..]);
        let message = Message::LogEntries {
            entries: batch,
            last_lsn: 1 << 40,
            head_lsn: 7,
        };
        MessageCodec::default()
            .encode(&message, &mut encoded)
            .unwrap();
        assert_eq!(&written[..], &encoded[..]);
    }

    #[test]
    fn a_log_entries_frame_left_unfinished_or_over_the_maximum_leaves_the_buffer_as_it_was() {
        let entries = vec![vec![7u8; 600], vec![8u8; 600]];
        for before in [&b""[..], b"before"] {
            let (out, finished) = log_frame_of(before, &entries, 1_000, 5, 9);
            let err = finished.unwrap_err();
            assert!(
                matches!(err, CodecError::FrameTooLarge { max: 1_000, .. }),
                "{err}"
            );
            assert_eq!(&out[..], before);
            let mut out = BytesMut::from(before);
            let mut frame = LogEntriesFrame::begin(&mut out);
            frame.push_encoded(&entries[0]);
            drop(frame);
            assert_eq!(&out[..], before, "an abandoned frame is taken back out");
        }
    }

    proptest! {
        #[test]
        fn a_log_batch_with_a_packed_segment_decodes_to_the_entries_it_packs(
            entries in proptest::collection::vec(any::<crate::message::LogEntry>(), 1..12),
            a in 0usize..12,
            b in 0usize..12,
        ) {
            // The entries from a to b packed, as a store sends a whole log block; the others
            // entry by entry.
            let (a, b) = (a.min(b).min(entries.len()), a.max(b).min(entries.len()));
            let mut block = crate::message::LogBatch::default();
            for entry in &entries[a..b] {
                block.push(entry).unwrap();
            }
            let lz4 = lz4_flex::block::compress(block.stored());
            let unpacked = block.stored().len();
            let mut batch = crate::message::LogBatch::default();
            let mut out = BytesMut::new();
            let mut frame = LogEntriesFrame::begin(&mut out);
            for (i, entry) in entries.iter().enumerate() {
                if i == a {
                    batch.push_packed((b - a) as u32, unpacked as u32, &lz4);
                    prop_assert!(frame.push_packed((b - a) as u32, unpacked, &lz4, DEFAULT_MAX_FRAME));
                }
                if !(a..b).contains(&i) {
                    batch.push(entry).unwrap();
                    frame.push_encoded(&to_bytes(entry).unwrap());
                }
            }
            prop_assert_eq!(batch.len(), entries.len());
            prop_assert_eq!(batch.decode().unwrap(), entries.clone());
            // Through a page and the gateway's Replicate, as the receiver gets it.
            frame.finish(DEFAULT_MAX_FRAME, 9, 9).unwrap();
            let mut codec = MessageCodec::default();
            let Message::LogEntries { entries: page, .. } = codec.decode(&mut out).unwrap().unwrap().unwrap() else {
                return Err(TestCaseError::fail("not LogEntries"));
            };
            prop_assert_eq!(&page, &batch);
            let mut wire = BytesMut::new();
            let replicate = ReplicateFrame { batch: 1, peer: "AGG_P", after: 0, cursor: 9, entries: &page };
            codec.encode(replicate, &mut wire).unwrap();
            let Message::Replicate { entries: got, .. } = codec.decode(&mut wire).unwrap().unwrap().unwrap() else {
                return Err(TestCaseError::fail("not Replicate"));
            };
            let applied = got.decode_keeping_event_bytes().unwrap();
            let events: Vec<_> = entries.iter().map(|e| e.event.clone()).collect();
            prop_assert_eq!(&applied.events, &events);
            // The segment is found with its entries' places and its data, for the receiver
            // to keep as it came.
            let runs: Vec<_> = applied
                .packed
                .iter()
                .map(|p| (p.entries.clone(), p.unpacked, p.lz4.to_vec()))
                .collect();
            let want = if a < b { vec![(a..b, unpacked, lz4.clone())] } else { vec![] };
            prop_assert_eq!(runs, want);
            prop_assert_eq!(applied.encoded.len(), entries.len());
            prop_assert_eq!(applied.sources.len(), entries.len());
            for ((entry, source), bytes) in entries.iter().zip(applied.sources.iter()).zip(applied.encoded.iter()) {
                prop_assert_eq!(source.0, &*entry.source);
                prop_assert_eq!(source.1, entry.source_serial);
                prop_assert_eq!(from_bytes::<crate::event::Event>(bytes).unwrap(), entry.event.clone());
            }
        }

        /// Whatever a peer sends as a batch's bytes, packed segments or not, decoding answers
        /// (the entries or an error) and never panics.
        #[test]
        fn a_batch_of_any_bytes_with_packed_segments_is_an_error_not_a_panic(
            parts in proptest::collection::vec(
                (any::<bool>(), 0u32..4096, proptest::collection::vec(any::<u8>(), 0..200)),
                0..4,
            ),
            count in 0u32..4,
        ) {
            let mut bytes = Vec::new();
            for (marker, unpacked, data) in &parts {
                if *marker {
                    bytes.extend_from_slice(&u32::MAX.to_le_bytes());
                    bytes.extend_from_slice(&unpacked.to_le_bytes());
                    bytes.extend_from_slice(&(data.len() as u32).to_le_bytes());
                }
                bytes.extend_from_slice(data);
            }
            let batch: crate::message::LogBatch =
                from_bytes(&to_bytes(&(count, serde_bytes::Bytes::new(&bytes))).unwrap()).unwrap();
            let _ = batch.decode();
            let _ = batch.decode_keeping_event_bytes();
        }
    }

    /// Segments that split an entry between them decode as before, but none is reported as
    /// a run of whole entries for the receiver to keep.
    #[test]
    fn segments_that_split_entries_decode_but_are_not_kept() {
        let entry = |seq| crate::message::LogEntry {
            lsn: seq,
            source: "AGG_P".into(),
            source_serial: seq,
            event: crate::event::Event {
                origin: crate::event::Origin::new("p", 1),
                seq,
                time: 0,
                body: crate::event::EventBody::Occurrence(Default::default()),
            },
        };
        let mut stored = crate::message::LogBatch::default();
        stored.push(&entry(1)).unwrap();
        stored.push(&entry(2)).unwrap();
        let bytes = stored.stored();
        let split = bytes.len() / 4;
        let mut batch = crate::message::LogBatch::default();
        for part in [&bytes[..split], &bytes[split..]] {
            let lz4 = lz4_flex::block::compress(part);
            batch.push_packed(1, part.len() as u32, &lz4);
        }
        let applied = batch.decode_keeping_event_bytes().unwrap();
        assert_eq!(applied.events, [entry(1).event, entry(2).event]);
        assert!(applied.packed.is_empty(), "{:?}", applied.packed);
    }

    #[test]
    fn a_packed_segment_is_refused_when_it_unpacks_wrong_or_too_large() {
        let entry = crate::message::LogEntry {
            lsn: 1,
            source: "AGG_P".into(),
            source_serial: 1,
            event: crate::event::Event {
                origin: crate::event::Origin::new("p", 1),
                seq: 1,
                time: 0,
                body: crate::event::EventBody::Occurrence(Default::default()),
            },
        };
        let mut stored = crate::message::LogBatch::default();
        stored.push(&entry).unwrap();
        let lz4 = lz4_flex::block::compress(stored.stored());
        let len = stored.stored().len() as u32;
        let decode = |unpacked: u32, lz4: &[u8]| {
            let mut batch = crate::message::LogBatch::default();
            batch.push_packed(1, unpacked, lz4);
            batch.decode().unwrap_err().to_string()
        };
        // Claims more than its data can unpack to, or than a batch may hold: refused before
        // anything is allocated for it.
        let err = decode(u32::MAX - 1, &lz4);
        assert!(err.contains("more than its"), "{err}");
        let err = decode(65 << 20, &[0u8; 300_000]);
        assert!(err.contains("over the"), "{err}");
        let err = decode(len + 1, &lz4);
        assert!(err.contains("unpacks to"), "{err}");
        let err = decode(len, &lz4[..lz4.len() - 1]);
        assert!(err.contains("does not unpack"), "{err}");
        // A segment cut short.
        let mut batch = crate::message::LogBatch::default();
        batch.push_packed(1, len, &lz4);
        let cut = from_bytes::<crate::message::LogBatch>(
            &to_bytes(&(1u32, serde_bytes::Bytes::new(&batch.stored()[..10]))).unwrap(),
        )
        .unwrap();
        let err = cut.decode().unwrap_err().to_string();
        assert!(err.contains("end inside"), "{err}");
        // And whole, it is the entry.
        assert_eq!(batch.decode().unwrap(), vec![entry]);
    }

    #[test]
    fn a_page_takes_segments_and_entries_only_while_it_fits_both_packed_and_unpacked() {
        let mut out = BytesMut::new();
        let mut frame = LogEntriesFrame::begin(&mut out);
        // Small on the wire, but too large for the receiver to hold unpacked.
        assert!(!frame.push_packed(1, 999_000, &[0u8; 100], 1_000_000));
        assert!(!frame.push_packed(1, 10, &[0u8; 2_000_000], 1_000_000));
        assert!(frame.push_packed(1, 600_000, &[0u8; 100], 1_000_000));
        // The page is small as sent, but it holds 600,000 bytes unpacked: another segment or
        // entry of 400,000 would take it over the limit at the receiver.
        assert!(!frame.push_packed(1, 400_000, &[0u8; 100], 1_000_000));
        assert!(!frame.has_room(400_000, 1_000_000));
        assert!(frame.has_room(300_000, 1_000_000));
        frame.push_encoded(&[7u8; 300_000]);
        assert_eq!(frame.len(), 2);
    }

    #[test]
    fn an_events_frame_claiming_more_events_than_it_holds_is_a_bad_frame() {
        let event = crate::event::Event {
            origin: crate::event::Origin::new("p", 1),
            seq: 1,
            time: 0,
            body: crate::event::EventBody::Occurrence(Default::default()),
        };
        // Variant 3 (Events), batch 8, then a count of 2^64 - 1 in front of one event.
        let mut body = to_bytes(&(3u32, 8u64, u64::MAX)).unwrap();
        body.extend_from_slice(&to_bytes(&event).unwrap());
        for mut codec in [
            MessageCodec::default(),
            MessageCodec::default().keeping_record_bytes(),
        ] {
            let mut frame = BytesMut::new();
            frame.put_u32(body.len() as u32);
            frame.extend_from_slice(&body);
            let bad = codec.decode(&mut frame).unwrap().unwrap().unwrap_err();
            assert_eq!(bad.batch, Some(8), "{bad}");
            assert!(frame.is_empty(), "the bad frame is consumed");
        }
        // A log batch saying 2^32 - 1 entries over three bytes.
        let lying: crate::message::LogBatch =
            from_bytes(&to_bytes(&(u32::MAX, serde_bytes::Bytes::new(&[0, 0, 0]))).unwrap())
                .unwrap();
        assert!(lying.clone().decode_keeping_event_bytes().is_err());
        assert!(lying.decode().is_err());
    }

    /// A replicated entry's source and its event's origin are read as bytes and checked as
    /// UTF-8 only when they differ from the names before them: a name that is not UTF-8 is
    /// still an error, after a valid one as well as first, and one equal to a name decoded
    /// before is that name's shared copy.
    #[test]
    fn names_read_as_bytes_are_still_checked_as_utf8() {
        use crate::message::{LogBatch, LogEntry};
        let entry = |origin: &str| LogEntry {
            lsn: 1,
            source: "AGG_P".into(),
            source_serial: 1,
            event: crate::Event {
                origin: crate::Origin::new(origin, 7),
                seq: 1,
                time: 1,
                body: crate::EventBody::Expire {
                    identifier: "x".into(),
                },
            },
        };
        let encoded = to_bytes(&entry("probe-1")).unwrap();
        let spoil = |from: &[u8], to: &[u8]| {
            let at = encoded.windows(from.len()).position(|w| w == from).unwrap();
            let mut bad = encoded.clone();
            bad[at..at + to.len()].copy_from_slice(to);
            bad
        };
        let batch = |records: &[&[u8]]| {
            let mut batch = LogBatch::default();
            for record in records {
                batch.push_encoded(record);
            }
            batch
        };
        let good = batch(&[&encoded, &encoded])
            .decode_keeping_event_bytes()
            .unwrap();
        assert!(good.events[0].origin.is_same(&good.events[1].origin));
        assert_eq!(
            good.sources.iter().collect::<Vec<_>>(),
            [("AGG_P", 1), ("AGG_P", 1)]
        );
        for bad in [
            spoil(b"AGG_P", b"AG\xffP"),
            spoil(b"probe-1", b"probe\xc3("),
        ] {
            for records in [vec![&bad[..]], vec![&encoded[..], &bad[..]]] {
                let err = batch(&records).decode_keeping_event_bytes().unwrap_err();
                let err = err.to_string();
                assert!(err.contains("UTF-8") || err.contains("Utf8"), "{err}");
            }
        }
    }

    proptest! {
        #[test]
        fn an_events_frame_keeps_its_events_under_a_new_batch_id(
            msg in any::<Message>(),
            new_batch in any::<u64>(),
        ) {
            let frame = to_bytes(&msg).unwrap();
            match (&msg, events_head(&frame)) {
                (Message::Events { batch, events }, Some(head)) => {
                    prop_assert_eq!(head.batch, *batch);
                    prop_assert_eq!(head.events, events.len() as u64);
                    let moved = body_of(EventsFrame::Renumbered {
                        batch: new_batch,
                        frame: Bytes::from(frame.clone()),
                        head,
                    });
                    let back: Message = from_bytes(&moved).unwrap();
                    prop_assert_eq!(back, Message::Events { batch: new_batch, events: events.clone() });
                }
                (Message::Events { .. }, None) => prop_assert!(false, "events frame not recognised"),
                (_, head) => prop_assert!(head.is_none()),
            }
        }

        #[test]
        fn a_log_entry_by_reference_encodes_like_the_owned_one(entry in any::<crate::message::LogEntry>()) {
            let by_ref = crate::message::LogEntryRef {
                lsn: entry.lsn,
                source: &entry.source,
                source_serial: entry.source_serial,
                event: &entry.event,
            };
            let mut appended = Vec::new();
            append_bytes(&by_ref, &mut appended).unwrap();
            prop_assert_eq!(appended, to_bytes(&entry).unwrap());
        }

        #[test]
        fn a_frame_of_encoded_events_is_an_events_message(
            batch in any::<u64>(),
            events in proptest::collection::vec(any::<crate::Event>(), 0..4),
        ) {
            let encoded: Vec<Bytes> = events.iter().map(|e| to_bytes(e).unwrap().into()).collect();
            prop_assert_eq!(
                body_of(EventsFrame::Encoded { batch, events: encoded }),
                to_bytes(&Message::Events { batch, events }).unwrap()
            );
        }

        #[test]
        fn log_entries_travel_as_stored_and_decode_as_sent(
            entries in proptest::collection::vec(any::<crate::message::LogEntry>(), 0..5),
            cut in any::<proptest::sample::Index>(),
        ) {
            let mut batch = crate::message::LogBatch::default();
            let mut stored = crate::message::LogBatch::default();
            for entry in &entries {
                batch.push(entry).unwrap();
                // What a store sends: the stored encoding, not decoded on the way.
                stored.push_encoded(&to_bytes(entry).unwrap());
            }
            prop_assert_eq!(&batch, &stored);
            // Handed on by a gateway, head and page apart: the bytes of the typed message.
            let frame = ReplicateFrame { batch: 1, peer: "AGG_P", after: 0, cursor: 9, entries: &batch };
            let mut codec = MessageCodec::default();
            let mut out = BytesMut::new();
            codec.encode(frame, &mut out).unwrap();
            let msg = Message::Replicate { batch: 1, peer: "AGG_P".into(), after: 0, cursor: 9, entries: batch };
            prop_assert_eq!(&out[LENGTH_FIELD..], &to_bytes(&msg).unwrap()[..]);
            prop_assert_eq!(codec.decode(&mut out).unwrap().unwrap().unwrap(), msg.clone());
            let back: Message = from_bytes(&to_bytes(&msg).unwrap()).unwrap();
            let Message::Replicate { entries: back, .. } = back else {
                return Err(TestCaseError::fail("not a Replicate"));
            };
            prop_assert_eq!(back.decode().unwrap(), entries.clone());
            let kept = back.clone().decode_keeping_event_bytes().unwrap();
            let events: Vec<_> = entries.iter().map(|e| e.event.clone()).collect();
            let sources: Vec<_> = entries.iter().map(|e| (&*e.source, e.source_serial)).collect();
            prop_assert_eq!(&kept.events, &events);
            prop_assert_eq!(kept.sources.iter().collect::<Vec<_>>(), sources);
            prop_assert_eq!(kept.encoded.len(), entries.len());
            for (event, encoded) in events.iter().zip(kept.encoded.iter()) {
                prop_assert_eq!(encoded.to_vec(), to_bytes(event).unwrap());
            }
            // A stored block cut short anywhere reads as the whole entries before the cut and
            // then an error: never a panic, never a wrong entry.
            let mut block = Vec::new();
            let mut ends = vec![0];
            for entry in &entries {
                let bytes = to_bytes(entry).unwrap();
                block.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
                block.extend_from_slice(&bytes);
                ends.push(block.len());
            }
            let at = cut.index(block.len() + 1);
            let read: Vec<_> = crate::message::Records::of(&block[..at]).collect();
            let whole = ends.iter().filter(|&&end| end <= at && end > 0).count();
            prop_assert_eq!(read.iter().filter(|r| r.is_ok()).count(), whole);
            for (record, entry) in read.iter().zip(&entries) {
                if let Ok(record) = record {
                    prop_assert_eq!(&from_bytes::<crate::message::LogEntry>(record).unwrap(), entry);
                }
            }
            prop_assert_eq!(read.last().is_some_and(|r| r.is_err()), !ends.contains(&at));
        }
    }

    proptest! {
        // A snapshot chunk nests alert states several levels deep: few, small cases.
        #![proptest_config(ProptestConfig {
            cases: 24,
            max_default_size_range: 4,
            ..ProptestConfig::default()
        })]

        #[test]
        fn a_snapshot_page_built_from_encoded_states_is_the_typed_encoding(
            chunk in any::<crate::message::SnapshotChunk>(),
            batch in any::<u64>(),
            peer in ".{0,12}",
            before in proptest::collection::vec(any::<u8>(), 0..3),
        ) {
            // After whatever the buffer held: a frame not yet flushed.
            let mut buf = BytesMut::from(&before[..]);
            let mut writer = SnapshotPageWriter::begin(&mut buf, &chunk.applied);
            for (id, state) in &chunk.alerts {
                writer.push_alert(id, &to_bytes(state).unwrap()).unwrap();
            }
            prop_assert_eq!(writer.alerts(), chunk.alerts.len() as u64);
            writer.finish(DEFAULT_MAX_FRAME, &chunk.head, &chunk.applied, &chunk.clears).unwrap();
            prop_assert_eq!(&buf[..before.len()], &before[..]);
            let framed = buf.split_off(before.len());
            let frame = &framed[LENGTH_FIELD..];
            let len = u32::from_be_bytes(framed[..LENGTH_FIELD].try_into().unwrap()) as usize;
            prop_assert_eq!(len, frame.len());
            let typed = Message::SnapshotChunk(Box::new(chunk.clone()));
            prop_assert_eq!(frame, &to_bytes(&typed).unwrap()[..]);
            prop_assert_eq!(snapshot_head(frame), Some(chunk.head.clone()));
            prop_assert!(!is_pong(frame));
            let mut codec = MessageCodec::default();
            let mut out = BytesMut::new();
            codec.encode(MergeFrame { batch, peer: &peer, snapshot_frame: frame }, &mut out).unwrap();
            let decoded = codec.decode(&mut out).unwrap().unwrap().unwrap();
            prop_assert!(out.is_empty());
            prop_assert_eq!(decoded, Message::Merge { batch, peer, chunk: Box::new(chunk) });
        }
    }

    /// A page whose head outgrows the room left for it (many clears) moves its alerts along;
    /// one over the maximum frame, or abandoned, leaves the buffer as it was.
    #[test]
    fn a_snapshot_page_with_a_large_head_or_none_at_all_keeps_the_buffer_whole() {
        let state = to_bytes(&crate::state::AlertState::default()).unwrap();
        let clears: Vec<(String, Version)> = (0..500)
            .map(|i| (format!("clear-key-{i:05}"), Version::default()))
            .collect();
        let head = SnapshotHead {
            snapshot: 7,
            ..SnapshotHead::default()
        };
        for before in [&b""[..], b"xy"] {
            let mut buf = BytesMut::from(before);
            let mut writer = SnapshotPageWriter::begin(&mut buf, &[]);
            writer.push_alert("host1:disk", &state).unwrap();
            writer.push_alert("host2:disk", &state).unwrap();
            writer
                .finish(DEFAULT_MAX_FRAME, &head, &[], &clears)
                .unwrap();
            let mut framed = buf.split_off(before.len());
            assert_eq!(&buf[..], before);
            let got = decode_all(&mut MessageCodec::default(), &mut framed).unwrap();
            let Message::SnapshotChunk(chunk) = &got[0] else {
                panic!("{got:?}")
            };
            assert_eq!(
                (chunk.head.snapshot, chunk.clears.len(), chunk.alerts.len()),
                (7, 500, 2)
            );
            assert_eq!(&*chunk.alerts[1].0, "host2:disk");

            let mut buf = BytesMut::from(before);
            let mut writer = SnapshotPageWriter::begin(&mut buf, &[]);
            writer.push_alert("host1:disk", &state).unwrap();
            let too_small = writer.finish(64, &head, &[], &clears);
            assert!(matches!(
                too_small,
                Err(CodecError::FrameTooLarge { max: 64, .. })
            ));
            assert_eq!(&buf[..], before);

            let mut writer = SnapshotPageWriter::begin(&mut buf, &[]);
            writer.push_alert("host1:disk", &state).unwrap();
            drop(writer);
            assert_eq!(&buf[..], before);
        }
    }

    proptest! {
        // Small default collections keep each case quick, so many more cases fit in a run.
        #![proptest_config(ProptestConfig {
            cases: 256,
            max_default_size_range: 6,
            ..ProptestConfig::default()
        })]

        /// A batch's sources, kept by runs of one name, read back one per entry as pushed,
        /// whatever the runs (the empty name included).
        #[test]
        fn entry_sources_read_back_one_per_entry_in_order(
            pushed in proptest::collection::vec(
                (proptest::sample::select(vec!["", "A", "B"]), any::<u64>()),
                0..40,
            ),
        ) {
            let mut sources = crate::message::EntrySources::with_capacity(pushed.len());
            for (name, serial) in &pushed {
                sources.push(name, *serial);
            }
            prop_assert_eq!(sources.len(), pushed.len());
            prop_assert_eq!(sources.is_empty(), pushed.is_empty());
            prop_assert_eq!(sources.iter().collect::<Vec<_>>(), pushed);
        }

        #[test]
        fn every_message_round_trips(msgs in proptest::collection::vec(any::<Message>(), 1..4)) {
            let mut codec = MessageCodec::default();
            let mut buf = BytesMut::new();
            for msg in &msgs {
                codec.encode(msg, &mut buf).unwrap();
            }
            let back = decode_all(&mut codec, &mut buf).unwrap();
            prop_assert_eq!(back, msgs);
            prop_assert!(buf.is_empty());
        }

        #[test]
        fn a_codec_keeping_record_bytes_decodes_the_same_and_keeps_each_records_encoding(
            msgs in proptest::collection::vec(any::<Message>(), 1..4),
            junk in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut plain = MessageCodec::default();
            let mut keeping = MessageCodec::default().keeping_record_bytes();
            for msg in &msgs {
                let mut buf = BytesMut::new();
                plain.encode(msg, &mut buf).unwrap();
                let back = keeping.decode(&mut buf).unwrap().unwrap().unwrap();
                prop_assert_eq!(&back, msg);
                let kept = keeping.take_record_bytes();
                match msg {
                    Message::Events { events, .. } => {
                        let want: Vec<Vec<u8>> = events.iter().map(|e| to_bytes(e).unwrap()).collect();
                        let got: Vec<Vec<u8>> = kept.iter().map(|b| b.to_vec()).collect();
                        prop_assert_eq!(got, want);
                    }
                    Message::Merge { chunk, .. } => {
                        let want: Vec<Vec<u8>> = chunk.alerts.iter().map(|(_, s)| to_bytes(s).unwrap()).collect();
                        let got: Vec<Vec<u8>> = kept.iter().map(|b| b.to_vec()).collect();
                        prop_assert_eq!(got, want);
                    }
                    _ => prop_assert!(kept.is_empty()),
                }
            }
            // Whatever an Events or Merge frame holds, both decoders agree on whether it is one.
            for variant in [EVENTS as u8, MERGE as u8] {
                let mut body = vec![variant];
                body.extend_from_slice(&junk);
                let mut framed = BytesMut::new();
                framed.put_u32(body.len() as u32);
                framed.extend_from_slice(&body);
                let mut again = framed.clone();
                let a = plain.decode(&mut framed).unwrap().unwrap();
                let b = keeping.decode(&mut again).unwrap().unwrap();
                prop_assert_eq!(a.is_ok(), b.is_ok());
                if let (Ok(a), Ok(b)) = (a, b) {
                    prop_assert_eq!(a, b);
                }
            }
        }

        #[test]
        fn log_frames_decode_to_slices_exactly_as_the_plain_decoder_decodes_them(
            entries in any::<crate::message::LogBatch>(),
            lsns in any::<(u64, u64, u64)>(),
            peer in "[A-Z_]{0,8}",
            edit in proptest::option::of((any::<prop::sample::Index>(), any::<u8>(), 0u8..3)),
        ) {
            let (a, b, c) = lsns;
            for msg in [
                Message::LogEntries { entries: entries.clone(), last_lsn: a, head_lsn: b },
                Message::Replicate { batch: c, peer: peer.clone(), after: a, cursor: b, entries: entries.clone() },
            ] {
                let mut body = to_bytes(&msg).unwrap();
                if let Some((at, byte, op)) = edit {
                    let i = at.index(body.len());
                    match op {
                        0 => body[i] = byte,
                        1 => body.insert(i, byte),
                        _ => { body.remove(i); }
                    }
                }
                let mut framed = BytesMut::new();
                framed.put_u32(body.len() as u32);
                framed.extend_from_slice(&body);
                let sliced = MessageCodec::default().decode(&mut framed).unwrap().unwrap();
                let whole = decode_frame(BytesMut::from(&body[..]));
                prop_assert_eq!(whole.as_ref().ok(), sliced.as_ref().ok());
                match (sliced, from_bytes::<Message>(&body)) {
                    (Ok(sliced), Ok(plain)) => prop_assert_eq!(sliced, plain),
                    (Err(_), Err(_)) => {}
                    (sliced, plain) => prop_assert!(false, "the codec gave {:?}, the plain decoder {:?}", sliced, plain),
                }
            }
        }

        #[test]
        fn events_and_alert_states_decode_natively_exactly_as_serde_decodes_them(
            event in any::<crate::Event>(),
            state in any::<crate::state::AlertState>(),
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 0..3),
        ) {
            // Intact, each decodes to itself, whole; damaged, both decoders give the same value
            // from the same bytes, or both refuse them.
            let bytes = to_bytes(&event).unwrap();
            prop_assert_eq!(decode_prefix_native::<crate::Event>(&bytes).unwrap(), (event.clone(), bytes.len()));
            let bytes = damaged(bytes, &edits);
            let native = decode_prefix_native::<crate::Event>(&bytes);
            let serde = decode_prefix::<crate::Event>(&bytes);
            prop_assert_eq!(native.as_ref().ok(), serde.as_ref().ok(), "{:?} against {:?}", native, serde);
            let bytes = to_bytes(&state).unwrap();
            type State = crate::state::AlertState;
            prop_assert_eq!(decode_prefix_native::<State>(&bytes).unwrap(), (state.clone(), bytes.len()));
            let bytes = damaged(bytes, &edits);
            let native = decode_prefix_native::<State>(&bytes);
            let serde = decode_prefix::<State>(&bytes);
            prop_assert_eq!(native.as_ref().ok(), serde.as_ref().ok(), "{:?} against {:?}", native, serde);
        }

        #[test]
        fn a_log_entry_is_its_head_then_its_events_encoding(entry in any::<crate::message::LogEntry>()) {
            let mut parts = to_bytes(&(entry.lsn, &entry.source, entry.source_serial)).unwrap();
            parts.extend_from_slice(&to_bytes(&entry.event).unwrap());
            prop_assert_eq!(parts, to_bytes(&entry).unwrap());
        }

        #[test]
        fn strings_announcing_huge_lengths_are_refused(len in 1u64 << 27..u64::MAX) {
            // Error { message } with a string length varint far beyond the frame.
            let mut body = vec![25u8, 253];
            body.extend_from_slice(&len.to_le_bytes());
            let err = from_bytes::<Message>(&body).unwrap_err();
            prop_assert!(matches!(err, CodecError::Decode(_)), "{}", err);
        }

        #[test]
        fn alert_state_lists_announcing_huge_lengths_are_refused(len in 1u64 << 27..u64::MAX, list in 0usize..3) {
            // A state's three lists come last, each empty here: one length byte apiece.
            let mut bytes = to_bytes(&crate::state::AlertState::default()).unwrap();
            prop_assert!(decode_prefix_native::<crate::state::AlertState>(&bytes).is_ok());
            prop_assert_eq!(&bytes[bytes.len() - 3..], &[0u8, 0, 0][..]);
            let at = bytes.len() - 3 + list;
            let mut huge = vec![253u8];
            huge.extend_from_slice(&len.to_le_bytes());
            bytes.splice(at..=at, huge);
            let native = decode_prefix_native::<crate::state::AlertState>(&bytes);
            prop_assert!(matches!(native, Err(CodecError::Decode(_))), "{:?}", native);
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut codec = MessageCodec::new(4096);
            let mut buf = BytesMut::from(&bytes[..]);
            let _ = decode_all(&mut codec, &mut buf);
            let _ = from_bytes::<Message>(&bytes);
        }

        #[test]
        fn mutated_frames_never_panic(
            msg in any::<Message>(),
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..8),
        ) {
            let bytes = damaged(encode(&msg).to_vec(), &edits);
            let mut codec = MessageCodec::new(1 << 20);
            let mut buf = BytesMut::from(&bytes[..]);
            let _ = decode_all(&mut codec, &mut buf);
        }
    }
}
