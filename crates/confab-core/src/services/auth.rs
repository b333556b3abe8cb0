//! Accounts and sign-in (SPEC §3 "Accounts and auth", "Users"): the use cases over the store,
//! the cache (rate limits) and the outbox (mail and events).
//!
//! Security rules kept here, in one place:
//! - Unknown and known emails get the same answers, and cost about the same time, on login,
//!   forgot-password and one-time codes (a decoy hash is verified when there is no account;
//!   unknown emails are even "locked" after as many failures as real ones).
//! - Failed logins are counted in the database, atomically; the threshold locks the account.
//! - Refresh tokens rotate on every use. Presenting a rotated one revokes its family and is
//!   audited, except within a short grace window, where the same old token gets the same
//!   successor back (two tabs refreshing at once).
//! - Every token is random (256 bits) or a short code kept as an HMAC; the store sees only
//!   hashes. Mail goes out only through the outbox → `mail` queue.

pub mod crypto;
pub mod jwt;

use crate::services::presence::Presence;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use self::crypto::{Keyed, Passwords, Verified};
use self::jwt::AccessTokens;
use crate::domain::{
    EventId, LockoutPolicy, NewUser, OneTimeToken, OneTimeTokenId, OutboxEntry, Page,
    RefreshFamily, RefreshFamilyId, RefreshToken, RefreshTokenId, SecurityEvent, SecurityEventId,
    Timestamp, TokenPurpose, User, UserId, now,
};
use crate::ports::broker::queues;
use crate::ports::cache::{Cache, RateLimit, keys};
use crate::ports::store::{Store, StoreError, StoreTx};

pub use self::jwt::{Claims, SigningKey};

/// The rules of sign-in, from configuration.
#[derive(Debug, Clone)]
pub struct AuthSettings {
    pub access_ttl: Duration,
    pub refresh_ttl: Duration,
    /// How long after a rotation the old refresh token still returns its successor.
    pub refresh_grace: Duration,
    /// Clock skew allowed when checking an access token's expiry.
    pub leeway: Duration,
    pub verify_email_ttl: Duration,
    pub reset_ttl: Duration,
    pub otp_ttl: Duration,
    pub otp_max_attempts: i32,
    /// Whether a one-time code may create an account (passwordless sign-up).
    pub otp_signup: bool,
    pub lockout: LockoutPolicy,
    pub per_ip: RateLimit,
    pub per_email: RateLimit,
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            access_ttl: Duration::from_mins(15),
            refresh_ttl: Duration::from_hours(24 * 30),
            refresh_grace: Duration::from_secs(10),
            leeway: Duration::from_secs(30),
            verify_email_ttl: Duration::from_hours(24),
            reset_ttl: Duration::from_hours(1),
            otp_ttl: Duration::from_mins(10),
            otp_max_attempts: 5,
            otp_signup: true,
            lockout: LockoutPolicy {
                threshold: 5,
                window: chrono::Duration::minutes(15),
                lock_for: chrono::Duration::minutes(15),
            },
            per_ip: RateLimit::per_minute(5),
            per_email: RateLimit::per_minute(5),
        }
    }
}

/// Why an auth operation was refused. Messages never say which part of a credential was
/// wrong or whether an account exists.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Wrong email or password, or a refresh token that is no good: 401, one message.
    #[error("the credentials are not valid")]
    InvalidCredentials,
    /// No valid access token: 401.
    #[error("not signed in")]
    Unauthenticated,
    #[error("the account is locked")]
    Locked { retry_after: Duration },
    #[error("too many requests")]
    RateLimited { retry_after: Duration },
    /// Bad input: which field, and what is wrong with it.
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: &'static str,
    },
    /// A verification or reset link that is unknown, used or expired.
    #[error("the link is invalid or has expired")]
    InvalidLink,
    #[error("an account with this email already exists")]
    EmailTaken,
    /// The current password given to change it is wrong: 403.
    #[error("the current password is wrong")]
    WrongPassword,
    #[error("no such user")]
    NotFound,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("internal auth failure: {0}")]
    Internal(String),
}

/// Who is asking: for rate limits and the audit trail.
#[derive(Debug, Clone, Default)]
pub struct ClientInfo {
    pub ip: Option<String>,
    pub user_agent: Option<String>,
}

/// An access token and the refresh token that renews it.
#[derive(Debug, Clone)]
pub struct TokenPair {
    pub access_token: String,
    pub refresh_token: String,
    /// Seconds the access token lives.
    pub expires_in: u64,
}

/// A signed-in user and their tokens.
#[derive(Debug, Clone)]
pub struct Session {
    pub user: User,
    pub tokens: TokenPair,
}

/// The caller, from a verified access token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Principal {
    pub user_id: UserId,
    pub session: RefreshFamilyId,
}

/// An account as its owner sees it (and as the cache keeps it): no hash, no counters.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Account {
    pub id: UserId,
    pub email: String,
    pub name: String,
    pub email_verified: bool,
    pub avatar_key: Option<String>,
    pub created_at: Timestamp,
}

impl From<&User> for Account {
    fn from(user: &User) -> Self {
        Self {
            id: user.id,
            email: user.email.clone(),
            name: user.name.clone(),
            email_verified: user.email_verified_at.is_some(),
            avatar_key: user.avatar_key.clone(),
            created_at: user.created_at,
        }
    }
}

/// What the hourly purge removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Purged {
    pub families: u64,
    pub tokens: u64,
    pub outbox: u64,
}

/// A user as others see them.
#[derive(Debug, Clone)]
pub struct PublicProfile {
    pub user: User,
    pub online: bool,
}

/// Wrong one-time codes an address may get in a day, across all its codes.
pub const OTP_FAILURES_PER_DAY: u32 = 20;

/// How long an account stays in the cache for `GET /users/me`. Short, although SPEC §7
/// keeps `session:{userId}` 24 h: every change drops the entry, but a read that raced a
/// change could put the old account back, and this bounds how long that lasts.
const ACCOUNT_CACHE_TTL: Duration = Duration::from_mins(1);

