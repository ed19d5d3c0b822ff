//! The probe side of the pair file: how a probe reaches the virtual pair, and its spool.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use tandem_config::{Failback, PairFile, resolve};
use tandem_probe::failover::Settings;
use tandem_probe::pair::PairConfig;
use tandem_probe::spool::Spool;

pub fn pair_config(pair: &PairFile, data_dir: &Path, client_name: &str) -> Result<PairConfig> {
    let probe = pair.probe_section()?;
    let primary = pair.proxy(&probe.primary)?;
    let backup = pair.proxy(&probe.backup)?;
    let deadline = Duration::from_millis(pair.pair.failover_deadline_ms);
    let poll = Duration::from_millis(probe.primary_poll_ms.max(10));
    // Good polls in a row before going back: the hold-down's worth, and never fewer than two,
    // so one lucky answer from a flapping primary does not move every probe.
    let polls = (pair.pair.failback_hold_down_ms / poll.as_millis().max(1) as u64).max(2) as u32;
    Ok(PairConfig {
        client_name: client_name.to_string(),
        primary: (primary.name.clone(), primary.listen.0),
        backup: (backup.name.clone(), backup.listen.0),
        max_frame: pair.pair.max_frame_bytes,
        failover: Settings {
            heartbeat: deadline / 5,
            dead_after: deadline / 2,
            poll_interval: poll,
            polls_to_return: match pair.pair.failback {
                Failback::Auto => polls,
                Failback::Manual => 0,
            },
            max_backoff: Duration::from_secs(1),
        },
        require_resync: !pair.gateways.is_empty(),
        tls: crate::tls::user_client(pair, data_dir)?,
        batch_events: 1_000,
        max_in_flight: 10_000,
        connect_timeout: deadline / 2,
    })
}

/// The spool directory for the probe instance `name`, when the pair file asks for a disk spool.
pub fn spool_dir(pair: &PairFile, data_dir: &Path, name: &str) -> Result<Option<PathBuf>> {
    let probe = pair.probe_section()?;
    Ok(probe
        .spool_dir
        .as_ref()
        .map(|dir| resolve(data_dir, dir).join(name)))
}

pub fn open_spool(pair: &PairFile, data_dir: &Path, name: &str) -> Result<Spool> {
    let dir = spool_dir(pair, data_dir, name)?;
    Spool::open(dir.as_deref(), name)
        .with_context(|| format!("probe {name}: cannot open its spool"))
}

/// A probe instance's name: its kind and its input, so a rerun on the same input finds its own
/// spool (and two probes on different inputs never share one).
pub fn instance_name(kind: &str, file: Option<&Path>) -> String {
    let source = match file {
        Some(path) => path
            .canonicalize()
            .unwrap_or_else(|_| path.to_path_buf())
            .display()
            .to_string(),
        None => "stdin".to_string(),
    };
    let clean: String = source
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{kind}-{}", clean.trim_matches('_'))
}
