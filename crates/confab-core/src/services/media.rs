//! Media (SPEC §3 "Media", §11 uploads): image messages and avatars.
//!
//! Rules kept here, in one place:
//! - An upload is judged by its content ([`image::process`]): the magic bytes decide, a size
//!   and a pixel limit hold before decoding, and only a fresh encoding of the pixels is kept
//!   (no metadata), with a thumbnail, under keys of ours: `chats/{chat}/{message}/image.{ext}`
//!   and `avatars/{user}/{upload}/image.{ext}`, the thumbnail beside it as `w256.{ext}`.
//! - Decoding runs on the blocking pool, a bounded number at a time and within a deadline, so
//!   a large image never stalls the async workers (Socket.IO delivery).
//! - Who may see an object follows from its key ([`Owner`]): a chat's images its members,
//!   avatars anyone signed in. URLs handed out are signed and short-lived: presigned by the
//!   object store where it can (S3), else our own `…/media/{key}?exp=…&sig=…` (an HMAC over
//!   key and expiry, keyed from the server secret, so every node verifies every other's).
//! - Objects are deleted by the `events` worker on `media.deleted` / `user.deleted`, never
//!   inline: a failure to delete is retried, and a request never waits for it.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::Semaphore;

use self::workers::ImageWorkers;

use crate::domain::{ChatId, EventId, Message, MessageId, MessageKind, OutboxEntry, UserId, now};
use crate::ports::blob::{BlobError, BlobKey, BlobMeta, BlobStore, BlobStream};
use crate::ports::broker::queues;
use crate::ports::cache::{Cache, RateLimit, keys};
use crate::services::auth::crypto::Keyed;
use crate::services::chats::{ChatError, ChatService, Draft, Sent};

pub mod image;
mod workers;

pub use image::{Format, ImageLimits, Processed};

/// The event that asks the `events` worker to delete objects (`{"keys": [..]}`).
pub const MEDIA_DELETED: &str = "media.deleted";

#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    #[error("The file is not an image we accept (JPEG, PNG, WebP or GIF).")]
    Unsupported,
    #[error("The file is larger than {max} bytes.")]
    TooLarge { max: usize },
    #[error("The image has more pixels than allowed.")]
    TooManyPixels,
    #[error("The image cannot be read.")]
    Corrupt,
    /// Processing took longer than allowed (the server is busy, or the image is unusual).
    #[error("The image took too long to process; try again later.")]
    TimedOut,
    /// The user's uploads per minute are used up.
    #[error("Too many uploads; try again later.")]
    RateLimited { retry_after: Duration },
    #[error("media storage failed")]
    Blob(#[from] BlobError),
    #[error(transparent)]
    Chat(#[from] ChatError),
}

/// Who may see an object, from its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// An image of this chat: its members.
    Chat(ChatId),
    /// An avatar: anyone signed in.
    Avatar,
    /// A generated image (`generations/{user}/…`): that user.
    User(UserId),
}

impl Owner {
    /// `None` for a key that is not one of ours (nobody may fetch it).
    pub fn of(key: &BlobKey) -> Option<Self> {
        let mut segments = key.as_str().split('/');
        match (segments.next(), segments.next()) {
            (Some("chats"), Some(chat)) => chat
                .parse::<uuid::Uuid>()
                .ok()
                .map(|id| Self::Chat(ChatId(id))),
            (Some("avatars"), Some(user)) => user.parse::<uuid::Uuid>().ok().map(|_| Self::Avatar),
            (Some("generations"), Some(user)) => user
                .parse::<uuid::Uuid>()
                .ok()
                .map(|id| Self::User(UserId(id))),
            _ => None,
        }
    }
}

/// The thumbnail beside an image: `…/image.jpg` → `…/w256.jpg`.
pub fn thumbnail_key(key: &BlobKey) -> Option<BlobKey> {
    let (dir, name) = key.as_str().rsplit_once('/')?;
    let ext = name.strip_prefix("image.")?;
    BlobKey::parse(&format!("{dir}/w256.{ext}")).ok()
}

/// A stored image: what a message's `image` field keeps.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredImage {
    pub key: String,
    pub thumbnail_key: String,
    pub width: u32,
    pub height: u32,
    pub content_type: String,
    pub size: u64,
}

impl StoredImage {
    pub fn from_message(message: &Message) -> Option<Self> {
        serde_json::from_value(message.image.clone()?).ok()
    }

    pub fn keys(&self) -> Vec<String> {
        vec![self.key.clone(), self.thumbnail_key.clone()]
    }
}

/// An image's signed URLs, for a client allowed to see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageUrls {
    pub url: String,
    pub thumbnail_url: String,
    pub width: u32,
    pub height: u32,
    pub content_type: String,
}

