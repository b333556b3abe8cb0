//! A fake LLM server on 127.0.0.1 that speaks OpenAI's chat completions (SSE) and image
//! generation, Ollama's native API (NDJSON), Anthropic's Messages API (SSE with named events)
//! or Replicate's predictions (create, then poll), playing scripted [`Step`]s: what the
//! provider conformance suite and the AI pipeline tests run against.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use confab_core::ports::llm::{LlmProvider, Turn};
use confab_core::settings::Secret;
use confab_core::testing::llm::role;
pub use confab_core::testing::llm::{Scripted, Sent, Step};
use serde_json::{Value, json};

use crate::llm::{
    AnthropicConfig, OllamaConfig, OpenAiConfig, ReplicateConfig, build_anthropic, build_ollama,
    build_openai, build_replicate,
};
use crate::lock;

/// The key the fake Anthropic and Replicate servers expect (and their providers are given).
pub const FAKE_KEY: &str = "fake-key";
/// The version a fake Replicate provider is configured with.
pub const REPLICATE_VERSION: &str =
    "768da535061f276d6a0c82f40adb669f3585bb6977a21b41f41ed2d814219053";
/// The version the suite's requests name on the Replicate wire (it overrides the configured
/// one).
pub const REPLICATE_REQUEST_VERSION: &str =
    "bc3aa35a8b17f6c41d1a2feae8c1ee3d020f5de230240d5333bd0e7c687784f4";
/// How often a fake Replicate provider polls.
pub const REPLICATE_POLL: Duration = Duration::from_millis(20);
/// The image every fake image generation answers: a 1×1 green PNG.
pub const PNG: &[u8] = &[
    0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x48, 0x44, 0x52,
    0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x08, 0x02, 0x00, 0x00, 0x00, 0x90, 0x77, 0x53,
    0xde, 0x00, 0x00, 0x00, 0x0c, 0x49, 0x44, 0x41, 0x54, 0x78, 0x9c, 0x63, 0xf8, 0xcf, 0xc0, 0x00,
    0x00, 0x03, 0x01, 0x01, 0x00, 0xc9, 0xfe, 0x92, 0xef, 0x00, 0x00, 0x00, 0x00, 0x49, 0x45, 0x4e,
    0x44, 0xae, 0x42, 0x60, 0x82,
];
/// Polls a streamed Replicate prediction takes: `processing`, `processing`, `succeeded`.
const REPLICATE_POLLS: usize = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    OpenAi,
    Ollama,
    Anthropic,
    Replicate,
}

/// How a fake Replicate prediction ends.
enum Outcome {
    Succeeded {
        output: Value,
        usage: (u32, u32),
    },
    Failed(String),
    /// The poll that would end it answers a body that is not JSON.
    Malformed,
}

struct Prediction {
    version: String,
    created: Instant,
    /// Polls answered so far.
    polls: usize,
    /// The poll that ends it, no sooner than `ready_after` after it was created.
    ends_at_poll: usize,
    ready_after: Duration,
    /// The ending answer is written in pieces of this many bytes.
    cut: usize,
    outcome: Outcome,
    canceled: bool,
}

struct Script {
    /// `http://127.0.0.1:{port}`.
    origin: String,
    steps: Mutex<VecDeque<Step>>,
    /// Played when no step is queued.
    fallback: Mutex<Option<Step>>,
    requests: Mutex<Vec<Value>>,
    /// When each completion call arrived (load tools time the pipeline with it).
    arrivals: Mutex<Vec<Instant>>,
    predictions: Mutex<HashMap<String, Prediction>>,
    /// Predictions created (their ids count up).
    created: AtomicUsize,
    polls: AtomicUsize,
    cancels: AtomicUsize,
    /// Whether each streamed answer starts after a pause of its own ([`FakeLlm::spread_streams`]).
    spread: AtomicBool,
}

impl Script {
    /// The step the next call plays.
    fn next(&self) -> Step {
        lock(&self.steps)
            .pop_front()
            .or_else(|| lock(&self.fallback).clone())
            .unwrap_or_else(|| Step::pieces(&["Hello", "!"]))
    }

    /// URLs of `n` images the fake itself serves.
    fn image_urls(&self, n: u64) -> Vec<String> {
        (0..n)
            .map(|i| format!("{}/files/{i}.png", self.origin))
            .collect()
    }
}

