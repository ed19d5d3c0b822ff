//! Gateway figures with two real stores and a gateway in one process, on loopback:
//!
//! 1. full resync: an empty store brought level with one holding 1,000,000 alerts (its log
//!    trimmed, so only a snapshot can do it);
//! 2. log catch-up: a store 100,000 events behind, within the retained log;
//! 3. live replication lag at 50,000 events/s: from a batch's acknowledgement on the sender to
//!    the gateway's report that the receiver has applied it.
//!
//! `cargo bench -p tandem-gateway --bench resync`; `TANDEM_BENCH_ALERTS` changes the 1,000,000,
//! `TANDEM_BENCH_ONLY=full|catchup|live` runs one part. Prints one line per figure.

// The allocator the tandem binary uses.
#[global_allocator]
static GLOBAL: tandem_alloc::MiMalloc = tandem_alloc::MiMalloc;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tandem_gateway::GatewayOptions;
use tandem_probe::Connection;
use tandem_protocol::{
    AlertFields, ClientKind, DEFAULT_MAX_FRAME, Event, EventBody, Message, Origin, Role, Severity,
};
use tandem_store::StoreOptions;
use tandem_store::engine::{LogLimits, Shared};
use tokio_util::sync::CancellationToken;

struct Store {
    shared: Arc<Shared>,
    addr: SocketAddr,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Store {
    async fn start(name: &str, role: Role, dir: &std::path::Path, retention: u64) -> Store {
        let options = StoreOptions {
            // The log keeps only `retention` entries, held for the peer or not: the sender's
            // must be trimmed for a full resync to be needed.
            log_limits: LogLimits {
                retention,
                max: retention,
            },
            ..StoreOptions::new(
                name,
                role,
                "127.0.0.1:0".parse().expect("address"),
                dir.join(name),
            )
        };
        let stop = CancellationToken::new();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                let ran = tandem_store::run(options, stop, move |shared, addr| {
                    let _ = tx.send((shared, addr));
                })
                .await;
                ran.expect("store runs");
            }
        });
        let (shared, addr) = rx.await.expect("store started");
        Store {
            shared,
            addr,
            stop,
            task,
        }
    }

    async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

fn gateway(p: &Store, b: &Store) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let options = GatewayOptions {
        name: "GW".into(),
        primary: ("AGG_P".into(), p.addr),
        backup: ("AGG_B".into(), b.addr),
        max_frame: DEFAULT_MAX_FRAME,
        dead_after: Duration::from_secs(5),
        resync_page: page(),
        resync_rate: 0,
        tls: None,
    };
    let stop = CancellationToken::new();
    let task = tokio::spawn(tandem_gateway::run(options, stop.clone(), |_| {}));
    (stop, task)
}

