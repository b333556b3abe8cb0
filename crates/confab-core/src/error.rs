//! The error vocabulary shared by every layer.
//!
//! [`ErrorCode`] is the wire code of SPEC §3: the HTTP layer maps it to a status, Socket.IO acks
//! reuse it. [`ServiceError`] is the taxonomy of SPEC §8 for failures of a service confab calls
//! (an LLM provider, a webhook, a mail server): it names the service and keeps the cause, and
//! says whether trying again may help.

use std::borrow::Cow;
use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A boxed error cause, as kept by [`ServiceError`].
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// Every error code a client can see (SPEC §3 "Errors", §8 taxonomy).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    ValidationError,
    Unauthenticated,
    Forbidden,
    NotFound,
    MethodNotAllowed,
    Conflict,
    PayloadTooLarge,
    UnsupportedMediaType,
    RateLimited,
    AccountLocked,
    ConfigError,
    InternalError,
    NetworkError,
    ApiError,
    RateLimitError,
    Unavailable,
    TimeoutError,
    UnknownError,
}

impl ErrorCode {
    /// The code as it appears on the wire, e.g. `"VALIDATION_ERROR"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::ValidationError => "VALIDATION_ERROR",
            Self::Unauthenticated => "UNAUTHENTICATED",
            Self::Forbidden => "FORBIDDEN",
            Self::NotFound => "NOT_FOUND",
            Self::MethodNotAllowed => "METHOD_NOT_ALLOWED",
            Self::Conflict => "CONFLICT",
            Self::PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            Self::UnsupportedMediaType => "UNSUPPORTED_MEDIA_TYPE",
            Self::RateLimited => "RATE_LIMITED",
            Self::AccountLocked => "ACCOUNT_LOCKED",
            Self::ConfigError => "CONFIG_ERROR",
            Self::InternalError => "INTERNAL_ERROR",
            Self::NetworkError => "NETWORK_ERROR",
            Self::ApiError => "API_ERROR",
            Self::RateLimitError => "RATE_LIMIT_ERROR",
            Self::Unavailable => "UNAVAILABLE",
            Self::TimeoutError => "TIMEOUT_ERROR",
            Self::UnknownError => "UNKNOWN_ERROR",
        }
    }

    /// The code a wire string names, e.g. a stored `error_code`.
    pub fn from_wire(code: &str) -> Option<Self> {
        serde_json::from_value(serde_json::Value::String(code.to_owned())).ok()
    }

    /// The HTTP status that carries this code (SPEC §3).
    pub const fn http_status(self) -> u16 {
        match self {
            Self::ValidationError => 400,
            Self::Unauthenticated => 401,
            Self::Forbidden => 403,
            Self::NotFound => 404,
            Self::MethodNotAllowed => 405,
            Self::Conflict => 409,
            Self::PayloadTooLarge => 413,
            Self::UnsupportedMediaType => 415,
            Self::AccountLocked => 423,
            Self::RateLimited | Self::RateLimitError => 429,
            Self::ConfigError | Self::InternalError | Self::UnknownError => 500,
            Self::NetworkError | Self::ApiError => 502,
            Self::Unavailable => 503,
            Self::TimeoutError => 504,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What went wrong with a service confab depends on (SPEC §8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceErrorKind {
    /// The service is configured wrongly (a missing key, a bad URL). Not worth retrying.
    Config,
    /// The service could not be reached (DNS, refused, reset).
    Network,
    /// The service answered with a non-success status other than 429.
    Api,
    /// The service said "too many requests"; `retry_after` is its hint when it gave one.
    RateLimit { retry_after: Option<Duration> },
    /// The service did not answer in time.
    Timeout,
    /// What we sent, or what came back, does not have the expected shape.
    Validation,
    /// Anything else.
    Unknown,
}

impl ServiceErrorKind {
    /// The wire code for this kind.
    pub const fn code(self) -> ErrorCode {
        match self {
            Self::Config => ErrorCode::ConfigError,
            Self::Network => ErrorCode::NetworkError,
            Self::Api => ErrorCode::ApiError,
            Self::RateLimit { .. } => ErrorCode::RateLimitError,
            Self::Timeout => ErrorCode::TimeoutError,
            Self::Validation => ErrorCode::ValidationError,
            Self::Unknown => ErrorCode::UnknownError,
        }
    }

    /// Whether the same call may succeed if tried again later.
    pub const fn is_transient(self) -> bool {
        matches!(self, Self::Network | Self::RateLimit { .. } | Self::Timeout)
    }

    /// Whether an operator must act (SPEC §8: these notify the configured webhook).
    pub const fn is_critical(self) -> bool {
        matches!(self, Self::Config | Self::Api)
    }
}

/// A failure of a named service, with its cause kept for the logs.
#[derive(Debug, thiserror::Error)]
#[error("{service}: {message}")]
pub struct ServiceError {
    pub kind: ServiceErrorKind,
    pub service: Cow<'static, str>,
    pub message: String,
    #[source]
    pub source: Option<BoxError>,
}

impl ServiceError {
    pub fn new(
        kind: ServiceErrorKind,
        service: impl Into<Cow<'static, str>>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            kind,
            service: service.into(),
            message: message.into(),
            source: None,
        }
    }

    /// Keeps `source` as the cause of this error.
    #[must_use]
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(source.into());
        self
    }

    pub const fn code(&self) -> ErrorCode {
        self.kind.code()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_serializes_as_its_wire_string() {
        for code in [
            ErrorCode::ValidationError,
            ErrorCode::MethodNotAllowed,
            ErrorCode::RateLimited,
            ErrorCode::RateLimitError,
            ErrorCode::TimeoutError,
            ErrorCode::AccountLocked,
        ] {
            let json = serde_json::to_value(code).expect("unit variants serialize");
            assert_eq!(json, code.as_str());
        }
    }

    #[test]
    fn statuses_follow_the_spec_table() {
        assert_eq!(ErrorCode::ValidationError.http_status(), 400);
        assert_eq!(ErrorCode::AccountLocked.http_status(), 423);
        assert_eq!(ErrorCode::ApiError.http_status(), 502);
        assert_eq!(ErrorCode::TimeoutError.http_status(), 504);
        assert_eq!(ErrorCode::Unavailable.http_status(), 503);
    }

    #[test]
    fn transient_kinds_are_network_timeout_and_rate_limit() {
        assert!(ServiceErrorKind::Network.is_transient());
        assert!(ServiceErrorKind::Timeout.is_transient());
        assert!(ServiceErrorKind::RateLimit { retry_after: None }.is_transient());
        assert!(!ServiceErrorKind::Api.is_transient());
        assert!(!ServiceErrorKind::Config.is_transient());
        assert!(ServiceErrorKind::Api.is_critical());
        assert!(!ServiceErrorKind::Timeout.is_critical());
    }

    #[test]
    fn service_error_names_the_service_and_keeps_the_cause() {
        let cause = std::io::Error::other("connection reset");
        let err = ServiceError::new(ServiceErrorKind::Network, "openai", "request failed")
            .with_source(cause);
        assert_eq!(err.to_string(), "openai: request failed");
        assert_eq!(err.code(), ErrorCode::NetworkError);
        assert!(std::error::Error::source(&err).is_some());
    }
}
