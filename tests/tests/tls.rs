//! TLS with real processes: every member verified against the pair's name (so failover keeps
//! working), certificates that are wrong in the ways operators get them wrong, and a
//! certificate replaced on disk.
//!
//! The whole failover, resync and fail-back suites also run over mutual TLS with
//! `TANDEM_TEST_TLS=1` (CI does both).

#![allow(clippy::unwrap_used)] // a test that cannot read its own fixture should fail

use std::time::{Duration, Instant};

use tandem_net::tls::ClientTls;
use tandem_probe::{ClientError, Connection};
use tandem_protocol::{ClientKind, DEFAULT_MAX_FRAME, Message};
use tandem_tests::client::{dial, probe_alerts};
use tandem_tests::{Pair, alerts_file, wait_http_ok, wait_output};

/// Certificates from a CA of their own, as a probe set up against another pair would have.
fn foreign_certs(pair: &Pair) -> std::path::PathBuf {
    let dir = pair.dir.path().join("foreign");
    let out = pair.command_in(&dir, &["certs"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}

fn wait_ready(pair: &Pair, proxies: &[&str]) {
    for proxy in proxies {
        wait_http_ok(
            pair.file.proxy(proxy).unwrap().http.unwrap().0,
            "/readyz",
            Duration::from_secs(30),
        );
    }
}

#[test]
fn events_survive_a_proxy_kill_over_mutual_tls() {
    let pair = Pair::tls(|t| t);
    let _agg_p = pair.spawn(&["store", "--name", "AGG_P"], "agg_p");
    let _agg_b = pair.spawn(&["store", "--name", "AGG_B"], "agg_b");
    let mut proxy_p = pair.spawn(&["proxy", "--name", "PROXY_P"], "proxy_p");
    let _proxy_b = pair.spawn(&["proxy", "--name", "PROXY_B"], "proxy_b");
    wait_ready(&pair, &["PROXY_P", "PROXY_B"]);
    let input = alerts_file(pair.dir.path(), 20_000);
    let send = pair.spawn_piped(&["send", input.to_str().unwrap(), "--rate", "20000", "--json"]);
    std::thread::sleep(Duration::from_millis(500));
    proxy_p.kill();
    let out = wait_output(send, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "send failed over TLS: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let total: u64 = ["AGG_P", "AGG_B"]
        .iter()
        .map(|s| {
            let addr = pair.file.store(s).unwrap().listen.0;
            rt.block_on(probe_alerts(addr))
                .iter()
                .map(|a| a.tally)
                .sum::<u64>()
        })
        .sum();
    assert!(total >= 20_000, "only {total} of 20000 events stored");
}

#[test]
fn a_probe_trusting_another_ca_is_refused_by_both_members_at_once() {
    let pair = Pair::tls(|t| t);
    let _agg_p = pair.spawn(&["store", "--name", "AGG_P"], "agg_p");
    let _agg_b = pair.spawn(&["store", "--name", "AGG_B"], "agg_b");
    let _proxy_p = pair.spawn(&["proxy", "--name", "PROXY_P"], "proxy_p");
    let _proxy_b = pair.spawn(&["proxy", "--name", "PROXY_B"], "proxy_b");
    wait_ready(&pair, &["PROXY_P", "PROXY_B"]);
    let foreign = foreign_certs(&pair);
    let input = alerts_file(pair.dir.path(), 10);
    let started = Instant::now();
    let send = pair
        .command_in(&foreign, &["send", input.to_str().unwrap()])
        .output()
        .unwrap();
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&send.stderr);
    assert_eq!(send.status.code(), Some(1), "{stderr}");
    assert!(took < Duration::from_secs(5), "gave up only after {took:?}");
    assert!(
        stderr.contains("not signed by a trusted CA"),
        "the error does not name the problem: {stderr}"
    );
    // The members' side of it, in their logs.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pair.log("proxy_p").contains("TLS handshake refused") {
        assert!(Instant::now() < deadline, "{}", pair.log("proxy_p"));
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn plaintext_and_tls_mismatches_are_named() {
    let pair = Pair::tls(|t| t);
    let _agg_p = pair.spawn(&["store", "--name", "AGG_P"], "agg_p");
    let tls_addr = pair.file.store("AGG_P").unwrap().listen.0;
    let plain = Pair::plain(|t| t);
    let _plain_p = plain.spawn(&["store", "--name", "AGG_P"], "agg_p");
    let plain_addr = plain.file.store("AGG_P").unwrap().listen.0;
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // Both stores answer once up.
        tandem_tests::client::connect(tls_addr, Duration::from_secs(30)).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        let refused = loop {
            let attempt = Connection::connect(
                tls_addr,
                ClientKind::Operator,
                "plain",
                DEFAULT_MAX_FRAME,
                Duration::from_secs(5),
            )
            .await;
            match attempt {
                Err(ClientError::Connect { .. }) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => break other,
            }
        };
        match refused {
            Err(ClientError::Rejected { message, .. }) => {
                assert!(message.contains("speaks TLS"), "{message}")
            }
            Err(other) => panic!("a plaintext client on a TLS port got: {other}"),
            Ok(_) => panic!("a plaintext client got through on a TLS port"),
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        let refused = loop {
            match dial(
                plain_addr,
                ClientKind::Operator,
                "tls",
                Duration::from_secs(5),
            )
            .await
            {
                Err(ClientError::Connect { .. }) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => break other,
            }
        };
        match refused {
            Err(e @ ClientError::Tls { .. }) => {
                assert!(e.to_string().contains("does not speak TLS"), "{e}")
            }
            Err(other) => panic!("a TLS client on a plaintext port got: {other}"),
            Ok(_) => panic!("a TLS client got through on a plaintext port"),
        }
    });
    assert!(pair.log("agg_p").contains("plaintext client on a TLS port"));
    assert!(
        plain
            .log("agg_p")
            .contains("TLS client on a plaintext port")
    );
}

#[test]
fn a_certificate_replaced_on_disk_is_served_to_the_next_connection() {
    let pair = Pair::tls(|t| t);
    let _agg_p = pair.spawn(&["store", "--name", "AGG_P"], "agg_p");
    let addr = pair.file.store("AGG_P").unwrap().listen.0;
    let foreign = foreign_certs(&pair);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut established = tandem_tests::client::connect(addr, Duration::from_secs(30)).await;
        // The store's certificate and key, replaced by ones from the other CA.
        let tls = pair.data_dir.join("tls");
        for file in ["AGG_P.crt", "AGG_P.key"] {
            std::fs::copy(foreign.join("tls").join(file), tls.join(file)).unwrap();
        }
        let other_ca = ClientTls::load(
            foreign.join("tls/ca.crt"),
            Some((
                foreign.join("tls/client.crt"),
                foreign.join("tls/client.key"),
            )),
            "AGG_V",
        )
        .unwrap();
        // The store still requires client certificates from its own CA, so a client of the
        // other CA is refused after it accepted the new server certificate: proof enough that
        // the new certificate is what a new connection gets.
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let attempt = Connection::connect_tls(
                addr,
                ClientKind::Operator,
                "new",
                DEFAULT_MAX_FRAME,
                Duration::from_secs(5),
                Some(&other_ca),
            )
            .await;
            match attempt {
                Err(ClientError::Tls { message, .. })
                    if message.contains("refused this client's certificate") =>
                {
                    break;
                }
                other => {
                    assert!(
                        Instant::now() < deadline,
                        "the new certificate is not served: {:?}\n{}",
                        other.err(),
                        pair.log("agg_p")
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        // A client of the old CA no longer trusts the store's new certificate...
        match dial(addr, ClientKind::Operator, "old", Duration::from_secs(5)).await {
            Err(e) => assert!(e.to_string().contains("not signed by a trusted CA"), "{e}"),
            Ok(_) => panic!("the old certificate is still served"),
        }
        // ...and the connection made before the change still works.
        let pong = established
            .request(&Message::Ping { nonce: 7 }, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(pong, Message::Pong { nonce: 7 });
    });
    assert!(pair.log("agg_p").contains("TLS certificate reloaded"));
}
