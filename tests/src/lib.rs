//! Harness for the integration tests: real `tandem` processes on 127.0.0.1.
//!
//! A [`Pair`] writes a pair file with ephemeral ports into a temporary directory; a [`Proc`]
//! is a child process that is killed (SIGKILL, by PID) when it is dropped, so no test leaves a
//! process behind even when it fails. The `tandem` binary is the one cargo built for this test
//! run (`target/<profile>/tandem`, built because the `tandem-cli` package has tests of its own).

#![forbid(unsafe_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The `tandem` binary of this build, brought up to date once per test binary (so a run of
/// `cargo test -p tandem-tests` never tests a stale binary).
pub fn tandem_bin() -> PathBuf {
    static BUILT: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    let exe = std::env::current_exe().expect("the test binary knows its path");
    // target/<profile>/deps/<test> -> target/<profile>/tandem
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binaries live in target/<profile>/deps")
        .to_path_buf();
    BUILT.get_or_init(|| {
        // The binary as `cargo test --workspace` builds it, with the features the workspace's
        // tests unify (`cargo build -p tandem-cli` resolves them without dev-dependencies and
        // rebuilt every crate a second time, minutes on a small machine). Asking for
        // tandem-cli's own `usage` test is what makes cargo build the binary, and only it.
        let mut cargo = Command::new(env!("CARGO"));
        cargo
            .args([
                "test",
                "--workspace",
                "--no-run",
                "--quiet",
                "--test",
                "usage",
            ])
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        // What cargo sets for a running test is not what it sets for a build: build scripts
        // that watch such variables (ring's watches CARGO_MANIFEST_DIR) would rerun, and every
        // crate above them rebuild, here and again at the next `cargo test`.
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            if [
                "CARGO_MANIFEST_",
                "CARGO_PKG_",
                "CARGO_CRATE_",
                "CARGO_BIN_",
            ]
            .iter()
            .any(|prefix| name.starts_with(prefix))
                || name == "CARGO_PRIMARY_PACKAGE"
                || name == "CARGO_TARGET_TMPDIR"
            {
                cargo.env_remove(&*name);
            }
        }
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cargo.arg("--release");
        }
        let status = cargo.status().expect("cargo runs");
        assert!(status.success(), "building the tandem binary failed");
    });
    let bin = profile_dir.join(format!("tandem{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "{} is missing after building it",
        bin.display()
    );
    bin
}

/// A port that was free a moment ago on 127.0.0.1.
///
/// Taken below the kernel's ephemeral range (32768 and up here), so that a component restarted
/// on its port never finds it taken as the source port of some other connection; and never the
/// same port twice in one test process, so two concurrent tests cannot be handed the same one.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    // Each test process starts at its own place in the range, so concurrent test binaries
    // rarely try the same ports.
    let start = (std::process::id().wrapping_mul(7_919)) % SPAN;
    let mut given = GIVEN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for step in 0..SPAN {
        let port = (LOW + (start + given.len() as u32 * 13 + step) % SPAN) as u16;
        if given.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
    panic!("no free port between {LOW} and {}", LOW + SPAN);
}

/// A pair file with ephemeral ports and a data directory, both in a temporary directory.
/// Certificates made once per test process by `tandem certs` for the TLS pair file; any
/// port works with them, since they name the components, the pair and 127.0.0.1.
pub fn shared_certs() -> &'static Path {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let config = dir.path().join("pair-tls.toml");
        std::fs::write(&config, TLS_PAIR_FILE).expect("pair file written");
        let out = Command::new(tandem_bin())
            .args(["certs", "--config"])
            .arg(&config)
            .arg("--data-dir")
            .arg(dir.path())
            .output()
            .expect("tandem certs runs");
        assert!(
            out.status.success(),
            "tandem certs failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    })
    .path()
}

