//! Live delivery in bulk, driven by the Rust Socket.IO client (`bench/sio.rs`, the load
//! tool's client): many sockets, many concurrent senders, reconnects. The official JavaScript
//! client proves wire compatibility in `realtime.rs`; these prove the behaviour at volume, on
//! every backend.

use std::collections::HashSet;
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::auth::{Backend, Person, auth_app, call, mails_to, person, register, unique_email};
use crate::helpers::TestApp;
use crate::sio;

const WAIT: Duration = Duration::from_secs(20);

async fn connect(app: &TestApp, who: &Person) -> (sio::Client, UnboundedReceiver<sio::Event>) {
    sio::connect(&app.url(""), &json!({ "token": who.token }))
        .await
        .expect("the socket connects")
}

async fn join(client: &sio::Client, chat: &str) -> Value {
    client
        .call("chat:join", &json!({ "chatId": chat }), WAIT)
        .await
        .unwrap()
}

/// A group chat of `admin` and `others`; its id.
pub async fn group(app: &TestApp, admin: &Person, others: &[&Person]) -> String {
    let ids: Vec<&str> = others.iter().map(|p| p.id.as_str()).collect();
    let chat: Value = call(
        app,
        Method::POST,
        "/api/v1/chats",
        Some(&admin.token),
        Some(json!({ "memberIds": ids, "name": "bulk" })),
    )
    .await
    .json()
    .await
    .unwrap();
    chat["id"].as_str().unwrap().to_owned()
}

/// `GET path` with `token`, as JSON.
pub async fn get_json(app: &TestApp, path: &str, token: &str) -> Value {
    call(app, Method::GET, path, Some(token), None)
        .await
        .json()
        .await
        .unwrap()
}

/// The ids of the next `n` `message:new` events (others skipped).
async fn receive(events: &mut UnboundedReceiver<sio::Event>, n: usize) -> Vec<String> {
    let mut ids = Vec::with_capacity(n);
    while ids.len() < n {
        let Some(event) = sio::next_named(events, "message:new", WAIT).await else {
            panic!("only {} of {n} messages arrived", ids.len());
        };
        ids.push(event.data["id"].as_str().unwrap().to_owned());
    }
    ids
}

/// 12 members, 6 of them sending 25 messages each at once over their sockets (the writer
/// commits them in shared transactions): every ack is `ok` with an id, every member receives
/// every message exactly once, in one order all members agree on, and the history holds each
/// message once. A resent `clientId` gets the same id back and is not broadcast again.
async fn every_member_gets_every_message_once_while_many_send(backend: &Backend) {
    let app = auth_app(backend, |c| c.chat.messages_per_second = 10_000).await;
    let mut people = Vec::new();
    for i in 0..12 {
        people.push(person(&app, &format!("bulk{i}")).await);
    }
    let others: Vec<&Person> = people[1..].iter().collect();
    let chat = group(&app, &people[0], &others).await;
    let mut sockets = Vec::new();
    for p in &people {
        let (client, events) = connect(&app, p).await;
        assert_eq!(join(&client, &chat).await["ok"], true);
        sockets.push((client, events));
    }
    let per_sender = 25;
    let senders = 6;
    let mut acks = Vec::new();
    for round in 0..per_sender {
        for (s, (client, _)) in sockets.iter().take(senders).enumerate() {
            acks.push(client.call_later(
                "message:send",
                &json!({ "chatId": chat, "text": format!("{s}/{round}"), "clientId": format!("c-{s}-{round}") }),
            ));
        }
    }
    let mut acked = HashSet::new();
    for ack in acks {
        let ack = tokio::time::timeout(WAIT, ack).await.unwrap().unwrap();
        assert_eq!(ack["ok"], true, "{ack}");
        assert!(acked.insert(ack["id"].as_str().unwrap().to_owned()));
    }
    let total = per_sender * senders;
    let mut orders = Vec::new();
    for (_, events) in &mut sockets {
        let ids = receive(events, total).await;
        let unique: HashSet<_> = ids.iter().cloned().collect();
        assert_eq!(unique, acked, "each member gets each acked message once");
        orders.push(ids);
    }
    // One order per room: every member saw the messages in the same sequence.
    assert!(orders.windows(2).all(|w| w[0] == w[1]));

    // A retry is answered with the stored message and not broadcast again.
    let (client, _) = &sockets[0];
    let retry = client
        .call(
            "message:send",
            &json!({ "chatId": chat, "text": "0/0", "clientId": "c-0-0" }),
            WAIT,
        )
        .await
        .unwrap();
    assert_eq!(retry["ok"], true);
    assert!(acked.contains(retry["id"].as_str().unwrap()));
    let (_, listener) = &mut sockets[11];
    let extra = sio::next_named(listener, "message:new", Duration::from_millis(500)).await;
    assert!(extra.is_none(), "a retry is not delivered twice: {extra:?}");

    // The history: each message once.
    let mut stored = HashSet::new();
    let mut after: Option<String> = None;
    loop {
        let path = match &after {
            Some(id) => format!("/api/v1/chats/{chat}/messages?after={id}&limit=100"),
            None => format!(
                "/api/v1/chats/{chat}/messages?after=00000000-0000-0000-0000-000000000000&limit=100"
            ),
        };
        let page: Value = get_json(&app, &path, &people[3].token).await;
        let items = page["items"].as_array().unwrap();
        if items.is_empty() {
            break;
        }
        for item in items {
            assert!(stored.insert(item["id"].as_str().unwrap().to_owned()));
        }
        after = items.last().map(|m| m["id"].as_str().unwrap().to_owned());
    }
    assert_eq!(stored, acked);
}

