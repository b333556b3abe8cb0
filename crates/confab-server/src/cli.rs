//! The command line: `confab serve | migrate | config check | doctor`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// confab: the whole backend of an AI-assisted real-time chat product, in one binary.
///
/// With no configuration it runs on embedded backends under ./confab-data (SQLite, in-memory
/// cache, a durable queue in the database, local media, mail as .eml files). Point it at
/// PostgreSQL, Redis, RabbitMQ, S3 and SMTP with environment variables or a config file:
/// `config/default.toml` documents every setting.
#[derive(Debug, Parser)]
#[command(name = "confab", version, propagate_version = true)]
pub struct Cli {
    /// A TOML config file. Without it, ./confab.toml is read if it exists.
    #[arg(
        long,
        short = 'c',
        global = true,
        value_name = "FILE",
        env = "CONFAB_CONFIG"
    )]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start the server (HTTP API, Socket.IO, workers) and run until SIGINT/SIGTERM.
    Serve {
        /// What this process runs: `all` (default), `api` (HTTP + Socket.IO) or `worker`
        /// (queue consumers and scheduled jobs; serves only the probes and /metrics).
        #[arg(long, value_enum, default_value_t = Role::All, env = "CONFAB_ROLE")]
        role: Role,
        /// Listen on this address instead of the configured one, e.g. 0.0.0.0:8080.
        #[arg(long, value_name = "ADDR")]
        listen: Option<SocketAddr>,
    },
    /// Apply pending database migrations, then exit.
    Migrate,
    /// Inspect the configuration.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// Check every configured backend and print a table: component, status, latency, error.
    /// Exits 1 when a component is down.
    Doctor,
    /// Inspect the queues and their dead letters.
    Queue {
        #[command(subcommand)]
        action: QueueAction,
    },
    /// Manage accounts.
    Users {
        #[command(subcommand)]
        action: UsersAction,
    },
}

#[derive(Debug, Subcommand)]
pub enum UsersAction {
    /// Import accounts from an older system: a JSON-lines file, one
    /// {"email", "name", "passwordHash", "emailVerified"?} per line. bcrypt and argon2 hashes
    /// are kept and re-hashed with argon2id at each user's next login. Existing emails are
    /// skipped, so a re-run is harmless. Exits 1 if any line was rejected.
    Import {
        /// The JSON-lines file.
        file: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum QueueAction {
    /// Messages waiting (or in flight, or waiting to be retried) and dead, per queue.
    Stats,
    /// Messages that used up their attempts.
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
}

#[derive(Debug, Subcommand)]
pub enum DlqAction {
    /// List a queue's dead letters, oldest first, with their last error.
    List {
        #[arg(value_parser = clap::builder::PossibleValuesParser::new(confab_core::ports::broker::queues::ALL))]
        queue: String,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Put a queue's dead letters back on the queue, their attempts reset.
    Replay {
        #[arg(value_parser = clap::builder::PossibleValuesParser::new(confab_core::ports::broker::queues::ALL))]
        queue: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigAction {
    /// Print the configuration in force (secrets redacted); exit 2 if it is invalid.
    Check,
}

/// The part a process plays in a deployment (SPEC §1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Role {
    All,
    Api,
    Worker,
}
