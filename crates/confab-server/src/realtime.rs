//! Socket.IO v4 on `/socket.io` (SPEC §4), default namespace: the handshake's `auth.token` is
//! an access token; each socket joins `user:<id>`; members join `chat:<id>` rooms; messages
//! sent here and over REST are the same thing (stored by `ChatService`'s group commit, then
//! broadcast in commit order by `spawn_broadcaster`).
//!
//! Event handlers are registered in the handshake middleware: socketioxide sends the
//! namespace CONNECT after the middleware but spawns the connect handler, so a client's first
//! event could otherwise find no handler (DEPENDENCIES.md).
//!
//! Many nodes: rooms and broadcasts go through socketioxide-redis's adapter over the cache's
//! pub/sub (`cluster`); `presence` reaches chat partners on every node, counted per user in
//! the cache.

use std::sync::Arc;

use confab_core::domain::{ChatId, MessageId, UserId};
use confab_core::ports::cache::{Cache, keys};
use confab_core::services::auth::{AuthService, Principal};
use confab_core::services::chats::{ChatError, ChatService};
use confab_core::services::media::MediaService;
use serde::Deserialize;
use serde_json::{Value, json};
use socketioxide::extract::{AckSender, Extension, State, TryData};
use socketioxide::handler::ConnectHandler;
use socketioxide::layer::SocketIoLayer;

use crate::http::chats::MessageBody;

mod cluster;
pub use cluster::{Adapter, CacheDriver};

/// The Socket.IO handle: broadcasts reach every node (see `cluster`). A node alone (no shared
/// cache) broadcasts locally: the adapter would otherwise encode every broadcast for a
/// cluster channel nobody listens to (msgpack of the whole packet) before dropping it.
#[derive(Clone)]
pub struct Io {
    io: socketioxide::SocketIo<Adapter>,
    alone: bool,
}

impl Io {
    pub fn new(io: socketioxide::SocketIo<Adapter>, clustered: bool) -> Self {
        Self {
            io,
            alone: !clustered,
        }
    }

    /// Whether broadcasts stay on this node (there is no other).
    pub fn alone(&self) -> bool {
        self.alone
    }

    /// The sockets in `rooms`, on every node.
    pub fn to(&self, rooms: impl socketioxide_core::adapter::RoomParam) -> Broadcast {
        if self.alone {
            self.io.local().to(rooms)
        } else {
            self.io.to(rooms)
        }
    }
}

impl std::ops::Deref for Io {
    type Target = socketioxide::SocketIo<Adapter>;
    fn deref(&self) -> &Self::Target {
        &self.io
    }
}

type Broadcast = socketioxide::operators::BroadcastOperators<Adapter>;
type Socket = socketioxide::extract::SocketRef<Adapter>;
type Ack = AckSender<Adapter>;

/// Packets buffered per socket before emits to it fail.
pub const MAX_BUFFERED_PACKETS: usize = 4096;

/// The websocket read buffer per connection (see `build`).
const WS_READ_BUFFER: usize = 1024;

/// What the socket handlers reach.
#[derive(Clone)]
pub struct Realtime {
    pub auth: Arc<AuthService>,
    pub chats: Arc<ChatService>,
    /// Presence (SPEC §4, §7 `online_users`).
    pub cache: Arc<dyn Cache>,
    /// The assistant (`ai:send`): set once built, after the Socket.IO handle it emits through.
    pub ai: Arc<std::sync::OnceLock<Arc<confab_core::services::ai::AiService>>>,
    /// Whether the cache is shared with other nodes (Redis): broadcasts then go through it.
    pub clustered: bool,
}

/// The cache counter of `user`'s open sockets, on every node.
fn open_sockets_key(user: UserId) -> String {
    format!("presence:sockets:{user}")
}

/// How long a user's open-socket count outlives its last change (a node that died with
/// sockets open leaves a count behind; it is forgotten after this).
const OPEN_SOCKETS_TTL: std::time::Duration = std::time::Duration::from_hours(24);

