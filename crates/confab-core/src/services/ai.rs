//! The AI assistant (SPEC §3 "AI assistant", §6, §8): requests through the queue, answers
//! streamed from the provider chain, cached, stored once.
//!
//! The flow: [`AiService::submit`] (an API node) stores the user's message and the request's
//! intent (an outbox row for `chat_requests`) in one transaction. A worker takes the request
//! and calls [`AiService::answer_request`]: the answer cache, else the chain, each piece
//! relayed as it arrives ([`AiEvents::token`]) and the answer so far kept in the cache
//! (`ai:stream:{request}`), so a client that reloads can fetch it and follow the rest. The
//! finished answer ([`Response`]) goes to `chat_responses`; an API node stores it with
//! [`AiService::record_response`] (once: a redelivered answer finds its row) and tells the
//! user ([`AiEvents::response`] / [`AiEvents::error`]).

pub mod chain;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use self::chain::{Answer, Chain, Failure, Link};
use crate::domain::{
    AiFeedback, AiMessage, AiMessageId, AiRequestId, AiSession, AiSessionId, ChatId, EventId,
    GenerationId, GenerationJob, Message, MessageId, MessageKind, OutboxEntry, Page,
    ServiceErrorId, StoredServiceError, Timestamp, UserId, now,
};
use crate::error::{ErrorCode, ServiceError};
use crate::ports::broker::queues;
use crate::ports::cache::{Cache, RateLimit, keys};
use crate::ports::llm::GeneratedImage;
use crate::ports::llm::{Role, Turn, Usage};
use crate::ports::store::{Store, StoreError};
use crate::services::chats::{ChatError, ChatService, Draft};

/// What the user reads when no provider could answer.
pub const FRIENDLY_FAILURE: &str =
    "Sorry, the assistant cannot answer right now. Please try again in a moment.";

/// The `chat_requests` message kind.
pub const REQUEST_KIND: &str = "ai.request";
/// The `chat_responses` message kind.
pub const RESPONSE_KIND: &str = "ai.response";
/// The `chat_requests` message kind of a generation job (`POST /ai/generations`).
pub const GENERATION_KIND: &str = "ai.generation";

/// `POST /ai/generations`.
#[derive(Debug, Clone, Default)]
pub struct GenerationAsk {
    /// `text` | `image`
    pub kind: String,
    pub prompt: String,
    pub n: Option<u32>,
    /// A configured provider to use (the chain otherwise).
    pub provider: Option<String>,
}

/// What a generation produced, before the worker stores images.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Generated {
    Texts {
        provider: String,
        texts: Vec<String>,
    },
    Images {
        provider: String,
        images: Vec<GeneratedImage>,
    },
    Failed {
        code: ErrorCode,
        detail: String,
    },
}

/// The `chat_requests` message kind of an `@assistant` mention in a people chat.
pub const MENTION_KIND: &str = "ai.mention";

/// The `chat_requests` payload of a mention: the message that called the assistant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Mention {
    pub chat_id: ChatId,
    pub message_id: MessageId,
    pub user_id: UserId,
}

/// A piece of an answer to a mention (`ai:token` to `chat:<id>`): `messageId` is the
/// message that called the assistant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ChatToken {
    pub chat_id: ChatId,
    pub message_id: MessageId,
    pub delta: String,
    pub index: u64,
}

#[derive(Debug, Clone)]
pub struct AiSettings {
    /// Requests per user and minute (`POST /ai/messages`, `ai:send`, `/ai/chat` together).
    pub requests_per_minute: u32,
    /// The session's last N messages sent to the model as context.
    pub context_messages: u32,
    pub system_prompt: String,
    pub max_tokens: Option<u32>,
    pub max_message_chars: usize,
    pub cache_ttl: Duration,
}

impl Default for AiSettings {
    fn default() -> Self {
        Self {
            requests_per_minute: 10,
            context_messages: 20,
            system_prompt: "You are a helpful assistant.".into(),
            max_tokens: None,
            max_message_chars: 10_000,
            cache_ttl: keys::AI_RESPONSE_TTL,
        }
    }
}

/// Where the live output of answers goes: the user's sockets, on whatever node holds them.
pub trait AiEvents: Send + Sync {
    fn token(&self, user: UserId, token: Token);
    fn response(&self, user: UserId, message: &AiMessage);
    fn error(&self, user: UserId, error: &AiFailureEvent);
    /// A piece of an answer to an `@assistant` mention, to everyone in the chat's room.
    fn chat_token(&self, chat: ChatId, token: ChatToken);
}

/// One piece of an answer (`ai:token`). `index` counts the pieces of the request from 0, so
/// a client that fetched the answer so far (which says how many pieces it holds) skips the
/// ones it has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Token {
    pub session_id: AiSessionId,
    pub request_id: AiRequestId,
    pub delta: String,
    pub index: u64,
}

