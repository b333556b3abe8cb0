//! Configuration: precedence, every SPEC alias, substitution, rejection, the JWT-secret rule.

use std::io::Write;
use std::path::{Path, PathBuf};

use confab_server::config::{
    CacheConfig, Config, DatabaseConfig, Env, Environment, MailConfig, MediaConfig, QueueConfig,
};

fn env(pairs: &[(&str, &str)]) -> Env {
    Env::from_pairs(pairs.iter().copied())
}

fn file(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f
}

fn load(text: &str, vars: &[(&str, &str)]) -> Result<Config, confab_server::config::ConfigError> {
    let f = file(text);
    Config::load(Some(f.path()), &env(vars))
}

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel)
}

#[test]
fn defaults_apply_when_nothing_is_configured() {
    let c = load("", &[]).unwrap();
    assert_eq!(c, Config::default());
    assert_eq!(c.server.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(c.server.environment, Environment::Development);
    assert_eq!(c.database, DatabaseConfig::default());
    assert_eq!(c.cache, CacheConfig::default());
    assert_eq!(c.queue, QueueConfig::default());
}

#[test]
fn the_documented_default_file_is_exactly_the_built_in_defaults() {
    let c = Config::load(Some(&repo_file("config/default.toml")), &env(&[])).unwrap();
    assert_eq!(c, Config::default());
}

#[test]
fn the_file_overrides_defaults_and_the_environment_overrides_the_file() {
    let toml = "[server]\nlisten = \"127.0.0.1:9000\"\nrequest_timeout_secs = 5\n";
    let c = load(toml, &[]).unwrap();
    assert_eq!(c.server.listen.to_string(), "127.0.0.1:9000");
    assert_eq!(c.server.request_timeout_secs, 5);
    assert_eq!(
        c.server.shutdown_timeout_secs, 10,
        "untouched keys keep defaults"
    );

    let c = load(toml, &[("CONFAB__SERVER__LISTEN", "127.0.0.1:9100")]).unwrap();
    assert_eq!(c.server.listen.to_string(), "127.0.0.1:9100");
    assert_eq!(c.server.request_timeout_secs, 5);

    let c = load(toml, &[("CONFAB__SERVER__REQUEST_TIMEOUT_SECS", "7")]).unwrap();
    assert_eq!(
        c.server.request_timeout_secs, 7,
        "numbers come from env strings"
    );
}

#[test]
fn the_nested_variable_wins_over_an_alias_of_the_same_setting() {
    let c = load(
        "",
        &[
            ("PORT", "3000"),
            ("CONFAB__SERVER__LISTEN", "127.0.0.1:4000"),
        ],
    )
    .unwrap();
    assert_eq!(c.server.listen.to_string(), "127.0.0.1:4000");
}

#[test]
fn every_spec_alias_fills_its_setting() {
    let c = load(
        "",
        &[
            ("ENVIRONMENT", "production"),
            ("CONFAB_DATA_DIR", "/var/lib/confab"),
            ("APP_URL", "https://chat.example.com"),
            (
                "CORS_ORIGINS",
                "https://a.example.com, https://b.example.com",
            ),
            ("DATABASE_URL", "postgres://app:pw@db:5432/chat"),
            (
                "DATABASE_REPLICA_URL",
                "postgres://app:pw@replica:5432/chat",
            ),
            ("REDIS_URL", "rediss://:pw@cache:6380/0"),
            ("RABBITMQ_URL", "amqp://guest:guest@mq:5672/%2f"),
            ("S3_BUCKET", "media"),
            ("AWS_REGION", "eu-west-1"),
            ("AWS_ACCESS_KEY_ID", "AKIA123"),
            ("AWS_SECRET_ACCESS_KEY", "s3-secret"),
            ("S3_ENDPOINT", "http://127.0.0.1:9000"),
            ("EMAIL_HOST", "smtp.example.com"),
            ("EMAIL_PORT", "587"),
            ("EMAIL_USER", "mailer"),
            ("EMAIL_PASS", "12345678"),
            ("EMAIL_SECURE", "true"),
            ("EMAIL_FROM", "Chat <no-reply@example.com>"),
            ("JWT_SECRET", "0123456789abcdef0123456789abcdef"),
            ("OPENAI_API_KEY", "sk-test"),
            ("OPENAI_BASE_URL", "http://127.0.0.1:8081/v1"),
            ("OPENAI_MODEL", "gpt-4o-mini"),
            ("OLLAMA_BASE_URL", "http://127.0.0.1:11434"),
            ("OLLAMA_MODEL", "llama3"),
            ("OLLAMA_EMBEDDING_MODEL", "nomic-embed-text"),
            ("ANTHROPIC_API_KEY", "sk-ant"),
            ("ANTHROPIC_MODEL", "claude-3-5-haiku"),
            ("REPLICATE_API_TOKEN", "r8_x"),
            ("REPLICATE_API_URL", "https://api.replicate.com/v1"),
            ("REPLICATE_MODEL_VERSION", "abc123"),
            ("SENTRY_DSN", "https://key@sentry.example.com/1"),
            ("CONFAB_LISTEN", "0.0.0.0:8088"),
        ],
    )
    .unwrap();
    assert_eq!(c.server.environment, Environment::Production);
    assert_eq!(c.server.listen.to_string(), "0.0.0.0:8088");
    assert_eq!(c.server.data_dir, PathBuf::from("/var/lib/confab"));
    assert_eq!(c.server.app_url, "https://chat.example.com");
    assert_eq!(
        c.server.effective_cors_origins(),
        ["https://a.example.com", "https://b.example.com"]
    );
    let DatabaseConfig::Postgres {
        url, replica_url, ..
    } = &c.database
    else {
        panic!("expected postgres, got {:?}", c.database);
    };
    assert_eq!(url.expose().host_str(), Some("db"));
    assert_eq!(
        replica_url.as_ref().unwrap().expose().host_str(),
        Some("replica")
    );
    assert!(matches!(&c.cache, CacheConfig::Redis { url, .. } if url.scheme() == "rediss"));
    assert!(
        matches!(&c.queue, QueueConfig::Rabbitmq { url, .. } if url.expose().host_str() == Some("mq"))
    );
    let MediaConfig::S3 {
        bucket,
        region,
        endpoint,
        access_key_id,
        secret_access_key,
    } = &c.media
    else {
        panic!("expected s3, got {:?}", c.media);
    };
    assert_eq!(bucket, "media");
    assert_eq!(region.as_deref(), Some("eu-west-1"));
    assert_eq!(endpoint.as_deref(), Some("http://127.0.0.1:9000"));
    assert_eq!(access_key_id.as_deref(), Some("AKIA123"));
    assert_eq!(secret_access_key.as_ref().unwrap().expose(), "s3-secret");
    let MailConfig::Smtp {
        url,
        host,
        port,
        user,
        password,
        secure,
        from,
    } = &c.mail
    else {
        panic!("expected smtp, got {:?}", c.mail);
    };
    assert!(url.is_none());
    assert_eq!(host.as_deref(), Some("smtp.example.com"));
    assert_eq!(*port, Some(587));
    assert_eq!(user.as_deref(), Some("mailer"));
    assert_eq!(password.as_ref().unwrap().expose(), "12345678");
    assert!(*secure);
    assert_eq!(from, "Chat <no-reply@example.com>");
    assert_eq!(c.auth.jwt_secret.as_ref().unwrap().expose().len(), 32);
    let openai = c.ai.openai.as_ref().unwrap();
    assert_eq!(openai.api_key.as_ref().unwrap().expose(), "sk-test");
    assert_eq!(openai.base_url.as_deref(), Some("http://127.0.0.1:8081/v1"));
    assert_eq!(openai.model.as_deref(), Some("gpt-4o-mini"));
    let ollama = c.ai.ollama.as_ref().unwrap();
    assert_eq!(ollama.base_url.as_deref(), Some("http://127.0.0.1:11434"));
    assert_eq!(ollama.model.as_deref(), Some("llama3"));
    assert_eq!(ollama.embedding_model.as_deref(), Some("nomic-embed-text"));
    let anthropic = c.ai.anthropic.as_ref().unwrap();
    assert_eq!(anthropic.api_key.as_ref().unwrap().expose(), "sk-ant");
    assert_eq!(anthropic.model.as_deref(), Some("claude-3-5-haiku"));
    let replicate = c.ai.replicate.as_ref().unwrap();
    assert_eq!(replicate.api_key.as_ref().unwrap().expose(), "r8_x");
    assert_eq!(
        replicate.api_url.as_deref(),
        Some("https://api.replicate.com/v1")
    );
    assert_eq!(replicate.model_version.as_deref(), Some("abc123"));
    assert_eq!(
        c.telemetry.sentry_dsn.as_ref().unwrap().expose(),
        "https://key@sentry.example.com/1"
    );
    assert_eq!(
        c.ai.providers(),
        ["openai", "ollama", "anthropic", "replicate"]
    );
}

#[test]
fn the_second_name_of_each_alias_pair_works_too() {
    let c = load(
        "",
        &[
            ("NODE_ENV", "test"),
            ("PORT", "3000"),
            ("FRONTEND_URL", "https://front.example.com"),
            ("AMQP_URL", "amqps://mq.example.com"),
            ("AWS_S3_BUCKET", "legacy-bucket"),
            ("SMTP_URL", "smtps://u:p@mail.example.com:465"),
            ("SECRET_KEY", "0123456789abcdef0123456789abcdef"),
            ("OPENAI_API_URL", "https://api.openai.com/v1"),
            ("OPENAI_API_KEY", "sk-test"),
            ("REPLICATE_API_KEY", "r8_y"),
            ("REPLICATE_MODEL_VERSION", "owner/model:0123"),
            ("DATABASE_URL", "sqlite:///tmp/x.db"),
        ],
    )
    .unwrap();
    assert_eq!(c.server.environment, Environment::Test);
    assert_eq!(
        c.server.listen.to_string(),
        "0.0.0.0:3000",
        "PORT listens on every interface"
    );
    assert_eq!(c.server.app_url, "https://front.example.com");
    assert!(matches!(&c.queue, QueueConfig::Rabbitmq { url, .. } if url.scheme() == "amqps"));
    assert!(matches!(&c.media, MediaConfig::S3 { bucket, .. } if bucket == "legacy-bucket"));
    assert!(matches!(&c.mail, MailConfig::Smtp { url: Some(u), .. } if u.scheme() == "smtps"));
    assert!(c.auth.jwt_secret.is_some());
    assert_eq!(
        c.ai.openai.unwrap().base_url.as_deref(),
        Some("https://api.openai.com/v1")
    );
    assert_eq!(c.ai.replicate.unwrap().api_key.unwrap().expose(), "r8_y");
    assert!(
        matches!(&c.database, DatabaseConfig::Sqlite { path: Some(p), .. } if p.as_os_str() == "/tmp/x.db"),
        "{:?}",
        c.database
    );
    assert!(
        c.server.effective_cors_origins().is_empty(),
        "no default origins outside development"
    );
}

#[test]
fn an_empty_variable_counts_as_unset() {
    let c = load("", &[("REDIS_URL", ""), ("PORT", " ")]).unwrap();
    assert_eq!(c.cache, CacheConfig::default());
    assert_eq!(c.server.listen.to_string(), "127.0.0.1:8080");
}

#[test]
fn aws_variables_without_a_bucket_leave_media_on_local_disk() {
    let c = load(
        "",
        &[("AWS_REGION", "eu-west-1"), ("AWS_ACCESS_KEY_ID", "x")],
    )
    .unwrap();
    assert_eq!(c.media, MediaConfig::Local { path: None });
}

#[test]
fn email_from_alone_keeps_the_file_mailer() {
    let c = load("", &[("EMAIL_FROM", "me@example.com")]).unwrap();
    assert!(matches!(c.mail, MailConfig::File { ref from, .. } if from == "me@example.com"));
}

#[test]
fn mongodb_is_refused_with_a_clear_message() {
    let err = load("", &[("MONGODB_URI", "mongodb://localhost/chat")]).unwrap_err();
    assert_eq!(err.setting, "database");
    assert!(err.problem.contains("MongoDB"), "{err}");
    assert!(err.fix.contains("DATABASE_URL"), "{err}");
    let err = load("", &[("DATABASE_URL", "mongodb://localhost/chat")]).unwrap_err();
    assert!(err.problem.contains("MongoDB"), "{err}");
}

#[test]
fn variables_in_the_file_are_substituted() {
    let toml = "# ${NOT_A_SETTING} in a comment is left alone\n[database]\nkind = \"postgres\"\nurl = \"postgres://app:${DB_PASS}@${DB_HOST:-localhost}/chat\"\n";
    let c = load(toml, &[("DB_PASS", "p\"w")]).unwrap();
    let DatabaseConfig::Postgres { url, .. } = c.database else {
        panic!("postgres")
    };
    assert_eq!(url.expose().host_str(), Some("localhost"));
    assert_eq!(url.expose().password(), Some("p%22w"));

    let err = load(toml, &[]).unwrap_err();
    assert_eq!(err.setting, "database.url", "names the setting: {err}");
    assert!(err.problem.contains("DB_PASS"), "{err}");
}

#[test]
fn unknown_keys_are_rejected_naming_the_key() {
    let err = load("[server]\nlisten_addr = \"x\"\n", &[]).unwrap_err();
    assert_eq!(err.setting, "server.listen_addr");
    assert!(err.fix.contains("listen"), "suggests the known keys: {err}");

    let err = load(
        "[database]\nkind = \"sqlite\"\nurl = \"postgres://x\"\n",
        &[],
    )
    .unwrap_err();
    assert!(err.setting.starts_with("database"), "{err}");

    let err = load("[nonsense]\na = 1\n", &[]).unwrap_err();
    assert_eq!(err.setting, "nonsense");

    let err = load("", &[("CONFAB__SERVER__LISTN", "x")]).unwrap_err();
    assert_eq!(err.setting, "server.listn");
}

#[test]
fn bad_values_name_the_setting_the_problem_and_the_fix() {
    let err = load("", &[("PORT", "eighty")]).unwrap_err();
    assert_eq!(err.setting, "server.listen");
    assert!(err.problem.contains("PORT"), "names the variable: {err}");
    assert!(err.fix.contains("CONFAB_LISTEN"), "{err}");

    let err = load("[server]\nenvironment = \"prod\"\n", &[]).unwrap_err();
    assert!(
        err.problem.contains("production"),
        "lists the choices: {err}"
    );

    let err = load("", &[("APP_URL", "chat.example.com")]).unwrap_err();
    assert_eq!(err.setting, "server.app_url");
    let err = load(
        "",
        &[("CORS_ORIGINS", "https://ok.example.com,not an origin")],
    )
    .unwrap_err();
    assert_eq!(err.setting, "server.cors_origins");
    let err = load("", &[("REDIS_URL", "http://cache")]).unwrap_err();
    assert_eq!(err.setting, "cache.url");
    let err = load("", &[("CONFAB__LOG__LEVEL", "info,=bogus=")]).unwrap_err();
    assert_eq!(err.setting, "log.level");
    let err = load("", &[("CONFAB__SERVER__REQUEST_TIMEOUT_SECS", "0")]).unwrap_err();
    assert_eq!(err.setting, "server.request_timeout_secs");
    let err = load("[database]\ncommit_linger_us = 250000\n", &[]).unwrap_err();
    assert_eq!(err.setting, "database.commit_linger_us");
    assert!(err.fix.contains("microseconds"), "{err}");
    // From the environment too (a string there, read as a number).
    let err = load("", &[("CONFAB__DATABASE__COMMIT_LINGER_US", "250000")]).unwrap_err();
    assert_eq!(err.setting, "database.commit_linger_us");
    let ok = load("", &[("CONFAB__DATABASE__COMMIT_LINGER_US", "700")]).unwrap();
    assert!(
        matches!(
            ok.database,
            DatabaseConfig::Sqlite {
                commit_linger_us: 700,
                ..
            }
        ),
        "{:?}",
        ok.database
    );
    let err = load("", &[("EMAIL_PORT", "25")]).unwrap_err();
    assert_eq!(
        err.setting, "mail.port",
        "EMAIL_PORT without a host is an error: {err}"
    );
    let err = load(
        "",
        &[("ENVIRONMENT", "production"), ("JWT_SECRET", "tiny-s3cret")],
    )
    .unwrap_err();
    assert_eq!(err.setting, "auth.jwt_secret");
    assert!(
        !err.to_string().contains("tiny-s3cret"),
        "never echoes a secret: {err}"
    );
    let err = load(
        "",
        &[
            ("DATABASE_URL", "postgres://app:hunter2@db/x"),
            ("DATABASE_REPLICA_URL", "mysql://app:hunter2@r/x"),
        ],
    )
    .unwrap_err();
    assert!(
        !err.to_string().contains("hunter2"),
        "never echoes a password: {err}"
    );
}

#[test]
fn a_file_that_is_not_toml_names_the_line() {
    let err = load("[server]\nlisten = \n", &[]).unwrap_err();
    assert!(err.problem.contains("TOML"), "{err}");
    assert!(err.fix.contains("line 2"), "{err}");
}

#[test]
fn a_missing_config_file_given_explicitly_is_an_error() {
    let err = Config::load(Some(Path::new("/nonexistent/confab.toml")), &env(&[])).unwrap_err();
    assert_eq!(err.setting, "--config");
}

#[test]
fn development_generates_the_jwt_secret_once_and_keeps_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let vars = [("CONFAB_DATA_DIR", data.to_str().unwrap())];
    let mut first = load("", &vars).unwrap();
    first.resolve_jwt_secret().unwrap();
    let mut second = load("", &vars).unwrap();
    second.resolve_jwt_secret().unwrap();
    let (a, b) = (
        first.auth.jwt_secret.unwrap(),
        second.auth.jwt_secret.unwrap(),
    );
    assert_eq!(a, b, "the same secret survives a restart");
    assert!(a.expose().len() >= 32);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(data.join("jwt-secret"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "only the owner may read the secret");
    }
}

