//! Replicate predictions (SPEC §8): create one (`POST /predictions`), then poll it
//! (`GET /predictions/{id}`) every 2 s until it ends or a deadline passes. There is no token
//! streaming: a language model's whole answer is one piece, handed over when the prediction
//! succeeds. An image model's output is a list of URLs. A prediction the caller stops waiting
//! for (its deadline, or a dropped future) is cancelled, so it is not run and billed to the
//! end for nobody.

use std::time::{Duration, Instant};

use base64::Engine;
use confab_core::error::{ServiceError, ServiceErrorKind};
use confab_core::ports::llm::{
    Completion, CompletionRequest, GeneratedImage, LlmProvider, OnDelta, Role, Usage,
};
use confab_core::settings::Secret;
use serde_json::{Value, json};

use super::{invalid, send, transport_error};

/// The provider's name in errors, metrics and stored answers.
const NAME: &str = "replicate";
/// How often a running prediction is asked about (SPEC §8: every 2 s).
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(2);
/// How long a prediction may run before the call fails with `Timeout`.
pub const DEFAULT_DEADLINE: Duration = Duration::from_mins(2);

pub struct ReplicateProvider {
    client: reqwest::Client,
    base: String,
    key: Secret,
    version: String,
    image_version: Option<String>,
    poll_interval: Duration,
    deadline: Duration,
}

impl ReplicateProvider {
    /// `base` is the API root (`https://api.replicate.com/v1`); `version` the model version
    /// completions run (a version id, or `owner/name:id`).
    pub fn new(client: reqwest::Client, base: &str, key: Secret, version: String) -> Self {
        Self {
            client,
            base: base.trim_end_matches('/').to_owned(),
            key,
            version,
            image_version: None,
            poll_interval: DEFAULT_POLL_INTERVAL,
            deadline: DEFAULT_DEADLINE,
        }
    }

    /// Polls every `interval`, and gives up (`Timeout`) when a prediction has not ended
    /// `deadline` after it was asked for.
    #[must_use]
    pub fn with_poll(mut self, interval: Duration, deadline: Duration) -> Self {
        self.poll_interval = interval;
        self.deadline = deadline;
        self
    }

    /// The model version `generate_images` runs (default: the completion version).
    #[must_use]
    pub fn with_image_version(mut self, version: Option<String>) -> Self {
        self.image_version = version;
        self
    }

    async fn json(&self, request: reqwest::RequestBuilder) -> Result<Value, ServiceError> {
        let response = send(NAME, request.bearer_auth(self.key.expose())).await?;
        let text = response
            .text()
            .await
            .map_err(|e| transport_error(NAME, &e))?;
        match serde_json::from_str::<Value>(&text) {
            Ok(value) if value.is_object() => Ok(value),
            Ok(_) => Err(invalid(NAME, "an answer that is not a JSON object")),
            Err(e) => Err(invalid(NAME, format!("an answer that is not JSON: {e}"))),
        }
    }

    /// One of the prediction's own URLs (`urls.get`, `urls.cancel`) when it points at the
    /// configured API (the key goes with it), else the documented path.
    fn url_of(&self, prediction: &Value, which: &str, path: &str) -> String {
        prediction
            .pointer(&format!("/urls/{which}"))
            .and_then(Value::as_str)
            .filter(|u| u.starts_with(&format!("{}/", self.base)))
            .map_or_else(|| format!("{}{path}", self.base), str::to_owned)
    }

