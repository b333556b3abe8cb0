//! The resilience around the `LlmProvider` port (SPEC §8): a chain of links (a provider and a
//! model), each call bounded by a timeout, transient failures retried with exponential
//! backoff and full jitter (a provider's `Retry-After` honoured), a circuit breaker per link,
//! and the next link when one fails or its circuit is open.
//!
//! Once a piece of an answer has reached the caller, a failure is final: retrying or moving
//! on would send the user a second, different beginning. The answer so far is kept by the
//! caller and marked failed.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::error::{ServiceError, ServiceErrorKind};
use crate::ports::llm::{Completion, CompletionRequest, LlmProvider, Turn};

/// How each link is called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// The longest wait for the first piece of an answer, and between two pieces.
    pub timeout: Duration,
    /// Calls per link and request, the first included.
    pub attempts: u32,
    /// The wait before the first retry; it doubles each time (full jitter).
    pub backoff: Duration,
    /// A longer `Retry-After` moves on to the next link instead of waiting.
    pub max_retry_after: Duration,
    /// Consecutive failed calls that open a link's circuit.
    pub breaker_failures: u32,
    /// How long an open circuit refuses calls before letting one probe through.
    pub breaker_open: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(30),
            attempts: 3,
            backoff: Duration::from_millis(500),
            max_retry_after: Duration::from_secs(10),
            breaker_failures: 5,
            breaker_open: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    Closed,
    Open,
    HalfOpen,
}

impl CircuitState {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }

    /// The `circuit_state` gauge's value.
    pub const fn gauge(self) -> f64 {
        match self {
            Self::Closed => 0.0,
            Self::Open => 1.0,
            Self::HalfOpen => 2.0,
        }
    }
}

#[derive(Debug)]
enum BreakerState {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// One probe is out; everyone else is refused until it comes back.
    Probing,
}

/// A circuit breaker: `failures` consecutive failures open it for `open_for`; then one call
/// probes, and its outcome closes or reopens it.
#[derive(Debug)]
struct Breaker {
    state: Mutex<BreakerState>,
    failures: u32,
    open_for: Duration,
}

impl Breaker {
    fn new(failures: u32, open_for: Duration) -> Self {
        Self {
            state: Mutex::new(BreakerState::Closed { failures: 0 }),
            failures: failures.max(1),
            open_for,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BreakerState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether a call may go out now.
    fn admit(&self) -> bool {
        let mut state = self.lock();
        match *state {
            BreakerState::Closed { .. } => true,
            BreakerState::Open { until } if Instant::now() >= until => {
                *state = BreakerState::Probing;
                true
            }
            BreakerState::Open { .. } | BreakerState::Probing => false,
        }
    }

    fn succeeded(&self) {
        *self.lock() = BreakerState::Closed { failures: 0 };
    }

    fn failed(&self) {
        let mut state = self.lock();
        let failures = match *state {
            BreakerState::Closed { failures } => failures + 1,
            BreakerState::Probing | BreakerState::Open { .. } => self.failures,
        };
        *state = if failures >= self.failures {
            BreakerState::Open {
                until: Instant::now() + self.open_for,
            }
        } else {
            BreakerState::Closed { failures }
        };
    }

    fn state(&self) -> CircuitState {
        match *self.lock() {
            BreakerState::Closed { .. } => CircuitState::Closed,
            BreakerState::Open { until } if Instant::now() < until => CircuitState::Open,
            BreakerState::Open { .. } | BreakerState::Probing => CircuitState::HalfOpen,
        }
    }
}

/// One link of the chain.
pub struct Link {
    provider: Arc<dyn LlmProvider>,
    model: String,
    breaker: Breaker,
}

impl Link {
    pub fn provider(&self) -> &str {
        self.provider.name()
    }

    pub fn model(&self) -> &str {
        &self.model
    }

    pub fn circuit(&self) -> CircuitState {
        self.breaker.state()
    }

    /// The provider behind the link (embeddings, `confab doctor`).
    pub fn backend(&self) -> &Arc<dyn LlmProvider> {
        &self.provider
    }
}

/// An answer, and who gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub completion: Completion,
    pub provider: String,
    pub model: String,
}

/// Every link failed (or the answer broke off after it had begun).
#[derive(Debug)]
pub struct Failure {
    /// The last error (what the user's failure is reported as).
    pub error: ServiceError,
    /// Whether pieces of an answer had already reached the caller.
    pub partial: bool,
    /// The provider and model of the last link tried, when one was.
    pub provider: Option<(String, String)>,
}

/// The configured links, in order: primary first.
pub struct Chain {
    links: Vec<Link>,
    policy: Policy,
}

impl Chain {
    /// `links` are providers with the model each is asked for.
    pub fn new(links: Vec<(Arc<dyn LlmProvider>, String)>, policy: Policy) -> Self {
        let links = links
            .into_iter()
            .map(|(provider, model)| Link {
                provider,
                model,
                breaker: Breaker::new(policy.breaker_failures, policy.breaker_open),
            })
            .collect();
        Self { links, policy }
    }

