//! What TLS costs, with a store and a proxy in this process:
//!
//! 1. events/s of 64 probes through the proxy into the store, every link over mutual TLS,
//!    against the same in plaintext (the ratio is the figure);
//! 2. 1,000 probes connecting at once: the time until all have been welcomed, TLS against
//!    plaintext; and one probe at a time, the time from connect to welcome.
//!
//! `cargo bench -p tandem-proxy --bench tls` (`TANDEM_BENCH_ONLY=throughput|handshake` runs one
//! part). Certificates are made here (rcgen).

#[global_allocator]
static GLOBAL: tandem_alloc::MiMalloc = tandem_alloc::MiMalloc;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
use tandem_net::tls::{ClientTls, ServerTls};
use tandem_probe::Connection;
use tandem_protocol::{
    AlertFields, ClientKind, DEFAULT_MAX_FRAME, Event, EventBody, Message, Origin, Role, Severity,
};
use tokio_util::sync::CancellationToken;

const SENDERS: u64 = 64;
const PER_SENDER: u64 = 10_000;
const BATCH: u64 = 64;
const CONNECTIONS: usize = 1_000;

struct Tls {
    server: Arc<ServerTls>,
    member: Arc<ClientTls>,
    probe: Arc<ClientTls>,
}

/// A CA, one certificate for both components (naming the pair) and one for probes.
fn certs(dir: &Path) -> Tls {
    let ca_key = KeyPair::generate().expect("key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    std::fs::write(
        dir.join("ca.crt"),
        ca.self_signed(&ca_key).expect("ca").pem(),
    )
    .expect("write");
    let issuer = Issuer::new(ca, ca_key);
    for (name, names) in [
        ("member", vec!["AGG_V", "127.0.0.1"]),
        ("probe", vec!["probe"]),
    ] {
        let key = KeyPair::generate().expect("key");
        let mut params =
            CertificateParams::new(names.into_iter().map(String::from).collect::<Vec<_>>())
                .expect("params");
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &issuer).expect("cert");
        std::fs::write(dir.join(format!("{name}.crt")), cert.pem()).expect("write");
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).expect("write");
    }
    let ca = dir.join("ca.crt");
    let pem = |n: &str| (dir.join(format!("{n}.crt")), dir.join(format!("{n}.key")));
    let (cert, key) = pem("member");
    Tls {
        server: ServerTls::load(ca.clone(), cert, key, true).expect("server tls"),
        member: ClientTls::load(ca.clone(), Some(pem("member")), "AGG_V").expect("member tls"),
        probe: ClientTls::load(ca, Some(pem("probe")), "AGG_V").expect("probe tls"),
    }
}

