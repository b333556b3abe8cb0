//! Token and AI operations, written once for any connection (pool or transaction).
//!
//! Security-relevant reads (tokens) always go to the primary: a replica's lag must never
//! resurrect a revoked family or a used code.

use async_trait::async_trait;
use confab_core::domain::{
    AiFeedback, AiMessage, AiMessageId, AiRequestId, AiSession, AiSessionId, GenerationId,
    GenerationJob, OneTimeToken, OneTimeTokenId, RefreshFamily, RefreshFamilyId, RefreshToken,
    RefreshTokenId, Timestamp, TokenPurpose, UserId,
};
use confab_core::ports::store::{AiStore, StoreError, TokenStore};
use sea_orm::sea_query::{Expr, ExprTrait, OnConflict};
use sea_orm::{
    ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect,
    TransactionSession, TransactionTrait,
};

use super::entities::{
    ai_feedback, ai_messages, ai_sessions, generation_jobs, one_time_tokens, refresh_families,
    refresh_tokens,
};
use super::ops::values;
use super::{Sql, read, store_err};

fn family(m: refresh_families::Model) -> RefreshFamily {
    RefreshFamily {
        id: RefreshFamilyId(m.id),
        user_id: UserId(m.user_id),
        created_at: m.created_at,
        expires_at: m.expires_at,
        revoked_at: m.revoked_at,
        revoked_reason: m.revoked_reason,
    }
}

fn token(m: refresh_tokens::Model) -> RefreshToken {
    RefreshToken {
        id: RefreshTokenId(m.id),
        family_id: RefreshFamilyId(m.family_id),
        token_hash: m.token_hash,
        created_at: m.created_at,
        expires_at: m.expires_at,
        rotated_at: m.rotated_at,
        replaced_by: m.replaced_by.map(RefreshTokenId),
    }
}

fn token_row(t: &RefreshToken) -> refresh_tokens::Model {
    refresh_tokens::Model {
        id: t.id.0,
        family_id: t.family_id.0,
        token_hash: t.token_hash.clone(),
        created_at: t.created_at,
        expires_at: t.expires_at,
        rotated_at: t.rotated_at,
        replaced_by: t.replaced_by.map(|id| id.0),
    }
}

fn purpose_name(purpose: TokenPurpose) -> &'static str {
    match purpose {
        TokenPurpose::VerifyEmail => "verify_email",
        TokenPurpose::PasswordReset => "password_reset",
        TokenPurpose::Otp => "otp",
    }
}

fn one_time(m: one_time_tokens::Model) -> Result<OneTimeToken, StoreError> {
    let purpose = match m.purpose.as_str() {
        "verify_email" => TokenPurpose::VerifyEmail,
        "password_reset" => TokenPurpose::PasswordReset,
        "otp" => TokenPurpose::Otp,
        other => {
            return Err(StoreError::Other(
                format!("unexpected token purpose {other:?}").into(),
            ));
        }
    };
    Ok(OneTimeToken {
        id: OneTimeTokenId(m.id),
        user_id: m.user_id.map(UserId),
        email: m.email,
        purpose,
        token_hash: m.token_hash,
        attempts: m.attempts,
        created_at: m.created_at,
        expires_at: m.expires_at,
        used_at: m.used_at,
    })
}

fn session(m: ai_sessions::Model) -> AiSession {
    AiSession {
        id: AiSessionId(m.id),
        user_id: UserId(m.user_id),
        title: m.title,
        status: m.status,
        created_at: m.created_at,
        updated_at: m.updated_at,
    }
}

fn ai_message(m: ai_messages::Model) -> AiMessage {
    AiMessage {
        id: AiMessageId(m.id),
        session_id: AiSessionId(m.session_id),
        request_id: AiRequestId(m.request_id),
        role: m.role,
        content: m.content,
        status: m.status,
        model: m.model,
        provider: m.provider,
        cached: m.cached,
        latency_ms: m.latency_ms,
        prompt_tokens: m.prompt_tokens,
        completion_tokens: m.completion_tokens,
        error_code: m.error_code,
        created_at: m.created_at,
    }
}

fn generation(m: generation_jobs::Model) -> GenerationJob {
    GenerationJob {
        id: GenerationId(m.id),
        user_id: UserId(m.user_id),
        kind: m.kind,
        prompt: m.prompt,
        n: m.n,
        provider: m.provider,
        status: m.status,
        results: m.results,
        error_code: m.error_code,
        created_at: m.created_at,
        updated_at: m.updated_at,
    }
}

