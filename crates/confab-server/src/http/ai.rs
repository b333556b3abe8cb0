//! `/api/v1/ai/*` (SPEC §3 "AI assistant"): queued requests, sessions, feedback, the answer
//! so far and cancelling it, the synchronous `/ai/chat` (JSON or Server-Sent Events), and
//! the configured models with their circuits. Every route needs an access token; another
//! user's session, message or request is a 404.

use std::convert::Infallible;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use confab_core::domain::{AiMessage, AiMessageId, AiRequestId, AiSession, AiSessionId};
use confab_core::error::ErrorCode;
use confab_core::services::ai::{AiError, Ask, FRIENDLY_FAILURE, StreamState};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::auth::rfc3339;
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiJson, ApiPath, Authenticated};
use crate::state::AppState;

impl From<AiError> for ApiError {
    fn from(err: AiError) -> Self {
        let code = ErrorCode::from(&err);
        match err {
            AiError::Unconfigured => Self::new(
                code,
                "No AI provider is configured: set OPENAI_API_KEY (or OPENAI_BASE_URL for a compatible server), or OLLAMA_BASE_URL and OLLAMA_MODEL.",
            ),
            AiError::Validation(message) => Self::validation(format!("{message}.")),
            AiError::UnknownModel(models) => Self::validation("No such model is configured.")
                .with_details(serde_json::json!({ "field": "model", "models": models })),
            AiError::NotFound => Self::not_found(),
            AiError::RateLimited { retry_after } => {
                Self::new(code, "Too many AI requests; wait a moment.")
                    .with_retry_after(retry_after.as_secs().max(1))
            }
            AiError::Finished => Self::new(code, "The answer is already finished."),
            AiError::Busy => Self::new(code, "The answer is being worked on; try again shortly."),
            // The provider's message goes to the log, not to the client.
            AiError::Upstream { message, .. } => Self::new(
                code,
                if code == ErrorCode::Unavailable {
                    "No configured AI provider offers embeddings (Ollama needs OLLAMA_EMBEDDING_MODEL)."
                } else {
                    FRIENDLY_FAILURE
                },
            )
            .with_source(message),
            AiError::Store(e) => e.into(),
        }
    }
}

/// An AI message (SPEC §3).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AiMessageBody {
    pub id: String,
    pub session_id: String,
    pub request_id: String,
    /// `user` | `assistant`
    pub role: String,
    pub content: String,
    /// `complete` | `streaming` | `failed` | `cancelled`
    pub status: String,
    pub model: Option<String>,
    pub provider: Option<String>,
    pub cached: bool,
    pub latency_ms: Option<i64>,
    pub usage: UsageBody,
    pub error_code: Option<String>,
    pub created_at: String,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsageBody {
    pub prompt_tokens: Option<i64>,
    pub completion_tokens: Option<i64>,
}

