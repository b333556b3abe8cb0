//! Media (SPEC §3 "Media", §11): image messages, avatars, and serving objects to those allowed
//! to see them. Uploads are multipart, read a chunk at a time against the limit (never
//! buffered past it), and processed by `MediaService` off the async workers.

// utoipa's expansion of `params(SomeQuery)` qualifies paths the lint calls unnecessary.
#![allow(unused_qualifications)]

use axum::Json;
use axum::body::Body;
use axum::extract::multipart::{MultipartError, MultipartRejection};
use axum::extract::{Multipart, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use confab_core::domain::ChatId;
use confab_core::error::ErrorCode;
use confab_core::ports::blob::{BlobError, BlobKey, BlobMeta};
use confab_core::services::media::{MediaError, Owner};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::chats::{MessageBody, message_body};
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiPath, ApiQuery, Authenticated, bearer_token};
use crate::state::AppState;

/// Room for the multipart framing and the text fields around a file of the largest size.
pub const MULTIPART_OVERHEAD: usize = 64 * 1024;

impl From<MediaError> for ApiError {
    fn from(err: MediaError) -> Self {
        let message = err.to_string();
        match err {
            MediaError::Unsupported => Self::new(ErrorCode::UnsupportedMediaType, message),
            MediaError::TooLarge { .. } | MediaError::TooManyPixels => {
                Self::new(ErrorCode::PayloadTooLarge, message)
            }
            MediaError::TimedOut => Self::new(ErrorCode::Unavailable, message).with_retry_after(5),
            MediaError::RateLimited { retry_after } => Self::new(ErrorCode::RateLimited, message)
                .with_retry_after(retry_after.as_secs().max(1)),
            MediaError::Corrupt => {
                Self::validation(message).with_details(serde_json::json!({ "field": "file" }))
            }
            MediaError::Blob(BlobError::Unavailable(source)) => {
                Self::new(ErrorCode::Unavailable, "Media storage is unavailable.")
                    .with_source(source)
                    .with_retry_after(5)
            }
            MediaError::Blob(other) => Self::internal(other),
            MediaError::Chat(e) => e.into(),
        }
    }
}

/// The multipart form of an image upload.
#[derive(Debug, ToSchema)]
#[allow(dead_code)] // Documents the form; the handler reads it field by field.
pub struct ImageForm {
    /// JPEG, PNG, WebP or GIF, judged by its content; at most `uploads.max_bytes`.
    #[schema(value_type = String, format = Binary)]
    file: Vec<u8>,
    /// Image messages only: up to 10,000 characters.
    caption: Option<String>,
    /// Image messages only: a retry with the same one returns the same message.
    #[schema(rename = "clientId")]
    client_id: Option<String>,
}

/// What an upload carried.
#[derive(Debug, Default)]
struct Upload {
    file: Option<Vec<u8>>,
    caption: Option<String>,
    client_id: Option<String>,
}

fn multipart_error(error: &MultipartError) -> ApiError {
    if error.status() == StatusCode::PAYLOAD_TOO_LARGE {
        too_large()
    } else {
        ApiError::validation(format!(
            "The multipart body is malformed: {}",
            error.body_text()
        ))
    }
}

fn too_large() -> ApiError {
    ApiError::new(ErrorCode::PayloadTooLarge, "The file is too large.")
}

fn not_multipart(rejection: &MultipartRejection) -> ApiError {
    ApiError::new(
        ErrorCode::UnsupportedMediaType,
        "Send the image as multipart/form-data with a `file` field.",
    )
    .with_source(rejection.body_text())
}

