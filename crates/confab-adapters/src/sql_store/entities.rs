//! Table rows as sea-orm entities. Only `sql_store` sees these; the port speaks domain types.
// sea-orm's macros generate helpers (typed columns, loaders) this crate does not use.
#![allow(dead_code, clippy::struct_field_names)]

macro_rules! entity {
    ($module:ident, $table:literal, { $($body:tt)* }) => {
        pub mod $module {
            use sea_orm::entity::prelude::*;

            #[sea_orm::model]
            #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
            #[sea_orm(table_name = $table)]
            pub struct Model {
                $($body)*
            }

            impl ActiveModelBehavior for ActiveModel {}
        }
    };
}

entity!(users, "users", {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub email: String,
    pub name: String,
    pub password_hash: Option<String>,
    pub email_verified_at: Option<DateTimeUtc>,
    pub avatar_key: Option<String>,
    pub failed_logins: i32,
    pub locked_until: Option<DateTimeUtc>,
    pub last_seen_at: Option<DateTimeUtc>,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
    /// When the current window of failed sign-ins opened (migration m0003).
    pub failed_login_window_start: Option<DateTimeUtc>,
});

entity!(chats, "chats", {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub kind: String,
    pub name: Option<String>,
    pub direct_key: Option<String>,
    pub created_by: Option<Uuid>,
    pub created_at: DateTimeUtc,
    pub last_message_id: Option<Uuid>,
    pub last_message_at: Option<DateTimeUtc>,
    pub activity_at: DateTimeUtc,
});

entity!(chat_members, "chat_members", {
    #[sea_orm(primary_key, auto_increment = false)]
    pub chat_id: Uuid,
    #[sea_orm(primary_key, auto_increment = false)]
    pub user_id: Uuid,
    pub role: String,
    pub joined_at: DateTimeUtc,
    pub last_read_message_id: Option<Uuid>,
    pub last_read_at: Option<DateTimeUtc>,
});

entity!(messages, "messages", {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub chat_id: Uuid,
    pub sender_id: Option<Uuid>,
    pub kind: String,
    pub text: Option<String>,
    pub client_id: Option<String>,
    pub image: Option<Json>,
    pub created_at: DateTimeUtc,
    pub edited_at: Option<DateTimeUtc>,
    pub deleted_at: Option<DateTimeUtc>,
});

entity!(outbox, "outbox", {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub queue: String,
    pub kind: String,
    pub payload: Json,
    pub trace_id: Option<String>,
    pub created_at: DateTimeUtc,
    pub published_at: Option<DateTimeUtc>,
});

entity!(processed_events, "processed_events", {
    #[sea_orm(primary_key, auto_increment = false)]
    pub consumer: String,
    #[sea_orm(primary_key, auto_increment = false)]
    pub event_id: Uuid,
    pub processed_at: DateTimeUtc,
});

entity!(security_events, "security_events", {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub user_id: Option<Uuid>,
    pub kind: String,
    pub ip: Option<String>,
    pub user_agent: Option<String>,
    pub details: Json,
    pub created_at: DateTimeUtc,
});

entity!(service_errors, "service_errors", {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub code: String,
    pub service: String,
    pub message: String,
    pub context: Json,
    pub request_id: Option<String>,
    pub created_at: DateTimeUtc,
});

entity!(refresh_families, "refresh_families", {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub user_id: Uuid,
    pub created_at: DateTimeUtc,
    pub expires_at: DateTimeUtc,
    pub revoked_at: Option<DateTimeUtc>,
    pub revoked_reason: Option<String>,
});

entity!(refresh_tokens, "refresh_tokens", {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub family_id: Uuid,
    pub token_hash: String,
    pub created_at: DateTimeUtc,
    pub expires_at: DateTimeUtc,
    pub rotated_at: Option<DateTimeUtc>,
    pub replaced_by: Option<Uuid>,
});

entity!(one_time_tokens, "one_time_tokens", {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub user_id: Option<Uuid>,
    pub email: String,
    pub purpose: String,
    pub token_hash: String,
    pub attempts: i32,
    pub created_at: DateTimeUtc,
    pub expires_at: DateTimeUtc,
    pub used_at: Option<DateTimeUtc>,
});

entity!(ai_sessions, "ai_sessions", {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub user_id: Uuid,
    pub title: String,
    pub status: String,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
});

entity!(ai_messages, "ai_messages", {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub session_id: Uuid,
    pub request_id: Uuid,
    pub role: String,
    pub content: String,
    pub status: String,
    pub model: Option<String>,
    pub provider: Option<String>,
    pub cached: bool,
    pub latency_ms: Option<i64>,
    pub prompt_tokens: Option<i64>,
    pub completion_tokens: Option<i64>,
    pub error_code: Option<String>,
    pub created_at: DateTimeUtc,
});

entity!(ai_feedback, "ai_feedback", {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub message_id: Uuid,
    pub user_id: Uuid,
    pub rating: String,
    pub comment: Option<String>,
    pub created_at: DateTimeUtc,
});

entity!(generation_jobs, "generation_jobs", {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub user_id: Uuid,
    pub kind: String,
    pub prompt: String,
    pub n: i32,
    pub provider: Option<String>,
    pub status: String,
    pub results: Option<Json>,
    pub error_code: Option<String>,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
});
