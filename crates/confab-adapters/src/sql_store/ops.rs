//! The store's operations, written once for any connection (pool or transaction).

use async_trait::async_trait;
use confab_core::domain::{
    Chat, ChatId, ChatKind, EventId, FailedLogin, LockoutPolicy, Member, MemberRole, Message,
    MessageId, MessageKind, NewChat, NewUser, OutboxEntry, Page, SecurityEvent, SecurityEventId,
    StoredServiceError, Timestamp, User, UserId, now,
};
use confab_core::ports::broker::Envelope;
use confab_core::ports::store::{
    AuditStore, ChatStore, MessageStore, OutboxStore, StoreError, UserStore,
};
use sea_orm::sea_query::{Expr, ExprTrait, Func, LikeExpr};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, Condition, ConnectionTrait, EntityTrait, IntoActiveModel,
    PaginatorTrait, QueryFilter, QueryOrder, QuerySelect, TransactionSession, TransactionTrait,
};

use super::entities::{
    chat_members, chats, messages, outbox, processed_events, security_events, service_errors, users,
};
use super::{Sql, read, store_err};
use crate::db_broker::insert_envelopes;

/// An insert's values: every field of `model`, as given.
pub(super) fn values<M, A>(model: M) -> A
where
    M: IntoActiveModel<A>,
    A: ActiveModelTrait,
{
    model.into_active_model().reset_all()
}

fn corrupt(what: &str, value: &str) -> StoreError {
    StoreError::Other(format!("unexpected {what} {value:?} in the database").into())
}

fn user(m: users::Model) -> User {
    User {
        id: UserId(m.id),
        email: m.email,
        name: m.name,
        password_hash: m.password_hash,
        email_verified_at: m.email_verified_at,
        avatar_key: m.avatar_key,
        failed_logins: m.failed_logins,
        locked_until: m.locked_until,
        last_seen_at: m.last_seen_at,
        created_at: m.created_at,
        updated_at: m.updated_at,
    }
}

fn chat_kind(kind: ChatKind) -> &'static str {
    match kind {
        ChatKind::Direct => "direct",
        ChatKind::Group => "group",
    }
}

fn chat(m: chats::Model) -> Result<Chat, StoreError> {
    Ok(Chat {
        id: ChatId(m.id),
        kind: match m.kind.as_str() {
            "direct" => ChatKind::Direct,
            "group" => ChatKind::Group,
            other => return Err(corrupt("chat kind", other)),
        },
        name: m.name,
        created_by: m.created_by.map(UserId),
        created_at: m.created_at,
        last_message_id: m.last_message_id.map(MessageId),
        last_message_at: m.last_message_at,
    })
}

fn role_name(role: MemberRole) -> &'static str {
    match role {
        MemberRole::Admin => "admin",
        MemberRole::Member => "member",
    }
}

fn member(m: &chat_members::Model) -> Result<Member, StoreError> {
    let role = match m.role.as_str() {
        "admin" => MemberRole::Admin,
        "member" => MemberRole::Member,
        other => return Err(corrupt("member role", other)),
    };
    Ok(Member {
        chat_id: ChatId(m.chat_id),
        user_id: UserId(m.user_id),
        role,
        joined_at: m.joined_at,
        last_read_message_id: m.last_read_message_id.map(MessageId),
        last_read_at: m.last_read_at,
    })
}

pub(super) fn message_kind(kind: MessageKind) -> &'static str {
    match kind {
        MessageKind::Text => "text",
        MessageKind::Image => "image",
        MessageKind::Ai => "ai",
        MessageKind::System => "system",
    }
}

pub(super) fn message_model(m: &Message) -> messages::Model {
    messages::Model {
        id: m.id.0,
        chat_id: m.chat_id.0,
        sender_id: m.sender_id.map(|u| u.0),
        kind: message_kind(m.kind).to_owned(),
        text: m.text.clone(),
        client_id: m.client_id.clone(),
        image: m.image.clone(),
        created_at: m.created_at,
        edited_at: m.edited_at,
        deleted_at: m.deleted_at,
    }
}

