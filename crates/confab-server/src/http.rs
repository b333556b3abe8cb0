//! HTTP: the router, assembled from each resource's router, and the layers every request
//! passes through (outermost first): request context (id, span, timeout, metrics, access log)
//! → security headers → CORS → gzip → panic → body limit → the route.

pub mod ai;
pub mod auth;
pub mod chats;
pub mod error;
pub mod extract;
pub mod media;
pub mod middleware;
pub mod ops;
pub mod users;

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderValue, Method, header};
use axum::response::{IntoResponse, Response};
use confab_core::error::ErrorCode;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::compression::CompressionLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use utoipa_swagger_ui::SwaggerUi;

use self::error::ApiError;
use self::middleware::{HttpSettings, X_REQUEST_ID};
use crate::cli::Role;
use crate::state::AppState;

/// Where the OpenAPI document is served.
pub const OPENAPI_PATH: &str = "/api/v1/openapi.json";
/// Where the browsable API docs are served.
pub const DOCS_PATH: &str = "/docs";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "confab",
        description = "The backend of an AI-assisted real-time chat product. Errors always have \
                       the ErrorBody shape; every response carries x-request-id."
    ),
    tags(
        (name = "operations", description = "Probes and metrics, outside /api/v1."),
        (name = "auth", description = "Accounts and sign-in. Public unless marked with bearerAuth."),
        (name = "users", description = "The caller's account and other users' profiles."),
        (name = "chats", description = "Chats between people: members, messages, read positions."),
        (name = "ai", description = "The AI assistant: queued requests streamed over Socket.IO, sessions, feedback, synchronous chat."),
    ),
    components(schemas(error::ErrorBody)),
    modifiers(&BearerAuth)
)]
struct ApiDoc;

/// Every operation that takes a JSON body can answer 400 (not JSON), 413 (too large), 415
/// (not `application/json`) and 422 (JSON of the wrong shape): `ApiJson` does, before the
/// handler runs. Declared here once rather than on each route, after the routes are added
/// (utoipa runs `modifiers(…)` before).
struct BodyErrors;

impl utoipa::Modify for BodyErrors {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
        let answers = [
            (
                "400",
                "The body is not valid JSON, or a field is not valid.",
            ),
            ("413", "The body is too large."),
            ("415", "The body is not sent as application/json."),
            (
                "422",
                "The body lacks a field or has one of the wrong type.",
            ),
        ];
        // axum's catch-all `{*key}` is an ordinary `{key}` to OpenAPI.
        let wildcards: Vec<String> = openapi
            .paths
            .paths
            .keys()
            .filter(|path| path.contains("{*"))
            .cloned()
            .collect();
        for path in wildcards {
            if let Some(item) = openapi.paths.paths.remove(&path) {
                openapi.paths.paths.insert(path.replace("{*", "{"), item);
            }
        }
        for item in openapi.paths.paths.values_mut() {
            let operations = [item.post.as_mut(), item.put.as_mut(), item.patch.as_mut()];
            for operation in operations.into_iter().flatten() {
                if operation.request_body.is_none() {
                    continue;
                }
                for (status, description) in answers {
                    operation
                        .responses
                        .responses
                        .entry(status.to_owned())
                        .or_insert_with(|| {
                            ResponseBuilder::new()
                                .description(description)
                                .content(
                                    "application/json",
                                    ContentBuilder::new()
                                        .schema(Some(Ref::from_schema_name("ErrorBody")))
                                        .build(),
                                )
                                .build()
                                .into()
                        });
                }
            }
        }
    }
}

/// Declares `bearerAuth`, the access token that routes marked with it need.
struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearerAuth",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

/// The documented routes: every route the API serves is added here, so the document and the
/// router cannot disagree.
/// Every role serves the probes and metrics; resource routers join under /api/v1 for the
/// `all` and `api` roles as they land.
/// `upload_limit`: the largest media upload (`uploads.max_bytes`).
fn documented_routes(role: Role, upload_limit: usize) -> OpenApiRouter<AppState> {
    let ops = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(ops::live))
        .routes(routes!(ops::ready))
        .routes(routes!(ops::health))
        .routes(routes!(ops::metrics));
    if role == Role::Worker {
        return ops;
    }
    ops.routes(routes!(auth::register))
        .routes(routes!(auth::login))
        .routes(routes!(auth::refresh))
        .routes(routes!(auth::logout))
        .routes(routes!(auth::logout_all))
        .routes(routes!(auth::verify_email))
        .routes(routes!(auth::resend_verification))
        .routes(routes!(auth::forgot_password))
        .routes(routes!(auth::reset_password))
        .routes(routes!(auth::request_otp))
        .routes(routes!(auth::verify_otp))
        .routes(routes!(auth::jwks))
        .routes(routes!(users::me, users::update_me, users::delete_me))
        .routes(routes!(users::change_password))
        .routes(routes!(users::security_events))
        .routes(routes!(users::profile))
        .routes(routes!(users::search))
        .routes(routes!(chats::create_chat, chats::list_chats))
        .routes(routes!(chats::get_chat))
        .routes(routes!(chats::add_member))
        .routes(routes!(chats::remove_member))
        .routes(routes!(chats::list_messages, chats::send_message))
        .routes(routes!(chats::edit_message, chats::delete_message))
        .routes(routes!(chats::mark_read))
        .routes(routes!(media::get_media))
        .routes(routes!(ai::post_message))
        .routes(routes!(ai::list_sessions))
        .routes(routes!(ai::get_session, ai::delete_session))
        .routes(routes!(ai::feedback))
        .routes(routes!(ai::get_request))
        .routes(routes!(ai::cancel_request))
        .routes(routes!(ai::chat))
        .routes(routes!(ai::models))
        .routes(routes!(ai::embeddings))
        .routes(routes!(ai::create_generation))
        .routes(routes!(ai::get_generation))
        .merge(
            // Their own body limit: a file, not a JSON body.
            OpenApiRouter::new()
                .routes(routes!(media::send_image))
                .routes(routes!(media::put_avatar))
                .layer(DefaultBodyLimit::max(
                    upload_limit.saturating_add(media::MULTIPART_OVERHEAD),
                )),
        )
}

