//! The `Store` port: everything confab keeps (SPEC §5). SQLite embedded, PostgreSQL in
//! production, one implementation over both.
//!
//! # Contract (tested by `testing::store::run_all` against every implementation)
//!
//! - **Durable.** A call that returned `Ok` survives a crash of the process.
//! - **Uniqueness is `Conflict`.** A second user with the same email, a second message with
//!   the same `(sender, client_id)`, a second direct chat for the same pair, a member added
//!   twice, an event id processed twice: [`StoreError::Conflict`], never a generic error, on
//!   every backend. A reference to a row that does not exist is [`StoreError::NotFound`].
//! - **Cursor pages by id.** Ids are UUIDv7, so id order is creation order: `before` pages go
//!   newest first, `after` pages oldest first, and following the last id of one page with the
//!   next page visits every row exactly once.
//! - **At most once.** Rotating a refresh token and using a one-time token are
//!   compare-and-set: of two concurrent callers exactly one succeeds.
//! - **Transactions.** [`Store::begin`] gives a [`StoreTx`] with the same operations; nothing
//!   it wrote is visible to others until [`StoreTx::commit`], and dropping it uncommitted
//!   rolls everything back. (A message, the chat's latest-message pointer and the outbox row
//!   that announces it commit together.) After an error inside a transaction, drop it: on
//!   PostgreSQL it accepts nothing more.
//! - **Outages.** When the database cannot be reached, calls return
//!   [`StoreError::Unavailable`] within the pool's acquire timeout, and work again when it is
//!   back, without a restart. Reads may go to a read replica when one is configured; writes and
//!   everything in a transaction go to the primary.

use async_trait::async_trait;