    /// Runs a prediction of `version` on `input` to its end: the succeeded prediction.
    async fn predict(&self, version: &str, input: Value) -> Result<Value, ServiceError> {
        let started = Instant::now();
        let mut prediction = self
            .json(
                self.client
                    .post(format!("{}/predictions", self.base))
                    .json(&json!({"version": version, "input": input})),
            )
            .await?;
        if ended(&prediction)? {
            return Ok(prediction);
        }
        let id = prediction
            .get("id")
            .and_then(Value::as_str)
            .filter(|id| !id.is_empty())
            .ok_or_else(|| invalid(NAME, "a prediction without an id"))?
            .to_owned();
        let poll_url = self.url_of(&prediction, "get", &format!("/predictions/{id}"));
        let mut running = Running {
            client: self.client.clone(),
            key: self.key.clone(),
            cancel_url: Some(self.url_of(
                &prediction,
                "cancel",
                &format!("/predictions/{id}/cancel"),
            )),
        };
        loop {
            let Some(left) = self
                .deadline
                .checked_sub(started.elapsed())
                .filter(|left| !left.is_zero())
            else {
                // `running` cancels it as it drops.
                return Err(ServiceError::new(
                    ServiceErrorKind::Timeout,
                    NAME,
                    format!(
                        "prediction {id} did not end within {} s",
                        self.deadline.as_secs_f32()
                    ),
                ));
            };
            tokio::time::sleep(self.poll_interval.min(left)).await;
            prediction = self.json(self.client.get(&poll_url)).await?;
            match ended(&prediction) {
                Ok(false) => {}
                Ok(true) => {
                    running.cancel_url = None;
                    return Ok(prediction);
                }
                Err(e) => {
                    if e.kind == ServiceErrorKind::Api {
                        // It ended (failed or cancelled): nothing left to cancel.
                        running.cancel_url = None;
                    }
                    return Err(e);
                }
            }
        }
    }
}

/// Cancels the prediction it names when dropped still armed: the call gave up (its deadline,
/// or the caller dropped the future) while the prediction was running.
struct Running {
    client: reqwest::Client,
    key: Secret,
    cancel_url: Option<String>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let Some(url) = self.cancel_url.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let request = self.client.post(url).bearer_auth(self.key.expose());
        runtime.spawn(async move {
            // Best effort: a prediction that cannot be cancelled ends on its own.
            let _ = tokio::time::timeout(Duration::from_secs(10), request.send()).await;
        });
    }
}

/// Whether a prediction succeeded (`true`) or is still running (`false`); one that failed or
/// was cancelled is an `Api` error with Replicate's own message.
fn ended(prediction: &Value) -> Result<bool, ServiceError> {
    match prediction.get("status").and_then(Value::as_str) {
        None => Err(invalid(
            NAME,
            "an answer that is not a prediction (no status)",
        )),
        Some("succeeded") => Ok(true),
        Some(status @ ("failed" | "canceled" | "aborted")) => {
            let message = match prediction.get("error") {
                None | Some(Value::Null) => format!("the prediction {status}"),
                Some(Value::String(error)) => format!("the prediction {status}: {error}"),
                Some(error) => format!("the prediction {status}: {error}"),
            };
            Err(ServiceError::new(
                ServiceErrorKind::Api,
                NAME,
                message.chars().take(300).collect::<String>(),
            ))
        }
        // starting, processing, and states added later: the deadline bounds them.
        Some(_) => Ok(false),
    }
}

