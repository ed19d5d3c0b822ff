//! Alerts near the frame limit, as a probe forwarding large payloads makes them: a probe's
//! batches, the pages of a store's log and snapshot, and a query's answer are cut to fit the
//! limit rather than refused whole (which stalled the probe, replication or the resync for
//! ever), and an alert over the limit is rejected by `tandem send`, naming its size.

#![allow(clippy::unwrap_used)] // a test that cannot read its own fixture should fail

use std::io::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tandem_protocol::{Alert, Message, Query};
use tandem_tests::client::{connect, occurrence, query};
use tandem_tests::{Pair, wait_output};

const ALERTS: usize = 80;

/// The alert `id` as the store at `addr` has it, asked for alone: a whole table of large
/// alerts does not fit one answer.
async fn alert(addr: SocketAddr, id: &str) -> Option<Alert> {
    let q = Query {
        filter: format!("identifier = {id}"),
        ..Query::default()
    };
    query(addr, q).await.0.pop()
}

/// What a finished command printed, on either stream.
fn said(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A pair whose frames are at most 64 KiB, the smallest limit the pair file takes.
fn pair_of_small_frames() -> Pair {
    Pair::new(|t| {
        t.replace(
            "failover_deadline_ms = 1000",
            "failover_deadline_ms = 1000\nmax_frame_bytes = 65536",
        )
    })
}

/// Writes three alerts as JSON lines to `path`: `first` and `last` small, and between them
/// `middle` with a summary of `bytes`.
fn three_lines(path: &std::path::Path, first: &str, middle: &str, last: &str, bytes: usize) {
    let line = |id: &str, summary: &str| {
        format!(r#"{{"identifier":"{id}","node":"n","severity":3,"summary":"{summary}"}}"#)
    };
    let text = [
        line(first, "one"),
        line(middle, &"m".repeat(bytes)),
        line(last, "three"),
    ]
    .join("\n");
    std::fs::write(path, text + "\n").unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_alerts_reach_both_stores_in_frames_under_the_limit() {
    // Frames of 1 MiB and alerts of 50 KB: a batch, a page of the log or of the snapshot
    // would hold 4 MB. The primary keeps 20 log entries, so the backup, started later,
    // needs a full resync.
    let pair = Pair::new(|t| {
        t.replace(
            "failover_deadline_ms = 1000",
            "failover_deadline_ms = 1000\nmax_frame_bytes = 1048576",
        )
        .replace(
            "data_dir = \"agg_p\"",
            "data_dir = \"agg_p\"\nlog_retention_entries = 20\nlog_max_entries = 20",
        )
    });
    let p_addr = pair.file.store("AGG_P").unwrap().listen.0;
    let b_addr = pair.file.store("AGG_B").unwrap().listen.0;
    let _agg_p = pair.spawn(&["store", "--name", "AGG_P"], "agg_p");
    let _proxy_p = pair.spawn(&["proxy", "--name", "PROXY_P"], "proxy_p");
    let _proxy_b = pair.spawn(&["proxy", "--name", "PROXY_B"], "proxy_b");

    let input = pair.dir.path().join("large.jsonl");
    let mut file = std::fs::File::create(&input).unwrap();
    for i in 0..ALERTS {
        let summary = format!("payload {i} ").repeat(5_000);
        writeln!(
            file,
            r#"{{"identifier":"big-{i}","node":"n{i}","severity":4,"summary":"{summary}"}}"#
        )
        .unwrap();
        if i == ALERTS / 2 {
            let summary = "y".repeat(1_100_000);
            writeln!(
                file,
                r#"{{"identifier":"huge","node":"n","severity":4,"summary":"{summary}"}}"#
            )
            .unwrap();
        }
    }
    drop(file);
    let send = pair.spawn_piped(&["send", input.to_str().unwrap()]);
    let out = wait_output(send, Duration::from_secs(120));
    let said = said(&out);
    assert!(
        said.contains(&format!("acknowledged {ALERTS}, rejected 1")),
        "{said}"
    );
    assert!(said.contains("bytes encoded, over the"), "{said}");
    assert!(
        said.contains("line=42"),
        "the rejected line is named: {said}"
    );

    // The backup comes up behind the primary's retained log: a full resync, then the log.
    let _agg_b = pair.spawn(&["store", "--name", "AGG_B"], "agg_b");
    let _gw = pair.spawn(&["gateway"], "gw");
    let deadline = Instant::now() + Duration::from_secs(90);
    for i in 0..ALERTS {
        let id = format!("big-{i}");
        let want = alert(p_addr, &id).await;
        assert!(want.is_some(), "{id} is not on the primary");
        loop {
            let got = alert(b_addr, &id).await;
            if got.is_some()
                && got.as_ref().map(|a| (&a.summary, a.tally))
                    == want.as_ref().map(|a| (&a.summary, a.tally))
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{id} did not reach the backup within 90 s\ngateway log:\n{}",
                pair.log("gw")
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert!(alert(b_addr, "huge").await.is_none());

    // Every alert at once does not fit an answer: it is cut, and says how many matched.
    let list = pair.spawn_piped(&["alerts", "--name", "AGG_B"]);
    let out = wait_output(list, Duration::from_secs(30));
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{listed}");
    let counts: Vec<usize> = listed
        .lines()
        .last()
        .unwrap_or_default()
        .trim_matches(|c| c == '(' || c == ')')
        .split(' ')
        .filter_map(|n| n.parse().ok())
        .collect();
    let [shown, total] = counts[..] else {
        panic!("no count line in {listed}")
    };
    assert!(shown > 0 && shown < ALERTS, "{shown} shown");
    assert!(total >= ALERTS, "{total} matched");
}

/// A client that sends an event no page of the log could hold alone (an older probe, or one
/// that does not check) is refused at the store, before the event is logged: logged, it would
/// stop the gateway at it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_refuses_an_event_too_large_for_its_log_pages() {
    let pair = pair_of_small_frames();
    let addr = pair.file.store("AGG_P").unwrap().listen.0;
    let _agg_p = pair.spawn(&["store", "--name", "AGG_P"], "agg_p");
    let origin = tandem_protocol::Origin::new("big", 1);
    let mut big = occurrence(&origin, 1, "big".into());
    let fits = occurrence(&origin, 2, "fits".into());
    if let tandem_protocol::EventBody::Occurrence(fields) = &mut big.body {
        let mut wide = fields.unpack();
        wide.summary = "z".repeat(63_000);
        *fields = wide.pack();
    }
    let mut conn = connect(addr, Duration::from_secs(30)).await;
    let answer = conn
        .request(
            &Message::Events {
                batch: 1,
                events: vec![fits.clone(), big],
            },
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    match answer {
        Message::Refused {
            batch,
            index,
            reason,
        } => {
            assert_eq!((batch, index), (1, 1));
            assert!(reason.contains("bytes encoded, over the"), "{reason}");
        }
        other => panic!("expected the batch refused, got {other:?}"),
    }
    // Nothing of the refused batch was applied; the connection still takes batches.
    let answer = conn
        .request(
            &Message::Events {
                batch: 2,
                events: vec![fits],
            },
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert!(
        matches!(
            answer,
            Message::Ack {
                batch: 2,
                applied: 1,
                ..
            }
        ),
        "{answer:?}"
    );
}

/// A long-running probe skips a line whose alert the pair cannot carry, as it skips a line
/// that does not parse, and goes on with the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_skips_an_alert_too_large_to_carry_and_goes_on() {
    let pair = pair_of_small_frames();
    let addr = pair.file.store("AGG_P").unwrap().listen.0;
    let _agg_p = pair.spawn(&["store", "--name", "AGG_P"], "agg_p");
    let _proxy_p = pair.spawn(&["proxy", "--name", "PROXY_P"], "proxy_p");
    let _proxy_b = pair.spawn(&["proxy", "--name", "PROXY_B"], "proxy_b");
    let input = pair.dir.path().join("probe.jsonl");
    three_lines(&input, "before", "huge", "after", 70_000);
    let probe = pair.spawn_piped(&["probe", "json", input.to_str().unwrap()]);
    let out = wait_output(probe, Duration::from_secs(60));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("over the"), "{said}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while alert(addr, "after").await.is_none() {
        assert!(
            Instant::now() < deadline,
            "the line after was not sent: {said}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(alert(addr, "before").await.is_some());
    assert!(alert(addr, "huge").await.is_none());
}

/// An event spooled under a larger frame limit (the pair file's limit lowered since, or an
/// older version) can never be sent: the resumed probe gives it up as refused, and the events
/// behind it are delivered, not held back for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_spooled_under_a_larger_limit_is_given_up_not_retried_for_ever() {
    let pair = pair_of_small_frames();
    let addr = pair.file.store("AGG_P").unwrap().listen.0;
    let larger = pair.dir.path().join("larger.toml");
    std::fs::write(
        &larger,
        std::fs::read_to_string(&pair.config)
            .unwrap()
            .replace("max_frame_bytes = 65536", "max_frame_bytes = 1048576"),
    )
    .unwrap();
    let input = pair.dir.path().join("spooled.jsonl");
    three_lines(&input, "first", "wide", "last", 100_000);
    // Nothing is up: all three are spooled under the 1 MiB limit, and the send gives up.
    let path = input.to_str().unwrap();
    let mut first = pair.spawn_with_config(&larger, &["send", path, "--timeout", "2"], "send1");
    let deadline = Instant::now() + Duration::from_secs(60);
    while first.running() {
        assert!(Instant::now() < deadline, "the first send did not give up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let _agg_p = pair.spawn(&["store", "--name", "AGG_P"], "agg_p");
    let _proxy_p = pair.spawn(&["proxy", "--name", "PROXY_P"], "proxy_p");
    let _proxy_b = pair.spawn(&["proxy", "--name", "PROXY_B"], "proxy_b");
    let resumed = pair.spawn_piped(&["send", path]);
    let out = wait_output(resumed, Duration::from_secs(60));
    let said = said(&out);
    assert!(
        said.contains("acknowledged 2, rejected 1"),
        "{}\n{said}",
        pair.log("send1")
    );
    assert!(said.contains("over the"), "{said}");
    assert!(alert(addr, "first").await.is_some());
    assert!(alert(addr, "last").await.is_some());
    assert!(alert(addr, "wide").await.is_none());
}
