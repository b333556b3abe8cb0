//! `RabbitBroker`: the production `Broker` on RabbitMQ (AMQP 0-9-1, lapin).
//!
//! Topology per queue `q`, declared on first use:
//! - `q`: a durable quorum queue. RabbitMQ counts redeliveries itself (`x-delivery-count`).
//! - `q.retry.N` for each attempt N below the maximum: a durable queue whose message TTL is
//!   the backoff after attempt N and whose dead-letter target is `q`. A nacked message is
//!   republished there and comes back when its TTL runs out: RabbitMQ does the waiting.
//! - `q.dlq`: a durable queue for dead letters, with `x-last-error` and `x-failed-at` headers.
//!
//! Messages are persistent and every publish waits for the publisher confirm. `receive`
//! consumes (server push, so a waiting receiver gets a message at once) and cancels its
//! consumer before returning, which keeps the pull contract: nothing is held that was not
//! handed out. A delivery not settled within the visibility timeout is returned to the queue
//! by this broker (a consumer that dies returns its messages by closing its channel), so the
//! contract is the same as the database queue's.
//!
//! Reconnection is ours, not lapin's auto-recover (which, under load, took minutes to come
//! back after an outage): every operation takes the current link (connection, publishing
//! channel, consuming channels); a link found closed is replaced by a new connection on the
//! spot, at most one attempt per `RECONNECT_GAP`. Deliveries leased on the old link cannot
//! be settled any more (their channel is gone; RabbitMQ has requeued them): `LeaseLost`.
//!
//! The attempt number is `x-attempts` (deliveries before the copy was republished) +
//! `x-delivery-count` (redeliveries of this copy) + 1.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use confab_core::domain::{Timestamp, now};
use confab_core::ports::broker::{
    Broker, BrokerError, DeadLetter, Delivery, Envelope, QueueDepth, RetryPolicy,
};
use confab_core::ports::health::{ComponentHealth, HealthCheck, HealthStatus};
use confab_core::settings::SecretUrl;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions,
    BasicQosOptions, BasicRejectOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::task::AbortHandle;

use crate::lock;

/// How often the lease reaper looks for leases that ran out.
const POLL: Duration = Duration::from_millis(50);
/// After a receive's consumer is cancelled, how long a message RabbitMQ pushed before the
/// cancel took effect may take to arrive.
const BATCH_GAP: Duration = Duration::from_millis(2);
/// After a failed attempt to connect, how long operations fail at once before the next one.
const RECONNECT_GAP: Duration = Duration::from_millis(250);
/// How long one attempt to connect (TCP, AMQP handshake, the publishing channel) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

fn unavailable(error: lapin::Error) -> BrokerError {
    BrokerError::Unavailable(Box::new(error))
}

/// A delivery this broker holds. Settling goes through lapin's `Acker`, which refuses to act
/// once its channel has closed: after a recovery the channel numbers deliveries from 1 again,
/// and a raw tag could otherwise ack a different message.
struct Lease {
    queue: String,
    until: Instant,
    acker: lapin::Acker,
}

/// Deliveries this broker holds, by receipt (unique, never reused).
type Leases = Arc<Mutex<HashMap<String, Lease>>>;

pub struct RabbitBroker {
    url: SecretUrl,
    /// The current link; replaced when found closed.
    link: Mutex<Arc<Link>>,
    /// Held while connecting (one attempt at a time); when the last attempt failed.
    reconnecting: tokio::sync::Mutex<Option<Instant>>,
    retry: RetryPolicy,
    visibility_timeout: Duration,
    /// Test deployments let unused queues expire; production never sets it.
    queue_expiry: Option<Duration>,
    leases: Leases,
    reaper: AbortHandle,
}

/// One connection to RabbitMQ and its channels.
struct Link {
    connection: Connection,
    /// Publishes (with confirms).
    publisher: Channel,
    /// One channel per queue that receives, acks and rejects (unacked messages belong to
    /// it), so a receive waiting on one queue never holds up another's.
    consumers: tokio::sync::Mutex<HashMap<String, Arc<QueueConsumer>>>,
    /// Queues declared on this connection (declared again on a new one: with an expiry they
    /// may have gone meanwhile).
    declared: Mutex<HashSet<String>>,
}

