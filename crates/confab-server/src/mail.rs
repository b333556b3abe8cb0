//! Mail from the `mail` queue: templates (SPEC §9) and the worker's handling of one message.
//!
//! A queue message asks for a template by name, a recipient and the template's variables:
//! `{"template": "verify_email", "to": "ann@example.com", "vars": {"name": "Ann", "token": "…"}}`.
//! Each template is a `.txt` (its first line `Subject: …`) and an `.html`, built in and
//! replaceable by a file of the same name in `server.mail_templates_dir`. `app_url` is always
//! available to them, so links are built from the configured public URL.

use std::collections::BTreeMap;
use std::path::Path;

use confab_core::domain::now;
use confab_core::ports::broker::{Broker, Delivery};
use confab_core::ports::mailer::{Mail, MailError, Mailer};
use confab_core::ports::store::Store;
use serde::Deserialize;

/// The consumer name under which sent mails are recorded (idempotency).
pub const CONSUMER: &str = "mail";

const BUILT_IN: &[(&str, &str)] = &[
    (
        "verify_email.txt",
        include_str!("../templates/mail/verify_email.txt"),
    ),
    (
        "verify_email.html",
        include_str!("../templates/mail/verify_email.html"),
    ),
    (
        "password_reset.txt",
        include_str!("../templates/mail/password_reset.txt"),
    ),
    (
        "password_reset.html",
        include_str!("../templates/mail/password_reset.html"),
    ),
    ("otp.txt", include_str!("../templates/mail/otp.txt")),
    ("otp.html", include_str!("../templates/mail/otp.html")),
    ("welcome.txt", include_str!("../templates/mail/welcome.txt")),
    (
        "welcome.html",
        include_str!("../templates/mail/welcome.html"),
    ),
    (
        "message_digest.txt",
        include_str!("../templates/mail/message_digest.txt"),
    ),
    (
        "message_digest.html",
        include_str!("../templates/mail/message_digest.html"),
    ),
];

/// The variables each template needs (a mail with a missing one is not sent half-made).
const REQUIRED: &[(&str, &[&str])] = &[
    ("verify_email", &["name", "token"]),
    ("password_reset", &["name", "token"]),
    ("otp", &["code"]),
    ("welcome", &["name"]),
    ("message_digest", &["name", "count", "chat_name", "chat_id"]),
];

/// What a `mail` queue message asks for.
#[derive(Debug, Clone, Deserialize)]
pub struct MailRequest {
    pub template: String,
    pub to: String,
    #[serde(default)]
    pub vars: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("no mail template named {0:?}")]
    Unknown(String),
    #[error("the {template} mail needs the variable {variable:?}")]
    Missing {
        template: String,
        variable: &'static str,
    },
    #[error("the {0} template has no first line `Subject: …`")]
    NoSubject(String),
    #[error("cannot read the mail template {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Render(#[from] minijinja::Error),
}

/// The templates in force.
pub struct Templates {
    env: minijinja::Environment<'static>,
    app_url: String,
}

impl Templates {
    /// The built-in templates, each replaced by `<dir>/<name>` when that file exists.
    pub fn load(overrides: Option<&Path>, app_url: &str) -> Result<Self, TemplateError> {
        let mut env = minijinja::Environment::new();
        env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
        for (name, built_in) in BUILT_IN {
            let source = match overrides.map(|dir| dir.join(name)) {
                Some(path) if path.is_file() => {
                    std::fs::read_to_string(&path).map_err(|source| TemplateError::Read {
                        path: path.display().to_string(),
                        source,
                    })?
                }
                _ => (*built_in).to_owned(),
            };
            env.add_template_owned((*name).to_owned(), source)?;
        }
        Ok(Self {
            env,
            app_url: app_url.trim_end_matches('/').to_owned(),
        })
    }

    /// The mail for `request` (its id is the queue message's).
    pub fn render(
        &self,
        id: confab_core::domain::EventId,
        request: &MailRequest,
    ) -> Result<Mail, TemplateError> {
        let Some((_, required)) = REQUIRED.iter().find(|(n, _)| *n == request.template) else {
            return Err(TemplateError::Unknown(request.template.clone()));
        };
        if let Some(variable) = required.iter().find(|v| !request.vars.contains_key(**v)) {
            return Err(TemplateError::Missing {
                template: request.template.clone(),
                variable,
            });
        }
        let mut vars = request.vars.clone();
        vars.insert("app_url".into(), self.app_url.clone().into());
        let vars = minijinja::Value::from(minijinja::value::Serde(&vars));
        let text = self
            .env
            .get_template(&format!("{}.txt", request.template))?
            .render(&vars)?;
        let html = self
            .env
            .get_template(&format!("{}.html", request.template))?
            .render(&vars)?;
        let (first, body) = text.split_once('\n').unwrap_or((&text, ""));
        let subject = first
            .strip_prefix("Subject:")
            .ok_or_else(|| TemplateError::NoSubject(request.template.clone()))?
            .trim()
            .to_owned();
        Ok(Mail {
            id,
            to: request.to.clone(),
            subject,
            text: body.trim_start_matches('\n').to_owned(),
            html: Some(html),
        })
    }
}

/// What handling one `mail` delivery did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MailOutcome {
    Sent,
    /// Already sent for this envelope: acknowledged, not sent again.
    Duplicate,
    /// Sending failed: the delivery was nacked (retried later, dead-lettered at the end).
    Failed,
}

