//! What the store's integration tests share: an embedded store on an ephemeral port, a
//! connection to it, and a plain problem event.

#![allow(dead_code)] // each test file uses its own part
#![allow(clippy::unwrap_used)] // a test that cannot set itself up should fail

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tandem_probe::Connection;
use tandem_protocol::{
    AlertFields, ClientKind, DEFAULT_MAX_FRAME, Event, EventBody, Origin, Severity,
};
use tandem_store::StoreOptions;
use tandem_store::engine::Shared;
use tokio_util::sync::CancellationToken;

pub type Running = tokio::task::JoinHandle<Result<(), tandem_store::StoreError>>;

/// Starts a store with `options` until `shutdown`; returns once it listens.
pub async fn start(
    options: StoreOptions,
    shutdown: &CancellationToken,
) -> (Arc<Shared>, SocketAddr, Running) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let shutdown = shutdown.clone();
    let running = tokio::spawn(async move {
        tandem_store::run(options, shutdown, move |shared, addr| {
            let _ = tx.send((shared, addr));
        })
        .await
    });
    let (shared, addr) = rx.await.unwrap();
    (shared, addr, running)
}

pub async fn connect(
    addr: SocketAddr,
    kind: ClientKind,
    name: &str,
) -> Result<Connection, tandem_probe::ClientError> {
    Connection::connect(addr, kind, name, DEFAULT_MAX_FRAME, Duration::from_secs(5)).await
}

/// A disk-full problem of one of `hosts` hosts, picked by `seq`.
pub fn event(origin: &Origin, seq: u64, hosts: u64) -> Event {
    Event {
        origin: origin.clone(),
        seq,
        time: 1_700_000_000_000 + seq as i64,
        body: EventBody::Occurrence(
            AlertFields {
                identifier: format!("host{}:disk", seq % hosts),
                node: format!("host{}", seq % hosts),
                summary: "disk full".into(),
                severity: Severity::MAJOR,
                ..AlertFields::default()
            }
            .pack(),
        ),
    }
}