/// Reads the form: the file a chunk at a time, refused as soon as it passes `max_bytes`.
async fn read_upload(mut form: Multipart, max_bytes: usize) -> Result<Upload, ApiError> {
    const MAX_TEXT: usize = 48 * 1024;
    let mut upload = Upload::default();
    while let Some(mut field) = form.next_field().await.map_err(|e| multipart_error(&e))? {
        let name = field.name().unwrap_or_default().to_owned();
        match name.as_str() {
            "file" => {
                if upload.file.is_some() {
                    return Err(ApiError::validation("Send one file.")
                        .with_details(serde_json::json!({ "field": "file" })));
                }
                let mut bytes = Vec::new();
                while let Some(chunk) = field.chunk().await.map_err(|e| multipart_error(&e))? {
                    if bytes.len() + chunk.len() > max_bytes {
                        return Err(discard_rest(form).await);
                    }
                    bytes.extend_from_slice(&chunk);
                }
                upload.file = Some(bytes);
            }
            "caption" | "clientId" => {
                let mut text = Vec::new();
                while let Some(chunk) = field.chunk().await.map_err(|e| multipart_error(&e))? {
                    if text.len() + chunk.len() > MAX_TEXT {
                        return Err(ApiError::validation(format!("{name} is too long."))
                            .with_details(serde_json::json!({ "field": name })));
                    }
                    text.extend_from_slice(&chunk);
                }
                let text = String::from_utf8(text).map_err(|_| {
                    ApiError::validation(format!("{name} is not UTF-8."))
                        .with_details(serde_json::json!({ "field": name }))
                })?;
                if name == "caption" {
                    upload.caption = Some(text);
                } else {
                    upload.client_id = Some(text);
                }
            }
            // Unknown fields are skipped (the next call discards the rest of this one).
            _ => {}
        }
    }
    Ok(upload)
}

/// Takes room for an upload (held until the caller drops it), then reads the form: the
/// upload's fields and its file.
async fn receive(
    state: &AppState,
    who: confab_core::domain::UserId,
    headers: &HeaderMap,
    form: Result<Multipart, MultipartRejection>,
) -> Result<(tokio::sync::OwnedSemaphorePermit, Upload, Vec<u8>), ApiError> {
    let max_bytes = state.media.limits().max_bytes;
    // A declared length beyond the limit is refused from the headers: a client waiting with
    // `Expect: 100-continue` never sends the body.
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > (max_bytes + MULTIPART_OVERHEAD) as u64) {
        return Err(too_large());
    }
    state.media.limit_uploads(who).await?;
    let room = state.media.admit().ok_or_else(busy)?;
    let form = form.map_err(|e| not_multipart(&e))?;
    let mut upload = read_upload(form, max_bytes).await?;
    let file = upload.file.take().ok_or_else(no_file)?;
    Ok((room, upload, file))
}

/// The node holds as many uploads as it will at once.
fn busy() -> ApiError {
    ApiError::new(
        ErrorCode::Unavailable,
        "Too many uploads in progress; try again in a moment.",
    )
    .with_retry_after(1)
}

/// A file past the limit: the rest of the body (at most the multipart allowance, which the
/// body limit holds) is read and dropped before the 413 goes out. Closing a connection with
/// the body unread resets it, and a client still sending could lose the answer.
async fn discard_rest(mut form: Multipart) -> ApiError {
    while let Ok(Some(mut field)) = form.next_field().await {
        while let Ok(Some(_)) = field.chunk().await {}
    }
    too_large()
}

fn no_file() -> ApiError {
    ApiError::validation("The form has no `file` field.")
        .with_details(serde_json::json!({ "field": "file" }))
}

/// Sends an image (with an optional caption); a retry with the same `clientId` returns the
/// stored message (200). The image is re-encoded (metadata stripped) and a thumbnail made.
#[utoipa::path(post, path = "/api/v1/chats/{id}/messages/image", tag = "chats",
    security(("bearerAuth" = [])),
    params(("id" = String, Path, description = "A chat id")),
    request_body(content = ImageForm, content_type = "multipart/form-data"),
    responses(
        (status = 200, description = "Already stored under this clientId.", body = MessageBody),
        (status = 201, description = "Stored.", body = MessageBody),
        (status = 400, description = "No file, a caption too long, a bad clientId, or an image that cannot be read.", body = ErrorBody),
        (status = 401, description = "No valid access token.", body = ErrorBody),
        (status = 404, description = "No such chat, or not a member.", body = ErrorBody),
        (status = 413, description = "Larger than the limit, or more pixels than allowed.", body = ErrorBody),
        (status = 415, description = "Not a JPEG, PNG, WebP or GIF (whatever its name says).", body = ErrorBody),
        (status = 429, description = "Too many messages, or too many uploads.", body = ErrorBody),
        (status = 503, description = "Too many uploads in progress, or processing took too long; retry.", body = ErrorBody),
    ))]