impl Link {
    async fn open(url: &SecretUrl) -> Result<Self, BrokerError> {
        let connect = async {
            let connection =
                Connection::connect(url.expose().as_str(), ConnectionProperties::default()).await?;
            let publisher = connection.create_channel().await?;
            publisher
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            Ok::<_, lapin::Error>((connection, publisher))
        };
        let (connection, publisher) = tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| BrokerError::Unavailable("connecting to RabbitMQ timed out".into()))?
            .map_err(unavailable)?;
        Ok(Self {
            connection,
            publisher,
            consumers: tokio::sync::Mutex::default(),
            declared: Mutex::default(),
        })
    }

    fn usable(&self) -> bool {
        self.connection.status().connected() && self.publisher.status().connected()
    }

    /// The consuming channel of `queue`, opened on first use and again after it closed.
    async fn consumer(&self, queue: &str) -> Result<Arc<QueueConsumer>, BrokerError> {
        let mut consumers = self.consumers.lock().await;
        if let Some(consumer) = consumers.get(queue)
            && consumer.channel.status().connected()
        {
            return Ok(consumer.clone());
        }
        let channel = self
            .connection
            .create_channel()
            .await
            .map_err(unavailable)?;
        let consumer = Arc::new(QueueConsumer {
            channel,
            turn: tokio::sync::Mutex::new(()),
        });
        consumers.insert(queue.to_owned(), consumer.clone());
        Ok(consumer)
    }
}

/// A queue's consuming channel, and one receive at a time on it (the prefetch is set per
/// consumer on the channel).
struct QueueConsumer {
    channel: Channel,
    turn: tokio::sync::Mutex<()>,
}

impl Drop for RabbitBroker {
    fn drop(&mut self) {
        self.reaper.abort();
    }
}

fn header_int(table: Option<&FieldTable>, key: &str) -> i64 {
    match table.and_then(|t| t.inner().get(key)) {
        Some(AMQPValue::LongLongInt(v)) => *v,
        Some(AMQPValue::LongInt(v)) => i64::from(*v),
        Some(AMQPValue::LongUInt(v)) => i64::from(*v),
        Some(AMQPValue::ShortInt(v)) => i64::from(*v),
        Some(AMQPValue::ShortUInt(v)) => i64::from(*v),
        Some(AMQPValue::ShortShortInt(v)) => i64::from(*v),
        Some(AMQPValue::ShortShortUInt(v)) => i64::from(*v),
        _ => 0,
    }
}

