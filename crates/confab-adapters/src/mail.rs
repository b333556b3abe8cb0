//! Outgoing mail: the `[mail]` config section, the file and SMTP mailers, and the factory.
//!
//! The file mailer writes each mail as `<outbox>/<millis>-<id>.eml`, through a temporary file
//! and a rename, so a reader of the folder never sees half a message. The SMTP mailer uses a
//! pooled lettre transport: `smtps://` or `secure = true` for implicit TLS, STARTTLS required
//! for `host`-style settings otherwise; `smtp://…` URLs follow lettre's `?tls=` rule (no
//! parameter: plain, for a relay on the same machine).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use confab_core::ports::health::{ComponentHealth, HealthCheck, HealthStatus};
use confab_core::ports::mailer::{Mail, MailError, Mailer};
use confab_core::settings::{Secret, SecretUrl, lenient};
use lettre::message::{Mailbox, MultiPart, SinglePart, header::ContentType};
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use serde::{Deserialize, Serialize};

fn default_from() -> String {
    "confab <no-reply@localhost>".into()
}

/// `[mail]`: where mail goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum MailConfig {
    /// `.eml` files in an outbox folder.
    File {
        /// Defaults to `<data_dir>/outbox`.
        #[serde(default)]
        path: Option<PathBuf>,
        #[serde(default = "default_from")]
        from: String,
    },
    Smtp {
        /// `smtp://user:pass@host:587?tls=required` (STARTTLS) or `smtps://…:465` (TLS); or use
        /// `host` etc.
        #[serde(default)]
        url: Option<SecretUrl>,
        #[serde(default)]
        host: Option<String>,
        #[serde(default, deserialize_with = "lenient::option")]
        port: Option<u16>,
        #[serde(default)]
        user: Option<String>,
        #[serde(default)]
        password: Option<Secret>,
        /// Implicit TLS (port 465) instead of STARTTLS.
        #[serde(default, deserialize_with = "lenient::value")]
        secure: bool,
        #[serde(default = "default_from")]
        from: String,
    },
}

impl Default for MailConfig {
    fn default() -> Self {
        Self::File {
            path: None,
            from: default_from(),
        }
    }
}

impl MailConfig {
    pub fn from(&self) -> &str {
        match self {
            Self::File { from, .. } | Self::Smtp { from, .. } => from,
        }
    }
}

/// The mailer `config` names.
pub fn build(config: &MailConfig, data_dir: &Path) -> Result<Arc<dyn Mailer>, MailError> {
    let from: Mailbox = config
        .from()
        .parse()
        .map_err(|_| MailError::InvalidAddress(config.from().to_owned()))?;
    Ok(match config {
        MailConfig::File { path, .. } => {
            let dir = path.clone().unwrap_or_else(|| data_dir.join("outbox"));
            std::fs::create_dir_all(&dir).map_err(|e| MailError::Unavailable(Box::new(e)))?;
            Arc::new(FileMailer { dir, from })
        }
        MailConfig::Smtp {
            url,
            host,
            port,
            user,
            password,
            secure,
            ..
        } => {
            let unavailable =
                |e: lettre::transport::smtp::Error| MailError::Unavailable(Box::new(e));
            let mut builder = match (url, host) {
                (Some(url), _) => {
                    AsyncSmtpTransport::<Tokio1Executor>::from_url(url.expose().as_str())
                        .map_err(unavailable)?
                }
                (None, Some(host)) if *secure => {
                    AsyncSmtpTransport::<Tokio1Executor>::relay(host).map_err(unavailable)?
                }
                (None, Some(host)) => AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(host)
                    .map_err(unavailable)?,
                (None, None) => {
                    return Err(MailError::Rejected(
                        "mail.kind = smtp needs mail.url or mail.host".into(),
                    ));
                }
            };
            if let Some(port) = port {
                builder = builder.port(*port);
            }
            if let (Some(user), Some(password)) = (user, password) {
                builder = builder
                    .credentials(Credentials::new(user.clone(), password.expose().to_owned()));
            }
            let transport = builder.timeout(Some(Duration::from_secs(10))).build();
            Arc::new(SmtpMailer { transport, from })
        }
    })
}

/// The message for `mail`, from `from`.
fn message(from: &Mailbox, mail: &Mail) -> Result<Message, MailError> {
    let to: Mailbox = mail
        .to
        .parse()
        .map_err(|_| MailError::InvalidAddress(mail.to.clone()))?;
    let builder = Message::builder()
        .from(from.clone())
        .to(to)
        .subject(mail.subject.clone())
        .message_id(Some(format!("<{}>", mail.message_id())));
    let built = match &mail.html {
        Some(html) => builder.multipart(MultiPart::alternative_plain_html(
            mail.text.clone(),
            html.clone(),
        )),
        None => builder.singlepart(
            SinglePart::builder()
                .header(ContentType::TEXT_PLAIN)
                .body(mail.text.clone()),
        ),
    };
    built.map_err(|e| MailError::Rejected(e.to_string()))
}

pub struct FileMailer {
    dir: PathBuf,
    from: Mailbox,
}

#[async_trait]
impl HealthCheck for FileMailer {
    async fn health(&self) -> ComponentHealth {
        if self.dir.is_dir() {
            ComponentHealth::new(HealthStatus::Ok, "file")
        } else {
            ComponentHealth::new(HealthStatus::Down, "file")
                .with_error("the outbox folder is missing")
        }
    }
}

#[async_trait]
impl Mailer for FileMailer {
    async fn send(&self, mail: &Mail) -> Result<(), MailError> {
        let bytes = message(&self.from, mail)?.formatted();
        let millis = chrono::Utc::now().timestamp_millis();
        let name = format!("{millis}-{}.eml", mail.id);
        let (dir, tmp) = (self.dir.clone(), self.dir.join(format!(".{name}.tmp")));
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            use std::io::Write;
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(&bytes)?;
            file.sync_all()?;
            std::fs::rename(&tmp, dir.join(name))
        })
        .await
        .map_err(|e| MailError::Unavailable(Box::new(e)))?
        .map_err(|e| MailError::Unavailable(Box::new(e)))
    }
}

pub struct SmtpMailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
}

#[async_trait]
impl HealthCheck for SmtpMailer {
    async fn health(&self) -> ComponentHealth {
        let started = std::time::Instant::now();
        match self.transport.test_connection().await {
            Ok(true) => {
                ComponentHealth::new(HealthStatus::Ok, "smtp").with_latency(started.elapsed())
            }
            Ok(false) => ComponentHealth::new(HealthStatus::Down, "smtp")
                .with_error("the server did not answer NOOP"),
            Err(e) => ComponentHealth::new(HealthStatus::Down, "smtp").with_error(e.to_string()),
        }
    }
}

#[async_trait]
impl Mailer for SmtpMailer {
    async fn send(&self, mail: &Mail) -> Result<(), MailError> {
        let message = message(&self.from, mail)?;
        match self.transport.send(message).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_permanent() => Err(MailError::Rejected(e.to_string())),
            Err(e) => Err(MailError::Unavailable(Box::new(e))),
        }
    }
}