pub(super) fn outbox_model(e: &OutboxEntry) -> outbox::Model {
    outbox::Model {
        id: e.id.0,
        queue: e.queue.clone(),
        kind: e.kind.clone(),
        payload: e.payload.clone(),
        trace_id: e.trace_id.clone(),
        created_at: e.created_at,
        published_at: None,
    }
}

pub(super) fn to_message(m: messages::Model) -> Result<Message, StoreError> {
    Ok(Message {
        id: MessageId(m.id),
        chat_id: ChatId(m.chat_id),
        sender_id: m.sender_id.map(UserId),
        kind: match m.kind.as_str() {
            "text" => MessageKind::Text,
            "image" => MessageKind::Image,
            "ai" => MessageKind::Ai,
            "system" => MessageKind::System,
            other => return Err(corrupt("message kind", other)),
        },
        text: m.text,
        client_id: m.client_id,
        image: m.image,
        created_at: m.created_at,
        edited_at: m.edited_at,
        deleted_at: m.deleted_at,
    })
}

fn outbox_entry(m: outbox::Model) -> OutboxEntry {
    OutboxEntry {
        id: EventId(m.id),
        queue: m.queue,
        kind: m.kind,
        payload: m.payload,
        trace_id: m.trace_id,
        created_at: m.created_at,
    }
}

fn limit(page: &Page<impl Sized>) -> u64 {
    u64::from(page.clamped_limit())
}

/// Writes every field of `u` but `id`, `email` and `created_at`; with `seen`, only if the
/// row's `updated_at` is still that. Whether a row was written.
async fn write_user<C: ConnectionTrait>(
    conn: &C,
    u: &User,
    seen: Option<Timestamp>,
) -> Result<bool, StoreError> {
    let mut update = users::Entity::update_many()
        .col_expr(users::Column::Name, Expr::value(u.name.clone()))
        .col_expr(
            users::Column::PasswordHash,
            Expr::value(u.password_hash.clone()),
        )
        .col_expr(
            users::Column::EmailVerifiedAt,
            Expr::value(u.email_verified_at),
        )
        .col_expr(users::Column::AvatarKey, Expr::value(u.avatar_key.clone()))
        .col_expr(users::Column::FailedLogins, Expr::value(u.failed_logins))
        .col_expr(users::Column::LockedUntil, Expr::value(u.locked_until))
        .col_expr(users::Column::LastSeenAt, Expr::value(u.last_seen_at))
        .col_expr(users::Column::UpdatedAt, Expr::value(u.updated_at))
        .filter(users::Column::Id.eq(u.id.0));
    if let Some(seen) = seen {
        update = update.filter(users::Column::UpdatedAt.eq(seen));
    }
    let updated = update.exec(conn).await.map_err(store_err)?;
    Ok(updated.rows_affected > 0)
}

