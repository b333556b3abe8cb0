//! Group commit of messages (`Store::append_messages`): a batch costs a fixed handful of
//! statements, whatever its size: two reads (memberships with chat kinds, earlier uses of
//! the client ids), then one transaction that starts by writing (SQLite WAL: a transaction
//! that reads first cannot later write once another writer committed) with one multi-row
//! insert per table and one pointer update per chat.

use std::collections::{HashMap, HashSet};

use confab_core::domain::{ChatId, ChatKind, Message, MessageId, UserId};
use confab_core::ports::store::{Append, Appended, ChatStore, MessageStore, StoreError};
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QuerySelect, TransactionTrait};

use super::entities::{chat_members, chats, messages, outbox};
use super::ops::{message_model, outbox_model, to_message, values};
use super::{Sql, SqlStore, store_err};

impl SqlStore {
    pub(super) async fn append(&self, batch: Vec<Append>) -> Result<Vec<Appended>, StoreError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let kinds = self.memberships(&batch).await?;
        let mut earlier = self.earlier_client_ids(&batch).await?;

        // Decide each input: member? a client id used before (or earlier in this batch)?
        let mut answers = Vec::with_capacity(batch.len());
        let mut fresh: Vec<(&Append, ChatKind)> = Vec::with_capacity(batch.len());
        for append in &batch {
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
            if let Some(answer) = answer {
                out.push(answer);
                continue;
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
            let existing = match (&m.client_id, m.sender_id) {
                (Some(client_id), Some(sender)) => {
                    self.message_by_client_id(sender, client_id).await?
                }
                _ => None,
            };
            match existing {
                Some(existing) => out.push(Appended::Duplicate {
                    existing: Box::new(existing),
                    kind,
                }),
                None => {
                    return Err(StoreError::Other(
                        "a message was neither stored nor a duplicate".into(),
                    ));
                }
            }
        }
        Ok(out)
    }

    /// `(chat, sender) → chat kind` for every sender who is a member of the chat named.
    async fn memberships(
        &self,
        batch: &[Append],
    ) -> Result<HashMap<(ChatId, UserId), ChatKind>, StoreError> {
        let chat_ids: HashSet<_> = batch.iter().map(|a| a.message.chat_id.0).collect();
        let senders: HashSet<_> = batch
            .iter()
            .filter_map(|a| a.message.sender_id.map(|u| u.0))
            .collect();
        // The primary: a member added a moment ago may send at once.
        let rows: Vec<(uuid::Uuid, uuid::Uuid)> = chat_members::Entity::find()
            .select_only()
            .column(chat_members::Column::ChatId)
            .column(chat_members::Column::UserId)
            .filter(chat_members::Column::ChatId.is_in(chat_ids.iter().copied()))
            .filter(chat_members::Column::UserId.is_in(senders))
            .into_tuple()
            .all(&self.conn)
            .await
            .map_err(store_err)?;
        let kinds: Vec<(uuid::Uuid, String)> = chats::Entity::find()
            .select_only()
            .column(chats::Column::Id)
            .column(chats::Column::Kind)
            .filter(chats::Column::Id.is_in(chat_ids))
            .into_tuple()
            .all(&self.conn)
            .await
            .map_err(store_err)?;
        let kinds: HashMap<uuid::Uuid, ChatKind> = kinds
            .into_iter()
            .map(|(id, kind)| {
                let kind = if kind == "direct" {
                    ChatKind::Direct
                } else {
                    ChatKind::Group
                };
                (id, kind)
            })
            .collect();
        Ok(rows
            .into_iter()
            .filter_map(|(chat, user)| {
                kinds
                    .get(&chat)
                    .map(|kind| ((ChatId(chat), UserId(user)), *kind))
            })
            .collect())
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
        messages::Entity::insert_many(rows)
            .on_conflict_do_nothing_on([messages::Column::SenderId, messages::Column::ClientId])
            .exec_without_returning(&tx)
            .await
            .map_err(store_err)?;
        let ids: Vec<uuid::Uuid> = fresh.iter().map(|a| a.message.id.0).collect();
        let stored: HashSet<MessageId> = messages::Entity::find()
            .select_only()
            .column(messages::Column::Id)
            .filter(messages::Column::Id.is_in(ids))
            .into_tuple::<uuid::Uuid>()
            .all(&tx)
            .await
            .map_err(store_err)?
            .into_iter()
            .map(MessageId)
            .collect();
        let events = fresh
            .iter()
            .filter(|a| stored.contains(&a.message.id))
            .map(|a| values::<_, outbox::ActiveModel>(outbox_model(&a.event)))
            .collect::<Vec<_>>();
        if !events.is_empty() {
            outbox::Entity::insert_many(events)
                .exec_without_returning(&tx)
                .await
                .map_err(store_err)?;
        }
        let mut latest: HashMap<ChatId, &Message> = HashMap::new();
        for a in fresh.iter().filter(|a| stored.contains(&a.message.id)) {
            let m = &a.message;
            let newest = latest.entry(m.chat_id).or_insert(m);
            if m.id > newest.id {
                *newest = m;
            }
        }
        let tx = Sql {
            conn: tx,
            replica: None,
        };
        for (chat, m) in latest {
            tx.set_latest_message(chat, m.id, m.created_at).await?;
        }
        tx.conn.commit().await.map_err(store_err)?;
        Ok(stored)
    }
}
