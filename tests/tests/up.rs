//! `tandem up`: the pair comes up, takes alerts, and stops entirely on SIGTERM.

#![allow(clippy::unwrap_used)] // a test that cannot read its own fixture should fail

use std::time::Duration;

use tandem_tests::{Pair, alerts_file, try_http_get, wait_http_ok, wait_output};

#[test]
fn up_runs_the_pair_and_stops_it_on_sigterm() {
    let pair = Pair::new(|t| t);
    let mut up = pair.spawn(&["up"], "up");
    let proxy_http = pair.file.proxy("PROXY_P").unwrap().http.unwrap().0;
    let backup_http = pair.file.proxy("PROXY_B").unwrap().http.unwrap().0;
    wait_http_ok(proxy_http, "/readyz", Duration::from_secs(30));
    wait_http_ok(backup_http, "/readyz", Duration::from_secs(30));

    let input = alerts_file(pair.dir.path(), 100);
    let out = wait_output(
        pair.spawn_piped(&["send", input.to_str().unwrap()]),
        Duration::from_secs(60),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = pair.log("up");
    assert!(
        log.contains("store AGG_P") && log.contains("proxy PROXY_B"),
        "{log}"
    );

    let _ = std::process::Command::new("kill")
        .arg(up.pid().to_string())
        .status();
    for _ in 0..600 {
        if !up.running() {
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    assert!(!up.running(), "tandem up stops on SIGTERM");
    for http in [proxy_http, backup_http] {
        assert!(
            try_http_get(http, "/healthz").is_err(),
            "{http} still answers after up stopped"
        );
    }
}
