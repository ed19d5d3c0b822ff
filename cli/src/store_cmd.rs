//! `tandem store`: one aggregation store in the foreground.

use std::time::Duration;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::Result;
use tandem_config::{Failback, PairFile, Replication, StoreRole, resolve};
use tandem_protocol::Role;
use tandem_store::StoreOptions;
use tandem_store::engine::{LogLimits, Shared};
use tandem_store::peer::PeerOptions;
use tandem_store::role::RoleSettings;

use crate::args::Global;
use crate::ops::{self, OpsView};
use crate::runtime;

pub fn options(pair: &PairFile, global: &Global, name: Option<&str>) -> Result<StoreOptions> {
    let store = pair.select_store(name)?;
    let peer = pair.peer_of(store);
    Ok(StoreOptions {
        name: store.name.clone(),
        role: match store.role {
            StoreRole::Primary => Role::Primary,
            StoreRole::Backup => Role::Backup,
        },
        listen: store.listen.0,
        data_path: resolve(&global.data_dir, &store.data_dir),
        max_frame: pair.pair.max_frame_bytes,
        max_connections: 10_000,
        clear_delete_after: Duration::from_secs(store.clear_delete_after_s),
        housekeeping: store.housekeeping,
        housekeeping_interval: Duration::from_secs(1),
        log_limits: LogLimits {
            retention: store.log_retention_entries.max(1),
            max: store.log_max().max(1),
        },
        tls: crate::tls::server(pair, &global.data_dir, &store.name)?,
        sync_replication: (pair.pair.replication == Replication::Sync)
            .then(|| Duration::from_millis(pair.pair.sync_timeout_ms.max(1))),
        peer: Some(PeerOptions {
            name: peer.name.clone(),
            addr: peer.listen.0,
            // A quarter of the failover deadline: three misses in a row (the backup's threshold)
            // still fit inside it.
            heartbeat: Duration::from_millis((pair.pair.failover_deadline_ms / 4).max(10)),
            max_frame: pair.pair.max_frame_bytes,
            on_role_change: store.on_role_change.clone(),
            tls: crate::tls::member_client(pair, &global.data_dir, &store.name)?,
        }),
        role_settings: RoleSettings {
            misses_down: 3,
            successes_up: 2,
            hold_down: Duration::from_millis(pair.pair.failback_hold_down_ms),
            auto_failback: pair.pair.failback == Failback::Auto,
        },
        // The clients' heartbeat (a fifth of the deadline; they give up after half of it).
        keepalive: Duration::from_millis((pair.pair.failover_deadline_ms / 5).max(10)),
        // As a proxy gives up on its store: ten of its `dead_after`s, at least 2 s.
        stall_after: Duration::from_millis(
            pair.pair.failover_deadline_ms.saturating_mul(5).max(2_000),
        ),
    })
}

/// What the store's ops endpoints show.
struct StoreView {
    shared: Arc<Shared>,
    role: &'static str,
    sync: bool,
}

impl OpsView for StoreView {
    fn ready(&self) -> bool {
        self.shared.loaded.load(Ordering::Relaxed) && !self.shared.stalled.load(Ordering::Relaxed)
    }

    fn active(&self) -> bool {
        self.shared.acting_primary.load(Ordering::Relaxed)
    }

    fn status(&self) -> serde_json::Value {
        let s = &self.shared;
        serde_json::json!({
            "name": s.name,
            "role": self.role,
            "acting_primary": s.acting_primary.load(Ordering::Relaxed),
            "peer_up": s.peer_up.load(Ordering::Relaxed),
            "resynced": s.resynced.load(Ordering::Relaxed),
            "alerts": s.alert_count(),
            "lsn": s.head_lsn(),
            "first_lsn": s.first_lsn.load(Ordering::Relaxed),
            "events_applied": s.events_applied.load(Ordering::Relaxed),
            "duplicates": s.duplicates.load(Ordering::Relaxed),
            "replication": match (self.sync, s.sync_degraded.load(Ordering::Relaxed)) {
                (false, _) => "async",
                (true, false) => "sync",
                (true, true) => "degraded",
            },
            "peer_cursor": *s.peer_cursor.borrow(),
            // A commit running past the stall limit (a hung disk): see the store's watchdog.
            "stalled": s.stalled.load(Ordering::Relaxed),
        })
    }

    fn refresh_gauges(&self) {
        let s = &self.shared;
        metrics::gauge!("tandem_store_alerts").set(s.alert_count() as f64);
        // How long the log is, and how much of it the peer lacks: what to watch against
        // log_max_entries, past which the peer would need a full resync.
        let head = s.head_lsn();
        let first = s.first_lsn.load(Ordering::Relaxed);
        metrics::gauge!("tandem_store_log_entries").set((head + 1).saturating_sub(first) as f64);
        metrics::gauge!("tandem_store_log_unapplied_entries")
            .set(head.saturating_sub(*s.peer_cursor.borrow()) as f64);
    }
}

pub fn run(pair: &PairFile, global: &Global, name: Option<&str>) -> Result<()> {
    let options = options(pair, global, name)?;
    let http = pair.select_store(name)?.http.map(|a| a.0);
    runtime::runtime()?.block_on(async {
        let shutdown = runtime::shutdown_on_signal();
        let metrics = runtime::metrics();
        let http = ops::bind(http, &options.name).await?;
        crate::tls::watch(
            &options.tls,
            &options.peer.as_ref().and_then(|p| p.tls.clone()),
            shutdown.clone(),
        );
        let role = options.role.name();
        let sync = options.sync_replication.is_some();
        let store = options.name.clone();
        let data = options.data_path.display().to_string();
        let (shared_tx, shared_rx) = tokio::sync::oneshot::channel();
        let run = tandem_store::run(options, shutdown.clone(), |shared, listen| {
            tracing::info!(store, %listen, data, "store ready");
            let _ = shared_tx.send(shared);
        });
        let serve_ops = async {
            let (Some(listener), Ok(shared)) = (http, shared_rx.await) else {
                return Ok(());
            };
            let view = Arc::new(StoreView { shared, role, sync });
            ops::serve(listener, view, metrics, shutdown.clone()).await
        };
        let (ran, served) = tokio::join!(run, serve_ops);
        ran?;
        served
    })
}