#[test]
fn outside_development_a_missing_jwt_secret_is_an_error() {
    let mut c = load("", &[("ENVIRONMENT", "production")]).unwrap();
    let err = c.resolve_jwt_secret().unwrap_err();
    assert_eq!(err.setting, "auth.jwt_secret");
    assert!(err.fix.contains("JWT_SECRET"), "{err}");
}

#[test]
fn printing_the_config_redacts_every_secret() {
    let c = load(
        "",
        &[
            ("DATABASE_URL", "postgres://app:db-pass-1@db/chat"),
            ("REDIS_URL", "redis://:redis-pass-2@cache"),
            ("JWT_SECRET", "jwt-secret-3-jwt-secret-3-jwt-secret-3"),
            ("OPENAI_API_KEY", "sk-openai-4"),
            ("EMAIL_HOST", "smtp.example.com"),
            ("EMAIL_PASS", "mail-pass-5"),
            ("SENTRY_DSN", "https://sentry-key-6@sentry.example.com/1"),
        ],
    )
    .unwrap();
    for printed in [c.to_redacted_toml(), format!("{c:?}")] {
        for secret in [
            "db-pass-1",
            "redis-pass-2",
            "jwt-secret-3",
            "sk-openai-4",
            "mail-pass-5",
            "sentry-key-6",
        ] {
            assert!(!printed.contains(secret), "{secret} leaked:\n{printed}");
        }
        assert!(
            printed.contains("db/chat"),
            "hosts stay visible:\n{printed}"
        );
    }
}

