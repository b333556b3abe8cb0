//! Extractors whose rejections are `ApiError`s, so a malformed request gets the SPEC's error
//! shape and not axum's plain-text default.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
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
