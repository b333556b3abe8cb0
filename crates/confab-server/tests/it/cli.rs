//! The `confab` binary as a user runs it: exit codes, one-line errors, `config check`,
//! `doctor`, and the JSON logs of `serve`.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};

/// The binary with an empty environment (the developer's variables must not leak in) in `dir`.
fn confab(dir: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_confab"));
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .current_dir(dir);
    command
}

fn run(command: &mut Command) -> (Output, String, String) {
    let output = command.output().expect("the binary runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (output, stdout, stderr)
}

fn assert_one_line_config_error(command: &mut Command, setting: &str) -> String {
    let (output, stdout, stderr) = run(command);
    assert_eq!(output.status.code(), Some(2), "exit 2; stderr: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "exactly one line: {stderr}");
    assert!(
        stderr.starts_with(&format!("confab: CONFIG_ERROR {setting}")),
        "{stderr}"
    );
    assert!(stderr.contains("Fix:"), "{stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("backtrace"),
        "{stderr}"
    );
    assert!(stdout.is_empty(), "{stdout}");
    stderr
}

#[test]
fn a_bad_value_stops_startup_with_one_line_and_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let line = assert_one_line_config_error(
        confab(dir.path()).arg("serve").env("PORT", "eighty"),
        "server.listen",
    );
    assert!(line.contains("PORT"), "names the variable: {line}");

    assert_one_line_config_error(
        confab(dir.path())
            .arg("serve")
            .env("MONGODB_URI", "mongodb://localhost/chat"),
        "database",
    );
    assert_one_line_config_error(
        confab(dir.path())
            .arg("serve")
            .env("ENVIRONMENT", "production"),
        "auth.jwt_secret",
    );
}

#[test]
fn an_unknown_key_in_the_config_file_stops_startup() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("confab.toml"),
        "[server]\nlisten_adress = \"0.0.0.0:1\"\n",
    )
    .unwrap();
    let line =
        assert_one_line_config_error(confab(dir.path()).arg("serve"), "server.listen_adress");
    assert!(line.contains("confab.toml"), "names the file: {line}");

    std::fs::write(dir.path().join("other.toml"), "[log]\nformat = \"xml\"\n").unwrap();
    assert_one_line_config_error(
        confab(dir.path()).args(["--config", "other.toml", "config", "check"]),
        "log.format",
    );
}

#[test]
fn config_check_prints_the_effective_configuration_with_secrets_redacted() {
    let dir = tempfile::tempdir().unwrap();
    let (output, stdout, stderr) = run(confab(dir.path())
        .args(["config", "check"])
        .env("DATABASE_URL", "postgres://app:db-pass-1@db.internal/chat")
        .env("JWT_SECRET", "jwt-secret-2-jwt-secret-2-jwt-secret-2")
        .env("OPENAI_API_KEY", "sk-openai-3")
        .env("EMAIL_HOST", "smtp.example.com")
        .env("EMAIL_PASS", "mail-pass-4")
        .env("CONFAB__SERVER__REQUEST_TIMEOUT_SECS", "12"));
    assert!(output.status.success(), "{stderr}");
    for secret in ["db-pass-1", "jwt-secret-2", "sk-openai-3", "mail-pass-4"] {
        assert!(!stdout.contains(secret), "{secret} leaked:\n{stdout}");
    }
    assert!(stdout.contains("[redacted]"), "{stdout}");
    let printed: toml::Table = toml::from_str(&stdout).expect("the output is TOML");
    assert_eq!(printed["database"]["kind"].as_str(), Some("postgres"));
    assert_eq!(
        printed["database"]["url"].as_str(),
        Some("postgres://app:redacted@db.internal/chat")
    );
    assert_eq!(
        printed["server"]["request_timeout_secs"].as_integer(),
        Some(12)
    );
    assert_eq!(printed["mail"]["kind"].as_str(), Some("smtp"));
    assert!(
        !dir.path().join("confab-data").exists(),
        "check changes nothing on disk"
    );
}

#[test]
fn config_check_exits_2_on_a_bad_configuration() {
    let dir = tempfile::tempdir().unwrap();
    assert_one_line_config_error(
        confab(dir.path())
            .args(["config", "check"])
            .env("REDIS_URL", "http://not-redis"),
        "cache.url",
    );
}

