//! The component table behind `/ready`, `/health` and `confab doctor`.
//!
//! Each component is a port's [`HealthCheck`]; checks run concurrently, each bounded by a
//! deadline, so one hung backend cannot hang the probe.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use confab_core::ports::health::{ComponentHealth, HealthCheck, HealthStatus, overall};

use crate::config::Config;
use crate::startup::Ports;

/// One row of the table.
pub struct Component {
    pub name: &'static str,
    /// `/ready` answers 503 while a required component is down (SPEC §3: database, queue).
    pub required: bool,
    pub check: Arc<dyn HealthCheck>,
}

/// Every component of this process.
pub struct Components {
    components: Vec<Component>,
    deadline: Duration,
}

/// The outcome of checking every component.
#[derive(Debug, Clone)]
pub struct Report {
    pub status: HealthStatus,
    pub components: Vec<(&'static str, bool, ComponentHealth)>,
}

impl Report {
    /// Whether every required component is usable.
    pub fn ready(&self) -> bool {
        self.components
            .iter()
            .all(|(_, required, h)| !required || h.status.is_usable())
    }
}

impl Components {
    pub fn new(components: Vec<Component>) -> Self {
        Self {
            components,
            deadline: Duration::from_secs(2),
        }
    }

    /// Bounds each check; a check that takes longer is reported `down`.
    #[must_use]
    pub fn with_deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// The table for this build's ports.
    pub fn for_ports(config: &Config, ports: &Ports) -> Self {
        Self::new(vec![
            Component {
                name: "database",
                required: true,
                check: ports.store.clone(),
            },
            Component {
                name: "queue",
                required: true,
                check: ports.broker.clone(),
            },
            Component {
                name: "cache",
                required: false,
                check: ports.cache.clone(),
            },
            Component {
                name: "storage",
                required: false,
                check: ports.blobs.clone(),
            },
            Component {
                name: "mail",
                required: false,
                check: ports.mailer.clone(),
            },
            Component {
                name: "ai",
                required: false,
                check: Arc::new(AiHealth {
                    chain: ports.ai.clone(),
                    configured: config.ai.providers(),
                }),
            },
        ])
    }

    pub async fn check(&self) -> Report {
        let checks = self.components.iter().map(|c| async move {
            let started = std::time::Instant::now();
            let health = match tokio::time::timeout(self.deadline, c.check.health()).await {
                Ok(health) => health,
                Err(_) => ComponentHealth::new(HealthStatus::Down, "unknown").with_error(format!(
                    "the health check did not answer within {} ms",
                    self.deadline.as_millis()
                )),
            };
            if health.latency_ms.is_none() && health.status != HealthStatus::Unconfigured {
                return (c.name, c.required, health.with_latency(started.elapsed()));
            }
            (c.name, c.required, health)
        });
        let components = futures_util::future::join_all(checks).await;
        let status = overall(components.iter().map(|(_, required, h)| (h, *required)));
        Report { status, components }
    }
}

/// A component whose state is known without asking anything.
pub struct Fixed(pub ComponentHealth);

#[async_trait]
impl HealthCheck for Fixed {
    async fn health(&self) -> ComponentHealth {
        self.0.clone()
    }
}

/// SPEC §8: with no provider the AI component is `unconfigured`, which is not a failure.
/// Otherwise each link's provider is asked for its models (at once): all answering is `ok`,
/// some is `degraded` (the chain falls back), none is `down`. An open circuit counts as down.
struct AiHealth {
    chain: Option<Arc<confab_core::services::ai::chain::Chain>>,
    configured: Vec<&'static str>,
}

#[async_trait]
impl HealthCheck for AiHealth {
    async fn health(&self) -> ComponentHealth {
        let Some(chain) = &self.chain else {
            return if self.configured.is_empty() {
                ComponentHealth::new(HealthStatus::Unconfigured, "none")
            } else {
                ComponentHealth::new(HealthStatus::Down, self.configured.join(","))
                    .with_error("the configured AI providers have no adapter in this build")
            };
        };
        let links = chain.links();
        let checks = links.iter().map(|link| async move {
            if link.circuit() == confab_core::services::ai::chain::CircuitState::Open {
                return Err(format!(
                    "{}/{}: the circuit is open",
                    link.provider(),
                    link.model()
                ));
            }
            link.backend()
                .models()
                .await
                .map(|_| ())
                .map_err(|e| format!("{}/{}: {e}", link.provider(), link.model()))
        });
        let results = futures_util::future::join_all(checks).await;
        let kind = chain.describe().join(",");
        let failed: Vec<String> = results.into_iter().filter_map(Result::err).collect();
        match failed.len() {
            0 => ComponentHealth::new(HealthStatus::Ok, kind),
            n if n == links.len() => {
                ComponentHealth::new(HealthStatus::Down, kind).with_error(failed.join("; "))
            }
            _ => ComponentHealth::new(HealthStatus::Degraded, kind).with_error(failed.join("; ")),
        }
    }
}
