//! The proxy's costs, with the store and proxy in a child process and the load in this one:
//!
//! 1. throughput of 64 probes through one proxy into one store, against the same 64 probes
//!    straight to the store (the proxy's overhead as a ratio);
//! 2. the store-and-proxy process's resident memory with 10,000 idle probe connections.
//!
//! `cargo bench -p tandem-proxy --bench proxy` (the idle part needs `ulimit -n` above 10,100).

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tandem_probe::Connection;
use tandem_protocol::{
    AlertFields, ClientKind, DEFAULT_MAX_FRAME, Event, EventBody, Message, Origin, Role, Severity,
};
use tokio_util::sync::CancellationToken;

#[global_allocator]
static GLOBAL: tandem_alloc::MiMalloc = tandem_alloc::MiMalloc;

const SENDERS: u64 = 64;
const PER_SENDER: u64 = 10_000;
const BATCH: u64 = 64;
const IDLE: usize = 10_000;

/// The child: a store and a proxy in front of it, until standard input closes.
async fn child() {
    let dir = tempfile::tempdir().expect("tempdir");
    let shutdown = CancellationToken::new();
    let (store_tx, store_rx) = tokio::sync::oneshot::channel();
    let store = tokio::spawn(tandem_store::run(
        tandem_store::StoreOptions::new(
            "AGG_P",
            Role::Primary,
            "127.0.0.1:0".parse().expect("address"),
            dir.path().to_path_buf(),
        ),
        shutdown.clone(),
        |_, addr| {
            let _ = store_tx.send(addr);
        },
    ));
    let store_addr = store_rx.await.expect("store address");
    let (proxy_tx, proxy_rx) = tokio::sync::oneshot::channel();
    let proxy = tokio::spawn(tandem_proxy::run(
        tandem_proxy::ProxyOptions {
            name: "PROXY_P".into(),
            listen: "127.0.0.1:0".parse().expect("address"),
            store_name: "AGG_P".into(),
            store_addr,
            max_frame: DEFAULT_MAX_FRAME,
            max_probes: 20_000,
            max_in_flight_per_probe: 10_000,
            heartbeat: Duration::from_millis(200),
            dead_after: Duration::from_millis(500),
            redirect_to: None,
            tls: None,
            store_tls: None,
        },
        shutdown.clone(),
        |_, addr| {
            let _ = proxy_tx.send(addr);
        },
    ));
    let proxy_addr = proxy_rx.await.expect("proxy address");
    // Let the proxy's store link come up before reporting ready.
    tokio::time::sleep(Duration::from_millis(300)).await;
    println!("READY {proxy_addr} {store_addr}");
    let _ = std::io::stdout().flush();
    tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        while std::io::stdin()
            .read_line(&mut line)
            .map(|n| n > 0)
            .unwrap_or(false)
        {
            line.clear();
        }
    })
    .await
    .expect("stdin watcher");
    shutdown.cancel();
    let _ = proxy.await;
    let _ = store.await;
}

fn event(origin: &Origin, seq: u64) -> Event {
    Event {
        origin: origin.clone(),
        seq,
        time: 1_700_000_000_000 + seq as i64,
        body: EventBody::Occurrence(
            AlertFields {
                identifier: format!("host{:05}:disk", seq % 10_000),
                node: format!("host{:05}", seq % 10_000),
                summary: "filesystem /var is 91% full (threshold 90%), growth 1.2 GiB/h".into(),
                severity: Severity::MINOR,
                ..AlertFields::default()
            }
            .pack(),
        ),
    }
}

async fn sender(addr: SocketAddr, n: u64, run: u64) {
    let mut conn = Connection::connect(
        addr,
        ClientKind::Probe,
        "bench",
        DEFAULT_MAX_FRAME,
        Duration::from_secs(5),
    )
    .await
    .expect("connect");
    let origin = Origin::new(format!("bench-{run}-{n}"), 1);
    let mut seq = 0;
    while seq < PER_SENDER {
        let events: Vec<Event> = (0..BATCH)
            .map(|_| {
                seq += 1;
                event(&origin, seq)
            })
            .collect();
        let reply = conn
            .request(
                &Message::Events { batch: seq, events },
                Duration::from_secs(30),
            )
            .await
            .expect("answer");
        assert!(matches!(reply, Message::Ack { .. }), "{reply:?}");
    }
}

async fn throughput(addr: SocketAddr, run: u64) -> f64 {
    let started = Instant::now();
    let tasks: Vec<_> = (0..SENDERS)
        .map(|n| tokio::spawn(sender(addr, n, run)))
        .collect();
    for t in tasks {
        t.await.expect("sender");
    }
    (SENDERS * PER_SENDER) as f64 / started.elapsed().as_secs_f64()
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn main() {
    tandem_alloc::tune();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    if std::env::var_os("TANDEM_BENCH_CHILD").is_some() {
        rt.block_on(child());
        return;
    }
    // `cargo test --benches` runs bench binaries without --bench: do nothing then.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    // Each measurement gets a fresh store: a store that has just taken 640,000 events is busy
    // flushing and compacting, which would count against whichever run came second.
    let idle = with_child(|proxy, _, pid| idle_cost(proxy, pid), &rt);
    let direct = with_child(|_, store, _| throughput(store, 1), &rt);
    let through = with_child(|proxy, _, _| throughput(proxy, 2), &rt);
    println!("{idle}");
    println!(
        "{SENDERS} probes x {PER_SENDER} events (batches of {BATCH}, one in flight each): straight to the store {direct:.0} events/s, through the proxy {through:.0} events/s, ratio {:.2}",
        through / direct
    );
}

/// Runs `f` against a fresh child (store and proxy), then stops the child.
fn with_child<T, F: std::future::Future<Output = T>>(
    f: impl FnOnce(SocketAddr, SocketAddr, u32) -> F,
    rt: &tokio::runtime::Runtime,
) -> T {
    let mut child = Command::new(std::env::current_exe().expect("own path"))
        .env("TANDEM_BENCH_CHILD", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("child starts");
    let mut ready = String::new();
    BufReader::new(child.stdout.take().expect("child stdout"))
        .read_line(&mut ready)
        .expect("ready line");
    let mut parts = ready.split_whitespace().skip(1);
    let proxy: SocketAddr = parts
        .next()
        .and_then(|a| a.parse().ok())
        .expect("proxy address");
    let store: SocketAddr = parts
        .next()
        .and_then(|a| a.parse().ok())
        .expect("store address");
    let out = rt.block_on(f(proxy, store, child.id()));
    drop(child.stdin.take());
    let _ = child.wait();
    out
}

async fn idle_cost(proxy: SocketAddr, pid: u32) -> String {
    let before = rss_kib(pid);
    let mut idle = Vec::with_capacity(IDLE);
    for _ in 0..IDLE {
        let conn = Connection::connect(
            proxy,
            ClientKind::Probe,
            "idle",
            DEFAULT_MAX_FRAME,
            Duration::from_secs(10),
        )
        .await;
        match conn {
            Ok(conn) => idle.push(conn),
            Err(e) => {
                println!("stopped at {} idle connections: {e}", idle.len());
                break;
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kib(pid);
    let count = idle.len();
    drop(idle);
    format!(
        "{count} idle probe connections: store+proxy process RSS {} MiB (was {} MiB), {:.1} KiB per connection",
        after / 1024,
        before / 1024,
        after.saturating_sub(before) as f64 / count.max(1) as f64
    )
}
