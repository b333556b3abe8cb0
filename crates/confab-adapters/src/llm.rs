//! LLM providers (SPEC §8): configuration, the HTTP plumbing they share, and `build()`.
//! `llm/openai.rs`: OpenAI-compatible chat completions (SSE streaming), models, embeddings,
//! image generation.
//! `llm/ollama.rs`: Ollama's native API (NDJSON streaming), tags, embeddings.
//! `llm/anthropic.rs`: Anthropic's Messages API (SSE with named events), models.
//! `llm/replicate.rs`: Replicate predictions (create, then poll), text and images.

pub mod anthropic;
pub mod ollama;
pub mod openai;
pub mod replicate;

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
    /// Model for image generation (default `gpt-image-1`).
    pub image_model: Option<String>,
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
    /// The server without `/v1` (default `https://api.anthropic.com`).
    pub base_url: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReplicateConfig {
    pub api_key: Option<Secret>,
    pub api_url: Option<String>,
    /// The version completions run: a version id, or `owner/name:id`.
    pub model_version: Option<String>,
    /// The version image generation runs (default: `model_version`).
    pub image_model_version: Option<String>,
    /// How often a running prediction is polled (default 2000).
    pub poll_interval_ms: Option<u64>,
    /// How long a prediction may run before the call fails with `TIMEOUT_ERROR` (default 120).
    pub deadline_secs: Option<u64>,
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
pub const ANTHROPIC_DEFAULT_URL: &str = "https://api.anthropic.com";
pub const ANTHROPIC_DEFAULT_MODEL: &str = "claude-3-5-haiku-latest";
pub const REPLICATE_DEFAULT_URL: &str = "https://api.replicate.com/v1";

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
    let provider = openai::OpenAiProvider::new(
        client(),
        base,
        config.api_key.clone(),
        model,
        config
            .embedding_model
            .clone()
            .unwrap_or_else(|| "text-embedding-3-small".into()),
    );
    Ok(Arc::new(match config.image_model.clone() {
        Some(image_model) => provider.with_image_model(image_model),
        None => provider,
    }))
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

pub fn build_anthropic(
    config: &AnthropicConfig,
) -> Result<Arc<dyn LlmProvider>, ProviderConfigError> {
    let Some(key) = given(config.api_key.as_ref()) else {
        return Err(ProviderConfigError {
            setting: "ai.anthropic.api_key",
            problem: "Anthropic needs an API key".into(),
            fix: "set ANTHROPIC_API_KEY",
        });
    };
    Ok(Arc::new(anthropic::AnthropicProvider::new(
        client(),
        config.base_url.as_deref().unwrap_or(ANTHROPIC_DEFAULT_URL),
        key.clone(),
        config
            .model
            .clone()
            .unwrap_or_else(|| ANTHROPIC_DEFAULT_MODEL.into()),
    )))
}

pub fn build_replicate(
    config: &ReplicateConfig,
) -> Result<Arc<dyn LlmProvider>, ProviderConfigError> {
    Ok(Arc::new(replicate_provider(config)?))
}

/// The Replicate provider itself, for a caller that sets its polling
/// ([`replicate::ReplicateProvider::with_poll`]) before sharing it.
pub fn replicate_provider(
    config: &ReplicateConfig,
) -> Result<replicate::ReplicateProvider, ProviderConfigError> {
    let Some(key) = given(config.api_key.as_ref()) else {
        return Err(ProviderConfigError {
            setting: "ai.replicate.api_key",
            problem: "Replicate needs an API token".into(),
            fix: "set REPLICATE_API_TOKEN (or REPLICATE_API_KEY)",
        });
    };
    let Some(version) = config
        .model_version
        .as_deref()
        .map(str::trim)
        .filter(|v| !v.is_empty())
    else {
        return Err(ProviderConfigError {
            setting: "ai.replicate.model_version",
            problem: "Replicate needs the model version to run".into(),
            fix: "set REPLICATE_MODEL_VERSION (a version id, or owner/name:id)",
        });
    };
    let poll_interval = config
        .poll_interval_ms
        // Not a busy loop, whatever the setting.
        .map_or(replicate::DEFAULT_POLL_INTERVAL, |ms| {
            Duration::from_millis(ms.max(10))
        });
    let deadline = config
        .deadline_secs
        .map_or(replicate::DEFAULT_DEADLINE, Duration::from_secs);
    Ok(replicate::ReplicateProvider::new(
        client(),
        config.api_url.as_deref().unwrap_or(REPLICATE_DEFAULT_URL),
        key.clone(),
        version.to_owned(),
    )
    .with_poll(poll_interval, deadline)
    .with_image_version(
        config
            .image_model_version
            .as_deref()
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_owned),
    ))
}

