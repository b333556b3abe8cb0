//! The `LlmProvider` port: a language model behind an HTTP API (SPEC §8). OpenAI-compatible
//! chat completions and Ollama's native API in `confab-adapters`; the fallback chain, the
//! retries, the timeouts and the circuit breakers are wrappers in `services::ai::chain`.
//!
//! # Contract (tested by `testing::llm::run_all` against every implementation, each in front
//! of a fake server speaking that provider's wire format)
//!
//! - `complete` streams: `on_delta` is called with each piece of the answer as it arrives, in
//!   order, and the pieces concatenate to the returned [`Completion::content`]. A piece may be
//!   any length, never empty. Usage is reported when the provider tells it.
//! - Every failure is a [`ServiceError`] of SPEC §8's taxonomy naming the provider:
//!   unreachable → `Network`; a 429 → `RateLimit` with its `Retry-After`; any other non-2xx →
//!   `Api` (with the provider's own message, never a key); a body or stream that does not
//!   have the expected shape → `Validation`. A stream cut before its end is `Network`.
//! - `complete` keeps no timeout of its own: the caller bounds it (and drops the future to
//!   cancel, which closes the connection).
//! - `embed` answers one vector per input, in order; a provider without embeddings says so
//!   with `Validation`.
//! - `generate_images` answers `n` images (bytes or URLs); a provider without image
//!   generation says so with `Validation`.
//! - `models` lists what the server offers (for `confab doctor` and `/ai/models`).

use async_trait::async_trait;

use crate::error::{ServiceError, ServiceErrorKind};

/// Who said a turn of a conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::System => "system",
            Self::User => "user",
            Self::Assistant => "assistant",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Turn {
    pub role: Role,
    pub content: String,
}

impl Turn {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
        }
    }
}

/// One call: the model and the conversation, system prompt first when there is one.
#[derive(Debug, Clone, PartialEq)]
pub struct CompletionRequest {
    pub model: String,
    pub turns: Vec<Turn>,
    pub max_tokens: Option<u32>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: Option<u32>,
    pub completion_tokens: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    pub content: String,
    /// The model that answered, as the provider named it.
    pub model: String,
    pub usage: Usage,
}

/// Where the pieces of an answer go as they arrive.
pub type OnDelta<'a> = dyn FnMut(&str) + Send + 'a;

#[async_trait]
pub trait LlmProvider: Send + Sync + 'static {
    /// The provider's name in errors, metrics and stored answers (`openai`, `ollama` …).
    fn name(&self) -> &str;
    /// The model a request that names none gets.
    fn default_model(&self) -> &str;
    async fn complete(
        &self,
        request: &CompletionRequest,
        on_delta: &mut OnDelta<'_>,
    ) -> Result<Completion, ServiceError>;
    async fn embed(&self, model: &str, input: &[String]) -> Result<Vec<Vec<f32>>, ServiceError> {
        let _ = (model, input);
        Err(ServiceError::new(
            ServiceErrorKind::Validation,
            self.name().to_owned(),
            "this provider has no embeddings",
        ))
    }
    /// `n` images for `prompt` (`POST /ai/generations` with `kind: "image"`); a provider
    /// without image generation says so with `Validation`.
    async fn generate_images(
        &self,
        prompt: &str,
        n: u32,
    ) -> Result<Vec<GeneratedImage>, ServiceError> {
        let _ = (prompt, n);
        Err(ServiceError::new(
            ServiceErrorKind::Validation,
            self.name().to_owned(),
            "this provider has no image generation",
        ))
    }
    async fn models(&self) -> Result<Vec<String>, ServiceError>;
}

/// A generated image: its bytes, or where the provider keeps it (to be fetched and stored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GeneratedImage {
    Bytes(Vec<u8>),
    Url(String),
}
