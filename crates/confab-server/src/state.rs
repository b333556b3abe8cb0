//! `AppState`: what every handler can reach. Cheap to clone; no globals behind it.

use std::sync::Arc;
use std::time::Instant;

use confab_core::ports::blob::BlobStore;
use confab_core::ports::broker::Broker;
use confab_core::ports::cache::Cache;
use confab_core::ports::mailer::Mailer;
use confab_core::ports::store::Store;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::health::Components;

#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub components: Arc<Components>,
    pub store: Arc<dyn Store>,
    pub broker: Arc<dyn Broker>,
    pub cache: Arc<dyn Cache>,
    pub blobs: Arc<dyn BlobStore>,
    pub mailer: Arc<dyn Mailer>,
    pub templates: Arc<crate::mail::Templates>,
    /// Accounts and sign-in.
    pub auth: Arc<confab_core::services::auth::AuthService>,
    /// Chats between people.
    pub chats: Arc<confab_core::services::chats::ChatService>,
    /// The AI assistant (answers 503 everywhere when no provider is configured).
    pub ai: Arc<confab_core::services::ai::AiService>,
    /// Wakes the outbox relay when something was just committed for it.
    pub relay_wake: Arc<tokio::sync::Notify>,
    /// Image uploads, media URLs and serving.
    pub media: Arc<confab_core::services::media::MediaService>,
    /// Socket.IO: emits to rooms from anywhere (a message sent over REST is broadcast too).
    pub io: crate::realtime::Io,
    pub metrics: PrometheusHandle,
    pub started_at: Instant,
    /// Cancelled when the process begins to shut down; `/ready` then answers 503.
    pub shutdown: CancellationToken,
}
