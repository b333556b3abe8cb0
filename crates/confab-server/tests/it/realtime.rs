//! Socket.IO (SPEC §4) driven by the official JavaScript client, `socket.io-client` v4 from
//! npm, run with the machine's Node.js (installed by scripts/services.sh; the tests are
//! skipped without it, and fail under `CI=true`).

use std::process::Stdio;
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout};

use crate::auth::{Backend, Person, auth_app, call, person};
use crate::helpers::TestApp;

struct JsClient {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl JsClient {
    /// The client script with `config`; `None` (skipped) without the npm package.
    fn start(app: &TestApp, mut config: Value) -> Option<Self> {
        let modules = confab_core::testing::service_url(
            "TEST_SOCKETIO_NODE_MODULES",
            "official Socket.IO client",
        )?;
        config["url"] = json!(app.url(""));
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/js/socket_client.cjs");
        let mut child = tokio::process::Command::new("node")
            .arg(script)
            .arg(config.to_string())
            .env("NODE_PATH", modules)
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("node runs");
        let stdout = child.stdout.take().expect("piped");
        Some(Self {
            child,
            lines: BufReader::new(stdout).lines(),
        })
    }

    /// The next event line the client printed.
    async fn next(&mut self) -> Value {
        let line = tokio::time::timeout(Duration::from_secs(20), self.lines.next_line())
            .await
            .expect("the client answers in time")
            .expect("stdout is readable")
            .expect("the client printed a line before exiting");
        let value: Value = serde_json::from_str(&line).expect("one JSON object a line");
        assert_ne!(value["event"], "failed", "{value}");
        value
    }

