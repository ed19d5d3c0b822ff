//! The change log as a subscriber (the gateway) sees it: every applied event once, in LSN
//! order, pushed as it becomes durable; its own entries left out on request; and a clear
//! answer when the requested position is no longer retained.

#![allow(clippy::unwrap_used)] // a test that cannot read its own fixture should fail

use std::time::Duration;

use tandem_protocol::message::LogEntry;
use tandem_protocol::{Message, Origin};
use tandem_tests::Pair;
use tandem_tests::client::{connect, occurrence, send_reliably};

/// A subscription to the store at `addr` from `from_lsn`, leaving out `skip_source`'s entries.
async fn subscribe(
    addr: std::net::SocketAddr,
    from_lsn: u64,
    skip_source: Option<&str>,
) -> tandem_probe::Connection {
    let mut conn = connect(addr, Duration::from_secs(30)).await;
    conn.send(&Message::Subscribe {
        from_lsn,
        skip_source: skip_source.map(str::to_owned),
    })
    .await
    .unwrap();
    conn
}

async fn read_entries(conn: &mut tandem_probe::Connection, want: usize) -> Vec<LogEntry> {
    let mut got = Vec::new();
    while got.len() < want {
        match tokio::time::timeout(Duration::from_secs(10), conn.recv()).await {
            Ok(Ok(Message::LogEntries { entries, .. })) => got.extend(entries.decode().unwrap()),
            other => panic!(
                "expected log entries, got {other:?} after {} entries",
                got.len()
            ),
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_get_every_entry_in_order_and_then_live_ones() {
    let pair = Pair::new(|t| t);
    let addr = pair.file.store("AGG_P").unwrap().listen.0;
    let _store = pair.spawn(&["store", "--name", "AGG_P"], "agg_p");
    let origin = Origin::new("log", 1);
    let events: Vec<_> = (1..=60)
        .map(|s| occurrence(&origin, s, format!("id{}", s % 7)))
        .collect();
    send_reliably(
        addr,
        &events[..50],
        10,
        Duration::ZERO,
        Duration::from_secs(30),
        |_| {},
    )
    .await;
    // A resend of the same events must not add entries.
    send_reliably(
        addr,
        &events[..50],
        10,
        Duration::ZERO,
        Duration::from_secs(30),
        |_| {},
    )
    .await;

    let mut sub = subscribe(addr, 1, None).await;
    let first = read_entries(&mut sub, 50).await;
    assert_eq!(first.len(), 50);
    for (i, entry) in first.iter().enumerate() {
        assert_eq!(entry.lsn, i as u64 + 1);
        assert_eq!(entry.event, events[i]);
        assert_eq!(&*entry.source, "AGG_P");
    }

    send_reliably(
        addr,
        &events[50..],
        10,
        Duration::ZERO,
        Duration::from_secs(30),
        |_| {},
    )
    .await;
    let live = read_entries(&mut sub, 10).await;
    assert_eq!(
        live.iter().map(|e| e.lsn).collect::<Vec<_>>(),
        (51..=60).collect::<Vec<_>>()
    );

    // From the middle, leaving out what came from AGG_P itself: nothing to send.
    let mut skip = subscribe(addr, 30, Some("AGG_P")).await;
    match tokio::time::timeout(Duration::from_secs(10), skip.recv()).await {
        Ok(Ok(Message::LogEntries {
            entries,
            last_lsn,
            head_lsn,
        })) => {
            assert!(entries.is_empty());
            assert_eq!(last_lsn, 60, "the page covers what it left out");
            assert_eq!(head_lsn, 60);
        }
        other => panic!("expected an empty page, got {other:?}"),
    }
}

/// A subscriber far behind the head (a gateway catching up after an outage) reads the log on
/// the store's blocking threads, then from memory once near the head: every entry arrives once,
/// in order, across the change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_far_behind_gets_every_entry_in_order() {
    const N: u64 = 130_000;
    let pair = Pair::new(|t| t);
    let addr = pair.file.store("AGG_P").unwrap().listen.0;
    let _store = pair.spawn(&["store", "--name", "AGG_P"], "agg_p");
    let origin = Origin::new("far", 1);
    let events: Vec<_> = (1..=N)
        .map(|s| occurrence(&origin, s, format!("id{}", s % 1_000)))
        .collect();
    send_reliably(
        addr,
        &events,
        5_000,
        Duration::ZERO,
        Duration::from_secs(240),
        |_| {},
    )
    .await;

    let mut sub = subscribe(addr, 1, None).await;
    let got = read_entries(&mut sub, N as usize).await;
    assert_eq!(got.len(), N as usize);
    for (i, entry) in got.iter().enumerate() {
        assert_eq!(entry.lsn, i as u64 + 1);
        assert_eq!(entry.event, events[i], "entry {}", entry.lsn);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trimmed_position_is_reported() {
    let pair = Pair::new(|t| {
        t.replace(
            "data_dir = \"agg_p\"",
            "data_dir = \"agg_p\"\nlog_retention_entries = 100",
        )
    });
    let addr = pair.file.store("AGG_P").unwrap().listen.0;
    let _store = pair.spawn(&["store", "--name", "AGG_P"], "agg_p");
    let origin = Origin::new("trim", 1);
    let events: Vec<_> = (1..=300)
        .map(|s| occurrence(&origin, s, format!("id{s}")))
        .collect();
    send_reliably(
        addr,
        &events,
        20,
        Duration::ZERO,
        Duration::from_secs(30),
        |_| {},
    )
    .await;

    let mut sub = subscribe(addr, 1, None).await;
    match tokio::time::timeout(Duration::from_secs(10), sub.recv()).await {
        Ok(Ok(Message::LogTrimmed { first_lsn })) => assert_eq!(first_lsn, 201),
        other => panic!("expected LogTrimmed, got {other:?}"),
    }
    let mut ok = subscribe(addr, 201, None).await;
    let entries = read_entries(&mut ok, 100).await;
    assert_eq!(entries.first().map(|e| e.lsn), Some(201));
    assert_eq!(entries.last().map(|e| e.lsn), Some(300));
}
