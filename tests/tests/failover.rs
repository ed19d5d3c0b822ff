//! Failover through the virtual pair with real processes: `tandem send` keeps going when the
//! primary proxy or the primary store is SIGKILLed, loses nothing, and a probe killed mid-send
//! delivers every event once after its restart from its disk spool.

#![allow(clippy::unwrap_used)] // a test that cannot read its own fixture should fail

use std::collections::HashSet;
use std::time::Duration;

use tandem_tests::client::{alerts, probe_alerts};
use tandem_tests::{Pair, Proc, alerts_file, wait_http_ok, wait_output};

struct Running {
    pair: Pair,
    agg_p: Proc,
    agg_b: Proc,
    proxy_p: Proc,
    proxy_b: Proc,
}

fn start_pair() -> Running {
    let pair = Pair::new(|t| t);
    let agg_p = pair.spawn(&["store", "--name", "AGG_P"], "agg_p");
    let agg_b = pair.spawn(&["store", "--name", "AGG_B"], "agg_b");
    let proxy_p = pair.spawn(&["proxy", "--name", "PROXY_P"], "proxy_p");
    let proxy_b = pair.spawn(&["proxy", "--name", "PROXY_B"], "proxy_b");
    for proxy in ["PROXY_P", "PROXY_B"] {
        let http = pair.file.proxy(proxy).unwrap().http.unwrap().0;
        wait_http_ok(http, "/readyz", Duration::from_secs(30));
    }
    Running {
        pair,
        agg_p,
        agg_b,
        proxy_p,
        proxy_b,
    }
}

