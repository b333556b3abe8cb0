//! The environment as configuration: `CONFAB__SECTION__KEY` and the SPEC §2 aliases.
//!
//! The environment is read once into an [`Env`] snapshot, so tests pass their own variables
//! instead of mutating the process environment. Values stay strings here; the loader converts
//! them to numbers or booleans where a setting wants one.

use std::collections::BTreeMap;

use figment::value::{Dict, Map, Value};
use figment::{Error, Metadata, Profile, Provider};

use super::ConfigError;

/// A snapshot of environment variables.
#[derive(Debug, Clone, Default)]
pub struct Env {
    vars: BTreeMap<String, String>,
}

impl Env {
    /// The variables of this process; those whose name or value is not UTF-8 are skipped
    /// (none of ours can be such, and `std::env::vars` would panic on them).
    pub fn from_process() -> Self {
        Self::from_pairs(
            std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?))),
        )
    }

    pub fn from_pairs<K: Into<String>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        Self {
            vars: pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        }
    }

    /// The value of `name`, treating an empty value as unset (`REDIS_URL=` means "no Redis").
    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.trim().is_empty())
    }

    /// The first of `names` that is set, with its name.
    fn first<'a>(&'a self, names: &[&'a str]) -> Option<(&'a str, &'a str)> {
        names
            .iter()
            .find_map(|name| self.get(name).map(|value| (*name, value)))
    }
}

/// Every alias of SPEC §2 and the setting it fills; used for error hints and documentation.
pub const ALIASES: &[(&str, &[&str])] = &[
    ("server.listen", &["CONFAB_LISTEN", "PORT"]),
    ("server.environment", &["ENVIRONMENT", "NODE_ENV"]),
    ("server.data_dir", &["CONFAB_DATA_DIR"]),
    ("server.app_url", &["APP_URL", "FRONTEND_URL"]),
    ("server.cors_origins", &["CORS_ORIGINS"]),
    ("database", &["DATABASE_URL"]),
    ("database.replica_url", &["DATABASE_REPLICA_URL"]),
    ("cache", &["REDIS_URL"]),
    ("queue", &["RABBITMQ_URL", "AMQP_URL"]),
    ("media.bucket", &["S3_BUCKET", "AWS_S3_BUCKET"]),
    ("media.region", &["AWS_REGION"]),
    ("media.access_key_id", &["AWS_ACCESS_KEY_ID"]),
    ("media.secret_access_key", &["AWS_SECRET_ACCESS_KEY"]),
    ("media.endpoint", &["S3_ENDPOINT"]),
    ("mail.url", &["SMTP_URL"]),
    ("mail.host", &["EMAIL_HOST"]),
    ("mail.port", &["EMAIL_PORT"]),
    ("mail.user", &["EMAIL_USER"]),
    ("mail.password", &["EMAIL_PASS"]),
    ("mail.secure", &["EMAIL_SECURE"]),
    ("mail.from", &["EMAIL_FROM"]),
    ("auth.jwt_secret", &["JWT_SECRET", "SECRET_KEY"]),
    ("ai.openai.api_key", &["OPENAI_API_KEY"]),
    ("ai.openai.base_url", &["OPENAI_API_URL", "OPENAI_BASE_URL"]),
    ("ai.openai.model", &["OPENAI_MODEL"]),
    ("ai.ollama.base_url", &["OLLAMA_BASE_URL"]),
    ("ai.ollama.model", &["OLLAMA_MODEL"]),
    ("ai.ollama.embedding_model", &["OLLAMA_EMBEDDING_MODEL"]),
    ("ai.anthropic.api_key", &["ANTHROPIC_API_KEY"]),
    ("ai.anthropic.model", &["ANTHROPIC_MODEL"]),
    ("ai.anthropic.base_url", &["ANTHROPIC_BASE_URL"]),
    (
        "ai.replicate.api_key",
        &["REPLICATE_API_KEY", "REPLICATE_API_TOKEN"],
    ),
    ("ai.replicate.api_url", &["REPLICATE_API_URL"]),
    ("ai.replicate.model_version", &["REPLICATE_MODEL_VERSION"]),
    ("telemetry.sentry_dsn", &["SENTRY_DSN"]),
];