/// What the media service is set up with.
#[derive(Debug, Clone)]
pub struct MediaSettings {
    pub limits: ImageLimits,
    /// How long a handed-out URL works (SPEC: 1 hour).
    pub url_ttl: Duration,
    /// Where our own media URLs point: `{base}/{key}?exp=…&sig=…` (e.g. `/api/v1/media`).
    pub url_base: String,
    /// Images decoded at once (each may take a core for a while).
    pub concurrent: usize,
    /// The longest one image may take to decode and encode.
    pub process_timeout: Duration,
    /// Uploads (image messages and avatars together) a user may make per minute.
    pub uploads_per_minute: u32,
}

/// An object to serve: its bytes as a stream.
pub struct Object {
    pub bytes: BlobStream,
    pub meta: BlobMeta,
    pub content_type: &'static str,
}

pub struct MediaService {
    blobs: Arc<dyn BlobStore>,
    /// Per-user upload limits.
    cache: Arc<dyn Cache>,
    keyed: Keyed,
    settings: MediaSettings,
    /// The threads that decode and encode images.
    workers: ImageWorkers,
    /// Uploads being received or processed: each may hold up to `max_bytes` in memory.
    in_flight: Arc<Semaphore>,
}

/// Uploads a node holds at once, per image it may decode at once.
const IN_FLIGHT_PER_PERMIT: usize = 8;

/// Our URLs expire on a 5-minute grid, so the same object listed twice in a while has the
/// same URL (a browser's cache keeps working).
const EXPIRY_GRID_SECS: i64 = 300;

impl MediaService {
    /// `secret`: the server secret (`auth.jwt_secret`), which every node shares.
    pub fn new(
        blobs: Arc<dyn BlobStore>,
        cache: Arc<dyn Cache>,
        secret: &[u8],
        settings: MediaSettings,
    ) -> Self {
        Self {
            blobs,
            cache,
            keyed: Keyed::new(secret),
            workers: ImageWorkers::start(
                settings.concurrent,
                settings.concurrent.max(1) * IN_FLIGHT_PER_PERMIT,
            ),
            in_flight: Arc::new(Semaphore::new(
                settings.concurrent.max(1) * IN_FLIGHT_PER_PERMIT,
            )),
            settings,
        }
    }

    pub fn limits(&self) -> &ImageLimits {
        &self.settings.limits
    }

    /// Counts an upload of `who` against `uploads_per_minute` (GCRA: all at once, then evenly
    /// refilled); a cache outage is the fail-soft wrapper's call.
    pub async fn limit_uploads(&self, who: UserId) -> Result<(), MediaError> {
        let key = keys::rate(&format!("user:{who}"), "upload");
        let rate = RateLimit::per_minute(self.settings.uploads_per_minute);
        match self.cache.rate_limit(&key, rate).await {
            Ok(decision) if !decision.allowed => Err(MediaError::RateLimited {
                retry_after: decision.retry_after,
            }),
            Ok(_) | Err(_) => Ok(()),
        }
    }

    /// Room for one more upload (hold it while reading and processing the upload), or
    /// `None` when the node holds as many as it will: memory stays bounded however many
    /// clients upload at once; the caller answers "busy, retry".
    pub fn admit(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.in_flight.clone().try_acquire_owned().ok()
    }

    /// Processes an upload on an image worker (within the deadline) and stores the image and
    /// its thumbnail under `dir`.
    pub async fn store_image(&self, dir: &str, upload: Vec<u8>) -> Result<StoredImage, MediaError> {
        // Cheap refusals before waiting for a worker.
        if Format::sniff(&upload).is_none() {
            return Err(MediaError::Unsupported);
        }
        let limits = self.settings.limits;
        let deadline = std::time::Instant::now() + self.settings.process_timeout;
        let work = self
            .workers
            .run(move || image::process(&upload, &limits, Some(deadline)));
        // A decoder cannot be interrupted: past the deadline the answer goes at once, and the
        // work stops at its next stage (a job still waiting for a worker does not start).
        let processed = match tokio::time::timeout(self.settings.process_timeout, work).await {
            Ok(done) => done??,
            Err(_) => return Err(MediaError::TimedOut),
        };
        let ext = processed.image.format.extension();
        let key = BlobKey::parse(&format!("{dir}/image.{ext}"))?;
        let thumb = thumbnail_key(&key).ok_or_else(|| BlobError::InvalidKey(key.to_string()))?;
        let stored = StoredImage {
            key: key.to_string(),
            thumbnail_key: thumb.to_string(),
            width: processed.image.width,
            height: processed.image.height,
            content_type: processed.image.format.content_type().to_owned(),
            size: processed.image.bytes.len() as u64,
        };
        // The thumbnail first: an image without its thumbnail is never visible.
        self.blobs.put(&thumb, processed.thumbnail.bytes).await?;
        if let Err(error) = self.blobs.put(&key, processed.image.bytes).await {
            let _ = self.blobs.delete(&thumb).await;
            return Err(error.into());
        }
        Ok(stored)
    }

