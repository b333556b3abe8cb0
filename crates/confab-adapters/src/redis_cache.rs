//! `RedisCache`: the production `Cache`, shared by every node.
//!
//! One multiplexed RESP3 connection (redis's `ConnectionManager`) carries commands and pub/sub
//! pushes; it reconnects by itself. A monitor task pings once a second: it is what notices an
//! outage when nothing else is talking, feeds `health()`, and re-subscribes every channel with
//! local subscribers when Redis comes back (covering channels first subscribed while it was
//! down). Commands fail within about a second while Redis is unreachable.
//!
//! Rate limiting and counters run as Lua scripts, so they are atomic across nodes; the rate
//! limit uses Redis's clock, so nodes with skewed clocks still agree.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use confab_core::ports::cache::{
    Cache, CacheError, Presence, RateDecision, RateLimit, Subscription,
};
use confab_core::ports::health::{ComponentHealth, HealthCheck, HealthStatus};
use confab_core::settings::SecretUrl;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{PushInfo, PushKind, RedisError, Script};
use tokio::sync::{broadcast, mpsc};
use tokio::task::AbortHandle;

use crate::lock;
use crate::memory_cache::subscription;

const CHANNEL_CAPACITY: usize = 1024;
const TIMEOUT: Duration = Duration::from_secs(1);
const PING_EVERY: Duration = Duration::from_secs(1);

/// `INCRBY`, and the TTL only when the key has none (a fixed window).
const INCR: &str = r"
local v = redis.call('INCRBY', KEYS[1], ARGV[1])
if redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return v
";

/// `confab_core::ports::cache::gcra`, in microseconds, on Redis's clock.
const GCRA: &str = r"
local period = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = math.max(1, math.floor(period / limit))
local tat = tonumber(redis.call('GET', KEYS[1]))
if tat == nil or tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - period
if now < allow_at then
  return {0, 0, allow_at - now}
end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
return {1, math.floor((now - allow_at) / interval), 0}
";

#[derive(Default)]
struct Link {
    up: bool,
}

#[derive(Default)]
struct Shared {
    /// Local subscribers by full (prefixed) channel name.
    channels: Mutex<HashMap<String, broadcast::Sender<Arc<[u8]>>>>,
    link: Mutex<Link>,
}

pub struct RedisCache {
    prefix: String,
    conn: ConnectionManager,
    shared: Arc<Shared>,
    incr: Script,
    gcra: Script,
    tasks: [AbortHandle; 2],
}

impl Drop for RedisCache {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

fn unavailable(error: RedisError) -> CacheError {
    CacheError::Unavailable(Box::new(error))
}

fn classify(key: &str, error: RedisError) -> CacheError {
    let text = error.to_string();
    if text.contains("WRONGTYPE") || text.contains("not an integer") {
        CacheError::WrongType {
            key: key.to_owned(),
            expected: "an integer",
        }
    } else {
        unavailable(error)
    }
}

/// `*`, `?`, `[`, `]` and `\` are literal in a prefix.
fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 4);
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