/// How to set `setting` from the environment, for error messages:
/// `CONFAB__SERVER__LISTEN (or CONFAB_LISTEN, PORT)`.
pub fn how_to_set(setting: &str) -> String {
    let nested = format!(
        "CONFAB__{}",
        setting.replace('.', "__").to_ascii_uppercase()
    );
    let aliases: Vec<&str> = ALIASES
        .iter()
        .filter(|(s, _)| *s == setting)
        .flat_map(|(_, names)| names.iter().copied())
        .collect();
    if aliases.is_empty() {
        nested
    } else {
        format!("{nested} (or {})", aliases.join(", "))
    }
}

/// `CONFAB__SECTION__KEY=value` → `section.key = "value"`.
pub struct NestedEnv(pub(super) Dict);

impl NestedEnv {
    pub const PREFIX: &'static str = "CONFAB__";

    pub fn new(env: &Env) -> Self {
        let mut dict = Dict::new();
        for (name, value) in &env.vars {
            let Some(rest) = name.strip_prefix(Self::PREFIX) else {
                continue;
            };
            let path: Vec<String> = rest
                .split("__")
                .map(str::to_ascii_lowercase)
                .filter(|p| !p.is_empty())
                .collect();
            if !path.is_empty() && !value.is_empty() {
                set(&mut dict, &path, Value::from(value.clone()));
            }
        }
        Self(dict)
    }
}

impl Provider for NestedEnv {
    fn metadata(&self) -> Metadata {
        Metadata::named("environment variable").interpolater(|_: &Profile, keys: &[&str]| {
            format!(
                "{}{}",
                NestedEnv::PREFIX,
                keys.join("__").to_ascii_uppercase()
            )
        })
    }

    fn data(&self) -> Result<Map<Profile, Dict>, Error> {
        Ok(Profile::Default.collect(self.0.clone()))
    }
}

/// The SPEC §2 aliases (`DATABASE_URL`, `REDIS_URL`, `EMAIL_HOST` …) as settings.
pub struct AliasEnv {
    pub(super) dict: Dict,
    /// Which variable set which setting, for error messages.
    sources: BTreeMap<String, String>,
}