#[async_trait]
impl<C> UserStore for Sql<C>
where
    C: ConnectionTrait + TransactionTrait + Send + Sync + 'static,
{
    async fn create_user(&self, new: NewUser) -> Result<User, StoreError> {
        let at = now();
        let model = users::Model {
            id: UserId::new().0,
            email: new.email,
            name: new.name,
            password_hash: new.password_hash,
            email_verified_at: None,
            avatar_key: None,
            failed_logins: 0,
            locked_until: None,
            last_seen_at: None,
            created_at: at,
            updated_at: at,
            failed_login_window_start: None,
        };
        users::Entity::insert(values::<_, users::ActiveModel>(model.clone()))
            .exec_without_returning(&self.conn)
            .await
            .map_err(store_err)?;
        Ok(user(model))
    }

    async fn user_by_id(&self, id: UserId) -> Result<Option<User>, StoreError> {
        let found = read!(self, |c| users::Entity::find_by_id(id.0).one(c).await);
        Ok(found.map_err(store_err)?.map(user))
    }

    async fn user_by_email(&self, email: &str) -> Result<Option<User>, StoreError> {
        let found = read!(self, |c| users::Entity::find()
            .filter(users::Column::Email.eq(email))
            .one(c)
            .await);
        Ok(found.map_err(store_err)?.map(user))
    }

    async fn update_user(&self, u: &User) -> Result<(), StoreError> {
        if !write_user(&self.conn, u, None).await? {
            return Err(StoreError::NotFound(format!("user {}", u.id)));
        }
        Ok(())
    }

    async fn update_user_if_unchanged(
        &self,
        u: &User,
        seen: Timestamp,
    ) -> Result<bool, StoreError> {
        write_user(&self.conn, u, Some(seen)).await
    }

    async fn record_failed_login(
        &self,
        id: UserId,
        at: Timestamp,
        policy: LockoutPolicy,
    ) -> Result<FailedLogin, StoreError> {
        use users::Column::{FailedLoginWindowStart, FailedLogins, LockedUntil};
        let tx = self.conn.begin().await.map_err(store_err)?;
        // Both SET expressions read the row as it was, so the count and the window move
        // together; the row lock (PostgreSQL) or the write lock (SQLite) serialises callers.
        let in_window = Condition::all()
            .add(FailedLoginWindowStart.is_not_null())
            .add(FailedLoginWindowStart.gte(at - policy.window));
        let counted = users::Entity::update_many()
            .col_expr(
                FailedLogins,
                Expr::case(in_window.clone(), Expr::col(FailedLogins).add(1))
                    .finally(Expr::val(1))
                    .into(),
            )
            .col_expr(
                FailedLoginWindowStart,
                Expr::case(in_window, Expr::col(FailedLoginWindowStart))
                    .finally(Expr::val(Some(at)))
                    .into(),
            )
            .filter(users::Column::Id.eq(id.0))
            .exec(&tx)
            .await
            .map_err(store_err)?;
        if counted.rows_affected == 0 {
            return Err(StoreError::NotFound(format!("user {id}")));
        }
        let row = users::Entity::find_by_id(id.0)
            .one(&tx)
            .await
            .map_err(store_err)?
            .ok_or_else(|| StoreError::NotFound(format!("user {id}")))?;
        let mut outcome = FailedLogin {
            failures: row.failed_logins,
            locked_until: None,
        };
        if row.failed_logins >= policy.threshold {
            let until = at + policy.lock_for;
            users::Entity::update_many()
                .col_expr(LockedUntil, Expr::val(Some(until)))
                .col_expr(FailedLogins, Expr::val(0))
                .col_expr(FailedLoginWindowStart, Expr::val(None::<Timestamp>))
                .filter(users::Column::Id.eq(id.0))
                .exec(&tx)
                .await
                .map_err(store_err)?;
            outcome = FailedLogin {
                failures: 0,
                locked_until: Some(until),
            };
        }
        tx.commit().await.map_err(store_err)?;
        Ok(outcome)
    }

    async fn search_users(&self, query: &str, limit: u32) -> Result<Vec<User>, StoreError> {
        let query = query.trim();
        if query.is_empty() {
            return Ok(Vec::new());
        }
        // LIKE's own wildcards in the query are literal.
        let escaped: String = query
            .to_lowercase()
            .chars()
            .flat_map(|c| match c {
                '%' | '_' | '\\' => vec!['\\', c],
                c => vec![c],
            })
            .collect();
        let by_name = Expr::expr(Func::lower(Expr::col(users::Column::Name)))
            .like(LikeExpr::new(format!("{escaped}%")).escape('\\'));
        let by_email = users::Column::Email.eq(query.to_lowercase());
        let found = read!(self, |c| users::Entity::find()
            .filter(Condition::any().add(by_name.clone()).add(by_email.clone()))
            .order_by_asc(users::Column::Name)
            .order_by_asc(users::Column::Id)
            .limit(u64::from(limit.clamp(1, 200)))
            .all(c)
            .await);
        Ok(found.map_err(store_err)?.into_iter().map(user).collect())
    }

    async fn delete_user(&self, id: UserId) -> Result<bool, StoreError> {
        let deleted = users::Entity::delete_by_id(id.0)
            .exec(&self.conn)
            .await
            .map_err(store_err)?;
        Ok(deleted.rows_affected > 0)
    }
}