    pub fn links(&self) -> &[Link] {
        &self.links
    }

    /// `provider/model` of each link, in order: what the answer cache keys on.
    pub fn describe(&self) -> Vec<String> {
        self.links
            .iter()
            .map(|l| format!("{}/{}", l.provider(), l.model))
            .collect()
    }

    /// The links a request that asks for `model` goes through: the first link serving that
    /// model (or that provider) first, then the others in order. `None` when no link does.
    pub fn order(&self, model: Option<&str>) -> Option<Vec<&Link>> {
        let Some(wanted) = model else {
            return Some(self.links.iter().collect());
        };
        let first = self.links.iter().position(|l| {
            l.model == wanted
                || l.provider() == wanted
                || format!("{}/{}", l.provider(), l.model) == wanted
        })?;
        let mut order = vec![&self.links[first]];
        order.extend(
            self.links
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != first)
                .map(|(_, l)| l),
        );
        Some(order)
    }

    /// Answers `turns` through `links` (from [`Chain::order`]), streaming pieces to
    /// `on_delta`.
    pub async fn complete(
        &self,
        links: &[&Link],
        turns: &[Turn],
        max_tokens: Option<u32>,
        on_delta: &mut (dyn FnMut(&str) + Send),
    ) -> Result<Answer, Failure> {
        let mut last: Option<(ServiceError, &Link)> = None;
        for link in links {
            if !link.breaker.admit() {
                last = Some((
                    ServiceError::new(
                        ServiceErrorKind::Unknown,
                        link.provider().to_owned(),
                        "the circuit is open after repeated failures",
                    ),
                    link,
                ));
                continue;
            }
            let request = CompletionRequest {
                model: link.model.clone(),
                turns: turns.to_vec(),
                max_tokens,
            };
            let mut attempt = 1;
            loop {
                let (result, started) = self.call(link, &request, on_delta).await;
                match result {
                    Ok(completion) => {
                        link.breaker.succeeded();
                        return Ok(Answer {
                            completion,
                            provider: link.provider().to_owned(),
                            model: link.model.clone(),
                        });
                    }
                    Err(error) => {
                        // Our own bad request says nothing about the provider's health.
                        if error.kind != ServiceErrorKind::Validation {
                            link.breaker.failed();
                        }
                        if started {
                            return Err(Failure {
                                error,
                                partial: true,
                                provider: Some((link.provider().to_owned(), link.model.clone())),
                            });
                        }
                        let wait = self.retry_wait(&error, attempt);
                        tracing::warn!(
                            provider = link.provider(),
                            model = %link.model,
                            attempt,
                            code = error.code().as_str(),
                            error = %error,
                            "AI provider call failed."
                        );
                        last = Some((error, link));
                        let Some(wait) = wait else { break };
                        attempt += 1;
                        tokio::time::sleep(wait).await;
                        if !link.breaker.admit() {
                            break;
                        }
                    }
                }
            }
        }
        let (error, link) = last.map_or_else(
            || {
                (
                    ServiceError::new(
                        ServiceErrorKind::Config,
                        "ai",
                        "no AI provider is configured",
                    ),
                    None,
                )
            },
            |(e, l)| (e, Some(l)),
        );
        Err(Failure {
            error,
            partial: false,
            provider: link.map(|l| (l.provider().to_owned(), l.model.clone())),
        })
    }