/// Password hashes computed at once (each holds 19 MiB and a core for ~30 ms); the rest wait.
fn hashing_permits() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get() * 2)
}

/// For `modify_user`: a change that stages no other writes.
fn nothing_more(_: &User) -> (Vec<OutboxEntry>, Vec<SecurityEvent>) {
    (Vec::new(), Vec::new())
}

fn revoked_before_key(user: UserId) -> String {
    format!("auth:sessions-ended:{user}")
}

pub struct AuthService {
    store: Arc<dyn Store>,
    cache: Arc<dyn Cache>,
    settings: AuthSettings,
    /// Whether a profile shows online.
    presence: Presence,
    passwords: Arc<Passwords>,
    tokens: AccessTokens,
    keyed: Keyed,
    hashing: Arc<tokio::sync::Semaphore>,
}

fn span(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

/// Lower-cases and checks an email address: one `@`, a local part, a dotted domain, no
/// spaces, at most 254 characters.
pub fn normalise_email(email: &str) -> Result<String, AuthError> {
    let invalid = AuthError::Invalid {
        field: "email",
        message: "is not an email address",
    };
    let email = email.trim().to_lowercase();
    let Some((local, domain)) = email.split_once('@') else {
        return Err(invalid);
    };
    let ok = email.len() <= 254
        && !local.is_empty()
        && local.len() <= 64
        && domain.contains('.')
        && !domain.contains('@')
        && !domain.starts_with(['.', '-'])
        && !domain.ends_with(['.', '-'])
        && !domain.contains("..")
        && !email.chars().any(|c| c.is_whitespace() || c.is_control());
    if ok { Ok(email) } else { Err(invalid) }
}

/// A display name: trimmed, 1..=100 characters, no control characters.
pub fn check_name(name: &str) -> Result<String, AuthError> {
    let name = name.trim();
    let count = name.chars().count();
    if count == 0 || count > 100 || name.chars().any(char::is_control) {
        return Err(AuthError::Invalid {
            field: "name",
            message: "must be 1 to 100 characters, without control characters",
        });
    }
    Ok(name.to_owned())
}

/// SPEC §3: 8..=128 characters, not the email address.
pub fn check_password(password: &str, email: &str, field: &'static str) -> Result<(), AuthError> {
    let count = password.chars().count();
    if !(8..=128).contains(&count) {
        return Err(AuthError::Invalid {
            field,
            message: "must be 8 to 128 characters",
        });
    }
    if password.trim().eq_ignore_ascii_case(email) {
        return Err(AuthError::Invalid {
            field,
            message: "must not be the email address",
        });
    }
    Ok(())
}

fn mail(template: &str, to: &str, vars: serde_json::Value) -> OutboxEntry {
    let mut payload = json!({"template": template, "to": to});
    payload["vars"] = vars;
    OutboxEntry {
        id: EventId::new(),
        queue: queues::MAIL.into(),
        kind: format!("mail.{template}"),
        payload,
        trace_id: None,
        created_at: now(),
    }
}

fn event(kind: &str, payload: serde_json::Value) -> OutboxEntry {
    OutboxEntry {
        id: EventId::new(),
        queue: queues::EVENTS.into(),
        kind: kind.into(),
        payload,
        trace_id: None,
        created_at: now(),
    }
}

/// One account from an older system (`confab users import`).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ImportRecord {
    pub email: String,
    pub name: String,
    /// bcrypt (`$2a$`/`$2b$`/`$2y$`) or argon2; re-hashed with argon2id at the next login.
    pub password_hash: String,
    /// Whether the old system had verified the address.
    #[serde(default)]
    pub email_verified: bool,
}

/// What importing one record did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Imported {
    Created,
    /// An account with that email exists; it is left as it is.
    Exists,
}

/// Imports one account, keeping its password hash.
pub async fn import_user(store: &dyn Store, record: &ImportRecord) -> Result<Imported, AuthError> {
    let email = normalise_email(&record.email)?;
    let name = check_name(&record.name)?;
    if !crypto::is_supported_hash(&record.password_hash) {
        return Err(AuthError::Invalid {
            field: "passwordHash",
            message: "is not a bcrypt ($2a$/$2b$/$2y$) or argon2 hash",
        });
    }
    let mut user = match store
        .create_user(NewUser {
            email,
            name,
            password_hash: Some(record.password_hash.clone()),
        })
        .await
    {
        Ok(user) => user,
        Err(StoreError::Conflict(_)) => return Ok(Imported::Exists),
        Err(e) => return Err(e.into()),
    };
    if record.email_verified {
        user.email_verified_at = Some(user.created_at);
        store.update_user(&user).await?;
    }
    Ok(Imported::Created)
}

impl AuthService {
    pub fn new(
        store: Arc<dyn Store>,
        cache: Arc<dyn Cache>,
        settings: AuthSettings,
        passwords: Passwords,
        tokens: AccessTokens,
        secret: &[u8],
        presence: Presence,
    ) -> Self {
        Self {
            store,
            cache,
            settings,
            presence,
            passwords: Arc::new(passwords),
            tokens,
            keyed: Keyed::new(secret),
            hashing: Arc::new(tokio::sync::Semaphore::new(hashing_permits())),
        }
    }

    /// The signer (for `/.well-known/jwks.json`).
    pub fn access_tokens(&self) -> &AccessTokens {
        &self.tokens
    }

    /// The claims of a bearer token, from the token alone: signature, algorithm, key id,
    /// issuer, audience, expiry. No I/O.
    pub fn verify_access_token(&self, token: &str) -> Result<Claims, AuthError> {
        self.tokens
            .verify(token)
            .map_err(|_| AuthError::Unauthenticated)
    }

