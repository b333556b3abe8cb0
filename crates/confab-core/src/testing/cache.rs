//! The `Cache` conformance suite: the contract in `ports::cache`, case by case.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;

use super::{eventually, unique};
use crate::ports::cache::{Cache, CacheError, RateLimit};
use crate::ports::health::HealthStatus;

/// Runs every case, each on a fresh cache made by `make(prefix)` with a prefix of its own.
pub async fn run_all<F, Fut>(make: F)
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = Arc<dyn Cache>>,
{
    macro_rules! cases {
        ($($case:ident),* $(,)?) => {
            $(
                eprintln!("cache suite: {}", stringify!($case));
                let cache = make(unique("confab-test:")).await;
                $case(cache.clone()).await;
                // A shared backend (Redis) keeps nothing of the run.
                cache.delete_prefix("").await.unwrap();
            )*
        };
    }
    cases!(
        a_missing_key_misses,
        set_then_get_returns_the_value_and_set_again_replaces_it,
        a_value_with_a_ttl_expires,
        delete_says_whether_the_key_existed,
        delete_prefix_deletes_exactly_the_matching_keys,
        incr_counts_from_zero_and_concurrent_increments_all_count,
        incr_sets_the_ttl_once_and_the_counter_expires,
        incr_on_text_is_wrong_type,
        presence_tracks_members_by_last_seen_time,
        published_messages_reach_every_subscription_in_order,
        a_subscription_ends_its_channel_only,
        subscribers_count_the_processes_listening,
        rate_limit_allows_the_limit_then_denies_with_retry_after,
        rate_limit_refills_over_the_period,
        rate_limit_is_exact_under_concurrency,
        rate_limit_keys_are_independent,
        health_is_ok_with_a_kind,
    );
    eprintln!("cache suite: prefixes_isolate_caches");
    let prefix = unique("confab-test:");
    let (a, b) = (
        make(prefix.clone()).await,
        make(format!("{prefix}-other")).await,
    );
    prefixes_isolate_caches(a.clone(), b.clone()).await;
    b.delete_prefix("").await.unwrap();
    a.delete_prefix("").await.unwrap();
}

async fn a_missing_key_misses(cache: Arc<dyn Cache>) {
    assert_eq!(cache.get("nothing-here").await.unwrap(), None);
}

async fn set_then_get_returns_the_value_and_set_again_replaces_it(cache: Arc<dyn Cache>) {
    cache.set("k", b"first", None).await.unwrap();
    assert_eq!(
        cache.get("k").await.unwrap().as_deref(),
        Some(&b"first"[..])
    );
    cache
        .set("k", b"\x00binary\xff", Some(Duration::from_mins(1)))
        .await
        .unwrap();
    assert_eq!(
        cache.get("k").await.unwrap().as_deref(),
        Some(&b"\x00binary\xff"[..])
    );
}

async fn a_value_with_a_ttl_expires(cache: Arc<dyn Cache>) {
    cache
        .set("short", b"v", Some(Duration::from_millis(200)))
        .await
        .unwrap();
    cache
        .set("long", b"v", Some(Duration::from_mins(1)))
        .await
        .unwrap();
    assert!(
        cache.get("short").await.unwrap().is_some(),
        "present before its TTL"
    );
    eventually(
        "the short-lived value expires",
        Duration::from_secs(3),
        || async { cache.get("short").await.unwrap().is_none() },
    )
    .await;
    assert!(cache.get("long").await.unwrap().is_some(), "others stay");
}

async fn delete_says_whether_the_key_existed(cache: Arc<dyn Cache>) {
    cache.set("gone", b"v", None).await.unwrap();
    assert!(cache.delete("gone").await.unwrap());
    assert!(!cache.delete("gone").await.unwrap());
    assert_eq!(cache.get("gone").await.unwrap(), None);
}

