//! `DbBroker`: the embedded `Broker`, a durable queue in the database (SQLite or PostgreSQL).
//!
//! A message is a row of `queue_messages`. Receiving claims rows with one
//! `UPDATE … RETURNING` that sets a lease (`lock_token`, `locked_until`); on PostgreSQL the
//! candidate rows are locked `FOR UPDATE SKIP LOCKED` so competing consumers never wait on or
//! take each other's rows, and SQLite serializes writers anyway. Ack deletes the row, nack
//! schedules it again or marks it dead; both only for the current lease holder. A consumer
//! that dies leaves its lease to run out, and the row is claimed again (at-least-once).
//!
//! Publishes in this process wake waiting receivers at once; other processes' publishes are
//! picked up by polling.
//!
//! When the queue lives in the store's own database ([`DbBroker::take_outbox_of`]), the
//! store writes outbox entries straight into `queue_messages` in the caller's transaction
//! ([`QueueLink`]): the relay then has nothing to move. On SQLite the queue's claims and
//! settlements are then made by the store's writer thread (`on_writer`).

mod on_writer;

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use chrono::TimeDelta;
use confab_core::domain::{EventId, Timestamp, now};
use confab_core::ports::broker::{
    Broker, BrokerError, DeadLetter, Delivery, Envelope, QueueDepth, RetryPolicy,
};
use confab_core::ports::health::{ComponentHealth, HealthCheck};
use confab_core::ports::store::StoreError;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, QueryResult, Statement, Value};
use tokio::sync::Notify;
use uuid::Uuid;

use crate::sql_store::sqlite_writer::SqliteWriter;
use crate::sql_store::{SqlStore, database_health, store_err};

/// How often a receiver looks for messages published by other processes.
const POLL: Duration = Duration::from_millis(100);

pub struct DbBroker {
    db: DatabaseConnection,
    retry: RetryPolicy,
    visibility_timeout: Duration,
    published: Arc<Wakes>,
    /// SQLite, the queue in the store's database: the store's writer thread, which makes the
    /// claims, acks and nacks. Made on a pooled connection, each was a write transaction
    /// beside the writer's (the message commits waited for its lock) and a hand-off to
    /// sqlx's worker thread per statement.
    writer: OnceLock<Arc<SqliteWriter>>,
}

/// One wake-up per queue: a publish wakes only the receivers of its own queue (a commit per
/// chat message must not wake the idle mail and AI consumers, whose receives are writes).
#[derive(Default)]
struct Wakes(std::sync::Mutex<HashMap<String, Arc<Notify>>>);

impl Wakes {
    fn of(&self, queue: &str) -> Arc<Notify> {
        let mut wakes = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(wake) = wakes.get(queue) {
            return wake.clone();
        }
        wakes.entry(queue.to_owned()).or_default().clone()
    }

    fn wake(&self, queue: &str) {
        let wake = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(queue)
            .cloned();
        // No entry: nobody has waited on this queue yet.
        if let Some(wake) = wake {
            wake.notify_waiters();
        }
    }
}

fn broker_err(error: sea_orm::DbErr) -> BrokerError {
    from_store(store_err(error))
}

fn from_store(error: StoreError) -> BrokerError {
    match error {
        StoreError::Unavailable(e) => BrokerError::Unavailable(e),
        other => BrokerError::Other(Box::new(other)),
    }
}

fn span(d: Duration) -> TimeDelta {
    TimeDelta::from_std(d).unwrap_or(TimeDelta::MAX)
}

impl DbBroker {
    pub fn new(db: DatabaseConnection, retry: RetryPolicy, visibility_timeout: Duration) -> Self {
        Self {
            db,
            retry,
            visibility_timeout,
            published: Arc::default(),
            writer: OnceLock::new(),
        }
    }

    /// `sql` with `$1`… placeholders, in this backend's dialect.
    fn statement(&self, sql: &str, values: Vec<Value>) -> Statement {
        statement(self.db.get_database_backend(), sql, values)
    }

    /// From now on, the store writes its outbox entries straight into this queue (they are
    /// one database) and wakes this broker's receivers when they are committed.
    pub fn take_outbox_of(&self, store: &SqlStore) {
        store.queue_link().attach(self.published.clone());
        if let Some(writer) = store.sqlite_writer() {
            let _ = self.writer.set(writer);
        }
    }