#[async_trait]
impl<C> TokenStore for Sql<C>
where
    C: ConnectionTrait + TransactionTrait + Send + Sync + 'static,
{
    async fn create_refresh_family(
        &self,
        f: &RefreshFamily,
        first: &RefreshToken,
    ) -> Result<(), StoreError> {
        let tx = self.conn.begin().await.map_err(store_err)?;
        let row = refresh_families::Model {
            id: f.id.0,
            user_id: f.user_id.0,
            created_at: f.created_at,
            expires_at: f.expires_at,
            revoked_at: f.revoked_at,
            revoked_reason: f.revoked_reason.clone(),
        };
        refresh_families::Entity::insert(values::<_, refresh_families::ActiveModel>(row))
            .exec_without_returning(&tx)
            .await
            .map_err(store_err)?;
        refresh_tokens::Entity::insert(values::<_, refresh_tokens::ActiveModel>(token_row(first)))
            .exec_without_returning(&tx)
            .await
            .map_err(store_err)?;
        tx.commit().await.map_err(store_err)
    }

    async fn refresh_token_by_hash(
        &self,
        token_hash: &str,
    ) -> Result<Option<(RefreshToken, RefreshFamily)>, StoreError> {
        let Some(t) = refresh_tokens::Entity::find()
            .filter(refresh_tokens::Column::TokenHash.eq(token_hash))
            .one(&self.conn)
            .await
            .map_err(store_err)?
        else {
            return Ok(None);
        };
        let f = refresh_families::Entity::find_by_id(t.family_id)
            .one(&self.conn)
            .await
            .map_err(store_err)?;
        Ok(f.map(|f| (token(t), family(f))))
    }

    async fn refresh_token_by_id(
        &self,
        id: RefreshTokenId,
    ) -> Result<Option<RefreshToken>, StoreError> {
        let found = refresh_tokens::Entity::find_by_id(id.0)
            .one(&self.conn)
            .await;
        Ok(found.map_err(store_err)?.map(token))
    }

    async fn rotate_refresh_token(
        &self,
        old: RefreshTokenId,
        successor: &RefreshToken,
        at: Timestamp,
    ) -> Result<bool, StoreError> {
        let tx = self.conn.begin().await.map_err(store_err)?;
        let claimed = refresh_tokens::Entity::update_many()
            .col_expr(refresh_tokens::Column::RotatedAt, Expr::value(Some(at)))
            .col_expr(
                refresh_tokens::Column::ReplacedBy,
                Expr::value(Some(successor.id.0)),
            )
            .filter(refresh_tokens::Column::Id.eq(old.0))
            .filter(refresh_tokens::Column::RotatedAt.is_null())
            .exec(&tx)
            .await
            .map_err(store_err)?;
        if claimed.rows_affected == 0 {
            return Ok(false); // The transaction rolls back on drop.
        }
        refresh_tokens::Entity::insert(values::<_, refresh_tokens::ActiveModel>(token_row(
            successor,
        )))
        .exec_without_returning(&tx)
        .await
        .map_err(store_err)?;
        tx.commit().await.map_err(store_err)?;
        Ok(true)
    }

    async fn revoke_refresh_family(
        &self,
        id: RefreshFamilyId,
        reason: &str,
        at: Timestamp,
    ) -> Result<(), StoreError> {
        refresh_families::Entity::update_many()
            .col_expr(refresh_families::Column::RevokedAt, Expr::value(Some(at)))
            .col_expr(
                refresh_families::Column::RevokedReason,
                Expr::value(Some(reason.to_owned())),
            )
            .filter(refresh_families::Column::Id.eq(id.0))
            .filter(refresh_families::Column::RevokedAt.is_null())
            .exec(&self.conn)
            .await
            .map_err(store_err)?;
        Ok(())
    }

    async fn revoke_user_refresh_families(
        &self,
        user: UserId,
        reason: &str,
        at: Timestamp,
    ) -> Result<u64, StoreError> {
        let revoked = refresh_families::Entity::update_many()
            .col_expr(refresh_families::Column::RevokedAt, Expr::value(Some(at)))
            .col_expr(
                refresh_families::Column::RevokedReason,
                Expr::value(Some(reason.to_owned())),
            )
            .filter(refresh_families::Column::UserId.eq(user.0))
            .filter(refresh_families::Column::RevokedAt.is_null())
            .exec(&self.conn)
            .await
            .map_err(store_err)?;
        Ok(revoked.rows_affected)
    }

    async fn purge_refresh_families(&self, before: Timestamp) -> Result<u64, StoreError> {
        let deleted = refresh_families::Entity::delete_many()
            .filter(refresh_families::Column::ExpiresAt.lt(before))
            .exec(&self.conn)
            .await
            .map_err(store_err)?;
        Ok(deleted.rows_affected)
    }

    async fn create_one_time_token(&self, t: &OneTimeToken) -> Result<(), StoreError> {
        let row = one_time_tokens::Model {
            id: t.id.0,
            user_id: t.user_id.map(|u| u.0),
            email: t.email.clone(),
            purpose: purpose_name(t.purpose).to_owned(),
            token_hash: t.token_hash.clone(),
            attempts: t.attempts,
            created_at: t.created_at,
            expires_at: t.expires_at,
            used_at: t.used_at,
        };
        one_time_tokens::Entity::insert(values::<_, one_time_tokens::ActiveModel>(row))
            .exec_without_returning(&self.conn)
            .await
            .map_err(store_err)?;
        Ok(())
    }

    async fn one_time_token(
        &self,
        purpose: TokenPurpose,
        token_hash: &str,
    ) -> Result<Option<OneTimeToken>, StoreError> {
        let found = one_time_tokens::Entity::find()
            .filter(one_time_tokens::Column::Purpose.eq(purpose_name(purpose)))
            .filter(one_time_tokens::Column::TokenHash.eq(token_hash))
            .one(&self.conn)
            .await;
        found.map_err(store_err)?.map(one_time).transpose()
    }

    async fn latest_one_time_token(
        &self,
        email: &str,
        purpose: TokenPurpose,
        now: Timestamp,
    ) -> Result<Option<OneTimeToken>, StoreError> {
        let found = one_time_tokens::Entity::find()
            .filter(one_time_tokens::Column::Email.eq(email))
            .filter(one_time_tokens::Column::Purpose.eq(purpose_name(purpose)))
            .filter(one_time_tokens::Column::UsedAt.is_null())
            .filter(one_time_tokens::Column::ExpiresAt.gt(now))
            .order_by_desc(one_time_tokens::Column::CreatedAt)
            .order_by_desc(one_time_tokens::Column::Id)
            .one(&self.conn)
            .await;
        found.map_err(store_err)?.map(one_time).transpose()
    }

    async fn count_one_time_attempt(&self, id: OneTimeTokenId) -> Result<i32, StoreError> {
        let tx = self.conn.begin().await.map_err(store_err)?;
        let updated = one_time_tokens::Entity::update_many()
            .col_expr(
                one_time_tokens::Column::Attempts,
                Expr::col(one_time_tokens::Column::Attempts).add(1),
            )
            .filter(one_time_tokens::Column::Id.eq(id.0))
            .exec(&tx)
            .await
            .map_err(store_err)?;
        if updated.rows_affected == 0 {
            return Err(StoreError::NotFound(format!("one-time token {id}")));
        }
        let attempts: Option<i32> = one_time_tokens::Entity::find_by_id(id.0)
            .select_only()
            .column(one_time_tokens::Column::Attempts)
            .into_tuple()
            .one(&tx)
            .await
            .map_err(store_err)?;
        tx.commit().await.map_err(store_err)?;
        attempts.ok_or_else(|| StoreError::NotFound(format!("one-time token {id}")))
    }

    async fn use_one_time_token(
        &self,
        id: OneTimeTokenId,
        at: Timestamp,
    ) -> Result<bool, StoreError> {
        let used = one_time_tokens::Entity::update_many()
            .col_expr(one_time_tokens::Column::UsedAt, Expr::value(Some(at)))
            .filter(one_time_tokens::Column::Id.eq(id.0))
            .filter(one_time_tokens::Column::UsedAt.is_null())
            .filter(one_time_tokens::Column::ExpiresAt.gt(at))
            .exec(&self.conn)
            .await
            .map_err(store_err)?;
        Ok(used.rows_affected == 1)
    }

    async fn purge_one_time_tokens(&self, before: Timestamp) -> Result<u64, StoreError> {
        let deleted = one_time_tokens::Entity::delete_many()
            .filter(one_time_tokens::Column::ExpiresAt.lt(before))
            .exec(&self.conn)
            .await
            .map_err(store_err)?;
        Ok(deleted.rows_affected)
    }
}

