//! The operational surface (SPEC §3 "Operations"): `/live`, `/ready`, `/health`, `/metrics`.
//! Public, and outside `/api/v1` so that probes and scrapers need no token or version.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use confab_core::ports::health::{ComponentHealth, HealthStatus};
use serde::Serialize;
use utoipa::ToSchema;

use crate::state::AppState;

/// `ok`, `degraded`, `down` or `unconfigured`.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Ok,
    Degraded,
    Down,
    Unconfigured,
}

impl From<HealthStatus> for Status {
    fn from(status: HealthStatus) -> Self {
        match status {
            HealthStatus::Ok => Self::Ok,
            HealthStatus::Degraded => Self::Degraded,
            HealthStatus::Down => Self::Down,
            HealthStatus::Unconfigured => Self::Unconfigured,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LiveBody {
    #[schema(example = "ok")]
    pub status: &'static str,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ReadyBody {
    /// `ready`, or `not_ready` with the components that stop it.
    #[schema(example = "ready")]
    pub status: &'static str,
    pub failing: Vec<String>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ComponentBody {
    pub status: Status,
    /// sqlite, postgres, memory, redis, …
    pub kind: String,
    pub latency_ms: Option<u64>,
    pub last_error: Option<String>,
}

impl From<ComponentHealth> for ComponentBody {
    fn from(h: ComponentHealth) -> Self {
        Self {
            status: h.status.into(),
            kind: h.kind,
            latency_ms: h.latency_ms,
            last_error: h.last_error,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HealthBody {
    pub status: Status,
    pub version: &'static str,
    pub uptime_seconds: u64,
    pub components: BTreeMap<&'static str, ComponentBody>,
}

/// 200 while the process runs.
#[utoipa::path(get, path = "/live", tag = "operations",
    responses((status = 200, description = "The process is running.", body = LiveBody)))]
pub async fn live() -> Json<LiveBody> {
    Json(LiveBody { status: "ok" })
}

/// 200 when every component the service needs is usable; 503 otherwise, and from the moment
/// shutdown begins (so a load balancer stops sending traffic before the listener closes).
#[utoipa::path(get, path = "/ready", tag = "operations",
    responses(
        (status = 200, description = "Ready for traffic.", body = ReadyBody),
        (status = 503, description = "Not ready.", body = ReadyBody),
    ))]
pub async fn ready(State(state): State<AppState>) -> (StatusCode, Json<ReadyBody>) {
    let report = state.components.check().await;
    let mut failing: Vec<String> = report
        .components
        .iter()
        .filter(|(_, required, h)| *required && !h.status.is_usable())
        .map(|(name, ..)| (*name).to_owned())
        .collect();
    if state.shutdown.is_cancelled() {
        failing.push("shutting_down".into());
    }
    if failing.is_empty() {
        (
            StatusCode::OK,
            Json(ReadyBody {
                status: "ready",
                failing,
            }),
        )
    } else {
        let body = ReadyBody {
            status: "not_ready",
            failing,
        };
        (StatusCode::SERVICE_UNAVAILABLE, Json(body))
    }
}

/// The component table. 200 when `ok` or `degraded`, 503 when `down`.
#[utoipa::path(get, path = "/health", tag = "operations",
    responses(
        (status = 200, description = "Up, perhaps degraded.", body = HealthBody),
        (status = 503, description = "A component the service needs is down.", body = HealthBody),
    ))]
pub async fn health(State(state): State<AppState>) -> (StatusCode, Json<HealthBody>) {
    let report = state.components.check().await;
    let status = if report.status == HealthStatus::Down {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    let body = HealthBody {
        status: report.status.into(),
        version: env!("CARGO_PKG_VERSION"),
        uptime_seconds: state.started_at.elapsed().as_secs(),
        components: report
            .components
            .into_iter()
            .map(|(name, _, h)| (name, h.into()))
            .collect(),
    };
    (status, Json(body))
}

/// Prometheus text exposition.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format.", content_type = "text/plain", body = String)))]
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    state.metrics.run_upkeep();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}
