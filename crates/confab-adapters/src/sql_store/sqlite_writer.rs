//! The group commit on SQLite, on a thread of its own; and the WAL checkpoints, on another.
//!
//! sqlx runs each statement on its connection's worker thread: a hand-off there and a
//! wake-up back per statement, and a batch of messages takes six or seven of them. Profiles
//! showed those hand-offs (futex wake-ups and thread switches), not SQLite, costing most of
//! a message's commit. Here one thread owns one SQLite connection to the same file and runs
//! a whole batch synchronously with prepared statements: one hand-off per batch each way.
//!
//! The batch runs in one `BEGIN IMMEDIATE` transaction: the write lock is taken before the
//! first read, so memberships and client ids read are still true at the commit (no race
//! with another writer, in this process or another one on the same file). The encodings are
//! sqlx's, which the rest of the store reads: UUIDs as 16-byte blobs, times as RFC 3339
//! text, JSON as text.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use std::sync::Arc;

use chrono::{DateTime, SecondsFormat, Utc};
use confab_core::domain::{ChatKind, Message, OutboxEntry, UserId, now};
use confab_core::ports::store::{Append, Appended, StoreError};
use confab_core::priority::Background;
use rusqlite::{
    CachedStatement, Connection, OpenFlags, OptionalExtension, Row, Transaction, params,
};
use tokio::sync::oneshot;
use uuid::Uuid;

use super::Synchronous;
use super::entities::messages;
use super::ops::{message_kind, to_message};
use crate::db_broker::{INSERT_COLUMNS, QueueLink};

type Reply = oneshot::Sender<Result<Vec<Appended>, StoreError>>;

/// The handle: sends batches to the writer thread, which ends when every handle is gone.
pub(super) struct SqliteWriter {
    jobs: mpsc::Sender<(Vec<Append>, Reply)>,
    _checkpoints: Checkpointer,
}

/// A second connection to the (already created and configured) database file.
fn connect(path: &Path, synchronous: Synchronous) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(unavailable)?;
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(unavailable)?;
    let synchronous = match synchronous {
        Synchronous::Normal => "NORMAL",
        Synchronous::Full => "FULL",
    };
    conn.execute_batch(&format!(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = {synchronous}; \
         PRAGMA foreign_keys = ON; PRAGMA wal_autocheckpoint = 0;"
    ))
    .map_err(unavailable)?;
    Ok(conn)
}

/// SQLite's busy handler for the writer: `true` = try again. Naps of 20 µs, then 200 µs, for
/// about 5 s in all (the store's busy timeout).
fn nap_while_busy(attempt: i32) -> bool {
    let nap = if attempt < 20 { 20 } else { 200 };
    std::thread::sleep(Duration::from_micros(nap));
    attempt < 25_000
}

/// SQLite's automatic checkpoint runs inside whichever commit crosses the WAL threshold and
/// puts milliseconds on that commit (and on every message waiting for it). Instead a thread
/// of its own checkpoints twice a second, PASSIVE: it copies what it can without waiting for
/// or blocking anyone, and the WAL is reused once a checkpoint has caught up. It runs at the
/// lowest normal priority (`SCHED_BATCH`, nice 19): copying a few thousand pages is
/// milliseconds of CPU, which on a busy core would otherwise preempt the thread delivering
/// messages. It stops when the store is dropped.
struct Checkpointer {
    _stop: mpsc::Sender<()>,
}

/// How often the WAL is checkpointed.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);

impl Checkpointer {
    fn start(conn: Connection) -> Result<Self, StoreError> {
        let (stop, stopped) = mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("confab-sqlite-checkpoint".into())
            .spawn(move || {
                let batch = confab_core::priority::lower_this_thread(Background::Batch);
                if let Err(error) = batch {
                    tracing::debug!(?error, "WAL checkpoints run at normal priority.");
                }
                while let Err(mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(CHECKPOINT_EVERY)
                {
                    if let Err(error) =
                        conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                    {
                        tracing::debug!(%error, "WAL checkpoint failed; the next one tries again.");
                    }
                }
            })
            .map_err(unavailable)?;
        Ok(Self { _stop: stop })
    }
}

impl SqliteWriter {
    /// Opens a second connection to the (already created and configured) database file and
    /// starts the thread that owns it.
    /// `link`: whether events go straight into the database queue, and whom to tell.
    pub(super) fn open(
        path: &Path,
        synchronous: Synchronous,
        link: Arc<QueueLink>,
    ) -> Result<Self, StoreError> {
        let conn = connect(path, synchronous)?;
        // Waiting for another connection's write lock: in short naps, not SQLite's default
        // 1, 2, 5, 10 … ms (every message of the batch waits through the nap).
        conn.busy_handler(Some(nap_while_busy))
            .map_err(unavailable)?;
        let (jobs, queue) = mpsc::channel::<(Vec<Append>, Reply)>();
        std::thread::Builder::new()
            .name("confab-sqlite-writer".into())
            .spawn(move || {
                let mut conn = conn;
                for (batch, reply) in queue {
                    match append(&mut conn, &batch, link.direct()) {
                        Ok((answers, queues)) => {
                            let _ = reply.send(Ok(answers));
                            link.committed(queues.iter().map(String::as_str));
                        }
                        Err(e) => {
                            let _ = reply.send(Err(store_err(e)));
                        }
                    }
                }
            })
            .map_err(unavailable)?;
        let checkpoints = Checkpointer::start(connect(path, synchronous)?)?;
        Ok(Self {
            jobs,
            _checkpoints: checkpoints,
        })
    }

