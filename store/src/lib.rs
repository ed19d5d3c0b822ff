//! The aggregation store: the durable, deduplicating alert table of one member of the pair.
//!
//! Built by the store issue; this crate is a placeholder so the workspace has its final shape.

#![forbid(unsafe_code)]
