//! The `Mailer` conformance suite: the contract in `ports::mailer`, case by case.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::domain::EventId;
use crate::ports::health::HealthStatus;
use crate::ports::mailer::{Mail, MailError, Mailer};

/// Runs every case. `delivered()` returns the raw messages (RFC 5322 text) that have arrived
/// where this mailer delivers.
pub async fn run_all<D, DFut>(mailer: Arc<dyn Mailer>, delivered: D)
where
    D: Fn() -> DFut,
    DFut: Future<Output = Vec<String>>,
{
    eprintln!("mailer suite: a_text_and_html_mail_arrives_whole");
    a_text_and_html_mail_arrives_whole(&*mailer, &delivered).await;
    eprintln!("mailer suite: a_bad_address_is_refused_not_retried");
    a_bad_address_is_refused_not_retried(&*mailer).await;
    eprintln!("mailer suite: health_is_ok_with_a_kind");
    let health = mailer.health().await;
    assert_eq!(health.status, HealthStatus::Ok, "{health:?}");
    assert!(
        matches!(health.kind.as_str(), "file" | "smtp"),
        "{}",
        health.kind
    );
}

async fn a_text_and_html_mail_arrives_whole<D, DFut>(mailer: &dyn Mailer, delivered: &D)
where
    D: Fn() -> DFut,
    DFut: Future<Output = Vec<String>>,
{
    let mail = Mail {
        id: EventId::new(),
        to: "ann@example.com".into(),
        subject: "Verify your email".into(),
        text: "Open http://localhost:8080/verify-email?token=abc to verify.".into(),
        html: Some(
            "<p><a href=\"http://localhost:8080/verify-email?token=abc\">Verify</a></p>".into(),
        ),
    };
    mailer.send(&mail).await.unwrap();
    let message_id = mail.message_id();
    let started = std::time::Instant::now();
    let raw = loop {
        if let Some(raw) = delivered()
            .await
            .into_iter()
            .find(|m| m.contains(&message_id))
        {
            break raw;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the mail was not delivered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for expected in [
        "To: ann@example.com",
        "Subject: Verify your email",
        "multipart/alternative",
        "text/plain",
        "text/html",
        "verify-email?token=abc",
    ] {
        assert!(raw.contains(expected), "{expected:?} missing in:\n{raw}");
    }
}

async fn a_bad_address_is_refused_not_retried(mailer: &dyn Mailer) {
    let mail = Mail {
        id: EventId::new(),
        to: "not an address".into(),
        subject: "x".into(),
        text: "x".into(),
        html: None,
    };
    let err = mailer.send(&mail).await.unwrap_err();
    assert!(matches!(err, MailError::InvalidAddress(_)), "{err:?}");
}