    pub(super) async fn append(&self, batch: &[Append]) -> Result<Vec<Appended>, StoreError> {
        let stopped = || StoreError::Other("the SQLite writer thread has stopped".into());
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send((batch.to_vec(), reply))
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

/// Why a batch failed: SQLite's error, or a row that does not decode.
#[derive(Debug, thiserror::Error)]
enum WriteError {
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn unavailable(e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::Unavailable(Box::new(e))
}

fn store_err(error: WriteError) -> StoreError {
    use rusqlite::ErrorCode::{DatabaseBusy, DatabaseLocked};
    match error {
        WriteError::Store(e) => e,
        WriteError::Sqlite(e) => match e.sqlite_error_code() {
            Some(DatabaseBusy | DatabaseLocked) => StoreError::Unavailable(Box::new(e)),
            _ => StoreError::Other(Box::new(e)),
        },
    }
}

const MESSAGE_COLUMNS: &str =
    "id, chat_id, sender_id, kind, text, client_id, image, created_at, edited_at, deleted_at";

/// The batch's prepared statements (cached on the connection across batches).
struct Statements<'c> {
    member: CachedStatement<'c>,
    by_client_id: CachedStatement<'c>,
    insert: CachedStatement<'c>,
    event: CachedStatement<'c>,
}

impl<'c> Statements<'c> {
    /// `direct`: events go straight into the database queue, else into the outbox.
    fn prepare(tx: &'c Transaction<'_>, direct: bool) -> rusqlite::Result<Self> {
        let event = if direct {
            // `queue_messages` as `db_broker::insert_envelopes` writes it.
            tx.prepare_cached(&format!(
                "INSERT INTO queue_messages ({INSERT_COLUMNS}) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 0, ?8) ON CONFLICT (queue, envelope_id) DO NOTHING"
            ))?
        } else {
            tx.prepare_cached(
                "INSERT INTO outbox (id, queue, kind, payload, trace_id, created_at, published_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, NULL)",
            )?
        };
        Ok(Self {
            member: tx.prepare_cached(
                "SELECT c.kind FROM chat_members m JOIN chats c ON c.id = m.chat_id \
                 WHERE m.chat_id = ?1 AND m.user_id = ?2",
            )?,
            by_client_id: tx.prepare_cached(&format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages WHERE sender_id = ?1 AND client_id = ?2"
            ))?,
            insert: tx.prepare_cached(&format!(
                "INSERT INTO messages ({MESSAGE_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) \
                 ON CONFLICT (sender_id, client_id) DO NOTHING"
            ))?,
            event,
        })
    }

    /// The chat's kind when `user` is a member of it.
    fn member_kind(&mut self, chat: Uuid, user: Uuid) -> rusqlite::Result<Option<ChatKind>> {
        let kind: Option<String> = self
            .member
            .query_row(params![chat.as_bytes(), user.as_bytes()], |r| r.get(0))
            .optional()?;
        Ok(kind.map(|k| {
            if k == "direct" {
                ChatKind::Direct
            } else {
                ChatKind::Group
            }
        }))
    }

    /// The sender's stored message with this client id.
    fn by_client_id(
        &mut self,
        sender: UserId,
        client_id: &str,
    ) -> Result<Option<Message>, WriteError> {
        let found = self
            .by_client_id
            .query_row(params![sender.0.as_bytes(), client_id], row_message)
            .optional()?;
        Ok(found.map(|row| to_message(row?)).transpose()?)
    }

    fn insert(&mut self, m: &Message, sender: UserId) -> Result<(), WriteError> {
        let inserted = self.insert.execute(params![
            m.id.0.as_bytes(),
            m.chat_id.0.as_bytes(),
            sender.0.as_bytes(),
            message_kind(m.kind),
            m.text,
            m.client_id,
            m.image.as_ref().map(serde_json::Value::to_string),
            time(m.created_at),
            m.edited_at.map(time),
            m.deleted_at.map(time),
        ])?;
        if inserted == 0 {
            // Unreachable under the write lock: the client id was checked before.
            return Err(StoreError::Conflict("messages.sender_id, client_id".into()).into());
        }
        Ok(())
    }

    fn event(&mut self, e: &OutboxEntry, direct: bool) -> rusqlite::Result<()> {
        let payload = e.payload.to_string();
        if direct {
            self.event.execute(params![
                Uuid::now_v7().as_bytes(),
                e.queue,
                e.id.0.as_bytes(),
                e.kind,
                payload,
                e.trace_id,
                time(e.created_at),
                time(now()),
            ])?;
        } else {
            self.event.execute(params![
                e.id.0.as_bytes(),
                e.queue,
                e.kind,
                payload,
                e.trace_id,
                time(e.created_at),
            ])?;
        }
        Ok(())
    }
}

/// The same decisions as the pooled path (`append.rs`), in one immediate transaction.
/// Returns the answers and the queues of the events written.
fn append(
    conn: &mut Connection,
    batch: &[Append],
    direct: bool,
) -> Result<(Vec<Appended>, Vec<String>), WriteError> {
    if batch.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let mut kinds: HashMap<(Uuid, Uuid), Option<ChatKind>> = HashMap::new();
    let mut earlier: HashMap<(UserId, String), Message> = HashMap::new();
    let mut answers = Vec::with_capacity(batch.len());
    let mut queues = Vec::new();
    let mut touched: HashSet<Uuid> = HashSet::new();
    {
        let mut statements = Statements::prepare(&tx, direct)?;
        for append in batch {
            let m = &append.message;
            let Some(sender) = m.sender_id else {
                return Err(StoreError::Other("a sent message needs a sender".into()).into());
            };
            let pair = (m.chat_id.0, sender.0);
            let kind = if let Some(kind) = kinds.get(&pair) {
                *kind
            } else {
                let kind = statements.member_kind(pair.0, pair.1)?;
                kinds.insert(pair, kind);
                kind
            };
            let Some(kind) = kind else {
                answers.push(Appended::NotMember);
                continue;
            };
            if let Some(client_id) = &m.client_id {
                let key = (sender, client_id.clone());
                if !earlier.contains_key(&key)
                    && let Some(found) = statements.by_client_id(sender, client_id)?
                {
                    earlier.insert(key.clone(), found);
                }
                if let Some(existing) = earlier.get(&key) {
                    answers.push(Appended::Duplicate {
                        existing: Box::new(existing.clone()),
                        kind,
                    });
                    continue;
                }
                earlier.insert(key, m.clone());
            }
            statements.insert(m, sender)?;
            statements.event(&append.event, direct)?;
            queues.push(append.event.queue.clone());
            touched.insert(m.chat_id.0);
            answers.push(Appended::Stored(kind));
        }
        // Every touched chat points at its newest message, never backwards.
        let mut pointer = tx.prepare_cached(
            "UPDATE chats SET \
               last_message_id = (SELECT m.id FROM messages m WHERE m.chat_id = chats.id ORDER BY m.id DESC LIMIT 1), \
               last_message_at = (SELECT m.created_at FROM messages m WHERE m.chat_id = chats.id ORDER BY m.id DESC LIMIT 1), \
               activity_at = (SELECT m.created_at FROM messages m WHERE m.chat_id = chats.id ORDER BY m.id DESC LIMIT 1) \
             WHERE id = ?1",
        )?;
        for chat in &touched {
            pointer.execute(params![chat.as_bytes()])?;
        }
    }
    tx.commit()?;
    Ok((answers, queues))
}

/// A time as sqlx writes it on SQLite.
fn time(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::AutoSi, false)
}

fn parse_time(text: &str) -> Result<DateTime<Utc>, StoreError> {
    DateTime::parse_from_rfc3339(text)
        .or_else(|_| DateTime::parse_from_str(text, "%F %T%.f%:z"))
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| StoreError::Other(format!("unexpected time {text:?} in the database").into()))
}

