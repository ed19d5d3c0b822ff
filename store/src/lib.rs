//! The aggregation store: the durable, deduplicating alert table of one member of the pair.

#![forbid(unsafe_code)]

pub mod query;
