//! `/api/v1/chats*` (SPEC §3 "Chats"): chats between people, their members and messages.
//! Every route needs an access token; a chat the caller is not a member of is a 404.

// utoipa's expansion of `params(SomeQuery)` qualifies paths the lint calls unnecessary.
#![allow(unused_qualifications)]

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use confab_core::domain::{ChatId, ChatKind, MemberRole, Message, MessageId, Page, UserId};
use confab_core::services::chats::{Audience, ChatError, ChatView};
use confab_core::services::media::{ImageUrls, MediaService};

use crate::realtime::{emit, emit_to_users};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::auth::rfc3339;
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiJson, ApiPath, ApiQuery, Authenticated};
use crate::state::AppState;

impl From<ChatError> for ApiError {
    fn from(err: ChatError) -> Self {
        match err {
            ChatError::NotFound => Self::not_found(),
            ChatError::Invalid { field, message } => {
                Self::validation(format!("{field} {message}."))
                    .with_details(serde_json::json!({ "field": field }))
            }
            ChatError::Forbidden(message) => {
                Self::new(confab_core::error::ErrorCode::Forbidden, message)
            }
            ChatError::RateLimited { retry_after } => Self::new(
                confab_core::error::ErrorCode::RateLimited,
                "Too many messages; slow down.",
            )
            .with_retry_after(retry_after.as_secs().max(1)),
            ChatError::Store(e) => e.into(),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SeenBody {
    pub user_id: String,
    pub seen_at: Option<String>,
}

/// A message (SPEC §3).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MessageBody {
    pub id: String,
    pub chat_id: String,
    /// Null once the sender deleted their account ("deleted user").
    pub sender_id: Option<String>,
    /// `text` | `image` | `ai` | `system`
    pub kind: &'static str,
    /// Null for a deleted message (a tombstone).
    pub text: Option<String>,
    pub client_id: Option<String>,
    pub created_at: String,
    pub edited_at: Option<String>,
    pub deleted_at: Option<String>,
    /// An image message's picture: signed URLs that work for a while (SPEC §3 "Media").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageBody>,
    /// The other members who have read up to this message.
    pub seen_by: Vec<SeenBody>,
    /// Direct chats: whether the other member has seen it, and when.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seen: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seen_at: Option<String>,
}

/// An image message's picture.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageBody {
    /// The image, re-encoded; usable in an `<img>` until it expires.
    pub url: String,
    /// At most 256 pixels on its longer side.
    pub thumbnail_url: String,
    pub width: u32,
    pub height: u32,
    pub content_type: String,
}

impl From<ImageUrls> for ImageBody {
    fn from(urls: ImageUrls) -> Self {
        Self {
            url: urls.url,
            thumbnail_url: urls.thumbnail_url,
            width: urls.width,
            height: urls.height,
            content_type: urls.content_type,
        }
    }
}

/// A message as `audience` sees it, its image URLs signed.
pub async fn message_body(
    media: &MediaService,
    message: Message,
    audience: &Audience,
) -> MessageBody {
    let image = media.image_urls(&message).await;
    MessageBody::new(message, audience, image)
}

pub fn kind_name(kind: confab_core::domain::MessageKind) -> &'static str {
    use confab_core::domain::MessageKind;
    match kind {
        MessageKind::Text => "text",
        MessageKind::Image => "image",
        MessageKind::Ai => "ai",
        MessageKind::System => "system",
    }
}

impl MessageBody {
    /// A message just stored: nobody has read it yet.
    pub fn new_message(message: Message, kind: ChatKind, image: Option<ImageUrls>) -> Self {
        Self::new(
            message,
            &Audience {
                kind,
                members: Vec::new(),
            },
            image,
        )
    }