impl Realtime {
    /// Counts a socket of `user` in (`+1`) or out (`-1`) across all nodes (a cache counter);
    /// whether it was the user's first socket in or last out. Without the cache: neither.
    async fn count(&self, user: UserId, opened: bool) -> bool {
        let key = open_sockets_key(user);
        let by = if opened { 1 } else { -1 };
        match self.cache.incr(&key, by, OPEN_SOCKETS_TTL).await {
            Ok(n) if opened => n == 1,
            Ok(n) => {
                if n < 0 {
                    // A count lost to expiry: start again from nothing open.
                    let _ = self.cache.set(&key, b"0", Some(OPEN_SOCKETS_TTL)).await;
                }
                n <= 0
            }
            Err(error) => {
                tracing::debug!(%error, "Open sockets not counted.");
                false
            }
        }
    }
}

impl Realtime {
    /// The user's open sockets across all nodes; `None` when the cache cannot tell.
    async fn open_sockets(&self, user: UserId) -> Option<i64> {
        let key = open_sockets_key(user);
        self.cache.incr(&key, 0, OPEN_SOCKETS_TTL).await.ok()
    }
}

/// Marks the socket that took its user from no open socket to one.
#[derive(Clone, Copy)]
struct FirstSocket;

/// Where Socket.IO is served (and below).
pub const SOCKET_IO_PATH: &str = "/socket.io";

/// The Socket.IO layer for the router and the handle that emits from anywhere (REST sends).
pub async fn build(realtime: Realtime) -> anyhow::Result<(SocketIoLayer<Adapter>, Io)> {
    let clustered = realtime.clustered;
    let driver = CacheDriver::new(realtime.cache.clone(), clustered);
    let adapter = socketioxide_redis::RedisAdapterCtr::new_with_driver(
        driver,
        socketioxide_redis::RedisAdapterConfig::default(),
    );
    let (layer, io) = socketioxide::SocketIo::builder()
        .req_path(SOCKET_IO_PATH)
        // Packets waiting for one slow socket before emits to it fail (and are lost to it).
        // socketioxide's default, 128, drops messages when a busy room bursts; the channel
        // grows in blocks as used, so an idle socket costs nothing for the larger bound.
        .max_buffer_size(MAX_BUFFERED_PACKETS)
        // What each websocket reserves for its next read, per connection for as long as it is
        // open. Clients send small events (a message is at most 10,000 characters); a larger
        // frame is read in more steps. socketioxide's default is 4 KiB.
        .ws_read_buffer_size(WS_READ_BUFFER)
        .with_state(realtime)
        .with_adapter::<Adapter>(adapter)
        .build_layer();
    io.ns("/", on_connect.with(authenticate))
        .await
        .map_err(|e| anyhow::anyhow!("the Socket.IO adapter could not start: {e}"))?;
    Ok((layer, Io::new(io, clustered)))
}

/// A refused handshake: the client's `connect_error` says `UNAUTHENTICATED`.
#[derive(Debug)]
struct Refused;

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UNAUTHENTICATED")
    }
}

async fn authenticate(
    socket: Socket,
    TryData(auth): TryData<Value>,
    State(rt): State<Realtime>,
) -> Result<(), Refused> {
    let auth = auth.map_err(|_| Refused)?;
    let who = rt
        .auth
        .authenticate_handshake(&auth)
        .await
        .map_err(|_| Refused)?;
    // Everything a first event needs is in place before the client hears it is connected:
    // socketioxide sends the namespace CONNECT after this middleware but spawns the connect
    // handler, so an event sent right after CONNECT can be handled before that handler runs.
    socket.on("chat:join", chat_join);
    socket.on("chat:leave", chat_leave);
    socket.on("message:send", message_send);
    socket.on("message:read", message_read);
    socket.on("typing:start", typing_start);
    socket.on("typing:stop", typing_stop);
    socket.on("ai:send", ai_send);
    socket.on_disconnect(on_disconnect);
    socket.extensions.insert(Typing::default());
    socket.join(user_room(who.user_id));
    if rt.count(who.user_id, true).await {
        socket.extensions.insert(FirstSocket);
    }
    socket.extensions.insert(who);
    Ok(())
}

async fn on_connect(
    socket: Socket,
    io: socketioxide::SocketIo<Adapter>,
    Extension(who): Extension<Principal>,
    State(rt): State<Realtime>,
) {
    let io = Io::new(io, rt.clustered);
    touch(&*rt.cache, who.user_id, confab_core::domain::now()).await;
    // The user's first socket: their partners see them come online.
    if socket.extensions.get::<FirstSocket>().is_some() {
        announce_presence(&io, &rt, who.user_id, true, confab_core::domain::now()).await;
    }
}