#[async_trait]
impl<C> AiStore for Sql<C>
where
    C: ConnectionTrait + TransactionTrait + Send + Sync + 'static,
{
    async fn create_ai_session(&self, s: &AiSession) -> Result<(), StoreError> {
        let row = ai_sessions::Model {
            id: s.id.0,
            user_id: s.user_id.0,
            title: s.title.clone(),
            status: s.status.clone(),
            created_at: s.created_at,
            updated_at: s.updated_at,
        };
        ai_sessions::Entity::insert(values::<_, ai_sessions::ActiveModel>(row))
            .exec_without_returning(&self.conn)
            .await
            .map_err(store_err)?;
        Ok(())
    }

    async fn ai_session(&self, id: AiSessionId) -> Result<Option<AiSession>, StoreError> {
        let found = read!(self, |c| ai_sessions::Entity::find_by_id(id.0).one(c).await);
        Ok(found.map_err(store_err)?.map(session))
    }

    async fn ai_sessions_of(&self, user: UserId, limit: u32) -> Result<Vec<AiSession>, StoreError> {
        let query = ai_sessions::Entity::find()
            .filter(ai_sessions::Column::UserId.eq(user.0))
            .order_by_desc(ai_sessions::Column::UpdatedAt)
            .order_by_desc(ai_sessions::Column::Id)
            .limit(u64::from(limit.clamp(1, 200)));
        let found = read!(self, |c| query.clone().all(c).await);
        Ok(found.map_err(store_err)?.into_iter().map(session).collect())
    }

    async fn set_ai_session_status(
        &self,
        id: AiSessionId,
        status: &str,
        at: Timestamp,
    ) -> Result<(), StoreError> {
        let updated = ai_sessions::Entity::update_many()
            .col_expr(ai_sessions::Column::Status, Expr::value(status.to_owned()))
            .col_expr(ai_sessions::Column::UpdatedAt, Expr::value(at))
            .filter(ai_sessions::Column::Id.eq(id.0))
            .exec(&self.conn)
            .await
            .map_err(store_err)?;
        if updated.rows_affected == 0 {
            return Err(StoreError::NotFound(format!("AI session {id}")));
        }
        Ok(())
    }

    async fn delete_ai_session(&self, id: AiSessionId) -> Result<bool, StoreError> {
        let deleted = ai_sessions::Entity::delete_by_id(id.0)
            .exec(&self.conn)
            .await
            .map_err(store_err)?;
        Ok(deleted.rows_affected > 0)
    }

    async fn insert_ai_message(&self, m: &AiMessage) -> Result<(), StoreError> {
        let row = ai_messages::Model {
            id: m.id.0,
            session_id: m.session_id.0,
            request_id: m.request_id.0,
            role: m.role.clone(),
            content: m.content.clone(),
            status: m.status.clone(),
            model: m.model.clone(),
            provider: m.provider.clone(),
            cached: m.cached,
            latency_ms: m.latency_ms,
            prompt_tokens: m.prompt_tokens,
            completion_tokens: m.completion_tokens,
            error_code: m.error_code.clone(),
            created_at: m.created_at,
        };
        ai_messages::Entity::insert(values::<_, ai_messages::ActiveModel>(row))
            .exec_without_returning(&self.conn)
            .await
            .map_err(store_err)?;
        Ok(())
    }

    async fn ai_message(&self, id: AiMessageId) -> Result<Option<AiMessage>, StoreError> {
        let found = read!(self, |c| ai_messages::Entity::find_by_id(id.0).one(c).await);
        Ok(found.map_err(store_err)?.map(ai_message))
    }

    async fn ai_message_for_request(
        &self,
        request: AiRequestId,
        role: &str,
    ) -> Result<Option<AiMessage>, StoreError> {
        // The primary: an idempotent consumer checks what it may just have written.
        let found = ai_messages::Entity::find()
            .filter(ai_messages::Column::RequestId.eq(request.0))
            .filter(ai_messages::Column::Role.eq(role))
            .one(&self.conn)
            .await;
        Ok(found.map_err(store_err)?.map(ai_message))
    }

    async fn recent_ai_messages(
        &self,
        session_id: AiSessionId,
        limit: u32,
    ) -> Result<Vec<AiMessage>, StoreError> {
        let query = ai_messages::Entity::find()
            .filter(ai_messages::Column::SessionId.eq(session_id.0))
            .order_by_desc(ai_messages::Column::Id)
            .limit(u64::from(limit.clamp(1, 200)));
        let found = read!(self, |c| query.clone().all(c).await);
        let mut messages: Vec<AiMessage> = found
            .map_err(store_err)?
            .into_iter()
            .map(ai_message)
            .collect();
        messages.reverse();
        Ok(messages)
    }

    async fn update_ai_message(&self, m: &AiMessage) -> Result<(), StoreError> {
        let updated = ai_messages::Entity::update_many()
            .col_expr(ai_messages::Column::Content, Expr::value(m.content.clone()))
            .col_expr(ai_messages::Column::Status, Expr::value(m.status.clone()))
            .col_expr(ai_messages::Column::Model, Expr::value(m.model.clone()))
            .col_expr(
                ai_messages::Column::Provider,
                Expr::value(m.provider.clone()),
            )
            .col_expr(ai_messages::Column::Cached, Expr::value(m.cached))
            .col_expr(ai_messages::Column::LatencyMs, Expr::value(m.latency_ms))
            .col_expr(
                ai_messages::Column::PromptTokens,
                Expr::value(m.prompt_tokens),
            )
            .col_expr(
                ai_messages::Column::CompletionTokens,
                Expr::value(m.completion_tokens),
            )
            .col_expr(
                ai_messages::Column::ErrorCode,
                Expr::value(m.error_code.clone()),
            )
            .filter(ai_messages::Column::Id.eq(m.id.0))
            .exec(&self.conn)
            .await
            .map_err(store_err)?;
        if updated.rows_affected == 0 {
            return Err(StoreError::NotFound(format!("AI message {}", m.id)));
        }
        Ok(())
    }

    async fn put_ai_feedback(&self, f: &AiFeedback) -> Result<(), StoreError> {
        let row = ai_feedback::Model {
            id: uuid::Uuid::now_v7(),
            message_id: f.message_id.0,
            user_id: f.user_id.0,
            rating: f.rating.clone(),
            comment: f.comment.clone(),
            created_at: f.created_at,
        };
        ai_feedback::Entity::insert(values::<_, ai_feedback::ActiveModel>(row))
            .on_conflict(
                OnConflict::columns([ai_feedback::Column::MessageId, ai_feedback::Column::UserId])
                    .update_columns([
                        ai_feedback::Column::Rating,
                        ai_feedback::Column::Comment,
                        ai_feedback::Column::CreatedAt,
                    ])
                    .to_owned(),
            )
            .exec_without_returning(&self.conn)
            .await
            .map_err(store_err)?;
        Ok(())
    }

    async fn create_generation(&self, job: &GenerationJob) -> Result<(), StoreError> {
        let row = generation_jobs::Model {
            id: job.id.0,
            user_id: job.user_id.0,
            kind: job.kind.clone(),
            prompt: job.prompt.clone(),
            n: job.n,
            provider: job.provider.clone(),
            status: job.status.clone(),
            results: job.results.clone(),
            error_code: job.error_code.clone(),
            created_at: job.created_at,
            updated_at: job.updated_at,
        };
        generation_jobs::Entity::insert(values::<_, generation_jobs::ActiveModel>(row))
            .exec_without_returning(&self.conn)
            .await
            .map_err(store_err)?;
        Ok(())
    }

    async fn generation(&self, id: GenerationId) -> Result<Option<GenerationJob>, StoreError> {
        let found = read!(self, |c| generation_jobs::Entity::find_by_id(id.0)
            .one(c)
            .await);
        Ok(found.map_err(store_err)?.map(generation))
    }

    async fn update_generation(&self, job: &GenerationJob) -> Result<(), StoreError> {
        let updated = generation_jobs::Entity::update_many()
            .col_expr(
                generation_jobs::Column::Status,
                Expr::value(job.status.clone()),
            )
            .col_expr(
                generation_jobs::Column::Results,
                Expr::value(job.results.clone()),
            )
            .col_expr(
                generation_jobs::Column::Provider,
                Expr::value(job.provider.clone()),
            )
            .col_expr(
                generation_jobs::Column::ErrorCode,
                Expr::value(job.error_code.clone()),
            )
            .col_expr(
                generation_jobs::Column::UpdatedAt,
                Expr::value(job.updated_at),
            )
            .filter(generation_jobs::Column::Id.eq(job.id.0))
            .exec(&self.conn)
            .await
            .map_err(store_err)?;
        if updated.rows_affected == 0 {
            return Err(StoreError::NotFound(format!("generation {}", job.id)));
        }
        Ok(())
    }

    async fn purge_ai_history(&self, before: Timestamp) -> Result<(u64, u64), StoreError> {
        let sessions = ai_sessions::Entity::delete_many()
            .filter(ai_sessions::Column::UpdatedAt.lt(before))
            .exec(&self.conn)
            .await
            .map_err(store_err)?;
        let jobs = generation_jobs::Entity::delete_many()
            .filter(generation_jobs::Column::UpdatedAt.lt(before))
            .exec(&self.conn)
            .await
            .map_err(store_err)?;
        Ok((sessions.rows_affected, jobs.rows_affected))
    }
}
