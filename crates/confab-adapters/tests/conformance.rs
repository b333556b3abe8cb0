//! Every port's conformance suite against every implementation (STYLE §7). Embedded
//! implementations always run; production ones when their `TEST_*` variable is set (and must
//! run under `CI=true`).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use confab_adapters::cache::{CacheConfig, build_backend};
use confab_adapters::db_broker::DbBroker;
use confab_adapters::sql_store::{DatabaseConfig, PoolConfig, SqlStore, Synchronous};
use confab_adapters::testing::TempDatabase;
use confab_core::ports::broker::{Broker, RetryPolicy};
use confab_core::ports::cache::Cache;
use confab_core::ports::store::Store;
use confab_core::settings::SecretUrl;
use confab_core::testing::{self, unique};
use futures_util::StreamExt;

fn redis(url: &str, prefix: &str) -> Arc<dyn Cache> {
    build_backend(&CacheConfig::Redis {
        url: SecretUrl::parse(url).unwrap(),
        key_prefix: prefix.to_owned(),
    })
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_cache_passes_the_cache_suite() {
    testing::cache::run_all(|_prefix| async { build_backend(&CacheConfig::default()).unwrap() })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cache_passes_the_cache_suite() {
    let Some(url) = testing::service_url("TEST_REDIS_URL", "Redis cache") else {
        return;
    };
    testing::cache::run_all(|prefix| {
        let url = url.clone();
        async move { redis(&url, &prefix) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_pub_sub_crosses_nodes() {
    let Some(url) = testing::service_url("TEST_REDIS_URL", "Redis cache") else {
        return;
    };
    let prefix = unique("confab-test:");
    let (node_a, node_b) = (redis(&url, &prefix), redis(&url, &prefix));
    let mut on_b = node_b.subscribe("chat:1").await.unwrap();
    node_a.publish("chat:1", b"hello from a").await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), on_b.next())
        .await
        .unwrap();
    assert_eq!(got.as_deref(), Some(&b"hello from a"[..]));

    // And the rate limit is one budget across nodes.
    let rate = confab_core::ports::cache::RateLimit::per_minute(3);
    let mut allowed = 0;
    for node in [&node_a, &node_b, &node_a, &node_b, &node_a] {
        allowed += usize::from(node.rate_limit("rate:shared", rate).await.unwrap().allowed);
    }
    assert_eq!(allowed, 3);
    node_a.delete_prefix("").await.unwrap();
}

/// A SQLite database at `path`, as the embedded default runs it; concurrent batches of
/// messages are gathered into one commit, so that is exercised too.
fn sqlite_at(path: std::path::PathBuf) -> DatabaseConfig {
    DatabaseConfig::Sqlite {
        path: Some(path),
        synchronous: Synchronous::Normal,
        commit_linger_us: 500,
        pool: PoolConfig::default(),
    }
}

async fn migrated(config: &DatabaseConfig, data_dir: &std::path::Path) -> Arc<dyn Store> {
    let store = SqlStore::connect(config, data_dir).await.unwrap();
    store.migrate().await.unwrap();
    Arc::new(store)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_store_passes_the_store_suite() {
    let dir = tempfile::tempdir().unwrap();
    testing::store::run_all(|| {
        let path = dir.path().join(format!("{}.db", unique("suite")));
        async move { migrated(&sqlite_at(path), std::path::Path::new(".")).await }
    })
    .await;
}

fn postgres_config(url: &str) -> DatabaseConfig {
    DatabaseConfig::Postgres {
        url: SecretUrl::parse(url).unwrap(),
        replica_url: None,
        pool: PoolConfig {
            max_connections: 4,
            ..PoolConfig::default()
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_passes_the_store_suite() {
    let Some(admin) = testing::service_url("TEST_DATABASE_URL", "PostgreSQL store") else {
        return;
    };
    let databases = std::sync::Mutex::new(Vec::new());
    testing::store::run_all(|| {
        let admin = admin.clone();
        let databases = &databases;
        async move {
            let db = TempDatabase::create(&admin).await;
            let store = migrated(&postgres_config(&db.url), std::path::Path::new(".")).await;
            databases.lock().unwrap().push(db);
            store
        }
    })
    .await;
    for db in databases.into_inner().unwrap() {
        db.drop().await;
    }
}

#[tokio::test]
async fn migrations_are_idempotent_and_a_newer_schema_is_refused_by_name() {
    use sea_orm::ConnectionTrait;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("schema.db");
    let config = DatabaseConfig::Sqlite {
        path: Some(path.clone()),
        synchronous: Synchronous::Full,
        // Gathering concurrent batches into one commit is exercised.
        commit_linger_us: 500,
        pool: PoolConfig::default(),
    };
    let store = SqlStore::connect(&config, dir.path()).await.unwrap();
    assert_eq!(
        store.migrate().await.unwrap(),
        confab_adapters::sql_store::known_migrations()
    );
    assert!(
        store.migrate().await.unwrap().is_empty(),
        "a second run applies nothing"
    );

    // A later confab migrated this database.
    let raw = sea_orm::Database::connect(format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    raw.execute_unprepared(
        "INSERT INTO seaql_migrations (version, applied_at) VALUES ('m9999_from_the_future', 0)",
    )
    .await
    .unwrap();
    let err = SqlStore::connect(&config, dir.path())
        .await
        .unwrap()
        .migrate()
        .await
        .unwrap_err();
    let text = format!("{err}: {}", std::error::Error::source(&err).unwrap());
    assert!(
        text.contains("m9999_from_the_future") && text.contains("newer"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_go_to_the_replica_and_writes_and_retries_to_the_primary() {
    let Some(admin) = testing::service_url("TEST_DATABASE_URL", "PostgreSQL replica") else {
        return;
    };
    // Two databases that do not replicate: what is read from where shows.
    let (primary, replica) = (
        TempDatabase::create(&admin).await,
        TempDatabase::create(&admin).await,
    );
    migrated(&postgres_config(&replica.url), std::path::Path::new(".")).await;
    let config = DatabaseConfig::Postgres {
        url: SecretUrl::parse(&primary.url).unwrap(),
        replica_url: Some(SecretUrl::parse(&replica.url).unwrap()),
        pool: PoolConfig::default(),
    };
    let store = migrated(&config, std::path::Path::new(".")).await;
    let ann = store
        .create_user(confab_core::domain::NewUser {
            email: "ann@example.com".into(),
            name: "Ann".into(),
            password_hash: None,
        })
        .await
        .unwrap();
    assert_eq!(
        store.user_by_id(ann.id).await.unwrap(),
        None,
        "plain reads use the replica"
    );
    let tx = store.begin().await.unwrap();
    assert!(
        tx.user_by_id(ann.id).await.unwrap().is_some(),
        "a transaction reads the primary"
    );
    drop(tx);
    primary.drop().await;
    replica.drop().await;
}

const BROKER_SETTINGS: testing::broker::Settings = testing::broker::Settings {
    visibility_timeout: Duration::from_millis(500),
    retry: RetryPolicy {
        max_attempts: 3,
        base_delay: Duration::from_millis(100),
    },
};

/// A store on `config` and a broker on its connection pool.
async fn store_and_broker(config: &DatabaseConfig) -> (SqlStore, DbBroker) {
    let store = SqlStore::connect(config, std::path::Path::new("."))
        .await
        .unwrap();
    let broker = DbBroker::new(
        store.connection(),
        BROKER_SETTINGS.retry,
        BROKER_SETTINGS.visibility_timeout,
    );
    (store, broker)
}

/// A broker on its own connection pool, as another process would have.
async fn db_broker(config: &DatabaseConfig) -> Arc<dyn Broker> {
    Arc::new(store_and_broker(config).await.1)
}

/// A broker sharing the store's database, linked as `broker::build` links them: on SQLite its
/// claims, acks and nacks are made by the store's writer thread.
async fn linked_db_broker(config: &DatabaseConfig) -> Arc<dyn Broker> {
    let (store, broker) = store_and_broker(config).await;
    broker.take_outbox_of(&store);
    Arc::new(broker)
}

/// A migrated SQLite database for the queue, in `dir`.
async fn sqlite_queue(dir: &std::path::Path) -> DatabaseConfig {
    let config = sqlite_at(dir.join("queue.db"));
    migrated(&config, dir).await;
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_queue_passes_the_broker_suite() {
    let dir = tempfile::tempdir().unwrap();
    let config = sqlite_queue(dir.path()).await;
    testing::broker::run_all(BROKER_SETTINGS, || db_broker(&config)).await;
}

/// The embedded default: the queue in the store's database, written by its writer thread.
/// Each broker of the suite has a store (and writer thread) of its own, so competing
/// consumers are also competing writer connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_queue_on_the_writer_thread_passes_the_broker_suite() {
    let dir = tempfile::tempdir().unwrap();
    let config = sqlite_queue(dir.path()).await;
    testing::broker::run_all(BROKER_SETTINGS, || linked_db_broker(&config)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefixed_queue_passes_the_broker_suite_and_keeps_deployments_apart() {
    use confab_adapters::prefixed_broker::PrefixedBroker;
    let dir = tempfile::tempdir().unwrap();
    let config = sqlite_queue(dir.path()).await;
    testing::broker::run_all(BROKER_SETTINGS, || async {
        Arc::new(PrefixedBroker::new(db_broker(&config).await, "staging.")) as Arc<dyn Broker>
    })
    .await;

    let shared = db_broker(&config).await;
    let (staging, production) = (
        PrefixedBroker::new(shared.clone(), "staging."),
        PrefixedBroker::new(shared.clone(), "production."),
    );
    let queue = unique("apart-");
    let envelope = confab_core::ports::broker::Envelope {
        id: confab_core::domain::EventId::new(),
        kind: "test".into(),
        attempt: 0,
        created_at: confab_core::domain::now(),
        trace_id: None,
        payload: serde_json::json!({}),
    };
    staging.publish(&queue, &envelope).await.unwrap();
    let wait = Duration::from_millis(200);
    assert!(
        production
            .receive(&queue, 10, wait)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(shared.receive(&queue, 10, wait).await.unwrap().is_empty());
    let got = staging.receive(&queue, 10, wait).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].queue, queue, "deliveries carry the logical name");
    staging.ack(&got[0]).await.unwrap();
    assert_eq!(staging.depth(&queue).await.unwrap().pending, 0);
    assert_eq!(
        shared
            .depth(&format!("staging.{queue}"))
            .await
            .unwrap()
            .pending,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_queue_passes_the_broker_suite() {
    let Some(admin) = testing::service_url("TEST_DATABASE_URL", "PostgreSQL queue") else {
        return;
    };
    let db = TempDatabase::create(&admin).await;
    let config = postgres_config(&db.url);
    migrated(&config, std::path::Path::new(".")).await;
    testing::broker::run_all(BROKER_SETTINGS, || db_broker(&config)).await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_passes_the_broker_suite() {
    let Some(url) = testing::service_url("TEST_AMQP_URL", "RabbitMQ broker") else {
        return;
    };
    let url = SecretUrl::parse(&url).unwrap();
    testing::broker::run_all(BROKER_SETTINGS, || {
        let url = url.clone();
        async move {
            let broker = confab_adapters::rabbit_broker::RabbitBroker::connect(
                &url,
                BROKER_SETTINGS.retry,
                BROKER_SETTINGS.visibility_timeout,
                // The suite's queues are unique per case: let RabbitMQ drop them when idle.
                Some(Duration::from_mins(1)),
            )
            .await
            .unwrap();
            Arc::new(broker) as Arc<dyn Broker>
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_disk_passes_the_blob_suite() {
    let dir = tempfile::tempdir().unwrap();
    let config = confab_adapters::blob::MediaConfig::Local {
        path: Some(dir.path().join("media")),
    };
    testing::blob::run_all(|| async { confab_adapters::blob::build(&config, dir.path()).unwrap() })
        .await;
}

/// A bucket of its own on the S3 peer (moto accepts unsigned requests; real S3 would not).
async fn s3_bucket(endpoint: &str) -> confab_adapters::blob::MediaConfig {
    let bucket = unique("confab-test-").to_lowercase();
    let created = reqwest::Client::new()
        .put(format!("{endpoint}/{bucket}"))
        .send()
        .await
        .unwrap();
    assert!(
        created.status().is_success(),
        "create bucket: {}",
        created.status()
    );
    confab_adapters::blob::MediaConfig::S3 {
        bucket,
        region: Some("us-east-1".into()),
        endpoint: Some(endpoint.to_owned()),
        access_key_id: Some("test".into()),
        secret_access_key: Some(confab_core::settings::Secret::new("test")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_passes_the_blob_suite_and_presigns_urls_a_browser_can_fetch() {
    let Some(endpoint) = testing::service_url("TEST_S3_ENDPOINT", "S3 blob store") else {
        return;
    };
    let config = s3_bucket(&endpoint).await;
    let dir = tempfile::tempdir().unwrap();
    testing::blob::run_all(|| async { confab_adapters::blob::build(&config, dir.path()).unwrap() })
        .await;

    let store = confab_adapters::blob::build(&config, dir.path()).unwrap();
    let key = confab_core::ports::blob::BlobKey::parse("presign/photo.jpg").unwrap();
    store.put(&key, b"jpeg bytes".to_vec()).await.unwrap();
    let url = store
        .presigned_get(&key, Duration::from_mins(5))
        .await
        .unwrap()
        .expect("S3 presigns");
    assert!(url.contains("X-Amz-Signature="), "{url}");
    let fetched = reqwest::get(&url).await.unwrap();
    assert_eq!(fetched.status(), 200);
    assert_eq!(fetched.headers()["content-type"], "image/jpeg");
    assert_eq!(fetched.bytes().await.unwrap().as_ref(), b"jpeg bytes");
}

#[tokio::test]
async fn local_disk_has_no_presigned_urls() {
    let dir = tempfile::tempdir().unwrap();
    let store =
        confab_adapters::blob::build(&confab_adapters::blob::MediaConfig::default(), dir.path())
            .unwrap();
    let key = confab_core::ports::blob::BlobKey::parse("a/b.txt").unwrap();
    assert_eq!(
        store
            .presigned_get(&key, Duration::from_mins(1))
            .await
            .unwrap(),
        None
    );
    assert!(
        dir.path().join("media").is_dir(),
        "the default root is <data_dir>/media"
    );
}

/// The complete messages in `dirs` (temporary files of a write in progress excluded).
fn messages_in(dirs: &[std::path::PathBuf]) -> Vec<String> {
    let mut found = Vec::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with('.') {
                found.push(std::fs::read_to_string(entry.path()).unwrap_or_default());
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_mailer_passes_the_mailer_suite() {
    let dir = tempfile::tempdir().unwrap();
    let mailer =
        confab_adapters::mail::build(&confab_adapters::mail::MailConfig::default(), dir.path())
            .unwrap();
    let outbox = dir.path().join("outbox");
    testing::mailer::run_all(mailer, || {
        std::future::ready(messages_in(std::slice::from_ref(&outbox)))
    })
    .await;
    let names: Vec<String> = std::fs::read_dir(&outbox)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().all(|n| std::path::Path::new(n)
            .extension()
            .is_some_and(|e| e == "eml")),
        "only whole .eml files remain: {names:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_passes_the_mailer_suite_against_a_real_smtp_server() {
    let Some(addr) = testing::service_url("TEST_SMTP_ADDR", "SMTP mailer") else {
        return;
    };
    let maildir = std::path::PathBuf::from(
        std::env::var("TEST_SMTP_MAILDIR").expect("TEST_SMTP_MAILDIR with TEST_SMTP_ADDR"),
    );
    let config = confab_adapters::mail::MailConfig::Smtp {
        url: Some(SecretUrl::parse(&format!("smtp://{addr}")).unwrap()),
        host: None,
        port: None,
        user: None,
        password: None,
        secure: false,
        from: "Chat <no-reply@example.com>".into(),
    };
    let mailer = confab_adapters::mail::build(&config, std::path::Path::new(".")).unwrap();
    let dirs = [maildir.join("new"), maildir.join("cur")];
    testing::mailer::run_all(mailer, || std::future::ready(messages_in(&dirs))).await;
}

#[tokio::test]
async fn an_unreachable_smtp_server_is_a_retryable_failure() {
    let config = confab_adapters::mail::MailConfig::Smtp {
        url: Some(SecretUrl::parse("smtp://127.0.0.1:1").unwrap()),
        host: None,
        port: None,
        user: None,
        password: None,
        secure: false,
        from: "no-reply@example.com".into(),
    };
    let mailer = confab_adapters::mail::build(&config, std::path::Path::new(".")).unwrap();
    let mail = confab_core::ports::mailer::Mail {
        id: confab_core::domain::EventId::new(),
        to: "ann@example.com".into(),
        subject: "x".into(),
        text: "x".into(),
        html: None,
    };
    let err = mailer.send(&mail).await.unwrap_err();
    assert!(
        matches!(err, confab_core::ports::mailer::MailError::Unavailable(_)),
        "{err:?}"
    );
    assert_eq!(
        mailer.health().await.status,
        confab_core::ports::health::HealthStatus::Down
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_sends_a_message_that_is_not_an_envelope_to_the_dead_letters() {
    let Some(url) = testing::service_url("TEST_AMQP_URL", "RabbitMQ broker") else {
        return;
    };
    let broker = confab_adapters::rabbit_broker::RabbitBroker::connect(
        &SecretUrl::parse(&url).unwrap(),
        BROKER_SETTINGS.retry,
        BROKER_SETTINGS.visibility_timeout,
        Some(Duration::from_mins(1)),
    )
    .await
    .unwrap();
    let queue = unique("q-raw-");
    broker.depth(&queue).await.unwrap(); // Declares the queue's topology.
    // Something else (an older system sharing the queue name) publishes plain text.
    let connection = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .basic_publish(
            "".into(),
            queue.as_str().into(),
            lapin::options::BasicPublishOptions::default(),
            b"not json at all",
            lapin::BasicProperties::default(),
        )
        .await
        .unwrap();
    let got = broker
        .receive(&queue, 10, Duration::from_secs(2))
        .await
        .unwrap();
    assert!(got.is_empty(), "not handed to a consumer");
    testing::eventually("it is dead-lettered", Duration::from_secs(5), || async {
        broker.depth(&queue).await.unwrap()
            == confab_core::ports::broker::QueueDepth {
                pending: 0,
                dead: 1,
            }
    })
    .await;
    assert!(
        broker.dead_letters(&queue, 10).await.unwrap().is_empty(),
        "listing skips it"
    );
    assert_eq!(
        broker.replay_dead_letters(&queue).await.unwrap(),
        0,
        "replay leaves it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_reconnects_by_itself_after_an_outage() {
    use confab_core::ports::broker::BrokerError;
    use confab_core::ports::health::{HealthCheck, HealthStatus};
    use confab_core::testing::broker::envelope;
    let Some(amqp) = testing::service_url("TEST_AMQP_URL", "RabbitMQ reconnect") else {
        return;
    };
    let mut url = url::Url::parse(&amqp).unwrap();
    let target = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap_or(5672))
        .parse()
        .unwrap();
    let proxy = confab_adapters::testing::Proxy::start(target).await;
    url.set_port(Some(proxy.address.port())).unwrap();
    let broker = confab_adapters::rabbit_broker::RabbitBroker::connect(
        &SecretUrl::parse(url.as_str()).unwrap(),
        BROKER_SETTINGS.retry,
        BROKER_SETTINGS.visibility_timeout,
        Some(Duration::from_mins(1)),
    )
    .await
    .unwrap();
    let queue = unique("q-outage-");
    broker
        .publish(&queue, &envelope("before", 0))
        .await
        .unwrap();
    let held = broker
        .receive(&queue, 1, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(held.len(), 1);

    proxy.cut();
    // While RabbitMQ is away every operation fails promptly with Unavailable: no hang, no
    // panic, nothing reported as sent.
    for _ in 0..3 {
        let started = std::time::Instant::now();
        let outcome = broker.publish(&queue, &envelope("during", 1)).await;
        assert!(
            matches!(outcome, Err(BrokerError::Unavailable(_))),
            "{outcome:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(6), "prompt");
    }
    assert_eq!(broker.health().await.status, HealthStatus::Down);
    // A delivery leased on the lost connection cannot be settled: RabbitMQ requeued it.
    assert!(matches!(
        broker.ack(&held[0]).await,
        Err(BrokerError::LeaseLost)
    ));

    proxy.restore();
    let started = std::time::Instant::now();
    testing::eventually("the broker reconnects", Duration::from_secs(5), || async {
        broker.health().await.status == HealthStatus::Ok
    })
    .await;
    let reconnected_in = started.elapsed();
    broker.publish(&queue, &envelope("after", 2)).await.unwrap();
    let mut kinds = Vec::new();
    while kinds.len() < 2 {
        let got = broker
            .receive(&queue, 10, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(!got.is_empty(), "only {kinds:?} came back");
        for delivery in got {
            kinds.push(delivery.envelope.kind.clone());
            broker.ack(&delivery).await.unwrap();
        }
    }
    // The requeued message comes first and is redelivered (attempt 2); the failed publishes
    // are not in the queue: what the broker refused is the caller's to retry.
    assert_eq!(
        kinds,
        ["before", "after"],
        "reconnected in {reconnected_in:?}"
    );
}

#[tokio::test]
async fn openai_compatible_provider_passes_the_llm_suite() {
    use confab_adapters::testing::fake_llm::{FakeLlm, Scripted, Wire};
    let fake = FakeLlm::start(Wire::OpenAi).await;
    testing::llm::run_all(&fake).await;
    // Embeddings come back in input order, whatever order the server lists them in.
    let vectors = fake
        .provider()
        .embed("", &["a".into(), "bcd".into()])
        .await
        .unwrap();
    assert_eq!(vectors, [vec![1.0, 97.0, 0.5], vec![3.0, 98.0, 0.5]]);
}

#[tokio::test]
async fn ollama_provider_passes_the_llm_suite() {
    use confab_adapters::testing::fake_llm::{FakeLlm, Scripted, Wire};
    let fake = FakeLlm::start(Wire::Ollama).await;
    testing::llm::run_all(&fake).await;
    let vectors = fake
        .provider()
        .embed("", &["a".into(), "bcd".into()])
        .await
        .unwrap();
    assert_eq!(vectors, [vec![1.0, 97.0, 0.5], vec![3.0, 98.0, 0.5]]);
}

/// The suite's conversation, naming `model`.
fn llm_request(model: &str, max_tokens: Option<u32>) -> confab_core::ports::llm::CompletionRequest {
    use confab_core::ports::llm::{CompletionRequest, Role, Turn};
    CompletionRequest {
        model: model.into(),
        turns: vec![
            Turn::new(Role::System, "Be brief."),
            Turn::new(Role::User, "Say hello"),
        ],
        max_tokens,
    }
}

#[tokio::test]
async fn anthropic_provider_passes_the_llm_suite() {
    use confab_adapters::llm::{AnthropicConfig, build_anthropic};
    use confab_adapters::testing::fake_llm::{FakeLlm, Scripted, Step, Wire};
    use confab_core::error::ServiceErrorKind;
    use confab_core::settings::Secret;
    let fake = FakeLlm::start(Wire::Anthropic).await;
    testing::llm::run_all(&fake).await;

    // The system prompt is a field of its own, and max_tokens is always sent.
    fake.push(Step::pieces(&["Hi"]));
    let completion = fake
        .provider()
        .complete(&llm_request("claude-x", None), &mut |_: &str| {})
        .await
        .unwrap();
    assert_eq!(completion.content, "Hi");
    assert_eq!(completion.model, "claude-x");
    let sent = fake.requests().pop().unwrap();
    assert_eq!(sent["system"], "Be brief.");
    assert_eq!(
        sent["messages"],
        serde_json::json!([{"role": "user", "content": "Say hello"}])
    );
    assert_eq!(sent["max_tokens"], 1024);
    assert_eq!(sent["stream"], true);
    assert_eq!(fake.provider().models().await.unwrap(), ["fake-model"]);

    // A refused key is an API error with Anthropic's message, never the key.
    let wrong = build_anthropic(&AnthropicConfig {
        api_key: Some(Secret::new("sk-ant-wrong-key")),
        base_url: Some(fake.url.clone()),
        model: None,
    })
    .unwrap();
    let e = wrong
        .complete(&llm_request("claude-x", None), &mut |_: &str| {})
        .await
        .unwrap_err();
    assert_eq!(e.kind, ServiceErrorKind::Api);
    assert!(e.message.contains("invalid x-api-key"), "{}", e.message);
    assert!(!e.to_string().contains("sk-ant-wrong-key"), "{e}");
}

#[tokio::test]
async fn replicate_provider_passes_the_llm_suite() {
    use confab_adapters::llm::{ReplicateConfig, replicate_provider};
    use confab_adapters::testing::fake_llm::{
        FAKE_KEY, FakeLlm, REPLICATE_VERSION, Scripted, Step, Wire,
    };
    use confab_core::error::ServiceErrorKind;
    use confab_core::ports::llm::LlmProvider;
    use confab_core::settings::Secret;
    let fake = FakeLlm::start(Wire::Replicate).await;
    testing::llm::run_all(&fake).await;

    // A prediction is created once, then polled until it succeeds: `processing` twice, then
    // `succeeded`, three polls. A model that is no version id runs the configured version.
    let provider = fake.provider();
    let (calls, polls) = (fake.calls(), fake.polls());
    fake.push(Step::pieces(&["Hel", "lo"]));
    let mut seen = Vec::new();
    let completion = provider
        .complete(&llm_request("replicate", Some(8)), &mut |p: &str| {
            seen.push(p.to_owned());
        })
        .await
        .unwrap();
    assert_eq!(seen, ["Hello"]);
    assert_eq!(completion.model, "fake/fake-model");
    assert_eq!(fake.calls() - calls, 1, "one prediction");
    assert_eq!(fake.polls() - polls, 3, "three polls");
    let sent = fake.requests().pop().unwrap();
    assert_eq!(sent["version"], REPLICATE_VERSION);
    assert_eq!(
        sent["input"],
        serde_json::json!({
            "prompt": "user: Say hello\n\nassistant:",
            "system_prompt": "Be brief.",
            "max_new_tokens": 8,
        })
    );
    assert_eq!(provider.models().await.unwrap(), [REPLICATE_VERSION]);

    // A prediction that outlives the deadline: `Timeout`, and it is cancelled.
    let cancels = fake.cancels();
    let slow = Step::Stream {
        pieces: vec!["x".into(); 5],
        gap: Duration::from_millis(200),
        cut: 4096,
        usage: (1, 5),
    };
    let bounded = replicate_provider(&ReplicateConfig {
        api_key: Some(Secret::new(FAKE_KEY)),
        api_url: Some(fake.url.clone()),
        model_version: Some(REPLICATE_VERSION.into()),
        ..ReplicateConfig::default()
    })
    .unwrap()
    .with_poll(Duration::from_millis(20), Duration::from_millis(300));
    fake.push(slow.clone());
    let e = bounded
        .complete(&llm_request("replicate", None), &mut |_: &str| {})
        .await
        .unwrap_err();
    assert_eq!(e.kind, ServiceErrorKind::Timeout, "{e}");
    testing::eventually(
        "the prediction is cancelled",
        Duration::from_secs(5),
        || async { fake.cancels() == cancels + 1 },
    )
    .await;

    // A caller that stops waiting cancels it too.
    fake.push(slow);
    let dropped = tokio::time::timeout(
        Duration::from_millis(150),
        provider.complete(&llm_request("replicate", None), &mut |_: &str| {}),
    )
    .await;
    assert!(dropped.is_err(), "still running");
    testing::eventually(
        "the dropped prediction is cancelled",
        Duration::from_secs(5),
        || async { fake.cancels() == cancels + 2 },
    )
    .await;

    // A refused token is an API error with Replicate's message, never the token.
    let wrong = replicate_provider(&ReplicateConfig {
        api_key: Some(Secret::new("r8_wrong_token")),
        api_url: Some(fake.url.clone()),
        model_version: Some(REPLICATE_VERSION.into()),
        ..ReplicateConfig::default()
    })
    .unwrap();
    let e = wrong
        .complete(&llm_request("replicate", None), &mut |_: &str| {})
        .await
        .unwrap_err();
    assert_eq!(e.kind, ServiceErrorKind::Api);
    assert!(e.message.contains("authentication token"), "{}", e.message);
    assert!(!e.to_string().contains("r8_wrong_token"), "{e}");
}

#[tokio::test]
async fn openai_provider_generates_images() {
    use confab_adapters::llm::{OpenAiConfig, build_openai};
    use confab_adapters::testing::fake_llm::{FakeLlm, PNG, Scripted, Wire};
    use confab_core::ports::llm::GeneratedImage;
    let fake = FakeLlm::start(Wire::OpenAi).await;
    let images = fake.provider().generate_images("a cat", 3).await.unwrap();
    assert_eq!(images, vec![GeneratedImage::Bytes(PNG.to_vec()); 3]);
    let sent = fake.requests().pop().unwrap();
    assert_eq!(
        sent,
        serde_json::json!({"model": "gpt-image-1", "prompt": "a cat", "n": 3}),
        "gpt-image models refuse response_format"
    );

    // Other image models are asked for base64.
    let dalle = build_openai(&OpenAiConfig {
        base_url: Some(fake.url.clone()),
        image_model: Some("dall-e-3".into()),
        ..OpenAiConfig::default()
    })
    .unwrap();
    let images = dalle.generate_images("a dog", 1).await.unwrap();
    assert_eq!(images, [GeneratedImage::Bytes(PNG.to_vec())]);
    let sent = fake.requests().pop().unwrap();
    assert_eq!(sent["model"], "dall-e-3");
    assert_eq!(sent["response_format"], "b64_json");
}

#[tokio::test]
async fn replicate_provider_generates_images() {
    use confab_adapters::llm::{ReplicateConfig, build_replicate};
    use confab_adapters::testing::fake_llm::{
        FAKE_KEY, FakeLlm, PNG, REPLICATE_VERSION, Scripted, Wire,
    };
    use confab_core::ports::llm::GeneratedImage;
    use confab_core::settings::Secret;
    let fake = FakeLlm::start(Wire::Replicate).await;
    let polls = fake.polls();
    let images = fake.provider().generate_images("a cat", 2).await.unwrap();
    assert_eq!(fake.polls() - polls, 3, "three polls");
    assert_eq!(images.len(), 2);
    for image in images {
        let GeneratedImage::Url(url) = image else {
            panic!("Replicate answers URLs")
        };
        let bytes = reqwest::get(&url).await.unwrap().bytes().await.unwrap();
        assert_eq!(bytes.as_ref(), PNG, "{url}");
    }
    let sent = fake.requests().pop().unwrap();
    assert_eq!(sent["version"], REPLICATE_VERSION);
    assert_eq!(
        sent["input"],
        serde_json::json!({"prompt": "a cat", "num_outputs": 2})
    );

    // An image model version of its own, when configured.
    let image_version = "0".repeat(64);
    let provider = build_replicate(&ReplicateConfig {
        api_key: Some(Secret::new(FAKE_KEY)),
        api_url: Some(fake.url.clone()),
        model_version: Some(REPLICATE_VERSION.into()),
        image_model_version: Some(image_version.clone()),
        poll_interval_ms: Some(20),
        deadline_secs: None,
    })
    .unwrap();
    assert_eq!(provider.generate_images("a dog", 1).await.unwrap().len(), 1);
    assert_eq!(
        fake.requests().pop().unwrap()["version"],
        image_version.as_str()
    );
    assert_eq!(
        provider.models().await.unwrap(),
        [REPLICATE_VERSION, image_version.as_str()]
    );
}

/// A text message by the one member of a new group chat, not yet stored.
async fn a_message_from_a_member(store: &SqlStore) -> confab_core::domain::Message {
    use confab_core::domain::{
        ChatId, ChatKind, MemberRole, Message, MessageId, MessageKind, NewChat, NewUser, now,
    };
    use confab_core::ports::store::{ChatStore, UserStore};
    let ann = store
        .create_user(NewUser {
            email: format!("{}@example.com", unique("ann")),
            name: "Ann".into(),
            password_hash: None,
        })
        .await
        .unwrap();
    let chat = store
        .create_chat(NewChat {
            id: ChatId::new(),
            kind: ChatKind::Group,
            name: Some("Team".into()),
            created_by: ann.id,
            members: vec![(ann.id, MemberRole::Admin)],
        })
        .await
        .unwrap()
        .id;
    Message {
        id: MessageId::new(),
        chat_id: chat,
        sender_id: Some(ann.id),
        kind: MessageKind::Text,
        text: Some("hello".into()),
        client_id: Some("c-1".into()),
        image: None,
        created_at: now(),
        edited_at: None,
        deleted_at: None,
    }
}

/// A store whose database also holds the queue (the embedded default), linked as the
/// factory links them: outbox entries are on the queue once their transaction commits,
/// with nothing to relay; an uncommitted one never is.
async fn the_outbox_is_the_queue(config: &DatabaseConfig) {
    use confab_core::domain::{ChatKind, EventId, OutboxEntry, now};
    use confab_core::ports::store::{Append, Appended, OutboxStore};
    let (store, broker) = store_and_broker(config).await;
    store.migrate().await.unwrap();
    broker.take_outbox_of(&store);
    let queue = unique("direct");
    let entry = |kind: &str| OutboxEntry {
        id: EventId::new(),
        queue: queue.clone(),
        kind: kind.into(),
        payload: serde_json::json!({ "kind": kind }),
        trace_id: Some("trace-7".into()),
        created_at: now(),
    };
    let received = |max| broker.receive(&queue, max, Duration::from_millis(300));

    // In a transaction: not on the queue before the commit, on it after.
    let first = entry("first");
    let tx = store.begin().await.unwrap();
    tx.enqueue(&first).await.unwrap();
    // (A read: on SQLite a receive, which writes, would wait for the open transaction.)
    assert_eq!(
        broker.depth(&queue).await.unwrap().pending,
        0,
        "not before commit"
    );
    tx.commit().await.unwrap();
    let got = received(10).await.unwrap();
    assert_eq!(got.len(), 1);
    let envelope = &got[0].envelope;
    assert_eq!(
        (envelope.id, envelope.kind.as_str(), envelope.attempt),
        (first.id, "first", 1)
    );
    assert_eq!(envelope.trace_id.as_deref(), Some("trace-7"));
    assert_eq!(envelope.payload, first.payload);
    broker.ack(&got[0]).await.unwrap();

    // Rolled back: never on the queue.
    let tx = store.begin().await.unwrap();
    tx.enqueue(&entry("rolled back")).await.unwrap();
    drop(tx);
    // Outside a transaction: at once. Twice the same entry: once on the queue.
    let alone = entry("alone");
    store.enqueue(&alone).await.unwrap();
    store.enqueue(&alone).await.unwrap();

    // A message's event, through the group commit.
    let message = a_message_from_a_member(&store).await;
    let event = entry("message.created");
    let append = Append {
        message,
        event: event.clone(),
    };
    let answers = store
        .append_messages(std::slice::from_ref(&append))
        .await
        .unwrap();
    assert!(matches!(answers[..], [Appended::Stored(ChatKind::Group)]));
    // A retry of the same message is a duplicate and queues nothing.
    let again = store.append_messages(&[append]).await.unwrap();
    assert!(matches!(again[..], [Appended::Duplicate { .. }]));

    let got = received(10).await.unwrap();
    let kinds: Vec<&str> = got.iter().map(|d| d.envelope.kind.as_str()).collect();
    assert_eq!(kinds, ["alone", "message.created"]);
    assert_eq!(got[1].envelope.id, event.id);
    broker.ack_all(&got).await.unwrap();
    assert!(
        store.pending_outbox(10).await.unwrap().is_empty(),
        "nothing for a relay"
    );
    assert_eq!(broker.depth(&queue).await.unwrap().pending, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sqlite_the_outbox_is_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    the_outbox_is_the_queue(&sqlite_at(dir.path().join("direct.db"))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_the_outbox_is_the_queue() {
    let Some(admin) = testing::service_url("TEST_DATABASE_URL", "PostgreSQL queue") else {
        return;
    };
    let db = TempDatabase::create(&admin).await;
    the_outbox_is_the_queue(&postgres_config(&db.url)).await;
    db.drop().await;
}

/// A database from before `m0004_sparse_client_ids` (every message in the client-id index)
/// upgrades with its messages in place: a client id used before is still a duplicate after
/// it, and messages without one are stored as before. The store also writes against the old
/// index (an `ON CONFLICT … WHERE` names a full index too), as a node not yet upgraded must.
async fn client_ids_stay_unique_across_the_sparse_index(config: &DatabaseConfig) {
    use confab_core::domain::{ChatKind, EventId, MessageId, OutboxEntry, now};
    use confab_core::ports::store::{Append, Appended, MessageStore};
    use sea_orm::{ConnectionTrait, TransactionTrait};
    let store = SqlStore::connect(config, std::path::Path::new("."))
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let conn = store.connection();
    // Back to the schema before, on one connection (SQLite's other pooled connections may
    // still hold the old schema, and would find the index "already exists").
    let back = conn.begin().await.unwrap();
    for statement in [
        "DROP INDEX uq_messages_sender_id_client_id",
        "CREATE UNIQUE INDEX uq_messages_sender_id_client_id ON messages (sender_id, client_id)",
        "DELETE FROM seaql_migrations WHERE version = 'm0004_sparse_client_ids'",
    ] {
        back.execute_unprepared(statement).await.unwrap();
    }
    back.commit().await.unwrap();
    let with_id = a_message_from_a_member(&store).await;
    let append = |client_id: Option<&str>| Append {
        message: confab_core::domain::Message {
            id: MessageId::new(),
            client_id: client_id.map(Into::into),
            created_at: now(),
            ..with_id.clone()
        },
        event: OutboxEntry {
            id: EventId::new(),
            queue: "events".into(),
            kind: "message.created".into(),
            payload: serde_json::json!({}),
            trace_id: None,
            created_at: now(),
        },
    };
    let first = append(Some("c-1"));
    let before = store
        .append_messages(&[first.clone(), append(None), append(None)])
        .await
        .unwrap();
    assert!(
        before
            .iter()
            .all(|a| matches!(a, Appended::Stored(ChatKind::Group))),
        "{before:?}"
    );

    assert_eq!(store.migrate().await.unwrap(), ["m0004_sparse_client_ids"]);
    let index: Vec<String> = conn
        .query_all_raw(sea_orm::Statement::from_string(
            conn.get_database_backend(),
            if conn.get_database_backend() == sea_orm::DbBackend::Postgres {
                "SELECT indexdef AS sql FROM pg_indexes WHERE indexname = 'uq_messages_sender_id_client_id'"
            } else {
                "SELECT sql FROM sqlite_master WHERE name = 'uq_messages_sender_id_client_id'"
            },
        ))
        .await
        .unwrap()
        .iter()
        .map(|row| row.try_get::<String>("", "sql").unwrap())
        .collect();
    assert!(
        index.len() == 1 && index[0].contains("IS NOT NULL"),
        "{index:?}"
    );

    let after = store
        .append_messages(&[append(Some("c-1")), append(None), append(Some("c-2"))])
        .await
        .unwrap();
    match &after[..] {
        [
            Appended::Duplicate { existing, .. },
            Appended::Stored(ChatKind::Group),
            Appended::Stored(ChatKind::Group),
        ] => assert_eq!(existing.id, first.message.id, "the message stored before"),
        other => panic!("{other:?}"),
    }
    let stored = store
        .messages(with_id.chat_id, confab_core::domain::Page::newest(10))
        .await
        .unwrap();
    assert_eq!(stored.len(), 5, "three before, two after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sqlite_client_ids_stay_unique_across_the_sparse_index() {
    let dir = tempfile::tempdir().unwrap();
    client_ids_stay_unique_across_the_sparse_index(&sqlite_at(dir.path().join("sparse.db"))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_client_ids_stay_unique_across_the_sparse_index() {
    let Some(admin) = testing::service_url("TEST_DATABASE_URL", "PostgreSQL store") else {
        return;
    };
    let db = TempDatabase::create(&admin).await;
    client_ids_stay_unique_across_the_sparse_index(&postgres_config(&db.url)).await;
    db.drop().await;
}
