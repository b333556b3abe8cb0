//! The AI assistant's process-level parts: the provider chain built from `[ai]`, the events
//! that carry answers to users' sockets, the `chat_requests` worker and the
//! `chat_responses` consumer, the critical-error webhook, and the AI metrics.

use std::sync::Arc;
use std::time::Duration;

use confab_adapters::llm::{build_anthropic, build_ollama, build_openai, build_replicate};
use confab_core::domain::{AiMessage, UserId};
use confab_core::ports::broker::{Delivery, Envelope, queues};
use confab_core::ports::llm::LlmProvider;
use confab_core::services::ai::chain::{Chain, Policy};
use confab_core::services::ai::{
    AiEvents, AiFailureEvent, AiSettings, ChatToken, GENERATION_KIND, Generated, MENTION_KIND,
    Mention, RESPONSE_KIND, Request, Response, Token,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{AiConfig, ConfigError};
use crate::realtime::{Io, emit, user_room};
use crate::state::AppState;

/// Providers that have an adapter in this build, in the default chain's order.
const SUPPORTED: [&str; 4] = ["openai", "anthropic", "ollama", "replicate"];

impl AiConfig {
    /// The chain `[ai]` describes; `None` with no provider configured (SPEC §8: the server
    /// starts, AI endpoints answer 503).
    pub fn chain(&self) -> Result<Option<Chain>, ConfigError> {
        let mut providers: Vec<(&'static str, Arc<dyn LlmProvider>)> = Vec::new();
        let wrap = |e: confab_adapters::llm::ProviderConfigError| {
            ConfigError::new(e.setting, e.problem, e.fix)
        };
        if let Some(c) = &self.openai {
            providers.push(("openai", build_openai(c).map_err(wrap)?));
        }
        if let Some(c) = &self.anthropic {
            providers.push(("anthropic", build_anthropic(c).map_err(wrap)?));
        }
        if let Some(c) = &self.ollama {
            providers.push(("ollama", build_ollama(c).map_err(wrap)?));
        }
        if let Some(c) = &self.replicate {
            // A prediction's only piece comes when it ends: it must end within the chain's
            // first-piece timeout, or the chain gives up (and cancels it) first.
            let mut c = c.clone();
            let deadline = c
                .deadline_secs
                .unwrap_or(self.timeout_secs)
                .min(self.timeout_secs);
            c.deadline_secs = Some(deadline);
            providers.push(("replicate", build_replicate(&c).map_err(wrap)?));
        }
        let links: Vec<(Arc<dyn LlmProvider>, String)> = match &self.chain {
            None => providers
                .iter()
                .map(|(_, p)| (Arc::clone(p), p.default_model().to_owned()))
                .collect(),
            Some(chain) => {
                let mut links = Vec::with_capacity(chain.len());
                for link in chain {
                    let (name, model) = match link.split_once(':') {
                        Some((name, model)) => (name.trim(), Some(model.trim())),
                        None => (link.trim(), None),
                    };
                    let Some((_, provider)) = providers.iter().find(|(n, _)| *n == name) else {
                        let problem = if SUPPORTED.contains(&name) {
                            format!("\"{link}\" names {name}, which is not configured")
                        } else {
                            format!("\"{link}\" names {name}, which this build has no adapter for")
                        };
                        return Err(ConfigError::new(
                            "ai.chain",
                            problem,
                            "list links of configured providers (openai, anthropic, ollama, replicate), each optionally provider:model",
                        ));
                    };
                    let model = model
                        .filter(|m| !m.is_empty())
                        .unwrap_or_else(|| provider.default_model());
                    links.push((Arc::clone(provider), model.to_owned()));
                }
                links
            }
        };
        if links.is_empty() {
            for name in self.providers() {
                if !SUPPORTED.contains(&name) {
                    tracing::warn!(
                        provider = name,
                        "This AI provider is configured but this build has no adapter for it; it is not used."
                    );
                }
            }
            return Ok(None);
        }
        Ok(Some(Chain::new(links, self.policy())))
    }

    pub fn policy(&self) -> Policy {
        Policy {
            timeout: Duration::from_secs(self.timeout_secs),
            attempts: self.attempts,
            backoff: Duration::from_millis(self.backoff_ms),
            breaker_failures: self.breaker_failures,
            breaker_open: Duration::from_secs(self.breaker_open_secs),
            ..Policy::default()
        }
    }

    pub fn settings(&self) -> AiSettings {
        AiSettings {
            requests_per_minute: self.requests_per_minute,
            context_messages: self.context_messages,
            system_prompt: self.system_prompt.clone(),
            max_tokens: self.max_tokens,
            ..AiSettings::default()
        }
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        let checks: [(&'static str, u64, u64, u64); 9] = [
            ("ai.retention_days", u64::from(self.retention_days), 1, 3650),
            (
                "ai.worker_concurrency",
                u64::from(self.worker_concurrency),
                1,
                100_000,
            ),
            ("ai.timeout_secs", self.timeout_secs, 1, 600),
            ("ai.attempts", u64::from(self.attempts), 1, 10),
            ("ai.backoff_ms", self.backoff_ms, 1, 60_000),
            (
                "ai.breaker_failures",
                u64::from(self.breaker_failures),
                1,
                1000,
            ),
            ("ai.breaker_open_secs", self.breaker_open_secs, 1, 3600),
            (
                "ai.requests_per_minute",
                u64::from(self.requests_per_minute),
                1,
                100_000,
            ),
            (
                "ai.context_messages",
                u64::from(self.context_messages),
                0,
                200,
            ),
        ];
        for (setting, value, low, high) in checks {
            if !(low..=high).contains(&value) {
                return Err(ConfigError::invalid(
                    setting,
                    format!("{value} is outside {low}..={high}"),
                    &format!("a number between {low} and {high}"),
                ));
            }
        }
        self.chain().map(|_| ())
    }
}

/// The assistant over this process's ports: answers to users' sockets through `io`, mentions
/// posted through `chats`, the outbox relay woken when a request commits.
pub fn service(
    config: &crate::config::Config,
    ports: &crate::startup::Ports,
    io: &Io,
    chats: &Arc<confab_core::services::chats::ChatService>,
    relay_wake: &Arc<tokio::sync::Notify>,
) -> Arc<confab_core::services::ai::AiService> {
    let wake = relay_wake.clone();
    Arc::new(
        confab_core::services::ai::AiService::new(
            ports.store.clone(),
            ports.cache.clone(),
            ports.ai.clone(),
            config.ai.settings(),
            SocketEvents::spawn(io.clone()),
        )
        .on_published(Arc::new(move || wake.notify_one()))
        .with_chats(chats.clone()),
    )
}

/// What goes to users' sockets, in the order it happened.
enum Outgoing {
    Token(UserId, Token),
    ChatToken(confab_core::domain::ChatId, ChatToken),
    Response(UserId, serde_json::Value),
    Error(UserId, AiFailureEvent),
}

/// [`AiEvents`] over Socket.IO, to `user:<id>` (or a chat's room) on every node, in the order
/// things happened (pieces of an answer must not overtake each other).
///
/// A node alone emits on the spot, from the task that produced the piece: a local broadcast
/// completes without waiting, and the piece does not queue behind every other stream's in a
/// task of its own. With other nodes, a broadcast waits on the cluster channel: one task
/// then emits everything, in order.
pub struct SocketEvents {
    io: Io,
    /// With other nodes: the task that emits everything in order.
    emitter: Option<mpsc::UnboundedSender<Outgoing>>,
}

impl SocketEvents {
    pub fn spawn(io: Io) -> Arc<Self> {
        let emitter = (!io.alone()).then(|| {
            let (tx, mut rx) = mpsc::unbounded_channel::<Outgoing>();
            let io = io.clone();
            tokio::spawn(async move {
                while let Some(out) = rx.recv().await {
                    out.emit(&io).await;
                }
            });
            tx
        });
        Arc::new(Self { io, emitter })
    }

    fn send(&self, out: Outgoing) {
        if let Some(emitter) = &self.emitter {
            let _ = emitter.send(out);
            return;
        }
        let io = self.io.clone();
        let mut emitting = Box::pin(async move { out.emit(&io).await });
        if futures_util::FutureExt::now_or_never(&mut emitting).is_none() {
            // Not expected of a local broadcast (nothing in it waits); finished elsewhere
            // rather than lost.
            tokio::spawn(emitting);
        }
    }
}

impl Outgoing {
    async fn emit(self, io: &Io) {
        match self {
            Self::Token(user, token) => emit(io, user_room(user), "ai:token", &token).await,
            Self::ChatToken(chat, token) => {
                emit(io, crate::realtime::chat_room(chat), "ai:token", &token).await;
            }
            Self::Response(user, body) => emit(io, user_room(user), "ai:response", &body).await,
            Self::Error(user, error) => emit(io, user_room(user), "ai:error", &error).await,
        }
    }
}

impl AiEvents for SocketEvents {
    fn token(&self, user: UserId, token: Token) {
        self.send(Outgoing::Token(user, token));
    }

    fn response(&self, user: UserId, message: &AiMessage) {
        let body = serde_json::json!({
            "sessionId": message.session_id,
            "requestId": message.request_id,
            "message": crate::http::ai::AiMessageBody::from(message),
        });
        self.send(Outgoing::Response(user, body));
    }

    fn error(&self, user: UserId, error: &AiFailureEvent) {
        self.send(Outgoing::Error(user, error.clone()));
    }

    fn chat_token(&self, chat: confab_core::domain::ChatId, token: ChatToken) {
        self.send(Outgoing::ChatToken(chat, token));
    }
}

/// Consumes `chat_requests` until `shutdown`: each request answered in a task of its own
/// (up to `ai.worker_concurrency` at once), its answer published to `chat_responses`, then
/// acknowledged. A failure to publish nacks it (retried; the answer is stored once).
pub fn spawn_request_worker(
    state: AppState,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let ai = state.ai.clone();
        if ai.chain().is_none() {
            return;
        }
        let concurrency = usize::try_from(state.config.ai.worker_concurrency).unwrap_or(512);
        let slots = Arc::new(tokio::sync::Semaphore::new(concurrency));
        loop {
            let free = slots.available_permits().clamp(1, 64);
            let received = tokio::select! {
                () = shutdown.cancelled() => return,
                received = state.broker.receive(queues::CHAT_REQUESTS, u32::try_from(free).unwrap_or(64), Duration::from_secs(1)) => received,
            };
            let deliveries = match received {
                Ok(d) => d,
                Err(error) => {
                    tracing::warn!(queue = queues::CHAT_REQUESTS, %error, "Cannot reach the queue; retrying.");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            for delivery in deliveries {
                let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
                    return;
                };
                let state = state.clone();
                let ai = Arc::clone(&ai);
                tokio::spawn(async move {
                    answer_one(&state, &ai, &delivery).await;
                    drop(permit);
                });
            }
        }
    })
}

async fn answer_one(
    state: &AppState,
    ai: &confab_core::services::ai::AiService,
    delivery: &Delivery,
) {
    let outcome = match delivery.envelope.kind.as_str() {
        MENTION_KIND => answer_mention(ai, delivery).await,
        GENERATION_KIND => generate(state, ai, &delivery.envelope.payload)
            .await
            .map_err(|error| {
                tracing::warn!(
                    error = format!("{error:#}"),
                    "A generation failed; it will be retried."
                );
                format!("{error:#}")
            }),
        _ => answer_request(state, ai, delivery).await,
    };
    settle(state, delivery, outcome).await;
}

/// Acknowledges `delivery` when its work is done, or hands it back to be retried with the
/// error; one that cannot be settled is logged (its lease runs out and it comes back).
async fn settle(state: &AppState, delivery: &Delivery, outcome: Result<(), String>) {
    let settled = match outcome {
        Ok(()) => state.broker.ack(delivery).await,
        Err(error) => state.broker.nack(delivery, &error).await,
    };
    if let Err(error) = settled {
        tracing::warn!(%error, queue = %delivery.queue, kind = %delivery.envelope.kind, "Could not settle a delivery.");
    }
}

/// A queued request: answered (or found answered already), its answer published to
/// `chat_responses`.
async fn answer_request(
    state: &AppState,
    ai: &confab_core::services::ai::AiService,
    delivery: &Delivery,
) -> Result<(), String> {
    let request: Request = match serde_json::from_value(delivery.envelope.payload.clone()) {
        Ok(r) => r,
        Err(error) => {
            tracing::warn!(%error, "A chat request that is not one; dropped.");
            return Ok(());
        }
    };
    match ai.answer_request(&request).await {
        Ok(None) => Ok(()),
        Ok(Some(response)) => {
            record_metrics(&response);
            if response.is_critical() {
                notify_webhook(state, &response);
            }
            let envelope = Envelope {
                // One answer per request: a republished answer is recognisably the same.
                id: confab_core::domain::EventId(request.request_id.0),
                kind: RESPONSE_KIND.into(),
                attempt: 0,
                created_at: confab_core::domain::now(),
                trace_id: delivery.envelope.trace_id.clone(),
                payload: serde_json::to_value(&response).unwrap_or_default(),
            };
            state
                .broker
                .publish(queues::CHAT_RESPONSES, &envelope)
                .await
                .map_err(|error| error.to_string())
        }
        // A copy of a request another worker is answering: later, it finds the answer.
        Err(confab_core::services::ai::AiError::Busy) => {
            Err("another worker is answering this request".into())
        }
        Err(error) => {
            tracing::warn!(%error, "A chat request could not be answered; it will be retried.");
            Err(error.to_string())
        }
    }
}

/// A generation job: texts kept as they are, images (bytes, or fetched from the provider's
/// URL) re-encoded and stored like uploads under `generations/{user}/{job}/{n}/`. A failure
/// to store is an error (the job is retried); a provider's failure finishes the job `failed`.
async fn generate(
    state: &AppState,
    ai: &confab_core::services::ai::AiService,
    payload: &serde_json::Value,
) -> anyhow::Result<()> {
    let id = serde_json::from_value(payload["generationId"].clone())?;
    let Some((job, generated)) = ai.run_generation(id).await? else {
        return Ok(());
    };
    let outcome = match generated {
        Generated::Texts { provider, texts } => Ok((
            provider,
            serde_json::Value::Array(
                texts
                    .into_iter()
                    .map(|t| serde_json::json!({ "text": t }))
                    .collect(),
            ),
        )),
        Generated::Failed { code, detail } => Err((code, detail)),
        Generated::Images { provider, images } => {
            let mut stored = Vec::with_capacity(images.len());
            for (i, image) in images.into_iter().enumerate() {
                let bytes = match image {
                    confab_core::ports::llm::GeneratedImage::Bytes(bytes) => bytes,
                    confab_core::ports::llm::GeneratedImage::Url(url) => {
                        fetch_image(&url, state.config.uploads.max_bytes).await?
                    }
                };
                let dir = format!("generations/{}/{}/{i}", job.user_id, job.id);
                let image = state.media.store_image(&dir, bytes).await?;
                stored.push(serde_json::to_value(&image)?);
            }
            Ok((provider, serde_json::Value::Array(stored)))
        }
    };
    ai.finish_generation(job, outcome).await?;
    Ok(())
}

/// A provider's image at `url` (at most `limit` bytes, 30 s).
async fn fetch_image(url: &str, limit: usize) -> anyhow::Result<Vec<u8>> {
    let response = reqwest::Client::new()
        .get(url)
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .map_err(reqwest::Error::without_url)?
        .error_for_status()
        .map_err(reqwest::Error::without_url)?;
    let bytes = response
        .bytes()
        .await
        .map_err(reqwest::Error::without_url)?;
    anyhow::ensure!(
        bytes.len() <= limit,
        "a generated image of {} bytes is over the limit",
        bytes.len()
    );
    Ok(bytes.to_vec())
}

/// An `@assistant` mention: answered and posted into the chat (once).
async fn answer_mention(
    ai: &confab_core::services::ai::AiService,
    delivery: &Delivery,
) -> Result<(), String> {
    match serde_json::from_value::<Mention>(delivery.envelope.payload.clone()) {
        Err(error) => {
            tracing::warn!(%error, "A mention that is not one; dropped.");
            Ok(())
        }
        Ok(mention) => ai
            .answer_mention(&mention)
            .await
            .map(|_| ())
            .map_err(|error| error.to_string()),
    }
}

/// The `message.created` events of a batch that mention the assistant, turned into
/// `chat_requests` (one per message: the envelope id is the message's, so a redelivered
/// event publishes nothing new where the queue absorbs duplicates, and the answer is posted
/// once either way). Nothing when no provider is configured.
pub async fn forward_mentions(state: &AppState, deliveries: &[Delivery]) -> anyhow::Result<()> {
    if state.ai.chain().is_none() {
        return Ok(());
    }
    let mentions: Vec<Envelope> = deliveries
        .iter()
        .filter(|d| {
            d.envelope.kind == "message.created"
                && d.envelope.payload["mentionsAssistant"] == serde_json::Value::Bool(true)
        })
        .filter_map(|d| {
            let p = &d.envelope.payload;
            let mention = Mention {
                chat_id: serde_json::from_value(p["chatId"].clone()).ok()?,
                message_id: serde_json::from_value(p["messageId"].clone()).ok()?,
                user_id: serde_json::from_value(p["senderId"].clone()).ok()?,
            };
            Some(Envelope {
                id: confab_core::domain::EventId(mention.message_id.0),
                kind: MENTION_KIND.into(),
                attempt: 0,
                created_at: confab_core::domain::now(),
                trace_id: d.envelope.trace_id.clone(),
                payload: serde_json::to_value(&mention).ok()?,
            })
        })
        .collect();
    if !mentions.is_empty() {
        state
            .broker
            .publish_all(queues::CHAT_REQUESTS, &mentions)
            .await?;
    }
    Ok(())
}

/// Consumes `chat_responses` until `shutdown`: each answer stored once and told to its user.
pub fn spawn_response_consumer(
    state: AppState,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    crate::workers::spawn_consumer(
        state,
        queues::CHAT_RESPONSES,
        64,
        Duration::ZERO,
        shutdown,
        |state, deliveries| async move {
            for delivery in deliveries {
                let outcome =
                    match serde_json::from_value::<Response>(delivery.envelope.payload.clone()) {
                        Err(error) => {
                            tracing::warn!(%error, "A chat response that is not one; dropped.");
                            Ok(())
                        }
                        Ok(response) => state
                            .ai
                            .record_response(&response)
                            .await
                            .map(|_| ())
                            .map_err(|error| error.to_string()),
                    };
                settle(&state, &delivery, outcome).await;
            }
            Ok(())
        },
    )
}

fn record_metrics(response: &Response) {
    let outcome = if response.cached {
        "cached".to_owned()
    } else {
        response.status.clone()
    };
    metrics::counter!(
        "ai_requests_total",
        "provider" => response.provider.clone().unwrap_or_default(),
        "model" => response.model.clone().unwrap_or_default(),
        "outcome" => outcome,
    )
    .increment(1);
    #[allow(clippy::cast_precision_loss)]
    metrics::histogram!("ai_request_duration_seconds").record(response.latency_ms as f64 / 1000.0);
    if response.cached {
        metrics::counter!("ai_cache_hits_total").increment(1);
    } else if response.status != "cancelled" {
        metrics::counter!("ai_cache_misses_total").increment(1);
    }
}

/// Keeps `circuit_state{provider,model}` current (every 5 s) until `shutdown`.
pub fn spawn_circuit_gauges(
    state: AppState,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let Some(chain) = state.ai.chain().cloned() else {
            return;
        };
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {
                    for link in chain.links() {
                        metrics::gauge!(
                            "circuit_state",
                            "provider" => link.provider().to_owned(),
                            "model" => link.model().to_owned(),
                        )
                        .set(link.circuit().gauge());
                    }
                }
            }
        }
    })
}

/// Tells the configured webhook (Slack-style `{"text": …}`) of a critical provider error;
/// in the background, once, never the request's failure.
fn notify_webhook(state: &AppState, response: &Response) {
    let Some(url) = state.config.ai.webhook_url.clone() else {
        return;
    };
    let text = format!(
        "confab: the AI provider {} ({}) failed with {}: {}",
        response.provider.as_deref().unwrap_or("?"),
        response.model.as_deref().unwrap_or("?"),
        response.error_code.as_deref().unwrap_or("?"),
        response.error_detail.as_deref().unwrap_or(""),
    );
    tokio::spawn(async move {
        let client = reqwest::Client::new();
        let sent = client
            .post(url.expose().as_str())
            .timeout(Duration::from_secs(10))
            .json(&serde_json::json!({ "text": text }))
            .send()
            .await;
        if let Err(error) = sent.and_then(reqwest::Response::error_for_status) {
            tracing::warn!(error = %error.without_url(), "Could not notify the AI webhook.");
        }
    });
}
