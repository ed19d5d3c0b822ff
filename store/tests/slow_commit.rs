//! A store whose commit is slow must still sound alive to its clients. A connection with more
//! batches waiting on the commit than the store takes from one connection is no longer read, so
//! the client's pings wait too; a proxy that then hears nothing for its `dead_after` would take
//! the store for dead and send every probe away. The store's keepalive covers that silence.
//!
//! A commit that does not finish at all (a hung disk) is another matter: the store's watchdog
//! then sends probes and proxies away, refuses new ones and fails its peer's heartbeat, until
//! the commit goes through.

#![allow(clippy::unwrap_used)] // a test that cannot set itself up should fail

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{Running, connect, event, start};
use tandem_probe::Connection;
use tandem_protocol::{ClientKind, DEFAULT_MAX_FRAME, Message, Origin, Role};
use tandem_store::StoreOptions;
use tandem_store::engine::Shared;
use tokio_util::sync::CancellationToken;

/// More than the store takes from one connection before it stops reading it.
const BATCHES: u64 = 400;
/// How long the commit is held up: several times any client's `dead_after`.
const HELD: Duration = Duration::from_secs(3);
const KEEPALIVE: Duration = Duration::from_millis(100);
/// How long the stuck test holds the commit: ten times its stall limit.
const STUCK: Duration = Duration::from_secs(5);

async fn store(
    dir: &std::path::Path,
    shutdown: &CancellationToken,
    stall_after: Duration,
) -> (Arc<Shared>, std::net::SocketAddr, Running) {
    let options = StoreOptions {
        keepalive: KEEPALIVE,
        stall_after,
        ..StoreOptions::new(
            "AGG_P",
            Role::Primary,
            "127.0.0.1:0".parse().unwrap(),
            dir.join("agg_p"),
        )
    };
    start(options, shutdown).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_whose_batches_wait_on_a_slow_commit_still_hears_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    // Slow, not stuck: the hold is shorter than the stall limit.
    let (shared, addr, running) = store(dir.path(), &shutdown, HELD * 3).await;
    let mut conn = connect(addr, ClientKind::Proxy, "PROXY_P").await.unwrap();

    let holder = hold_commits(&shared, HELD);

    let origin = Origin::new("slow-commit-probe", 1);
    for batch in 1..=BATCHES {
        let events = vec![event(&origin, batch, 10)];
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

/// Holds the store's commit thread (it takes the table's write lock for every group) for
/// `held`; returns once the lock is taken.
fn hold_commits(shared: &Arc<Shared>, held: Duration) -> std::thread::JoinHandle<()> {
    let (locked_tx, locked_rx) = std::sync::mpsc::channel();
    let shared = shared.clone();
    let holder = std::thread::spawn(move || {
        let _table = shared.table.write().unwrap();
        locked_tx.send(()).unwrap();
        std::thread::sleep(held);
    });
    locked_rx.recv().unwrap();
    holder
}

/// Reads `conn` until a message `wanted` accepts arrives, for at most 10 s.
async fn recv_until(conn: &mut Connection, what: &str, wanted: impl Fn(&Message) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let msg = tokio::time::timeout(left, conn.recv())
            .await
            .unwrap_or_else(|_| panic!("not {what} within 10 s"))
            .unwrap();
        if wanted(&msg) {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_whose_commit_is_stuck_sends_probes_away_until_it_goes_through() {
    const STALL: Duration = Duration::from_millis(500);
    let dir = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let (shared, addr, running) = store(dir.path(), &shutdown, STALL).await;
    // Its backup, watching it.
    let backup = StoreOptions {
        peer: Some(tandem_store::peer::PeerOptions {
            name: "AGG_P".into(),
            addr,
            heartbeat: Duration::from_millis(100),
            max_frame: DEFAULT_MAX_FRAME,
            on_role_change: None,
            tls: None,
        }),
        ..StoreOptions::new(
            "AGG_B",
            Role::Backup,
            "127.0.0.1:0".parse().unwrap(),
            dir.path().join("agg_b"),
        )
    };
    let (backup, _, backup_running) = start(backup, &shutdown).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !backup.peer_up.load(Ordering::Relaxed) {
        assert!(
            Instant::now() < deadline,
            "the backup never saw its primary"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!backup.acting_primary.load(Ordering::Relaxed));
    let mut probe = connect(addr, ClientKind::Probe, "probe-a").await.unwrap();
    let mut peer = connect(addr, ClientKind::Store, "AGG_B").await.unwrap();
    assert!(matches!(
        peer.request(&Message::StatusRequest, Duration::from_secs(5))
            .await
            .unwrap(),
        Message::Status(_)
    ));

    // Longer than the slow test's hold: the backup's takeover is checked within it.
    let holder = hold_commits(&shared, STUCK);
    let origin = Origin::new("stuck-probe", 1);
    let events = vec![event(&origin, 1, 10)];
    probe
        .send(&Message::Events { batch: 1, events })
        .await
        .unwrap();

    // The connected probe is told to leave.
    recv_until(&mut probe, "told to leave", |msg| {
        matches!(
            msg,
            Message::Directive(tandem_protocol::Directive::Leave { .. })
        )
    })
    .await;
    // New probes are refused, and the peer's heartbeat fails, while the commit is stuck.
    let refused = connect(addr, ClientKind::Probe, "probe-b").await;
    assert!(refused.is_err(), "a stuck store took a new probe");
    let status = peer
        .request(&Message::StatusRequest, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(matches!(status, Message::Error { .. }), "{status:?}");
    // So the backup, missing its heartbeats, takes over.
    while !backup.acting_primary.load(Ordering::Relaxed) {
        assert!(
            shared.stalled.load(Ordering::Relaxed),
            "the commit went through before the backup took over"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Once the commit goes through: the batch is acknowledged and probes are taken again.
    tokio::task::spawn_blocking(move || holder.join().unwrap())
        .await
        .unwrap();
    recv_until(
        &mut probe,
        "acknowledged once the commit went through",
        |msg| matches!(msg, Message::Ack { batch: 1, .. }),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while connect(addr, ClientKind::Probe, "probe-c").await.is_err() {
        assert!(
            Instant::now() < deadline,
            "probes still refused 10 s after the commit went through"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shutdown.cancel();
    running.await.unwrap().unwrap();
    backup_running.await.unwrap().unwrap();
}
