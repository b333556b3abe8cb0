//! Choosing the `BlobStore`: the `[media]` config section and the one factory that reads it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use confab_core::ports::blob::{BlobError, BlobStore};
use confab_core::settings::Secret;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use serde::{Deserialize, Serialize};

use crate::object_blob_store::ObjectBlobStore;

/// `[media]`: where media objects are kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum MediaConfig {
    Local {
        /// Defaults to `<data_dir>/media`.
        #[serde(default)]
        path: Option<PathBuf>,
    },
    S3 {
        bucket: String,
        #[serde(default)]
        region: Option<String>,
        /// For S3-compatible servers; path-style addressing is used with it.
        #[serde(default)]
        endpoint: Option<String>,
        #[serde(default)]
        access_key_id: Option<String>,
        #[serde(default)]
        secret_access_key: Option<Secret>,
    },
}

impl Default for MediaConfig {
    fn default() -> Self {
        Self::Local { path: None }
    }
}

/// The store `config` names.
pub fn build(config: &MediaConfig, data_dir: &Path) -> Result<Arc<dyn BlobStore>, BlobError> {
    let other = |e: object_store::Error| BlobError::Other(Box::new(e));
    Ok(match config {
        MediaConfig::Local { path } => {
            let root = path.clone().unwrap_or_else(|| data_dir.join("media"));
            std::fs::create_dir_all(&root).map_err(|e| BlobError::Unavailable(Box::new(e)))?;
            let local = LocalFileSystem::new_with_prefix(&root).map_err(other)?;
            Arc::new(ObjectBlobStore::new(Arc::new(local), None, "local"))
        }
        MediaConfig::S3 {
            bucket,
            region,
            endpoint,
            access_key_id,
            secret_access_key,
        } => {
            // Bounded: an S3 outage must fail a request in seconds, not after object_store's
            // default of ten retries over three minutes.
            let mut builder = AmazonS3Builder::new()
                .with_client_options(
                    object_store::ClientOptions::new()
                        .with_timeout(std::time::Duration::from_secs(10))
                        .with_connect_timeout(std::time::Duration::from_secs(3)),
                )
                .with_retry(object_store::RetryConfig {
                    max_retries: 2,
                    retry_timeout: std::time::Duration::from_secs(10),
                    ..object_store::RetryConfig::default()
                })
                .with_bucket_name(bucket)
                .with_region(region.clone().unwrap_or_else(|| "us-east-1".into()))
                .with_virtual_hosted_style_request(false);
            if let Some(endpoint) = endpoint {
                builder = builder
                    .with_endpoint(endpoint)
                    .with_allow_http(endpoint.starts_with("http://"));
            }
            if let Some(id) = access_key_id {
                builder = builder.with_access_key_id(id);
            }
            if let Some(secret) = secret_access_key {
                builder = builder.with_secret_access_key(secret.expose());
            }
            let s3 = Arc::new(builder.build().map_err(other)?);
            Arc::new(ObjectBlobStore::new(s3.clone(), Some(s3), "s3"))
        }
    })
}