#[async_trait]
impl<C> ChatStore for Sql<C>
where
    C: ConnectionTrait + TransactionTrait + Send + Sync + 'static,
{
    async fn create_chat(&self, new: NewChat) -> Result<Chat, StoreError> {
        let at = now();
        let direct_key = match (new.kind, new.members.as_slice()) {
            (ChatKind::Direct, [(a, _), (b, _)]) => Some(NewChat::direct_key(*a, *b)),
            (ChatKind::Direct, _) => {
                return Err(StoreError::Other(
                    "a direct chat has exactly two members".into(),
                ));
            }
            (ChatKind::Group, _) => None,
        };
        let model = chats::Model {
            id: new.id.0,
            kind: chat_kind(new.kind).to_owned(),
            name: new.name,
            direct_key,
            created_by: Some(new.created_by.0),
            created_at: at,
            last_message_id: None,
            last_message_at: None,
            activity_at: at,
        };
        // The chat and its members, together (a savepoint when already in a transaction).
        let tx = self.conn.begin().await.map_err(store_err)?;
        chats::Entity::insert(values::<_, chats::ActiveModel>(model.clone()))
            .exec_without_returning(&tx)
            .await
            .map_err(store_err)?;
        let members = new.members.iter().map(|(user, role)| {
            values::<_, chat_members::ActiveModel>(chat_members::Model {
                chat_id: new.id.0,
                user_id: user.0,
                role: role_name(*role).to_owned(),
                joined_at: at,
                last_read_message_id: None,
                last_read_at: None,
            })
        });
        chat_members::Entity::insert_many(members)
            .exec_without_returning(&tx)
            .await
            .map_err(store_err)?;
        tx.commit().await.map_err(store_err)?;
        chat(model)
    }

    async fn chat_by_id(&self, id: ChatId) -> Result<Option<Chat>, StoreError> {
        let found = read!(self, |c| chats::Entity::find_by_id(id.0).one(c).await);
        found.map_err(store_err)?.map(chat).transpose()
    }

    async fn direct_chat(&self, a: UserId, b: UserId) -> Result<Option<Chat>, StoreError> {
        let key = NewChat::direct_key(a, b);
        let found = read!(self, |c| chats::Entity::find()
            .filter(chats::Column::DirectKey.eq(key.clone()))
            .one(c)
            .await);
        found.map_err(store_err)?.map(chat).transpose()
    }

    async fn chats_of(&self, user: UserId) -> Result<Vec<Chat>, StoreError> {
        let found = read!(self, |c| {
            let ids: Vec<uuid::Uuid> = chat_members::Entity::find()
                .select_only()
                .column(chat_members::Column::ChatId)
                .filter(chat_members::Column::UserId.eq(user.0))
                .into_tuple()
                .all(c)
                .await
                .map_err(store_err)?;
            chats::Entity::find()
                .filter(chats::Column::Id.is_in(ids))
                .order_by_desc(chats::Column::ActivityAt)
                .order_by_desc(chats::Column::Id)
                .all(c)
                .await
        });
        found.map_err(store_err)?.into_iter().map(chat).collect()
    }

    async fn add_member(
        &self,
        chat: ChatId,
        user: UserId,
        role: MemberRole,
    ) -> Result<Member, StoreError> {
        let model = chat_members::Model {
            chat_id: chat.0,
            user_id: user.0,
            role: role_name(role).to_owned(),
            joined_at: now(),
            last_read_message_id: None,
            last_read_at: None,
        };
        chat_members::Entity::insert(values::<_, chat_members::ActiveModel>(model.clone()))
            .exec_without_returning(&self.conn)
            .await
            .map_err(store_err)?;
        member(&model)
    }

    async fn remove_member(&self, chat: ChatId, user: UserId) -> Result<bool, StoreError> {
        let deleted = chat_members::Entity::delete_by_id((chat.0, user.0))
            .exec(&self.conn)
            .await
            .map_err(store_err)?;
        Ok(deleted.rows_affected > 0)
    }

    async fn member(&self, chat: ChatId, user: UserId) -> Result<Option<Member>, StoreError> {
        let found = read!(self, |c| chat_members::Entity::find_by_id((chat.0, user.0))
            .one(c)
            .await);
        found.map_err(store_err)?.map(|m| member(&m)).transpose()
    }

    async fn members(&self, chat: ChatId) -> Result<Vec<Member>, StoreError> {
        let found = read!(self, |c| chat_members::Entity::find()
            .filter(chat_members::Column::ChatId.eq(chat.0))
            .order_by_asc(chat_members::Column::JoinedAt)
            .order_by_asc(chat_members::Column::UserId)
            .all(c)
            .await);
        found
            .map_err(store_err)?
            .into_iter()
            .map(|m| member(&m))
            .collect()
    }

    async fn members_of_chats(&self, chats: &[ChatId]) -> Result<Vec<Member>, StoreError> {
        let mut all = Vec::new();
        // Bounded by the backends' parameter limits (SQLite's is 32,766).
        for chunk in chats.chunks(1000) {
            let ids: Vec<uuid::Uuid> = chunk.iter().map(|c| c.0).collect();
            let found = read!(self, |c| chat_members::Entity::find()
                .filter(chat_members::Column::ChatId.is_in(ids.clone()))
                .order_by_asc(chat_members::Column::ChatId)
                .order_by_asc(chat_members::Column::JoinedAt)
                .order_by_asc(chat_members::Column::UserId)
                .all(c)
                .await);
            for m in found.map_err(store_err)? {
                all.push(member(&m)?);
            }
        }
        Ok(all)
    }

    async fn mark_read(
        &self,
        chat: ChatId,
        user: UserId,
        message: MessageId,
        at: Timestamp,
    ) -> Result<(), StoreError> {
        chat_members::Entity::update_many()
            .col_expr(
                chat_members::Column::LastReadMessageId,
                Expr::value(Some(message.0)),
            )
            .col_expr(chat_members::Column::LastReadAt, Expr::value(Some(at)))
            .filter(chat_members::Column::ChatId.eq(chat.0))
            .filter(chat_members::Column::UserId.eq(user.0))
            .filter(
                chat_members::Column::LastReadMessageId
                    .is_null()
                    .or(chat_members::Column::LastReadMessageId.lt(message.0)),
            )
            .exec(&self.conn)
            .await
            .map_err(store_err)?;
        Ok(())
    }

    async fn set_latest_message(
        &self,
        chat: ChatId,
        message: MessageId,
        at: Timestamp,
    ) -> Result<(), StoreError> {
        chats::Entity::update_many()
            .col_expr(chats::Column::LastMessageId, Expr::value(Some(message.0)))
            .col_expr(chats::Column::LastMessageAt, Expr::value(Some(at)))
            .col_expr(chats::Column::ActivityAt, Expr::value(at))
            .filter(chats::Column::Id.eq(chat.0))
            .filter(
                chats::Column::LastMessageId
                    .is_null()
                    .or(chats::Column::LastMessageId.lt(message.0)),
            )
            .exec(&self.conn)
            .await
            .map_err(store_err)?;
        Ok(())
    }
}