async fn delete_prefix_deletes_exactly_the_matching_keys(cache: Arc<dyn Cache>) {
    for key in [
        "chat:session:1",
        "chat:session:2",
        "chat:session:3",
        "chat:other",
        "session:1",
    ] {
        cache.set(key, b"v", None).await.unwrap();
    }
    // Glob characters in the prefix are literal.
    cache.set("odd*[key]?", b"v", None).await.unwrap();
    cache.set("odd-key", b"v", None).await.unwrap();
    assert_eq!(cache.delete_prefix("chat:session:").await.unwrap(), 3);
    assert_eq!(cache.get("chat:session:2").await.unwrap(), None);
    assert!(cache.get("chat:other").await.unwrap().is_some());
    assert!(cache.get("session:1").await.unwrap().is_some());
    assert_eq!(cache.delete_prefix("odd*").await.unwrap(), 1);
    assert!(cache.get("odd-key").await.unwrap().is_some());
    assert_eq!(cache.delete_prefix("no-such-prefix:").await.unwrap(), 0);
}

async fn incr_counts_from_zero_and_concurrent_increments_all_count(cache: Arc<dyn Cache>) {
    let ttl = Duration::from_mins(1);
    assert_eq!(cache.incr("n", 1, ttl).await.unwrap(), 1);
    assert_eq!(cache.incr("n", 5, ttl).await.unwrap(), 6);
    assert_eq!(cache.incr("n", -2, ttl).await.unwrap(), 4);
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let cache = cache.clone();
            tokio::spawn(async move { cache.incr("c", 1, ttl).await.unwrap() })
        })
        .collect();
    let mut seen = HashSet::new();
    for task in tasks {
        assert!(
            seen.insert(task.await.unwrap()),
            "every increment sees its own value"
        );
    }
    assert_eq!(cache.incr("c", 0, ttl).await.unwrap(), 50);
}

async fn incr_sets_the_ttl_once_and_the_counter_expires(cache: Arc<dyn Cache>) {
    cache
        .incr("window", 1, Duration::from_millis(300))
        .await
        .unwrap();
    // A later increment with a long TTL does not extend the window.
    cache
        .incr("window", 1, Duration::from_mins(1))
        .await
        .unwrap();
    eventually(
        "the counter's window ends",
        Duration::from_secs(3),
        || async { cache.get("window").await.unwrap().is_none() },
    )
    .await;
    assert_eq!(
        cache
            .incr("window", 1, Duration::from_mins(1))
            .await
            .unwrap(),
        1
    );
}

