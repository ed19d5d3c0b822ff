//! A slow store is not a dead one: a probe that has filled its in-flight window behind a store
//! whose commits take longer than the probe's `dead_after` must wait for its acknowledgements,
//! not fail over. The proxy stops reading such a probe (backpressure), so the probe's own pings
//! go unanswered; the proxy's keepalive is what tells it the link is alive.
//!
//! A stuck store is, though: one that answers heartbeats but acknowledges nothing (a hung
//! disk) must see its probes told to leave.

#![allow(clippy::unwrap_used)] // a test that cannot set itself up should fail

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use tandem_probe::Connection;
use tandem_probe::failover::Settings;
use tandem_probe::pair::{PairClient, PairConfig};
use tandem_probe::spool::Spool;
use tandem_protocol::{
    AlertFields, ClientKind, DEFAULT_MAX_FRAME, Directive, Event, EventBody, Message, MessageCodec,
    Origin, PROTOCOL_VERSION, Role, Welcome,
};
use tandem_proxy::ProxyOptions;
use tokio::net::TcpListener;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

/// Longer than the probe's `dead_after` below, several times over.
const COMMIT: Duration = Duration::from_millis(1_500);
const WINDOW: usize = 100;

/// A store that answers pings at once and acknowledges every batch `commit` after it arrived
/// (never, with `None`).
async fn fake_store(commit: Option<Duration>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut sink, mut stream) =
                    Framed::new(tcp, MessageCodec::new(DEFAULT_MAX_FRAME)).split();
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Message>();
                tokio::spawn(async move {
                    while let Some(msg) = rx.recv().await {
                        if sink.send(msg).await.is_err() {
                            return;
                        }
                    }
                });
                while let Some(Ok(Ok(msg))) = stream.next().await {
                    match msg {
                        Message::Hello(_) => {
                            let _ = tx.send(Message::Welcome(Welcome {
                                version: PROTOCOL_VERSION,
                                name: "AGG_P".into(),
                                role: Role::Primary,
                                acting_primary: true,
                                resynced: true,
                            }));
                        }
                        Message::Ping { nonce } => {
                            let _ = tx.send(Message::Pong { nonce });
                        }
                        Message::Events { batch, events } => {
                            let Some(commit) = commit else { continue };
                            let tx = tx.clone();
                            tokio::spawn(async move {
                                tokio::time::sleep(commit).await;
                                let _ = tx.send(Message::Ack {
                                    batch,
                                    applied: events.len() as u32,
                                    duplicates: 0,
                                });
                            });
                        }
                        _ => {}
                    }
                }
            });
        }
    });
    addr
}

/// A proxy in front of `store`, and its address once it takes probes.
async fn proxy(store: SocketAddr, shutdown: &CancellationToken) -> SocketAddr {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let options = ProxyOptions {
        name: "PROXY_P".into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        store_name: "AGG_P".into(),
        store_addr: store,
        max_frame: DEFAULT_MAX_FRAME,
        max_probes: 16,
        // The probe's own window: once it is full the proxy stops reading the probe.
        max_in_flight_per_probe: WINDOW,
        heartbeat: Duration::from_millis(100),
        dead_after: Duration::from_millis(250),
        redirect_to: None,
        tls: None,
        store_tls: None,
    };
    let shutdown = shutdown.clone();
    tokio::spawn(async move {
        tandem_proxy::run(options, shutdown, move |_, addr| {
            let _ = tx.send(addr);
        })
        .await
    });
    let addr = rx.await.unwrap();
    // The store link comes up shortly after the listener; a probe refused before then would
    // fail over for that reason instead.
    let deadline = Instant::now() + Duration::from_secs(10);
    while connect(addr).await.is_err() {
        assert!(Instant::now() < deadline, "the proxy never took probes");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    addr
}

async fn connect(addr: SocketAddr) -> Result<Connection, tandem_probe::ClientError> {
    Connection::connect(
        addr,
        ClientKind::Probe,
        "raw-probe",
        DEFAULT_MAX_FRAME,
        Duration::from_secs(1),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_waiting_on_a_slow_store_does_not_fail_over() {
    let store = fake_store(Some(COMMIT)).await;
    let shutdown = CancellationToken::new();
    let proxy_addr = proxy(store, &shutdown).await;

    let nowhere = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let config = PairConfig {
        client_name: "slow-store-probe".into(),
        primary: ("PROXY_P".into(), proxy_addr),
        backup: ("PROXY_B".into(), nowhere),
        max_frame: DEFAULT_MAX_FRAME,
        failover: Settings {
            heartbeat: Duration::from_millis(100),
            dead_after: Duration::from_millis(400),
            ..Settings::default()
        },
        require_resync: false,
        batch_events: 10,
        max_in_flight: WINDOW,
        connect_timeout: Duration::from_secs(1),
        tls: None,
    };
    let mut client = PairClient::start(config, Spool::open(None, "slow-store-probe").unwrap());
    let bodies = (0..3 * WINDOW)
        .map(|i| {
            EventBody::Occurrence(
                AlertFields {
                    identifier: format!("id-{i}"),
                    summary: "slow".into(),
                    ..AlertFields::default()
                }
                .pack(),
            )
        })
        .collect();
    client.push(1, bodies, None).await.unwrap();
    let stats = client.wait_acked(Duration::from_secs(30)).await.unwrap();
    client.close().await;
    shutdown.cancel();
    assert_eq!(stats.acked, 3 * WINDOW as u64);
    assert_eq!(
        stats.failovers, 0,
        "commits of {COMMIT:?} made the probe fail over (longest wait for an acknowledgement: {:?})",
        stats.max_ack_gap
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_leave_a_store_that_answers_heartbeats_but_acknowledges_nothing() {
    let store = fake_store(None).await;
    let shutdown = CancellationToken::new();
    let proxy_addr = proxy(store, &shutdown).await;
    let mut conn = connect(proxy_addr).await.unwrap();
    let origin = Origin::new("raw-probe", 1);
    let events = (1..=10)
        .map(|seq| Event {
            origin: origin.clone(),
            seq,
            time: 1,
            body: EventBody::Expire {
                identifier: format!("id-{seq}"),
            },
        })
        .collect();
    conn.send(&Message::Events { batch: 1, events })
        .await
        .unwrap();
    let started = Instant::now();
    let told = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match conn.recv().await {
                Ok(Message::Directive(Directive::Leave { reason })) => return Ok(reason),
                Ok(_) => continue,
                Err(e) => return Err(e),
            }
        }
    })
    .await;
    shutdown.cancel();
    let reason = told
        .expect("a probe behind a store that acknowledges nothing was never told to leave")
        .unwrap();
    assert!(reason.contains("lost its store AGG_P"), "{reason}");
    println!("told to leave after {:?}", started.elapsed());
}
