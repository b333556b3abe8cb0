//! Anthropic's Messages API: `POST /v1/messages` (SSE with named events), `GET /v1/models`.
//! The system prompt is a field of its own, not a turn, and `max_tokens` is required. Parsing
//! is lenient: event types Anthropic adds later (and `ping`) are skipped, a server that
//! answers one JSON message instead of a stream is fine.

use confab_core::error::{ServiceError, ServiceErrorKind};
use confab_core::ports::llm::{Completion, CompletionRequest, LlmProvider, OnDelta, Role, Usage};
use confab_core::settings::Secret;
use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use serde_json::{Value, json};

use super::{invalid, json, send, transport_error};

/// The provider's name in errors, metrics and stored answers.
const NAME: &str = "anthropic";
/// The API version every request names (`anthropic-version`).
const API_VERSION: &str = "2023-06-01";
/// `max_tokens` when the request sets none (Anthropic requires one).
const DEFAULT_MAX_TOKENS: u32 = 1024;

pub struct AnthropicProvider {
    client: reqwest::Client,
    base: String,
    key: Secret,
    model: String,
}

impl AnthropicProvider {
    /// `base` is the server without `/v1` (`https://api.anthropic.com`).
    pub fn new(client: reqwest::Client, base: &str, key: Secret, model: String) -> Self {
        Self {
            client,
            base: base.trim_end_matches('/').to_owned(),
            key,
            model,
        }
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.client
            .request(method, format!("{}{path}", self.base))
            .header("x-api-key", self.key.expose())
            .header("anthropic-version", API_VERSION)
    }
}

/// The Messages API body: system turns joined into `system`, the others as `messages`.
fn body(request: &CompletionRequest) -> Value {
    let system: Vec<&str> = request
        .turns
        .iter()
        .filter(|t| t.role == Role::System && !t.content.is_empty())
        .map(|t| t.content.as_str())
        .collect();
    // Anthropic refuses an empty text turn (an answer that failed, kept as context).
    let messages: Vec<Value> = request
        .turns
        .iter()
        .filter(|t| t.role != Role::System && !t.content.is_empty())
        .map(|t| json!({"role": t.role.as_str(), "content": t.content}))
        .collect();
    let mut body = json!({
        "model": request.model,
        "max_tokens": request.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
        "messages": messages,
        "stream": true,
    });
    if !system.is_empty() {
        body["system"] = json!(system.join("\n\n"));
    }
    body
}

/// A count of tokens, when it is one.
fn count(value: Option<&Value>) -> Option<u32> {
    value
        .and_then(Value::as_u64)
        .and_then(|n| u32::try_from(n).ok())
}

/// An `error` event or body (`{"type": "error", "error": {"type", "message"}}`) in SPEC §8's
/// terms: `rate_limit_error` → `RateLimit`, anything else (`overloaded_error`, `api_error` …)
/// → `Api`, with Anthropic's own message.
fn api_error(body: &Value) -> ServiceError {
    let error = body.get("error").unwrap_or(body);
    let kind = error.get("type").and_then(Value::as_str).unwrap_or("error");
    let message = error
        .get("message")
        .and_then(Value::as_str)
        .map_or_else(|| error.to_string(), str::to_owned);
    let message: String = format!("{kind}: {message}").chars().take(300).collect();
    let kind = if kind == "rate_limit_error" {
        ServiceErrorKind::RateLimit { retry_after: None }
    } else {
        ServiceErrorKind::Api
    };
    ServiceError::new(kind, NAME, message)
}

/// What the events of a stream told so far.
#[derive(Default)]
struct Answer {
    content: String,
    model: Option<String>,
    usage: Usage,
    finished: bool,
}

impl Answer {
    fn piece(&mut self, piece: Option<&str>, on_delta: &mut OnDelta<'_>) {
        if let Some(piece) = piece.filter(|p| !p.is_empty()) {
            self.content.push_str(piece);
            on_delta(piece);
        }
    }

    fn usage(&mut self, usage: Option<&Value>) {
        let Some(usage) = usage else { return };
        if let Some(n) = count(usage.get("input_tokens")) {
            self.usage.prompt_tokens = Some(n);
        }
        if let Some(n) = count(usage.get("output_tokens")) {
            self.usage.completion_tokens = Some(n);
        }
    }

