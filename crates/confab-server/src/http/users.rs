//! `/api/v1/users*` (SPEC §3 "Users"): the caller's account, public profiles, search, and the
//! caller's security events. Every route needs an access token.

// utoipa's expansion of `params(SomeQuery)` qualifies paths the lint calls unnecessary.
#![allow(unused_qualifications)]

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use confab_core::domain::{Page, SecurityEventId, UserId};
use confab_core::services::auth::PublicProfile;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use confab_core::services::media::MediaService;

use super::auth::{TokensBody, UserBody, rfc3339};
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiJson, ApiPath, ApiQuery, Authenticated, Client};
use crate::state::AppState;

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProfileBody {
    pub id: String,
    pub name: String,
    pub avatar_url: Option<String>,
    pub online: bool,
    pub last_seen_at: Option<String>,
}

impl ProfileBody {
    pub async fn new(p: PublicProfile, media: &MediaService) -> Self {
        Self {
            id: p.user.id.to_string(),
            avatar_url: media.avatar_url(p.user.avatar_key.as_deref()).await,
            name: p.user.name,
            online: p.online,
            last_seen_at: p.user.last_seen_at.map(rfc3339),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProfilePage {
    pub items: Vec<ProfileBody>,
    /// Search results come in one page.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecurityEventBody {
    pub id: String,
    /// `login_succeeded`, `login_failed`, `account_locked`, `refresh_reused`,
    /// `password_changed`, `password_reset`, `logout_all`, `email_verified` …
    pub kind: String,
    pub ip: Option<String>,
    pub user_agent: Option<String>,
    #[schema(value_type = Object)]
    pub details: serde_json::Value,
    pub created_at: String,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecurityEventPage {
    pub items: Vec<SecurityEventBody>,
    /// Pass as `before` for the next (older) page; null at the end.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct UpdateMeRequest {
    #[schema(min_length = 1, max_length = 100)]
    pub name: String,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct ChangePasswordRequest {
    /// The current password (may be empty for an account made by a one-time code).
    #[serde(default)]
    pub current: String,
    #[schema(min_length = 8, max_length = 128)]
    pub new: String,
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct SearchQuery {
    /// A name prefix (any case) or an exact email address.
    #[param(min_length = 1, max_length = 254)]
    pub q: String,
    /// 1..=200, default 50.
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<u32>,
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct EventsQuery {
    /// An event id: the page of events older than it.
    #[param(value_type = Option<String>, format = Uuid)]
    pub before: Option<SecurityEventId>,
    /// 1..=200, default 50.
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<u32>,
}

/// The caller's account.
#[utoipa::path(get, path = "/api/v1/users/me", tag = "users", security(("bearerAuth" = [])),
    responses(
        (status = 200, description = "The caller.", body = UserBody),
        (status = 401, description = "No valid access token.", body = ErrorBody),
    ))]
pub async fn me(
    State(state): State<AppState>,
    Authenticated(who): Authenticated,
) -> Result<Json<UserBody>, ApiError> {
    let account = state.auth.me(who).await?;
    Ok(Json(UserBody::new(&account, &state.media).await))
}

/// Changes the caller's name.
#[utoipa::path(patch, path = "/api/v1/users/me", tag = "users", security(("bearerAuth" = [])),
    request_body = UpdateMeRequest,
    responses(
        (status = 422, description = "The body lacks a field or has one of the wrong type.", body = ErrorBody),
        (status = 200, description = "Updated.", body = UserBody),
        (status = 400, description = "The name is not valid.", body = ErrorBody),
        (status = 401, description = "No valid access token.", body = ErrorBody),
    ))]
pub async fn update_me(
    State(state): State<AppState>,
    Authenticated(who): Authenticated,
    ApiJson(body): ApiJson<UpdateMeRequest>,
) -> Result<Json<UserBody>, ApiError> {
    let user = state.auth.rename(who, &body.name).await?;
    Ok(Json(UserBody::of_user(&user, &state.media).await))
}

/// Changes the password: every sign-in ends and a new pair is returned for this client.
#[utoipa::path(put, path = "/api/v1/users/me/password", tag = "users", security(("bearerAuth" = [])),
    request_body = ChangePasswordRequest,
    responses(
        (status = 422, description = "The body lacks a field or has one of the wrong type.", body = ErrorBody),
        (status = 200, description = "Changed; a new pair.", body = TokensBody),
        (status = 400, description = "The new password is not valid.", body = ErrorBody),
        (status = 401, description = "No valid access token.", body = ErrorBody),
        (status = 403, description = "The current password is wrong.", body = ErrorBody),
    ))]
pub async fn change_password(
    State(state): State<AppState>,
    Authenticated(who): Authenticated,
    Client(client): Client,
    ApiJson(body): ApiJson<ChangePasswordRequest>,
) -> Result<Json<TokensBody>, ApiError> {
    let pair = state
        .auth
        .change_password(who, &client, &body.current, &body.new)
        .await?;
    // Sockets signed in before the change go too; the client reconnects with the new token.
    crate::realtime::disconnect_user(&state.io, who.user_id).await;
    Ok(Json(pair.into()))
}

/// Deletes the caller's account and personal data; their messages in shared chats remain,
/// from "deleted user".
#[utoipa::path(delete, path = "/api/v1/users/me", tag = "users", security(("bearerAuth" = [])),
    responses(
        (status = 204, description = "Deleted."),
        (status = 401, description = "No valid access token.", body = ErrorBody),
    ))]
