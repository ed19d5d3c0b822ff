//! `tandem proxy`: one proxy in the foreground.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Result;
use tandem_config::{PairFile, StoreRole};
use tandem_proxy::{ProxyOptions, ProxyState};

use crate::ops::{self, OpsView};
use crate::runtime;

pub fn options(pair: &PairFile, data_dir: &Path, name: Option<&str>) -> Result<ProxyOptions> {
    let proxy = pair.select_proxy(name)?;
    let store = pair.store(&proxy.store)?;
    let deadline = Duration::from_millis(pair.pair.failover_deadline_ms);
    Ok(ProxyOptions {
        name: proxy.name.clone(),
        listen: proxy.listen.0,
        store_name: store.name.clone(),
        store_addr: store.listen.0,
        max_frame: pair.pair.max_frame_bytes,
        max_probes: proxy.max_probes,
        max_in_flight_per_probe: proxy.max_in_flight_per_probe.max(1),
        // A dead store is noticed in half the failover deadline, leaving the other half for
        // the probes to move.
        heartbeat: deadline / 5,
        dead_after: deadline / 2,
        redirect_to: match store.role {
            StoreRole::Backup => pair.probe.as_ref().map(|p| p.primary.clone()),
            StoreRole::Primary => None,
        },
        tls: crate::tls::server(pair, data_dir, &proxy.name)?,
        store_tls: crate::tls::member_client(pair, data_dir, &proxy.name)?,
    })
}

struct ProxyView(Arc<ProxyState>);

impl OpsView for ProxyView {
    fn ready(&self) -> bool {
        self.0.link().up
    }

    fn active(&self) -> bool {
        let link = self.0.link();
        link.up && link.acting_primary
    }

    fn status(&self) -> serde_json::Value {
        let s = &self.0;
        let link = s.link();
        serde_json::json!({
            "name": s.name,
            "store": s.store,
            "store_up": link.up,
            "acting_primary": link.up && link.acting_primary,
            "probes": s.probe_count(),
            "events_forwarded": s.events_forwarded.load(Ordering::Relaxed),
            "refusals": {
                "store_unavailable": s.refused_store_down.load(Ordering::Relaxed),
                "max_probes": s.refused_full.load(Ordering::Relaxed),
                "bad_frames": s.refused_bad.load(Ordering::Relaxed),
            },
        })
    }
}

pub fn run(pair: &PairFile, data_dir: &Path, name: Option<&str>) -> Result<()> {
    let options = options(pair, data_dir, name)?;
    let http = pair.select_proxy(name)?.http.map(|a| a.0);
    runtime::runtime()?.block_on(async {
        let shutdown = runtime::shutdown_on_signal();
        let metrics = runtime::metrics();
        crate::tls::watch(&options.tls, &options.store_tls, shutdown.clone());
        let http = ops::bind(http, &options.name).await?;
        let (proxy, store) = (options.name.clone(), options.store_name.clone());
        let (state_tx, state_rx) = tokio::sync::oneshot::channel();
        let run = tandem_proxy::run(options, shutdown.clone(), |state, listen| {
            tracing::info!(proxy, %listen, store, "proxy ready");
            let _ = state_tx.send(state);
        });
        let serve_ops = async {
            let (Some(listener), Ok(state)) = (http, state_rx.await) else {
                return Ok(());
            };
            ops::serve(
                listener,
                Arc::new(ProxyView(state)),
                metrics,
                shutdown.clone(),
            )
            .await
        };
        let (ran, served) = tokio::join!(run, serve_ops);
        ran?;
        served
    })
}
