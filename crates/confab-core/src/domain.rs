//! The domain: ids, timestamps and the records confab keeps (SPEC §5).
//!
//! Ids are UUIDv7 (time-ordered, so "by id" is "by creation time" and cursors are ids).
//! Timestamps are UTC with microsecond precision: what both SQL backends store exactly.

use chrono::{DateTime, SubsecRound, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub type Timestamp = DateTime<Utc>;

/// Now, at the precision the stores keep.
pub fn now() -> Timestamp {
    Utc::now().trunc_subsecs(6)
}

macro_rules! id_type {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {$(
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            /// A new, time-ordered id.
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                self.0.fmt(f)
            }
        }

        impl std::str::FromStr for $name {
            type Err = uuid::Error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self)
            }
        }
    )*};
}

id_type!(
    UserId,
    ChatId,
    MessageId,
    AiSessionId,
    AiMessageId,
    /// One AI request (its user message, its answer, its stream).
    AiRequestId,
    GenerationId,
    /// Every refresh token descended from one sign-in.
    RefreshFamilyId,
    RefreshTokenId,
    OneTimeTokenId,
    /// One envelope on a queue, and its outbox row.
    EventId,
    SecurityEventId,
    ServiceErrorId,
);

/// A person with an account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub id: UserId,
    /// Lower-cased; unique.
    pub email: String,
    pub name: String,
    /// None for accounts made by a one-time code that never set a password.
    pub password_hash: Option<String>,
    pub email_verified_at: Option<Timestamp>,
    pub avatar_key: Option<String>,
    pub failed_logins: i32,
    pub locked_until: Option<Timestamp>,
    pub last_seen_at: Option<Timestamp>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

/// The lockout rule (SPEC §3): `threshold` failed sign-ins within `window` of the first lock
/// the account for `lock_for`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockoutPolicy {
    pub threshold: i32,
    pub window: chrono::Duration,
    pub lock_for: chrono::Duration,
}

/// What counting a failed sign-in found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailedLogin {
    /// Failures in the current window, this one included (0 once it locked the account).
    pub failures: i32,
    /// Set when this failure locked the account: until when.
    pub locked_until: Option<Timestamp>,
}

/// What registering needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewUser {
    pub email: String,
    pub name: String,
    pub password_hash: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChatKind {
    Direct,
    Group,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chat {
    pub id: ChatId,
    pub kind: ChatKind,
    pub name: Option<String>,
    pub created_by: Option<UserId>,
    pub created_at: Timestamp,
    /// The latest message, for "most recently active first".
    pub last_message_id: Option<MessageId>,
    pub last_message_at: Option<Timestamp>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberRole {
    Admin,
    Member,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub chat_id: ChatId,
    pub user_id: UserId,
    pub role: MemberRole,
    pub joined_at: Timestamp,
    /// Everything up to and including this message has been seen.
    pub last_read_message_id: Option<MessageId>,
    pub last_read_at: Option<Timestamp>,
}

/// What creating a chat needs; `direct_key` makes a direct chat between two people unique.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewChat {
    pub id: ChatId,
    pub kind: ChatKind,
    pub name: Option<String>,
    pub created_by: UserId,
    pub members: Vec<(UserId, MemberRole)>,
}

impl NewChat {
    /// The key of a direct chat: the same for (a, b) and (b, a).
    pub fn direct_key(a: UserId, b: UserId) -> String {
        let (low, high) = if a <= b { (a, b) } else { (b, a) };
        format!("{low}:{high}")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageKind {
    Text,
    Image,
    Ai,
    System,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub id: MessageId,
    pub chat_id: ChatId,
    /// None once the sender's account is deleted ("deleted user"), or for system messages.
    pub sender_id: Option<UserId>,
    pub kind: MessageKind,
    pub text: Option<String>,
    pub client_id: Option<String>,
    /// Image metadata (keys, size, type) for image messages.
    pub image: Option<serde_json::Value>,
    pub created_at: Timestamp,
    pub edited_at: Option<Timestamp>,
    pub deleted_at: Option<Timestamp>,
}

/// A cursor page: `before` gives the newest first, `after` the oldest first, neither the
/// newest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page<Id> {
    pub before: Option<Id>,
    pub after: Option<Id>,
    pub limit: u32,
}

impl<Id> Page<Id> {
    pub const DEFAULT_LIMIT: u32 = 50;
    pub const MAX_LIMIT: u32 = 200;

    pub fn newest(limit: u32) -> Self {
        Self {
            before: None,
            after: None,
            limit,
        }
    }

    pub fn before(id: Id, limit: u32) -> Self {
        Self {
            before: Some(id),
            after: None,
            limit,
        }
    }

    pub fn after(id: Id, limit: u32) -> Self {
        Self {
            before: None,
            after: Some(id),
            limit,
        }
    }

    /// The limit, clamped to 1..=200.
    pub fn clamped_limit(&self) -> u32 {
        self.limit.clamp(1, Self::MAX_LIMIT)
    }

    /// The cursor of the page after `items` (the last one's id) when this page came back
    /// full; `None` at the end.
    pub fn next_cursor<T>(&self, items: &[T], id: impl Fn(&T) -> Id) -> Option<Id> {
        if items.len() == self.clamped_limit() as usize {
            items.last().map(id)
        } else {
            None
        }
    }
}

/// A row of the transactional outbox: a queue message to publish once the change commits.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxEntry {
    /// The envelope id, so a republish after a crash is recognisably the same message.
    pub id: EventId,
    pub queue: String,
    pub kind: String,
    pub payload: serde_json::Value,
    pub trace_id: Option<String>,
    pub created_at: Timestamp,
}

/// A security-relevant event (SPEC §5 audit trail).
#[derive(Debug, Clone, PartialEq)]
pub struct SecurityEvent {
    pub id: SecurityEventId,
    pub user_id: Option<UserId>,
    /// `login_succeeded`, `login_failed`, `account_locked`, `refresh_reused`, …
    pub kind: String,
    pub ip: Option<String>,
    pub user_agent: Option<String>,
    pub details: serde_json::Value,
    pub created_at: Timestamp,
}

/// A failure of a service we call, kept for analytics (SPEC §5).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredServiceError {
    pub id: ServiceErrorId,
    pub code: String,
    pub service: String,
    pub message: String,
    pub context: serde_json::Value,
    pub request_id: Option<String>,
    pub created_at: Timestamp,
}

