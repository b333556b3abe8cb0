//! `SqlStore`: the `Store` on SQLite (embedded) and PostgreSQL (production), one code path
//! through sea-orm.
//!
//! Every operation is written once, for `Sql<C>` over any sea-orm connection: the pool
//! (`SqlStore`) and a transaction (`SqlTx`) are the same code. Reads outside a transaction go
//! to the read replica when one is configured.
//!
//! SQLite runs in WAL mode with `synchronous = NORMAL` by default: a committed write survives
//! a crash of the process (SPEC §1); `synchronous = "full"` also survives a power cut, at the
//! cost of an fsync per commit. Foreign keys are on and a busy connection waits (busy
//! timeout) instead of failing.

mod append;
mod auth_ai;
mod entities;
mod migrations;
mod ops;
pub(crate) mod sqlite_writer;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use confab_core::ports::health::{ComponentHealth, HealthCheck, HealthStatus};
use confab_core::ports::store::{Append, Appended, Store, StoreError, StoreTx};
use confab_core::settings::{SecretUrl, lenient};
use sea_orm::sqlx;
use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DatabaseTransaction, DbBackend,
    DbErr, RuntimeErr, SqlErr, Statement, TransactionTrait,
};
use sea_orm_migration::MigratorTrait;
use serde::{Deserialize, Serialize};

pub use migrations::known as known_migrations;

use crate::db_broker::QueueLink;

/// `[database.pool]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PoolConfig {
    /// 0: the backend's own default ([`PoolConfig::SQLITE_MAX`], [`PoolConfig::POSTGRES_MAX`]).
    #[serde(deserialize_with = "lenient::value")]
    pub max_connections: u32,
    #[serde(deserialize_with = "lenient::value")]
    pub min_connections: u32,
    /// How long a request waits for a connection before it gets 503 `UNAVAILABLE`.
    #[serde(deserialize_with = "lenient::value")]
    pub acquire_timeout_secs: u64,
    /// Idle connections are closed after this long.
    #[serde(deserialize_with = "lenient::value")]
    pub idle_timeout_secs: u64,
    /// Connections are recycled after this long, whatever their use.
    #[serde(deserialize_with = "lenient::value")]
    pub max_lifetime_secs: u64,
    /// Check a connection that sat idle before handing it out (pre-ping; PostgreSQL only).
    #[serde(deserialize_with = "lenient::value")]
    pub test_before_acquire: bool,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            max_connections: 0,
            min_connections: 1,
            acquire_timeout_secs: 5,
            idle_timeout_secs: 600,
            max_lifetime_secs: 1800,
            test_before_acquire: true,
        }
    }
}

impl PoolConfig {
    /// SQLite takes one write at a time whatever the pool (messages go through the one
    /// writer), and each pooled connection is a thread with its own caches: past a few, more
    /// connections add memory (~0.9 MiB each, BENCHMARKS.md), not throughput.
    pub const SQLITE_MAX: u32 = 4;
    /// What sqlx and most PostgreSQL users expect per node.
    pub const POSTGRES_MAX: u32 = 10;
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Synchronous {
    /// Survives a crash of the process.
    #[default]
    Normal,
    /// Survives a power cut too: one fsync per commit.
    Full,
}

/// `[database]`: which database, and how to use it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum DatabaseConfig {
    Sqlite {
        /// Defaults to `<data_dir>/confab.db`.
        #[serde(default)]
        path: Option<PathBuf>,
        #[serde(default)]
        synchronous: Synchronous,
        /// While messages are flowing, how long the group commit lets a commit gather more
        /// messages after its first, in microseconds (0: never wait). A message on a quiet
        /// server is committed at once.
        #[serde(default, deserialize_with = "lenient::value")]
        commit_linger_us: u64,
        #[serde(default)]
        pool: PoolConfig,
    },
    Postgres {
        url: SecretUrl,
        /// A read replica for read-only queries.
        #[serde(default)]
        replica_url: Option<SecretUrl>,
        #[serde(default)]
        pool: PoolConfig,
    },
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self::Sqlite {
            path: None,
            synchronous: Synchronous::Normal,
            // Latency first (BENCHMARKS.md has the trade).
            commit_linger_us: 0,
            pool: PoolConfig::default(),
        }
    }
}

impl DatabaseConfig {
    /// Where the database is, safe to print.
    pub fn describe(&self, data_dir: &Path) -> String {
        match self {
            Self::Sqlite { path, .. } => format!(
                "sqlite:{}",
                sqlite_path(path.as_deref(), data_dir).display()
            ),
            Self::Postgres { url, .. } => url.redacted(),
        }
    }
}

