//! The pair file: one TOML file that describes every component of a tandem pair.
//!
//! Loading checks everything a component would otherwise trip over at run time (addresses,
//! references between components, duplicate names, roles) and names the file and the field in
//! every error, so a bad pair file fails at start with a message that says what to fix.
//! `fixtures/pair.toml` is compiled in as the default for a first run.

#![forbid(unsafe_code)]

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Deserialize;

/// The pair file used when `--config` is not given: the repository's `fixtures/pair.toml`.
pub const DEFAULT_PAIR_FILE: &str = include_str!("../../fixtures/pair.toml");

/// What the default pair file is called in messages.
pub const BUILTIN_NAME: &str = "<built-in fixtures/pair.toml>";

/// Where data directories live unless `--data-dir` says otherwise.
pub const DEFAULT_DATA_DIR: &str = "tandem-data";

/// A pair file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "{path}: cannot read the pair file: {source} (pass --config FILE with an existing file, or leave --config out to use the built-in default pair)"
    )]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{path}: {field}: {message}")]
    Invalid {
        path: String,
        field: String,
        message: String,
    },
    #[error(
        "{path}: no {kind} named {name:?} (the pair file has {known}); pass --name with one of those"
    )]
    UnknownComponent {
        path: String,
        kind: &'static str,
        name: String,
        known: String,
    },
    #[error(
        "{path}: the pair file has {count} {kind} components ({known}); pass --name to choose one"
    )]
    NameRequired {
        path: String,
        kind: &'static str,
        count: usize,
        known: String,
    },
}

/// A listen address, checked when the file is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(try_from = "String")]
pub struct Addr(pub SocketAddr);

impl TryFrom<String> for Addr {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        SocketAddr::from_str(s.trim()).map(Addr).map_err(|_| {
            format!("{s:?} is not a socket address: write IP:PORT, such as \"127.0.0.1:4100\"")
        })
    }
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreRole {
    Primary,
    Backup,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Failback {
    /// The backup sends its clients back once the primary is back, resynced and past hold-down.
    #[default]
    Auto,
    /// Only `tandem failback` moves clients back.
    Manual,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Replication {
    /// A probe's acknowledgement means durable on the store it reached.
    #[default]
    Async,
    /// A probe's acknowledgement waits until the peer store has the event too (RPO 0), up to
    /// `sync_timeout_ms`, then degrades to async while the peer is gone.
    Sync,
}

fn default_failover_deadline() -> u64 {
    1000
}
fn default_hold_down() -> u64 {
    2000
}
fn default_failback_deadline() -> u64 {
    2000
}
/// The smallest `max_frame_bytes` accepted.
const MIN_FRAME: usize = 64 * 1024;

/// The longest component name accepted, in bytes.
const MAX_NAME: usize = 255;

fn default_max_frame() -> usize {
    16 * 1024 * 1024
}
fn default_sync_timeout() -> u64 {
    1000
}
fn default_primary_poll() -> u64 {
    500
}
fn default_clear_delete_after() -> u64 {
    120
}
fn default_max_probes() -> usize {
    10_000
}
fn default_max_in_flight() -> usize {
    10_000
}
fn default_log_retention() -> u64 {
    2_000_000
}
/// `log_max_entries` when the pair file does not set it (nor a larger retention).
const DEFAULT_LOG_MAX: u64 = 10_000_000;
fn default_true() -> bool {
    true
}

/// `[pair]`: settings shared by the whole pair.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PairSection {
    pub name: String,
    #[serde(default = "default_failover_deadline")]
    pub failover_deadline_ms: u64,
    #[serde(default = "default_failback_deadline")]
    pub failback_deadline_ms: u64,
    #[serde(default)]
    pub failback: Failback,
    #[serde(default = "default_hold_down")]
    pub failback_hold_down_ms: u64,
    #[serde(default)]
    pub replication: Replication,
    #[serde(default = "default_sync_timeout")]
    pub sync_timeout_ms: u64,
    #[serde(default = "default_max_frame")]
    pub max_frame_bytes: usize,
}

/// `[[store]]`: one aggregation store.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    pub name: String,
    pub role: StoreRole,
    pub listen: Addr,
    pub http: Option<Addr>,
    pub data_dir: PathBuf,
    /// Seconds after its last state change at which a clear alert is deleted.
    #[serde(default = "default_clear_delete_after")]
    pub clear_delete_after_s: u64,
    /// Housekeeping (expiry, deletion of clear alerts) runs on the acting primary only.
    #[serde(default = "default_true")]
    pub housekeeping: bool,
    /// A shell command run on every role change, with `TANDEM_ROLE` in its environment.
    pub on_role_change: Option<String>,
    /// Change-log entries kept whatever the peer has applied.
    #[serde(default = "default_log_retention")]
    pub log_retention_entries: u64,
    /// Change-log entries kept at most while the peer has not applied them; a peer further
    /// behind needs a full resync. Read through [`StoreSection::log_max`].
    pub log_max_entries: Option<u64>,
}

