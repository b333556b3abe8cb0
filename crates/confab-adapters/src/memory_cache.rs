//! `MemoryCache`: the embedded `Cache`, for one process.
//!
//! Values live in a bounded moka cache (so a flood of keys evicts instead of growing without
//! limit) with per-entry expiry; counters are updated with moka's per-key atomic compute.
//! Presence, subscriptions and rate-limit state are small maps behind mutexes that are never
//! held across an await.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use confab_core::ports::cache::{
    Cache, CacheError, Presence, RateDecision, RateLimit, Subscription, gcra,
};
use confab_core::ports::health::{ComponentHealth, HealthCheck, HealthStatus};
use moka::Expiry;
use moka::ops::compute::{CompResult, Op};
use tokio::sync::broadcast;

/// How many messages a slow subscription may fall behind before it loses some.
use crate::lock;

const CHANNEL_CAPACITY: usize = 1024;
/// Rate-limit states are swept of finished windows when there are more than this many.
const RATE_SWEEP_AT: usize = 10_000;

#[derive(Clone, Debug)]
struct Stored {
    bytes: Arc<[u8]>,
    expires_at: Option<Instant>,
}

impl Stored {
    fn live(&self, now: Instant) -> bool {
        self.expires_at.is_none_or(|t| t > now)
    }
}

struct ByDeadline;

impl Expiry<String, Stored> for ByDeadline {
    fn expire_after_create(&self, _: &String, v: &Stored, now: Instant) -> Option<Duration> {
        v.expires_at.map(|t| t.saturating_duration_since(now))
    }

    fn expire_after_update(
        &self,
        _: &String,
        v: &Stored,
        now: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        v.expires_at.map(|t| t.saturating_duration_since(now))
    }
}

pub struct MemoryCache {
    values: moka::future::Cache<String, Stored>,
    presence: Mutex<HashMap<String, HashMap<String, i64>>>,
    channels: Mutex<HashMap<String, broadcast::Sender<Arc<[u8]>>>>,
    rates: Mutex<HashMap<String, u64>>,
    clock: Instant,
}

impl MemoryCache {
    pub fn new(max_entries: u64) -> Self {
        Self {
            values: moka::future::Cache::builder()
                .max_capacity(max_entries)
                .expire_after(ByDeadline)
                .build(),
            presence: Mutex::default(),
            channels: Mutex::default(),
            rates: Mutex::default(),
            clock: Instant::now(),
        }
    }

    fn now_us(&self) -> u64 {
        u64::try_from(self.clock.elapsed().as_micros()).unwrap_or(u64::MAX)
    }
}

fn parse_counter(key: &str, bytes: &[u8]) -> Result<i64, CacheError> {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| CacheError::WrongType {
            key: key.to_owned(),
            expected: "an integer",
        })
}

#[async_trait]
impl HealthCheck for MemoryCache {
    async fn health(&self) -> ComponentHealth {
        ComponentHealth::new(HealthStatus::Ok, "memory").with_latency_ms(0)
    }
}

#[async_trait]
impl Cache for MemoryCache {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, CacheError> {
        let now = Instant::now();
        Ok(self
            .values
            .get(key)
            .await
            .filter(|v| v.live(now))
            .map(|v| v.bytes.to_vec()))
    }