#[async_trait]
impl<C> MessageStore for Sql<C>
where
    C: ConnectionTrait + TransactionTrait + Send + Sync + 'static,
{
    async fn insert_message(&self, m: &Message) -> Result<(), StoreError> {
        messages::Entity::insert(values::<_, messages::ActiveModel>(message_model(m)))
            .exec_without_returning(&self.conn)
            .await
            .map_err(store_err)?;
        Ok(())
    }

    async fn message_by_id(&self, id: MessageId) -> Result<Option<Message>, StoreError> {
        let found = read!(self, |c| messages::Entity::find_by_id(id.0).one(c).await);
        found.map_err(store_err)?.map(to_message).transpose()
    }

    async fn message_by_client_id(
        &self,
        sender: UserId,
        client_id: &str,
    ) -> Result<Option<Message>, StoreError> {
        // The primary, not the replica: a retry must find what the first attempt just wrote.
        let found = messages::Entity::find()
            .filter(messages::Column::SenderId.eq(sender.0))
            .filter(messages::Column::ClientId.eq(client_id))
            .one(&self.conn)
            .await;
        found.map_err(store_err)?.map(to_message).transpose()
    }

    async fn messages(
        &self,
        chat: ChatId,
        page: Page<MessageId>,
    ) -> Result<Vec<Message>, StoreError> {
        let mut query = messages::Entity::find().filter(messages::Column::ChatId.eq(chat.0));
        query = match (page.before, page.after) {
            (_, Some(after)) => query
                .filter(messages::Column::Id.gt(after.0))
                .order_by_asc(messages::Column::Id),
            (Some(before), None) => query
                .filter(messages::Column::Id.lt(before.0))
                .order_by_desc(messages::Column::Id),
            (None, None) => query.order_by_desc(messages::Column::Id),
        };
        let query = query.limit(limit(&page));
        let found = read!(self, |c| query.clone().all(c).await);
        found
            .map_err(store_err)?
            .into_iter()
            .map(to_message)
            .collect()
    }

    async fn update_message(&self, m: &Message) -> Result<(), StoreError> {
        let updated = messages::Entity::update_many()
            .col_expr(messages::Column::Text, Expr::value(m.text.clone()))
            .col_expr(messages::Column::Image, Expr::value(m.image.clone()))
            .col_expr(messages::Column::EditedAt, Expr::value(m.edited_at))
            .col_expr(messages::Column::DeletedAt, Expr::value(m.deleted_at))
            .filter(messages::Column::Id.eq(m.id.0))
            // A tombstone is final: an edit that raced the delete changes nothing.
            .filter(messages::Column::DeletedAt.is_null())
            .exec(&self.conn)
            .await
            .map_err(store_err)?;
        if updated.rows_affected == 0 {
            return Err(StoreError::NotFound(format!("message {}", m.id)));
        }
        Ok(())
    }

    async fn count_messages_after(
        &self,
        chat: ChatId,
        after: Option<MessageId>,
        not_from: UserId,
    ) -> Result<u64, StoreError> {
        let mut query = messages::Entity::find()
            .filter(messages::Column::ChatId.eq(chat.0))
            .filter(
                messages::Column::SenderId
                    .is_null()
                    .or(messages::Column::SenderId.ne(not_from.0)),
            );
        if let Some(after) = after {
            query = query.filter(messages::Column::Id.gt(after.0));
        }
        let counted = read!(self, |c| query.clone().count(c).await);
        counted.map_err(store_err)
    }
}