impl From<&AiMessage> for AiMessageBody {
    fn from(m: &AiMessage) -> Self {
        Self {
            id: m.id.to_string(),
            session_id: m.session_id.to_string(),
            request_id: m.request_id.to_string(),
            role: m.role.clone(),
            content: m.content.clone(),
            status: m.status.clone(),
            model: m.model.clone(),
            provider: m.provider.clone(),
            cached: m.cached,
            latency_ms: m.latency_ms,
            usage: UsageBody {
                prompt_tokens: m.prompt_tokens,
                completion_tokens: m.completion_tokens,
            },
            error_code: m.error_code.clone(),
            created_at: rfc3339(m.created_at),
        }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AskRequest {
    /// At most 10,000 characters.
    pub message: String,
    /// Continue this session; a new one otherwise.
    #[schema(value_type = Option<String>)]
    pub session_id: Option<AiSessionId>,
    /// A configured model (or provider) to try first; see `GET /ai/models`.
    pub model: Option<String>,
    /// `POST /ai/chat` only: answer as Server-Sent Events.
    #[serde(default)]
    pub stream: bool,
}

impl AskRequest {
    fn ask(self) -> Ask {
        Ask {
            message: self.message,
            session_id: self.session_id,
            model: self.model,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct QueuedBody {
    pub session_id: String,
    pub request_id: String,
    /// `queued`
    pub status: &'static str,
}

/// Queues a request for the assistant; the answer streams to the caller's sockets
/// (`ai:token` … `ai:response`, or `ai:error`).
#[utoipa::path(post, path = "/api/v1/ai/messages", tag = "ai",
    security(("bearerAuth" = [])),
    request_body = AskRequest,
    responses(
        (status = 202, description = "Queued.", body = QueuedBody),
        (status = 400, description = "Empty or too long, or an unknown model.", body = ErrorBody),
        (status = 401, description = "No valid access token.", body = ErrorBody),
        (status = 404, description = "No such session.", body = ErrorBody),
        (status = 422, description = "The body lacks a field or has one of the wrong type.", body = ErrorBody),
        (status = 429, description = "Too many requests this minute.", body = ErrorBody),
        (status = 503, description = "No AI provider is configured.", body = ErrorBody),
    ))]
pub async fn post_message(
    State(state): State<AppState>,
    Authenticated(who): Authenticated,
    ApiJson(body): ApiJson<AskRequest>,
) -> Result<(StatusCode, Json<QueuedBody>), ApiError> {
    let submitted = state.ai.submit(who.user_id, body.ask()).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(QueuedBody {
            session_id: submitted.session_id.to_string(),
            request_id: submitted.request_id.to_string(),
            status: "queued",
        }),
    ))
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionBody {
    pub id: String,
    pub title: String,
    /// `idle` | `queued` | `processing` | `failed`
    pub status: String,
    pub created_at: String,
    pub updated_at: String,
    /// In `GET /ai/sessions/{id}` only: the last 200, oldest first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<AiMessageBody>>,
}

impl SessionBody {
    fn new(s: &AiSession, messages: Option<&[AiMessage]>) -> Self {
        Self {
            id: s.id.to_string(),
            title: s.title.clone(),
            status: s.status.clone(),
            created_at: rfc3339(s.created_at),
            updated_at: rfc3339(s.updated_at),
            messages: messages.map(|m| m.iter().map(AiMessageBody::from).collect()),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionPage {
    pub items: Vec<SessionBody>,
    /// Always null: the 200 most recently updated sessions are listed.
    pub next_cursor: Option<String>,
}

/// The caller's sessions, most recently updated first.
#[utoipa::path(get, path = "/api/v1/ai/sessions", tag = "ai",
    security(("bearerAuth" = [])),
    responses(
        (status = 200, description = "The sessions.", body = SessionPage),
        (status = 401, description = "No valid access token.", body = ErrorBody),
    ))]
pub async fn list_sessions(
    State(state): State<AppState>,
    Authenticated(who): Authenticated,
) -> Result<Json<SessionPage>, ApiError> {
    let sessions = state.ai.sessions(who.user_id, 200).await?;
    Ok(Json(SessionPage {
        items: sessions.iter().map(|s| SessionBody::new(s, None)).collect(),
        next_cursor: None,
    }))
}

/// A session: its status and messages.
#[utoipa::path(get, path = "/api/v1/ai/sessions/{id}", tag = "ai",
    security(("bearerAuth" = [])),
    params(("id" = String, Path, description = "A session id")),
    responses(
        (status = 200, description = "The session.", body = SessionBody),
        (status = 401, description = "No valid access token.", body = ErrorBody),
        (status = 404, description = "No such session of the caller's.", body = ErrorBody),
    ))]
pub async fn get_session(
    State(state): State<AppState>,
    Authenticated(who): Authenticated,
    ApiPath(id): ApiPath<AiSessionId>,
) -> Result<Json<SessionBody>, ApiError> {
    let (session, messages) = state.ai.session(who.user_id, id).await?;
    Ok(Json(SessionBody::new(&session, Some(&messages))))
}

/// Deletes a session and its messages.
#[utoipa::path(delete, path = "/api/v1/ai/sessions/{id}", tag = "ai",
    security(("bearerAuth" = [])),
    params(("id" = String, Path, description = "A session id")),
    responses(
        (status = 204, description = "Deleted."),
        (status = 401, description = "No valid access token.", body = ErrorBody),
        (status = 404, description = "No such session of the caller's.", body = ErrorBody),
    ))]
pub async fn delete_session(
    State(state): State<AppState>,
    Authenticated(who): Authenticated,
    ApiPath(id): ApiPath<AiSessionId>,
) -> Result<StatusCode, ApiError> {
    state.ai.delete_session(who.user_id, id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FeedbackRequest {
    /// `up` | `down`
    pub rating: String,
    pub comment: Option<String>,
}

/// Rates an answer; a second rating replaces the first.
#[utoipa::path(post, path = "/api/v1/ai/messages/{id}/feedback", tag = "ai",
    security(("bearerAuth" = [])),
    params(("id" = String, Path, description = "An AI message id (an answer)")),
    request_body = FeedbackRequest,
    responses(
        (status = 204, description = "Kept."),
        (status = 400, description = "A rating other than up/down, or not an answer.", body = ErrorBody),
        (status = 401, description = "No valid access token.", body = ErrorBody),
        (status = 404, description = "No such message in the caller's sessions.", body = ErrorBody),
        (status = 422, description = "The body lacks a field or has one of the wrong type.", body = ErrorBody),
    ))]