    /// How long to wait before retrying after `attempt` failed with `error`; `None` when the
    /// link is done (not transient, attempts used up, or a `Retry-After` too long to wait).
    fn retry_wait(&self, error: &ServiceError, attempt: u32) -> Option<Duration> {
        if !error.kind.is_transient() || attempt >= self.policy.attempts {
            return None;
        }
        if let ServiceErrorKind::RateLimit {
            retry_after: Some(after),
        } = error.kind
        {
            return (after <= self.policy.max_retry_after).then_some(after);
        }
        let ceiling = self
            .policy
            .backoff
            .saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1).min(16)));
        Some(jitter(ceiling))
    }

    /// One call, bounded by the policy's timeout to the first piece and between pieces.
    /// Also says whether any piece reached `on_delta`.
    async fn call(
        &self,
        link: &Link,
        request: &CompletionRequest,
        on_delta: &mut (dyn FnMut(&str) + Send),
    ) -> (Result<Completion, ServiceError>, bool) {
        let timeout = self.policy.timeout;
        let base = Instant::now();
        let progress_ms = AtomicU64::new(0);
        let started = AtomicBool::new(false);
        let result = {
            let mut relay = |piece: &str| {
                let ms = u64::try_from(base.elapsed().as_millis()).unwrap_or(u64::MAX);
                progress_ms.store(ms, Ordering::Relaxed);
                started.store(true, Ordering::Relaxed);
                on_delta(piece);
            };
            let call = link.provider.complete(request, &mut relay);
            tokio::pin!(call);
            let mut deadline = base + timeout;
            loop {
                tokio::select! {
                    result = &mut call => break result,
                    () = tokio::time::sleep_until(deadline) => {
                        let last = base + Duration::from_millis(progress_ms.load(Ordering::Relaxed));
                        if last + timeout <= Instant::now() {
                            break Err(ServiceError::new(
                                ServiceErrorKind::Timeout,
                                link.provider().to_owned(),
                                format!("no answer within {} ms", timeout.as_millis()),
                            ));
                        }
                        deadline = last + timeout;
                    }
                }
            }
        };
        (result, started.load(Ordering::Relaxed))
    }
}

