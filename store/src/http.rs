//! The store's HTTP ops endpoints: `/healthz`, `/readyz`, `/active`, `/status`, `/metrics`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

use crate::engine::Shared;

#[derive(Clone)]
struct Ops {
    shared: Arc<Shared>,
    role: &'static str,
    metrics: Option<PrometheusHandle>,
}

pub async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    role: &'static str,
    metrics: Option<PrometheusHandle>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let ops = Ops {
        shared,
        role,
        metrics,
    };
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/active", get(active))
        .route("/status", get(status))
        .route("/metrics", get(render_metrics))
        .with_state(ops);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

/// Binds the ops address, so a taken port fails the start with a clear error.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

fn flag(ok: bool, yes: &'static str, no: &'static str) -> (StatusCode, &'static str) {
    if ok {
        (StatusCode::OK, yes)
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, no)
    }
}

async fn readyz(State(ops): State<Ops>) -> impl IntoResponse {
    flag(
        ops.shared.loaded.load(Ordering::Relaxed),
        "ready\n",
        "loading\n",
    )
}

async fn active(State(ops): State<Ops>) -> impl IntoResponse {
    flag(
        ops.shared.acting_primary.load(Ordering::Relaxed),
        "active\n",
        "standby\n",
    )
}

async fn status(State(ops): State<Ops>) -> impl IntoResponse {
    let s = &ops.shared;
    Json(serde_json::json!({
        "name": s.name,
        "role": ops.role,
        "acting_primary": s.acting_primary.load(Ordering::Relaxed),
        "resynced": s.resynced.load(Ordering::Relaxed),
        "alerts": s.alert_count(),
        "lsn": s.head_lsn(),
        "first_lsn": s.first_lsn.load(Ordering::Relaxed),
        "events_applied": s.events_applied.load(Ordering::Relaxed),
        "duplicates": s.duplicates.load(Ordering::Relaxed),
    }))
}

async fn render_metrics(State(ops): State<Ops>) -> impl IntoResponse {
    metrics::gauge!("tandem_store_alerts").set(ops.shared.alert_count() as f64);
    match &ops.metrics {
        Some(handle) => (StatusCode::OK, handle.render()),
        None => (
            StatusCode::NOT_FOUND,
            "metrics are not recorded in this process\n".to_string(),
        ),
    }
}