/// A client that drops off while messages keep flowing reconnects, asks for everything after
/// the last message it saw, and ends up with exactly what was sent: no gap, no duplicate.
async fn a_reconnecting_client_catches_up_without_gaps(backend: &Backend) {
    let app = auth_app(backend, |c| c.chat.messages_per_second = 10_000).await;
    let (ann, bob) = (person(&app, "ann").await, person(&app, "bob").await);
    let chat = group(&app, &ann, &[&bob]).await;
    let (sender, _sender_events) = connect(&app, &ann).await;
    assert_eq!(join(&sender, &chat).await["ok"], true);

    // Ann keeps sending, one message every few milliseconds, in the background.
    let total = 120;
    let flow = {
        let chat = chat.clone();
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..total {
                let ack = sender
                    .call(
                        "message:send",
                        &json!({ "chatId": chat, "text": format!("m{i}") }),
                        WAIT,
                    )
                    .await
                    .unwrap();
                assert_eq!(ack["ok"], true, "{ack}");
                ids.push(ack["id"].as_str().unwrap().to_owned());
                tokio::time::sleep(Duration::from_millis(4)).await;
            }
            ids
        })
    };

    let mut seen: Vec<String> = Vec::new();
    for _ in 0..3 {
        // Connected for a while: take what arrives...
        let (bobs, mut events) = connect(&app, &bob).await;
        assert_eq!(join(&bobs, &chat).await["ok"], true);
        // ...after catching up on what was missed while away.
        catch_up(&app, &bob, &chat, &mut seen).await;
        let until = tokio::time::Instant::now() + Duration::from_millis(120);
        while let Ok(Some(event)) = tokio::time::timeout_at(until, events.recv()).await {
            if event.name == "message:new" {
                let id = event.data["id"].as_str().unwrap().to_owned();
                // Live events that the catch-up page already returned are not new.
                if !seen.contains(&id) {
                    seen.push(id);
                }
            }
        }
        bobs.close();
        // Away while messages keep coming.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let sent = flow.await.unwrap();
    // Back for good: one last catch-up.
    catch_up(&app, &bob, &chat, &mut seen).await;
    assert_eq!(seen.len(), sent.len(), "as many as were sent");
    assert!(seen == sent, "exactly what was sent, in order");
}

/// Appends what came after the last id in `seen` (everything when it is empty).
async fn catch_up(app: &TestApp, who: &Person, chat: &str, seen: &mut Vec<String>) {
    let after = seen
        .last()
        .cloned()
        .unwrap_or_else(|| "00000000-0000-0000-0000-000000000000".into());
    let page: Value = get_json(
        app,
        &format!("/api/v1/chats/{chat}/messages?after={after}&limit=200"),
        &who.token,
    )
    .await;
    for item in page["items"].as_array().unwrap() {
        seen.push(item["id"].as_str().unwrap().to_owned());
    }
}