/// A random duration in `[0, ceiling]` ("full jitter").
fn jitter(ceiling: Duration) -> Duration {
    let mut bytes = [0u8; 8];
    if aws_lc_rs::rand::fill(&mut bytes).is_err() {
        return ceiling;
    }
    let unit = u64::from_le_bytes(bytes) >> 11; // 53 bits
    #[allow(clippy::cast_precision_loss)]
    let fraction = unit as f64 / (1u64 << 53) as f64;
    ceiling.mul_f64(fraction)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::VecDeque;

    use async_trait::async_trait;

    use super::*;
    use crate::ports::llm::{OnDelta, Role, Usage};

    /// What the fake does on one call.
    enum Step {
        Answer(&'static [&'static str]),
        Fail(ServiceErrorKind),
        /// Sends these pieces, then fails.
        BreakAfter(&'static [&'static str]),
        Hang,
    }

    struct Fake {
        name: &'static str,
        steps: Mutex<VecDeque<Step>>,
        calls: AtomicU64,
    }

    impl Fake {
        fn new(name: &'static str, steps: Vec<Step>) -> Arc<Self> {
            Arc::new(Self {
                name,
                steps: Mutex::new(steps.into()),
                calls: AtomicU64::new(0),
            })
        }

        fn calls(&self) -> u64 {
            self.calls.load(Ordering::Relaxed)
        }
    }

    #[async_trait]
    impl LlmProvider for Fake {
        fn name(&self) -> &str {
            self.name
        }
        fn default_model(&self) -> &'static str {
            "m"
        }
        async fn complete(
            &self,
            request: &CompletionRequest,
            on_delta: &mut OnDelta<'_>,
        ) -> Result<Completion, ServiceError> {
            self.calls.fetch_add(1, Ordering::Relaxed);
            let step = self
                .steps
                .lock()
                .unwrap()
                .pop_front()
                .unwrap_or(Step::Answer(&["ok"]));
            let fail = |kind| ServiceError::new(kind, self.name, "scripted");
            match step {
                Step::Answer(pieces) => {
                    for p in pieces {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        on_delta(p);
                    }
                    Ok(Completion {
                        content: pieces.concat(),
                        model: request.model.clone(),
                        usage: Usage::default(),
                    })
                }
                Step::Fail(kind) => Err(fail(kind)),
                Step::BreakAfter(pieces) => {
                    for p in pieces {
                        on_delta(p);
                    }
                    Err(fail(ServiceErrorKind::Network))
                }
                Step::Hang => {
                    std::future::pending::<()>().await;
                    unreachable!()
                }
            }
        }
        async fn models(&self) -> Result<Vec<String>, ServiceError> {
            Ok(vec!["m".into()])
        }
    }

    /// The defaults, in milliseconds instead of seconds.
    fn fast() -> Policy {
        Policy {
            timeout: Duration::from_secs(5),
            backoff: Duration::from_millis(5),
            max_retry_after: Duration::from_secs(1),
            breaker_open: Duration::from_millis(200),
            ..Policy::default()
        }
    }

    fn chain(links: &[&Arc<Fake>], policy: Policy) -> Chain {
        Chain::new(
            links
                .iter()
                .map(|f| {
                    (
                        Arc::clone(*f) as Arc<dyn LlmProvider>,
                        format!("{}-model", f.name),
                    )
                })
                .collect(),
            policy,
        )
    }

    async fn ask(chain: &Chain) -> (Result<Answer, Failure>, String) {
        let mut seen = String::new();
        let links = chain.order(None).unwrap();
        let result = chain
            .complete(
                &links,
                &[Turn::new(Role::User, "hi")],
                None,
                &mut |p: &str| {
                    seen.push_str(p);
                },
            )
            .await;
        (result, seen)
    }

    #[tokio::test]
    async fn transient_failures_are_retried_then_answered() {
        let a = Fake::new(
            "a",
            vec![
                Step::Fail(ServiceErrorKind::Network),
                Step::Fail(ServiceErrorKind::Timeout),
                Step::Answer(&["Hel", "lo"]),
            ],
        );
        let chain = chain(&[&a], fast());
        let (answer, seen) = ask(&chain).await;
        let answer = answer.unwrap();
        assert_eq!(answer.completion.content, "Hello");
        assert_eq!(seen, "Hello");
        assert_eq!(
            (answer.provider.as_str(), answer.model.as_str()),
            ("a", "a-model")
        );
        assert_eq!(a.calls(), 3);
    }

    #[tokio::test]
    async fn retry_after_is_honoured_and_a_long_one_moves_on() {
        let a = Fake::new(
            "a",
            vec![
                Step::Fail(ServiceErrorKind::RateLimit {
                    retry_after: Some(Duration::from_millis(300)),
                }),
                Step::Answer(&["x"]),
            ],
        );
        let chain1 = chain(&[&a], fast());
        let started = Instant::now();
        assert!(ask(&chain1).await.0.is_ok());
        assert!(
            started.elapsed() >= Duration::from_millis(300),
            "waited {:?}",
            started.elapsed()
        );

        let b = Fake::new(
            "b",
            vec![Step::Fail(ServiceErrorKind::RateLimit {
                retry_after: Some(Duration::from_mins(1)),
            })],
        );
        let c = Fake::new("c", vec![Step::Answer(&["from c"])]);
        let chain2 = chain(&[&b, &c], fast());
        let started = Instant::now();
        let answer = ask(&chain2).await.0.unwrap();
        assert_eq!(answer.provider, "c");
        assert_eq!(b.calls(), 1);
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[tokio::test]
    async fn an_api_error_is_not_retried_and_falls_back() {
        let a = Fake::new("a", vec![Step::Fail(ServiceErrorKind::Api)]);
        let b = Fake::new("b", vec![Step::Answer(&["fallback"])]);
        let chain = chain(&[&a, &b], fast());
        let answer = ask(&chain).await.0.unwrap();
        assert_eq!(answer.provider, "b");
        assert_eq!((a.calls(), b.calls()), (1, 1));
    }

    #[tokio::test]
    async fn a_hang_times_out_but_a_slow_stream_does_not() {
        let policy = Policy {
            timeout: Duration::from_millis(60),
            attempts: 1,
            ..fast()
        };
        let a = Fake::new("a", vec![Step::Hang]);
        let chain1 = chain(&[&a], policy);
        let failure = ask(&chain1).await.0.unwrap_err();
        assert_eq!(failure.error.kind, ServiceErrorKind::Timeout);
        assert!(!failure.partial);

        // Ten pieces 10 ms apart: 100 ms in all, but never 60 ms without progress.
        let b = Fake::new(
            "b",
            vec![Step::Answer(&[
                "1", "2", "3", "4", "5", "6", "7", "8", "9", "0",
            ])],
        );
        let chain2 = chain(&[&b], policy);
        assert_eq!(
            ask(&chain2).await.0.unwrap().completion.content,
            "1234567890"
        );
    }

    #[tokio::test]
    async fn a_break_after_the_first_piece_is_final() {
        let a = Fake::new("a", vec![Step::BreakAfter(&["The capi"])]);
        let b = Fake::new("b", vec![]);
        let chain = chain(&[&a, &b], fast());
        let (result, seen) = ask(&chain).await;
        let failure = result.unwrap_err();
        assert!(failure.partial);
        assert_eq!(seen, "The capi");
        assert_eq!((a.calls(), b.calls()), (1, 0));
    }

    #[tokio::test]
    async fn the_breaker_opens_then_half_opens_and_closes() {
        let policy = Policy {
            attempts: 1,
            breaker_failures: 2,
            ..fast()
        };
        let a = Fake::new(
            "a",
            vec![
                Step::Fail(ServiceErrorKind::Api),
                Step::Fail(ServiceErrorKind::Api),
                Step::Answer(&["back"]),
            ],
        );
        let b = Fake::new("b", vec![]);
        let chain = chain(&[&a, &b], policy);
        assert_eq!(ask(&chain).await.0.unwrap().provider, "b");
        assert_eq!(chain.links()[0].circuit(), CircuitState::Closed);
        assert_eq!(ask(&chain).await.0.unwrap().provider, "b");
        assert_eq!(chain.links()[0].circuit(), CircuitState::Open);
        // Open: a is not called at all.
        assert_eq!(ask(&chain).await.0.unwrap().provider, "b");
        assert_eq!(a.calls(), 2);

        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(chain.links()[0].circuit(), CircuitState::HalfOpen);
        // The probe succeeds: closed again, a answers.
        assert_eq!(ask(&chain).await.0.unwrap().provider, "a");
        assert_eq!(chain.links()[0].circuit(), CircuitState::Closed);
        assert_eq!(a.calls(), 3);
    }

    #[tokio::test]
    async fn a_failed_probe_reopens_the_circuit() {
        let policy = Policy {
            attempts: 1,
            breaker_failures: 1,
            ..fast()
        };
        let a = Fake::new(
            "a",
            vec![
                Step::Fail(ServiceErrorKind::Api),
                Step::Fail(ServiceErrorKind::Api),
            ],
        );
        let chain = chain(&[&a], policy);
        assert!(ask(&chain).await.0.is_err());
        tokio::time::sleep(Duration::from_millis(250)).await;
        let failure = ask(&chain).await.0.unwrap_err();
        assert_eq!(failure.error.kind, ServiceErrorKind::Api);
        assert_eq!(chain.links()[0].circuit(), CircuitState::Open);
        // Refused without a call while open.
        let failure = ask(&chain).await.0.unwrap_err();
        assert_eq!(a.calls(), 2);
        assert!(failure.error.message.contains("circuit is open"));
    }

    #[tokio::test]
    async fn every_link_failing_reports_the_last_error() {
        let a = Fake::new("a", vec![Step::Fail(ServiceErrorKind::Api)]);
        let b = Fake::new("b", vec![Step::Fail(ServiceErrorKind::Config)]);
        let chain = chain(&[&a, &b], fast());
        let failure = ask(&chain).await.0.unwrap_err();
        assert_eq!(failure.error.kind, ServiceErrorKind::Config);
        assert_eq!(failure.provider, Some(("b".into(), "b-model".into())));
    }

    #[test]
    fn a_named_model_goes_first() {
        let a = Fake::new("a", vec![]);
        let b = Fake::new("b", vec![]);
        let chain = chain(&[&a, &b], Policy::default());
        let names = |order: Vec<&Link>| {
            order
                .iter()
                .map(|l| l.provider().to_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(chain.order(Some("b-model")).unwrap()), ["b", "a"]);
        assert_eq!(names(chain.order(Some("b")).unwrap()), ["b", "a"]);
        assert_eq!(names(chain.order(None).unwrap()), ["a", "b"]);
        assert!(chain.order(Some("gpt-17")).is_none());
    }

    #[test]
    fn jitter_stays_under_its_ceiling() {
        for _ in 0..100 {
            assert!(jitter(Duration::from_millis(500)) <= Duration::from_millis(500));
        }
    }
}