    async fn execute(&self, sql: &str, values: Vec<Value>) -> Result<u64, BrokerError> {
        let result = self
            .db
            .execute_raw(self.statement(sql, values))
            .await
            .map_err(broker_err)?;
        Ok(result.rows_affected())
    }

    /// Deletes the rows of `receipts` on a pooled connection; whether a lease was lost.
    async fn ack_pooled(&self, receipts: Vec<(Uuid, Uuid)>) -> Result<bool, BrokerError> {
        let mut by_token: HashMap<Uuid, Vec<Uuid>> = HashMap::new();
        for (id, token) in receipts {
            by_token.entry(token).or_default().push(id);
        }
        let sql = ack_all_statement();
        let mut lost = false;
        for (token, mut ids) in by_token {
            ids.sort_unstable();
            ids.dedup();
            for chunk in ids.chunks(ACK_CHUNK) {
                let mut values = Vec::with_capacity(ACK_CHUNK + 1);
                values.push(token.into());
                values.extend(chunk.iter().map(|id| Value::from(*id)));
                values.extend((chunk.len()..ACK_CHUNK).map(|_| Value::from(chunk[0])));
                let deleted = self.execute(sql, values).await?;
                lost |= deleted < chunk.len() as u64;
            }
        }
        Ok(lost)
    }

    async fn claim(&self, queue: &str, max: u32) -> Result<Vec<Delivery>, BrokerError> {
        let backend = self.db.get_database_backend();
        let sql = claim_statement(backend);
        let lease = span(self.visibility_timeout);
        let max = max.max(1);
        let mut claimed = if let Some(writer) = self.writer.get() {
            let queue = queue.to_owned();
            writer
                .run(move |conn| on_writer::claim(conn, &sql, &queue, lease, max))
                .await
                .map_err(from_store)??
        } else {
            let at = now();
            let token = Uuid::now_v7();
            let values = vec![
                (at + lease).into(),
                token.into(),
                queue.into(),
                at.into(),
                i64::from(max).into(),
            ];
            let rows = self
                .db
                .query_all_raw(statement(backend, &sql, values))
                .await
                .map_err(broker_err)?;
            rows.iter()
                .map(|row| delivery(queue, token, row))
                .collect::<Result<Vec<_>, _>>()?
        };
        // RETURNING does not promise the subquery's order.
        claimed.sort_by_key(|(order, _)| *order);
        Ok(claimed.into_iter().map(|(_, d)| d).collect())
    }
}

/// Claims up to `$5` messages of queue `$3` available at `$4`, leasing them to `$2` until
/// `$1`. (A bound `LIMIT` is prepared once on SQLite too: every connection there plans
/// without the values bound, `sql_store::stable_plans`.)
fn claim_statement(backend: DbBackend) -> String {
    let skip_locked = if backend == DbBackend::Postgres {
        "FOR UPDATE SKIP LOCKED"
    } else {
        ""
    };
    format!(
        "UPDATE queue_messages SET attempt = attempt + 1, locked_until = $1, lock_token = $2 \
         WHERE id IN (SELECT id FROM queue_messages WHERE queue = $3 AND dead_at IS NULL \
         AND available_at <= $4 AND (locked_until IS NULL OR locked_until <= $4) \
         ORDER BY available_at, id LIMIT $5 {skip_locked}) \
         RETURNING {CLAIMED_COLUMNS}"
    )
}

/// The columns a claim returns, in this order.
const CLAIMED_COLUMNS: &str =
    "id, envelope_id, kind, payload, trace_id, created_at, attempt, available_at";

/// Settles one delivery: `$1` the row, `$2` the lease token.
const ACK: &str = "DELETE FROM queue_messages WHERE id = $1 AND lock_token = $2";

/// A nack past the last attempt: `$1` now, `$2` the error, `$3` the row, `$4` the lease.
const NACK_DEAD: &str = "UPDATE queue_messages SET dead_at = $1, last_error = $2, locked_until = NULL, lock_token = NULL \
     WHERE id = $3 AND lock_token = $4";