/// The OpenAPI document of the full API.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut openapi =
        documented_routes(Role::All, crate::config::UploadsConfig::default().max_bytes)
            .into_openapi();
    utoipa::Modify::modify(&BodyErrors, &mut openapi);
    openapi
}

/// The whole HTTP application for `role`. `extra` routes are merged in unchanged (tests use it
/// to mount handlers that panic or take long).
/// `socket_io` is the Socket.IO layer (`/socket.io`), mounted for the `all` and `api` roles.
pub fn router(
    state: AppState,
    role: Role,
    extra: Router<AppState>,
    socket_io: socketioxide::layer::SocketIoLayer<crate::realtime::Adapter>,
) -> Router {
    let config = &state.config.server;
    let settings = Arc::new(HttpSettings {
        request_timeout: Duration::from_secs(config.request_timeout_secs),
        hsts: !config.environment.is_development(),
    });
    let (mut router, mut openapi) =
        documented_routes(role, state.config.uploads.max_bytes).split_for_parts();
    utoipa::Modify::modify(&BodyErrors, &mut openapi);
    if matches!(role, Role::All | Role::Api) {
        router = router.merge(SwaggerUi::new(DOCS_PATH).url(OPENAPI_PATH, openapi));
    }
    router = router
        .merge(extra)
        .fallback(|| async { ApiError::new(ErrorCode::NotFound, "No such route.") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                ErrorCode::MethodNotAllowed,
                "This route does not accept that method.",
            )
        });
    // After the fallbacks: a layer wraps only what the router already has, and /socket.io
    // matches no route.
    if matches!(role, Role::All | Role::Api) {
        router = router
            .layer(socket_io)
            .layer(axum::middleware::from_fn(middleware::own_socket_io_head));
    }
    router
        .layer(DefaultBodyLimit::max(config.json_body_limit_bytes))
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(CompressionLayer::new())
        .layer(cors(config.effective_cors_origins()))
        .layer(axum::middleware::from_fn_with_state(
            settings.clone(),
            middleware::security_headers,
        ))
        .layer(axum::middleware::from_fn_with_state(
            settings,
            middleware::request_context,
        ))
        .with_state(state)
}

/// A handler panicked: the cause goes to the log, the client gets a 500 in the usual shape.
#[allow(clippy::needless_pass_by_value)] // The signature tower-http's CatchPanicLayer calls.
fn panic_response(panic: Box<dyn Any + Send + 'static>) -> Response {
    let cause = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("a panic without a message");
    ApiError::internal(format!("the handler panicked: {cause}")).into_response()
}

fn cors(origins: Vec<String>) -> CorsLayer {
    let origins: Arc<[String]> = origins.into();
    CorsLayer::new()
        .allow_origin(AllowOrigin::predicate(move |origin: &HeaderValue, _| {
            origin
                .to_str()
                .is_ok_and(|origin| origin_allowed(&origins, origin))
        }))
        .allow_methods([
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
        ])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            X_REQUEST_ID.clone(),
        ])
        .expose_headers([X_REQUEST_ID.clone(), header::RETRY_AFTER])
        .max_age(Duration::from_mins(10))
}

/// Whether `origin` matches an entry of the allow-list; an entry ending in `:*` matches any
/// port of that scheme and host.
fn origin_allowed(allowed: &[String], origin: &str) -> bool {
    allowed.iter().any(|entry| match entry.strip_suffix(":*") {
        Some(base) => origin
            .strip_prefix(base)
            .and_then(|rest| rest.strip_prefix(':'))
            .is_some_and(|port| !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit())),
        None => origin == entry,
    })
}

#[cfg(test)]
mod tests {
    use super::origin_allowed;

    #[test]
    fn origins_match_exactly_or_by_any_port() {
        let list = [
            "https://app.example.com".to_owned(),
            "http://localhost:*".to_owned(),
        ];
        assert!(origin_allowed(&list, "https://app.example.com"));
        assert!(origin_allowed(&list, "http://localhost:5173"));
        assert!(!origin_allowed(&list, "http://localhost"));
        assert!(!origin_allowed(&list, "http://localhost:5173.evil.com"));
        assert!(!origin_allowed(&list, "http://localhost.evil.com:80"));
        assert!(!origin_allowed(&list, "https://app.example.com.evil.com"));
        assert!(!origin_allowed(&[], "https://app.example.com"));
    }
}
