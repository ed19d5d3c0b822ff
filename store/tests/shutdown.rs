//! A store asked to stop stops, even when its storage engine can no longer write: the flush at
//! shutdown only buys a quicker next start (the journal is synced first), so it must not hold
//! the process once the engine has failed.

#![allow(clippy::unwrap_used)] // a test that cannot set itself up should fail

mod common;

use std::time::Duration;

use common::{connect, event, start};
use tandem_protocol::{ClientKind, Message, Origin, Role};
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
    let (_, addr, running) = start(options, &shutdown).await;
    let mut conn = connect(addr, ClientKind::Probe, "probe").await.unwrap();
    // Something in every memtable the flush will have to write out.
    let origin = Origin::new("probe", 1);
    let events: Vec<_> = (1..=100).map(|seq| event(&origin, seq, 100)).collect();
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
