//! The `Cache` port: short-lived shared state (SPEC §7). In memory embedded, Redis in
//! production.
//!
//! # Contract (tested by `testing::cache::run_all` against every implementation)
//!
//! - **Keys and channels are logical.** Callers pass names such as [`keys::session`]; the
//!   implementation adds its configured prefix, so two caches with different prefixes never see
//!   each other's keys or messages.
//! - **Values** are bytes. `set` with a TTL keeps the value until the TTL passes (then `get`
//!   misses); without one, until deleted. It is a cache: an implementation may evict under
//!   memory pressure, so nothing here may be the only copy of anything.
//! - **`incr`** is atomic: N concurrent increments of 1 add exactly N. A missing key starts at 0
//!   and gets the given TTL; an existing key keeps its expiry (a fixed window). A value that is
//!   not an integer is [`CacheError::WrongType`].
//! - **Presence** is a set of members with last-seen times (milliseconds since the epoch,
//!   given by the caller): touching updates the time, `since` lists members seen at or after a
//!   time, `prune` drops members last seen before one.
//! - **Publish/subscribe** is at-most-once: a message is delivered to every subscription of the
//!   same channel on the same backend (every node sharing a Redis) that existed when it was
//!   published, in publish order per publisher. A subscription outlives backend outages: after a
//!   reconnect it receives again (messages published meanwhile are lost).
//! - **`rate_limit`** is GCRA ([`gcra`]): `limit` requests per `period`, all of them usable at
//!   once, refilled evenly. It is atomic across every caller of the same backend: N parallel
//!   callers never get more than the limit allowed.
//! - **Outages.** When the backend cannot be reached, calls return [`CacheError::Unavailable`]
//!   promptly (about a second at most), never hang, and the implementation reconnects by itself.
//!   What the service then does (reads miss, writes skipped, rate limits fail open) is the
//!   fail-soft wrapper's job, not each implementation's.

use std::pin::Pin;
use std::time::Duration;

use futures_core::Stream;

use super::health::HealthCheck;
use crate::error::BoxError;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The backend cannot be reached or did not answer in time.
    #[error("the cache backend is unavailable")]
    Unavailable(#[source] BoxError),
    /// The operation does not fit the value stored under the key (e.g. `incr` on text).
    #[error("the value under {key:?} is not {expected}")]
    WrongType { key: String, expected: &'static str },
}

/// A rate: `limit` requests per `period`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub limit: u32,
    pub period: Duration,
}

impl RateLimit {
    pub const fn per_minute(limit: u32) -> Self {
        Self {
            limit,
            period: Duration::from_mins(1),
        }
    }

    pub const fn per_second(limit: u32) -> Self {
        Self {
            limit,
            period: Duration::from_secs(1),
        }
    }
}

/// The answer to a rate-limit check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateDecision {
    pub allowed: bool,
    /// Requests still allowed right now after this one.
    pub remaining: u32,
    /// When denied: how long until one request is allowed again (`Retry-After`). Zero when
    /// allowed.
    pub retry_after: Duration,
}

/// A member of a presence set and when it was last seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    pub member: String,
    pub last_seen_ms: i64,
}

/// The messages of one channel, as they arrive.
pub type Subscription = Pin<Box<dyn Stream<Item = Vec<u8>> + Send>>;