fn uuid(bytes: &[u8]) -> Result<Uuid, StoreError> {
    Uuid::from_slice(bytes).map_err(|e| StoreError::Other(Box::new(e)))
}

/// A `messages` row, decoded like sqlx decodes it (errors in the inner result).
fn row_message(r: &Row<'_>) -> rusqlite::Result<Result<messages::Model, StoreError>> {
    let id: Vec<u8> = r.get(0)?;
    let chat_id: Vec<u8> = r.get(1)?;
    let sender_id: Option<Vec<u8>> = r.get(2)?;
    let kind: String = r.get(3)?;
    let text: Option<String> = r.get(4)?;
    let client_id: Option<String> = r.get(5)?;
    let image: Option<String> = r.get(6)?;
    let created_at: String = r.get(7)?;
    let edited_at: Option<String> = r.get(8)?;
    let deleted_at: Option<String> = r.get(9)?;
    Ok((|| {
        Ok(messages::Model {
            id: uuid(&id)?,
            chat_id: uuid(&chat_id)?,
            sender_id: sender_id.as_deref().map(uuid).transpose()?,
            kind,
            text,
            client_id,
            image: image
                .as_deref()
                .map(serde_json::from_str)
                .transpose()
                .map_err(|e| StoreError::Other(Box::new(e)))?,
            created_at: parse_time(&created_at)?,
            edited_at: edited_at.as_deref().map(parse_time).transpose()?,
            deleted_at: deleted_at.as_deref().map(parse_time).transpose()?,
        })
    })())
}