/// A key that was given: set and not blank.
fn given(key: Option<&Secret>) -> Option<&Secret> {
    key.filter(|k| !k.expose().trim().is_empty())
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

/// Sends `request`: a transport failure or a non-success status as SPEC §8 errors.
pub(crate) async fn send(
    provider: &str,
    request: reqwest::RequestBuilder,
) -> Result<reqwest::Response, ServiceError> {
    let response = request
        .send()
        .await
        .map_err(|e| transport_error(provider, &e))?;
    if response.status().is_success() {
        Ok(response)
    } else {
        Err(status_error(provider, response).await)
    }
}

/// [`send`], then the body as JSON.
pub(crate) async fn json(
    provider: &str,
    request: reqwest::RequestBuilder,
) -> Result<serde_json::Value, ServiceError> {
    send(provider, request)
        .await?
        .json()
        .await
        .map_err(|e| transport_error(provider, &e))
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
                // RFC 9457 problem details (Replicate).
                .or_else(|| v.get("detail"))
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

    #[test]
    fn anthropic_needs_a_key_and_defaults_its_model() {
        for key in [None, Some(Secret::new("  "))] {
            let Err(e) = build_anthropic(&AnthropicConfig {
                api_key: key,
                ..AnthropicConfig::default()
            }) else {
                panic!("built without a key")
            };
            assert_eq!(e.setting, "ai.anthropic.api_key");
            assert!(e.fix.contains("ANTHROPIC_API_KEY"));
        }
        let Ok(provider) = build_anthropic(&AnthropicConfig {
            api_key: Some(Secret::new("sk-ant-secret")),
            ..AnthropicConfig::default()
        }) else {
            panic!("a key is enough")
        };
        assert_eq!(provider.name(), "anthropic");
        assert_eq!(provider.default_model(), ANTHROPIC_DEFAULT_MODEL);
    }

    #[test]
    fn replicate_needs_a_key_and_a_version() {
        let version = "5c7d5dc6dd8bf75c1acaa8565735e7986bc5b66206b55cca93cb72c9bf15ccaa";
        let Err(e) = build_replicate(&ReplicateConfig {
            model_version: Some(version.into()),
            ..ReplicateConfig::default()
        }) else {
            panic!("built without a key")
        };
        assert_eq!(e.setting, "ai.replicate.api_key");
        for missing in [None, Some(String::new())] {
            let Err(e) = build_replicate(&ReplicateConfig {
                api_key: Some(Secret::new("r8_secret")),
                model_version: missing,
                ..ReplicateConfig::default()
            }) else {
                panic!("built without a version")
            };
            assert_eq!(e.setting, "ai.replicate.model_version");
        }
        let Ok(provider) = build_replicate(&ReplicateConfig {
            api_key: Some(Secret::new("r8_secret")),
            model_version: Some(version.into()),
            ..ReplicateConfig::default()
        }) else {
            panic!("a key and a version are enough")
        };
        assert_eq!(provider.name(), "replicate");
        assert_eq!(provider.default_model(), version);
    }

    #[test]
    fn new_settings_are_optional_in_a_file() {
        let anthropic: AnthropicConfig =
            serde_json::from_value(serde_json::json!({"api_key": "k"})).expect("no base_url");
        assert_eq!(anthropic.base_url, None);
        let openai: OpenAiConfig = serde_json::from_value(
            serde_json::json!({"base_url": "http://127.0.0.1:9/v1", "image_model": "dall-e-3"}),
        )
        .expect("an image model");
        assert_eq!(openai.image_model.as_deref(), Some("dall-e-3"));
        let replicate: ReplicateConfig =
            serde_json::from_value(serde_json::json!({"api_key": "k", "model_version": "v"}))
                .expect("no image version");
        assert_eq!(replicate.image_model_version, None);
    }
}
