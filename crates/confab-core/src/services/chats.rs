//! Chats between people (SPEC §3 "Chats"): creating them, members, messages, read positions.
//!
//! Rules kept here, in one place:
//! - Only members can see or touch a chat: for anyone else it does not exist (`NotFound`,
//!   never `Forbidden`, so ids cannot be probed).
//! - A direct chat is unique per pair: creating it again returns the same chat.
//! - Sending is idempotent by `(sender, clientId)`: a retry returns the stored message. The
//!   message, the chat's latest-message pointer and the `message.created` outbox row commit
//!   together.
//!
//! This is the REST half of the chat issue; the realtime delivery (Socket.IO) builds on the
//! same operations.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde_json::json;

use crate::domain::{
    Chat, ChatId, ChatKind, EventId, Member, MemberRole, Message, MessageId, MessageKind, NewChat,
    OutboxEntry, Page, UserId, now,
};
use crate::ports::broker::queues;
use crate::ports::cache::{Cache, RateLimit, keys};
use crate::ports::store::{Append, Appended, Store, StoreError};
use crate::services::presence::Presence;

mod writer;
pub use writer::{BUSY_WITHIN, Committed, GroupCommit, MAX_BATCH, MessageWriter};

/// The longest message text (SPEC issue: 10,000 characters).
pub const MAX_TEXT_CHARS: usize = 10_000;
/// An offline member gets at most one new-message mail per chat this often (SPEC §9).
pub const DIGEST_EVERY: std::time::Duration = std::time::Duration::from_mins(15);
/// The most members a new group may list.
pub const MAX_GROUP_MEMBERS: usize = 500;

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// No such chat or message, or the caller is not a member.
    #[error("not found")]
    NotFound,
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: &'static str,
    },
    /// A member may not do this (remove someone else without being an admin; edit another
    /// member's message).
    #[error("{0}")]
    Forbidden(&'static str),
    /// The sender's message rate is used up: try again after `retry_after`.
    #[error("too many messages")]
    RateLimited { retry_after: std::time::Duration },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A chat with what a client shows of it.
#[derive(Debug, Clone)]
pub struct ChatView {
    pub chat: Chat,
    pub members: Vec<Member>,
    pub latest: Option<Message>,
    /// Messages after the caller's read position, not sent by the caller.
    pub unread: u64,
}

/// Who receives a chat's messages: what a message body needs (read receipts depend on the
/// kind and on each member's read position). Cheaper than a [`ChatView`]: no latest message,
/// no unread count.
#[derive(Debug, Clone)]
pub struct Audience {
    pub kind: ChatKind,
    pub members: Vec<Member>,
}

/// A message about to be stored: what differs between text and image messages.
#[derive(Debug, Clone)]
pub struct Draft {
    /// Chosen by the caller (an image's objects are keyed by it).
    pub id: MessageId,
    pub kind: MessageKind,
    /// The text, or an image's caption.
    pub text: Option<String>,
    pub image: Option<serde_json::Value>,
}

/// A sent message: `created` is false for a retry answered with the message stored before.
#[derive(Debug, Clone)]
pub struct Sent {
    pub message: Message,
    pub created: bool,
    /// The chat's kind (a new message's read receipts depend on it, and nothing else).
    pub kind: ChatKind,
}

pub struct ChatService {
    store: Arc<dyn Store>,
    writer: MessageWriter,
    cache: Arc<dyn Cache>,
    /// Messages a user may send (over REST and Socket.IO together), GCRA: all at once, then
    /// evenly refilled.
    message_rate: RateLimit,
    /// Who is online (digest mails go to those who are not).
    presence: Presence,
}

fn invalid(field: &'static str, message: &'static str) -> ChatError {
    ChatError::Invalid { field, message }
}

/// Message text: not blank, at most [`MAX_TEXT_CHARS`] characters.
pub fn check_text(text: &str) -> Result<String, ChatError> {
    if text.trim().is_empty() {
        return Err(invalid("text", "must not be empty"));
    }
    if text.chars().count() > MAX_TEXT_CHARS {
        return Err(invalid("text", "must be at most 10000 characters"));
    }
    Ok(text.to_owned())
}

/// A client-chosen id: 1..=64 printable ASCII characters.
pub fn check_client_id(client_id: &str) -> Result<String, ChatError> {
    let ok = !client_id.is_empty()
        && client_id.len() <= 64
        && client_id.bytes().all(|b| b.is_ascii_graphic());
    if ok {
        Ok(client_id.to_owned())
    } else {
        Err(invalid(
            "clientId",
            "must be 1 to 64 printable ASCII characters",
        ))
    }
}

impl ChatService {
    /// `group_commit`: see [`GroupCommit`].
    pub fn new(
        store: Arc<dyn Store>,
        cache: Arc<dyn Cache>,
        message_rate: RateLimit,
        group_commit: GroupCommit,
        presence: Presence,
    ) -> Self {
        Self {
            writer: MessageWriter::start(store.clone(), group_commit),
            store,
            cache,
            message_rate,
            presence,
        }
    }

    /// Who is online.
    pub fn presence(&self) -> &Presence {
        &self.presence
    }

    /// Every newly stored message, in commit order (for the one broadcaster; `None` after the
    /// first call).
    pub fn subscribe_committed(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<Committed>> {
        self.writer.subscribe()
    }

    async fn limit_messages(&self, who: UserId) -> Result<(), ChatError> {
        let key = keys::rate(&format!("user:{who}"), "message");
        match self.cache.rate_limit(&key, self.message_rate).await {
            Ok(decision) if !decision.allowed => Err(ChatError::RateLimited {
                retry_after: decision.retry_after,
            }),
            // An outage is the fail-soft wrapper's call (open or closed).
            Ok(_) | Err(_) => Ok(()),
        }
    }

    /// The chat and the caller's membership, or `NotFound` for anyone else.
    async fn membership(&self, who: UserId, chat: ChatId) -> Result<(Chat, Member), ChatError> {
        let member = self
            .store
            .member(chat, who)
            .await?
            .ok_or(ChatError::NotFound)?;
        let chat = self
            .store
            .chat_by_id(chat)
            .await?
            .ok_or(ChatError::NotFound)?;
        Ok((chat, member))
    }

    async fn view(&self, who: UserId, chat: Chat) -> Result<ChatView, ChatError> {
        let members = self.store.members(chat.id).await?;
        let latest = match chat.last_message_id {
            Some(id) => self.store.message_by_id(id).await?,
            None => None,
        };
        let read_up_to = members
            .iter()
            .find(|m| m.user_id == who)
            .and_then(|m| m.last_read_message_id);
        let unread = self
            .store
            .count_messages_after(chat.id, read_up_to, who)
            .await?;
        Ok(ChatView {
            chat,
            members,
            latest,
            unread,
        })
    }

    /// `POST /chats`: a direct chat with exactly one other member and no name (the same one
    /// again if it exists: `false`), else a group with the caller as admin (`true`: created).
    pub async fn create(
        &self,
        who: UserId,
        member_ids: &[UserId],
        name: Option<&str>,
    ) -> Result<(ChatView, bool), ChatError> {
        let mut seen = HashSet::from([who]);
        let others: Vec<UserId> = member_ids
            .iter()
            .copied()
            .filter(|id| seen.insert(*id))
            .collect();
        if others.is_empty() {
            return Err(invalid("memberIds", "must name at least one other user"));
        }
        if others.len() > MAX_GROUP_MEMBERS {
            return Err(invalid("memberIds", "names more than 500 users"));
        }
        let name = match name.map(str::trim) {
            Some("") | None => None,
            Some(name) if name.chars().count() > 100 || name.chars().any(char::is_control) => {
                return Err(invalid("name", "must be at most 100 characters"));
            }
            Some(name) => Some(name.to_owned()),
        };
        for id in &others {
            if self.store.user_by_id(*id).await?.is_none() {
                return Err(invalid("memberIds", "names a user that does not exist"));
            }
        }
        if let ([other], None) = (others.as_slice(), &name) {
            if let Some(chat) = self.store.direct_chat(who, *other).await? {
                return Ok((self.view(who, chat).await?, false));
            }
            let new = NewChat {
                id: ChatId::new(),
                kind: ChatKind::Direct,
                name: None,
                created_by: who,
                members: vec![(who, MemberRole::Member), (*other, MemberRole::Member)],
            };
            return match self.store.create_chat(new).await {
                Ok(chat) => Ok((self.view(who, chat).await?, true)),
                // Both created it at once: the other request's chat is the one.
                Err(StoreError::Conflict(_)) => {
                    let chat = self
                        .store
                        .direct_chat(who, *other)
                        .await?
                        .ok_or(ChatError::NotFound)?;
                    Ok((self.view(who, chat).await?, false))
                }
                Err(e) => Err(e.into()),
            };
        }
        let mut members = vec![(who, MemberRole::Admin)];
        members.extend(others.iter().map(|id| (*id, MemberRole::Member)));
        let chat = self
            .store
            .create_chat(NewChat {
                id: ChatId::new(),
                kind: ChatKind::Group,
                name,
                created_by: who,
                members,
            })
            .await?;
        Ok((self.view(who, chat).await?, true))
    }

    /// `GET /chats/{id}`.
    pub async fn get(&self, who: UserId, chat: ChatId) -> Result<ChatView, ChatError> {
        let (chat, _) = self.membership(who, chat).await?;
        self.view(who, chat).await
    }

    /// `GET /chats`: most recently active first.
    pub async fn list(&self, who: UserId) -> Result<Vec<ChatView>, ChatError> {
        let mut views = Vec::new();
        for chat in self.store.chats_of(who).await? {
            views.push(self.view(who, chat).await?);
        }
        Ok(views)
    }

    /// `POST /chats/{id}/members`: a member adds someone to a group.
    pub async fn add_member(
        &self,
        who: UserId,
        chat: ChatId,
        user: UserId,
    ) -> Result<ChatView, ChatError> {
        let (chat, _) = self.membership(who, chat).await?;
        if chat.kind == ChatKind::Direct {
            return Err(invalid("userId", "a direct chat has exactly two members"));
        }
        if self.store.user_by_id(user).await?.is_none() {
            return Err(invalid("userId", "names a user that does not exist"));
        }
        match self
            .store
            .add_member(chat.id, user, MemberRole::Member)
            .await
        {
            Ok(_) | Err(StoreError::Conflict(_)) => {}
            Err(e) => return Err(e.into()),
        }
        self.view(who, chat).await
    }

    /// `DELETE /chats/{id}/members/{userId}`: a group admin removes a member, or a member
    /// leaves.
    pub async fn remove_member(
        &self,
        who: UserId,
        chat: ChatId,
        user: UserId,
    ) -> Result<(), ChatError> {
        let (chat, me) = self.membership(who, chat).await?;
        if chat.kind == ChatKind::Direct {
            return Err(invalid("userId", "a direct chat has exactly two members"));
        }
        if user != who && me.role != MemberRole::Admin {
            return Err(ChatError::Forbidden(
                "Only a group admin can remove others.",
            ));
        }
        if !self.store.remove_member(chat.id, user).await? {
            return Err(ChatError::NotFound);
        }
        Ok(())
    }

    /// Everyone who shares a chat with `who` (not `who`): whom their presence concerns.
    pub async fn partners(&self, who: UserId) -> Result<Vec<UserId>, ChatError> {
        let mut partners = HashSet::new();
        for chat in self.store.chats_of(who).await? {
            for member in self.store.members(chat.id).await? {
                if member.user_id != who {
                    partners.insert(member.user_id);
                }
            }
        }
        Ok(partners.into_iter().collect())
    }

    /// For a batch of `message.created` events (chat → its messages' senders): the digest
    /// mails to queue (SPEC §9), one per member other than the senders who is offline (no
    /// socket and no activity for 5 minutes) and was not mailed about this chat in the last
    /// [`DIGEST_EVERY`]; it counts their unread messages. The window is claimed in the cache
    /// (an atomic counter), so two nodes handling events of one chat still send one mail.
    ///
    /// `online`: [`Presence::online`], read once for the batch. The members of every chat come
    /// in one store call; a chat whose members are all online or senders costs nothing more.
    /// `Err`: the members could not be read (no chat's digest was worked out); else each chat
    /// with an offline member and its own outcome.
    pub async fn offline_digests(
        &self,
        batch: &HashMap<ChatId, Vec<UserId>>,
        online: &HashSet<UserId>,
    ) -> Result<Vec<(ChatId, Result<Vec<OutboxEntry>, ChatError>)>, ChatError> {
        let chats: Vec<ChatId> = batch.keys().copied().collect();
        let mut offline: HashMap<ChatId, Vec<Member>> = HashMap::new();
        for member in self.store.members_of_chats(&chats).await? {
            let Some(senders) = batch.get(&member.chat_id) else {
                continue;
            };
            if !senders.contains(&member.user_id) && !online.contains(&member.user_id) {
                offline.entry(member.chat_id).or_default().push(member);
            }
        }
        let mut digests = Vec::with_capacity(offline.len());
        for (chat, members) in offline {
            let senders = batch.get(&chat).map_or(&[][..], Vec::as_slice);
            digests.push((chat, self.offline_digest(chat, senders, members).await));
        }
        Ok(digests)
    }

    /// The digest mails of one chat, for its `offline` members.
    async fn offline_digest(
        &self,
        chat: ChatId,
        senders: &[UserId],
        offline: Vec<Member>,
    ) -> Result<Vec<OutboxEntry>, ChatError> {
        let Some(found) = self.store.chat_by_id(chat).await? else {
            return Ok(Vec::new());
        };
        let mut mails = Vec::new();
        for member in offline {
            let user = member.user_id;
            let window = format!("digest:{chat}:{user}");
            match self.cache.incr(&window, 1, DIGEST_EVERY).await {
                Ok(1) => {}
                // Mailed within the window; or the cache is out: no mail rather than a flood.
                Ok(_) | Err(_) => continue,
            }
            let Some(account) = self.store.user_by_id(user).await? else {
                continue;
            };
            let unread = self
                .store
                .count_messages_after(chat, member.last_read_message_id, user)
                .await?;
            // A direct chat has no name: it is the other member's.
            let chat_name = match (&found.name, senders.first()) {
                (Some(name), _) => name.clone(),
                (None, Some(sender)) => self
                    .store
                    .user_by_id(*sender)
                    .await?
                    .map_or_else(|| "a chat".to_owned(), |u| u.name),
                (None, None) => "a chat".to_owned(),
            };
            mails.push(OutboxEntry {
                id: EventId::new(),
                queue: queues::MAIL.into(),
                kind: "mail.message_digest".into(),
                payload: json!({
                    "template": "message_digest",
                    "to": account.email,
                    "vars": {
                        "name": account.name,
                        "count": unread.max(1),
                        "chat_name": chat_name,
                        "chat_id": chat,
                    },
                }),
                trace_id: None,
                created_at: now(),
            });
        }
        Ok(mails)
    }

    /// `Ok` for a member of the chat, `NotFound` for anyone else: one lookup (a membership
    /// implies the chat).
    pub async fn check_member(&self, who: UserId, chat: ChatId) -> Result<(), ChatError> {
        match self.store.member(chat, who).await? {
            Some(_) => Ok(()),
            None => Err(ChatError::NotFound),
        }
    }

    /// The chat's kind and members, for a member (`NotFound` for anyone else).
    pub async fn audience(&self, who: UserId, chat: ChatId) -> Result<Audience, ChatError> {
        let chat = self
            .store
            .chat_by_id(chat)
            .await?
            .ok_or(ChatError::NotFound)?;
        // The members, read anyway, say whether the caller is one: no query of its own.
        let members = self.store.members(chat.id).await?;
        if !members.iter().any(|m| m.user_id == who) {
            return Err(ChatError::NotFound);
        }
        Ok(Audience {
            kind: chat.kind,
            members,
        })
    }

    /// `GET /chats/{id}/messages`, with the audience (for read receipts).
    pub async fn messages(
        &self,
        who: UserId,
        chat: ChatId,
        page: Page<MessageId>,
    ) -> Result<(Vec<Message>, Audience), ChatError> {
        let audience = self.audience(who, chat).await?;
        let messages = self.store.messages(chat, page).await?;
        Ok((messages, audience))
    }

    /// `POST /chats/{id}/messages`: stores the message (once per `client_id`), moves the
    /// chat's latest-message pointer and queues `message.created`, in one transaction shared
    /// with the other messages sent meanwhile (group commit, [`MessageWriter`]).
    pub async fn send(
        &self,
        who: UserId,
        chat: ChatId,
        text: &str,
        client_id: Option<&str>,
    ) -> Result<Sent, ChatError> {
        let text = check_text(text)?;
        let client_id = client_id.map(check_client_id).transpose()?;
        if let Err(limited) = self.limit_messages(who).await {
            // A retry of a stored message is answered even when the rate is used up.
            if let Some(client_id) = &client_id
                && let Some(existing) = self.store.message_by_client_id(who, client_id).await?
            {
                let kind = self.audience(who, chat).await?.kind;
                return Ok(Sent {
                    message: same_chat(existing, chat)?,
                    created: false,
                    kind,
                });
            }
            return Err(limited);
        }
        self.append_draft(
            who,
            chat,
            Draft {
                id: MessageId::new(),
                kind: MessageKind::Text,
                text: Some(text),
                image: None,
            },
            client_id,
        )
        .await
    }

    /// Before an upload is processed: `NotFound` for a non-member, the stored message for a
    /// retry of one (nothing to process again), `RateLimited` when the sender's rate is used
    /// up; `None`: go ahead.
    pub async fn admit_upload(
        &self,
        who: UserId,
        chat: ChatId,
        client_id: Option<&str>,
    ) -> Result<Option<Sent>, ChatError> {
        let (found, _) = self.membership(who, chat).await?;
        if let Some(client_id) = client_id
            && let Some(existing) = self.store.message_by_client_id(who, client_id).await?
        {
            return Ok(Some(Sent {
                message: same_chat(existing, chat)?,
                created: false,
                kind: found.kind,
            }));
        }
        self.limit_messages(who).await?;
        Ok(None)
    }

    /// Stores a message (once per `client_id`), moves the chat's latest-message pointer and
    /// queues `message.created`, in one transaction shared with the other messages sent
    /// meanwhile (group commit, [`MessageWriter`]).
    pub async fn append_draft(
        &self,
        who: UserId,
        chat: ChatId,
        draft: Draft,
        client_id: Option<String>,
    ) -> Result<Sent, ChatError> {
        let message = Message {
            id: draft.id,
            chat_id: chat,
            sender_id: Some(who),
            kind: draft.kind,
            text: draft.text,
            client_id,
            image: draft.image,
            created_at: now(),
            edited_at: None,
            deleted_at: None,
        };
        let event = OutboxEntry {
            id: EventId::new(),
            queue: queues::EVENTS.into(),
            kind: "message.created".into(),
            payload: json!({
                "messageId": message.id,
                "chatId": chat,
                "senderId": who,
                // An assistant's own answer never calls the assistant again.
                "mentionsAssistant": message.kind != MessageKind::Ai
                    && message.text.as_deref().is_some_and(mentions_assistant),
            }),
            trace_id: None,
            created_at: message.created_at,
        };
        let appended = self
            .writer
            .append(Append {
                message: message.clone(),
                event,
            })
            .await?;
        match appended {
            Appended::Stored(kind) => Ok(Sent {
                message,
                created: true,
                kind,
            }),
            Appended::Duplicate { existing, kind } => Ok(Sent {
                message: same_chat(*existing, chat)?,
                created: false,
                kind,
            }),
            Appended::NotMember => Err(ChatError::NotFound),
        }
    }

    /// The caller's own message in the chat, not yet deleted.
    async fn own_message(
        &self,
        who: UserId,
        chat: ChatId,
        message: MessageId,
    ) -> Result<Message, ChatError> {
        self.check_member(who, chat).await?;
        let message = self
            .store
            .message_by_id(message)
            .await?
            .filter(|m| m.chat_id == chat && m.deleted_at.is_none())
            .ok_or(ChatError::NotFound)?;
        if message.sender_id != Some(who) {
            return Err(ChatError::Forbidden(
                "Only the sender can change a message.",
            ));
        }
        Ok(message)
    }

    /// `PATCH /chats/{id}/messages/{messageId}`: the sender changes the text.
    pub async fn edit(
        &self,
        who: UserId,
        chat: ChatId,
        message: MessageId,
        text: &str,
    ) -> Result<Message, ChatError> {
        let text = check_text(text)?;
        let mut message = self.own_message(who, chat, message).await?;
        message.text = Some(text);
        message.edited_at = Some(now());
        self.store.update_message(&message).await?;
        Ok(message)
    }

    /// `DELETE /chats/{id}/messages/{messageId}`: the sender deletes it; a tombstone stays.
    /// An image's objects are deleted by the `events` worker (`media.deleted`, queued in the
    /// same transaction).
    pub async fn delete(
        &self,
        who: UserId,
        chat: ChatId,
        message: MessageId,
    ) -> Result<Message, ChatError> {
        let mut message = self.own_message(who, chat, message).await?;
        let objects = crate::services::media::StoredImage::from_message(&message);
        message.text = None;
        message.image = None;
        message.deleted_at = Some(now());
        match objects {
            None => self.store.update_message(&message).await?,
            Some(objects) => {
                let tx = self.store.begin().await?;
                tx.update_message(&message).await?;
                tx.enqueue(&crate::services::media::deleted_event(&objects.keys()))
                    .await?;
                tx.commit().await?;
            }
        }
        Ok(message)
    }

    /// `POST /chats/{id}/read`: everything up to `message` is seen by the caller.
    pub async fn mark_read(
        &self,
        who: UserId,
        chat: ChatId,
        message: MessageId,
    ) -> Result<(), ChatError> {
        self.check_member(who, chat).await?;
        self.store
            .message_by_id(message)
            .await?
            .filter(|m| m.chat_id == chat)
            .ok_or(ChatError::NotFound)?;
        self.store.mark_read(chat, who, message, now()).await?;
        Ok(())
    }
}

/// A client id is unique per sender, across chats: reusing one in another chat is a client
/// bug, answered as a conflict rather than with a message from elsewhere.
fn same_chat(message: Message, chat: ChatId) -> Result<Message, ChatError> {
    if message.chat_id == chat {
        Ok(message)
    } else {
        Err(invalid(
            "clientId",
            "was already used for a message in another chat",
        ))
    }
}

/// Whether `text` calls the assistant: `@assistant` as a word (any case), as SPEC §3 says.
pub fn mentions_assistant(text: &str) -> bool {
    const NAME: &str = "@assistant";
    let lower = text.to_lowercase();
    lower.match_indices(NAME).any(|(at, _)| {
        let before = lower[..at].chars().next_back();
        let after = lower[at + NAME.len()..].chars().next();
        before.is_none_or(|c| !c.is_alphanumeric() && c != '@')
            && after.is_none_or(|c| !c.is_alphanumeric() && c != '_')
    })
}

#[cfg(test)]
mod tests {

    #[test]
    fn the_assistant_is_mentioned_as_a_word() {
        for yes in [
            "@assistant what is 2+2?",
            "hey @Assistant, help",
            "ask (@ASSISTANT)",
        ] {
            assert!(mentions_assistant(yes), "{yes}");
        }
        for no in [
            "assistant",
            "@assistants",
            "me@assistant.io",
            "@assistant_bot",
            "x@assistant",
        ] {
            assert!(!mentions_assistant(no), "{no}");
        }
    }

    use super::*;

    #[test]
    fn text_and_client_ids_are_bounded() {
        assert!(check_text("hi").is_ok());
        assert!(check_text("   ").is_err());
        assert!(check_text(&"é".repeat(MAX_TEXT_CHARS)).is_ok());
        assert!(check_text(&"é".repeat(MAX_TEXT_CHARS + 1)).is_err());
        assert!(check_client_id("tab-1:42").is_ok());
        assert!(check_client_id("").is_err());
        assert!(check_client_id("with space").is_err());
        assert!(check_client_id(&"x".repeat(65)).is_err());
    }
}