impl StoreSection {
    /// `log_max_entries`, by default 10,000,000 or the retention if that is larger (a pair
    /// file that raised the retention alone keeps working).
    pub fn log_max(&self) -> u64 {
        self.log_max_entries
            .unwrap_or_else(|| DEFAULT_LOG_MAX.max(self.log_retention_entries))
    }
}

/// `[[proxy]]`: one proxy in front of one store.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxySection {
    pub name: String,
    pub listen: Addr,
    pub http: Option<Addr>,
    pub store: String,
    #[serde(default = "default_max_probes")]
    pub max_probes: usize,
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight_per_probe: usize,
}

/// `[[gateway]]`: a bidirectional gateway; more than one is a hot standby.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewaySection {
    pub name: String,
    pub http: Option<Addr>,
    /// Records per snapshot page in a full resync; bounds the gateway's memory.
    #[serde(default = "default_resync_page")]
    pub resync_page: u32,
    /// Most snapshot records merged per second in a full resync (0: no limit), so a resync
    /// leaves the stores room for live traffic.
    #[serde(default = "default_resync_rate")]
    pub resync_rate: u64,
}

/// Pages of 4,000: a resync's fixed cost is per page (a commit, its sync, the wake-ups of each
/// stage), and once merging a row became cheap, pages of 1,000 took the resync 14 % longer
/// (docs/PERFORMANCE.md). A live batch waits behind at most a page's merge, a few ms.
fn default_resync_page() -> u32 {
    4_000
}

fn default_resync_rate() -> u64 {
    1_000_000
}

/// `[probe]`: how probes reach the virtual pair.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeSection {
    pub primary: String,
    pub backup: String,
    pub spool_dir: Option<PathBuf>,
    /// How often a probe on the backup asks the primary whether it may come back.
    #[serde(default = "default_primary_poll")]
    pub primary_poll_ms: u64,
}

/// `[tls]`: certificates for every link (paths relative to `--data-dir`). `{name}` in `cert`
/// and `key` stands for the component's name, so one section serves every component.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    #[serde(default)]
    pub require_client_cert: bool,
    /// The name every member's certificate must carry; default: the pair's name.
    pub server_name: Option<String>,
    /// The client certificate and key probes and operators present under mutual TLS.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

