//! The probe client library and the ingestion front ends.
//!
//! Built by the probe issue; this crate is a placeholder so the workspace has its final shape.

#![forbid(unsafe_code)]