    pub fn new(message: Message, audience: &Audience, image: Option<ImageUrls>) -> Self {
        let seen_by: Vec<SeenBody> = audience
            .members
            .iter()
            .filter(|m| Some(m.user_id) != message.sender_id)
            .filter(|m| {
                m.last_read_message_id
                    .is_some_and(|read| read >= message.id)
            })
            .map(|m| SeenBody {
                user_id: m.user_id.to_string(),
                seen_at: m.last_read_at.map(rfc3339),
            })
            .collect();
        let (seen, seen_at) = if audience.kind == ChatKind::Direct {
            (
                Some(!seen_by.is_empty()),
                seen_by.first().and_then(|s| s.seen_at.clone()),
            )
        } else {
            (None, None)
        };
        Self {
            id: message.id.to_string(),
            chat_id: message.chat_id.to_string(),
            sender_id: message.sender_id.map(|id| id.to_string()),
            kind: kind_name(message.kind),
            text: message.text,
            client_id: message.client_id,
            created_at: rfc3339(message.created_at),
            edited_at: message.edited_at.map(rfc3339),
            deleted_at: message.deleted_at.map(rfc3339),
            image: image.map(ImageBody::from),
            seen_by,
            seen,
            seen_at,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LatestBody {
    pub id: String,
    pub text: Option<String>,
    pub sender_id: Option<String>,
    pub kind: &'static str,
    pub created_at: String,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemberBody {
    pub user_id: String,
    /// `admin` | `member`
    pub role: &'static str,
    pub joined_at: String,
}

/// A chat as its members see it.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChatBody {
    pub id: String,
    /// `direct` | `group`
    pub kind: &'static str,
    pub name: Option<String>,
    pub created_by: Option<String>,
    pub created_at: String,
    pub members: Vec<MemberBody>,
    pub latest_message: Option<LatestBody>,
    pub unread_count: u64,
}

impl From<ChatView> for ChatBody {
    fn from(view: ChatView) -> Self {
        Self {
            id: view.chat.id.to_string(),
            kind: match view.chat.kind {
                ChatKind::Direct => "direct",
                ChatKind::Group => "group",
            },
            name: view.chat.name,
            created_by: view.chat.created_by.map(|id| id.to_string()),
            created_at: rfc3339(view.chat.created_at),
            members: view
                .members
                .iter()
                .map(|m| MemberBody {
                    user_id: m.user_id.to_string(),
                    role: match m.role {
                        MemberRole::Admin => "admin",
                        MemberRole::Member => "member",
                    },
                    joined_at: rfc3339(m.joined_at),
                })
                .collect(),
            latest_message: view.latest.map(|m| LatestBody {
                id: m.id.to_string(),
                text: m.text,
                sender_id: m.sender_id.map(|id| id.to_string()),
                kind: kind_name(m.kind),
                created_at: rfc3339(m.created_at),
            }),
            unread_count: view.unread,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChatPage {
    pub items: Vec<ChatBody>,
    /// All of the caller's chats come in one page.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MessagePage {
    pub items: Vec<MessageBody>,
    /// The id to pass as `before` (or `after`, when paging forward) for the next page; null
    /// at the end.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreateChatRequest {
    /// The other members: exactly one (and no name) for a direct chat.
    #[schema(value_type = Vec<uuid::Uuid>, min_items = 1, max_items = 500)]
    pub member_ids: Vec<UserId>,
    pub name: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AddMemberRequest {
    #[schema(value_type = uuid::Uuid)]
    pub user_id: UserId,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SendRequest {
    /// 1 to 10,000 characters.
    #[schema(min_length = 1, max_length = 10000)]
    pub text: String,
    /// Client-chosen, unique per sender: a retry with the same one returns the same message.
    #[schema(min_length = 1, max_length = 64, pattern = "^[!-~]+$")]
    pub client_id: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct EditRequest {
    #[schema(min_length = 1, max_length = 10000)]
    pub text: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReadRequest {
    #[schema(value_type = uuid::Uuid)]
    pub message_id: MessageId,
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct MessagesQuery {
    /// A message id: older messages, newest first.
    #[param(value_type = Option<uuid::Uuid>)]
    pub before: Option<MessageId>,
    /// A message id: newer messages, oldest first (what a reconnecting client asks for).
    #[param(value_type = Option<uuid::Uuid>)]
    pub after: Option<MessageId>,
    /// 1..=200, default 50.
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<u32>,
}

/// Creates a direct chat (the existing one again: 200) or a group (201).
#[utoipa::path(post, path = "/api/v1/chats", tag = "chats", security(("bearerAuth" = [])),
    request_body = CreateChatRequest,
    responses(
        (status = 200, description = "The direct chat that already existed.", body = ChatBody),
        (status = 201, description = "Created.", body = ChatBody),
        (status = 400, description = "No other member, or one that does not exist.", body = ErrorBody),
        (status = 401, description = "No valid access token.", body = ErrorBody),
        (status = 422, description = "The body lacks a field or has one of the wrong type.", body = ErrorBody),
    ))]
pub async fn create_chat(
    State(state): State<AppState>,
    Authenticated(who): Authenticated,
    ApiJson(body): ApiJson<CreateChatRequest>,
) -> Result<(StatusCode, Json<ChatBody>), ApiError> {
    let (view, created) = state
        .chats
        .create(who.user_id, &body.member_ids, body.name.as_deref())
        .await?;
    let members: Vec<UserId> = view.members.iter().map(|m| m.user_id).collect();
    let body = ChatBody::from(view);
    if !created {
        return Ok((StatusCode::OK, Json(body)));
    }
    emit_to_users(&state.io, members, "chat:new", &body).await;
    Ok((StatusCode::CREATED, Json(body)))
}

/// The caller's chats, most recently active first.
#[utoipa::path(get, path = "/api/v1/chats", tag = "chats", security(("bearerAuth" = [])),
    responses(
        (status = 200, description = "The caller's chats.", body = ChatPage),
        (status = 401, description = "No valid access token.", body = ErrorBody),
    ))]
pub async fn list_chats(
    State(state): State<AppState>,
    Authenticated(who): Authenticated,
) -> Result<Json<ChatPage>, ApiError> {
    let views = state.chats.list(who.user_id).await?;
    Ok(Json(ChatPage {
        items: views.into_iter().map(ChatBody::from).collect(),
        next_cursor: None,
    }))
}

/// One chat.
#[utoipa::path(get, path = "/api/v1/chats/{id}", tag = "chats", security(("bearerAuth" = [])),
    params(("id" = String, Path, description = "A chat id")),
    responses(
        (status = 200, description = "The chat.", body = ChatBody),
        (status = 401, description = "No valid access token.", body = ErrorBody),
        (status = 404, description = "No such chat, or not a member.", body = ErrorBody),
    ))]
pub async fn get_chat(
    State(state): State<AppState>,
    Authenticated(who): Authenticated,
    ApiPath(id): ApiPath<ChatId>,
) -> Result<Json<ChatBody>, ApiError> {
    Ok(Json(state.chats.get(who.user_id, id).await?.into()))
}

/// Adds a member to a group.
#[utoipa::path(post, path = "/api/v1/chats/{id}/members", tag = "chats", security(("bearerAuth" = [])),
    params(("id" = String, Path, description = "A chat id")),
    request_body = AddMemberRequest,
    responses(
        (status = 200, description = "The chat with its members.", body = ChatBody),
        (status = 400, description = "A direct chat, or no such user.", body = ErrorBody),
        (status = 401, description = "No valid access token.", body = ErrorBody),
        (status = 404, description = "No such chat, or not a member.", body = ErrorBody),
        (status = 422, description = "The body lacks a field or has one of the wrong type.", body = ErrorBody),
    ))]
pub async fn add_member(
    State(state): State<AppState>,
    Authenticated(who): Authenticated,
    ApiPath(id): ApiPath<ChatId>,
    ApiJson(body): ApiJson<AddMemberRequest>,
) -> Result<Json<ChatBody>, ApiError> {
    let view = state
        .chats
        .add_member(who.user_id, id, body.user_id)
        .await?;
    let others: Vec<UserId> = view
        .members
        .iter()
        .map(|m| m.user_id)
        .filter(|m| *m != who.user_id)
        .collect();
    let body = ChatBody::from(view);
    emit_to_users(&state.io, [who.user_id], "chat:updated", &body).await;
    announce_views(&state, id, others).await;
    Ok(Json(body))
}

/// `chat:updated` to each of `users`, with the chat as that user sees it (the unread count
/// is each member's own). A query per member: member changes are rare.
async fn announce_views(state: &AppState, chat: ChatId, users: impl IntoIterator<Item = UserId>) {
    for user in users {
        match state.chats.get(user, chat).await {
            Ok(view) => {
                let body = ChatBody::from(view);
                emit_to_users(&state.io, [user], "chat:updated", &body).await;
            }
            Err(error) => tracing::debug!(%error, "No chat view to announce."),
        }
    }
}

/// Removes a member (group admins) or leaves (oneself).
#[utoipa::path(delete, path = "/api/v1/chats/{id}/members/{userId}", tag = "chats",
    security(("bearerAuth" = [])),
    params(
        ("id" = String, Path, description = "A chat id"),
        ("userId" = String, Path, description = "The member to remove; the caller's own id leaves"),
    ),
    responses(
        (status = 204, description = "Removed."),
        (status = 400, description = "A direct chat.", body = ErrorBody),
        (status = 401, description = "No valid access token.", body = ErrorBody),
        (status = 403, description = "Only admins remove others.", body = ErrorBody),
        (status = 404, description = "No such chat or member, or not a member.", body = ErrorBody),
    ))]
pub async fn remove_member(
    State(state): State<AppState>,
    Authenticated(who): Authenticated,
    ApiPath((id, user)): ApiPath<(ChatId, UserId)>,
) -> Result<StatusCode, ApiError> {
    let before = state.chats.audience(who.user_id, id).await?;
    state.chats.remove_member(who.user_id, id, user).await?;
    // Their sockets, on every node, leave the room at once: no more of its messages.
    if let Err(error) = state
        .io
        .to(crate::realtime::user_room(user))
        .leave(crate::realtime::chat_room(id))
        .await
    {
        tracing::warn!(%error, "Could not take a removed member's sockets out of the room.");
    }
    // Everyone who was in it sees the new member list: the members each their own view; the
    // removed member the list they are no longer on (nothing unread for them there).
    let remaining: Vec<UserId> = before
        .members
        .iter()
        .map(|m| m.user_id)
        .filter(|m| *m != user)
        .collect();
    if let Some(first) = remaining.first()
        && let Ok(view) = state.chats.get(*first, id).await
    {
        let mut body = ChatBody::from(view);
        body.unread_count = 0;
        body.latest_message = None;
        emit_to_users(&state.io, [user], "chat:updated", &body).await;
    }
    announce_views(&state, id, remaining).await;
    Ok(StatusCode::NO_CONTENT)
}

/// A page of messages: newest first (`before`), or oldest first (`after`).
#[utoipa::path(get, path = "/api/v1/chats/{id}/messages", tag = "chats",
    security(("bearerAuth" = [])),
    params(("id" = String, Path, description = "A chat id"), MessagesQuery),
    responses(
        (status = 200, description = "A page of messages.", body = MessagePage),
        (status = 400, description = "Both before and after.", body = ErrorBody),
        (status = 401, description = "No valid access token.", body = ErrorBody),
        (status = 404, description = "No such chat, or not a member.", body = ErrorBody),
    ))]