/// A nack to retry: `$1` when, `$2` the error, `$3` the row, `$4` the lease.
const NACK_RETRY: &str = "UPDATE queue_messages SET available_at = $1, last_error = $2, locked_until = NULL, lock_token = NULL \
     WHERE id = $3 AND lock_token = $4";

/// How many deliveries one `ack_all` statement settles.
const ACK_CHUNK: usize = 64;

/// `DELETE … WHERE lock_token = $1 AND id IN ($2 … $65)`, built once.
fn ack_all_statement() -> &'static str {
    static SQL: OnceLock<String> = OnceLock::new();
    SQL.get_or_init(|| {
        let ids: Vec<String> = (2..ACK_CHUNK + 2).map(|n| format!("${n}")).collect();
        format!(
            "DELETE FROM queue_messages WHERE lock_token = $1 AND id IN ({})",
            ids.join(", ")
        )
    })
}

/// `sql` with `$1`… placeholders, in `backend`'s dialect.
fn statement(backend: DbBackend, sql: &str, values: Vec<Value>) -> Statement {
    let sql = if backend == DbBackend::Sqlite {
        numbered(sql)
    } else {
        sql.to_owned()
    };
    Statement::from_sql_and_values(backend, sql, values)
}

/// `$1`… placeholders as SQLite's numbered `?1`….
fn numbered(sql: &str) -> String {
    sql.replace('$', "?")
}

/// The columns a published message is inserted with (`attempt` is 0).
pub(crate) const INSERT_COLUMNS: &str =
    "id, queue, envelope_id, kind, payload, trace_id, created_at, attempt, available_at";

/// Inserts one `queue_messages` row per `(queue, envelope)`, available now; an envelope
/// already on its queue is skipped (a republish is a no-op).
pub(crate) fn insert_envelopes<'a>(
    backend: DbBackend,
    envelopes: impl ExactSizeIterator<Item = (&'a str, &'a Envelope)>,
) -> Statement {
    let at = now();
    let mut rows = Vec::with_capacity(envelopes.len());
    let mut values = Vec::with_capacity(envelopes.len() * 8);
    for (i, (queue, e)) in envelopes.enumerate() {
        let p = i * 8;
        rows.push(format!(
            "(${}, ${}, ${}, ${}, ${}, ${}, ${}, 0, ${})",
            p + 1,
            p + 2,
            p + 3,
            p + 4,
            p + 5,
            p + 6,
            p + 7,
            p + 8
        ));
        values.extend([
            Uuid::now_v7().into(),
            queue.into(),
            e.id.0.into(),
            e.kind.clone().into(),
            e.payload.clone().into(),
            e.trace_id.clone().into(),
            e.created_at.into(),
            at.into(),
        ]);
    }
    let sql = format!(
        "INSERT INTO queue_messages ({INSERT_COLUMNS}) VALUES {} \
         ON CONFLICT (queue, envelope_id) DO NOTHING",
        rows.join(", ")
    );
    statement(backend, &sql, values)
}

/// The store's side of the database queue when the two share a database (SPEC §6: the
/// change and the intent to publish commit together). Then the outbox IS the queue: the store
/// writes each entry straight into `queue_messages` inside the caller's transaction, and,
/// once committed, wakes the queue's receivers. No relay hop (read the outbox, insert,
/// mark published, purge) stands between a commit and its consumer.
#[derive(Default)]
pub struct QueueLink {
    published: OnceLock<Arc<Wakes>>,
}

impl QueueLink {
    /// Whether outbox entries go straight into the queue.
    pub(crate) fn direct(&self) -> bool {
        self.published.get().is_some()
    }

    fn attach(&self, published: Arc<Wakes>) {
        // A second broker on the same store keeps the first one's wake-up: both read the
        // same table, and receivers poll as well.
        let _ = self.published.set(published);
    }

    /// After a commit that wrote an entry to each of `queues` (a queue once per entry):
    /// counted as published, and each queue's receivers in this process woken once.
    pub(crate) fn committed<'a>(&self, queues: impl IntoIterator<Item = &'a str>) {
        let mut counts: Vec<(&str, u64)> = Vec::new();
        for queue in queues {
            match counts.iter_mut().find(|(q, _)| *q == queue) {
                Some((_, n)) => *n += 1,
                None => counts.push((queue, 1)),
            }
        }
        for (queue, n) in counts {
            metrics::counter!("queue_published_total", "queue" => queue.to_owned()).increment(n);
            if let Some(published) = self.published.get() {
                published.wake(queue);
            }
        }
    }
}

