//! Log lines as an operator reads them: every line of a request carries its id, a panic's
//! cause is logged once, nothing secret is written.

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

use axum::Router;
use axum::routing::get;
use confab_server::telemetry::json_layer;
use tracing_subscriber::layer::SubscriberExt;

use crate::helpers::spawn_app_with_routes;

/// Every log line of this test process. The subscriber is process-wide: a thread-local one
/// misses events whose callsites another thread reached first (tracing caches interest per
/// callsite). Tests pick their own lines by the unique request ids they send.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn global() -> &'static Self {
        static CAPTURED: OnceLock<Captured> = OnceLock::new();
        CAPTURED.get_or_init(|| {
            let captured = Captured::default();
            let writer = captured.clone();
            let subscriber = tracing_subscriber::registry()
                .with(tracing_subscriber::EnvFilter::new("info"))
                .with(json_layer(move || writer.clone()));
            tracing::subscriber::set_global_default(subscriber)
                .expect("no other test installs a global subscriber");
            captured
        })
    }

    fn lines(&self) -> Vec<serde_json::Value> {
        String::from_utf8(self.0.lock().unwrap().clone())
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).expect("every line is JSON"))
            .collect()
    }
}

#[tokio::test]
async fn every_line_logged_while_serving_a_request_carries_its_request_id() {
    let captured = Captured::global();

    let routes = Router::new()
        .route(
            "/test/work",
            get(|| async {
                tracing::info!(step = 1, "Doing the work.");
                tokio::task::yield_now().await;
                tracing::warn!(step = 2, "Still doing the work.");
                "done"
            }),
        )
        .route(
            "/test/panic",
            get(|| async {
                let nothing: Option<&str> = std::hint::black_box(None);
                nothing.expect("boom: cause 42")
            }),
        );
    let app = spawn_app_with_routes(routes).await;
    for (path, id) in [("/test/work", "work-req-1"), ("/test/panic", "panic-req-1")] {
        app.client
            .get(app.url(path))
            .header("x-request-id", id)
            .header("authorization", "Bearer secret-token-value")
            .send()
            .await
            .unwrap();
    }

    let lines = captured.lines();
    let of = |id: &str| -> Vec<&serde_json::Value> {
        lines.iter().filter(|l| l["requestId"] == id).collect()
    };
    let work = of("work-req-1");
    let messages: Vec<&str> = work
        .iter()
        .map(|l| l["message"].as_str().unwrap())
        .collect();
    assert_eq!(
        messages,
        [
            "Doing the work.",
            "Still doing the work.",
            "Request completed."
        ]
    );
    assert!(
        work.iter()
            .all(|l| l["route"] == "/test/work" && l["method"] == "GET")
    );
    assert_eq!(work[2]["status"], 200);

    let panic = of("panic-req-1");
    let failed: Vec<_> = panic
        .iter()
        .filter(|l| l["message"] == "Request failed.")
        .collect();
    assert_eq!(failed.len(), 1, "the cause is logged once: {panic:?}");
    assert_eq!(failed[0]["level"], "ERROR");
    assert!(
        failed[0]["error"]
            .as_str()
            .unwrap()
            .contains("boom: cause 42"),
        "{:?}",
        failed[0]
    );
    assert_eq!(panic.last().unwrap()["status"], 500);

    let all = serde_json::to_string(&lines).unwrap();
    assert!(
        !all.contains("secret-token-value"),
        "headers are not logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signing_in_logs_the_user_id_but_never_a_password_or_a_token() {
    use crate::auth::{Backend, PASSWORD, auth_app, register};
    let captured = Captured::global();
    let app = auth_app(&Backend::EMBEDDED, |_| {}).await;
    let email = format!("{}@example.com", confab_core::testing::unique("logs")).to_lowercase();
    let session = register(&app, &email).await;
    let (access, refresh) = (
        session["accessToken"].as_str().unwrap().to_owned(),
        session["refreshToken"].as_str().unwrap().to_owned(),
    );
    let user_id = session["user"]["id"].as_str().unwrap().to_owned();
    for (path, body) in [
        (
            "/api/v1/auth/login",
            serde_json::json!({"email": email, "password": PASSWORD}),
        ),
        (
            "/api/v1/auth/login",
            serde_json::json!({"email": email, "password": "wrong-password-1"}),
        ),
        (
            "/api/v1/auth/refresh",
            serde_json::json!({"refreshToken": refresh}),
        ),
    ] {
        app.client
            .post(app.url(path))
            .header("x-request-id", "auth-logs-1")
            .json(&body)
            .send()
            .await
            .unwrap();
    }
    app.client
        .get(app.url("/api/v1/users/me"))
        .header("x-request-id", "auth-logs-me")
        .bearer_auth(&access)
        .send()
        .await
        .unwrap();

    let lines = captured.lines();
    let me: Vec<_> = lines
        .iter()
        .filter(|l| l["requestId"] == "auth-logs-me")
        .collect();
    assert!(!me.is_empty());
    assert!(
        me.iter().all(|l| l["userId"] == user_id.as_str()),
        "the caller's id is on every line of the request: {me:?}"
    );
    let all = serde_json::to_string(&lines).unwrap();
    for secret in [PASSWORD, "wrong-password-1", &access, &refresh] {
        assert!(!all.contains(secret), "a secret reached the log");
    }
}
