//! Conformance suites, one per port, run against every implementation (STYLE §7), and helpers
//! for tests. Enabled by the `testing` feature.
// Test code states its expectations with unwrap: a failure is the test failing.
#![allow(clippy::unwrap_used, clippy::too_many_lines)]

pub mod blob;
pub mod broker;
pub mod cache;
pub mod llm;
pub mod mailer;
pub mod store;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A name no other test in this or a concurrent run uses: for key prefixes, databases, queues.
pub fn unique(label: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "{label}{}x{}x{nanos}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Waits until `check` holds, polling; panics naming `what` after `deadline`. For effects that
/// take real time (a TTL in Redis), never a fixed sleep.
pub async fn eventually<F, Fut>(what: &str, deadline: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    loop {
        if check().await {
            return;
        }
        assert!(
            started.elapsed() < deadline,
            "{what}: not within {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether a production backend's tests must run: under `CI=true` a missing `TEST_*`
/// variable is a failure, elsewhere a printed skip.
pub fn service_url(variable: &str, what: &str) -> Option<String> {
    match std::env::var(variable) {
        Ok(url) if !url.trim().is_empty() => Some(url),
        _ if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!(
                "{variable} is not set: under CI=true the {what} tests must run (scripts/test sets it)"
            )
        }
        _ => {
            eprintln!("SKIP: {what} tests: set {variable} (scripts/test does) to run them");
            None
        }
    }
}
