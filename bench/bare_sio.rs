//! The reference point of issue 8's targets: a bare socketioxide server, in memory, that
//! answers what `realtime_load` drives (register, create a group chat, connect with a token,
//! `chat:join`, `message:send` with an ack, `message:new` to the room) and nothing more: no
//! database, no persistence, no auth beyond a token lookup, socketioxide's defaults and the
//! system allocator. Measured in the same run as `confab`, it tells how fast this session's
//! machine is and how much of a figure is socketioxide, Tokio and the kernel's loopback.
//!
//! For issue 6 it also answers what `ai_load` drives: `POST /api/v1/ai/messages` calls the
//! OpenAI-compatible provider at `OPENAI_BASE_URL` at once (no queue, no store), streaming,
//! relays each piece as `ai:token` to the user's room and ends with `ai:response`; an answer
//! is kept by question, so asking again is a cache hit without a provider call.
//!
//! cargo build --release -p confab-server --example bare_sio --example realtime_load --bin confab
//! T=$CARGO_TARGET_DIR/release
//! taskset -c 1 $T/examples/realtime_load --binary $T/examples/bare_sio [--clients …]
//!
//! Started like `confab serve` (the load tool's `server::spawn`): it listens on
//! `CONFAB_LISTEN`, calls the provider at `OPENAI_BASE_URL` (model `OPENAI_MODEL`) and ignores
//! the rest of the environment.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use serde_json::{Value, json};
use socketioxide::extract::{AckSender, Data, SocketRef, State as Io, TryData};

/// Users by token, the members of each chat, answers by question: all the state there is.
#[derive(Default)]
struct Directory {
    users: HashMap<String, String>,
    members: HashMap<String, HashSet<String>>,
    answers: HashMap<String, String>,
}

type Shared = Arc<Mutex<Directory>>;

/// The HTTP side's state: the directory, the Socket.IO handle to emit with, the provider.
#[derive(Clone)]
struct App {
    dir: Shared,
    io: socketioxide::SocketIo,
    http: reqwest::Client,
    /// `OPENAI_BASE_URL` and `OPENAI_MODEL`.
    provider: Arc<(String, String)>,
}

/// The user of a request's bearer token.
fn user_of(dir: &Shared, headers: &HeaderMap) -> Result<String, StatusCode> {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .and_then(|token| lock(dir).users.get(token).cloned())
        .ok_or(StatusCode::UNAUTHORIZED)
}

fn lock(dir: &Shared) -> std::sync::MutexGuard<'_, Directory> {
    dir.lock().unwrap_or_else(PoisonError::into_inner)
}

async fn register(State(app): State<App>) -> (StatusCode, Json<Value>) {
    let id = uuid::Uuid::now_v7().to_string();
    let token = uuid::Uuid::now_v7().to_string();
    lock(&app.dir).users.insert(token.clone(), id.clone());
    (
        StatusCode::CREATED,
        Json(json!({"user": {"id": id}, "accessToken": token})),
    )
}