/// A sign-in: its refresh tokens form a chain; reuse of a rotated one kills the family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefreshFamily {
    pub id: RefreshFamilyId,
    pub user_id: UserId,
    pub created_at: Timestamp,
    pub expires_at: Timestamp,
    pub revoked_at: Option<Timestamp>,
    pub revoked_reason: Option<String>,
}

/// A refresh token, kept only as a hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefreshToken {
    pub id: RefreshTokenId,
    pub family_id: RefreshFamilyId,
    pub token_hash: String,
    pub created_at: Timestamp,
    pub expires_at: Timestamp,
    /// When it was exchanged for its successor.
    pub rotated_at: Option<Timestamp>,
    pub replaced_by: Option<RefreshTokenId>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenPurpose {
    VerifyEmail,
    PasswordReset,
    /// A 6-digit sign-in code (SPEC §3).
    Otp,
}

/// A hashed, expiring, single-use token or code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OneTimeToken {
    pub id: OneTimeTokenId,
    pub user_id: Option<UserId>,
    /// Lower-cased; a code can exist before its account does (passwordless sign-up).
    pub email: String,
    pub purpose: TokenPurpose,
    pub token_hash: String,
    pub attempts: i32,
    pub created_at: Timestamp,
    pub expires_at: Timestamp,
    pub used_at: Option<Timestamp>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AiSession {
    pub id: AiSessionId,
    pub user_id: UserId,
    pub title: String,
    /// `idle` | `queued` | `processing` | `failed`
    pub status: String,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

/// One turn of an AI conversation (SPEC §3 "AI message").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AiMessage {
    pub id: AiMessageId,
    pub session_id: AiSessionId,
    pub request_id: AiRequestId,
    /// `user` | `assistant`
    pub role: String,
    pub content: String,
    /// `complete` | `streaming` | `failed` | `cancelled`
    pub status: String,
    pub model: Option<String>,
    pub provider: Option<String>,
    pub cached: bool,
    pub latency_ms: Option<i64>,
    pub prompt_tokens: Option<i64>,
    pub completion_tokens: Option<i64>,
    pub error_code: Option<String>,
    pub created_at: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AiFeedback {
    pub message_id: AiMessageId,
    pub user_id: UserId,
    /// `up` | `down`
    pub rating: String,
    pub comment: Option<String>,
    pub created_at: Timestamp,
}

/// An image or text generation job (SPEC §3 `/ai/generations`).
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationJob {
    pub id: GenerationId,
    pub user_id: UserId,
    /// `text` | `image`
    pub kind: String,
    pub prompt: String,
    pub n: i32,
    pub provider: Option<String>,
    /// `queued` | `processing` | `succeeded` | `failed`
    pub status: String,
    pub results: Option<serde_json::Value>,
    pub error_code: Option<String>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_time_ordered() {
        let a = MessageId::new();
        let b = MessageId::new();
        assert!(a < b);
        assert_eq!(a.0.get_version_num(), 7);
    }

    #[test]
    fn the_direct_key_ignores_order() {
        let (a, b) = (UserId::new(), UserId::new());
        assert_eq!(NewChat::direct_key(a, b), NewChat::direct_key(b, a));
    }

    #[test]
    fn page_limits_are_clamped() {
        assert_eq!(Page::<MessageId>::newest(0).clamped_limit(), 1);
        assert_eq!(Page::<MessageId>::newest(10_000).clamped_limit(), 200);
    }
}
