//! Operator commands and ops endpoints against a running store: list, filter, acknowledge,
//! journal, delete; bad filters; `/healthz`, `/readyz`, `/active`, `/status`, `/metrics`; and
//! bad input that is refused without harming the connection or the data.

#![allow(clippy::unwrap_used)] // a test that cannot read its own fixture should fail

use std::time::Duration;

use tandem_probe::Connection;
use tandem_protocol::{
    AlertFields, ClientKind, DEFAULT_MAX_FRAME, Event, EventBody, Message, Origin, PackedFields,
    Severity,
};
use tandem_tests::client::{alerts, connect, occurrence, send_reliably};
use tandem_tests::{Pair, http_get};

fn json_lines(out: &std::process::Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object a line"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_list_filter_and_act_on_alerts() {
    let pair = Pair::new(|t| t);
    let addr = pair.file.store("AGG_P").unwrap().listen.0;
    let _store = pair.spawn(&["store", "--name", "AGG_P"], "agg_p");
    let origin = Origin::new("ops", 1);
    let mut events: Vec<Event> = (1..=30)
        .map(|seq| occurrence(&origin, seq, format!("web{}:ping", seq % 3)))
        .collect();
    if let EventBody::Occurrence(f) = &mut events[0].body {
        let mut fields = f.unpack();
        fields.severity = Severity::CRITICAL;
        fields.node = "web1".into();
        *f = fields.pack();
    }
    send_reliably(
        addr,
        &events,
        10,
        Duration::ZERO,
        Duration::from_secs(30),
        |_| {},
    )
    .await;

    let limit = Duration::from_secs(30);
    let out = pair.run(&["alerts", "--name", "AGG_P", "--json"], limit);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed = json_lines(&out);
    assert_eq!(listed.len(), 3);
    assert!(
        listed
            .iter()
            .all(|a| a["tally"] == 10 && a["server_name"] == "AGG_P")
    );

    let out = pair.run(
        &[
            "alerts",
            "--name",
            "AGG_P",
            "--json",
            "--filter",
            "tally >= 10 and identifier ~ \"web0\"",
        ],
        limit,
    );
    let listed = json_lines(&out);
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["identifier"], "web0:ping");

    let out = pair.run(&["alerts", "--name", "AGG_P"], limit);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("IDENTIFIER") && table.contains("web2:ping"),
        "{table}"
    );

    // A reader that stops early (`tandem alerts | head -1`) has what it wanted: no error.
    let mut child = pair
        .command(&["alerts", "--name", "AGG_P"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = tandem_tests::wait_output(child.into(), limit);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && err.is_empty(),
        "{:?}: {err}",
        out.status
    );

    let out = pair.run(
        &["alerts", "--name", "AGG_P", "--filter", "sevrity >= 4"],
        limit,
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("column 1") && err.contains("sevrity"), "{err}");

    let out = pair.run(
        &["ack", "--name", "AGG_P", "web1:ping", "--user", "alice"],
        limit,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = pair.run(
        &[
            "journal",
            "--name",
            "AGG_P",
            "web1:ping",
            "looking into it",
            "--user",
            "alice",
        ],
        limit,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = pair.run(&["delete", "--name", "AGG_P", "web2:ping"], limit);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = pair.run(&["delete", "--name", "AGG_P", "no-such-alert"], limit);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no alert \"no-such-alert\""));

    let now = alerts(addr).await;
    assert_eq!(now.len(), 2, "the deleted alert is gone");
    let web1 = now.iter().find(|a| a.identifier == "web1:ping").unwrap();
    assert!(web1.acknowledged);
    assert_eq!(web1.journal.len(), 1);
    assert_eq!(web1.journal[0].user, "alice");
    assert_eq!(web1.journal[0].text, "looking into it");

    // A new occurrence after the delete brings the alert back with a fresh tally.
    let again = vec![occurrence(&origin, 31, "web2:ping".into())];
    send_reliably(
        addr,
        &again,
        10,
        Duration::ZERO,
        Duration::from_secs(30),
        |_| {},
    )
    .await;
    let now = alerts(addr).await;
    assert_eq!(
        now.iter()
            .find(|a| a.identifier == "web2:ping")
            .unwrap()
            .tally,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_endpoints_report_health_role_and_metrics() {
    let pair = Pair::new(|t| t);
    let primary = pair.file.store("AGG_P").unwrap().clone();
    let backup = pair.file.store("AGG_B").unwrap().clone();
    let _p = pair.spawn(&["store", "--name", "AGG_P"], "agg_p");
    let _b = pair.spawn(&["store", "--name", "AGG_B"], "agg_b");
    let origin = Origin::new("http", 1);
    let events: Vec<Event> = (1..=5)
        .map(|s| occurrence(&origin, s, "x".into()))
        .collect();
    send_reliably(
        primary.listen.0,
        &events,
        5,
        Duration::ZERO,
        Duration::from_secs(30),
        |_| {},
    )
    .await;
    connect(backup.listen.0, Duration::from_secs(30)).await;

    let p_http = primary.http.unwrap().0;
    let b_http = backup.http.unwrap().0;
    assert_eq!(http_get(p_http, "/healthz").0, 200);
    assert_eq!(http_get(p_http, "/readyz").0, 200);
    assert_eq!(http_get(p_http, "/active").0, 200);
    assert_eq!(
        http_get(b_http, "/active").0,
        503,
        "the backup is not active while the primary runs"
    );
    let (code, body) = http_get(p_http, "/status");
    assert_eq!(code, 200);
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["name"], "AGG_P");
    assert_eq!(status["alerts"], 1);
    assert_eq!(status["lsn"], 5);
    let (code, metrics) = http_get(p_http, "/metrics");
    assert_eq!(code, 200);
    for name in [
        "tandem_store_events_applied_total 5",
        "tandem_store_commit_seconds",
        "tandem_store_batch_events",
        "tandem_store_alerts 1",
        // No gateway has said how far the peer got: it lacks the whole log.
        "tandem_store_log_entries 5",
        "tandem_store_log_unapplied_entries 5",
    ] {
        assert!(
            metrics.contains(name),
            "{name} missing from /metrics:\n{metrics}"
        );
    }
}

fn fields(identifier: &str) -> PackedFields {
    AlertFields {
        identifier: identifier.into(),
        severity: Severity::MINOR,
        ..AlertFields::default()
    }
    .pack()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_harms_nothing() {
    let pair = Pair::new(|t| t);
    let addr = pair.file.store("AGG_P").unwrap().listen.0;
    let _store = pair.spawn(&["store", "--name", "AGG_P"], "agg_p");
    let mut conn = connect(addr, Duration::from_secs(30)).await;
    let origin = Origin::new("bad", 1);
    let t = Duration::from_secs(10);
    let ev = |seq, id: &str| Event {
        origin: origin.clone(),
        seq,
        time: 1,
        body: EventBody::Occurrence(fields(id)),
    };

    let good = Message::Events {
        batch: 1,
        events: vec![ev(1, "kept")],
    };
    assert!(matches!(
        conn.request(&good, t).await.unwrap(),
        Message::Ack {
            batch: 1,
            applied: 1,
            ..
        }
    ));

    // An event without identifier: the whole batch is refused, naming the event and why.
    let bad = Message::Events {
        batch: 2,
        events: vec![ev(2, "fine"), ev(3, "")],
    };
    match conn.request(&bad, t).await.unwrap() {
        Message::Refused {
            batch: 2,
            index: 1,
            reason,
        } => assert!(reason.contains("identifier"), "{reason}"),
        other => panic!("expected a refusal, got {other:?}"),
    }

    // An oversized batch.
    let many = (10..10_020).map(|s| ev(s, "many")).collect();
    match conn
        .request(
            &Message::Events {
                batch: 3,
                events: many,
            },
            t,
        )
        .await
        .unwrap()
    {
        Message::Refused {
            batch: 3, reason, ..
        } => assert!(reason.contains("limit"), "{reason}"),
        other => panic!("expected a refusal, got {other:?}"),
    }

    // A severity out of range cannot be encoded by this client; forge the frame by hand.
    let mut raw = Connection::connect(addr, ClientKind::Probe, "forger", DEFAULT_MAX_FRAME, t)
        .await
        .unwrap();
    let mut frame = tandem_protocol::codec::to_bytes(&Message::Events {
        batch: 9,
        events: vec![Event {
            origin: Origin::new("f", 1),
            seq: 1,
            time: 1,
            body: EventBody::Occurrence(
                AlertFields {
                    identifier: "f".into(),
                    severity: Severity::CRITICAL,
                    ..AlertFields::default()
                }
                .pack(),
            ),
        }],
    })
    .unwrap();
    let at = frame.iter().rposition(|&b| b == 5).unwrap();
    frame[at] = 9;
    raw.send_raw_frame(&frame).await.unwrap();
    match raw.recv().await.unwrap() {
        Message::Refused {
            batch: 9, reason, ..
        } => assert!(reason.contains("severity 9 is out of range"), "{reason}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    // The same connection still works.
    assert!(matches!(
        raw.request(&Message::Ping { nonce: 4 }, t).await.unwrap(),
        Message::Pong { nonce: 4 }
    ));

    // A frame announcing more than the maximum closes that connection only.
    let mut huge = Connection::connect(addr, ClientKind::Probe, "huge", DEFAULT_MAX_FRAME, t)
        .await
        .unwrap();
    huge.send_raw_length(u32::MAX).await.unwrap();
    match huge.recv().await {
        Ok(Message::Error { message }) => assert!(message.contains("maximum"), "{message}"),
        other => panic!("expected an error, got {other:?}"),
    }

    // The first connection is untouched and the data is intact.
    let more = Message::Events {
        batch: 4,
        events: vec![ev(2, "after")],
    };
    assert!(matches!(
        conn.request(&more, t).await.unwrap(),
        Message::Ack {
            batch: 4,
            applied: 1,
            ..
        }
    ));
    let ids: Vec<String> = alerts(addr)
        .await
        .into_iter()
        .map(|a| a.identifier)
        .collect();
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert!(ids.contains(&"kept".to_string()) && ids.contains(&"after".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn housekeeping_expires_and_deletes_on_the_acting_primary_only() {
    let pair = Pair::new(|t| {
        t.replace(
            "data_dir = \"agg_b\"",
            "data_dir = \"agg_b\"\nclear_delete_after_s = 1",
        )
        .replace(
            "data_dir = \"agg_p\"",
            "data_dir = \"agg_p\"\nclear_delete_after_s = 1",
        )
    });
    let primary = pair.file.store("AGG_P").unwrap().listen.0;
    let backup = pair.file.store("AGG_B").unwrap().listen.0;
    let _p = pair.spawn(&["store", "--name", "AGG_P"], "agg_p");
    let _b = pair.spawn(&["store", "--name", "AGG_B"], "agg_b");
    let origin = Origin::new("hk", 1);
    let mut expiring = occurrence(&origin, 1, "expiring".into());
    if let EventBody::Occurrence(f) = &mut expiring.body {
        f.expire_seconds = 1; // its occurrence time is long past
    }
    let lasting = occurrence(&origin, 2, "lasting".into());
    let events = vec![expiring, lasting];
    for store in [primary, backup] {
        send_reliably(
            store,
            &events,
            10,
            Duration::ZERO,
            Duration::from_secs(30),
            |_| {},
        )
        .await;
    }

    let mut gone = false;
    for _ in 0..200 {
        let ids: Vec<String> = alerts(primary)
            .await
            .into_iter()
            .map(|a| a.identifier)
            .collect();
        if !ids.contains(&"expiring".to_string()) {
            assert!(ids.contains(&"lasting".to_string()));
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        gone,
        "the expired alert was cleared and deleted within 10 s:\n{}",
        pair.log("agg_p")
    );
    let on_backup: Vec<String> = alerts(backup)
        .await
        .into_iter()
        .map(|a| a.identifier)
        .collect();
    assert_eq!(
        on_backup.len(),
        2,
        "the backup, not acting primary, leaves housekeeping to the primary"
    );
}

/// `tandem status` asks every member at once: with every member hung (each port accepts
/// connections and never answers), it still answers, each member shown down, in about one
/// member's timeout (2 s), where asking one after the other would add up to about 14 s.
#[test]
fn status_with_every_member_hung_answers_in_about_one_timeout() {
    let pair = Pair::new(|t| t);
    let f = &pair.file;
    let addrs = f
        .stores
        .iter()
        .flat_map(|s| [Some(s.listen.0), s.http.map(|a| a.0)])
        .chain(
            f.proxies
                .iter()
                .flat_map(|p| [Some(p.listen.0), p.http.map(|a| a.0)]),
        )
        .chain(f.gateways.iter().map(|g| g.http.map(|a| a.0)))
        .flatten();
    // Bound and never accepted from: the kernel completes each connection, and no byte
    // ever comes back.
    let _hung: Vec<std::net::TcpListener> = addrs
        .map(|a| std::net::TcpListener::bind(a).unwrap())
        .collect();
    // Built (if need be) before the clock starts.
    tandem_tests::tandem_bin();
    let started = std::time::Instant::now();
    let out = pair.run(&["status", "--json"], Duration::from_secs(60));
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for kind in ["stores", "proxies", "gateways"] {
        let members = status[kind].as_array().unwrap();
        assert!(!members.is_empty(), "{kind}");
        assert!(
            members.iter().all(|m| m["up"] == false),
            "{kind}: {members:?}"
        );
    }
    assert!(
        took < Duration::from_secs(8),
        "status took {took:?}: the members' timeouts were added up"
    );
}