fn header_text(table: Option<&FieldTable>, key: &str) -> Option<String> {
    match table.and_then(|t| t.inner().get(key)) {
        Some(AMQPValue::LongString(s)) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        Some(AMQPValue::ShortString(s)) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

impl RabbitBroker {
    pub async fn connect(
        url: &SecretUrl,
        retry: RetryPolicy,
        visibility_timeout: Duration,
        queue_expiry: Option<Duration>,
    ) -> Result<Self, BrokerError> {
        let link = Arc::new(Link::open(url).await?);
        let leases: Leases = Arc::default();
        let reaper = tokio::spawn(reap(leases.clone())).abort_handle();
        Ok(Self {
            url: url.clone(),
            link: Mutex::new(link),
            reconnecting: tokio::sync::Mutex::default(),
            retry,
            visibility_timeout,
            queue_expiry,
            leases,
            reaper,
        })
    }

    /// The current link if it is usable, else a new one (one attempt per `RECONNECT_GAP`;
    /// within it, `Unavailable` at once).
    async fn link(&self) -> Result<Arc<Link>, BrokerError> {
        let current = lock(&self.link).clone();
        if current.usable() {
            return Ok(current);
        }
        let mut last_failure = self.reconnecting.lock().await;
        let current = lock(&self.link).clone();
        if current.usable() {
            return Ok(current); // Someone else reconnected while we waited.
        }
        if last_failure.is_some_and(|at| at.elapsed() < RECONNECT_GAP) {
            return Err(BrokerError::Unavailable(
                "RabbitMQ is unreachable (reconnecting)".into(),
            ));
        }
        match Link::open(&self.url).await {
            Ok(link) => {
                let link = Arc::new(link);
                *lock(&self.link) = link.clone();
                *last_failure = None;
                tracing::info!("Reconnected to RabbitMQ.");
                Ok(link)
            }
            Err(error) => {
                if last_failure.is_none() {
                    tracing::warn!(%error, "RabbitMQ is unreachable; reconnecting.");
                }
                *last_failure = Some(Instant::now());
                Err(error)
            }
        }
    }

    fn args(&self, quorum: bool) -> FieldTable {
        let mut args = FieldTable::default();
        if quorum {
            args.insert(
                "x-queue-type".into(),
                AMQPValue::LongString("quorum".into()),
            );
        }
        if let Some(expiry) = self.queue_expiry {
            args.insert(
                "x-expires".into(),
                AMQPValue::LongLongInt(i64::try_from(expiry.as_millis()).unwrap_or(i64::MAX)),
            );
        }
        args
    }

    /// Declares `queue`, its retry queues and its dead-letter queue, once per broker.
    async fn ensure(&self, link: &Link, queue: &str) -> Result<(), BrokerError> {
        if lock(&link.declared).contains(queue) {
            return Ok(());
        }
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        link.publisher
            .queue_declare(queue.into(), durable, self.args(true))
            .await
            .map_err(unavailable)?;
        for attempt in 1..self.retry.max_attempts {
            let mut args = self.args(false);
            let ttl =
                i64::try_from(self.retry.delay_after(attempt).as_millis()).unwrap_or(i64::MAX);
            args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl));
            args.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString("".into()),
            );
            args.insert(
                "x-dead-letter-routing-key".into(),
                AMQPValue::LongString(queue.into()),
            );
            link.publisher
                .queue_declare(format!("{queue}.retry.{attempt}").into(), durable, args)
                .await
                .map_err(unavailable)?;
        }
        link.publisher
            .queue_declare(format!("{queue}.dlq").into(), durable, self.args(false))
            .await
            .map_err(unavailable)?;
        lock(&link.declared).insert(queue.to_owned());
        Ok(())
    }

    /// Publishes `envelope` to `routing_key` with `headers`, persistent; the returned future
    /// resolves with the broker's confirm.
    async fn start_send(
        link: &Link,
        routing_key: &str,
        envelope: &Envelope,
        headers: FieldTable,
    ) -> Result<lapin::PublisherConfirm, BrokerError> {
        let body = serde_json::to_vec(envelope).map_err(|e| BrokerError::Other(Box::new(e)))?;
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_message_id(envelope.id.to_string().into())
            .with_headers(headers);
        link.publisher
            .basic_publish(
                "".into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                &body,
                properties,
            )
            .await
            .map_err(unavailable)
    }

    /// Publishes and waits for the broker's confirm.
    async fn send(
        link: &Link,
        routing_key: &str,
        envelope: &Envelope,
        headers: FieldTable,
    ) -> Result<(), BrokerError> {
        let confirm = Self::start_send(link, routing_key, envelope, headers).await?;
        Self::confirmed(&confirm.await.map_err(unavailable)?)
    }

    fn confirmed(confirm: &lapin::Confirmation) -> Result<(), BrokerError> {
        if confirm.is_ack() {
            Ok(())
        } else {
            Err(BrokerError::Unavailable(
                "the broker refused the message (nack)".into(),
            ))
        }
    }

    /// The envelope of a received message, with its attempt number.
    fn decode(message: &lapin::message::Delivery) -> Result<Envelope, BrokerError> {
        let mut envelope: Envelope =
            serde_json::from_slice(&message.data).map_err(|e| BrokerError::Other(Box::new(e)))?;
        let headers = message.properties.headers().as_ref();
        let before = header_int(headers, "x-attempts");
        let redelivered = header_int(headers, "x-delivery-count");
        envelope.attempt = u32::try_from(before + redelivered + 1).unwrap_or(u32::MAX);
        Ok(envelope)
    }

    /// Moves a message that is not an envelope to `queue.dlq` as it came, then settles it.
    async fn dead_letter_raw(
        &self,
        link: &Link,
        queue: &str,
        receipt: &str,
        message: &lapin::message::Delivery,
        error: &str,
    ) {
        tracing::warn!(queue, %error, "A message that is not a confab envelope goes to the dead letters.");
        let Some(lease) = lock(&self.leases).remove(receipt) else {
            return;
        };
        let mut headers = FieldTable::default();
        headers.insert(
            "x-last-error".into(),
            AMQPValue::LongString(LongString::from(error)),
        );
        headers.insert(
            "x-failed-at".into(),
            AMQPValue::LongString(now().to_rfc3339().as_str().into()),
        );
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_headers(headers);
        let copied = async {
            link.publisher
                .basic_publish(
                    "".into(),
                    format!("{queue}.dlq").into(),
                    BasicPublishOptions::default(),
                    &message.data,
                    properties,
                )
                .await?
                .await
        }
        .await;
        let _ = if copied.is_ok_and(|c| c.is_ack()) {
            lease.acker.ack(BasicAckOptions::default()).await
        } else {
            lease
                .acker
                .reject(BasicRejectOptions { requeue: true })
                .await
        };
    }

    fn take_lease(&self, delivery: &Delivery) -> Result<Lease, BrokerError> {
        lock(&self.leases)
            .remove(&delivery.receipt)
            .ok_or(BrokerError::LeaseLost)
    }
}

