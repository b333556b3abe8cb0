//! LLM providers (SPEC §8): configuration, the HTTP plumbing they share, and `build()`.
//! `llm/openai.rs`: OpenAI-compatible chat completions (SSE streaming), models, embeddings.
//! `llm/ollama.rs`: Ollama's native API (NDJSON streaming), tags, embeddings.

pub mod ollama;
pub mod openai;

use std::sync::Arc;
use std::time::Duration;

use confab_core::error::{ServiceError, ServiceErrorKind};
use confab_core::ports::llm::LlmProvider;
use confab_core::settings::Secret;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OpenAiConfig {
    pub api_key: Option<Secret>,
    pub base_url: Option<String>,
    pub model: Option<String>,
    /// Model for `POST /ai/embeddings` (default `text-embedding-3-small`).
    pub embedding_model: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OllamaConfig {
    pub base_url: Option<String>,
    pub model: Option<String>,
    pub embedding_model: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AnthropicConfig {
    pub api_key: Option<Secret>,
    pub model: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReplicateConfig {
    pub api_key: Option<Secret>,
    pub api_url: Option<String>,
    pub model_version: Option<String>,
}

/// A configuration problem: the setting, what is wrong, the fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderConfigError {
    pub setting: &'static str,
    pub problem: String,
    pub fix: &'static str,
}

pub const OPENAI_DEFAULT_URL: &str = "https://api.openai.com/v1";
pub const OLLAMA_DEFAULT_URL: &str = "http://127.0.0.1:11434";

/// The provider named `name` from its section, or why it cannot be built. `None` when that
/// section is absent.
pub fn build_openai(config: &OpenAiConfig) -> Result<Arc<dyn LlmProvider>, ProviderConfigError> {
    let base = config.base_url.as_deref().unwrap_or(OPENAI_DEFAULT_URL);
    // The real OpenAI needs a key; a compatible server on our own network may not.
    if base == OPENAI_DEFAULT_URL && config.api_key.is_none() {
        return Err(ProviderConfigError {
            setting: "ai.openai.api_key",
            problem: "OpenAI needs an API key".into(),
            fix: "set OPENAI_API_KEY, or OPENAI_BASE_URL for a compatible server that needs none",
        });
    }
    let model = config.model.clone().unwrap_or_else(|| "gpt-4o-mini".into());
    Ok(Arc::new(openai::OpenAiProvider::new(
        client(),
        base,
        config.api_key.clone(),
        model,
        config
            .embedding_model
            .clone()
            .unwrap_or_else(|| "text-embedding-3-small".into()),
    )))
}

pub fn build_ollama(config: &OllamaConfig) -> Result<Arc<dyn LlmProvider>, ProviderConfigError> {
    let Some(model) = config.model.clone() else {
        return Err(ProviderConfigError {
            setting: "ai.ollama.model",
            problem: "Ollama needs a model name".into(),
            fix: "set OLLAMA_MODEL (e.g. llama3.2)",
        });
    };
    Ok(Arc::new(ollama::OllamaProvider::new(
        client(),
        config.base_url.as_deref().unwrap_or(OLLAMA_DEFAULT_URL),
        model,
        config.embedding_model.clone(),
    )))
}

/// One HTTP client per provider: pooled, HTTP/1.1 or 2, no overall timeout (the chain bounds
/// each call and the time between pieces), a connect timeout so a dead host fails fast.
fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .pool_idle_timeout(Duration::from_mins(1))
        .build()
        .unwrap_or_default()
}

/// A transport failure in SPEC §8's terms.
pub(crate) fn transport_error(provider: &str, error: &reqwest::Error) -> ServiceError {
    let kind = if error.is_timeout() {
        ServiceErrorKind::Timeout
    } else if error.is_decode() {
        ServiceErrorKind::Validation
    } else if error.is_connect() || error.is_request() || error.is_body() {
        ServiceErrorKind::Network
    } else {
        ServiceErrorKind::Unknown
    };
    // reqwest's message names the URL, never headers: no key leaks.
    ServiceError::new(kind, provider.to_owned(), error.to_string())
}

/// A non-success answer in SPEC §8's terms: 429 → `RateLimit` with its `Retry-After`
/// (seconds or an HTTP date), anything else → `Api` with the provider's own message.
pub(crate) async fn status_error(provider: &str, response: reqwest::Response) -> ServiceError {
    let status = response.status();
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_retry_after);
    let body = response.text().await.unwrap_or_default();
    let said = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| {
            v.pointer("/error/message")
                .or_else(|| v.get("error"))
                .or_else(|| v.get("message"))
                .and_then(|m| m.as_str().map(str::to_owned))
        })
        .unwrap_or_else(|| body.chars().take(200).collect());
    let message = format!(
        "HTTP {}: {}",
        status.as_u16(),
        said.chars().take(300).collect::<String>()
    );
    let kind = if status.as_u16() == 429 {
        ServiceErrorKind::RateLimit { retry_after }
    } else if status.as_u16() == 408 || status.as_u16() == 504 {
        ServiceErrorKind::Timeout
    } else {
        ServiceErrorKind::Api
    };
    ServiceError::new(kind, provider.to_owned(), message)
}

fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<f64>() {
        return (seconds.is_finite() && seconds >= 0.0)
            .then(|| Duration::from_secs_f64(seconds.min(86_400.0)));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let wait = at.with_timezone(&chrono::Utc) - chrono::Utc::now();
    Some(wait.to_std().unwrap_or(Duration::ZERO))
}

pub(crate) fn invalid(provider: &str, what: impl Into<String>) -> ServiceError {
    ServiceError::new(
        ServiceErrorKind::Validation,
        provider.to_owned(),
        what.into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        assert_eq!(parse_retry_after("3"), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after("0.5"), Some(Duration::from_millis(500)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
        assert_eq!(parse_retry_after("-1"), None);
    }

    #[test]
    fn openai_without_a_key_names_the_setting() {
        let Err(e) = build_openai(&OpenAiConfig::default()) else {
            panic!("built without a key")
        };
        assert_eq!(e.setting, "ai.openai.api_key");
        let local = OpenAiConfig {
            base_url: Some("http://127.0.0.1:9/v1".into()),
            ..OpenAiConfig::default()
        };
        assert!(build_openai(&local).is_ok());
        let Err(e) = build_ollama(&OllamaConfig::default()) else {
            panic!("built without a model")
        };
        assert_eq!(e.setting, "ai.ollama.model");
    }
}