/// A store and a proxy in front of it; returns the proxy's address.
async fn pair(dir: &Path, tls: Option<&Tls>, shutdown: &CancellationToken) -> SocketAddr {
    let (store_tx, store_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(tandem_store::run(
        tandem_store::StoreOptions {
            tls: tls.map(|t| t.server.clone()),
            ..tandem_store::StoreOptions::new(
                "AGG_P",
                Role::Primary,
                "127.0.0.1:0".parse().expect("address"),
                dir.join("store"),
            )
        },
        shutdown.clone(),
        |_, addr| {
            let _ = store_tx.send(addr);
        },
    ));
    let store_addr = store_rx.await.expect("store address");
    let (proxy_tx, proxy_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(tandem_proxy::run(
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
            tls: tls.map(|t| t.server.clone()),
            store_tls: tls.map(|t| t.member.clone()),
        },
        shutdown.clone(),
        |_, addr| {
            let _ = proxy_tx.send(addr);
        },
    ));
    let addr = proxy_rx.await.expect("proxy address");
    // Ready once the proxy's store link is up: a probe is accepted.
    let deadline = Instant::now() + Duration::from_secs(30);
    while connect(addr, tls).await.is_err() {
        assert!(Instant::now() < deadline, "the proxy never became ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    addr
}

async fn connect(addr: SocketAddr, tls: Option<&Tls>) -> Result<Connection, String> {
    Connection::connect_tls(
        addr,
        ClientKind::Probe,
        "bench",
        DEFAULT_MAX_FRAME,
        Duration::from_secs(30),
        tls.map(|t| &*t.probe),
    )
    .await
    .map_err(|e| e.to_string())
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

async fn throughput(addr: SocketAddr, tls: Option<Arc<Tls>>, run: &str) -> f64 {
    let started = Instant::now();
    let tasks: Vec<_> = (0..SENDERS)
        .map(|n| {
            let (tls, origin) = (tls.clone(), Origin::new(format!("{run}-{n}"), 1));
            tokio::spawn(async move {
                let mut conn = connect(addr, tls.as_deref()).await.expect("connect");
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
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("sender");
    }
    (SENDERS * PER_SENDER) as f64 / started.elapsed().as_secs_f64()
}

/// Seconds until `CONNECTIONS` probes connecting at once have all been welcomed.
async fn handshakes(addr: SocketAddr, tls: Option<Arc<Tls>>) -> f64 {
    let started = Instant::now();
    let tasks: Vec<_> = (0..CONNECTIONS)
        .map(|_| {
            let tls = tls.clone();
            tokio::spawn(async move { connect(addr, tls.as_deref()).await.expect("connect") })
        })
        .collect();
    let mut held = Vec::with_capacity(CONNECTIONS);
    for t in tasks {
        held.push(t.await.expect("connection"));
    }
    started.elapsed().as_secs_f64()
}

const SEQUENTIAL: usize = 200;

/// Mean seconds from connect to welcome, one probe at a time.
async fn one_by_one(addr: SocketAddr, tls: Option<Arc<Tls>>) -> f64 {
    let started = Instant::now();
    for _ in 0..SEQUENTIAL {
        drop(connect(addr, tls.as_deref()).await.expect("connect"));
    }
    started.elapsed().as_secs_f64() / SEQUENTIAL as f64
}

fn main() {
    tandem_alloc::tune();
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let tls = Arc::new(certs(dir.path()));
        let shutdown = CancellationToken::new();
        let plain_dir = dir.path().join("plain");
        let tls_dir = dir.path().join("tls");
        let plain = pair(&plain_dir, None, &shutdown).await;
        let secure = pair(&tls_dir, Some(&tls), &shutdown).await;
        let only = std::env::var("TANDEM_BENCH_ONLY").unwrap_or_default();
        let best = |v: &[f64]| v.iter().cloned().fold(f64::MAX, f64::min);
        if only.is_empty() || only == "throughput" {
            // Alternate, so that neither side always runs on a warmer machine.
            let (mut p, mut t) = (Vec::new(), Vec::new());
            for round in 0..3 {
                p.push(throughput(plain, None, &format!("plain{round}")).await);
                t.push(throughput(secure, Some(tls.clone()), &format!("tls{round}")).await);
            }
            let top = |v: &[f64]| v.iter().cloned().fold(0.0, f64::max);
            println!(
                "{SENDERS} probes x {PER_SENDER} events (batches of {BATCH}) through the proxy into the store: plaintext {:.0} events/s, mutual TLS on both links {:.0} events/s, ratio {:.2} (best of 3 each)",
                top(&p),
                top(&t),
                top(&t) / top(&p)
            );
        }
        if only.is_empty() || only == "handshake" {
            let (mut p, mut t) = (Vec::new(), Vec::new());
            for _ in 0..3 {
                p.push(handshakes(plain, None).await);
                t.push(handshakes(secure, Some(tls.clone())).await);
            }
            println!(
                "{CONNECTIONS} probes connecting at once, all welcomed: {:.3} s plaintext, {:.3} s with mutual TLS (best of 3 each)",
                best(&p),
                best(&t),
            );
            let (mut p, mut t) = (Vec::new(), Vec::new());
            for _ in 0..3 {
                p.push(one_by_one(plain, None).await);
                t.push(one_by_one(secure, Some(tls.clone())).await);
            }
            println!(
                "one probe at a time, connect to welcome: {:.2} ms plaintext, {:.2} ms with mutual TLS (mean of {SEQUENTIAL}, best of 3)",
                best(&p) * 1000.0,
                best(&t) * 1000.0,
            );
        }
        shutdown.cancel();
    });
}