/// Returns deliveries whose lease ran out to their queue (a redelivery).
async fn reap(leases: Leases) {
    loop {
        tokio::time::sleep(POLL).await;
        let expired: Vec<Lease> = {
            let mut leases = lock(&leases);
            let now = Instant::now();
            let receipts: Vec<String> = leases
                .iter()
                .filter(|(_, lease)| lease.until <= now)
                .map(|(receipt, _)| receipt.clone())
                .collect();
            receipts.iter().filter_map(|r| leases.remove(r)).collect()
        };
        for lease in expired {
            let _ = lease
                .acker
                .reject(BasicRejectOptions { requeue: true })
                .await;
        }
    }
}

#[async_trait]
impl HealthCheck for RabbitBroker {
    async fn health(&self) -> ComponentHealth {
        match self.link().await {
            Ok(_) => ComponentHealth::new(HealthStatus::Ok, "rabbitmq"),
            Err(error) => {
                ComponentHealth::new(HealthStatus::Down, "rabbitmq").with_error(error.to_string())
            }
        }
    }
}

#[async_trait]
impl Broker for RabbitBroker {
    async fn publish(&self, queue: &str, envelope: &Envelope) -> Result<(), BrokerError> {
        self.publish_all(queue, std::slice::from_ref(envelope))
            .await
    }

    async fn publish_all(&self, queue: &str, envelopes: &[Envelope]) -> Result<(), BrokerError> {
        let link = self.link().await?;
        self.ensure(&link, queue).await?;
        // All frames first, then all confirms: one round trip for the batch, not one each.
        let mut confirms = Vec::with_capacity(envelopes.len());
        for envelope in envelopes {
            let mut headers = FieldTable::default();
            headers.insert("x-attempts".into(), AMQPValue::LongLongInt(0));
            confirms.push(Self::start_send(&link, queue, envelope, headers).await?);
        }
        for confirm in confirms {
            Self::confirmed(&confirm.await.map_err(unavailable)?)?;
        }
        Ok(())
    }

