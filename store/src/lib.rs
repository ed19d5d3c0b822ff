//! The aggregation store: the durable, deduplicating alert table of one member of the pair.
//!
//! # Invariants
//!
//! - **Durable before acknowledged.** An `Ack` leaves only after the group commit holding the
//!   batch was written in one fjall batch and synced (`PersistMode::SyncAll`). A crash at any
//!   point loses only work nobody was told about.
//! - **One batch, one truth.** The changed alert rows, the new change-log entries, the applied
//!   sequence ranges of every origin involved, the generic-clear versions, replication cursors
//!   and counters are written in the same batch, so after a crash they agree: an event is in the
//!   applied set if and only if its effect is in the rows and its entry is in the log.
//! - **Exactly once.** The applied set of an origin holds every `seq` this store has folded
//!   (from a probe, an operator, itself or the gateway). An event found there is acknowledged as
//!   a duplicate and changes nothing; each distinct event is folded once.
//! - **Order does not matter.** The fold ([`fold`]) is commutative, so the table depends only
//!   on the set of events applied, never on their order (G3).
//! - **The log.** Every applied event gets the next LSN; LSNs are never reused. Subscribers see
//!   only entries at or below the durable head. Entries are retained up to a cap
//!   ([`engine::DEFAULT_LOG_RETENTION`]); a subscriber asking for a trimmed LSN is told so
//!   (`LogTrimmed`) and needs a full resync.
//! - **Housekeeping** (expiry, deletion of clear alerts) runs only while this store is acting
//!   primary, and its changes are events with this store's own origin.

#![forbid(unsafe_code)]

pub mod db;
pub mod engine;
pub mod fold;
pub mod housekeeping;
pub mod ingest;
pub mod peer;
pub mod query;
pub mod resync;
pub mod role;
pub mod server;
pub mod table;
pub mod watchdog;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tandem_protocol::Role;
use tokio_util::sync::CancellationToken;

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Why a store could not run.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the data directory {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: db::DbError,
    },
    #[error("cannot listen on {addr} ({what}): {source} (is another process using it?)")]
    Bind {
        addr: SocketAddr,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Everything a store needs to run, resolved from the pair file.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    pub name: String,
    pub role: Role,
    pub listen: SocketAddr,
    pub data_path: PathBuf,
    pub max_frame: usize,
    pub max_connections: usize,
    pub clear_delete_after: Duration,
    pub housekeeping: bool,
    pub housekeeping_interval: Duration,
    /// How much of the change log is kept (`log_retention_entries`, `log_max_entries`).
    pub log_limits: engine::LogLimits,
    /// `sync` replication: acknowledgements of new events wait up to this long for the peer.
    pub sync_replication: Option<Duration>,
    /// TLS for this store's port (None: plaintext).
    pub tls: Option<Arc<tandem_net::tls::ServerTls>>,
    /// The primary, watched by the backup (`None`: no watch; the primary never needs one).
    pub peer: Option<peer::PeerOptions>,
    pub role_settings: role::RoleSettings,
    /// How often a connection this store is not reading (its batches wait on the commit) is
    /// sent a `Pong` anyway: the clients' heartbeat, so that a slow commit is not taken for a
    /// dead store.
    pub keepalive: Duration,
    /// A commit running longer than this marks the store stalled (see [`watchdog`]).
    pub stall_after: Duration,
}

impl StoreOptions {
    /// A store with the defaults of an embedded or test store: no peer, no housekeeping,
    /// plaintext, async replication.
    pub fn new(name: &str, role: Role, listen: SocketAddr, data_path: PathBuf) -> StoreOptions {
        StoreOptions {
            name: name.into(),
            role,
            listen,
            data_path,
            max_frame: tandem_protocol::DEFAULT_MAX_FRAME,
            max_connections: 10_000,
            clear_delete_after: Duration::from_secs(120),
            housekeeping: false,
            housekeeping_interval: Duration::from_secs(3600),
            log_limits: engine::LogLimits::default(),
            sync_replication: None,
            tls: None,
            peer: None,
            role_settings: role::RoleSettings::default(),
            keepalive: Duration::from_millis(200),
            stall_after: Duration::from_secs(5),
        }
    }
}

/// Runs a store until `shutdown` is cancelled. `ready` is called once the table is loaded and
/// the listener bound, with what the ops endpoints read and the bound address.
pub async fn run(
    options: StoreOptions,
    shutdown: CancellationToken,
    ready: impl FnOnce(Arc<engine::Shared>, SocketAddr),
) -> Result<(), StoreError> {
    let listener = tokio::net::TcpListener::bind(options.listen)
        .await
        .map_err(|source| StoreError::Bind {
            addr: options.listen,
            what: "listen",
            source,
        })?;
    let path = options.data_path.clone();
    let name = options.name.clone();
    let log_limits = options.log_limits;
    let (shared, tx, commit_thread) =
        tokio::task::spawn_blocking(move || engine::start(&name, &path, 4096, log_limits))
            .await
            .map_err(|e| StoreError::Open {
                path: options.data_path.display().to_string(),
                source: db::DbError::Engine(fjall::Error::Io(std::io::Error::other(e.to_string()))),
            })?
            .map_err(|source| StoreError::Open {
                path: options.data_path.display().to_string(),
                source,
            })?;

    // The primary acts whenever it runs; the backup only once it has seen the primary gone.
    if let Ok(mut role) = shared.role.lock() {
        *role = match options.role {
            Role::Primary => role::Role::primary(),
            Role::Backup => role::Role::backup(options.role_settings.clone()),
        };
    }
    shared
        .acting_primary
        .store(options.role == Role::Primary, Ordering::Relaxed);

    let local = listener.local_addr().unwrap_or(options.listen);
    ready(shared.clone(), local);

    let mut tasks = tokio::task::JoinSet::new();
    if options.housekeeping {
        let (s, t, every, after, stop) = (
            shared.clone(),
            tx.clone(),
            options.housekeeping_interval,
            options.clear_delete_after,
            shutdown.child_token(),
        );
        tasks.spawn(housekeeping::run(s, t, every, after, stop));
    }
    // Both sides watch each other: the backup to know when to act, the primary so that its
    // status can say whether its peer is up (its role never changes).
    if let Some(peer) = options.peer.clone() {
        tasks.spawn(peer::watch(shared.clone(), peer, shutdown.child_token()));
    }
    tasks.spawn(watchdog::run(
        shared.clone(),
        options.stall_after.max(Duration::from_millis(10)),
        shutdown.child_token(),
    ));
    let server_options = server::ServerOptions {
        role: options.role,
        on_role_change: options.peer.as_ref().and_then(|p| p.on_role_change.clone()),
        max_frame: options.max_frame,
        max_connections: options.max_connections,
        sync_replication: options.sync_replication,
        tls: options.tls.clone(),
        keepalive: options.keepalive.max(Duration::from_millis(10)),
    };
    server::serve(
        listener,
        shared.clone(),
        tx.clone(),
        server_options,
        shutdown.clone(),
    )
    .await;
    shutdown.cancel();
    while tasks.join_next().await.is_some() {}
    // The last sender goes; the commit thread finishes what it has and stops.
    drop(tx);
    let _ = tokio::task::spawn_blocking(move || commit_thread.join()).await;
    tracing::info!(store = %shared.name, "stopped");
    Ok(())
}