#[test]
fn version_and_help_tell_the_user_what_there_is() {
    let dir = tempfile::tempdir().unwrap();
    let (output, stdout, _) = run(confab(dir.path()).arg("--version"));
    assert!(output.status.success());
    assert_eq!(
        stdout.trim(),
        format!("confab {}", env!("CARGO_PKG_VERSION"))
    );

    let (output, stdout, _) = run(confab(dir.path()).arg("--help"));
    assert!(output.status.success());
    for word in [
        "serve",
        "migrate",
        "config",
        "doctor",
        "--config",
        "default.toml",
    ] {
        assert!(stdout.contains(word), "help mentions {word}:\n{stdout}");
    }
    let (_, stdout, _) = run(confab(dir.path()).args(["serve", "--help"]));
    for word in ["--role", "all", "api", "worker", "--listen"] {
        assert!(
            stdout.contains(word),
            "serve help mentions {word}:\n{stdout}"
        );
    }
    let (output, _, stderr) = run(confab(dir.path()).arg("frobnicate"));
    assert_eq!(
        output.status.code(),
        Some(2),
        "usage errors exit 2: {stderr}"
    );
}

#[test]
fn doctor_prints_the_component_table() {
    let dir = tempfile::tempdir().unwrap();
    let (output, stdout, stderr) = run(confab(dir.path()).arg("doctor"));
    assert!(output.status.success(), "{stderr}");
    assert!(stdout.starts_with("COMPONENT"), "{stdout}");
    let ai = stdout
        .lines()
        .find(|l| l.starts_with("ai "))
        .expect("an ai row");
    assert!(ai.contains("unconfigured"), "{ai}");
    assert!(stdout.contains("overall: ok"), "{stdout}");
}

#[test]
fn migrate_applies_the_schema_once_then_reports_it_up_to_date() {
    let dir = tempfile::tempdir().unwrap();
    let (output, stdout, stderr) = run(confab(dir.path()).arg("migrate"));
    assert!(output.status.success(), "{stderr}");
    assert!(
        stdout.contains("confab.db") && stdout.contains("applied m0001_initial"),
        "{stdout}"
    );
    assert!(dir.path().join("confab-data/confab.db").exists());
    let (output, stdout, stderr) = run(confab(dir.path()).arg("migrate"));
    assert!(output.status.success(), "{stderr}");
    assert!(stdout.contains("up to date"), "{stdout}");
}

#[test]
fn an_unreachable_database_stops_startup_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    // Port 1 on loopback refuses at once.
    let (output, stdout, stderr) = run(confab(dir.path())
        .arg("serve")
        .env("DATABASE_URL", "postgres://app:pw-9@127.0.0.1:1/chat")
        .env("CONFAB__DATABASE__POOL__ACQUIRE_TIMEOUT_SECS", "2"));
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.starts_with(
            "confab: cannot connect to the database postgres://app:redacted@127.0.0.1:1/chat"
        ),
        "{stderr}"
    );
    assert!(!stderr.contains("pw-9") && !stdout.contains("pw-9"));
}

pub type Lines = tokio::io::Lines<BufReader<tokio::process::ChildStdout>>;

