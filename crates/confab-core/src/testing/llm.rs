//! The `LlmProvider` conformance suite: the contract in `ports::llm`, case by case, against a
//! provider in front of a fake server that speaks its wire format and plays [`Step`]s.

use std::sync::Arc;
use std::time::Duration;

use crate::error::ServiceErrorKind;
use crate::ports::llm::{CompletionRequest, LlmProvider, Role, Turn};

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

/// A fake provider server the suite can script.
pub trait Scripted: Send + Sync {
    /// The provider under test, pointed at the fake.
    fn provider(&self) -> Arc<dyn LlmProvider>;
    /// The same provider pointed at a port nobody listens on.
    fn unreachable(&self) -> Arc<dyn LlmProvider>;
    /// Plays `step` for the next call (steps queue up in order).
    fn push(&self, step: Step);
    /// The JSON bodies of the calls so far.
    fn requests(&self) -> Vec<serde_json::Value>;
}

pub async fn run_all(fake: &dyn Scripted) {
    eprintln!("llm suite: pieces_arrive_in_order_across_awkward_reads");
    pieces_arrive_in_order_across_awkward_reads(fake).await;
    eprintln!("llm suite: a_whole_answer_is_one_piece");
    a_whole_answer_is_one_piece(fake).await;
    eprintln!("llm suite: failures_map_to_the_taxonomy");
    failures_map_to_the_taxonomy(fake).await;
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
    let pieces = ["Hé", "llo", " 👋 wörld", ", ", "ça va?"];
    for cut in [1, 2, 5, 4096] {
        fake.push(Step::Stream {
            pieces: pieces.iter().map(|p| (*p).to_owned()).collect(),
            gap: Duration::ZERO,
            cut,
            usage: (12, 5),
        });
        let mut seen = Vec::new();
        let completion = provider
            .complete(&request("m1"), &mut |p: &str| seen.push(p.to_owned()))
            .await
            .unwrap_or_else(|e| panic!("cut {cut}: {e}"));
        assert_eq!(seen, pieces, "cut {cut}");
        assert_eq!(completion.content, pieces.concat());
        assert_eq!(completion.usage.prompt_tokens, Some(12));
        assert_eq!(completion.usage.completion_tokens, Some(5));
    }
    // The request carried the model and the turns, system first.
    let sent = fake.requests().pop().unwrap();
    assert_eq!(sent["model"], "m1");
    assert_eq!(sent["messages"][0]["role"], "system");
    assert_eq!(sent["messages"][1]["content"], "Say hello");
}

async fn a_whole_answer_is_one_piece(fake: &dyn Scripted) {
    fake.push(Step::Whole("Hello there.".into()));
    let mut seen = Vec::new();
    let completion = fake
        .provider()
        .complete(&request("m1"), &mut |p: &str| seen.push(p.to_owned()))
        .await
        .unwrap();
    assert_eq!(seen, ["Hello there."]);
    assert_eq!(completion.content, "Hello there.");
}

async fn failures_map_to_the_taxonomy(fake: &dyn Scripted) {
    let provider = fake.provider();
    let name = provider.name().to_owned();
    let call = async |step: Step| {
        fake.push(step);
        provider
            .complete(&request("m1"), &mut |_: &str| {})
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
    assert_eq!(e.kind, ServiceErrorKind::Network, "{e}");

    let e = fake
        .unreachable()
        .complete(&request("m1"), &mut |_: &str| {})
        .await
        .unwrap_err();
    assert_eq!(e.kind, ServiceErrorKind::Network, "{e}");

    // No timeout of its own: the caller's bound (here 300 ms) decides.
    fake.push(Step::Hang);
    let hung = tokio::time::timeout(
        Duration::from_millis(300),
        provider.complete(&request("m1"), &mut |_: &str| {}),
    )
    .await;
    assert!(
        hung.is_err(),
        "a hanging server is waited on until the caller gives up"
    );
}