pub struct FakeLlm {
    wire: Wire,
    /// The base URL a provider is configured with.
    pub url: String,
    script: Arc<Script>,
    _server: tokio::task::JoinHandle<()>,
}

impl FakeLlm {
    pub async fn start(wire: Wire) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a port for the fake LLM");
        let origin = format!(
            "http://127.0.0.1:{}",
            listener.local_addr().expect("bound").port()
        );
        let script = Arc::new(Script {
            origin: origin.clone(),
            steps: Mutex::default(),
            fallback: Mutex::default(),
            requests: Mutex::default(),
            arrivals: Mutex::default(),
            predictions: Mutex::default(),
            created: AtomicUsize::new(0),
            polls: AtomicUsize::new(0),
            cancels: AtomicUsize::new(0),
            spread: AtomicBool::new(false),
        });
        let router = match wire {
            Wire::OpenAi => Router::new()
                .route("/v1/chat/completions", post(complete))
                .route("/v1/models", get(|| async { axum::Json(json!({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})) }))
                .route("/v1/embeddings", post(openai_embeddings))
                .route("/v1/images/generations", post(openai_images))
                .route("/files/{name}", get(file)),
            Wire::Ollama => Router::new()
                .route("/api/chat", post(complete))
                .route("/api/tags", get(|| async { axum::Json(json!({"models": [{"name": "fake-model:latest"}]})) }))
                .route("/api/embeddings", post(ollama_embeddings)),
            Wire::Anthropic => Router::new()
                .route("/v1/messages", post(complete))
                .route("/v1/models", get(anthropic_models)),
            Wire::Replicate => Router::new()
                .route("/v1/predictions", post(replicate_create))
                .route("/v1/predictions/{id}", get(replicate_poll))
                .route("/v1/predictions/{id}/cancel", post(replicate_cancel))
                .route("/files/{name}", get(file)),
        }
        .with_state((wire, script.clone()));
        // Each piece is written when it is due, as a provider does: Nagle's algorithm would
        // hold a piece back until the previous one is acknowledged (the relay's figures
        // then show the client's delayed ACK, up to 40 ms).
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Self {
            wire,
            url: base(wire, &origin),
            script,
            _server: server,
        }
    }

    /// What every call gets when nothing is queued (default: a short answer).
    pub fn set_fallback(&self, step: Step) {
        *lock(&self.script.fallback) = Some(step);
    }

    /// From now on each streamed answer begins after a pause of its own, between none and
    /// one `gap` (spread evenly over the calls), like a provider's time to first token. Many
    /// answers streaming at once then keep phases of their own, as independent providers'
    /// answers do; without it, every answer of one batch of calls paces in step with the
    /// others and their pieces come as one burst each `gap`.
    pub fn spread_streams(&self) {
        self.script.spread.store(true, Ordering::Relaxed);
    }

    /// How many calls arrived: completions and image generations (on the Replicate wire,
    /// predictions created; polls are [`FakeLlm::polls`]).
    pub fn calls(&self) -> usize {
        lock(&self.script.requests).len()
    }

    /// When each completion call arrived, in order.
    pub fn arrivals(&self) -> Vec<Instant> {
        lock(&self.script.arrivals).clone()
    }

    /// How many times a Replicate prediction was polled.
    pub fn polls(&self) -> usize {
        self.script.polls.load(Ordering::SeqCst)
    }

    /// How many Replicate predictions were cancelled.
    pub fn cancels(&self) -> usize {
        self.script.cancels.load(Ordering::SeqCst)
    }
}

impl Scripted for FakeLlm {
    fn provider(&self) -> Arc<dyn LlmProvider> {
        provider(self.wire, &self.url)
    }

    fn unreachable(&self) -> Arc<dyn LlmProvider> {
        // A port that was just free: nobody listens there.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_or(9, |a| a.port());
        provider(
            self.wire,
            &base(self.wire, &format!("http://127.0.0.1:{port}")),
        )
    }

    fn push(&self, step: Step) {
        lock(&self.script.steps).push_back(step);
    }

    fn requests(&self) -> Vec<Value> {
        lock(&self.script.requests).clone()
    }

    fn streams(&self) -> bool {
        self.wire != Wire::Replicate
    }