/// `confab serve` on a free port with JSON logs, `vars` added to a clean environment; returns
/// once it listens, with the log lines read so far and its address.
pub async fn spawn_serve(
    dir: &Path,
    vars: &[(&str, &str)],
) -> (tokio::process::Child, Lines, Vec<String>, String) {
    let mut command = confab(dir);
    command
        .arg("serve")
        .env("ENVIRONMENT", "production")
        .env("JWT_SECRET", "a-test-secret-that-is-long-enough-0123456789")
        .env("CONFAB_LISTEN", "127.0.0.1:0")
        .env("CONFAB_DATA_DIR", dir.join("data"))
        .envs(vars.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = tokio::process::Command::from(command)
        .kill_on_drop(true)
        .spawn()
        .expect("confab starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    let address = loop {
        let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .expect("a log line in time")
            .unwrap()
            .expect("the server logs before it listens");
        let value: serde_json::Value = serde_json::from_str(&line).expect("every line is JSON");
        seen.push(line);
        if value["message"] == "Listening." {
            break value["address"].as_str().unwrap().to_owned();
        }
    };
    (child, lines, seen, address)
}

#[tokio::test]
async fn serve_logs_json_lines_with_request_ids_and_no_secrets_then_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let jwt = "jwt-secret-value-0123456789-abcdefghij";
    let (mut child, mut lines, mut seen, address) = spawn_serve(
        dir.path(),
        &[
            ("ENVIRONMENT", "production"),
            ("JWT_SECRET", jwt),
            // Unreachable: the cache starts degraded and its URL is still logged redacted.
            ("REDIS_URL", "redis://:db-pass-77@127.0.0.1:1/0"),
        ],
    )
    .await;

    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let response = client
        .get(format!("http://{address}/nope"))
        .header("x-request-id", "trace-me-1")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    assert_eq!(
        client
            .get(format!("http://{address}/live"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    let pid = child.id().unwrap().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("stops in time after SIGTERM")
        .unwrap();
    assert!(status.success(), "SIGTERM is a clean exit: {status:?}");
    while let Some(line) = lines.next_line().await.unwrap() {
        seen.push(line);
    }

    let mut request_lines = 0;
    for line in &seen {
        assert!(
            !line.contains("db-pass-77") && !line.contains(jwt),
            "a secret leaked: {line}"
        );
        let value: serde_json::Value = serde_json::from_str(line).expect("every line is JSON");
        for key in ["timestamp", "level", "target", "message"] {
            assert!(value.get(key).is_some(), "{key} missing: {line}");
        }
        if value["requestId"] == "trace-me-1" {
            request_lines += 1;
            assert_eq!(value["route"], "<unmatched>", "{line}");
            assert_eq!(value["method"], "GET", "{line}");
            assert_eq!(value["status"], 404, "{line}");
            assert!(value["latency_ms"].is_number(), "{line}");
        }
    }
    assert_eq!(
        request_lines,
        1,
        "one access-log line for the request:\n{}",
        seen.join("\n")
    );
    let listening = seen.iter().find(|l| l.contains("Listening.")).unwrap();
    assert!(
        listening.contains("redis://:redacted@127.0.0.1:1/0"),
        "{listening}"
    );
    assert!(
        seen.iter().any(|l| l.contains("Shutting down")),
        "{}",
        seen.join("\n")
    );
}

#[tokio::test]
async fn rediss_urls_connect_over_verified_tls() {
    let Some(redis) = crate::helpers::TempRedis::start_tls() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let ca = redis.ca_file();
    // The binary trusts the test's certificate authority through the standard variable.
    let (mut child, _lines, _seen, address) = spawn_serve(
        dir.path(),
        &[
            ("REDIS_URL", &redis.url()),
            ("SSL_CERT_FILE", ca.to_str().unwrap()),
        ],
    )
    .await;
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    confab_core::testing::eventually(
        "the cache is up over TLS",
        Duration::from_secs(5),
        || async {
            let health: serde_json::Value = client
                .get(format!("http://{address}/health"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            health["components"]["cache"]["status"] == "ok"
        },
    )
    .await;
    child.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_commands_show_stats_list_dead_letters_and_replay_them() {
    use confab_adapters::db_broker::DbBroker;
    use confab_adapters::sql_store::SqlStore;
    use confab_core::ports::broker::{Broker, Envelope, RetryPolicy};
    use confab_server::config::DatabaseConfig;

    let dir = tempfile::tempdir().unwrap();
    let (output, _, stderr) = run(confab(dir.path()).arg("migrate"));
    assert!(output.status.success(), "{stderr}");
    // A mail that failed its only attempt, in the embedded database.
    let store = SqlStore::connect(&DatabaseConfig::default(), &dir.path().join("confab-data"))
        .await
        .unwrap();
    let broker = DbBroker::new(
        store.connection(),
        RetryPolicy {
            max_attempts: 1,
            base_delay: Duration::from_millis(1),
        },
        Duration::from_secs(30),
    );
    let id = confab_core::domain::EventId::new();
    let envelope = Envelope {
        id,
        kind: "mail.verify_email".into(),
        attempt: 0,
        created_at: confab_core::domain::now(),
        trace_id: None,
        payload: serde_json::json!({"to": "ann@example.com"}),
    };
    broker.publish("mail", &envelope).await.unwrap();
    let got = broker
        .receive("mail", 1, Duration::from_secs(5))
        .await
        .unwrap();
    broker
        .nack(&got[0], "smtp: connection refused")
        .await
        .unwrap();

    let (output, stdout, stderr) = run(confab(dir.path()).args(["queue", "stats"]));
    assert!(output.status.success(), "{stderr}");
    let mail = stdout
        .lines()
        .find(|l| l.starts_with("mail "))
        .expect("a mail row");
    assert_eq!(
        mail.split_whitespace().collect::<Vec<_>>(),
        ["mail", "0", "1"],
        "{stdout}"
    );

    let (output, stdout, _) = run(confab(dir.path()).args(["queue", "dlq", "list", "mail"]));
    assert!(output.status.success());
    assert!(
        stdout.contains(&id.to_string()) && stdout.contains("smtp: connection refused"),
        "{stdout}"
    );

    let (output, stdout, _) = run(confab(dir.path()).args(["queue", "dlq", "replay", "mail"]));
    assert!(output.status.success());
    assert!(stdout.contains("replayed 1"), "{stdout}");
    let again = broker
        .receive("mail", 1, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(
        again[0].envelope.id, id,
        "the replayed mail is delivered again"
    );

    let (output, _, stderr) = run(confab(dir.path()).args(["queue", "dlq", "list", "mails"]));
    assert_eq!(
        output.status.code(),
        Some(2),
        "an unknown queue is a usage error: {stderr}"
    );
}
