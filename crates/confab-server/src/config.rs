//! Configuration (SPEC §2): typed settings, loaded once at startup and passed down.
//!
//! Layers, later wins: the defaults in this file (documented key by key in
//! `config/default.toml`) < `confab.toml` or `--config FILE` (with `${VAR}` substituted from
//! the environment) < the SPEC's environment aliases (`DATABASE_URL`, `PORT` …) <
//! `CONFAB__SECTION__KEY`. Unknown keys are errors. Each backend section is a `kind`-tagged
//! enum; its factory (in confab-adapters) matches on it.
//!
//! Every failure is one [`ConfigError`]: the setting, what is wrong, and how to fix it.

pub mod env;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::providers::{Format, Serialized, Toml};
use figment::value::{Dict, Map};
use figment::{Figment, Metadata, Profile, Provider};
use serde::{Deserialize, Deserializer, Serialize};

pub use confab_adapters::blob::MediaConfig;
pub use confab_adapters::broker::QueueConfig;
pub use confab_adapters::cache::CacheConfig;
pub use confab_adapters::mail::MailConfig;
pub use confab_adapters::sql_store::{DatabaseConfig, PoolConfig, Synchronous};
pub use confab_core::settings::{Secret, SecretUrl};
pub use env::Env;

/// The file read when `--config` is not given, if it exists.
pub const DEFAULT_FILE: &str = "confab.toml";

/// A setting that is wrong: printed as one line by the binary, which then exits with 2.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{setting}: {problem}. Fix: {fix}")]
pub struct ConfigError {
    pub setting: String,
    pub problem: String,
    pub fix: String,
}

impl ConfigError {
    pub fn new(
        setting: impl Into<String>,
        problem: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self {
            setting: setting.into(),
            problem: problem.into(),
            fix: fix.into(),
        }
    }

    /// An error whose fix is "set it to <what>", naming where it can be set.
    pub(crate) fn invalid(setting: &str, problem: impl Into<String>, wanted: &str) -> Self {
        Self::new(
            setting,
            problem,
            format!(
                "set {setting} to {wanted} in the config file or with {}",
                env::how_to_set(setting)
            ),
        )
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub log: LogConfig,
    pub auth: AuthConfig,
    pub database: DatabaseConfig,
    pub cache: CacheConfig,
    pub rate_limit: RateLimitConfig,
    pub chat: ChatConfig,
    pub queue: QueueConfig,
    pub media: MediaConfig,
    pub uploads: UploadsConfig,
    pub mail: MailConfig,
    pub ai: AiConfig,
    pub telemetry: TelemetryConfig,
}

/// Where confab runs; everything but `development` is treated as production-like
/// (JSON logs, HSTS, a JWT secret must be given, no default CORS origins).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Environment {
    #[default]
    Development,
    Test,
    Staging,
    Production,
}

impl Environment {
    pub const fn is_development(self) -> bool {
        matches!(self, Self::Development)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address the HTTP and Socket.IO listener binds.
    pub listen: SocketAddr,
    pub environment: Environment,
    /// Where the embedded backends keep their files.
    pub data_dir: PathBuf,
    /// The public URL of the product, used for links in mail.
    pub app_url: String,
    /// Allowed CORS origins; unset means `http://localhost:*` and `http://127.0.0.1:*` in
    /// development and none elsewhere. An entry may end in `:*` for any port.
    #[serde(deserialize_with = "list_or_comma_string")]
    pub cors_origins: Option<Vec<String>>,
    /// A request that has not produced a response by then gets 504 `TIMEOUT_ERROR`.
    pub request_timeout_secs: u64,
    /// On SIGTERM/SIGINT, in-flight requests get this long to finish.
    pub shutdown_timeout_secs: u64,
    /// The largest JSON request body accepted.
    pub json_body_limit_bytes: usize,
    /// A folder whose files replace the built-in mail templates of the same name.
    pub mail_templates_dir: Option<PathBuf>,
    /// A header your reverse proxy sets to the client's address (e.g. `x-forwarded-for`; its
    /// last address is used). Unset: the TCP peer's address. Only set it behind a proxy that
    /// overwrites or appends to it, or clients can pick their own address for rate limits.
    pub client_ip_header: Option<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            environment: Environment::Development,
            data_dir: PathBuf::from("./confab-data"),
            app_url: "http://localhost:8080".into(),
            cors_origins: None,
            request_timeout_secs: 30,
            shutdown_timeout_secs: 10,
            json_body_limit_bytes: 1024 * 1024,
            mail_templates_dir: None,
            client_ip_header: None,
        }
    }
}