pub async fn list_messages(
    State(state): State<AppState>,
    Authenticated(who): Authenticated,
    ApiPath(id): ApiPath<ChatId>,
    ApiQuery(query): ApiQuery<MessagesQuery>,
) -> Result<Json<MessagePage>, ApiError> {
    if query.before.is_some() && query.after.is_some() {
        return Err(ApiError::validation("Give before or after, not both.")
            .with_details(serde_json::json!({ "field": "after" })));
    }
    let page = Page {
        before: query.before,
        after: query.after,
        limit: query.limit.unwrap_or(Page::<MessageId>::DEFAULT_LIMIT),
    };
    let (messages, audience) = state.chats.messages(who.user_id, id, page).await?;
    let next_cursor = page
        .next_cursor(&messages, |m| m.id)
        .map(|id| id.to_string());
    let mut items = Vec::with_capacity(messages.len());
    for message in messages {
        items.push(message_body(&state.media, message, &audience).await);
    }
    Ok(Json(MessagePage { items, next_cursor }))
}

/// Sends a text message; a retry with the same `clientId` returns the stored one (200).
#[utoipa::path(post, path = "/api/v1/chats/{id}/messages", tag = "chats",
    security(("bearerAuth" = [])),
    params(("id" = String, Path, description = "A chat id")),
    request_body = SendRequest,
    responses(
        (status = 200, description = "Already stored under this clientId.", body = MessageBody),
        (status = 201, description = "Stored.", body = MessageBody),
        (status = 400, description = "Empty or too long, or a bad clientId.", body = ErrorBody),
        (status = 401, description = "No valid access token.", body = ErrorBody),
        (status = 404, description = "No such chat, or not a member.", body = ErrorBody),
        (status = 422, description = "The body lacks a field or has one of the wrong type.", body = ErrorBody),
    ))]
