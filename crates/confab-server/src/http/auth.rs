//! `/api/v1/auth/*` (SPEC §3 "Accounts and auth") and `/.well-known/jwks.json`.
//! Public unless a handler takes `Authenticated`.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use confab_core::domain::User;
use confab_core::services::auth::{Account, Session, TokenPair};
use confab_core::services::media::MediaService;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::extract::{ApiJson, Authenticated, Client};
use crate::state::AppState;

/// The signed-in user as they see themselves (never a hash or token material).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UserBody {
    pub id: String,
    pub email: String,
    pub name: String,
    pub email_verified: bool,
    pub avatar_url: Option<String>,
    pub created_at: String,
}

impl UserBody {
    /// The account, its avatar URL signed.
    pub async fn new(account: &Account, media: &MediaService) -> Self {
        Self {
            id: account.id.to_string(),
            email: account.email.clone(),
            name: account.name.clone(),
            email_verified: account.email_verified,
            avatar_url: media.avatar_url(account.avatar_key.as_deref()).await,
            created_at: rfc3339(account.created_at),
        }
    }

    pub async fn of_user(user: &User, media: &MediaService) -> Self {
        Self::new(&Account::from(user), media).await
    }
}

pub fn rfc3339(at: confab_core::domain::Timestamp) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TokensBody {
    /// A JWT for `Authorization: Bearer`.
    pub access_token: String,
    /// Opaque; exchange it at /auth/refresh. Each one works once.
    pub refresh_token: String,
    /// Seconds until the access token expires.
    pub expires_in: u64,
}

impl From<TokenPair> for TokensBody {
    fn from(pair: TokenPair) -> Self {
        Self {
            access_token: pair.access_token,
            refresh_token: pair.refresh_token,
            expires_in: pair.expires_in,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionBody {
    pub user: UserBody,
    pub access_token: String,
    pub refresh_token: String,
    pub expires_in: u64,
}

impl SessionBody {
    pub async fn new(session: Session, media: &MediaService) -> Self {
        Self {
            user: UserBody::of_user(&session.user, media).await,
            access_token: session.tokens.access_token,
            refresh_token: session.tokens.refresh_token,
            expires_in: session.tokens.expires_in,
        }
    }
}

/// The answer to a request whose outcome is not told (mail may or may not be sent).
#[derive(Debug, Serialize, ToSchema)]
pub struct AcceptedBody {
    #[schema(example = "accepted")]
    pub status: &'static str,
}

fn accepted() -> (StatusCode, Json<AcceptedBody>) {
    (
        StatusCode::ACCEPTED,
        Json(AcceptedBody { status: "accepted" }),
    )
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct RegisterRequest {
    #[schema(format = Email, max_length = 254)]
    pub email: String,
    /// 8 to 128 characters, not the email.
    #[schema(min_length = 8, max_length = 128)]
    pub password: String,
    #[schema(min_length = 1, max_length = 100)]
    pub name: String,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct LoginRequest {
    pub email: String,
    pub password: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RefreshRequest {
    pub refresh_token: String,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct TokenRequest {
    pub token: String,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct EmailRequest {
    pub email: String,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct ResetRequest {
    pub token: String,
    #[schema(min_length = 8, max_length = 128)]
    pub password: String,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct OtpVerifyRequest {
    pub email: String,
    /// The 6-digit code from the mail.
    pub code: String,
}

/// Creates an account, signs it in and mails a verification link.
#[utoipa::path(post, path = "/api/v1/auth/register", tag = "auth", request_body = RegisterRequest,
    responses(
        (status = 422, description = "The body lacks a field or has one of the wrong type.", body = ErrorBody),
        (status = 201, description = "Registered and signed in.", body = SessionBody),
        (status = 400, description = "A field is not valid.", body = ErrorBody),
        (status = 409, description = "The email has an account.", body = ErrorBody),
        (status = 429, description = "Too many requests.", body = ErrorBody),
    ))]
pub async fn register(
    State(state): State<AppState>,
    Client(client): Client,
    ApiJson(body): ApiJson<RegisterRequest>,
) -> Result<(StatusCode, Json<SessionBody>), ApiError> {
    let session = state
        .auth
        .register(&client, &body.email, &body.password, &body.name)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(SessionBody::new(session, &state.media).await),
    ))
}

/// Signs in with email and password. Five failures within 15 minutes lock the account.
#[utoipa::path(post, path = "/api/v1/auth/login", tag = "auth", request_body = LoginRequest,
    responses(
        (status = 422, description = "The body lacks a field or has one of the wrong type.", body = ErrorBody),
        (status = 200, description = "Signed in.", body = SessionBody),
        (status = 401, description = "Wrong email or password (one message for both).", body = ErrorBody),
        (status = 423, description = "Locked after too many failures.", body = ErrorBody),
        (status = 429, description = "Too many requests.", body = ErrorBody),
    ))]
pub async fn login(
    State(state): State<AppState>,
    Client(client): Client,
    ApiJson(body): ApiJson<LoginRequest>,
) -> Result<Json<SessionBody>, ApiError> {
    let session = state
        .auth
        .login(&client, &body.email, &body.password)
        .await?;
    Ok(Json(SessionBody::new(session, &state.media).await))
}

/// Exchanges a refresh token for a new pair; the old one is dead (reusing it later ends the
/// whole sign-in).
#[utoipa::path(post, path = "/api/v1/auth/refresh", tag = "auth", request_body = RefreshRequest,
    responses(
        (status = 422, description = "The body lacks a field or has one of the wrong type.", body = ErrorBody),
        (status = 200, description = "A new pair.", body = TokensBody),
        (status = 401, description = "The token is unknown, expired, revoked or reused.", body = ErrorBody),
    ))]
pub async fn refresh(
    State(state): State<AppState>,
    Client(client): Client,
    ApiJson(body): ApiJson<RefreshRequest>,
) -> Result<Json<TokensBody>, ApiError> {
    let pair = state.auth.refresh(&client, &body.refresh_token).await?;
    Ok(Json(pair.into()))
}

/// Ends the sign-in the refresh token belongs to.
#[utoipa::path(post, path = "/api/v1/auth/logout", tag = "auth", request_body = RefreshRequest,
    security(("bearerAuth" = [])),
    responses(
        (status = 422, description = "The body lacks a field or has one of the wrong type.", body = ErrorBody),
        (status = 204, description = "Signed out."),
        (status = 401, description = "No valid access token.", body = ErrorBody),
    ))]
