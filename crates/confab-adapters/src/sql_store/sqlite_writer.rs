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

use std::collections::HashMap;
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use chrono::{DateTime, SecondsFormat, Utc};
use confab_core::domain::{ChatKind, Message, OutboxEntry, UserId, now};
use confab_core::ports::store::{Append, Appended, StoreError};
use confab_core::priority::Background;
use confab_core::services::chats::{BUSY_WITHIN, MAX_BATCH};
use rusqlite::config::DbConfig;
use rusqlite::{CachedStatement, Connection, OpenFlags, OptionalExtension, Row, params};
use tokio::sync::oneshot;
use uuid::Uuid;

use super::Synchronous;
use super::entities::messages;
use super::ops::{message_kind, to_message};
use crate::db_broker::{INSERT_COLUMNS, QueueLink};

type Reply = oneshot::Sender<Result<Vec<Appended>, StoreError>>;
/// A commit's answers, one per batch, in the order the batches were handed over.
type Answers = Vec<(Reply, Result<Vec<Appended>, StoreError>)>;

/// Who answers the batches of a commit. Each answer sent from the writer thread wakes the
/// Tokio thread waiting for it (a write to the runtime's eventfd), and a thread woken on the
/// writer's core preempts the writer there (it runs `SCHED_BATCH`): a commit of four batches
/// cost four such round trips. So the writer hands a commit's answers to a task on the
/// runtime in one go, one wake-up per commit, and that task answers each batch.
enum Answerer {
    /// The task on the runtime the writer was opened on.
    Runtime(tokio::sync::mpsc::UnboundedSender<Answers>),
    /// Opened outside a runtime: the thread answers each batch itself.
    Thread,
}

impl Answerer {
    fn start() -> Self {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return Self::Thread;
        };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Answers>();
        runtime.spawn(async move {
            while let Some(answers) = rx.recv().await {
                answer(answers);
            }
        });
        Self::Runtime(tx)
    }

    fn send(&self, answers: Answers) {
        match self {
            Self::Runtime(task) => {
                // The runtime is gone (shutting down): answer from here.
                if let Err(unsent) = task.send(answers) {
                    answer(unsent.0);
                }
            }
            Self::Thread => answer(answers),
        }
    }
}

fn answer(answers: Answers) {
    for (reply, answer) in answers {
        let _ = reply.send(answer);
    }
}

/// The handle: sends work to the writer thread, which ends when every handle is gone.
pub(crate) struct SqliteWriter {
    jobs: mpsc::Sender<Job>,
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
    // Plans that do not depend on bound values, as on the pool (`sql_store::stable_plans`).
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)
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
/// of its own checkpoints ten times a second, PASSIVE: it copies what it can without waiting
/// for or blocking anyone. It runs at the lowest normal priority (`SCHED_BATCH`, nice 19):
/// copying pages is CPU that on a busy core would otherwise preempt the thread delivering
/// messages. Small, frequent checkpoints keep each one short (at 500 ms intervals, each took
/// ~30 ms at 2k msg/s and the delivery p99 was twice as long).
///
/// The WAL is reused from its start only when a writer begins while every frame in it has
/// been copied. Under a steady flow of commits that never happens on its own (the writer
/// appends while the checkpoint copies), and the WAL grew without end: ~800 MB after 20 s at
/// 2k msg/s. So when a checkpoint has caught up with a WAL of [`RESTART_FRAMES`] or more, it
/// asks the writer thread (`restart`) to run one itself after its next commit: that one
/// copies the few frames added meanwhile, with no writer beside it, and the writer's next
/// commit starts the WAL over. It stops when the store is dropped.
struct Checkpointer {
    _stop: mpsc::Sender<()>,
}

/// How often the WAL is checkpointed.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);
/// A WAL this long (in pages: 256 MiB at 4 KiB) is started over. The writer's own checkpoint
/// holds up commits for a few milliseconds (the fsyncs of the WAL and the database): at 2k
/// msg/s (~20,000 WAL frames a second) this is one every ~3 s; shorter would show in the p99.
const RESTART_FRAMES: i64 = 65_536;

/// `PRAGMA wal_checkpoint(PASSIVE)`: whether it copied every frame of the WAL, and how many
/// frames the WAL holds.
fn checkpoint(conn: &Connection) -> rusqlite::Result<(bool, i64)> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
        let (busy, log, copied): (i64, i64, i64) = (r.get(0)?, r.get(1)?, r.get(2)?);
        Ok((busy == 0 && log == copied, log))
    })
}