fn sqlite_path(path: Option<&Path>, data_dir: &Path) -> PathBuf {
    path.map_or_else(|| data_dir.join("confab.db"), Path::to_owned)
}

/// SQLite: how many rows of a result sqlx's worker thread may send ahead of the caller.
const ROW_BUFFER: usize = 1024;

/// Turns on SQLite's query planner stability guarantee (QPSG) for a pooled connection: plans
/// that do not depend on the values bound.
///
/// Without it SQLite reads a `LIMIT` from its bound parameter into the plan, and marks the
/// statement to be prepared again whenever that parameter is bound, that is on every run:
/// sea-orm binds `LIMIT 1` for each `.one()` (a membership, a chat, a message by id). Under
/// REST load that re-parsing was 12 % of the server's CPU (BENCHMARKS.md, twelfth session).
/// Nothing here needs a plan made for a value: no `LIKE` on an index, no STAT4 statistics,
/// and the one partial index (client ids, `WHERE client_id IS NOT NULL`) serves every query
/// that compares `client_id` with a value (`=`, `IN`), whatever the value.
async fn stable_plans(conn: &mut sqlx::SqliteConnection) -> Result<(), sqlx::Error> {
    let mut handle = conn.lock_handle().await?;
    match planner_stability(handle.as_raw_handle(), Some(true)) {
        Ok(true) => Ok(()),
        Ok(false) => Err(sqlx::Error::Protocol(
            "SQLite did not turn on its query planner stability guarantee".into(),
        )),
        Err(rc) => Err(sqlx::Error::Protocol(format!(
            "SQLite refused SQLITE_DBCONFIG_ENABLE_QPSG: error {rc}"
        ))),
    }
}

/// Sets (`Some`) or only reads (`None`) whether a connection's plans ignore bound values;
/// returns the setting in force after the call, or SQLite's error code.
#[allow(unsafe_code)]
fn planner_stability(
    db: std::ptr::NonNull<rusqlite::ffi::sqlite3>,
    set: Option<bool>,
) -> Result<bool, std::ffi::c_int> {
    use rusqlite::ffi;
    let request = set.map_or(-1, std::ffi::c_int::from);
    let mut now: std::ffi::c_int = 0;
    // SAFETY: `db` is an open connection handle that its owner keeps to itself for the call
    // (sqlx's `LockedSqliteHandle`: FFI calls are sound while it is held, short of closing
    // the handle). `SQLITE_DBCONFIG_ENABLE_QPSG` takes an int (negative: leave it) and an
    // `int *` for the setting now, which lives through the call.
    let rc = unsafe {
        ffi::sqlite3_db_config(
            db.as_ptr(),
            ffi::SQLITE_DBCONFIG_ENABLE_QPSG,
            request,
            &raw mut now,
        )
    };
    if rc == ffi::SQLITE_OK {
        Ok(now != 0)
    } else {
        Err(rc)
    }
}

/// The store over a connection `C`: the pool, or a transaction.
pub struct Sql<C> {
    conn: C,
    /// Where reads outside a transaction go, when there is a replica.
    replica: Option<DatabaseConnection>,
    /// SQLite: the thread that commits batches of messages (`append_messages`).
    writer: Option<Arc<sqlite_writer::SqliteWriter>>,
    /// Whether outbox entries go straight into the database queue (see `QueueLink`).
    queue: Arc<QueueLink>,
    /// In a transaction: the queues it wrote to directly (each entry once), told to the
    /// queue when it commits.
    enqueued: Option<Mutex<Vec<String>>>,
}

/// The store over the connection pool.
pub type SqlStore = Sql<DatabaseConnection>;
/// The store inside a transaction.
pub type SqlTx = Sql<DatabaseTransaction>;

/// Runs `$body` with `$c` bound to the replica when there is one, else the primary.
macro_rules! read {
    ($self:ident, |$c:ident| $body:expr) => {
        match &$self.replica {
            Some($c) => $body,
            None => {
                let $c = &$self.conn;
                $body
            }
        }
    };
}
pub(crate) use read;

/// Which database a pool is for: what `[database.pool]` leaves to the backend.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Backend {
    /// A connection is a file handle: nothing between it and the database can go stale, and
    /// a ping would be one more round trip through sqlx's worker thread on every pool
    /// checkout (every statement outside a transaction), so it is never pinged.
    Sqlite,
    /// Pinged as `test_before_acquire` says (a network connection can go stale).
    Postgres,
}