/// What the test's own clients connect with: TLS once any pair in this process is a TLS one.
pub fn client_tls() -> Option<std::sync::Arc<tandem_net::tls::ClientTls>> {
    static TLS: std::sync::OnceLock<std::sync::Arc<tandem_net::tls::ClientTls>> =
        std::sync::OnceLock::new();
    if !TLS_IN_USE.load(std::sync::atomic::Ordering::Relaxed) {
        return None;
    }
    let tls = TLS.get_or_init(|| {
        let dir = shared_certs().join("tls");
        tandem_net::tls::ClientTls::load(
            dir.join("ca.crt"),
            Some((dir.join("client.crt"), dir.join("client.key"))),
            "AGG_V",
        )
        .expect("the test client's TLS settings load")
    });
    Some(tls.clone())
}

static TLS_IN_USE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("certificate directory");
    for entry in std::fs::read_dir(from).expect("certificates made") {
        let entry = entry.expect("directory entry");
        std::fs::copy(entry.path(), to.join(entry.file_name())).expect("certificate copied");
    }
    TLS_IN_USE.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// The pair file with TLS on every link.
pub const TLS_PAIR_FILE: &str = include_str!("../../fixtures/pair-tls.toml");

pub struct Pair {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub data_dir: PathBuf,
    pub file: tandem_config::PairFile,
}

impl Pair {
    /// The default pair with every address moved to a free port; `edit` may change the text.
    ///
    /// With `TANDEM_TEST_TLS=1` in the environment it is the TLS pair instead
    /// (`fixtures/pair-tls.toml`, mutual TLS, certificates made by `tandem certs`), so any test
    /// built on it runs over TLS unchanged.
    pub fn new(edit: impl FnOnce(String) -> String) -> Pair {
        if std::env::var("TANDEM_TEST_TLS").is_ok_and(|v| v == "1") {
            Pair::tls(edit)
        } else {
            Pair::plain(edit)
        }
    }

    /// The plaintext pair, whatever the environment says.
    pub fn plain(edit: impl FnOnce(String) -> String) -> Pair {
        Pair::from_text(tandem_config::DEFAULT_PAIR_FILE, edit)
    }

