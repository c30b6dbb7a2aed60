//! `/healthz` (the process is alive) and `/readyz` (a source has completed
//! its first dump), with flowtel's own counters in the `/readyz` body so an
//! operator can see at a glance whether anything is being lost.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};

use crate::enrich::kubernetes::KubeStats;
use crate::export::mesh::{ActiveSources, ActiveSourcesCell};
use crate::source::SourceInfo;
use crate::stats::SelfStats;

#[derive(Clone)]
struct HealthState {
    stats: Arc<SelfStats>,
    source: SourceInfo,
    kube: Option<Arc<KubeStats>>,
    active: ActiveSourcesCell,
}

#[derive(serde::Serialize)]
struct Readiness {
    ready: bool,
    source: SourceInfo,
    stats: crate::stats::StatsSnapshot,
    /// The Kubernetes cache, when enrichment is on.
    #[serde(skip_serializing_if = "Option::is_none")]
    kubernetes: Option<KubeReadiness>,
    /// The CNI detected and the sources delivering (kernel, hubble, istio,
    /// felix), as in `flowtel.sources.active`.
    sources: ActiveSources,
}

/// The Kubernetes cache's counters, as in the `flowtel.k8s.*` metrics.
#[derive(serde::Serialize)]
struct KubeReadiness {
    synced: bool,
    watch_errors: u64,
    relists: u64,
    objects_rejected: u64,
}

/// Binds the listener now (so a port clash is a start-up error) and serves in
/// the background.
pub async fn serve(
    listen: SocketAddr,
    stats: Arc<SelfStats>,
    source: SourceInfo,
    kube: Option<Arc<KubeStats>>,
    active: ActiveSourcesCell,
) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| {
        anyhow::anyhow!("cannot listen on {listen} for health checks (health.listen): {e}")
    })?;
    let local = listener.local_addr()?;
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(HealthState {
            stats,
            source,
            kube,
            active,
        });
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("health endpoint stopped: {e}");
        }
    });
    Ok(local)
}

async fn readyz(State(state): State<HealthState>) -> (StatusCode, Json<Readiness>) {
    let stats = state.stats.snapshot();
    let code = if stats.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        Json(Readiness {
            ready: stats.ready,
            source: state.source,
            stats,
            kubernetes: state.kube.map(|k| KubeReadiness {
                synced: k.synced(),
                watch_errors: k.watch_errors(),
                relists: k.relists(),
                objects_rejected: k.objects_rejected(),
            }),
            sources: state
                .active
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
        }),
    )
}
