//! A store answers a connection's batches in the order they came. The gateway relies on it: it
//! pairs each answer with the oldest batch it has in flight, and takes an answer for another
//! batch as a broken session (it reconnects, and replication stalls meanwhile).

#![allow(clippy::unwrap_used)] // a test that cannot set itself up should fail

mod common;

use std::time::{Duration, Instant};

use common::{connect, event, start};
use tandem_protocol::{ClientKind, Message, Origin, Role};
use tandem_store::StoreOptions;
use tokio_util::sync::CancellationToken;

/// Batches in flight at once: below the store's per-connection limit, so it keeps reading.
const IN_FLIGHT: u64 = 200;
/// Enough rounds that the commit thread's replies often race the handler's polling of them.
const ROUNDS: u64 = 50;

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
    let (_, addr, running) = start(options, &shutdown).await;
    let mut conn = connect(addr, ClientKind::Proxy, "PROXY_P").await.unwrap();

    let origin = Origin::new("answer-order-probe", 1);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seq = 0;
    let mut expected = 1;
    for round in 0..ROUNDS {
        let first = round * IN_FLIGHT + 1;
        for batch in first..first + IN_FLIGHT {
            seq += 1;
            let events = vec![event(&origin, seq, 100)];
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
