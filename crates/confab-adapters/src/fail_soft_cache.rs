//! `FailSoftCache`: what the service does while its cache is unreachable (SPEC §7).
//!
//! Wraps any `Cache`. On `Unavailable`: reads miss, writes are skipped, deletes report
//! nothing deleted, publishes are dropped (pub/sub is at-most-once), and a rate-limit check is
//! allowed (fail open, the default) or denied for a second (fail closed). Each such failure
//! counts in `cache_errors_total{op}`. `incr` still reports the error: a counter cannot be
//! made up. `WrongType` always passes through: it is a bug, not an outage.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use confab_core::ports::cache::{
    Cache, CacheError, Presence, RateDecision, RateLimit, Subscription,
};
use confab_core::ports::health::{ComponentHealth, HealthCheck};

pub struct FailSoftCache {
    inner: Arc<dyn Cache>,
    rate_limit_fail_open: bool,
}

impl FailSoftCache {
    pub fn new(inner: Arc<dyn Cache>, rate_limit_fail_open: bool) -> Self {
        Self {
            inner,
            rate_limit_fail_open,
        }
    }

    /// `fallback` when the backend is unavailable (counted), the result otherwise.
    fn soft<T>(
        op: &'static str,
        result: Result<T, CacheError>,
        fallback: T,
    ) -> Result<T, CacheError> {
        match result {
            Err(CacheError::Unavailable(error)) => {
                metrics::counter!("cache_errors_total", "op" => op).increment(1);
                tracing::debug!(op, %error, "Cache unavailable; carrying on without it.");
                Ok(fallback)
            }
            other => other,
        }
    }
}

#[async_trait]
impl HealthCheck for FailSoftCache {
    async fn health(&self) -> ComponentHealth {
        self.inner.health().await
    }
}

#[async_trait]
impl Cache for FailSoftCache {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, CacheError> {
        Self::soft("get", self.inner.get(key).await, None)
    }

    async fn set(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> Result<(), CacheError> {
        Self::soft("set", self.inner.set(key, value, ttl).await, ())
    }

    async fn delete(&self, key: &str) -> Result<bool, CacheError> {
        Self::soft("delete", self.inner.delete(key).await, false)
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<u64, CacheError> {
        Self::soft("delete_prefix", self.inner.delete_prefix(prefix).await, 0)
    }

    async fn incr(&self, key: &str, by: i64, ttl: Duration) -> Result<i64, CacheError> {
        let result = self.inner.incr(key, by, ttl).await;
        if matches!(result, Err(CacheError::Unavailable(_))) {
            metrics::counter!("cache_errors_total", "op" => "incr").increment(1);
        }
        result
    }

    async fn presence_touch(&self, set: &str, member: &str, at_ms: i64) -> Result<(), CacheError> {
        Self::soft(
            "presence_touch",
            self.inner.presence_touch(set, member, at_ms).await,
            (),
        )
    }

    async fn presence_since(&self, set: &str, since_ms: i64) -> Result<Vec<Presence>, CacheError> {
        Self::soft(
            "presence_since",
            self.inner.presence_since(set, since_ms).await,
            Vec::new(),
        )
    }

    async fn presence_remove(&self, set: &str, member: &str) -> Result<(), CacheError> {
        Self::soft(
            "presence_remove",
            self.inner.presence_remove(set, member).await,
            (),
        )
    }

    async fn presence_prune(&self, set: &str, before_ms: i64) -> Result<u64, CacheError> {
        Self::soft(
            "presence_prune",
            self.inner.presence_prune(set, before_ms).await,
            0,
        )
    }

    async fn publish(&self, channel: &str, payload: &[u8]) -> Result<(), CacheError> {
        Self::soft("publish", self.inner.publish(channel, payload).await, ())
    }

    async fn subscribe(&self, channel: &str) -> Result<Subscription, CacheError> {
        self.inner.subscribe(channel).await
    }

    /// During an outage: this node alone.
    async fn subscribers(&self, channel: &str) -> Result<u64, CacheError> {
        Self::soft("subscribers", self.inner.subscribers(channel).await, 1)
    }

    async fn rate_limit(&self, key: &str, rate: RateLimit) -> Result<RateDecision, CacheError> {
        let fallback = if self.rate_limit_fail_open {
            RateDecision {
                allowed: true,
                remaining: rate.limit.saturating_sub(1),
                retry_after: Duration::ZERO,
            }
        } else {
            RateDecision {
                allowed: false,
                remaining: 0,
                retry_after: Duration::from_secs(1),
            }
        };
        Self::soft(
            "rate_limit",
            self.inner.rate_limit(key, rate).await,
            fallback,
        )
    }
}
