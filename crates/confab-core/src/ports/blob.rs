//! The `BlobStore` port: media objects (SPEC §3 "Media"). Local disk embedded, S3-compatible
//! storage in production.
//!
//! # Contract (tested by `testing::blob::run_all` against every implementation)
//!
//! - **Keys are ours.** A [`BlobKey`] is `/`-separated segments of letters, digits, `.`, `_`
//!   and `-` (no empty, `.` or `..` segment, no leading `/`): never a path a user supplied, so
//!   nothing can escape the store's root.
//! - `put` replaces the whole object atomically: a reader sees the old bytes or the new ones,
//!   never part of either. `get_stream` gives the same bytes as `get`, in chunks, without
//!   holding the whole object. `get`/`get_stream`/`head` of a missing key is `None`; `delete` says whether the
//!   key existed. `list` returns the objects under a prefix, by key.
//! - `presigned_get` is a time-limited URL a browser can fetch directly, where the backend
//!   has such URLs (S3), serving the media type the key's extension names (`.jpg`, `.png`,
//!   `.webp`, `.gif`); `None` elsewhere (the server then signs its own media URLs).

use std::time::Duration;

use async_trait::async_trait;

use super::health::HealthCheck;
use crate::domain::Timestamp;
use crate::error::BoxError;

/// A validated object key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlobKey(String);

impl BlobKey {
    pub const MAX_LEN: usize = 512;

    pub fn parse(key: &str) -> Result<Self, BlobError> {
        let valid = !key.is_empty()
            && key.len() <= Self::MAX_LEN
            && key.split('/').all(|segment| {
                !segment.is_empty()
                    && segment != "."
                    && segment != ".."
                    && segment
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
            });
        if valid {
            Ok(Self(key.to_owned()))
        } else {
            Err(BlobError::InvalidKey(key.chars().take(80).collect()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The media type the key's extension names, for the image extensions we store.
    pub fn media_type(&self) -> Option<&'static str> {
        match self.0.rsplit_once('.')?.1 {
            "jpg" | "jpeg" => Some("image/jpeg"),
            "png" => Some("image/png"),
            "webp" => Some("image/webp"),
            "gif" => Some("image/gif"),
            _ => None,
        }
    }
}

impl std::fmt::Display for BlobKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobMeta {
    pub key: BlobKey,
    pub size: u64,
    /// Changes whenever the bytes do (for ETag / conditional GET).
    pub etag: Option<String>,
    pub last_modified: Timestamp,
}

/// An object's bytes, a chunk at a time.
pub type BlobStream =
    std::pin::Pin<Box<dyn futures_core::Stream<Item = Result<bytes::Bytes, BlobError>> + Send>>;

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("not a valid object key: {0:?}")]
    InvalidKey(String),
    #[error("the object store is unavailable")]
    Unavailable(#[source] BoxError),
    #[error("object store error")]
    Other(#[source] BoxError),
}

#[async_trait]
pub trait BlobStore: HealthCheck {
    async fn put(&self, key: &BlobKey, bytes: Vec<u8>) -> Result<BlobMeta, BlobError>;
    async fn get(&self, key: &BlobKey) -> Result<Option<(Vec<u8>, BlobMeta)>, BlobError>;
    /// The object's bytes as a stream (serving media without holding it in memory).
    async fn get_stream(&self, key: &BlobKey) -> Result<Option<(BlobStream, BlobMeta)>, BlobError>;
    async fn head(&self, key: &BlobKey) -> Result<Option<BlobMeta>, BlobError>;
    async fn delete(&self, key: &BlobKey) -> Result<bool, BlobError>;
    /// Objects whose key starts with `prefix` (whole segments), ordered by key.
    async fn list(&self, prefix: &BlobKey) -> Result<Vec<BlobMeta>, BlobError>;
    async fn presigned_get(
        &self,
        key: &BlobKey,
        expires_in: Duration,
    ) -> Result<Option<String>, BlobError>;
}

#[cfg(test)]
mod tests {
    use super::BlobKey;

    #[test]
    fn keys_are_ours_and_cannot_escape_the_root() {
        for ok in [
            "media/2026/ab.webp",
            "avatars/0190c0de-0000-7000/thumb_256.jpg",
            "a",
        ] {
            assert!(BlobKey::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "../secret",
            "media/../x",
            "media/./x",
            "a//b",
            "a/",
            "sp ace",
            "quote\"",
            "back\\slash",
            "%2e%2e",
            "ünïcode",
        ] {
            assert!(BlobKey::parse(bad).is_err(), "{bad:?}");
        }
        assert!(BlobKey::parse(&"a".repeat(513)).is_err());
    }
}
