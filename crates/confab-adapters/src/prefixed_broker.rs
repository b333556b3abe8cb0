//! `PrefixedBroker`: puts a prefix before every queue name, so that several deployments
//! (staging beside production, or tests running side by side) can share one RabbitMQ without
//! taking each other's messages. Callers keep using the logical names (`mail`, `events` …);
//! deliveries come back under them.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use confab_core::ports::broker::{Broker, BrokerError, DeadLetter, Delivery, Envelope, QueueDepth};
use confab_core::ports::health::{ComponentHealth, HealthCheck};

pub struct PrefixedBroker {
    inner: Arc<dyn Broker>,
    prefix: String,
}

impl PrefixedBroker {
    pub fn new(inner: Arc<dyn Broker>, prefix: impl Into<String>) -> Self {
        Self {
            inner,
            prefix: prefix.into(),
        }
    }

    fn name(&self, queue: &str) -> String {
        format!("{}{queue}", self.prefix)
    }

    /// The delivery as the inner broker handed it out.
    fn inner_delivery(&self, delivery: &Delivery) -> Delivery {
        Delivery {
            queue: self.name(&delivery.queue),
            ..delivery.clone()
        }
    }
}

#[async_trait]
impl HealthCheck for PrefixedBroker {
    async fn health(&self) -> ComponentHealth {
        self.inner.health().await
    }
}

#[async_trait]
impl Broker for PrefixedBroker {
    async fn publish(&self, queue: &str, envelope: &Envelope) -> Result<(), BrokerError> {
        self.inner.publish(&self.name(queue), envelope).await
    }

    async fn publish_all(&self, queue: &str, envelopes: &[Envelope]) -> Result<(), BrokerError> {
        self.inner.publish_all(&self.name(queue), envelopes).await
    }

    async fn receive(
        &self,
        queue: &str,
        max: u32,
        wait: Duration,
    ) -> Result<Vec<Delivery>, BrokerError> {
        let mut deliveries = self.inner.receive(&self.name(queue), max, wait).await?;
        for delivery in &mut deliveries {
            queue.clone_into(&mut delivery.queue);
        }
        Ok(deliveries)
    }

    async fn ack(&self, delivery: &Delivery) -> Result<(), BrokerError> {
        self.inner.ack(&self.inner_delivery(delivery)).await
    }

    async fn ack_all(&self, deliveries: &[Delivery]) -> Result<(), BrokerError> {
        let inner: Vec<Delivery> = deliveries.iter().map(|d| self.inner_delivery(d)).collect();
        self.inner.ack_all(&inner).await
    }

    async fn nack(&self, delivery: &Delivery, error: &str) -> Result<(), BrokerError> {
        self.inner.nack(&self.inner_delivery(delivery), error).await
    }

    async fn depth(&self, queue: &str) -> Result<QueueDepth, BrokerError> {
        self.inner.depth(&self.name(queue)).await
    }

    async fn dead_letters(&self, queue: &str, limit: u32) -> Result<Vec<DeadLetter>, BrokerError> {
        self.inner.dead_letters(&self.name(queue), limit).await
    }

    async fn replay_dead_letters(&self, queue: &str) -> Result<u64, BrokerError> {
        self.inner.replay_dead_letters(&self.name(queue)).await
    }
}