impl Checkpointer {
    fn start(conn: Connection, restart: Arc<AtomicBool>) -> Result<Self, StoreError> {
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
                    match checkpoint(&conn) {
                        Ok((true, frames)) if frames >= RESTART_FRAMES => {
                            restart.store(true, Ordering::Release);
                        }
                        Ok(_) => {}
                        Err(error) => {
                            tracing::debug!(%error, "WAL checkpoint failed; the next one tries again.");
                        }
                    }
                }
            })
            .map_err(unavailable)?;
        Ok(Self { _stop: stop })
    }
}

/// Work for the writer thread, done in the order it was handed over.
enum Job {
    /// Messages to append: gathered with the batches behind it into one commit.
    Append(Batch),
    /// Anything else to write (the database queue's claims and settlements): run alone, on
    /// the writer's connection, between two commits. Under the write lock of this thread,
    /// such a write no longer makes the message commits wait for it on another connection,
    /// and costs no hand-off to sqlx's worker thread per statement.
    Run(Box<dyn FnOnce(&mut Connection) + Send>),
}

/// A batch from the store's caller: its messages, whom to answer, when it was handed over.
struct Batch {
    messages: Vec<Append>,
    reply: Reply,
    sent: Instant,
}

impl SqliteWriter {
    /// Opens a second connection to the (already created and configured) database file and
    /// starts the thread that owns it.
    /// `link`: whether events go straight into the database queue, and whom to tell.
    /// `linger`: see [`gather`].
    pub(super) fn open(
        path: &Path,
        synchronous: Synchronous,
        link: Arc<QueueLink>,
        linger: Duration,
    ) -> Result<Self, StoreError> {
        let conn = connect(path, synchronous)?;
        // Waiting for another connection's write lock: in short naps, not SQLite's default
        // 1, 2, 5, 10 … ms (every message of the batch waits through the nap).
        conn.busy_handler(Some(nap_while_busy))
            .map_err(unavailable)?;
        let (jobs, queue) = mpsc::channel::<Job>();
        let answerer = Answerer::start();
        let restart = Arc::new(AtomicBool::new(false));
        let restart_wal = restart.clone();
        std::thread::Builder::new()
            .name("confab-sqlite-writer".into())
            .spawn(move || {
                if let Err(error) = confab_core::priority::lower_this_thread(Background::Deferred) {
                    tracing::debug!(
                        ?error,
                        "The SQLite writer preempts the thread that wakes it."
                    );
                }
                let mut conn = conn;
                let mut last_commit: Option<Instant> = None;
                let mut next = None;
                loop {
                    let first = match next.take() {
                        Some(job) => job,
                        None => match queue.recv() {
                            Ok(job) => job,
                            Err(mpsc::RecvError) => return,
                        },
                    };
                    // A panic fails the job it happened in (its caller's reply is dropped:
                    // "stopped"), not every write after it; an open transaction was rolled
                    // back as it unwound. Batches answered before it (each committed alone
                    // after a failed commit) keep their answers.
                    let mut answers = Answers::new();
                    let done =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match first {
                            Job::Run(work) => work(&mut conn),
                            Job::Append(first) => {
                                let busy = last_commit.is_some_and(|at| at.elapsed() < BUSY_WITHIN);
                                let linger = if busy { linger } else { Duration::ZERO };
                                let (batches, after) = gather(first, &queue, linger);
                                next = after;
                                commit_jobs(&mut conn, batches, &link, &mut answers);
                                last_commit = Some(Instant::now());
                            }
                        }));
                    if !answers.is_empty() {
                        answerer.send(answers);
                    }
                    if done.is_err() {
                        tracing::error!("A job of the SQLite writer panicked; it failed alone.");
                    }
                    if restart_wal.swap(false, Ordering::AcqRel)
                        && let Err(error) = checkpoint(&conn)
                    {
                        tracing::debug!(%error, "WAL checkpoint failed; the next one tries again.");
                    }
                }
            })
            .map_err(unavailable)?;
        let checkpoints = Checkpointer::start(connect(path, synchronous)?, restart)?;
        Ok(Self {
            jobs,
            _checkpoints: checkpoints,
        })
    }

    pub(super) async fn append(&self, batch: &[Append]) -> Result<Vec<Appended>, StoreError> {
        let (reply, answer) = oneshot::channel();
        let job = Job::Append(Batch {
            messages: batch.to_vec(),
            reply,
            sent: Instant::now(),
        });
        self.jobs.send(job).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    /// Runs `work` on the writer's connection, between two commits, and returns what it
    /// returned. `work` makes its own transaction, if it needs one; the connection waits for
    /// other connections' write locks in short naps (see [`nap_while_busy`]).
    pub(crate) async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Connection) -> T + Send + 'static,
    ) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        let job = Job::Run(Box::new(move |conn: &mut Connection| {
            let _ = reply.send(work(conn));
        }));
        self.jobs.send(job).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())
    }
}

