//! Accounts and sign-in over HTTP (SPEC §3 "Accounts and auth", "Users"), as a client uses
//! them: mail read from the .eml outbox, tokens refreshed, reused, revoked.

use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use confab_adapters::testing::TempDatabase;
use confab_core::domain::{RefreshFamilyId, UserId, now};
use confab_core::services::auth::SigningKey;
use confab_core::services::auth::jwt::AccessTokens;
use confab_core::testing::{service_url, unique};
use confab_server::config::{
    CacheConfig, Config, DatabaseConfig, PoolConfig, QueueConfig, SecretUrl,
};
use confab_server::startup::Overrides;
use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{TestApp, assert_error, spawn_app_with};

pub const PASSWORD: &str = "correct horse battery";
const SECRET: &str = "test-secret-test-secret-test-secret!";

/// Auth tests: the client address from `x-forwarded-for` (so a test can be many clients),
/// and limits high enough not to get in the way unless a test is about them.
pub fn auth_config(c: &mut Config) {
    c.server.client_ip_header = Some("x-forwarded-for".into());
    c.auth.rate_limit_per_ip_per_minute = 100_000;
    c.auth.rate_limit_per_email_per_minute = 100_000;
}

/// The backends a test runs on: embedded, or PostgreSQL + Redis + RabbitMQ (a fresh
/// database, and a cache prefix and queue prefix of its own, so tests running side by side
/// share nothing).
pub struct Backend(Option<Services>);

pub struct Services {
    db: TempDatabase,
    redis: String,
    amqp: String,
}

impl Backend {
    pub const EMBEDDED: Self = Self(None);

    /// The real services, when `TEST_DATABASE_URL`, `TEST_REDIS_URL` and `TEST_AMQP_URL` name
    /// them (a skip line otherwise; a failure under `CI=true`).
    pub async fn services() -> Option<Self> {
        let what = "auth on PostgreSQL + Redis + RabbitMQ";
        let db = service_url("TEST_DATABASE_URL", what)?;
        let redis = service_url("TEST_REDIS_URL", what)?;
        let amqp = service_url("TEST_AMQP_URL", what)?;
        Some(Self(Some(Services {
            db: TempDatabase::create(&db).await,
            redis,
            amqp,
        })))
    }

    pub fn apply(&self, c: &mut Config) {
        let Some(services) = &self.0 else {
            return;
        };
        c.database = DatabaseConfig::Postgres {
            url: SecretUrl::parse(&services.db.url).unwrap(),
            replica_url: None,
            pool: PoolConfig::default(),
        };
        c.cache = CacheConfig::Redis {
            url: SecretUrl::parse(&services.redis).unwrap(),
            key_prefix: format!("{}:", unique("confab-test")),
        };
        c.queue = QueueConfig::Rabbitmq {
            url: SecretUrl::parse(&services.amqp).unwrap(),
            max_attempts: 5,
            retry_base_ms: 200,
            visibility_timeout_secs: 30,
            queue_prefix: format!("{}.", unique("t")),
            idle_queue_expiry_secs: Some(60),
        };
    }

    pub async fn drop(self) {
        if let Some(services) = self.0 {
            services.db.drop().await;
        }
    }
}

pub async fn auth_app(backend: &Backend, configure: impl FnOnce(&mut Config)) -> TestApp {
    spawn_app_with(
        |c| {
            backend.apply(c);
            auth_config(c);
            configure(c);
        },
        Overrides::default(),
    )
    .await
}

