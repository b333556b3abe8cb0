//! Middleware every request passes: its context (request id, span, timeout, metrics, access
//! log) and the security headers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, OriginalUri, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, Uri, header};
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

/// Gives a `/socket.io/` request a head of its own before socketioxide keeps it.
///
/// socketioxide keeps each session's request head (URI, headers, extensions) for as long as
/// the socket is open. hyper parses the URI and the header values as slices of the
/// connection's read buffer, so a kept head kept that whole buffer alive: 16 KiB per open
/// socket, the largest part of what a connection costs (BENCHMARKS.md). Copied here, the
/// buffer is freed once the request is parsed. The router's `OriginalUri` is a clone of the
/// same URI and is replaced too; other extensions hold no slice of it.
pub async fn own_socket_io_head(mut req: Request, next: Next) -> Response {
    if is_socket_io(req.uri().path()) {
        let uri = owned_uri(req.uri());
        if let Some(original) = req.extensions_mut().get_mut::<OriginalUri>() {
            original.0 = uri.clone();
        }
        *req.uri_mut() = uri;
        let headers = req.headers();
        let mut owned = HeaderMap::with_capacity(headers.len());
        for (name, value) in headers {
            let mut copy =
                HeaderValue::from_bytes(value.as_bytes()).unwrap_or_else(|_| value.clone());
            copy.set_sensitive(value.is_sensitive());
            owned.append(name.clone(), copy);
        }
        *req.headers_mut() = owned;
    }
    next.run(req).await
}

/// Whether socketioxide serves `path`: its path, or below it (as engineioxide matches).
fn is_socket_io(path: &str) -> bool {
    path.strip_prefix(crate::realtime::SOCKET_IO_PATH)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// `uri` in memory of its own.
fn owned_uri(uri: &Uri) -> Uri {
    Uri::try_from(uri.to_string()).unwrap_or_else(|_| uri.clone())
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

#[cfg(test)]
mod tests {
    use axum::Router;
    use axum::body::{Body, Bytes};
    use axum::http::StatusCode;
    use tower::ServiceExt;

    use super::*;

    /// A request as hyper parses one: its URI and header value are slices of `buffer`.
    fn parsed(buffer: &Bytes, path_len: usize) -> Request {
        let mut req = Request::new(Body::empty());
        *req.uri_mut() = Uri::from_maybe_shared(buffer.slice(..path_len)).unwrap();
        req.headers_mut().insert(
            header::AUTHORIZATION,
            HeaderValue::from_maybe_shared(buffer.slice(path_len..)).unwrap(),
        );
        req
    }

    /// What the handler behind the middleware gets: whether its URI, `OriginalUri` and
    /// header value still point into `buffer`, as 200 (none does) or 409 (one does).
    async fn served(buffer: &Bytes, path_len: usize) -> StatusCode {
        let kept = buffer.clone();
        let app = Router::new()
            .fallback(move |req: Request| async move {
                let inside = |part: &[u8]| kept.as_ptr_range().contains(&part.as_ptr());
                let original = req.extensions().get::<OriginalUri>().unwrap();
                let auth = req.headers().get(header::AUTHORIZATION).unwrap();
                if inside(req.uri().path().as_bytes())
                    || inside(original.0.path().as_bytes())
                    || inside(auth.as_bytes())
                {
                    StatusCode::CONFLICT
                } else {
                    assert_eq!(auth.as_bytes(), b"Bearer abc");
                    StatusCode::OK
                }
            })
            .layer(axum::middleware::from_fn(own_socket_io_head));
        app.oneshot(parsed(buffer, path_len))
            .await
            .unwrap()
            .status()
    }

    #[test]
    fn a_socket_io_head_no_longer_holds_the_read_buffer_other_requests_are_left_alone() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let socket_io = Bytes::from(b"/socket.io/?EIO=4&transport=websocketBearer abc".to_vec());
        assert_eq!(runtime.block_on(served(&socket_io, 37)), StatusCode::OK);
        let bare = Bytes::from(b"/socket.io?EIO=4Bearer abc".to_vec());
        assert_eq!(runtime.block_on(served(&bare, 16)), StatusCode::OK);
        // Not Socket.IO: nothing is copied (so the check above can tell).
        let other = Bytes::from(b"/ai/modelsBearer abc".to_vec());
        assert_eq!(runtime.block_on(served(&other, 10)), StatusCode::CONFLICT);
        let lookalike = Bytes::from(b"/socket.iox/Bearer abc".to_vec());
        assert_eq!(
            runtime.block_on(served(&lookalike, 12)),
            StatusCode::CONFLICT
        );
    }
}
