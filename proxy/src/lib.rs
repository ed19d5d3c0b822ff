//! The proxy: multiplexes probe connections onto one upstream link to its own store.
//!
//! Built by the proxy issue; this crate is a placeholder so the workspace has its final shape.

#![forbid(unsafe_code)]