fn stopped() -> StoreError {
    StoreError::Other("the SQLite writer thread has stopped".into())
}

/// The batches for one commit: `first`, every batch already waiting behind it, and (while
/// messages are flowing) those arriving until `linger` after `first` was handed over, up to
/// [`MAX_BATCH`] messages (whole batches: a larger one goes alone). A commit costs about the same for one message as for a few (the WAL
/// frames of the pages they share, the locks, the thread's wake-up), so under traffic a
/// fraction of a millisecond's wait divides that cost; timed here, on a thread that does
/// nothing else, it is exact (Tokio's timer rounds to whole milliseconds). Also returns a
/// job that arrived but is not part of this commit (a batch that did not fit, other work),
/// for after it.
fn gather(
    first: Batch,
    queue: &mpsc::Receiver<Job>,
    linger: Duration,
) -> (Vec<Batch>, Option<Job>) {
    let deadline = first.sent + linger;
    let mut size = first.messages.len();
    let mut batches = vec![first];
    while size < MAX_BATCH {
        let job = match queue.try_recv() {
            Ok(Job::Append(batch)) => batch,
            Ok(other) => return (batches, Some(other)),
            Err(mpsc::TryRecvError::Disconnected) => break,
            Err(mpsc::TryRecvError::Empty) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                // A nap rather than waiting on the channel: a sender then wakes nobody (one
                // wake-up of this thread per commit, not per batch sent).
                std::thread::sleep(left);
                continue;
            }
        };
        if size + job.messages.len() > MAX_BATCH {
            return (batches, Some(Job::Append(job)));
        }
        size += job.messages.len();
        batches.push(job);
    }
    (batches, None)
}

