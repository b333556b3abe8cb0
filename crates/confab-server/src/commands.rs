//! What each subcommand does, with its exit code. Only `main` prints process-level errors.

use std::io::Write;
use std::process::ExitCode;

use crate::cli::{Cli, Command, ConfigAction, DlqAction, QueueAction, Role, UsersAction};
use confab_adapters::sql_store::{SqlStore, known_migrations};
use confab_core::ports::health::{ComponentHealth, HealthStatus};

use crate::config::{Config, ConfigError, Env};
use crate::health::Components;
use crate::startup::{Application, shutdown_signal};

/// Exit code for a configuration error (SPEC §2).
pub const EXIT_CONFIG: u8 = 2;

/// A command's failure, already mapped to how the process ends.
pub enum Failure {
    Config(ConfigError),
    Other(anyhow::Error),
}

impl From<ConfigError> for Failure {
    fn from(e: ConfigError) -> Self {
        Self::Config(e)
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Self::Other(e)
    }
}

pub async fn run(cli: Cli) -> Result<ExitCode, Failure> {
    let env = Env::from_process();
    let mut config = Config::load(cli.config.as_deref(), &env)?;
    match cli.command {
        Command::Serve { role, listen } => {
            if let Some(listen) = listen {
                config.server.listen = listen;
            }
            Box::pin(serve(config, role)).await
        }
        Command::Config {
            action: ConfigAction::Check,
        } => {
            // Checks the secret rule without creating files: `check` must not change anything.
            if config.auth.jwt_secret.is_none() && !config.server.environment.is_development() {
                config.resolve_jwt_secret()?;
            }
            let mut out = std::io::stdout().lock();
            let _ = writeln!(
                out,
                "# confab {} — configuration in force (secrets redacted)",
                env!("CARGO_PKG_VERSION")
            );
            let _ = write!(out, "{}", config.to_redacted_toml());
            let _ = writeln!(out, "# OK: the configuration is valid.");
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate => {
            let target = config.database.describe(&config.server.data_dir);
            let store = SqlStore::connect(&config.database, &config.server.data_dir)
                .await
                .map_err(|e| {
                    anyhow::Error::new(e)
                        .context(format!("cannot connect to the database {target}"))
                })?;
            let applied = store.migrate().await.map_err(|e| {
                anyhow::Error::new(e).context(format!("cannot migrate the database {target}"))
            })?;
            if applied.is_empty() {
                println!(
                    "database {target}: up to date ({} migrations).",
                    known_migrations().len()
                );
            } else {
                println!("database {target}: applied {}.", applied.join(", "));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Doctor => Ok(doctor(&config).await),
        Command::Queue { action } => queue(&config, action).await,
        Command::Users {
            action: UsersAction::Import { file },
        } => import_users(&config, &file).await,
    }
}

async fn serve(mut config: Config, role: Role) -> Result<ExitCode, Failure> {
    config.resolve_jwt_secret()?;
    crate::telemetry::init(&config.log, config.server.environment)?;
    let app = Application::build(config.clone(), role).await?;
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        role = ?role,
        environment = %config.server.environment,
        address = %app.local_addr(),
        backends = %config.summary(),
        "Listening."
    );
    let token = app.shutdown_token();
    tokio::spawn(async move {
        shutdown_signal().await;
        token.cancel();
    });
    app.run_until_stopped().await?;
    Ok(ExitCode::SUCCESS)
}

/// Prints the component table; exit 1 when something is down.
async fn doctor(config: &Config) -> ExitCode {
    let report = match crate::startup::Ports::build(config).await {
        Ok(ports) => Components::for_ports(config, &ports).check().await,
        // A backend that cannot even be set up is a row of its own, not the end of the table.
        Err(e) => crate::health::Report {
            status: HealthStatus::Down,
            components: vec![(
                "database",
                true,
                ComponentHealth::new(
                    HealthStatus::Down,
                    config.database.describe(&config.server.data_dir),
                )
                .with_error(format!("{e:#}")),
            )],
        },
    };
    println!(
        "{:<10} {:<13} {:<12} {:>9}  LAST ERROR",
        "COMPONENT", "STATUS", "KIND", "LATENCY"
    );
    for (name, _, health) in &report.components {
        println!(
            "{:<10} {:<13} {:<12} {:>9}  {}",
            name,
            health.status.as_str(),
            health.kind,
            health
                .latency_ms
                .map_or_else(|| "-".into(), |ms| format!("{ms} ms")),
            health.last_error.as_deref().unwrap_or("-"),
        );
    }
    println!("overall: {}", report.status.as_str());
    if report
        .components
        .iter()
        .any(|(_, _, h)| h.status == HealthStatus::Down)
    {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// `confab queue …`: what is waiting and what died, on the configured broker.
async fn queue(config: &Config, action: QueueAction) -> Result<ExitCode, Failure> {
    let ports = crate::startup::Ports::build(config).await?;
    let broker = &ports.broker;
    let fail = |e: confab_core::ports::broker::BrokerError| Failure::Other(anyhow::Error::new(e));
    match action {
        QueueAction::Stats => {
            println!("{:<16} {:>9} {:>6}", "QUEUE", "PENDING", "DEAD");
            for queue in confab_core::ports::broker::queues::ALL {
                let depth = broker.depth(queue).await.map_err(fail)?;
                println!("{queue:<16} {:>9} {:>6}", depth.pending, depth.dead);
            }
        }
        QueueAction::Dlq {
            action: DlqAction::List { queue, limit },
        } => {
            let dead = broker.dead_letters(&queue, limit).await.map_err(fail)?;
            println!("{} dead letter(s) on {queue}", dead.len());
            for letter in dead {
                println!(
                    "{}  {}  {}  attempts {}  {}",
                    letter.envelope.id,
                    letter.failed_at.to_rfc3339(),
                    letter.envelope.kind,
                    letter.envelope.attempt,
                    letter.last_error
                );
            }
        }
        QueueAction::Dlq {
            action: DlqAction::Replay { queue },
        } => {
            let replayed = broker.replay_dead_letters(&queue).await.map_err(fail)?;
            println!("replayed {replayed} dead letter(s) onto {queue}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `confab users import FILE`: one line of output per rejected line (never its hash), then
/// the totals.
async fn import_users(config: &Config, file: &std::path::Path) -> Result<ExitCode, Failure> {
    use confab_core::services::auth::{ImportRecord, Imported, import_user};
    let text = std::fs::read_to_string(file)
        .map_err(|e| anyhow::Error::new(e).context(format!("cannot read {}", file.display())))?;
    let target = config.database.describe(&config.server.data_dir);
    let store = SqlStore::connect(&config.database, &config.server.data_dir)
        .await
        .map_err(|e| {
            anyhow::Error::new(e).context(format!("cannot connect to the database {target}"))
        })?;
    store.migrate().await.map_err(|e| {
        anyhow::Error::new(e).context(format!("cannot migrate the database {target}"))
    })?;
    let (mut created, mut existing, mut rejected) = (0u64, 0u64, 0u64);
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let outcome = match serde_json::from_str::<ImportRecord>(line) {
            Ok(record) => import_user(&store, &record)
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(format!("not a valid record ({})", json_problem(&e))),
        };
        match outcome {
            Ok(Imported::Created) => created += 1,
            Ok(Imported::Exists) => existing += 1,
            Err(reason) => {
                rejected += 1;
                eprintln!("line {}: rejected: {reason}", index + 1);
            }
        }
    }
    println!("imported {created}, already present {existing}, rejected {rejected}");
    Ok(if rejected == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// What kind of JSON problem, without echoing the line (it may hold a hash).
fn json_problem(e: &serde_json::Error) -> &'static str {
    match e.classify() {
        serde_json::error::Category::Io => "unreadable",
        serde_json::error::Category::Syntax | serde_json::error::Category::Eof => "not JSON",
        serde_json::error::Category::Data => "missing or unexpected fields",
    }
}
