//! Realtime load tool (issue 8): starts a release `confab serve` on embedded defaults (fresh
//! data dir, pinned to CPU 0), registers C users, makes R group chats of C/R members, connects
//! every user over Socket.IO (this tool's own client, `sio.rs`, pinned to CPU 1) and joins
//! its room, then sends M messages/s spread over the clients, each with an ack, for the
//! measured window. Reports per configuration: sent/s, delivered/s, ack p50/p99, delivery
//! p50/p99 (send → `message:new` read by each member, sender included), server CPU per
//! delivery (from /proc/<pid>/stat) and server RSS.
//!
//! cargo build --release -p confab-server --bin confab
//! cargo build --release -p confab-server --example realtime_load
//! (Two commands, so that the server is the binary `cargo run --release` builds: ARCHITECTURE.md,
//! "The release binary's layout".)
//! target/release/examples/realtime_load [--clients 200 --rooms 20 --rates 1000,2000,5000]
//!     [--seconds 10] [--ramp] [--binary target/release/confab] [--server-threads N]
//!     [--server-env KEY=VALUE ...] [--server-cpus 0|all] [--uploads N] [--readers N]
//!     [--client-ids]
//!
//! `--uploads N` keeps N clients uploading a 12 MP photo (JPEG, ~4 MB) as image messages into a
//! chat of their own, one after another, for the whole run: the delivery figures then show
//! what image processing costs the chat, and each line adds the uploads' p50/p99 (upload →
//! stored with its thumbnail → 201).
//!
//! `--readers N` makes N of the clients mark their chat read ten times a second throughout, as
//! clients do while messages arrive: `GET …/messages?limit=1`, then `POST …/read` with its id.
//! Each line adds the marks' p50/p99 (the `POST` alone): a write the store makes through its
//! pool, beside the message commits.
//!
//! `--timeline FILE` writes every delivery of the last run as `sent_ms latency_us` lines
//! (send time from the start of the run), to see when the tail happens (periodic work?).
//!
//! `--ramp` raises the rate until delivery p99 exceeds 50 ms or deliveries fall behind, and
//! reports the highest rate that held.
//!
//! `--client-ids` gives each message a `clientId` (unique), as clients that retry sends do.

// A measuring tool: figures are converted between integer and float freely.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_precision_loss,
    clippy::cast_sign_loss,
    clippy::too_many_lines,
    clippy::unwrap_used
)]

#[path = "server.rs"]
mod server;
#[path = "sio.rs"]
mod sio;
#[path = "upload.rs"]
mod upload;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

struct Args {
    binary: String,
    clients: usize,
    rooms: usize,
    rates: Vec<u64>,
    seconds: u64,
    ramp: bool,
    /// The server's runtime worker threads (`TOKIO_WORKER_THREADS`); its default otherwise.
    server_threads: Option<String>,
    /// More `KEY=VALUE` settings for the server (`--server-env`, repeatable).
    server_env: Vec<(String, String)>,
    /// The CPUs the server is pinned to (`taskset -c`); `all`: not pinned.
    server_cpus: String,
    /// Clients uploading 12 MP photos throughout.
    uploads: usize,
    /// Clients marking their chat read ten times a second throughout.
    readers: usize,
    /// Where to write every delivery's send time and latency (`--timeline FILE`).
    timeline: Option<String>,
    /// Seconds to wait with every client connected before sending, then print the RSS again
    /// (`--settle N`): the steady state rather than the moments after 1,000 sign-ups.
    settle: u64,
    /// Each message carries a `clientId` (`--client-ids`), as clients that retry send them:
    /// the store then checks each for a repeat.
    client_ids: bool,
}