impl ServerConfig {
    /// The CORS allow-list in force, with the environment's default applied.
    /// Entries are normalised as a browser sends them (`https://App.example.com:443` →
    /// `https://app.example.com`).
    pub fn effective_cors_origins(&self) -> Vec<String> {
        match &self.cors_origins {
            Some(list) => list.iter().map(|entry| normalise_origin(entry)).collect(),
            None if self.environment.is_development() => {
                vec!["http://localhost:*".into(), "http://127.0.0.1:*".into()]
            }
            None => Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Pretty in development, JSON lines elsewhere.
    #[default]
    Auto,
    Json,
    Pretty,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A tracing filter: `info`, or `info,confab_server=debug`. `RUST_LOG` overrides it.
    pub level: String,
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Auto,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Signs access tokens (HS256) and keys the hashes of one-time codes. Generated once into
    /// the data dir in development; required (at least 32 characters) everywhere else.
    pub jwt_secret: Option<Secret>,
    /// `HS256` (the secret), `RS256` or `EdDSA` (a key pair: `jwt_private_key_file`; the
    /// public key is then served at `/.well-known/jwks.json`).
    pub jwt_algorithm: JwtAlgorithm,
    /// A PEM private key (PKCS#8; PKCS#1 also for RSA) for RS256/EdDSA.
    pub jwt_private_key_file: Option<PathBuf>,
    pub access_token_ttl_secs: u64,
    pub refresh_token_ttl_days: u64,
    /// After a refresh, the old refresh token still returns the same new pair for this long
    /// (two tabs refreshing at once); after it, presenting it revokes the whole sign-in.
    pub refresh_grace_secs: u64,
    /// Clock skew allowed when checking a token's expiry.
    pub clock_leeway_secs: u64,
    /// argon2id cost (OWASP's minimum: 19456 KiB, 2 iterations, 1 lane).
    pub argon2_memory_kib: u32,
    pub argon2_iterations: u32,
    pub argon2_parallelism: u32,
    pub verify_email_ttl_hours: u64,
    pub password_reset_ttl_secs: u64,
    pub otp_ttl_secs: u64,
    pub otp_max_attempts: u32,
    /// Whether a one-time code may create an account (passwordless sign-up).
    pub otp_signup: bool,
    /// Failed logins within `lockout_window_secs` (of the first) that lock the account.
    pub lockout_threshold: u32,
    pub lockout_window_secs: u64,
    pub lockout_duration_secs: u64,
    /// Requests per minute to the auth endpoints, per client IP and per email address.
    pub rate_limit_per_ip_per_minute: u32,
    pub rate_limit_per_email_per_minute: u32,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            jwt_secret: None,
            jwt_algorithm: JwtAlgorithm::Hs256,
            jwt_private_key_file: None,
            access_token_ttl_secs: 900,
            refresh_token_ttl_days: 30,
            refresh_grace_secs: 10,
            clock_leeway_secs: 30,
            argon2_memory_kib: 19_456,
            argon2_iterations: 2,
            argon2_parallelism: 1,
            verify_email_ttl_hours: 24,
            password_reset_ttl_secs: 3600,
            otp_ttl_secs: 600,
            otp_max_attempts: 5,
            otp_signup: true,
            lockout_threshold: 5,
            lockout_window_secs: 900,
            lockout_duration_secs: 900,
            rate_limit_per_ip_per_minute: 5,
            rate_limit_per_email_per_minute: 5,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum JwtAlgorithm {
    #[default]
    #[serde(rename = "HS256")]
    Hs256,
    #[serde(rename = "RS256")]
    Rs256,
    #[serde(rename = "EdDSA")]
    EdDsa,
}

impl AuthConfig {
    /// The rules the auth service applies.
    pub fn settings(&self) -> confab_core::services::auth::AuthSettings {
        use confab_core::ports::cache::RateLimit;
        use std::time::Duration;
        let secs = |s: u64| chrono::Duration::seconds(i64::try_from(s).unwrap_or(i64::MAX / 1000));
        confab_core::services::auth::AuthSettings {
            access_ttl: Duration::from_secs(self.access_token_ttl_secs),
            refresh_ttl: Duration::from_hours(24 * self.refresh_token_ttl_days),
            refresh_grace: Duration::from_secs(self.refresh_grace_secs),
            leeway: Duration::from_secs(self.clock_leeway_secs),
            verify_email_ttl: Duration::from_hours(self.verify_email_ttl_hours),
            reset_ttl: Duration::from_secs(self.password_reset_ttl_secs),
            otp_ttl: Duration::from_secs(self.otp_ttl_secs),
            otp_max_attempts: i32::try_from(self.otp_max_attempts).unwrap_or(i32::MAX),
            otp_signup: self.otp_signup,
            lockout: confab_core::domain::LockoutPolicy {
                threshold: i32::try_from(self.lockout_threshold).unwrap_or(i32::MAX),
                window: secs(self.lockout_window_secs),
                lock_for: secs(self.lockout_duration_secs),
            },
            per_ip: RateLimit::per_minute(self.rate_limit_per_ip_per_minute),
            per_email: RateLimit::per_minute(self.rate_limit_per_email_per_minute),
        }
    }

    /// The password hasher at the configured cost.
    pub fn passwords(&self) -> Result<confab_core::services::auth::crypto::Passwords, ConfigError> {
        confab_core::services::auth::crypto::Passwords::new(
            confab_core::services::auth::crypto::Argon2Cost {
                memory_kib: self.argon2_memory_kib,
                iterations: self.argon2_iterations,
                parallelism: self.argon2_parallelism,
            },
        )
        .map_err(|e| {
            ConfigError::invalid(
                "auth.argon2_memory_kib",
                e.to_string(),
                "memory of at least 8 KiB per lane, and at least 1 iteration and 1 lane",
            )
        })
    }

    /// The access-token signer: the secret (HS256) or the configured key pair. Call after
    /// `resolve_jwt_secret`.
    pub fn access_tokens(
        &self,
    ) -> Result<confab_core::services::auth::jwt::AccessTokens, ConfigError> {
        use confab_core::services::auth::SigningKey;
        let key = match self.jwt_algorithm {
            JwtAlgorithm::Hs256 => SigningKey::Hs256(
                self.jwt_secret
                    .as_ref()
                    .map(|s| s.expose().as_bytes().to_vec())
                    .unwrap_or_default(),
            ),
            JwtAlgorithm::Rs256 | JwtAlgorithm::EdDsa => {
                let Some(path) = &self.jwt_private_key_file else {
                    return Err(ConfigError::invalid(
                        "auth.jwt_private_key_file",
                        format!(
                            "is not set, and {:?} needs a private key",
                            self.jwt_algorithm
                        ),
                        "the path of a PEM private key (e.g. from `openssl genpkey -algorithm ed25519`)",
                    ));
                };
                let pem = std::fs::read(path).map_err(|e| {
                    ConfigError::invalid(
                        "auth.jwt_private_key_file",
                        format!("cannot read {} ({e})", path.display()),
                        "the path of a readable PEM private key",
                    )
                })?;
                if self.jwt_algorithm == JwtAlgorithm::Rs256 {
                    SigningKey::Rs256(pem)
                } else {
                    SigningKey::EdDsa(pem)
                }
            }
        };
        confab_core::services::auth::jwt::AccessTokens::new(
            &key,
            std::time::Duration::from_secs(self.access_token_ttl_secs),
            std::time::Duration::from_secs(self.clock_leeway_secs),
        )
        .map_err(|e| {
            let setting = if self.jwt_algorithm == JwtAlgorithm::Hs256 {
                "auth.jwt_secret"
            } else {
                "auth.jwt_private_key_file"
            };
            ConfigError::invalid(setting, e.to_string(), "a key of the configured algorithm")
        })
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let ranges: [(&str, u64, u64, u64); 13] = [
            (
                "auth.access_token_ttl_secs",
                self.access_token_ttl_secs,
                30,
                86_400,
            ),
            (
                "auth.refresh_token_ttl_days",
                self.refresh_token_ttl_days,
                1,
                365,
            ),
            ("auth.refresh_grace_secs", self.refresh_grace_secs, 0, 300),
            ("auth.clock_leeway_secs", self.clock_leeway_secs, 0, 300),
            (
                "auth.verify_email_ttl_hours",
                self.verify_email_ttl_hours,
                1,
                720,
            ),
            (
                "auth.password_reset_ttl_secs",
                self.password_reset_ttl_secs,
                60,
                86_400,
            ),
            ("auth.otp_ttl_secs", self.otp_ttl_secs, 1, 3600),
            (
                "auth.otp_max_attempts",
                u64::from(self.otp_max_attempts),
                1,
                100,
            ),
            (
                "auth.lockout_threshold",
                u64::from(self.lockout_threshold),
                1,
                1000,
            ),
            (
                "auth.lockout_window_secs",
                self.lockout_window_secs,
                1,
                86_400,
            ),
            (
                "auth.lockout_duration_secs",
                self.lockout_duration_secs,
                1,
                86_400,
            ),
            (
                "auth.rate_limit_per_ip_per_minute",
                u64::from(self.rate_limit_per_ip_per_minute),
                1,
                1_000_000,
            ),
            (
                "auth.rate_limit_per_email_per_minute",
                u64::from(self.rate_limit_per_email_per_minute),
                1,
                1_000_000,
            ),
        ];
        for (setting, value, low, high) in ranges {
            if !(low..=high).contains(&value) {
                return Err(ConfigError::invalid(
                    setting,
                    format!("{value} is outside {low}..={high}"),
                    &format!("a number between {low} and {high}"),
                ));
            }
        }
        self.passwords().map(drop)
    }
}

/// `[chat]`: chats between people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChatConfig {
    /// Messages a user may send per second (REST and Socket.IO together); as many may come at
    /// once. Beyond it: 429 / ack `RATE_LIMITED`.
    pub messages_per_second: u32,
    /// While messages flow, how long the group commit lets a batch gather more after its
    /// first, in milliseconds (0: never wait). Trades a little latency for fewer commits.
    pub group_commit_wait_ms: u64,
    /// How long a user stays online after their last activity or last socket (SPEC §4: 5
    /// minutes); partners hear `presence` offline when it has passed.
    pub presence_window_secs: u64,
}

impl Default for ChatConfig {
    fn default() -> Self {
        Self {
            messages_per_second: 20,
            group_commit_wait_ms: 0,
            presence_window_secs: 300,
        }
    }
}

/// `[uploads]`: what an uploaded image may be, and how media URLs work (SPEC §3 "Media",
/// §11).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UploadsConfig {
    /// The largest upload, in bytes (413 beyond it).
    pub max_bytes: usize,
    /// The most pixels an image may declare (a decompression bomb is refused from its header).
    pub max_pixels: u64,
    /// How long a media URL handed out works.
    pub url_ttl_secs: u64,
    /// Images processed at once on a node (each takes a core while it decodes); 0: half the
    /// cores (at least one), so the rest keep delivering messages.
    pub concurrent: usize,
    /// The longest one image may take to decode, re-encode and thumbnail.
    pub process_timeout_secs: u64,
    /// Uploads a user may make per minute, image messages and avatars together (429 beyond).
    pub per_user_per_minute: u32,
}

impl Default for UploadsConfig {
    fn default() -> Self {
        Self {
            max_bytes: 10 * 1024 * 1024,
            max_pixels: 40_000_000,
            url_ttl_secs: 3600,
            concurrent: 0,
            process_timeout_secs: 20,
            per_user_per_minute: 30,
        }
    }
}

impl UploadsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let checks: [(&'static str, u64, u64, u64, &'static str); 6] = [
            (
                "uploads.per_user_per_minute",
                u64::from(self.per_user_per_minute),
                1,
                10_000,
                "a number of uploads per minute between 1 and 10000",
            ),
            (
                "uploads.max_bytes",
                self.max_bytes as u64,
                1024,
                1 << 30,
                "a number of bytes between 1024 and 1 GiB",
            ),
            (
                "uploads.max_pixels",
                self.max_pixels,
                1,
                1_000_000_000,
                "a number of pixels between 1 and 1000000000",
            ),
            // Presigned S3 URLs live at most 7 days.
            (
                "uploads.url_ttl_secs",
                self.url_ttl_secs,
                60,
                7 * 24 * 3600,
                "a number of seconds between 60 and 604800",
            ),
            (
                "uploads.concurrent",
                self.concurrent as u64,
                0,
                256,
                "a number between 0 (half the cores) and 256",
            ),
            (
                "uploads.process_timeout_secs",
                self.process_timeout_secs,
                1,
                600,
                "a number of seconds between 1 and 600",
            ),
        ];
        for (setting, value, low, high, wanted) in checks {
            if !(low..=high).contains(&value) {
                return Err(ConfigError::invalid(
                    setting,
                    format!("{value} is outside {low}..={high}"),
                    wanted,
                ));
            }
        }
        Ok(())
    }

    /// The media service's settings.
    pub fn settings(&self) -> confab_core::services::media::MediaSettings {
        confab_core::services::media::MediaSettings {
            limits: confab_core::services::media::ImageLimits {
                max_bytes: self.max_bytes,
                max_pixels: self.max_pixels,
                ..Default::default()
            },
            url_ttl: std::time::Duration::from_secs(self.url_ttl_secs),
            url_base: "/api/v1/media".into(),
            concurrent: match self.concurrent {
                0 => std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1)),
                n => n,
            },
            process_timeout: std::time::Duration::from_secs(self.process_timeout_secs),
            uploads_per_minute: self.per_user_per_minute,
        }
    }
}

