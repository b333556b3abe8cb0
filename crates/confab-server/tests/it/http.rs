//! The HTTP surface of the foundation: probes, errors, request ids, headers, CORS, limits,
//! timeouts, graceful shutdown, metrics and the OpenAPI document.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use axum::Router;
use axum::routing::{get, post};
use confab_core::ports::health::{ComponentHealth, HealthCheck, HealthStatus};
use confab_server::config::Environment;
use confab_server::health::{Component, Components, Fixed};
use confab_server::http::extract::ApiJson;
use confab_server::startup::Overrides;
use tokio::sync::Notify;

use crate::helpers::{assert_error, spawn_app, spawn_app_with, spawn_app_with_routes};

#[tokio::test]
async fn live_answers_200_while_the_process_runs() {
    let app = spawn_app().await;
    let response = app.get("/live").await;
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body, serde_json::json!({"status": "ok"}));
}

#[tokio::test]
async fn health_lists_components_with_version_and_uptime() {
    let app = spawn_app().await;
    let response = app.get("/health").await;
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["status"], "ok");
    assert_eq!(body["version"], env!("CARGO_PKG_VERSION"));
    assert!(body["uptimeSeconds"].is_u64());
    let ai = &body["components"]["ai"];
    assert_eq!(
        ai["status"], "unconfigured",
        "no provider configured: {body}"
    );
    assert_eq!(ai["kind"], "none");
    assert!(ai["lastError"].is_null());
    // The embedded shape: every SPEC §3 component, each from its port.
    for (name, kind) in [
        ("database", "sqlite"),
        ("queue", "sqlite"),
        ("cache", "memory"),
        ("storage", "local"),
        ("mail", "file"),
    ] {
        assert_eq!(body["components"][name]["status"], "ok", "{name}: {body}");
        assert_eq!(body["components"][name]["kind"], kind, "{name}: {body}");
    }
    assert_eq!(app.get("/ready").await.status(), 200);
}

struct Hangs;

#[async_trait]
impl HealthCheck for Hangs {
    async fn health(&self) -> ComponentHealth {
        std::future::pending().await
    }
}

fn component(name: &'static str, required: bool, status: HealthStatus) -> Component {
    Component {
        name,
        required,
        check: Arc::new(Fixed(
            ComponentHealth::new(status, "test").with_error("it broke"),
        )),
    }
}

#[tokio::test]
async fn a_required_component_down_makes_ready_and_health_503() {
    let components = Components::new(vec![
        component("database", true, HealthStatus::Down),
        component("cache", false, HealthStatus::Ok),
    ]);
    let app = spawn_app_with(
        |_| {},
        Overrides {
            components: Some(components),
            ..Overrides::default()
        },
    )
    .await;

    let ready = app.get("/ready").await;
    assert_eq!(ready.status(), 503);
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(
        body,
        serde_json::json!({"status": "not_ready", "failing": ["database"]})
    );

    let health = app.get("/health").await;
    assert_eq!(health.status(), 503);
    let body: serde_json::Value = health.json().await.unwrap();
    assert_eq!(body["status"], "down");
    assert_eq!(body["components"]["database"]["lastError"], "it broke");
}

#[tokio::test]
async fn an_optional_component_down_only_degrades_health() {
    let components = Components::new(vec![
        component("database", true, HealthStatus::Ok),
        component("cache", false, HealthStatus::Down),
    ]);
    let app = spawn_app_with(
        |_| {},
        Overrides {
            components: Some(components),
            ..Overrides::default()
        },
    )
    .await;
    assert_eq!(app.get("/ready").await.status(), 200);
    let health = app.get("/health").await;
    assert_eq!(health.status(), 200);
    let body: serde_json::Value = health.json().await.unwrap();
    assert_eq!(body["status"], "degraded");
}

