//! The store as a process: exactly-once counting through SIGKILL and restart, and no loss of an
//! acknowledged event however the store dies.

#![allow(clippy::unwrap_used)] // a test that cannot read its own fixture should fail

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tandem_protocol::Origin;
use tandem_tests::client::{alerts, occurrence, send_reliably, tallies};
use tandem_tests::random::{next, seed};
use tandem_tests::{Pair, Proc};

fn store_addr(pair: &Pair) -> SocketAddr {
    pair.file.store("AGG_P").expect("AGG_P").listen.0
}

fn start(pair: &Pair) -> Proc {
    pair.spawn(&["store", "--name", "AGG_P"], "agg_p")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tallies_are_exact_through_sigkill_and_restart() {
    let pair = Pair::new(|t| t);
    let addr = store_addr(&pair);
    let mut store = start(&pair);
    let origin = Origin::new("itest", 1);
    let events: Vec<_> = (1..=40_000u64)
        .map(|seq| occurrence(&origin, seq, format!("alert-{}", seq % 500)))
        .collect();

    send_reliably(
        addr,
        &events[..20_000],
        500,
        Duration::ZERO,
        Duration::from_secs(120),
        |_| {},
    )
    .await;
    let first = alerts(addr).await;
    assert_eq!(first.len(), 500);
    assert_eq!(first.iter().map(|a| a.tally).sum::<u64>(), 20_000);

    // The second half is sent, paced like a probe, while the store is SIGKILLed and restarted
    // once 6,000 of it are acknowledged.
    let second = events[20_000..].to_vec();
    let acked = Arc::new(AtomicUsize::new(0));
    let counter = acked.clone();
    let sender = tokio::spawn(async move {
        send_reliably(
            addr,
            &second,
            500,
            Duration::from_millis(10),
            Duration::from_secs(120),
            |c| {
                counter.fetch_add(c.len(), Ordering::SeqCst);
            },
        )
        .await;
    });
    for _ in 0..3000 {
        if acked.load(Ordering::SeqCst) >= 6_000 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    store.kill();
    let at_kill = acked.load(Ordering::SeqCst);
    assert!(
        (6_000..20_000).contains(&at_kill),
        "killed mid-send: {at_kill} acknowledged"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    store = start(&pair);
    sender.await.expect("the sender finished");

    let after = alerts(addr).await;
    assert_eq!(after.len(), 500, "{}", pair.log("agg_p"));
    assert_eq!(after.iter().map(|a| a.tally).sum::<u64>(), 40_000);
    assert!(
        after.iter().all(|a| a.tally == 80),
        "every identifier got 80 occurrences"
    );

    // A clean stop (SIGTERM) and start keeps everything.
    let pid = store.pid();
    let _ = std::process::Command::new("kill")
        .arg(pid.to_string())
        .status();
    for _ in 0..200 {
        if !store.running() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(!store.running(), "the store stops on SIGTERM");
    let _store = start(&pair);
    assert_eq!(tallies(&alerts(addr).await), tallies(&after));
}

/// Rows are written at checkpoints and rebuilt from the log after them: a store SIGKILLed
/// between checkpoints comes back with every alert identical, field by field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_killed_between_checkpoints_rebuilds_every_field_from_its_log() {
    let pair = Pair::new(|t| t);
    let addr = store_addr(&pair);
    let mut store = start(&pair);
    let origin = Origin::new("itest", 1);
    let events: Vec<_> = (1..=12_000u64)
        .map(|seq| occurrence(&origin, seq, format!("alert-{}", seq % 300)))
        .collect();
    let send = |part: &[tandem_protocol::Event]| {
        let part = part.to_vec();
        async move {
            send_reliably(
                addr,
                &part,
                500,
                Duration::ZERO,
                Duration::from_secs(60),
                |_| {},
            )
            .await
        }
    };
    send(&events[..6_000]).await;
    // Past the checkpoint interval: the next commit is a checkpoint, the ones after are not.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    send(&events[6_000..]).await;
    let before = alerts(addr).await;
    store.kill();

    let _store = start(&pair);
    let after = alerts(addr).await;
    assert_eq!(after.len(), 300);
    assert_eq!(after.iter().map(|a| a.tally).sum::<u64>(), 12_000);
    assert_eq!(
        after, before,
        "every field, serials included, as before the kill"
    );
    let log = pair.log("agg_p");
    let replayed: Vec<u64> = log
        .lines()
        .filter(|l| l.contains("loaded the alert table"))
        .filter_map(|l| l.split("replayed=").nth(1))
        .filter_map(|v| v.split_whitespace().next()?.parse().ok())
        .collect();
    assert!(
        replayed.last().is_some_and(|&n| n > 0 && n < 12_000),
        "the restart replayed the log after a checkpoint: {replayed:?}\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_events_survive_kills_at_random_points() {
    kills_at_random_points(None).await;
}

/// With a short log, a checkpoint is due every few commits and the log is trimmed behind it:
/// kills land while checkpoints are being written (off the commit thread), and the log must
/// still cover everything after the last durable one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_events_survive_kills_while_checkpoints_are_written() {
    kills_at_random_points(Some(500)).await;
}

async fn kills_at_random_points(log_retention: Option<u64>) {
    let mut rng = seed() | 1;
    let pair = Pair::new(|t| match log_retention {
        Some(n) => t.replace(
            "data_dir = \"agg_p\"",
            &format!("data_dir = \"agg_p\"\nlog_retention_entries = {n}\nlog_max_entries = {n}"),
        ),
        None => t,
    });
    let addr = store_addr(&pair);
    let origin = Origin::new("recovery", 1);
    let mut acked: HashSet<String> = HashSet::new();
    let mut seq = 0u64;
    for round in 0..20 {
        let mut store = start(&pair);
        // Every event its own alert, so presence after the restart proves durability.
        let burst: Vec<_> = (0..3_000)
            .map(|_| {
                seq += 1;
                occurrence(&origin, seq, format!("r-{seq}"))
            })
            .collect();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<String>>();
        let sender = tokio::spawn(async move {
            // Sends until killed; each acknowledged batch is reported.
            send_reliably(
                addr,
                &burst,
                100,
                Duration::ZERO,
                Duration::from_secs(5),
                |chunk| {
                    let ids = chunk.iter().map(|e| e.identifier().to_string()).collect();
                    let _ = tx.send(ids);
                },
            )
            .await;
        });
        let wait = 20 + next(&mut rng) % 400;
        tokio::time::sleep(Duration::from_millis(wait)).await;
        store.kill();
        sender.abort();
        let _ = sender.await;
        while let Ok(ids) = rx.try_recv() {
            acked.extend(ids);
        }
        let store = start(&pair);
        let present: HashSet<String> = alerts(addr)
            .await
            .into_iter()
            .map(|a| a.identifier)
            .collect();
        let missing: Vec<_> = acked.difference(&present).take(5).collect();
        assert!(
            missing.is_empty(),
            "round {round} (killed after {wait} ms): acknowledged but missing after restart: {missing:?}"
        );
        drop(store);
    }
    assert!(
        !acked.is_empty(),
        "some events were acknowledged before the kills"
    );
}