fn args() -> Args {
    let mut a = Args {
        binary: "target/release/confab".into(),
        clients: 200,
        rooms: 20,
        rates: vec![1000, 2000, 5000],
        seconds: 10,
        ramp: false,
        server_threads: None,
        server_env: Vec::new(),
        server_cpus: "0".into(),
        uploads: 0,
        readers: 0,
        timeline: None,
        settle: 0,
        client_ids: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().expect("a value after the flag");
        match flag.as_str() {
            "--binary" => a.binary = value(),
            "--clients" => a.clients = value().parse().expect("--clients N"),
            "--rooms" => a.rooms = value().parse().expect("--rooms N"),
            "--rates" => {
                a.rates = value()
                    .split(',')
                    .map(|r| r.parse().expect("--rates 1000,2000"))
                    .collect();
            }
            "--seconds" => a.seconds = value().parse().expect("--seconds N"),
            "--ramp" => a.ramp = true,
            "--client-ids" => a.client_ids = true,
            "--server-threads" => a.server_threads = Some(value()),
            "--server-cpus" => a.server_cpus = value(),
            "--uploads" => a.uploads = value().parse().expect("--uploads N"),
            "--readers" => a.readers = value().parse().expect("--readers N"),
            "--timeline" => a.timeline = Some(value()),
            "--settle" => a.settle = value().parse().expect("--settle SECONDS"),
            "--server-env" => {
                let pair = value();
                let (k, v) = pair.split_once('=').expect("--server-env KEY=VALUE");
                a.server_env.push((k.to_owned(), v.to_owned()));
            }
            other => panic!("unknown flag {other}"),
        }
    }
    a
}

/// The server's settings for a run: `--server-threads` and `--server-env` on top.
fn server_env(args: &Args) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = vec![
        // Each client sends well under this; the limit is not what is measured.
        ("CONFAB__CHAT__MESSAGES_PER_SECOND".into(), "1000".into()),
    ];
    if let Some(n) = &args.server_threads {
        env.push(("TOKIO_WORKER_THREADS".into(), n.clone()));
    }
    env.extend(args.server_env.iter().cloned());
    env
}

/// Sent-at instants by message sequence number, as nanoseconds after `base`.
struct Clock {
    base: Instant,
    sent: Vec<AtomicU64>,
}

struct Member {
    client: sio::Client,
    room: Value,
    token: String,
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = args();
    let data = tempfile::tempdir().expect("a temp dir");
    let (mut server, base) = server::start(
        &args.binary,
        data.path(),
        &server_env(&args),
        &args.server_cpus,
    )
    .await;
    let pid = server.id();
    let http = reqwest::Client::new();
    let (members, rss_idle) = setup(&http, &base, &args, pid).await;
    eprintln!(
        "{} clients in {} rooms connected and joined; server RSS {} (idle before: {rss_idle})",
        members.len(),
        args.rooms,
        server::rss(pid)
    );
    if args.settle > 0 {
        tokio::time::sleep(Duration::from_secs(args.settle)).await;
        eprintln!(
            "after {} s connected and quiet: server RSS {}",
            args.settle,
            server::rss(pid)
        );
    }
    if args.uploads > 0 {
        start_uploads(&http, &base, args.uploads).await;
    }
    start_readers(&http, &base, &members[..args.readers.min(members.len())]);
    let members = Arc::new(members);
    let mut rates = args.rates.clone();
    if args.ramp {
        rates = (1..=40).map(|k| 1000 * k).collect();
    }
    let capacity = usize::try_from(rates.iter().sum::<u64>() * args.seconds).expect("fits");
    let clock = Arc::new(Clock {
        base: Instant::now(),
        sent: (0..capacity).map(|_| AtomicU64::new(0)).collect(),
    });
    let seq = Arc::new(AtomicU64::new(0));
    let mut best = None;
    for rate in rates {
        if args.timeline.is_some() {
            *TIMELINE
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Vec::new());
        }
        let r = run(&members, &clock, &seq, rate, &args, pid).await;
        if let Some(path) = &args.timeline {
            let timeline = TIMELINE
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take()
                .unwrap_or_default();
            server::write_timeline(
                path,
                timeline
                    .into_iter()
                    .map(|(sent, latency)| (sent, u64::from(latency))),
            );
        }
        let held = r.delivery_p99 <= Duration::from_millis(50) && r.delivered_ratio > 0.99;
        println!(
            "clients {} rooms {} target {rate} msg/s: sent {:.0}/s, delivered {:.0}/s ({:.1} %), ack p50 {:.2} ms p99 {:.2} ms, delivery p50 {:.2} ms p99 {:.2} ms, server CPU {:.1} µs/delivery, RSS {}{}{}",
            args.clients,
            args.rooms,
            r.sent_per_sec,
            r.delivered_per_sec,
            100.0 * r.delivered_ratio,
            ms(r.ack_p50),
            ms(r.ack_p99),
            ms(r.delivery_p50),
            ms(r.delivery_p99),
            r.cpu_us_per_delivery,
            server::rss(pid),
            UPLOADS.report(),
            READS.report(),
        );
        if args.ramp {
            if !held {
                break;
            }
            best = Some(rate);
        }
        // Let queues drain between configurations.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    if args.ramp {
        println!(
            "ramp: highest rate with delivery p99 <= 50 ms and every message delivered: {best:?} msg/s"
        );
    }
    let _ = server.kill();
    let _ = server.wait();
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `POST /api/v1/chats` with `body` as the owner of `token`: the chat.
async fn create_chat(http: &reqwest::Client, base: &str, token: &str, body: &Value) -> Value {
    http.post(format!("{base}/api/v1/chats"))
        .bearer_auth(token)
        .json(body)
        .send()
        .await
        .expect("create chat")
        .json()
        .await
        .expect("chat body")
}

