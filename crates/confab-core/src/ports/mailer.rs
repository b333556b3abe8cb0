//! The `Mailer` port: outgoing mail (SPEC §9). `.eml` files embedded, SMTP in production.
//!
//! # Contract (tested by `testing::mailer::run_all` against every implementation)
//!
//! - `send` returns `Ok` once the mail is handed over: written whole to the outbox, or
//!   accepted by the SMTP server. Its `Message-ID` is derived from [`Mail::id`], so a resend of
//!   the same mail is recognisably the same message.
//! - A mail with a plain-text and an HTML body is sent as `multipart/alternative`.
//! - Failures say whether trying again may help: [`MailError::Unavailable`] (server down,
//!   timeout, 4xx) is retried by the mail worker; [`MailError::Rejected`] (5xx) and
//!   [`MailError::InvalidAddress`] are not.

use async_trait::async_trait;

use super::health::HealthCheck;
use crate::domain::EventId;
use crate::error::BoxError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mail {
    /// The envelope id of the `mail` queue message that asked for it.
    pub id: EventId,
    pub to: String,
    pub subject: String,
    pub text: String,
    pub html: Option<String>,
}

impl Mail {
    /// The `Message-ID` header (without angle brackets).
    pub fn message_id(&self) -> String {
        format!("{}@confab", self.id)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MailError {
    /// The address is kept for the caller but never printed: addresses are personal data.
    #[error("not a valid mail address")]
    InvalidAddress(String),
    /// Worth retrying: the server is unreachable, timed out or said "try later".
    #[error("the mail server is unavailable")]
    Unavailable(#[source] BoxError),
    /// Not worth retrying: the server refused the message for good.
    #[error("the mail server refused the message: {0}")]
    Rejected(String),
}

#[async_trait]
pub trait Mailer: HealthCheck {
    async fn send(&self, mail: &Mail) -> Result<(), MailError>;
}
