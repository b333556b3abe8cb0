//! A small Socket.IO v4 client over one WebSocket (Engine.IO 4, the default namespace), for
//! the tests' bulk work and the realtime load tool (included with `#[path]` by both). It does
//! what they need and nothing more: connect with `auth`, emit with or without an ack, receive
//! events, answer the server's pings. Wire compatibility with the official clients is proven
//! by the tests that drive npm's `socket.io-client`; this one keeps bulk tests fast.

#![allow(dead_code, clippy::too_many_lines)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message as Frame;

/// An event the server emitted, with the moment it was read off the socket.
#[derive(Debug, Clone)]
pub struct Event {
    pub name: String,
    pub data: Value,
    pub at: Instant,
}

type Acks = Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>>;

pub struct Client {
    out: mpsc::UnboundedSender<Frame>,
    acks: Acks,
    next_ack: AtomicU64,
}

/// Connects to `base` (`http://127.0.0.1:port`) with `auth` as the handshake payload
/// (`{"token": …}`); `Err` with the server's message when the connection is refused
/// (`connect_error`). Events arrive on the returned receiver until the socket closes.
pub async fn connect(
    base: &str,
    auth: &Value,
) -> Result<(Client, mpsc::UnboundedReceiver<Event>), String> {
    let url = format!(
        "{}/socket.io/?EIO=4&transport=websocket",
        base.replacen("http", "ws", 1)
    );
    let host = base
        .split("://")
        .nth(1)
        .ok_or_else(|| format!("not a URL: {base}"))?
        .trim_end_matches('/');
    let tcp = tokio::net::TcpStream::connect(host)
        .await
        .map_err(|e| format!("connect {host}: {e}"))?;
    // Small frames must not wait for Nagle.
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    let (mut ws, _) = tokio_tungstenite::client_async(url, tcp)
        .await
        .map_err(|e| format!("websocket: {e}"))?;
    // Engine.IO open, then the namespace CONNECT with the auth payload.
    match ws.next().await {
        Some(Ok(Frame::Text(open))) if open.starts_with('0') => {}
        other => return Err(format!("expected the Engine.IO open packet, got {other:?}")),
    }
    ws.send(Frame::text(format!("40{auth}")))
        .await
        .map_err(|e| e.to_string())?;
    loop {
        match ws.next().await {
            Some(Ok(Frame::Text(t))) if t.starts_with("40") => break,
            Some(Ok(Frame::Text(t))) if t.starts_with("44") => {
                let body: Value = serde_json::from_str(&t[2..]).unwrap_or(Value::Null);
                return Err(body["message"].as_str().unwrap_or(&t).to_owned());
            }
            Some(Ok(Frame::Text(t))) if &*t == "2" => {
                ws.send(Frame::text("3")).await.map_err(|e| e.to_string())?;
            }
            Some(Ok(_)) => {}
            other => return Err(format!("connection ended during the handshake: {other:?}")),
        }
    }
    let (mut sink, mut stream) = ws.split();
    let (out, mut outgoing) = mpsc::unbounded_channel::<Frame>();
    let (events_tx, events) = mpsc::unbounded_channel();
    let acks: Acks = Arc::default();
    tokio::spawn(async move {
        while let Some(frame) = outgoing.recv().await {
            if sink.send(frame).await.is_err() {
                break;
            }
        }
        let _ = sink.close().await;
    });
    let pong = out.clone();
    let pending = acks.clone();
    tokio::spawn(async move {
        while let Some(Ok(frame)) = stream.next().await {
            let Frame::Text(text) = frame else { continue };
            let at = Instant::now();
            let text: &str = &text;
            if text == "2" {
                let _ = pong.send(Frame::text("3"));
            } else if let Some(packet) = text.strip_prefix("42") {
                if let Ok(Value::Array(mut parts)) = serde_json::from_str::<Value>(packet)
                    && let Some(Value::String(name)) = parts.first().cloned()
                {
                    let data = if parts.len() > 1 {
                        parts.swap_remove(1)
                    } else {
                        Value::Null
                    };
                    if events_tx.send(Event { name, data, at }).is_err() {
                        // Nobody listens: keep answering pings and acks.
                    }
                }
            } else if let Some(packet) = text.strip_prefix("43") {
                let digits = packet.bytes().take_while(u8::is_ascii_digit).count();
                let (id, body) = packet.split_at(digits);
                if let (Ok(id), Ok(Value::Array(mut parts))) =
                    (id.parse::<u64>(), serde_json::from_str::<Value>(body))
                {
                    let first = if parts.is_empty() {
                        Value::Null
                    } else {
                        parts.swap_remove(0)
                    };
                    let waiter = pending
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .remove(&id);
                    if let Some(waiter) = waiter {
                        let _ = waiter.send(first);
                    }
                }
            } else if text.starts_with("41") || text.starts_with('1') {
                break;
            }
        }
    });
    Ok((
        Client {
            out,
            acks,
            next_ack: AtomicU64::new(0),
        },
        events,
    ))
}

impl Client {
    /// Emits without asking for an ack.
    pub fn emit(&self, event: &str, data: &Value) {
        let _ = self
            .out
            .send(Frame::text(format!("42{}", json!([event, data]))));
    }

    /// Emits and waits (up to `timeout`) for the server's ack: its first argument.
    pub async fn call(
        &self,
        event: &str,
        data: &Value,
        timeout: Duration,
    ) -> Result<Value, String> {
        let answer = self.call_later(event, data);
        match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(_)) => Err(format!("{event}: the connection closed before the ack")),
            Err(_) => Err(format!("{event}: no ack within {timeout:?}")),
        }
    }

    /// Emits asking for an ack, without waiting: the ack arrives on the receiver.
    pub fn call_later(&self, event: &str, data: &Value) -> oneshot::Receiver<Value> {
        let id = self.next_ack.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.acks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id, tx);
        let _ = self
            .out
            .send(Frame::text(format!("42{id}{}", json!([event, data]))));
        rx
    }

    /// Sends a raw Engine.IO text frame (malformed-input tests).
    pub fn raw(&self, text: &str) {
        let _ = self.out.send(Frame::text(text.to_owned()));
    }

    /// Leaves the namespace and closes the socket.
    pub fn close(&self) {
        let _ = self.out.send(Frame::text("41"));
        let _ = self.out.send(Frame::Close(None));
    }
}

/// Waits for the next event called `name` (others are skipped), up to `timeout`.
pub async fn next_named(
    events: &mut mpsc::UnboundedReceiver<Event>,
    name: &str,
    timeout: Duration,
) -> Option<Event> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(event)) if event.name == name => return Some(event),
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => return None,
        }
    }
}
