//! Ollama's native API: `/api/chat` (newline-delimited JSON streaming), `/api/tags`,
//! `/api/embeddings`.

use confab_core::error::{ServiceError, ServiceErrorKind};
use confab_core::ports::llm::{Completion, CompletionRequest, LlmProvider, OnDelta, Usage};
use futures_util::StreamExt;
use serde_json::{Value, json};

use super::openai::vector;
use super::{invalid, json, send, transport_error};

/// The provider's name in errors, metrics and stored answers.
const NAME: &str = "ollama";

pub struct OllamaProvider {
    client: reqwest::Client,
    base: String,
    model: String,
    embedding_model: Option<String>,
}

impl OllamaProvider {
    pub fn new(
        client: reqwest::Client,
        base: &str,
        model: String,
        embedding_model: Option<String>,
    ) -> Self {
        Self {
            client,
            base: base.trim_end_matches('/').to_owned(),
            model,
            embedding_model,
        }
    }
}

/// What the lines of a streamed answer told so far.
#[derive(Default)]
struct Answer {
    content: String,
    model: Option<String>,
    usage: Usage,
    done: bool,
}

impl Answer {
    fn take(&mut self, line: &[u8], on_delta: &mut OnDelta<'_>) -> Result<(), ServiceError> {
        let line = line.trim_ascii();
        if line.is_empty() {
            return Ok(());
        }
        let object: Value = serde_json::from_slice(line)
            .map_err(|e| invalid(NAME, format!("a line that is not JSON: {e}")))?;
        if let Some(error) = object.get("error") {
            let message = error
                .as_str()
                .map_or_else(|| error.to_string(), str::to_owned);
            return Err(ServiceError::new(ServiceErrorKind::Api, NAME, message));
        }
        if let Some(m) = object.get("model").and_then(Value::as_str) {
            self.model.get_or_insert_with(|| m.to_owned());
        }
        if let Some(piece) = object.pointer("/message/content").and_then(Value::as_str)
            && !piece.is_empty()
        {
            self.content.push_str(piece);
            on_delta(piece);
        }
        if object.get("done").and_then(Value::as_bool) == Some(true) {
            let count = |k: &str| {
                object
                    .get(k)
                    .and_then(Value::as_u64)
                    .and_then(|n| u32::try_from(n).ok())
            };
            self.usage = Usage {
                prompt_tokens: count("prompt_eval_count"),
                completion_tokens: count("eval_count"),
            };
            self.done = true;
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl LlmProvider for OllamaProvider {
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
        let mut body = json!({"model": request.model, "messages": messages, "stream": true});
        if let Some(max) = request.max_tokens {
            body["options"] = json!({"num_predict": max});
        }
        let response = send(
            NAME,
            self.client
                .post(format!("{}/api/chat", self.base))
                .json(&body),
        )
        .await?;
        let mut bytes = response.bytes_stream();
        let mut pending: Vec<u8> = Vec::new();
        let mut answer = Answer::default();
        let mut ended = false;
        while !answer.done {
            let Some(chunk) = bytes.next().await else {
                ended = true;
                break;
            };
            let chunk = chunk.map_err(|e| transport_error(NAME, &e))?;
            pending.extend_from_slice(&chunk);
            while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                answer.take(&line, on_delta)?;
                if answer.done {
                    break;
                }
            }
        }
        // A last line without its newline (a server that answered in one JSON object).
        if ended && !answer.done {
            answer.take(&pending, on_delta)?;
        }
        let Answer {
            content,
            model,
            usage,
            done,
        } = answer;
        if !done {
            return Err(ServiceError::new(
                ServiceErrorKind::Network,
                NAME,
                "the stream ended before the answer was finished",
            ));
        }
        Ok(Completion {
            content,
            model: model.unwrap_or_else(|| request.model.clone()),
            usage,
        })
    }

    async fn embed(&self, model: &str, input: &[String]) -> Result<Vec<Vec<f32>>, ServiceError> {
        let model = match (model.is_empty(), &self.embedding_model) {
            (false, _) => model.to_owned(),
            (true, Some(m)) => m.clone(),
            (true, None) => {
                return Err(ServiceError::new(
                    ServiceErrorKind::Config,
                    NAME,
                    "no embedding model: set ai.ollama.embedding_model (OLLAMA_EMBEDDING_MODEL)",
                ));
            }
        };
        let mut vectors = Vec::with_capacity(input.len());
        for text in input {
            let body = json(
                NAME,
                self.client
                    .post(format!("{}/api/embeddings", self.base))
                    .json(&json!({"model": model, "prompt": text})),
            )
            .await?;
            vectors.push(
                vector(body.get("embedding"))
                    .ok_or_else(|| invalid(NAME, "an embedding that is not a list of numbers"))?,
            );
        }
        Ok(vectors)
    }

    async fn models(&self) -> Result<Vec<String>, ServiceError> {
        let body = json(NAME, self.client.get(format!("{}/api/tags", self.base))).await?;
        Ok(body
            .get("models")
            .and_then(Value::as_array)
            .map(|models| {
                models
                    .iter()
                    .filter_map(|m| m.get("name").and_then(Value::as_str).map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default())
    }
}