impl TlsSection {
    /// `path` with `{name}` replaced by the component's name.
    pub fn for_component(path: &Path, component: &str) -> PathBuf {
        PathBuf::from(path.to_string_lossy().replace("{name}", component))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPairFile {
    pair: PairSection,
    #[serde(default)]
    store: Vec<StoreSection>,
    #[serde(default)]
    proxy: Vec<ProxySection>,
    #[serde(default)]
    gateway: Vec<GatewaySection>,
    probe: Option<ProbeSection>,
    tls: Option<TlsSection>,
}

/// A loaded and checked pair file.
#[derive(Clone, Debug)]
pub struct PairFile {
    /// Where it came from, for messages.
    pub source: String,
    pub pair: PairSection,
    pub stores: Vec<StoreSection>,
    pub proxies: Vec<ProxySection>,
    pub gateways: Vec<GatewaySection>,
    pub probe: Option<ProbeSection>,
    pub tls: Option<TlsSection>,
}

impl PairFile {
    /// Reads `path`, or the built-in default pair when `path` is `None`.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        match path {
            None => PairFile::parse(DEFAULT_PAIR_FILE, BUILTIN_NAME),
            Some(path) => {
                let shown = path.display().to_string();
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: shown.clone(),
                    source,
                })?;
                PairFile::parse(&text, &shown)
            }
        }
    }

    /// Parses and checks pair-file text; `source` names it in errors.
    pub fn parse(text: &str, source: &str) -> Result<Self, ConfigError> {
        let raw: RawPairFile = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: source.to_string(),
            message: e.to_string().trim_end().to_string(),
        })?;
        let file = PairFile {
            source: source.to_string(),
            pair: raw.pair,
            stores: raw.store,
            proxies: raw.proxy,
            gateways: raw.gateway,
            probe: raw.probe,
            tls: raw.tls,
        };
        file.check()?;
        Ok(file)
    }

    fn invalid(&self, field: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.source.clone(),
            field: field.into(),
            message: message.into(),
        }
    }

    fn check(&self) -> Result<(), ConfigError> {
        if self.pair.name.trim().is_empty() {
            return Err(self.invalid("[pair] name", "must not be empty"));
        }
        if self.pair.failover_deadline_ms == 0 {
            return Err(self.invalid("[pair] failover_deadline_ms", "must be above 0"));
        }
        // At least 64 KiB: a page of the log or of a snapshot keeps 4 KiB of its frame for the
        // head a gateway adds, and its own head repeats the snapshot's applied ranges.
        if self.pair.max_frame_bytes < MIN_FRAME || self.pair.max_frame_bytes > 64 * 1024 * 1024 {
            return Err(self.invalid(
                "[pair] max_frame_bytes",
                format!(
                    "{} is out of range: use 65536 (64 KiB) to 67108864 (64 MiB)",
                    self.pair.max_frame_bytes
                ),
            ));
        }

        let mut names = HashSet::new();
        let all = self
            .stores
            .iter()
            .map(|s| ("[[store]]", &s.name))
            .chain(self.proxies.iter().map(|p| ("[[proxy]]", &p.name)))
            .chain(self.gateways.iter().map(|g| ("[[gateway]]", &g.name)));
        for (section, name) in all {
            if name.trim().is_empty() {
                return Err(self.invalid(format!("{section} name"), "must not be empty"));
            }
            // A name travels in the head a gateway puts on a page of the log or of a snapshot,
            // which has 4 KiB of its frame for it; monitoring labels want short ones anyway.
            if name.len() > MAX_NAME {
                return Err(self.invalid(
                    format!("{section} name"),
                    format!(
                        "{name:?} is {} bytes long; names are at most {MAX_NAME} bytes",
                        name.len()
                    ),
                ));
            }
            if !names.insert(name.as_str()) {
                return Err(self.invalid(
                    format!("{section} name"),
                    format!(
                        "{name:?} is used by more than one component; every name must be unique"
                    ),
                ));
            }
        }

        for store in &self.stores {
            if store.log_max() < store.log_retention_entries {
                return Err(self.invalid(
                    format!("[[store]] {:?} log_max_entries", store.name),
                    format!(
                        "{} is below log_retention_entries ({}): the most the log keeps for a peer cannot be less than what it always keeps; raise log_max_entries or lower log_retention_entries",
                        store.log_max(),
                        store.log_retention_entries
                    ),
                ));
            }
        }

        let primaries: Vec<_> = self
            .stores
            .iter()
            .filter(|s| s.role == StoreRole::Primary)
            .collect();
        let backups: Vec<_> = self
            .stores
            .iter()
            .filter(|s| s.role == StoreRole::Backup)
            .collect();
        if self.stores.len() != 2 || primaries.len() != 1 || backups.len() != 1 {
            return Err(self.invalid(
                "[[store]] role",
                format!(
                    "a pair has exactly two stores, one with role = \"primary\" and one with role = \"backup\" (found {} primary, {} backup)",
                    primaries.len(),
                    backups.len()
                ),
            ));
        }

        let mut listens = HashSet::new();
        let addrs = self
            .stores
            .iter()
            .flat_map(|s| {
                [
                    ("listen", &s.name, Some(s.listen)),
                    ("http", &s.name, s.http),
                ]
            })
            .chain(self.proxies.iter().flat_map(|p| {
                [
                    ("listen", &p.name, Some(p.listen)),
                    ("http", &p.name, p.http),
                ]
            }))
            .chain(self.gateways.iter().map(|g| ("http", &g.name, g.http)));
        for (field, name, addr) in addrs {
            let Some(addr) = addr else { continue };
            if addr.0.port() != 0 && !listens.insert(addr) {
                return Err(self.invalid(
                    format!("{name:?} {field}"),
                    format!("{addr} is used by another component; give each its own address"),
                ));
            }
        }

        for proxy in &self.proxies {
            if self.store(&proxy.store).is_err() {
                return Err(self.invalid(
                    format!("[[proxy]] {:?} store", proxy.name),
                    format!(
                        "{:?} names no [[store]] (known: {})",
                        proxy.store,
                        self.known(self.stores.iter().map(|s| &s.name))
                    ),
                ));
            }
        }

        if let Some(probe) = &self.probe {
            for (field, name) in [("primary", &probe.primary), ("backup", &probe.backup)] {
                if self.proxy(name).is_err() {
                    return Err(self.invalid(
                        format!("[probe] {field}"),
                        format!(
                            "{name:?} names no [[proxy]] (known: {})",
                            self.known(self.proxies.iter().map(|p| &p.name))
                        ),
                    ));
                }
            }
            if probe.primary == probe.backup {
                return Err(self.invalid(
                    "[probe] backup",
                    "must name a different proxy than [probe] primary",
                ));
            }
        }
        Ok(())
    }

    fn known<'a>(&self, names: impl Iterator<Item = &'a String>) -> String {
        let list: Vec<&str> = names.map(String::as_str).collect();
        if list.is_empty() {
            "none".to_string()
        } else {
            list.join(", ")
        }
    }

    fn pick<'a, T>(
        &self,
        kind: &'static str,
        items: &'a [T],
        name_of: impl Fn(&T) -> &String,
        wanted: Option<&str>,
    ) -> Result<&'a T, ConfigError> {
        match wanted {
            Some(name) => items.iter().find(|i| name_of(i) == name).ok_or_else(|| {
                ConfigError::UnknownComponent {
                    path: self.source.clone(),
                    kind,
                    name: name.to_string(),
                    known: self.known(items.iter().map(&name_of)),
                }
            }),
            None if items.len() == 1 => Ok(&items[0]),
            None => Err(ConfigError::NameRequired {
                path: self.source.clone(),
                kind,
                count: items.len(),
                known: self.known(items.iter().map(&name_of)),
            }),
        }
    }

    pub fn store(&self, name: &str) -> Result<&StoreSection, ConfigError> {
        self.pick("store", &self.stores, |s| &s.name, Some(name))
    }

    pub fn proxy(&self, name: &str) -> Result<&ProxySection, ConfigError> {
        self.pick("proxy", &self.proxies, |p| &p.name, Some(name))
    }

    /// The store named `name`, or the only store when `name` is `None`.
    pub fn select_store(&self, name: Option<&str>) -> Result<&StoreSection, ConfigError> {
        self.pick("store", &self.stores, |s| &s.name, name)
    }

    pub fn select_proxy(&self, name: Option<&str>) -> Result<&ProxySection, ConfigError> {
        self.pick("proxy", &self.proxies, |p| &p.name, name)
    }

    pub fn select_gateway(&self, name: Option<&str>) -> Result<&GatewaySection, ConfigError> {
        self.pick("gateway", &self.gateways, |g| &g.name, name)
    }

    /// The primary store (the check guarantees there is one).
    pub fn primary_store(&self) -> &StoreSection {
        self.stores
            .iter()
            .find(|s| s.role == StoreRole::Primary)
            .unwrap_or(&self.stores[0])
    }

    /// The backup store (the check guarantees there is one).
    pub fn backup_store(&self) -> &StoreSection {
        self.stores
            .iter()
            .find(|s| s.role == StoreRole::Backup)
            .unwrap_or(&self.stores[0])
    }

    /// The other store of the pair.
    pub fn peer_of(&self, store: &StoreSection) -> &StoreSection {
        match store.role {
            StoreRole::Primary => self.backup_store(),
            StoreRole::Backup => self.primary_store(),
        }
    }

    /// The `[probe]` section, or an error naming it when the file has none.
    pub fn probe_section(&self) -> Result<&ProbeSection, ConfigError> {
        self.probe
            .as_ref()
            .ok_or_else(|| self.invalid("[probe]", "missing: name the primary and backup proxies"))
    }
}