pub async fn feedback(
    State(state): State<AppState>,
    Authenticated(who): Authenticated,
    ApiPath(id): ApiPath<AiMessageId>,
    ApiJson(body): ApiJson<FeedbackRequest>,
) -> Result<StatusCode, ApiError> {
    state
        .ai
        .feedback(who.user_id, id, &body.rating, body.comment)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StreamBody {
    pub request_id: String,
    pub session_id: String,
    /// `queued` | `streaming` | `complete` | `failed` | `cancelled`
    pub status: String,
    /// The answer so far (the whole answer once finished).
    pub content: String,
    /// How many `ai:token` pieces `content` holds: skip events with a lower `index`. Null
    /// once finished (`content` is the whole answer).
    pub tokens: Option<u64>,
}

impl From<StreamState> for StreamBody {
    fn from(s: StreamState) -> Self {
        Self {
            request_id: s.request_id.to_string(),
            session_id: s.session_id.to_string(),
            status: s.status,
            content: s.content,
            tokens: s.tokens,
        }
    }
}

/// The answer to a request so far: what a client that reloads or opens a second tab shows
/// before following the rest through `ai:token`. Connect the socket first, then fetch:
/// while the answer streams, this waits for a save of it made after the call began (the
/// answer so far is saved every 200 ms), so it holds every piece sent before the socket
/// was there, and the socket hears the rest.
#[utoipa::path(get, path = "/api/v1/ai/requests/{id}", tag = "ai",
    security(("bearerAuth" = [])),
    params(("id" = String, Path, description = "A request id")),
    responses(
        (status = 200, description = "The answer so far.", body = StreamBody),
        (status = 401, description = "No valid access token.", body = ErrorBody),
        (status = 404, description = "No such request of the caller's.", body = ErrorBody),
    ))]
pub async fn get_request(
    State(state): State<AppState>,
    Authenticated(who): Authenticated,
    ApiPath(id): ApiPath<AiRequestId>,
) -> Result<Json<StreamBody>, ApiError> {
    Ok(Json(state.ai.stream_state(who.user_id, id).await?.into()))
}

/// Stops a generation; what was produced is kept as a `cancelled` answer.
#[utoipa::path(post, path = "/api/v1/ai/requests/{id}/cancel", tag = "ai",
    security(("bearerAuth" = [])),
    params(("id" = String, Path, description = "A request id")),
    responses(
        (status = 202, description = "The generation stops within a moment."),
        (status = 401, description = "No valid access token.", body = ErrorBody),
        (status = 404, description = "No such request of the caller's.", body = ErrorBody),
        (status = 409, description = "The answer is already finished.", body = ErrorBody),
    ))]
pub async fn cancel_request(
    State(state): State<AppState>,
    Authenticated(who): Authenticated,
    ApiPath(id): ApiPath<AiRequestId>,
) -> Result<StatusCode, ApiError> {
    state.ai.cancel(who.user_id, id).await?;
    Ok(StatusCode::ACCEPTED)
}

/// What the answering task tells the `/ai/chat` handler.
enum Piece {
    Delta(String),
    Done(Box<Result<AiMessage, AiError>>),
}

/// Asks the assistant and waits for the answer (JSON), or with `"stream": true` follows it as
/// Server-Sent Events: `data: {"delta": "…"}` … then `data: {"done": true, "message": {…}}`.
#[utoipa::path(post, path = "/api/v1/ai/chat", tag = "ai",
    security(("bearerAuth" = [])),
    request_body = AskRequest,
    responses(
        (status = 200, description = "The answer (or, with stream, an event stream).",
            content((AiMessageBody = "application/json"), (String = "text/event-stream"))),
        (status = 400, description = "Empty or too long, or an unknown model.", body = ErrorBody),
        (status = 401, description = "No valid access token.", body = ErrorBody),
        (status = 404, description = "No such session.", body = ErrorBody),
        (status = 422, description = "The body lacks a field or has one of the wrong type.", body = ErrorBody),
        (status = 429, description = "Too many requests this minute.", body = ErrorBody),
        (status = 502, description = "No provider could answer.", body = ErrorBody),
        (status = 503, description = "No AI provider is configured.", body = ErrorBody),
        (status = 504, description = "No provider answered in time.", body = ErrorBody),
    ))]