fn options(url: &str, pool: &PoolConfig, backend: Backend) -> ConnectOptions {
    let max = match (pool.max_connections, backend) {
        (0, Backend::Sqlite) => PoolConfig::SQLITE_MAX,
        (0, Backend::Postgres) => PoolConfig::POSTGRES_MAX,
        (n, _) => n,
    };
    let mut options = ConnectOptions::new(url.to_owned());
    options
        .max_connections(max)
        .min_connections(pool.min_connections.min(max))
        .connect_timeout(Duration::from_secs(pool.acquire_timeout_secs.max(1)))
        .acquire_timeout(Duration::from_secs(pool.acquire_timeout_secs.max(1)))
        .idle_timeout(Duration::from_secs(pool.idle_timeout_secs))
        .max_lifetime(Duration::from_secs(pool.max_lifetime_secs))
        .test_before_acquire(backend == Backend::Postgres && pool.test_before_acquire)
        // Statements are not logged: they can carry message text.
        .sqlx_logging(false);
    options
}

impl SqlStore {
    /// Connects (failing fast when the database cannot be reached) without migrating.
    pub async fn connect(config: &DatabaseConfig, data_dir: &Path) -> Result<Self, StoreError> {
        match config {
            DatabaseConfig::Sqlite {
                path,
                synchronous,
                commit_linger_us,
                pool,
            } => {
                let path = sqlite_path(path.as_deref(), data_dir);
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir)
                        .map_err(|e| StoreError::Unavailable(Box::new(e)))?;
                }
                let mut options = options(
                    &format!("sqlite://{}?mode=rwc", path.display()),
                    pool,
                    Backend::Sqlite,
                );
                let sqlx_synchronous = match synchronous {
                    Synchronous::Normal => sqlx::sqlite::SqliteSynchronous::Normal,
                    Synchronous::Full => sqlx::sqlite::SqliteSynchronous::Full,
                };
                options.map_sqlx_sqlite_opts(move |o| {
                    o.journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
                        .synchronous(sqlx_synchronous)
                        .busy_timeout(Duration::from_secs(5))
                        .foreign_keys(true)
                        // Checkpoints run on a thread of their own, not in a commit
                        // (`sqlite_writer::Checkpointer`).
                        .pragma("wal_autocheckpoint", "0")
                        // sqlx's worker thread sends a result's rows through a channel of
                        // this many; past it, each row the caller takes wakes the worker for
                        // the next one (the `events` worker reads ~200 members a batch).
                        .row_buffer_size(ROW_BUFFER)
                });
                options.map_sqlx_sqlite_pool_opts(|o| {
                    o.after_connect(|conn, _| Box::pin(stable_plans(conn)))
                });
                let conn = Database::connect(options).await.map_err(store_err)?;
                let queue = Arc::new(QueueLink::default());
                let writer = sqlite_writer::SqliteWriter::open(
                    &path,
                    *synchronous,
                    queue.clone(),
                    Duration::from_micros(*commit_linger_us),
                )?;
                Ok(Self {
                    conn,
                    replica: None,
                    writer: Some(Arc::new(writer)),
                    queue,
                    enqueued: None,
                })
            }
            DatabaseConfig::Postgres {
                url,
                replica_url,
                pool,
            } => {
                let conn =
                    Database::connect(options(url.expose().as_str(), pool, Backend::Postgres))
                        .await
                        .map_err(store_err)?;
                let replica = match replica_url {
                    Some(url) => Some(
                        Database::connect(options(url.expose().as_str(), pool, Backend::Postgres))
                            .await
                            .map_err(store_err)?,
                    ),
                    None => None,
                };
                Ok(Self {
                    conn,
                    replica,
                    writer: None,
                    queue: Arc::default(),
                    enqueued: None,
                })
            }
        }
    }

    /// Applies pending migrations; returns their names. Refuses a database migrated by a
    /// newer confab. They run in one transaction: a migration that fails leaves nothing
    /// behind, and (on SQLite) every statement runs on the same connection, so none checks a
    /// name against a schema another pooled connection has changed since (a `CREATE INDEX`
    /// after a `DROP INDEX` elsewhere reads "already exists"). On PostgreSQL an advisory lock
    /// makes nodes starting together take turns.
    pub async fn migrate(&self) -> Result<Vec<String>, StoreError> {
        let known = migrations::known();
        let tx = self.conn.begin().await.map_err(store_err)?;
        if self.conn.get_database_backend() == DbBackend::Postgres {
            tx.execute_unprepared("SELECT pg_advisory_xact_lock(7243012451)")
                .await
                .map_err(store_err)?;
        }
        let applied = applied_versions(&tx).await?;
        check_not_newer(&applied, &known)?;
        migrations::Migrator::up(&tx, None)
            .await
            .map_err(store_err)?;
        tx.commit().await.map_err(store_err)?;
        Ok(known.into_iter().filter(|m| !applied.contains(m)).collect())
    }

    /// The pool, for adapters that keep their own tables in the same database (the queue).
    pub fn connection(&self) -> DatabaseConnection {
        self.conn.clone()
    }

    pub(crate) fn queue_link(&self) -> &QueueLink {
        &self.queue
    }

    /// SQLite: the thread that owns the write connection (see `sqlite_writer`).
    pub(crate) fn sqlite_writer(&self) -> Option<Arc<sqlite_writer::SqliteWriter>> {
        self.writer.clone()
    }
}

