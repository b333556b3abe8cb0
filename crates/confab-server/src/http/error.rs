//! `ApiError`: every error response, in the SPEC §3 shape
//! `{code, message, details, requestId}` with the matching status.
//!
//! A 5xx logs its whole cause chain once, here, and answers with an opaque message: internal
//! detail never reaches a client.

use std::borrow::Cow;
use std::fmt::Write as _;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use confab_core::error::{BoxError, ErrorCode, ServiceError};
use serde::Serialize;
use utoipa::ToSchema;

use super::middleware::current_request_id;

/// The body of every error response.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    /// A stable, machine-readable code, e.g. `VALIDATION_ERROR`.
    #[schema(example = "VALIDATION_ERROR")]
    pub code: &'static str,
    /// A human sentence.
    pub message: String,
    /// Structured detail (which field, what limit); `{}` when there is none.
    #[schema(value_type = Object)]
    pub details: serde_json::Value,
    /// The request id, as in the `x-request-id` response header.
    pub request_id: String,
}

/// An error a handler returns; turns into the SPEC's error response.
#[derive(Debug)]
pub struct ApiError {
    code: ErrorCode,
    message: Cow<'static, str>,
    details: serde_json::Value,
    retry_after_secs: Option<u64>,
    status: Option<StatusCode>,
    source: Option<BoxError>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<Cow<'static, str>>) -> Self {
        Self {
            code,
            message: message.into(),
            details: serde_json::Value::Object(serde_json::Map::new()),
            retry_after_secs: None,
            status: None,
            source: None,
        }
    }

    pub fn validation(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorCode::ValidationError, message)
    }

    pub fn not_found() -> Self {
        Self::new(ErrorCode::NotFound, "No such resource.")
    }

    /// An unexpected failure: the cause is logged, the client sees an opaque message.
    pub fn internal(source: impl Into<BoxError>) -> Self {
        Self::new(
            ErrorCode::InternalError,
            "Something went wrong on our side.",
        )
        .with_source(source)
    }

    #[must_use]
    pub fn with_details(mut self, details: serde_json::Value) -> Self {
        self.details = details;
        self
    }

    #[must_use]
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// Adds `Retry-After` (seconds) to the response.
    #[must_use]
    pub fn with_retry_after(mut self, secs: u64) -> Self {
        self.retry_after_secs = Some(secs);
        self
    }

    /// Answers with `status` instead of the code's usual one (422 for `VALIDATION_ERROR`).
    #[must_use]
    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = Some(status);
        self
    }

    pub fn code(&self) -> ErrorCode {
        self.code
    }

    pub fn status(&self) -> StatusCode {
        if let Some(status) = self.status {
            return status;
        }
        StatusCode::from_u16(self.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

/// A failure of a service we call is never the client's fault: it answers 502 (the service
/// failed or sent nonsense), 503 (it is busy: `Retry-After`), 504 (it timed out) or 500 (we
/// are misconfigured), and its cause is always logged.
impl From<ServiceError> for ApiError {
    fn from(err: ServiceError) -> Self {
        use confab_core::error::ServiceErrorKind as Kind;
        let (code, message) = match err.kind {
            Kind::Config => (ErrorCode::ConfigError, "Something went wrong on our side."),
            Kind::Timeout => (
                ErrorCode::TimeoutError,
                "A service we depend on did not answer in time.",
            ),
            Kind::RateLimit { .. } => (
                ErrorCode::Unavailable,
                "A service we depend on is busy; try again shortly.",
            ),
            Kind::Network => (
                ErrorCode::NetworkError,
                "A service we depend on cannot be reached.",
            ),
            Kind::Api | Kind::Validation | Kind::Unknown => {
                (ErrorCode::ApiError, "A service we depend on failed.")
            }
        };
        let mut api = Self::new(code, message).with_details(serde_json::json!({
            "service": err.service,
            "reason": err.code().as_str(),
        }));
        if let Kind::RateLimit {
            retry_after: Some(after),
        } = err.kind
        {
            api = api.with_retry_after(after.as_secs().max(1));
        }
        api.with_source(err)
    }
}

/// What a store failure means to a client: a missing row is 404, a uniqueness rule 409, a
/// database that cannot be reached 503 (try again shortly); anything else is our bug.
impl From<confab_core::ports::store::StoreError> for ApiError {
    fn from(err: confab_core::ports::store::StoreError) -> Self {
        use confab_core::ports::store::StoreError;
        match err {
            StoreError::NotFound(_) => Self::not_found(),
            StoreError::Conflict(_) => Self::new(ErrorCode::Conflict, "That already exists."),
            StoreError::Unavailable(_) => Self::new(
                ErrorCode::Unavailable,
                "The service is briefly unavailable; try again shortly.",
            )
            .with_retry_after(1)
            .with_source(err),
            StoreError::Other(_) => Self::internal(err),
        }
    }
}

/// What an auth refusal tells a client: never which part of a credential was wrong, nor
/// whether an account exists.
impl From<confab_core::services::auth::AuthError> for ApiError {
    fn from(err: confab_core::services::auth::AuthError) -> Self {
        use confab_core::services::auth::AuthError;
        let secs = |d: std::time::Duration| d.as_secs().max(1);
        match err {
            AuthError::InvalidCredentials => Self::new(
                ErrorCode::Unauthenticated,
                "The email, password or token is not valid.",
            ),
            AuthError::Unauthenticated => Self::new(
                ErrorCode::Unauthenticated,
                "Sign in: this needs a valid access token.",
            ),
            AuthError::Locked { retry_after } => Self::new(
                ErrorCode::AccountLocked,
                "Too many failed sign-ins: the account is locked for a while.",
            )
            .with_retry_after(secs(retry_after)),
            AuthError::RateLimited { retry_after } => {
                Self::new(ErrorCode::RateLimited, "Too many requests; slow down.")
                    .with_retry_after(secs(retry_after))
            }
            AuthError::Invalid { field, message } => {
                Self::validation(format!("{field} {message}."))
                    .with_details(serde_json::json!({ "field": field }))
            }
            AuthError::InvalidLink => Self::validation("This link is invalid or has expired.")
                .with_details(serde_json::json!({ "field": "token" })),
            AuthError::EmailTaken => Self::new(
                ErrorCode::Conflict,
                "An account with this email already exists.",
            )
            .with_details(serde_json::json!({ "field": "email" })),
            AuthError::WrongPassword => {
                Self::new(ErrorCode::Forbidden, "The current password is wrong.")
                    .with_details(serde_json::json!({ "field": "current" }))
            }
            AuthError::NotFound => Self::not_found(),
            AuthError::Store(e) => e.into(),
            AuthError::Internal(e) => Self::internal(e),
        }
    }
}

/// The error and its causes, `outer: inner: innermost`.
fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut next = err.source();
    while let Some(cause) = next {
        let _ = write!(out, ": {cause}");
        next = cause.source();
    }
    out
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        // A cause is logged once, here; a 5xx without one (a timeout) is in the access log.
        if let Some(source) = &self.source {
            if status.is_server_error() {
                tracing::error!(
                    code = self.code.as_str(),
                    error = %chain(source.as_ref()),
                    "Request failed."
                );
            } else {
                tracing::warn!(
                    code = self.code.as_str(),
                    error = %chain(source.as_ref()),
                    "Request refused."
                );
            }
        }
        let body = ErrorBody {
            code: self.code.as_str(),
            message: self.message.into_owned(),
            details: self.details,
            request_id: current_request_id().unwrap_or_default(),
        };
        let mut response = (status, axum::Json(body)).into_response();
        if let Some(secs) = self.retry_after_secs {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use confab_core::error::{ServiceError, ServiceErrorKind};

    use super::*;

    fn status_and_retry(kind: ServiceErrorKind) -> (u16, Option<String>) {
        let response = ApiError::from(ServiceError::new(kind, "openai", "x")).into_response();
        let retry = response
            .headers()
            .get(header::RETRY_AFTER)
            .map(|v| v.to_str().unwrap().to_owned());
        (response.status().as_u16(), retry)
    }

    #[test]
    fn service_failures_are_never_the_clients_fault() {
        assert_eq!(status_and_retry(ServiceErrorKind::Validation).0, 502);
        assert_eq!(status_and_retry(ServiceErrorKind::Api).0, 502);
        assert_eq!(status_and_retry(ServiceErrorKind::Unknown).0, 502);
        assert_eq!(status_and_retry(ServiceErrorKind::Network).0, 502);
        assert_eq!(status_and_retry(ServiceErrorKind::Timeout).0, 504);
        assert_eq!(status_and_retry(ServiceErrorKind::Config).0, 500);
        let busy = ServiceErrorKind::RateLimit {
            retry_after: Some(Duration::from_millis(2500)),
        };
        assert_eq!(status_and_retry(busy), (503, Some("2".into())));
    }
}
