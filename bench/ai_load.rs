//! AI pipeline load tool (issue 6): starts a release `confab serve` (embedded defaults, or
//! whatever `--server-env` adds, e.g. `RABBITMQ_URL=…`) whose OpenAI-compatible provider is a
//! fake server in this process (`confab_adapters::testing::fake_llm`), then measures:
//!
//! 1. pipeline overhead: `POST /ai/messages` sent → the provider receives the call (p50/p99
//!    over `--requests` requests one after another);
//! 2. a cache hit end to end: the same question in a new session, `POST` sent → `ai:response`
//!    read on the user's socket (p50/p99, no provider call);
//! 3. token relay: `--streams` answers at once (spread over `--users` users, one socket each),
//!    each streamed by the fake at `--tokens-per-second`; every piece carries the moment the
//!    fake wrote it, so the client reads provider chunk → `ai:token` latency (p50/p99), plus
//!    server CPU per token and RSS.
//!
//! cargo build --release -p confab-server --example ai_load --bin confab
//! target/release/examples/ai_load [--requests 200] [--streams 1000 --users 100]
//!     [--tokens-per-second 20] [--seconds 10] [--binary target/release/confab]
//!     [--server-env KEY=VALUE ...] [--server-cpus 0|all] [--timeline FILE] [--in-step]
//!
//! The relay's streams begin at phases of their own (`FakeLlm::spread_streams`), as
//! independent answers do; `--in-step` lets every batch of calls the server makes pace in
//! step, so their pieces come as one burst per gap.
//! `--timeline FILE` writes every relayed piece as `sent_ms latency_us` lines (sent: ms
//! since the first piece), to see when the tail happens.

#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_precision_loss,
    clippy::cast_sign_loss,
    clippy::too_many_lines,
    clippy::unwrap_used
)]

#[path = "common.rs"]
mod common;
#[path = "server.rs"]
mod server;
#[path = "sio.rs"]
mod sio;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use confab_adapters::testing::fake_llm::{FakeLlm, Step, Wire};
use serde_json::{Value, json};

struct Args {
    binary: String,
    requests: usize,
    streams: usize,
    users: usize,
    tokens_per_second: u64,
    seconds: u64,
    server_env: Vec<(String, String)>,
    server_cpus: String,
    timeline: Option<String>,
    in_step: bool,
}

fn args() -> Args {
    let mut a = Args {
        binary: "target/release/confab".into(),
        requests: 200,
        streams: 1000,
        users: 100,
        tokens_per_second: 20,
        seconds: 10,
        server_env: Vec::new(),
        server_cpus: "0".into(),
        timeline: None,
        in_step: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--binary" => a.binary = value(),
            "--requests" => a.requests = value().parse().unwrap(),
            "--streams" => a.streams = value().parse().unwrap(),
            "--users" => a.users = value().parse().unwrap(),
            "--tokens-per-second" => a.tokens_per_second = value().parse().unwrap(),
            "--seconds" => a.seconds = value().parse().unwrap(),
            "--server-cpus" => a.server_cpus = value(),
            "--timeline" => a.timeline = Some(value()),
            "--in-step" => a.in_step = true,
            "--server-env" => {
                let kv = value();
                let (k, v) = kv.split_once('=').expect("KEY=VALUE");
                a.server_env.push((k.to_owned(), v.to_owned()));
            }
            other => panic!("unknown flag {other}"),
        }
    }
    a
}

fn micros_since_epoch() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// `at` as microseconds since the Unix epoch (the fake provider's clock in the pieces).
fn epoch_micros(at: Instant) -> u64 {
    static BASE: std::sync::OnceLock<(Instant, u64)> = std::sync::OnceLock::new();
    let (instant, micros) = *BASE.get_or_init(|| (Instant::now(), micros_since_epoch()));
    match at.checked_duration_since(instant) {
        Some(after) => micros + after.as_micros() as u64,
        None => micros.saturating_sub(instant.duration_since(at).as_micros() as u64),
    }
}

fn report(what: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    if samples.is_empty() {
        println!("{what}: no samples");
        return;
    }
    println!(
        "{what}: n {} p50 {:.2} ms p99 {:.2} ms max {:.2} ms",
        samples.len(),
        ms(common::percentile(&samples, 0.5)),
        ms(common::percentile(&samples, 0.99)),
        ms(samples[samples.len() - 1])
    );
}

async fn post_message(http: &reqwest::Client, base: &str, token: &str, message: &str) -> Value {
    let response = http
        .post(format!("{base}/api/v1/ai/messages"))
        .bearer_auth(token)
        .json(&json!({ "message": message }))
        .send()
        .await
        .expect("POST /ai/messages");
    assert_eq!(response.status().as_u16(), 202, "POST /ai/messages");
    response.json().await.unwrap()
}

