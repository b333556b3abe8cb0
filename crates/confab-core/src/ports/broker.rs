//! The `Broker` port: named durable queues (SPEC §6). A queue in the database embedded,
//! RabbitMQ in production.
//!
//! # Contract (tested by `testing::broker::run_all` against every implementation)
//!
//! - **Queues** are named (`chat_requests`, `chat_responses`, `mail`, `events`); each has a
//!   dead-letter queue. Messages are [`Envelope`]s.
//! - **Durable publish.** `publish` and `publish_all` return `Ok` only once the messages are
//!   stored (a database commit, publisher confirms): a crash of any process afterwards loses
//!   nothing. Publishing an envelope id a queue already holds may store it once or twice;
//!   consumers are idempotent either way.
//! - **At-least-once delivery.** `receive` hands out up to `max` messages (the prefetch) that
//!   no other consumer holds. A consumer acknowledges after its work is durable. A message
//!   that is neither acked nor nacked (the consumer died) is delivered again after the
//!   visibility timeout, so consumers must be idempotent by envelope id.
//! - **Order.** One consumer receives a queue's messages in publish order, retries aside.
//! - **Retry, then dead-letter.** `nack` records the error and makes the message available
//!   again after an exponential backoff (base, 2×base, 4×base …); after the queue's maximum
//!   attempts it moves to the dead-letter queue with its last error instead. `attempt` in the
//!   delivered envelope is 1 on first delivery. `replay_dead_letters` puts them back with
//!   their attempts reset.
//! - **Outages.** When the backend is unreachable, calls fail with
//!   [`BrokerError::Unavailable`]; publishers fall back on the transactional outbox.

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::health::HealthCheck;
use crate::domain::{EventId, Timestamp};
use crate::error::BoxError;

/// The queues of SPEC §6 (names from the systems confab replaces).
pub mod queues {
    pub const CHAT_REQUESTS: &str = "chat_requests";
    pub const CHAT_RESPONSES: &str = "chat_responses";
    pub const MAIL: &str = "mail";
    pub const EVENTS: &str = "events";
    pub const ALL: [&str; 4] = [CHAT_REQUESTS, CHAT_RESPONSES, MAIL, EVENTS];
}

/// The queue message of SPEC §6.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Envelope {
    pub id: EventId,
    #[serde(rename = "type")]
    pub kind: String,
    pub attempt: u32,
    pub created_at: Timestamp,
    pub trace_id: Option<String>,
    pub payload: serde_json::Value,
}

impl From<&crate::domain::OutboxEntry> for Envelope {
    /// The envelope an outbox entry is published as: its id, so a republish is recognised.
    fn from(entry: &crate::domain::OutboxEntry) -> Self {
        Self {
            id: entry.id,
            kind: entry.kind.clone(),
            attempt: 0,
            created_at: entry.created_at,
            trace_id: entry.trace_id.clone(),
            payload: entry.payload.clone(),
        }
    }
}

/// A received message and what `ack`/`nack` need to settle it.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    pub queue: String,
    pub envelope: Envelope,
    /// Opaque: which holding of the message this is.
    pub receipt: String,
}

/// A message that used up its attempts.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub envelope: Envelope,
    pub last_error: String,
    pub failed_at: Timestamp,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueDepth {
    /// Waiting, in flight or waiting to be retried.
    pub pending: u64,
    pub dead: u64,
}

/// How a queue retries: SPEC §6's 1 s, 2 s, 4 s …, 5 attempts by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub base_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            base_delay: Duration::from_secs(1),
        }
    }
}

impl RetryPolicy {
    /// The wait before the next delivery after failed attempt `attempt` (1-based).
    pub fn delay_after(&self, attempt: u32) -> Duration {
        self.base_delay
            .saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1).min(20)))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("the message broker is unavailable")]
    Unavailable(#[source] BoxError),
    /// The delivery is no longer held (its visibility timeout passed and someone else may
    /// have it): the work may run twice, which idempotent consumers absorb.
    #[error("the delivery is no longer held")]
    LeaseLost,
    #[error("broker error")]
    Other(#[source] BoxError),
}

#[async_trait]
pub trait Broker: HealthCheck {
    async fn publish(&self, queue: &str, envelope: &Envelope) -> Result<(), BrokerError>;
    /// Publishes `envelopes` to `queue` in order, as one batch where the backend allows it;
    /// `Ok` once every one is stored.
    async fn publish_all(&self, queue: &str, envelopes: &[Envelope]) -> Result<(), BrokerError>;
    /// Up to `max` messages, waiting up to `wait` for the first.
    async fn receive(
        &self,
        queue: &str,
        max: u32,
        wait: Duration,
    ) -> Result<Vec<Delivery>, BrokerError>;
    async fn ack(&self, delivery: &Delivery) -> Result<(), BrokerError>;
    /// Acknowledges every delivery, in one round trip where the backend allows it. All are
    /// settled that can be; `LeaseLost` when any was no longer held.
    async fn ack_all(&self, deliveries: &[Delivery]) -> Result<(), BrokerError> {
        let mut lost = false;
        for delivery in deliveries {
            match self.ack(delivery).await {
                Ok(()) => {}
                Err(BrokerError::LeaseLost) => lost = true,
                Err(e) => return Err(e),
            }
        }
        if lost {
            Err(BrokerError::LeaseLost)
        } else {
            Ok(())
        }
    }
    async fn nack(&self, delivery: &Delivery, error: &str) -> Result<(), BrokerError>;
    async fn depth(&self, queue: &str) -> Result<QueueDepth, BrokerError>;
    async fn dead_letters(&self, queue: &str, limit: u32) -> Result<Vec<DeadLetter>, BrokerError>;
    /// Moves every dead letter of `queue` back onto it; how many.
    async fn replay_dead_letters(&self, queue: &str) -> Result<u64, BrokerError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_the_base() {
        let policy = RetryPolicy::default();
        let delays: Vec<u64> = (1..=4).map(|a| policy.delay_after(a).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8]);
        assert!(policy.delay_after(u32::MAX) > Duration::ZERO, "no overflow");
    }

    #[test]
    fn the_envelope_serializes_as_the_spec_names_it() {
        let e = Envelope {
            id: EventId::new(),
            kind: "message.created".into(),
            attempt: 1,
            created_at: crate::domain::now(),
            trace_id: None,
            payload: serde_json::json!({}),
        };
        let json = serde_json::to_value(&e).unwrap();
        for key in ["id", "type", "attempt", "createdAt", "traceId", "payload"] {
            assert!(json.get(key).is_some(), "{key}: {json}");
        }
    }
}
