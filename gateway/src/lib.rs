//! The bidirectional gateway: brings each store up to date with the other and then streams
//! every change both ways.
//!
//! The gateway keeps no durable state. For each direction it asks the receiving store how far
//! it has applied the sender's log (its durable cursor), subscribes to the sender's log from
//! there, leaving out entries that came from the receiver (so nothing loops), and hands each
//! page to the receiver, which applies the entries and stores the new cursor in one commit. It
//! then reports the cursor back to the sender. Killed at any moment, it resumes from the
//! receivers' cursors; an entry applied twice is a duplicate by `(origin, seq)` and changes
//! nothing. When both directions have caught up with the heads they saw, it tells both stores
//! that the resync finished. A second gateway running at the same time is safe for the same
//! reasons.
//!
//! A receiver whose cursor is older than the sender's retained log (`LogTrimmed`) gets a full
//! resync from a consistent snapshot, page by page, resumable; see [`direction`] and the
//! store's `resync` module.

#![forbid(unsafe_code)]

pub mod direction;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tandem_probe::Connection;
use tandem_protocol::{ClientKind, Message};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use direction::Progress;

/// Everything a gateway needs, resolved from the pair file.
#[derive(Clone, Debug)]
pub struct GatewayOptions {
    pub name: String,
    pub primary: (String, SocketAddr),
    pub backup: (String, SocketAddr),
    pub max_frame: usize,
    /// How long a store may stay silent before its links are dropped and remade.
    pub dead_after: Duration,
    /// Records per snapshot page in a full resync.
    pub resync_page: u32,
    /// Most snapshot records merged per second (0: no limit).
    pub resync_rate: u64,
    /// TLS to both stores (None: plaintext).
    pub tls: Option<Arc<tandem_net::tls::ClientTls>>,
}

/// What the ops endpoints and `tandem status` show.
pub struct GatewayState {
    pub name: String,
    state: Mutex<&'static str>,
    pub resynced: AtomicBool,
    /// Primary → backup, then backup → primary.
    pub progress: [watch::Sender<Progress>; 2],
}

impl GatewayState {
    /// `connecting`, `resyncing` or `streaming`.
    pub fn state(&self) -> &'static str {
        self.state.lock().map(|s| *s).unwrap_or("connecting")
    }

    fn set_state(&self, state: &'static str) {
        if let Ok(mut s) = self.state.lock() {
            if *s != state {
                tracing::info!(gateway = %self.name, state, "gateway state");
                *s = state;
            }
        }
    }

    pub fn progress(&self) -> [Progress; 2] {
        [
            self.progress[0].borrow().clone(),
            self.progress[1].borrow().clone(),
        ]
    }
}

async fn connect(options: &GatewayOptions, addr: SocketAddr) -> Option<Connection> {
    Connection::connect_tls(
        addr,
        ClientKind::Gateway,
        &options.name,
        options.max_frame,
        options.dead_after.max(Duration::from_millis(500)),
        options.tls.as_deref(),
    )
    .await
    .map_err(|e| {
        if e.is_certificate() {
            tracing::warn!("{e}");
        } else {
            tracing::debug!(error = %e, "gateway connect failed");
        }
    })
    .ok()
}

/// Runs a gateway until `shutdown` is cancelled.
pub async fn run(
    options: GatewayOptions,
    shutdown: CancellationToken,
    ready: impl FnOnce(Arc<GatewayState>),
) {
    let progress = |from: &str, to: &str| {
        watch::channel(Progress {
            from: from.to_string(),
            to: to.to_string(),
            ..Progress::default()
        })
        .0
    };
    let state = Arc::new(GatewayState {
        name: options.name.clone(),
        state: Mutex::new("connecting"),
        resynced: AtomicBool::new(false),
        progress: [
            progress(&options.primary.0, &options.backup.0),
            progress(&options.backup.0, &options.primary.0),
        ],
    });
    ready(state.clone());
    let mut backoff = Duration::from_millis(50);
    while !shutdown.is_cancelled() {
        state.set_state("connecting");
        state.resynced.store(false, Ordering::Relaxed);
        let session = shutdown.child_token();
        let ended = tokio::select! {
            ended = session_run(&options, &state, &session) => ended,
            _ = shutdown.cancelled() => return,
        };
        session.cancel();
        match ended {
            Ok(()) => return,
            Err(reason) => {
                tracing::warn!(gateway = %options.name, "{reason}; reconnecting");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.cancelled() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// One session: both directions over fresh links until one fails.
async fn session_run(
    options: &GatewayOptions,
    state: &Arc<GatewayState>,
    session: &CancellationToken,
) -> Result<(), String> {
    let (p, b) = (&options.primary, &options.backup);
    // Each direction reads the sender's log on one link and writes to the receiver on another.
    let links = async {
        Some((
            connect(options, p.1).await?,
            connect(options, b.1).await?,
            connect(options, b.1).await?,
            connect(options, p.1).await?,
        ))
    };
    let Some((p_sub, b_recv, b_sub, p_recv)) = links.await else {
        return Err(format!(
            "cannot reach both stores ({} at {}, {} at {})",
            p.0, p.1, b.0, b.1
        ));
    };
    state.set_state("resyncing");
    let (caught_up_pb, mut rx_pb) = watch::channel(false);
    let (caught_up_bp, mut rx_bp) = watch::channel(false);
    let tuning = direction::Tuning {
        dead_after: options.dead_after,
        page: options.resync_page.max(1),
        resync_rate: options.resync_rate,
    };
    let to_backup = direction::Direction {
        from: p.0.clone(),
        to: b.0.clone(),
        sender: p_sub,
        receiver: b_recv,
        tuning: tuning.clone(),
        progress: state.progress[0].clone(),
        caught_up: caught_up_pb,
        session: session.clone(),
    }
    .run();
    let to_primary = direction::Direction {
        from: b.0.clone(),
        to: p.0.clone(),
        sender: b_sub,
        receiver: p_recv,
        tuning,
        progress: state.progress[1].clone(),
        caught_up: caught_up_bp,
        session: session.clone(),
    }
    .run();
    let announce = async {
        loop {
            if *rx_pb.borrow_and_update() && *rx_bp.borrow_and_update() {
                break;
            }
            tokio::select! {
                changed = rx_pb.changed() => if changed.is_err() { return },
                changed = rx_bp.changed() => if changed.is_err() { return },
            }
        }
        for addr in [p.1, b.1] {
            if let Some(mut conn) = connect(options, addr).await {
                let done = Message::ResyncFinished {
                    gateway: options.name.clone(),
                };
                let _ = conn.request(&done, Duration::from_secs(5)).await;
            }
        }
        state.resynced.store(true, Ordering::Relaxed);
        state.set_state("streaming");
        tracing::info!(gateway = %options.name, "resync finished; streaming");
        std::future::pending::<()>().await;
    };
    tokio::select! {
        ended = to_backup => ended,
        ended = to_primary => ended,
        _ = announce => Ok(()),
        _ = session.cancelled() => Ok(()),
    }
}