pub async fn send_image(
    State(state): State<AppState>,
    Authenticated(who): Authenticated,
    ApiPath(id): ApiPath<ChatId>,
    headers: HeaderMap,
    form: Result<Multipart, MultipartRejection>,
) -> Result<(StatusCode, Json<MessageBody>), ApiError> {
    // A non-member's upload is not even read.
    state.chats.check_member(who.user_id, id).await?;
    let (_room, upload, file) = receive(&state, who.user_id, &headers, form).await?;
    // Its own task: a client that goes away (or the request timeout) cannot stop it between
    // storing the objects and the message that refers to them.
    let (media, chats) = (state.media.clone(), state.chats.clone());
    let sent = tokio::spawn(async move {
        media
            .send_image(
                &chats,
                who.user_id,
                id,
                file,
                upload.caption.as_deref(),
                upload.client_id.as_deref(),
            )
            .await
    })
    .await
    .map_err(ApiError::internal)??;
    if !sent.created {
        let audience = state.chats.audience(who.user_id, id).await?;
        let body = message_body(&state.media, sent.message, &audience).await;
        return Ok((StatusCode::OK, Json(body)));
    }
    // Stored: the broadcaster shows it to every member online.
    let image = state.media.image_urls(&sent.message).await;
    let body = MessageBody::new_message(sent.message, sent.kind, image);
    Ok((StatusCode::CREATED, Json(body)))
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AvatarBody {
    /// Signed; works for a while (fetch the profile again for a fresh one).
    pub avatar_url: String,
}

/// Sets the caller's avatar (the previous one is deleted).
#[utoipa::path(put, path = "/api/v1/users/me/avatar", tag = "users",
    security(("bearerAuth" = [])),
    request_body(content = ImageForm, content_type = "multipart/form-data"),
    responses(
        (status = 200, description = "The new avatar.", body = AvatarBody),
        (status = 400, description = "No file, or an image that cannot be read.", body = ErrorBody),
        (status = 401, description = "No valid access token.", body = ErrorBody),
        (status = 413, description = "Larger than the limit, or more pixels than allowed.", body = ErrorBody),
        (status = 415, description = "Not a JPEG, PNG, WebP or GIF.", body = ErrorBody),
        (status = 429, description = "Too many uploads.", body = ErrorBody),
        (status = 503, description = "Too many uploads in progress, or processing took too long; retry.", body = ErrorBody),
    ))]
pub async fn put_avatar(
    State(state): State<AppState>,
    Authenticated(who): Authenticated,
    headers: HeaderMap,
    form: Result<Multipart, MultipartRejection>,
) -> Result<Json<AvatarBody>, ApiError> {
    let (_room, _, file) = receive(&state, who.user_id, &headers, form).await?;
    // Its own task, like an image message: never cut between the objects and the account.
    let (media, auth) = (state.media.clone(), state.auth.clone());
    let stored = tokio::spawn(async move {
        let stored = media.store_avatar(who.user_id, file).await?;
        if let Err(error) = auth.set_avatar(who, &stored.key).await {
            if let Err(error) = media.delete(&stored.keys()).await {
                tracing::warn!(%error, "Cannot delete an unused avatar.");
            }
            return Err(ApiError::from(error));
        }
        Ok::<_, ApiError>(stored)
    })
    .await
    .map_err(ApiError::internal)??;
    Ok(Json(AvatarBody {
        avatar_url: state.media.url(&stored.key).await?,
    }))
}

/// Read leniently: a value that does not parse is as good as a wrong signature (404).
#[derive(Debug, Deserialize, IntoParams)]
pub struct MediaQuery {
    /// With `sig`: when the URL stops working (Unix seconds).
    #[param(value_type = Option<i64>)]
    pub exp: Option<String>,
    /// The URL's signature.
    pub sig: Option<String>,
    /// At most 256: the thumbnail.
    #[param(value_type = Option<u32>)]
    pub w: Option<String>,
}

/// A media object, for a valid signed URL or the access token of a user allowed to see it
/// (chat members for a chat's images; anyone signed in for avatars). Anything else is a 404.
#[utoipa::path(get, path = "/api/v1/media/{*key}", tag = "media",
    params(("key" = String, Path, description = "The object's key, as in a media URL"), MediaQuery),
    responses(
        (status = 200, description = "The bytes, with ETag and Cache-Control."),
        (status = 304, description = "Not modified (If-None-Match)."),
        (status = 404, description = "No such object, a bad or expired signature, or not allowed.", body = ErrorBody),
    ))]
