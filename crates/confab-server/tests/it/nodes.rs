//! Many nodes (SPEC §4): two `confab serve` processes sharing one PostgreSQL database and a
//! Redis of the test's own (to kill and restart), with clients on each over the Rust
//! Socket.IO client. A message sent on one node reaches a member connected to the other,
//! presence agrees on both, and a Redis restart does not silently end cross-node delivery.

use std::time::Duration;

use confab_adapters::testing::TempDatabase;
use serde_json::{Value, json};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::cli::spawn_serve;
use crate::helpers::TempRedis;
use crate::sio;

const WAIT: Duration = Duration::from_secs(20);

struct Node {
    _child: tokio::process::Child,
    base: String,
}

/// `confab serve` on the shared database and Redis; its log lines are drained (a full pipe
/// would stall it).
async fn node(dir: &std::path::Path, database: &str, redis: &str) -> Node {
    let (child, mut lines, _, address) =
        spawn_serve(dir, &[("DATABASE_URL", database), ("REDIS_URL", redis)]).await;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Node {
        _child: child,
        base: format!("http://{address}"),
    }
}

/// A request's JSON answer.
async fn json_of(request: reqwest::RequestBuilder) -> Value {
    request.send().await.unwrap().json().await.unwrap()
}

struct User {
    id: String,
    token: String,
}

async fn register(http: &reqwest::Client, node: &Node, tag: &str) -> User {
    let body: Value = json_of(
        http.post(format!("{}/api/v1/auth/register", node.base))
            .json(&json!({
                "email": format!("{}@example.com", confab_core::testing::unique(tag)),
                "password": "correct horse battery staple",
                "name": tag,
            })),
    )
    .await;
    User {
        id: body["user"]["id"].as_str().unwrap().to_owned(),
        token: body["accessToken"].as_str().unwrap().to_owned(),
    }
}

async fn connect(node: &Node, who: &User) -> (sio::Client, UnboundedReceiver<sio::Event>) {
    sio::connect(&node.base, &json!({ "token": who.token }))
        .await
        .expect("the socket connects")
}

async fn send(client: &sio::Client, chat: &str, text: &str) -> Value {
    client
        .call(
            "message:send",
            &json!({ "chatId": chat, "text": text }),
            WAIT,
        )
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_rooms_and_presence_and_survive_a_redis_restart() {
    let Some(admin) =
        confab_core::testing::service_url("TEST_DATABASE_URL", "two nodes on PostgreSQL")
    else {
        return;
    };
    let Some(mut redis) = TempRedis::start(None) else {
        return;
    };
    let db = TempDatabase::create(&admin).await;
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = node(dirs.0.path(), &db.url, &redis.url()).await;
    let b = node(dirs.1.path(), &db.url, &redis.url()).await;
    let http = reqwest::Client::new();
    let ann = register(&http, &a, "ann").await;
    let bob = register(&http, &b, "bob").await;
    let chat: Value = json_of(
        http.post(format!("{}/api/v1/chats", a.base))
            .bearer_auth(&ann.token)
            .json(&json!({ "memberIds": [bob.id] })),
    )
    .await;
    let chat = chat["id"].as_str().unwrap().to_owned();

    // Bob on node B; Ann comes online on node A: Bob hears it there.
    let (bobs, mut bob_events) = connect(&b, &bob).await;
    let joined = bobs
        .call("chat:join", &json!({ "chatId": chat }), WAIT)
        .await
        .unwrap();
    assert_eq!(joined["ok"], true);
    let (anns, mut ann_events) = connect(&a, &ann).await;
    let joined = anns
        .call("chat:join", &json!({ "chatId": chat }), WAIT)
        .await
        .unwrap();
    assert_eq!(joined["ok"], true);
    let presence = sio::next_named(&mut bob_events, "presence", WAIT)
        .await
        .expect("presence crosses nodes");
    assert_eq!(presence.data["userId"], ann.id.as_str());
    assert_eq!(presence.data["online"], true);
    // Both nodes agree that Ann is online.
    for node in [&a, &b] {
        let profile: Value = json_of(
            http.get(format!("{}/api/v1/users/{}", node.base, ann.id))
                .bearer_auth(&bob.token),
        )
        .await;
        assert_eq!(profile["online"], true, "{}: {profile}", node.base);
    }

    // Sent on A, delivered on B.
    let ack = send(&anns, &chat, "across nodes").await;
    assert_eq!(ack["ok"], true, "{ack}");
    let got = sio::next_named(&mut bob_events, "message:new", WAIT)
        .await
        .expect("the message crosses nodes");
    assert_eq!(got.data["id"], ack["id"]);
    assert_eq!(got.data["text"], "across nodes");

    // Redis goes away and comes back: cross-node delivery resumes by itself.
    redis.kill();
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Meanwhile a send still stores (and acks): the message is not lost, only its live
    // delivery to the other node (Bob catches up with `after`).
    let sent_at = std::time::Instant::now();
    let during = send(&anns, &chat, "while redis is down").await;
    assert_eq!(during["ok"], true, "{during}");
    // On its own node a message is still delivered live, and promptly.
    loop {
        let own = sio::next_named(&mut ann_events, "message:new", WAIT)
            .await
            .expect("delivered on its own node while Redis is down");
        if own.data["id"] == during["id"] {
            break;
        }
    }
    assert!(
        sent_at.elapsed() < Duration::from_secs(2),
        "local delivery took {:?} while Redis was down",
        sent_at.elapsed()
    );
    redis.restart();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut n = 0;
    let restored = loop {
        n += 1;
        let ack = send(&anns, &chat, &format!("after the restart {n}")).await;
        assert_eq!(ack["ok"], true, "{ack}");
        let arrived = loop {
            match sio::next_named(&mut bob_events, "message:new", Duration::from_millis(500)).await
            {
                Some(event) if event.data["id"] == ack["id"] => break true,
                Some(_) => {}
                None => break false,
            }
        };
        if arrived {
            break true;
        }
        if tokio::time::Instant::now() > deadline {
            break false;
        }
    };
    assert!(
        restored,
        "cross-node delivery did not resume within 30 s of Redis returning"
    );
    // What Bob missed while Redis was down is in the history.
    let page: Value = json_of(
        http.get(format!(
            "{}/api/v1/chats/{chat}/messages?after={}",
            b.base,
            got.data["id"].as_str().unwrap()
        ))
        .bearer_auth(&bob.token),
    )
    .await;
    assert_eq!(page["items"][0]["id"], during["id"]);
    drop((anns, bobs));
    db.drop().await;
}