    /// Deletes objects now (the `events` worker; and uploads that lost a race). A missing one
    /// is not an error.
    pub async fn delete(&self, keys: &[String]) -> Result<(), MediaError> {
        for key in keys {
            if let Ok(key) = BlobKey::parse(key) {
                self.blobs.delete(&key).await?;
            }
        }
        Ok(())
    }

    fn signature(&self, key: &str, expires: i64) -> String {
        self.keyed.media_signature(key, expires)
    }

    /// A URL for `key` that works until about `url_ttl` from now.
    pub async fn url(&self, key: &str) -> Result<String, MediaError> {
        let key = BlobKey::parse(key)?;
        if let Some(url) = self
            .blobs
            .presigned_get(&key, self.settings.url_ttl)
            .await?
        {
            return Ok(url);
        }
        Ok(self.own_url(&key))
    }

    /// Our own signed URL for `key` (the local shape's; on S3 it works too, through us).
    pub fn own_url(&self, key: &BlobKey) -> String {
        let ttl = i64::try_from(self.settings.url_ttl.as_secs()).unwrap_or(i64::MAX / 4);
        let until = now().timestamp().saturating_add(ttl);
        self.signed_url(
            key,
            until - until.rem_euclid(EXPIRY_GRID_SECS) + EXPIRY_GRID_SECS,
        )
    }

    /// Our URL for `key`, signed until `expires` (Unix seconds).
    pub fn signed_url(&self, key: &BlobKey, expires: i64) -> String {
        format!(
            "{}/{key}?exp={expires}&sig={}",
            self.settings.url_base,
            self.signature(key.as_str(), expires)
        )
    }

    /// Whether `sig` is ours for `key` until `expires`, which has not passed.
    pub fn verify(&self, key: &BlobKey, expires: i64, sig: &str) -> bool {
        expires >= now().timestamp()
            && crate::services::auth::crypto::same(&self.signature(key.as_str(), expires), sig)
    }

    /// The URLs of a message's image, if it has one (a tombstone has none).
    pub async fn image_urls(&self, message: &Message) -> Option<ImageUrls> {
        if message.deleted_at.is_some() {
            return None;
        }
        let stored = StoredImage::from_message(message)?;
        let (url, thumbnail_url) = match (
            self.url(&stored.key).await,
            self.url(&stored.thumbnail_key).await,
        ) {
            (Ok(url), Ok(thumb)) => (url, thumb),
            (Err(error), _) | (_, Err(error)) => {
                tracing::warn!(%error, "Cannot make an image URL.");
                return None;
            }
        };
        Some(ImageUrls {
            url,
            thumbnail_url,
            width: stored.width,
            height: stored.height,
            content_type: stored.content_type,
        })
    }

    /// The avatar URL for an avatar key (none when it cannot be made).
    pub async fn avatar_url(&self, key: Option<&str>) -> Option<String> {
        match self.url(key?).await {
            Ok(url) => Some(url),
            Err(error) => {
                tracing::warn!(%error, "Cannot make an avatar URL.");
                None
            }
        }
    }

    /// The key to serve for `key` (its thumbnail's with `thumbnail`), and its content type;
    /// `None` for a key that is not an image of ours.
    fn variant(key: &BlobKey, thumbnail: bool) -> Option<(BlobKey, &'static str)> {
        let key = if thumbnail {
            thumbnail_key(key)?
        } else {
            key.clone()
        };
        let content_type = key.media_type()?;
        Some((key, content_type))
    }

    /// What is stored for the object (or its thumbnail): enough to answer a conditional GET.
    pub async fn head(
        &self,
        key: &BlobKey,
        thumbnail: bool,
    ) -> Result<Option<BlobMeta>, MediaError> {
        let Some((key, _)) = Self::variant(key, thumbnail) else {
            return Ok(None);
        };
        Ok(self.blobs.head(&key).await?)
    }

    /// The object (or its thumbnail) as a stream, once the caller is known to be allowed.
    pub async fn open(&self, key: &BlobKey, thumbnail: bool) -> Result<Option<Object>, MediaError> {
        let Some((key, content_type)) = Self::variant(key, thumbnail) else {
            return Ok(None);
        };
        Ok(self
            .blobs
            .get_stream(&key)
            .await?
            .map(|(bytes, meta)| Object {
                bytes,
                meta,
                content_type,
            }))
    }

