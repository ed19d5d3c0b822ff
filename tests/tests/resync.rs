//! Full resync with real processes: a store further behind than its peer's retained log gets a
//! snapshot, the resync survives the gateway being killed half-way (it resumes, it does not
//! start over), tallies stay exact when both stores took events the other lacks, and a store
//! whose data directory was lost is brought back from its peer.

#![allow(clippy::unwrap_used)] // a test that cannot read its own fixture should fail

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tandem_protocol::{Alert, Event, Origin};
use tandem_tests::client::{occurrence, probe_alerts, send_reliably};
use tandem_tests::{Pair, by_identifier, http_get};

fn events(
    origin: &Origin,
    seqs: std::ops::RangeInclusive<u64>,
    id: impl Fn(u64) -> String,
) -> Vec<Event> {
    seqs.map(|seq| occurrence(origin, seq, id(seq))).collect()
}

async fn send(addr: SocketAddr, events: &[Event]) {
    send_reliably(
        addr,
        events,
        500,
        Duration::ZERO,
        Duration::from_secs(60),
        |_| {},
    )
    .await;
}

/// Waits until the gateway reports resynced with no lag and both stores hold `alerts` alerts
/// whose tallies sum to `tally`; returns both stores' alerts.
async fn converged(pair: &Pair, alerts: usize, tally: u64) -> (Vec<Alert>, Vec<Alert>) {
    let gw_http = pair.file.gateways[0].http.unwrap().0;
    let p_addr = pair.file.store("AGG_P").unwrap().listen.0;
    let b_addr = pair.file.store("AGG_B").unwrap().listen.0;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (code, body) = tandem_tests::try_http_get(gw_http, "/status").unwrap_or_default();
        let status: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        let lags_zero = status["directions"]
            .as_array()
            .is_some_and(|d| d.iter().all(|d| d["lag"] == 0));
        if code == 200 && status["resynced"] == true && lags_zero {
            let (p, b) = (probe_alerts(p_addr).await, probe_alerts(b_addr).await);
            let sum = |a: &[Alert]| a.iter().map(|a| a.tally).sum::<u64>();
            if p.len() == alerts && b.len() == alerts && sum(&p) == tally && sum(&b) == tally {
                return (p, b);
            }
        }
        if Instant::now() > deadline {
            let (p, b) = (probe_alerts(p_addr).await, probe_alerts(b_addr).await);
            panic!(
                "not converged within 60 s to {alerts} alerts, tally {tally}; gateway: {body}\nAGG_P {} alerts, tally {}; AGG_B {} alerts, tally {}\ngateway log:\n{}",
                p.len(),
                p.iter().map(|a| a.tally).sum::<u64>(),
                b.len(),
                b.iter().map(|a| a.tally).sum::<u64>(),
                pair.log("gw2")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn assert_identical(p: Vec<Alert>, b: Vec<Alert>) {
    let (p, b) = (by_identifier(p), by_identifier(b));
    for (id, alert) in &p {
        assert_eq!(Some(alert), b.get(id), "{id} differs between the stores");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_behind_the_retained_log_is_resynced_from_a_snapshot() {
    let pair = Pair::new(|t| {
        t.replace(
            "data_dir = \"agg_p\"",
            "data_dir = \"agg_p\"\nlog_retention_entries = 300\nlog_max_entries = 300",
        )
        .replace(
            "data_dir = \"agg_b\"",
            "data_dir = \"agg_b\"\nlog_retention_entries = 300",
        )
        .replace(
            "name = \"GW\"",
            "name = \"GW\"\nresync_page = 100\nresync_rate = 3000",
        )
    });
    assert_eq!(pair.file.gateways[0].resync_rate, 3000);
    let p_addr = pair.file.store("AGG_P").unwrap().listen.0;
    let b_addr = pair.file.store("AGG_B").unwrap().listen.0;
    let _agg_p = pair.spawn(&["store", "--name", "AGG_P"], "agg_p");
    let mut agg_b = pair.spawn(&["store", "--name", "AGG_B"], "agg_b");

    // With no gateway, each store takes events the other never sees: 6,000 on 3,000 alerts
    // at the primary (twenty times its log, which keeps 300 entries whether the backup has
    // them or not), 600 at the backup (twice its retention, kept because the primary has not
    // applied them), and one origin whose events 40 to 60 reached both (a probe resending
    // after a failover). The backup's full resync replays its own entries onto the
    // primary's snapshot: with its log trimmed to 300 it could only join the two states,
    // and the tallies of that origin's alerts would come out low.
    let p1 = Origin::new("p1", 1);
    let b1 = Origin::new("b1", 1);
    let both = Origin::new("both", 1);
    send(
        p_addr,
        &events(&p1, 1..=6_000, |s| format!("id-{}", s % 3_000)),
    )
    .await;
    send(
        p_addr,
        &events(&both, 1..=60, |s| format!("both-{}", s % 50)),
    )
    .await;
    send(b_addr, &events(&b1, 1..=600, |s| format!("id-{s}"))).await;
    send(
        b_addr,
        &events(&both, 40..=100, |s| format!("both-{}", s % 50)),
    )
    .await;
    let (alerts, tally) = (3_050, 6_000 + 600 + 100);

    // The gateway starts a full resync of AGG_B, and is killed part-way.
    let gw_http = pair.file.gateways[0].http.unwrap().0;
    let mut gw = pair.spawn(&["gateway"], "gw");
    let deadline = Instant::now() + Duration::from_secs(30);
    let merged_before = loop {
        let (_, body) = tandem_tests::try_http_get(gw_http, "/status").unwrap_or_default();
        let status: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        let merged = status["directions"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|d| d["full_resync"]["merged"].as_u64())
            .max()
            .unwrap_or(0);
        if merged >= 500 {
            break merged;
        }
        assert!(
            Instant::now() < deadline,
            "no full resync under way within 30 s: {body}\n{}",
            pair.log("gw")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    gw.kill();
    println!("gateway killed with {merged_before} records merged");

    // Restarted, it resumes from what AGG_B recorded, in AGG_P's same snapshot.
    let _gw2 = pair.spawn(&["gateway"], "gw2");
    let (p, b) = converged(&pair, alerts, tally).await;
    let log = pair.log("gw2");
    assert!(log.contains("resuming a full resync"), "no resume:\n{log}");
    assert!(
        !log.contains("starting again from a new one"),
        "the resync started over:\n{log}"
    );
    assert_identical(p, b);
    // AGG_B replayed its own entries onto the snapshot rather than joining the two states.
    let log = pair.log("agg_b");
    assert!(
        log.contains("full resync merged") && !log.contains("exact=false"),
        "the full resync was not exact:\n{log}"
    );
    // The snapshot's rows were bulk loaded into AGG_B's storage, not written row by row.
    assert!(
        log.contains("bulk loaded a full resync's rows"),
        "no bulk load:\n{log}"
    );

    // Killed and started again, AGG_B loads what the resync wrote (rows it took unchanged
    // are written as the snapshot sent them, not encoded again) and still agrees.
    agg_b.kill();
    let mut agg_b = pair.spawn(&["store", "--name", "AGG_B"], "agg_b1");
    let (p, b) = converged(&pair, alerts, tally).await;
    assert_identical(p, b);
    assert!(
        pair.log("agg_b1").contains("loaded the alert table"),
        "AGG_B did not start again:\n{}",
        pair.log("agg_b1")
    );

    // AGG_B loses its data directory: its peer brings it back, and AGG_P, whose cursor for
    // AGG_B's old log is now ahead of the new one, keeps everything and takes the new events.
    agg_b.kill();
    std::fs::remove_dir_all(pair.data_dir.join("agg_b")).unwrap();
    let _agg_b = pair.spawn(&["store", "--name", "AGG_B"], "agg_b2");
    let b2 = Origin::new("b2", 1);
    send(b_addr, &events(&b2, 1..=100, |s| format!("new-{s}"))).await;
    let (p, b) = converged(&pair, alerts + 100, tally + 100).await;
    assert_identical(p, b);
    let status = http_get(gw_http, "/status").1;
    println!("gateway at the end: {status}");
}
