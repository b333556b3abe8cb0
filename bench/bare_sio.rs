//! The reference point of issue 8's targets: a bare socketioxide server, in memory, that
//! answers what `realtime_load` drives (register, create a group chat, connect with a token,
//! `chat:join`, `message:send` with an ack, `message:new` to the room) and nothing more: no
//! database, no persistence, no auth beyond a token lookup, socketioxide's defaults and the
//! system allocator. Measured in the same run as `confab`, it tells how fast this session's
//! machine is and how much of a figure is socketioxide, Tokio and the kernel's loopback.
//!
//! cargo build --release -p confab-server --example bare_sio --example realtime_load --bin confab
//! T=$CARGO_TARGET_DIR/release
//! taskset -c 1 $T/examples/realtime_load --binary $T/examples/bare_sio [--clients …]
//!
//! Started like `confab serve` (the load tool's `server::spawn`): it listens on
//! `CONFAB_LISTEN` and ignores the rest of the environment.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use serde_json::{Value, json};
use socketioxide::extract::{AckSender, Data, SocketRef, State as Io, TryData};

/// Users by token, and the members of each chat: all the state there is.
#[derive(Default)]
struct Directory {
    users: HashMap<String, String>,
    members: HashMap<String, HashSet<String>>,
}

type Shared = Arc<Mutex<Directory>>;

fn lock(dir: &Shared) -> std::sync::MutexGuard<'_, Directory> {
    dir.lock().unwrap_or_else(PoisonError::into_inner)
}

async fn register(State(dir): State<Shared>) -> (StatusCode, Json<Value>) {
    let id = uuid::Uuid::now_v7().to_string();
    let token = uuid::Uuid::now_v7().to_string();
    lock(&dir).users.insert(token.clone(), id.clone());
    (
        StatusCode::CREATED,
        Json(json!({"user": {"id": id}, "accessToken": token})),
    )
}

async fn create_chat(
    State(dir): State<Shared>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Result<(StatusCode, Json<Value>), StatusCode> {
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or(StatusCode::UNAUTHORIZED)?;
    let mut dir = lock(&dir);
    let owner = dir
        .users
        .get(token)
        .cloned()
        .ok_or(StatusCode::UNAUTHORIZED)?;
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
    dir.members.insert(id.clone(), members);
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

#[tokio::main]
async fn main() {
    let listen = std::env::var("CONFAB_LISTEN").unwrap_or_else(|_| "127.0.0.1:3000".into());
    let dir = Shared::default();
    let (layer, io) = socketioxide::SocketIo::builder()
        .with_state(dir.clone())
        .build_layer();
    io.ns("/", on_connect);
    let app = axum::Router::new()
        .route("/ready", get(|| async { "ok" }))
        .route("/api/v1/auth/register", post(register))
        .route("/api/v1/chats", post(create_chat))
        .with_state(dir)
        .layer(layer);
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .expect("the listen address is free")
        // As confab does: small realtime frames must not wait for Nagle.
        .tap_io(|tcp| tcp.set_nodelay(true).expect("TCP_NODELAY"));
    axum::serve(listener, app).await.expect("serve");
}
