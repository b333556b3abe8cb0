//! The `LlmProvider` conformance suite: the contract in `ports::llm`, case by case, against a
//! provider in front of a fake server that speaks its wire format and plays [`Step`]s.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::error::ServiceErrorKind;
use crate::ports::llm::{CompletionRequest, GeneratedImage, LlmProvider, Role, Turn};

/// What the fake server does with the next call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Streams `pieces` (one event or line each) `gap` apart, every write cut into `cut`
    /// bytes (so events, lines and UTF-8 characters split across reads), then the end with
    /// usage `(prompt, completion)`.
    Stream {
        pieces: Vec<String>,
        gap: Duration,
        cut: usize,
        usage: (u32, u32),
    },
    /// One whole JSON answer, not streamed (a server that ignores `stream`).
    Whole(String),
    /// An error status with an optional `Retry-After` and a body.
    Status {
        status: u16,
        retry_after: Option<String>,
        body: String,
    },
    /// Accepts the request and never answers.
    Hang,
    /// A stream whose second event is not JSON.
    Malformed,
    /// Streams `pieces`, then closes the connection without the end.
    Cut(Vec<String>),
}

impl Step {
    /// Streams `pieces` quickly, cut into 3-byte writes.
    pub fn pieces(pieces: &[&str]) -> Self {
        Self::Stream {
            pieces: pieces.iter().map(|p| (*p).to_owned()).collect(),
            gap: Duration::ZERO,
            cut: 3,
            usage: (11, u32::try_from(pieces.len()).unwrap_or(u32::MAX)),
        }
    }

    pub fn status(status: u16) -> Self {
        Self::Status {
            status,
            retry_after: None,
            body: r#"{"error":{"message":"the model is overloaded","type":"server_error"}}"#.into(),
        }
    }
}

/// What a request carried, read back from its body the way a wire writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    pub model: String,
    /// System turns first, as the request had them.
    pub turns: Vec<Turn>,
    pub max_tokens: Option<u64>,
}

impl Sent {
    /// A chat-completions body: `model`, `messages: [{role, content}]`, `max_tokens`.
    pub fn chat(body: &Value) -> Self {
        Self {
            model: body["model"].as_str().unwrap_or_default().to_owned(),
            turns: body["messages"]
                .as_array()
                .map(|messages| {
                    messages
                        .iter()
                        .filter_map(|m| {
                            Some(Turn::new(
                                role(m["role"].as_str()?)?,
                                m["content"].as_str()?,
                            ))
                        })
                        .collect()
                })
                .unwrap_or_default(),
            max_tokens: body["max_tokens"].as_u64(),
        }
    }
}

/// The role a wire names `name`.
pub fn role(name: &str) -> Option<Role> {
    [Role::System, Role::User, Role::Assistant]
        .into_iter()
        .find(|r| r.as_str() == name)
}

/// A fake provider server the suite can script.
pub trait Scripted: Send + Sync {
    /// The provider under test, pointed at the fake.
    fn provider(&self) -> Arc<dyn LlmProvider>;
    /// The same provider pointed at a port nobody listens on.
    fn unreachable(&self) -> Arc<dyn LlmProvider>;
    /// Plays `step` for the next call (steps queue up in order).
    fn push(&self, step: Step);
    /// The JSON bodies of the calls so far.
    fn requests(&self) -> Vec<Value>;
    /// Whether answers arrive piece by piece as they are generated. A provider that does not
    /// stream (a Replicate prediction) hands the whole answer over as one piece when it is
    /// done, and a [`Step::Cut`] on its wire is a generation that failed partway (`Api`),
    /// not a connection closed early.
    fn streams(&self) -> bool {
        true
    }
    /// Whether the provider generates images; one that does not answers `Validation`.
    fn images(&self) -> bool {
        false
    }
    /// The model the suite's requests name (a wire may need a shape of its own, such as a
    /// Replicate version id).
    fn model(&self) -> String {
        "m1".into()
    }
    /// What a call's body carried (default: a chat-completions body).
    fn sent(&self, body: &Value) -> Sent {
        Sent::chat(body)
    }
}

pub async fn run_all(fake: &dyn Scripted) {
    eprintln!("llm suite: pieces_arrive_in_order_across_awkward_reads");
    pieces_arrive_in_order_across_awkward_reads(fake).await;
    eprintln!("llm suite: a_whole_answer_is_one_piece");
    a_whole_answer_is_one_piece(fake).await;
    eprintln!("llm suite: failures_map_to_the_taxonomy");
    failures_map_to_the_taxonomy(fake).await;
    eprintln!("llm suite: images_are_generated_or_refused");
    images_are_generated_or_refused(fake).await;
    eprintln!("llm suite: models_are_listed");
    let models = fake.provider().models().await.unwrap();
    assert!(!models.is_empty(), "no models listed");
}

fn request(model: &str) -> CompletionRequest {
    CompletionRequest {
        model: model.into(),
        turns: vec![
            Turn::new(Role::System, "Be brief."),
            Turn::new(Role::User, "Say hello"),
        ],
        max_tokens: Some(32),
    }
}