    fn images(&self) -> bool {
        matches!(self.wire, Wire::OpenAi | Wire::Replicate)
    }

    fn model(&self) -> String {
        match self.wire {
            Wire::Replicate => REPLICATE_REQUEST_VERSION.into(),
            _ => "m1".into(),
        }
    }

    fn sent(&self, body: &Value) -> Sent {
        match self.wire {
            Wire::OpenAi => Sent::chat(body),
            Wire::Ollama => Sent {
                max_tokens: body["options"]["num_predict"].as_u64(),
                ..Sent::chat(body)
            },
            Wire::Anthropic => {
                let chat = Sent::chat(body);
                let system = body["system"]
                    .as_str()
                    .map(|s| Turn::new(confab_core::ports::llm::Role::System, s));
                Sent {
                    turns: system.into_iter().chain(chat.turns).collect(),
                    ..chat
                }
            }
            Wire::Replicate => {
                let input = &body["input"];
                let system = input["system_prompt"]
                    .as_str()
                    .map(|s| Turn::new(confab_core::ports::llm::Role::System, s));
                // `role: content` turns a blank line apart, then `assistant:`.
                let prompt = input["prompt"].as_str().unwrap_or_default();
                let turns = prompt
                    .strip_suffix("assistant:")
                    .unwrap_or(prompt)
                    .split("\n\n")
                    .filter(|t| !t.is_empty())
                    .filter_map(|t| {
                        let (name, content) = t.split_once(": ")?;
                        Some(Turn::new(role(name)?, content))
                    });
                Sent {
                    model: body["version"].as_str().unwrap_or_default().to_owned(),
                    turns: system.into_iter().chain(turns).collect(),
                    max_tokens: input["max_new_tokens"].as_u64(),
                }
            }
        }
    }
}

/// The base URL a provider of `wire` is configured with, for a server at `origin`.
fn base(wire: Wire, origin: &str) -> String {
    match wire {
        Wire::OpenAi | Wire::Replicate => format!("{origin}/v1"),
        Wire::Ollama | Wire::Anthropic => origin.to_owned(),
    }
}

fn provider(wire: Wire, url: &str) -> Arc<dyn LlmProvider> {
    match wire {
        Wire::OpenAi => build_openai(&OpenAiConfig {
            base_url: Some(url.to_owned()),
            model: Some("fake-model".into()),
            ..OpenAiConfig::default()
        }),
        Wire::Ollama => build_ollama(&OllamaConfig {
            base_url: Some(url.to_owned()),
            model: Some("fake-model".into()),
            embedding_model: Some("fake-embed".into()),
        }),
        Wire::Anthropic => build_anthropic(&AnthropicConfig {
            api_key: Some(Secret::new(FAKE_KEY)),
            base_url: Some(url.to_owned()),
            model: Some("fake-model".into()),
        }),
        Wire::Replicate => build_replicate(&ReplicateConfig {
            api_key: Some(Secret::new(FAKE_KEY)),
            api_url: Some(url.to_owned()),
            model_version: Some(REPLICATE_VERSION.into()),
            poll_interval_ms: Some(u64::try_from(REPLICATE_POLL.as_millis()).unwrap_or(u64::MAX)),
            ..ReplicateConfig::default()
        }),
    }
    .expect("a fake provider's configuration is valid")
}

type Shared = State<(Wire, Arc<Script>)>;

fn json_response(status: StatusCode, body: String) -> Response {
    let mut response = (status, body).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn status_response(status: u16, retry_after: Option<String>, body: String) -> Response {
    let mut response = json_response(
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        body,
    );
    if let Some(after) = retry_after.and_then(|a| HeaderValue::from_str(&a).ok()) {
        response.headers_mut().insert(header::RETRY_AFTER, after);
    }
    response
}

async fn hang() -> Response {
    std::future::pending::<()>().await;
    StatusCode::GATEWAY_TIMEOUT.into_response()
}

/// Anthropic's refusal of a request without its key or API version.
fn anthropic_refusal(headers: &HeaderMap) -> Option<Response> {
    let error = |status: StatusCode, kind: &str, message: &str| {
        json_response(
            status,
            json!({"type": "error", "error": {"type": kind, "message": message}}).to_string(),
        )
    };
    if headers.get("x-api-key").is_none_or(|k| k != FAKE_KEY) {
        return Some(error(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "invalid x-api-key",
        ));
    }
    if headers
        .get("anthropic-version")
        .is_none_or(|v| v != "2023-06-01")
    {
        return Some(error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "anthropic-version: header is required",
        ));
    }
    None
}