#[async_trait]
impl<C> OutboxStore for Sql<C>
where
    C: ConnectionTrait + TransactionTrait + Send + Sync + 'static,
{
    async fn enqueue(&self, e: &OutboxEntry) -> Result<(), StoreError> {
        if !self.queue.direct() {
            outbox::Entity::insert(values::<_, outbox::ActiveModel>(outbox_model(e)))
                .exec_without_returning(&self.conn)
                .await
                .map_err(store_err)?;
            return Ok(());
        }
        let envelope = Envelope::from(e);
        let insert = insert_envelopes(
            self.conn.get_database_backend(),
            std::iter::once((e.queue.as_str(), &envelope)),
        );
        self.conn.execute_raw(insert).await.map_err(store_err)?;
        match &self.enqueued {
            // Told when the transaction commits.
            Some(enqueued) => enqueued
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(e.queue.clone()),
            None => self.queue.committed([e.queue.as_str()]),
        }
        Ok(())
    }

    async fn pending_outbox(&self, limit: u32) -> Result<Vec<OutboxEntry>, StoreError> {
        // The primary: a relay must see what was just committed.
        let found = outbox::Entity::find()
            .filter(outbox::Column::PublishedAt.is_null())
            .order_by_asc(outbox::Column::Id)
            .limit(u64::from(Ord::max(limit, 1)))
            .all(&self.conn)
            .await;
        Ok(found
            .map_err(store_err)?
            .into_iter()
            .map(outbox_entry)
            .collect())
    }

    async fn mark_published(&self, ids: &[EventId], at: Timestamp) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        outbox::Entity::update_many()
            .col_expr(outbox::Column::PublishedAt, Expr::value(Some(at)))
            .filter(outbox::Column::Id.is_in(ids.iter().map(|id| id.0)))
            .exec(&self.conn)
            .await
            .map_err(store_err)?;
        Ok(())
    }

    async fn purge_published_outbox(&self, before: Timestamp) -> Result<u64, StoreError> {
        let deleted = outbox::Entity::delete_many()
            .filter(outbox::Column::PublishedAt.is_not_null())
            .filter(outbox::Column::PublishedAt.lt(before))
            .exec(&self.conn)
            .await
            .map_err(store_err)?;
        Ok(deleted.rows_affected)
    }

    async fn was_processed(&self, consumer: &str, event: EventId) -> Result<bool, StoreError> {
        let found = processed_events::Entity::find_by_id((consumer.to_owned(), event.0))
            .one(&self.conn)
            .await
            .map_err(store_err)?;
        Ok(found.is_some())
    }

    async fn mark_processed(
        &self,
        consumer: &str,
        event: EventId,
        at: Timestamp,
    ) -> Result<(), StoreError> {
        let model = processed_events::Model {
            consumer: consumer.to_owned(),
            event_id: event.0,
            processed_at: at,
        };
        processed_events::Entity::insert(values::<_, processed_events::ActiveModel>(model))
            .exec_without_returning(&self.conn)
            .await
            .map_err(store_err)?;
        Ok(())
    }
}

