//! Building and running the application: bind, wire, serve, and shut down gracefully.

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::Router;
use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::cli::Role;
use confab_adapters::metered_broker::MeteredBroker;
use confab_adapters::sql_store::{DatabaseConfig, SqlStore};
use confab_core::ports::blob::BlobStore;
use confab_core::ports::broker::Broker;
use confab_core::ports::cache::Cache;
use confab_core::ports::mailer::Mailer;
use confab_core::ports::store::Store;

use crate::config::Config;
use crate::health::Components;
use crate::state::AppState;

/// One implementation per port, as the configuration chose them.
#[derive(Clone)]
pub struct Ports {
    pub store: Arc<dyn Store>,
    pub broker: Arc<dyn Broker>,
    /// The same broker, for what only the metered wrapper offers (depth gauges).
    pub metered_broker: Arc<MeteredBroker>,
    pub cache: Arc<dyn Cache>,
    pub blobs: Arc<dyn BlobStore>,
    pub mailer: Arc<dyn Mailer>,
    /// The AI provider chain; `None` with no provider configured.
    pub ai: Option<Arc<confab_core::services::ai::chain::Chain>>,
}

impl Ports {
    /// Builds every port from `config`. The database must be reachable (fail fast: nothing
    /// works without it) and is migrated; the cache may be down and connects in the
    /// background.
    pub async fn build(config: &Config) -> anyhow::Result<Self> {
        let target = config.database.describe(&config.server.data_dir);
        let store = SqlStore::connect(&config.database, &config.server.data_dir)
            .await
            .with_context(|| format!("cannot connect to the database {target}"))?;
        let applied = store
            .migrate()
            .await
            .with_context(|| format!("cannot migrate the database {target}"))?;
        if !applied.is_empty() {
            tracing::info!(migrations = %applied.join(","), "Migrated the database.");
        }
        let metered_broker = confab_adapters::broker::build(&config.queue, &store)
            .await
            .with_context(|| format!("cannot connect to the queue {}", queue_target(config)))?;
        let cache = confab_adapters::cache::build(&config.cache, config.rate_limit.fail_open)
            .context("while setting up the cache (cache.url)")?;
        let blobs = confab_adapters::blob::build(&config.media, &config.server.data_dir)
            .context("while setting up media storage ([media])")?;
        let mailer = confab_adapters::mail::build(&config.mail, &config.server.data_dir)
            .context("while setting up mail ([mail])")?;
        Ok(Self {
            store: Arc::new(store),
            broker: metered_broker.clone(),
            metered_broker,
            cache,
            blobs,
            mailer,
            ai: config.ai.chain()?.map(Arc::new),
        })
    }
}

/// Where the queue is, safe to print.
fn queue_target(config: &Config) -> String {
    match &config.queue {
        confab_adapters::broker::QueueConfig::Database { .. } => "in the database".to_owned(),
        confab_adapters::broker::QueueConfig::Rabbitmq { url, .. } => url.redacted(),
    }
}

/// What a caller (a test, a benchmark) may put in place of the defaults.
#[derive(Default)]
pub struct Overrides {
    /// Routes merged into the router unchanged (e.g. a handler that panics or takes long).
    pub routes: Router<AppState>,
    /// The component table, instead of the one the configuration implies.
    pub components: Option<Components>,
}

/// A built, bound application. Tests build it on port 0 and read [`Application::port`].
pub struct Application {
    listener: TcpListener,
    router: Router,
    state: AppState,
    depths: Arc<MeteredBroker>,
    role: Role,
}

impl Application {
    pub async fn build(config: Config, role: Role) -> anyhow::Result<Self> {
        Self::build_with(config, role, Overrides::default()).await
    }