pub async fn delete_me(
    State(state): State<AppState>,
    Authenticated(who): Authenticated,
    Client(client): Client,
) -> Result<StatusCode, ApiError> {
    state.auth.delete_account(who, &client).await?;
    crate::realtime::disconnect_user(&state.io, who.user_id).await;
    Ok(StatusCode::NO_CONTENT)
}

/// The caller's own security events, newest first.
#[utoipa::path(get, path = "/api/v1/users/me/security-events", tag = "users",
    security(("bearerAuth" = [])), params(EventsQuery),
    responses(
        (status = 200, description = "A page of events.", body = SecurityEventPage),
        (status = 401, description = "No valid access token.", body = ErrorBody),
    ))]
pub async fn security_events(
    State(state): State<AppState>,
    Authenticated(who): Authenticated,
    ApiQuery(query): ApiQuery<EventsQuery>,
) -> Result<Json<SecurityEventPage>, ApiError> {
    let limit = query
        .limit
        .unwrap_or(Page::<SecurityEventId>::DEFAULT_LIMIT);
    let page = Page {
        before: query.before,
        after: None,
        limit,
    };
    let events = state.auth.security_events(who, page).await?;
    let next_cursor = page.next_cursor(&events, |e| e.id).map(|id| id.to_string());
    Ok(Json(SecurityEventPage {
        items: events
            .into_iter()
            .map(|e| SecurityEventBody {
                id: e.id.to_string(),
                kind: e.kind,
                ip: e.ip,
                user_agent: e.user_agent,
                details: e.details,
                created_at: rfc3339(e.created_at),
            })
            .collect(),
        next_cursor,
    }))
}

/// A user's public profile.
#[utoipa::path(get, path = "/api/v1/users/{id}", tag = "users", security(("bearerAuth" = [])),
    params(("id" = String, Path, description = "A user id")),
    responses(
        (status = 200, description = "The profile.", body = ProfileBody),
        (status = 401, description = "No valid access token.", body = ErrorBody),
        (status = 404, description = "No such user.", body = ErrorBody),
    ))]
pub async fn profile(
    State(state): State<AppState>,
    Authenticated(_): Authenticated,
    ApiPath(id): ApiPath<UserId>,
) -> Result<Json<ProfileBody>, ApiError> {
    let profile = state.auth.profile(id).await?;
    Ok(Json(ProfileBody::new(profile, &state.media).await))
}

/// Users by name prefix or exact email (never by email prefix).
#[utoipa::path(get, path = "/api/v1/users", tag = "users", security(("bearerAuth" = [])),
    params(SearchQuery),
    responses(
        (status = 200, description = "Matching users.", body = ProfilePage),
        (status = 400, description = "No query.", body = ErrorBody),
        (status = 401, description = "No valid access token.", body = ErrorBody),
    ))]
pub async fn search(
    State(state): State<AppState>,
    Authenticated(_): Authenticated,
    ApiQuery(query): ApiQuery<SearchQuery>,
) -> Result<Json<ProfilePage>, ApiError> {
    let limit = query
        .limit
        .unwrap_or(Page::<UserId>::DEFAULT_LIMIT)
        .clamp(1, Page::<UserId>::MAX_LIMIT);
    let found = state.auth.search(&query.q, limit).await?;
    let mut items = Vec::with_capacity(found.len());
    for profile in found {
        items.push(ProfileBody::new(profile, &state.media).await);
    }
    Ok(Json(ProfilePage {
        items,
        next_cursor: None,
    }))
}
