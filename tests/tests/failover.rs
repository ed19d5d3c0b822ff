//! Failover through the virtual pair with real processes: `tandem send` keeps going when the
//! primary proxy or the primary store is SIGKILLed, loses nothing, and a probe killed mid-send
//! delivers every event once after its restart from its disk spool.

#![allow(clippy::unwrap_used)] // a test that cannot read its own fixture should fail

use std::collections::HashSet;
use std::time::Duration;

use tandem_tests::client::alerts;
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

    let addr = r.pair.file.store("AGG_P").unwrap().listen.0;
    let got = alerts(addr).await;
    assert_eq!(got.len(), 20_000, "every line arrived");
    let doubled: Vec<_> = got
        .iter()
        .filter(|a| a.tally != 1)
        .map(|a| &a.identifier)
        .take(5)
        .collect();
    assert!(doubled.is_empty(), "counted more than once: {doubled:?}");
    drop(r);
}