impl RedisCache {
    /// Sets up the connection without waiting for it: the service starts (degraded) while
    /// Redis is down, and the cache works as soon as it is reachable. Must be called within a
    /// tokio runtime. `redis://` and `rediss://` (TLS) URLs, with `user:password@` for AUTH.
    pub fn connect(url: &SecretUrl, prefix: &str) -> Result<Self, CacheError> {
        let mut url = url.expose().clone();
        if !url.query_pairs().any(|(k, _)| k == "protocol") {
            // Pub/sub pushes share the command connection only on RESP3.
            url.query_pairs_mut().append_pair("protocol", "resp3");
        }
        let client = redis::Client::open(url.as_str()).map_err(unavailable)?;
        let (pushes, receiver) = mpsc::unbounded_channel();
        let config = ConnectionManagerConfig::new()
            .set_push_sender(pushes)
            .set_automatic_resubscription()
            .set_connection_timeout(Some(TIMEOUT))
            .set_response_timeout(Some(TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = client
            .get_connection_manager_lazy(config)
            .map_err(unavailable)?;
        let shared = Arc::new(Shared::default());
        let dispatcher = tokio::spawn(dispatch(receiver, shared.clone(), conn.clone()));
        let monitor = tokio::spawn(monitor(conn.clone(), shared.clone()));
        Ok(Self {
            prefix: prefix.to_owned(),
            conn,
            shared,
            incr: Script::new(INCR),
            gcra: Script::new(GCRA),
            tasks: [dispatcher.abort_handle(), monitor.abort_handle()],
        })
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }
}

/// Routes pub/sub pushes to local subscribers.
async fn dispatch(
    mut pushes: mpsc::UnboundedReceiver<PushInfo>,
    shared: Arc<Shared>,
    conn: ConnectionManager,
) {
    while let Some(push) = pushes.recv().await {
        match push.kind {
            PushKind::Message => {
                let mut data = push.data.into_iter();
                let (Some(channel), Some(payload)) = (data.next(), data.next()) else {
                    continue;
                };
                let (Ok(channel), Ok(payload)) = (
                    redis::from_redis_value::<String>(channel),
                    redis::from_redis_value::<Vec<u8>>(payload),
                ) else {
                    continue;
                };
                let mut channels = lock(&shared.channels);
                let Some(sender) = channels.get(&channel) else {
                    continue;
                };
                if sender.receiver_count() == 0 {
                    channels.remove(&channel);
                    let mut conn = conn.clone();
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        if !lock(&shared.channels).contains_key(&channel) {
                            let _ = conn.unsubscribe(&channel).await;
                        }
                    });
                } else {
                    let _ = sender.send(payload.into());
                }
            }
            PushKind::Disconnection => {
                let mut link = lock(&shared.link);
                if link.up {
                    tracing::warn!(
                        "Lost the connection to Redis; working without it until it returns."
                    );
                }
                link.up = false;
            }
            _ => {}
        }
    }
}

/// Pings once a second; on recovery, subscribes every channel with local subscribers again.
async fn monitor(mut conn: ConnectionManager, shared: Arc<Shared>) {
    loop {
        let pinged = tokio::time::timeout(
            TIMEOUT * 2,
            redis::cmd("PING").query_async::<String>(&mut conn),
        )
        .await;
        let error = match pinged {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some("PING timed out".to_owned()),
        };
        let recovered = {
            let mut link = lock(&shared.link);
            let was_up = link.up;
            link.up = error.is_none();
            if let (Some(e), true) = (&error, was_up) {
                tracing::warn!(error = %e, "Lost the connection to Redis; working without it until it returns.");
            }
            error.is_none() && !was_up
        };
        if recovered {
            let channels: Vec<String> = lock(&shared.channels).keys().cloned().collect();
            tracing::info!(channels = channels.len(), "Connected to Redis.");
            for channel in channels {
                if let Err(error) = conn.subscribe(&channel).await {
                    tracing::warn!(%error, "Could not subscribe again after reconnecting; retrying.");
                    lock(&shared.link).up = false;
                    break;
                }
            }
        }
        tokio::time::sleep(PING_EVERY).await;
    }
}

/// A live PING: the answer is as fresh as the question.
#[async_trait]
impl HealthCheck for RedisCache {
    async fn health(&self) -> ComponentHealth {
        let started = Instant::now();
        let pinged = tokio::time::timeout(
            TIMEOUT,
            redis::cmd("PING").query_async::<String>(&mut self.conn.clone()),
        )
        .await;
        match pinged {
            Ok(Ok(_)) => {
                ComponentHealth::new(HealthStatus::Ok, "redis").with_latency(started.elapsed())
            }
            Ok(Err(e)) => {
                ComponentHealth::new(HealthStatus::Down, "redis").with_error(e.to_string())
            }
            Err(_) => ComponentHealth::new(HealthStatus::Down, "redis").with_error(format!(
                "no answer to PING within {} ms",
                TIMEOUT.as_millis()
            )),
        }
    }
}

#[async_trait]
impl Cache for RedisCache {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, CacheError> {
        redis::cmd("GET")
            .arg(self.key(key))
            .query_async(&mut self.conn.clone())
            .await
            .map_err(|e| classify(key, e))
    }