/// A claimed delivery, with what orders it among those of its claim (`available_at`, id).
type Claimed = ((Timestamp, Uuid), Delivery);

fn delivery(queue: &str, token: Uuid, row: &QueryResult) -> Result<Claimed, BrokerError> {
    let get = |e: sea_orm::DbErr| BrokerError::Other(Box::new(e));
    let id: Uuid = row.try_get("", "id").map_err(get)?;
    let attempt: i32 = row.try_get("", "attempt").map_err(get)?;
    let available_at: Timestamp = row.try_get("", "available_at").map_err(get)?;
    let envelope = Envelope {
        id: EventId(row.try_get("", "envelope_id").map_err(get)?),
        kind: row.try_get("", "kind").map_err(get)?,
        attempt: u32::try_from(attempt).unwrap_or(0),
        created_at: row.try_get("", "created_at").map_err(get)?,
        trace_id: row.try_get("", "trace_id").map_err(get)?,
        payload: row.try_get("", "payload").map_err(get)?,
    };
    Ok(claimed(queue, token, id, available_at, envelope))
}

/// Row `id` of `queue`, leased to `token`, as a delivery (its receipt names both, as
/// [`receipt`] reads them) with what orders it in its claim.
fn claimed(
    queue: &str,
    token: Uuid,
    id: Uuid,
    available_at: Timestamp,
    envelope: Envelope,
) -> Claimed {
    (
        (available_at, id),
        Delivery {
            queue: queue.to_owned(),
            envelope,
            receipt: format!("{id}/{token}"),
        },
    )
}

/// The row id and lease token a receipt names.
fn receipt(delivery: &Delivery) -> Result<(Uuid, Uuid), BrokerError> {
    let parse = || -> Option<(Uuid, Uuid)> {
        let (id, token) = delivery.receipt.split_once('/')?;
        Some((Uuid::parse_str(id).ok()?, Uuid::parse_str(token).ok()?))
    };
    parse().ok_or_else(|| {
        BrokerError::Other(format!("not a receipt of this broker: {:?}", delivery.receipt).into())
    })
}

#[async_trait]
impl HealthCheck for DbBroker {
    async fn health(&self) -> ComponentHealth {
        database_health(&self.db).await
    }
}

#[async_trait]
impl Broker for DbBroker {
    async fn publish(&self, queue: &str, e: &Envelope) -> Result<(), BrokerError> {
        self.publish_all(queue, std::slice::from_ref(e)).await
    }

    async fn publish_all(&self, queue: &str, envelopes: &[Envelope]) -> Result<(), BrokerError> {
        // One statement per chunk (far below both backends' parameter limits). A message
        // already on this queue is skipped: a republish (an outbox relay retrying) is a no-op.
        let backend = self.db.get_database_backend();
        for chunk in envelopes.chunks(500) {
            let rows = chunk.iter().map(|e| (queue, e));
            self.db
                .execute_raw(insert_envelopes(backend, rows))
                .await
                .map_err(broker_err)?;
        }
        if !envelopes.is_empty() {
            self.published.wake(queue);
        }
        Ok(())
    }

    async fn receive(
        &self,
        queue: &str,
        max: u32,
        wait: Duration,
    ) -> Result<Vec<Delivery>, BrokerError> {
        let deadline = tokio::time::Instant::now() + wait;
        let wake = self.published.of(queue);
        loop {
            // Register for the wake-up before looking, so a publish in between is not missed.
            let published = wake.notified();
            let claimed = self.claim(queue, max).await?;
            let now = tokio::time::Instant::now();
            if !claimed.is_empty() || now >= deadline {
                return Ok(claimed);
            }
            let nap = POLL.min(deadline - now);
            let _ = tokio::time::timeout(nap, published).await;
        }
    }

    async fn ack(&self, d: &Delivery) -> Result<(), BrokerError> {
        self.ack_all(std::slice::from_ref(d)).await
    }