pub async fn get_media(
    State(state): State<AppState>,
    key: Result<Path<String>, axum::extract::rejection::PathRejection>,
    ApiQuery(query): ApiQuery<MediaQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Ok(Path(key)) = key else {
        return Err(ApiError::not_found());
    };
    let key = BlobKey::parse(&key).map_err(|_| ApiError::not_found())?;
    let owner = Owner::of(&key).ok_or_else(ApiError::not_found)?;
    let expires = query.exp.as_deref().and_then(|e| e.parse::<i64>().ok());
    let signed = match (expires, query.sig.as_deref()) {
        (Some(exp), Some(sig)) => state.media.verify(&key, exp, sig).then_some(exp),
        _ => None,
    };
    if signed.is_none() && !token_allows(&state, &headers, owner).await {
        return Err(ApiError::not_found());
    }
    let thumbnail = query
        .w
        .as_deref()
        .and_then(|w| w.parse::<u32>().ok())
        .is_some_and(|w| w <= state.media.limits().thumbnail_px);
    // A key's bytes never change (a new picture gets a new key): a signed URL may be cached
    // until it expires; a token's answer is checked again each time.
    let cache_control = match signed {
        Some(exp) => {
            let left = (exp - confab_core::domain::now().timestamp()).max(0);
            format!("private, max-age={left}, immutable")
        }
        None => "private, no-cache".to_owned(),
    };
    let if_none_match = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok());
    let mut response = if let Some(tags) = if_none_match {
        // A conditional GET looks at the metadata only.
        let meta = state
            .media
            .head(&key, thumbnail)
            .await?
            .ok_or_else(ApiError::not_found)?;
        let etag = etag_of(&meta);
        if tags
            .split(',')
            .any(|tag| tag.trim() == etag || tag.trim() == "*")
        {
            with_headers(
                StatusCode::NOT_MODIFIED.into_response(),
                &etag,
                &cache_control,
            )
        } else {
            serve(&state, &key, thumbnail, &cache_control).await?
        }
    } else {
        serve(&state, &key, thumbnail, &cache_control).await?
    };
    response.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; sandbox"),
    );
    Ok(response)
}

/// The object's bytes, streamed, with its type, length and ETag.
async fn serve(
    state: &AppState,
    key: &BlobKey,
    thumbnail: bool,
    cache_control: &str,
) -> Result<Response, ApiError> {
    let object = state
        .media
        .open(key, thumbnail)
        .await?
        .ok_or_else(ApiError::not_found)?;
    let etag = etag_of(&object.meta);
    let mut ok = Body::from_stream(object.bytes).into_response();
    let out = ok.headers_mut();
    out.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(object.content_type),
    );
    out.insert(header::CONTENT_LENGTH, HeaderValue::from(object.meta.size));
    Ok(with_headers(ok, &etag, cache_control))
}

/// A strong ETag from the store's (or from size and time when it has none).
fn etag_of(meta: &BlobMeta) -> String {
    let tag = meta
        .etag
        .clone()
        .unwrap_or_else(|| format!("{}-{}", meta.size, meta.last_modified.timestamp_micros()));
    format!("\"{}\"", tag.replace('"', ""))
}

fn with_headers(mut response: Response, etag: &str, cache_control: &str) -> Response {
    let out = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(etag) {
        out.insert(header::ETAG, value);
    }
    if let Ok(value) = HeaderValue::from_str(cache_control) {
        out.insert(header::CACHE_CONTROL, value);
    }
    response
}

/// Whether the request's access token is a user's who may see objects of `owner`.
async fn token_allows(state: &AppState, headers: &HeaderMap, owner: Owner) -> bool {
    let Some(token) = bearer_token(headers) else {
        return false;
    };
    let Ok(who) = state.auth.authenticate(token).await else {
        return false;
    };
    match owner {
        Owner::Avatar => true,
        Owner::User(user) => user == who.user_id,
        Owner::Chat(chat) => state.chats.check_member(who.user_id, chat).await.is_ok(),
    }
}