/// Replicate's refusal of a request without its token.
fn replicate_refusal(headers: &HeaderMap) -> Option<Response> {
    let expected = format!("Bearer {FAKE_KEY}");
    headers
        .get(header::AUTHORIZATION)
        .is_none_or(|a| *a != *expected)
        .then(|| {
            json_response(
                StatusCode::UNAUTHORIZED,
                json!({"title": "Unauthenticated", "detail": "You did not pass a valid authentication token", "status": 401}).to_string(),
            )
        })
}

async fn complete(
    State((wire, script)): Shared,
    headers: HeaderMap,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    if wire == Wire::Anthropic
        && let Some(refusal) = anthropic_refusal(&headers)
    {
        return refusal;
    }
    let model = body["model"].as_str().unwrap_or_default().to_owned();
    let call = {
        let mut arrivals = lock(&script.arrivals);
        arrivals.push(Instant::now());
        arrivals.len()
    };
    lock(&script.requests).push(body);
    let step = script.next();
    if let Step::Stream { gap, .. } = &step
        && script.spread.load(Ordering::Relaxed)
    {
        // The golden ratio's multiples modulo 1 spread any run of calls evenly.
        #[allow(clippy::cast_precision_loss)]
        let phase = (call as f64 * 0.618_033_988_749_895).fract();
        tokio::time::sleep(gap.mul_f64(phase)).await;
    }
    play(wire, &model, step).await
}

/// A chat call's answer. (Replicate's predictions are played by `replicate_create` and
/// `replicate_poll`; it shares Anthropic's arms here and below only to keep the matches whole.)
async fn play(wire: Wire, model: &str, step: Step) -> Response {
    match step {
        Step::Status {
            status,
            retry_after,
            body,
        } => status_response(status, retry_after, body),
        Step::Hang => hang().await,
        Step::Whole(text) => match wire {
            Wire::OpenAi => axum::Json(json!({
                "id": "chatcmpl-1", "object": "chat.completion", "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
            }))
            .into_response(),
            Wire::Ollama => axum::Json(json!({
                "model": model, "message": {"role": "assistant", "content": text}, "done": true,
                "prompt_eval_count": 3, "eval_count": 2,
            }))
            .into_response(),
            Wire::Anthropic | Wire::Replicate => axum::Json(json!({
                "id": "msg_1", "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": text}],
                "stop_reason": "end_turn", "stop_sequence": null,
                "usage": {"input_tokens": 3, "output_tokens": 2},
            }))
            .into_response(),
        },
        Step::Stream {
            pieces,
            gap,
            cut,
            usage,
        } => {
            let mut writes: Vec<(Duration, String)> = opening(wire, model, usage.0)
                .into_iter()
                .map(|w| (Duration::ZERO, w))
                .collect();
            for piece in &pieces {
                writes.push((gap, piece_event(wire, model, piece)));
            }
            writes.push((Duration::ZERO, end(wire, model, usage)));
            stream(content_type(wire), writes, cut.max(1))
        }
        Step::Malformed => {
            let mut writes: Vec<(Duration, String)> = Vec::new();
            if wire == Wire::Anthropic {
                writes.push((Duration::ZERO, anthropic_start(model, 3)));
            }
            writes.push((Duration::ZERO, piece_event(wire, model, "Hi")));
            writes.push((
                Duration::ZERO,
                match wire {
                    Wire::OpenAi => "data: {\"choices\": [oops\n\n".to_owned(),
                    Wire::Ollama => "{\"message\": oops\n".to_owned(),
                    Wire::Anthropic | Wire::Replicate => {
                        "event: content_block_delta\ndata: {\"type\": oops\n\n".to_owned()
                    }
                },
            ));
            stream(content_type(wire), writes, 4096)
        }
        Step::Cut(pieces) => {
            let mut writes: Vec<(Duration, String)> = Vec::new();
            if wire == Wire::Anthropic {
                writes.extend(opening(wire, model, 3).into_iter().map(|w| (Duration::ZERO, w)));
            }
            writes.extend(
                pieces
                    .iter()
                    .map(|p| (Duration::ZERO, piece_event(wire, model, p))),
            );
            stream(content_type(wire), writes, 4096)
        }
    }
}

