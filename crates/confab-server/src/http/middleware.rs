//! Middleware every request passes: its context (request id, span, timeout, metrics, access
//! log) and the security headers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use confab_core::error::ErrorCode;
use tracing::Instrument;

use super::error::ApiError;

/// The header that carries the request id, both ways.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

tokio::task_local! {
    static REQUEST_ID: Arc<str>;
}

/// The id of the request being served by this task, if any.
pub fn current_request_id() -> Option<String> {
    REQUEST_ID.try_with(ToString::to_string).ok()
}

/// What the middleware needs from the configuration.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    pub request_timeout: Duration,
    /// Send `Strict-Transport-Security` (outside development).
    pub hsts: bool,
}

/// A client's request id is kept when it is short and plain (so it cannot forge log lines);
/// otherwise a UUIDv7 is made.
fn request_id(req: &Request) -> Arc<str> {
    req.headers()
        .get(&X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            (1..=128).contains(&v.len())
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        })
        .map_or_else(|| uuid::Uuid::now_v7().to_string().into(), Into::into)
}

/// A bounded label for the method: unknown extension methods share one.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

/// Gives the request its id and span, bounds its time, and records it: one access-log line and
/// the `http_*` metrics, labelled by the matched route (never the raw path).
pub async fn request_context(
    State(settings): State<Arc<HttpSettings>>,
    req: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let id = request_id(&req);
    let route: Arc<str> = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "<unmatched>".into(), |m| m.as_str().into());
    let method = method_label(req.method());
    let span = tracing::info_span!(
        "request",
        requestId = %id,
        method,
        route = %route,
        userId = tracing::field::Empty,
    );
    let timeout = settings.request_timeout;
    let handled = REQUEST_ID.scope(id.clone(), async move {
        match tokio::time::timeout(timeout, next.run(req)).await {
            Ok(response) => response,
            Err(_) => ApiError::new(
                ErrorCode::TimeoutError,
                format!("The request took longer than {} s.", timeout.as_secs()),
            )
            .into_response(),
        }
    });
    let mut response = handled.instrument(span.clone()).await;

    let status = response.status().as_u16();
    let elapsed = started.elapsed();
    metrics::counter!(
        "http_requests_total",
        "method" => method,
        "route" => route.to_string(),
        "status" => status.to_string(),
    )
    .increment(1);
    if status == 429 {
        metrics::counter!("rate_limited_total", "endpoint" => route.to_string()).increment(1);
    }
    metrics::histogram!(
        "http_request_duration_seconds",
        "method" => method,
        "route" => route.to_string(),
    )
    .record(elapsed.as_secs_f64());
    span.in_scope(|| {
        tracing::info!(
            status,
            latency_ms = elapsed.as_secs_f64() * 1000.0,
            "Request completed."
        );
    });
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(X_REQUEST_ID.clone(), value);
    }
    response
}

/// The policy for HTML (the API docs page): its own scripts and styles only.
const HTML_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
     img-src 'self' data:; connect-src 'self'; font-src 'self' data:; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";
/// Everything else (JSON) loads nothing.
const API_CSP: &str = "default-src 'none'; frame-ancestors 'none'";

/// SPEC §11: security headers on every response.
pub async fn security_headers(
    State(settings): State<Arc<HttpSettings>>,
    req: Request,
    next: Next,
) -> Response {
    let mut response = next.run(req).await;
    let is_html = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/html"));
    let headers = response.headers_mut();
    let mut set = |name: HeaderName, value: &'static str| {
        headers
            .entry(name)
            .or_insert_with(|| HeaderValue::from_static(value));
    };
    set(header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(header::X_FRAME_OPTIONS, "DENY");
    set(header::REFERRER_POLICY, "no-referrer");
    set(
        header::CONTENT_SECURITY_POLICY,
        if is_html { HTML_CSP } else { API_CSP },
    );
    if settings.hsts {
        set(
            header::STRICT_TRANSPORT_SECURITY,
            "max-age=63072000; includeSubDomains",
        );
    }
    response
}
