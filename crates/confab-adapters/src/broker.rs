//! Choosing the `Broker`: the `[queue]` config section and the one factory that reads it.

use std::sync::Arc;
use std::time::Duration;

use confab_core::ports::broker::{Broker, BrokerError, RetryPolicy};
use confab_core::settings::{SecretUrl, lenient};
use serde::{Deserialize, Serialize};

use crate::db_broker::DbBroker;
use crate::metered_broker::MeteredBroker;
use crate::prefixed_broker::PrefixedBroker;
use crate::rabbit_broker::RabbitBroker;
use crate::sql_store::SqlStore;

const fn default_max_attempts() -> u32 {
    5
}

const fn default_retry_base_ms() -> u64 {
    1000
}

const fn default_visibility_timeout_secs() -> u64 {
    30
}

/// `[queue]`: which broker, and how its queues retry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum QueueConfig {
    /// Durable queues in the database (SQLite or PostgreSQL).
    Database {
        /// Deliveries before a message is dead-lettered.
        #[serde(default = "default_max_attempts", deserialize_with = "lenient::value")]
        max_attempts: u32,
        /// The first retry waits this long; each later one twice the one before.
        #[serde(default = "default_retry_base_ms", deserialize_with = "lenient::value")]
        retry_base_ms: u64,
        /// A received message not acknowledged within this time is delivered again.
        #[serde(
            default = "default_visibility_timeout_secs",
            deserialize_with = "lenient::value"
        )]
        visibility_timeout_secs: u64,
    },
    Rabbitmq {
        url: SecretUrl,
        #[serde(default = "default_max_attempts", deserialize_with = "lenient::value")]
        max_attempts: u32,
        #[serde(default = "default_retry_base_ms", deserialize_with = "lenient::value")]
        retry_base_ms: u64,
        /// A received message not acknowledged within this time is delivered again.
        #[serde(
            default = "default_visibility_timeout_secs",
            deserialize_with = "lenient::value"
        )]
        visibility_timeout_secs: u64,
        /// Put before every queue name (`staging.` → `staging.mail`), so that deployments
        /// sharing one RabbitMQ keep apart. Empty: the names of SPEC §6, as the systems
        /// confab replaces use them.
        #[serde(default)]
        queue_prefix: String,
        /// Let RabbitMQ delete queues idle this long (test and preview deployments). Unset in
        /// production.
        #[serde(default, deserialize_with = "lenient::option")]
        idle_queue_expiry_secs: Option<u64>,
    },
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self::Database {
            max_attempts: default_max_attempts(),
            retry_base_ms: default_retry_base_ms(),
            visibility_timeout_secs: default_visibility_timeout_secs(),
        }
    }
}

impl QueueConfig {
    pub fn retry(&self) -> RetryPolicy {
        let (Self::Database {
            max_attempts,
            retry_base_ms,
            ..
        }
        | Self::Rabbitmq {
            max_attempts,
            retry_base_ms,
            ..
        }) = self;
        RetryPolicy {
            max_attempts: (*max_attempts).max(1),
            base_delay: Duration::from_millis(*retry_base_ms),
        }
    }
}

/// The broker `config` names, with its metrics. The database queue shares the store's pool;
/// RabbitMQ must be reachable (a publish must be able to wait for its confirm).
pub async fn build(
    config: &QueueConfig,
    store: &SqlStore,
) -> Result<Arc<MeteredBroker>, BrokerError> {
    let backend: Arc<dyn Broker> = match config {
        QueueConfig::Database {
            visibility_timeout_secs,
            ..
        } => {
            let broker = DbBroker::new(
                store.connection(),
                config.retry(),
                Duration::from_secs((*visibility_timeout_secs).max(1)),
            );
            // One database: the store's outbox entries go straight into the queue.
            broker.take_outbox_of(store);
            Arc::new(broker)
        }
        QueueConfig::Rabbitmq {
            url,
            visibility_timeout_secs,
            queue_prefix,
            idle_queue_expiry_secs,
            ..
        } => {
            let rabbit: Arc<dyn Broker> = Arc::new(
                RabbitBroker::connect(
                    url,
                    config.retry(),
                    Duration::from_secs((*visibility_timeout_secs).max(1)),
                    idle_queue_expiry_secs.map(|secs| Duration::from_secs(secs.max(1))),
                )
                .await?,
            );
            if queue_prefix.is_empty() {
                rabbit
            } else {
                Arc::new(PrefixedBroker::new(rabbit, queue_prefix.clone()))
            }
        }
    };
    Ok(Arc::new(MeteredBroker::new(backend, config.retry())))
}
