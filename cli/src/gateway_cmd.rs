//! `tandem gateway`: one bidirectional gateway in the foreground.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Result;
use tandem_config::PairFile;
use tandem_gateway::{GatewayOptions, GatewayState};

use crate::ops::{self, OpsView};
use crate::runtime;

pub fn options(pair: &PairFile, data_dir: &Path, name: Option<&str>) -> Result<GatewayOptions> {
    let gateway = pair.select_gateway(name)?;
    let (p, b) = (pair.primary_store(), pair.backup_store());
    Ok(GatewayOptions {
        name: gateway.name.clone(),
        primary: (p.name.clone(), p.listen.0),
        backup: (b.name.clone(), b.listen.0),
        max_frame: pair.pair.max_frame_bytes,
        dead_after: Duration::from_millis(pair.pair.failover_deadline_ms),
        resync_page: gateway.resync_page.clamp(1, 10_000),
        resync_rate: gateway.resync_rate,
        tls: crate::tls::member_client(pair, data_dir, &gateway.name)?,
    })
}

struct GatewayView(Arc<GatewayState>);

impl OpsView for GatewayView {
    fn ready(&self) -> bool {
        self.0.resynced.load(Ordering::Relaxed)
    }

    fn active(&self) -> bool {
        self.0.state() == "streaming"
    }

    fn status(&self) -> serde_json::Value {
        let directions: Vec<serde_json::Value> = self
            .0
            .progress()
            .iter()
            .map(|p| {
                let resync = p.full_resync.map(|(merged, total)| {
                    serde_json::json!({"merged": merged, "total": total, "left": total.saturating_sub(merged)})
                });
                serde_json::json!({
                    "from": p.from, "to": p.to, "cursor": p.cursor, "head": p.head,
                    "lag": p.lag(), "applied": p.applied, "full_resync": resync,
                })
            })
            .collect();
        serde_json::json!({
            "name": self.0.name,
            "state": self.0.state(),
            "resynced": self.0.resynced.load(Ordering::Relaxed),
            "directions": directions,
        })
    }

    fn refresh_gauges(&self) {
        for p in self.0.progress() {
            metrics::gauge!("tandem_gateway_lag_entries", "from" => p.from.clone(), "to" => p.to.clone())
                .set(p.lag() as f64);
        }
    }
}

pub fn run(pair: &PairFile, data_dir: &Path, name: Option<&str>) -> Result<()> {
    let options = options(pair, data_dir, name)?;
    let http = pair.select_gateway(name)?.http.map(|a| a.0);
    runtime::runtime()?.block_on(async {
        let shutdown = runtime::shutdown_on_signal();
        let metrics = runtime::metrics();
        crate::tls::watch(&None, &options.tls, shutdown.clone());
        let http = ops::bind(http, &options.name).await?;
        let gateway = options.name.clone();
        let (state_tx, state_rx) = tokio::sync::oneshot::channel();
        let run = tandem_gateway::run(options, shutdown.clone(), |state| {
            tracing::info!(gateway, "gateway started");
            let _ = state_tx.send(state);
        });
        let serve_ops = async {
            let (Some(listener), Ok(state)) = (http, state_rx.await) else {
                return Ok(());
            };
            ops::serve(
                listener,
                Arc::new(GatewayView(state)),
                metrics,
                shutdown.clone(),
            )
            .await
        };
        let ((), served) = tokio::join!(run, serve_ops);
        served
    })
}