/// `ai:error`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AiFailureEvent {
    pub session_id: AiSessionId,
    pub request_id: AiRequestId,
    pub code: String,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AiError {
    #[error("no AI provider is configured")]
    Unconfigured,
    #[error("{0}")]
    Validation(String),
    #[error("no such model; configured: {}", .0.join(", "))]
    UnknownModel(Vec<String>),
    #[error("not found")]
    NotFound,
    #[error("too many requests")]
    RateLimited { retry_after: Duration },
    #[error("the answer is already finished")]
    Finished,
    /// Another worker is answering this request now: retry later.
    #[error("another worker is answering this request")]
    Busy,
    /// A provider failed a call answered in the caller's time (embeddings).
    #[error("{message}")]
    Upstream { code: ErrorCode, message: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// `POST /ai/messages`, `ai:send`, `POST /ai/chat`.
#[derive(Debug, Clone, Default)]
pub struct Ask {
    pub message: String,
    pub session_id: Option<AiSessionId>,
    pub model: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Submitted {
    pub session_id: AiSessionId,
    pub request_id: AiRequestId,
}

/// The `chat_requests` payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Request {
    pub request_id: AiRequestId,
    pub session_id: AiSessionId,
    pub user_id: UserId,
    pub model: Option<String>,
}

/// The `chat_responses` payload: a finished answer, failed or cancelled ones included.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Response {
    pub request_id: AiRequestId,
    pub session_id: AiSessionId,
    pub user_id: UserId,
    pub content: String,
    /// `complete` | `failed` | `cancelled`
    pub status: String,
    pub model: Option<String>,
    pub provider: Option<String>,
    pub cached: bool,
    pub latency_ms: i64,
    pub prompt_tokens: Option<i64>,
    pub completion_tokens: Option<i64>,
    pub error_code: Option<String>,
    /// The provider's error, for the stored service error (never shown to the user).
    pub error_detail: Option<String>,
}

impl Response {
    /// Whether an operator should hear of it (SPEC §8: `CONFIG_ERROR`, `API_ERROR`).
    pub fn is_critical(&self) -> bool {
        matches!(
            self.error_code.as_deref(),
            Some("CONFIG_ERROR" | "API_ERROR")
        )
    }
}

/// An answer in progress, or how it ended (`GET /ai/requests/{id}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StreamState {
    pub request_id: AiRequestId,
    pub session_id: AiSessionId,
    /// `queued` | `streaming` | `complete` | `failed` | `cancelled`
    pub status: String,
    /// The answer so far.
    pub content: String,
    /// How many pieces `content` holds: `ai:token` events with a lower index are in it.
    /// `None` once the answer is finished (`content` is all of it).
    pub tokens: Option<u64>,
}

/// A cached answer (`ai:response:{hash}`).
#[derive(Debug, Serialize, Deserialize)]
struct CachedAnswer {
    content: String,
    provider: String,
    model: String,
}

/// How often the answer so far is saved and the cancel flag read while a provider streams.
const STREAM_TICK: Duration = Duration::from_millis(200);
/// How long the answer so far and a cancel request are kept.
const STREAM_TTL: Duration = Duration::from_hours(1);

/// The answer so far as kept under [`stream_key`]: `saves` counts the saves, so a reader
/// can tell a save made after it looked.
#[derive(Serialize)]
struct Progress<'a> {
    content: &'a str,
    tokens: u64,
    saves: u64,
}

/// [`Progress`] as read back.
#[derive(serde::Deserialize)]
struct SavedProgress {
    content: String,
    tokens: u64,
    #[serde(default)]
    saves: u64,
}

/// What an answering task saved so far: the piece count and how many saves.
#[derive(Clone, Copy)]
struct Saved {
    tokens: Option<u64>,
    saves: u64,
}

fn stream_key(request: AiRequestId) -> String {
    format!("ai:stream:{request}")
}

fn cancel_key(request: AiRequestId) -> String {
    format!("ai:cancel:{request}")
}

/// Who is answering a request right now: a counter that lives [`CLAIM_TTL`] and is renewed
/// while the answer streams. Two copies of one request (two nodes relayed the same outbox
/// row, or a redelivery while the first is still running) find it taken, and the later one
/// is retried after the queue's backoff rather than calling the provider a second time;
/// a worker that died stops renewing it, so a retry takes over soon after.
fn claim_key(request: AiRequestId) -> String {
    format!("ai:claim:{request}")
}

const CLAIM_TTL: Duration = Duration::from_secs(5);
/// Every how many [`STREAM_TICK`]s a streaming answer renews its claim (once a second).
const CLAIM_RENEW_TICKS: u32 = 5;

pub struct AiService {
    store: Arc<dyn Store>,
    cache: Arc<dyn Cache>,
    chain: Option<Arc<Chain>>,
    settings: AiSettings,
    events: Arc<dyn AiEvents>,
    /// Called after a request's intent commits (wakes the outbox relay).
    published: Option<Arc<dyn Fn() + Send + Sync>>,
    /// Where answers to `@assistant` mentions are posted.
    chats: Option<Arc<ChatService>>,
}

impl AiService {
    pub fn new(
        store: Arc<dyn Store>,
        cache: Arc<dyn Cache>,
        chain: Option<Arc<Chain>>,
        settings: AiSettings,
        events: Arc<dyn AiEvents>,
    ) -> Self {
        Self {
            store,
            cache,
            chain,
            settings,
            events,
            published: None,
            chats: None,
        }
    }

    /// Answers to `@assistant` mentions are posted through `chats`.
    #[must_use]
    pub fn with_chats(mut self, chats: Arc<ChatService>) -> Self {
        self.chats = Some(chats);
        self
    }

    /// `wake` runs after a request's intent commits, so the relay publishes it at once.
    #[must_use]
    pub fn on_published(mut self, wake: Arc<dyn Fn() + Send + Sync>) -> Self {
        self.published = Some(wake);
        self
    }

    pub fn chain(&self) -> Option<&Arc<Chain>> {
        self.chain.as_ref()
    }

    fn configured(&self) -> Result<&Arc<Chain>, AiError> {
        self.chain.as_ref().ok_or(AiError::Unconfigured)
    }

    fn check(&self, ask: &Ask) -> Result<(), AiError> {
        let chain = self.configured()?;
        let chars = ask.message.chars().count();
        if ask.message.trim().is_empty() {
            return Err(AiError::Validation("message must not be empty".into()));
        }
        if chars > self.settings.max_message_chars {
            return Err(AiError::Validation(format!(
                "message must be at most {} characters (got {chars})",
                self.settings.max_message_chars
            )));
        }
        if chain.order(ask.model.as_deref()).is_none() {
            return Err(AiError::UnknownModel(chain.describe()));
        }
        Ok(())
    }