#[test]
fn the_environment_can_switch_a_backend_the_file_selected() {
    let toml = "[database]\npath = \"/srv/chat.db\"\n[media]\nkind = \"local\"\npath = \"/srv/media\"\n[cache]\nkind = \"redis\"\nurl = \"redis://file-redis\"\n";
    let c = load(
        toml,
        &[
            ("DATABASE_URL", "postgres://app:pw@db/chat"),
            ("S3_BUCKET", "media"),
            ("CONFAB__CACHE__KIND", "memory"),
        ],
    )
    .unwrap();
    assert!(
        matches!(c.database, DatabaseConfig::Postgres { .. }),
        "{:?}",
        c.database
    );
    assert!(matches!(c.media, MediaConfig::S3 { ref bucket, .. } if bucket == "media"));
    assert_eq!(c.cache, CacheConfig::default());

    // Without a switch, the environment refines the file's backend.
    let c = load(
        "[database]\nkind = \"postgres\"\nurl = \"postgres://app:pw@db/chat\"\n",
        &[("DATABASE_REPLICA_URL", "postgres://app:pw@replica/chat")],
    )
    .unwrap();
    let DatabaseConfig::Postgres {
        url, replica_url, ..
    } = c.database
    else {
        panic!("postgres")
    };
    assert_eq!(url.expose().host_str(), Some("db"));
    assert_eq!(replica_url.unwrap().expose().host_str(), Some("replica"));
}

