//! `MeteredBroker`: SPEC §10's queue metrics around any `Broker`.
//!
//! `queue_published_total{queue}`, `queue_consumed_total{queue,outcome}` (outcome `ack`,
//! `nack`, `dead`, `lease_lost`) and, through [`MeteredBroker::record_depths`],
//! `queue_depth{queue,state}`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use confab_core::ports::broker::{
    Broker, BrokerError, DeadLetter, Delivery, Envelope, QueueDepth, RetryPolicy,
};
use confab_core::ports::health::{ComponentHealth, HealthCheck};

pub struct MeteredBroker {
    inner: Arc<dyn Broker>,
    retry: RetryPolicy,
}

impl MeteredBroker {
    /// `retry` tells a final nack (dead letter) from a retry.
    pub fn new(inner: Arc<dyn Broker>, retry: RetryPolicy) -> Self {
        Self { inner, retry }
    }

    /// Sets `queue_depth` for each of `queues`.
    pub async fn record_depths(&self, queues: &[&str]) {
        for queue in queues {
            if let Ok(depth) = self.inner.depth(queue).await {
                #[allow(clippy::cast_precision_loss)] // Depths are far below 2^52.
                {
                    metrics::gauge!("queue_depth", "queue" => (*queue).to_owned(), "state" => "pending")
                        .set(depth.pending as f64);
                    metrics::gauge!("queue_depth", "queue" => (*queue).to_owned(), "state" => "dead")
                        .set(depth.dead as f64);
                }
            }
        }
    }
}

fn consumed(queue: &str, outcome: &'static str) {
    metrics::counter!("queue_consumed_total", "queue" => queue.to_owned(), "outcome" => outcome)
        .increment(1);
}

#[async_trait]
impl HealthCheck for MeteredBroker {
    async fn health(&self) -> ComponentHealth {
        self.inner.health().await
    }
}

#[async_trait]
impl Broker for MeteredBroker {
    async fn publish(&self, queue: &str, envelope: &Envelope) -> Result<(), BrokerError> {
        self.inner.publish(queue, envelope).await?;
        metrics::counter!("queue_published_total", "queue" => queue.to_owned()).increment(1);
        Ok(())
    }

    async fn publish_all(&self, queue: &str, envelopes: &[Envelope]) -> Result<(), BrokerError> {
        self.inner.publish_all(queue, envelopes).await?;
        metrics::counter!("queue_published_total", "queue" => queue.to_owned())
            .increment(envelopes.len() as u64);
        Ok(())
    }

    async fn receive(
        &self,
        queue: &str,
        max: u32,
        wait: Duration,
    ) -> Result<Vec<Delivery>, BrokerError> {
        self.inner.receive(queue, max, wait).await
    }

    async fn ack(&self, delivery: &Delivery) -> Result<(), BrokerError> {
        let result = self.inner.ack(delivery).await;
        match &result {
            Ok(()) => consumed(&delivery.queue, "ack"),
            Err(BrokerError::LeaseLost) => consumed(&delivery.queue, "lease_lost"),
            Err(_) => {}
        }
        result
    }

    async fn ack_all(&self, deliveries: &[Delivery]) -> Result<(), BrokerError> {
        let result = self.inner.ack_all(deliveries).await;
        if result.is_ok() {
            for delivery in deliveries {
                consumed(&delivery.queue, "ack");
            }
        } else if matches!(result, Err(BrokerError::LeaseLost)) {
            for delivery in deliveries {
                consumed(&delivery.queue, "ack_or_lease_lost");
            }
        }
        result
    }

    async fn nack(&self, delivery: &Delivery, error: &str) -> Result<(), BrokerError> {
        let result = self.inner.nack(delivery, error).await;
        match &result {
            Ok(()) if delivery.envelope.attempt >= self.retry.max_attempts => {
                consumed(&delivery.queue, "dead");
            }
            Ok(()) => consumed(&delivery.queue, "nack"),
            Err(BrokerError::LeaseLost) => consumed(&delivery.queue, "lease_lost"),
            Err(_) => {}
        }
        result
    }

    async fn depth(&self, queue: &str) -> Result<QueueDepth, BrokerError> {
        self.inner.depth(queue).await
    }

    async fn dead_letters(&self, queue: &str, limit: u32) -> Result<Vec<DeadLetter>, BrokerError> {
        self.inner.dead_letters(queue, limit).await
    }

    async fn replay_dead_letters(&self, queue: &str) -> Result<u64, BrokerError> {
        self.inner.replay_dead_letters(queue).await
    }
}
