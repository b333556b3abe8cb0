//! The schema, as migrations that run unchanged on SQLite and PostgreSQL (SPEC §5).
//!
//! Append new migrations; never edit one that has shipped. The version table is sea-orm's
//! `seaql_migrations`.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{
    big_integer_null, boolean, integer, json_binary, json_binary_null, pk_uuid, string,
    string_null, text, text_null, timestamp_with_time_zone as at,
    timestamp_with_time_zone_null as at_null, uuid, uuid_null,
};

pub struct Migrator;

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(Initial),
            Box::new(Queue),
            Box::new(LoginWindow),
            Box::new(SparseClientIds),
        ]
    }
}

/// The names of every migration this binary knows, oldest first.
pub fn known() -> Vec<String> {
    Migrator::migrations()
        .iter()
        .map(|m| m.name().to_owned())
        .collect()
}

struct Initial;

impl MigrationName for Initial {
    fn name(&self) -> &'static str {
        "m0001_initial"
    }
}

fn fk(
    from: (&'static str, &'static str),
    to: &'static str,
    on_delete: ForeignKeyAction,
) -> ForeignKeyCreateStatement {
    ForeignKey::create()
        .name(format!("fk_{}_{}", from.0, from.1))
        .from(from.0, from.1)
        .to(to, "id")
        .on_delete(on_delete)
        .to_owned()
}

fn index(table: &'static str, columns: &[&'static str], unique: bool) -> IndexCreateStatement {
    let mut index = Index::create();
    index
        .name(format!(
            "{}_{}_{}",
            if unique { "uq" } else { "ix" },
            table,
            columns.join("_")
        ))
        .table(table);
    for column in columns {
        index.col(*column);
    }
    if unique {
        index.unique();
    }
    index
}

#[async_trait::async_trait]
impl MigrationTrait for Initial {
    #[allow(clippy::too_many_lines)] // One table after another; splitting would only scatter them.
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        use ForeignKeyAction::{Cascade, SetNull};

        m.create_table(
            Table::create()
                .table("users")
                .col(pk_uuid("id"))
                .col(string("email").unique_key())
                .col(string("name"))
                .col(text_null("password_hash"))
                .col(at_null("email_verified_at"))
                .col(string_null("avatar_key"))
                .col(integer("failed_logins").default(0))
                .col(at_null("locked_until"))
                .col(at_null("last_seen_at"))
                .col(at("created_at"))
                .col(at("updated_at"))
                .to_owned(),
        )
        .await?;

        // Refresh tokens live in families: every token descended from one sign-in.
        m.create_table(
            Table::create()
                .table("refresh_families")
                .col(pk_uuid("id"))
                .col(uuid("user_id"))
                .col(at("created_at"))
                .col(at("expires_at"))
                .col(at_null("revoked_at"))
                .col(string_null("revoked_reason"))
                .foreign_key(&mut fk(("refresh_families", "user_id"), "users", Cascade))
                .to_owned(),
        )
        .await?;
        m.create_index(index("refresh_families", &["user_id"], false))
            .await?;
        m.create_index(index("refresh_families", &["expires_at"], false))
            .await?;
        m.create_table(
            Table::create()
                .table("refresh_tokens")
                .col(pk_uuid("id"))
                .col(uuid("family_id"))
                .col(string("token_hash").unique_key())
                .col(at("created_at"))
                .col(at("expires_at"))
                .col(at_null("rotated_at"))
                .col(uuid_null("replaced_by"))
                .foreign_key(&mut fk(
                    ("refresh_tokens", "family_id"),
                    "refresh_families",
                    Cascade,
                ))
                .to_owned(),
        )
        .await?;
        m.create_index(index("refresh_tokens", &["family_id"], false))
            .await?;

        // Email verification, password reset and one-time codes: hashed, expiring, single use.
        m.create_table(
            Table::create()
                .table("one_time_tokens")
                .col(pk_uuid("id"))
                .col(uuid_null("user_id"))
                .col(string("email"))
                .col(string("purpose"))
                .col(string("token_hash"))
                .col(integer("attempts").default(0))
                .col(at("created_at"))
                .col(at("expires_at"))
                .col(at_null("used_at"))
                .foreign_key(&mut fk(("one_time_tokens", "user_id"), "users", Cascade))
                .to_owned(),
        )
        .await?;
        m.create_index(index("one_time_tokens", &["purpose", "token_hash"], true))
            .await?;
        m.create_index(index("one_time_tokens", &["email", "purpose"], false))
            .await?;
        m.create_index(index("one_time_tokens", &["expires_at"], false))
            .await?;