fn summary(out: &std::process::Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or("");
    serde_json::from_str(last).unwrap_or_else(|_| {
        panic!(
            "no JSON summary; stdout:\n{stdout}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

async fn identifiers(r: &Running, stores: &[&str]) -> HashSet<String> {
    let mut all = HashSet::new();
    for store in stores {
        let addr = r.pair.file.store(store).unwrap().listen.0;
        all.extend(alerts(addr).await.into_iter().map(|a| a.identifier));
    }
    all
}

/// Sends 40,000 events at 20,000/s and SIGKILLs `victim` after 0.7 s.
async fn send_through_a_kill(kill_store: bool) {
    let _alone = tandem_tests::one_at_a_time().await;
    let mut r = start_pair();
    let input = alerts_file(r.pair.dir.path(), 40_000);
    let send = r
        .pair
        .spawn_piped(&["send", input.to_str().unwrap(), "--rate", "20000", "--json"]);
    std::thread::sleep(Duration::from_millis(700));
    if kill_store {
        r.agg_p.kill();
    } else {
        r.proxy_p.kill();
    }
    let out = wait_output(send, Duration::from_secs(90));
    let s = summary(&out);
    assert!(
        out.status.success(),
        "send failed: {s}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(s["read"], 40_000);
    assert_eq!(s["acked"], 40_000);
    assert!(s["failovers"].as_u64().unwrap() >= 1, "{s}");
    let gap = s["max_ack_gap_ms"].as_u64().unwrap();
    println!("max_ack_gap_ms = {gap}");
    assert!(
        gap <= 1_000,
        "longest wait for an acknowledgement {gap} ms: {s}"
    );

    if kill_store {
        // AGG_P's data survives its death: restart it to read what it acknowledged.
        r.agg_p = r.pair.spawn(&["store", "--name", "AGG_P"], "agg_p2");
    }
    let present = identifiers(&r, &["AGG_P", "AGG_B"]).await;
    let missing: Vec<_> = (0..40_000)
        .map(|i| format!("e-{i}"))
        .filter(|id| !present.contains(id))
        .take(5)
        .collect();
    assert!(missing.is_empty(), "events in neither store: {missing:?}");
    drop(r.proxy_b);
    drop(r.agg_b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_survives_the_primary_proxy_being_killed() {
    send_through_a_kill(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_survives_the_primary_store_being_killed_behind_its_proxy() {
    send_through_a_kill(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_killed_mid_send_delivers_every_event_once_after_restart() {
    let _alone = tandem_tests::one_at_a_time().await;
    let r = start_pair();
    let input = alerts_file(r.pair.dir.path(), 20_000);
    let args = ["send", input.to_str().unwrap(), "--rate", "10000", "--json"];
    let mut first = r.pair.spawn_piped(&args);
    std::thread::sleep(Duration::from_millis(800));
    first.kill();
    let out = wait_output(r.pair.spawn_piped(&args), Duration::from_secs(90));
    let s = summary(&out);
    assert!(out.status.success(), "second send failed: {s}");
    let read_again = s["read"].as_u64().unwrap();
    assert!(
        read_again < 20_000,
        "the restart resumed instead of rereading everything: {s}"
    );

    // Either member may have taken events: on a loaded machine a send can miss a heartbeat
    // and fail over to the backup, and no gateway runs here to replicate them.
    let present = identifiers(&r, &["AGG_P", "AGG_B"]).await;
    let missing: Vec<_> = (0..20_000)
        .map(|i| format!("e-{i}"))
        .filter(|id| !present.contains(id))
        .take(5)
        .collect();
    assert!(
        missing.is_empty(),
        "lines in neither store: {missing:?}; {s}"
    );
    for store in ["AGG_P", "AGG_B"] {
        let addr = r.pair.file.store(store).unwrap().listen.0;
        let doubled: Vec<_> = probe_alerts(addr)
            .await
            .into_iter()
            .filter(|a| a.tally != 1)
            .map(|a| a.identifier)
            .take(5)
            .collect();
        assert!(
            doubled.is_empty(),
            "{store} counted more than once: {doubled:?}"
        );
    }
    drop(r);
}

fn json_summary_ok(out: &std::process::Output) -> serde_json::Value {
    let s = summary(out);
    assert!(
        out.status.success(),
        "send failed: {s}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    s
}

/// The store acceptance through `tandem send`: exact tallies through a SIGKILL of the store
/// while the only proxy in front of it stays up (the backup member is not running, so the
/// probe waits for the store to come back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_counts_exactly_through_a_store_kill_and_restart() {
    let _alone = tandem_tests::one_at_a_time().await;
    let pair = Pair::new(|t| t);
    let mut agg_p = pair.spawn(&["store", "--name", "AGG_P"], "agg_p");
    let _proxy_p = pair.spawn(&["proxy", "--name", "PROXY_P"], "proxy_p");
    let http = pair.file.proxy("PROXY_P").unwrap().http.unwrap().0;
    wait_http_ok(http, "/readyz", Duration::from_secs(30));
    let addr = pair.file.store("AGG_P").unwrap().listen.0;
    let dir = pair.dir.path();
    let first = tandem_tests::repeated_alerts_file(dir, "first.jsonl", 20_000, 500);
    let second = tandem_tests::repeated_alerts_file(dir, "second.jsonl", 20_000, 500);

    let out = wait_output(
        pair.spawn_piped(&["send", first.to_str().unwrap(), "--json"]),
        Duration::from_secs(90),
    );
    assert_eq!(json_summary_ok(&out)["acked"], 20_000);
    let got = alerts(addr).await;
    assert_eq!(got.len(), 500);
    assert_eq!(got.iter().map(|a| a.tally).sum::<u64>(), 20_000);

    let send = pair.spawn_piped(&[
        "send",
        second.to_str().unwrap(),
        "--rate",
        "10000",
        "--json",
    ]);
    std::thread::sleep(Duration::from_millis(600));
    agg_p.kill();
    std::thread::sleep(Duration::from_millis(700));
    agg_p = pair.spawn(&["store", "--name", "AGG_P"], "agg_p2");
    let out = wait_output(send, Duration::from_secs(90));
    assert_eq!(json_summary_ok(&out)["acked"], 20_000);
    let got = alerts(addr).await;
    assert_eq!(got.len(), 500);
    assert_eq!(got.iter().map(|a| a.tally).sum::<u64>(), 40_000);

    // A clean stop (SIGTERM) and start keeps every count.
    let _ = std::process::Command::new("kill")
        .arg(agg_p.pid().to_string())
        .status();
    for _ in 0..400 {
        if !agg_p.running() {
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    assert!(!agg_p.running(), "the store stops on SIGTERM");
    let _agg_p = pair.spawn(&["store", "--name", "AGG_P"], "agg_p3");
    let again = alerts(addr).await;
    assert_eq!(again.iter().map(|a| a.tally).sum::<u64>(), 40_000);
}

#[test]
fn send_gives_up_after_its_timeout_when_nothing_answers() {
    let pair = Pair::new(|t| t);
    let input = alerts_file(pair.dir.path(), 10);
    let started = std::time::Instant::now();
    let out = wait_output(
        pair.spawn_piped(&["send", input.to_str().unwrap(), "--timeout", "2"]),
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("10 events were not acknowledged within 2s"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(15));
}

#[test]
fn a_proxy_without_its_store_refuses_probes_at_once_and_is_not_ready() {
    let pair = Pair::new(|t| t);
    let _proxy_p = pair.spawn(&["proxy", "--name", "PROXY_P"], "proxy_p");
    let http = pair.file.proxy("PROXY_P").unwrap().http.unwrap().0;
    wait_http_ok(http, "/healthz", Duration::from_secs(30));
    assert_eq!(tandem_tests::http_get(http, "/readyz").0, 503);
    assert_eq!(tandem_tests::http_get(http, "/active").0, 503);

    let listen = pair.file.proxy("PROXY_P").unwrap().listen.0;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let refused = rt.block_on(tandem_tests::client::dial(
        listen,
        tandem_protocol::ClientKind::Probe,
        "p",
        Duration::from_secs(5),
    ));
    match refused {
        Err(tandem_probe::ClientError::Rejected {
            reason, message, ..
        }) => {
            assert_eq!(reason, tandem_protocol::RejectReason::StoreUnavailable);
            assert!(
                message.contains("cannot reach its store AGG_P"),
                "{message}"
            );
        }
        Err(other) => panic!("expected a refusal, got {other}"),
        Ok(_) => panic!("expected a refusal, got a connection"),
    }

    let _agg_p = pair.spawn(&["store", "--name", "AGG_P"], "agg_p");
    wait_http_ok(http, "/readyz", Duration::from_secs(30));
    assert_eq!(tandem_tests::http_get(http, "/active").0, 200);
    let (_, metrics) = tandem_tests::http_get(http, "/metrics");
    assert!(
        metrics.contains("tandem_proxy_refusals_total{reason=\"store_unavailable\"} 1"),
        "{metrics}"
    );
}

#[test]
fn a_full_proxy_refuses_with_a_reason() {
    let pair = Pair::new(|t| t.replace("store = \"AGG_P\"", "store = \"AGG_P\"\nmax_probes = 2"));
    let _agg_p = pair.spawn(&["store", "--name", "AGG_P"], "agg_p");
    let _proxy_p = pair.spawn(&["proxy", "--name", "PROXY_P"], "proxy_p");
    let http = pair.file.proxy("PROXY_P").unwrap().http.unwrap().0;
    wait_http_ok(http, "/readyz", Duration::from_secs(30));
    let listen = pair.file.proxy("PROXY_P").unwrap().listen.0;
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let connect = || {
            tandem_tests::client::dial(
                listen,
                tandem_protocol::ClientKind::Probe,
                "p",
                Duration::from_secs(5),
            )
        };
        let _a = connect().await.unwrap();
        let _b = connect().await.unwrap();
        match connect().await {
            Err(tandem_probe::ClientError::Rejected {
                reason, message, ..
            }) => {
                assert_eq!(reason, tandem_protocol::RejectReason::Overloaded);
                assert!(
                    message.contains("maximum of 2 probe connections"),
                    "{message}"
                );
            }
            Err(other) => panic!("expected a refusal, got {other}"),
            Ok(_) => panic!("a third probe was let in past max_probes = 2"),
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_does_not_send_to_a_server_that_is_not_its_proxy() {
    // Pair A runs its stores; pair B's proxies are (wrongly) given pair A's store addresses.
    let a = Pair::new(|t| t);
    let _agg_p = a.spawn(&["store", "--name", "AGG_P"], "agg_p");
    let _agg_b = a.spawn(&["store", "--name", "AGG_B"], "agg_b");
    let p_addr = a.file.store("AGG_P").unwrap().listen.0;
    let b_addr = a.file.store("AGG_B").unwrap().listen.0;
    tandem_tests::client::connect(p_addr, Duration::from_secs(30)).await;
    tandem_tests::client::connect(b_addr, Duration::from_secs(30)).await;
    let b = Pair::new(|t| {
        let file = tandem_config::PairFile::parse(&t, "b").unwrap();
        let (pp, pb) = (file.proxies[0].listen.0, file.proxies[1].listen.0);
        t.replace(&format!("\"{pp}\""), &format!("\"{p_addr}\""))
            .replace(&format!("\"{pb}\""), &format!("\"{b_addr}\""))
    });
    let input = alerts_file(b.dir.path(), 5);
    let out = wait_output(
        b.spawn_piped(&["send", input.to_str().unwrap(), "--timeout", "2"]),
        Duration::from_secs(30),
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        alerts(p_addr).await.is_empty(),
        "nothing went to a store posing as a proxy"
    );
    assert!(alerts(b_addr).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_queued_behind_a_hung_store_are_still_told_to_leave() {
    use tandem_protocol::{ClientKind, Directive, Message, Origin};
    const PROBES: usize = 16;
    const BATCHES: u64 = 250;
    const EVENTS: u64 = 40;

    let pair = Pair::new(|t| t);
    let mut agg_p = pair.spawn(&["store", "--name", "AGG_P"], "agg_p");
    let _proxy_p = pair.spawn(&["proxy", "--name", "PROXY_P"], "proxy_p");
    let http = pair.file.proxy("PROXY_P").unwrap().http.unwrap().0;
    wait_http_ok(http, "/readyz", Duration::from_secs(30));
    let listen = pair.file.proxy("PROXY_P").unwrap().listen.0;
    let mut conns = Vec::new();
    for i in 0..PROBES {
        let name = format!("probe-{i}");
        let conn =
            tandem_tests::client::dial(listen, ClientKind::Probe, &name, Duration::from_secs(10))
                .await
                .unwrap();
        conns.push((name, conn));
    }

    // The store hangs (it does not die: its connections stay open) while every probe sends
    // more than the proxy's queue to the store holds, so the proxy stops reading from some
    // probes with a batch of theirs waiting for room.
    let signal = |sig: &str| {
        let status = std::process::Command::new("kill")
            .args([sig, &agg_p.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {sig}");
    };
    signal("-STOP");
    let started = std::time::Instant::now();
    let mut told = Vec::new();
    for (name, conn) in conns {
        let (mut reader, mut writer) = conn.split();
        let origin = Origin::new(name.as_str(), 1);
        tokio::spawn(async move {
            for batch in 1..=BATCHES {
                let events = (0..EVENTS)
                    .map(|n| {
                        let seq = (batch - 1) * EVENTS + n + 1;
                        let mut e =
                            tandem_tests::client::occurrence(&origin, seq, format!("id-{n}"));
                        if let tandem_protocol::EventBody::Occurrence(f) = &mut e.body {
                            let mut fields = f.unpack();
                            fields.summary = "x".repeat(500);
                            *f = fields.pack();
                        }
                        e
                    })
                    .collect();
                // Blocks once the proxy stops reading; the test ends with it pending.
                if writer
                    .send(&Message::Events { batch, events })
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        told.push(tokio::spawn(async move {
            loop {
                match reader.recv().await {
                    Ok(Message::Directive(Directive::Leave { reason })) => return Ok(reason),
                    Ok(_) => continue,
                    Err(e) => return Err(format!("{name}: the link ended untold: {e}")),
                }
            }
        }));
    }
    let deadline = Duration::from_secs(30);
    let results = tokio::time::timeout(deadline, futures_join(told)).await;
    signal("-CONT");
    agg_p.kill();
    let results = results.unwrap_or_else(|_| {
        panic!("not every probe was told to leave within {deadline:?} of the store hanging")
    });
    for result in results {
        let reason = result.unwrap();
        assert!(reason.contains("lost its store AGG_P"), "{reason}");
    }
    println!(
        "all {PROBES} probes told to leave {} ms after the store hung",
        started.elapsed().as_millis()
    );
}

async fn futures_join<T>(handles: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::new();
    for handle in handles {
        out.push(handle.await.unwrap());
    }
    out
}