/// Waits for the `ai:response` of `request` on `events`.
async fn response_of(events: &mut tokio::sync::mpsc::UnboundedReceiver<sio::Event>, request: &str) {
    loop {
        let event = tokio::time::timeout(Duration::from_secs(30), events.recv())
            .await
            .expect("an answer in time")
            .expect("the socket stays open");
        if event.name == "ai:response" && event.data["requestId"] == request {
            return;
        }
    }
}

/// The fake provider on a thread and runtime of its own (on the tool's CPU too): in the
/// clients' event loop, a piece waited for that loop's other work before it was even written,
/// and a relayed piece again before it was read, which the figures then charged to the server
/// (a capture of the loopback traffic showed the tool adding ~1.5 ms at the p50 with 1,000
/// streams). The kernel interleaves the two threads as their sockets become ready.
fn start_fake() -> FakeLlm {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("fake-provider".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                tx.send(FakeLlm::start(Wire::OpenAi).await).unwrap();
                std::future::pending::<()>().await;
            });
        })
        .unwrap();
    rx.recv().unwrap()
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = args();
    let fake = start_fake();
    fake.set_fallback(Step::pieces(&["Hello", "!"]));
    let mut env: Vec<(String, String)> = vec![
        ("OPENAI_BASE_URL".into(), fake.url.clone()),
        ("OPENAI_MODEL".into(), "bench-model".into()),
        ("CONFAB__AI__REQUESTS_PER_MINUTE".into(), "100000".into()),
        (
            "CONFAB__AI__WORKER_CONCURRENCY".into(),
            (args.streams * 2).to_string(),
        ),
    ];
    env.extend(args.server_env.iter().cloned());
    let data = tempfile::tempdir().expect("a temp dir");
    let (mut child, base) = server::start(&args.binary, data.path(), &env, &args.server_cpus).await;
    let pid = child.id();
    let http = reqwest::Client::new();

    // 1. Overhead: POST → the provider has the call, one request at a time.
    let (_, token) = server::register(
        &http,
        &base,
        format!("ai-bench-{}@example.com", micros_since_epoch()),
    )
    .await;
    let (_socket, mut events) = sio::connect(&base, &json!({ "token": token }))
        .await
        .unwrap();
    let mut overhead = Vec::with_capacity(args.requests);
    let mut accepted = Vec::with_capacity(args.requests);
    let cpu_before = server::cpu_seconds(pid);
    for i in 0..args.requests {
        let before = fake.calls();
        let sent = Instant::now();
        let queued = post_message(&http, &base, &token, &format!("question {i}")).await;
        accepted.push(sent.elapsed());
        let arrived = loop {
            if let Some(at) = fake.arrivals().get(before) {
                break *at;
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        };
        overhead.push(arrived.saturating_duration_since(sent));
        response_of(&mut events, queued["requestId"].as_str().unwrap()).await;
    }
    println!(
        "requests answered by the provider: server CPU {:.0} µs per request (all of it: request, queue, worker, call, answer stored, ai:response)",
        (server::cpu_seconds(pid) - cpu_before) * 1e6 / args.requests.max(1) as f64
    );
    report("POST /ai/messages → 202", accepted);
    report(
        "pipeline overhead: POST /ai/messages → provider receives the call",
        overhead,
    );

    // 2. A cache hit: the first question again, in new sessions.
    let calls = fake.calls();
    let mut hits = Vec::with_capacity(args.requests);
    let cpu_before = server::cpu_seconds(pid);
    for _ in 0..args.requests {
        let sent = Instant::now();
        let queued = post_message(&http, &base, &token, "question 0").await;
        response_of(&mut events, queued["requestId"].as_str().unwrap()).await;
        hits.push(sent.elapsed());
    }
    assert_eq!(fake.calls(), calls, "cache hits call no provider");
    println!(
        "cache hits: server CPU {:.0} µs per request",
        (server::cpu_seconds(pid) - cpu_before) * 1e6 / args.requests.max(1) as f64
    );
    report(
        "cache hit: POST /ai/messages → ai:response on the socket",
        hits,
    );

    // 3. Token relay: many answers streaming at once.
    let gap = Duration::from_micros(1_000_000 / args.tokens_per_second.max(1));
    let pieces = (args.tokens_per_second * args.seconds) as usize;
    if !args.in_step {
        fake.spread_streams();
    }
    fake.set_fallback(Step::Stream {
        pieces: vec!["{now} ".to_owned(); pieces],
        gap,
        cut: 4096,
        usage: (1, pieces as u32),
    });
    let mut users = Vec::with_capacity(args.users);
    for u in 0..args.users {
        let (_, token) = server::register(
            &http,
            &base,
            format!("ai-relay-{u}-{}@example.com", micros_since_epoch()),
        )
        .await;
        let (client, events) = sio::connect(&base, &json!({ "token": token }))
            .await
            .unwrap();
        users.push((token, client, events));
    }
    // Per piece: (request, when the fake wrote it, when its ai:token was read); per answer:
    // when its ai:response was read (µs since the epoch).
    let pieces_seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::with_capacity(
        args.streams * pieces,
    )));
    let answers_seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut listeners = Vec::new();
    let per_user = args.streams.div_ceil(args.users);
    for (_, _, events) in &mut users {
        let mut events = std::mem::replace(events, tokio::sync::mpsc::unbounded_channel().1);
        let (pieces_seen, answers_seen) = (pieces_seen.clone(), answers_seen.clone());
        let expected = per_user;
        listeners.push(tokio::spawn(async move {
            let mut done = 0;
            while done < expected {
                let Ok(Some(event)) =
                    tokio::time::timeout(Duration::from_mins(1), events.recv()).await
                else {
                    break;
                };
                // When the frame was read off the socket, not when this task got to it.
                let now = epoch_micros(event.at);
                let request = event.data["requestId"].as_str().unwrap_or("").to_owned();
                match event.name.as_str() {
                    "ai:token" => {
                        let sent: u64 = event.data["delta"]
                            .as_str()
                            .unwrap_or("")
                            .trim()
                            .parse()
                            .unwrap_or(now);
                        pieces_seen.lock().unwrap().push((request, sent, now));
                    }
                    "ai:response" => {
                        answers_seen.lock().unwrap().push(now);
                        done += 1;
                    }
                    _ => {}
                }
            }
        }));
    }
    let cpu_before = server::cpu_seconds(pid);
    let started = Instant::now();
    let mut posts = Vec::new();
    for (i, (token, _, _)) in users.iter().enumerate() {
        for k in 0..per_user {
            let (http, base, token) = (http.clone(), base.clone(), token.clone());
            posts.push(tokio::spawn(async move {
                post_message(
                    &http,
                    &base,
                    &token,
                    &format!("stream {i}-{k} {}", micros_since_epoch()),
                )
                .await
            }));
        }
    }
    for post in posts {
        post.await.unwrap();
    }
    for listener in listeners {
        listener.await.unwrap();
    }
    let elapsed = started.elapsed();
    let cpu = server::cpu_seconds(pid) - cpu_before;
    let seen = std::mem::take(&mut *pieces_seen.lock().unwrap());
    let tokens = seen.len();
    println!(
        "token relay: {} streams × {pieces} tokens at {} tokens/s over {} users: {tokens} tokens in {:.1} s, server CPU {:.1} µs/token, RSS {}",
        per_user * args.users,
        args.tokens_per_second,
        args.users,
        elapsed.as_secs_f64(),
        cpu * 1e6 / tokens.max(1) as f64,
        server::rss(pid)
    );
    // While every stream runs: after the last one's first piece, before the first answer
    // ends. Outside that window the server is also starting (or storing) 1,000 answers.
    let mut first_piece: std::collections::HashMap<&str, u64> = std::collections::HashMap::new();
    for (request, sent, _) in &seen {
        let first = first_piece.entry(request).or_insert(*sent);
        *first = (*first).min(*sent);
    }
    let all_running = first_piece.values().copied().max().unwrap_or(0);
    let first_done = answers_seen
        .lock()
        .unwrap()
        .iter()
        .copied()
        .min()
        .unwrap_or(u64::MAX);
    let latency =
        |(_, sent, read): &(String, u64, u64)| Duration::from_micros(read.saturating_sub(*sent));
    let steady: Vec<Duration> = seen
        .iter()
        .filter(|(_, sent, _)| *sent > all_running && *sent < first_done)
        .map(latency)
        .collect();
    report(
        "token relay: provider chunk → ai:token on the socket, every piece",
        seen.iter().map(latency).collect(),
    );
    report(
        &format!(
            "token relay: the same while all {} streams run ({:.1} s)",
            first_piece.len(),
            first_done.saturating_sub(all_running) as f64 / 1e6
        ),
        steady,
    );
    if let Some(path) = &args.timeline {
        server::write_timeline(
            path,
            seen.iter()
                .map(|(_, sent, read)| (*sent, read.saturating_sub(*sent))),
        );
    }
    let _ = child.kill();
    let _ = child.wait();
}
