//! The gateway with real processes: after the primary store dies mid-send and comes back, both
//! stores converge to exactly what was sent, field by field.

#![allow(clippy::unwrap_used)] // a test that cannot read its own fixture should fail

use std::time::{Duration, Instant};

use tandem_protocol::Alert;
use tandem_tests::by_identifier;
use tandem_tests::client::{notices, probe_alerts};
use tandem_tests::{Pair, http_get, repeated_alerts_file, wait_http_ok, wait_output};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_stores_converge_after_the_primary_dies_mid_send() {
    let pair = Pair::new(|t| t);
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
    let gw_http = pair.file.gateways[0].http.unwrap().0;
    wait_http_ok(gw_http, "/readyz", Duration::from_secs(30));

    let input = repeated_alerts_file(pair.dir.path(), "load.jsonl", 30_000, 800);
    let send = pair.spawn_piped(&["send", input.to_str().unwrap(), "--rate", "15000", "--json"]);
    std::thread::sleep(Duration::from_millis(800));
    agg_p.kill();
    let out = wait_output(send, Duration::from_secs(120));
    assert!(
        out.status.success(),
        "send failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("send: {}", String::from_utf8_lossy(&out.stdout));
    let _agg_p = pair.spawn(&["store", "--name", "AGG_P"], "agg_p2");

    let p_addr = pair.file.store("AGG_P").unwrap().listen.0;
    let b_addr = pair.file.store("AGG_B").unwrap().listen.0;
    let deadline = Instant::now() + Duration::from_secs(30);
    let (p, b) = loop {
        let (code, body) = http_get(gw_http, "/status");
        let status: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        let lags_zero = status["directions"]
            .as_array()
            .is_some_and(|d| d.iter().all(|d| d["lag"] == 0));
        if code == 200 && status["resynced"] == true && lags_zero {
            let (p, b) = (probe_alerts(p_addr).await, probe_alerts(b_addr).await);
            if p.iter().map(|a| a.tally).sum::<u64>() == 30_000
                && b.iter().map(|a| a.tally).sum::<u64>() == 30_000
            {
                break (p, b);
            }
        }
        if Instant::now() > deadline {
            let (p, b) = (probe_alerts(p_addr).await, probe_alerts(b_addr).await);
            panic!(
                "not converged within 30 s; gateway: {body}\nAGG_P {} alerts, tally {}; AGG_B {} alerts, tally {}\n{}",
                p.len(),
                p.iter().map(|a| a.tally).sum::<u64>(),
                b.len(),
                b.iter().map(|a| a.tally).sum::<u64>(),
                http_get(pair.file.store("AGG_B").unwrap().http.unwrap().0, "/status").1
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(p.len(), 800);
    assert_eq!(b.len(), 800);
    let (p, b) = (by_identifier(p), by_identifier(b));
    for (id, alert) in &p {
        assert_eq!(Some(alert), b.get(id), "{id} differs between the stores");
    }
    // The pair's own notices replicate too: the backup's failover notice is on both stores.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (np, nb) = (
            by_identifier(notices(p_addr).await),
            by_identifier(notices(b_addr).await),
        );
        if np.contains_key("tandem:AGG_B:failover") && np == nb {
            assert_eq!(np["tandem:AGG_B:failover"].manager, "tandem");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "notices differ: {:?} vs {:?}",
            np.keys(),
            nb.keys()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_at_once_apply_nothing_twice_and_lose_nothing() {
    let pair = Pair::new(|t| {
        t.replace(
            "[probe]",
            &format!(
                "[[gateway]]\nname = \"GW2\"\nhttp = \"127.0.0.1:{}\"\n\n[probe]",
                tandem_tests::free_port()
            ),
        )
    });
    let _agg_p = pair.spawn(&["store", "--name", "AGG_P"], "agg_p");
    let _agg_b = pair.spawn(&["store", "--name", "AGG_B"], "agg_b");
    let _proxy_p = pair.spawn(&["proxy", "--name", "PROXY_P"], "proxy_p");
    let mut proxy_b = pair.spawn(&["proxy", "--name", "PROXY_B"], "proxy_b");
    let mut gw = pair.spawn(&["gateway", "--name", "GW"], "gw");
    let _gw2 = pair.spawn(&["gateway", "--name", "GW2"], "gw2");
    for proxy in ["PROXY_P", "PROXY_B"] {
        wait_http_ok(
            pair.file.proxy(proxy).unwrap().http.unwrap().0,
            "/readyz",
            Duration::from_secs(30),
        );
    }
    for g in &pair.file.gateways {
        wait_http_ok(g.http.unwrap().0, "/readyz", Duration::from_secs(30));
    }
    let input = repeated_alerts_file(pair.dir.path(), "twin.jsonl", 20_000, 400);
    let send = pair.spawn_piped(&["send", input.to_str().unwrap(), "--rate", "10000", "--json"]);
    std::thread::sleep(Duration::from_millis(700));
    // One gateway dies mid-stream; the other carries on.
    gw.kill();
    let out = wait_output(send, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    proxy_b.kill();

    let p_addr = pair.file.store("AGG_P").unwrap().listen.0;
    let b_addr = pair.file.store("AGG_B").unwrap().listen.0;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (p, b) = (probe_alerts(p_addr).await, probe_alerts(b_addr).await);
        let sum = |v: &Vec<Alert>| v.iter().map(|a| a.tally).sum::<u64>();
        assert!(
            sum(&b) <= 20_000,
            "the backup counted {} of 20,000: applied twice",
            sum(&b)
        );
        if sum(&p) == 20_000 && sum(&b) == 20_000 {
            assert_eq!(by_identifier(p), by_identifier(b));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "tallies {} and {} after 30 s",
            sum(&p),
            sum(&b)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Split brain: the link between the two sides (the backup's heartbeat and the gateway's link
/// to the primary) goes through a relay that is cut, so both stores act as primary and both
/// take events; after healing, they converge to everything that was sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_brain_heals_into_one_table() {
    use tandem_protocol::Origin;
    use tandem_tests::client::{occurrence, send_reliably};
    use tandem_tests::relay::Relay;

    let pair = Pair::new(|t| {
        t.replace(
            "failback_hold_down_ms = 2000",
            "failback_hold_down_ms = 500",
        )
    });
    let p_addr = pair.file.store("AGG_P").unwrap().listen.0;
    let b_addr = pair.file.store("AGG_B").unwrap().listen.0;
    let relay = Relay::start(p_addr).await;
    // The backup and the gateway reach AGG_P only through the relay.
    let text = std::fs::read_to_string(&pair.config).unwrap();
    let far_side = pair.dir.path().join("through-relay.toml");
    std::fs::write(
        &far_side,
        text.replace(&format!("\"{p_addr}\""), &format!("\"{}\"", relay.addr)),
    )
    .unwrap();

    let _agg_p = pair.spawn(&["store", "--name", "AGG_P"], "agg_p");
    let _agg_b = pair.spawn_with_config(&far_side, &["store", "--name", "AGG_B"], "agg_b");
    let _gw = pair.spawn_with_config(&far_side, &["gateway"], "gw");
    let gw_http = pair.file.gateways[0].http.unwrap().0;
    wait_http_ok(gw_http, "/readyz", Duration::from_secs(30));
    let b_http = pair.file.store("AGG_B").unwrap().http.unwrap().0;
    let p_http = pair.file.store("AGG_P").unwrap().http.unwrap().0;
    assert_eq!(
        http_get(b_http, "/active").0,
        503,
        "the backup stands by while the primary answers"
    );

    relay.cut();
    let deadline = Instant::now() + Duration::from_secs(15);
    while http_get(b_http, "/active").0 != 200 {
        assert!(
            Instant::now() < deadline,
            "the backup never took over:\n{}",
            pair.log("agg_b")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        http_get(p_http, "/active").0,
        200,
        "both sides act as primary: split brain"
    );

    // Each side takes its own probes' events, on the same identifiers.
    let (left, right) = (Origin::new("left", 1), Origin::new("right", 1));
    let on_p: Vec<_> = (1..=3_000)
        .map(|s| occurrence(&left, s, format!("sb-{}", s % 100)))
        .collect();
    let on_b: Vec<_> = (1..=3_000)
        .map(|s| occurrence(&right, s, format!("sb-{}", s % 100)))
        .collect();
    send_reliably(
        p_addr,
        &on_p,
        200,
        Duration::ZERO,
        Duration::from_secs(30),
        |_| {},
    )
    .await;
    send_reliably(
        b_addr,
        &on_b,
        200,
        Duration::ZERO,
        Duration::from_secs(30),
        |_| {},
    )
    .await;

    relay.heal();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (p, b) = (probe_alerts(p_addr).await, probe_alerts(b_addr).await);
        let sum = |v: &Vec<Alert>| v.iter().map(|a| a.tally).sum::<u64>();
        if sum(&p) == 6_000 && sum(&b) == 6_000 {
            assert_eq!(p.len(), 100);
            assert_eq!(
                by_identifier(p),
                by_identifier(b),
                "the healed stores differ"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "tallies {} and {} of 6,000 after healing:\n{}",
            sum(&p),
            sum(&b),
            pair.log("gw")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while http_get(b_http, "/active").0 != 503 {
        assert!(
            Instant::now() < deadline,
            "the backup did not hand the role back after healing"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
