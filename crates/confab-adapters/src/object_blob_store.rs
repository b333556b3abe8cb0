//! `ObjectBlobStore`: the `BlobStore` over the object_store crate, which gives local disk
//! (atomic writes through a temporary file and a rename) and S3-compatible storage
//! (path-style requests, presigned URLs) behind one interface.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use confab_core::ports::blob::{BlobError, BlobKey, BlobMeta, BlobStore, BlobStream};
use confab_core::ports::health::{ComponentHealth, HealthCheck, HealthStatus};
use futures_util::TryStreamExt;
use object_store::path::Path;
use object_store::signer::{Method, Signer};
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt, PutPayload};

pub struct ObjectBlobStore {
    store: Arc<dyn ObjectStore>,
    /// What can presign URLs (S3); none for local disk.
    signer: Option<Arc<dyn Signer>>,
    kind: &'static str,
}

impl ObjectBlobStore {
    pub fn new(
        store: Arc<dyn ObjectStore>,
        signer: Option<Arc<dyn Signer>>,
        kind: &'static str,
    ) -> Self {
        Self {
            store,
            signer,
            kind,
        }
    }
}

fn blob_err(error: object_store::Error) -> BlobError {
    match error {
        object_store::Error::Generic { .. } | object_store::Error::JoinError { .. } => {
            BlobError::Unavailable(Box::new(error))
        }
        other => BlobError::Other(Box::new(other)),
    }
}

fn path(key: &BlobKey) -> Path {
    // A BlobKey is already made of safe segments.
    Path::from(key.as_str())
}

fn meta(m: &ObjectMeta) -> Result<BlobMeta, BlobError> {
    Ok(BlobMeta {
        key: BlobKey::parse(m.location.as_ref())?,
        size: m.size,
        etag: m.e_tag.clone(),
        last_modified: m.last_modified,
    })
}

#[async_trait]
impl HealthCheck for ObjectBlobStore {
    async fn health(&self) -> ComponentHealth {
        let started = std::time::Instant::now();
        let probe = Path::from("confab-health-probe");
        let checked = tokio::time::timeout(Duration::from_secs(2), self.store.head(&probe)).await;
        match checked {
            Ok(Ok(_) | Err(object_store::Error::NotFound { .. })) => {
                ComponentHealth::new(HealthStatus::Ok, self.kind).with_latency(started.elapsed())
            }
            Ok(Err(e)) => {
                ComponentHealth::new(HealthStatus::Down, self.kind).with_error(e.to_string())
            }
            Err(_) => ComponentHealth::new(HealthStatus::Down, self.kind)
                .with_error("no answer within 2 s"),
        }
    }
}

#[async_trait]
impl BlobStore for ObjectBlobStore {
    async fn put(&self, key: &BlobKey, bytes: Vec<u8>) -> Result<BlobMeta, BlobError> {
        // Where URLs are presigned, the object carries its type, for the browser that fetches
        // it there (local disk keeps no attributes; the server names the type when it serves).
        let mut options = object_store::PutOptions::default();
        if self.signer.is_some()
            && let Some(content_type) = key.media_type()
        {
            options
                .attributes
                .insert(object_store::Attribute::ContentType, content_type.into());
        }
        self.store
            .put_opts(&path(key), PutPayload::from(bytes), options)
            .await
            .map_err(blob_err)?;
        // The store's own view (size, ETag) of what it now holds.
        let head = self.store.head(&path(key)).await.map_err(blob_err)?;
        meta(&head)
    }

    async fn get(&self, key: &BlobKey) -> Result<Option<(Vec<u8>, BlobMeta)>, BlobError> {
        let got = match self.store.get(&path(key)).await {
            Ok(got) => got,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(blob_err(e)),
        };
        let info = meta(&got.meta)?;
        let bytes = got.bytes().await.map_err(blob_err)?;
        Ok(Some((bytes.to_vec(), info)))
    }

    async fn get_stream(&self, key: &BlobKey) -> Result<Option<(BlobStream, BlobMeta)>, BlobError> {
        let got = match self.store.get(&path(key)).await {
            Ok(got) => got,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(blob_err(e)),
        };
        let info = meta(&got.meta)?;
        Ok(Some((Box::pin(got.into_stream().map_err(blob_err)), info)))
    }

    async fn head(&self, key: &BlobKey) -> Result<Option<BlobMeta>, BlobError> {
        match self.store.head(&path(key)).await {
            Ok(m) => meta(&m).map(Some),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(blob_err(e)),
        }
    }

    async fn delete(&self, key: &BlobKey) -> Result<bool, BlobError> {
        // Deleting is idempotent in object stores; whether it existed needs a look first.
        if self.head(key).await?.is_none() {
            return Ok(false);
        }
        match self.store.delete(&path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(true),
            Err(e) => Err(blob_err(e)),
        }
    }

    async fn list(&self, prefix: &BlobKey) -> Result<Vec<BlobMeta>, BlobError> {
        let found: Vec<ObjectMeta> = self
            .store
            .list(Some(&path(prefix)))
            .try_collect()
            .await
            .map_err(blob_err)?;
        let mut listed = found.iter().map(meta).collect::<Result<Vec<_>, _>>()?;
        listed.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(listed)
    }

    async fn presigned_get(
        &self,
        key: &BlobKey,
        expires_in: Duration,
    ) -> Result<Option<String>, BlobError> {
        let Some(signer) = &self.signer else {
            return Ok(None);
        };
        let url = signer
            .signed_url(Method::GET, &path(key), expires_in)
            .await
            .map_err(blob_err)?;
        Ok(Some(url.to_string()))
    }
}