pub async fn logout(
    State(state): State<AppState>,
    Authenticated(who): Authenticated,
    ApiJson(body): ApiJson<RefreshRequest>,
) -> Result<StatusCode, ApiError> {
    state.auth.logout(who, &body.refresh_token).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Ends every sign-in of the caller (access tokens already issued expire on their own).
#[utoipa::path(post, path = "/api/v1/auth/logout-all", tag = "auth",
    security(("bearerAuth" = [])),
    responses(
        (status = 204, description = "Every sign-in ended."),
        (status = 401, description = "No valid access token.", body = ErrorBody),
    ))]
pub async fn logout_all(
    State(state): State<AppState>,
    Authenticated(who): Authenticated,
    Client(client): Client,
) -> Result<StatusCode, ApiError> {
    state.auth.logout_all(who, &client).await?;
    crate::realtime::disconnect_user(&state.io, who.user_id).await;
    Ok(StatusCode::NO_CONTENT)
}

/// Confirms the email address with the token from the verification mail.
#[utoipa::path(post, path = "/api/v1/auth/verify-email", tag = "auth", request_body = TokenRequest,
    responses(
        (status = 422, description = "The body lacks a field or has one of the wrong type.", body = ErrorBody),
        (status = 200, description = "Verified.", body = UserBody),
        (status = 400, description = "The link is invalid, used or expired.", body = ErrorBody),
    ))]
pub async fn verify_email(
    State(state): State<AppState>,
    Client(client): Client,
    ApiJson(body): ApiJson<TokenRequest>,
) -> Result<Json<UserBody>, ApiError> {
    let user = state.auth.verify_email(&client, &body.token).await?;
    Ok(Json(UserBody::of_user(&user, &state.media).await))
}

/// Mails a new verification link (nothing when already verified).
#[utoipa::path(post, path = "/api/v1/auth/verify-email/resend", tag = "auth",
    security(("bearerAuth" = [])),
    responses(
        (status = 202, description = "Queued.", body = AcceptedBody),
        (status = 401, description = "No valid access token.", body = ErrorBody),
    ))]