    /// The caller of a bearer token: a valid token issued after the user's sessions were last
    /// ended (logout-all, password change or reset, account deletion). That moment is kept in
    /// the cache for as long as an access token lives, so the check is one cache read, not a
    /// database read. (A cache outage lets such tokens through until they expire: the
    /// fail-soft policy of SPEC §7.)
    pub async fn authenticate(&self, token: &str) -> Result<Principal, AuthError> {
        let claims = self.verify_access_token(token)?;
        if let Ok(Some(value)) = self.cache.get(&revoked_before_key(claims.sub)).await
            && let Some(before) = std::str::from_utf8(&value)
                .ok()
                .and_then(|v| v.parse::<i64>().ok())
            && claims.ims <= before
        {
            return Err(AuthError::Unauthenticated);
        }
        Ok(Principal {
            user_id: claims.sub,
            session: claims.sid,
        })
    }

    /// Access tokens of `user` issued before now stop working (they would otherwise live on
    /// until they expire, up to `access_ttl`).
    async fn end_access_tokens(&self, user: UserId) {
        let ttl = self.settings.access_ttl + self.settings.leeway + Duration::from_secs(1);
        let _ = self
            .cache
            .set(
                &revoked_before_key(user),
                now().timestamp_millis().to_string().as_bytes(),
                Some(ttl),
            )
            .await;
    }

    /// The caller of a Socket.IO handshake: `auth.token` (or `auth.accessToken`), with or
    /// without a `Bearer ` prefix.
    pub async fn authenticate_handshake(
        &self,
        auth: &serde_json::Value,
    ) -> Result<Principal, AuthError> {
        let token = auth
            .get("token")
            .or_else(|| auth.get("accessToken"))
            .and_then(serde_json::Value::as_str)
            .ok_or(AuthError::Unauthenticated)?;
        self.authenticate(token.strip_prefix("Bearer ").unwrap_or(token))
            .await
    }

    // ---- limits and bookkeeping ----

    async fn limit(&self, endpoint: &str, subject: &str, rate: RateLimit) -> Result<(), AuthError> {
        match self
            .cache
            .rate_limit(&keys::rate(subject, endpoint), rate)
            .await
        {
            Ok(decision) if !decision.allowed => Err(AuthError::RateLimited {
                retry_after: decision.retry_after.max(Duration::from_secs(1)),
            }),
            // An outage is the fail-soft wrapper's decision (open or closed); an error that
            // still reaches here does not stop sign-in.
            Ok(_) | Err(_) => Ok(()),
        }
    }

    async fn limit_ip(&self, endpoint: &str, client: &ClientInfo) -> Result<(), AuthError> {
        let ip = client.ip.as_deref().unwrap_or("unknown");
        self.limit(endpoint, &format!("ip:{ip}"), self.settings.per_ip)
            .await
    }

    async fn limit_email(&self, endpoint: &str, email: &str) -> Result<(), AuthError> {
        let subject = format!("email:{}", self.keyed.label(email));
        self.limit(endpoint, &subject, self.settings.per_email)
            .await
    }