    /// On the writer thread: one statement per delivery, all in one transaction. Else one
    /// statement per lease token (one per receive) and `ACK_CHUNK` deliveries, always of
    /// the same text (the list is padded with its first id): prepared once and cached, where a
    /// statement shaped by the batch's size was parsed and planned again on every call.
    async fn ack_all(&self, deliveries: &[Delivery]) -> Result<(), BrokerError> {
        let receipts = deliveries
            .iter()
            .map(receipt)
            .collect::<Result<Vec<_>, _>>()?;
        let lost = if let Some(writer) = self.writer.get() {
            writer
                .run(move |conn| on_writer::ack_all(conn, &receipts))
                .await
                .map_err(from_store)??
        } else {
            self.ack_pooled(receipts).await?
        };
        if lost {
            Err(BrokerError::LeaseLost)
        } else {
            Ok(())
        }
    }

    async fn nack(&self, d: &Delivery, error: &str) -> Result<(), BrokerError> {
        let (id, token) = receipt(d)?;
        let at = now();
        let (sql, when) = if d.envelope.attempt >= self.retry.max_attempts {
            (NACK_DEAD, at)
        } else {
            (
                NACK_RETRY,
                at + span(self.retry.delay_after(d.envelope.attempt)),
            )
        };
        let settled = if let Some(writer) = self.writer.get() {
            let error = error.to_owned();
            writer
                .run(move |conn| on_writer::nack(conn, sql, when, &error, id, token))
                .await
                .map_err(from_store)??
        } else {
            self.execute(
                sql,
                vec![when.into(), error.into(), id.into(), token.into()],
            )
            .await?
        };
        if settled == 0 {
            return Err(BrokerError::LeaseLost);
        }
        Ok(())
    }

    async fn depth(&self, queue: &str) -> Result<QueueDepth, BrokerError> {
        let row = self
            .db
            .query_one_raw(self.statement(
                "SELECT \
                 COALESCE(SUM(CASE WHEN dead_at IS NULL THEN 1 ELSE 0 END), 0) AS pending, \
                 COALESCE(SUM(CASE WHEN dead_at IS NULL THEN 0 ELSE 1 END), 0) AS dead \
                 FROM queue_messages WHERE queue = $1",
                vec![queue.into()],
            ))
            .await
            .map_err(broker_err)?;
        let count = |column: &str| -> Result<u64, BrokerError> {
            let n: i64 = row
                .as_ref()
                .map(|r| r.try_get("", column))
                .transpose()
                .map_err(|e| BrokerError::Other(Box::new(e)))?
                .unwrap_or(0);
            Ok(u64::try_from(n).unwrap_or(0))
        };
        Ok(QueueDepth {
            pending: count("pending")?,
            dead: count("dead")?,
        })
    }

    async fn dead_letters(&self, queue: &str, limit: u32) -> Result<Vec<DeadLetter>, BrokerError> {
        let rows = self
            .db
            .query_all_raw(self.statement(
                "SELECT id, envelope_id, kind, payload, trace_id, created_at, attempt, available_at, dead_at, last_error \
                 FROM queue_messages WHERE queue = $1 AND dead_at IS NOT NULL ORDER BY dead_at, id LIMIT $2",
                vec![queue.into(), i64::from(limit.clamp(1, 1000)).into()],
            ))
            .await
            .map_err(broker_err)?;
        rows.iter()
            .map(|row| {
                let (_, d) = delivery(queue, Uuid::nil(), row)?;
                let get = |e: sea_orm::DbErr| BrokerError::Other(Box::new(e));
                Ok(DeadLetter {
                    envelope: d.envelope,
                    last_error: row
                        .try_get::<Option<String>>("", "last_error")
                        .map_err(get)?
                        .unwrap_or_default(),
                    failed_at: row.try_get("", "dead_at").map_err(get)?,
                })
            })
            .collect()
    }

    async fn replay_dead_letters(&self, queue: &str) -> Result<u64, BrokerError> {
        let replayed = self
            .execute(
                "UPDATE queue_messages SET dead_at = NULL, attempt = 0, available_at = $1, last_error = NULL \
                 WHERE queue = $2 AND dead_at IS NOT NULL",
                vec![now().into(), queue.into()],
            )
            .await?;
        if replayed > 0 {
            self.published.wake(queue);
        }
        Ok(replayed)
    }
}
