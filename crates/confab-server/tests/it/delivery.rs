//! Messages on their way: the outbox relay and idempotent consumers (SPEC §6).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use confab_adapters::db_broker::DbBroker;
use confab_adapters::sql_store::SqlStore;
use confab_core::domain::{
    EventId, NewUser, OutboxEntry, Page, SecurityEvent, SecurityEventId, UserId, now,
};
use confab_core::ports::broker::RetryPolicy;
use confab_core::ports::broker::{
    Broker, BrokerError, DeadLetter, Delivery, Envelope, QueueDepth, queues,
};
use confab_core::ports::health::{ComponentHealth, HealthCheck};
use confab_core::ports::store::Store;
use confab_core::ports::store::{StoreError, StoreTx};
use confab_core::services::delivery::{Handled, Work, handle_once, relay_outbox};
use confab_core::testing::eventually;
use confab_server::config::{DatabaseConfig, PoolConfig, Synchronous};
use confab_server::startup::Overrides;

use crate::helpers::{spawn_app, spawn_app_with};

fn entry(queue: &str, kind: &str) -> OutboxEntry {
    OutboxEntry {
        id: EventId::new(),
        queue: queue.into(),
        kind: kind.into(),
        payload: serde_json::json!({"kind": kind}),
        trace_id: Some("trace-9".into()),
        created_at: now(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_outbox_rows_reach_their_queue_and_are_marked_published() {
    let app = spawn_app().await;
    let (store, broker) = (app.state.store.clone(), app.state.broker.clone());
    // A queue no worker of the server consumes (the events worker would take it first).
    let queue = "relay-check";
    let first = entry(queue, "user.registered");
    let tx = store.begin().await.unwrap();
    tx.enqueue(&first).await.unwrap();
    tx.commit().await.unwrap();

    let got = broker
        .receive(queue, 10, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(
        got.len(),
        1,
        "the relay running with the server published it"
    );
    assert_eq!(got[0].envelope.id, first.id);
    assert_eq!(got[0].envelope.kind, "user.registered");
    assert_eq!(got[0].envelope.trace_id.as_deref(), Some("trace-9"));
    broker.ack(&got[0]).await.unwrap();
    eventually(
        "the row is marked published",
        Duration::from_secs(5),
        || async { store.pending_outbox(10).await.unwrap().is_empty() },
    )
    .await;

    let metrics = app.get("/metrics").await.text().await.unwrap();
    for series in [
        r#"queue_published_total{queue="relay-check"}"#,
        r#"queue_consumed_total{queue="relay-check",outcome="ack"}"#,
        r#"queue_depth{queue="mail",state="pending"}"#,
        r#"queue_depth{queue="mail",state="dead"}"#,
    ] {
        assert!(metrics.contains(series), "{series} missing:\n{metrics}");
    }
}

/// A broker that refuses to publish while `down` is set.
struct Flaky {
    inner: Arc<dyn Broker>,
    down: AtomicBool,
}

#[async_trait]
impl HealthCheck for Flaky {
    async fn health(&self) -> ComponentHealth {
        self.inner.health().await
    }
}

#[async_trait]
impl Broker for Flaky {
    async fn publish(&self, queue: &str, envelope: &Envelope) -> Result<(), BrokerError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(BrokerError::Unavailable("the broker is down".into()));
        }
        self.inner.publish(queue, envelope).await
    }
    async fn publish_all(&self, queue: &str, envelopes: &[Envelope]) -> Result<(), BrokerError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(BrokerError::Unavailable("the broker is down".into()));
        }
        self.inner.publish_all(queue, envelopes).await
    }
    async fn receive(
        &self,
        queue: &str,
        max: u32,
        wait: Duration,
    ) -> Result<Vec<Delivery>, BrokerError> {
        self.inner.receive(queue, max, wait).await
    }
    async fn ack(&self, d: &Delivery) -> Result<(), BrokerError> {
        self.inner.ack(d).await
    }
    async fn nack(&self, d: &Delivery, error: &str) -> Result<(), BrokerError> {
        self.inner.nack(d, error).await
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_delays_outbox_messages_and_loses_none() {
    // A store and queue of the test's own: no server relay runs beside this one.
    let dir = tempfile::tempdir().unwrap();
    let config = DatabaseConfig::Sqlite {
        path: Some(dir.path().join("outage.db")),
        synchronous: Synchronous::Normal,
        commit_linger_us: 0,
        pool: PoolConfig::default(),
    };
    let sql = SqlStore::connect(&config, dir.path()).await.unwrap();
    sql.migrate().await.unwrap();
    let inner: Arc<dyn Broker> = Arc::new(DbBroker::new(
        sql.connection(),
        RetryPolicy::default(),
        Duration::from_secs(30),
    ));
    let store: Arc<dyn Store> = Arc::new(sql);
    let flaky = Flaky {
        inner,
        down: AtomicBool::new(true),
    };
    let queue = queues::EVENTS;
    let sent: Vec<OutboxEntry> = (0..3).map(|n| entry(queue, &format!("e{n}"))).collect();
    for e in &sent {
        store.enqueue(e).await.unwrap();
    }
    for _ in 0..3 {
        assert!(
            relay_outbox(&*store, &flaky, 100).await.is_err(),
            "the outage is reported"
        );
    }
    assert_eq!(
        store.pending_outbox(100).await.unwrap(),
        sent,
        "every row waits, in order"
    );
    assert_eq!(flaky.depth(queue).await.unwrap().pending, 0);

    flaky.down.store(false, Ordering::SeqCst);
    assert_eq!(relay_outbox(&*store, &flaky, 100).await.unwrap(), 3);
    assert!(store.pending_outbox(100).await.unwrap().is_empty());
    let mut got = Vec::new();
    while got.len() < 3 {
        for d in flaky
            .receive(queue, 10, Duration::from_secs(5))
            .await
            .unwrap()
        {
            flaky.ack(&d).await.unwrap();
            got.push(d.envelope.id);
        }
    }
    assert_eq!(
        got,
        sent.iter().map(|e| e.id).collect::<Vec<_>>(),
        "all of them, in order"
    );
}

/// The consumer's effect: a security event for `user`, written in the consumer's transaction
/// (or a failure instead, when `fail` is set).
fn effect(user: UserId, fail: bool) -> Work<'static> {
    Box::new(move |tx: &dyn StoreTx| {
        Box::pin(async move {
            tx.record_security_event(&SecurityEvent {
                id: SecurityEventId::new(),
                user_id: Some(user),
                kind: "effect".into(),
                ip: None,
                user_agent: None,
                details: serde_json::json!({}),
                created_at: now(),
            })
            .await?;
            if fail {
                return Err(StoreError::Other("the work failed after writing".into()));
            }
            Ok(())
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_whose_consumer_died_is_redelivered_and_takes_effect_once() {
    let app = spawn_app_with(
        |c| {
            c.queue = confab_server::config::QueueConfig::Database {
                max_attempts: 5,
                retry_base_ms: 50,
                visibility_timeout_secs: 1,
            };
        },
        Overrides::default(),
    )
    .await;
    let (store, broker) = (app.state.store.clone(), app.state.broker.clone());
    let user = store
        .create_user(NewUser {
            email: "effect@example.com".into(),
            name: "E".into(),
            password_hash: None,
        })
        .await
        .unwrap()
        .id;
    let effects = || async {
        store
            .security_events(user, Page::newest(50))
            .await
            .unwrap()
            .len()
    };
    let queue = "effect-test";
    let envelope = Envelope {
        id: EventId::new(),
        kind: "x".into(),
        attempt: 0,
        created_at: now(),
        trace_id: None,
        payload: serde_json::json!({}),
    };
    broker.publish(queue, &envelope).await.unwrap();
    let first = broker
        .receive(queue, 1, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(first.len(), 1);
    // The consumer dies here, between receive and ack: nothing committed, nothing acked.
    drop(first);

    let again = broker
        .receive(queue, 1, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(
        again[0].envelope.id, envelope.id,
        "redelivered after the visibility timeout"
    );
    assert_eq!(again[0].envelope.attempt, 2);
    // This attempt's work fails after writing: rolled back, and the delivery is retried.
    let failed = handle_once(&*store, &*broker, "audit", &again[0], effect(user, true)).await;
    assert!(failed.is_err());
    assert_eq!(effects().await, 0, "a failed attempt leaves no trace");

    let retried = broker
        .receive(queue, 1, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(retried[0].envelope.attempt, 3);
    let outcome = handle_once(&*store, &*broker, "audit", &retried[0], effect(user, false))
        .await
        .unwrap();
    assert_eq!(outcome, Handled::Done);
    assert_eq!(effects().await, 1);

    // The same envelope once more (a relay republishing after a crash): no second effect.
    broker.publish(queue, &envelope).await.unwrap();
    let duplicate = broker
        .receive(queue, 1, Duration::from_secs(5))
        .await
        .unwrap();
    let outcome = handle_once(
        &*store,
        &*broker,
        "audit",
        &duplicate[0],
        effect(user, false),
    )
    .await
    .unwrap();
    assert_eq!(outcome, Handled::Duplicate);
    assert_eq!(effects().await, 1, "the effect happened once");
    assert_eq!(
        broker.depth(queue).await.unwrap().pending,
        0,
        "every delivery was settled"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_runs_its_queues_on_rabbitmq() {
    let Some(amqp) = confab_core::testing::service_url("TEST_AMQP_URL", "RabbitMQ end to end")
    else {
        return;
    };
    let url = confab_server::config::SecretUrl::parse(&amqp).unwrap();
    let app = spawn_app_with(
        |c| {
            c.queue = confab_server::config::QueueConfig::Rabbitmq {
                url,
                max_attempts: 2,
                retry_base_ms: 100,
                visibility_timeout_secs: 5,
                queue_prefix: String::new(),
                idle_queue_expiry_secs: None,
            };
        },
        Overrides::default(),
    )
    .await;
    let health: serde_json::Value = app.get("/health").await.json().await.unwrap();
    assert_eq!(
        health["components"]["queue"]["kind"], "rabbitmq",
        "{health}"
    );
    assert_eq!(health["components"]["queue"]["status"], "ok", "{health}");

    let queue = confab_core::testing::unique("e2e-");
    let sent = entry(&queue, "message.created");
    app.state.store.enqueue(&sent).await.unwrap();
    let got = app
        .state
        .broker
        .receive(&queue, 1, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(got.len(), 1, "the relay published through RabbitMQ");
    assert_eq!(got[0].envelope.id, sent.id);
    app.state.broker.ack(&got[0]).await.unwrap();

    delete_rabbit_queues(&amqp, &queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rabbitmq_outage_delays_messages_and_loses_none() {
    let Some(amqp) = confab_core::testing::service_url("TEST_AMQP_URL", "RabbitMQ outage") else {
        return;
    };
    // confab reaches RabbitMQ through a proxy the test cuts: an outage as confab sees it,
    // without stopping the RabbitMQ other tests share.
    let mut url = url::Url::parse(&amqp).unwrap();
    let target: std::net::SocketAddr =
        format!("{}:{}", url.host_str().unwrap(), url.port().unwrap_or(5672))
            .parse()
            .unwrap();
    let proxy = crate::helpers::Proxy::start(target).await;
    url.set_port(Some(proxy.address.port())).unwrap();
    let app = spawn_app_with(
        |c| {
            c.queue = confab_server::config::QueueConfig::Rabbitmq {
                url: confab_server::config::SecretUrl::parse(url.as_str()).unwrap(),
                max_attempts: 2,
                retry_base_ms: 100,
                visibility_timeout_secs: 5,
                queue_prefix: String::new(),
                idle_queue_expiry_secs: None,
            };
        },
        Overrides::default(),
    )
    .await;
    let (store, broker) = (app.state.store.clone(), app.state.broker.clone());
    let queue = confab_core::testing::unique("outage-");
    store.enqueue(&entry(&queue, "before")).await.unwrap();
    let got = broker
        .receive(&queue, 1, Duration::from_secs(10))
        .await
        .unwrap();
    broker.ack(&got[0]).await.unwrap();

    proxy.cut();
    // Requests keep succeeding: what they publish waits in the outbox.
    let during: Vec<OutboxEntry> = (0..3)
        .map(|n| entry(&queue, &format!("during-{n}")))
        .collect();
    for e in &during {
        let tx = store.begin().await.unwrap();
        tx.enqueue(e).await.unwrap();
        tx.commit().await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(1)).await; // Let the relay try and fail.
    let waiting = store.pending_outbox(100).await.unwrap();
    assert_eq!(
        waiting.iter().filter(|e| e.queue == queue).count(),
        3,
        "held while RabbitMQ is away"
    );
    assert_eq!(
        app.get("/ready").await.status(),
        503,
        "the queue is a required component"
    );

    proxy.restore();
    let mut arrived = Vec::new();
    let started = std::time::Instant::now();
    // The broker reconnects on its next use (within a second here); the relay retries with
    // its own backoff, so the bound leaves room for a loaded machine.
    let recovery = Duration::from_secs(30);
    while arrived.len() < 3 {
        assert!(
            started.elapsed() < recovery,
            "only {arrived:?} arrived after the outage"
        );
        match broker.receive(&queue, 10, Duration::from_secs(1)).await {
            Ok(batch) => {
                for d in batch {
                    broker.ack(&d).await.unwrap();
                    arrived.push(d.envelope.kind.clone());
                }
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    // An AMQP ack is not confirmed: one sent just before the cut can be lost with the
    // connection, and RabbitMQ then delivers "before" again (at-least-once; consumers are
    // idempotent by envelope id). What the outage must not do is lose or reorder.
    assert!(
        arrived.iter().filter(|k| *k == "before").count() <= 1,
        "{arrived:?}"
    );
    arrived.retain(|k| k != "before");
    while arrived.len() < 3 {
        assert!(started.elapsed() < recovery, "{arrived:?}");
        for d in broker
            .receive(&queue, 10, Duration::from_secs(1))
            .await
            .unwrap_or_default()
        {
            broker.ack(&d).await.unwrap();
            arrived.push(d.envelope.kind.clone());
        }
    }
    assert_eq!(
        arrived,
        ["during-0", "during-1", "during-2"],
        "all of them, in order, once"
    );
    assert_eq!(app.get("/ready").await.status(), 200);

    delete_rabbit_queues(&amqp, &queue).await;
}

/// Deletes a test queue and its retry and dead-letter queues from the shared RabbitMQ.
async fn delete_rabbit_queues(amqp: &str, queue: &str) {
    let connection = lapin::Connection::connect(amqp, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    for name in [
        queue.to_owned(),
        format!("{queue}.retry.1"),
        format!("{queue}.dlq"),
    ] {
        channel
            .queue_delete(name.into(), lapin::options::QueueDeleteOptions::default())
            .await
            .unwrap();
    }
}