async fn incr_on_text_is_wrong_type(cache: Arc<dyn Cache>) {
    cache.set("text", b"hello", None).await.unwrap();
    let err = cache
        .incr("text", 1, Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(matches!(err, CacheError::WrongType { .. }), "{err:?}");
    assert_eq!(
        cache.get("text").await.unwrap().as_deref(),
        Some(&b"hello"[..])
    );
}

async fn presence_tracks_members_by_last_seen_time(cache: Arc<dyn Cache>) {
    let set = "online_users";
    cache.presence_touch(set, "ann", 1_000).await.unwrap();
    cache.presence_touch(set, "bob", 2_000).await.unwrap();
    cache.presence_touch(set, "cid", 3_000).await.unwrap();
    cache.presence_touch(set, "ann", 4_000).await.unwrap();
    let members = |since| {
        let cache = cache.clone();
        async move {
            cache
                .presence_since(set, since)
                .await
                .unwrap()
                .into_iter()
                .map(|p| (p.member, p.last_seen_ms))
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        members(2_000).await,
        [
            ("ann".into(), 4_000),
            ("cid".into(), 3_000),
            ("bob".into(), 2_000)
        ]
    );
    cache.presence_remove(set, "cid").await.unwrap();
    assert_eq!(
        members(0).await,
        [("ann".into(), 4_000), ("bob".into(), 2_000)]
    );
    assert_eq!(cache.presence_prune(set, 3_000).await.unwrap(), 1);
    assert_eq!(members(0).await, [("ann".into(), 4_000)]);
    assert!(
        cache
            .presence_since("other_set", 0)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn next(sub: &mut crate::ports::cache::Subscription) -> Vec<u8> {
    tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .expect("a message within 5 s")
        .expect("the subscription is open")
}

async fn published_messages_reach_every_subscription_in_order(cache: Arc<dyn Cache>) {
    let mut first = cache.subscribe("events").await.unwrap();
    let mut second = cache.subscribe("events").await.unwrap();
    for i in 0..20u8 {
        cache.publish("events", &[i]).await.unwrap();
    }
    for sub in [&mut first, &mut second] {
        for i in 0..20u8 {
            assert_eq!(next(sub).await, [i]);
        }
    }
}

async fn a_subscription_ends_its_channel_only(cache: Arc<dyn Cache>) {
    let mut a = cache.subscribe("room:a").await.unwrap();
    cache.publish("room:b", b"not for a").await.unwrap();
    cache.publish("room:a", b"for a").await.unwrap();
    assert_eq!(next(&mut a).await, b"for a");
    drop(a);
    // Publishing with no subscriber left is fine.
    cache.publish("room:a", b"nobody").await.unwrap();
}

async fn subscribers_count_the_processes_listening(cache: Arc<dyn Cache>) {
    assert_eq!(cache.subscribers("nodes").await.unwrap(), 0);
    let first = cache.subscribe("nodes").await.unwrap();
    // A second subscription in the same process is still one listener.
    let second = cache.subscribe("nodes").await.unwrap();
    assert_eq!(cache.subscribers("nodes").await.unwrap(), 1);
    assert_eq!(cache.subscribers("elsewhere").await.unwrap(), 0);
    drop((first, second));
}

async fn rate_limit_allows_the_limit_then_denies_with_retry_after(cache: Arc<dyn Cache>) {
    let rate = RateLimit::per_minute(5);
    for remaining in (0..5).rev() {
        let d = cache.rate_limit("rate:ip:login", rate).await.unwrap();
        assert!(d.allowed);
        assert_eq!(d.remaining, remaining);
        assert_eq!(d.retry_after, Duration::ZERO);
    }
    let denied = cache.rate_limit("rate:ip:login", rate).await.unwrap();
    assert!(!denied.allowed);
    assert_eq!(denied.remaining, 0);
    assert!(
        denied.retry_after > Duration::from_secs(10)
            && denied.retry_after <= Duration::from_secs(12),
        "one slot refills every 12 s: {:?}",
        denied.retry_after
    );
}

async fn rate_limit_refills_over_the_period(cache: Arc<dyn Cache>) {
    let rate = RateLimit {
        limit: 2,
        period: Duration::from_millis(400),
    };
    assert!(cache.rate_limit("r", rate).await.unwrap().allowed);
    assert!(cache.rate_limit("r", rate).await.unwrap().allowed);
    let denied = cache.rate_limit("r", rate).await.unwrap();
    assert!(!denied.allowed);
    eventually("a slot refills", Duration::from_secs(3), || async {
        cache.rate_limit("r", rate).await.unwrap().allowed
    })
    .await;
}

async fn rate_limit_is_exact_under_concurrency(cache: Arc<dyn Cache>) {
    let rate = RateLimit::per_minute(10);
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let cache = cache.clone();
            tokio::spawn(async move { cache.rate_limit("rate:busy", rate).await.unwrap().allowed })
        })
        .collect();
    let mut allowed = 0;
    for task in tasks {
        allowed += usize::from(task.await.unwrap());
    }
    assert_eq!(allowed, 10, "exactly the limit, however many ask at once");
}

async fn rate_limit_keys_are_independent(cache: Arc<dyn Cache>) {
    let rate = RateLimit::per_minute(1);
    assert!(cache.rate_limit("rate:a", rate).await.unwrap().allowed);
    assert!(!cache.rate_limit("rate:a", rate).await.unwrap().allowed);
    assert!(cache.rate_limit("rate:b", rate).await.unwrap().allowed);
}

async fn health_is_ok_with_a_kind(cache: Arc<dyn Cache>) {
    let health = cache.health().await;
    assert_eq!(health.status, HealthStatus::Ok, "{health:?}");
    assert!(!health.kind.is_empty());
}

async fn prefixes_isolate_caches(a: Arc<dyn Cache>, b: Arc<dyn Cache>) {
    a.set("shared-name", b"a", None).await.unwrap();
    assert_eq!(b.get("shared-name").await.unwrap(), None);
    assert_eq!(b.delete_prefix("shared").await.unwrap(), 0);
    assert!(a.get("shared-name").await.unwrap().is_some());
    let mut sub_b = b.subscribe("ch").await.unwrap();
    a.publish("ch", b"from a").await.unwrap();
    b.publish("ch", b"from b").await.unwrap();
    assert_eq!(
        next(&mut sub_b).await,
        b"from b",
        "a's message never reaches b"
    );
}