impl AliasEnv {
    pub fn new(env: &Env) -> Result<Self, ConfigError> {
        let mut me = Self {
            dict: Dict::new(),
            sources: BTreeMap::new(),
        };

        me.plain(env, "server.environment", &["ENVIRONMENT", "NODE_ENV"]);
        me.plain(env, "server.data_dir", &["CONFAB_DATA_DIR"]);
        me.plain(env, "server.app_url", &["APP_URL", "FRONTEND_URL"]);
        me.plain(env, "server.cors_origins", &["CORS_ORIGINS"]);
        if !me.plain(env, "server.listen", &["CONFAB_LISTEN"]) {
            // `PORT` is the platform convention (Heroku, Cloud Run, Node apps): the port to
            // serve on, reachable from outside the container, so every interface.
            if let Some(port) = env.get("PORT") {
                me.put("server.listen", format!("0.0.0.0:{}", port.trim()), "PORT");
            }
        }

        match (env.get("DATABASE_URL"), env.get("MONGODB_URI")) {
            (Some(url), _) => {
                let kind = match url.split(':').next().unwrap_or_default() {
                    "postgres" | "postgresql" => "postgres",
                    "sqlite" => "sqlite",
                    "mongodb" | "mongodb+srv" => {
                        return Err(ConfigError::new(
                            "database",
                            "DATABASE_URL is a MongoDB URL; confab stores data in PostgreSQL or SQLite, not MongoDB",
                            "set DATABASE_URL to a postgres:// URL, or unset it to use the embedded SQLite file",
                        ));
                    }
                    _ => {
                        return Err(ConfigError::new(
                            "database",
                            "DATABASE_URL has an unsupported scheme (expected postgres:// or sqlite:)",
                            "set DATABASE_URL to postgres://USER:PASS@HOST/DB, or unset it to use the embedded SQLite file",
                        ));
                    }
                };
                me.put("database.kind", kind, "DATABASE_URL");
                if kind == "sqlite" {
                    // sqlite:PATH, sqlite://PATH (relative) and sqlite:////abs/path (absolute,
                    // SQLAlchemy's form): one `//` is the URL's, the rest is the path.
                    let rest = url.strip_prefix("sqlite:").unwrap_or(url);
                    let path = rest
                        .strip_prefix("//")
                        .unwrap_or(rest)
                        .split('?')
                        .next()
                        .unwrap_or_default();
                    let absolute;
                    let path = if path.starts_with("//") {
                        absolute = format!("/{}", path.trim_start_matches('/'));
                        absolute.as_str()
                    } else {
                        path
                    };
                    me.put("database.path", path, "DATABASE_URL");
                } else {
                    me.put("database.url", url, "DATABASE_URL");
                }
            }
            (None, Some(_)) => {
                return Err(ConfigError::new(
                    "database",
                    "MONGODB_URI is set, but confab does not support MongoDB",
                    "set DATABASE_URL to a postgres:// URL (or leave both unset for the embedded SQLite file) and unset MONGODB_URI",
                ));
            }
            (None, None) => {}
        }
        me.plain(env, "database.replica_url", &["DATABASE_REPLICA_URL"]);

        if let Some(url) = env.get("REDIS_URL") {
            me.put("cache.kind", "redis", "REDIS_URL");
            me.put("cache.url", url, "REDIS_URL");
        }
        if let Some((name, url)) = env.first(&["RABBITMQ_URL", "AMQP_URL"]) {
            me.put("queue.kind", "rabbitmq", name);
            me.put("queue.url", url, name);
        }

        // The AWS variables are often set for other reasons; only a bucket selects S3.
        if let Some((name, bucket)) = env.first(&["S3_BUCKET", "AWS_S3_BUCKET"]) {
            me.put("media.kind", "s3", name);
            me.put("media.bucket", bucket, name);
            me.plain(env, "media.region", &["AWS_REGION"]);
            me.plain(env, "media.access_key_id", &["AWS_ACCESS_KEY_ID"]);
            me.plain(env, "media.secret_access_key", &["AWS_SECRET_ACCESS_KEY"]);
            me.plain(env, "media.endpoint", &["S3_ENDPOINT"]);
        }

        let smtp_url = me.plain(env, "mail.url", &["SMTP_URL"]);
        let smtp_host = me.plain(env, "mail.host", &["EMAIL_HOST"]);
        if smtp_url || smtp_host {
            let name = if smtp_url { "SMTP_URL" } else { "EMAIL_HOST" };
            me.put("mail.kind", "smtp", name);
        }
        me.plain(env, "mail.port", &["EMAIL_PORT"]);
        me.plain(env, "mail.user", &["EMAIL_USER"]);
        me.plain(env, "mail.password", &["EMAIL_PASS"]);
        me.plain(env, "mail.secure", &["EMAIL_SECURE"]);
        me.plain(env, "mail.from", &["EMAIL_FROM"]);

        me.plain(env, "auth.jwt_secret", &["JWT_SECRET", "SECRET_KEY"]);
        for (setting, names) in ALIASES.iter().filter(|(s, _)| s.starts_with("ai.")) {
            me.plain(env, setting, names);
        }
        me.plain(env, "telemetry.sentry_dsn", &["SENTRY_DSN"]);
        Ok(me)
    }

    /// Copies the first set variable of `names` into `setting`; says whether one was set.
    fn plain(&mut self, env: &Env, setting: &str, names: &[&str]) -> bool {
        if let Some((name, value)) = env.first(names) {
            self.put(setting, value, name);
            true
        } else {
            false
        }
    }

    fn put(&mut self, setting: &str, value: impl Into<String>, source: &str) {
        let path: Vec<String> = setting.split('.').map(str::to_owned).collect();
        set(&mut self.dict, &path, Value::from(value.into()));
        self.sources.insert(setting.to_owned(), source.to_owned());
    }
}

impl Provider for AliasEnv {
    fn metadata(&self) -> Metadata {
        let sources = self.sources.clone();
        Metadata::named("environment variable").interpolater(move |_: &Profile, keys: &[&str]| {
            let setting = keys.join(".");
            sources
                .get(&setting)
                .cloned()
                .unwrap_or_else(|| format!("an alias of {setting}"))
        })
    }

    fn data(&self) -> Result<Map<Profile, Dict>, Error> {
        Ok(Profile::Default.collect(self.dict.clone()))
    }
}

fn set(dict: &mut Dict, path: &[String], value: Value) {
    match path {
        [] => {}
        [last] => {
            dict.insert(last.clone(), value);
        }
        [first, rest @ ..] => {
            let entry = dict
                .entry(first.clone())
                .or_insert_with(|| Value::from(Dict::new()));
            if !matches!(entry, Value::Dict(..)) {
                *entry = Value::from(Dict::new());
            }
            if let Value::Dict(_, inner) = entry {
                set(inner, rest, value);
            }
        }
    }
}