#[test]
fn rust_log_overrides_the_level_and_is_checked_like_any_setting() {
    let c = load(
        "[log]\nlevel = \"warn\"\n",
        &[("RUST_LOG", "debug,hyper=info")],
    )
    .unwrap();
    assert_eq!(c.log.level, "debug,hyper=info");
    let err = load("", &[("RUST_LOG", "info,=bogus=")]).unwrap_err();
    assert_eq!(err.setting, "log.level");
    assert!(err.problem.contains("RUST_LOG"), "{err}");
}

#[test]
fn sqlite_urls_keep_absolute_paths() {
    for (url, path) in [
        ("sqlite:////var/lib/app.db", "/var/lib/app.db"),
        ("sqlite:///tmp/x.db", "/tmp/x.db"),
        ("sqlite://rel/x.db", "rel/x.db"),
        ("sqlite:data.db?mode=rwc", "data.db"),
    ] {
        let c = load("", &[("DATABASE_URL", url)]).unwrap();
        assert!(
            matches!(&c.database, DatabaseConfig::Sqlite { path: Some(p), .. } if p.as_os_str() == path),
            "{url}: {:?}",
            c.database
        );
    }
}

#[test]
fn urls_with_credentials_in_plain_settings_are_refused() {
    let err = load("", &[("OLLAMA_BASE_URL", "https://u:pw@ollama.internal")]).unwrap_err();
    assert_eq!(err.setting, "ai.ollama.base_url");
    assert!(!err.to_string().contains("pw@"), "{err}");
}

