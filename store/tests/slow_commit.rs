//! A store whose commit is slow must still sound alive to its clients. A connection with more
//! batches waiting on the commit than the store takes from one connection is no longer read, so
//! the client's pings wait too; a proxy that then hears nothing for its `dead_after` would take
//! the store for dead and send every probe away. The store's keepalive covers that silence.

#![allow(clippy::unwrap_used)] // a test that cannot set itself up should fail

use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_probe::Connection;
use tandem_protocol::{
    AlertFields, ClientKind, DEFAULT_MAX_FRAME, Event, EventBody, Message, Origin, Role, Severity,
};
use tandem_store::StoreOptions;
use tandem_store::engine::Shared;
use tokio_util::sync::CancellationToken;

/// More than the store takes from one connection before it stops reading it.
const BATCHES: u64 = 400;
/// How long the commit is held up: several times any client's `dead_after`.
const HELD: Duration = Duration::from_secs(3);
const KEEPALIVE: Duration = Duration::from_millis(100);

fn event(origin: &Origin, seq: u64) -> Event {
    Event {
        origin: origin.clone(),
        seq,
        time: 1_700_000_000_000 + seq as i64,
        body: EventBody::Occurrence(AlertFields {
            identifier: format!("host{}:disk", seq % 10),
            node: format!("host{}", seq % 10),
            summary: "disk full".into(),
            severity: Severity::MAJOR,
            ..AlertFields::default()
        }),
    }
}

type Running = tokio::task::JoinHandle<Result<(), tandem_store::StoreError>>;

async fn store(
    dir: &std::path::Path,
    shutdown: &CancellationToken,
) -> (Arc<Shared>, std::net::SocketAddr, Running) {
    let options = StoreOptions {
        keepalive: KEEPALIVE,
        ..StoreOptions::new(
            "AGG_P",
            Role::Primary,
            "127.0.0.1:0".parse().unwrap(),
            dir.to_path_buf(),
        )
    };
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_whose_batches_wait_on_a_slow_commit_still_hears_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let (shared, addr, running) = store(dir.path(), &shutdown).await;
    let mut conn = Connection::connect(
        addr,
        ClientKind::Proxy,
        "PROXY_P",
        DEFAULT_MAX_FRAME,
        Duration::from_secs(5),
    )
    .await
    .unwrap();

    // Hold the commit thread: it takes the table's write lock for every group.
    let (locked_tx, locked_rx) = std::sync::mpsc::channel();
    let holder = {
        let shared = shared.clone();
        std::thread::spawn(move || {
            let _table = shared.table.write().unwrap();
            locked_tx.send(()).unwrap();
            std::thread::sleep(HELD);
        })
    };
    locked_rx.recv().unwrap();

    let origin = Origin::new("slow-commit-probe", 1);
    for batch in 1..=BATCHES {
        let events = vec![event(&origin, batch)];
        conn.send(&Message::Events { batch, events }).await.unwrap();
    }

    // Every answer until all batches are acknowledged, and the longest silence between two.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = Instant::now();
    let mut longest = Duration::ZERO;
    let mut keepalives = 0;
    let mut acked = 0;
    while acked < BATCHES {
        let left = deadline.saturating_duration_since(Instant::now());
        let msg = tokio::time::timeout(left, conn.recv())
            .await
            .expect("every batch acknowledged in 30 s")
            .unwrap();
        longest = longest.max(last.elapsed());
        last = Instant::now();
        match msg {
            Message::Ack { .. } => acked += 1,
            Message::Pong { .. } => keepalives += 1,
            other => panic!("unexpected answer: {other:?}"),
        }
    }
    holder.join().unwrap();
    shutdown.cancel();
    running.await.unwrap().unwrap();
    println!("held the commit {HELD:?}: {keepalives} keepalives, longest silence {longest:?}");
    assert!(keepalives > 0, "no keepalive while the commit was held");
    // Generous against a loaded machine, and still well under the hold: without the keepalive
    // the silence is the whole hold.
    assert!(
        longest < HELD / 2,
        "the store was silent for {longest:?} while its commit was held for {HELD:?}"
    );
}
