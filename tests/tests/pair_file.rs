//! The pair file as components see it: a generated pair with ephemeral ports is accepted, and
//! a component asked for by an unknown name refuses to start with exit code 2.

#![allow(clippy::unwrap_used)] // a test that cannot read its own fixture should fail

use std::time::Duration;

use tandem_tests::Pair;

#[test]
fn an_unknown_store_name_is_a_configuration_error() {
    let pair = Pair::new(|t| t);
    let out = pair.run(&["store", "--name", "AGG_Z"], Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("pair.toml"), "{err}");
    assert!(err.contains("AGG_Z"), "{err}");
}

#[test]
fn a_pair_file_without_a_probe_section_is_refused_by_send() {
    let pair = Pair::new(|t| {
        let cut = t.find("[probe]").expect("the default pair has [probe]");
        t[..cut].to_string()
    });
    let out = pair.run(&["send"], Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("[probe]"), "{err}");
}