async fn setup(
    http: &reqwest::Client,
    base: &str,
    args: &Args,
    pid: u32,
) -> (Vec<Member>, server::Rss) {
    // Users, a few at a time.
    let mut tokens: Vec<(String, String)> = Vec::with_capacity(args.clients);
    for chunk in (0..args.clients).collect::<Vec<_>>().chunks(16) {
        let batch = chunk
            .iter()
            .map(|i| server::register(http, base, format!("load{i}@example.com")));
        tokens.extend(futures_util::future::join_all(batch).await);
    }
    // Rooms: client i belongs to room i % rooms; its first member creates it.
    let mut rooms = Vec::with_capacity(args.rooms);
    for r in 0..args.rooms {
        let ids: Vec<&str> = (r..args.clients)
            .step_by(args.rooms)
            .map(|i| tokens[i].0.as_str())
            .collect();
        let body = json!({"memberIds": &ids[1..], "name": format!("room {r}")});
        let chat = create_chat(http, base, &tokens[r].1, &body).await;
        rooms.push(chat["id"].clone());
    }
    let rss_idle = server::rss(pid);
    let mut members = Vec::with_capacity(args.clients);
    for (i, (_, token)) in tokens.into_iter().enumerate() {
        let (client, events) = sio::connect(base, &json!({ "token": &token }))
            .await
            .expect("socket.io connect");
        let room = rooms[i % args.rooms].clone();
        let joined = client
            .call(
                "chat:join",
                &json!({ "chatId": room }),
                Duration::from_secs(10),
            )
            .await
            .expect("join");
        assert_eq!(joined["ok"], true, "{joined}");
        spawn_listener(events);
        members.push(Member {
            client,
            room,
            token,
        });
    }
    (members, rss_idle)
}

/// Per run: delivery latencies go here (one shared sink; the tool's single thread).
static DELIVERIES: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());
/// With `--timeline`: (sent, in µs from the clock's base; latency in µs) of every delivery.
static TIMELINE: std::sync::Mutex<Option<Vec<(u64, u32)>>> = std::sync::Mutex::new(None);
static CLOCK: std::sync::OnceLock<Arc<Clock>> = std::sync::OnceLock::new();

fn spawn_listener(mut events: tokio::sync::mpsc::UnboundedReceiver<sio::Event>) {
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            if event.name != "message:new" {
                continue;
            }
            let (Some(clock), Some(n)) = (
                CLOCK.get(),
                event.data["text"]
                    .as_str()
                    .and_then(|t| t.parse::<usize>().ok()),
            ) else {
                continue;
            };
            let sent = clock.sent[n].load(Ordering::Relaxed);
            let now = event.at.duration_since(clock.base).as_nanos() as u64;
            let micros = now.saturating_sub(sent) / 1000;
            if let Some(timeline) = TIMELINE
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .as_mut()
            {
                timeline.push((sent / 1000, u32::try_from(micros).unwrap_or(u32::MAX)));
            }
            DELIVERIES
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(u32::try_from(micros).unwrap_or(u32::MAX));
        }
    });
}