/// Someone outside the chat: the socket cannot join it, cannot send into it, receives none
/// of its messages, and the REST history is 404 too.
async fn a_non_member_can_neither_join_read_nor_send(backend: &Backend) {
    let app = auth_app(backend, |c| c.chat.messages_per_second = 10_000).await;
    let (ann, bob, eve) = (
        person(&app, "ann").await,
        person(&app, "bob").await,
        person(&app, "eve").await,
    );
    let chat = group(&app, &ann, &[&bob]).await;
    let (eves, mut eve_events) = connect(&app, &eve).await;
    assert_eq!(
        join(&eves, &chat).await,
        json!({ "ok": false, "code": "NOT_FOUND" })
    );
    let sent = eves
        .call(
            "message:send",
            &json!({ "chatId": chat, "text": "let me in" }),
            WAIT,
        )
        .await
        .unwrap();
    assert_eq!(sent, json!({ "ok": false, "code": "NOT_FOUND" }));
    let (anns, _) = connect(&app, &ann).await;
    assert_eq!(join(&anns, &chat).await["ok"], true);
    let ok = anns
        .call(
            "message:send",
            &json!({ "chatId": chat, "text": "members only" }),
            WAIT,
        )
        .await
        .unwrap();
    assert_eq!(ok["ok"], true);
    let leaked = sio::next_named(&mut eve_events, "message:new", Duration::from_millis(500)).await;
    assert!(leaked.is_none(), "{leaked:?}");
    let history = call(
        &app,
        Method::GET,
        &format!("/api/v1/chats/{chat}/messages"),
        Some(&eve.token),
        None,
    )
    .await;
    assert_eq!(history.status(), 404);
    // Nothing of Eve's got in.
    let page = get_json(&app, &format!("/api/v1/chats/{chat}/messages"), &ann.token).await;
    let texts: Vec<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, vec!["members only"]);
}