/// The migrations recorded in the database (none when it was never migrated).
async fn applied_versions(conn: &impl ConnectionTrait) -> Result<Vec<String>, StoreError> {
    let backend = conn.get_database_backend();
    let exists = match backend {
        DbBackend::Postgres => {
            "SELECT 1 FROM information_schema.tables WHERE table_name = 'seaql_migrations'"
        }
        _ => "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'seaql_migrations'",
    };
    if conn
        .query_one_raw(Statement::from_string(backend, exists))
        .await
        .map_err(store_err)?
        .is_none()
    {
        return Ok(Vec::new());
    }
    let rows = conn
        .query_all_raw(Statement::from_string(
            backend,
            "SELECT version FROM seaql_migrations",
        ))
        .await
        .map_err(store_err)?;
    rows.iter()
        .map(|row| row.try_get::<String>("", "version").map_err(store_err))
        .collect()
}

fn check_not_newer(applied: &[String], known: &[String]) -> Result<(), StoreError> {
    let unknown: Vec<&str> = applied
        .iter()
        .filter(|m| !known.contains(m))
        .map(String::as_str)
        .collect();
    if unknown.is_empty() {
        Ok(())
    } else {
        Err(StoreError::Other(
            format!(
                "the database schema is newer than this confab (it has {}); run a confab at least as new as the one that migrated it",
                unknown.join(", ")
            )
            .into(),
        ))
    }
}

/// Maps sea-orm's errors onto the port's: uniqueness is `Conflict` and a missing referenced
/// row `NotFound` on both backends; a lost or busy database is `Unavailable`.
pub(crate) fn store_err(error: DbErr) -> StoreError {
    match error.sql_err() {
        Some(SqlErr::UniqueConstraintViolation(what)) => return StoreError::Conflict(what),
        Some(SqlErr::ForeignKeyConstraintViolation(what)) => {
            return StoreError::NotFound(format!("a referenced row does not exist ({what})"));
        }
        _ => {}
    }
    if is_unavailable(&error) {
        StoreError::Unavailable(Box::new(error))
    } else {
        StoreError::Other(Box::new(error))
    }
}

fn is_unavailable(error: &DbErr) -> bool {
    let sqlx_error = match error {
        DbErr::ConnectionAcquire(_) | DbErr::Conn(_) => return true,
        DbErr::Exec(RuntimeErr::SqlxError(e)) | DbErr::Query(RuntimeErr::SqlxError(e)) => e,
        _ => return false,
    };
    match &**sqlx_error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        // PostgreSQL: connection exceptions (08…) and shutdowns (57P…); SQLite: busy/locked.
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            code.starts_with("08") || code.starts_with("57P") || matches!(&*code, "5" | "6" | "517")
        }),
        _ => false,
    }
}

#[async_trait]
impl HealthCheck for SqlStore {
    async fn health(&self) -> ComponentHealth {
        database_health(&self.conn).await
    }
}

