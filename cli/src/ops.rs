//! The HTTP ops endpoints every long-running component serves on its `http` address:
//! `/healthz` (200 while the process runs), `/readyz` (200 once it can do its job), `/active`
//! (200 only on the side that is active now), `/status` (JSON) and `/metrics` (Prometheus).
//!
//! Components describe themselves through [`OpsView`]; this module knows nothing else of them.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// What a component tells its ops endpoints.
pub trait OpsView: Send + Sync + 'static {
    /// It can do its job (store loaded, proxy connected upstream, gateway resynced).
    fn ready(&self) -> bool;
    /// It is on the active side of the pair now.
    fn active(&self) -> bool;
    fn status(&self) -> serde_json::Value;
    /// Sets gauges that are read rather than counted, just before `/metrics` renders.
    fn refresh_gauges(&self) {}
}

#[derive(Clone)]
struct Ops {
    view: Arc<dyn OpsView>,
    metrics: Option<PrometheusHandle>,
}

/// Binds the ops address early, so a taken port fails the start with a clear error.
pub async fn bind(addr: Option<SocketAddr>, component: &str) -> Result<Option<TcpListener>> {
    match addr {
        None => Ok(None),
        Some(addr) => TcpListener::bind(addr)
            .await
            .map(Some)
            .with_context(|| format!("{component}: cannot listen on its http address {addr} (is another process using it?)")),
    }
}

pub async fn serve(
    listener: TcpListener,
    view: Arc<dyn OpsView>,
    metrics: Option<PrometheusHandle>,
    shutdown: CancellationToken,
) -> Result<()> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/active", get(active))
        .route("/status", get(status))
        .route("/metrics", get(render_metrics))
        .with_state(Ops { view, metrics });
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
        .context("ops endpoint failed")
}

fn flag(ok: bool, yes: &'static str, no: &'static str) -> (StatusCode, &'static str) {
    if ok {
        (StatusCode::OK, yes)
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, no)
    }
}

async fn readyz(State(ops): State<Ops>) -> impl IntoResponse {
    flag(ops.view.ready(), "ready\n", "not ready\n")
}

async fn active(State(ops): State<Ops>) -> impl IntoResponse {
    flag(ops.view.active(), "active\n", "standby\n")
}

async fn status(State(ops): State<Ops>) -> impl IntoResponse {
    Json(ops.view.status())
}

async fn render_metrics(State(ops): State<Ops>) -> impl IntoResponse {
    ops.view.refresh_gauges();
    match &ops.metrics {
        Some(handle) => (StatusCode::OK, handle.render()),
        None => (
            StatusCode::NOT_FOUND,
            "metrics are not recorded in this process\n".to_string(),
        ),
    }
}