    /// Takes one event: its name and its data (whose `type` repeats the name).
    fn take(
        &mut self,
        event: &str,
        data: &Value,
        on_delta: &mut OnDelta<'_>,
    ) -> Result<(), ServiceError> {
        if !data.is_object() {
            return Err(invalid(NAME, "an event that is not a JSON object"));
        }
        match data.get("type").and_then(Value::as_str).unwrap_or(event) {
            "message_start" => {
                let message = data.get("message");
                if let Some(model) = message.and_then(|m| m.get("model")).and_then(Value::as_str) {
                    self.model.get_or_insert_with(|| model.to_owned());
                }
                self.usage(message.and_then(|m| m.get("usage")));
            }
            "content_block_start" => {
                let text = data.pointer("/content_block/text").and_then(Value::as_str);
                self.piece(text, on_delta);
            }
            // Only text: tool input, thinking and signatures are no part of the answer.
            "content_block_delta"
                if data.pointer("/delta/type").and_then(Value::as_str) == Some("text_delta") =>
            {
                let text = data.pointer("/delta/text").and_then(Value::as_str);
                self.piece(text, on_delta);
            }
            "message_delta" => self.usage(data.get("usage")),
            "message_stop" => self.finished = true,
            "error" => return Err(api_error(data)),
            // ping, content_block_stop, and event types added later.
            _ => {}
        }
        Ok(())
    }

    /// Takes a whole, non-streamed message (`content[].text`).
    fn take_whole(
        &mut self,
        whole: &Value,
        on_delta: &mut OnDelta<'_>,
    ) -> Result<(), ServiceError> {
        if whole.get("type").and_then(Value::as_str) == Some("error") {
            return Err(api_error(whole));
        }
        let blocks = whole
            .get("content")
            .and_then(Value::as_array)
            .ok_or_else(|| invalid(NAME, "an answer without content"))?;
        let text: String = blocks
            .iter()
            .filter(|b| {
                b.get("type")
                    .and_then(Value::as_str)
                    .is_none_or(|t| t == "text")
            })
            .filter_map(|b| b.get("text").and_then(Value::as_str))
            .collect();
        if let Some(model) = whole.get("model").and_then(Value::as_str) {
            self.model = Some(model.to_owned());
        }
        self.usage(whole.get("usage"));
        self.piece(Some(&text), on_delta);
        self.finished = true;
        Ok(())
    }
}

#[async_trait::async_trait]
impl LlmProvider for AnthropicProvider {
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
        let response = send(
            NAME,
            self.request(reqwest::Method::POST, "/v1/messages")
                .json(&body(request)),
        )
        .await?;
        let streamed = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        let mut answer = Answer::default();
        if streamed {
            let mut events = response.bytes_stream().eventsource();
            while let Some(event) = events.next().await {
                let event = event.map_err(|e| match e {
                    eventsource_stream::EventStreamError::Transport(t) => transport_error(NAME, &t),
                    other => invalid(NAME, format!("not a valid event stream: {other}")),
                })?;
                let data = event.data.trim();
                if data.is_empty() {
                    continue;
                }
                let data: Value = serde_json::from_str(data)
                    .map_err(|e| invalid(NAME, format!("an event that is not JSON: {e}")))?;
                answer.take(&event.event, &data, on_delta)?;
                if answer.finished {
                    break;
                }
            }
            if !answer.finished {
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
            answer.take_whole(&whole, on_delta)?;
        }
        Ok(Completion {
            content: answer.content,
            model: answer.model.unwrap_or_else(|| request.model.clone()),
            usage: answer.usage,
        })
    }