    async fn finish(mut self) {
        let status = tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .expect("the client exits")
            .unwrap();
        assert!(status.success());
    }
}

async fn direct_chat(app: &TestApp, a: &Person, b: &Person) -> String {
    let response = call(
        app,
        Method::POST,
        "/api/v1/chats",
        Some(&a.token),
        Some(json!({"memberIds": [b.id]})),
    )
    .await;
    let chat: Value = response.json().await.unwrap();
    chat["id"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_client_joins_sends_with_an_ack_and_gets_the_message() {
    let app = auth_app(&Backend::EMBEDDED, |_| {}).await;
    let (ann, bob) = (person(&app, "ann").await, person(&app, "bob").await);
    let chat = direct_chat(&app, &ann, &bob).await;
    let Some(mut client) = JsClient::start(
        &app,
        json!({"mode": "send", "token": ann.token, "chatId": chat, "text": "hi from js", "clientId": "js-1"}),
    ) else {
        return;
    };
    let joined = client.next().await;
    assert_eq!(joined["ack"], json!({"ok": true}), "{joined}");
    let sent = client.next().await;
    assert_eq!(sent["ack"]["ok"], true, "{sent}");
    let id = sent["ack"]["id"].as_str().unwrap().to_owned();
    assert!(sent["ack"]["createdAt"].is_string());
    let received = client.next().await;
    assert_eq!(received["event"], "message:new");
    assert_eq!(
        received["message"]["id"],
        id.as_str(),
        "the sender gets it too"
    );
    assert_eq!(received["message"]["text"], "hi from js");
    assert_eq!(received["message"]["senderId"], ann.id.as_str());
    client.finish().await;

    // The ack meant stored: the history has it.
    let page: Value = call(
        &app,
        Method::GET,
        &format!("/api/v1/chats/{chat}/messages"),
        Some(&bob.token),
        None,
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(page["items"][0]["id"], id.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_sent_over_rest_reaches_a_listening_client() {
    let app = auth_app(&Backend::EMBEDDED, |_| {}).await;
    let (ann, bob) = (person(&app, "ann").await, person(&app, "bob").await);
    let chat = direct_chat(&app, &ann, &bob).await;
    let Some(mut bobs) = JsClient::start(
        &app,
        json!({"mode": "listen", "token": bob.token, "chatId": chat}),
    ) else {
        return;
    };
    assert_eq!(bobs.next().await["ack"]["ok"], true);
    assert_eq!(bobs.next().await["event"], "ready");
    let sent: Value = call(
        &app,
        Method::POST,
        &format!("/api/v1/chats/{chat}/messages"),
        Some(&ann.token),
        Some(json!({"text": "over rest", "clientId": "rest-1"})),
    )
    .await
    .json()
    .await
    .unwrap();
    let received = bobs.next().await;
    assert_eq!(received["message"]["id"], sent["id"]);
    assert_eq!(received["message"]["text"], "over rest");
    bobs.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_handshake_needs_a_valid_token_on_either_transport() {
    let app = auth_app(&Backend::EMBEDDED, |_| {}).await;
    let ann = person(&app, "ann").await;
    for (token, transports, expected) in [
        (json!(ann.token), json!(["websocket"]), "connected"),
        (json!(ann.token), json!(["polling"]), "connected"),
        (json!("not-a-token"), json!(["websocket"]), "connect_error"),
        (Value::Null, json!(["polling"]), "connect_error"),
    ] {
        let mut config = json!({"mode": "connect", "transports": transports});
        if !token.is_null() {
            config["token"] = token;
        }
        let Some(mut client) = JsClient::start(&app, config) else {
            return;
        };
        let outcome = client.next().await;
        assert_eq!(outcome["event"], expected, "{outcome}");
        if expected == "connect_error" {
            assert_eq!(outcome["message"], "UNAUTHENTICATED");
        }
        client.finish().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_member_can_neither_join_nor_send() {
    let app = auth_app(&Backend::EMBEDDED, |_| {}).await;
    let (ann, bob, eve) = (
        person(&app, "ann").await,
        person(&app, "bob").await,
        person(&app, "eve").await,
    );
    let chat = direct_chat(&app, &ann, &bob).await;
    let Some(mut client) = JsClient::start(
        &app,
        json!({"mode": "send", "token": eve.token, "chatId": chat, "text": "intruding", "clientId": "e-1"}),
    ) else {
        return;
    };
    let joined = client.next().await;
    assert_eq!(
        joined["ack"],
        json!({"ok": false, "code": "NOT_FOUND"}),
        "{joined}"
    );
    let sent = client.next().await;
    assert_eq!(
        sent["ack"],
        json!({"ok": false, "code": "NOT_FOUND"}),
        "{sent}"
    );
    client.finish().await;
    let page: Value = call(
        &app,
        Method::GET,
        &format!("/api/v1/chats/{chat}/messages"),
        Some(&ann.token),
        None,
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(page["items"].as_array().unwrap().len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_hear_of_new_chats_and_of_edits_and_deletions() {
    let app = auth_app(&Backend::EMBEDDED, |_| {}).await;
    let (ann, bob) = (person(&app, "ann").await, person(&app, "bob").await);
    // Bob is online before the chat exists: chat:new reaches his user room.
    let Some(mut lobby) = JsClient::start(
        &app,
        json!({"mode": "events", "token": bob.token, "expect": 1}),
    ) else {
        return;
    };
    assert_eq!(lobby.next().await["event"], "ready");
    let chat = direct_chat(&app, &ann, &bob).await;
    let new = lobby.next().await;
    assert_eq!(new["event"], "chat:new");
    assert_eq!(new["data"]["id"], chat.as_str());
    lobby.finish().await;

    let Some(mut room) = JsClient::start(
        &app,
        json!({"mode": "events", "token": bob.token, "chatId": chat, "expect": 3}),
    ) else {
        return;
    };
    assert_eq!(room.next().await["ack"]["ok"], true);
    assert_eq!(room.next().await["event"], "ready");
    let path = format!("/api/v1/chats/{chat}/messages");
    let sent: Value = call(
        &app,
        Method::POST,
        &path,
        Some(&ann.token),
        Some(json!({"text": "v1", "clientId": "u-1"})),
    )
    .await
    .json()
    .await
    .unwrap();
    let one = format!("{path}/{}", sent["id"].as_str().unwrap());
    call(
        &app,
        Method::PATCH,
        &one,
        Some(&ann.token),
        Some(json!({"text": "v2"})),
    )
    .await;
    call(&app, Method::DELETE, &one, Some(&ann.token), None).await;
    let events: Vec<Value> = [room.next().await, room.next().await, room.next().await].into();
    let names: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["message:new", "message:updated", "message:deleted"]);
    assert_eq!(events[1]["data"]["text"], "v2");
    assert!(events[2]["data"]["text"].is_null() && events[2]["data"]["deletedAt"].is_string());
    room.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connected_user_shows_as_online_in_their_profile() {
    let app = auth_app(&Backend::EMBEDDED, |_| {}).await;
    let (ann, bob) = (person(&app, "ann").await, person(&app, "bob").await);
    let profile = |app: &TestApp, token: String, id: String| {
        let path = format!("/api/v1/users/{id}");
        let client = app.client.clone();
        let url = app.url(&path);
        async move {
            let body: Value = client
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            body["online"].as_bool().unwrap()
        }
    };
    assert!(
        !profile(&app, ann.token.clone(), bob.id.clone()).await,
        "not connected yet"
    );
    let Some(mut bobs) = JsClient::start(
        &app,
        json!({"mode": "events", "token": bob.token, "expect": 1}),
    ) else {
        return;
    };
    assert_eq!(bobs.next().await["event"], "ready");
    confab_core::testing::eventually("bob shows as online", Duration::from_secs(5), || {
        profile(&app, ann.token.clone(), bob.id.clone())
    })
    .await;
    // Something for Bob's client to receive, so that it ends.
    direct_chat(&app, &ann, &bob).await;
    assert_eq!(bobs.next().await["event"], "chat:new");
    bobs.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_reaches_the_other_members_and_stops_by_itself() {
    let app = auth_app(&Backend::EMBEDDED, |_| {}).await;
    let (ann, bob) = (person(&app, "ann").await, person(&app, "bob").await);
    let chat = direct_chat(&app, &ann, &bob).await;
    let Some(mut bobs) = JsClient::start(
        &app,
        json!({"mode": "events", "token": bob.token, "chatId": chat, "expect": 2, "ignore": ["presence"]}),
    ) else {
        return;
    };
    assert_eq!(bobs.next().await["ack"]["ok"], true);
    assert_eq!(bobs.next().await["event"], "ready");
    let Some(mut anns) = JsClient::start(
        &app,
        json!({"mode": "typing", "token": ann.token, "chatId": chat, "holdMs": 8000}),
    ) else {
        return;
    };
    assert_eq!(anns.next().await["ack"]["ok"], true);
    let started = std::time::Instant::now();
    let on = bobs.next().await;
    assert_eq!(
        (on["event"].as_str(), &on["data"]["typing"]),
        (Some("typing"), &json!(true))
    );
    assert_eq!(on["data"]["userId"], ann.id.as_str());
    // No typing:stop was sent: it ends by itself after 5 s.
    let off = bobs.next().await;
    assert_eq!(
        (off["event"].as_str(), &off["data"]["typing"]),
        (Some("typing"), &json!(false))
    );
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    bobs.finish().await;
    assert_eq!(anns.next().await["event"], "ready");
    anns.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_payloads_get_a_validation_ack_and_the_socket_stays() {
    let app = auth_app(&Backend::EMBEDDED, |_| {}).await;
    let (ann, bob) = (person(&app, "ann").await, person(&app, "bob").await);
    let chat = direct_chat(&app, &ann, &bob).await;
    let too_long = "x".repeat(10_001);
    let emits = json!([
        ["chat:join", {"chatId": "not-a-uuid"}],
        ["chat:join", "just a string"],
        ["message:send", {"chatId": chat}],
        ["message:send", {"chatId": chat, "clientId": "m-1", "text": ""}],
        ["message:send", {"chatId": chat, "clientId": "m-2", "text": too_long}],
        ["message:send", {"chatId": chat, "clientId": "m-3", "text": 42}],
        ["message:read", {"chatId": chat}],
        ["message:send", {"chatId": chat, "clientId": "m-4", "text": "fine after all that"}],
    ]);
    let Some(mut client) = JsClient::start(
        &app,
        json!({"mode": "raw", "token": ann.token, "emits": emits}),
    ) else {
        return;
    };
    let mut acks = Vec::new();
    for _ in 0..8 {
        let line = client.next().await;
        assert_eq!(line["event"], "ack", "{line}");
        acks.push(line["ack"].clone());
    }
    for ack in &acks[..7] {
        assert_eq!(ack, &json!({"ok": false, "code": "VALIDATION_ERROR"}));
    }
    assert_eq!(acks[7]["ok"], true, "{}", acks[7]);
    let still = client.next().await;
    assert_eq!(still["connected"], true, "never a dropped socket");
    client.finish().await;
}
