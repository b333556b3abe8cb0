//! Group commit of messages (`Store::append_messages`): a batch costs a fixed handful of
//! statements, whatever its size and however many chats it touches: one read (memberships
//! joined with chat kinds; a second only when client ids were given), then one transaction
//! that starts by writing (SQLite WAL: a transaction that reads first cannot later write
//! once another writer committed): a multi-row insert returning the ids that went in, a
//! multi-row outbox insert, one update of every touched chat's latest-message pointer.

use std::collections::{HashMap, HashSet};

use confab_core::domain::{ChatId, ChatKind, Message, MessageId, OutboxEntry, UserId};
use confab_core::ports::broker::Envelope;
use confab_core::ports::store::{Append, Appended, MessageStore, StoreError};
use sea_orm::sea_query::{Expr, ExprTrait, OnConflict, Query};
use sea_orm::{
    ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, TransactionTrait, TryInsertResult,
};

use super::entities::{chat_members, chats, messages, outbox};
use super::ops::{message_model, outbox_model, to_message, values};
use super::{SqlStore, store_err};
use crate::db_broker::insert_envelopes;

impl SqlStore {
    pub(super) async fn append(&self, batch: &[Append]) -> Result<Vec<Appended>, StoreError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let kinds = self.memberships(batch).await?;
        let mut earlier = self.earlier_client_ids(batch).await?;

        // Decide each input: member? a client id used before (or earlier in this batch)?
        let mut answers = Vec::with_capacity(batch.len());
        let mut fresh: Vec<(&Append, ChatKind)> = Vec::with_capacity(batch.len());
        for append in batch {
            let m = &append.message;
            let Some(sender) = m.sender_id else {
                return Err(StoreError::Other("a sent message needs a sender".into()));
            };
            let Some(&kind) = kinds.get(&(m.chat_id, sender)) else {
                answers.push(Some(Appended::NotMember));
                continue;
            };
            if let Some(client_id) = &m.client_id {
                let key = (sender, client_id.clone());
                if let Some(existing) = earlier.get(&key) {
                    answers.push(Some(Appended::Duplicate {
                        existing: Box::new(existing.clone()),
                        kind,
                    }));
                    continue;
                }
                earlier.insert(key, m.clone());
            }
            answers.push(None);
            fresh.push((append, kind));
        }

        let to_insert: Vec<&Append> = fresh.iter().map(|(a, _)| *a).collect();
        let stored = self.insert_fresh(&to_insert).await?;

