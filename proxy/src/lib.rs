//! The proxy: multiplexes many probe connections onto one upstream link to its own store.
//!
//! A proxy keeps no durable state and can be killed at any time: what a probe sent and did not
//! see acknowledged stays in the probe's spool and is sent again. The pieces:
//! - [`upstream`]: the one link to the store, reconnected with backoff, watched by heartbeat;
//!   it numbers forwarded batches and routes each acknowledgement back to its probe;
//! - [`listener`]: accepts probes (up to `max_probes`), refuses them at once while the store is
//!   unreachable (so they fail over in milliseconds), limits each probe's in-flight events, and
//!   passes the store's directives on.

#![forbid(unsafe_code)]

pub mod listener;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tandem_protocol::{Directive, Role};
use tokio::sync::{broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;

/// Everything a proxy needs, resolved from the pair file.
#[derive(Clone, Debug)]
pub struct ProxyOptions {
    pub name: String,
    pub listen: SocketAddr,
    pub store_name: String,
    pub store_addr: SocketAddr,
    pub max_frame: usize,
    pub max_probes: usize,
    pub max_in_flight_per_probe: usize,
    /// How often the store link is pinged; silence for `dead_after` drops it.
    pub heartbeat: Duration,
    pub dead_after: Duration,
    /// The primary member's name, when this proxy fronts the backup store: after a fail-back
    /// new probes are sent there.
    pub redirect_to: Option<String>,
    /// TLS for the probes' port (None: plaintext).
    pub tls: Option<Arc<tandem_net::tls::ServerTls>>,
    /// TLS for the link to the store.
    pub store_tls: Option<Arc<tandem_net::tls::ClientTls>>,
}

/// What the store said about itself when the link came up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreLink {
    pub up: bool,
    pub role: Role,
    pub acting_primary: bool,
    pub resynced: bool,
    /// The store has failed back and not become acting primary again since.
    pub failed_back: bool,
}

/// State the ops endpoints read.
pub struct ProxyState {
    pub name: String,
    pub store: String,
    pub link: watch::Sender<StoreLink>,
    pub probes: AtomicU64,
    pub events_forwarded: AtomicU64,
    pub refused_store_down: AtomicU64,
    pub refused_full: AtomicU64,
    pub refused_bad: AtomicU64,
    pub stopping: AtomicBool,
}

impl ProxyState {
    pub fn link(&self) -> StoreLink {
        *self.link.borrow()
    }

    pub fn probe_count(&self) -> u64 {
        self.probes.load(Ordering::Relaxed)
    }
}

/// Why a proxy could not run.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot listen on {addr}: {source} (is another process using it?)")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Runs a proxy until `shutdown` is cancelled; `ready` gets the state and the bound address.
pub async fn run(
    options: ProxyOptions,
    shutdown: CancellationToken,
    ready: impl FnOnce(Arc<ProxyState>, SocketAddr),
) -> Result<(), ProxyError> {
    let listener = tokio::net::TcpListener::bind(options.listen)
        .await
        .map_err(|source| ProxyError::Bind {
            addr: options.listen,
            source,
        })?;
    let (link, _) = watch::channel(StoreLink {
        up: false,
        role: Role::Primary,
        acting_primary: false,
        resynced: false,
        failed_back: false,
    });
    let state = Arc::new(ProxyState {
        name: options.name.clone(),
        store: options.store_name.clone(),
        link,
        probes: AtomicU64::new(0),
        events_forwarded: AtomicU64::new(0),
        refused_store_down: AtomicU64::new(0),
        refused_full: AtomicU64::new(0),
        refused_bad: AtomicU64::new(0),
        stopping: AtomicBool::new(false),
    });
    let local = listener.local_addr().unwrap_or(options.listen);
    ready(state.clone(), local);

    let registry = Arc::new(upstream::Registry::default());
    let (forward_tx, forward_rx) = mpsc::channel(1024);
    let (directives, _) = broadcast::channel::<Directive>(16);
    let up = tokio::spawn(upstream::run(
        options.clone(),
        state.clone(),
        forward_rx,
        registry.clone(),
        directives.clone(),
        shutdown.child_token(),
    ));
    listener::serve(
        listener,
        options,
        state.clone(),
        forward_tx,
        registry,
        directives,
        shutdown.clone(),
    )
    .await;
    shutdown.cancel();
    let _ = up.await;
    tracing::info!(proxy = %state.name, "stopped");
    Ok(())
}
