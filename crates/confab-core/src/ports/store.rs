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
//! - **Transactions.** [`Store::begin`] gives a [`StoreTx`] with the same operations; nothing
//!   it wrote is visible to others until [`StoreTx::commit`], and dropping it uncommitted
//!   rolls everything back. (A message, the chat's latest-message pointer and the outbox row
//!   that announces it commit together.)
//! - **Outages.** When the database cannot be reached, calls return
//!   [`StoreError::Unavailable`] within the pool's acquire timeout, and work again when it is
//!   back, without a restart. Reads may go to a read replica when one is configured; writes and
//!   everything in a transaction go to the primary.

use async_trait::async_trait;

use super::health::HealthCheck;
use crate::domain::{
    Chat, ChatId, EventId, Member, MemberRole, Message, MessageId, NewChat, NewUser, OutboxEntry,
    Page, SecurityEvent, StoredServiceError, Timestamp, User, UserId,
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
    /// Deletes the user, their memberships and personal records; their messages stay, with
    /// no sender. Whether the user existed.
    async fn delete_user(&self, id: UserId) -> Result<bool, StoreError>;
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
    /// Writes `text`, `edited_at`, `deleted_at` (a tombstone keeps the row, without text).
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
    async fn enqueue(&self, entry: &OutboxEntry) -> Result<(), StoreError>;
    /// Unpublished entries, oldest first.
    async fn pending_outbox(&self, limit: u32) -> Result<Vec<OutboxEntry>, StoreError>;
    async fn mark_published(&self, ids: &[EventId], at: Timestamp) -> Result<(), StoreError>;
    /// Records that `consumer` handled `event`: `Conflict` the second time, which is how an
    /// idempotent consumer recognises a redelivery.
    async fn mark_processed(
        &self,
        consumer: &str,
        event: EventId,
        at: Timestamp,
    ) -> Result<(), StoreError>;
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

/// The operations, inside a transaction.
#[async_trait]
pub trait StoreTx: UserStore + ChatStore + MessageStore + OutboxStore + AuditStore {
    async fn commit(self: Box<Self>) -> Result<(), StoreError>;
}

/// The whole store.
#[async_trait]
pub trait Store:
    UserStore + ChatStore + MessageStore + OutboxStore + AuditStore + HealthCheck
{
    async fn begin(&self) -> Result<Box<dyn StoreTx>, StoreError>;
}