/// Sends the mail a delivery asks for, once: a redelivered envelope that was already sent is
/// only acknowledged. A failure never reaches the request that queued the mail; it is retried
/// and finally dead-lettered (`confab queue dlq …`).
pub async fn deliver(
    store: &dyn Store,
    broker: &dyn Broker,
    mailer: &dyn Mailer,
    templates: &Templates,
    delivery: &Delivery,
) -> Result<MailOutcome, anyhow::Error> {
    let id = delivery.envelope.id;
    if store.was_processed(CONSUMER, id).await? {
        broker.ack(delivery).await?;
        metrics::counter!("mail_sent_total", "outcome" => "duplicate").increment(1);
        return Ok(MailOutcome::Duplicate);
    }
    let rendered = serde_json::from_value::<MailRequest>(delivery.envelope.payload.clone())
        .map_err(|e| format!("not a mail request: {e}"))
        .and_then(|request| templates.render(id, &request).map_err(|e| e.to_string()));
    let sent = match rendered {
        Ok(mail) => mailer.send(&mail).await.map_err(|e| match e {
            MailError::Unavailable(cause) => format!("the mail server is unavailable: {cause}"),
            other => other.to_string(),
        }),
        Err(problem) => Err(problem),
    };
    match sent {
        Ok(()) => {
            // Sent: record it before acknowledging, so a redelivery is recognised. (A crash in
            // between sends it twice; an external effect cannot share our transaction.)
            match store.mark_processed(CONSUMER, id, now()).await {
                Ok(()) | Err(confab_core::ports::store::StoreError::Conflict(_)) => {}
                Err(e) => return Err(e.into()),
            }
            broker.ack(delivery).await?;
            metrics::counter!("mail_sent_total", "outcome" => "sent").increment(1);
            Ok(MailOutcome::Sent)
        }
        Err(problem) => {
            tracing::warn!(mail = %id, attempt = delivery.envelope.attempt, error = %problem, "Mail not sent; it will be retried.");
            broker.nack(delivery, &problem).await?;
            metrics::counter!("mail_sent_total", "outcome" => "failed").increment(1);
            Ok(MailOutcome::Failed)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(template: &str, vars: serde_json::Value) -> MailRequest {
        MailRequest {
            template: template.into(),
            to: "ann@example.com".into(),
            vars: serde_json::from_value(vars).unwrap(),
        }
    }

    #[test]
    fn every_built_in_template_renders_with_links_from_the_app_url() {
        let t = Templates::load(None, "https://chat.example.com/").unwrap();
        let id = confab_core::domain::EventId::new();
        let verify = t
            .render(
                id,
                &request(
                    "verify_email",
                    serde_json::json!({"name": "Ann", "token": "t0k"}),
                ),
            )
            .unwrap();
        assert_eq!(verify.subject, "Confirm your email address");
        assert!(
            verify
                .text
                .contains("https://chat.example.com/verify-email?token=t0k"),
            "{}",
            verify.text
        );
        assert!(
            verify
                .html
                .unwrap()
                .contains("https://chat.example.com/verify-email?token=t0k")
        );
        let reset = t
            .render(
                id,
                &request(
                    "password_reset",
                    serde_json::json!({"name": "Ann", "token": "r"}),
                ),
            )
            .unwrap();
        assert!(
            reset
                .text
                .contains("https://chat.example.com/reset-password?token=r")
        );
        let otp = t
            .render(id, &request("otp", serde_json::json!({"code": "123456"})))
            .unwrap();
        assert_eq!(otp.subject, "Your sign-in code: 123456");
        t.render(id, &request("welcome", serde_json::json!({"name": "Ann"})))
            .unwrap();
        let digest = t
            .render(id, &request("message_digest", serde_json::json!({"name": "Ann", "count": 3, "chat_name": "Team", "chat_id": "c1"})))
            .unwrap();
        assert_eq!(digest.subject, "3 new messages in Team");
    }

    #[test]
    fn html_escapes_variables_and_missing_variables_are_errors() {
        let t = Templates::load(None, "http://localhost:8080").unwrap();
        let id = confab_core::domain::EventId::new();
        let mail = t
            .render(
                id,
                &request("welcome", serde_json::json!({"name": "<script>x</script>"})),
            )
            .unwrap();
        assert!(!mail.html.unwrap().contains("<script>"), "escaped in HTML");
        assert!(
            t.render(
                id,
                &request("verify_email", serde_json::json!({"name": "Ann"}))
            )
            .is_err(),
            "token missing"
        );
        assert!(matches!(
            t.render(id, &request("nope", serde_json::json!({}))),
            Err(TemplateError::Unknown(_))
        ));
    }

    #[test]
    fn a_template_file_in_the_folder_replaces_the_built_in_one() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("welcome.txt"),
            "Subject: Hi from us\n\nCustom {{ name }} at {{ app_url }}",
        )
        .unwrap();
        let t = Templates::load(Some(dir.path()), "http://x.test").unwrap();
        let mail = t
            .render(
                confab_core::domain::EventId::new(),
                &request("welcome", serde_json::json!({"name": "Ann"})),
            )
            .unwrap();
        assert_eq!(mail.subject, "Hi from us");
        assert_eq!(mail.text, "Custom Ann at http://x.test");
    }
}
