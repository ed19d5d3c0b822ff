//! `tandem bench`: its figures come from events that really reached the store, once each.

#![allow(clippy::unwrap_used)] // a test that cannot read its own fixture should fail

use std::collections::HashMap;
use std::time::Duration;

use tandem_tests::client::alerts;
use tandem_tests::{Pair, wait_http_ok, wait_output};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_reports_durable_throughput_of_events_the_store_holds() {
    let _alone = tandem_tests::one_at_a_time().await;
    let pair = Pair::new(|t| t);
    let mut store = pair.spawn(&["store", "--name", "AGG_P"], "agg_p");
    let mut proxy = pair.spawn(&["proxy", "--name", "PROXY_P"], "proxy_p");
    let http = pair.file.proxy("PROXY_P").unwrap().http.unwrap().0;
    wait_http_ok(http, "/readyz", Duration::from_secs(30));

    let out = wait_output(
        pair.spawn_piped(&[
            "bench",
            "--events",
            "30000",
            "--identifiers",
            "70",
            "--probes",
            "3",
            "--size",
            "120",
            "--json",
        ]),
        Duration::from_secs(120),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.lines().count(), 1, "one JSON object: {stdout}");
    let result: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(result["events"], 30_000, "{result}");
    let seconds = result["seconds"].as_f64().unwrap();
    let rate = result["events_per_s"].as_f64().unwrap();
    assert!(seconds > 0.0, "{result}");
    assert!((rate * seconds - 30_000.0).abs() < 1.0, "{result}");
    let (p50, p99, p999) = (
        result["ack_p50_ms"].as_f64().unwrap(),
        result["ack_p99_ms"].as_f64().unwrap(),
        result["ack_p999_ms"].as_f64().unwrap(),
    );
    assert!(0.0 < p50 && p50 <= p99 && p99 <= p999, "{result}");
    assert!(p999 <= seconds * 1000.0 + 1.0, "{result}");

    // Every event was acknowledged because the store made it durable: the store holds the run's
    // 70 alerts, and their tallies add up to the events sent, none lost and none twice.
    let addr = pair.file.store("AGG_P").unwrap().listen.0;
    let held: HashMap<String, u64> = alerts(addr)
        .await
        .into_iter()
        .filter(|a| a.identifier.starts_with("bench-"))
        .map(|a| (a.identifier, a.tally))
        .collect();
    assert_eq!(held.len(), 70, "{held:?}");
    assert_eq!(held.values().sum::<u64>(), 30_000);
    assert!(
        held.values().all(|&tally| tally == 428 || tally == 429),
        "events are spread evenly over the identifiers: {held:?}"
    );

    proxy.kill();
    store.kill();
}

#[test]
fn bench_refuses_zero_probes_or_a_zero_rate_as_a_usage_error() {
    let pair = Pair::new(|t| t);
    for (flag, value, says) in [
        (
            "--probes",
            "0",
            "--probes and --identifiers must be at least 1",
        ),
        (
            "--identifiers",
            "0",
            "--probes and --identifiers must be at least 1",
        ),
        ("--rate", "0", "--rate must be at least 1 event/s"),
    ] {
        let mut args = vec!["bench", "--events", "10"];
        for (default_flag, default_value) in [("--identifiers", "1"), ("--probes", "1")] {
            if default_flag != flag {
                args.extend([default_flag, default_value]);
            }
        }
        args.extend([flag, value]);
        let out = pair.run(&args, Duration::from_secs(30));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}: {stderr}");
        assert!(stderr.contains(says), "{flag} {value}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}