/// Resolves a path from the pair file against the data directory (absolute paths stay).
/// Makes the directory `path` under a temporary name with `init`, then renames it into place,
/// so that a process killed half-way through never leaves a half-made directory at `path`
/// (the storage engine refuses to open one; the chaos test found a store and a probe's spool
/// that could never start again). Does nothing when `path` holds something already; an empty
/// directory counts as not made.
pub fn make_dir_atomically<E>(
    path: &Path,
    init: impl FnOnce(&Path) -> Result<(), E>,
    io: impl Fn(std::io::Error) -> E,
) -> Result<(), E> {
    let empty = path.is_dir() && std::fs::read_dir(path).map_err(&io)?.next().is_none();
    if path.exists() && !empty {
        return Ok(());
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "data".into());
    let staging = path.with_file_name(format!(".{name}.creating"));
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(&io)?;
    }
    std::fs::create_dir_all(&staging).map_err(&io)?;
    init(&staging)?;
    if empty {
        std::fs::remove_dir(path).map_err(&io)?;
    }
    std::fs::rename(&staging, path).map_err(&io)?;
    if let Some(parent) = path.parent() {
        // The rename is durable once the directory holding it is synced.
        std::fs::File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(&io)?;
    }
    Ok(())
}

pub fn resolve(data_dir: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        data_dir.join(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        PairFile::parse(text, "pair.toml").unwrap_err().to_string()
    }

    #[test]
    fn the_default_pair_loads() {
        let file = PairFile::load(None).unwrap();
        assert_eq!(file.pair.name, "AGG_V");
        assert_eq!(file.primary_store().name, "AGG_P");
        assert_eq!(file.peer_of(file.primary_store()).name, "AGG_B");
        assert_eq!(file.proxy("PROXY_B").unwrap().store, "AGG_B");
        assert_eq!(file.select_gateway(None).unwrap().name, "GW");
        assert_eq!(file.pair.failback, Failback::Auto);
        assert_eq!(
            file.probe_section().unwrap().spool_dir.as_deref(),
            Some(Path::new("spool"))
        );
    }

    #[test]
    fn a_missing_file_is_named() {
        let e = PairFile::load(Some(Path::new("missing.toml"))).unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }));
        assert!(
            e.to_string().starts_with("missing.toml: cannot read"),
            "{e}"
        );
    }

    #[test]
    fn a_proxy_naming_no_store_is_refused() {
        let text = DEFAULT_PAIR_FILE.replace("store = \"AGG_B\"", "store = \"AGG_X\"");
        let e = err(&text);
        assert!(e.contains("pair.toml"), "{e}");
        assert!(e.contains("\"PROXY_B\" store"), "{e}");
        assert!(e.contains("AGG_X"), "{e}");
    }

    #[test]
    fn a_frame_limit_too_small_for_a_page_is_refused() {
        let with = |bytes: usize| {
            DEFAULT_PAIR_FILE.replace(
                "failover_deadline_ms = 1000",
                &format!("failover_deadline_ms = 1000\nmax_frame_bytes = {bytes}"),
            )
        };
        let e = err(&with(4096));
        assert!(e.contains("max_frame_bytes"), "{e}");
        assert!(e.contains("4096 is out of range: use 65536"), "{e}");
        assert!(PairFile::parse(&with(65536), "pair.toml").is_ok());
    }

    #[test]
    fn a_log_maximum_below_its_retention_is_refused() {
        let with = |keys: &str| {
            DEFAULT_PAIR_FILE.replace(
                "data_dir = \"agg_b\"",
                &format!("data_dir = \"agg_b\"\n{keys}"),
            )
        };
        let e = err(&with("log_retention_entries = 500\nlog_max_entries = 400"));
        assert!(e.contains("[[store]] \"AGG_B\" log_max_entries"), "{e}");
        assert!(
            e.contains("400 is below log_retention_entries (500)"),
            "{e}"
        );
        // Unset, the maximum is the default, or a retention raised past it.
        let max = |keys: &str| {
            let file = PairFile::parse(&with(keys), "pair.toml").unwrap();
            file.store("AGG_B").unwrap().log_max()
        };
        assert_eq!(max("log_retention_entries = 500"), 10_000_000);
        assert_eq!(max("log_retention_entries = 20000000"), 20_000_000);
        assert_eq!(
            max("log_max_entries = 500\nlog_retention_entries = 500"),
            500
        );
    }

    #[test]
    fn a_name_too_long_for_a_page_head_is_refused() {
        let long = "G".repeat(300);
        let e = err(&DEFAULT_PAIR_FILE.replace("name = \"GW\"", &format!("name = \"{long}\"")));
        assert!(e.contains("[[gateway]] name"), "{e}");
        assert!(
            e.contains("300 bytes long; names are at most 255 bytes"),
            "{e}"
        );
    }

    #[test]
    fn a_duplicate_name_is_refused() {
        let text = DEFAULT_PAIR_FILE.replace("name = \"PROXY_B\"", "name = \"PROXY_P\"");
        let e = err(&text);
        assert!(
            e.contains("\"PROXY_P\" is used by more than one component"),
            "{e}"
        );
    }

    #[test]
    fn a_bad_address_is_refused_with_its_line() {
        let text = DEFAULT_PAIR_FILE.replace("127.0.0.1:4401", "localhost-4401");
        let e = err(&text);
        assert!(e.contains("pair.toml"), "{e}");
        assert!(
            e.contains("\"localhost-4401\" is not a socket address"),
            "{e}"
        );
        assert!(e.contains("line 30"), "{e}");
    }

    #[test]
    fn an_unknown_field_is_refused() {
        let text = DEFAULT_PAIR_FILE.replace("failback = \"auto\"", "fail_back = \"auto\"");
        let e = err(&text);
        assert!(e.contains("unknown field `fail_back`"), "{e}");
    }

    #[test]
    fn two_primaries_are_refused() {
        let text = DEFAULT_PAIR_FILE.replace("role = \"backup\"", "role = \"primary\"");
        let e = err(&text);
        assert!(e.contains("exactly two stores"), "{e}");
    }

    #[test]
    fn a_shared_address_is_refused() {
        let text = DEFAULT_PAIR_FILE.replace("127.0.0.1:8401", "127.0.0.1:8400");
        let e = err(&text);
        assert!(
            e.contains("127.0.0.1:8400 is used by another component"),
            "{e}"
        );
    }

    #[test]
    fn unknown_and_missing_names_list_the_known_ones() {
        let file = PairFile::load(None).unwrap();
        let e = file.select_store(Some("AGG_Q")).unwrap_err().to_string();
        assert!(e.contains("no store named \"AGG_Q\""), "{e}");
        assert!(e.contains("AGG_P, AGG_B"), "{e}");
        let e = file.select_store(None).unwrap_err().to_string();
        assert!(e.contains("2 store components"), "{e}");
    }

    #[test]
    fn relative_paths_resolve_under_the_data_dir() {
        assert_eq!(
            resolve(Path::new("/d"), Path::new("agg_p")),
            PathBuf::from("/d/agg_p")
        );
        assert_eq!(
            resolve(Path::new("/d"), Path::new("/abs")),
            PathBuf::from("/abs")
        );
    }
}