    async fn receive(
        &self,
        queue: &str,
        max: u32,
        wait: Duration,
    ) -> Result<Vec<Delivery>, BrokerError> {
        let link = self.link().await?;
        self.ensure(&link, queue).await?;
        let max = max.clamp(1, u32::from(u16::MAX));
        let consumer = link.consumer(queue).await?;
        let _turn = consumer.turn.lock().await;
        let prefetch = u16::try_from(max).unwrap_or(u16::MAX);
        consumer
            .channel
            .basic_qos(prefetch, BasicQosOptions { global: false })
            .await
            .map_err(unavailable)?;
        let tag = format!("confab-{}", uuid::Uuid::now_v7());
        let mut stream = consumer
            .channel
            .basic_consume(
                queue.into(),
                tag.clone().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(unavailable)?;
        // RabbitMQ pushes a message the moment one is ready: wait for the first, then take
        // what has already arrived with it (no waiting for more: a consumer that wants
        // batches lingers between receives, and a lone message goes on at once).
        let mut raw = Vec::new();
        if let Ok(Some(first)) = tokio::time::timeout(wait, stream.next()).await {
            raw.push(first.map_err(unavailable)?);
            while raw.len() < max as usize {
                match futures_util::FutureExt::now_or_never(stream.next()) {
                    Some(Some(next)) => raw.push(next.map_err(unavailable)?),
                    _ => break,
                }
            }
        }
        // Cancelled after every receive, so a message whose lease runs out goes to whichever
        // consumer is waiting then, not back to this one.
        consumer
            .channel
            .basic_cancel(tag.into(), BasicCancelOptions::default())
            .await
            .map_err(unavailable)?;
        // What was pushed before the cancel took effect is this receive's too (the prefetch
        // bounds the total to `max`).
        while let Ok(Some(late)) = tokio::time::timeout(BATCH_GAP * 10, stream.next()).await {
            raw.push(late.map_err(unavailable)?);
        }
        let deadline = Instant::now()
            .checked_add(self.visibility_timeout)
            .unwrap_or_else(|| Instant::now() + Duration::from_hours(24));
        let mut got = Vec::with_capacity(raw.len());
        for message in raw {
            // Leased before anything can fail, so no message is ever held and forgotten.
            let receipt = uuid::Uuid::now_v7().to_string();
            let lease = Lease {
                queue: queue.to_owned(),
                until: deadline,
                acker: message.acker.clone(),
            };
            lock(&self.leases).insert(receipt.clone(), lease);
            match Self::decode(&message) {
                Ok(envelope) => got.push(Delivery {
                    queue: queue.to_owned(),
                    envelope,
                    receipt,
                }),
                // Not one of ours (the queue names are shared with older systems): straight to
                // the dead letters, as it came, rather than retried forever.
                Err(error) => {
                    self.dead_letter_raw(&link, queue, &receipt, &message, &error.to_string())
                        .await;
                }
            }
        }
        Ok(got)
    }

    async fn ack(&self, delivery: &Delivery) -> Result<(), BrokerError> {
        let lease = self.take_lease(delivery)?;
        match lease.acker.ack(BasicAckOptions::default()).await {
            Ok(true) => Ok(()),
            // The channel closed (and RabbitMQ requeued the message) or it was settled.
            Ok(false) | Err(_) => Err(BrokerError::LeaseLost),
        }
    }

    async fn nack(&self, delivery: &Delivery, error: &str) -> Result<(), BrokerError> {
        let lease = self.take_lease(delivery)?;
        let attempt = delivery.envelope.attempt;
        let mut headers = FieldTable::default();
        headers.insert(
            "x-attempts".into(),
            AMQPValue::LongLongInt(i64::from(attempt)),
        );
        headers.insert(
            "x-last-error".into(),
            AMQPValue::LongString(LongString::from(error)),
        );
        let target = if attempt >= self.retry.max_attempts {
            headers.insert(
                "x-failed-at".into(),
                AMQPValue::LongString(now().to_rfc3339().as_str().into()),
            );
            format!("{}.dlq", delivery.queue)
        } else {
            format!("{}.retry.{attempt}", delivery.queue)
        };
        // The copy is confirmed before the original is settled: a crash in between
        // duplicates (at-least-once), it never loses. If the copy cannot be made, the original
        // goes back to its queue instead.
        let sent = match self.link().await {
            Ok(link) => Self::send(&link, &target, &delivery.envelope, headers).await,
            Err(e) => Err(e),
        };
        if let Err(e) = sent {
            let _ = lease
                .acker
                .reject(BasicRejectOptions { requeue: true })
                .await;
            return Err(e);
        }
        match lease.acker.ack(BasicAckOptions::default()).await {
            Ok(true) => Ok(()),
            Ok(false) | Err(_) => Err(BrokerError::LeaseLost),
        }
    }

    async fn depth(&self, queue: &str) -> Result<QueueDepth, BrokerError> {
        let link = self.link().await?;
        self.ensure(&link, queue).await?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let publisher = &link.publisher;
        let count = |name: String| async move {
            publisher
                .queue_declare(ShortString::from(name), passive, FieldTable::default())
                .await
                .map(|q| u64::from(q.message_count()))
                .map_err(unavailable)
        };
        let mut pending = count(queue.to_owned()).await?;
        for attempt in 1..self.retry.max_attempts {
            pending += count(format!("{queue}.retry.{attempt}")).await?;
        }
        let held = lock(&self.leases)
            .values()
            .filter(|lease| lease.queue == queue)
            .count() as u64;
        Ok(QueueDepth {
            pending: pending + held,
            dead: count(format!("{queue}.dlq")).await?,
        })
    }

    async fn dead_letters(&self, queue: &str, limit: u32) -> Result<Vec<DeadLetter>, BrokerError> {
        let link = self.link().await?;
        self.ensure(&link, queue).await?;
        // Reading is taking without acking on a channel of its own; closing it puts every
        // message back where it was.
        let channel = link
            .connection
            .create_channel()
            .await
            .map_err(unavailable)?;
        let mut letters = Vec::new();
        while letters.len() < limit as usize {
            let Some(message) = channel
                .basic_get(
                    format!("{queue}.dlq").into(),
                    BasicGetOptions { no_ack: false },
                )
                .await
                .map_err(unavailable)?
            else {
                break;
            };
            let headers = message.delivery.properties.headers().as_ref();
            // A message that is not an envelope (dead-lettered as it came) is not listed.
            let Ok(mut envelope) = serde_json::from_slice::<Envelope>(&message.delivery.data)
            else {
                continue;
            };
            envelope.attempt = u32::try_from(header_int(headers, "x-attempts")).unwrap_or(0);
            let failed_at = header_text(headers, "x-failed-at")
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(&t).ok())
                .map_or_else(now, Timestamp::from);
            letters.push(DeadLetter {
                envelope,
                last_error: header_text(headers, "x-last-error").unwrap_or_default(),
                failed_at,
            });
        }
        let _ = channel.close(200, "listed".into()).await;
        Ok(letters)
    }

    async fn replay_dead_letters(&self, queue: &str) -> Result<u64, BrokerError> {
        let link = self.link().await?;
        self.ensure(&link, queue).await?;
        let channel = link
            .connection
            .create_channel()
            .await
            .map_err(unavailable)?;
        let mut replayed = 0;
        while let Some(message) = channel
            .basic_get(
                format!("{queue}.dlq").into(),
                BasicGetOptions { no_ack: false },
            )
            .await
            .map_err(unavailable)?
        {
            // Not an envelope: it stays among the dead letters (released when this channel
            // closes) for someone to look at.
            let Ok(envelope) = serde_json::from_slice::<Envelope>(&message.delivery.data) else {
                continue;
            };
            let mut headers = FieldTable::default();
            headers.insert("x-attempts".into(), AMQPValue::LongLongInt(0));
            Self::send(&link, queue, &envelope, headers).await?;
            channel
                .basic_ack(message.delivery.delivery_tag, BasicAckOptions::default())
                .await
                .map_err(unavailable)?;
            replayed += 1;
        }
        let _ = channel.close(200, "replayed".into()).await;
        Ok(replayed)
    }
}