/// `SELECT 1` within 2 s: the health of the store and of the queue kept in the same database.
pub(crate) async fn database_health(conn: &DatabaseConnection) -> ComponentHealth {
    let kind = backend_kind(conn);
    let started = Instant::now();
    let checked =
        tokio::time::timeout(Duration::from_secs(2), conn.execute_unprepared("SELECT 1")).await;
    match checked {
        Ok(Ok(_)) => ComponentHealth::new(HealthStatus::Ok, kind).with_latency(started.elapsed()),
        Ok(Err(e)) => ComponentHealth::new(HealthStatus::Down, kind).with_error(e.to_string()),
        Err(_) => ComponentHealth::new(HealthStatus::Down, kind)
            .with_error("no answer to SELECT 1 within 2 s"),
    }
}

/// `postgres` or `sqlite`, as `/health` names it.
pub(crate) fn backend_kind(conn: &DatabaseConnection) -> &'static str {
    match conn.get_database_backend() {
        DbBackend::Postgres => "postgres",
        DbBackend::Sqlite => "sqlite",
        _ => "sql",
    }
}

#[async_trait]
impl Store for SqlStore {
    async fn begin(&self) -> Result<Box<dyn StoreTx>, StoreError> {
        let tx = self.conn.begin().await.map_err(store_err)?;
        Ok(Box::new(Sql {
            conn: tx,
            replica: None,
            writer: None,
            queue: self.queue.clone(),
            enqueued: Some(Mutex::default()),
        }))
    }
    async fn append_messages(&self, batch: &[Append]) -> Result<Vec<Appended>, StoreError> {
        match &self.writer {
            Some(writer) => writer.append(batch).await,
            None => self.append(batch).await,
        }
    }
}

#[async_trait]
impl StoreTx for SqlTx {
    async fn commit(self: Box<Self>) -> Result<(), StoreError> {
        self.conn.commit().await.map_err(store_err)?;
        let enqueued = self
            .enqueued
            .map(|e| e.into_inner().unwrap_or_else(PoisonError::into_inner))
            .unwrap_or_default();
        self.queue.committed(enqueued.iter().map(String::as_str));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{Backend, DatabaseConfig, PoolConfig, SqlStore, check_not_newer, options};

    /// Every connection to a SQLite database, pooled or the writer's, keeps its plans whatever
    /// is bound: otherwise each `.one()` (a bound `LIMIT 1`) is prepared again on every run.
    #[tokio::test]
    async fn every_sqlite_connection_plans_without_the_values_bound() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqlStore::connect(&DatabaseConfig::default(), dir.path())
            .await
            .unwrap();
        let pool = store.connection().get_sqlite_connection_pool().clone();
        // All of the pool's connections at once: each was made by the pool, none reused.
        let mut held = Vec::new();
        for _ in 0..PoolConfig::SQLITE_MAX {
            held.push(pool.acquire().await.unwrap());
        }
        for conn in &mut held {
            let mut handle = conn.lock_handle().await.unwrap();
            assert_eq!(
                super::planner_stability(handle.as_raw_handle(), None),
                Ok(true)
            );
        }
        let writer = store.sqlite_writer().expect("SQLite has a writer thread");
        let on_writer = writer
            .run(|conn| {
                conn.db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG)
                    .unwrap()
            })
            .await
            .unwrap();
        assert!(on_writer);
    }

    #[test]
    fn a_pool_size_of_zero_takes_the_backends_default_and_any_other_is_kept() {
        let size = |max_connections, backend| {
            let pool = PoolConfig {
                max_connections,
                min_connections: 8,
                ..PoolConfig::default()
            };
            let o = options("sqlite::memory:", &pool, backend);
            (o.get_max_connections(), o.get_min_connections())
        };
        assert_eq!(PoolConfig::default().max_connections, 0);
        // The minimum never exceeds the maximum.
        assert_eq!(size(0, Backend::Sqlite), (Some(4), Some(4)));
        assert_eq!(size(0, Backend::Postgres), (Some(10), Some(8)));
        assert_eq!(size(2, Backend::Postgres), (Some(2), Some(2)));
        assert_eq!(size(16, Backend::Sqlite), (Some(16), Some(8)));
    }

    #[test]
    fn a_schema_with_unknown_migrations_is_refused_by_name() {
        let known = vec!["m0001_initial".to_owned()];
        assert!(check_not_newer(&known, &known).is_ok());
        assert!(check_not_newer(&[], &known).is_ok());
        let err =
            check_not_newer(&["m0001_initial".into(), "m0002_future".into()], &known).unwrap_err();
        assert!(err.to_string().contains("database error"));
        let source = std::error::Error::source(&err).unwrap().to_string();
        assert!(
            source.contains("m0002_future") && source.contains("newer"),
            "{source}"
        );
    }
}