/// `[rate_limit]`: how limits behave (the limits themselves belong to each feature).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitConfig {
    /// While the cache is unreachable, allow requests (true) or refuse them (false).
    pub fail_open: bool,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self { fail_open: true }
    }
}

pub use confab_adapters::llm::{AnthropicConfig, OllamaConfig, OpenAiConfig, ReplicateConfig};

/// `[ai]`: the providers, the chain they form and how it is called (SPEC §8), and the
/// assistant's limits (SPEC §3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AiConfig {
    pub openai: Option<OpenAiConfig>,
    pub ollama: Option<OllamaConfig>,
    pub anthropic: Option<AnthropicConfig>,
    pub replicate: Option<ReplicateConfig>,
    /// The chain, primary first: `provider` or `provider:model`. Empty: every configured
    /// provider that has an adapter, with its configured model.
    #[serde(deserialize_with = "list_or_comma_string")]
    pub chain: Option<Vec<String>>,
    /// The longest wait for an answer's first piece, and between two pieces.
    pub timeout_secs: u64,
    /// Calls per link and request (retries of transient failures + 1).
    pub attempts: u32,
    /// The wait before the first retry, doubling each time (with jitter).
    pub backoff_ms: u64,
    /// Consecutive failures that open a link's circuit.
    pub breaker_failures: u32,
    /// How long an open circuit refuses calls before one probe.
    pub breaker_open_secs: u64,
    /// Requests per user and minute (429 beyond).
    pub requests_per_minute: u32,
    /// The session's last N messages sent as context.
    pub context_messages: u32,
    pub system_prompt: String,
    /// The longest answer, in tokens; unset: the provider's default.
    pub max_tokens: Option<u32>,
    /// A Slack-style webhook told of critical provider errors (`CONFIG_ERROR`, `API_ERROR`).
    pub webhook_url: Option<SecretUrl>,
    /// Requests one worker answers at once (each mostly waits on its provider).
    pub worker_concurrency: u32,
    /// AI sessions and generation jobs untouched this long are purged (daily).
    pub retention_days: u32,
}