/// A member removed from a group stops receiving its messages at once, on the socket that
/// had joined the room (not only after reconnecting), hears `chat:updated`, and can no
/// longer send into it; the others carry on.
async fn a_removed_member_stops_receiving_at_once(backend: &Backend) {
    let app = auth_app(backend, |_| {}).await;
    let (ann, bob, carol, dave) = (
        person(&app, "ann").await,
        person(&app, "bob").await,
        person(&app, "carol").await,
        person(&app, "dave").await,
    );
    let chat = group(&app, &ann, &[&bob, &carol, &dave]).await;
    let (anns, _) = connect(&app, &ann).await;
    let (bobs, mut bob_events) = connect(&app, &bob).await;
    let (carols, mut carol_events) = connect(&app, &carol).await;
    let (_daves, mut dave_events) = connect(&app, &dave).await;
    for client in [&anns, &bobs, &carols] {
        assert_eq!(join(client, &chat).await["ok"], true);
    }
    // Two messages; carol reads them, dave does not.
    let mut last = Value::Null;
    for text in ["one", "two"] {
        let path = format!("/api/v1/chats/{chat}/messages");
        let body = json!({ "text": text });
        last = call(&app, Method::POST, &path, Some(&ann.token), Some(body))
            .await
            .json()
            .await
            .unwrap();
    }
    let read = call(
        &app,
        Method::POST,
        &format!("/api/v1/chats/{chat}/read"),
        Some(&carol.token),
        Some(json!({ "messageId": last["id"] })),
    )
    .await;
    assert_eq!(read.status(), 204);
    let removed = call(
        &app,
        Method::DELETE,
        &format!("/api/v1/chats/{chat}/members/{}", bob.id),
        Some(&ann.token),
        None,
    )
    .await;
    assert_eq!(removed.status(), 204);
    let updated = sio::next_named(&mut bob_events, "chat:updated", WAIT)
        .await
        .expect("the removed member hears of it");
    let members: Vec<&str> = updated.data["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["userId"].as_str().unwrap())
        .collect();
    assert!(!members.contains(&bob.id.as_str()), "{members:?}");
    assert!(updated.data["latestMessage"].is_null(), "{}", updated.data);
    // Each remaining member sees the change with their own unread count.
    for (events, unread) in [(&mut carol_events, 0), (&mut dave_events, 2)] {
        let seen = sio::next_named(events, "chat:updated", WAIT)
            .await
            .expect("members hear of it");
        assert_eq!(seen.data["unreadCount"], unread, "{}", seen.data);
    }
    let sent = anns
        .call(
            "message:send",
            &json!({ "chatId": chat, "text": "without bob" }),
            WAIT,
        )
        .await
        .unwrap();
    assert_eq!(sent["ok"], true);
    let got = sio::next_named(&mut carol_events, "message:new", WAIT)
        .await
        .unwrap();
    assert_eq!(got.data["text"], "without bob");
    let leaked = sio::next_named(&mut bob_events, "message:new", Duration::from_millis(500)).await;
    assert!(leaked.is_none(), "{leaked:?}");
    let refused = bobs
        .call(
            "message:send",
            &json!({ "chatId": chat, "text": "still here?" }),
            WAIT,
        )
        .await
        .unwrap();
    assert_eq!(refused, json!({ "ok": false, "code": "NOT_FOUND" }));
}

/// Signing out everywhere closes the user's open sockets (both tabs), and the old token no
/// longer opens one; another user's socket stays.
async fn signing_out_everywhere_closes_the_users_sockets(backend: &Backend) {
    let app = auth_app(backend, |_| {}).await;
    let (ann, bob) = (person(&app, "ann").await, person(&app, "bob").await);
    let (_tab1, mut first) = connect(&app, &ann).await;
    let (_tab2, mut second) = connect(&app, &ann).await;
    let (bobs, _bob_events) = connect(&app, &bob).await;
    let out = call(
        &app,
        Method::POST,
        "/api/v1/auth/logout-all",
        Some(&ann.token),
        None,
    )
    .await;
    assert_eq!(out.status(), 204);
    for events in [&mut first, &mut second] {
        // Drained to the end: the server closed the socket.
        let closed =
            tokio::time::timeout(WAIT, async { while events.recv().await.is_some() {} }).await;
        assert!(closed.is_ok(), "the socket was not closed");
    }
    let again = sio::connect(&app.url(""), &json!({ "token": ann.token })).await;
    assert_eq!(again.err().as_deref(), Some("UNAUTHENTICATED"));
    let still = bobs
        .call(
            "chat:leave",
            &json!({ "chatId": "00000000-0000-0000-0000-000000000000" }),
            WAIT,
        )
        .await;
    assert!(still.is_ok(), "Bob's socket is untouched");
}

/// Presence (SPEC §4) goes to the user's chat partners: online with the first socket, not
/// again for a second tab, offline (with when last seen) only when the last socket closes;
/// someone who shares no chat hears nothing.
/// SPEC §4: online while a socket is open, or active within the window (5 minutes; 2 s
/// here): partners hear a user go only once the window has passed with no socket open.
async fn partners_see_presence_come_and_go(backend: &Backend) {
    let app = auth_app(backend, |c| c.chat.presence_window_secs = 2).await;
    let (ann, bob, eve) = (
        person(&app, "ann").await,
        person(&app, "bob").await,
        person(&app, "eve").await,
    );
    group(&app, &bob, &[&ann]).await;
    let (_bobs, mut bob_events) = connect(&app, &bob).await;
    let (_eves, mut eve_events) = connect(&app, &eve).await;

    let (first, _) = connect(&app, &ann).await;
    let online = sio::next_named(&mut bob_events, "presence", WAIT)
        .await
        .unwrap();
    assert_eq!(online.data["userId"], ann.id.as_str());
    assert_eq!(online.data["online"], true);
    let (second, _) = connect(&app, &ann).await;
    first.close();
    let quiet = sio::next_named(&mut bob_events, "presence", Duration::from_millis(400)).await;
    assert!(quiet.is_none(), "a second tab changes nothing: {quiet:?}");
    second.close();
    let early = sio::next_named(&mut bob_events, "presence", Duration::from_millis(1200)).await;
    assert!(early.is_none(), "still online within the window: {early:?}");
    let offline = sio::next_named(&mut bob_events, "presence", WAIT)
        .await
        .unwrap();
    assert_eq!(offline.data["userId"], ann.id.as_str());
    assert_eq!(offline.data["online"], false);
    assert!(offline.data["lastSeenAt"].is_string());
    let profile = get_json(&app, &format!("/api/v1/users/{}", ann.id), &bob.token).await;
    assert_eq!(profile["online"], false, "{profile}");

    // Back, and away for less than the window: partners see her come, but not go.
    let (third, _) = connect(&app, &ann).await;
    let back = sio::next_named(&mut bob_events, "presence", WAIT)
        .await
        .unwrap();
    assert_eq!(back.data["online"], true);
    third.close();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (fourth, _) = connect(&app, &ann).await;
    // Longer than the window after the gap: no offline (a repeated online is harmless).
    let until = tokio::time::Instant::now() + Duration::from_secs(3);
    while let Some(event) = sio::next_named(
        &mut bob_events,
        "presence",
        until - tokio::time::Instant::now(),
    )
    .await
    {
        assert_eq!(event.data["online"], true, "no offline for a short gap");
    }
    fourth.close();
    let gone = sio::next_named(&mut bob_events, "presence", WAIT)
        .await
        .unwrap();
    assert_eq!(gone.data["online"], false);
    let leaked = sio::next_named(&mut eve_events, "presence", Duration::from_millis(200)).await;
    assert!(leaked.is_none(), "{leaked:?}");
}

/// New messages for a member who is offline (no socket, not active for 5 minutes) bring
/// one digest mail per chat per 15 minutes through the `events` and `mail` queues; a member
/// connected over Socket.IO gets none, nor does the sender. The mail names the chat and
/// links to it, and never carries the message text.
async fn offline_members_get_one_digest_mail_per_chat(backend: &Backend) {
    let app = auth_app(backend, |_| {}).await;
    let ann = person(&app, "ann").await;
    let bob_email = unique_email("bob");
    let bob_id = register(&app, &bob_email).await["user"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let carol_email = unique_email("carol");
    let session = register(&app, &carol_email).await;
    let carol = Person {
        id: session["user"]["id"].as_str().unwrap().to_owned(),
        token: session["accessToken"].as_str().unwrap().to_owned(),
    };
    let bob = Person {
        id: bob_id,
        token: String::new(),
    };
    let chat = group(&app, &ann, &[&bob, &carol]).await;
    let (carols, _carol_events) = connect(&app, &carol).await;
    // Carol is online once her socket is in (presence is recorded on connect).
    assert_eq!(join(&carols, &chat).await["ok"], true);
    confab_core::testing::eventually("carol shows as online", WAIT, || async {
        let profile: Value =
            get_json(&app, &format!("/api/v1/users/{}", carol.id), &ann.token).await;
        profile["online"] == true
    })
    .await;
    for i in 0..3 {
        let sent = call(
            &app,
            Method::POST,
            &format!("/api/v1/chats/{chat}/messages"),
            Some(&ann.token),
            Some(json!({ "text": format!("secret plans {i}") })),
        )
        .await;
        assert_eq!(sent.status(), 201);
    }
    // The subject counts what was unread when the first event was handled (1 to 3).
    let digests = |to: &str| -> Vec<String> {
        mails_to(&app, to)
            .into_iter()
            .filter(|m| m.contains(" in bulk\r\n"))
            .collect()
    };
    confab_core::testing::eventually("bob's digest mail", WAIT, || async {
        !digests(&bob_email).is_empty()
    })
    .await;
    let mail = digests(&bob_email).remove(0);
    assert!(mail.contains(&format!("/chats/{chat}")), "{mail}");
    assert!(!mail.contains("secret plans"), "no message text in mail");
    // The other two events are handled well within this; still one mail.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(digests(&bob_email).len(), 1);
    assert!(digests(&carol_email).is_empty(), "Carol is online");
}

on_every_backend!(
    every_member_gets_every_message_once_while_many_send,
    a_reconnecting_client_catches_up_without_gaps,
    a_non_member_can_neither_join_read_nor_send,
    partners_see_presence_come_and_go,
    a_removed_member_stops_receiving_at_once,
    signing_out_everywhere_closes_the_users_sockets,
    offline_members_get_one_digest_mail_per_chat,
);