async fn create_chat(
    State(app): State<App>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Result<(StatusCode, Json<Value>), StatusCode> {
    let owner = user_of(&app.dir, &headers)?;
    let mut members: HashSet<String> = body["memberIds"]
        .as_array()
        .map(|ids| {
            ids.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    members.insert(owner);
    let id = uuid::Uuid::now_v7().to_string();
    lock(&app.dir).members.insert(id.clone(), members);
    Ok((StatusCode::CREATED, Json(json!({"id": id}))))
}

/// The user id behind the handshake's `auth.token`, kept on the socket.
#[derive(Clone)]
struct UserId(String);

async fn on_connect(socket: SocketRef, Data(auth): Data<Value>, Io(dir): Io<Shared>) {
    let user = auth["token"]
        .as_str()
        .and_then(|t| lock(&dir).users.get(t).cloned());
    let Some(user) = user else {
        socket.disconnect().ok();
        return;
    };
    socket.join(format!("user:{user}"));
    socket.extensions.insert(UserId(user));
    socket.on("chat:join", chat_join);
    socket.on("message:send", message_send);
}

/// Joins the chat's room when the socket's user is a member.
async fn chat_join(
    socket: SocketRef,
    TryData(data): TryData<Value>,
    ack: AckSender,
    Io(dir): Io<Shared>,
) {
    let chat = data
        .ok()
        .and_then(|d| d["chatId"].as_str().map(str::to_owned));
    let user = socket.extensions.get::<UserId>().map(|u| u.0);
    let member = match (&chat, &user) {
        (Some(chat), Some(user)) => lock(&dir)
            .members
            .get(chat)
            .is_some_and(|m| m.contains(user)),
        _ => false,
    };
    if let (true, Some(chat)) = (member, chat) {
        socket.join(format!("chat:{chat}"));
        ack.send(&json!({"ok": true})).ok();
    } else {
        ack.send(&json!({"ok": false, "code": "NOT_FOUND"})).ok();
    }
}

/// Acks, then emits the message to its room, sender included. Nothing is stored and
/// membership is not checked: the least a server can do per message.
async fn message_send(socket: SocketRef, TryData(data): TryData<Value>, ack: AckSender) {
    let fields = data.ok().and_then(|d| {
        Some((
            d["chatId"].as_str()?.to_owned(),
            d["text"].as_str()?.to_owned(),
        ))
    });
    let Some((chat, text)) = fields else {
        ack.send(&json!({"ok": false, "code": "VALIDATION_ERROR"}))
            .ok();
        return;
    };
    let id = uuid::Uuid::now_v7().to_string();
    let at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    ack.send(&json!({"ok": true, "id": id, "createdAt": at}))
        .ok();
    // The same body as confab's `message:new`.
    let message = json!({
        "id": id,
        "chatId": chat,
        "senderId": socket.extensions.get::<UserId>().map(|u| u.0),
        "kind": "text",
        "text": text,
        "clientId": null,
        "createdAt": at,
        "editedAt": null,
        "deletedAt": null,
        "seenBy": [],
    });
    socket
        .within(format!("chat:{chat}"))
        .emit("message:new", &message)
        .await
        .ok();
}

/// `POST /api/v1/ai/messages`: 202 with the ids, the answer on the user's sockets.
async fn ai_message(
    State(app): State<App>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Result<(StatusCode, Json<Value>), StatusCode> {
    let user = user_of(&app.dir, &headers)?;
    let question = body["message"]
        .as_str()
        .ok_or(StatusCode::BAD_REQUEST)?
        .to_owned();
    let ids = json!({
        "sessionId": uuid::Uuid::now_v7().to_string(),
        "requestId": uuid::Uuid::now_v7().to_string(),
    });
    tokio::spawn(answer(app, user, question, ids.clone()));
    Ok((StatusCode::ACCEPTED, Json(ids)))
}

/// Answers from the kept answers or the provider, streaming each piece to `user:<id>`.
async fn answer(app: App, user: String, question: String, ids: Value) {
    let room = format!("user:{user}");
    let kept = lock(&app.dir).answers.get(&question).cloned();
    let (content, cached) = match kept {
        Some(content) => (content, true),
        None => match stream(&app, &room, &question, &ids).await {
            Ok(content) => {
                lock(&app.dir).answers.insert(question, content.clone());
                (content, false)
            }
            Err(error) => {
                let body = json!({"requestId": ids["requestId"], "error": error.to_string()});
                app.io.to(room).emit("ai:error", &body).await.ok();
                return;
            }
        },
    };
    let body = json!({
        "sessionId": ids["sessionId"],
        "requestId": ids["requestId"],
        "message": {"role": "assistant", "content": content, "cached": cached},
    });
    app.io.to(room).emit("ai:response", &body).await.ok();
}

/// One streamed chat completion: each server-sent event's `delta.content` emitted as
/// `ai:token` as it arrives; the whole answer.
async fn stream(
    app: &App,
    room: &str,
    question: &str,
    ids: &Value,
) -> Result<String, reqwest::Error> {
    let (base, model) = &*app.provider;
    let mut response = app
        .http
        .post(format!("{base}/chat/completions"))
        .json(&json!({
            "model": model,
            "stream": true,
            "messages": [{"role": "user", "content": question}],
        }))
        .send()
        .await?
        .error_for_status()?;
    let (mut pending, mut content, mut index) = (Vec::<u8>::new(), String::new(), 0u64);
    while let Some(chunk) = response.chunk().await? {
        pending.extend_from_slice(&chunk);
        while let Some(end) = pending.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = pending.drain(..end + 2).collect();
            let Some(data) = std::str::from_utf8(&event)
                .ok()
                .and_then(|e| e.trim().strip_prefix("data: "))
            else {
                continue;
            };
            let Ok(data) = serde_json::from_str::<Value>(data) else {
                continue; // `[DONE]`
            };
            let delta = data["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap_or("");
            if delta.is_empty() {
                continue; // the role's chunk, the end's
            }
            let token = json!({
                "sessionId": ids["sessionId"],
                "requestId": ids["requestId"],
                "delta": delta,
                "index": index,
            });
            app.io
                .to(room.to_owned())
                .emit("ai:token", &token)
                .await
                .ok();
            content.push_str(delta);
            index += 1;
        }
    }
    Ok(content)
}

#[tokio::main]
async fn main() {
    let listen = std::env::var("CONFAB_LISTEN").unwrap_or_else(|_| "127.0.0.1:3000".into());
    let dir = Shared::default();
    let (layer, io) = socketioxide::SocketIo::builder()
        .with_state(dir.clone())
        .build_layer();
    io.ns("/", on_connect);
    let provider = (
        std::env::var("OPENAI_BASE_URL").unwrap_or_default(),
        std::env::var("OPENAI_MODEL").unwrap_or_default(),
    );
    let state = App {
        dir,
        io,
        http: reqwest::Client::new(),
        provider: Arc::new(provider),
    };
    let app = axum::Router::new()
        .route("/ready", get(|| async { "ok" }))
        .route("/api/v1/auth/register", post(register))
        .route("/api/v1/chats", post(create_chat))
        .route("/api/v1/ai/messages", post(ai_message))
        .with_state(state)
        .layer(layer);
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .expect("the listen address is free")
        // As confab does: small realtime frames must not wait for Nagle.
        .tap_io(|tcp| tcp.set_nodelay(true).expect("TCP_NODELAY"));
    axum::serve(listener, app).await.expect("serve");
}
