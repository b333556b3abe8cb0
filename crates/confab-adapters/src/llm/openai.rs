//! OpenAI-compatible chat completions: OpenAI, and vLLM, llama.cpp's server, LM Studio,
//! Ollama's `/v1`, OpenRouter, Groq … Parsing is lenient where those servers differ: a
//! server that ignores `stream` and answers JSON is fine, `[DONE]` may be missing when a
//! `finish_reason` came, usage may come in the last chunk or not at all, unknown fields are
//! ignored. Images: `/images/generations`, answered as base64 or as URLs.

use base64::Engine;
use confab_core::error::{ServiceError, ServiceErrorKind};
use confab_core::ports::llm::{
    Completion, CompletionRequest, GeneratedImage, LlmProvider, OnDelta, Usage,
};
use confab_core::settings::Secret;
use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};
use std::borrow::Cow;

use super::{invalid, json, send, transport_error};

/// The provider's name in errors, metrics and stored answers.
const NAME: &str = "openai";
/// The image model unless [`OpenAiProvider::with_image_model`] names another.
pub const DEFAULT_IMAGE_MODEL: &str = "gpt-image-1";

pub struct OpenAiProvider {
    client: reqwest::Client,
    base: String,
    key: Option<Secret>,
    model: String,
    embedding_model: String,
    image_model: String,
}

impl OpenAiProvider {
    pub fn new(
        client: reqwest::Client,
        base: &str,
        key: Option<Secret>,
        model: String,
        embedding_model: String,
    ) -> Self {
        Self {
            client,
            base: base.trim_end_matches('/').to_owned(),
            key,
            model,
            embedding_model,
            image_model: DEFAULT_IMAGE_MODEL.to_owned(),
        }
    }

    /// The model `generate_images` asks for (default [`DEFAULT_IMAGE_MODEL`]).
    #[must_use]
    pub fn with_image_model(mut self, model: String) -> Self {
        self.image_model = model;
        self
    }

    fn post(&self, path: &str) -> reqwest::RequestBuilder {
        let request = self.client.post(format!("{}{path}", self.base));
        match &self.key {
            Some(key) => request.bearer_auth(key.expose()),
            None => request,
        }
    }
}

/// What the chunks of a stream told so far.
#[derive(Default)]
struct Streamed {
    content: String,
    model: Option<String>,
    usage: Usage,
    finished: bool,
}

/// A streamed chunk as most servers send it, read without building a `Value` (a chunk per
/// token: this parse is on every token's path). Anything else (an `error`, a piece that is
/// not a string, a chunk that is not an object …) goes the lenient way, [`Streamed::take`].
#[derive(Deserialize)]
struct Chunk<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(default)]
    usage: Option<ChunkUsage>,
    #[serde(borrow, default)]
    choices: Option<Vec<Choice<'a>>>,
    #[serde(default)]
    error: Option<serde::de::IgnoredAny>,
}

#[derive(Deserialize)]
struct ChunkUsage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct Choice<'a> {
    #[serde(borrow, default)]
    delta: Option<Piece<'a>>,
    #[serde(borrow, default)]
    message: Option<Piece<'a>>,
    #[serde(borrow, default)]
    text: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    finish_reason: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Piece<'a> {
    #[serde(borrow, default)]
    content: Option<Cow<'a, str>>,
}

