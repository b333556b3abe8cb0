//! The `Broker` conformance suite: the contract in `ports::broker`, case by case.
//!
//! Every broker `make()` returns talks to the same backend (one database, one vhost), as
//! separate processes would; queue names are unique per case.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use super::unique;
use crate::domain::{EventId, now};
use crate::ports::broker::{Broker, BrokerError, Envelope, RetryPolicy};
use crate::ports::health::HealthStatus;

/// What the brokers under test were configured with (short, so the suite runs quickly).
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub visibility_timeout: Duration,
    pub retry: RetryPolicy,
}

pub async fn run_all<F, Fut>(settings: Settings, make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    macro_rules! cases {
        ($($case:ident),* $(,)?) => {$(
            eprintln!("broker suite: {}", stringify!($case));
            $case(&settings, &make).await;
        )*};
    }
    cases!(
        a_published_message_is_received_intact_and_acked_away,
        one_consumer_receives_in_publish_order,
        a_batch_is_published_whole_and_in_order,
        a_batch_of_deliveries_is_acked_at_once,
        competing_consumers_share_the_queue_without_duplicates,
        a_message_held_by_a_dead_consumer_comes_back,
        an_ack_after_the_lease_passed_is_refused,
        nacks_retry_with_backoff_then_dead_letter_and_replay,
        published_messages_outlive_the_publisher,
        queues_are_separate_and_depth_counts_them,
        health_is_ok_with_a_kind,
    );
}

/// A test envelope of `kind`, numbered `n` in its payload and trace id.
pub fn envelope(kind: &str, n: u32) -> Envelope {
    Envelope {
        id: EventId::new(),
        kind: kind.into(),
        attempt: 0,
        created_at: now(),
        trace_id: Some(format!("trace-{n}")),
        payload: json!({"n": n, "text": "payload"}),
    }
}

const WAIT: Duration = Duration::from_secs(5);