    /// Like [`Application::build`], with some parts replaced.
    pub async fn build_with(
        config: Config,
        role: Role,
        overrides: Overrides,
    ) -> anyhow::Result<Self> {
        let listen = config.server.listen;
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("while binding {listen} (server.listen)"))?;
        let ports = Ports::build(&config).await?;
        let depths = ports.metered_broker.clone();
        let secret = config
            .auth
            .jwt_secret
            .as_ref()
            .context("auth.jwt_secret is resolved before the application is built")?
            .expose()
            .as_bytes();
        let presence = confab_core::services::presence::Presence::new(
            ports.cache.clone(),
            Duration::from_secs(config.chat.presence_window_secs),
        );
        let auth = Arc::new(confab_core::services::auth::AuthService::new(
            ports.store.clone(),
            ports.cache.clone(),
            config.auth.settings(),
            config.auth.passwords()?,
            config.auth.access_tokens()?,
            secret,
            presence.clone(),
        ));
        let media = Arc::new(confab_core::services::media::MediaService::new(
            ports.blobs.clone(),
            ports.cache.clone(),
            secret,
            config.uploads.settings(),
        ));
        let chats = Arc::new(confab_core::services::chats::ChatService::new(
            ports.store.clone(),
            ports.cache.clone(),
            confab_core::ports::cache::RateLimit::per_second(config.chat.messages_per_second),
            confab_core::services::chats::GroupCommit {
                wait: Duration::from_millis(config.chat.group_commit_wait_ms),
                // SQLite's writer thread commits batches in the order they come and gathers
                // those waiting into one commit; PostgreSQL runs concurrent transactions.
                in_flight: match config.database {
                    DatabaseConfig::Sqlite { .. } => 4,
                    DatabaseConfig::Postgres { .. } => 1,
                },
            },
            presence,
        ));
        let ai_slot = Arc::new(std::sync::OnceLock::new());
        let (socket_io, io) = crate::realtime::build(crate::realtime::Realtime {
            auth: auth.clone(),
            chats: chats.clone(),
            cache: ports.cache.clone(),
            ai: ai_slot.clone(),
            clustered: !matches!(
                config.cache,
                confab_adapters::cache::CacheConfig::Memory { .. }
            ),
        })
        .await?;
        let relay_wake = Arc::new(tokio::sync::Notify::new());
        let ai = crate::ai::service(&config, &ports, &io, &chats, &relay_wake);
        let _ = ai_slot.set(ai.clone());
        // Lives as long as the chat service's writer.
        crate::realtime::spawn_broadcaster(io.clone(), &chats, media.clone());
        let state = AppState {
            ai,
            relay_wake,
            auth,
            chats,
            media,
            io,
            components: Arc::new(
                overrides
                    .components
                    .unwrap_or_else(|| Components::for_ports(&config, &ports)),
            ),
            store: ports.store,
            broker: ports.broker,
            cache: ports.cache,
            blobs: ports.blobs,
            mailer: ports.mailer,
            templates: Arc::new(
                crate::mail::Templates::load(
                    config.server.mail_templates_dir.as_deref(),
                    &config.server.app_url,
                )
                .context("while loading the mail templates (server.mail_templates_dir)")?,
            ),
            config: Arc::new(config),
            metrics: crate::metrics::handle(),
            started_at: Instant::now(),
            shutdown: CancellationToken::new(),
        };
        let router = crate::http::router(state.clone(), role, overrides.routes, socket_io);
        Ok(Self {
            listener,
            router,
            state,
            depths,
            role,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound TCP listener has an address")
    }

    pub fn port(&self) -> u16 {
        self.local_addr().port()
    }

    /// What the handlers see.
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Cancelling this token starts a graceful shutdown.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.state.shutdown.clone()
    }

    /// Serves until the shutdown token is cancelled; then stops accepting, lets in-flight
    /// requests finish for up to `server.shutdown_timeout_secs`, and returns.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let token = self.state.shutdown.clone();
        let deadline = Duration::from_secs(self.state.config.server.shutdown_timeout_secs);
        // Without TCP_NODELAY small realtime frames wait for Nagle (DEPENDENCIES.md).
        let listener = self.listener.tap_io(|tcp| {
            if let Err(error) = tcp.set_nodelay(true) {
                tracing::warn!(%error, "Could not set TCP_NODELAY.");
            }
        });
        let server = axum::serve(
            listener,
            self.router
                .into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(token.clone().cancelled_owned());
        let mut server = tokio::spawn(server.into_future());
        // Background work stops with the same token and is waited for (in-flight work drains).
        // SPEC §1 roles: an api node serves and stores answers; a worker consumes the work
        // queues and runs the scheduled jobs; `all` does both. Every node relays its outbox.
        let (api, worker) = (self.role != Role::Worker, self.role != Role::Api);
        let mut workers = vec![
            crate::metrics::spawn_upkeep(self.state.metrics.clone(), token.clone()),
            crate::workers::spawn_depth_gauges(self.depths.clone(), token.clone()),
            crate::workers::spawn_outbox_relay(
                self.state.store.clone(),
                self.state.broker.clone(),
                self.state.relay_wake.clone(),
                token.clone(),
            ),
            crate::ai::spawn_circuit_gauges(self.state.clone(), token.clone()),
        ];
        if worker {
            workers.extend([
                crate::workers::spawn_mail_worker(self.state.clone(), token.clone()),
                crate::workers::spawn_events_worker(self.state.clone(), token.clone()),
                crate::jobs::spawn_scheduler(self.state.clone(), token.clone()),
                crate::ai::spawn_request_worker(self.state.clone(), token.clone()),
            ]);
        }
        if api {
            workers.extend([
                crate::realtime::spawn_presence(
                    self.state.io.clone(),
                    self.state.cache.clone(),
                    token.clone(),
                ),
                crate::ai::spawn_response_consumer(self.state.clone(), token.clone()),
            ]);
        }

        // Biased: once the token is cancelled the server may finish in the same poll, and the
        // shutdown path (with its log lines) must still be the one taken.
        tokio::select! {
            biased;
            () = token.cancelled() => {}
            result = &mut server => {
                return result.context("the HTTP server task failed")?.context("while serving HTTP");
            }
        }
        tracing::info!(
            deadline_secs = deadline.as_secs(),
            "Shutting down: no new connections; waiting for in-flight requests and workers."
        );
        let stop_by = tokio::time::Instant::now() + deadline;
        let http_result = if let Ok(result) = tokio::time::timeout_at(stop_by, &mut server).await {
            result
                .context("the HTTP server task failed")?
                .context("while serving HTTP")
        } else {
            // Connections already accepted run on their own tasks; they end when the process
            // does, which `main` does as soon as this returns.
            server.abort();
            tracing::warn!("Shutdown deadline passed; closing the remaining connections.");
            Ok(())
        };
        let drained = tokio::time::timeout_at(stop_by, async {
            for worker in workers {
                let _ = worker.await;
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!("Shutdown deadline passed; background work is cut off.");
        }
        http_result?;
        tracing::info!("Stopped.");
        Ok(())
    }
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    let interrupt = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "Cannot listen for SIGINT.");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "Cannot listen for SIGTERM.");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {}
        () = terminate => {}
    }
}
