//! Queue figures for BENCHMARKS.md (issue 4): the durable queue in the database.
//!
//! cargo run --release -p confab-adapters --example queue_bench -- [sqlite|postgres|rabbitmq] [messages]
//!
//! postgres uses a fresh database on TEST_DATABASE_URL; rabbitmq uses TEST_AMQP_URL (its
//! queues expire a minute after the run), with the outbox in SQLite. Loopback only.
#![allow(
    clippy::unwrap_used,
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::too_many_lines
)]

#[path = "common.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::percentile;

use confab_adapters::db_broker::DbBroker;
use confab_adapters::sql_store::{DatabaseConfig, PoolConfig, SqlStore, Synchronous};
use confab_adapters::testing::TempDatabase;
use confab_core::domain::{EventId, OutboxEntry, now};
use confab_core::ports::broker::{Broker, Envelope, RetryPolicy};
use confab_core::ports::store::Store;
use confab_core::services::delivery::relay_outbox;
use confab_core::settings::SecretUrl;

fn envelope(n: usize) -> Envelope {
    Envelope {
        id: EventId::new(),
        kind: "message.created".into(),
        attempt: 0,
        created_at: now(),
        trace_id: None,
        payload: serde_json::json!({"n": n, "chatId": "0190c0de-0000-7000-8000-000000000000"}),
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let backend = args.get(1).map_or("sqlite", String::as_str);
    let total: usize = args.get(2).and_then(|n| n.parse().ok()).unwrap_or(5000);
    let dir = tempfile::tempdir().unwrap();
    let mut temp_db = None;
    let config = if backend == "postgres" {
        let admin = std::env::var("TEST_DATABASE_URL").expect("TEST_DATABASE_URL for postgres");
        let db = TempDatabase::create(&admin).await;
        let config = DatabaseConfig::Postgres {
            url: SecretUrl::parse(&db.url).unwrap(),
            replica_url: None,
            pool: PoolConfig::default(),
        };
        temp_db = Some(db);
        config
    } else {
        DatabaseConfig::Sqlite {
            path: Some(dir.path().join("queue.db")),
            synchronous: Synchronous::Normal,
            commit_linger_us: 0,
            pool: PoolConfig::default(),
        }
    };
    let sql = SqlStore::connect(&config, dir.path()).await.unwrap();
    sql.migrate().await.unwrap();
    let broker: Arc<dyn Broker> = if backend == "rabbitmq" {
        let url = std::env::var("TEST_AMQP_URL").expect("TEST_AMQP_URL for rabbitmq");
        Arc::new(
            confab_adapters::rabbit_broker::RabbitBroker::connect(
                &SecretUrl::parse(&url).unwrap(),
                RetryPolicy::default(),
                Duration::from_secs(30),
                Some(Duration::from_mins(1)),
            )
            .await
            .unwrap(),
        )
    } else {
        Arc::new(DbBroker::new(
            sql.connection(),
            RetryPolicy::default(),
            Duration::from_secs(30),
        ))
    };
    // Queue names of this run (RabbitMQ keeps queues between runs until they expire).
    let run = EventId::new().to_string();
    let (rtt, load, lag) = (
        format!("rtt-{run}"),
        format!("load-{run}"),
        format!("lag-{run}"),
    );
    let store: Arc<dyn Store> = Arc::new(sql);
    println!("backend: {backend}");

    // Unloaded round trip: publish one, a waiting consumer receives and acks it.
    let consumer = {
        let (broker, rtt) = (broker.clone(), rtt.clone());
        tokio::spawn(async move {
            let mut seen = 0;
            while seen < 500 {
                for d in broker
                    .receive(&rtt, 32, Duration::from_secs(1))
                    .await
                    .unwrap()
                {
                    broker.ack(&d).await.unwrap();
                    seen += 1;
                }
            }
        })
    };
    let mut samples = Vec::with_capacity(500);
    for n in 0..500 {
        let started = Instant::now();
        broker.publish(&rtt, &envelope(n)).await.unwrap();
        while broker.depth(&rtt).await.unwrap().pending > 0 {
            tokio::task::yield_now().await;
        }
        samples.push(started.elapsed());
    }
    consumer.await.unwrap();
    samples.sort();
    println!(
        "| {backend} queue | publish → received and acked, one at a time | p50 {} | p99 {} |",
        ms(percentile(&samples, 0.5)),
        ms(percentile(&samples, 0.99))
    );

    // Sustained: 4 publishers and 2 competing consumers (prefetch 32) move `total` messages.
    let started = Instant::now();
    let consumers: Vec<_> = (0..2)
        .map(|_| {
            let (broker, load) = (broker.clone(), load.clone());
            tokio::spawn(async move {
                let mut n = 0;
                loop {
                    let batch = broker
                        .receive(&load, 32, Duration::from_millis(500))
                        .await
                        .unwrap();
                    if batch.is_empty() {
                        return n;
                    }
                    for d in &batch {
                        broker.ack(d).await.unwrap();
                    }
                    n += batch.len();
                }
            })
        })
        .collect();
    let publishers: Vec<_> = (0..4)
        .map(|p| {
            let (broker, load) = (broker.clone(), load.clone());
            tokio::spawn(async move {
                for n in 0..total / 4 {
                    broker
                        .publish(&load, &envelope(p * total + n))
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for p in publishers {
        p.await.unwrap();
    }
    let mut moved = 0;
    for c in consumers {
        moved += c.await.unwrap();
    }
    // The consumers stop after 500 ms without messages; that tail is not work.
    let elapsed = started.elapsed().saturating_sub(Duration::from_millis(500));
    println!(
        "| {backend} queue | 4 publishers, 2 consumers | {:.0} msg/s | {moved} messages |",
        moved as f64 / elapsed.as_secs_f64()
    );

    // Outbox relay lag under load: 2,000 requests commit an outbox row each while the relay
    // (polling every 5 ms when idle, as a deployment would) and a consumer run.
    let burst = total.min(2000);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let relay = {
        let (store, broker, stop) = (store.clone(), broker.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if relay_outbox(&*store, &*broker, 100).await.unwrap() == 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        })
    };
    let consumer = {
        let (broker, lag) = (broker.clone(), lag.clone());
        tokio::spawn(async move {
            let mut lags = Vec::with_capacity(burst);
            while lags.len() < burst {
                for d in broker
                    .receive(&lag, 32, Duration::from_secs(2))
                    .await
                    .unwrap()
                {
                    broker.ack(&d).await.unwrap();
                    lags.push((now() - d.envelope.created_at).to_std().unwrap_or_default());
                }
            }
            lags
        })
    };
    let started = Instant::now();
    for n in 0..burst {
        let tx = store.begin().await.unwrap();
        tx.enqueue(&OutboxEntry {
            id: EventId::new(),
            queue: lag.clone(),
            kind: "e".into(),
            payload: serde_json::json!({"n": n}),
            trace_id: None,
            created_at: now(),
        })
        .await
        .unwrap();
        tx.commit().await.unwrap();
    }
    let rate = burst as f64 / started.elapsed().as_secs_f64();
    let mut lags = consumer.await.unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    relay.await.unwrap();
    lags.sort();
    println!(
        "| {backend} queue | outbox lag while {burst} rows commit at {rate:.0}/s (commit → consumed) | p50 {} | p99 {} |",
        ms(percentile(&lags, 0.5)),
        ms(percentile(&lags, 0.99))
    );
    drop((store, broker));
    if let Some(db) = temp_db {
        db.drop().await;
    }
}
