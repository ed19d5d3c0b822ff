//! A store asked to stop stops, even when its storage engine can no longer write: the flush at
//! shutdown only buys a quicker next start (the journal is synced first), so it must not hold
//! the process once the engine has failed.

#![allow(clippy::unwrap_used)] // a test that cannot set itself up should fail

use std::time::Duration;

use tandem_probe::Connection;
use tandem_protocol::{
    AlertFields, ClientKind, DEFAULT_MAX_FRAME, Event, EventBody, Message, Origin, Role, Severity,
};
use tandem_store::StoreOptions;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_whose_data_directory_is_gone_still_stops() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("AGG_P");
    let options = StoreOptions::new(
        "AGG_P",
        Role::Primary,
        "127.0.0.1:0".parse().unwrap(),
        data.clone(),
    );
    let shutdown = CancellationToken::new();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let running = tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            tandem_store::run(options, shutdown, move |_, addr| {
                let _ = tx.send(addr);
            })
            .await
        }
    });
    let addr = rx.await.unwrap();
    let mut conn = Connection::connect(
        addr,
        ClientKind::Probe,
        "probe",
        DEFAULT_MAX_FRAME,
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    // Something in every memtable the flush will have to write out.
    let origin = Origin::new("probe", 1);
    let events = (1..=100)
        .map(|seq| Event {
            origin: origin.clone(),
            seq,
            time: 1_700_000_000_000,
            body: EventBody::Occurrence(AlertFields {
                identifier: format!("host{seq}:disk"),
                summary: "disk full".into(),
                severity: Severity::MAJOR,
                ..AlertFields::default()
            }),
        })
        .collect();
    let answer = conn
        .request(
            &Message::Events { batch: 1, events },
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert!(
        matches!(answer, Message::Ack { applied: 100, .. }),
        "{answer:?}"
    );

    std::fs::remove_dir_all(&data).unwrap();
    shutdown.cancel();
    let stopped = tokio::time::timeout(Duration::from_secs(60), running).await;
    assert!(
        stopped.is_ok(),
        "the store did not stop within 60 s of being asked to"
    );
}