impl Default for AiConfig {
    fn default() -> Self {
        Self {
            openai: None,
            ollama: None,
            anthropic: None,
            replicate: None,
            chain: None,
            timeout_secs: 30,
            attempts: 3,
            backoff_ms: 500,
            breaker_failures: 5,
            breaker_open_secs: 30,
            requests_per_minute: 10,
            context_messages: 20,
            system_prompt: "You are a helpful assistant.".into(),
            max_tokens: None,
            webhook_url: None,
            worker_concurrency: 512,
            retention_days: 90,
        }
    }
}

impl AiConfig {
    /// The names of the configured providers.
    pub fn providers(&self) -> Vec<&'static str> {
        [
            self.openai.as_ref().map(|_| "openai"),
            self.ollama.as_ref().map(|_| "ollama"),
            self.anthropic.as_ref().map(|_| "anthropic"),
            self.replicate.as_ref().map(|_| "replicate"),
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// Sentry error reporting; off when unset.
    pub sentry_dsn: Option<Secret>,
}

/// Accepts `["a", "b"]` from a file and `"a,b"` from the environment.
fn list_or_comma_string<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Vec<String>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        List(Vec<String>),
        Comma(String),
    }
    Ok(Some(match Raw::deserialize(deserializer)? {
        Raw::List(list) => list,
        Raw::Comma(s) => s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
    }))
}

/// The `kind`-tagged sections and their default kinds.
const BACKEND_SECTIONS: [(&str, &str); 5] = [
    ("database", "sqlite"),
    ("cache", "memory"),
    ("queue", "database"),
    ("media", "local"),
    ("mail", "file"),
];

/// One configuration source, as settings.
struct Layer {
    metadata: Metadata,
    dict: Dict,
}

impl Layer {
    fn of(provider: &impl Provider) -> Result<Self, ConfigError> {
        let dict = provider
            .data()
            .map_err(from_figment)?
            .remove(&Profile::Default)
            .unwrap_or_default();
        Ok(Self {
            metadata: provider.metadata(),
            dict,
        })
    }

    fn kind_of(&self, section: &str) -> Option<&str> {
        self.dict.get(section)?.as_dict()?.get("kind")?.as_str()
    }
}

impl Provider for Layer {
    fn metadata(&self) -> Metadata {
        self.metadata.clone()
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Profile::Default.collect(self.dict.clone()))
    }
}