async fn a_published_message_is_received_intact_and_acked_away<F, Fut>(_: &Settings, make: &F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    let broker = make().await;
    let queue = unique("q-");
    let sent = envelope("user.registered", 1);
    broker.publish(&queue, &sent).await.unwrap();
    let got = broker.receive(&queue, 10, WAIT).await.unwrap();
    assert_eq!(got.len(), 1);
    let delivery = &got[0];
    assert_eq!(delivery.queue, queue);
    assert_eq!(
        delivery.envelope.attempt, 1,
        "the first delivery is attempt 1"
    );
    assert_eq!(
        Envelope {
            attempt: 0,
            ..delivery.envelope.clone()
        },
        sent
    );
    broker.ack(delivery).await.unwrap();
    assert!(
        broker
            .receive(&queue, 10, Duration::from_millis(100))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(broker.depth(&queue).await.unwrap().pending, 0);
}

async fn one_consumer_receives_in_publish_order<F, Fut>(_: &Settings, make: &F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    let broker = make().await;
    let queue = unique("q-");
    let sent: Vec<Envelope> = (0..10).map(|n| envelope("e", n)).collect();
    for e in &sent {
        broker.publish(&queue, e).await.unwrap();
    }
    let mut got = Vec::new();
    while got.len() < sent.len() {
        for d in broker.receive(&queue, 4, WAIT).await.unwrap() {
            broker.ack(&d).await.unwrap();
            got.push(d.envelope.id);
        }
    }
    assert_eq!(got, sent.iter().map(|e| e.id).collect::<Vec<_>>());
}

async fn a_batch_is_published_whole_and_in_order<F, Fut>(_: &Settings, make: &F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    let broker = make().await;
    let queue = unique("q-");
    broker.publish_all(&queue, &[]).await.unwrap();
    let batch: Vec<Envelope> = (0..25).map(|n| envelope("e", n)).collect();
    broker.publish_all(&queue, &batch).await.unwrap();
    assert_eq!(broker.depth(&queue).await.unwrap().pending, 25);
    let mut got = Vec::new();
    while got.len() < batch.len() {
        for d in broker.receive(&queue, 10, WAIT).await.unwrap() {
            broker.ack(&d).await.unwrap();
            got.push(d.envelope.id);
        }
    }
    assert_eq!(got, batch.iter().map(|e| e.id).collect::<Vec<_>>());
}

async fn a_batch_of_deliveries_is_acked_at_once<F, Fut>(settings: &Settings, make: &F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    let broker = make().await;
    let queue = unique("q-");
    let batch: Vec<Envelope> = (0..12).map(|n| envelope("e", n)).collect();
    broker.publish_all(&queue, &batch).await.unwrap();
    let mut held = Vec::new();
    while held.len() < batch.len() {
        held.extend(broker.receive(&queue, 12, WAIT).await.unwrap());
    }
    broker.ack_all(&[]).await.unwrap();
    broker.ack_all(&held).await.unwrap();
    // Settled: nothing comes back, not even after the visibility timeout.
    tokio::time::sleep(settings.visibility_timeout + Duration::from_millis(300)).await;
    assert!(
        broker
            .receive(&queue, 12, Duration::from_millis(300))
            .await
            .unwrap()
            .is_empty()
    );
    // Acking them again: their leases are gone.
    assert!(matches!(
        broker.ack_all(&held).await,
        Err(BrokerError::LeaseLost)
    ));
}

async fn competing_consumers_share_the_queue_without_duplicates<F, Fut>(_: &Settings, make: &F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    let queue = unique("q-");
    let publisher = make().await;
    let total = 30;
    for n in 0..total {
        publisher.publish(&queue, &envelope("e", n)).await.unwrap();
    }
    let consumers: Vec<_> = [make().await, make().await]
        .into_iter()
        .map(|broker| {
            let queue = queue.clone();
            tokio::spawn(async move {
                let mut mine = Vec::new();
                loop {
                    let batch = broker
                        .receive(&queue, 3, Duration::from_millis(300))
                        .await
                        .unwrap();
                    if batch.is_empty() {
                        return mine;
                    }
                    for d in batch {
                        broker.ack(&d).await.unwrap();
                        mine.push(d.envelope.id);
                    }
                }
            })
        })
        .collect();
    let mut seen = HashSet::new();
    let mut count = 0;
    for consumer in consumers {
        for id in consumer.await.unwrap() {
            count += 1;
            assert!(seen.insert(id), "delivered twice: {id}");
        }
    }
    assert_eq!(count, total as usize, "every message, once");
}

async fn a_message_held_by_a_dead_consumer_comes_back<F, Fut>(settings: &Settings, make: &F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    let queue = unique("q-");
    let sent = envelope("e", 1);
    let dying = make().await;
    dying.publish(&queue, &sent).await.unwrap();
    let held = dying.receive(&queue, 1, WAIT).await.unwrap();
    assert_eq!(held.len(), 1);
    drop(dying); // The consumer process is killed between receive and ack.

    let survivor = make().await;
    let started = Instant::now();
    let again = survivor
        .receive(&queue, 1, settings.visibility_timeout + WAIT)
        .await
        .unwrap();
    assert_eq!(again.len(), 1, "redelivered within {:?}", started.elapsed());
    assert_eq!(again[0].envelope.id, sent.id);
    assert_eq!(again[0].envelope.attempt, 2, "the second delivery");
    survivor.ack(&again[0]).await.unwrap();
}

async fn an_ack_after_the_lease_passed_is_refused<F, Fut>(settings: &Settings, make: &F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    let queue = unique("q-");
    let (slow, fast) = (make().await, make().await);
    slow.publish(&queue, &envelope("e", 1)).await.unwrap();
    let held = slow.receive(&queue, 1, WAIT).await.unwrap();
    let taken = fast
        .receive(&queue, 1, settings.visibility_timeout + WAIT)
        .await
        .unwrap();
    assert_eq!(
        taken.len(),
        1,
        "the lease ran out and another consumer took it"
    );
    assert!(matches!(
        slow.ack(&held[0]).await,
        Err(BrokerError::LeaseLost)
    ));
    fast.ack(&taken[0]).await.unwrap();
}

async fn nacks_retry_with_backoff_then_dead_letter_and_replay<F, Fut>(settings: &Settings, make: &F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    let broker = make().await;
    let queue = unique("q-");
    let sent = envelope("mail.send", 1);
    broker.publish(&queue, &sent).await.unwrap();
    let max = settings.retry.max_attempts;
    let mut previous_failure: Option<(Instant, u32)> = None;
    for attempt in 1..=max {
        let got = broker.receive(&queue, 1, WAIT).await.unwrap();
        assert_eq!(got.len(), 1, "attempt {attempt} is delivered");
        if let Some((failed, failed_attempt)) = previous_failure {
            let backoff = settings.retry.delay_after(failed_attempt);
            assert!(
                failed.elapsed() >= backoff,
                "retried after {:?}, before the backoff of {backoff:?}",
                failed.elapsed()
            );
        }
        assert_eq!(got[0].envelope.attempt, attempt);
        let error = if attempt == max {
            "smtp down (last)".to_owned()
        } else {
            format!("smtp down ({attempt})")
        };
        previous_failure = Some((Instant::now(), attempt));
        broker.nack(&got[0], &error).await.unwrap();
    }
    let after = settings.retry.delay_after(max) + Duration::from_millis(500);
    assert!(
        broker.receive(&queue, 1, after).await.unwrap().is_empty(),
        "dead letters are not retried"
    );
    let depth = broker.depth(&queue).await.unwrap();
    assert_eq!((depth.pending, depth.dead), (0, 1));
    let dead = broker.dead_letters(&queue, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].envelope.id, sent.id);
    assert_eq!(dead[0].last_error, "smtp down (last)");

    assert_eq!(broker.replay_dead_letters(&queue).await.unwrap(), 1);
    let replayed = broker.receive(&queue, 1, WAIT).await.unwrap();
    assert_eq!(replayed[0].envelope.id, sent.id);
    assert_eq!(replayed[0].envelope.attempt, 1, "a replay starts over");
    broker.ack(&replayed[0]).await.unwrap();
    assert_eq!(
        broker.depth(&queue).await.unwrap(),
        crate::ports::broker::QueueDepth::default()
    );
}

