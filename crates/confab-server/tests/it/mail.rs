//! Mail end to end: queued → rendered → delivered once; failures retried, dead-lettered,
//! replayed (SPEC §9, issue 4).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use confab_core::domain::{EventId, now};
use confab_core::ports::broker::{Envelope, queues};
use confab_core::ports::health::{ComponentHealth, HealthCheck};
use confab_core::ports::mailer::{Mail, MailError, Mailer};
use confab_core::testing::eventually;
use confab_server::mail::{MailOutcome, deliver};
use confab_server::startup::Overrides;

use crate::helpers::{spawn_app, spawn_app_with};

fn verify_mail() -> Envelope {
    Envelope {
        id: EventId::new(),
        kind: "mail.verify_email".into(),
        attempt: 0,
        created_at: now(),
        trace_id: None,
        payload: serde_json::json!({
            "template": "verify_email",
            "to": "ann@example.com",
            "vars": {"name": "Ann", "token": "tok-123"}
        }),
    }
}

fn eml_files(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "eml"))
                .map(|e| std::fs::read_to_string(e.path()).unwrap())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_mail_is_rendered_and_delivered_once_even_when_redelivered() {
    let app = spawn_app().await;
    let outbox = app.data_dir.join("outbox");
    let mail = verify_mail();
    app.state.broker.publish(queues::MAIL, &mail).await.unwrap();
    eventually(
        "the mail worker delivered it",
        Duration::from_secs(10),
        || async { eml_files(&outbox).len() == 1 },
    )
    .await;
    let eml = &eml_files(&outbox)[0];
    assert!(eml.contains("To: ann@example.com"), "{eml}");
    assert!(eml.contains("Subject: Confirm your email address"), "{eml}");
    assert!(
        eml.contains("http://localhost:8080/verify-email?token=tok-123"),
        "links use APP_URL: {eml}"
    );
    assert!(eml.contains(&format!("{}@confab", mail.id)), "{eml}");

    // The same envelope again (a redelivery after a lost ack): acknowledged, not re-sent.
    app.state.broker.publish(queues::MAIL, &mail).await.unwrap();
    eventually(
        "the duplicate is settled",
        Duration::from_secs(10),
        || async { app.state.broker.depth(queues::MAIL).await.unwrap().pending == 0 },
    )
    .await;
    assert_eq!(eml_files(&outbox).len(), 1, "sent once");
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains(r#"mail_sent_total{outcome="sent"}"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"mail_sent_total{outcome="duplicate"}"#),
        "{metrics}"
    );
}

/// A mail server that is down while `down` is set.
struct Flaky {
    inner: Arc<dyn Mailer>,
    down: AtomicBool,
}

#[async_trait]
impl HealthCheck for Flaky {
    async fn health(&self) -> ComponentHealth {
        self.inner.health().await
    }
}

