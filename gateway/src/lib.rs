//! The bidirectional gateway: resyncs the two stores and streams every change both ways.
//!
//! Built by the gateway issue; this crate is a placeholder so the workspace has its final shape.

#![forbid(unsafe_code)]