/// Commits the batches in one transaction and adds each one's answer to `out`. When that
/// fails for another reason than the database being busy, each batch is tried alone, so that
/// one batch cannot fail the others (the caller then retries a failed batch message by
/// message).
fn commit_jobs(conn: &mut Connection, jobs: Vec<Batch>, link: &QueueLink, out: &mut Answers) {
    let all: Vec<&Append> = jobs.iter().flat_map(|j| &j.messages).collect();
    let outcome = append(conn, &all, link.direct());
    match outcome {
        Ok((answers, queues)) => {
            // Answers in batch order: split them back.
            let mut answers = answers.into_iter();
            for job in jobs {
                let own = answers.by_ref().take(job.messages.len()).collect();
                out.push((job.reply, Ok(own)));
            }
            link.committed(queues.iter().map(String::as_str));
        }
        Err(e) if jobs.len() == 1 => {
            if let Some(job) = jobs.into_iter().next() {
                out.push((job.reply, Err(store_err(e))));
            }
        }
        Err(e) => match store_err(e) {
            StoreError::Unavailable(e) => {
                let message = e.to_string();
                for job in jobs {
                    out.push((
                        job.reply,
                        Err(StoreError::Unavailable(message.clone().into())),
                    ));
                }
            }
            _ => {
                for job in jobs {
                    commit_jobs(conn, vec![job], link, out);
                }
            }
        },
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
    match error {
        WriteError::Store(e) => e,
        WriteError::Sqlite(e) => sqlite_err(e),
    }
}

/// SQLite's error as the store's: busy or locked is `Unavailable` (worth retrying).
pub(crate) fn sqlite_err(e: rusqlite::Error) -> StoreError {
    use rusqlite::ErrorCode::{DatabaseBusy, DatabaseLocked};
    match e.sqlite_error_code() {
        Some(DatabaseBusy | DatabaseLocked) => StoreError::Unavailable(Box::new(e)),
        _ => StoreError::Other(Box::new(e)),
    }
}

const MESSAGE_COLUMNS: &str =
    "id, chat_id, sender_id, kind, text, client_id, image, created_at, edited_at, deleted_at";

const MEMBER_KIND: &str = "SELECT c.kind FROM chat_members m JOIN chats c ON c.id = m.chat_id \
     WHERE m.chat_id = ?1 AND m.user_id = ?2";

const OUTBOX_EVENT: &str = "INSERT INTO outbox (id, queue, kind, payload, trace_id, created_at, published_at) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, NULL)";

/// Every touched chat points at its newest message, never backwards (see [`append`]).
const POINTER: &str = "UPDATE chats SET last_message_id = ?2, last_message_at = ?3, activity_at = ?3 \
     WHERE id = ?1 AND (last_message_id IS NULL OR last_message_id < ?2)";

/// The batch's statements built from the column lists, once: the statement cache is looked
/// up by the text, which was otherwise formatted again for every batch.
struct Sql {
    by_client_id: String,
    insert: String,
    /// `queue_messages` as `db_broker::insert_envelopes` writes it.
    queue_event: String,
}

impl Sql {
    fn get() -> &'static Self {
        static SQL: std::sync::OnceLock<Sql> = std::sync::OnceLock::new();
        SQL.get_or_init(|| Self {
            by_client_id: format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages WHERE sender_id = ?1 AND client_id = ?2"
            ),
            insert: format!(
                "INSERT INTO messages ({MESSAGE_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) \
                 ON CONFLICT (sender_id, client_id) WHERE client_id IS NOT NULL DO NOTHING"
            ),
            queue_event: format!(
                "INSERT INTO queue_messages ({INSERT_COLUMNS}) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 0, ?8) ON CONFLICT (queue, envelope_id) DO NOTHING"
            ),
        })
    }
}

/// A `BEGIN IMMEDIATE` transaction whose `BEGIN` and `COMMIT` are prepared once on the
/// connection: rusqlite's `Transaction` parses both again on every run, which at two or three
/// messages per commit was ~3 % of the writer's time (BENCHMARKS.md, fifteenth session).
/// Dropped without a commit (an error, a failed `COMMIT`, a panic): rolled back.
struct Immediate<'c> {
    conn: &'c Connection,
    open: bool,
}

impl<'c> Immediate<'c> {
    fn begin(conn: &'c Connection) -> rusqlite::Result<Self> {
        conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
        Ok(Self { conn, open: true })
    }

    fn commit(mut self) -> rusqlite::Result<()> {
        self.conn.prepare_cached("COMMIT")?.execute([])?;
        self.open = false;
        Ok(())
    }
}

impl Drop for Immediate<'_> {
    fn drop(&mut self) {
        // A failed statement may have ended the transaction already (SQLite rolls back on
        // some errors by itself).
        if self.open && !self.conn.is_autocommit() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
    }
}

/// The batch's prepared statements (cached on the connection across batches).
struct Statements<'c> {
    member: CachedStatement<'c>,
    by_client_id: CachedStatement<'c>,
    insert: CachedStatement<'c>,
    event: CachedStatement<'c>,
}