#[async_trait]
impl Mailer for Flaky {
    async fn send(&self, mail: &Mail) -> Result<(), MailError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(MailError::Unavailable("connection refused".into()));
        }
        self.inner.send(mail).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mail_server_outage_means_retries_then_a_dead_letter_then_replay_delivers() {
    let app = spawn_app_with(
        |c| {
            c.queue = confab_server::config::QueueConfig::Database {
                max_attempts: 3,
                retry_base_ms: 50,
                visibility_timeout_secs: 30,
            };
        },
        Overrides::default(),
    )
    .await;
    let (store, broker) = (app.state.store.clone(), app.state.broker.clone());
    let mailer = Flaky {
        inner: app.state.mailer.clone(),
        down: AtomicBool::new(true),
    };
    // A queue of this test's own: the server's mail worker consumes `mail`, not this one.
    let queue = "mail-outage-test";
    broker.publish(queue, &verify_mail()).await.unwrap();

    let mut failures = 0;
    while broker.depth(queue).await.unwrap().dead == 0 {
        for d in broker
            .receive(queue, 1, Duration::from_secs(5))
            .await
            .unwrap()
        {
            let outcome = deliver(&*store, &*broker, &mailer, &app.state.templates, &d)
                .await
                .unwrap();
            assert_eq!(outcome, MailOutcome::Failed);
            failures += 1;
        }
    }
    assert_eq!(failures, 3, "every attempt was tried");
    let dead = broker.dead_letters(queue, 10).await.unwrap();
    assert!(
        dead[0].last_error.contains("connection refused"),
        "{}",
        dead[0].last_error
    );
    assert!(eml_files(&app.data_dir.join("outbox")).is_empty());

    mailer.down.store(false, Ordering::SeqCst);
    assert_eq!(broker.replay_dead_letters(queue).await.unwrap(), 1);
    let replayed = broker
        .receive(queue, 1, Duration::from_secs(5))
        .await
        .unwrap();
    let outcome = deliver(
        &*store,
        &*broker,
        &mailer,
        &app.state.templates,
        &replayed[0],
    )
    .await
    .unwrap();
    assert_eq!(outcome, MailOutcome::Sent);
    assert_eq!(
        eml_files(&app.data_dir.join("outbox")).len(),
        1,
        "the replay delivered it"
    );
    assert_eq!(
        broker.depth(queue).await.unwrap(),
        confab_core::ports::broker::QueueDepth::default()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mail_that_cannot_be_rendered_is_retried_not_lost() {
    let app = spawn_app().await;
    let queue = "mail-bad-payload-test";
    let mut bad = verify_mail();
    bad.payload = serde_json::json!({"template": "verify_email", "to": "ann@example.com", "vars": {"name": "Ann"}});
    app.state.broker.publish(queue, &bad).await.unwrap();
    let got = app
        .state
        .broker
        .receive(queue, 1, Duration::from_secs(5))
        .await
        .unwrap();
    let outcome = deliver(
        &*app.state.store,
        &*app.state.broker,
        &*app.state.mailer,
        &app.state.templates,
        &got[0],
    )
    .await
    .unwrap();
    assert_eq!(outcome, MailOutcome::Failed);
    assert_eq!(
        app.state.broker.depth(queue).await.unwrap().pending,
        1,
        "kept for a retry, then its dead letter"
    );
}

/// An aiosmtpd of the test's own on a free port, writing to a Maildir, to stop and start.
struct TempSmtp {
    port: u16,
    python: String,
    maildir: tempfile::TempDir,
    child: Option<std::process::Child>,
}

impl TempSmtp {
    fn new() -> Option<Self> {
        let python = confab_core::testing::service_url("TEST_SMTP_PYTHON", "SMTP outage")?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let maildir = tempfile::tempdir().unwrap();
        for sub in ["tmp", "new", "cur"] {
            std::fs::create_dir_all(maildir.path().join(sub)).unwrap();
        }
        Some(Self {
            port,
            python,
            maildir,
            child: None,
        })
    }

    fn start(&mut self) {
        let child = std::process::Command::new(&self.python)
            .args([
                "-m",
                "aiosmtpd",
                "-n",
                "-l",
                &format!("127.0.0.1:{}", self.port),
            ])
            .args(["-c", "aiosmtpd.handlers.Mailbox"])
            .arg(self.maildir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("aiosmtpd starts");
        self.child = Some(child);
        let started = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "aiosmtpd did not listen"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn delivered(&self) -> Vec<String> {
        std::fs::read_dir(self.maildir.path().join("new"))
            .unwrap()
            .flatten()
            .map(|e| std::fs::read_to_string(e.path()).unwrap())
            .collect()
    }
}

impl Drop for TempSmtp {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_smtp_server_down_mail_is_retried_dead_lettered_and_replay_delivers_it() {
    let Some(mut sink) = TempSmtp::new() else {
        return;
    };
    let url = confab_server::config::SecretUrl::parse(&format!("smtp://127.0.0.1:{}", sink.port))
        .unwrap();
    let app = spawn_app_with(
        |c| {
            c.mail = confab_server::config::MailConfig::Smtp {
                url: Some(url),
                host: None,
                port: None,
                user: None,
                password: None,
                secure: false,
                from: "Chat <no-reply@example.com>".into(),
            };
            c.queue = confab_server::config::QueueConfig::Database {
                max_attempts: 3,
                retry_base_ms: 50,
                visibility_timeout_secs: 30,
            };
        },
        Overrides::default(),
    )
    .await;
    let broker = app.state.broker.clone();
    let mail = verify_mail();
    // The sink is not running: the server's mail worker tries, retries, and gives up.
    broker.publish(queues::MAIL, &mail).await.unwrap();
    eventually(
        "the mail is dead-lettered",
        Duration::from_secs(15),
        || async { broker.depth(queues::MAIL).await.unwrap().dead == 1 },
    )
    .await;
    let dead = broker.dead_letters(queues::MAIL, 10).await.unwrap();
    assert_eq!(dead[0].envelope.id, mail.id);
    assert!(
        dead[0].last_error.contains("unavailable"),
        "{}",
        dead[0].last_error
    );

    sink.start();
    assert_eq!(broker.replay_dead_letters(queues::MAIL).await.unwrap(), 1);
    eventually(
        "the replayed mail reaches the SMTP server",
        Duration::from_secs(15),
        || async { !sink.delivered().is_empty() },
    )
    .await;
    let delivered = sink.delivered();
    assert_eq!(delivered.len(), 1, "delivered once");
    assert!(
        delivered[0].contains("verify-email?token=tok-123"),
        "{}",
        delivered[0]
    );
}