#[tokio::test]
async fn a_hung_health_check_is_reported_down_instead_of_hanging_the_probe() {
    let components = Components::new(vec![Component {
        name: "database",
        required: true,
        check: Arc::new(Hangs),
    }])
    .with_deadline(Duration::from_millis(100));
    let app = spawn_app_with(
        |_| {},
        Overrides {
            components: Some(components),
            ..Overrides::default()
        },
    )
    .await;
    let health = app.get("/health").await;
    assert_eq!(health.status(), 503);
    let body: serde_json::Value = health.json().await.unwrap();
    assert_eq!(body["components"]["database"]["status"], "down");
    assert!(
        body["components"]["database"]["lastError"]
            .as_str()
            .unwrap()
            .contains("did not answer")
    );
}

#[tokio::test]
async fn a_request_id_is_made_when_absent_and_kept_when_given() {
    let app = spawn_app().await;
    let made = app.get("/live").await;
    let id = made.headers()["x-request-id"].to_str().unwrap();
    let parsed = uuid::Uuid::parse_str(id).expect("a generated id is a UUID");
    assert_eq!(parsed.get_version_num(), 7);

    let given = app
        .client
        .get(app.url("/nope"))
        .header("x-request-id", "client-chosen.id-42")
        .send()
        .await
        .unwrap();
    assert_eq!(given.headers()["x-request-id"], "client-chosen.id-42");
    let body = assert_error(given, 404, "NOT_FOUND").await;
    assert_eq!(body["requestId"], "client-chosen.id-42");
}

#[tokio::test]
async fn an_unsafe_or_oversized_request_id_is_replaced() {
    let app = spawn_app().await;
    for bad in ["has spaces in it", &"x".repeat(200), "quote\"and{brace}"] {
        let response = app
            .client
            .get(app.url("/live"))
            .header("x-request-id", bad)
            .send()
            .await
            .unwrap();
        let id = response.headers()["x-request-id"].to_str().unwrap();
        assert_ne!(id, bad);
        assert!(uuid::Uuid::parse_str(id).is_ok());
    }
}

#[tokio::test]
async fn unknown_routes_are_404_and_wrong_methods_405_in_the_error_shape() {
    let app = spawn_app().await;
    assert_error(app.get("/api/v1/nothing-here").await, 404, "NOT_FOUND").await;
    let response = app.client.delete(app.url("/health")).send().await.unwrap();
    assert_error(response, 405, "METHOD_NOT_ALLOWED").await;
}

#[derive(serde::Deserialize)]
struct Echo {
    #[allow(dead_code)]
    name: String,
}

fn echo_routes() -> Router<confab_server::state::AppState> {
    Router::new().route(
        "/test/echo",
        post(|ApiJson(_): ApiJson<Echo>| async { "ok" }),
    )
}

