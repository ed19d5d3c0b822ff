//! A store answers a connection's batches in the order they came. The gateway relies on it: it
//! pairs each answer with the oldest batch it has in flight, and takes an answer for another
//! batch as a broken session (it reconnects, and replication stalls meanwhile).

#![allow(clippy::unwrap_used)] // a test that cannot set itself up should fail

use std::time::{Duration, Instant};

use tandem_probe::Connection;
use tandem_protocol::{
    AlertFields, ClientKind, DEFAULT_MAX_FRAME, Event, EventBody, Message, Origin, Role, Severity,
};
use tandem_store::StoreOptions;
use tokio_util::sync::CancellationToken;

/// Batches in flight at once: below the store's per-connection limit, so it keeps reading.
const IN_FLIGHT: u64 = 200;
/// Enough rounds that the commit thread's replies often race the handler's polling of them.
const ROUNDS: u64 = 50;

fn event(origin: &Origin, seq: u64) -> Event {
    Event {
        origin: origin.clone(),
        seq,
        time: 1_700_000_000_000 + seq as i64,
        body: EventBody::Occurrence(AlertFields {
            identifier: format!("host{}:disk", seq % 100),
            node: format!("host{}", seq % 100),
            summary: "disk full".into(),
            severity: Severity::MAJOR,
            ..AlertFields::default()
        }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_are_answered_in_the_order_they_were_sent() {
    let dir = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let options = StoreOptions::new(
        "AGG_P",
        Role::Primary,
        "127.0.0.1:0".parse().unwrap(),
        dir.path().join("agg_p"),
    );
    let (tx, rx) = tokio::sync::oneshot::channel();
    let stop = shutdown.clone();
    let running = tokio::spawn(async move {
        tandem_store::run(options, stop, move |_, addr| {
            let _ = tx.send(addr);
        })
        .await
    });
    let addr = rx.await.unwrap();
    let mut conn = Connection::connect(
        addr,
        ClientKind::Proxy,
        "PROXY_P",
        DEFAULT_MAX_FRAME,
        Duration::from_secs(5),
    )
    .await
    .unwrap();

    let origin = Origin::new("answer-order-probe", 1);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seq = 0;
    let mut expected = 1;
    for round in 0..ROUNDS {
        let first = round * IN_FLIGHT + 1;
        for batch in first..first + IN_FLIGHT {
            seq += 1;
            let events = vec![event(&origin, seq)];
            conn.send(&Message::Events { batch, events }).await.unwrap();
        }
        while expected < first + IN_FLIGHT {
            let left = deadline.saturating_duration_since(Instant::now());
            let msg = tokio::time::timeout(left, conn.recv())
                .await
                .expect("every batch answered within 60 s")
                .unwrap();
            match msg {
                Message::Ack { batch, .. } => {
                    assert_eq!(
                        batch, expected,
                        "batch {batch} was answered before batch {expected}"
                    );
                    expected += 1;
                }
                Message::Pong { .. } => {}
                other => panic!("unexpected answer: {other:?}"),
            }
        }
    }
    shutdown.cancel();
    running.await.unwrap().unwrap();
}