pub async fn chat(
    State(state): State<AppState>,
    Authenticated(who): Authenticated,
    ApiJson(body): ApiJson<AskRequest>,
) -> Result<Response, ApiError> {
    let stream = body.stream;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Piece>();
    let ai = state.ai.clone();
    let user = who.user_id;
    // Its own task: a client that leaves does not cut between the answer and its storing.
    tokio::spawn(async move {
        let deltas = tx.clone();
        let mut on_delta = move |piece: &str| {
            if stream {
                let _ = deltas.send(Piece::Delta(piece.to_owned()));
            }
        };
        let result = ai.chat(user, body.ask(), &mut on_delta).await;
        let _ = tx.send(Piece::Done(Box::new(result)));
    });
    let first = rx
        .recv()
        .await
        .ok_or_else(|| ApiError::internal("the answering task stopped"))?;
    let first = match first {
        Piece::Done(result) => {
            return finished(*result)
                .map(|m| Json(m).into_response())
                .map_err(|e| *e);
        }
        Piece::Delta(d) => d,
    };
    // Streaming has begun: from here on, failures are events.
    let events = futures_util::stream::unfold(
        (Some(Piece::Delta(first)), rx),
        |(pending, mut rx)| async move {
            let piece = match pending {
                Some(p) => p,
                None => rx.recv().await?,
            };
            let event = match piece {
                Piece::Delta(delta) => {
                    Event::default().data(serde_json::json!({ "delta": delta }).to_string())
                }
                Piece::Done(result) => {
                    let data = match finished(*result) {
                        Ok(message) => {
                            serde_json::json!({ "done": true, "message": message })
                        }
                        Err(e) => serde_json::json!({
                            "done": true,
                            "error": { "code": e.code().as_str(), "message": FRIENDLY_FAILURE },
                        }),
                    };
                    Event::default().data(data.to_string())
                }
            };
            Some((Ok::<_, Infallible>(event), (None, rx)))
        },
    );
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// A finished `/ai/chat` answer as JSON, or the error a failed one is.
fn finished(result: Result<AiMessage, AiError>) -> Result<AiMessageBody, Box<ApiError>> {
    let message = result.map_err(|e| Box::new(ApiError::from(e)))?;
    if message.status == "failed" {
        let code = message
            .error_code
            .as_deref()
            .and_then(ErrorCode::from_wire)
            .unwrap_or(ErrorCode::ApiError);
        return Err(Box::new(
            ApiError::new(code, FRIENDLY_FAILURE)
                .with_details(serde_json::json!({ "messageId": message.id })),
        ));
    }
    Ok(AiMessageBody::from(&message))
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelBody {
    pub provider: String,
    pub model: String,
    /// `closed` | `open` | `half_open`
    pub circuit: &'static str,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelsBody {
    /// The chain, primary first; empty when no provider is configured.
    pub items: Vec<ModelBody>,
}

/// The configured chain: each link's provider, model and circuit state.
#[utoipa::path(get, path = "/api/v1/ai/models", tag = "ai",
    security(("bearerAuth" = [])),
    responses(
        (status = 200, description = "The chain.", body = ModelsBody),
        (status = 401, description = "No valid access token.", body = ErrorBody),
    ))]
