//! The probe client library and the ingestion front ends.
//!
//! [`connection`] is one framed, handshaken link to a tandem server, used by probes, operator
//! commands and tests alike.

#![forbid(unsafe_code)]

pub mod connection;
pub mod failover;
pub mod pair;
pub mod spool;

pub use connection::{ClientError, Connection, Reader, Writer};