#[async_trait::async_trait]
pub trait Cache: HealthCheck {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, CacheError>;
    async fn set(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> Result<(), CacheError>;
    /// Whether the key existed.
    async fn delete(&self, key: &str) -> Result<bool, CacheError>;
    /// Deletes every key starting with `prefix`; returns how many.
    async fn delete_prefix(&self, prefix: &str) -> Result<u64, CacheError>;
    /// Adds `by` and returns the new value; see the contract for expiry.
    async fn incr(&self, key: &str, by: i64, ttl: Duration) -> Result<i64, CacheError>;

    async fn presence_touch(&self, set: &str, member: &str, at_ms: i64) -> Result<(), CacheError>;
    /// Members last seen at or after `since_ms`, most recent first.
    async fn presence_since(&self, set: &str, since_ms: i64) -> Result<Vec<Presence>, CacheError>;
    async fn presence_remove(&self, set: &str, member: &str) -> Result<(), CacheError>;
    /// Drops members last seen before `before_ms`; returns how many.
    async fn presence_prune(&self, set: &str, before_ms: i64) -> Result<u64, CacheError>;

    async fn publish(&self, channel: &str, payload: &[u8]) -> Result<(), CacheError>;
    /// Messages published to `channel` from now on. When this returns, the subscription is
    /// in place: a message published afterwards is delivered.
    async fn subscribe(&self, channel: &str) -> Result<Subscription, CacheError>;
    /// How many processes (nodes) hold a subscription to `channel`: Redis counts its
    /// subscribed connections (one per process however many local subscriptions), the
    /// in-process cache 1 or 0. How a node learns how many others to wait for.
    async fn subscribers(&self, channel: &str) -> Result<u64, CacheError>;

    async fn rate_limit(&self, key: &str, rate: RateLimit) -> Result<RateDecision, CacheError>;
}

/// The generic cell rate algorithm, in microseconds.
///
/// `tat` is the stored "theoretical arrival time" (or `None` for a fresh key). Returns the
/// decision and, when allowed, the new TAT to store (it can be dropped once `now` passes it).
/// The Redis implementation runs the same arithmetic in Lua.
pub fn gcra(now_us: u64, tat_us: Option<u64>, rate: RateLimit) -> (RateDecision, Option<u64>) {
    // Signed: `new_tat - period` is negative for a fresh key early in the clock's life.
    let now = i128::from(now_us);
    let limit = i128::from(rate.limit.max(1));
    let period = i128::try_from(rate.period.as_micros())
        .unwrap_or(i128::MAX / 4)
        .max(1);
    let interval = (period / limit).max(1);
    let tat = tat_us.map_or(now, i128::from).max(now);
    let new_tat = tat + interval;
    let allow_at = new_tat - period;
    if now < allow_at {
        let wait = u64::try_from(allow_at - now).unwrap_or(u64::MAX);
        let decision = RateDecision {
            allowed: false,
            remaining: 0,
            retry_after: Duration::from_micros(wait),
        };
        return (decision, None);
    }
    let remaining = u32::try_from((now - allow_at) / interval).unwrap_or(u32::MAX);
    let decision = RateDecision {
        allowed: true,
        remaining,
        retry_after: Duration::ZERO,
    };
    (decision, Some(u64::try_from(new_tat).unwrap_or(u64::MAX)))
}

/// Key and channel names and lifetimes of SPEC §7 (before the configured prefix).
pub mod keys {
    use std::time::Duration;

    pub const SESSION_TTL: Duration = Duration::from_hours(24);
    pub const AI_SESSION_STATUS_TTL: Duration = Duration::from_hours(2);
    pub const AI_RESPONSE_TTL: Duration = Duration::from_hours(1);

    /// The presence set of every user.
    pub const ONLINE_USERS: &str = "online_users";

    pub fn session(user_id: &str) -> String {
        format!("session:{user_id}")
    }

    pub fn ai_session_status(session_id: &str) -> String {
        format!("chat:session:{session_id}")
    }

    pub fn ai_response(hash: &str) -> String {
        format!("ai:response:{hash}")
    }

    pub fn rate(subject: &str, endpoint: &str) -> String {
        format!("rate:{subject}:{endpoint}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIVE_PER_MINUTE: RateLimit = RateLimit::per_minute(5);

    #[test]
    fn a_fresh_key_allows_the_whole_limit_at_once_then_denies() {
        let mut tat = None;
        for expected_remaining in (0..5).rev() {
            let (d, next) = gcra(1_000_000, tat, FIVE_PER_MINUTE);
            assert!(d.allowed);
            assert_eq!(d.remaining, expected_remaining);
            tat = next;
        }
        let (d, next) = gcra(1_000_000, tat, FIVE_PER_MINUTE);
        assert!(!d.allowed);
        assert!(next.is_none(), "a denied request stores nothing");
        assert_eq!(
            d.retry_after,
            Duration::from_secs(12),
            "one slot refills every 60/5 s"
        );
    }

    #[test]
    fn slots_refill_evenly() {
        let mut tat = None;
        for _ in 0..5 {
            tat = gcra(0, tat, FIVE_PER_MINUTE).1;
        }
        assert!(!gcra(11_999_999, tat, FIVE_PER_MINUTE).0.allowed);
        let (d, _) = gcra(12_000_000, tat, FIVE_PER_MINUTE);
        assert!(d.allowed);
        assert_eq!(d.remaining, 0);
        let (d, _) = gcra(60_000_000, tat, FIVE_PER_MINUTE);
        assert_eq!(
            d.remaining, 4,
            "after a full period the whole limit is back"
        );
    }

    #[test]
    fn an_old_tat_does_not_bank_extra_requests() {
        let (d, _) = gcra(10_000_000_000, Some(1), FIVE_PER_MINUTE);
        assert_eq!(d.remaining, 4);
    }
}