pub async fn models(
    State(state): State<AppState>,
    Authenticated(_who): Authenticated,
) -> Json<ModelsBody> {
    let items = state
        .ai
        .chain()
        .map(|chain| {
            chain
                .links()
                .iter()
                .map(|l| ModelBody {
                    provider: l.provider().to_owned(),
                    model: l.model().to_owned(),
                    circuit: l.circuit().as_str(),
                })
                .collect()
        })
        .unwrap_or_default();
    Json(ModelsBody { items })
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EmbeddingsRequest {
    /// 1 to 256 texts, each at most 10,000 characters.
    pub input: Vec<String>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EmbeddingBody {
    pub index: usize,
    pub embedding: Vec<f32>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EmbeddingsBody {
    /// One vector per input, in the order given.
    pub data: Vec<EmbeddingBody>,
    pub provider: String,
}

/// Vectors for texts, from the configured embedding model.
#[utoipa::path(post, path = "/api/v1/ai/embeddings", tag = "ai",
    security(("bearerAuth" = [])),
    request_body = EmbeddingsRequest,
    responses(
        (status = 200, description = "The vectors.", body = EmbeddingsBody),
        (status = 400, description = "No input, too many, or one too long.", body = ErrorBody),
        (status = 401, description = "No valid access token.", body = ErrorBody),
        (status = 422, description = "The body lacks a field or has one of the wrong type.", body = ErrorBody),
        (status = 429, description = "Too many requests this minute.", body = ErrorBody),
        (status = 502, description = "The provider failed.", body = ErrorBody),
        (status = 503, description = "No provider (with embeddings) is configured.", body = ErrorBody),
    ))]
pub async fn embeddings(
    State(state): State<AppState>,
    Authenticated(who): Authenticated,
    ApiJson(body): ApiJson<EmbeddingsRequest>,
) -> Result<Json<EmbeddingsBody>, ApiError> {
    let embedded = state.ai.embed(who.user_id, &body.input).await?;
    Ok(Json(EmbeddingsBody {
        data: embedded
            .vectors
            .into_iter()
            .enumerate()
            .map(|(index, embedding)| EmbeddingBody { index, embedding })
            .collect(),
        provider: embedded.provider,
    }))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GenerationRequest {
    /// `text` | `image`
    pub kind: String,
    /// 1 to 4000 characters.
    pub prompt: String,
    /// 1 to 4 (default 1).
    pub n: Option<u32>,
    /// A configured provider (see `GET /ai/models`); the chain otherwise.
    pub provider: Option<String>,
}

/// A generation job (SPEC §3).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct GenerationBody {
    pub id: String,
    /// `text` | `image`
    pub kind: String,
    pub prompt: String,
    pub n: i32,
    pub provider: Option<String>,
    /// `queued` | `processing` | `succeeded` | `failed`
    pub status: String,
    /// Texts as `{text}`; images as `{url, thumbnailUrl, width, height, contentType}` (URLs
    /// signed afresh on every read).
    #[schema(value_type = Vec<Object>)]
    pub results: Vec<serde_json::Value>,
    pub error_code: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

async fn generation_body(
    state: &AppState,
    job: confab_core::domain::GenerationJob,
) -> GenerationBody {
    let mut results = Vec::new();
    for item in job
        .results
        .as_ref()
        .and_then(serde_json::Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Ok(image) =
            serde_json::from_value::<confab_core::services::media::StoredImage>(item.clone())
        {
            let (Ok(url), Ok(thumbnail_url)) = (
                state.media.url(&image.key).await,
                state.media.url(&image.thumbnail_key).await,
            ) else {
                continue;
            };
            results.push(serde_json::json!({
                "url": url,
                "thumbnailUrl": thumbnail_url,
                "width": image.width,
                "height": image.height,
                "contentType": image.content_type,
            }));
        } else {
            results.push(item.clone());
        }
    }
    GenerationBody {
        id: job.id.to_string(),
        kind: job.kind,
        prompt: job.prompt,
        n: job.n,
        provider: job.provider,
        status: job.status,
        results,
        error_code: job.error_code,
        created_at: rfc3339(job.created_at),
        updated_at: rfc3339(job.updated_at),
    }
}

/// Queues a text or image generation.
#[utoipa::path(post, path = "/api/v1/ai/generations", tag = "ai",
    security(("bearerAuth" = [])),
    request_body = GenerationRequest,
    responses(
        (status = 202, description = "Queued.", body = GenerationBody),
        (status = 400, description = "A bad kind, prompt, n or provider.", body = ErrorBody),
        (status = 401, description = "No valid access token.", body = ErrorBody),
        (status = 422, description = "The body lacks a field or has one of the wrong type.", body = ErrorBody),
        (status = 429, description = "Too many requests this minute.", body = ErrorBody),
        (status = 503, description = "No AI provider is configured.", body = ErrorBody),
    ))]
pub async fn create_generation(
    State(state): State<AppState>,
    Authenticated(who): Authenticated,
    ApiJson(body): ApiJson<GenerationRequest>,
) -> Result<(StatusCode, Json<GenerationBody>), ApiError> {
    let ask = confab_core::services::ai::GenerationAsk {
        kind: body.kind,
        prompt: body.prompt,
        n: body.n,
        provider: body.provider,
    };
    let job = state.ai.create_generation(who.user_id, ask).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(generation_body(&state, job).await),
    ))
}

/// A generation job: its status and, once done, its results.
#[utoipa::path(get, path = "/api/v1/ai/generations/{id}", tag = "ai",
    security(("bearerAuth" = [])),
    params(("id" = String, Path, description = "A generation id")),
    responses(
        (status = 200, description = "The job.", body = GenerationBody),
        (status = 401, description = "No valid access token.", body = ErrorBody),
        (status = 404, description = "No such job of the caller's.", body = ErrorBody),
    ))]
pub async fn get_generation(
    State(state): State<AppState>,
    Authenticated(who): Authenticated,
    ApiPath(id): ApiPath<confab_core::domain::GenerationId>,
) -> Result<Json<GenerationBody>, ApiError> {
    let job = state.ai.generation(who.user_id, id).await?;
    Ok(Json(generation_body(&state, job).await))
}