    async fn set(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> Result<(), CacheError> {
        let stored = Stored {
            bytes: value.into(),
            expires_at: ttl.map(|ttl| Instant::now() + ttl),
        };
        self.values.insert(key.to_owned(), stored).await;
        Ok(())
    }

    async fn delete(&self, key: &str) -> Result<bool, CacheError> {
        let now = Instant::now();
        Ok(self.values.remove(key).await.is_some_and(|v| v.live(now)))
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<u64, CacheError> {
        let now = Instant::now();
        let keys: Vec<Arc<String>> = self
            .values
            .iter()
            .filter(|(k, v)| k.starts_with(prefix) && v.live(now))
            .map(|(k, _)| k)
            .collect();
        let mut deleted = 0;
        for key in keys {
            if self.values.remove(key.as_str()).await.is_some() {
                deleted += 1;
            }
        }
        Ok(deleted)
    }

    async fn incr(&self, key: &str, by: i64, ttl: Duration) -> Result<i64, CacheError> {
        let now = Instant::now();
        let mut wrong_type = None;
        let result = self
            .values
            .entry(key.to_owned())
            .and_compute_with(|entry| {
                let current = entry.map(moka::Entry::into_value).filter(|v| v.live(now));
                let next = match current {
                    None => Ok(Stored {
                        bytes: by.to_string().into_bytes().into(),
                        expires_at: Some(now + ttl),
                    }),
                    Some(stored) => parse_counter(key, &stored.bytes).map(|n| Stored {
                        bytes: n.saturating_add(by).to_string().into_bytes().into(),
                        expires_at: stored.expires_at,
                    }),
                };
                let op = match next {
                    Ok(stored) => Op::Put(stored),
                    Err(e) => {
                        wrong_type = Some(e);
                        Op::Nop
                    }
                };
                std::future::ready(op)
            })
            .await;
        if let Some(e) = wrong_type {
            return Err(e);
        }
        match result {
            CompResult::Inserted(entry) | CompResult::ReplacedWith(entry) => {
                parse_counter(key, &entry.into_value().bytes)
            }
            other => Err(CacheError::Unavailable(
                format!("unexpected counter update: {other:?}").into(),
            )),
        }
    }

    async fn presence_touch(&self, set: &str, member: &str, at_ms: i64) -> Result<(), CacheError> {
        lock(&self.presence)
            .entry(set.to_owned())
            .or_default()
            .insert(member.to_owned(), at_ms);
        Ok(())
    }

    async fn presence_since(&self, set: &str, since_ms: i64) -> Result<Vec<Presence>, CacheError> {
        let mut members: Vec<Presence> = lock(&self.presence)
            .get(set)
            .map(|members| {
                members
                    .iter()
                    .filter(|(_, at)| **at >= since_ms)
                    .map(|(member, at)| Presence {
                        member: member.clone(),
                        last_seen_ms: *at,
                    })
                    .collect()
            })
            .unwrap_or_default();
        members.sort_by(|a, b| {
            b.last_seen_ms
                .cmp(&a.last_seen_ms)
                .then_with(|| a.member.cmp(&b.member))
        });
        Ok(members)
    }

    async fn presence_remove(&self, set: &str, member: &str) -> Result<(), CacheError> {
        if let Some(members) = lock(&self.presence).get_mut(set) {
            members.remove(member);
        }
        Ok(())
    }

    async fn presence_prune(&self, set: &str, before_ms: i64) -> Result<u64, CacheError> {
        let mut sets = lock(&self.presence);
        let Some(members) = sets.get_mut(set) else {
            return Ok(0);
        };
        let before = members.len();
        members.retain(|_, at| *at >= before_ms);
        Ok((before - members.len()) as u64)
    }

    async fn publish(&self, channel: &str, payload: &[u8]) -> Result<(), CacheError> {
        let mut channels = lock(&self.channels);
        if let Some(sender) = channels.get(channel) {
            if sender.receiver_count() == 0 {
                channels.remove(channel);
            } else {
                // Fails only when every receiver is gone, which is "nobody listening".
                let _ = sender.send(payload.into());
            }
        }
        Ok(())
    }

    async fn subscribers(&self, channel: &str) -> Result<u64, CacheError> {
        let channels = lock(&self.channels);
        let listening = channels
            .get(channel)
            .is_some_and(|sender| sender.receiver_count() > 0);
        Ok(u64::from(listening))
    }

    async fn subscribe(&self, channel: &str) -> Result<Subscription, CacheError> {
        let receiver = lock(&self.channels)
            .entry(channel.to_owned())
            .or_insert_with(|| broadcast::channel(CHANNEL_CAPACITY).0)
            .subscribe();
        Ok(subscription(receiver, channel.to_owned()))
    }

    async fn rate_limit(&self, key: &str, rate: RateLimit) -> Result<RateDecision, CacheError> {
        let now = self.now_us();
        let mut rates = lock(&self.rates);
        let (decision, tat) = gcra(now, rates.get(key).copied(), rate);
        if let Some(tat) = tat {
            rates.insert(key.to_owned(), tat);
        }
        if rates.len() > RATE_SWEEP_AT {
            rates.retain(|_, tat| *tat > now);
        }
        Ok(decision)
    }
}

/// A broadcast receiver as a stream. A subscription that falls more than the channel's
/// capacity behind skips what it missed (pub/sub is at-most-once) and says so in the log.
pub(crate) fn subscription(
    receiver: broadcast::Receiver<Arc<[u8]>>,
    channel: String,
) -> Subscription {
    Box::pin(futures_util::stream::unfold(
        (receiver, channel),
        |(mut receiver, channel)| async move {
            loop {
                match receiver.recv().await {
                    Ok(message) => return Some((message.to_vec(), (receiver, channel))),
                    Err(broadcast::error::RecvError::Lagged(skipped)) => {
                        tracing::warn!(channel = %channel, skipped, "A subscriber fell behind; messages were dropped.");
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        },
    ))
}