    async fn models(&self) -> Result<Vec<String>, ServiceError> {
        let body = json(
            NAME,
            self.request(reqwest::Method::GET, "/v1/models?limit=1000"),
        )
        .await?;
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

#[cfg(test)]
mod tests {
    use confab_core::ports::llm::Turn;

    use super::*;

    fn play(events: &[(&str, Value)]) -> (Answer, Vec<String>, Result<(), ServiceError>) {
        let mut answer = Answer::default();
        let mut seen = Vec::new();
        let mut result = Ok(());
        for (name, data) in events {
            result = answer.take(name, data, &mut |p: &str| seen.push(p.to_owned()));
            if result.is_err() {
                break;
            }
        }
        (answer, seen, result)
    }

    #[test]
    fn the_system_prompt_is_a_field_and_max_tokens_is_always_set() {
        let request = CompletionRequest {
            model: "claude-x".into(),
            turns: vec![
                Turn::new(Role::System, "Be brief."),
                Turn::new(Role::System, "Be kind."),
                Turn::new(Role::User, "Hi"),
                Turn::new(Role::Assistant, ""),
                Turn::new(Role::User, "Hello?"),
            ],
            max_tokens: None,
        };
        assert_eq!(
            body(&request),
            json!({
                "model": "claude-x",
                "max_tokens": 1024,
                "messages": [
                    {"role": "user", "content": "Hi"},
                    {"role": "user", "content": "Hello?"},
                ],
                "stream": true,
                "system": "Be brief.\n\nBe kind.",
            })
        );
    }

    #[test]
    fn a_stream_of_events_makes_an_answer() {
        let (answer, seen, result) = play(&[
            (
                "message_start",
                json!({"type": "message_start", "message": {"model": "claude-x", "usage": {"input_tokens": 9, "output_tokens": 1}}}),
            ),
            (
                "content_block_start",
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            ),
            ("ping", json!({"type": "ping"})),
            (
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hel"}}),
            ),
            (
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "hmm"}}),
            ),
            (
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "lo"}}),
            ),
            (
                "content_block_stop",
                json!({"type": "content_block_stop", "index": 0}),
            ),
            ("something_new", json!({"type": "something_new"})),
            (
                "message_delta",
                json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 4}}),
            ),
            ("message_stop", json!({"type": "message_stop"})),
        ]);
        result.expect("a good stream");
        assert_eq!(seen, ["Hel", "lo"]);
        assert_eq!(answer.content, "Hello");
        assert_eq!(answer.model.as_deref(), Some("claude-x"));
        assert_eq!(
            answer.usage,
            Usage {
                prompt_tokens: Some(9),
                completion_tokens: Some(4)
            }
        );
        assert!(answer.finished);
    }

    #[test]
    fn error_events_map_to_the_taxonomy() {
        let (_, seen, result) = play(&[
            (
                "content_block_delta",
                json!({"type": "content_block_delta", "delta": {"type": "text_delta", "text": "Hi"}}),
            ),
            (
                "error",
                json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
            ),
        ]);
        let e = result.expect_err("an error event");
        assert_eq!(seen, ["Hi"]);
        assert_eq!(e.kind, ServiceErrorKind::Api);
        assert_eq!(e.service, NAME);
        assert!(e.message.contains("Overloaded"), "{}", e.message);

        let (_, _, result) = play(&[(
            "error",
            json!({"type": "error", "error": {"type": "rate_limit_error", "message": "Slow down"}}),
        )]);
        let e = result.expect_err("an error event");
        assert_eq!(e.kind, ServiceErrorKind::RateLimit { retry_after: None });

        let (_, _, result) = play(&[("content_block_delta", json!(["not", "an", "object"]))]);
        assert_eq!(
            result.expect_err("not an object").kind,
            ServiceErrorKind::Validation
        );
    }

    #[test]
    fn a_whole_message_is_one_piece() {
        let mut answer = Answer::default();
        let mut seen = Vec::new();
        answer
            .take_whole(
                &json!({"type": "message", "model": "claude-x", "content": [
                    {"type": "text", "text": "Hello "},
                    {"type": "tool_use", "id": "t", "name": "f", "input": {}},
                    {"type": "text", "text": "there."},
                ], "usage": {"input_tokens": 3, "output_tokens": 2}}),
                &mut |p: &str| seen.push(p.to_owned()),
            )
            .expect("a whole message");
        assert_eq!(seen, ["Hello there."]);
        assert_eq!(answer.usage.completion_tokens, Some(2));
        let e = Answer::default()
            .take_whole(
                &json!({"type": "error", "error": {"type": "api_error", "message": "boom"}}),
                &mut |_: &str| {},
            )
            .expect_err("an error body");
        assert_eq!(e.kind, ServiceErrorKind::Api);
        let e = Answer::default()
            .take_whole(&json!({"type": "message"}), &mut |_: &str| {})
            .expect_err("no content");
        assert_eq!(e.kind, ServiceErrorKind::Validation);
    }
}