    async fn limit(&self, user: UserId) -> Result<(), AiError> {
        let key = keys::rate(&format!("user:{user}"), "ai");
        let rate = RateLimit::per_minute(self.settings.requests_per_minute);
        match self.cache.rate_limit(&key, rate).await {
            Ok(d) if !d.allowed => Err(AiError::RateLimited {
                retry_after: d.retry_after,
            }),
            Ok(_) | Err(_) => Ok(()),
        }
    }

    /// The caller's session, or a new one titled from the message (not yet stored).
    async fn session_for(&self, user: UserId, ask: &Ask) -> Result<(AiSession, bool), AiError> {
        if let Some(id) = ask.session_id {
            let session = self.owned_session(user, id).await?;
            return Ok((session, false));
        }
        let at = now();
        let title: String = ask.message.trim().chars().take(60).collect();
        Ok((
            AiSession {
                id: AiSessionId::new(),
                user_id: user,
                title,
                status: "idle".into(),
                created_at: at,
                updated_at: at,
            },
            true,
        ))
    }

    async fn owned_session(&self, user: UserId, id: AiSessionId) -> Result<AiSession, AiError> {
        match self.store.ai_session(id).await? {
            Some(s) if s.user_id == user => Ok(s),
            _ => Err(AiError::NotFound),
        }
    }

    fn user_message(
        session: AiSessionId,
        request: AiRequestId,
        text: &str,
        at: Timestamp,
    ) -> AiMessage {
        AiMessage {
            id: AiMessageId::new(),
            session_id: session,
            request_id: request,
            role: "user".into(),
            content: text.to_owned(),
            status: "complete".into(),
            model: None,
            provider: None,
            cached: false,
            latency_ms: None,
            prompt_tokens: None,
            completion_tokens: None,
            error_code: None,
            created_at: at,
        }
    }

    /// Queues a request (SPEC §3 `POST /ai/messages`): the user's message and the request's
    /// intent commit together; the answer comes later over Socket.IO.
    pub async fn submit(&self, user: UserId, ask: Ask) -> Result<Submitted, AiError> {
        self.check(&ask)?;
        self.limit(user).await?;
        let (mut session, new) = self.session_for(user, &ask).await?;
        let request = AiRequestId::new();
        let at = now();
        let tx = self.store.begin().await?;
        if new {
            // Born queued: one statement fewer on the way to the answer.
            session.status = "queued".into();
            tx.create_ai_session(&session).await?;
        }
        tx.insert_ai_message(&Self::user_message(session.id, request, &ask.message, at))
            .await?;
        if !new {
            tx.set_ai_session_status(session.id, "queued", at).await?;
        }
        let payload = Request {
            request_id: request,
            session_id: session.id,
            user_id: user,
            model: ask.model,
        };
        tx.enqueue(&OutboxEntry {
            id: EventId::new(),
            queue: queues::CHAT_REQUESTS.into(),
            kind: REQUEST_KIND.into(),
            payload: serde_json::to_value(&payload).map_err(|e| StoreError::Other(e.into()))?,
            trace_id: None,
            created_at: at,
        })
        .await?;
        tx.commit().await?;
        if let Some(wake) = &self.published {
            wake();
        }
        self.remember_status(session.id, "queued").await;
        Ok(Submitted {
            session_id: session.id,
            request_id: request,
        })
    }

    async fn remember_status(&self, session: AiSessionId, status: &str) {
        let _ = self
            .cache
            .set(
                &keys::ai_session_status(&session.to_string()),
                status.as_bytes(),
                Some(keys::AI_SESSION_STATUS_TTL),
            )
            .await;
    }

    /// The worker's part: answers one queued request, streaming its pieces to the user.
    /// `None` when there is nothing to do: the answer is already stored (a redelivery), or
    /// the request is gone with its session.
    pub async fn answer_request(&self, request: &Request) -> Result<Option<Response>, AiError> {
        if self
            .store
            .ai_message_for_request(request.request_id, "assistant")
            .await?
            .is_some()
        {
            return Ok(None);
        }
        let Some(asked) = self
            .store
            .ai_message_for_request(request.request_id, "user")
            .await?
        else {
            return Ok(None);
        };
        let started = Instant::now();
        if self.cancelled(request.request_id).await {
            return Ok(Some(Response::of(
                request,
                Outcome::Cancelled(String::new()),
                started,
            )));
        }
        let Some(chain) = self.chain.clone() else {
            return Err(AiError::Unconfigured);
        };
        // Without the cache, copies are not told apart (the answer is still stored once).
        if let Ok(holders) = self
            .cache
            .incr(&claim_key(request.request_id), 1, CLAIM_TTL)
            .await
            && holders > 1
        {
            return Err(AiError::Busy);
        }
        let turns = self.context(&asked).await?;
        let events = Arc::clone(&self.events);
        let mut index = 0u64;
        let mut relay = |piece: &str| {
            events.token(
                request.user_id,
                Token {
                    session_id: request.session_id,
                    request_id: request.request_id,
                    delta: piece.to_owned(),
                    index,
                },
            );
            index += 1;
        };
        // The session shows `processing` while the call runs: the status is written beside
        // the call, not before it (the provider need not wait for bookkeeping), and both
        // finish before the answer is published, so the final status cannot be overtaken.
        // A cancel or a reload reads progress from the cache, not from this status.
        let processing = async {
            let written = self
                .store
                .set_ai_session_status(request.session_id, "processing", now())
                .await;
            self.remember_status(request.session_id, "processing").await;
            written
        };
        let answering = self.answer(
            &chain,
            request.model.as_deref(),
            &turns,
            request,
            true,
            &mut relay,
        );
        let (outcome, written) = tokio::join!(answering, processing);
        if let Err(error) = written {
            // The answer is kept: storing it sets the session's final status anyway.
            tracing::warn!(%error, "The session's processing status could not be stored.");
        }
        Ok(Some(Response::of(request, outcome, started)))
    }

