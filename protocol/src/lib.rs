//! The language every tandem component speaks.
//!
//! This crate holds the alert model ([`alert`]), the events that change alerts ([`event`]), the
//! messages exchanged on every link ([`message`]) and the framing that carries them ([`codec`]).
//! It performs no I/O of its own: the codec plugs into `tokio_util::codec::Framed`, so each
//! component decides how it reads and writes. Everything that decodes bytes from a peer returns
//! an error for bad input and never panics.

#![forbid(unsafe_code)]

pub mod alert;
pub mod codec;
pub mod event;
pub mod message;
pub mod state;

pub use alert::{
    Alert, AlertFields, JournalEntry, Kind, Millis, PackedFields, Severity, SeverityOutOfRange,
};
pub use codec::{
    BadFrame, CodecError, DEFAULT_MAX_FRAME, EventsFrame, EventsHead, FrameCodec, LogEntriesFrame,
    MAX_FRAME_LIMIT, MergeFrame, MessageCodec, RecordBytes, ReplicateFrame,
};
pub use event::{Event, EventBody, Origin, OriginCount, Version, shared_name};
pub use message::{
    ClientKind, Directive, Hello, Message, PROTOCOL_VERSION, Query, RejectReason, Role, SortKey,
    StoreStatus, Welcome,
};
pub use state::{AlertState, AppliedRanges, Versioned};
