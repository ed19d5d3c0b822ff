//! Durable store figures that need a running store rather than criterion's loop:
//!
//! 1. group-commit throughput and acknowledgement latency with 64 concurrent senders (each
//!    event synced to disk before its acknowledgement);
//! 2. the time to load 1,000,000 alerts at start and the resident memory per alert.
//!
//! `cargo bench -p tandem-store --bench durable` (set `TANDEM_BENCH_ALERTS` to change the
//! 1,000,000). Prints one line per figure.

use std::net::SocketAddr;

// The allocator the tandem binary uses.
#[global_allocator]
static GLOBAL: tandem_alloc::MiMalloc = tandem_alloc::MiMalloc;

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tandem_probe::Connection;
use tandem_protocol::{
    AlertFields, ClientKind, DEFAULT_MAX_FRAME, Event, EventBody, Message, Origin, Role, Severity,
};
use tandem_store::{StoreOptions, engine};
use tokio_util::sync::CancellationToken;

fn options(dir: &std::path::Path) -> StoreOptions {
    StoreOptions::new(
        "AGG_P",
        Role::Primary,
        "127.0.0.1:0".parse().expect("address"),
        dir.to_path_buf(),
    )
}

fn event(origin: &Origin, seq: u64, id: u64) -> Event {
    Event {
        origin: origin.clone(),
        seq,
        time: 1_700_000_000_000 + seq as i64,
        body: EventBody::Occurrence(
            AlertFields {
                identifier: format!("host{:07}:disk:/var", id),
                node: format!("host{id:07}"),
                alert_key: "/var".into(),
                alert_group: "disk".into(),
                manager: "bench".into(),
                summary: format!(
                    "filesystem /var on host{id:07} is 91% full (threshold 90%), growth 1.2 GiB/h"
                ),
                severity: Severity::MINOR,
                ..AlertFields::default()
            }
            .pack(),
        ),
    }
}