pub async fn resend_verification(
    State(state): State<AppState>,
    Authenticated(who): Authenticated,
) -> Result<(StatusCode, Json<AcceptedBody>), ApiError> {
    state.auth.resend_verification(who).await?;
    Ok(accepted())
}

/// Mails a reset link valid for an hour, if the account exists; the answer is the same
/// either way.
#[utoipa::path(post, path = "/api/v1/auth/password/forgot", tag = "auth", request_body = EmailRequest,
    responses(
        (status = 422, description = "The body lacks a field or has one of the wrong type.", body = ErrorBody),
        (status = 202, description = "Accepted, whether or not the account exists.", body = AcceptedBody),
        (status = 429, description = "Too many requests.", body = ErrorBody),
    ))]
pub async fn forgot_password(
    State(state): State<AppState>,
    Client(client): Client,
    ApiJson(body): ApiJson<EmailRequest>,
) -> Result<(StatusCode, Json<AcceptedBody>), ApiError> {
    state.auth.forgot_password(&client, &body.email).await?;
    Ok(accepted())
}

/// Sets a new password with the token from the reset mail, and ends every sign-in.
#[utoipa::path(post, path = "/api/v1/auth/password/reset", tag = "auth", request_body = ResetRequest,
    responses(
        (status = 422, description = "The body lacks a field or has one of the wrong type.", body = ErrorBody),
        (status = 204, description = "Password set; every sign-in ended."),
        (status = 400, description = "The link is invalid, used or expired, or the password is not valid.", body = ErrorBody),
    ))]
pub async fn reset_password(
    State(state): State<AppState>,
    Client(client): Client,
    ApiJson(body): ApiJson<ResetRequest>,
) -> Result<StatusCode, ApiError> {
    let user = state
        .auth
        .reset_password(&client, &body.token, &body.password)
        .await?;
    crate::realtime::disconnect_user(&state.io, user).await;
    Ok(StatusCode::NO_CONTENT)
}

/// Mails a 6-digit sign-in code (valid 10 minutes, 5 tries); the answer is the same whether
/// or not the account exists.
#[utoipa::path(post, path = "/api/v1/auth/otp/request", tag = "auth", request_body = EmailRequest,
    responses(
        (status = 422, description = "The body lacks a field or has one of the wrong type.", body = ErrorBody),
        (status = 202, description = "Accepted.", body = AcceptedBody),
        (status = 429, description = "Too many requests.", body = ErrorBody),
    ))]
pub async fn request_otp(
    State(state): State<AppState>,
    Client(client): Client,
    ApiJson(body): ApiJson<EmailRequest>,
) -> Result<(StatusCode, Json<AcceptedBody>), ApiError> {
    state.auth.request_otp(&client, &body.email).await?;
    Ok(accepted())
}

/// Signs in with a code; creates the account on first use unless sign-up by code is off.
#[utoipa::path(post, path = "/api/v1/auth/otp/verify", tag = "auth", request_body = OtpVerifyRequest,
    responses(
        (status = 422, description = "The body lacks a field or has one of the wrong type.", body = ErrorBody),
        (status = 200, description = "Signed in.", body = SessionBody),
        (status = 401, description = "Wrong, used or expired code.", body = ErrorBody),
        (status = 429, description = "Too many requests.", body = ErrorBody),
    ))]
pub async fn verify_otp(
    State(state): State<AppState>,
    Client(client): Client,
    ApiJson(body): ApiJson<OtpVerifyRequest>,
) -> Result<Json<SessionBody>, ApiError> {
    let session = state
        .auth
        .verify_otp(&client, &body.email, &body.code)
        .await?;
    Ok(Json(SessionBody::new(session, &state.media).await))
}

/// The public keys that verify access tokens, when they are signed with a key pair
/// (`auth.jwt_algorithm` RS256 or EdDSA); 404 with a shared secret.
#[utoipa::path(get, path = "/.well-known/jwks.json", tag = "auth",
    responses(
        (status = 200, description = "A JWK set.", body = Object),
        (status = 404, description = "Tokens are signed with a shared secret.", body = ErrorBody),
    ))]
pub async fn jwks(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    state
        .auth
        .access_tokens()
        .jwks()
        .cloned()
        .map(Json)
        .ok_or_else(ApiError::not_found)
}
