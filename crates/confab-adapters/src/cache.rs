//! Choosing the `Cache`: the `[cache]` config section and the one factory that reads it.

use std::sync::Arc;

use confab_core::ports::cache::{Cache, CacheError};
use confab_core::settings::SecretUrl;
use confab_core::settings::lenient;
use serde::{Deserialize, Serialize};

use crate::fail_soft_cache::FailSoftCache;
use crate::memory_cache::MemoryCache;
use crate::redis_cache::RedisCache;

/// The prefix of every key and channel (SPEC §7).
pub const DEFAULT_KEY_PREFIX: &str = "confab:";
/// The embedded cache's bound on stored values.
pub const DEFAULT_MAX_ENTRIES: u64 = 100_000;

fn default_prefix() -> String {
    DEFAULT_KEY_PREFIX.to_owned()
}

const fn default_max_entries() -> u64 {
    DEFAULT_MAX_ENTRIES
}

/// `[cache]`: which backend, and its settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum CacheConfig {
    /// In this process only: right for one node.
    Memory {
        #[serde(default = "default_prefix")]
        key_prefix: String,
        /// Values kept at most; beyond it the least useful are evicted.
        #[serde(default = "default_max_entries", deserialize_with = "lenient::value")]
        max_entries: u64,
    },
    /// Shared by every node.
    Redis {
        url: SecretUrl,
        #[serde(default = "default_prefix")]
        key_prefix: String,
    },
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self::Memory {
            key_prefix: default_prefix(),
            max_entries: DEFAULT_MAX_ENTRIES,
        }
    }
}

impl CacheConfig {
    pub fn key_prefix(&self) -> &str {
        match self {
            Self::Memory { key_prefix, .. } | Self::Redis { key_prefix, .. } => key_prefix,
        }
    }
}

/// The raw backend `config` names, with no outage handling: what the conformance suite tests.
/// Must be called within a tokio runtime.
pub fn build_backend(config: &CacheConfig) -> Result<Arc<dyn Cache>, CacheError> {
    Ok(match config {
        CacheConfig::Memory { max_entries, .. } => Arc::new(MemoryCache::new(*max_entries)),
        CacheConfig::Redis { url, key_prefix } => Arc::new(RedisCache::connect(url, key_prefix)?),
    })
}

/// The cache the service uses: the backend wrapped in SPEC §7's outage behaviour.
pub fn build(
    config: &CacheConfig,
    rate_limit_fail_open: bool,
) -> Result<Arc<dyn Cache>, CacheError> {
    Ok(Arc::new(FailSoftCache::new(
        build_backend(config)?,
        rate_limit_fail_open,
    )))
}
