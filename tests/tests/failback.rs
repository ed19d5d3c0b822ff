//! Fail-back with real processes: a probe moved to the backup by the primary's death goes back
//! to the primary once it is back, resynced and past the hold-down, losing and doubling
//! nothing; and `tandem failback` refuses when there is nothing to fail back.

#![allow(clippy::unwrap_used)] // a test that cannot read its own fixture should fail

use std::time::{Duration, Instant};

use tandem_protocol::Alert;
use tandem_tests::by_identifier;
use tandem_tests::client::{notices, probe_alerts};
use tandem_tests::{Pair, repeated_alerts_file, wait_http_ok, wait_output};

fn status(pair: &Pair) -> serde_json::Value {
    let out = pair.run(&["status", "--json"], Duration::from_secs(30));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn probes(status: &serde_json::Value, proxy: &str) -> Option<u64> {
    status["proxies"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == proxy)?["probes"]
        .as_u64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_returns_to_the_primary_after_resync_and_hold_down() {
    let pair = Pair::new(|t| {
        t.replace(
            "failback_hold_down_ms = 2000",
            "failback_hold_down_ms = 1000",
        )
    });
    let mut agg_p = pair.spawn(&["store", "--name", "AGG_P"], "agg_p");
    let _agg_b = pair.spawn(&["store", "--name", "AGG_B"], "agg_b");
    let _proxy_p = pair.spawn(&["proxy", "--name", "PROXY_P"], "proxy_p");
    let _proxy_b = pair.spawn(&["proxy", "--name", "PROXY_B"], "proxy_b");
    let _gw = pair.spawn(&["gateway"], "gw");
    for proxy in ["PROXY_P", "PROXY_B"] {
        wait_http_ok(
            pair.file.proxy(proxy).unwrap().http.unwrap().0,
            "/readyz",
            Duration::from_secs(30),
        );
    }
    wait_http_ok(
        pair.file.gateways[0].http.unwrap().0,
        "/readyz",
        Duration::from_secs(30),
    );

    let input = repeated_alerts_file(pair.dir.path(), "steady.jsonl", 24_000, 300);
    let send = pair.spawn_piped(&["send", input.to_str().unwrap(), "--rate", "2000", "--json"]);
    std::thread::sleep(Duration::from_millis(1_500));
    assert_eq!(
        probes(&status(&pair), "PROXY_P"),
        Some(1),
        "the probe starts on the primary"
    );

    agg_p.kill();
    let deadline = Instant::now() + Duration::from_secs(10);
    while probes(&status(&pair), "PROXY_B") != Some(1) {
        assert!(
            Instant::now() < deadline,
            "the probe did not move to the backup"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(1_000));
    agg_p = pair.spawn(&["store", "--name", "AGG_P"], "agg_p2");
    let restarted = Instant::now();
    let deadline = restarted + Duration::from_secs(15);
    loop {
        let s = status(&pair);
        if probes(&s, "PROXY_P") == Some(1) && probes(&s, "PROXY_B") == Some(0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the probe did not return to the primary: {s}\n{}",
            pair.log("agg_b")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    println!(
        "back on the primary {} ms after its restart",
        restarted.elapsed().as_millis()
    );

    let out = wait_output(send, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let p_addr = pair.file.store("AGG_P").unwrap().listen.0;
    let b_addr = pair.file.store("AGG_B").unwrap().listen.0;
    let deadline = Instant::now() + Duration::from_secs(30);
    let (p, b) = loop {
        let (p, b) = (probe_alerts(p_addr).await, probe_alerts(b_addr).await);
        let sum = |v: &Vec<Alert>| v.iter().map(|a| a.tally).sum::<u64>();
        if sum(&p) == 24_000 && sum(&b) == 24_000 {
            break (p, b);
        }
        assert!(
            Instant::now() < deadline,
            "tallies {} and {} after 30 s",
            sum(&p),
            sum(&b)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(by_identifier(p), by_identifier(b), "the stores differ");
    // Operators see it happen: the backup's failover notice, cleared by its fail-back.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found = notices(p_addr).await;
        let failover = found
            .iter()
            .find(|a| a.identifier == "tandem:AGG_B:failover");
        if let Some(n) = failover.filter(|n| n.severity.is_clear()) {
            assert_eq!(n.tally, 2, "raised once, cleared once");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no cleared failover notice on AGG_P: {found:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(agg_p);
}

#[test]
fn failback_refuses_when_the_backup_is_not_acting() {
    let pair = Pair::new(|t| t);
    let _agg_p = pair.spawn(&["store", "--name", "AGG_P"], "agg_p");
    let _agg_b = pair.spawn(&["store", "--name", "AGG_B"], "agg_b");
    wait_http_ok(
        pair.file.store("AGG_B").unwrap().http.unwrap().0,
        "/readyz",
        Duration::from_secs(30),
    );
    let out = pair.run(&["failback"], Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not acting primary"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_following_json_probe_fails_over_and_back_and_counts_exactly() {
    use std::io::Write;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    let pair = Pair::new(|t| {
        t.replace(
            "failback_hold_down_ms = 2000",
            "failback_hold_down_ms = 1000",
        )
    });
    let mut agg_p = pair.spawn(&["store", "--name", "AGG_P"], "agg_p");
    let _agg_b = pair.spawn(&["store", "--name", "AGG_B"], "agg_b");
    let _proxy_p = pair.spawn(&["proxy", "--name", "PROXY_P"], "proxy_p");
    let _proxy_b = pair.spawn(&["proxy", "--name", "PROXY_B"], "proxy_b");
    let _gw = pair.spawn(&["gateway"], "gw");
    for proxy in ["PROXY_P", "PROXY_B"] {
        wait_http_ok(
            pair.file.proxy(proxy).unwrap().http.unwrap().0,
            "/readyz",
            Duration::from_secs(30),
        );
    }
    wait_http_ok(
        pair.file.gateways[0].http.unwrap().0,
        "/readyz",
        Duration::from_secs(30),
    );

    let followed = pair.dir.path().join("follow.jsonl");
    std::fs::File::create(&followed).unwrap();
    let mut probe = pair.spawn(
        &["probe", "json", "--follow", followed.to_str().unwrap()],
        "probe",
    );

    // A source appending about 500 alerts a second over 50 identifiers.
    let written = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (written, stop, path) = (written.clone(), stop.clone(), followed.clone());
        std::thread::spawn(move || {
            let mut file = std::fs::OpenOptions::new().append(true).open(path).unwrap();
            while !stop.load(Ordering::SeqCst) {
                for _ in 0..5 {
                    let i = written.fetch_add(1, Ordering::SeqCst);
                    writeln!(
                        file,
                        r#"{{"identifier":"f-{}","node":"n","summary":"line {i}","severity":3}}"#,
                        i % 50
                    )
                    .unwrap();
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    while probes(&status(&pair), "PROXY_P") != Some(1) {
        assert!(
            Instant::now() < deadline,
            "the probe never reached the primary:\n{}",
            pair.log("probe")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    agg_p.kill();
    let deadline = Instant::now() + Duration::from_secs(10);
    while probes(&status(&pair), "PROXY_B") != Some(1) {
        assert!(
            Instant::now() < deadline,
            "the probe did not move to the backup"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(1_000));
    agg_p = pair.spawn(&["store", "--name", "AGG_P"], "agg_p2");
    let restarted = Instant::now();
    let deadline = restarted + Duration::from_secs(15);
    loop {
        let s = status(&pair);
        if probes(&s, "PROXY_P") == Some(1) && probes(&s, "PROXY_B") == Some(0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the probe did not come back: {s}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    println!(
        "json probe back on the primary {} ms after its restart",
        restarted.elapsed().as_millis()
    );
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    let total = written.load(Ordering::SeqCst);

    let p_addr = pair.file.store("AGG_P").unwrap().listen.0;
    let b_addr = pair.file.store("AGG_B").unwrap().listen.0;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (p, b) = (probe_alerts(p_addr).await, probe_alerts(b_addr).await);
        let sum = |v: &Vec<Alert>| v.iter().map(|a| a.tally).sum::<u64>();
        if sum(&p) == total && sum(&b) == total {
            assert_eq!(by_identifier(p), by_identifier(b), "the stores differ");
            break;
        }
        assert!(
            sum(&p) <= total && sum(&b) <= total,
            "counted twice: {} / {} of {total}",
            sum(&p),
            sum(&b)
        );
        assert!(
            Instant::now() < deadline,
            "tallies {} and {} of {total} after 30 s",
            sum(&p),
            sum(&b)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    probe.kill();
    drop(agg_p);
}