/// A layer that selects another backend replaces the section rather than merging into it:
/// `DATABASE_URL=postgres://…` over a file's `[database] path = "…"` is a switch to PostgreSQL,
/// not a PostgreSQL config with a stray SQLite path. A layer that sets fields but no `kind`
/// refines the backend selected below it.
fn drop_switched_backends(layers: &mut [Layer]) {
    for (section, default_kind) in BACKEND_SECTIONS {
        let mut kind = default_kind.to_owned();
        for i in 0..layers.len() {
            let Some(explicit) = layers[i].kind_of(section).map(str::to_owned) else {
                continue;
            };
            if explicit != kind {
                for lower in &mut layers[..i] {
                    lower.dict.remove(section);
                }
                kind = explicit;
            }
        }
    }
}

/// The config file with `${VAR}` substituted, as a figment provider naming the file.
struct ConfigFile {
    path: PathBuf,
    text: String,
}

impl Provider for ConfigFile {
    fn metadata(&self) -> Metadata {
        Metadata::from("config file", self.path.as_path())
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Toml::string(&self.text).data()
    }
}

impl Config {
    /// Loads the configuration from `file` (or `./confab.toml` when it exists) and `env`, and
    /// validates it. The JWT secret is not resolved here: see [`Config::resolve_jwt_secret`].
    pub fn load(file: Option<&Path>, env: &Env) -> Result<Self, ConfigError> {
        let file = match file {
            Some(path) => read_file(path, env, true)?,
            None => read_file(Path::new(DEFAULT_FILE), env, false)?,
        };
        let mut layers = Vec::new();
        if let Some(file) = file {
            layers.push(Layer::of(&file)?);
        }
        let aliases = env::AliasEnv::new(env)?;
        layers.push(Layer {
            metadata: aliases.metadata(),
            dict: aliases.dict,
        });
        let nested = env::NestedEnv::new(env);
        layers.push(Layer {
            metadata: nested.metadata(),
            dict: nested.0,
        });
        drop_switched_backends(&mut layers);

        let mut figment = Figment::new().merge(Serialized::defaults(Self::default_kinds()));
        for layer in layers {
            figment = figment.merge(layer);
        }
        let mut config: Self = figment.extract_lossy().map_err(from_figment)?;
        // RUST_LOG is the Rust ecosystem's name for the log filter; it wins, and is checked
        // like every other setting.
        let from_rust_log = env.get("RUST_LOG").map(str::to_owned);
        if let Some(filter) = &from_rust_log {
            config.log.level.clone_from(filter);
        }
        config.validate().map_err(|mut e| {
            if e.setting == "log.level" && from_rust_log.is_some() {
                e.problem.push_str(" (from RUST_LOG)");
            }
            e
        })?;
        Ok(config)
    }

    /// Only the `kind` of each backend section, so that a section given partly (say only
    /// `EMAIL_FROM`) still selects the default backend.
    fn default_kinds() -> Dict {
        let mut dict = Dict::new();
        for (section, kind) in BACKEND_SECTIONS {
            let mut inner = Dict::new();
            inner.insert("kind".into(), kind.into());
            dict.insert(section.into(), inner.into());
        }
        dict
    }