struct Report {
    sent_per_sec: f64,
    delivered_per_sec: f64,
    delivered_ratio: f64,
    ack_p50: Duration,
    ack_p99: Duration,
    delivery_p50: Duration,
    delivery_p99: Duration,
    cpu_us_per_delivery: f64,
}

/// A side load's requests in the current run: round trips in µs, and how many were refused.
struct SideLoad {
    name: &'static str,
    done: std::sync::Mutex<Vec<u32>>,
    refused: AtomicU64,
}

impl SideLoad {
    const fn new(name: &'static str) -> Self {
        Self {
            name,
            done: std::sync::Mutex::new(Vec::new()),
            refused: AtomicU64::new(0),
        }
    }

    fn done(&self) -> std::sync::MutexGuard<'_, Vec<u32>> {
        self.done
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// One request that began `at`: done (the expected status) or refused.
    fn record(&self, at: Instant, ok: bool) {
        if ok {
            let micros = u32::try_from(at.elapsed().as_micros()).unwrap_or(u32::MAX);
            self.done().push(micros);
        } else {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn clear(&self) {
        self.done().clear();
        self.refused.store(0, Ordering::Relaxed);
    }

    /// `, uploads N done (M refused), upload p50 … p99 …` when any ran, else empty.
    fn report(&self) -> String {
        let mut done = self.done().clone();
        done.sort_unstable();
        match (done.len(), self.refused.load(Ordering::Relaxed)) {
            (0, 0) => String::new(),
            (n, refused) => format!(
                ", {name}s {n} done ({refused} refused), {name} p50 {:.2} ms p99 {:.2} ms",
                ms(quantile(&done, 0.5)),
                ms(quantile(&done, 0.99)),
                name = self.name,
            ),
        }
    }
}

static UPLOADS: SideLoad = SideLoad::new("upload");
static READS: SideLoad = SideLoad::new("mark-read");

/// The `p` quantile of sorted `v` (µs); `Duration::MAX` when empty.
fn quantile(v: &[u32], p: f64) -> Duration {
    match v {
        [] => Duration::MAX,
        v => Duration::from_micros(u64::from(v[((v.len() as f64 - 1.0) * p).round() as usize])),
    }
}

/// Starts the `readers`' loops: ten times a second, the chat's latest message, then marking
/// it read.
fn start_readers(http: &reqwest::Client, base: &str, readers: &[Member]) {
    if !readers.is_empty() {
        eprintln!(
            "{} reader(s), each marking its chat read ten times a second",
            readers.len()
        );
    }
    // Spread over the 100 ms, not all at once: a burst of every reader's requests would
    // measure the queue behind it.
    let spacing = Duration::from_millis(100) / u32::try_from(readers.len().max(1)).unwrap_or(1);
    for (i, reader) in readers.iter().enumerate() {
        let chat = reader.room.as_str().expect("chat id");
        let latest = format!("{base}/api/v1/chats/{chat}/messages?limit=1");
        let read = format!("{base}/api/v1/chats/{chat}/read");
        let (http, token) = (http.clone(), reader.token.clone());
        tokio::spawn(async move {
            let first = tokio::time::Instant::now() + spacing * u32::try_from(i).unwrap_or(0);
            let mut tick = tokio::time::interval_at(first, Duration::from_millis(100));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let page: Option<Value> = match http.get(&latest).bearer_auth(&token).send().await {
                    Ok(r) => r.json().await.ok(),
                    Err(_) => None,
                };
                let Some(id) = page.as_ref().and_then(|p| p["items"][0]["id"].as_str()) else {
                    continue;
                };
                let at = Instant::now();
                let status = http
                    .post(&read)
                    .bearer_auth(&token)
                    .json(&json!({ "messageId": id }))
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
                    .ok();
                READS.record(at, status == Some(204));
            }
        });
    }
}

/// Starts `n` uploaders, each sending a 12 MP photo into its own chat, one after another.
async fn start_uploads(http: &reqwest::Client, base: &str, n: usize) {
    let photo = Arc::new(upload::photo_jpeg(4000, 3000));
    eprintln!(
        "{n} uploader(s), each sending a 4000 × 3000 JPEG of {:.1} MiB in a loop",
        photo.len() as f64 / 1024.0 / 1024.0
    );
    for i in 0..n {
        let mut people = Vec::new();
        for who in ["uploader", "viewer"] {
            people.push(server::register(http, base, format!("{who}{i}@example.com")).await);
        }
        let body = json!({"memberIds": [people[1].0]});
        let chat = create_chat(http, base, &people[0].1, &body).await;
        let url = format!(
            "{base}/api/v1/chats/{}/messages/image",
            chat["id"].as_str().expect("chat id")
        );
        let (http, photo, token) = (http.clone(), photo.clone(), people[0].1.clone());
        tokio::spawn(async move {
            loop {
                let (content_type, body) =
                    upload::form(Some(("photo.jpg", "image/jpeg", &photo)), &[]);
                let at = Instant::now();
                let status = http
                    .post(&url)
                    .bearer_auth(&token)
                    .header("content-type", content_type)
                    .body(body)
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
                    .ok();
                UPLOADS.record(at, status == Some(201));
                if status != Some(201) {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        });
    }
}

async fn run(
    members: &Arc<Vec<Member>>,
    clock: &Arc<Clock>,
    seq: &Arc<AtomicU64>,
    rate: u64,
    args: &Args,
    pid: u32,
) -> Report {
    let _ = CLOCK.set(clock.clone());
    DELIVERIES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clear();
    UPLOADS.clear();
    READS.clear();
    let acks = Arc::new(std::sync::Mutex::new(Vec::<u32>::new()));
    let cpu_before = server::cpu_seconds(pid);
    let started = Instant::now();
    // Every millisecond, the messages due by then (round-robin over the clients).
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let total = rate * args.seconds;
    let mut sent = 0u64;
    let mut next_client = 0usize;
    while sent < total {
        tick.tick().await;
        let due = ((started.elapsed().as_secs_f64() * rate as f64) as u64).min(total);
        while sent < due {
            let member = &members[next_client % members.len()];
            next_client += 1;
            let n = seq.fetch_add(1, Ordering::Relaxed);
            let at = Instant::now();
            clock.sent[n as usize].store(
                at.duration_since(clock.base).as_nanos() as u64,
                Ordering::Relaxed,
            );
            let mut message = json!({ "chatId": member.room, "text": n.to_string() });
            if args.client_ids {
                message["clientId"] = json!(format!("c{n}"));
            }
            let ack = member.client.call_later("message:send", &message);
            let acks = acks.clone();
            tokio::spawn(async move {
                if let Ok(answer) = ack.await
                    && answer["ok"] == true
                {
                    let micros = at.elapsed().as_micros();
                    acks.lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .push(u32::try_from(micros).unwrap_or(u32::MAX));
                }
            });
            sent += 1;
        }
    }
    let send_time = started.elapsed();
    // Wait for the stragglers (up to 5 s), then read the server's CPU.
    let per_room = members.len() as f64 / args.rooms as f64;
    let expected = (total as f64 * per_room).round() as usize;
    let waited = Instant::now();
    while DELIVERIES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .len()
        < expected
        && waited.elapsed() < Duration::from_secs(5)
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cpu = server::cpu_seconds(pid) - cpu_before;
    let mut deliveries = std::mem::take(
        &mut *DELIVERIES
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    let mut acks = std::mem::take(
        &mut *acks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    deliveries.sort_unstable();
    acks.sort_unstable();
    Report {
        sent_per_sec: total as f64 / send_time.as_secs_f64(),
        delivered_per_sec: deliveries.len() as f64 / send_time.as_secs_f64(),
        delivered_ratio: deliveries.len() as f64 / expected.max(1) as f64,
        ack_p50: quantile(&acks, 0.5),
        ack_p99: quantile(&acks, 0.99),
        delivery_p50: quantile(&deliveries, 0.5),
        delivery_p99: quantile(&deliveries, 0.99),
        cpu_us_per_delivery: cpu * 1e6 / deliveries.len().max(1) as f64,
    }
}