#[test]
fn cors_entries_are_normalised_as_browsers_send_origins() {
    let c = load(
        "",
        &[(
            "CORS_ORIGINS",
            "https://App.Example.com:443,http://LOCALHOST:*",
        )],
    )
    .unwrap();
    assert_eq!(
        c.server.effective_cors_origins(),
        ["https://app.example.com", "http://localhost:*"]
    );
}

#[test]
fn queue_settings_are_bounded() {
    for (var, value) in [
        ("CONFAB__QUEUE__MAX_ATTEMPTS", "0"),
        ("CONFAB__QUEUE__RETRY_BASE_MS", "99999999999"),
        (
            "CONFAB__QUEUE__VISIBILITY_TIMEOUT_SECS",
            "18446744073709551615",
        ),
    ] {
        let err = load("", &[(var, value)]).unwrap_err();
        assert!(err.setting.starts_with("queue."), "{var}: {err}");
    }
}

#[test]
fn the_ai_chain_is_checked_at_startup() {
    // The default chain: every configured provider, with its model.
    let c = load(
        "",
        &[
            ("OPENAI_BASE_URL", "http://127.0.0.1:8081/v1"),
            ("OPENAI_MODEL", "local-model"),
            ("OLLAMA_BASE_URL", "http://127.0.0.1:11434"),
            ("OLLAMA_MODEL", "llama3.2"),
        ],
    )
    .unwrap();
    let chain = c.ai.chain().unwrap().unwrap();
    assert_eq!(chain.describe(), ["openai/local-model", "ollama/llama3.2"]);
    // An explicit chain from the environment, with a second model of one provider.
    let c = load(
        "",
        &[
            ("OPENAI_BASE_URL", "http://127.0.0.1:8081/v1"),
            ("OLLAMA_MODEL", "llama3.2"),
            ("CONFAB__AI__CHAIN", "ollama, openai:big-model,openai"),
        ],
    )
    .unwrap();
    let chain = c.ai.chain().unwrap().unwrap();
    assert_eq!(
        chain.describe(),
        ["ollama/llama3.2", "openai/big-model", "openai/gpt-4o-mini"]
    );
    // A link naming a provider that is not configured, or that has no adapter.
    for (chain, problem) in [
        ("openai,ollama", "not configured"),
        ("cohere", "no adapter"),
    ] {
        let err = load(
            "",
            &[
                ("OPENAI_BASE_URL", "http://127.0.0.1:8081/v1"),
                ("CONFAB__AI__CHAIN", chain),
            ],
        )
        .unwrap_err();
        assert_eq!(err.setting, "ai.chain");
        assert!(err.problem.contains(problem), "{err}");
    }
    // A provider without what it needs names the missing field.
    let err = load("", &[("OLLAMA_BASE_URL", "http://127.0.0.1:11434")]).unwrap_err();
    assert_eq!(err.setting, "ai.ollama.model");
    let err = load("", &[("OPENAI_MODEL", "gpt-4o")]).unwrap_err();
    assert_eq!(err.setting, "ai.openai.api_key");
    let err = load("", &[("CONFAB__AI__ATTEMPTS", "0")]).unwrap_err();
    assert_eq!(err.setting, "ai.attempts");
    // No provider at all is fine: the assistant answers 503.
    assert!(load("", &[]).unwrap().ai.chain().unwrap().is_none());
}