    /// The TLS pair (mutual TLS) with its certificates: the process's one set (see
    /// [`shared_certs`]), so the test's own clients ([`client`]) can speak to every pair.
    pub fn tls(edit: impl FnOnce(String) -> String) -> Pair {
        let pair = Pair::from_text(TLS_PAIR_FILE, edit);
        copy_dir(&shared_certs().join("tls"), &pair.data_dir.join("tls"));
        // Components the test added get certificates from the same CA.
        let out = pair.run(&["certs"], Duration::from_secs(60));
        assert!(
            out.status.success(),
            "tandem certs failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        pair
    }

    fn from_text(base: &str, edit: impl FnOnce(String) -> String) -> Pair {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut text = base.to_string();
        for port in [4100, 4101, 8100, 8101, 4400, 4401, 8400, 8401, 8500] {
            text = text.replace(
                &format!("127.0.0.1:{port}\""),
                &format!("127.0.0.1:{}\"", free_port()),
            );
        }
        let text = edit(text);
        let config = dir.path().join("pair.toml");
        std::fs::write(&config, &text).expect("pair file written");
        let data_dir = dir.path().join("data");
        let file = tandem_config::PairFile::parse(&text, &config.display().to_string())
            .expect("the test pair file is valid");
        Pair {
            dir,
            config,
            data_dir,
            file,
        }
    }

    /// `tandem ARGS --config <pair> --data-dir <data>`.
    pub fn command(&self, args: &[&str]) -> Command {
        self.command_in(&self.data_dir, args)
    }

    /// `tandem ARGS --config <pair> --data-dir <data_dir>`: a client with files of its own.
    pub fn command_in(&self, data_dir: &Path, args: &[&str]) -> Command {
        let mut cmd = Command::new(tandem_bin());
        cmd.args(args)
            .arg("--config")
            .arg(&self.config)
            .arg("--data-dir")
            .arg(data_dir)
            .current_dir(self.dir.path())
            .stdin(Stdio::null());
        cmd
    }

    /// Runs a command to completion, killing it past `limit`.
    pub fn run(&self, args: &[&str], limit: Duration) -> Output {
        let child = self
            .command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tandem starts");
        wait_output(Proc::from(child), limit)
    }

    /// Starts a long-running component, its log going to `<dir>/<name>.log`.
    pub fn spawn(&self, args: &[&str], log_name: &str) -> Proc {
        let log = std::fs::File::create(self.dir.path().join(format!("{log_name}.log")))
            .expect("log file");
        let err = log.try_clone().expect("log file handle");
        let child = self
            .command(args)
            .stdout(log)
            .stderr(err)
            .spawn()
            .expect("tandem starts");
        Proc::from(child)
    }

    /// Starts a command whose output the test reads (with [`wait_output`]).
    pub fn spawn_piped(&self, args: &[&str]) -> Proc {
        let child = self
            .command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tandem starts");
        Proc::from(child)
    }

    /// Starts a component with another pair file (`config`), same data directory.
    pub fn spawn_with_config(&self, config: &Path, args: &[&str], log_name: &str) -> Proc {
        let log = std::fs::File::create(self.dir.path().join(format!("{log_name}.log")))
            .expect("log file");
        let err = log.try_clone().expect("log file handle");
        let child = Command::new(tandem_bin())
            .args(args)
            .arg("--config")
            .arg(config)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .expect("tandem starts");
        Proc::from(child)
    }

    /// The log a spawned component wrote so far.
    pub fn log(&self, log_name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{log_name}.log"))).unwrap_or_default()
    }
}

/// A child process killed with SIGKILL when dropped.
pub struct Proc {
    child: Option<Child>,
}

impl From<Child> for Proc {
    fn from(child: Child) -> Self {
        Proc { child: Some(child) }
    }
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// SIGKILL now and reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits for a child's output, killing it past `limit` so a hung command fails the test.
pub fn wait_output(mut proc: Proc, limit: Duration) -> Output {
    let deadline = Instant::now() + limit;
    while proc.running() {
        assert!(
            Instant::now() < deadline,
            "process {} did not finish within {limit:?}",
            proc.pid()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let child = proc.child.take().expect("a child that has not been reaped");
    child
        .wait_with_output()
        .expect("output of a finished child")
}

/// Talking to a store with the protocol client, as probes will.
pub mod client {
    use std::collections::HashMap;
    use std::net::SocketAddr;
    use std::time::{Duration, Instant};

    use tandem_probe::Connection;
    use tandem_protocol::{
        Alert, AlertFields, ClientKind, DEFAULT_MAX_FRAME, Event, EventBody, Message, Origin,
        Query, Severity,
    };

    /// One connection attempt as `kind` named `name`, over TLS when the pair is a TLS one.
    pub async fn dial(
        addr: SocketAddr,
        kind: ClientKind,
        name: &str,
        timeout: Duration,
    ) -> Result<Connection, tandem_probe::ClientError> {
        let tls = crate::client_tls();
        Connection::connect_tls(addr, kind, name, DEFAULT_MAX_FRAME, timeout, tls.as_deref()).await
    }

    /// Connects, retrying until `limit` (the store may be starting).
    pub async fn connect(addr: SocketAddr, limit: Duration) -> Connection {
        connect_as(addr, ClientKind::Probe, limit).await
    }

    /// A link of `kind`: an operator's, for queries, is never sent the directives that move
    /// probes, which would otherwise arrive in place of an answer during a fail-back.
    async fn connect_as(addr: SocketAddr, kind: ClientKind, limit: Duration) -> Connection {
        let deadline = Instant::now() + limit;
        loop {
            match dial(addr, kind, "itest", Duration::from_secs(5)).await {
                Ok(conn) => return conn,
                Err(e) => {
                    assert!(
                        Instant::now() < deadline,
                        "no connection to {addr} within {limit:?}: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// An occurrence of `identifier` numbered `seq` by `origin`.
    pub fn occurrence(origin: &Origin, seq: u64, identifier: String) -> Event {
        Event {
            origin: origin.clone(),
            seq,
            time: 1_700_000_000_000 + seq as i64,
            body: EventBody::Occurrence(
                AlertFields {
                    summary: format!("occurrence {seq} of {identifier}"),
                    node: "node".into(),
                    severity: Severity::MAJOR,
                    identifier,
                    ..AlertFields::default()
                }
                .pack(),
            ),
        }
    }

    /// Sends `events` in batches (pausing `pace` after each acknowledgement), reconnecting and
    /// resending whatever was not acknowledged, until all are acknowledged. `on_ack` sees each
    /// acknowledged batch as it happens.
    pub async fn send_reliably(
        addr: SocketAddr,
        events: &[Event],
        batch: usize,
        pace: Duration,
        limit: Duration,
        mut on_ack: impl FnMut(&[Event]),
    ) {
        let deadline = Instant::now() + limit;
        let mut conn: Option<Connection> = None;
        let mut next = 0;
        let mut batch_id = 0u64;
        while next < events.len() {
            assert!(
                Instant::now() < deadline,
                "events not delivered within {limit:?}"
            );
            let c = match conn.as_mut() {
                Some(c) => c,
                None => conn.insert(connect(addr, deadline - Instant::now()).await),
            };
            let chunk = &events[next..(next + batch).min(events.len())];
            batch_id += 1;
            let msg = Message::Events {
                batch: batch_id,
                events: chunk.to_vec(),
            };
            match c.request(&msg, Duration::from_secs(10)).await {
                Ok(Message::Ack { batch: b, .. }) if b == batch_id => {
                    on_ack(chunk);
                    next += chunk.len();
                    if !pace.is_zero() {
                        tokio::time::sleep(pace).await;
                    }
                }
                Ok(other) => panic!("unexpected answer to a batch: {other:?}"),
                Err(_) => conn = None,
            }
        }
    }

    /// Every alert of the store.
    pub async fn alerts(addr: SocketAddr) -> Vec<Alert> {
        query(addr, Query::default()).await.0
    }

    /// The answer to `q` at the store at `addr`, as an operator asks: the alerts and how
    /// many matched.
    pub async fn query(addr: SocketAddr, q: Query) -> (Vec<Alert>, u64) {
        let mut c = connect_as(addr, ClientKind::Operator, Duration::from_secs(30)).await;
        match c.request(&Message::Query(q), Duration::from_secs(30)).await {
            Ok(Message::Alerts { alerts, total }) => (alerts, total),
            other => panic!("query failed: {other:?}"),
        }
    }

    /// The alerts the probes sent: without the pair's own notices (manager `tandem`).
    pub async fn probe_alerts(addr: SocketAddr) -> Vec<Alert> {
        let mut all = alerts(addr).await;
        all.retain(|a| a.manager != "tandem");
        all
    }

    /// The pair's own notices (failover, fail-back, resync), by identifier.
    pub async fn notices(addr: SocketAddr) -> Vec<Alert> {
        let mut all = alerts(addr).await;
        all.retain(|a| a.manager == "tandem");
        all
    }

    /// identifier → tally.
    pub fn tallies(alerts: &[Alert]) -> HashMap<String, u64> {
        alerts
            .iter()
            .map(|a| (a.identifier.clone(), a.tally))
            .collect()
    }
}

/// A plain HTTP/1.0 GET for the ops endpoints: (status code, body).
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    try_http_get(addr, path).unwrap_or_else(|e| panic!("GET {addr}{path}: {e}"))
}

/// [`http_get`] that reports a failure instead of panicking.
pub fn try_http_get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Waits until `GET path` on `addr` answers 200, at most `limit`.
pub fn wait_http_ok(addr: std::net::SocketAddr, path: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        if try_http_get(addr, path).is_ok_and(|(status, _)| status == 200) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{addr}{path} not 200 within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// A JSON-lines file of `n` alerts, each its own identifier `e-<i>`.
pub fn alerts_file(dir: &Path, n: u64) -> PathBuf {
    use std::io::Write;
    let path = dir.join(format!("alerts-{n}.jsonl"));
    let mut out = std::io::BufWriter::new(std::fs::File::create(&path).expect("input file"));
    for i in 0..n {
        writeln!(
            out,
            r#"{{"identifier":"e-{i}","node":"n{}","summary":"event {i}","severity":3}}"#,
            i % 50
        )
        .expect("line written");
    }
    out.flush().expect("input flushed");
    path
}

/// A JSON-lines file of `n` alerts spread over `ids` identifiers `a-<i % ids>`.
pub fn repeated_alerts_file(dir: &Path, name: &str, n: u64, ids: u64) -> PathBuf {
    use std::io::Write;
    let path = dir.join(name);
    let mut out = std::io::BufWriter::new(std::fs::File::create(&path).expect("input file"));
    for i in 0..n {
        writeln!(
            out,
            r#"{{"identifier":"a-{}","node":"n{}","summary":"occurrence {i}","severity":4}}"#,
            i % ids,
            i % ids
        )
        .expect("line written");
    }
    out.flush().expect("input flushed");
    path
}

/// Serialises the tests of one test binary that measure timing under load (failover gaps):
/// two whole pairs sharing two cores would measure each other, not tandem.
pub async fn one_at_a_time() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// A TCP relay on 127.0.0.1 that a test can cut and heal, to break links without killing
/// processes: while cut, it closes every connection it carries and every new one at once.
pub mod relay {
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::watch;
    use tokio::task::JoinSet;

    pub struct Relay {
        pub addr: SocketAddr,
        cut: Arc<AtomicBool>,
        generation: watch::Sender<u64>,
        counter: Arc<AtomicU64>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Relay {
        /// Relays connections to `target`.
        pub async fn start(target: SocketAddr) -> Relay {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("relay binds");
            let addr = listener.local_addr().expect("relay address");
            let cut = Arc::new(AtomicBool::new(false));
            let (generation, _) = watch::channel(0u64);
            let counter = Arc::new(AtomicU64::new(0));
            let (c, g) = (cut.clone(), generation.clone());
            let task = tokio::spawn(async move {
                let mut links = JoinSet::new();
                while let Ok((inbound, _)) = listener.accept().await {
                    if c.load(Ordering::SeqCst) {
                        continue; // dropped: closed at once
                    }
                    let mut cut_signal = g.subscribe();
                    links.spawn(async move {
                        let Ok(outbound) = TcpStream::connect(target).await else {
                            return;
                        };
                        let (mut a, mut b) = (inbound, outbound);
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut a, &mut b) => {}
                            _ = cut_signal.changed() => {}
                        }
                    });
                    while links.try_join_next().is_some() {}
                }
            });
            Relay {
                addr,
                cut,
                generation,
                counter,
                task,
            }
        }

        /// Breaks every carried connection and refuses new ones until [`Relay::heal`].
        pub fn cut(&self) {
            self.cut.store(true, Ordering::SeqCst);
            let n = self.counter.fetch_add(1, Ordering::SeqCst) + 1;
            self.generation.send_replace(n);
        }

        pub fn heal(&self) {
            self.cut.store(false, Ordering::SeqCst);
        }
    }

    impl Drop for Relay {
        fn drop(&mut self) {
            self.task.abort();
        }
    }
}

/// Randomness for schedules, with a printed seed: `TANDEM_SEED` replays one.
pub mod random {
    /// A seed from `TANDEM_SEED`, or one from the clock; printed so a failure can be replayed.
    pub fn seed() -> u64 {
        let seed = std::env::var("TANDEM_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            });
        println!("TANDEM_SEED={seed}");
        seed
    }

    /// xorshift: enough randomness for kill timings.
    pub fn next(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }
}

/// Alerts keyed by identifier with the store-local serial zeroed: two stores' tables compare
/// equal exactly when they converged.
pub fn by_identifier(
    mut list: Vec<tandem_protocol::Alert>,
) -> std::collections::BTreeMap<String, tandem_protocol::Alert> {
    list.iter_mut().for_each(|a| a.serial = 0);
    list.into_iter()
        .map(|a| (a.identifier.clone(), a))
        .collect()
}