fn content_type(wire: Wire) -> &'static str {
    match wire {
        Wire::Ollama => "application/x-ndjson",
        Wire::OpenAi | Wire::Anthropic | Wire::Replicate => "text/event-stream",
    }
}

fn openai_chunk(model: &str, delta: &Value, finish: Option<&str>) -> String {
    let chunk = json!({
        "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    });
    format!("data: {chunk}\n\n")
}

fn anthropic_event(data: &Value) -> String {
    format!(
        "event: {}\ndata: {data}\n\n",
        data["type"].as_str().unwrap_or("message")
    )
}

fn anthropic_start(model: &str, prompt_tokens: u32) -> String {
    anthropic_event(&json!({
        "type": "message_start",
        "message": {
            "id": "msg_1", "type": "message", "role": "assistant", "content": [], "model": model,
            "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": prompt_tokens, "output_tokens": 1},
        },
    }))
}

/// What a stream says before its first piece.
fn opening(wire: Wire, model: &str, prompt_tokens: u32) -> Vec<String> {
    match wire {
        // Real servers open with the role, and some send comments as keep-alives.
        Wire::OpenAi => vec![
            ": keep-alive\n\n".into(),
            openai_chunk(model, &json!({"role": "assistant", "content": ""}), None),
        ],
        Wire::Anthropic => vec![
            anthropic_start(model, prompt_tokens),
            anthropic_event(
                &json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            ),
            anthropic_event(&json!({"type": "ping"})),
        ],
        Wire::Ollama | Wire::Replicate => Vec::new(),
    }
}

fn piece_event(wire: Wire, model: &str, piece: &str) -> String {
    match wire {
        Wire::OpenAi => openai_chunk(model, &json!({"content": piece}), None),
        Wire::Ollama => format!(
            "{}\n",
            json!({"model": model, "created_at": "2026-01-01T00:00:00Z", "message": {"role": "assistant", "content": piece}, "done": false})
        ),
        Wire::Anthropic | Wire::Replicate => anthropic_event(
            &json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}}),
        ),
    }
}

fn end(wire: Wire, model: &str, (prompt, completion): (u32, u32)) -> String {
    match wire {
        Wire::OpenAi => {
            let usage = json!({
                "id": "chatcmpl-1", "object": "chat.completion.chunk", "model": model, "choices": [],
                "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
            });
            format!(
                "{}data: {usage}\n\ndata: [DONE]\n\n",
                openai_chunk(model, &json!({}), Some("stop"))
            )
        }
        Wire::Ollama => format!(
            "{}\n",
            json!({"model": model, "message": {"role": "assistant", "content": ""}, "done": true, "done_reason": "stop", "prompt_eval_count": prompt, "eval_count": completion})
        ),
        Wire::Anthropic | Wire::Replicate => [
            json!({"type": "content_block_stop", "index": 0}),
            json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": completion}}),
            json!({"type": "message_stop"}),
        ]
        .iter()
        .map(anthropic_event)
        .collect(),
    }
}

