//! Chats between people over REST (SPEC §3 "Chats"): direct and group chats, members,
//! idempotent sends, edits, tombstones, read receipts, paging after a reconnect, and the
//! rule that a non-member sees nothing.

use reqwest::Method;
use serde_json::{Value, json};

use crate::auth::{Backend, Person, auth_app, call, person};
use crate::helpers::{TestApp, assert_error};

async fn as_(
    app: &TestApp,
    who: &Person,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let response = call(app, method, path, Some(&who.token), body).await;
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn direct(app: &TestApp, from: &Person, to: &Person) -> String {
    let (status, chat) = as_(
        app,
        from,
        Method::POST,
        "/api/v1/chats",
        Some(json!({"memberIds": [to.id]})),
    )
    .await;
    assert!(status == 201 || status == 200, "{status} {chat}");
    chat["id"].as_str().unwrap().to_owned()
}

async fn send(
    app: &TestApp,
    who: &Person,
    chat: &str,
    text: &str,
    client_id: &str,
) -> (u16, Value) {
    as_(
        app,
        who,
        Method::POST,
        &format!("/api/v1/chats/{chat}/messages"),
        Some(json!({"text": text, "clientId": client_id})),
    )
    .await
}

async fn a_direct_chat_is_made_once_and_messages_flow_with_receipts(backend: &Backend) {
    let app = auth_app(backend, |_| {}).await;
    let (ann, bob) = (person(&app, "ann").await, person(&app, "bob").await);
    let (status, chat) = as_(
        &app,
        &ann,
        Method::POST,
        "/api/v1/chats",
        Some(json!({"memberIds": [bob.id]})),
    )
    .await;
    assert_eq!(status, 201, "{chat}");
    assert_eq!(chat["kind"], "direct");
    let id = chat["id"].as_str().unwrap().to_owned();
    let (again, same) = as_(
        &app,
        &ann,
        Method::POST,
        "/api/v1/chats",
        Some(json!({"memberIds": [bob.id, ann.id]})),
    )
    .await;
    assert_eq!((again, same["id"].as_str()), (200, Some(id.as_str())));
    let (_, from_bob) = as_(
        &app,
        &bob,
        Method::POST,
        "/api/v1/chats",
        Some(json!({"memberIds": [ann.id]})),
    )
    .await;
    assert_eq!(
        from_bob["id"],
        id.as_str(),
        "either side gets the same chat"
    );

    // A retried send with the same clientId is the same message.
    let (status, hello) = send(&app, &ann, &id, "hello Bob", "ann-1").await;
    assert_eq!(status, 201, "{hello}");
    let (status, retry) = send(&app, &ann, &id, "hello Bob", "ann-1").await;
    assert_eq!((status, &retry["id"]), (200, &hello["id"]));
    assert_eq!(hello["senderId"], ann.id.as_str());
    assert_eq!(hello["seen"], false);

    let (_, chats) = as_(&app, &bob, Method::GET, "/api/v1/chats", None).await;
    let listed = &chats["items"][0];
    assert_eq!(listed["id"], id.as_str());
    assert_eq!(listed["latestMessage"]["text"], "hello Bob");
    assert_eq!(listed["unreadCount"], 1);
    assert_eq!(listed["members"].as_array().unwrap().len(), 2);

    // Bob reads it: Ann sees it seen, Bob has nothing unread.
    let (status, _) = as_(
        &app,
        &bob,
        Method::POST,
        &format!("/api/v1/chats/{id}/read"),
        Some(json!({"messageId": hello["id"]})),
    )
    .await;
    assert_eq!(status, 204);
    let (_, page) = as_(
        &app,
        &ann,
        Method::GET,
        &format!("/api/v1/chats/{id}/messages"),
        None,
    )
    .await;
    let message = &page["items"][0];
    assert_eq!(message["seen"], true, "{message}");
    assert!(message["seenAt"].is_string());
    assert_eq!(message["seenBy"][0]["userId"], bob.id.as_str());
    let (_, chat) = as_(
        &app,
        &bob,
        Method::GET,
        &format!("/api/v1/chats/{id}"),
        None,
    )
    .await;
    assert_eq!(chat["unreadCount"], 0);

    // Only the sender edits or deletes; a deletion leaves a tombstone.
    let path = format!(
        "/api/v1/chats/{id}/messages/{}",
        hello["id"].as_str().unwrap()
    );
    let (status, _) = as_(
        &app,
        &bob,
        Method::PATCH,
        &path,
        Some(json!({"text": "hacked"})),
    )
    .await;
    assert_eq!(status, 403);
    let (status, edited) = as_(
        &app,
        &ann,
        Method::PATCH,
        &path,
        Some(json!({"text": "hello, Bob"})),
    )
    .await;
    assert_eq!((status, edited["text"].as_str()), (200, Some("hello, Bob")));
    assert!(edited["editedAt"].is_string());
    let (status, tomb) = as_(&app, &ann, Method::DELETE, &path, None).await;
    assert_eq!(status, 200);
    assert!(
        tomb["text"].is_null() && tomb["deletedAt"].is_string(),
        "{tomb}"
    );
    let (_, page) = as_(
        &app,
        &bob,
        Method::GET,
        &format!("/api/v1/chats/{id}/messages"),
        None,
    )
    .await;
    assert!(
        page["items"][0]["text"].is_null(),
        "the tombstone stays in the history"
    );
    let (status, _) = as_(
        &app,
        &ann,
        Method::PATCH,
        &path,
        Some(json!({"text": "back"})),
    )
    .await;
    assert_eq!(status, 404, "a deleted message cannot be edited");
}

async fn a_non_member_sees_nothing_and_can_do_nothing(backend: &Backend) {
    let app = auth_app(backend, |_| {}).await;
    let (ann, bob, eve) = (
        person(&app, "ann").await,
        person(&app, "bob").await,
        person(&app, "eve").await,
    );
    let id = direct(&app, &ann, &bob).await;
    let (_, hello) = send(&app, &ann, &id, "private", "p-1").await;
    let message = hello["id"].as_str().unwrap();
    let attempts = [
        (Method::GET, format!("/api/v1/chats/{id}"), None),
        (Method::GET, format!("/api/v1/chats/{id}/messages"), None),
        (
            Method::POST,
            format!("/api/v1/chats/{id}/messages"),
            Some(json!({"text": "hi", "clientId": "e-1"})),
        ),
        (
            Method::POST,
            format!("/api/v1/chats/{id}/read"),
            Some(json!({"messageId": message})),
        ),
        (
            Method::POST,
            format!("/api/v1/chats/{id}/members"),
            Some(json!({"userId": eve.id})),
        ),
        (
            Method::PATCH,
            format!("/api/v1/chats/{id}/messages/{message}"),
            Some(json!({"text": "x"})),
        ),
        (
            Method::DELETE,
            format!("/api/v1/chats/{id}/messages/{message}"),
            None,
        ),
        (
            Method::DELETE,
            format!("/api/v1/chats/{id}/members/{}", ann.id),
            None,
        ),
    ];
    for (method, path, body) in attempts {
        let response = call(&app, method.clone(), &path, Some(&eve.token), body).await;
        assert_error(response, 404, "NOT_FOUND").await;
    }
    let (_, chats) = as_(&app, &eve, Method::GET, "/api/v1/chats", None).await;
    assert_eq!(chats["items"].as_array().unwrap().len(), 0);
    let (_, page) = as_(
        &app,
        &bob,
        Method::GET,
        &format!("/api/v1/chats/{id}/messages"),
        None,
    )
    .await;
    assert_eq!(
        page["items"].as_array().unwrap().len(),
        1,
        "nothing was added"
    );
}

async fn groups_have_an_admin_members_join_and_leave(backend: &Backend) {
    let app = auth_app(backend, |_| {}).await;
    let (ann, bob, carl, dave) = (
        person(&app, "ann").await,
        person(&app, "bob").await,
        person(&app, "carl").await,
        person(&app, "dave").await,
    );
    let (status, group) = as_(
        &app,
        &ann,
        Method::POST,
        "/api/v1/chats",
        Some(json!({"memberIds": [bob.id, carl.id], "name": "Trip"})),
    )
    .await;
    assert_eq!(status, 201);
    assert_eq!(
        (group["kind"].as_str(), group["name"].as_str()),
        (Some("group"), Some("Trip"))
    );
    let id = group["id"].as_str().unwrap().to_owned();
    let admin: Vec<&Value> = group["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "admin")
        .collect();
    assert_eq!(admin.len(), 1);
    assert_eq!(admin[0]["userId"], ann.id.as_str());

    let remove = |who: &Person| format!("/api/v1/chats/{id}/members/{}", who.id);
    let (status, _) = as_(&app, &bob, Method::DELETE, &remove(&carl), None).await;
    assert_eq!(status, 403, "only admins remove others");
    let (status, _) = as_(&app, &ann, Method::DELETE, &remove(&carl), None).await;
    assert_eq!(status, 204);
    let (status, _) = as_(
        &app,
        &carl,
        Method::GET,
        &format!("/api/v1/chats/{id}"),
        None,
    )
    .await;
    assert_eq!(status, 404, "a removed member no longer sees the chat");
    let (status, _) = as_(&app, &bob, Method::DELETE, &remove(&bob), None).await;
    assert_eq!(status, 204, "anyone may leave");
    let (status, chat) = as_(
        &app,
        &ann,
        Method::POST,
        &format!("/api/v1/chats/{id}/members"),
        Some(json!({"userId": dave.id})),
    )
    .await;
    assert_eq!(status, 200);
    let members: Vec<&str> = chat["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["userId"].as_str().unwrap())
        .collect();
    assert_eq!(members.len(), 2, "{members:?}");
    assert!(members.contains(&dave.id.as_str()) && members.contains(&ann.id.as_str()));
    let (status, _) = send(&app, &dave, &id, "hi all", "d-1").await;
    assert_eq!(status, 201);
}

async fn a_reconnecting_client_gets_exactly_what_it_missed(backend: &Backend) {
    // One sender at full speed: the per-user message rate is not what this is about.
    let app = auth_app(backend, |c| c.chat.messages_per_second = 10_000).await;
    let (ann, bob) = (person(&app, "ann").await, person(&app, "bob").await);
    let id = direct(&app, &ann, &bob).await;
    let (_, first) = send(&app, &ann, &id, "before the drop", "r-0").await;
    let last_seen = first["id"].as_str().unwrap().to_owned();

    // Messages keep flowing while Bob catches up page by page from his last id.
    let total = 120;
    let sender = {
        let (app_url, token, id) = (app.url(""), ann.token.clone(), id.clone());
        let client = app.client.clone();
        tokio::spawn(async move {
            for n in 1..=total {
                let response = client
                    .post(format!("{app_url}/api/v1/chats/{id}/messages"))
                    .bearer_auth(&token)
                    .json(&json!({"text": format!("m{n}"), "clientId": format!("r-{n}")}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 201);
            }
        })
    };
    let mut got: Vec<String> = Vec::new();
    let mut cursor = last_seen;
    let started = std::time::Instant::now();
    while got.len() < total {
        let (status, page) = as_(
            &app,
            &bob,
            Method::GET,
            &format!("/api/v1/chats/{id}/messages?after={cursor}&limit=25"),
            None,
        )
        .await;
        assert_eq!(status, 200);
        for m in page["items"].as_array().unwrap() {
            got.push(m["text"].as_str().unwrap().to_owned());
            m["id"].as_str().unwrap().clone_into(&mut cursor);
        }
        assert!(
            started.elapsed() < std::time::Duration::from_mins(1),
            "caught up"
        );
    }
    sender.await.unwrap();
    let expected: Vec<String> = (1..=total).map(|n| format!("m{n}")).collect();
    assert_eq!(got, expected, "every message once, in order");
    let (_, rest) = as_(
        &app,
        &bob,
        Method::GET,
        &format!("/api/v1/chats/{id}/messages?after={cursor}"),
        None,
    )
    .await;
    assert_eq!(rest["items"].as_array().unwrap().len(), 0);
    assert!(rest["nextCursor"].is_null());

    // Backwards: newest first, and the cursor walks the whole history once.
    let mut seen = 0;
    let mut before: Option<String> = None;
    loop {
        let path = match &before {
            Some(b) => format!("/api/v1/chats/{id}/messages?before={b}&limit=50"),
            None => format!("/api/v1/chats/{id}/messages?limit=50"),
        };
        let (_, page) = as_(&app, &bob, Method::GET, &path, None).await;
        seen += page["items"].as_array().unwrap().len();
        match page["nextCursor"].as_str() {
            Some(next) => before = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen, total + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_chat_requests_get_clear_errors() {
    let app = auth_app(&Backend::EMBEDDED, |_| {}).await;
    let (ann, bob) = (person(&app, "ann").await, person(&app, "bob").await);
    let cases = [
        (json!({"memberIds": []}), "memberIds"),
        (json!({"memberIds": [ann.id]}), "memberIds"),
        (
            json!({"memberIds": [confab_core::domain::UserId::new()]}),
            "memberIds",
        ),
    ];
    for (body, field) in cases {
        let response = call(
            &app,
            Method::POST,
            "/api/v1/chats",
            Some(&ann.token),
            Some(body),
        )
        .await;
        let error = assert_error(response, 400, "VALIDATION_ERROR").await;
        assert_eq!(error["details"]["field"], field);
    }
    let id = direct(&app, &ann, &bob).await;
    let long = "x".repeat(10_001);
    for (body, field) in [
        (json!({"text": "   ", "clientId": "a"}), "text"),
        (json!({"text": long, "clientId": "b"}), "text"),
        (json!({"text": "ok", "clientId": "has space"}), "clientId"),
    ] {
        let response = call(
            &app,
            Method::POST,
            &format!("/api/v1/chats/{id}/messages"),
            Some(&ann.token),
            Some(body),
        )
        .await;
        let error = assert_error(response, 400, "VALIDATION_ERROR").await;
        assert_eq!(error["details"]["field"], field);
    }
    let both = format!("/api/v1/chats/{id}/messages?before={id}&after={id}");
    assert_error(
        call(&app, Method::GET, &both, Some(&ann.token), None).await,
        400,
        "VALIDATION_ERROR",
    )
    .await;
    let missing = format!("/api/v1/chats/{}", confab_core::domain::ChatId::new());
    assert_error(
        call(&app, Method::GET, &missing, Some(&ann.token), None).await,
        404,
        "NOT_FOUND",
    )
    .await;
    let (status, _) = as_(
        &app,
        &ann,
        Method::POST,
        &format!("/api/v1/chats/{id}/members"),
        Some(json!({"userId": ann.id})),
    )
    .await;
    assert_eq!(status, 400, "a direct chat keeps two members");
}

// `on_every_backend!` comes from auth.rs.
on_every_backend!(
    a_direct_chat_is_made_once_and_messages_flow_with_receipts,
    a_non_member_sees_nothing_and_can_do_nothing,
    groups_have_an_admin_members_join_and_leave,
    a_reconnecting_client_gets_exactly_what_it_missed,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_beyond_the_message_rate_is_refused_but_retries_are_answered() {
    let app = auth_app(&Backend::EMBEDDED, |c| c.chat.messages_per_second = 3).await;
    let (ann, bob) = (person(&app, "ann").await, person(&app, "bob").await);
    let id = direct(&app, &ann, &bob).await;
    for n in 0..3 {
        let (status, _) = send(&app, &ann, &id, "quick", &format!("q-{n}")).await;
        assert_eq!(status, 201);
    }
    let response = call(
        &app,
        Method::POST,
        &format!("/api/v1/chats/{id}/messages"),
        Some(&ann.token),
        Some(json!({"text": "one too many", "clientId": "q-3"})),
    )
    .await;
    assert!(response.headers().contains_key("retry-after"));
    assert_error(response, 429, "RATE_LIMITED").await;
    let (status, _) = send(&app, &ann, &id, "quick", "q-0").await;
    assert_eq!(status, 200, "a retry of a stored message is still answered");
    let (status, _) = send(&app, &bob, &id, "bob is not limited by ann", "b-0").await;
    assert_eq!(status, 201);
}
