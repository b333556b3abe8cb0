//! A fake LLM server on 127.0.0.1 that speaks OpenAI's chat completions (SSE) or Ollama's
//! native API (NDJSON), playing scripted [`Step`]s: what the provider conformance suite and
//! the AI pipeline tests run against.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use confab_core::ports::llm::LlmProvider;
pub use confab_core::testing::llm::{Scripted, Step};
use serde_json::{Value, json};

use crate::llm::{OllamaConfig, OpenAiConfig, build_ollama, build_openai};
use crate::lock;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    OpenAi,
    Ollama,
}

#[derive(Default)]
struct Script {
    steps: Mutex<VecDeque<Step>>,
    /// Played when no step is queued.
    fallback: Mutex<Option<Step>>,
    /// Steps for one model, ahead of the queue.
    by_model: Mutex<Vec<(String, Step)>>,
    requests: Mutex<Vec<Value>>,
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
        let script = Arc::new(Script::default());
        let router = match wire {
            Wire::OpenAi => Router::new()
                .route("/v1/chat/completions", post(complete))
                .route("/v1/models", get(|| async { axum::Json(json!({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})) }))
                .route("/v1/embeddings", post(openai_embeddings)),
            Wire::Ollama => Router::new()
                .route("/api/chat", post(complete))
                .route("/api/tags", get(|| async { axum::Json(json!({"models": [{"name": "fake-model:latest"}]})) }))
                .route("/api/embeddings", post(ollama_embeddings)),
        }
        .with_state((wire, script.clone()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a port for the fake LLM");
        let port = listener.local_addr().expect("bound").port();
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        let url = match wire {
            Wire::OpenAi => format!("http://127.0.0.1:{port}/v1"),
            Wire::Ollama => format!("http://127.0.0.1:{port}"),
        };
        Self {
            wire,
            url,
            script,
            _server: server,
        }
    }

    /// What every call gets when nothing is queued (default: a short answer).
    pub fn set_fallback(&self, step: Step) {
        *lock(&self.script.fallback) = Some(step);
    }

    /// Every call for `model` plays `step` (before the queue).
    pub fn for_model(&self, model: &str, step: Step) {
        lock(&self.script.by_model).push((model.to_owned(), step));
    }

    /// How many completion calls arrived.
    pub fn calls(&self) -> usize {
        lock(&self.script.requests).len()
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
        let url = match self.wire {
            Wire::OpenAi => format!("http://127.0.0.1:{port}/v1"),
            Wire::Ollama => format!("http://127.0.0.1:{port}"),
        };
        provider(self.wire, &url)
    }

    fn push(&self, step: Step) {
        lock(&self.script.steps).push_back(step);
    }

    fn requests(&self) -> Vec<Value> {
        lock(&self.script.requests).clone()
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
    }
    .expect("a fake provider's configuration is valid")
}

type Shared = State<(Wire, Arc<Script>)>;

async fn complete(State((wire, script)): Shared, axum::Json(body): axum::Json<Value>) -> Response {
    let model = body["model"].as_str().unwrap_or_default().to_owned();
    lock(&script.requests).push(body);
    let by_model = lock(&script.by_model)
        .iter()
        .find(|(m, _)| *m == model)
        .map(|(_, s)| s.clone());
    let step = by_model
        .or_else(|| lock(&script.steps).pop_front())
        .or_else(|| lock(&script.fallback).clone())
        .unwrap_or_else(|| Step::pieces(&["Hello", "!"]));
    play(wire, &model, step).await
}

async fn play(wire: Wire, model: &str, step: Step) -> Response {
    match step {
        Step::Status {
            status,
            retry_after,
            body,
        } => {
            let mut response =
                (StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), body)
                    .into_response();
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            if let Some(after) = retry_after.and_then(|a| HeaderValue::from_str(&a).ok()) {
                response.headers_mut().insert(header::RETRY_AFTER, after);
            }
            response
        }
        Step::Hang => {
            std::future::pending::<()>().await;
            StatusCode::GATEWAY_TIMEOUT.into_response()
        }
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
        },
        Step::Stream {
            pieces,
            gap,
            cut,
            usage,
        } => {
            let mut writes: Vec<(Duration, String)> = Vec::new();
            if wire == Wire::OpenAi {
                // Real servers open with the role, and some send comments as keep-alives.
                writes.push((Duration::ZERO, ": keep-alive\n\n".into()));
                writes.push((Duration::ZERO, openai_chunk(model, &json!({"role": "assistant", "content": ""}), None)));
            }
            for piece in &pieces {
                writes.push((gap, piece_event(wire, model, piece)));
            }
            writes.push((Duration::ZERO, end(wire, model, usage)));
            stream(wire, writes, cut.max(1))
        }
        Step::Malformed => {
            let writes = vec![
                (Duration::ZERO, piece_event(wire, model, "Hi")),
                (
                    Duration::ZERO,
                    match wire {
                        Wire::OpenAi => "data: {\"choices\": [oops\n\n".to_owned(),
                        Wire::Ollama => "{\"message\": oops\n".to_owned(),
                    },
                ),
            ];
            stream(wire, writes, 4096)
        }
        Step::Cut(pieces) => {
            let writes = pieces
                .iter()
                .map(|p| (Duration::ZERO, piece_event(wire, model, p)))
                .collect();
            stream(wire, writes, 4096)
        }
    }
}

fn openai_chunk(model: &str, delta: &Value, finish: Option<&str>) -> String {
    let chunk = json!({
        "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    });
    format!("data: {chunk}\n\n")
}

fn piece_event(wire: Wire, model: &str, piece: &str) -> String {
    match wire {
        Wire::OpenAi => openai_chunk(model, &json!({"content": piece}), None),
        Wire::Ollama => format!(
            "{}\n",
            json!({"model": model, "created_at": "2026-01-01T00:00:00Z", "message": {"role": "assistant", "content": piece}, "done": false})
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
    }
}

/// A streamed body: each write after its pause, cut into `cut`-byte pieces.
fn stream(wire: Wire, writes: Vec<(Duration, String)>, cut: usize) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    tokio::spawn(async move {
        for (pause, text) in writes {
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
            for part in text.as_bytes().chunks(cut) {
                if tx.send(Ok(Bytes::copy_from_slice(part))).await.is_err() {
                    return;
                }
            }
        }
    });
    let body = Body::from_stream(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }));
    let kind = match wire {
        Wire::OpenAi => "text/event-stream",
        Wire::Ollama => "application/x-ndjson",
    };
    ([(header::CONTENT_TYPE, kind)], body).into_response()
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
