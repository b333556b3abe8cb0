//! Extractors whose rejections are `ApiError`s, so a malformed request gets the SPEC's error
//! shape and not axum's plain-text default.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use confab_core::error::ErrorCode;
use serde::de::DeserializeOwned;

use super::error::ApiError;

/// `Json<T>` with SPEC-shaped rejections: 400 for bad JSON, 413 beyond the body limit, 415
/// without a JSON content type, 422 for JSON of the wrong shape.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(json_rejection(&rejection)),
        }
    }
}

fn json_rejection(rejection: &JsonRejection) -> ApiError {
    match rejection {
        JsonRejection::JsonDataError(e) => ApiError::new(
            ErrorCode::ValidationError,
            "The request body does not have the expected fields.",
        )
        .with_status(axum::http::StatusCode::UNPROCESSABLE_ENTITY)
        .with_details(serde_json::json!({ "reason": e.body_text() })),
        JsonRejection::JsonSyntaxError(_) => {
            ApiError::validation("The request body is not valid JSON.")
        }
        JsonRejection::MissingJsonContentType(_) => ApiError::new(
            ErrorCode::UnsupportedMediaType,
            "Send the body as JSON with Content-Type: application/json.",
        ),
        JsonRejection::BytesRejection(e)
            if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE =>
        {
            ApiError::new(ErrorCode::PayloadTooLarge, "The request body is too large.")
        }
        other => ApiError::validation("The request body could not be read.")
            .with_details(serde_json::json!({ "reason": other.body_text() })),
    }
}

/// `Query<T>` with a SPEC-shaped 400 naming what is wrong.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiQuery<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(Self(value)),
            Err(rejection) => Err(query_rejection(&rejection)),
        }
    }
}

fn query_rejection(rejection: &QueryRejection) -> ApiError {
    ApiError::validation("The query string is not valid here.")
        .with_details(serde_json::json!({ "reason": rejection.body_text() }))
}

/// `Path<T>` whose rejection is a 404: a path segment of the wrong form (an id that is not a
/// UUID) names nothing that exists.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiPath<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(Self(value)),
            Err(rejection) => Err(path_rejection(&rejection)),
        }
    }
}

fn path_rejection(rejection: &PathRejection) -> ApiError {
    match rejection {
        PathRejection::FailedToDeserializePathParams(_) => ApiError::not_found(),
        other => ApiError::internal(other.body_text()),
    }
}

/// The caller, from `Authorization: Bearer <access token>`: 401 `UNAUTHENTICATED` without a
/// valid one (or one issued before the user's sessions were ended). Verifying needs no
/// database read, one cache read. Records `userId` on the request's span.
#[derive(Debug, Clone, Copy)]
pub struct Authenticated(pub confab_core::services::auth::Principal);

impl FromRequestParts<crate::state::AppState> for Authenticated {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &crate::state::AppState,
    ) -> Result<Self, Self::Rejection> {
        let token = bearer_token(&parts.headers)
            .ok_or(confab_core::services::auth::AuthError::Unauthenticated)?;
        let principal = state.auth.authenticate(token).await?;
        tracing::Span::current().record("userId", tracing::field::display(principal.user_id));
        Ok(Self(principal))
    }
}

/// The token of `Authorization: Bearer <token>`, if the request has one.
pub fn bearer_token(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| {
            value
                .strip_prefix("Bearer ")
                .or_else(|| value.strip_prefix("bearer "))
        })
        .map(str::trim)
}

/// Who is calling, for rate limits and the audit trail: the client address (the TCP peer, or
/// the last address in `server.client_ip_header` when configured) and the user agent.
#[derive(Debug, Clone, Default)]
pub struct Client(pub confab_core::services::auth::ClientInfo);

impl FromRequestParts<crate::state::AppState> for Client {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &crate::state::AppState,
    ) -> Result<Self, Self::Rejection> {
        let from_header = state
            .config
            .server
            .client_ip_header
            .as_deref()
            .and_then(|name| parts.headers.get_all(name).iter().next_back())
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.rsplit(',').next())
            .map(str::trim)
            .and_then(|ip| ip.parse::<std::net::IpAddr>().ok());
        let peer = parts
            .extensions
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|info| info.0.ip());
        let user_agent = parts
            .headers
            .get(axum::http::header::USER_AGENT)
            .and_then(|value| value.to_str().ok())
            .map(|ua| ua.chars().take(256).collect());
        Ok(Self(confab_core::services::auth::ClientInfo {
            ip: from_header.or(peer).map(|ip| ip.to_string()),
            user_agent,
        }))
    }
}