async fn sender(
    addr: SocketAddr,
    n: u64,
    events: u64,
    batch: u64,
    identifiers: u64,
    pace: Option<Duration>,
) -> Histogram<u64> {
    let mut hist = Histogram::<u64>::new(3).expect("histogram");
    let mut conn = Connection::connect(
        addr,
        ClientKind::Probe,
        &format!("bench-{n}"),
        DEFAULT_MAX_FRAME,
        Duration::from_secs(5),
    )
    .await
    .expect("connect");
    let origin = Origin::new(format!("bench-{n}"), 1);
    let mut seq = 0;
    let mut id = 0;
    let mut tick = pace.map(|every| {
        let mut t = tokio::time::interval(every);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        t
    });
    while seq < events {
        if let Some(t) = tick.as_mut() {
            t.tick().await;
        }
        let chunk: Vec<Event> = (0..batch.min(events - seq))
            .map(|_| {
                seq += 1;
                id = (id + 7919) % identifiers;
                event(&origin, seq, id)
            })
            .collect();
        let started = Instant::now();
        let reply = conn
            .request(
                &Message::Events {
                    batch: seq,
                    events: chunk,
                },
                Duration::from_secs(30),
            )
            .await
            .expect("ack");
        assert!(matches!(reply, Message::Ack { .. }), "{reply:?}");
        hist.record(started.elapsed().as_micros() as u64)
            .expect("record");
    }
    hist
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// `rate`: events/s over all senders (None: as fast as acknowledgements allow).
async fn throughput(rate: Option<u64>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let shutdown = CancellationToken::new();
    let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
    let store = tokio::spawn(tandem_store::run(
        options(dir.path()),
        shutdown.clone(),
        move |_, addr| {
            let _ = addr_tx.send(addr);
        },
    ));
    let addr = addr_rx.await.expect("store address");
    let (senders, per_sender, batch) = (64u64, 20_000u64, 64u64);
    let started = Instant::now();
    let pace = rate.map(|r| Duration::from_secs_f64(batch as f64 * senders as f64 / r as f64));
    let tasks: Vec<_> = (0..senders)
        .map(|n| tokio::spawn(sender(addr, n, per_sender, batch, 10_000, pace)))
        .collect();
    let mut hist = Histogram::<u64>::new(3).expect("histogram");
    for t in tasks {
        hist.add(t.await.expect("sender")).expect("merge");
    }
    let secs = started.elapsed().as_secs_f64();
    let total = senders * per_sender;
    println!(
        "durable group commit, offered {}: {senders} senders x {per_sender} events (batches of {batch}): {:.0} events/s; ack latency p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms",
        rate.map_or("as fast as acknowledged".to_string(), |r| format!(
            "{r} events/s"
        )),
        total as f64 / secs,
        hist.value_at_quantile(0.5) as f64 / 1000.0,
        hist.value_at_quantile(0.99) as f64 / 1000.0,
        hist.value_at_quantile(0.999) as f64 / 1000.0,
    );
    shutdown.cancel();
    let _ = store.await;
}

fn alerts_wanted() -> u64 {
    std::env::var("TANDEM_BENCH_ALERTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000)
}

/// Writes the alerts through the engine into `path` (run in a child process, so the memory it
/// used does not blur the parent's measurement).
async fn fill(path: std::path::PathBuf) {
    let alerts = alerts_wanted();
    let (shared, tx, thread) = tokio::task::spawn_blocking(move || {
        engine::start("AGG_P", &path, 1024, engine::LogLimits::ALL)
    })
    .await
    .expect("join")
    .expect("open");
    let origin = Origin::new("filler", 1);
    let mut pending = Vec::new();
    for start in (0..alerts).step_by(5_000) {
        let events: Vec<Event> = (start..(start + 5_000).min(alerts))
            .map(|i| event(&origin, i + 1, i))
            .collect();
        let (reply, rx) = tokio::sync::oneshot::channel();
        tx.send(engine::Request::Events {
            events,
            encoded: tandem_protocol::RecordBytes::default(),
            reply,
            leftovers: None,
        })
        .await
        .expect("queue");
        pending.push(rx);
        if pending.len() > 8 {
            pending.remove(0).await.expect("ack");
        }
    }
    for rx in pending {
        rx.await.expect("ack");
    }
    assert_eq!(shared.alert_count(), alerts);
    drop(tx);
    drop(shared);
    tokio::task::spawn_blocking(move || thread.join())
        .await
        .expect("join")
        .expect("commit thread");
}

async fn load() {
    let alerts = alerts_wanted();
    let dir = tempfile::tempdir().expect("tempdir");
    let status = std::process::Command::new(std::env::current_exe().expect("own path"))
        .arg("--bench")
        .env("TANDEM_BENCH_FILL", dir.path())
        .status()
        .expect("filler runs");
    assert!(status.success(), "the filler failed");
    let before = rss_kib();
    let started = Instant::now();
    let path = dir.path().to_path_buf();
    let (shared, tx, thread) = tokio::task::spawn_blocking(move || {
        engine::start("AGG_P", &path, 1024, engine::LogLimits::ALL)
    })
    .await
    .expect("join")
    .expect("open");
    let secs = started.elapsed().as_secs_f64();
    let after = rss_kib();
    assert_eq!(shared.alert_count(), alerts);
    println!(
        "load at start: {alerts} alerts in {secs:.2} s; RSS grew {} MiB = {:.0} bytes per alert (each alert has ~100 bytes of text: identifier 21, node 11, summary ~75)",
        after.saturating_sub(before) / 1024,
        after.saturating_sub(before) as f64 * 1024.0 / alerts as f64
    );
    drop(tx);
    drop(shared);
    let _ = tokio::task::spawn_blocking(move || thread.join()).await;
}

fn main() {
    tandem_alloc::tune();
    // `cargo test --benches` runs bench binaries with --bench absent: do nothing then.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // TANDEM_BENCH_ONLY=throughput|load runs one part (for profiling).
    let only = std::env::var("TANDEM_BENCH_ONLY").unwrap_or_default();
    if let Some(path) = std::env::var_os("TANDEM_BENCH_FILL") {
        rt.block_on(fill(path.into()));
        return;
    }
    rt.block_on(async {
        if only.is_empty() || only == "throughput" {
            throughput(None).await;
            throughput(Some(200_000)).await;
        }
        if only.is_empty() || only == "load" {
            load().await;
        }
    });
}
