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

/// Sends `events` to the empty store at `addr` in batches of `batch`, then reads its whole log
/// as a subscriber: every event once, in order, at LSNs from 1.
async fn sent_then_read_in_order(
    addr: std::net::SocketAddr,
    events: &[tandem_protocol::Event],
    batch: usize,
    limit: Duration,
) {
    send_reliably(addr, events, batch, Duration::ZERO, limit, |_| {}).await;
    let mut sub = subscribe(addr, 1, None).await;
    let got = read_entries(&mut sub, events.len()).await;
    assert_eq!(got.len(), events.len());
    for (i, entry) in got.iter().enumerate() {
        assert_eq!(entry.lsn, i as u64 + 1);
        assert_eq!(entry.event, events[i], "entry {}", entry.lsn);
    }
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
    sent_then_read_in_order(addr, &events, 5_000, Duration::from_secs(240)).await;
}

/// Entries larger than a thousandth of the largest frame (alerts carrying big payloads): a page
/// of the log is cut where the frame would be over the limit, never refused whole, so a
/// subscriber keeps getting every entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_entries_reach_a_subscriber_in_pages_under_the_frame_limit() {
    const N: u64 = 60;
    let pair = Pair::new(|t| t);
    let addr = pair.file.store("AGG_P").unwrap().listen.0;
    let _store = pair.spawn(&["store", "--name", "AGG_P"], "agg_p");
    let origin = Origin::new("big", 1);
    // 60 entries of 400 KB: 24 MB, over the default 16 MiB frame.
    let events: Vec<_> = (1..=N)
        .map(|s| {
            let mut fields = tandem_protocol::AlertFields {
                identifier: format!("id{}", s % 7),
                node: "node".into(),
                severity: tandem_protocol::Severity::MAJOR,
                ..Default::default()
            };
            fields.summary = format!("{s} ").repeat(400_000 / 3);
            tandem_protocol::Event {
                origin: origin.clone(),
                seq: s,
                time: 1_700_000_000_000 + s as i64,
                body: tandem_protocol::EventBody::Occurrence(fields.pack()),
            }
        })
        .collect();
    sent_then_read_in_order(addr, &events, 4, Duration::from_secs(60)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trimmed_position_is_reported() {
    let pair = Pair::new(|t| {
        t.replace(
            "data_dir = \"agg_p\"",
            "data_dir = \"agg_p\"\nlog_retention_entries = 100\nlog_max_entries = 100",
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

/// Sends `entries` of the peer `AGG_B`'s log, as a gateway does, following `after`.
async fn replicate(addr: std::net::SocketAddr, batch: u64, after: u64, entries: &[LogEntry]) {
    let mut conn = connect(addr, Duration::from_secs(30)).await;
    let mut log = tandem_protocol::message::LogBatch::default();
    for entry in entries {
        log.push(entry).unwrap();
    }
    let cursor = entries.last().map_or(after, |e| e.lsn);
    conn.send(&Message::Replicate {
        batch,
        peer: "AGG_B".into(),
        after,
        cursor,
        entries: log,
    })
    .await
    .unwrap();
    match tokio::time::timeout(Duration::from_secs(10), conn.recv()).await {
        Ok(Ok(Message::Ack { batch: b, .. })) => assert_eq!(b, batch),
        other => panic!("expected the replicated batch acknowledged, got {other:?}"),
    }
}

/// The log pages a subscriber gets until one reaches `last`: the entries, in order.
async fn read_until(conn: &mut tandem_probe::Connection, last: u64) -> Vec<LogEntry> {
    let mut got = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), conn.recv()).await {
            Ok(Ok(Message::LogEntries {
                entries, last_lsn, ..
            })) => {
                got.extend(entries.decode().unwrap());
                if last_lsn >= last {
                    return got;
                }
            }
            other => panic!("expected log entries up to {last}, got {other:?}"),
        }
    }
}

/// A store's log interleaves its own entries with a peer's. A subscriber leaving out the
/// peer's gets exactly the store's own, whether they come after a run of the peer's or live,
/// and a page covering only the peer's entries still moves it on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_leaving_out_a_source_gets_every_other_entry_between_its_runs() {
    let pair = Pair::new(|t| t);
    let addr = pair.file.store("AGG_P").unwrap().listen.0;
    let _store = pair.spawn(&["store", "--name", "AGG_P"], "agg_p");
    let peer_origin = Origin::new("peer-probe", 1);
    let peer_entry = |lsn: u64| LogEntry {
        lsn,
        source: "AGG_B".into(),
        source_serial: lsn,
        event: occurrence(&peer_origin, lsn, format!("peer{lsn}")),
    };
    let own_origin = Origin::new("own-probe", 1);
    let own: Vec<_> = (1..=4)
        .map(|s| occurrence(&own_origin, s, format!("own{s}")))
        .collect();
    let send_own = |events: Vec<tandem_protocol::Event>| async move {
        send_reliably(
            addr,
            &events,
            10,
            Duration::ZERO,
            Duration::from_secs(30),
            |_| {},
        )
        .await
    };

    // AGG_P's log: 1-5 the peer's, 6-8 its own, 9-13 the peer's.
    replicate(addr, 1, 0, &(1..=5).map(peer_entry).collect::<Vec<_>>()).await;
    send_own(own[..3].to_vec()).await;
    replicate(addr, 2, 5, &(6..=10).map(peer_entry).collect::<Vec<_>>()).await;

    let mut sub = subscribe(addr, 1, Some("AGG_B")).await;
    let got = read_until(&mut sub, 13).await;
    assert_eq!(got.iter().map(|e| e.lsn).collect::<Vec<_>>(), [6, 7, 8]);
    assert!(got.iter().all(|e| &*e.source == "AGG_P"));
    assert_eq!(got[0].event, own[0]);

    // From after the store's own: only the peer's are left, and the page says so.
    let mut rest = subscribe(addr, 9, Some("AGG_B")).await;
    assert!(read_until(&mut rest, 13).await.is_empty());

    // Live: more of the peer's, then one of its own.
    replicate(addr, 3, 10, &(11..=12).map(peer_entry).collect::<Vec<_>>()).await;
    send_own(own[3..].to_vec()).await;
    let live = read_until(&mut sub, 16).await;
    assert_eq!(live.iter().map(|e| e.lsn).collect::<Vec<_>>(), [16]);
    assert_eq!(live[0].event, own[3]);

    // Leaving out the store's own instead: the peer's, all of them, in order.
    let mut peer = subscribe(addr, 1, Some("AGG_P")).await;
    let got = read_until(&mut peer, 16).await;
    let want: Vec<u64> = (1..=5).chain(9..=15).collect();
    assert_eq!(got.iter().map(|e| e.lsn).collect::<Vec<_>>(), want);

    // From the middle of the peer's last run: still none of the peer's.
    let mut late = subscribe(addr, 14, Some("AGG_B")).await;
    let got = read_until(&mut late, 16).await;
    assert_eq!(got.iter().map(|e| e.lsn).collect::<Vec<_>>(), [16]);
}