    /// The conversation sent to the model: system prompt, the session's last N finished
    /// messages before this one, then this one.
    async fn context(&self, asked: &AiMessage) -> Result<Vec<Turn>, AiError> {
        let recent = self
            .store
            .recent_ai_messages(
                asked.session_id,
                self.settings.context_messages.saturating_add(1),
            )
            .await?;
        let mut turns = Vec::with_capacity(recent.len() + 2);
        if !self.settings.system_prompt.is_empty() {
            turns.push(Turn::new(Role::System, self.settings.system_prompt.clone()));
        }
        let earlier: Vec<&AiMessage> = recent
            .iter()
            .filter(|m| m.id < asked.id && m.status == "complete")
            .collect();
        let skip = earlier
            .len()
            .saturating_sub(self.settings.context_messages as usize);
        for m in earlier.into_iter().skip(skip) {
            let role = if m.role == "assistant" {
                Role::Assistant
            } else {
                Role::User
            };
            turns.push(Turn::new(role, m.content.clone()));
        }
        turns.push(Turn::new(Role::User, asked.content.clone()));
        Ok(turns)
    }

    /// The answer cache's key (SPEC §8): the model chain, the system prompt and context, and
    /// the message, hashed.
    fn cache_key(links: &[&Link], turns: &[Turn]) -> String {
        let mut material = Vec::new();
        for link in links {
            material
                .extend_from_slice(format!("{}/{}\n", link.provider(), link.model()).as_bytes());
        }
        for turn in turns {
            material.extend_from_slice(turn.role.as_str().as_bytes());
            material.push(0);
            material.extend_from_slice(&(turn.content.len() as u64).to_le_bytes());
            material.extend_from_slice(turn.content.as_bytes());
        }
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &material);
        keys::ai_response(&hex(digest.as_ref()))
    }

    /// Answers `turns` from the cache or the chain. With `live`, pieces go to the user as
    /// they come, the answer so far is kept for a reload, and a cancel request stops it.
    async fn answer(
        &self,
        chain: &Chain,
        model: Option<&str>,
        turns: &[Turn],
        request: &Request,
        live: bool,
        relay: &mut (dyn FnMut(&str) + Send),
    ) -> Outcome {
        let Some(links) = chain.order(model) else {
            return Outcome::Failed(
                Failure {
                    error: ServiceError::new(
                        crate::error::ServiceErrorKind::Validation,
                        "ai",
                        "the requested model is not configured",
                    ),
                    partial: false,
                    provider: None,
                },
                String::new(),
            );
        };
        let key = Self::cache_key(&links, turns);
        if let Ok(Some(bytes)) = self.cache.get(&key).await
            && let Ok(hit) = serde_json::from_slice::<CachedAnswer>(&bytes)
        {
            relay(&hit.content);
            return Outcome::Cached(hit);
        }
        let progress = Arc::new(Mutex::new((String::new(), 0u64)));
        let sink = Arc::clone(&progress);
        let request_id = request.request_id;
        let mut on_delta = move |piece: &str| {
            let mut p = sink
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            p.0.push_str(piece);
            p.1 += 1;
            drop(p);
            relay(piece);
        };
        let call = chain.complete(&links, turns, self.settings.max_tokens, &mut on_delta);
        let result = if live {
            tokio::pin!(call);
            // The first tick saves at once, before any piece: a request without a save has
            // not started, so a client that finds none misses nothing it can hear live.
            let mut saved = Saved {
                tokens: None,
                saves: 0,
            };
            let mut tick = tokio::time::interval(STREAM_TICK);
            // A late tick keeps the stream's own phase: with `Delay`, every tick held up by
            // one busy moment was rescheduled from that same moment, so the streams' ticks
            // fell into step and came all at once (1,000 streams: a burst of 1,000 cache
            // writes every 200 ms, the relay's periodic tail).
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut ticks = 0u32;
            loop {
                tokio::select! {
                    result = &mut call => break Some(result),
                    _ = tick.tick() => {
                        if self.cancelled(request_id).await {
                            break None;
                        }
                        // The claim lives CLAIM_TTL: renewed once a second is ample (every
                        // tick was a cache write per stream five times a second).
                        if ticks.is_multiple_of(CLAIM_RENEW_TICKS) {
                            let _ = self.cache.set(&claim_key(request_id), b"1", Some(CLAIM_TTL)).await;
                        }
                        ticks = ticks.wrapping_add(1);
                        saved = self.save_progress(request_id, &progress, saved).await;
                    }
                }
            }
        } else {
            Some(call.await)
        };
        let so_far = progress
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .0
            .clone();
        match result {
            None => Outcome::Cancelled(so_far),
            Some(Ok(answer)) => {
                let cached = CachedAnswer {
                    content: answer.completion.content.clone(),
                    provider: answer.provider.clone(),
                    model: answer.model.clone(),
                };
                if let Ok(bytes) = serde_json::to_vec(&cached) {
                    let _ = self
                        .cache
                        .set(&key, &bytes, Some(self.settings.cache_ttl))
                        .await;
                }
                Outcome::Answered(answer)
            }
            Some(Err(failure)) => Outcome::Failed(failure, so_far),
        }
    }

    /// Keeps the answer so far for a client that reloads, unless nothing came since the last
    /// save; returns what is saved now.
    async fn save_progress(
        &self,
        request: AiRequestId,
        progress: &Mutex<(String, u64)>,
        saved: Saved,
    ) -> Saved {
        let (bytes, now_saved) = {
            let p = progress
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if saved.tokens == Some(p.1) {
                return saved;
            }
            let now_saved = Saved {
                tokens: Some(p.1),
                saves: saved.saves + 1,
            };
            let so_far = Progress {
                content: &p.0,
                tokens: p.1,
                saves: now_saved.saves,
            };
            (serde_json::to_vec(&so_far).unwrap_or_default(), now_saved)
        };
        let _ = self
            .cache
            .set(&stream_key(request), &bytes, Some(STREAM_TTL))
            .await;
        now_saved
    }

    /// The answer so far as last saved, if a save is there.
    async fn saved_progress(&self, request: AiRequestId) -> Option<SavedProgress> {
        let bytes = self.cache.get(&stream_key(request)).await.ok()??;
        serde_json::from_slice(&bytes).ok()
    }

    async fn cancelled(&self, request: AiRequestId) -> bool {
        matches!(self.cache.get(&cancel_key(request)).await, Ok(Some(_)))
    }

    /// The API side: stores a finished answer (once; a redelivery finds it stored and gets
    /// `None`), sets the session's status and tells the user.
    pub async fn record_response(&self, response: &Response) -> Result<Option<AiMessage>, AiError> {
        let message = AiMessage {
            id: AiMessageId::new(),
            session_id: response.session_id,
            request_id: response.request_id,
            role: "assistant".into(),
            content: response.content.clone(),
            status: response.status.clone(),
            model: response.model.clone(),
            provider: response.provider.clone(),
            cached: response.cached,
            latency_ms: Some(response.latency_ms),
            prompt_tokens: response.prompt_tokens,
            completion_tokens: response.completion_tokens,
            error_code: response.error_code.clone(),
            created_at: now(),
        };
        let status = if response.status == "failed" {
            "failed"
        } else {
            "idle"
        };
        match self.store.insert_ai_message(&message).await {
            Ok(()) => {}
            // Stored already (a redelivery), or the session was deleted meanwhile.
            Err(StoreError::Conflict(_) | StoreError::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        match self
            .store
            .set_ai_session_status(response.session_id, status, now())
            .await
        {
            Ok(()) | Err(StoreError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
        self.remember_status(response.session_id, status).await;
        if let Some(code) = &response.error_code {
            let _ = self
                .store
                .record_service_error(&StoredServiceError {
                    id: ServiceErrorId::new(),
                    code: code.clone(),
                    service: response.provider.clone().unwrap_or_else(|| "ai".into()),
                    message: response.error_detail.clone().unwrap_or_default(),
                    context: serde_json::json!({
                        "sessionId": response.session_id,
                        "requestId": response.request_id,
                        "model": response.model,
                    }),
                    request_id: Some(response.request_id.to_string()),
                    created_at: now(),
                })
                .await;
            self.events.error(
                response.user_id,
                &AiFailureEvent {
                    session_id: response.session_id,
                    request_id: response.request_id,
                    code: code.clone(),
                    message: FRIENDLY_FAILURE.into(),
                },
            );
        }
        self.events.response(response.user_id, &message);
        Ok(Some(message))
    }

    /// An `@assistant` mention in a people chat (SPEC §3): the chat's last N messages up to
    /// the mention are the context; pieces go to the chat's room as they come; the answer is
    /// posted as an `ai` message (from the member who asked, with client id
    /// `ai:{mention}`, so a redelivered mention posts nothing twice). `None` when there is
    /// nothing to do: answered before, or the asker left the chat.
    pub async fn answer_mention(&self, mention: &Mention) -> Result<Option<Message>, AiError> {
        let Some(chats) = self.chats.clone() else {
            return Err(AiError::Unconfigured);
        };
        let chain = Arc::clone(self.configured()?);
        let client_id = format!("ai:{}", mention.message_id);
        if self
            .store
            .message_by_client_id(mention.user_id, &client_id)
            .await?
            .is_some()
        {
            return Ok(None);
        }
        let limit = self
            .settings
            .context_messages
            .saturating_add(1)
            .clamp(1, 200);
        let page = Page {
            before: None,
            after: None,
            limit,
        };
        let recent = match chats.messages(mention.user_id, mention.chat_id, page).await {
            Ok((messages, _)) => messages,
            Err(ChatError::NotFound) => return Ok(None),
            Err(ChatError::Store(e)) => return Err(e.into()),
            Err(e) => return Err(AiError::Validation(e.to_string())),
        };
        let mut turns = Vec::with_capacity(recent.len() + 1);
        if !self.settings.system_prompt.is_empty() {
            turns.push(Turn::new(Role::System, self.settings.system_prompt.clone()));
        }
        let mut earlier: Vec<&Message> = recent
            .iter()
            .filter(|m| m.id <= mention.message_id && m.deleted_at.is_none())
            .collect();
        earlier.sort_by_key(|m| m.id);
        for m in earlier {
            let Some(text) = m.text.as_deref().filter(|t| !t.is_empty()) else {
                continue;
            };
            let role = if m.kind == MessageKind::Ai {
                Role::Assistant
            } else {
                Role::User
            };
            turns.push(Turn::new(role, text));
        }
        let request = Request {
            request_id: AiRequestId(mention.message_id.0),
            session_id: AiSessionId(mention.chat_id.0),
            user_id: mention.user_id,
            model: None,
        };
        let events = Arc::clone(&self.events);
        let mut index = 0u64;
        let mut relay = |piece: &str| {
            events.chat_token(
                mention.chat_id,
                ChatToken {
                    chat_id: mention.chat_id,
                    message_id: mention.message_id,
                    delta: piece.to_owned(),
                    index,
                },
            );
            index += 1;
        };
        let outcome = self
            .answer(&chain, None, &turns, &request, false, &mut relay)
            .await;
        let text = match outcome {
            Outcome::Answered(answer) => answer.completion.content,
            Outcome::Cached(hit) => hit.content,
            Outcome::Failed(failure, _) => {
                tracing::warn!(code = failure.error.code().as_str(), error = %failure.error, "The assistant could not answer a mention.");
                FRIENDLY_FAILURE.to_owned()
            }
            Outcome::Cancelled(so_far) => so_far,
        };
        // A chat message holds at most 10,000 characters.
        let text: String = text.chars().take(10_000).collect();
        let draft = Draft {
            id: MessageId::new(),
            kind: MessageKind::Ai,
            text: Some(text),
            image: None,
        };
        match chats
            .append_draft(mention.user_id, mention.chat_id, draft, Some(client_id))
            .await
        {
            Ok(sent) if sent.created => Ok(Some(sent.message)),
            Ok(_) | Err(ChatError::NotFound) => Ok(None),
            Err(ChatError::Store(e)) => Err(e.into()),
            Err(e) => Err(AiError::Validation(e.to_string())),
        }
    }

    /// `POST /ai/chat`: the same request answered in the caller's time, pieces to `on_delta`
    /// (Server-Sent Events) rather than to the user's sockets.
    pub async fn chat(
        &self,
        user: UserId,
        ask: Ask,
        on_delta: &mut (dyn FnMut(&str) + Send),
    ) -> Result<AiMessage, AiError> {
        self.check(&ask)?;
        self.limit(user).await?;
        let chain = Arc::clone(self.configured()?);
        let (session, new) = self.session_for(user, &ask).await?;
        if new {
            self.store.create_ai_session(&session).await?;
        }
        let request = AiRequestId::new();
        let asked = Self::user_message(session.id, request, &ask.message, now());
        self.store.insert_ai_message(&asked).await?;
        let turns = self.context(&asked).await?;
        let started = Instant::now();
        let req = Request {
            request_id: request,
            session_id: session.id,
            user_id: user,
            model: ask.model.clone(),
        };
        let outcome = self
            .answer(&chain, ask.model.as_deref(), &turns, &req, false, on_delta)
            .await;
        let response = Response::of(&req, outcome, started);
        self.record_response(&response)
            .await?
            .ok_or(AiError::NotFound)
    }

    /// `POST /ai/embeddings`: one vector per input, in order, from the first link whose
    /// provider has embeddings (its configured embedding model); the next on failure.
    pub async fn embed(&self, user: UserId, input: &[String]) -> Result<Embedded, AiError> {
        let chain = Arc::clone(self.configured()?);
        if input.is_empty() || input.len() > 256 {
            return Err(AiError::Validation("input must hold 1 to 256 texts".into()));
        }
        if let Some(long) = input
            .iter()
            .position(|t| t.chars().count() > self.settings.max_message_chars)
        {
            return Err(AiError::Validation(format!(
                "input[{long}] must be at most {} characters",
                self.settings.max_message_chars
            )));
        }
        self.limit(user).await?;
        let mut last = None;
        let mut seen = Vec::new();
        for link in chain.links() {
            // One call per provider, whatever its links' chat models.
            if seen.contains(&link.provider()) {
                continue;
            }
            seen.push(link.provider());
            match link.backend().embed("", input).await {
                Ok(vectors) => {
                    return Ok(Embedded {
                        vectors,
                        provider: link.provider().to_owned(),
                    });
                }
                Err(e) => last = Some(e),
            }
        }
        Err(match last {
            Some(e) if e.kind != crate::error::ServiceErrorKind::Validation => AiError::Upstream {
                code: e.code(),
                message: e.to_string(),
            },
            _ => AiError::Upstream {
                code: ErrorCode::Unavailable,
                message: "no configured provider has embeddings".into(),
            },
        })
    }

    /// `POST /ai/generations`: the job and the intent to run it commit together (202).
    pub async fn create_generation(
        &self,
        user: UserId,
        ask: GenerationAsk,
    ) -> Result<GenerationJob, AiError> {
        let chain = self.configured()?;
        if !matches!(ask.kind.as_str(), "text" | "image") {
            return Err(AiError::Validation(
                "kind must be \"text\" or \"image\"".into(),
            ));
        }
        let chars = ask.prompt.chars().count();
        if ask.prompt.trim().is_empty() || chars > 4000 {
            return Err(AiError::Validation(
                "prompt must be 1 to 4000 characters".into(),
            ));
        }
        let n = ask.n.unwrap_or(1);
        if !(1..=4).contains(&n) {
            return Err(AiError::Validation("n must be between 1 and 4".into()));
        }
        if let Some(provider) = &ask.provider
            && !chain.links().iter().any(|l| l.provider() == provider)
        {
            return Err(AiError::UnknownModel(chain.describe()));
        }
        self.limit(user).await?;
        let at = now();
        let job = GenerationJob {
            id: GenerationId::new(),
            user_id: user,
            kind: ask.kind,
            prompt: ask.prompt,
            n: i32::try_from(n).unwrap_or(1),
            provider: ask.provider,
            status: "queued".into(),
            results: None,
            error_code: None,
            created_at: at,
            updated_at: at,
        };
        let tx = self.store.begin().await?;
        tx.create_generation(&job).await?;
        tx.enqueue(&OutboxEntry {
            id: EventId::new(),
            queue: queues::CHAT_REQUESTS.into(),
            kind: GENERATION_KIND.into(),
            payload: serde_json::json!({ "generationId": job.id }),
            trace_id: None,
            created_at: at,
        })
        .await?;
        tx.commit().await?;
        if let Some(wake) = &self.published {
            wake();
        }
        Ok(job)
    }

    /// `GET /ai/generations/{id}`: the caller's job.
    pub async fn generation(
        &self,
        user: UserId,
        id: GenerationId,
    ) -> Result<GenerationJob, AiError> {
        match self.store.generation(id).await? {
            Some(job) if job.user_id == user => Ok(job),
            _ => Err(AiError::NotFound),
        }
    }

    /// The worker's part of a generation: the texts or images the provider made (images are
    /// stored by the caller, then [`AiService::finish_generation`]). `None` when the job is
    /// gone or finished already (a redelivery).
    pub async fn run_generation(
        &self,
        id: GenerationId,
    ) -> Result<Option<(GenerationJob, Generated)>, AiError> {
        let Some(mut job) = self.store.generation(id).await? else {
            return Ok(None);
        };
        if matches!(job.status.as_str(), "succeeded" | "failed") {
            return Ok(None);
        }
        let chain = Arc::clone(self.configured()?);
        job.status = "processing".into();
        job.updated_at = now();
        self.store.update_generation(&job).await?;
        let links: Vec<&Link> = chain
            .links()
            .iter()
            .filter(|l| job.provider.as_deref().is_none_or(|p| l.provider() == p))
            .collect();
        let n = usize::try_from(job.n.clamp(1, 4)).unwrap_or(1);
        let generated = if job.kind == "image" {
            let mut last = None;
            let mut images = None;
            for link in &links {
                match link
                    .backend()
                    .generate_images(&job.prompt, u32::try_from(n).unwrap_or(1))
                    .await
                {
                    Ok(made) => {
                        images = Some((link.provider().to_owned(), made));
                        break;
                    }
                    Err(e) => last = Some(e),
                }
            }
            match (images, last) {
                (Some((provider, images)), _) => Generated::Images { provider, images },
                (None, Some(e)) if e.kind != crate::error::ServiceErrorKind::Validation => {
                    Generated::Failed {
                        code: e.code(),
                        detail: e.to_string(),
                    }
                }
                (None, _) => Generated::Failed {
                    code: ErrorCode::Unavailable,
                    detail: "no configured provider generates images".into(),
                },
            }
        } else {
            let mut turns = Vec::with_capacity(2);
            if !self.settings.system_prompt.is_empty() {
                turns.push(Turn::new(Role::System, self.settings.system_prompt.clone()));
            }
            turns.push(Turn::new(Role::User, job.prompt.clone()));
            let mut texts = Vec::with_capacity(n);
            let mut outcome = None;
            for _ in 0..n {
                match chain
                    .complete(&links, &turns, self.settings.max_tokens, &mut |_: &str| {})
                    .await
                {
                    Ok(answer) => {
                        texts.push(answer.completion.content);
                        outcome.get_or_insert(Ok(answer.provider));
                    }
                    Err(failure) => {
                        outcome = Some(Err(failure));
                        break;
                    }
                }
            }
            match outcome {
                Some(Ok(provider)) => Generated::Texts { provider, texts },
                Some(Err(failure)) => Generated::Failed {
                    code: failure.error.code(),
                    detail: failure.error.to_string(),
                },
                None => Generated::Failed {
                    code: ErrorCode::Unavailable,
                    detail: "no provider".into(),
                },
            }
        };
        Ok(Some((job, generated)))
    }

    /// Stores how a generation ended: `results` (texts, or the stored images) or a failure
    /// (kept as a service error too).
    pub async fn finish_generation(
        &self,
        mut job: GenerationJob,
        outcome: Result<(String, serde_json::Value), (ErrorCode, String)>,
    ) -> Result<GenerationJob, AiError> {
        match outcome {
            Ok((provider, results)) => {
                job.status = "succeeded".into();
                job.provider = Some(provider);
                job.results = Some(results);
            }
            Err((code, detail)) => {
                job.status = "failed".into();
                job.error_code = Some(code.as_str().to_owned());
                let _ = self
                    .store
                    .record_service_error(&StoredServiceError {
                        id: ServiceErrorId::new(),
                        code: code.as_str().to_owned(),
                        service: job.provider.clone().unwrap_or_else(|| "ai".into()),
                        message: detail,
                        context: serde_json::json!({ "generationId": job.id, "kind": job.kind }),
                        request_id: None,
                        created_at: now(),
                    })
                    .await;
            }
        }
        job.updated_at = now();
        self.store.update_generation(&job).await?;
        Ok(job)
    }

    /// `GET /ai/requests/{id}`: the answer so far, or how it ended.
    pub async fn stream_state(
        &self,
        user: UserId,
        request: AiRequestId,
    ) -> Result<StreamState, AiError> {
        let asked = self
            .store
            .ai_message_for_request(request, "user")
            .await?
            .ok_or(AiError::NotFound)?;
        self.owned_session(user, asked.session_id).await?;
        if let Some(finished) = self.finished_state(request, asked.session_id).await? {
            return Ok(finished);
        }
        let Some(mut so_far) = self.saved_progress(request).await else {
            // Not started: its first save comes before its first piece.
            return Ok(StreamState {
                request_id: request,
                session_id: asked.session_id,
                status: "queued".into(),
                content: String::new(),
                tokens: Some(0),
            });
        };
        // A save can be up to a tick old, and a client that connected its socket just before
        // asking would miss the pieces sent in between: wait for a save made after this
        // call began. A tick that finds nothing new does not save, and then the save there
        // is already complete; so two ticks at most. The answer may end meanwhile.
        let looked = so_far.saves;
        let until = tokio::time::Instant::now() + STREAM_TICK * 2 + STREAM_TICK / 4;
        while tokio::time::Instant::now() < until {
            tokio::time::sleep(STREAM_TICK / 8).await;
            if let Some(finished) = self.finished_state(request, asked.session_id).await? {
                return Ok(finished);
            }
            match self.saved_progress(request).await {
                Some(now) if now.saves > looked => {
                    so_far = now;
                    break;
                }
                Some(now) => so_far = now,
                None => break,
            }
        }
        Ok(StreamState {
            request_id: request,
            session_id: asked.session_id,
            status: "streaming".into(),
            content: so_far.content,
            tokens: Some(so_far.tokens),
        })
    }

    /// How a request ended, once its answer is stored.
    async fn finished_state(
        &self,
        request: AiRequestId,
        session: AiSessionId,
    ) -> Result<Option<StreamState>, AiError> {
        let answer = self
            .store
            .ai_message_for_request(request, "assistant")
            .await?;
        Ok(answer.map(|answer| StreamState {
            request_id: request,
            session_id: session,
            status: answer.status,
            content: answer.content,
            tokens: None,
        }))
    }

    /// `POST /ai/requests/{id}/cancel`: the worker stops at its next look (within 200 ms),
    /// and the answer so far is stored as `cancelled`.
    pub async fn cancel(&self, user: UserId, request: AiRequestId) -> Result<(), AiError> {
        let asked = self
            .store
            .ai_message_for_request(request, "user")
            .await?
            .ok_or(AiError::NotFound)?;
        self.owned_session(user, asked.session_id).await?;
        if self
            .store
            .ai_message_for_request(request, "assistant")
            .await?
            .is_some()
        {
            return Err(AiError::Finished);
        }
        self.cache
            .set(&cancel_key(request), b"1", Some(STREAM_TTL))
            .await
            .map_err(|e| AiError::Store(StoreError::Unavailable(e.into())))
    }

    pub async fn sessions(&self, user: UserId, limit: u32) -> Result<Vec<AiSession>, AiError> {
        Ok(self.store.ai_sessions_of(user, limit).await?)
    }

    /// A session and its messages (the last 200), oldest first.
    pub async fn session(
        &self,
        user: UserId,
        id: AiSessionId,
    ) -> Result<(AiSession, Vec<AiMessage>), AiError> {
        let session = self.owned_session(user, id).await?;
        let messages = self.store.recent_ai_messages(id, 200).await?;
        Ok((session, messages))
    }

    pub async fn delete_session(&self, user: UserId, id: AiSessionId) -> Result<(), AiError> {
        self.owned_session(user, id).await?;
        self.store.delete_ai_session(id).await?;
        let _ = self
            .cache
            .delete(&keys::ai_session_status(&id.to_string()))
            .await;
        Ok(())
    }

    /// `POST /ai/messages/{id}/feedback`: on an answer in one of the caller's sessions.
    pub async fn feedback(
        &self,
        user: UserId,
        message: AiMessageId,
        rating: &str,
        comment: Option<String>,
    ) -> Result<(), AiError> {
        if !matches!(rating, "up" | "down") {
            return Err(AiError::Validation(
                "rating must be \"up\" or \"down\"".into(),
            ));
        }
        if comment.as_ref().is_some_and(|c| c.chars().count() > 2000) {
            return Err(AiError::Validation(
                "comment must be at most 2000 characters".into(),
            ));
        }
        let found = self
            .store
            .ai_message(message)
            .await?
            .ok_or(AiError::NotFound)?;
        self.owned_session(user, found.session_id).await?;
        if found.role != "assistant" {
            return Err(AiError::Validation(
                "feedback is for the assistant's answers".into(),
            ));
        }
        self.store
            .put_ai_feedback(&AiFeedback {
                message_id: message,
                user_id: user,
                rating: rating.to_owned(),
                comment,
                created_at: now(),
            })
            .await?;
        Ok(())
    }
}

/// Vectors for `POST /ai/embeddings`, and the provider that made them.
#[derive(Debug, Clone, PartialEq)]
pub struct Embedded {
    pub vectors: Vec<Vec<f32>>,
    pub provider: String,
}

/// How answering went.
enum Outcome {
    Answered(Answer),
    Cached(CachedAnswer),
    Failed(Failure, String),
    Cancelled(String),
}

impl Response {
    /// How answering `request` went, `started` being when the worker took it.
    fn of(request: &Request, outcome: Outcome, started: Instant) -> Self {
        let mut response = Self {
            request_id: request.request_id,
            session_id: request.session_id,
            user_id: request.user_id,
            content: String::new(),
            status: String::new(),
            model: None,
            provider: None,
            cached: false,
            latency_ms: i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX),
            prompt_tokens: None,
            completion_tokens: None,
            error_code: None,
            error_detail: None,
        };
        match outcome {
            Outcome::Answered(answer) => {
                let Usage {
                    prompt_tokens,
                    completion_tokens,
                } = answer.completion.usage;
                response.content = answer.completion.content;
                response.status = "complete".into();
                response.provider = Some(answer.provider);
                response.model = Some(answer.model);
                response.prompt_tokens = prompt_tokens.map(i64::from);
                response.completion_tokens = completion_tokens.map(i64::from);
            }
            Outcome::Cached(hit) => {
                response.content = hit.content;
                response.status = "complete".into();
                response.provider = Some(hit.provider);
                response.model = Some(hit.model);
                response.cached = true;
            }
            Outcome::Failed(failure, so_far) => {
                response.content = if failure.partial {
                    so_far
                } else {
                    FRIENDLY_FAILURE.into()
                };
                response.status = "failed".into();
                response.error_code = Some(failure.error.code().as_str().to_owned());
                response.error_detail = Some(failure.error.to_string());
                if let Some((provider, model)) = failure.provider {
                    response.provider = Some(provider);
                    response.model = Some(model);
                }
            }
            Outcome::Cancelled(so_far) => {
                response.content = so_far;
                response.status = "cancelled".into();
            }
        }
        response
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

impl From<&AiError> for ErrorCode {
    fn from(e: &AiError) -> Self {
        match e {
            AiError::Unconfigured | AiError::Busy | AiError::Store(StoreError::Unavailable(_)) => {
                Self::Unavailable
            }
            AiError::Validation(_) | AiError::UnknownModel(_) => Self::ValidationError,
            AiError::NotFound => Self::NotFound,
            AiError::RateLimited { .. } => Self::RateLimited,
            AiError::Finished => Self::Conflict,
            AiError::Upstream { code, .. } => *code,
            AiError::Store(_) => Self::InternalError,
        }
    }
}