impl Streamed {
    /// Takes one chunk of a stream: typed when it has the usual shape, else as a `Value`.
    fn take_data(
        &mut self,
        provider: &str,
        data: &str,
        on_delta: &mut OnDelta<'_>,
    ) -> Result<(), ServiceError> {
        // Only an object: serde would also read a struct from a JSON array.
        let typed = data
            .starts_with('{')
            .then(|| serde_json::from_str::<Chunk<'_>>(data).ok())
            .flatten();
        match typed {
            Some(chunk) if chunk.error.is_none() => {
                self.take_typed(chunk, on_delta);
                Ok(())
            }
            _ => {
                let chunk: Value = serde_json::from_str(data)
                    .map_err(|e| invalid(provider, format!("a chunk that is not JSON: {e}")))?;
                self.take(provider, &chunk, on_delta)
            }
        }
    }

    /// [`Streamed::take`] for a chunk of the usual shape.
    fn take_typed(&mut self, chunk: Chunk<'_>, on_delta: &mut OnDelta<'_>) {
        if let Some(model) = chunk.model
            && self.model.is_none()
        {
            self.model = Some(model.into_owned());
        }
        if let Some(usage) = chunk.usage {
            let count = |n: Option<u64>| n.and_then(|n| u32::try_from(n).ok());
            self.usage = Usage {
                prompt_tokens: count(usage.prompt_tokens),
                completion_tokens: count(usage.completion_tokens),
            };
        }
        if let Some(choice) = chunk.choices.and_then(|c| c.into_iter().next()) {
            let piece = choice
                .delta
                .and_then(|d| d.content)
                .or_else(|| choice.message.and_then(|m| m.content))
                .or(choice.text);
            if let Some(piece) = piece.filter(|p| !p.is_empty()) {
                self.content.push_str(&piece);
                on_delta(&piece);
            }
            if choice.finish_reason.is_some() {
                self.finished = true;
            }
        }
    }

    /// Takes one chunk (or a whole non-streamed answer: `message` instead of `delta`).
    fn take(
        &mut self,
        provider: &str,
        chunk: &Value,
        on_delta: &mut OnDelta<'_>,
    ) -> Result<(), ServiceError> {
        if let Some(error) = chunk.get("error") {
            let message = error
                .get("message")
                .and_then(Value::as_str)
                .map_or_else(|| error.to_string(), str::to_owned);
            return Err(ServiceError::new(
                ServiceErrorKind::Api,
                provider.to_owned(),
                message,
            ));
        }
        if let Some(model) = chunk.get("model").and_then(Value::as_str) {
            self.model.get_or_insert_with(|| model.to_owned());
        }
        if let Some(usage) = chunk.get("usage").filter(|u| u.is_object()) {
            let count = |k: &str| {
                usage
                    .get(k)
                    .and_then(Value::as_u64)
                    .and_then(|n| u32::try_from(n).ok())
            };
            self.usage = Usage {
                prompt_tokens: count("prompt_tokens"),
                completion_tokens: count("completion_tokens"),
            };
        }
        let Some(choices) = chunk.get("choices").and_then(Value::as_array) else {
            // Usage-only and keep-alive chunks have no choices.
            return if chunk.is_object() {
                Ok(())
            } else {
                Err(invalid(provider, "a chunk that is not a JSON object"))
            };
        };
        if let Some(choice) = choices.first() {
            let piece = choice
                .pointer("/delta/content")
                .or_else(|| choice.pointer("/message/content"))
                .or_else(|| choice.get("text"))
                .and_then(Value::as_str);
            if let Some(piece) = piece.filter(|p| !p.is_empty()) {
                self.content.push_str(piece);
                on_delta(piece);
            }
            if choice.get("finish_reason").is_some_and(|r| !r.is_null()) {
                self.finished = true;
            }
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl LlmProvider for OpenAiProvider {
    fn name(&self) -> &str {
        NAME
    }

    fn default_model(&self) -> &str {
        &self.model
    }

    async fn complete(
        &self,
        request: &CompletionRequest,
        on_delta: &mut OnDelta<'_>,
    ) -> Result<Completion, ServiceError> {
        let messages: Vec<Value> = request
            .turns
            .iter()
            .map(|t| json!({"role": t.role.as_str(), "content": t.content}))
            .collect();
        let mut body = json!({
            "model": request.model,
            "messages": messages,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        if let Some(max) = request.max_tokens {
            body["max_tokens"] = json!(max);
        }
        let response = send(NAME, self.post("/chat/completions").json(&body)).await?;
        let streamed = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        let mut got = Streamed::default();
        if streamed {
            let mut events = response.bytes_stream().eventsource();
            let mut done = false;
            while let Some(event) = events.next().await {
                let event = event.map_err(|e| match e {
                    eventsource_stream::EventStreamError::Transport(t) => transport_error(NAME, &t),
                    other => invalid(NAME, format!("not a valid event stream: {other}")),
                })?;
                let data = event.data.trim();
                if data == "[DONE]" {
                    done = true;
                    break;
                }
                if data.is_empty() {
                    continue;
                }
                got.take_data(NAME, data, on_delta)?;
            }
            if !done && !got.finished {
                return Err(ServiceError::new(
                    ServiceErrorKind::Network,
                    NAME,
                    "the stream ended before the answer was finished",
                ));
            }
        } else {
            let whole: Value = response
                .json()
                .await
                .map_err(|e| transport_error(NAME, &e))?;
            got.take(NAME, &whole, on_delta)?;
            if whole
                .get("choices")
                .and_then(Value::as_array)
                .is_none_or(Vec::is_empty)
            {
                return Err(invalid(NAME, "an answer without choices"));
            }
        }
        Ok(Completion {
            content: got.content,
            model: got.model.unwrap_or_else(|| request.model.clone()),
            usage: got.usage,
        })
    }

    async fn embed(&self, model: &str, input: &[String]) -> Result<Vec<Vec<f32>>, ServiceError> {
        let model = if model.is_empty() {
            &self.embedding_model
        } else {
            model
        };
        let response = send(
            NAME,
            self.post("/embeddings")
                .json(&json!({"model": model, "input": input})),
        )
        .await?;
        let body: Value = response
            .json()
            .await
            .map_err(|e| transport_error(NAME, &e))?;
        let mut rows: Vec<(u64, Vec<f32>)> = body
            .get("data")
            .and_then(Value::as_array)
            .ok_or_else(|| invalid(NAME, "an embeddings answer without data"))?
            .iter()
            .enumerate()
            .map(|(i, row)| {
                let index = row.get("index").and_then(Value::as_u64).unwrap_or(i as u64);
                let vector = vector(row.get("embedding"))
                    .ok_or_else(|| invalid(NAME, "an embedding that is not a list of numbers"))?;
                Ok((index, vector))
            })
            .collect::<Result<_, ServiceError>>()?;
        rows.sort_by_key(|(i, _)| *i);
        if rows.len() != input.len() {
            return Err(invalid(
                NAME,
                "a different number of embeddings than inputs",
            ));
        }
        Ok(rows.into_iter().map(|(_, v)| v).collect())
    }

    async fn generate_images(
        &self,
        prompt: &str,
        n: u32,
    ) -> Result<Vec<GeneratedImage>, ServiceError> {
        let mut body = json!({"model": self.image_model, "prompt": prompt, "n": n});
        // The gpt-image models always answer base64 and refuse `response_format` ("Unknown
        // parameter"); DALL·E and compatible servers answer URLs unless asked for base64.
        if !self.image_model.starts_with("gpt-image") {
            body["response_format"] = json!("b64_json");
        }
        let answer: Value = json(NAME, self.post("/images/generations").json(&body)).await?;
        images(&answer)
    }

    async fn models(&self) -> Result<Vec<String>, ServiceError> {
        let request = self.client.get(format!("{}/models", self.base));
        let request = match &self.key {
            Some(key) => request.bearer_auth(key.expose()),
            None => request,
        };
        let body: Value = json(NAME, request).await?;
        Ok(body
            .get("data")
            .and_then(Value::as_array)
            .map(|models| {
                models
                    .iter()
                    .filter_map(|m| m.get("id").and_then(Value::as_str).map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default())
    }
}

/// The images of an `/images/generations` answer: `data[].b64_json` (decoded) or
/// `data[].url`.
fn images(answer: &Value) -> Result<Vec<GeneratedImage>, ServiceError> {
    let data = answer
        .get("data")
        .and_then(Value::as_array)
        .ok_or_else(|| invalid(NAME, "an images answer without data"))?;
    let images = data
        .iter()
        .map(|row| {
            if let Some(encoded) = row.get("b64_json").and_then(Value::as_str) {
                base64::engine::general_purpose::STANDARD
                    .decode(encoded.trim())
                    .map(GeneratedImage::Bytes)
                    .map_err(|e| invalid(NAME, format!("an image that is not base64: {e}")))
            } else if let Some(url) = row.get("url").and_then(Value::as_str) {
                Ok(GeneratedImage::Url(url.to_owned()))
            } else {
                Err(invalid(NAME, "an image with neither b64_json nor url"))
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    if images.is_empty() {
        return Err(invalid(NAME, "an images answer without images"));
    }
    Ok(images)
}

/// A JSON list of numbers as `f32`s.
pub(crate) fn vector(value: Option<&Value>) -> Option<Vec<f32>> {
    #[allow(clippy::cast_possible_truncation)]
    value?
        .as_array()?
        .iter()
        .map(|n| n.as_f64().map(|f| f as f32))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pieces, content, model, usage, finished.
    type Told = (Vec<String>, String, Option<String>, Usage, bool);

    /// What a stream of chunks told, or the kind of error it ended with.
    fn told(chunks: &[&str], typed: bool) -> Result<Told, String> {
        let mut got = Streamed::default();
        let mut pieces = Vec::new();
        let mut on_delta = |p: &str| pieces.push(p.to_owned());
        for data in chunks {
            let taken = if typed {
                got.take_data(NAME, data, &mut on_delta)
            } else {
                serde_json::from_str::<Value>(data)
                    .map_err(|e| invalid(NAME, e.to_string()))
                    .and_then(|v| got.take(NAME, &v, &mut on_delta))
            };
            taken.map_err(|e| format!("{:?}", e.kind))?;
        }
        Ok((pieces, got.content, got.model, got.usage, got.finished))
    }

    #[test]
    fn typed_chunks_tell_what_the_lenient_reading_tells() {
        let streams: &[&[&str]] = &[
            &[
                r#"{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#,
                r#"{"id":"c","model":"m","choices":[{"index":0,"delta":{"content":"Hel\u00e9"},"finish_reason":null}]}"#,
                r#"{"id":"c","model":"other","choices":[{"index":0,"delta":{"content":"lo \"x\""},"logprobs":null}]}"#,
                r#"{"id":"c","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#,
                r#"{"id":"c","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}"#,
            ],
            &[r#"{"choices":[{"text":"legacy","finish_reason":"length"}]}"#],
            &[r#"{"choices":[{"message":{"role":"assistant","content":"whole"}}],"usage":null}"#],
            &[r#"{"choices":[{"delta":{"content":null}}],"usage":{"prompt_tokens":99999999999}}"#],
            &[r#"{"choices":[{"delta":{"content":["odd"]},"finish_reason":7}]}"#],
            &[r#"{"model":5,"choices":"none"}"#],
            &[r#"{"error":{"message":"overloaded"}}"#],
            &["[]"],
            &["\"text\""],
            &["{not json"],
        ];
        for chunks in streams {
            assert_eq!(told(chunks, true), told(chunks, false), "{chunks:?}");
        }
        let (pieces, content, model, usage, finished) =
            told(streams[0], true).expect("the usual stream");
        assert_eq!(pieces, ["Helé", "lo \"x\""]);
        assert_eq!(content, "Helélo \"x\"");
        assert_eq!(model.as_deref(), Some("m"));
        assert_eq!(
            (usage.prompt_tokens, usage.completion_tokens),
            (Some(3), Some(2))
        );
        assert!(finished);
        assert_eq!(told(&["[]"], true), Err("Validation".into()));
    }

    #[test]
    fn images_are_read_as_bytes_or_urls() {
        let answer = json!({"created": 1, "data": [
            {"b64_json": "iVBORw0K"},
            {"url": "https://files.example/1.png", "revised_prompt": "a cat"},
        ]});
        assert_eq!(
            images(&answer).expect("two images"),
            [
                GeneratedImage::Bytes(b"\x89PNG\r\n".to_vec()),
                GeneratedImage::Url("https://files.example/1.png".into()),
            ]
        );
        for bad in [
            json!({"data": []}),
            json!({"data": [{"b64_json": "not base64!"}]}),
            json!({"data": [{"revised_prompt": "no image"}]}),
            json!({"error": "x"}),
        ] {
            let e = images(&bad).expect_err("not images");
            assert_eq!(e.kind, ServiceErrorKind::Validation, "{bad}");
            assert_eq!(e.service, NAME);
        }
    }
}