/// A streamed body: each write its pause after the previous one was due, cut into `cut`-byte
/// pieces. A write that goes out late does not delay the ones after it: a stream keeps its
/// own pace, as a provider's does. (Sleeping each pause from when the last write went out
/// let one busy moment of the process line up every stream it held up: 300 streams at 20
/// pieces/s fell into step and came as one burst every 50 ms.) `{now}` in a
/// write becomes the microseconds since the Unix epoch as it is sent, so a client can time
/// the relay of each piece: stamped when hyper's connection task takes the write from the
/// body to put it on the wire, not where the pause ends (a hop to that task later, which
/// under load put the fake's own scheduling into the figure).
fn stream(content_type: &'static str, writes: Vec<(Duration, String)>, cut: usize) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<String>(16);
    tokio::spawn(async move {
        let mut due = tokio::time::Instant::now();
        for (pause, text) in writes {
            if !pause.is_zero() {
                due += pause;
                tokio::time::sleep_until(due).await;
            }
            if tx.send(text).await.is_err() {
                return;
            }
        }
    });
    let parts = VecDeque::<Bytes>::new();
    let body = Body::from_stream(futures_util::stream::unfold(
        (rx, parts),
        move |(mut rx, mut parts)| async move {
            while parts.is_empty() {
                let text = stamped(rx.recv().await?);
                parts.extend(text.as_bytes().chunks(cut).map(Bytes::copy_from_slice));
            }
            let part = parts.pop_front()?;
            Some((Ok::<_, std::io::Error>(part), (rx, parts)))
        },
    ));
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

/// `text` with `{now}` replaced by the microseconds since the Unix epoch.
fn stamped(text: String) -> String {
    if !text.contains("{now}") {
        return text;
    }
    let micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    text.replace("{now}", &micros.to_string())
}

/// A deterministic vector per text: its length and first byte.
fn embedding(text: &str) -> Value {
    let first = f64::from(text.bytes().next().unwrap_or(0));
    let length = f64::from(u32::try_from(text.len()).unwrap_or(u32::MAX));
    json!([length, first, 0.5])
}

async fn openai_embeddings(axum::Json(body): axum::Json<Value>) -> Response {
    let inputs: Vec<String> = match &body["input"] {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => return (StatusCode::BAD_REQUEST, "input").into_response(),
    };
    // Answered in reverse order: a client must sort by index.
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .rev()
        .map(|(i, t)| json!({"object": "embedding", "index": i, "embedding": embedding(t)}))
        .collect();
    axum::Json(json!({"object": "list", "data": data, "model": body["model"]})).into_response()
}

async fn ollama_embeddings(axum::Json(body): axum::Json<Value>) -> Response {
    let text = body["prompt"].as_str().unwrap_or_default();
    axum::Json(json!({"embedding": embedding(text)})).into_response()
}

/// `n` images as base64 (or as URLs when the request asks for `response_format: "url"`);
/// `Status`, `Hang` and `Malformed` steps are played, any other step is a success.
async fn openai_images(
    State((_, script)): Shared,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    let n = body["n"].as_u64().unwrap_or(1);
    let urls = body["response_format"] == "url";
    lock(&script.requests).push(body);
    match script.next() {
        Step::Status {
            status,
            retry_after,
            body,
        } => status_response(status, retry_after, body),
        Step::Hang => hang().await,
        Step::Malformed => json_response(StatusCode::OK, "{\"data\": [oops".into()),
        Step::Stream { .. } | Step::Whole(_) | Step::Cut(_) => {
            let data: Vec<Value> = if urls {
                script
                    .image_urls(n)
                    .into_iter()
                    .map(|url| json!({"url": url}))
                    .collect()
            } else {
                let encoded = base64::engine::general_purpose::STANDARD.encode(PNG);
                (0..n).map(|_| json!({"b64_json": encoded})).collect()
            };
            axum::Json(json!({"created": 1, "data": data})).into_response()
        }
    }
}

/// Every file is the PNG.
async fn file() -> Response {
    ([(header::CONTENT_TYPE, "image/png")], PNG).into_response()
}

async fn anthropic_models(headers: HeaderMap) -> Response {
    if let Some(refusal) = anthropic_refusal(&headers) {
        return refusal;
    }
    axum::Json(json!({
        "data": [{"type": "model", "id": "fake-model", "display_name": "Fake", "created_at": "2026-01-01T00:00:00Z"}],
        "has_more": false, "first_id": "fake-model", "last_id": "fake-model",
    }))
    .into_response()
}

/// A prediction as Replicate shows it, in `status`.
fn prediction_json(origin: &str, id: &str, prediction: &Prediction, status: &str) -> Value {
    let (output, error, metrics) = match (&prediction.outcome, status) {
        (Outcome::Succeeded { output, usage }, "succeeded") => (
            output.clone(),
            Value::Null,
            json!({"predict_time": 0.1, "input_token_count": usage.0, "output_token_count": usage.1}),
        ),
        (Outcome::Failed(error), "failed") => (Value::Null, json!(error), json!({})),
        _ => (Value::Null, Value::Null, json!({})),
    };
    json!({
        "id": id, "model": "fake/fake-model", "version": prediction.version,
        "input": {}, "logs": "", "output": output, "error": error, "status": status,
        "created_at": "2026-01-01T00:00:00Z",
        "urls": {
            "get": format!("{origin}/v1/predictions/{id}"),
            "cancel": format!("{origin}/v1/predictions/{id}/cancel"),
        },
        "metrics": metrics,
    })
}

/// Creates a prediction playing the next step: `Stream` succeeds on the third poll (and no
/// sooner than its pieces' gaps add up), `Whole` has succeeded already, `Cut` fails on the
/// first poll, `Malformed` answers the first poll with a body that is not JSON, `Status` and
/// `Hang` are the create call's answer. A prediction with `num_outputs` is an image model's:
/// its output is that many URLs of the fake's own files.
async fn replicate_create(
    State((_, script)): Shared,
    headers: HeaderMap,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    if let Some(refusal) = replicate_refusal(&headers) {
        return refusal;
    }
    let version = body["version"].as_str().unwrap_or_default().to_owned();
    let images = body["input"]["num_outputs"].as_u64();
    lock(&script.requests).push(body);
    let step = script.next();
    let output = |text: Value| images.map_or(text, |n| json!(script.image_urls(n)));
    let mut prediction = Prediction {
        version,
        created: Instant::now(),
        polls: 0,
        ends_at_poll: 1,
        ready_after: Duration::ZERO,
        cut: 4096,
        outcome: Outcome::Malformed,
        canceled: false,
    };
    let mut status = "starting";
    match step {
        Step::Status {
            status,
            retry_after,
            body,
        } => return status_response(status, retry_after, body),
        Step::Hang => return hang().await,
        Step::Stream {
            pieces,
            gap,
            cut,
            usage,
        } => {
            prediction.ends_at_poll = REPLICATE_POLLS;
            prediction.ready_after = gap * u32::try_from(pieces.len()).unwrap_or(u32::MAX);
            prediction.cut = cut.max(1);
            prediction.outcome = Outcome::Succeeded {
                output: output(json!(pieces)),
                usage,
            };
        }
        Step::Whole(text) => {
            prediction.outcome = Outcome::Succeeded {
                output: output(json!(text)),
                usage: (3, 2),
            };
            status = "succeeded";
        }
        Step::Cut(pieces) => {
            prediction.outcome =
                Outcome::Failed(format!("CUDA out of memory after {:?}", pieces.concat()));
        }
        Step::Malformed => {}
    }
    let id = format!("fake{}", script.created.fetch_add(1, Ordering::SeqCst));
    let answer = prediction_json(&script.origin, &id, &prediction, status);
    lock(&script.predictions).insert(id, prediction);
    (StatusCode::CREATED, axum::Json(answer)).into_response()
}

async fn replicate_poll(
    State((_, script)): Shared,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(refusal) = replicate_refusal(&headers) {
        return refusal;
    }
    script.polls.fetch_add(1, Ordering::SeqCst);
    let mut predictions = lock(&script.predictions);
    let Some(prediction) = predictions.get_mut(&id) else {
        return json_response(
            StatusCode::NOT_FOUND,
            json!({"detail": "Not found.", "status": 404}).to_string(),
        );
    };
    prediction.polls += 1;
    let status = if prediction.canceled {
        "canceled"
    } else if prediction.polls < prediction.ends_at_poll
        || prediction.created.elapsed() < prediction.ready_after
    {
        "processing"
    } else {
        match prediction.outcome {
            Outcome::Succeeded { .. } => "succeeded",
            Outcome::Failed(_) => "failed",
            Outcome::Malformed => {
                return json_response(StatusCode::OK, "<html>502 Bad Gateway</html>".into());
            }
        }
    };
    let answer = prediction_json(&script.origin, &id, prediction, status).to_string();
    let cut = prediction.cut;
    drop(predictions);
    stream("application/json", vec![(Duration::ZERO, answer)], cut)
}

async fn replicate_cancel(
    State((_, script)): Shared,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(refusal) = replicate_refusal(&headers) {
        return refusal;
    }
    let mut predictions = lock(&script.predictions);
    let Some(prediction) = predictions.get_mut(&id) else {
        return json_response(
            StatusCode::NOT_FOUND,
            json!({"detail": "Not found.", "status": 404}).to_string(),
        );
    };
    prediction.canceled = true;
    script.cancels.fetch_add(1, Ordering::SeqCst);
    axum::Json(prediction_json(&script.origin, &id, prediction, "canceled")).into_response()
}
