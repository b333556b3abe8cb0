//! The database as the service lives with it: lost while running, back again (issue 3).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use confab_adapters::testing::TempDatabase;
use confab_core::domain::UserId;
use confab_core::testing::{eventually, service_url};
use confab_server::config::{DatabaseConfig, PoolConfig, SecretUrl};
use confab_server::http::error::ApiError;
use confab_server::http::extract::ApiPath;
use confab_server::startup::Overrides;
use confab_server::state::AppState;

use crate::helpers::{Proxy, assert_error, spawn_app_with};

/// A route that needs the store, as every resource route will.
fn user_route() -> Router<AppState> {
    Router::new().route(
        "/test/users/{id}",
        get(
            |axum::extract::State(state): axum::extract::State<AppState>,
             ApiPath(id): ApiPath<uuid::Uuid>| async move {
                match state
                    .store
                    .user_by_id(UserId(id))
                    .await
                    .map_err(ApiError::from)?
                {
                    Some(user) => Ok::<_, ApiError>(user.name),
                    None => Err(ApiError::not_found()),
                }
            },
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_database_makes_ready_and_requests_503_until_it_returns() {
    let Some(admin) = service_url("TEST_DATABASE_URL", "PostgreSQL outage") else {
        return;
    };
    let db = TempDatabase::create(&admin).await;
    let mut url = url::Url::parse(&db.url).unwrap();
    let target: SocketAddr = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap_or(5432))
        .parse()
        .unwrap();
    let proxy = Proxy::start(target).await;
    url.set_port(Some(proxy.address.port())).unwrap();
    let config = DatabaseConfig::Postgres {
        url: SecretUrl::parse(url.as_str()).unwrap(),
        replica_url: None,
        pool: PoolConfig {
            max_connections: 4,
            acquire_timeout_secs: 1,
            ..PoolConfig::default()
        },
    };
    let app = spawn_app_with(
        |c| c.database = config,
        Overrides {
            routes: user_route(),
            ..Overrides::default()
        },
    )
    .await;
    let someone = format!("/test/users/{}", uuid::Uuid::now_v7());
    assert_eq!(app.get("/ready").await.status(), 200);
    assert_eq!(app.get(&someone).await.status(), 404);
    let health: serde_json::Value = app.get("/health").await.json().await.unwrap();
    assert_eq!(health["components"]["database"]["kind"], "postgres");

    proxy.cut();
    let lost = Instant::now();
    eventually("ready turns 503", Duration::from_secs(1), || async {
        app.get("/ready").await.status() == 503
    })
    .await;
    eprintln!(
        "/ready answered 503 {:?} after the database was lost",
        lost.elapsed()
    );
    let body: serde_json::Value = app.get("/ready").await.json().await.unwrap();
    // The embedded queue lives in the same database.
    assert_eq!(body["failing"], serde_json::json!(["database", "queue"]));
    let response = app.get(&someone).await;
    assert_eq!(response.headers()["retry-after"], "1");
    assert_error(response, 503, "UNAVAILABLE").await;
    let health = app.get("/health").await;
    assert_eq!(health.status(), 503);

    proxy.restore();
    eventually(
        "ready recovers without a restart",
        Duration::from_secs(10),
        || async { app.get("/ready").await.status() == 200 },
    )
    .await;
    assert_eq!(app.get(&someone).await.status(), 404, "requests work again");
    drop(app);
    db.drop().await;
}

#[tokio::test]
async fn a_store_failure_maps_to_the_spec_statuses() {
    use confab_core::ports::store::StoreError;
    let cases = [
        (StoreError::NotFound("x".into()), 404),
        (StoreError::Conflict("x".into()), 409),
        (StoreError::Unavailable("down".into()), 503),
        (StoreError::Other("bug".into()), 500),
    ];
    for (error, status) in cases {
        assert_eq!(ApiError::from(error).status().as_u16(), status);
    }
}