    /// Checks what types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        check_http_url("server.app_url", &s.app_url)?;
        for origin in s.cors_origins.iter().flatten() {
            check_origin(origin)?;
        }
        if !(1..=3600).contains(&s.request_timeout_secs) {
            return Err(ConfigError::invalid(
                "server.request_timeout_secs",
                format!("{} is outside 1..=3600", s.request_timeout_secs),
                "a number of seconds between 1 and 3600",
            ));
        }
        if s.shutdown_timeout_secs > 3600 {
            return Err(ConfigError::invalid(
                "server.shutdown_timeout_secs",
                format!("{} is more than an hour", s.shutdown_timeout_secs),
                "a number of seconds up to 3600",
            ));
        }
        if s.json_body_limit_bytes < 1024 {
            return Err(ConfigError::invalid(
                "server.json_body_limit_bytes",
                format!(
                    "{} bytes is too small for any request",
                    s.json_body_limit_bytes
                ),
                "at least 1024 (the default is 1048576)",
            ));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&self.log.level) {
            return Err(ConfigError::invalid(
                "log.level",
                format!("{:?} is not a log filter ({e})", self.log.level),
                "a level such as info or debug, or a filter such as info,confab_server=debug",
            ));
        }
        if let Some(secret) = &self.auth.jwt_secret
            && !s.environment.is_development()
            && secret.expose().len() < 32
        {
            return Err(ConfigError::invalid(
                "auth.jwt_secret",
                "is shorter than 32 characters, too weak to sign tokens",
                "a random string of at least 32 characters (e.g. the output of `openssl rand -hex 32`)",
            ));
        }
        if let Some(header) = &s.client_ip_header
            && axum::http::HeaderName::from_bytes(header.as_bytes()).is_err()
        {
            return Err(ConfigError::invalid(
                "server.client_ip_header",
                format!("{header:?} is not a header name"),
                "a header name such as x-forwarded-for or x-real-ip",
            ));
        }
        if !(1..=10_000).contains(&self.chat.messages_per_second) {
            return Err(ConfigError::invalid(
                "chat.messages_per_second",
                format!("{} is outside 1..=10000", self.chat.messages_per_second),
                "a number of messages per second between 1 and 10000",
            ));
        }
        if self.chat.group_commit_wait_ms > 100 {
            return Err(ConfigError::invalid(
                "chat.group_commit_wait_ms",
                format!("{} is above 100", self.chat.group_commit_wait_ms),
                "a number of milliseconds between 0 and 100",
            ));
        }
        if let DatabaseConfig::Sqlite {
            commit_linger_us, ..
        } = &self.database
            && *commit_linger_us > 100_000
        {
            return Err(ConfigError::invalid(
                "database.commit_linger_us",
                format!("{commit_linger_us} is above 100000"),
                "a number of microseconds between 0 and 100000",
            ));
        }
        if !(1..=86_400).contains(&self.chat.presence_window_secs) {
            return Err(ConfigError::invalid(
                "chat.presence_window_secs",
                format!("{} is outside 1..=86400", self.chat.presence_window_secs),
                "a number of seconds between 1 and 86400",
            ));
        }
        self.uploads.validate()?;
        self.auth.validate()?;
        self.validate_backends()
    }

    fn validate_backends(&self) -> Result<(), ConfigError> {
        if let DatabaseConfig::Postgres {
            url, replica_url, ..
        } = &self.database
        {
            check_scheme("database.url", url, &["postgres", "postgresql"])?;
            if let Some(replica) = replica_url {
                check_scheme("database.replica_url", replica, &["postgres", "postgresql"])?;
            }
        }
        if let CacheConfig::Redis { url, .. } = &self.cache {
            check_scheme("cache.url", url, &["redis", "rediss"])?;
        }
        self.validate_queue()?;
        if let QueueConfig::Rabbitmq {
            url, queue_prefix, ..
        } = &self.queue
        {
            check_scheme("queue.url", url, &["amqp", "amqps"])?;
            if queue_prefix.len() > 64
                || !queue_prefix
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            {
                return Err(ConfigError::invalid(
                    "queue.queue_prefix",
                    format!("{queue_prefix:?} is not a queue-name prefix"),
                    "up to 64 letters, digits, '.', '_' or '-' (e.g. staging.)",
                ));
            }
        }
        if let MediaConfig::S3 {
            bucket, endpoint, ..
        } = &self.media
        {
            if bucket.trim().is_empty() {
                return Err(ConfigError::invalid(
                    "media.bucket",
                    "is empty",
                    "the name of an existing bucket",
                ));
            }
            if let Some(endpoint) = endpoint {
                check_http_url("media.endpoint", endpoint)?;
            }
        }
        match &self.mail {
            MailConfig::Smtp {
                url, host, from, ..
            } => {
                if let Some(url) = url {
                    check_scheme("mail.url", url, &["smtp", "smtps"])?;
                } else if host.as_deref().is_none_or(|h| h.trim().is_empty()) {
                    return Err(ConfigError::invalid(
                        "mail.host",
                        "SMTP mail needs a server, but neither mail.url nor mail.host is set",
                        "the SMTP server's host name (or set mail.url / SMTP_URL)",
                    ));
                }
                check_mailbox(from)?;
            }
            MailConfig::File { from, .. } => check_mailbox(from)?,
        }
        let ai = &self.ai;
        for (setting, url) in [
            (
                "ai.openai.base_url",
                ai.openai.as_ref().and_then(|c| c.base_url.as_ref()),
            ),
            (
                "ai.ollama.base_url",
                ai.ollama.as_ref().and_then(|c| c.base_url.as_ref()),
            ),
            (
                "ai.replicate.api_url",
                ai.replicate.as_ref().and_then(|c| c.api_url.as_ref()),
            ),
            (
                "ai.anthropic.base_url",
                ai.anthropic.as_ref().and_then(|c| c.base_url.as_ref()),
            ),
        ] {
            if let Some(url) = url {
                check_http_url(setting, url)?;
            }
        }
        // After the URLs: a provider is built only from settings that passed their checks.
        ai.validate()
    }

    /// Queue settings within sane bounds (and far from any arithmetic overflow).
    fn validate_queue(&self) -> Result<(), ConfigError> {
        let (max_attempts, retry_base_ms, visibility_timeout_secs) = match &self.queue {
            QueueConfig::Database {
                max_attempts,
                retry_base_ms,
                visibility_timeout_secs,
            }
            | QueueConfig::Rabbitmq {
                max_attempts,
                retry_base_ms,
                visibility_timeout_secs,
                ..
            } => (*max_attempts, *retry_base_ms, *visibility_timeout_secs),
        };
        for (setting, value, range, wanted) in [
            (
                "queue.max_attempts",
                u64::from(max_attempts),
                1..=100,
                "a number of attempts from 1 to 100",
            ),
            (
                "queue.retry_base_ms",
                retry_base_ms,
                1..=3_600_000,
                "milliseconds from 1 to 3600000",
            ),
            (
                "queue.visibility_timeout_secs",
                visibility_timeout_secs,
                1..=86_400,
                "seconds from 1 to 86400",
            ),
        ] {
            if !range.contains(&value) {
                return Err(ConfigError::invalid(
                    setting,
                    format!("{value} is out of range"),
                    wanted,
                ));
            }
        }
        Ok(())
    }

    /// The JWT secret rule (SPEC §2): the configured one; else, in development, one generated
    /// once and kept in `<data_dir>/jwt-secret`; else an error.
    pub fn resolve_jwt_secret(&mut self) -> Result<(), ConfigError> {
        if self.auth.jwt_secret.is_some() {
            return Ok(());
        }
        if !self.server.environment.is_development() {
            return Err(ConfigError::invalid(
                "auth.jwt_secret",
                format!(
                    "is not set, and outside development ({:?}) it must be",
                    self.server.environment
                ),
                "a random string of at least 32 characters (e.g. the output of `openssl rand -hex 32`)",
            ));
        }
        let path = self.server.data_dir.join("jwt-secret");
        let secret = load_or_create_secret(&path).map_err(|e| {
            ConfigError::invalid(
                "server.data_dir",
                format!(
                    "cannot keep the generated JWT secret in {} ({e})",
                    path.display()
                ),
                "a writable directory",
            )
        })?;
        self.auth.jwt_secret = Some(secret);
        Ok(())
    }

    /// One line naming each backend in use, URLs redacted: what an operator needs at startup.
    pub fn summary(&self) -> String {
        let database = self.database.describe(&self.server.data_dir);
        let cache = match &self.cache {
            CacheConfig::Memory { .. } => "memory".to_owned(),
            CacheConfig::Redis { url, .. } => url.redacted(),
        };
        let queue = match &self.queue {
            QueueConfig::Database { .. } => "database".to_owned(),
            QueueConfig::Rabbitmq { url, .. } => url.redacted(),
        };
        let media = match &self.media {
            MediaConfig::Local { .. } => "local".to_owned(),
            MediaConfig::S3 { bucket, .. } => format!("s3:{bucket}"),
        };
        let mail = match &self.mail {
            MailConfig::File { .. } => "file",
            MailConfig::Smtp { .. } => "smtp",
        };
        let ai = self.ai.providers();
        let ai = if ai.is_empty() {
            "none".to_owned()
        } else {
            ai.join(",")
        };
        format!("database={database} cache={cache} queue={queue} media={media} mail={mail} ai={ai}")
    }

    /// The configuration as TOML, secrets redacted.
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot print: {e}\n"))
    }
}