    /// For [`Self::modify_user`]: the change writes one security event of `kind` and nothing
    /// else.
    fn audited<'a>(
        kind: &'static str,
        client: &'a ClientInfo,
        details: serde_json::Value,
    ) -> impl Fn(&User) -> (Vec<OutboxEntry>, Vec<SecurityEvent>) + 'a {
        move |user| {
            let event = Self::security_event(kind, Some(user.id), client, details.clone());
            (Vec::new(), vec![event])
        }
    }

    fn security_event(
        kind: &str,
        user: Option<UserId>,
        client: &ClientInfo,
        details: serde_json::Value,
    ) -> SecurityEvent {
        SecurityEvent {
            id: SecurityEventId::new(),
            user_id: user,
            kind: kind.into(),
            ip: client.ip.clone(),
            user_agent: client.user_agent.clone(),
            details,
            created_at: now(),
        }
    }

    async fn audit(
        &self,
        kind: &str,
        user: Option<UserId>,
        client: &ClientInfo,
        details: serde_json::Value,
    ) -> Result<(), AuthError> {
        self.store
            .record_security_event(&Self::security_event(kind, user, client, details))
            .await?;
        Ok(())
    }

    async fn hash_password(&self, password: &str) -> Result<String, AuthError> {
        let (passwords, password) = (self.passwords.clone(), password.to_owned());
        let _permit = self.hashing.acquire().await;
        tokio::task::spawn_blocking(move || passwords.hash(&password))
            .await
            .map_err(|e| AuthError::Internal(e.to_string()))?
            .map_err(|e| AuthError::Internal(e.to_string()))
    }

    /// Verifies off the async threads; `None` stored (or no account) spends the same time.
    async fn verify_password(&self, password: &str, stored: Option<&str>) -> Verified {
        let (passwords, password) = (self.passwords.clone(), password.to_owned());
        let stored = stored.map(str::to_owned);
        let _permit = self.hashing.acquire().await;
        tokio::task::spawn_blocking(move || {
            if let Some(hash) = stored {
                passwords.verify(&password, &hash)
            } else {
                passwords.decoy_verify(&password);
                Verified::Wrong
            }
        })
        .await
        .unwrap_or(Verified::Wrong)
    }

    /// A new sign-in: a refresh family with its first token, and an access token.
    fn new_session_rows(&self, user: UserId) -> (RefreshFamily, RefreshToken, TokenPair) {
        let at = now();
        let expires_at = at + span(self.settings.refresh_ttl);
        let family = RefreshFamily {
            id: RefreshFamilyId::new(),
            user_id: user,
            created_at: at,
            expires_at,
            revoked_at: None,
            revoked_reason: None,
        };
        let plain = crypto::random_token();
        let first = RefreshToken {
            id: RefreshTokenId::new(),
            family_id: family.id,
            token_hash: crypto::token_hash(&plain),
            created_at: at,
            expires_at,
            rotated_at: None,
            replaced_by: None,
        };
        let pair = self.pair(user, family.id, plain);
        (family, first, pair)
    }

    fn pair(&self, user: UserId, family: RefreshFamilyId, refresh_token: String) -> TokenPair {
        let (access_token, _) = self.tokens.issue(user, family, now());
        TokenPair {
            access_token,
            refresh_token,
            expires_in: self.tokens.ttl().as_secs(),
        }
    }

    async fn start_session(&self, user: UserId) -> Result<TokenPair, AuthError> {
        let (family, first, pair) = self.new_session_rows(user);
        self.store.create_refresh_family(&family, &first).await?;
        Ok(pair)
    }

    fn one_time(
        user: Option<UserId>,
        email: &str,
        purpose: TokenPurpose,
        hash: String,
        ttl: Duration,
    ) -> OneTimeToken {
        let at = now();
        OneTimeToken {
            id: OneTimeTokenId::new(),
            user_id: user,
            email: email.to_owned(),
            purpose,
            token_hash: hash,
            attempts: 0,
            created_at: at,
            expires_at: at + span(ttl),
            used_at: None,
        }
    }

    /// Stages a verification token and its mail in `tx`.
    async fn stage_verification(&self, tx: &dyn StoreTx, user: &User) -> Result<(), AuthError> {
        let token = crypto::random_token();
        let row = Self::one_time(
            Some(user.id),
            &user.email,
            TokenPurpose::VerifyEmail,
            crypto::token_hash(&token),
            self.settings.verify_email_ttl,
        );
        tx.create_one_time_token(&row).await?;
        tx.enqueue(&mail(
            "verify_email",
            &user.email,
            json!({"name": user.name, "token": token}),
        ))
        .await?;
        Ok(())
    }

    // ---- accounts ----

    /// `POST /auth/register`: the account, its first session, a verification mail and a
    /// `user.registered` event, all in one transaction.
    pub async fn register(
        &self,
        client: &ClientInfo,
        email: &str,
        password: &str,
        name: &str,
    ) -> Result<Session, AuthError> {
        self.limit_ip("register", client).await?;
        let email = normalise_email(email)?;
        let name = check_name(name)?;
        check_password(password, &email, "password")?;
        self.limit_email("register", &email).await?;
        let hash = self.hash_password(password).await?;
        let tx = self.store.begin().await?;
        let user = match tx
            .create_user(NewUser {
                email,
                name,
                password_hash: Some(hash),
            })
            .await
        {
            Ok(user) => user,
            Err(StoreError::Conflict(_)) => return Err(AuthError::EmailTaken),
            Err(e) => return Err(e.into()),
        };
        self.stage_verification(&*tx, &user).await?;
        tx.enqueue(&event(
            "user.registered",
            json!({"userId": user.id, "via": "password"}),
        ))
        .await?;
        let (family, first, tokens) = self.new_session_rows(user.id);
        tx.create_refresh_family(&family, &first).await?;
        tx.commit().await?;
        Ok(Session { user, tokens })
    }

    /// When an unknown email is "locked" (so that locking does not reveal which emails have
    /// accounts): the time it unlocks, kept in the cache.
    async fn phantom_lock(&self, label: &str) -> Option<Timestamp> {
        let value = self
            .cache
            .get(&format!("auth:phantom-lock:{label}"))
            .await
            .ok()??;
        let until = std::str::from_utf8(&value).ok()?.parse::<i64>().ok()?;
        let until = chrono::DateTime::from_timestamp(until, 0)?;
        (until > now()).then_some(until)
    }

    async fn phantom_failure(&self, label: &str) -> Option<Timestamp> {
        let policy = self.settings.lockout;
        let failures = self
            .cache
            .incr(
                &format!("auth:phantom-failures:{label}"),
                1,
                policy.window.to_std().unwrap_or_default(),
            )
            .await
            .ok()?;
        if failures < i64::from(policy.threshold) {
            return None;
        }
        let until = now() + policy.lock_for;
        let _ = self
            .cache
            .delete(&format!("auth:phantom-failures:{label}"))
            .await;
        let _ = self
            .cache
            .set(
                &format!("auth:phantom-lock:{label}"),
                until.timestamp().to_string().as_bytes(),
                policy.lock_for.to_std().ok(),
            )
            .await;
        Some(until)
    }

    fn locked(until: Timestamp) -> AuthError {
        let left = (until - now()).to_std().unwrap_or_default();
        AuthError::Locked {
            retry_after: left.max(Duration::from_secs(1)),
        }
    }

    /// After a right password: the failure count resets, and a hash at an old cost (or
    /// bcrypt) is replaced, but only over the hash just verified, never over a newer one.
    async fn after_right_password(
        &self,
        mut user: User,
        password: &str,
        rehash: bool,
    ) -> Result<User, AuthError> {
        if user.failed_logins != 0 || user.locked_until.is_some() || rehash {
            let verified_hash = user.password_hash.clone();
            let new_hash = if rehash {
                Some(self.hash_password(password).await?)
            } else {
                None
            };
            (user, _) = self
                .modify_user(
                    user.id,
                    |user| {
                        user.failed_logins = 0;
                        user.locked_until = None;
                        // Only over the hash just verified: never over a newer one.
                        if let Some(new_hash) = &new_hash
                            && user.password_hash == verified_hash
                        {
                            user.password_hash = Some(new_hash.clone());
                        }
                        Ok(true)
                    },
                    nothing_more,
                )
                .await?;
        }
        Ok(user)
    }

    /// `POST /auth/login`.
    pub async fn login(
        &self,
        client: &ClientInfo,
        email: &str,
        password: &str,
    ) -> Result<Session, AuthError> {
        self.limit_ip("login", client).await?;
        // A malformed email or an absurd password cannot match: same answer as a wrong one.
        let Ok(email) = normalise_email(email) else {
            return Err(AuthError::InvalidCredentials);
        };
        self.limit_email("login", &email).await?;
        if password.chars().count() > 128 {
            return Err(AuthError::InvalidCredentials);
        }
        let Some(user) = self.store.user_by_email(&email).await? else {
            let label = self.keyed.label(&email);
            self.verify_password(password, None).await;
            if let Some(until) = self.phantom_lock(&label).await {
                return Err(Self::locked(until));
            }
            self.audit(
                "login_failed",
                None,
                client,
                json!({"reason": "unknown_email", "emailLabel": label}),
            )
            .await?;
            return match self.phantom_failure(&label).await {
                Some(until) => Err(Self::locked(until)),
                None => Err(AuthError::InvalidCredentials),
            };
        };
        let at = now();
        if let Some(until) = user.locked_until.filter(|until| *until > at) {
            // The same work as any attempt, so a locked account is not told apart by timing.
            self.verify_password(password, None).await;
            return Err(Self::locked(until));
        }
        match self
            .verify_password(password, user.password_hash.as_deref())
            .await
        {
            Verified::Wrong => {
                let counted = match self
                    .store
                    .record_failed_login(user.id, at, self.settings.lockout)
                    .await
                {
                    Ok(counted) => counted,
                    // Deleted in the meantime: just a failed login.
                    Err(StoreError::NotFound(_)) => return Err(AuthError::InvalidCredentials),
                    Err(e) => return Err(e.into()),
                };
                self.audit(
                    "login_failed",
                    Some(user.id),
                    client,
                    json!({"reason": "wrong_password", "failures": counted.failures}),
                )
                .await?;
                if let Some(until) = counted.locked_until {
                    self.audit(
                        "account_locked",
                        Some(user.id),
                        client,
                        json!({"until": until}),
                    )
                    .await?;
                    return Err(Self::locked(until));
                }
                Err(AuthError::InvalidCredentials)
            }
            Verified::Right { rehash } => {
                let user = self.after_right_password(user, password, rehash).await?;
                let tokens = self.start_session(user.id).await?;
                self.audit(
                    "login_succeeded",
                    Some(user.id),
                    client,
                    json!({"method": "password", "rehashed": rehash}),
                )
                .await?;
                Ok(Session { user, tokens })
            }
        }
    }

    /// `POST /auth/refresh`: the token's successor and a new access token. A token rotated
    /// more than the grace window ago is reuse: its family dies.
    pub async fn refresh(
        &self,
        client: &ClientInfo,
        refresh_token: &str,
    ) -> Result<TokenPair, AuthError> {
        let hash = crypto::token_hash(refresh_token);
        let Some((token, family)) = self.store.refresh_token_by_hash(&hash).await? else {
            return Err(AuthError::InvalidCredentials);
        };
        let at = now();
        if family.revoked_at.is_some() || family.expires_at <= at || token.expires_at <= at {
            return Err(AuthError::InvalidCredentials);
        }
        let successor_plain = self.keyed.successor(refresh_token);
        if token.rotated_at.is_none() {
            let successor = RefreshToken {
                id: RefreshTokenId::new(),
                family_id: family.id,
                token_hash: crypto::token_hash(&successor_plain),
                created_at: at,
                expires_at: family.expires_at,
                rotated_at: None,
                replaced_by: None,
            };
            if self
                .store
                .rotate_refresh_token(token.id, &successor, at)
                .await?
            {
                return Ok(self.pair(family.user_id, family.id, successor_plain));
            }
        }
        // Rotated already: by a concurrent refresh (grace) or long ago (reuse).
        let Some(rotated) = self.store.refresh_token_by_id(token.id).await? else {
            return Err(AuthError::InvalidCredentials);
        };
        let within_grace = rotated
            .rotated_at
            .is_some_and(|when| at - when <= span(self.settings.refresh_grace));
        if within_grace {
            let successor = match rotated.replaced_by {
                Some(id) => self.store.refresh_token_by_id(id).await?,
                None => None,
            };
            if successor
                .is_some_and(|s| crypto::same(&s.token_hash, &crypto::token_hash(&successor_plain)))
            {
                return Ok(self.pair(family.user_id, family.id, successor_plain));
            }
        }
        self.store
            .revoke_refresh_family(family.id, "reuse", at)
            .await?;
        self.audit(
            "refresh_reused",
            Some(family.user_id),
            client,
            json!({"family": family.id}),
        )
        .await?;
        Err(AuthError::InvalidCredentials)
    }

    /// `POST /auth/logout`: ends the sign-in the refresh token belongs to (if it is the
    /// caller's; otherwise nothing happens, and nothing is told).
    pub async fn logout(&self, who: Principal, refresh_token: &str) -> Result<(), AuthError> {
        let hash = crypto::token_hash(refresh_token);
        if let Some((_, family)) = self.store.refresh_token_by_hash(&hash).await?
            && family.user_id == who.user_id
        {
            self.store
                .revoke_refresh_family(family.id, "logout", now())
                .await?;
        }
        Ok(())
    }

    /// `POST /auth/logout-all`: ends every sign-in of the caller.
    pub async fn logout_all(&self, who: Principal, client: &ClientInfo) -> Result<u64, AuthError> {
        let ended = self
            .store
            .revoke_user_refresh_families(who.user_id, "logout_all", now())
            .await?;
        self.end_access_tokens(who.user_id).await;
        self.audit(
            "logout_all",
            Some(who.user_id),
            client,
            json!({"sessions": ended}),
        )
        .await?;
        Ok(ended)
    }

    /// Uses a one-time link token of `purpose`: the token row, once.
    async fn use_link(
        &self,
        purpose: TokenPurpose,
        token: &str,
    ) -> Result<OneTimeToken, AuthError> {
        let hash = crypto::token_hash(token);
        let row = self
            .store
            .one_time_token(purpose, &hash)
            .await?
            .ok_or(AuthError::InvalidLink)?;
        if !self.store.use_one_time_token(row.id, now()).await? {
            return Err(AuthError::InvalidLink);
        }
        Ok(row)
    }

    /// `POST /auth/verify-email`: marks the address verified; sends the welcome mail.
    pub async fn verify_email(&self, client: &ClientInfo, token: &str) -> Result<User, AuthError> {
        self.limit_ip("verify-email", client).await?;
        let row = self.use_link(TokenPurpose::VerifyEmail, token).await?;
        let id = row.user_id.ok_or(AuthError::InvalidLink)?;
        let (user, _) = self
            .modify_user(
                id,
                |user| {
                    if user.email_verified_at.is_some() {
                        return Ok(false);
                    }
                    user.email_verified_at = Some(now());
                    Ok(true)
                },
                |user| {
                    (
                        vec![mail("welcome", &user.email, json!({"name": user.name}))],
                        vec![Self::security_event(
                            "email_verified",
                            Some(user.id),
                            client,
                            json!({}),
                        )],
                    )
                },
            )
            .await
            .map_err(|e| match e {
                AuthError::Unauthenticated => AuthError::InvalidLink,
                e => e,
            })?;
        Ok(user)
    }

    /// `POST /auth/verify-email/resend`: a new link, unless already verified.
    pub async fn resend_verification(&self, who: Principal) -> Result<(), AuthError> {
        let user = self.user(who.user_id).await?;
        self.limit_email("verify-email-resend", &user.email).await?;
        if user.email_verified_at.is_some() {
            return Ok(());
        }
        let tx = self.store.begin().await?;
        self.stage_verification(&*tx, &user).await?;
        tx.commit().await?;
        Ok(())
    }

    /// `POST /auth/password/forgot`: a reset link when the account exists; the caller
    /// cannot tell.
    pub async fn forgot_password(&self, client: &ClientInfo, email: &str) -> Result<(), AuthError> {
        self.limit_ip("password-forgot", client).await?;
        let Ok(email) = normalise_email(email) else {
            return Ok(());
        };
        self.limit_email("password-forgot", &email).await?;
        let user = self.store.user_by_email(&email).await?;
        // The same writes whether or not the account exists (a link row without a user can
        // never be used), so the answer takes about the same time; only the mail differs.
        let token = crypto::random_token();
        let row = Self::one_time(
            user.as_ref().map(|u| u.id),
            &email,
            TokenPurpose::PasswordReset,
            crypto::token_hash(&token),
            self.settings.reset_ttl,
        );
        let tx = self.store.begin().await?;
        tx.create_one_time_token(&row).await?;
        if let Some(user) = &user {
            tx.enqueue(&mail(
                "password_reset",
                &user.email,
                json!({"name": user.name, "token": token}),
            ))
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// `POST /auth/password/reset`: sets the password, unlocks, and ends every sign-in; whose.
    pub async fn reset_password(
        &self,
        client: &ClientInfo,
        token: &str,
        password: &str,
    ) -> Result<UserId, AuthError> {
        self.limit_ip("password-reset", client).await?;
        let hash = crypto::token_hash(token);
        let row = self
            .store
            .one_time_token(TokenPurpose::PasswordReset, &hash)
            .await?
            .ok_or(AuthError::InvalidLink)?;
        check_password(password, &row.email, "password")?;
        let new_hash = self.hash_password(password).await?;
        let row = self.use_link(TokenPurpose::PasswordReset, token).await?;
        let id = row.user_id.ok_or(AuthError::InvalidLink)?;
        let at = now();
        // Sessions end first: whatever happens next, a thief's refresh token is dead.
        let ended = self
            .store
            .revoke_user_refresh_families(id, "password_reset", at)
            .await?;
        self.end_access_tokens(id).await;
        self.modify_user(
            id,
            |user| {
                user.password_hash = Some(new_hash.clone());
                user.failed_logins = 0;
                user.locked_until = None;
                // The link reached the inbox: the address is proven.
                user.email_verified_at.get_or_insert(at);
                Ok(true)
            },
            Self::audited("password_reset", client, json!({"sessionsEnded": ended})),
        )
        .await
        .map_err(|e| match e {
            AuthError::Unauthenticated => AuthError::InvalidLink,
            e => e,
        })?;
        Ok(id)
    }

    /// `POST /auth/otp/request`: mails a 6-digit code when the email has an account or may
    /// sign up; the caller cannot tell.
    pub async fn request_otp(&self, client: &ClientInfo, email: &str) -> Result<(), AuthError> {
        self.limit_ip("otp-request", client).await?;
        let Ok(email) = normalise_email(email) else {
            return Ok(());
        };
        self.limit_email("otp-request", &email).await?;
        let user = self.store.user_by_email(&email).await?;
        // Without sign-up by code an unknown address gets no mail, but the same writes (its
        // code row can sign nobody in), so the answer takes about the same time.
        let send = user.is_some() || self.settings.otp_signup;
        let code = crypto::six_digit_code();
        let row = Self::one_time(
            user.as_ref().map(|u| u.id),
            &email,
            TokenPurpose::Otp,
            self.keyed.code_hash(&email, &code),
            self.settings.otp_ttl,
        );
        let tx = self.store.begin().await?;
        tx.create_one_time_token(&row).await?;
        if send {
            tx.enqueue(&mail("otp", &email, json!({"code": code})))
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// `POST /auth/otp/verify`: signs in with the newest code sent to the email (five tries),
    /// creating the account on first use when sign-up by code is on.
    pub async fn verify_otp(
        &self,
        client: &ClientInfo,
        email: &str,
        code: &str,
    ) -> Result<Session, AuthError> {
        self.limit_ip("otp-verify", client).await?;
        let Ok(email) = normalise_email(email) else {
            return Err(AuthError::InvalidCredentials);
        };
        self.limit_email("otp-verify", &email).await?;
        let at = now();
        let Some(row) = self
            .store
            .latest_one_time_token(&email, TokenPurpose::Otp, at)
            .await?
        else {
            return Err(AuthError::InvalidCredentials);
        };
        // Across codes, wrong tries per address are capped per day: requesting new codes
        // does not buy an unlimited number of guesses.
        let failures_key = format!("auth:otp-failures:{}", self.keyed.label(&email));
        let failures = self.cache.get(&failures_key).await.ok().flatten();
        if failures
            .and_then(|v| String::from_utf8(v).ok())
            .and_then(|v| v.parse::<u32>().ok())
            .is_some_and(|n| n >= OTP_FAILURES_PER_DAY)
        {
            return Err(AuthError::InvalidCredentials);
        }
        // Every try is counted before the code is compared, atomically: parallel guesses
        // cannot get past the limit between a check and an increment.
        if row.attempts >= self.settings.otp_max_attempts
            || self.store.count_one_time_attempt(row.id).await? > self.settings.otp_max_attempts
        {
            return Err(AuthError::InvalidCredentials);
        }
        let code = code.trim();
        if !crypto::same(&row.token_hash, &self.keyed.code_hash(&email, code)) {
            let _ = self
                .cache
                .incr(&failures_key, 1, Duration::from_hours(24))
                .await;
            return Err(AuthError::InvalidCredentials);
        }
        if !self.store.use_one_time_token(row.id, at).await? {
            return Err(AuthError::InvalidCredentials);
        }
        let user = match self.store.user_by_email(&email).await? {
            Some(existing) if existing.email_verified_at.is_none() => {
                self.claim_unverified(existing.id, client, at).await?
            }
            Some(existing) => existing,
            None if self.settings.otp_signup => self.sign_up_by_code(&email, at).await?,
            None => return Err(AuthError::InvalidCredentials),
        };
        let tokens = self.start_session(user.id).await?;
        self.audit(
            "login_succeeded",
            Some(user.id),
            client,
            json!({"method": "otp"}),
        )
        .await?;
        Ok(Session { user, tokens })
    }

    /// A code proved the inbox of an account nobody had verified. Whoever registered it may
    /// not own the address (pre-hijacking: register someone's email with your password, wait
    /// for them to sign in by code), so its password and every sign-in go.
    async fn claim_unverified(
        &self,
        id: UserId,
        client: &ClientInfo,
        at: Timestamp,
    ) -> Result<User, AuthError> {
        self.store
            .revoke_user_refresh_families(id, "unverified_account_claimed", at)
            .await?;
        self.end_access_tokens(id).await;
        let (user, _) = self
            .modify_user(
                id,
                |user| {
                    if user.email_verified_at.is_some() {
                        return Ok(false);
                    }
                    user.email_verified_at = Some(at);
                    user.password_hash = None;
                    Ok(true)
                },
                Self::audited("unverified_account_claimed", client, json!({})),
            )
            .await?;
        Ok(user)
    }

    /// Passwordless sign-up: a verified account with a neutral name (not the address's local
    /// part, which profiles would show to everyone).
    async fn sign_up_by_code(&self, email: &str, at: Timestamp) -> Result<User, AuthError> {
        let tx = self.store.begin().await?;
        let mut user = match tx
            .create_user(NewUser {
                email: email.to_owned(),
                name: "New user".into(),
                password_hash: None,
            })
            .await
        {
            Ok(user) => user,
            // Registered at this very moment by someone else: this code signs nobody in.
            Err(StoreError::Conflict(_)) => return Err(AuthError::InvalidCredentials),
            Err(e) => return Err(e.into()),
        };
        user.email_verified_at = Some(at);
        tx.update_user(&user).await?;
        tx.enqueue(&event(
            "user.registered",
            json!({"userId": user.id, "via": "otp"}),
        ))
        .await?;
        tx.enqueue(&mail("welcome", &user.email, json!({"name": user.name})))
            .await?;
        tx.commit().await?;
        Ok(user)
    }

    // ---- users ----

    /// Changes the user with `change` and writes the result only if nobody wrote the row in
    /// between (a password reset racing a rename must not be undone); on a lost race it reads
    /// again and retries. `change` says whether it changed anything; `also` stages writes
    /// that commit with it (mail, events, audit). Drops the cached account.
    async fn modify_user(
        &self,
        id: UserId,
        change: impl Fn(&mut User) -> Result<bool, AuthError>,
        also: impl Fn(&User) -> (Vec<OutboxEntry>, Vec<SecurityEvent>),
    ) -> Result<(User, bool), AuthError> {
        for attempt in 0..8 {
            // Read outside the writing transaction and make the compare-and-set its first
            // statement: on SQLite (WAL) a transaction that reads and then writes fails at
            // once with SQLITE_BUSY_SNAPSHOT when another writer committed in between, while
            // one that starts by writing waits for the lock. After a lost race the read goes
            // to the primary (a read-only transaction), never to a lagging replica.
            let found = if attempt == 0 {
                self.store.user_by_id(id).await?
            } else {
                let primary = self.store.begin().await?;
                primary.user_by_id(id).await?
            };
            let mut user = found.ok_or(AuthError::Unauthenticated)?;
            let seen = user.updated_at;
            if !change(&mut user)? {
                return Ok((user, false));
            }
            user.updated_at = now().max(seen + chrono::Duration::microseconds(1));
            let tx = self.store.begin().await?;
            if !tx.update_user_if_unchanged(&user, seen).await? {
                continue; // Someone else wrote it: read again.
            }
            let (entries, events) = also(&user);
            for entry in &entries {
                tx.enqueue(entry).await?;
            }
            for event in &events {
                tx.record_security_event(event).await?;
            }
            tx.commit().await?;
            self.forget(id).await;
            return Ok((user, true));
        }
        Err(AuthError::Internal(
            "the account kept changing under a write".into(),
        ))
    }

    /// Drops the cached account (`session:{id}`); every change to a user calls it.
    async fn forget(&self, id: UserId) {
        let _ = self.cache.delete(&keys::session(&id.to_string())).await;
    }

    /// `GET /users/me`: the caller's account, from the cache (`session:{id}`, SPEC §7) when
    /// it is there, so the hottest authenticated read costs no database round trip. No hash
    /// or counter is cached: only what the caller may see.
    pub async fn me(&self, who: Principal) -> Result<Account, AuthError> {
        let key = keys::session(&who.user_id.to_string());
        if let Ok(Some(bytes)) = self.cache.get(&key).await
            && let Ok(account) = serde_json::from_slice::<Account>(&bytes)
            && account.id == who.user_id
        {
            return Ok(account);
        }
        let account = Account::from(&self.user(who.user_id).await?);
        if let Ok(bytes) = serde_json::to_vec(&account) {
            let _ = self.cache.set(&key, &bytes, Some(ACCOUNT_CACHE_TTL)).await;
        }
        Ok(account)
    }

    /// The caller's account; `Unauthenticated` when it no longer exists.
    pub async fn user(&self, id: UserId) -> Result<User, AuthError> {
        self.store
            .user_by_id(id)
            .await?
            .ok_or(AuthError::Unauthenticated)
    }

    /// `PATCH /users/me`.
    pub async fn rename(&self, who: Principal, name: &str) -> Result<User, AuthError> {
        let name = check_name(name)?;
        let (user, _) = self
            .modify_user(
                who.user_id,
                |user| {
                    user.name.clone_from(&name);
                    Ok(true)
                },
                nothing_more,
            )
            .await?;
        Ok(user)
    }

    /// `PUT /users/me/avatar`: the account's avatar becomes the stored image `key`; the old
    /// one's objects are deleted by the `events` worker (`media.deleted`, committed with the
    /// change).
    pub async fn set_avatar(&self, who: Principal, key: &str) -> Result<User, AuthError> {
        let replaced = std::sync::Mutex::new(None);
        let (user, _) = self
            .modify_user(
                who.user_id,
                |user| {
                    *replaced
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) =
                        user.avatar_key.replace(key.to_owned());
                    Ok(true)
                },
                |_| {
                    let old = replaced
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .clone();
                    let keys = crate::services::media::avatar_keys(old.as_deref());
                    let events = if keys.is_empty() {
                        Vec::new()
                    } else {
                        vec![crate::services::media::deleted_event(&keys)]
                    };
                    (events, Vec::new())
                },
            )
            .await?;
        Ok(user)
    }

    /// `PUT /users/me/password`: needs the current password (unless the account has none);
    /// ends every sign-in and starts a new one for the caller.
    pub async fn change_password(
        &self,
        who: Principal,
        client: &ClientInfo,
        current: &str,
        new: &str,
    ) -> Result<TokenPair, AuthError> {
        let user = self.user(who.user_id).await?;
        // Guessing the current password with a stolen access token is limited like a login.
        self.limit_email("password-change", &user.email).await?;
        check_password(new, &user.email, "new")?;
        if user.password_hash.is_some()
            && self
                .verify_password(current, user.password_hash.as_deref())
                .await
                == Verified::Wrong
        {
            self.audit("password_change_failed", Some(user.id), client, json!({}))
                .await?;
            return Err(AuthError::WrongPassword);
        }
        let verified_hash = user.password_hash.clone();
        let new_hash = self.hash_password(new).await?;
        let at = now();
        let ended = self
            .store
            .revoke_user_refresh_families(user.id, "password_changed", at)
            .await?;
        self.end_access_tokens(user.id).await;
        self.modify_user(
            user.id,
            |user| {
                // The password checked above must still be the one in force.
                if user.password_hash != verified_hash {
                    return Err(AuthError::WrongPassword);
                }
                user.password_hash = Some(new_hash.clone());
                Ok(true)
            },
            Self::audited("password_changed", client, json!({"sessionsEnded": ended})),
        )
        .await?;
        self.start_session(user.id).await
    }

    /// `DELETE /users/me`: the account and its personal data go; messages in shared chats
    /// stay without a sender. A `user.deleted` event lets other parts clean up (media).
    pub async fn delete_account(
        &self,
        who: Principal,
        client: &ClientInfo,
    ) -> Result<(), AuthError> {
        let user = self.user(who.user_id).await?;
        let tx = self.store.begin().await?;
        if !tx.delete_user(user.id).await? {
            return Err(AuthError::Unauthenticated);
        }
        tx.enqueue(&event(
            "user.deleted",
            json!({"userId": user.id, "avatarKey": user.avatar_key}),
        ))
        .await?;
        // The user's own audit rows go with the account; this one stays, without a link.
        tx.record_security_event(&Self::security_event(
            "account_deleted",
            None,
            client,
            json!({"userId": user.id}),
        ))
        .await?;
        tx.commit().await?;
        self.forget(user.id).await;
        self.end_access_tokens(user.id).await;
        Ok(())
    }

    /// `GET /users/{id}`.
    pub async fn profile(&self, id: UserId) -> Result<PublicProfile, AuthError> {
        let user = self
            .store
            .user_by_id(id)
            .await?
            .ok_or(AuthError::NotFound)?;
        let online = self.presence.online().await.contains(&id);
        Ok(PublicProfile { user, online })
    }

    /// `GET /users?q=`: by name prefix or exact email.
    pub async fn search(&self, query: &str, limit: u32) -> Result<Vec<PublicProfile>, AuthError> {
        let query = query.trim();
        if query.is_empty() || query.chars().count() > 254 {
            return Err(AuthError::Invalid {
                field: "q",
                message: "must be 1 to 254 characters",
            });
        }
        let users = self.store.search_users(query, limit).await?;
        let online = self.presence.online().await;
        Ok(users
            .into_iter()
            .map(|user| PublicProfile {
                online: online.contains(&user.id),
                user,
            })
            .collect())
    }

    /// `GET /users/me/security-events`.
    pub async fn security_events(
        &self,
        who: Principal,
        page: Page<SecurityEventId>,
    ) -> Result<Vec<SecurityEvent>, AuthError> {
        Ok(self.store.security_events(who.user_id, page).await?)
    }

    /// The hourly purge: expired refresh families (with their tokens), expired one-time
    /// tokens, and published outbox rows (their mail payloads hold live links and codes).
    pub async fn purge_expired(&self) -> Result<Purged, AuthError> {
        let at = now();
        Ok(Purged {
            families: self.store.purge_refresh_families(at).await?,
            tokens: self.store.purge_one_time_tokens(at).await?,
            outbox: self.store.purge_published_outbox(at).await?,
        })
    }
}