    async fn set(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> Result<(), CacheError> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.key(key)).arg(value);
        if let Some(ttl) = ttl {
            cmd.arg("PX")
                .arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1));
        }
        cmd.query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(|e| classify(key, e))
    }

    async fn delete(&self, key: &str) -> Result<bool, CacheError> {
        let deleted: u64 = redis::cmd("UNLINK")
            .arg(self.key(key))
            .query_async(&mut self.conn.clone())
            .await
            .map_err(|e| classify(key, e))?;
        Ok(deleted > 0)
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<u64, CacheError> {
        let pattern = format!("{}*", glob_escape(&self.key(prefix)));
        let mut conn = self.conn.clone();
        let mut cursor: u64 = 0;
        let mut deleted = 0;
        loop {
            let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(500)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            if !keys.is_empty() {
                deleted += redis::cmd("UNLINK")
                    .arg(&keys)
                    .query_async::<u64>(&mut conn)
                    .await
                    .map_err(unavailable)?;
            }
            if next == 0 {
                return Ok(deleted);
            }
            cursor = next;
        }
    }

    async fn incr(&self, key: &str, by: i64, ttl: Duration) -> Result<i64, CacheError> {
        self.incr
            .key(self.key(key))
            .arg(by)
            .arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1))
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|e| classify(key, e))
    }

    async fn presence_touch(&self, set: &str, member: &str, at_ms: i64) -> Result<(), CacheError> {
        redis::cmd("ZADD")
            .arg(self.key(set))
            .arg(at_ms)
            .arg(member)
            .query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(|e| classify(set, e))
    }

    async fn presence_since(&self, set: &str, since_ms: i64) -> Result<Vec<Presence>, CacheError> {
        let members: Vec<(String, f64)> = redis::cmd("ZREVRANGEBYSCORE")
            .arg(self.key(set))
            .arg("+inf")
            .arg(since_ms)
            .arg("WITHSCORES")
            .query_async(&mut self.conn.clone())
            .await
            .map_err(|e| classify(set, e))?;
        #[allow(clippy::cast_possible_truncation)] // Scores are whole milliseconds we wrote.
        Ok(members
            .into_iter()
            .map(|(member, score)| Presence {
                member,
                last_seen_ms: score as i64,
            })
            .collect())
    }

    async fn presence_remove(&self, set: &str, member: &str) -> Result<(), CacheError> {
        redis::cmd("ZREM")
            .arg(self.key(set))
            .arg(member)
            .query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(|e| classify(set, e))
    }

    async fn presence_prune(&self, set: &str, before_ms: i64) -> Result<u64, CacheError> {
        redis::cmd("ZREMRANGEBYSCORE")
            .arg(self.key(set))
            .arg("-inf")
            .arg(format!("({before_ms}"))
            .query_async(&mut self.conn.clone())
            .await
            .map_err(|e| classify(set, e))
    }

    async fn publish(&self, channel: &str, payload: &[u8]) -> Result<(), CacheError> {
        redis::cmd("PUBLISH")
            .arg(self.key(channel))
            .arg(payload)
            .query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(unavailable)
    }

    async fn subscribers(&self, channel: &str) -> Result<u64, CacheError> {
        let (_, count): (String, u64) = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(self.key(channel))
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(count)
    }

    async fn subscribe(&self, channel: &str) -> Result<Subscription, CacheError> {
        let full = self.key(channel);
        let (receiver, first) = {
            let mut channels = lock(&self.shared.channels);
            if let Some(sender) = channels.get(&full) {
                (sender.subscribe(), false)
            } else {
                let (sender, receiver) = broadcast::channel(CHANNEL_CAPACITY);
                channels.insert(full.clone(), sender);
                (receiver, true)
            }
        };
        if first && let Err(error) = self.conn.clone().subscribe(&full).await {
            // Registered locally: the monitor subscribes it when Redis is back.
            tracing::debug!(%error, "Subscribing while Redis is unreachable; it takes effect when it returns.");
        }
        Ok(subscription(receiver, full))
    }

    async fn rate_limit(&self, key: &str, rate: RateLimit) -> Result<RateDecision, CacheError> {
        let period = u64::try_from(rate.period.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        let reply: Vec<i64> = self
            .gcra
            .key(self.key(key))
            .arg(period)
            .arg(rate.limit.max(1))
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|e| classify(key, e))?;
        let [allowed, remaining, wait_us] = reply[..] else {
            return Err(CacheError::Unavailable(
                format!("the rate-limit script answered {reply:?}").into(),
            ));
        };
        Ok(RateDecision {
            allowed: allowed == 1,
            remaining: u32::try_from(remaining).unwrap_or(0),
            retry_after: Duration::from_micros(u64::try_from(wait_us).unwrap_or(0)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::glob_escape;

    #[test]
    fn glob_characters_are_escaped() {
        assert_eq!(glob_escape("a*b?[c]\\d"), "a\\*b\\?\\[c\\]\\\\d");
        assert_eq!(glob_escape("chat:session:"), "chat:session:");
    }
}