async fn published_messages_outlive_the_publisher<F, Fut>(_: &Settings, make: &F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    let queue = unique("q-");
    let sent = envelope("e", 7);
    let publisher = make().await;
    publisher.publish(&queue, &sent).await.unwrap();
    drop(publisher); // The publishing process is gone: the message is not.
    let consumer = make().await;
    let got = consumer.receive(&queue, 1, WAIT).await.unwrap();
    assert_eq!(got[0].envelope.id, sent.id);
    consumer.ack(&got[0]).await.unwrap();
}

async fn queues_are_separate_and_depth_counts_them<F, Fut>(_: &Settings, make: &F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    let broker = make().await;
    let (a, b) = (unique("qa-"), unique("qb-"));
    for n in 0..3 {
        broker.publish(&a, &envelope("e", n)).await.unwrap();
    }
    broker.publish(&b, &envelope("e", 9)).await.unwrap();
    assert_eq!(broker.depth(&a).await.unwrap().pending, 3);
    assert_eq!(broker.depth(&b).await.unwrap().pending, 1);
    let got = broker.receive(&b, 10, WAIT).await.unwrap();
    assert_eq!(got.len(), 1, "only b's message");
    broker.ack(&got[0]).await.unwrap();
    for d in broker.receive(&a, 10, WAIT).await.unwrap() {
        broker.ack(&d).await.unwrap();
    }
}

async fn health_is_ok_with_a_kind<F, Fut>(_: &Settings, make: &F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    let health = make().await.health().await;
    assert_eq!(health.status, HealthStatus::Ok, "{health:?}");
    assert!(!health.kind.is_empty());
}