fn load_or_create_secret(path: &Path) -> std::io::Result<Secret> {
    use std::io::Write;
    fn read(path: &Path) -> std::io::Result<Option<Secret>> {
        match std::fs::read_to_string(path) {
            Ok(text) if text.trim().len() >= 32 => Ok(Some(Secret::new(text.trim()))),
            Ok(_) => Err(std::io::Error::other(
                "the file exists but holds fewer than 32 characters; delete it to generate a new secret",
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
    if let Some(secret) = read(path)? {
        return Ok(secret);
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut bytes = [0u8; 40];
    getrandom::fill(&mut bytes).map_err(std::io::Error::other)?;
    let hex = |bytes: &[u8]| {
        bytes
            .iter()
            .fold(String::with_capacity(bytes.len() * 2), |mut hex, b| {
                use std::fmt::Write as _;
                let _ = write!(hex, "{b:02x}");
                hex
            })
    };
    let (secret, suffix) = bytes.split_at(32);
    // Written whole to a file of this process's own, then linked into place: a reader never
    // sees half a secret, and of processes racing to create it (an api and a worker sharing
    // a data dir) exactly one wins and every one of them uses the winner's.
    let tmp = path.with_extension(format!("tmp-{}", hex(suffix)));
    {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&tmp)?;
        file.write_all(hex(secret).as_bytes())?;
        file.sync_all()?;
    }
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    read(path)?
        .ok_or_else(|| std::io::Error::other("the secret file vanished while it was created"))
}

/// Reads a config file and substitutes `${VAR}` (and `${VAR:-default}`) from `env` inside its
/// string values (comments and keys are left alone).
fn read_file(path: &Path, env: &Env, required: bool) -> Result<Option<ConfigFile>, ConfigError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => return Ok(None),
        Err(e) => {
            return Err(ConfigError::new(
                "--config",
                format!("cannot read {} ({e})", path.display()),
                "pass the path of a readable TOML file, or omit --config",
            ));
        }
    };
    let mut value: toml::Table = toml::from_str(&text).map_err(|e| {
        ConfigError::new(
            path.display().to_string(),
            format!("is not valid TOML: {}", e.message()),
            format!(
                "correct the syntax{}",
                e.span()
                    .map(|s| format!(" at line {}", text[..s.start].matches('\n').count() + 1))
                    .unwrap_or_default()
            ),
        )
    })?;
    for (key, item) in &mut value {
        substitute_value(key, item, env)?;
    }
    let text = toml::to_string(&value).expect("a parsed TOML table serializes");
    Ok(Some(ConfigFile {
        path: path.to_owned(),
        text,
    }))
}

fn substitute_value(setting: &str, value: &mut toml::Value, env: &Env) -> Result<(), ConfigError> {
    match value {
        toml::Value::String(s) => {
            *s = substitute(s, env).map_err(|problem| {
                ConfigError::new(
                    setting,
                    problem,
                    "set the variable in the environment, give a default as ${VAR:-default}, or write $${ for a literal ${",
                )
            })?;
        }
        toml::Value::Array(items) => {
            for item in items {
                substitute_value(setting, item, env)?;
            }
        }
        toml::Value::Table(table) => {
            for (key, item) in table {
                substitute_value(&format!("{setting}.{key}"), item, env)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// `${VAR}` → its value; `${VAR:-default}` → its value or `default`; `$${` → `${`.
fn substitute(text: &str, env: &Env) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix("${") {
            out.push_str("${");
            rest = tail;
        } else if let Some(body) = after.strip_prefix('{') {
            let end = body.find('}').ok_or("a ${ is not closed by }")?;
            let (name, default) = match body[..end].split_once(":-") {
                Some((name, default)) => (name, Some(default)),
                None => (&body[..end], None),
            };
            let valid =
                !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(format!("${{{name}}} is not a variable name"));
            }
            match (env.get(name), default) {
                (Some(value), _) => out.push_str(value),
                (None, Some(default)) => out.push_str(default),
                (None, None) => return Err(format!("${{{name}}} is used but {name} is not set")),
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

fn from_figment(error: figment::Error) -> ConfigError {
    use figment::error::Kind;
    let error = error
        .into_iter()
        .next()
        .expect("a figment error holds at least one error");
    let mut setting = error.path.join(".");
    let source = error.metadata.as_ref().map(|m| {
        let profile = error.profile.clone().unwrap_or_default();
        let key = m.interpolate(&profile, &error.path);
        match &m.source {
            Some(src) => format!("{key} in {src}"),
            None => key,
        }
    });
    let join = |parent: &str, child: &str| {
        if parent.is_empty() {
            child.to_owned()
        } else {
            format!("{parent}.{child}")
        }
    };
    let (problem, fix) = match &error.kind {
        Kind::UnknownField(field, expected) => {
            if error.path.last() != Some(field) {
                setting = join(&setting, field);
            }
            (
                "is not a known setting".to_owned(),
                if expected.is_empty() {
                    "remove it; config/default.toml lists every setting".to_owned()
                } else {
                    format!("remove it or use one of: {}", expected.join(", "))
                },
            )
        }
        Kind::MissingField(field) => {
            if error.path.last().map(String::as_str) != Some(field.as_ref()) {
                setting = join(&setting, field);
            }
            (
                "is required here but not set".to_owned(),
                format!(
                    "set it in the config file or with {}",
                    env::how_to_set(&setting)
                ),
            )
        }
        Kind::UnknownVariant(value, expected) => (
            format!("{value:?} is not one of: {}", expected.join(", ")),
            format!("use one of: {}", expected.join(", ")),
        ),
        other => (
            other.to_string(),
            format!(
                "correct it in the config file or in {}; config/default.toml documents every setting",
                env::how_to_set(if setting.is_empty() {
                    "section.key"
                } else {
                    &setting
                })
            ),
        ),
    };
    if setting.is_empty() {
        setting = "configuration".into();
    }
    let problem = match source {
        Some(source) if !source.is_empty() => format!("{problem} (from {source})"),
        _ => problem,
    };
    ConfigError::new(setting, problem, fix)
}

fn check_http_url(setting: &str, value: &str) -> Result<(), ConfigError> {
    match url::Url::parse(value) {
        Ok(url) if !url.username().is_empty() || url.password().is_some() => {
            Err(ConfigError::invalid(
                setting,
                "has credentials in it, which would be printed with the URL",
                "the URL without user:password@ (keys and passwords have settings of their own)",
            ))
        }
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => Ok(()),
        _ => Err(ConfigError::invalid(
            setting,
            format!("{value:?} is not an http(s) URL"),
            "a URL such as https://chat.example.com",
        )),
    }
}

fn check_scheme(setting: &str, url: &SecretUrl, schemes: &[&str]) -> Result<(), ConfigError> {
    if schemes.contains(&url.scheme()) {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            setting,
            format!("the scheme {:?} is not supported here", url.scheme()),
            &format!("a URL starting with {}://", schemes.join(":// or ")),
        ))
    }
}

fn normalise_origin(entry: &str) -> String {
    let (base, any_port) = match entry.strip_suffix(":*") {
        Some(base) => (base, ":*"),
        None => (entry, ""),
    };
    url::Url::parse(base).map_or_else(
        |_| entry.to_owned(),
        |url| format!("{}{any_port}", url.origin().ascii_serialization()),
    )
}

fn check_origin(origin: &str) -> Result<(), ConfigError> {
    let wanted = "origins such as https://app.example.com or http://localhost:*, comma separated";
    let (base, any_port) = match origin.strip_suffix(":*") {
        Some(base) => (base, true),
        None => (origin, false),
    };
    let ok = url::Url::parse(base).is_ok_and(|url| {
        matches!(url.scheme(), "http" | "https")
            && url.host().is_some()
            && url.path() == "/"
            && !base.ends_with('/')
            && url.query().is_none()
            && (!any_port || url.port().is_none())
    });
    if ok {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            "server.cors_origins",
            format!("{origin:?} is not an origin (scheme://host[:port], no path)"),
            wanted,
        ))
    }
}

fn check_mailbox(from: &str) -> Result<(), ConfigError> {
    let address = from
        .rsplit_once('<')
        .map_or(from, |(_, rest)| rest.trim_end_matches('>'));
    if address
        .split_once('@')
        .is_some_and(|(l, d)| !l.is_empty() && !d.is_empty())
    {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            "mail.from",
            format!("{from:?} is not a mail address"),
            "an address such as \"Chat <no-reply@example.com>\"",
        ))
    }
}

impl fmt::Display for Environment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Development => "development",
            Self::Test => "test",
            Self::Staging => "staging",
            Self::Production => "production",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Env {
        Env::from_pairs(pairs.iter().copied())
    }

    #[test]
    fn substitution_replaces_variables_defaults_and_escapes() {
        let e = env(&[("HOST", "db")]);
        assert_eq!(substitute("x-${HOST}-y", &e).unwrap(), "x-db-y");
        assert_eq!(substitute("${MISSING:-fallback}", &e).unwrap(), "fallback");
        assert_eq!(substitute("$${HOST} $5", &e).unwrap(), "${HOST} $5");
        assert!(substitute("${NOPE}", &e).unwrap_err().contains("NOPE"));
        assert!(substitute("${UNCLOSED", &e).is_err());
        assert!(substitute("${bad name}", &e).is_err());
    }

    #[test]
    fn origins_are_checked() {
        assert!(check_origin("https://app.example.com").is_ok());
        assert!(check_origin("http://localhost:3000").is_ok());
        assert!(check_origin("http://localhost:*").is_ok());
        assert!(check_origin("https://app.example.com/").is_err());
        assert!(check_origin("https://app.example.com/path").is_err());
        assert!(check_origin("app.example.com").is_err());
        assert!(check_origin("*").is_err());
    }

    #[test]
    fn mailboxes_are_checked() {
        assert!(check_mailbox("Chat <no-reply@example.com>").is_ok());
        assert!(check_mailbox("a@b").is_ok());
        assert!(check_mailbox("nobody").is_err());
    }
}