/// Emits `presence` to the user rooms of everyone who shares a chat with `user` (SPEC §4).
async fn announce_presence(
    io: &Io,
    rt: &Realtime,
    user: UserId,
    online: bool,
    last_seen: confab_core::domain::Timestamp,
) {
    let partners = match rt.chats.partners(user).await {
        Ok(partners) if !partners.is_empty() => partners,
        Ok(_) => return,
        Err(error) => {
            tracing::debug!(%error, "Presence not announced.");
            return;
        }
    };
    let body = json!({
        "userId": user,
        "online": online,
        "lastSeenAt": crate::http::auth::rfc3339(last_seen),
    });
    emit_to_users(io, partners, "presence", &body).await;
}

/// The user was seen now: online for five minutes from here (SPEC §4: while a socket is
/// connected, kept fresh by [`spawn_presence`], or active in the last 5 minutes).
async fn touch(cache: &dyn Cache, user: UserId, at: confab_core::domain::Timestamp) {
    let now = at.timestamp_millis();
    if let Err(error) = cache
        .presence_touch(keys::ONLINE_USERS, &user.to_string(), now)
        .await
    {
        tracing::debug!(%error, "Presence not recorded.");
    }
}

async fn on_disconnect(
    io: socketioxide::SocketIo<Adapter>,
    Extension(who): Extension<Principal>,
    State(rt): State<Realtime>,
) {
    let io = Io::new(io, rt.clustered);
    let last = rt.count(who.user_id, false).await;
    // Last seen now; the window of SPEC §4 (5 minutes) runs from here.
    let closed_at = confab_core::domain::now();
    // Seen at `closed_at` exactly: `announce_gone` looks for activity after it, and a second
    // reading of the clock here (later under load) would count as such and keep the user
    // online for good.
    touch(&*rt.cache, who.user_id, closed_at).await;
    if last {
        tokio::spawn(announce_gone(io, rt, who.user_id, closed_at));
    }
}

/// The user's last socket closed at `closed_at`: they stay online for the window (SPEC §4),
/// then partners see them go, unless a socket opened meanwhile (on any node) or they were
/// active since (that later activity ends with its own announcement). A node that stops
/// within the window does not announce it.
async fn announce_gone(
    io: Io,
    rt: Realtime,
    user: UserId,
    closed_at: confab_core::domain::Timestamp,
) {
    let presence = rt.chats.presence();
    tokio::time::sleep(presence.window()).await;
    if rt.open_sockets(user).await.is_some_and(|open| open > 0) {
        return;
    }
    let after = closed_at + chrono::Duration::milliseconds(1);
    if presence.active_since(after).await.contains(&user) {
        return;
    }
    announce_presence(&io, &rt, user, false, closed_at).await;
}

/// Keeps the users of this node's sockets present (every minute, well within the 5-minute
/// window) and drops entries older than a day until `shutdown`.
pub fn spawn_presence(
    io: Io,
    cache: Arc<dyn Cache>,
    shutdown: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_mins(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let users: std::collections::HashSet<UserId> = io
                .sockets()
                .iter()
                .filter_map(|s| s.extensions.get::<Principal>())
                .map(|p| p.user_id)
                .collect();
            for user in users {
                touch(&*cache, user, confab_core::domain::now()).await;
            }
            let day_ago = confab_core::domain::now() - chrono::Duration::days(1);
            let _ = cache
                .presence_prune(keys::ONLINE_USERS, day_ago.timestamp_millis())
                .await;
        }
    })
}

pub fn user_room(user: UserId) -> String {
    format!("user:{user}")
}

pub fn chat_room(chat: ChatId) -> String {
    format!("chat:{chat}")
}

fn refused(code: &str) -> Value {
    json!({ "ok": false, "code": code })
}