#[tokio::test]
async fn bad_json_bodies_get_400_422_415_and_413_in_the_error_shape() {
    let app = spawn_app_with_routes(echo_routes()).await;
    let post = |body: Vec<u8>, content_type: &'static str| {
        app.client
            .post(app.url("/test/echo"))
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    assert_eq!(
        post(br#"{"name":"a"}"#.to_vec(), "application/json")
            .await
            .unwrap()
            .status(),
        200
    );
    assert_error(
        post(b"{not json".to_vec(), "application/json")
            .await
            .unwrap(),
        400,
        "VALIDATION_ERROR",
    )
    .await;
    assert_error(
        post(br#"{"name":5}"#.to_vec(), "application/json")
            .await
            .unwrap(),
        422,
        "VALIDATION_ERROR",
    )
    .await;
    assert_error(
        post(br#"{"name":"a"}"#.to_vec(), "text/plain")
            .await
            .unwrap(),
        415,
        "UNSUPPORTED_MEDIA_TYPE",
    )
    .await;

    let big = format!(r#"{{"name":"{}"}}"#, "a".repeat(1024 * 1024 + 1));
    assert_error(
        post(big.into_bytes(), "application/json").await.unwrap(),
        413,
        "PAYLOAD_TOO_LARGE",
    )
    .await;
}

#[tokio::test]
async fn the_json_body_limit_follows_the_configuration() {
    let app = spawn_app_with(
        |c| c.server.json_body_limit_bytes = 2048,
        Overrides {
            routes: echo_routes(),
            ..Overrides::default()
        },
    )
    .await;
    let body = format!(r#"{{"name":"{}"}}"#, "a".repeat(3000));
    let response = app
        .client
        .post(app.url("/test/echo"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_error(response, 413, "PAYLOAD_TOO_LARGE").await;
}

#[tokio::test]
async fn a_panicking_handler_becomes_a_500_in_the_error_shape_and_the_server_lives_on() {
    let routes = Router::new().route(
        "/test/panic",
        get(|| async {
            let nothing: Option<&str> = std::hint::black_box(None);
            nothing.expect("boom: the handler's own message")
        }),
    );
    let app = spawn_app_with_routes(routes).await;
    let body = assert_error(app.get("/test/panic").await, 500, "INTERNAL_ERROR").await;
    assert!(
        !body.to_string().contains("boom"),
        "the cause stays in the log: {body}"
    );
    assert_eq!(app.get("/live").await.status(), 200);
}

#[tokio::test]
async fn a_request_past_the_timeout_gets_504() {
    let routes = Router::new().route(
        "/test/slow",
        get(|| async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            "late"
        }),
    );
    let app = spawn_app_with(
        |c| c.server.request_timeout_secs = 1,
        Overrides {
            routes,
            ..Overrides::default()
        },
    )
    .await;
    assert_error(app.get("/test/slow").await, 504, "TIMEOUT_ERROR").await;
}

#[tokio::test]
async fn security_headers_are_on_every_response() {
    let app = spawn_app().await;
    for path in ["/live", "/nope"] {
        let response = app.get(path).await;
        let h = response.headers();
        assert_eq!(h["x-content-type-options"], "nosniff", "{path}");
        assert_eq!(h["x-frame-options"], "DENY", "{path}");
        assert_eq!(h["referrer-policy"], "no-referrer", "{path}");
        assert!(
            h["content-security-policy"]
                .to_str()
                .unwrap()
                .contains("default-src 'none'")
        );
        assert!(
            h["strict-transport-security"]
                .to_str()
                .unwrap()
                .contains("max-age="),
            "HSTS outside development"
        );
    }
    let docs = app.get("/docs/").await;
    assert_eq!(docs.status(), 200);
    assert!(
        docs.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let csp = docs.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    assert!(!csp.contains("unsafe-eval"), "{csp}");
}

#[tokio::test]
async fn development_sends_no_hsts() {
    let app = spawn_app_with(
        |c| c.server.environment = Environment::Development,
        Overrides::default(),
    )
    .await;
    let response = app.get("/live").await;
    assert!(
        response
            .headers()
            .get("strict-transport-security")
            .is_none()
    );
}

#[tokio::test]
async fn cors_allows_listed_origins_and_refuses_others() {
    let app = spawn_app_with(
        |c| c.server.cors_origins = Some(vec!["https://app.example.com".into()]),
        Overrides::default(),
    )
    .await;
    let allowed = app
        .client
        .get(app.url("/live"))
        .header("origin", "https://app.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );

    let refused = app
        .client
        .get(app.url("/live"))
        .header("origin", "https://evil.example.com")
        .send()
        .await
        .unwrap();
    assert!(
        refused
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );

    let preflight = app
        .client
        .request(reqwest::Method::OPTIONS, app.url("/live"))
        .header("origin", "https://app.example.com")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization,content-type",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(preflight.status(), 200);
    assert_eq!(
        preflight.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    let methods = preflight.headers()["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(methods.contains("POST"), "{methods}");
    let headers = preflight.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(headers.contains("authorization"), "{headers}");

    let refused_preflight = app
        .client
        .request(reqwest::Method::OPTIONS, app.url("/live"))
        .header("origin", "https://evil.example.com")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert!(
        refused_preflight
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );
}

#[tokio::test]
async fn development_allows_localhost_on_any_port_and_production_allows_none_by_default() {
    let dev = spawn_app_with(
        |c| c.server.environment = Environment::Development,
        Overrides::default(),
    )
    .await;
    let response = dev
        .client
        .get(dev.url("/live"))
        .header("origin", "http://localhost:5173")
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.headers()["access-control-allow-origin"],
        "http://localhost:5173"
    );

    let prod = spawn_app().await;
    let response = prod
        .client
        .get(prod.url("/live"))
        .header("origin", "http://localhost:5173")
        .send()
        .await
        .unwrap();
    assert!(
        response
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );
}

#[tokio::test]
async fn responses_are_gzipped_for_clients_that_accept_it() {
    let app = spawn_app().await;
    let response = app
        .client
        .get(app.url("/api/v1/openapi.json"))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-encoding"], "gzip");
}

/// A route that says when it has started and then takes `hold` to answer.
fn slow_route(started: Arc<Notify>, hold: Duration) -> Router<confab_server::state::AppState> {
    Router::new().route(
        "/test/slow",
        get(move || {
            let started = started.clone();
            async move {
                started.notify_one();
                tokio::time::sleep(hold).await;
                "finished"
            }
        }),
    )
}

#[tokio::test]
async fn graceful_shutdown_lets_an_in_flight_request_finish_and_refuses_new_connections() {
    let started = Arc::new(Notify::new());
    let app = spawn_app_with_routes(slow_route(started.clone(), Duration::from_millis(500))).await;
    let in_flight = tokio::spawn(app.client.get(app.url("/test/slow")).send());
    started.notified().await;

    app.shutdown.cancel();
    // The listener closes at once; a new connection is refused while the old request runs.
    let mut refused = false;
    for _ in 0..50 {
        if tokio::net::TcpStream::connect(app.address).await.is_err() {
            refused = true;
            break;
        }
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(refused, "new connections are refused during shutdown");

    let response = in_flight
        .await
        .unwrap()
        .expect("the in-flight request completes");
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "finished");
    app.server.await.unwrap().expect("the server stops cleanly");
}

#[tokio::test]
async fn shutdown_gives_up_on_requests_past_the_deadline() {
    let started = Arc::new(Notify::new());
    let app = spawn_app_with(
        |c| c.server.shutdown_timeout_secs = 1,
        Overrides {
            routes: slow_route(started.clone(), Duration::from_mins(1)),
            ..Overrides::default()
        },
    )
    .await;
    let in_flight = tokio::spawn(app.client.get(app.url("/test/slow")).send());
    started.notified().await;
    app.shutdown.cancel();
    let began = std::time::Instant::now();
    let stopped = tokio::time::timeout(Duration::from_secs(10), app.server).await;
    stopped
        .expect("the server stops at the deadline")
        .unwrap()
        .expect("cleanly");
    assert!(
        began.elapsed() < Duration::from_secs(5),
        "stopped after {:?}",
        began.elapsed()
    );
    // In the binary the process then exits, closing the connection; in-process it would
    // linger until its own request timeout.
    in_flight.abort();
}

/// The value of the sample line that starts with `series`, or 0 when there is none.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn metrics_count_requests_by_matched_route_never_by_raw_path() {
    // A route only this test serves, so other tests' traffic cannot make it pass.
    let routes = Router::new().route("/test/items/{id}", get(|| async { "item" }));
    let app = spawn_app_with_routes(routes).await;
    let series = r#"http_requests_total{method="GET",route="/test/items/{id}",status="200"}"#;
    let before = sample(&app.get("/metrics").await.text().await.unwrap(), series);
    app.get("/test/items/raw-segment-xyz").await;
    app.get("/test/items/another-raw-segment").await;

    let response = app.get("/metrics").await;
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = response.text().await.unwrap();
    assert!(
        (sample(&text, series) - before - 2.0).abs() < f64::EPSILON,
        "{text}"
    );
    let bucket =
        r#"http_request_duration_seconds_bucket{method="GET",route="/test/items/{id}",le="+Inf"}"#;
    assert!(sample(&text, bucket) >= 2.0, "{text}");
    assert!(
        !text.contains("raw-segment"),
        "raw paths never become labels"
    );
}

#[tokio::test]
async fn the_openapi_document_is_3_1_and_lists_every_route_the_router_serves() {
    let app = spawn_app().await;
    let response = app.get("/api/v1/openapi.json").await;
    assert_eq!(response.status(), 200);
    let doc: serde_json::Value = response.json().await.unwrap();
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1"),
        "{}",
        doc["openapi"]
    );
    assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
    assert!(doc["components"]["schemas"]["ErrorBody"].is_object());

    let paths: BTreeSet<String> = doc["paths"].as_object().unwrap().keys().cloned().collect();
    for path in [
        "/live",
        "/ready",
        "/health",
        "/metrics",
        "/.well-known/jwks.json",
        "/api/v1/auth/register",
        "/api/v1/auth/login",
        "/api/v1/auth/refresh",
        "/api/v1/users/me",
        "/api/v1/users/{id}",
    ] {
        assert!(paths.contains(path), "{path} is documented: {paths:?}");
    }
    // Every documented operation is served (not 404/405) with a documented status.
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let mut request = app.client.request(
                method.to_uppercase().parse().unwrap(),
                app.url(&crate::auth::with_ids(path)),
            );
            if op.get("requestBody").is_some() {
                request = request.json(&serde_json::json!({}));
            }
            let response = request.send().await.unwrap();
            let status = response.status().as_u16().to_string();
            assert!(
                op["responses"].get(&status).is_some(),
                "{method} {path} answered {status}, undocumented"
            );
        }
    }
    // The library's own view matches what is served.
    let served = serde_json::to_value(confab_server::http::openapi()).unwrap();
    assert_eq!(served["paths"], doc["paths"]);
}

#[tokio::test]
async fn the_docs_ui_is_served_from_vendored_assets() {
    let app = spawn_app().await;
    let page = app.get("/docs/").await.text().await.unwrap();
    assert!(page.contains("swagger-ui-bundle.js"));
    let bundle = app.get("/docs/swagger-ui-bundle.js").await;
    assert_eq!(bundle.status(), 200);
    assert!(
        bundle.bytes().await.unwrap().len() > 100_000,
        "the real bundle, not a CDN link"
    );
    let init = app
        .get("/docs/swagger-initializer.js")
        .await
        .text()
        .await
        .unwrap();
    assert!(init.contains("/api/v1/openapi.json"));
}

#[tokio::test]
async fn the_worker_role_serves_only_probes_and_metrics() {
    let data = tempfile::tempdir().unwrap();
    let app = confab_server::startup::Application::build(
        crate::helpers::test_config(data.path()),
        confab_server::cli::Role::Worker,
    )
    .await
    .unwrap();
    let base = format!("http://{}", app.local_addr());
    tokio::spawn(app.run_until_stopped());
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    for (path, status) in [
        ("/live", 200),
        ("/ready", 200),
        ("/metrics", 200),
        ("/docs/", 404),
        ("/api/v1/openapi.json", 404),
    ] {
        let response = client.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(response.status().as_u16(), status, "{path}");
    }
}

#[tokio::test]
async fn malformed_path_and_query_parameters_get_the_error_shape() {
    use confab_server::http::extract::{ApiPath, ApiQuery};
    #[derive(serde::Deserialize)]
    struct Page {
        #[allow(dead_code)]
        limit: u32,
    }
    let routes = Router::new()
        .route(
            "/test/things/{id}",
            get(|ApiPath(_): ApiPath<uuid::Uuid>| async { "thing" }),
        )
        .route(
            "/test/things",
            get(|ApiQuery(_): ApiQuery<Page>| async { "page" }),
        );
    let app = spawn_app_with_routes(routes).await;
    let id = uuid::Uuid::now_v7();
    assert_eq!(app.get(&format!("/test/things/{id}")).await.status(), 200);
    assert_error(app.get("/test/things/not-a-uuid").await, 404, "NOT_FOUND").await;
    assert_eq!(app.get("/test/things?limit=5").await.status(), 200);
    let body = assert_error(
        app.get("/test/things?limit=many").await,
        400,
        "VALIDATION_ERROR",
    )
    .await;
    assert!(
        body["details"]["reason"]
            .as_str()
            .unwrap()
            .contains("limit"),
        "{body}"
    );
}