/// `TANDEM_BENCH_PAGE`, or the pair file's default.
fn page() -> u32 {
    std::env::var("TANDEM_BENCH_PAGE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4_000)
}

fn event(origin: &Origin, seq: u64, id: u64) -> Event {
    Event {
        origin: origin.clone(),
        seq,
        time: 1_700_000_000_000 + seq as i64,
        body: EventBody::Occurrence(
            AlertFields {
                identifier: format!("host{id:07}:disk:/var"),
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

async fn connect(addr: SocketAddr) -> Connection {
    Connection::connect(
        addr,
        ClientKind::Probe,
        "bench",
        DEFAULT_MAX_FRAME,
        Duration::from_secs(30),
    )
    .await
    .expect("connect")
}

/// Writes `n` events over `identifiers` alerts, eight batches in flight.
async fn fill(addr: SocketAddr, origin: &str, n: u64, identifiers: u64) {
    let mut conn = connect(addr).await;
    let origin = Origin::new(origin, 1);
    let (mut sent, mut acked, mut batch) = (0u64, 0u64, 0u64);
    while acked < batch || sent < n {
        if sent < n && batch - acked < 8 {
            let events: Vec<Event> = (sent..(sent + 5_000).min(n))
                .map(|i| event(&origin, i + 1, i % identifiers))
                .collect();
            sent += events.len() as u64;
            batch += 1;
            conn.send(&Message::Events { batch, events })
                .await
                .expect("send");
            continue;
        }
        let answer = conn.recv().await.expect("ack");
        assert!(matches!(answer, Message::Ack { .. }), "{answer:?}");
        acked += 1;
    }
}

async fn until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn alerts_wanted() -> u64 {
    std::env::var("TANDEM_BENCH_ALERTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000)
}

async fn full_resync() {
    let n = alerts_wanted();
    let dir = tempfile::tempdir().expect("tempdir");
    let p = Store::start("AGG_P", Role::Primary, dir.path(), 1_000).await;
    fill(p.addr, "filler", n, n).await;
    let b = Store::start("AGG_B", Role::Backup, dir.path(), 1_000).await;
    // Said before the timed part, so a profiler can be attached to it alone.
    println!("sender filled with {n} alerts; resync starts");
    let started = Instant::now();
    let (gw, task) = gateway(&p, &b);
    let shared = b.shared.clone();
    let head = p.shared.head_lsn();
    // At least: the receiver adds an alert of its own (the notice that it is resynced).
    until("full resync", Duration::from_secs(600), || {
        shared.alert_count() >= n && shared.db.cursor("AGG_P").unwrap_or(0) >= head
    })
    .await;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "full resync: {n} alerts into an empty store in {secs:.2} s ({:.0} alerts/s), pages of {}",
        n as f64 / secs,
        page()
    );
    gw.cancel();
    let _ = task.await;
    b.stop().await;
    p.stop().await;
}

async fn catch_up() {
    let gap = 100_000;
    let dir = tempfile::tempdir().expect("tempdir");
    let p = Store::start("AGG_P", Role::Primary, dir.path(), 2_000_000).await;
    let b = Store::start("AGG_B", Role::Backup, dir.path(), 2_000_000).await;
    fill(p.addr, "filler", gap, 10_000).await;
    let head = p.shared.head_lsn();
    let started = Instant::now();
    let (gw, task) = gateway(&p, &b);
    let shared = b.shared.clone();
    until("catch-up", Duration::from_secs(600), || {
        shared.db.cursor("AGG_P").unwrap_or(0) >= head
    })
    .await;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "log catch-up: {gap} events (10,000 alerts) in {secs:.2} s ({:.0} events/s)",
        gap as f64 / secs
    );
    gw.cancel();
    let _ = task.await;
    b.stop().await;
    p.stop().await;
}

async fn live_lag() {
    let (rate, seconds, batch) = (50_000u64, 10u64, 500u64);
    let dir = tempfile::tempdir().expect("tempdir");
    let p = Store::start("AGG_P", Role::Primary, dir.path(), 2_000_000).await;
    let b = Store::start("AGG_B", Role::Backup, dir.path(), 2_000_000).await;
    let (gw, task) = gateway(&p, &b);
    let mut cursor = p.shared.peer_cursor.subscribe();
    // Acknowledged batches waiting for the receiver: (acknowledged at, sender's head then).
    let waiting = Arc::new(std::sync::Mutex::new(std::collections::VecDeque::<(
        Instant,
        u64,
    )>::new()));
    let hist = Arc::new(std::sync::Mutex::new(
        Histogram::<u64>::new(3).expect("histogram"),
    ));
    let monitor = tokio::spawn({
        let (waiting, hist) = (waiting.clone(), hist.clone());
        async move {
            while cursor.changed().await.is_ok() {
                let at = *cursor.borrow_and_update();
                let now = Instant::now();
                let mut waiting = waiting.lock().expect("lock");
                while waiting.front().is_some_and(|(_, lsn)| *lsn <= at) {
                    if let Some((acked, _)) = waiting.pop_front() {
                        let _ = hist
                            .lock()
                            .expect("lock")
                            .record((now - acked).as_micros() as u64);
                    }
                }
            }
        }
    });
    let mut conn = connect(p.addr).await;
    let origin = Origin::new("live", 1);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(batch as f64 / rate as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let total = rate * seconds;
    let started = Instant::now();
    let mut seq = 0;
    while seq < total {
        tick.tick().await;
        let events: Vec<Event> = (0..batch)
            .map(|_| {
                seq += 1;
                event(&origin, seq, seq % 10_000)
            })
            .collect();
        let answer = conn
            .request(
                &Message::Events { batch: seq, events },
                Duration::from_secs(30),
            )
            .await
            .expect("ack");
        assert!(matches!(answer, Message::Ack { .. }), "{answer:?}");
        let head = p.shared.head_lsn();
        waiting
            .lock()
            .expect("lock")
            .push_back((Instant::now(), head));
    }
    let offered = total as f64 / started.elapsed().as_secs_f64();
    until("the receiver catching up", Duration::from_secs(60), || {
        waiting.lock().map(|w| w.is_empty()).unwrap_or(false)
    })
    .await;
    let hist = hist.lock().expect("lock").clone();
    println!(
        "live replication lag at {offered:.0} events/s for {seconds} s (batches of {batch}): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; {} events applied on the receiver",
        hist.value_at_quantile(0.5) as f64 / 1000.0,
        hist.value_at_quantile(0.99) as f64 / 1000.0,
        hist.max() as f64 / 1000.0,
        b.shared.events_applied.load(Ordering::Relaxed),
    );
    monitor.abort();
    gw.cancel();
    let _ = task.await;
    b.stop().await;
    p.stop().await;
}

fn main() {
    tandem_alloc::tune();
    // `cargo test --benches` runs bench binaries without --bench: do nothing then.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    // RUST_LOG=info shows what the stores and the gateway log.
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let only = std::env::var("TANDEM_BENCH_ONLY").unwrap_or_default();
    rt.block_on(async {
        if only.is_empty() || only == "full" {
            full_resync().await;
        }
        if only.is_empty() || only == "catchup" {
            catch_up().await;
        }
        if only.is_empty() || only == "live" {
            live_lag().await;
        }
    });
}
