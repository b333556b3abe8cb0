//! Health reports: the shape every port's `health()` returns.
//!
//! Contract: `health()` never fails and never hangs longer than the caller's deadline; it
//! reports `Down` with the last error instead. `Unconfigured` means the component is optional
//! and not set up (SPEC §8: no AI provider), which is not a failure.

use serde::Serialize;

/// The state of one component (SPEC §3 `/health`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthStatus {
    Ok,
    Degraded,
    Down,
    Unconfigured,
}

impl HealthStatus {
    /// Whether the component can serve requests (degraded still can).
    pub const fn is_usable(self) -> bool {
        matches!(self, Self::Ok | Self::Degraded)
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Degraded => "degraded",
            Self::Down => "down",
            Self::Unconfigured => "unconfigured",
        }
    }
}

/// One component's report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ComponentHealth {
    pub status: HealthStatus,
    /// The technology behind the component: `sqlite`, `postgres`, `memory`, `redis`, …
    pub kind: String,
    /// How long the check took, when it talked to the backend.
    pub latency_ms: Option<u64>,
    /// The last error seen, without secrets.
    pub last_error: Option<String>,
}

impl ComponentHealth {
    pub fn new(status: HealthStatus, kind: impl Into<String>) -> Self {
        Self {
            status,
            kind: kind.into(),
            latency_ms: None,
            last_error: None,
        }
    }

    #[must_use]
    pub fn with_latency_ms(mut self, latency_ms: u64) -> Self {
        self.latency_ms = Some(latency_ms);
        self
    }

    /// The check's duration, in whole milliseconds.
    #[must_use]
    pub fn with_latency(self, latency: std::time::Duration) -> Self {
        self.with_latency_ms(u64::try_from(latency.as_millis()).unwrap_or(u64::MAX))
    }

    #[must_use]
    pub fn with_error(mut self, error: impl Into<String>) -> Self {
        self.last_error = Some(error.into());
        self
    }
}

/// Something that can report its health: every port, and wrappers around them.
#[async_trait::async_trait]
pub trait HealthCheck: Send + Sync + 'static {
    async fn health(&self) -> ComponentHealth;
}

/// The overall status from the components' statuses: `down` when a component the service
/// cannot work without is down, `degraded` when anything else is down or degraded.
pub fn overall<'a>(
    components: impl IntoIterator<Item = (&'a ComponentHealth, bool)>,
) -> HealthStatus {
    let mut status = HealthStatus::Ok;
    for (health, required) in components {
        match health.status {
            HealthStatus::Down if required => return HealthStatus::Down,
            HealthStatus::Down | HealthStatus::Degraded => status = HealthStatus::Degraded,
            HealthStatus::Ok | HealthStatus::Unconfigured => {}
        }
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(status: HealthStatus) -> ComponentHealth {
        ComponentHealth::new(status, "test")
    }

    #[test]
    fn a_required_component_down_makes_the_whole_service_down() {
        let (db, cache) = (c(HealthStatus::Down), c(HealthStatus::Ok));
        assert_eq!(overall([(&db, true), (&cache, false)]), HealthStatus::Down);
    }

    #[test]
    fn an_optional_component_down_only_degrades() {
        let (db, cache) = (c(HealthStatus::Ok), c(HealthStatus::Down));
        assert_eq!(
            overall([(&db, true), (&cache, false)]),
            HealthStatus::Degraded
        );
    }

    #[test]
    fn unconfigured_components_do_not_degrade() {
        let ai = c(HealthStatus::Unconfigured);
        assert_eq!(overall([(&ai, false)]), HealthStatus::Ok);
        assert_eq!(overall([]), HealthStatus::Ok);
    }
}
