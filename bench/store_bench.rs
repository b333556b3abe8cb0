//! Store and cache figures for BENCHMARKS.md (issue 3).
//!
//! cargo run --release -p confab-adapters --example store_bench -- [sqlite|postgres] [messages]
//!
//! postgres uses a fresh database on TEST_DATABASE_URL; the rate-limit figures for Redis use
//! TEST_REDIS_URL (skipped when unset). Loopback only.
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

use confab_adapters::cache::{CacheConfig, build_backend};
use confab_adapters::db_broker::DbBroker;
use confab_adapters::sql_store::{DatabaseConfig, PoolConfig, SqlStore, Synchronous};
use confab_adapters::testing::TempDatabase;
use confab_core::domain::{
    ChatId, ChatKind, EventId, MemberRole, Message, MessageId, MessageKind, NewChat, NewUser,
    OutboxEntry, Page, UserId, now,
};
use confab_core::ports::broker::RetryPolicy;
use confab_core::ports::cache::{Cache, RateLimit};
use confab_core::ports::store::{Append, Appended, Store};
use confab_core::settings::SecretUrl;

/// CPU time (user + system) this process has used so far.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    // Fields 14 and 15 of stat(5), counted after the command name: utime, stime in ticks.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

fn micros(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

/// The `n`th text message of a run, with client id `client_id`.
fn text_message(chat: ChatId, sender: UserId, n: usize, client_id: String) -> Message {
    Message {
        id: MessageId::new(),
        chat_id: chat,
        sender_id: Some(sender),
        kind: MessageKind::Text,
        text: Some(format!("message {n} with a little text in it")),
        client_id: Some(client_id),
        image: None,
        created_at: now(),
        edited_at: None,
        deleted_at: None,
    }
}

/// A group chat of all `senders`, created by the first.
async fn group(store: &dyn Store, name: String, senders: &[UserId]) -> ChatId {
    store
        .create_chat(NewChat {
            id: ChatId::new(),
            kind: ChatKind::Group,
            name: Some(name),
            created_by: senders[0],
            members: senders.iter().map(|u| (*u, MemberRole::Member)).collect(),
        })
        .await
        .unwrap()
        .id
}

async fn post(store: &dyn Store, chat: ChatId, sender: UserId, n: usize) {
    let message = text_message(chat, sender, n, format!("c{n}"));
    let tx = store.begin().await.unwrap();
    tx.insert_message(&message).await.unwrap();
    tx.set_latest_message(chat, message.id, message.created_at)
        .await
        .unwrap();
    tx.enqueue(&OutboxEntry {
        id: EventId::new(),
        queue: "events".into(),
        kind: "message.created".into(),
        payload: serde_json::json!({"messageId": message.id, "chatId": chat}),
        trace_id: None,
        created_at: message.created_at,
    })
    .await
    .unwrap();
    tx.commit().await.unwrap();
}

async fn writers(
    store: &Arc<dyn Store>,
    chat: ChatId,
    senders: &[UserId],
    total: usize,
) -> (f64, Duration) {
    let per = total / senders.len();
    let cpu = cpu_time();
    let started = Instant::now();
    let tasks: Vec<_> = senders
        .iter()
        .map(|&sender| {
            let store = store.clone();
            tokio::spawn(async move {
                for n in 0..per {
                    post(&*store, chat, sender, n).await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let elapsed = started.elapsed();
    let done = per * senders.len();
    (
        done as f64 / elapsed.as_secs_f64(),
        cpu_time().saturating_sub(cpu) / u32::try_from(done).unwrap(),
    )
}

/// The chat send path's commit (`append_messages`, the SQLite writer thread): `total` messages
/// in batches of two, each batch's messages in two of `chats` in turn, one batch after the
/// other, as the group commit hands them over at ~2k msg/s (BENCHMARKS.md, fourteenth session:
/// ~2.2 messages per commit). CPU per message (this process, the writer thread included).
async fn group_commit(
    store: &dyn Store,
    chats: &[ChatId],
    senders: &[UserId],
    total: usize,
) -> Duration {
    let message = |n: usize| {
        let chat = chats[n % chats.len()];
        let sender = senders[n % senders.len()];
        let message = text_message(chat, sender, n, format!("g{n}"));
        let event = OutboxEntry {
            id: EventId::new(),
            queue: "events".into(),
            kind: "message.created".into(),
            payload: serde_json::json!({"messageId": message.id, "chatId": chat, "senderId": sender}),
            trace_id: None,
            created_at: now(),
        };
        Append { message, event }
    };
    let cpu = cpu_time();
    for n in (0..total).step_by(2) {
        let batch = [message(n), message(n + 1)];
        let appended = store.append_messages(&batch).await.unwrap();
        assert!(appended.iter().all(|a| matches!(a, Appended::Stored(_))));
    }
    cpu_time().saturating_sub(cpu) / u32::try_from(total).unwrap()
}

async fn rate_limit_latency(cache: &dyn Cache, n: usize) -> (Duration, Duration) {
    let rate = RateLimit::per_second(1_000_000);
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let key = format!("rate:bench:{}", i % 100);
        let started = Instant::now();
        cache.rate_limit(&key, rate).await.unwrap();
        samples.push(started.elapsed());
    }
    samples.sort();
    (percentile(&samples, 0.5), percentile(&samples, 0.99))
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let backend = args.get(1).map_or("sqlite", String::as_str);
    let total: usize = args.get(2).and_then(|n| n.parse().ok()).unwrap_or(5000);
    let dir = tempfile::tempdir().unwrap();
    let mut temp_db = None;
    let config = match backend {
        "postgres" => {
            let admin = std::env::var("TEST_DATABASE_URL").expect("TEST_DATABASE_URL for postgres");
            let db = TempDatabase::create(&admin).await;
            let config = DatabaseConfig::Postgres {
                url: SecretUrl::parse(&db.url).unwrap(),
                replica_url: None,
                pool: PoolConfig {
                    max_connections: 10,
                    ..PoolConfig::default()
                },
            };
            temp_db = Some(db);
            config
        }
        _ => DatabaseConfig::Sqlite {
            path: Some(dir.path().join("bench.db")),
            synchronous: Synchronous::Normal,
            commit_linger_us: 0,
            pool: PoolConfig::default(),
        },
    };
    let sql = Arc::new(SqlStore::connect(&config, dir.path()).await.unwrap());
    sql.migrate().await.unwrap();
    let store: Arc<dyn Store> = sql.clone();

    let mut senders = Vec::new();
    for i in 0..8 {
        let user = store
            .create_user(NewUser {
                email: format!("u{i}@bench.example"),
                name: format!("U{i}"),
                password_hash: None,
            })
            .await
            .unwrap();
        senders.push(user.id);
    }
    let chat = group(&*store, "bench".into(), &senders).await;

    println!(
        "backend: {backend}, {total} messages per run; each message = insert + latest pointer + outbox row in one transaction"
    );
    let (rate, cpu) = writers(&store, chat, &senders[..1], total).await;
    println!(
        "| {backend} | 1 writer | {rate:.0} msg/s | CPU {} per message |",
        micros(cpu)
    );
    // The single writer used client ids c0.. for sender 0; the concurrent run uses the others.
    let (rate, cpu) = writers(&store, chat, &senders[1..], total).await;
    println!(
        "| {backend} | 7 concurrent writers | {rate:.0} msg/s | CPU {} per message |",
        micros(cpu)
    );

    let mut chats = Vec::new();
    for i in 0..20 {
        chats.push(group(&*store, format!("room {i}"), &senders).await);
    }
    // As `serve` runs it: the queue in the store's database takes its outbox entries from now.
    let broker = DbBroker::new(
        sql.connection(),
        RetryPolicy::default(),
        Duration::from_secs(30),
    );
    broker.take_outbox_of(&sql);
    let cpu = group_commit(&*store, &chats, &senders, total).await;
    println!(
        "| {backend} | group commit, batches of 2 in 20 chats | CPU {} per message |",
        micros(cpu)
    );

    let mut samples = Vec::with_capacity(2000);
    let newest = store.messages(chat, Page::newest(50)).await.unwrap();
    let cursor = newest.last().unwrap().id;
    for i in 0..2000 {
        let page = if i % 2 == 0 {
            Page::newest(50)
        } else {
            Page::before(cursor, 50)
        };
        let started = Instant::now();
        let got = store.messages(chat, page).await.unwrap();
        samples.push(started.elapsed());
        assert_eq!(got.len(), 50);
    }
    samples.sort();
    println!(
        "| {backend} | page of 50 messages | p50 {} | p99 {} |",
        micros(percentile(&samples, 0.5)),
        micros(percentile(&samples, 0.99))
    );

    if backend == "sqlite" {
        let memory = build_backend(&CacheConfig::default()).unwrap();
        let (p50, p99) = rate_limit_latency(&*memory, 20_000).await;
        println!(
            "| memory | rate-limit check | p50 {} | p99 {} |",
            micros(p50),
            micros(p99)
        );
        if let Ok(url) = std::env::var("TEST_REDIS_URL") {
            let redis = build_backend(&CacheConfig::Redis {
                url: SecretUrl::parse(&url).unwrap(),
                key_prefix: "confab-bench:".into(),
            })
            .unwrap();
            let (p50, p99) = rate_limit_latency(&*redis, 20_000).await;
            println!(
                "| redis | rate-limit check | p50 {} | p99 {} |",
                micros(p50),
                micros(p99)
            );
            redis.delete_prefix("").await.unwrap();
        }
    }
    drop(store);
    if let Some(db) = temp_db {
        db.drop().await;
    }
}
