//! `replication = "sync"` with real processes: an acknowledgement means both stores have the
//! event; with the gateway gone it degrades to async after the timeout instead of stalling,
//! and goes back to sync once the peer has caught up.

#![allow(clippy::unwrap_used)] // a test that cannot read its own fixture should fail

use std::time::{Duration, Instant};

use tandem_protocol::{Message, Origin};
use tandem_tests::client::{connect, occurrence, probe_alerts};
use tandem_tests::{Pair, http_get, wait_http_ok};

fn replication(pair: &Pair, store: &str) -> String {
    let (_, body) = http_get(pair.file.store(store).unwrap().http.unwrap().0, "/status");
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    status["replication"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_acknowledgement_means_both_stores_have_the_event() {
    let pair = Pair::new(|t| {
        t.replace(
            "replication = \"async\"",
            "replication = \"sync\"\nsync_timeout_ms = 500",
        )
    });
    let p_addr = pair.file.store("AGG_P").unwrap().listen.0;
    let b_addr = pair.file.store("AGG_B").unwrap().listen.0;
    let _agg_p = pair.spawn(&["store", "--name", "AGG_P"], "agg_p");
    let _agg_b = pair.spawn(&["store", "--name", "AGG_B"], "agg_b");
    let mut gw = pair.spawn(&["gateway"], "gw");
    let gw_http = pair.file.gateways[0].http.unwrap().0;
    wait_http_ok(gw_http, "/readyz", Duration::from_secs(30));
    assert_eq!(replication(&pair, "AGG_P"), "sync");

    // Every acknowledged batch is already on the backup when its acknowledgement arrives.
    let origin = Origin::new("sync-probe", 1);
    let mut conn = connect(p_addr, Duration::from_secs(30)).await;
    let mut seq = 0u64;
    for batch in 1..=20u64 {
        let events: Vec<_> = (0..50)
            .map(|_| {
                seq += 1;
                occurrence(&origin, seq, format!("id-{}", seq % 40))
            })
            .collect();
        let answer = conn
            .request(&Message::Events { batch, events }, Duration::from_secs(10))
            .await
            .unwrap();
        assert!(matches!(answer, Message::Ack { .. }), "{answer:?}");
        let on_backup: u64 = probe_alerts(b_addr).await.iter().map(|a| a.tally).sum();
        assert_eq!(
            on_backup, seq,
            "batch {batch} acknowledged before the backup had it"
        );
    }
    assert_eq!(replication(&pair, "AGG_P"), "sync");

    // With the gateway gone, the next batch is acknowledged after the timeout (not never), and
    // the store says it has degraded.
    gw.kill();
    let events: Vec<_> = (0..50)
        .map(|_| {
            seq += 1;
            occurrence(&origin, seq, format!("id-{}", seq % 40))
        })
        .collect();
    let sent = Instant::now();
    let answer = conn
        .request(
            &Message::Events { batch: 21, events },
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert!(matches!(answer, Message::Ack { .. }), "{answer:?}");
    println!("acknowledged {:?} after the gateway died", sent.elapsed());
    assert_eq!(replication(&pair, "AGG_P"), "degraded");

    // Back with the gateway: the backup catches up and replication is sync again.
    let _gw = pair.spawn(&["gateway"], "gw2");
    let deadline = Instant::now() + Duration::from_secs(30);
    while replication(&pair, "AGG_P") != "sync" {
        assert!(
            Instant::now() < deadline,
            "still degraded 30 s after the gateway came back: {}",
            pair.log("agg_p")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let on_backup: u64 = probe_alerts(b_addr).await.iter().map(|a| a.tally).sum();
    assert_eq!(on_backup, seq);
}