use super::health::HealthCheck;
use crate::domain::{
    AiFeedback, AiMessage, AiRequestId, AiSession, AiSessionId, Chat, ChatId, ChatKind, EventId,
    FailedLogin, GenerationId, GenerationJob, LockoutPolicy, Member, MemberRole, Message,
    MessageId, NewChat, NewUser, OneTimeToken, OneTimeTokenId, OutboxEntry, Page, RefreshFamily,
    RefreshFamilyId, RefreshToken, RefreshTokenId, SecurityEvent, StoredServiceError, Timestamp,
    TokenPurpose, User, UserId,
};
use crate::error::BoxError;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not found: {0}")]
    NotFound(String),
    /// A uniqueness rule was broken; the text names which (never the values).
    #[error("conflict: {0}")]
    Conflict(String),
    /// The database cannot be reached, or timed out.
    #[error("the database is unavailable")]
    Unavailable(#[source] BoxError),
    /// Anything else: a bug or a schema problem.
    #[error("database error")]
    Other(#[source] BoxError),
}

#[async_trait]
pub trait UserStore: Send + Sync {
    /// `Conflict` when the email is taken.
    async fn create_user(&self, user: NewUser) -> Result<User, StoreError>;
    async fn user_by_id(&self, id: UserId) -> Result<Option<User>, StoreError>;
    /// `email` as stored: lower-cased.
    async fn user_by_email(&self, email: &str) -> Result<Option<User>, StoreError>;
    /// Writes every field but `id`, `email` and `created_at`; `NotFound` when there is no such
    /// user.
    async fn update_user(&self, user: &User) -> Result<(), StoreError>;
    /// Like `update_user`, but only if the row is as the caller read it (its `updated_at` is
    /// still `seen`): whether it was written. A read-modify-write that lost a race with
    /// another writer (a password reset) does not undo it; the caller reads again.
    async fn update_user_if_unchanged(
        &self,
        user: &User,
        seen: Timestamp,
    ) -> Result<bool, StoreError>;
    /// Counts a failed sign-in at `at` (the lockout of SPEC §3), atomically: concurrent calls
    /// each count once. Failures count within a window opened by the first one and lasting
    /// `policy.window`; the failure that reaches `policy.threshold` locks the account until
    /// `at + policy.lock_for` and the count starts again. `NotFound` when there is no such
    /// user. (A successful sign-in resets the count through `update_user`.)
    async fn record_failed_login(
        &self,
        user: UserId,
        at: Timestamp,
        policy: LockoutPolicy,
    ) -> Result<FailedLogin, StoreError>;
    /// Deletes the user, their memberships and personal records; their messages stay, with
    /// no sender. Whether the user existed.
    async fn delete_user(&self, id: UserId) -> Result<bool, StoreError>;
    /// Users whose name starts with `query` (any case), or whose email is exactly `query`;
    /// never by email prefix, so addresses cannot be harvested. Ordered by name, then id.
    async fn search_users(&self, query: &str, limit: u32) -> Result<Vec<User>, StoreError>;
}

#[async_trait]
pub trait ChatStore: Send + Sync {
    /// Creates the chat with its members. For a direct chat, `Conflict` when the pair already
    /// has one.
    async fn create_chat(&self, chat: NewChat) -> Result<Chat, StoreError>;
    async fn chat_by_id(&self, id: ChatId) -> Result<Option<Chat>, StoreError>;
    async fn direct_chat(&self, a: UserId, b: UserId) -> Result<Option<Chat>, StoreError>;
    /// The user's chats, most recently active first.
    async fn chats_of(&self, user: UserId) -> Result<Vec<Chat>, StoreError>;
    /// `Conflict` when already a member; `NotFound` when the chat or user does not exist.
    async fn add_member(
        &self,
        chat: ChatId,
        user: UserId,
        role: MemberRole,
    ) -> Result<Member, StoreError>;
    async fn remove_member(&self, chat: ChatId, user: UserId) -> Result<bool, StoreError>;
    async fn member(&self, chat: ChatId, user: UserId) -> Result<Option<Member>, StoreError>;
    async fn members(&self, chat: ChatId) -> Result<Vec<Member>, StoreError>;
    /// The members of every chat in `chats` (in one round trip, however many chats), each
    /// chat's in join order; chats that do not exist have none.
    async fn members_of_chats(&self, chats: &[ChatId]) -> Result<Vec<Member>, StoreError>;
    /// Moves the user's read position forward to `message` (never backwards).
    async fn mark_read(
        &self,
        chat: ChatId,
        user: UserId,
        message: MessageId,
        at: Timestamp,
    ) -> Result<(), StoreError>;
    /// Points the chat at its latest message.
    async fn set_latest_message(
        &self,
        chat: ChatId,
        message: MessageId,
        at: Timestamp,
    ) -> Result<(), StoreError>;
}

#[async_trait]
pub trait MessageStore: Send + Sync {
    /// `Conflict` when the sender already used `client_id`; `NotFound` when the chat does not
    /// exist.
    async fn insert_message(&self, message: &Message) -> Result<(), StoreError>;
    async fn message_by_id(&self, id: MessageId) -> Result<Option<Message>, StoreError>;
    async fn message_by_client_id(
        &self,
        sender: UserId,
        client_id: &str,
    ) -> Result<Option<Message>, StoreError>;
    async fn messages(
        &self,
        chat: ChatId,
        page: Page<MessageId>,
    ) -> Result<Vec<Message>, StoreError>;
    /// Writes `text`, `image`, `edited_at`, `deleted_at` (a tombstone keeps the row, without
    /// text or image). A tombstone is final: updating a deleted message is `NotFound`.
    async fn update_message(&self, message: &Message) -> Result<(), StoreError>;
    /// Messages after `after` (or all) not sent by `user`: the unread count.
    async fn count_messages_after(
        &self,
        chat: ChatId,
        after: Option<MessageId>,
        not_from: UserId,
    ) -> Result<u64, StoreError>;
}

#[async_trait]
pub trait OutboxStore: Send + Sync {
    /// Records the intent to publish `entry`, with the caller's transaction if any. A store
    /// that shares its database with the queue may put the entry on the queue itself, at
    /// the commit (the embedded default; `DbBroker::take_outbox_of`): then nothing is ever
    /// pending for a relay.
    async fn enqueue(&self, entry: &OutboxEntry) -> Result<(), StoreError>;
    /// Unpublished entries, oldest first.
    async fn pending_outbox(&self, limit: u32) -> Result<Vec<OutboxEntry>, StoreError>;
    async fn mark_published(&self, ids: &[EventId], at: Timestamp) -> Result<(), StoreError>;
    /// Deletes entries published before `before` (their payloads may hold one-time links):
    /// how many. Unpublished entries stay, however old.
    async fn purge_published_outbox(&self, before: Timestamp) -> Result<u64, StoreError>;
    /// Records that `consumer` handled `event`: `Conflict` the second time, which is how an
    /// idempotent consumer recognises a redelivery.
    async fn mark_processed(
        &self,
        consumer: &str,
        event: EventId,
        at: Timestamp,
    ) -> Result<(), StoreError>;
    /// Whether `consumer` already handled `event` (for effects outside the database, which
    /// cannot share its transaction: check, act, then mark).
    async fn was_processed(&self, consumer: &str, event: EventId) -> Result<bool, StoreError>;
}

#[async_trait]
pub trait AuditStore: Send + Sync {
    async fn record_security_event(&self, event: &SecurityEvent) -> Result<(), StoreError>;
    /// The user's own events, newest first.
    async fn security_events(
        &self,
        user: UserId,
        page: Page<crate::domain::SecurityEventId>,
    ) -> Result<Vec<SecurityEvent>, StoreError>;
    async fn record_service_error(&self, error: &StoredServiceError) -> Result<(), StoreError>;
}

/// Refresh-token families and one-time tokens (SPEC §3 "Accounts and auth"). Tokens are kept
/// only as hashes; the service hashes what the client presents and looks that up.
#[async_trait]
pub trait TokenStore: Send + Sync {
    /// A new family with its first token. `NotFound` when the user does not exist.
    async fn create_refresh_family(
        &self,
        family: &RefreshFamily,
        first: &RefreshToken,
    ) -> Result<(), StoreError>;
    /// The token with this hash, and its family.
    async fn refresh_token_by_hash(
        &self,
        token_hash: &str,
    ) -> Result<Option<(RefreshToken, RefreshFamily)>, StoreError>;
    async fn refresh_token_by_id(
        &self,
        id: RefreshTokenId,
    ) -> Result<Option<RefreshToken>, StoreError>;
    /// Exchanges `old` for `successor`, atomically and at most once: `Ok(false)` when `old`
    /// was already rotated (a concurrent refresh won, or the token is being reused). The
    /// successor is stored only when this returns `Ok(true)`.
    async fn rotate_refresh_token(
        &self,
        old: RefreshTokenId,
        successor: &RefreshToken,
        at: Timestamp,
    ) -> Result<bool, StoreError>;
    /// Revokes the family (reuse detected, logout); revoking twice keeps the first reason.
    async fn revoke_refresh_family(
        &self,
        family: RefreshFamilyId,
        reason: &str,
        at: Timestamp,
    ) -> Result<(), StoreError>;
    /// Revokes every live family of the user (logout-all, password change); how many.
    async fn revoke_user_refresh_families(
        &self,
        user: UserId,
        reason: &str,
        at: Timestamp,
    ) -> Result<u64, StoreError>;
    /// Deletes families that expired before `before`, with their tokens; how many.
    async fn purge_refresh_families(&self, before: Timestamp) -> Result<u64, StoreError>;

    /// `Conflict` when a token with the same purpose and hash exists.
    async fn create_one_time_token(&self, token: &OneTimeToken) -> Result<(), StoreError>;
    async fn one_time_token(
        &self,
        purpose: TokenPurpose,
        token_hash: &str,
    ) -> Result<Option<OneTimeToken>, StoreError>;
    /// The newest unused, unexpired token of this purpose for `email` (an OTP is checked
    /// against it).
    async fn latest_one_time_token(
        &self,
        email: &str,
        purpose: TokenPurpose,
        now: Timestamp,
    ) -> Result<Option<OneTimeToken>, StoreError>;
    /// Counts a failed attempt; returns the new count.
    async fn count_one_time_attempt(&self, id: OneTimeTokenId) -> Result<i32, StoreError>;
    /// Marks the token used, at most once and only before it expires: whether this call did.
    async fn use_one_time_token(
        &self,
        id: OneTimeTokenId,
        at: Timestamp,
    ) -> Result<bool, StoreError>;
    /// Deletes tokens that expired before `before`; how many.
    async fn purge_one_time_tokens(&self, before: Timestamp) -> Result<u64, StoreError>;
}

/// AI sessions, their messages, feedback, and generation jobs (SPEC §3 "AI assistant").
#[async_trait]
pub trait AiStore: Send + Sync {
    async fn create_ai_session(&self, session: &AiSession) -> Result<(), StoreError>;
    async fn ai_session(&self, id: AiSessionId) -> Result<Option<AiSession>, StoreError>;
    /// The user's sessions, most recently updated first.
    async fn ai_sessions_of(&self, user: UserId, limit: u32) -> Result<Vec<AiSession>, StoreError>;
    async fn set_ai_session_status(
        &self,
        id: AiSessionId,
        status: &str,
        at: Timestamp,
    ) -> Result<(), StoreError>;
    async fn delete_ai_session(&self, id: AiSessionId) -> Result<bool, StoreError>;
    /// `Conflict` when the request already has a message of that role: a redelivered answer
    /// is not stored twice.
    async fn insert_ai_message(&self, message: &AiMessage) -> Result<(), StoreError>;
    async fn ai_message(
        &self,
        id: crate::domain::AiMessageId,
    ) -> Result<Option<AiMessage>, StoreError>;
    async fn ai_message_for_request(
        &self,
        request: AiRequestId,
        role: &str,
    ) -> Result<Option<AiMessage>, StoreError>;
    /// The session's last `limit` messages, oldest first (the model's context).
    async fn recent_ai_messages(
        &self,
        session: AiSessionId,
        limit: u32,
    ) -> Result<Vec<AiMessage>, StoreError>;
    /// Writes content, status, model, provider, cached, latency, usage and error code.
    async fn update_ai_message(&self, message: &AiMessage) -> Result<(), StoreError>;
    /// One rating per user and message: a second call replaces the first.
    async fn put_ai_feedback(&self, feedback: &AiFeedback) -> Result<(), StoreError>;
    async fn create_generation(&self, job: &GenerationJob) -> Result<(), StoreError>;
    async fn generation(&self, id: GenerationId) -> Result<Option<GenerationJob>, StoreError>;
    /// Writes status, results, provider and error code.
    async fn update_generation(&self, job: &GenerationJob) -> Result<(), StoreError>;
    /// Deletes sessions and jobs last updated before `before` (retention); how many of each.
    async fn purge_ai_history(&self, before: Timestamp) -> Result<(u64, u64), StoreError>;
}

/// The operations, inside a transaction.
#[async_trait]
pub trait StoreTx:
    UserStore + ChatStore + MessageStore + OutboxStore + AuditStore + TokenStore + AiStore
{
    async fn commit(self: Box<Self>) -> Result<(), StoreError>;
}

/// One message to append, with the outbox entry that announces it.
#[derive(Debug, Clone)]
pub struct Append {
    pub message: Message,
    pub event: OutboxEntry,
}

/// What became of one [`Append`].
#[derive(Debug, Clone, PartialEq)]
pub enum Appended {
    /// Stored now, in a chat of this kind.
    Stored(ChatKind),
    /// The sender had already used this client id (earlier, or earlier in the same batch):
    /// nothing new is stored and this is the message that stands, possibly in another chat.
    Duplicate {
        existing: Box<Message>,
        kind: ChatKind,
    },
    /// The sender is not a member of the chat, or there is no such chat: nothing stored.
    NotMember,
}

/// The whole store.
#[async_trait]
pub trait Store:
    UserStore + ChatStore + MessageStore + OutboxStore + AuditStore + TokenStore + AiStore + HealthCheck
{
    async fn begin(&self) -> Result<Box<dyn StoreTx>, StoreError>;

    /// Group commit: appends a batch of messages in ONE transaction: each message whose
    /// sender is a member of its chat and whose `(sender, client_id)` is new is inserted with
    /// its outbox entry, and each chat's latest-message pointer moves to its newest. One
    /// answer per input, in order. A duplicate client id never fails the batch (see
    /// [`Appended::Duplicate`]); a batch error means nothing of it was stored.
    async fn append_messages(&self, batch: &[Append]) -> Result<Vec<Appended>, StoreError>;
}