        m.create_table(
            Table::create()
                .table("chats")
                .col(pk_uuid("id"))
                .col(string("kind"))
                .col(string_null("name"))
                .col(string_null("direct_key").unique_key())
                .col(uuid_null("created_by"))
                .col(at("created_at"))
                .col(uuid_null("last_message_id"))
                .col(at_null("last_message_at"))
                .col(at("activity_at"))
                .foreign_key(&mut fk(("chats", "created_by"), "users", SetNull))
                .to_owned(),
        )
        .await?;
        m.create_table(
            Table::create()
                .table("chat_members")
                .col(uuid("chat_id"))
                .col(uuid("user_id"))
                .col(string("role"))
                .col(at("joined_at"))
                .col(uuid_null("last_read_message_id"))
                .col(at_null("last_read_at"))
                .primary_key(Index::create().col("chat_id").col("user_id"))
                .foreign_key(&mut fk(("chat_members", "chat_id"), "chats", Cascade))
                .foreign_key(&mut fk(("chat_members", "user_id"), "users", Cascade))
                .to_owned(),
        )
        .await?;
        m.create_index(index("chat_members", &["user_id"], false))
            .await?;

        m.create_table(
            Table::create()
                .table("messages")
                .col(pk_uuid("id"))
                .col(uuid("chat_id"))
                .col(uuid_null("sender_id"))
                .col(string("kind"))
                .col(text_null("text"))
                .col(string_null("client_id"))
                .col(json_binary_null("image"))
                .col(at("created_at"))
                .col(at_null("edited_at"))
                .col(at_null("deleted_at"))
                .foreign_key(&mut fk(("messages", "chat_id"), "chats", Cascade))
                .foreign_key(&mut fk(("messages", "sender_id"), "users", SetNull))
                .to_owned(),
        )
        .await?;
        // Pages of a chat by id, and a sender's client ids are unique.
        m.create_index(index("messages", &["chat_id", "id"], false))
            .await?;
        m.create_index(index("messages", &["sender_id", "client_id"], true))
            .await?;

        m.create_table(
            Table::create()
                .table("ai_sessions")
                .col(pk_uuid("id"))
                .col(uuid("user_id"))
                .col(string("title"))
                .col(string("status"))
                .col(at("created_at"))
                .col(at("updated_at"))
                .foreign_key(&mut fk(("ai_sessions", "user_id"), "users", Cascade))
                .to_owned(),
        )
        .await?;
        m.create_index(index("ai_sessions", &["user_id", "id"], false))
            .await?;
        m.create_index(index("ai_sessions", &["updated_at"], false))
            .await?;
        m.create_table(
            Table::create()
                .table("ai_messages")
                .col(pk_uuid("id"))
                .col(uuid("session_id"))
                .col(uuid("request_id"))
                .col(string("role"))
                .col(text("content"))
                .col(string("status"))
                .col(string_null("model"))
                .col(string_null("provider"))
                .col(boolean("cached").default(false))
                .col(big_integer_null("latency_ms"))
                .col(big_integer_null("prompt_tokens"))
                .col(big_integer_null("completion_tokens"))
                .col(string_null("error_code"))
                .col(at("created_at"))
                .foreign_key(&mut fk(
                    ("ai_messages", "session_id"),
                    "ai_sessions",
                    Cascade,
                ))
                .to_owned(),
        )
        .await?;
        m.create_index(index("ai_messages", &["session_id", "id"], false))
            .await?;
        // One answer per request: a redelivered AI answer is not stored twice.
        m.create_index(index("ai_messages", &["request_id", "role"], true))
            .await?;
        m.create_table(
            Table::create()
                .table("ai_feedback")
                .col(pk_uuid("id"))
                .col(uuid("message_id"))
                .col(uuid("user_id"))
                .col(string("rating"))
                .col(text_null("comment"))
                .col(at("created_at"))
                .foreign_key(&mut fk(
                    ("ai_feedback", "message_id"),
                    "ai_messages",
                    Cascade,
                ))
                .foreign_key(&mut fk(("ai_feedback", "user_id"), "users", Cascade))
                .to_owned(),
        )
        .await?;
        m.create_index(index("ai_feedback", &["message_id", "user_id"], true))
            .await?;
        m.create_table(
            Table::create()
                .table("generation_jobs")
                .col(pk_uuid("id"))
                .col(uuid("user_id"))
                .col(string("kind"))
                .col(text("prompt"))
                .col(integer("n").default(1))
                .col(string_null("provider"))
                .col(string("status"))
                .col(json_binary_null("results"))
                .col(string_null("error_code"))
                .col(at("created_at"))
                .col(at("updated_at"))
                .foreign_key(&mut fk(("generation_jobs", "user_id"), "users", Cascade))
                .to_owned(),
        )
        .await?;
        m.create_index(index("generation_jobs", &["user_id", "id"], false))
            .await?;
        m.create_index(index("generation_jobs", &["updated_at"], false))
            .await?;

