//! The `BlobStore` conformance suite: the contract in `ports::blob`, case by case.

use std::future::Future;
use std::sync::Arc;

use super::unique;
use crate::ports::blob::{BlobKey, BlobStore};
use crate::ports::health::HealthStatus;

/// Runs every case on a store made by `make()`; cases use key prefixes of their own.
pub async fn run_all<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn BlobStore>>,
{
    macro_rules! cases {
        ($($case:ident),* $(,)?) => {$(
            eprintln!("blob suite: {}", stringify!($case));
            $case(make().await, &unique("suite-")).await;
        )*};
    }
    cases!(
        an_object_round_trips_with_its_metadata,
        put_replaces_and_changes_the_etag,
        missing_objects_are_none_and_delete_says_whether_it_existed,
        list_returns_exactly_the_prefix_by_key,
        a_large_object_round_trips,
        a_large_object_streams_in_chunks,
        health_is_ok_with_a_kind,
    );
}

fn key(text: &str) -> BlobKey {
    BlobKey::parse(text).unwrap()
}

async fn an_object_round_trips_with_its_metadata(store: Arc<dyn BlobStore>, root: &str) {
    let k = key(&format!("{root}/media/one.bin"));
    let bytes = b"\x89PNG\r\n\x1a\n not really".to_vec();
    let meta = store.put(&k, bytes.clone()).await.unwrap();
    assert_eq!(
        (meta.key.clone(), meta.size),
        (k.clone(), bytes.len() as u64)
    );
    let (got, got_meta) = store.get(&k).await.unwrap().unwrap();
    assert_eq!(got, bytes);
    assert_eq!(got_meta.size, bytes.len() as u64);
    let head = store.head(&k).await.unwrap().unwrap();
    assert_eq!(head.size, bytes.len() as u64);
    assert_eq!(head.etag, got_meta.etag);
}

async fn put_replaces_and_changes_the_etag(store: Arc<dyn BlobStore>, root: &str) {
    let k = key(&format!("{root}/avatar.webp"));
    let first = store.put(&k, b"first version".to_vec()).await.unwrap();
    let second = store
        .put(&k, b"the second, longer version".to_vec())
        .await
        .unwrap();
    let (bytes, _) = store.get(&k).await.unwrap().unwrap();
    assert_eq!(bytes, b"the second, longer version");
    assert!(first.etag.is_some() && second.etag.is_some());
    assert_ne!(
        first.etag, second.etag,
        "an ETag names one version of the bytes"
    );
}

async fn missing_objects_are_none_and_delete_says_whether_it_existed(
    store: Arc<dyn BlobStore>,
    root: &str,
) {
    let k = key(&format!("{root}/gone.txt"));
    assert_eq!(store.get(&k).await.unwrap(), None);
    assert_eq!(store.head(&k).await.unwrap(), None);
    assert!(!store.delete(&k).await.unwrap());
    store.put(&k, b"x".to_vec()).await.unwrap();
    assert!(store.delete(&k).await.unwrap());
    assert_eq!(store.get(&k).await.unwrap(), None);
}

async fn list_returns_exactly_the_prefix_by_key(store: Arc<dyn BlobStore>, root: &str) {
    for name in [
        "chat/b.jpg",
        "chat/a.jpg",
        "chat/sub/c.jpg",
        "chatter/d.jpg",
        "other/e.jpg",
    ] {
        store
            .put(&key(&format!("{root}/{name}")), name.as_bytes().to_vec())
            .await
            .unwrap();
    }
    let listed: Vec<String> = store
        .list(&key(&format!("{root}/chat")))
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.key.as_str().trim_start_matches(root).to_owned())
        .collect();
    assert_eq!(
        listed,
        ["/chat/a.jpg", "/chat/b.jpg", "/chat/sub/c.jpg"],
        "whole segments only"
    );
    assert!(
        store
            .list(&key(&format!("{root}/nothing")))
            .await
            .unwrap()
            .is_empty()
    );
}

async fn a_large_object_streams_in_chunks(store: Arc<dyn BlobStore>, root: &str) {
    use futures_util::TryStreamExt;
    let k = key(&format!("{root}/streamed.bin"));
    let bytes: Vec<u8> = (0..3 * 1024 * 1024).map(|i: u32| (i % 253) as u8).collect();
    let put = store.put(&k, bytes.clone()).await.unwrap();
    let (stream, meta) = store.get_stream(&k).await.unwrap().expect("stored");
    assert_eq!(meta.size, bytes.len() as u64);
    assert_eq!(meta.etag, put.etag);
    let chunks: Vec<bytes::Bytes> = stream.try_collect().await.unwrap();
    assert!(
        chunks.len() > 1,
        "a 3 MiB object comes in more than one chunk"
    );
    assert_eq!(chunks.concat(), bytes);
    assert!(
        store
            .get_stream(&key(&format!("{root}/nothing-here.bin")))
            .await
            .unwrap()
            .is_none()
    );
}

async fn a_large_object_round_trips(store: Arc<dyn BlobStore>, root: &str) {
    let k = key(&format!("{root}/large.bin"));
    let bytes: Vec<u8> = (0..3 * 1024 * 1024).map(|i: u32| (i % 251) as u8).collect();
    store.put(&k, bytes.clone()).await.unwrap();
    let (got, meta) = store.get(&k).await.unwrap().unwrap();
    assert_eq!(meta.size, bytes.len() as u64);
    assert!(got == bytes, "3 MiB round trip");
}

async fn health_is_ok_with_a_kind(store: Arc<dyn BlobStore>, _: &str) {
    let health = store.health().await;
    assert_eq!(health.status, HealthStatus::Ok, "{health:?}");
    assert!(
        matches!(health.kind.as_str(), "local" | "s3"),
        "{}",
        health.kind
    );
}
