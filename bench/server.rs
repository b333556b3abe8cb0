//! What the load tools share: a release `confab serve` on a fresh data dir (pinned to CPUs
//! with `taskset` where there is one), its CPU time and RSS from /proc, registering users,
//! and writing a `--timeline` file.

#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// `binary serve` on 127.0.0.1:`port` with the settings every load tool uses (production,
/// cheap password hashing for setup, no sign-in limits) and `env` on top; `cpus`: `taskset -c`
/// list, or `all`.
pub fn spawn(
    binary: &str,
    port: u16,
    data: &std::path::Path,
    env: &[(String, String)],
    cpus: &str,
) -> Child {
    let pin = cpus != "all" && std::path::Path::new("/usr/bin/taskset").exists();
    let mut cmd = if pin {
        let mut c = Command::new("taskset");
        c.args(["-c", cpus, binary]);
        c
    } else {
        Command::new(binary)
    };
    cmd.arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("ENVIRONMENT", "production")
        .env("JWT_SECRET", "bench-secret-bench-secret-bench-secret")
        .env("CONFAB_LISTEN", format!("127.0.0.1:{port}"))
        .env("CONFAB_DATA_DIR", data)
        .env("CONFAB__LOG__LEVEL", "warn")
        .env("CONFAB__AUTH__RATE_LIMIT_PER_IP_PER_MINUTE", "1000000")
        .env("CONFAB__AUTH__RATE_LIMIT_PER_EMAIL_PER_MINUTE", "1000000")
        // Registration is setup here, not what is measured.
        .env("CONFAB__AUTH__ARGON2_MEMORY_KIB", "1024")
        .env("CONFAB__AUTH__ARGON2_ITERATIONS", "1")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start confab")
}

/// Waits until `base` answers `/ready` with 200 (30 s at most).
pub async fn wait_ready(http: &reqwest::Client, base: &str) {
    let started = Instant::now();
    while http
        .get(format!("{base}/ready"))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .ok()
        != Some(200)
    {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the server did not get ready"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// [`spawn`] on a free port, once ready: the child and its base URL.
pub async fn start(
    binary: &str,
    data: &std::path::Path,
    env: &[(String, String)],
    cpus: &str,
) -> (Child, String) {
    let binary = std::fs::canonicalize(binary)
        .unwrap_or_else(|_| panic!("{binary} is missing: build it with --release"));
    let port = free_port();
    let child = spawn(binary.to_str().expect("utf-8 path"), port, data, env, cpus);
    let base = format!("http://127.0.0.1:{port}");
    wait_ready(&reqwest::Client::new(), &base).await;
    (child, base)
}

/// utime + stime of `pid`, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // After the name: state is field 3, utime 14, stime 15 (1-based over the whole line).
    let ticks: f64 = fields.get(11..13).map_or(0.0, |f| {
        f.iter().filter_map(|v| v.parse::<f64>().ok()).sum()
    });
    ticks / 100.0
}

/// A process's resident memory from `/proc/<pid>/status`, in MiB: the total, and its anonymous
/// (heap, stacks: what the process itself holds) and file-backed (mostly the binary's code,
/// mapped by the kernel ahead of use: shared and reclaimable) parts.
#[derive(Clone, Copy, Debug, Default)]
pub struct Rss {
    pub total: f64,
    pub anon: f64,
    pub file: f64,
}

impl std::fmt::Display for Rss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.1} MiB (anon {:.1}, file {:.1})",
            self.total, self.anon, self.file
        )
    }
}

pub fn rss(pid: u32) -> Rss {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let mib = |field: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(0.0, |kib| kib / 1024.0)
    };
    Rss {
        total: mib("VmRSS:"),
        anon: mib("RssAnon:"),
        file: mib("RssFile:"),
    }
}

/// Registers `email`: its user id and access token.
pub async fn register(http: &reqwest::Client, base: &str, email: String) -> (String, String) {
    let r: Value = http
        .post(format!("{base}/api/v1/auth/register"))
        .json(&json!({"email": email, "password": "load test password", "name": "Load"}))
        .send()
        .await
        .expect("register")
        .json()
        .await
        .expect("register body");
    (
        r["user"]["id"].as_str().expect("user id").to_owned(),
        r["accessToken"].as_str().expect("token").to_owned(),
    )
}

/// Writes `points` (sent, µs on any clock; latency, µs) to `path` as `sent_ms latency_us`
/// lines, sent counted from the earliest point (`--timeline FILE`).
pub fn write_timeline(path: &str, points: impl IntoIterator<Item = (u64, u64)>) {
    use std::fmt::Write as _;
    let points: Vec<(u64, u64)> = points.into_iter().collect();
    let start = points.iter().map(|(sent, _)| *sent).min().unwrap_or(0);
    let mut lines = String::with_capacity(points.len() * 16);
    for (sent, latency) in points {
        let _ = writeln!(lines, "{:.3} {latency}", (sent - start) as f64 / 1000.0);
    }
    std::fs::write(path, lines).expect("the timeline file can be written");
}