        // Fill in the fresh ones: stored, or lost a race to a writer elsewhere with the same
        // client id (found now that both committed).
        let mut fresh = fresh.into_iter();
        let mut out = Vec::with_capacity(answers.len());
        for answer in answers {
            match answer {
                // A duplicate of a message earlier in this batch that then lost its client id
                // to a writer elsewhere: the message that stands is that writer's.
                Some(Appended::Duplicate { existing, kind })
                    if batch.iter().any(|a| a.message.id == existing.id)
                        && !stored.contains(&existing.id) =>
                {
                    out.push(Appended::Duplicate {
                        existing: Box::new(self.standing(&existing).await?),
                        kind,
                    });
                    continue;
                }
                Some(answer) => {
                    out.push(answer);
                    continue;
                }
                None => {}
            }
            let Some((append, kind)) = fresh.next() else {
                return Err(StoreError::Other(
                    "group commit lost track of a message".into(),
                ));
            };
            let m = &append.message;
            if stored.contains(&m.id) {
                out.push(Appended::Stored(kind));
                continue;
            }
            out.push(Appended::Duplicate {
                existing: Box::new(self.standing(m).await?),
                kind,
            });
        }
        Ok(out)
    }

    /// The message that stands under `m`'s `(sender, client_id)` after `m` lost it to a
    /// writer elsewhere.
    async fn standing(&self, m: &Message) -> Result<Message, StoreError> {
        let found = match (&m.client_id, m.sender_id) {
            (Some(client_id), Some(sender)) => self.message_by_client_id(sender, client_id).await?,
            _ => None,
        };
        found
            .ok_or_else(|| StoreError::Other("a message was neither stored nor a duplicate".into()))
    }

    /// `(chat, sender) → chat kind` for every sender who is a member of the chat named: one
    /// query (memberships joined with their chats).
    async fn memberships(
        &self,
        batch: &[Append],
    ) -> Result<HashMap<(ChatId, UserId), ChatKind>, StoreError> {
        let chat_ids: HashSet<_> = batch.iter().map(|a| a.message.chat_id.0).collect();
        let senders: HashSet<_> = batch
            .iter()
            .filter_map(|a| a.message.sender_id.map(|u| u.0))
            .collect();
        let query = Query::select()
            .column((chat_members::Entity, chat_members::Column::ChatId))
            .column((chat_members::Entity, chat_members::Column::UserId))
            .column((chats::Entity, chats::Column::Kind))
            .from(chat_members::Entity)
            .inner_join(
                chats::Entity,
                Expr::col((chats::Entity, chats::Column::Id))
                    .equals((chat_members::Entity, chat_members::Column::ChatId)),
            )
            .and_where(
                Expr::col((chat_members::Entity, chat_members::Column::ChatId)).is_in(chat_ids),
            )
            .and_where(
                Expr::col((chat_members::Entity, chat_members::Column::UserId)).is_in(senders),
            )
            .to_owned();
        // The primary: a member added a moment ago may send at once.
        let rows = self.conn.query_all(&query).await.map_err(store_err)?;
        let mut kinds = HashMap::with_capacity(rows.len());
        for row in rows {
            let chat: uuid::Uuid = row.try_get("", "chat_id").map_err(store_err)?;
            let user: uuid::Uuid = row.try_get("", "user_id").map_err(store_err)?;
            let kind: String = row.try_get("", "kind").map_err(store_err)?;
            let kind = if kind == "direct" {
                ChatKind::Direct
            } else {
                ChatKind::Group
            };
            kinds.insert((ChatId(chat), UserId(user)), kind);
        }
        Ok(kinds)
    }

    /// Messages already stored under the batch's `(sender, client_id)` pairs.
    async fn earlier_client_ids(
        &self,
        batch: &[Append],
    ) -> Result<HashMap<(UserId, String), Message>, StoreError> {
        let wanted: HashSet<(UserId, String)> = batch
            .iter()
            .filter_map(|a| Some((a.message.sender_id?, a.message.client_id.clone()?)))
            .collect();
        if wanted.is_empty() {
            return Ok(HashMap::new());
        }
        let senders: HashSet<_> = wanted.iter().map(|(u, _)| u.0).collect();
        let client_ids: HashSet<_> = wanted.iter().map(|(_, c)| c.clone()).collect();
        let rows = messages::Entity::find()
            .filter(messages::Column::SenderId.is_in(senders))
            .filter(messages::Column::ClientId.is_in(client_ids))
            .all(&self.conn)
            .await
            .map_err(store_err)?;
        let mut found = HashMap::new();
        for row in rows {
            let message = to_message(row)?;
            if let (Some(sender), Some(client_id)) = (message.sender_id, message.client_id.clone())
                && wanted.contains(&(sender, client_id.clone()))
            {
                found.insert((sender, client_id), message);
            }
        }
        Ok(found)
    }

    /// Inserts the fresh messages and their outbox entries and moves each chat's pointer, in
    /// one transaction; returns the ids that were stored (a client id taken by a concurrent
    /// writer in between is skipped, not an error).
    async fn insert_fresh(&self, fresh: &[&Append]) -> Result<HashSet<MessageId>, StoreError> {
        if fresh.is_empty() {
            return Ok(HashSet::new());
        }
        let tx = self.conn.begin().await.map_err(store_err)?;
        let rows = fresh
            .iter()
            .map(|a| values::<_, messages::ActiveModel>(message_model(&a.message)));
        // The ids that went in (a client id taken meanwhile is skipped, not returned).
        let inserted = messages::Entity::insert_many(rows)
            .on_conflict(
                // The client-id index holds only messages with one (its `WHERE` names it).
                OnConflict::columns([messages::Column::SenderId, messages::Column::ClientId])
                    .target_and_where(Expr::col(messages::Column::ClientId).is_not_null())
                    .do_nothing_on([messages::Column::Id])
                    .to_owned(),
            )
            .try_insert()
            .exec_with_returning_keys(&tx)
            .await
            .map_err(store_err)?;
        let stored: HashSet<MessageId> = match inserted {
            TryInsertResult::Inserted(ids) => ids.into_iter().map(MessageId).collect(),
            TryInsertResult::Empty | TryInsertResult::Conflicted => HashSet::new(),
        };
        let events: Vec<&OutboxEntry> = fresh
            .iter()
            .filter(|a| stored.contains(&a.message.id))
            .map(|a| &a.event)
            .collect();
        if !events.is_empty() && self.queue.direct() {
            let envelopes: Vec<Envelope> = events.iter().copied().map(Envelope::from).collect();
            let rows = events.iter().map(|e| e.queue.as_str()).zip(&envelopes);
            tx.execute_raw(insert_envelopes(tx.get_database_backend(), rows))
                .await
                .map_err(store_err)?;
        } else if !events.is_empty() {
            outbox::Entity::insert_many(
                events
                    .iter()
                    .map(|e| values::<_, outbox::ActiveModel>(outbox_model(e))),
            )
            .exec_without_returning(&tx)
            .await
            .map_err(store_err)?;
        }
        // Every chat of the batch points at its newest message: one statement for all.
        let touched: HashSet<uuid::Uuid> = fresh
            .iter()
            .filter(|a| stored.contains(&a.message.id))
            .map(|a| a.message.chat_id.0)
            .collect();
        if !touched.is_empty() {
            let newest = "(SELECT m.id FROM messages m WHERE m.chat_id = chats.id ORDER BY m.id DESC LIMIT 1)";
            let newest_at = "(SELECT m.created_at FROM messages m WHERE m.chat_id = chats.id ORDER BY m.id DESC LIMIT 1)";
            let update = Query::update()
                .table(chats::Entity)
                .value(chats::Column::LastMessageId, Expr::cust(newest))
                .value(chats::Column::LastMessageAt, Expr::cust(newest_at))
                .value(chats::Column::ActivityAt, Expr::cust(newest_at))
                .and_where(Expr::col(chats::Column::Id).is_in(touched))
                // Never backwards: on PostgreSQL a concurrent writer's newer pointer is
                // re-checked here, while the subqueries still see this transaction's snapshot.
                .and_where(Expr::cust(format!(
                    "(last_message_id IS NULL OR last_message_id < {newest})"
                )))
                .to_owned();
            tx.execute(&update).await.map_err(store_err)?;
        }
        tx.commit().await.map_err(store_err)?;
        if self.queue.direct() {
            self.queue
                .committed(events.iter().map(|e| e.queue.as_str()));
        }
        Ok(stored)
    }
}