/// Whether a requested model names a version Replicate can run: a 64-hex-digit version id,
/// or `owner/name:id`. Anything else (a chain's label) runs the configured version.
fn is_version(model: &str) -> bool {
    let id = model.rsplit_once(':').map_or(model, |(_, id)| id);
    id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The conversation as a plain transcript for a prompt-in, text-out model: `role: content`
/// turns, then `assistant:` for the model to continue. System turns go to `system_prompt`.
fn transcript(request: &CompletionRequest) -> String {
    let mut prompt = String::new();
    for turn in request.turns.iter().filter(|t| t.role != Role::System) {
        prompt.push_str(turn.role.as_str());
        prompt.push_str(": ");
        prompt.push_str(&turn.content);
        prompt.push_str("\n\n");
    }
    prompt.push_str("assistant:");
    prompt
}

fn input(request: &CompletionRequest) -> Value {
    let system: Vec<&str> = request
        .turns
        .iter()
        .filter(|t| t.role == Role::System && !t.content.is_empty())
        .map(|t| t.content.as_str())
        .collect();
    let mut input = json!({"prompt": transcript(request)});
    if !system.is_empty() {
        input["system_prompt"] = json!(system.join("\n\n"));
    }
    if let Some(max) = request.max_tokens {
        input["max_new_tokens"] = json!(max);
    }
    input
}

/// A language model's output: a string, or the list of strings it was generated as.
fn text_output(prediction: &Value) -> Result<String, ServiceError> {
    match prediction.get("output") {
        Some(Value::String(text)) => Ok(text.clone()),
        Some(Value::Array(pieces)) => pieces
            .iter()
            .map(|p| {
                p.as_str()
                    .ok_or_else(|| invalid(NAME, "an output piece that is not a string"))
            })
            .collect(),
        _ => Err(invalid(
            NAME,
            "a prediction that succeeded without text output",
        )),
    }
}

/// An image model's output: a list of URLs (or one), `data:` URLs decoded.
fn image_output(prediction: &Value, n: u32) -> Result<Vec<GeneratedImage>, ServiceError> {
    let urls: Vec<&Value> = match prediction.get("output") {
        Some(Value::Array(items)) => items.iter().collect(),
        Some(one @ Value::String(_)) => vec![one],
        _ => return Err(invalid(NAME, "a prediction that succeeded without images")),
    };
    let images = urls
        .into_iter()
        .take(usize::try_from(n).unwrap_or(usize::MAX))
        .map(|url| {
            let url = url
                .as_str()
                .ok_or_else(|| invalid(NAME, "an image output that is not a URL"))?;
            if url.starts_with("https://") || url.starts_with("http://") {
                Ok(GeneratedImage::Url(url.to_owned()))
            } else if let Some((_, encoded)) = url
                .strip_prefix("data:")
                .and_then(|rest| rest.split_once(";base64,"))
            {
                base64::engine::general_purpose::STANDARD
                    .decode(encoded)
                    .map(GeneratedImage::Bytes)
                    .map_err(|e| invalid(NAME, format!("a data URL that is not base64: {e}")))
            } else {
                Err(invalid(NAME, "an image output that is not a URL"))
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    if images.is_empty() {
        return Err(invalid(NAME, "a prediction that succeeded without images"));
    }
    Ok(images)
}

fn usage(prediction: &Value) -> Usage {
    let count = |k: &str| {
        prediction
            .pointer(&format!("/metrics/{k}"))
            .and_then(Value::as_u64)
            .and_then(|n| u32::try_from(n).ok())
    };
    Usage {
        prompt_tokens: count("input_token_count"),
        completion_tokens: count("output_token_count"),
    }
}

#[async_trait::async_trait]
impl LlmProvider for ReplicateProvider {
    fn name(&self) -> &str {
        NAME
    }

    fn default_model(&self) -> &str {
        &self.version
    }

    async fn complete(
        &self,
        request: &CompletionRequest,
        on_delta: &mut OnDelta<'_>,
    ) -> Result<Completion, ServiceError> {
        let version = if is_version(&request.model) {
            &request.model
        } else {
            &self.version
        };
        let prediction = self.predict(version, input(request)).await?;
        let content = text_output(&prediction)?;
        if !content.is_empty() {
            on_delta(&content);
        }
        let model = ["model", "version"]
            .iter()
            .find_map(|k| prediction.get(k).and_then(Value::as_str))
            .filter(|m| !m.is_empty())
            .unwrap_or(version)
            .to_owned();
        Ok(Completion {
            content,
            model,
            usage: usage(&prediction),
        })
    }

    async fn generate_images(
        &self,
        prompt: &str,
        n: u32,
    ) -> Result<Vec<GeneratedImage>, ServiceError> {
        let version = self.image_version.as_deref().unwrap_or(&self.version);
        let prediction = self
            .predict(version, json!({"prompt": prompt, "num_outputs": n}))
            .await?;
        image_output(&prediction, n)
    }

    /// The configured versions: listing Replicate's public models says nothing about what
    /// this deployment runs.
    async fn models(&self) -> Result<Vec<String>, ServiceError> {
        let mut models = vec![self.version.clone()];
        if let Some(image) = self.image_version.as_ref().filter(|v| **v != self.version) {
            models.push(image.clone());
        }
        Ok(models)
    }
}

#[cfg(test)]
mod tests {
    use confab_core::ports::llm::Turn;

    use super::*;

    const VERSION: &str = "5c7d5dc6dd8bf75c1acaa8565735e7986bc5b66206b55cca93cb72c9bf15ccaa";

    #[test]
    fn a_request_becomes_a_transcript_and_a_system_prompt() {
        let request = CompletionRequest {
            model: "replicate".into(),
            turns: vec![
                Turn::new(Role::System, "Be brief."),
                Turn::new(Role::User, "Hi"),
                Turn::new(Role::Assistant, "Hello!"),
                Turn::new(Role::User, "How are you?"),
            ],
            max_tokens: Some(40),
        };
        assert_eq!(
            input(&request),
            json!({
                "prompt": "user: Hi\n\nassistant: Hello!\n\nuser: How are you?\n\nassistant:",
                "system_prompt": "Be brief.",
                "max_new_tokens": 40,
            })
        );
    }

    #[test]
    fn versions_are_ids_or_owner_name_id() {
        assert!(is_version(VERSION));
        assert!(is_version(&format!("meta/llama-3:{VERSION}")));
        assert!(!is_version("meta/llama-3"));
        assert!(!is_version("replicate"));
        assert!(!is_version(&VERSION[1..]));
    }

    #[test]
    fn predictions_end_in_success_or_an_api_error() {
        assert!(!ended(&json!({"status": "starting"})).expect("running"));
        assert!(!ended(&json!({"status": "processing"})).expect("running"));
        assert!(ended(&json!({"status": "succeeded"})).expect("ended"));
        let e =
            ended(&json!({"status": "failed", "error": "CUDA out of memory"})).expect_err("failed");
        assert_eq!(e.kind, ServiceErrorKind::Api);
        assert_eq!(e.message, "the prediction failed: CUDA out of memory");
        let e = ended(&json!({"status": "canceled", "error": null})).expect_err("canceled");
        assert_eq!(e.kind, ServiceErrorKind::Api);
        let e = ended(&json!({"detail": "not a prediction"})).expect_err("no status");
        assert_eq!(e.kind, ServiceErrorKind::Validation);
    }

    #[test]
    fn outputs_are_text_or_images() {
        assert_eq!(
            text_output(&json!({"output": ["Hel", "lo", "!"]})).expect("pieces"),
            "Hello!"
        );
        assert_eq!(
            text_output(&json!({"output": "Hello!"})).expect("text"),
            "Hello!"
        );
        for bad in [json!({"output": null}), json!({"output": ["a", 1]})] {
            assert_eq!(
                text_output(&bad).expect_err("not text").kind,
                ServiceErrorKind::Validation
            );
        }
        assert_eq!(
            image_output(
                &json!({"output": ["https://x/1.png", "data:image/png;base64,iVBORw0K", "https://x/3.png"]}),
                2
            )
            .expect("images"),
            [
                GeneratedImage::Url("https://x/1.png".into()),
                GeneratedImage::Bytes(b"\x89PNG\r\n".to_vec()),
            ]
        );
        assert_eq!(
            image_output(&json!({"output": "https://x/1.png"}), 1).expect("one image"),
            [GeneratedImage::Url("https://x/1.png".into())]
        );
        for bad in [
            json!({"output": []}),
            json!({"output": ["a cat"]}),
            json!({"output": null}),
        ] {
            assert_eq!(
                image_output(&bad, 1).expect_err("not images").kind,
                ServiceErrorKind::Validation
            );
        }
    }
}