/// A request from client address `ip`.
pub async fn call_from(
    app: &TestApp,
    ip: &str,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> reqwest::Response {
    let mut request = app
        .client
        .request(method, app.url(path))
        .header("x-forwarded-for", ip);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    request.send().await.expect("the request is answered")
}

pub async fn call(
    app: &TestApp,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> reqwest::Response {
    call_from(app, "10.0.0.1", method, path, token, body).await
}

async fn json_of(response: reqwest::Response, status: u16) -> Value {
    let got = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    assert_eq!(got, status, "{body}");
    body
}

/// A registered user: id and access token.
pub struct Person {
    pub id: String,
    pub token: String,
}

/// Registers a fresh user whose address starts with `tag`.
pub async fn person(app: &TestApp, tag: &str) -> Person {
    let session = register(app, &unique_email(tag)).await;
    Person {
        id: session["user"]["id"].as_str().unwrap().to_owned(),
        token: session["accessToken"].as_str().unwrap().to_owned(),
    }
}

/// Registers `email` and returns the session body.
pub async fn register(app: &TestApp, email: &str) -> Value {
    let response = call(
        app,
        Method::POST,
        "/api/v1/auth/register",
        None,
        Some(json!({"email": email, "password": PASSWORD, "name": "Ann Example"})),
    )
    .await;
    json_of(response, 201).await
}

async fn login(app: &TestApp, email: &str, password: &str) -> reqwest::Response {
    call(
        app,
        Method::POST,
        "/api/v1/auth/login",
        None,
        Some(json!({"email": email, "password": password})),
    )
    .await
}

async fn refresh(app: &TestApp, token: &str) -> reqwest::Response {
    call(
        app,
        Method::POST,
        "/api/v1/auth/refresh",
        None,
        Some(json!({ "refreshToken": token })),
    )
    .await
}

pub fn unique_email(tag: &str) -> String {
    format!("{}@example.com", unique(tag)).to_lowercase()
}

/// Quoted-printable, as mail bodies may be: soft line breaks and `=XX` escapes.
fn decode_qp(text: &str) -> String {
    let joined = text.replace("=\r\n", "").replace("=\n", "");
    let bytes = joined.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'='
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&joined[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Every mail in the app's .eml outbox to `to`, decoded.
pub fn mails_to(app: &TestApp, to: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(app.data_dir.join("outbox")) else {
        return Vec::new();
    };
    let mut mails: Vec<(std::time::SystemTime, String)> = entries
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "eml"))
        .filter_map(|e| {
            let modified = e.metadata().ok()?.modified().ok()?;
            Some((
                modified,
                decode_qp(&std::fs::read_to_string(e.path()).ok()?),
            ))
        })
        .filter(|(_, mail)| mail.contains(&format!("To: {to}")))
        .collect();
    mails.sort_by_key(|(at, _)| *at);
    mails.into_iter().map(|(_, mail)| mail).collect()
}

/// Waits (polling the outbox) for the `n`-th mail to `to` whose subject contains `subject`.
pub async fn nth_mail(app: &TestApp, to: &str, subject: &str, n: usize) -> String {
    let started = Instant::now();
    loop {
        let found: Vec<String> = mails_to(app, to)
            .into_iter()
            .filter(|m| m.contains(&format!("Subject: {subject}")))
            .collect();
        if found.len() >= n {
            return found[n - 1].clone();
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "no mail {n} {subject:?} to {to}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The token of a link `{APP_URL}{path}?token=…` in a mail.
fn link_token(mail: &str, path: &str) -> String {
    let marker = format!("{path}?token=");
    let start = mail
        .find(&marker)
        .unwrap_or_else(|| panic!("no {path} link in {mail}"))
        + marker.len();
    mail[start..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .collect()
}

fn code_in(mail: &str) -> String {
    let at =
        mail.find("Subject: Your sign-in code: ").unwrap() + "Subject: Your sign-in code: ".len();
    mail[at..at + 6].to_owned()
}

fn no_secrets(body: &Value) {
    let text = body.to_string();
    for forbidden in [
        "passwordHash",
        "password_hash",
        "$argon2",
        "$2b$",
        "tokenHash",
    ] {
        assert!(!text.contains(forbidden), "{forbidden} in {text}");
    }
}

async fn security_event_kinds(app: &TestApp, token: &str) -> Vec<String> {
    let body = json_of(
        call(
            app,
            Method::GET,
            "/api/v1/users/me/security-events",
            Some(token),
            None,
        )
        .await,
        200,
    )
    .await;
    body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_owned())
        .collect()
}

async fn register_verify_login_refresh_then_reuse_kills_the_whole_family(backend: &Backend) {
    let app = auth_app(backend, |c| c.auth.refresh_grace_secs = 0).await;
    let email = unique_email("story");
    let session = register(&app, &email).await;
    no_secrets(&session);
    assert_eq!(session["user"]["email"], email.as_str());
    assert_eq!(session["user"]["emailVerified"], false);
    assert_eq!(session["expiresIn"], 900);
    let access = session["accessToken"].as_str().unwrap().to_owned();

    // Read (and cached) before verification …
    let me = json_of(
        call(&app, Method::GET, "/api/v1/users/me", Some(&access), None).await,
        200,
    )
    .await;
    assert_eq!(me["emailVerified"], false);

    // The verification link arrives through the mail queue.
    let mail = nth_mail(&app, &email, "Confirm your email address", 1).await;
    assert!(
        mail.contains("http://localhost:8080/verify-email?token="),
        "{mail}"
    );
    let token = link_token(&mail, "/verify-email");
    let verified = json_of(
        call(
            &app,
            Method::POST,
            "/api/v1/auth/verify-email",
            None,
            Some(json!({"token": token})),
        )
        .await,
        200,
    )
    .await;
    assert_eq!(verified["emailVerified"], true);
    let again = call(
        &app,
        Method::POST,
        "/api/v1/auth/verify-email",
        None,
        Some(json!({"token": token})),
    )
    .await;
    assert_error(again, 400, "VALIDATION_ERROR").await;
    nth_mail(&app, &email, "Welcome", 1).await;
    let me = json_of(
        call(&app, Method::GET, "/api/v1/users/me", Some(&access), None).await,
        200,
    )
    .await;
    assert_eq!(me["emailVerified"], true);
    no_secrets(&me);

    // Sign in on a second device, then refresh it.
    let second = json_of(login(&app, &email, PASSWORD).await, 200).await;
    let r1 = second["refreshToken"].as_str().unwrap().to_owned();
    let pair = json_of(refresh(&app, &r1).await, 200).await;
    let r2 = pair["refreshToken"].as_str().unwrap().to_owned();
    assert_ne!(r1, r2);
    let fresh_access = pair["accessToken"].as_str().unwrap();
    json_of(
        call(
            &app,
            Method::GET,
            "/api/v1/users/me",
            Some(fresh_access),
            None,
        )
        .await,
        200,
    )
    .await;

    // A thief presents the rotated token: refused, and the whole family dies with it.
    assert_error(refresh(&app, &r1).await, 401, "UNAUTHENTICATED").await;
    assert_error(refresh(&app, &r2).await, 401, "UNAUTHENTICATED").await;
    // The first device's sign-in is a different family and lives on.
    let first_refresh = session["refreshToken"].as_str().unwrap();
    json_of(refresh(&app, first_refresh).await, 200).await;

    let kinds = security_event_kinds(&app, &access).await;
    for kind in ["refresh_reused", "login_succeeded", "email_verified"] {
        assert!(kinds.iter().any(|k| k == kind), "{kind} in {kinds:?}");
    }
    // Newest first: the reuse came after the login.
    let reused = kinds.iter().position(|k| k == "refresh_reused").unwrap();
    let logged_in = kinds.iter().position(|k| k == "login_succeeded").unwrap();
    assert!(reused < logged_in, "{kinds:?}");
}

async fn two_tabs_refreshing_at_once_both_get_the_same_new_pair(backend: &Backend) {
    let app = auth_app(backend, |_| {}).await;
    let email = unique_email("tabs");
    let session = register(&app, &email).await;
    let r1 = session["refreshToken"].as_str().unwrap();
    let (a, b) = tokio::join!(refresh(&app, r1), refresh(&app, r1));
    let (a, b) = (json_of(a, 200).await, json_of(b, 200).await);
    assert_eq!(a["refreshToken"], b["refreshToken"], "the same successor");
    // Within the grace window the old token keeps answering with that successor …
    let c = json_of(refresh(&app, r1).await, 200).await;
    assert_eq!(c["refreshToken"], a["refreshToken"]);
    // … and the family is alive: the successor rotates normally.
    let r2 = a["refreshToken"].as_str().unwrap();
    let next = json_of(refresh(&app, r2).await, 200).await;
    assert_ne!(next["refreshToken"], a["refreshToken"]);
    let me = json_of(
        call(
            &app,
            Method::GET,
            "/api/v1/users/me",
            next["accessToken"].as_str(),
            None,
        )
        .await,
        200,
    )
    .await;
    assert_eq!(me["email"], email.as_str());
}

async fn five_failures_lock_the_account_a_success_resets_the_count_and_the_lock_ends(
    backend: &Backend,
) {
    let app = auth_app(backend, |c| c.auth.lockout_duration_secs = 1).await;
    let email = unique_email("lock");
    register(&app, &email).await;
    // Four failures, then a success: the count starts again.
    for _ in 0..4 {
        assert_error(
            login(&app, &email, "wrong password").await,
            401,
            "UNAUTHENTICATED",
        )
        .await;
    }
    json_of(login(&app, &email, PASSWORD).await, 200).await;
    for _ in 0..4 {
        assert_error(
            login(&app, &email, "wrong password").await,
            401,
            "UNAUTHENTICATED",
        )
        .await;
    }
    // The fifth failure within the window locks; then even the right password gets 423.
    let locked = login(&app, &email, "wrong password").await;
    assert!(locked.headers().contains_key("retry-after"));
    assert_error(locked, 423, "ACCOUNT_LOCKED").await;
    let right = login(&app, &email, PASSWORD).await;
    assert_eq!(right.headers()["retry-after"], "1");
    assert_error(right, 423, "ACCOUNT_LOCKED").await;
    // Once the lock's time has passed, the right password works again.
    let started = Instant::now();
    let session = loop {
        let response = login(&app, &email, PASSWORD).await;
        if response.status() == 200 {
            break response.json::<Value>().await.unwrap();
        }
        assert_eq!(response.status(), 423);
        assert!(started.elapsed() < Duration::from_secs(10), "the lock ends");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let kinds = security_event_kinds(&app, session["accessToken"].as_str().unwrap()).await;
    assert!(kinds.contains(&"account_locked".to_owned()), "{kinds:?}");
    assert!(kinds.contains(&"login_failed".to_owned()), "{kinds:?}");
}

/// The body without its request id, which differs per request by design.
async fn comparable(response: reqwest::Response) -> (u16, Option<String>, Value) {
    let status = response.status().as_u16();
    let retry = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let mut body: Value = response.json().await.unwrap();
    if let Some(map) = body.as_object_mut() {
        map.remove("requestId");
    }
    (status, retry, body)
}

async fn known_and_unknown_emails_get_identical_answers_and_similar_timing(backend: &Backend) {
    let app = auth_app(backend, |c| c.auth.lockout_duration_secs = 600).await;
    let known = unique_email("known");
    let unknown = unique_email("unknown");
    register(&app, &known).await;

    // One password check at the server's cost, timed here between the sign-ins (so under the
    // same load): what an unknown email must cost at least.
    let passwords = std::sync::Arc::new(app.state.config.auth.passwords().unwrap());
    let mut hash_times: Vec<Duration> = Vec::new();
    let mut unknown_times: Vec<Duration> = Vec::new();
    for _ in 0..4 {
        let a = comparable(login(&app, &known, "wrong password").await).await;
        let started = Instant::now();
        let b = comparable(login(&app, &unknown, "wrong password").await).await;
        unknown_times.push(started.elapsed());
        assert_eq!(a, b, "a wrong password and an unknown email look the same");
        let reference = passwords.clone();
        let started = Instant::now();
        tokio::task::spawn_blocking(move || reference.decoy_verify("wrong password"))
            .await
            .unwrap();
        hash_times.push(started.elapsed());
    }
    // The fifth failure locks both alike: locking does not reveal which address exists.
    let a = comparable(login(&app, &known, "wrong password").await).await;
    let b = comparable(login(&app, &unknown, "wrong password").await).await;
    assert_eq!(a.0, 423);
    assert_eq!((a.0, &a.2), (b.0, &b.2));

    for path in ["/api/v1/auth/password/forgot", "/api/v1/auth/otp/request"] {
        let a = comparable(
            call(
                &app,
                Method::POST,
                path,
                None,
                Some(json!({"email": known})),
            )
            .await,
        )
        .await;
        let b = comparable(
            call(
                &app,
                Method::POST,
                path,
                None,
                Some(json!({"email": unknown})),
            )
            .await,
        )
        .await;
        assert_eq!(a, b, "{path}");
        assert_eq!(a.0, 202);
    }
    // An unknown email costs a password hash too: no timing shortcut. (Compared with a known
    // email's sign-in instead, the ratio measured the load: the known one's extra database
    // round trips waited 60 ms on CI's two busy cores, 38 against 125 ms.) The fastest of
    // each are compared: other tests running beside this one only ever add time, and the
    // medians of four once read 36 against 72 ms when a burst of them fell on the checks.
    let h = hash_times.iter().min().unwrap();
    let u = unknown_times.iter().min().unwrap();
    assert!(
        *u * 2 > *h,
        "unknown {u:?} vs one password check {h:?} (fastest of {})",
        hash_times.len()
    );
    nth_mail(&app, &known, "Reset your password", 1).await;
    assert!(
        mails_to(&app, &unknown)
            .iter()
            .all(|m| !m.contains("Reset your password")),
        "no reset mail for an address without an account"
    );
}

async fn auth_endpoints_allow_five_per_minute_per_ip_and_per_email(backend: &Backend) {
    let app = spawn_app_with(
        |c| {
            backend.apply(c);
            c.server.client_ip_header = Some("x-forwarded-for".into());
        },
        Overrides::default(),
    )
    .await;
    let body = |email: &str| Some(json!({"email": email, "password": "wrong password"}));
    // Per IP: five attempts with different emails, then 429 with Retry-After.
    for i in 0..5 {
        let email = format!("ip-{i}@example.com");
        let response = call_from(
            &app,
            "10.1.1.1",
            Method::POST,
            "/api/v1/auth/login",
            None,
            body(&email),
        )
        .await;
        assert_eq!(response.status(), 401);
    }
    let limited = call_from(
        &app,
        "10.1.1.1",
        Method::POST,
        "/api/v1/auth/login",
        None,
        body("ip-6@example.com"),
    )
    .await;
    let retry: u64 = limited.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    assert_error(limited, 429, "RATE_LIMITED").await;
    // Another address is not affected.
    let other = call_from(
        &app,
        "10.1.1.2",
        Method::POST,
        "/api/v1/auth/login",
        None,
        body("ip-0@example.com"),
    )
    .await;
    assert_eq!(other.status(), 401);

    // Per email: five attempts from five addresses, the sixth from a sixth is refused.
    for i in 0..5 {
        let response = call_from(
            &app,
            &format!("10.2.0.{i}"),
            Method::POST,
            "/api/v1/auth/password/forgot",
            None,
            Some(json!({"email": "target@example.com"})),
        )
        .await;
        assert_eq!(response.status(), 202);
    }
    let limited = call_from(
        &app,
        "10.2.0.9",
        Method::POST,
        "/api/v1/auth/password/forgot",
        None,
        Some(json!({"email": "TARGET@example.com"})),
    )
    .await;
    assert_error(limited, 429, "RATE_LIMITED").await;

    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("rate_limited_total{endpoint=\"/api/v1/auth/login\"}")),
        "{metrics}"
    );
}

async fn a_one_time_code_signs_up_allows_five_tries_and_expires(backend: &Backend) {
    // Short enough to wait out, long enough for a code to go through the outbox, the queue
    // (RabbitMQ on the services backend) and the mail worker on a loaded machine.
    let app = auth_app(backend, |c| c.auth.otp_ttl_secs = 4).await;
    let email = unique_email("otp");
    let request = || {
        call(
            &app,
            Method::POST,
            "/api/v1/auth/otp/request",
            None,
            Some(json!({"email": email})),
        )
    };
    let verify = |code: String| {
        call(
            &app,
            Method::POST,
            "/api/v1/auth/otp/verify",
            None,
            Some(json!({"email": email, "code": code})),
        )
    };

    // First use creates the account (passwordless sign-up), verified by the code itself.
    assert_eq!(request().await.status(), 202);
    let code = code_in(&nth_mail(&app, &email, "Your sign-in code", 1).await);
    let session = json_of(verify(code.clone()).await, 200).await;
    assert_eq!(session["user"]["email"], email.as_str());
    assert_eq!(session["user"]["emailVerified"], true);
    assert_error(verify(code).await, 401, "UNAUTHENTICATED").await;

    // Five wrong tries use the code up: the right one no longer works.
    assert_eq!(request().await.status(), 202);
    let code = code_in(&nth_mail(&app, &email, "Your sign-in code", 2).await);
    let wrong = if code == "000000" { "111111" } else { "000000" };
    for _ in 0..5 {
        assert_error(verify(wrong.to_owned()).await, 401, "UNAUTHENTICATED").await;
    }
    assert_error(verify(code).await, 401, "UNAUTHENTICATED").await;

    // A code that outlived its TTL (4 s here) is refused, right or not.
    assert_eq!(request().await.status(), 202);
    let code = code_in(&nth_mail(&app, &email, "Your sign-in code", 3).await);
    let store = app.state.store.clone();
    confab_core::testing::eventually("the code expired", Duration::from_secs(10), || {
        let (store, email) = (store.clone(), email.clone());
        async move {
            store
                .latest_one_time_token(&email, confab_core::domain::TokenPurpose::Otp, now())
                .await
                .unwrap()
                .is_none()
        }
    })
    .await;
    assert_error(verify(code).await, 401, "UNAUTHENTICATED").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_code_sign_up_an_unknown_email_gets_no_code_and_no_account() {
    let app = auth_app(&Backend::EMBEDDED, |c| c.auth.otp_signup = false).await;
    let email = unique_email("nosignup");
    let response = call(
        &app,
        Method::POST,
        "/api/v1/auth/otp/request",
        None,
        Some(json!({"email": email})),
    )
    .await;
    assert_eq!(response.status(), 202);
    let verify = call(
        &app,
        Method::POST,
        "/api/v1/auth/otp/verify",
        None,
        Some(json!({"email": email, "code": "123456"})),
    )
    .await;
    assert_error(verify, 401, "UNAUTHENTICATED").await;
    assert!(
        app.state
            .store
            .user_by_email(&email)
            .await
            .unwrap()
            .is_none()
    );
    // A known address still gets its code.
    let known = unique_email("known");
    register(&app, &known).await;
    call(
        &app,
        Method::POST,
        "/api/v1/auth/otp/request",
        None,
        Some(json!({"email": known})),
    )
    .await;
    let code = code_in(&nth_mail(&app, &known, "Your sign-in code", 1).await);
    let verify = call(
        &app,
        Method::POST,
        "/api/v1/auth/otp/verify",
        None,
        Some(json!({"email": known, "code": code})),
    )
    .await;
    json_of(verify, 200).await;
    assert!(mails_to(&app, &email).is_empty());
}

async fn a_password_reset_sets_the_password_and_ends_every_session(backend: &Backend) {
    let app = auth_app(backend, |_| {}).await;
    let email = unique_email("reset");
    let first = register(&app, &email).await;
    let second = json_of(login(&app, &email, PASSWORD).await, 200).await;
    let forgot = call(
        &app,
        Method::POST,
        "/api/v1/auth/password/forgot",
        None,
        Some(json!({"email": email.to_uppercase()})),
    )
    .await;
    assert_eq!(forgot.status(), 202);
    let mail = nth_mail(&app, &email, "Reset your password", 1).await;
    let token = link_token(&mail, "/reset-password");

    let weak = call(
        &app,
        Method::POST,
        "/api/v1/auth/password/reset",
        None,
        Some(json!({"token": token, "password": "short"})),
    )
    .await;
    let body = assert_error(weak, 400, "VALIDATION_ERROR").await;
    assert_eq!(body["details"]["field"], "password");
    let reset = call(
        &app,
        Method::POST,
        "/api/v1/auth/password/reset",
        None,
        Some(json!({"token": token, "password": "a brand new secret"})),
    )
    .await;
    assert_eq!(reset.status(), 204);
    let reuse = call(
        &app,
        Method::POST,
        "/api/v1/auth/password/reset",
        None,
        Some(json!({"token": token, "password": "yet another secret"})),
    )
    .await;
    assert_error(reuse, 400, "VALIDATION_ERROR").await;

    for session in [&first, &second] {
        let dead = refresh(&app, session["refreshToken"].as_str().unwrap()).await;
        assert_error(dead, 401, "UNAUTHENTICATED").await;
    }
    assert_error(login(&app, &email, PASSWORD).await, 401, "UNAUTHENTICATED").await;
    let session = json_of(login(&app, &email, "a brand new secret").await, 200).await;
    let kinds = security_event_kinds(&app, session["accessToken"].as_str().unwrap()).await;
    assert!(kinds.contains(&"password_reset".to_owned()), "{kinds:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_validates_its_fields_and_refuses_a_taken_email() {
    let app = auth_app(&Backend::EMBEDDED, |_| {}).await;
    let email = unique_email("fields");
    let cases = [
        (
            json!({"email": "not-an-email", "password": PASSWORD, "name": "A"}),
            "email",
        ),
        (
            json!({"email": email, "password": "short", "name": "A"}),
            "password",
        ),
        (
            json!({"email": email, "password": "x".repeat(129), "name": "A"}),
            "password",
        ),
        (
            json!({"email": email, "password": email, "name": "A"}),
            "password",
        ),
        (
            json!({"email": email, "password": PASSWORD, "name": "  "}),
            "name",
        ),
    ];
    for (body, field) in cases {
        let response = call(
            &app,
            Method::POST,
            "/api/v1/auth/register",
            None,
            Some(body),
        )
        .await;
        let error = assert_error(response, 400, "VALIDATION_ERROR").await;
        assert_eq!(error["details"]["field"], field);
    }
    let missing = call(
        &app,
        Method::POST,
        "/api/v1/auth/register",
        None,
        Some(json!({"email": email})),
    )
    .await;
    assert_error(missing, 422, "VALIDATION_ERROR").await;
    register(&app, &email).await;
    let taken = call(
        &app,
        Method::POST,
        "/api/v1/auth/register",
        None,
        Some(json!({"email": email.to_uppercase(), "password": PASSWORD, "name": "B"})),
    )
    .await;
    assert_error(taken, 409, "CONFLICT").await;
}

async fn the_account_can_be_renamed_repassworded_logged_out_and_deleted(backend: &Backend) {
    let app = auth_app(backend, |_| {}).await;
    let email = unique_email("account");
    let session = register(&app, &email).await;
    let access = session["accessToken"].as_str().unwrap().to_owned();
    let other = json_of(login(&app, &email, PASSWORD).await, 200).await;
    let me = json_of(
        call(&app, Method::GET, "/api/v1/users/me", Some(&access), None).await,
        200,
    )
    .await;
    assert_eq!(me["name"], "Ann Example");

    let renamed = json_of(
        call(
            &app,
            Method::PATCH,
            "/api/v1/users/me",
            Some(&access),
            Some(json!({"name": "Ann B."})),
        )
        .await,
        200,
    )
    .await;
    assert_eq!(renamed["name"], "Ann B.");
    let me = json_of(
        call(&app, Method::GET, "/api/v1/users/me", Some(&access), None).await,
        200,
    )
    .await;
    assert_eq!(me["name"], "Ann B.", "no stale cached account");

    let wrong = call(
        &app,
        Method::PUT,
        "/api/v1/users/me/password",
        Some(&access),
        Some(json!({"current": "nope nope", "new": "another long one"})),
    )
    .await;
    assert_error(wrong, 403, "FORBIDDEN").await;
    let changed = json_of(
        call(
            &app,
            Method::PUT,
            "/api/v1/users/me/password",
            Some(&access),
            Some(json!({"current": PASSWORD, "new": "another long one"})),
        )
        .await,
        200,
    )
    .await;
    // Every earlier sign-in ended, access tokens included; the new pair works.
    let old_access = call(&app, Method::GET, "/api/v1/users/me", Some(&access), None).await;
    assert_error(old_access, 401, "UNAUTHENTICATED").await;
    let new_access = changed["accessToken"].as_str().unwrap();
    json_of(
        call(
            &app,
            Method::GET,
            "/api/v1/users/me",
            Some(new_access),
            None,
        )
        .await,
        200,
    )
    .await;
    assert_error(
        refresh(&app, other["refreshToken"].as_str().unwrap()).await,
        401,
        "UNAUTHENTICATED",
    )
    .await;
    let pair = json_of(
        refresh(&app, changed["refreshToken"].as_str().unwrap()).await,
        200,
    )
    .await;
    json_of(login(&app, &email, "another long one").await, 200).await;

    // Logout ends that sign-in; logout-all ends the rest.
    let access = pair["accessToken"].as_str().unwrap().to_owned();
    let logout = call(
        &app,
        Method::POST,
        "/api/v1/auth/logout",
        Some(&access),
        Some(json!({"refreshToken": pair["refreshToken"]})),
    )
    .await;
    assert_eq!(logout.status(), 204);
    assert_error(
        refresh(&app, pair["refreshToken"].as_str().unwrap()).await,
        401,
        "UNAUTHENTICATED",
    )
    .await;
    let another = json_of(login(&app, &email, "another long one").await, 200).await;
    let all = call(
        &app,
        Method::POST,
        "/api/v1/auth/logout-all",
        Some(&access),
        None,
    )
    .await;
    assert_eq!(all.status(), 204);
    assert_error(
        refresh(&app, another["refreshToken"].as_str().unwrap()).await,
        401,
        "UNAUTHENTICATED",
    )
    .await;
    for token in [&access, another["accessToken"].as_str().unwrap()] {
        let ended = call(&app, Method::GET, "/api/v1/users/me", Some(token), None).await;
        assert_error(ended, 401, "UNAUTHENTICATED").await;
    }

    // Deleting the account ends its last sign-in with it.
    let last = json_of(login(&app, &email, "another long one").await, 200).await;
    let access = last["accessToken"].as_str().unwrap().to_owned();
    let deleted = call(
        &app,
        Method::DELETE,
        "/api/v1/users/me",
        Some(&access),
        None,
    )
    .await;
    assert_eq!(deleted.status(), 204);
    assert_error(
        call(&app, Method::GET, "/api/v1/users/me", Some(&access), None).await,
        401,
        "UNAUTHENTICATED",
    )
    .await;
    assert_error(
        login(&app, &email, "another long one").await,
        401,
        "UNAUTHENTICATED",
    )
    .await;
    assert!(
        app.state
            .store
            .user_by_email(&email)
            .await
            .unwrap()
            .is_none()
    );
}

async fn profiles_show_public_fields_and_search_never_matches_an_email_prefix(backend: &Backend) {
    let app = auth_app(backend, |_| {}).await;
    let tag = unique("zed");
    let email = format!("{tag}@example.com").to_lowercase();
    let session = call(
        &app,
        Method::POST,
        "/api/v1/auth/register",
        None,
        Some(json!({"email": email, "password": PASSWORD, "name": format!("{tag} Person")})),
    )
    .await;
    let session = json_of(session, 201).await;
    let access = session["accessToken"].as_str().unwrap();
    let id = session["user"]["id"].as_str().unwrap();

    let profile = json_of(
        call(
            &app,
            Method::GET,
            &format!("/api/v1/users/{id}"),
            Some(access),
            None,
        )
        .await,
        200,
    )
    .await;
    let keys: Vec<&String> = profile.as_object().unwrap().keys().collect();
    assert_eq!(
        keys,
        ["id", "name", "avatarUrl", "online", "lastSeenAt"],
        "{profile}"
    );
    let missing = call(
        &app,
        Method::GET,
        &format!("/api/v1/users/{}", UserId::new()),
        Some(access),
        None,
    )
    .await;
    assert_error(missing, 404, "NOT_FOUND").await;

    let app = &app;
    let search = |q: String| {
        let path = format!("/api/v1/users?q={q}");
        async move { call(app, Method::GET, &path, Some(access), None).await }
    };
    let by_name = json_of(search(tag[..6].to_owned()).await, 200).await;
    assert!(
        by_name["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|u| u["id"] == id),
        "{by_name}"
    );
    let by_email = json_of(search(email.clone()).await, 200).await;
    assert_eq!(by_email["items"].as_array().unwrap().len(), 1);
    assert!(
        by_email["items"][0].get("email").is_none(),
        "no addresses in results"
    );
    let by_email_prefix = json_of(search(email[..email.len() - 4].to_owned()).await, 200).await;
    assert!(
        by_email_prefix["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|u| u["id"] != id)
    );
    assert_error(search(String::new()).await, 400, "VALIDATION_ERROR").await;
}

/// A documented path with every `{parameter}` replaced by a fresh id.
pub fn with_ids(path: &str) -> String {
    path.split('/')
        .map(|segment| {
            if segment.starts_with('{') {
                UserId::new().to_string()
            } else {
                segment.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

fn forged(header: &Value, payload_of: &str) -> String {
    let payload = payload_of.split('.').nth(1).unwrap();
    format!("{}.{payload}.", URL_SAFE_NO_PAD.encode(header.to_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_authenticated_route_admits_only_a_valid_token() {
    let app = auth_app(&Backend::EMBEDDED, |_| {}).await;
    let doc: Value = app.get("/api/v1/openapi.json").await.json().await.unwrap();
    let mut routes = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let secured = op["security"].as_array().is_some_and(|s| !s.is_empty());
            if secured {
                let path = with_ids(path);
                routes.push((
                    Method::from_bytes(method.to_uppercase().as_bytes()).unwrap(),
                    path,
                ));
            }
        }
    }
    assert!(
        routes.len() >= 10,
        "the authenticated routes are documented: {routes:?}"
    );

    let session = register(&app, &unique_email("matrix")).await;
    let valid = session["accessToken"].as_str().unwrap().to_owned();
    let claims = app.state.auth.authenticate(&valid).await.unwrap();
    let ttl = Duration::from_mins(15);
    let ours = AccessTokens::new(
        &SigningKey::Hs256(SECRET.as_bytes().to_vec()),
        ttl,
        Duration::from_secs(30),
    )
    .unwrap();
    let (expired, _) = ours.issue(
        claims.user_id,
        claims.session,
        now() - chrono::Duration::hours(1),
    );
    let theirs = AccessTokens::new(
        &SigningKey::Hs256(b"another-secret-another-secret-another".to_vec()),
        ttl,
        Duration::ZERO,
    )
    .unwrap();
    let (foreign, _) = theirs.issue(claims.user_id, RefreshFamilyId::new(), now());
    let kid = {
        let header = valid.split('.').next().unwrap();
        let header: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).unwrap()).unwrap();
        header["kid"].clone()
    };
    let none = forged(&json!({"alg": "none", "typ": "JWT", "kid": kid}), &valid);
    let hs512 = forged(&json!({"alg": "HS512", "typ": "JWT", "kid": kid}), &valid);
    let refused: [(&str, Option<&str>); 6] = [
        ("no token", None),
        ("expired", Some(&expired)),
        ("another key", Some(&foreign)),
        ("alg none", Some(&none)),
        ("another alg", Some(&hs512)),
        ("garbage", Some("garbage")),
    ];
    for (method, path) in &routes {
        for (what, token) in &refused {
            let response = call(&app, method.clone(), path, *token, Some(json!({}))).await;
            let body = assert_error(response, 401, "UNAUTHENTICATED").await;
            assert!(
                body["message"].as_str().is_some(),
                "{method} {path} with {what}"
            );
        }
        // A valid token gets through (to validation, 404 …, but never 401). Each route gets
        // an account of its own: one of them deletes it.
        let own = register(&app, &unique_email("matrix")).await;
        let token = own["accessToken"].as_str().unwrap();
        let response = call(&app, method.clone(), path, Some(token), Some(json!({}))).await;
        assert_ne!(response.status(), 401, "{method} {path} with a valid token");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_ed25519_key_tokens_are_eddsa_and_the_public_key_is_published() {
    let keys = tempfile::tempdir().unwrap();
    let pem = keys.path().join("ed25519.pem");
    let made = std::process::Command::new("openssl")
        .args(["genpkey", "-algorithm", "ed25519", "-out"])
        .arg(&pem)
        .status()
        .expect("openssl runs");
    assert!(made.success());
    let app = auth_app(&Backend::EMBEDDED, |c| {
        c.auth.jwt_algorithm = confab_server::config::JwtAlgorithm::EdDsa;
        c.auth.jwt_private_key_file = Some(pem);
    })
    .await;
    let session = register(&app, &unique_email("eddsa")).await;
    let access = session["accessToken"].as_str().unwrap();
    let header: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(access.split('.').next().unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(header["alg"], "EdDSA");
    let jwks = json_of(app.get("/.well-known/jwks.json").await, 200).await;
    let key = &jwks["keys"][0];
    assert_eq!(key["kty"], "OKP");
    assert_eq!(key["crv"], "Ed25519");
    assert_eq!(key["kid"], header["kid"]);
    assert!(key.get("d").is_none(), "never the private part: {key}");
    json_of(
        call(&app, Method::GET, "/api/v1/users/me", Some(access), None).await,
        200,
    )
    .await;
    // An HS256 token made with the secret is refused: the algorithm is pinned.
    let hs = AccessTokens::new(
        &SigningKey::Hs256(SECRET.as_bytes().to_vec()),
        Duration::from_mins(15),
        Duration::ZERO,
    )
    .unwrap();
    let claims = app.state.auth.authenticate(access).await.unwrap();
    let (token, _) = hs.issue(claims.user_id, claims.session, now());
    assert_error(
        call(&app, Method::GET, "/api/v1/users/me", Some(&token), None).await,
        401,
        "UNAUTHENTICATED",
    )
    .await;

    // With the shared secret there is nothing to publish.
    let plain = auth_app(&Backend::EMBEDDED, |_| {}).await;
    assert_error(plain.get("/.well-known/jwks.json").await, 404, "NOT_FOUND").await;
}

async fn a_scheduled_job_runs_once_across_nodes_and_purges_expired_tokens(backend: &Backend) {
    let a = auth_app(backend, |_| {}).await;
    let shared = a.data_dir.clone();
    let b = auth_app(backend, move |c| c.server.data_dir = shared).await;
    let user = register(&a, &unique_email("jobs")).await;
    let user_id: UserId = user["user"]["id"].as_str().unwrap().parse().unwrap();
    let family = confab_core::domain::RefreshFamily {
        id: RefreshFamilyId::new(),
        user_id,
        created_at: now() - chrono::Duration::days(31),
        expires_at: now() - chrono::Duration::days(1),
        revoked_at: None,
        revoked_reason: None,
    };
    let token = confab_core::domain::RefreshToken {
        id: confab_core::domain::RefreshTokenId::new(),
        family_id: family.id,
        token_hash: "0".repeat(64),
        created_at: family.created_at,
        expires_at: family.expires_at,
        rotated_at: None,
        replaced_by: None,
    };
    a.state
        .store
        .create_refresh_family(&family, &token)
        .await
        .unwrap();

    // The registration's mail and event leave the outbox; the purge then removes them.
    let store = a.state.store.clone();
    confab_core::testing::eventually("the outbox is published", Duration::from_secs(10), || {
        let store = store.clone();
        async move { store.pending_outbox(10).await.unwrap().is_empty() }
    })
    .await;

    // A period no background tick has claimed: both nodes try at once, one runs it.
    let at = chrono::DateTime::parse_from_rfc3339("2031-01-01T10:30:00Z")
        .unwrap()
        .to_utc();
    let (ran_a, ran_b) = tokio::join!(
        confab_server::jobs::run_due(&a.state, at),
        confab_server::jobs::run_due(&b.state, at)
    );
    // Each job once, on one node or the other.
    assert_eq!(
        ran_a.len() + ran_b.len(),
        confab_server::jobs::ALL.len(),
        "{ran_a:?} {ran_b:?}"
    );
    assert!(
        b.state
            .store
            .refresh_token_by_id(token.id)
            .await
            .unwrap()
            .is_none(),
        "purged"
    );
    assert_eq!(
        b.state.store.purge_published_outbox(now()).await.unwrap(),
        0,
        "published outbox rows (links and codes in their payloads) were purged"
    );
    // The next hour is a new run.
    let next = at + chrono::Duration::hours(1);
    assert_eq!(
        confab_server::jobs::run_due(&b.state, next).await,
        ["purge_expired_tokens"]
    );
    assert!(
        confab_server::jobs::run_due(&a.state, next)
            .await
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imported_bcrypt_accounts_sign_in_and_are_rehashed_with_argon2id() {
    let dir = tempfile::tempdir().unwrap();
    let hash = bcrypt::hash("legacy password", 4).unwrap();
    let php_style = format!("$2y${}", &hash[4..]);
    let (a, b) = (unique_email("imported"), unique_email("imported"));
    let lines = [
        json!({"email": a.to_uppercase(), "name": "Imported A", "passwordHash": hash}).to_string(),
        json!({"email": b, "name": "Imported B", "passwordHash": php_style, "emailVerified": true}).to_string(),
        "this is not json".to_owned(),
        json!({"email": "c@example.com", "name": "C", "passwordHash": "md5:5f4dcc3b5aa765d61d8327deb882cf99"}).to_string(),
    ];
    let file = dir.path().join("users.jsonl");
    std::fs::write(&file, lines.join("\n")).unwrap();
    let import = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_confab"))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("CONFAB_DATA_DIR", dir.path())
            .current_dir(dir.path())
            .args(["users", "import"])
            .arg(&file)
            .output()
            .unwrap()
    };
    let first = import();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&first.stdout),
        String::from_utf8_lossy(&first.stderr),
    );
    assert_eq!(
        first.status.code(),
        Some(1),
        "a rejected line fails the run: {stderr}"
    );
    assert!(
        stdout.contains("imported 2, already present 0, rejected 2"),
        "{stdout}"
    );
    assert!(
        stderr.contains("line 3: rejected") && stderr.contains("line 4: rejected"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("5f4dcc3b") && !stderr.contains(&hash[7..29]),
        "no hashes echoed: {stderr}"
    );
    let again = import();
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("imported 0, already present 2"),
        "a re-run skips what is there"
    );

    let data_dir = dir.path().to_owned();
    let app = auth_app(&Backend::EMBEDDED, move |c| c.server.data_dir = data_dir).await;
    let session = json_of(login(&app, &a, "legacy password").await, 200).await;
    assert_eq!(session["user"]["name"], "Imported A");
    let stored = app.state.store.user_by_email(&a).await.unwrap().unwrap();
    let rehashed = stored.password_hash.unwrap();
    assert!(
        rehashed.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
        "{rehashed}"
    );
    json_of(login(&app, &a, "legacy password").await, 200).await;
    assert_error(
        login(&app, &a, "wrong password").await,
        401,
        "UNAUTHENTICATED",
    )
    .await;
    let b_session = json_of(login(&app, &b, "legacy password").await, 200).await;
    assert_eq!(b_session["user"]["emailVerified"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_io_handshake_is_authenticated_by_its_auth_token() {
    let app = auth_app(&Backend::EMBEDDED, |_| {}).await;
    let session = register(&app, &unique_email("socket")).await;
    let token = session["accessToken"].as_str().unwrap();
    let auth = &app.state.auth;
    let who = auth
        .authenticate_handshake(&json!({ "token": token }))
        .await
        .unwrap();
    assert_eq!(
        who.user_id.to_string(),
        session["user"]["id"].as_str().unwrap()
    );
    let bearer = json!({ "token": format!("Bearer {token}") });
    assert_eq!(auth.authenticate_handshake(&bearer).await.unwrap(), who);
    assert!(auth.authenticate_handshake(&json!({})).await.is_err());
    assert!(
        auth.authenticate_handshake(&json!({"token": "nope"}))
            .await
            .is_err()
    );
    assert!(auth.authenticate_handshake(&Value::Null).await.is_err());
}

/// Each case once on embedded backends and once on PostgreSQL + Redis + RabbitMQ.
macro_rules! on_every_backend {
    ($($case:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(&super::Backend::EMBEDDED).await;
                }
            )*
        }

        mod on_postgres_redis_and_rabbitmq {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let Some(backend) = super::Backend::services().await else {
                        return;
                    };
                    super::$case(&backend).await;
                    backend.drop().await;
                }
            )*
        }
    };
}

on_every_backend!(
    wrong_codes_are_capped_per_day_across_new_codes,
    a_code_sign_in_to_an_account_nobody_verified_ends_its_password_and_sessions,
    register_verify_login_refresh_then_reuse_kills_the_whole_family,
    two_tabs_refreshing_at_once_both_get_the_same_new_pair,
    five_failures_lock_the_account_a_success_resets_the_count_and_the_lock_ends,
    known_and_unknown_emails_get_identical_answers_and_similar_timing,
    auth_endpoints_allow_five_per_minute_per_ip_and_per_email,
    a_one_time_code_signs_up_allows_five_tries_and_expires,
    a_password_reset_sets_the_password_and_ends_every_session,
    the_account_can_be_renamed_repassworded_logged_out_and_deleted,
    profiles_show_public_fields_and_search_never_matches_an_email_prefix,
    a_scheduled_job_runs_once_across_nodes_and_purges_expired_tokens,
);

async fn a_code_sign_in_to_an_account_nobody_verified_ends_its_password_and_sessions(
    backend: &Backend,
) {
    let app = auth_app(backend, |_| {}).await;
    let email = unique_email("hijack");
    // Someone registers the victim's address with a password of their choosing …
    let attacker = register(&app, &email).await;
    // … and the owner, who never saw that account, signs in by code.
    call(
        &app,
        Method::POST,
        "/api/v1/auth/otp/request",
        None,
        Some(json!({"email": email})),
    )
    .await;
    let code = code_in(&nth_mail(&app, &email, "Your sign-in code", 1).await);
    let owner = json_of(
        call(
            &app,
            Method::POST,
            "/api/v1/auth/otp/verify",
            None,
            Some(json!({"email": email, "code": code})),
        )
        .await,
        200,
    )
    .await;
    assert_eq!(owner["user"]["emailVerified"], true);
    let stale = refresh(&app, attacker["refreshToken"].as_str().unwrap()).await;
    assert_error(stale, 401, "UNAUTHENTICATED").await;
    assert_error(login(&app, &email, PASSWORD).await, 401, "UNAUTHENTICATED").await;
    json_of(
        refresh(&app, owner["refreshToken"].as_str().unwrap()).await,
        200,
    )
    .await;
    let kinds = security_event_kinds(&app, owner["accessToken"].as_str().unwrap()).await;
    assert!(
        kinds.contains(&"unverified_account_claimed".to_owned()),
        "{kinds:?}"
    );
}

async fn wrong_codes_are_capped_per_day_across_new_codes(backend: &Backend) {
    let app = auth_app(backend, |_| {}).await;
    let email = unique_email("guesser");
    register(&app, &email).await;
    let wrong_for = |code: &str| if code == "000000" { "111111" } else { "000000" }.to_owned();
    let cap = confab_core::services::auth::OTP_FAILURES_PER_DAY as usize;
    let per_code = 5;
    for n in 1..=cap / per_code {
        call(
            &app,
            Method::POST,
            "/api/v1/auth/otp/request",
            None,
            Some(json!({"email": email})),
        )
        .await;
        let code = code_in(&nth_mail(&app, &email, "Your sign-in code", n).await);
        for _ in 0..per_code {
            let response = call(
                &app,
                Method::POST,
                "/api/v1/auth/otp/verify",
                None,
                Some(json!({"email": email, "code": wrong_for(&code)})),
            )
            .await;
            assert_error(response, 401, "UNAUTHENTICATED").await;
        }
    }
    // A fresh code, the right one, after the day's wrong tries are used up: refused.
    call(
        &app,
        Method::POST,
        "/api/v1/auth/otp/request",
        None,
        Some(json!({"email": email})),
    )
    .await;
    let code = code_in(&nth_mail(&app, &email, "Your sign-in code", cap / per_code + 1).await);
    let response = call(
        &app,
        Method::POST,
        "/api/v1/auth/otp/verify",
        None,
        Some(json!({"email": email, "code": code})),
    )
    .await;
    assert_error(response, 401, "UNAUTHENTICATED").await;
}