pub async fn send_message(
    State(state): State<AppState>,
    Authenticated(who): Authenticated,
    ApiPath(id): ApiPath<ChatId>,
    ApiJson(body): ApiJson<SendRequest>,
) -> Result<(StatusCode, Json<MessageBody>), ApiError> {
    let sent = state
        .chats
        .send(who.user_id, id, &body.text, body.client_id.as_deref())
        .await?;
    if !sent.created {
        // A retry: the stored message, with whatever receipts it has gathered since.
        let audience = state.chats.audience(who.user_id, id).await?;
        return Ok((
            StatusCode::OK,
            Json(message_body(&state.media, sent.message, &audience).await),
        ));
    }
    // Stored: the broadcaster (`realtime::spawn_broadcaster`) shows it to every member online.
    let body = MessageBody::new_message(sent.message, sent.kind, None);
    Ok((StatusCode::CREATED, Json(body)))
}

/// Changes the text of one's own message.
#[utoipa::path(patch, path = "/api/v1/chats/{id}/messages/{messageId}", tag = "chats",
    security(("bearerAuth" = [])),
    params(
        ("id" = String, Path, description = "A chat id"),
        ("messageId" = String, Path, description = "A message id"),
    ),
    request_body = EditRequest,
    responses(
        (status = 200, description = "Edited.", body = MessageBody),
        (status = 400, description = "Empty or too long.", body = ErrorBody),
        (status = 401, description = "No valid access token.", body = ErrorBody),
        (status = 403, description = "Someone else's message.", body = ErrorBody),
        (status = 404, description = "No such chat or message, or not a member.", body = ErrorBody),
        (status = 422, description = "The body lacks a field or has one of the wrong type.", body = ErrorBody),
    ))]