        m.create_table(
            Table::create()
                .table("service_errors")
                .col(pk_uuid("id"))
                .col(string("code"))
                .col(string("service"))
                .col(text("message"))
                .col(json_binary("context"))
                .col(string_null("request_id"))
                .col(at("created_at"))
                .to_owned(),
        )
        .await?;
        m.create_index(index("service_errors", &["created_at"], false))
            .await?;
        m.create_table(
            Table::create()
                .table("security_events")
                .col(pk_uuid("id"))
                .col(uuid_null("user_id"))
                .col(string("kind"))
                .col(string_null("ip"))
                .col(string_null("user_agent"))
                .col(json_binary("details"))
                .col(at("created_at"))
                .foreign_key(&mut fk(("security_events", "user_id"), "users", Cascade))
                .to_owned(),
        )
        .await?;
        m.create_index(index("security_events", &["user_id", "id"], false))
            .await?;

        m.create_table(
            Table::create()
                .table("outbox")
                .col(pk_uuid("id"))
                .col(string("queue"))
                .col(string("kind"))
                .col(json_binary("payload"))
                .col(string_null("trace_id"))
                .col(at("created_at"))
                .col(at_null("published_at"))
                .to_owned(),
        )
        .await?;
        m.create_index(index("outbox", &["published_at", "id"], false))
            .await?;
        m.create_table(
            Table::create()
                .table("processed_events")
                .col(string("consumer"))
                .col(uuid("event_id"))
                .col(at("processed_at"))
                .primary_key(Index::create().col("consumer").col("event_id"))
                .to_owned(),
        )
        .await?;
        m.create_index(index("processed_events", &["processed_at"], false))
            .await?;
        Ok(())
    }
}

/// The durable queue kept in the database (the embedded `Broker`).
struct Queue;

impl MigrationName for Queue {
    fn name(&self) -> &'static str {
        "m0002_queue"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for Queue {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table("queue_messages")
                .col(pk_uuid("id"))
                .col(string("queue"))
                .col(uuid("envelope_id"))
                .col(string("kind"))
                .col(json_binary("payload"))
                .col(string_null("trace_id"))
                .col(at("created_at"))
                // Deliveries so far; the next delivery is attempt + 1.
                .col(integer("attempt").default(0))
                .col(at("available_at"))
                .col(at_null("locked_until"))
                .col(uuid_null("lock_token"))
                .col(at_null("dead_at"))
                .col(text_null("last_error"))
                .to_owned(),
        )
        .await?;
        // A message is on a queue once, however often it is published (relay retries).
        m.create_index(index("queue_messages", &["queue", "envelope_id"], true))
            .await?;
        m.create_index(index(
            "queue_messages",
            &["queue", "dead_at", "available_at"],
            false,
        ))
        .await?;
        Ok(())
    }
}

/// The window of failed sign-ins the lockout counts in (SPEC §3).
struct LoginWindow;

impl MigrationName for LoginWindow {
    fn name(&self) -> &'static str {
        "m0003_login_window"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for LoginWindow {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(
            Table::alter()
                .table("users")
                .add_column(at_null("failed_login_window_start"))
                .to_owned(),
        )
        .await
    }
}

/// Only messages with a client id are in the `(sender_id, client_id)` unique index. A message
/// without one (NULL never conflicts in a unique index) cost an index entry that no query and
/// no constraint could use: on SQLite's writer, a B-tree insert and usually one more WAL page
/// per message. Every lookup by client id compares it with a value (`=`, `IN`), which SQLite
/// and PostgreSQL both take to mean `client_id IS NOT NULL`, so they use the partial index;
/// an `ON CONFLICT` on these columns repeats the index's `WHERE` to name it.
struct SparseClientIds;

impl MigrationName for SparseClientIds {
    fn name(&self) -> &'static str {
        "m0004_sparse_client_ids"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for SparseClientIds {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_index(
            Index::drop()
                .name("uq_messages_sender_id_client_id")
                .table("messages")
                .to_owned(),
        )
        .await?;
        let mut sparse = index("messages", &["sender_id", "client_id"], true);
        sparse.and_where(Expr::col("client_id").is_not_null());
        m.create_index(sparse).await
    }
}