impl<'c> Statements<'c> {
    /// `direct`: events go straight into the database queue, else into the outbox.
    fn prepare(conn: &'c Connection, direct: bool) -> rusqlite::Result<Self> {
        let sql = Sql::get();
        Ok(Self {
            member: conn.prepare_cached(MEMBER_KIND)?,
            by_client_id: conn.prepare_cached(&sql.by_client_id)?,
            insert: conn.prepare_cached(&sql.insert)?,
            event: conn.prepare_cached(if direct {
                &sql.queue_event
            } else {
                OUTBOX_EVENT
            })?,
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

    /// Stores `m`; `false` when the sender already has a message with its client id (stored
    /// earlier, or earlier in this transaction), which then stays as it is.
    fn insert(&mut self, m: &Message, sender: UserId) -> rusqlite::Result<bool> {
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
        Ok(inserted == 1)
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
    batch: &[&Append],
    direct: bool,
) -> Result<(Vec<Appended>, Vec<String>), WriteError> {
    if batch.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    let tx = Immediate::begin(conn)?;
    let mut kinds: HashMap<(Uuid, Uuid), Option<ChatKind>> = HashMap::new();
    let mut answers = Vec::with_capacity(batch.len());
    let mut queues = Vec::new();
    // Each touched chat's newest message of the batch.
    let mut touched: HashMap<Uuid, &Message> = HashMap::new();
    {
        let mut statements = Statements::prepare(conn, direct)?;
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
            // The insert checks the client id itself (its unique index): a repeat of one stored
            // earlier, or earlier in this batch, is looked up only when it is one.
            if !statements.insert(m, sender)? {
                let existing = match &m.client_id {
                    Some(client_id) => statements.by_client_id(sender, client_id)?,
                    None => None,
                };
                let Some(existing) = existing else {
                    return Err(StoreError::Conflict("messages.sender_id, client_id".into()).into());
                };
                answers.push(Appended::Duplicate {
                    existing: Box::new(existing),
                    kind,
                });
                continue;
            }
            statements.event(&append.event, direct)?;
            queues.push(append.event.queue.clone());
            touched
                .entry(m.chat_id.0)
                .and_modify(|newest| {
                    if m.id.0 > newest.id.0 {
                        *newest = m;
                    }
                })
                .or_insert(m);
            answers.push(Appended::Stored(kind));
        }
        // Every touched chat points at its newest message, never backwards. Under the write
        // lock the pointer is the chat's newest message so far: comparing with it replaces
        // looking the newest up again in `messages` (ids are UUIDv7, whose bytes sort by time).
        let mut pointer = conn.prepare_cached(POINTER)?;
        for (chat, newest) in &touched {
            pointer.execute(params![
                chat.as_bytes(),
                newest.id.0.as_bytes(),
                time(newest.created_at)
            ])?;
        }
    }
    tx.commit()?;
    Ok((answers, queues))
}

/// A time as sqlx writes it on SQLite.
pub(crate) fn time(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::AutoSi, false)
}

pub(crate) fn parse_time(text: &str) -> Result<DateTime<Utc>, StoreError> {
    DateTime::parse_from_rfc3339(text)
        .or_else(|_| DateTime::parse_from_str(text, "%F %T%.f%:z"))
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| StoreError::Other(format!("unexpected time {text:?} in the database").into()))
}

pub(crate) fn uuid(bytes: &[u8]) -> Result<Uuid, StoreError> {
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::SqliteWriter;
    use crate::db_broker::QueueLink;
    use crate::sql_store::Synchronous;

    fn writer_in(dir: &tempfile::TempDir) -> SqliteWriter {
        let path = dir.path().join("writer.db");
        rusqlite::Connection::open(&path).unwrap();
        SqliteWriter::open(
            &path,
            Synchronous::Normal,
            Arc::new(QueueLink::default()),
            Duration::ZERO,
        )
        .unwrap()
    }

    /// A batch is answered, whichever way the answers travel; a lost answer would hang, so
    /// each wait is bounded.
    async fn answered(writer: &SqliteWriter) {
        let answer = tokio::time::timeout(Duration::from_secs(5), writer.append(&[]))
            .await
            .expect("the batch is answered");
        assert!(answer.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_commit_is_answered_through_the_runtime_it_was_opened_on() {
        let dir = tempfile::tempdir().unwrap();
        let writer = writer_in(&dir);
        answered(&writer).await;
        answered(&writer).await;
    }

    #[test]
    fn a_writer_opened_outside_a_runtime_or_outliving_it_answers_from_its_thread() {
        let dir = tempfile::tempdir().unwrap();
        let outside = writer_in(&dir);
        let first = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        // Opened on `first`, which is then gone with its answering task.
        let outlived = first.block_on(async { writer_in(&dir) });
        drop(first);
        let second = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        second.block_on(async {
            answered(&outside).await;
            answered(&outlived).await;
        });
    }

    #[tokio::test]
    async fn work_that_panics_fails_alone_and_the_writer_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let writer = writer_in(&dir);
        let failed = writer.run(|_| -> i64 { panic!("a bug in a job") }).await;
        assert!(failed.is_err(), "its caller hears of it");
        let answer = writer
            .run(|conn| conn.query_row("SELECT 6 * 7", [], |r| r.get::<_, i64>(0)))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(answer, 42, "the next job runs");
    }
}