pub async fn edit_message(
    State(state): State<AppState>,
    Authenticated(who): Authenticated,
    ApiPath((id, message)): ApiPath<(ChatId, MessageId)>,
    ApiJson(body): ApiJson<EditRequest>,
) -> Result<Json<MessageBody>, ApiError> {
    let message = state
        .chats
        .edit(who.user_id, id, message, &body.text)
        .await?;
    let audience = state.chats.audience(who.user_id, id).await?;
    let body = message_body(&state.media, message, &audience).await;
    emit(
        &state.io,
        crate::realtime::chat_room(id),
        "message:updated",
        &body,
    )
    .await;
    Ok(Json(body))
}

/// Deletes one's own message, leaving a tombstone.
#[utoipa::path(delete, path = "/api/v1/chats/{id}/messages/{messageId}", tag = "chats",
    security(("bearerAuth" = [])),
    params(
        ("id" = String, Path, description = "A chat id"),
        ("messageId" = String, Path, description = "A message id"),
    ),
    responses(
        (status = 200, description = "The tombstone.", body = MessageBody),
        (status = 401, description = "No valid access token.", body = ErrorBody),
        (status = 403, description = "Someone else's message.", body = ErrorBody),
        (status = 404, description = "No such chat or message, or not a member.", body = ErrorBody),
    ))]
pub async fn delete_message(
    State(state): State<AppState>,
    Authenticated(who): Authenticated,
    ApiPath((id, message)): ApiPath<(ChatId, MessageId)>,
) -> Result<Json<MessageBody>, ApiError> {
    let message = state.chats.delete(who.user_id, id, message).await?;
    let audience = state.chats.audience(who.user_id, id).await?;
    let body = message_body(&state.media, message, &audience).await;
    emit(
        &state.io,
        crate::realtime::chat_room(id),
        "message:deleted",
        &body,
    )
    .await;
    Ok(Json(body))
}

/// Marks everything up to a message as seen by the caller.
#[utoipa::path(post, path = "/api/v1/chats/{id}/read", tag = "chats",
    security(("bearerAuth" = [])),
    params(("id" = String, Path, description = "A chat id")),
    request_body = ReadRequest,
    responses(
        (status = 204, description = "Marked."),
        (status = 401, description = "No valid access token.", body = ErrorBody),
        (status = 404, description = "No such chat or message, or not a member.", body = ErrorBody),
        (status = 422, description = "The body lacks a field or has one of the wrong type.", body = ErrorBody),
    ))]
pub async fn mark_read(
    State(state): State<AppState>,
    Authenticated(who): Authenticated,
    ApiPath(id): ApiPath<ChatId>,
    ApiJson(body): ApiJson<ReadRequest>,
) -> Result<StatusCode, ApiError> {
    state
        .chats
        .mark_read(who.user_id, id, body.message_id)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
