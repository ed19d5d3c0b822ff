//! The command-line contract: subcommands, exit codes and error messages that scripts rely on.

#![allow(clippy::unwrap_used)] // a test helper that cannot start tandem should fail the test

use std::process::{Command, Output};

fn tandem(args: &[&str]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(args)
        .current_dir(dir.path())
        .output()
        .unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn help_lists_every_subcommand() {
    let out = tandem(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for sub in [
        "up", "store", "proxy", "gateway", "probe", "send", "alerts", "status", "failback", "ack",
        "delete", "journal", "bench", "certs",
    ] {
        assert!(
            help.lines()
                .any(|l| l.trim_start().starts_with(&format!("{sub} "))),
            "`{sub}` missing from --help:\n{help}"
        );
    }
}

#[test]
fn a_missing_pair_file_exits_2_naming_it() {
    let out = tandem(&["store", "--config", "missing.toml", "--name", "AGG_P"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("missing.toml"), "{}", stderr(&out));
}

#[test]
fn an_unknown_component_exits_2_listing_the_known_ones() {
    let out = tandem(&["store", "--name", "AGG_Q"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("AGG_Q"), "{}", stderr(&out));
    assert!(stderr(&out).contains("AGG_P, AGG_B"), "{}", stderr(&out));
}

#[test]
fn a_bad_pair_file_exits_2_naming_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    let text = tandem_default().replace("store = \"AGG_B\"", "store = \"NOPE\"");
    std::fs::write(&path, text).unwrap();
    let out = tandem(&[
        "proxy",
        "--config",
        path.to_str().unwrap(),
        "--name",
        "PROXY_B",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("bad.toml"), "{err}");
    assert!(err.contains("\"PROXY_B\" store"), "{err}");
}

#[test]
fn an_unknown_option_is_a_usage_error() {
    let out = tandem(&["status", "--no-such-option"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

fn tandem_default() -> String {
    std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../fixtures/pair.toml"
    ))
    .unwrap()
}