async fn pieces_arrive_in_order_across_awkward_reads(fake: &dyn Scripted) {
    let provider = fake.provider();
    let model = fake.model();
    let pieces = ["Hé", "llo", " 👋 wörld", ", ", "ça va?"];
    // Without streaming, the whole answer is the one piece.
    let expected: Vec<String> = if fake.streams() {
        pieces.iter().map(|p| (*p).to_owned()).collect()
    } else {
        vec![pieces.concat()]
    };
    for cut in [1, 2, 5, 4096] {
        fake.push(Step::Stream {
            pieces: pieces.iter().map(|p| (*p).to_owned()).collect(),
            gap: Duration::ZERO,
            cut,
            usage: (12, 5),
        });
        let mut seen = Vec::new();
        let completion = provider
            .complete(&request(&model), &mut |p: &str| seen.push(p.to_owned()))
            .await
            .unwrap_or_else(|e| panic!("cut {cut}: {e}"));
        assert_eq!(seen, expected, "cut {cut}");
        assert_eq!(completion.content, pieces.concat());
        assert_eq!(completion.usage.prompt_tokens, Some(12));
        assert_eq!(completion.usage.completion_tokens, Some(5));
    }
    // The request carried the model, the turns (system first) and the token bound.
    let sent = fake.sent(&fake.requests().pop().unwrap());
    assert_eq!(sent.model, model);
    assert_eq!(sent.turns, request(&model).turns);
    assert_eq!(sent.max_tokens, Some(32));
}

async fn a_whole_answer_is_one_piece(fake: &dyn Scripted) {
    fake.push(Step::Whole("Hello there.".into()));
    let mut seen = Vec::new();
    let completion = fake
        .provider()
        .complete(&request(&fake.model()), &mut |p: &str| {
            seen.push(p.to_owned());
        })
        .await
        .unwrap();
    assert_eq!(seen, ["Hello there."]);
    assert_eq!(completion.content, "Hello there.");
}

async fn failures_map_to_the_taxonomy(fake: &dyn Scripted) {
    let provider = fake.provider();
    let name = provider.name().to_owned();
    let request = request(&fake.model());
    let call = async |step: Step| {
        fake.push(step);
        provider
            .complete(&request, &mut |_: &str| {})
            .await
            .unwrap_err()
    };

    let e = call(Step::Status {
        status: 429,
        retry_after: Some("7".into()),
        body: r#"{"error":{"message":"slow down"}}"#.into(),
    })
    .await;
    assert_eq!(
        e.kind,
        ServiceErrorKind::RateLimit {
            retry_after: Some(Duration::from_secs(7))
        }
    );
    assert_eq!(e.service, name);

    // Retry-After as an HTTP date, 30 s from now.
    let at = chrono::Utc::now() + chrono::TimeDelta::seconds(30);
    let e = call(Step::Status {
        status: 429,
        retry_after: Some(at.format("%a, %d %b %Y %H:%M:%S GMT").to_string()),
        body: r#"{"error":{"message":"slow down"}}"#.into(),
    })
    .await;
    let ServiceErrorKind::RateLimit {
        retry_after: Some(wait),
    } = e.kind
    else {
        panic!("a 429 with a date: {:?}", e.kind)
    };
    assert!(
        wait > Duration::from_secs(25) && wait <= Duration::from_secs(30),
        "{wait:?}"
    );

    let e = call(Step::status(500)).await;
    assert_eq!(e.kind, ServiceErrorKind::Api);
    assert!(e.message.contains("500"), "{}", e.message);
    assert!(
        e.message.contains("overloaded"),
        "the provider's own message: {}",
        e.message
    );

    let e = call(Step::status(401)).await;
    assert_eq!(e.kind, ServiceErrorKind::Api);

    let e = call(Step::Malformed).await;
    assert_eq!(e.kind, ServiceErrorKind::Validation, "{e}");

    let e = call(Step::Cut(vec!["The capital".into()])).await;
    if fake.streams() {
        assert_eq!(e.kind, ServiceErrorKind::Network, "{e}");
    } else {
        assert_eq!(e.kind, ServiceErrorKind::Api, "{e}");
    }

    let e = fake
        .unreachable()
        .complete(&request, &mut |_: &str| {})
        .await
        .unwrap_err();
    assert_eq!(e.kind, ServiceErrorKind::Network, "{e}");

    // No timeout of its own: the caller's bound (here 300 ms) decides.
    fake.push(Step::Hang);
    let hung = tokio::time::timeout(
        Duration::from_millis(300),
        provider.complete(&request, &mut |_: &str| {}),
    )
    .await;
    assert!(
        hung.is_err(),
        "a hanging server is waited on until the caller gives up"
    );
}

async fn images_are_generated_or_refused(fake: &dyn Scripted) {
    let provider = fake.provider();
    if !fake.images() {
        let e = provider
            .generate_images("a red square", 2)
            .await
            .unwrap_err();
        assert_eq!(e.kind, ServiceErrorKind::Validation, "{e}");
        assert_eq!(e.service, provider.name());
        return;
    }
    let images = provider
        .generate_images("a red square", 2)
        .await
        .unwrap_or_else(|e| panic!("images: {e}"));
    assert_eq!(images.len(), 2, "n images");
    for image in images {
        match image {
            GeneratedImage::Bytes(bytes) => assert!(!bytes.is_empty(), "an empty image"),
            GeneratedImage::Url(url) => {
                assert!(url.starts_with("http"), "not a URL: {url}");
            }
        }
    }
    // Failures map to the taxonomy as for completions.
    fake.push(Step::Status {
        status: 429,
        retry_after: Some("3".into()),
        body: r#"{"error":{"message":"slow down"}}"#.into(),
    });
    let e = provider
        .generate_images("a red square", 1)
        .await
        .unwrap_err();
    assert_eq!(
        e.kind,
        ServiceErrorKind::RateLimit {
            retry_after: Some(Duration::from_secs(3))
        }
    );
    fake.push(Step::status(500));
    let e = provider
        .generate_images("a red square", 1)
        .await
        .unwrap_err();
    assert_eq!(e.kind, ServiceErrorKind::Api);
    assert!(e.message.contains("overloaded"), "{}", e.message);
    fake.push(Step::Malformed);
    let e = provider
        .generate_images("a red square", 1)
        .await
        .unwrap_err();
    assert_eq!(e.kind, ServiceErrorKind::Validation, "{e}");
}
