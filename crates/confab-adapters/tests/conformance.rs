//! Every port's conformance suite against every implementation (STYLE §7). Embedded
//! implementations always run; production ones when their `TEST_*` variable is set (and must
//! run under `CI=true`).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use confab_adapters::cache::{CacheConfig, build_backend};
use confab_core::ports::cache::Cache;
use confab_core::settings::SecretUrl;
use confab_core::testing::{self, unique};
use futures_util::StreamExt;

fn redis(url: &str, prefix: &str) -> Arc<dyn Cache> {
    build_backend(&CacheConfig::Redis {
        url: SecretUrl::parse(url).unwrap(),
        key_prefix: prefix.to_owned(),
    })
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_cache_passes_the_cache_suite() {
    testing::cache::run_all(|_prefix| async { build_backend(&CacheConfig::default()).unwrap() })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cache_passes_the_cache_suite() {
    let Some(url) = testing::service_url("TEST_REDIS_URL", "Redis cache") else {
        return;
    };
    testing::cache::run_all(|prefix| {
        let url = url.clone();
        async move { redis(&url, &prefix) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_pub_sub_crosses_nodes() {
    let Some(url) = testing::service_url("TEST_REDIS_URL", "Redis cache") else {
        return;
    };
    let prefix = unique("confab-test:");
    let (node_a, node_b) = (redis(&url, &prefix), redis(&url, &prefix));
    let mut on_b = node_b.subscribe("chat:1").await.unwrap();
    node_a.publish("chat:1", b"hello from a").await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), on_b.next())
        .await
        .unwrap();
    assert_eq!(got.as_deref(), Some(&b"hello from a"[..]));

    // And the rate limit is one budget across nodes.
    let rate = confab_core::ports::cache::RateLimit::per_minute(3);
    let mut allowed = 0;
    for node in [&node_a, &node_b, &node_a, &node_b, &node_a] {
        allowed += usize::from(node.rate_limit("rate:shared", rate).await.unwrap().allowed);
    }
    assert_eq!(allowed, 3);
    node_a.delete_prefix("").await.unwrap();
}
