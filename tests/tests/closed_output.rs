//! Components and commands whose standard output or error goes nowhere (`tandem up | head`,
//! a supervisor that went away): they must keep working, stop when told, and never panic.

#![allow(clippy::unwrap_used)] // a test that cannot read its own fixture should fail

use std::process::Stdio;
use std::time::Duration;

use tandem_tests::{Pair, Proc, alerts_file, try_http_get, wait_http_ok, wait_output};

/// Starts `args` with standard output and error pipes whose reading ends are closed at once.
fn spawn_with_output_closed(pair: &Pair, args: &[&str]) -> Proc {
    let mut child = pair
        .command(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    drop(child.stderr.take());
    Proc::from(child)
}

/// SIGTERM, then what the process left behind once it has stopped (at most 30 s).
fn stop(proc: Proc) -> std::process::Output {
    let _ = std::process::Command::new("kill")
        .arg(proc.pid().to_string())
        .status();
    wait_output(proc, Duration::from_secs(30))
}

/// Kills whatever still runs with this data directory on its command line: the components of
/// an `up` that died would otherwise outlive the test.
struct Reaper(String);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = std::process::Command::new("pkill")
            .args(["-KILL", "-f", &self.0])
            .status();
    }
}

#[test]
fn up_keeps_supervising_when_its_output_is_gone() {
    // `tandem up | head -3`, or a terminal that closed: stdout and stderr lead nowhere. The
    // pair must keep running under up, and stop with it.
    let pair = Pair::new(|t| t);
    let _reaper = Reaper(pair.data_dir.display().to_string());
    let mut up = spawn_with_output_closed(&pair, &["up"]);
    let proxy_http = pair.file.proxy("PROXY_P").unwrap().http.unwrap().0;
    let store_http = pair.file.store("AGG_P").unwrap().http.unwrap().0;
    wait_http_ok(proxy_http, "/readyz", Duration::from_secs(30));

    // Logging into the closed pipes, every component still works.
    let input = alerts_file(pair.dir.path(), 20);
    let out = pair.run(&["send", input.to_str().unwrap()], Duration::from_secs(60));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(up.running(), "tandem up died when its output went away");

    let out = stop(up);
    assert!(
        out.status.success(),
        "tandem up ended with {:?}",
        out.status
    );
    for http in [proxy_http, store_http] {
        assert!(
            try_http_get(http, "/healthz").is_err(),
            "{http} still answers after up stopped"
        );
    }
}

#[test]
fn a_store_whose_log_reader_is_gone_keeps_working_and_stops_on_sigterm() {
    let pair = Pair::new(|t| t);
    let mut store = spawn_with_output_closed(&pair, &["store", "--name", "AGG_P"]);
    let http = pair.file.store("AGG_P").unwrap().http.unwrap().0;
    wait_http_ok(http, "/readyz", Duration::from_secs(30));

    // An operator command logs on the store's side (a connection opens and closes).
    let out = pair.run(&["alerts", "--name", "AGG_P"], Duration::from_secs(30));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        store.running(),
        "the store died when its log reader went away"
    );

    let out = stop(store);
    assert!(
        out.status.success(),
        "the store ended with {:?}",
        out.status
    );
}
