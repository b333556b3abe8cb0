//! The cache as the service lives with it: Redis going away and coming back (SPEC §7).

use std::time::{Duration, Instant};

use confab_core::ports::cache::RateLimit;
use confab_core::settings::SecretUrl;
use confab_core::testing::eventually;
use confab_server::config::CacheConfig;
use confab_server::startup::Overrides;
use futures_util::StreamExt;

use crate::helpers::{TempRedis, TestApp, spawn_app_with};

fn redis_config(url: &str) -> CacheConfig {
    CacheConfig::Redis {
        url: SecretUrl::parse(url).unwrap(),
        key_prefix: "t:".into(),
    }
}

async fn health(app: &TestApp) -> serde_json::Value {
    app.get("/health").await.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_keeps_working_while_redis_is_down_and_recovers_by_itself() {
    let Some(mut redis) = TempRedis::start(None) else {
        return;
    };
    let config = redis_config(&redis.url());
    let app = spawn_app_with(|c| c.cache = config.clone(), Overrides::default()).await;
    let cache = app.state.cache.clone();

    eventually("the cache is up", Duration::from_secs(5), || async {
        health(&app).await["components"]["cache"]["status"] == "ok"
    })
    .await;
    assert_eq!(health(&app).await["components"]["cache"]["kind"], "redis");
    let mut events = cache.subscribe("events").await.unwrap();
    cache.set("k", b"v", None).await.unwrap();
    assert_eq!(cache.get("k").await.unwrap().as_deref(), Some(&b"v"[..]));

    redis.kill();

    // Reads miss, writes are skipped, rate limits fail open: promptly, without errors.
    let began = Instant::now();
    assert_eq!(cache.get("k").await.unwrap(), None);
    cache.set("k2", b"v", None).await.unwrap();
    for _ in 0..3 {
        assert!(
            cache
                .rate_limit("rate:ip:login", RateLimit::per_minute(1))
                .await
                .unwrap()
                .allowed
        );
    }
    assert!(
        began.elapsed() < Duration::from_secs(6),
        "took {:?}",
        began.elapsed()
    );

    eventually(
        "health shows the outage",
        Duration::from_secs(5),
        || async {
            let h = health(&app).await;
            h["status"] == "degraded" && h["components"]["cache"]["status"] == "down"
        },
    )
    .await;
    assert_eq!(
        app.get("/health").await.status(),
        200,
        "degraded is still up"
    );
    assert_eq!(
        app.get("/ready").await.status(),
        200,
        "the cache is not required"
    );
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains(r#"cache_errors_total{op="get"}"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"cache_errors_total{op="rate_limit"}"#),
        "{metrics}"
    );

    redis.restart();

    eventually(
        "writes and reads work again",
        Duration::from_secs(10),
        || async {
            cache.set("k3", b"back", None).await.unwrap();
            cache.get("k3").await.unwrap().as_deref() == Some(&b"back"[..])
        },
    )
    .await;
    eventually("health recovers", Duration::from_secs(10), || async {
        let h = health(&app).await;
        h["status"] == "ok" && h["components"]["cache"]["status"] == "ok"
    })
    .await;
    // The subscription made before the outage receives again: another node publishes.
    let other_node = confab_adapters::cache::build_backend(&config).unwrap();
    let started = Instant::now();
    loop {
        other_node
            .publish("events", b"after the restart")
            .await
            .ok();
        match tokio::time::timeout(Duration::from_millis(200), events.next()).await {
            Ok(Some(message)) => {
                assert_eq!(message, b"after the restart");
                break;
            }
            _ => assert!(
                started.elapsed() < Duration::from_secs(10),
                "never resubscribed"
            ),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_auth_works_and_a_wrong_password_shows_in_health_without_the_password() {
    let Some(redis) = TempRedis::start(Some("s3cret-pw")) else {
        return;
    };
    let app = spawn_app_with(
        |c| c.cache = redis_config(&redis.url()),
        Overrides::default(),
    )
    .await;
    eventually("authenticated", Duration::from_secs(5), || async {
        health(&app).await["components"]["cache"]["status"] == "ok"
    })
    .await;
    app.state.cache.set("k", b"v", None).await.unwrap();
    assert!(app.state.cache.get("k").await.unwrap().is_some());

    let wrong = format!("redis://:not-the-pw@127.0.0.1:{}", redis.port);
    let app = spawn_app_with(|c| c.cache = redis_config(&wrong), Overrides::default()).await;
    let h = health(&app).await;
    assert_eq!(h["components"]["cache"]["status"], "down", "{h}");
    let error = h["components"]["cache"]["lastError"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(!error.contains("not-the-pw"), "{error}");
}