fn error_code(err: &ChatError) -> &'static str {
    match err {
        ChatError::NotFound => "NOT_FOUND",
        ChatError::Invalid { .. } => "VALIDATION_ERROR",
        ChatError::Forbidden(_) => "FORBIDDEN",
        ChatError::RateLimited { .. } => "RATE_LIMITED",
        ChatError::Store(confab_core::ports::store::StoreError::Unavailable(_)) => "UNAVAILABLE",
        ChatError::Store(_) => "INTERNAL_ERROR",
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ChatRef {
    chat_id: ChatId,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SendPayload {
    chat_id: ChatId,
    client_id: Option<String>,
    text: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ReadPayload {
    chat_id: ChatId,
    message_id: MessageId,
}

async fn chat_join(
    socket: Socket,
    Extension(who): Extension<Principal>,
    State(rt): State<Realtime>,
    TryData(data): TryData<ChatRef>,
    ack: Ack,
) {
    let answer = match data {
        Err(_) => refused("VALIDATION_ERROR"),
        Ok(ChatRef { chat_id }) => match rt.chats.check_member(who.user_id, chat_id).await {
            Ok(()) => {
                socket.join(chat_room(chat_id));
                // Removed between the check and the join (whose `leave` found nothing to
                // take out)? Then out again: checked after joining, a removal is never missed.
                match rt.chats.check_member(who.user_id, chat_id).await {
                    Ok(()) => json!({ "ok": true }),
                    Err(e) => {
                        socket.leave(chat_room(chat_id));
                        refused(error_code(&e))
                    }
                }
            }
            Err(e) => refused(error_code(&e)),
        },
    };
    let _ = ack.send(&answer);
}

async fn chat_leave(socket: Socket, TryData(data): TryData<ChatRef>, ack: Ack) {
    if let Ok(ChatRef { chat_id }) = data {
        socket.leave(chat_room(chat_id));
    }
    let _ = ack.send(&json!({ "ok": true }));
}

/// Persists, acknowledges (only once stored), then broadcasts `message:new` to the chat room.
async fn message_send(
    Extension(who): Extension<Principal>,
    State(rt): State<Realtime>,
    TryData(data): TryData<SendPayload>,
    ack: Ack,
) {
    let Ok(data) = data else {
        let _ = ack.send(&refused("VALIDATION_ERROR"));
        return;
    };
    let sent = rt
        .chats
        .send(
            who.user_id,
            data.chat_id,
            &data.text,
            data.client_id.as_deref(),
        )
        .await;
    let sent = match sent {
        Ok(sent) => sent,
        Err(e) => {
            let _ = ack.send(&refused(error_code(&e)));
            return;
        }
    };
    let _ = ack.send(&json!({
        "ok": true,
        "id": sent.message.id,
        "createdAt": crate::http::auth::rfc3339(sent.message.created_at),
    }));
    // A new message reaches the room through `spawn_broadcaster`.
}

#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct AiSendPayload {
    message: String,
    session_id: Option<confab_core::domain::AiSessionId>,
    model: Option<String>,
}

/// `ai:send`: the same as `POST /ai/messages`; the ack carries the session and request ids,
/// the answer comes as `ai:token` … `ai:response` (or `ai:error`).
async fn ai_send(
    Extension(who): Extension<Principal>,
    State(rt): State<Realtime>,
    TryData(data): TryData<AiSendPayload>,
    ack: Ack,
) {
    let Ok(data) = data else {
        let _ = ack.send(&refused("VALIDATION_ERROR"));
        return;
    };
    let Some(ai) = rt.ai.get() else {
        let _ = ack.send(&refused("UNAVAILABLE"));
        return;
    };
    let ask = confab_core::services::ai::Ask {
        message: data.message,
        session_id: data.session_id,
        model: data.model,
    };
    match ai.submit(who.user_id, ask).await {
        Ok(submitted) => {
            let _ = ack.send(&json!({
                "ok": true,
                "sessionId": submitted.session_id,
                "requestId": submitted.request_id,
            }));
        }
        Err(e) => {
            let _ = ack.send(&refused(confab_core::error::ErrorCode::from(&e).as_str()));
        }
    }
}

/// Emits `message:new` for every newly stored message (however it was sent) to its chat
/// room, sender included, in commit order: one task, so every member sees one order.
/// An image message carries its signed URLs (the same for every member: all may see it).
pub fn spawn_broadcaster(
    io: Io,
    chats: &ChatService,
    media: Arc<MediaService>,
) -> Option<tokio::task::JoinHandle<()>> {
    let mut committed = chats.subscribe_committed()?;
    Some(tokio::spawn(async move {
        while let Some(batch) = committed.recv().await {
            for (message, kind) in batch {
                let room = chat_room(message.chat_id);
                let image = media.image_urls(&message).await;
                emit(
                    &io,
                    room,
                    "message:new",
                    &MessageBody::new_message(message, kind, image),
                )
                .await;
            }
        }
    }))
}

/// Closes every socket of `user` on every node: their sign-ins ended (logout everywhere,
/// password changed or reset, account deleted), so the sockets opened with them end too.
pub async fn disconnect_user(io: &Io, user: UserId) {
    if let Err(error) = io.to(user_room(user)).disconnect().await {
        tracing::warn!(%error, "Could not close a user's sockets.");
    }
}

/// Emits `event` to the user rooms of `users` on every node, once per socket.
pub async fn emit_to_users(
    io: &Io,
    users: impl IntoIterator<Item = UserId>,
    event: &'static str,
    body: &impl serde::Serialize,
) {
    let rooms: Vec<String> = users.into_iter().map(user_room).collect();
    if rooms.is_empty() {
        return;
    }
    if let Err(error) = io.to(rooms).emit(event, body).await {
        tracing::warn!(%error, event, "Could not broadcast.");
    }
}

/// Emits `event` to `room` on every node; a failure is logged, never the caller's failure
/// (the change is stored; clients catch up with `after`).
pub async fn emit(io: &Io, room: String, event: &'static str, body: &impl serde::Serialize) {
    if let Err(error) = io.to(room).emit(event, body).await {
        tracing::warn!(%error, event, "Could not broadcast.");
    }
}

async fn message_read(
    socket: Socket,
    Extension(who): Extension<Principal>,
    State(rt): State<Realtime>,
    TryData(data): TryData<ReadPayload>,
    ack: Ack,
) {
    let Ok(data) = data else {
        let _ = ack.send(&refused("VALIDATION_ERROR"));
        return;
    };
    match rt
        .chats
        .mark_read(who.user_id, data.chat_id, data.message_id)
        .await
    {
        Ok(()) => {
            let _ = ack.send(&json!({ "ok": true }));
            let event = json!({
                "chatId": data.chat_id,
                "userId": who.user_id,
                "messageId": data.message_id,
                "seenAt": crate::http::auth::rfc3339(confab_core::domain::now()),
            });
            let _ = socket
                .within(chat_room(data.chat_id))
                .emit("message:read", &event)
                .await;
        }
        Err(e) => {
            let _ = ack.send(&refused(error_code(&e)));
        }
    }
}

/// How long `typing: true` lasts without a new `typing:start` (SPEC §4).
pub const TYPING_LASTS: std::time::Duration = std::time::Duration::from_secs(5);

/// Per socket: the latest typing change per chat, so a stop timer knows whether it is stale.
#[derive(Clone, Default)]
struct Typing(Arc<std::sync::Mutex<std::collections::HashMap<ChatId, u64>>>);

impl Typing {
    /// Records a change for `chat` and returns its number.
    fn bump(&self, chat: ChatId) -> u64 {
        let mut map = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = map.entry(chat).or_default();
        *n += 1;
        *n
    }

    fn is_latest(&self, chat: ChatId, n: u64) -> bool {
        let map = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.get(&chat) == Some(&n)
    }
}

async fn emit_typing(socket: &Socket, who: Principal, chat: ChatId, typing: bool) {
    let event = json!({ "chatId": chat, "userId": who.user_id, "typing": typing });
    let _ = socket.to(chat_room(chat)).emit("typing", &event).await;
}

async fn typing(socket: Socket, who: Principal, data: Result<ChatRef, ()>, typing: bool) {
    let Ok(ChatRef { chat_id }) = data else {
        return;
    };
    // Only to a room the socket joined (as a member): no typing into others' chats.
    if !socket.rooms().contains(&chat_room(chat_id).into()) {
        return;
    }
    let Some(state) = socket.extensions.get::<Typing>() else {
        return;
    };
    let n = state.bump(chat_id);
    emit_typing(&socket, who, chat_id, typing).await;
    if typing {
        // Stops by itself unless started again (or stopped) in the meantime.
        tokio::spawn(async move {
            tokio::time::sleep(TYPING_LASTS).await;
            if state.is_latest(chat_id, n) && socket.connected() {
                state.bump(chat_id);
                emit_typing(&socket, who, chat_id, false).await;
            }
        });
    }
}

async fn typing_start(
    socket: Socket,
    Extension(who): Extension<Principal>,
    TryData(data): TryData<ChatRef>,
) {
    typing(socket, who, data.map_err(drop), true).await;
}

async fn typing_stop(
    socket: Socket,
    Extension(who): Extension<Principal>,
    TryData(data): TryData<ChatRef>,
) {
    typing(socket, who, data.map_err(drop), false).await;
}