    /// `POST /chats/{id}/messages/image`: a member's image (with an optional caption) becomes
    /// a message, idempotent by `client_id` like text. Non-members get `NotFound` before the
    /// upload is even looked at; a retry of a stored one is answered without processing it
    /// again; an upload that loses a race to its own retry is deleted.
    pub async fn send_image(
        &self,
        chats: &ChatService,
        who: UserId,
        chat: ChatId,
        upload: Vec<u8>,
        caption: Option<&str>,
        client_id: Option<&str>,
    ) -> Result<Sent, MediaError> {
        let caption = match caption.map(str::trim) {
            None | Some("") => None,
            Some(text) => Some(crate::services::chats::check_text(text)?),
        };
        let client_id = client_id
            .map(crate::services::chats::check_client_id)
            .transpose()?;
        if let Some(sent) = chats.admit_upload(who, chat, client_id.as_deref()).await? {
            return Ok(sent);
        }
        let id = MessageId::new();
        let stored = self
            .store_image(&format!("chats/{chat}/{id}"), upload)
            .await?;
        let draft = Draft {
            id,
            kind: MessageKind::Image,
            text: caption,
            image: Some(json!(stored)),
        };
        match chats.append_draft(who, chat, draft, client_id).await {
            Ok(sent) if sent.created => Ok(sent),
            other => {
                // A duplicate or a refusal: our objects are not referenced by anything.
                if let Err(error) = self.delete(&stored.keys()).await {
                    tracing::warn!(%error, "Cannot delete an unused upload.");
                }
                Ok(other?)
            }
        }
    }

    /// The `events` worker's part: `media.deleted` deletes the keys it names; `user.deleted`
    /// every avatar the account has under `avatars/{user}/` (also one set while the account
    /// was being deleted). Deleting what is gone is fine, so a redelivery is harmless.
    pub async fn on_event(
        &self,
        kind: &str,
        payload: &serde_json::Value,
    ) -> Result<(), MediaError> {
        match kind {
            MEDIA_DELETED => {
                let keys: Vec<String> = payload["keys"]
                    .as_array()
                    .map(|keys| {
                        keys.iter()
                            .filter_map(|k| k.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default();
                self.delete(&keys).await
            }
            "user.deleted" => {
                let Some(user) = payload["userId"]
                    .as_str()
                    .and_then(|id| id.parse::<uuid::Uuid>().ok())
                else {
                    return Ok(());
                };
                let prefix = BlobKey::parse(&format!("avatars/{user}"))?;
                let keys: Vec<String> = self
                    .blobs
                    .list(&prefix)
                    .await?
                    .into_iter()
                    .map(|meta| meta.key.to_string())
                    .collect();
                self.delete(&keys).await
            }
            _ => Ok(()),
        }
    }

    /// Stores a new avatar for `who` (under a fresh key: old URLs never show the new picture,
    /// and caches need no invalidation); returns its key for the account.
    pub async fn store_avatar(
        &self,
        who: UserId,
        upload: Vec<u8>,
    ) -> Result<StoredImage, MediaError> {
        self.store_image(&format!("avatars/{who}/{}", uuid::Uuid::now_v7()), upload)
            .await
    }
}

/// The `media.deleted` event for these keys.
pub fn deleted_event(keys: &[String]) -> OutboxEntry {
    OutboxEntry {
        id: EventId::new(),
        queue: queues::EVENTS.into(),
        kind: MEDIA_DELETED.into(),
        payload: json!({ "keys": keys }),
        trace_id: None,
        created_at: now(),
    }
}

/// Whether an event of `kind` asks for objects to be deleted (`on_event` does it).
pub fn deletes_media(kind: &str) -> bool {
    matches!(kind, MEDIA_DELETED | "user.deleted")
}

/// An avatar's key and its thumbnail's.
pub fn avatar_keys(key: Option<&str>) -> Vec<String> {
    let Some(key) = key.and_then(|k| BlobKey::parse(k).ok()) else {
        return Vec::new();
    };
    let mut keys = vec![key.to_string()];
    keys.extend(thumbnail_key(&key).map(|k| k.to_string()));
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_say_who_may_see_them() {
        let chat = ChatId::new();
        let key =
            BlobKey::parse(&format!("chats/{chat}/{}/image.jpg", MessageId::new())).expect("a key");
        assert_eq!(Owner::of(&key), Some(Owner::Chat(chat)));
        assert_eq!(
            thumbnail_key(&key).map(|k| k.to_string()),
            Some(key.as_str().replace("image.jpg", "w256.jpg"))
        );
        let avatar =
            BlobKey::parse(&format!("avatars/{}/x/image.png", UserId::new())).expect("a key");
        assert_eq!(Owner::of(&avatar), Some(Owner::Avatar));
        for other in ["chats/not-a-uuid/x/image.jpg", "secrets/x", "avatars"] {
            let key = BlobKey::parse(other).expect("a key");
            assert_eq!(Owner::of(&key), None, "{other}");
        }
        assert_eq!(avatar_keys(Some(avatar.as_str())).len(), 2);
        assert!(avatar_keys(Some("../x")).is_empty());
    }
}