#[async_trait]
impl<C> AuditStore for Sql<C>
where
    C: ConnectionTrait + TransactionTrait + Send + Sync + 'static,
{
    async fn record_security_event(&self, e: &SecurityEvent) -> Result<(), StoreError> {
        let model = security_events::Model {
            id: e.id.0,
            user_id: e.user_id.map(|u| u.0),
            kind: e.kind.clone(),
            ip: e.ip.clone(),
            user_agent: e.user_agent.clone(),
            details: e.details.clone(),
            created_at: e.created_at,
        };
        security_events::Entity::insert(values::<_, security_events::ActiveModel>(model))
            .exec_without_returning(&self.conn)
            .await
            .map_err(store_err)?;
        Ok(())
    }

    async fn security_events(
        &self,
        user: UserId,
        page: Page<SecurityEventId>,
    ) -> Result<Vec<SecurityEvent>, StoreError> {
        let mut query =
            security_events::Entity::find().filter(security_events::Column::UserId.eq(user.0));
        query = match (page.before, page.after) {
            (_, Some(after)) => query
                .filter(security_events::Column::Id.gt(after.0))
                .order_by_asc(security_events::Column::Id),
            (Some(before), None) => query
                .filter(security_events::Column::Id.lt(before.0))
                .order_by_desc(security_events::Column::Id),
            (None, None) => query.order_by_desc(security_events::Column::Id),
        };
        let query = query.limit(limit(&page));
        let found = read!(self, |c| query.clone().all(c).await);
        Ok(found
            .map_err(store_err)?
            .into_iter()
            .map(|m| SecurityEvent {
                id: SecurityEventId(m.id),
                user_id: m.user_id.map(UserId),
                kind: m.kind,
                ip: m.ip,
                user_agent: m.user_agent,
                details: m.details,
                created_at: m.created_at,
            })
            .collect())
    }

    async fn record_service_error(&self, e: &StoredServiceError) -> Result<(), StoreError> {
        let model = service_errors::Model {
            id: e.id.0,
            code: e.code.clone(),
            service: e.service.clone(),
            message: e.message.clone(),
            context: e.context.clone(),
            request_id: e.request_id.clone(),
            created_at: e.created_at,
        };
        service_errors::Entity::insert(values::<_, service_errors::ActiveModel>(model))
            .exec_without_returning(&self.conn)
            .await
            .map_err(store_err)?;
        Ok(())
    }
}
