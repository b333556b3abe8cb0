//! The AI assistant over HTTP and Socket.IO (SPEC §3 "AI assistant", §8), against fake
//! provider servers that speak OpenAI's and Ollama's wire formats (the chain: OpenAI-compatible
//! first, Ollama second), and once against a real small model.

use std::time::Duration;

use confab_adapters::testing::fake_llm::{FakeLlm, Scripted, Step, Wire};
use confab_server::config::{Config, OllamaConfig, OpenAiConfig};
use reqwest::Method;
use serde_json::{Value, json};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::auth::{Backend, Person, auth_app, call, person};
use crate::helpers::{TestApp, assert_error};
use crate::live::get_json;
use crate::sio;

const WAIT: Duration = Duration::from_secs(20);

struct Ai {
    app: TestApp,
    openai: FakeLlm,
    ollama: FakeLlm,
}

async fn ai_app(backend: &Backend, configure: impl FnOnce(&mut Config)) -> Ai {
    let openai = FakeLlm::start(Wire::OpenAi).await;
    let ollama = FakeLlm::start(Wire::Ollama).await;
    let app = auth_app(backend, |c| {
        c.ai.openai = Some(OpenAiConfig {
            base_url: Some(openai.url.clone()),
            model: Some("gpt-fake".into()),
            ..OpenAiConfig::default()
        });
        c.ai.ollama = Some(OllamaConfig {
            base_url: Some(ollama.url.clone()),
            model: Some("llama-fake".into()),
            embedding_model: None,
        });
        c.ai.backoff_ms = 10;
        c.ai.requests_per_minute = 1000;
        configure(c);
    })
    .await;
    Ai {
        app,
        openai,
        ollama,
    }
}

async fn connect(app: &TestApp, who: &Person) -> (sio::Client, UnboundedReceiver<sio::Event>) {
    sio::connect(&app.url(""), &json!({ "token": who.token }))
        .await
        .expect("the socket connects")
}

async fn ask(app: &TestApp, who: &Person, body: Value) -> Value {
    let response = call(
        app,
        Method::POST,
        "/api/v1/ai/messages",
        Some(&who.token),
        Some(body),
    )
    .await;
    assert_eq!(response.status().as_u16(), 202);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "queued");
    body
}

/// `GET /ai/sessions/{id}` for the session a request or answer names (`sessionId`).
async fn session_of(app: &TestApp, who: &Person, named: &Value) -> Value {
    let id = named["sessionId"].as_str().expect("a sessionId");
    get_json(app, &format!("/api/v1/ai/sessions/{id}"), &who.token).await
}

/// What a socket heard of one request: its tokens in arrival order, and how it ended
/// (`ai:response`, plus `ai:error` when it failed).
struct Heard {
    tokens: Vec<Value>,
    response: Value,
    error: Option<Value>,
}

impl Heard {
    fn text(&self) -> String {
        self.tokens
            .iter()
            .map(|t| t["delta"].as_str().unwrap())
            .collect()
    }
}

async fn hear(events: &mut UnboundedReceiver<sio::Event>, request: &str) -> Heard {
    let mut heard = Heard {
        tokens: Vec::new(),
        response: Value::Null,
        error: None,
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let event = tokio::time::timeout_at(deadline, events.recv())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "no ai:response for {request}; heard {} tokens",
                    heard.tokens.len()
                )
            })
            .expect("the socket stays open");
        if event.data["requestId"] != request {
            continue;
        }
        match event.name.as_str() {
            "ai:token" => heard.tokens.push(event.data),
            "ai:error" => heard.error = Some(event.data),
            "ai:response" => {
                heard.response = event.data;
                return heard;
            }
            _ => {}
        }
    }
}

fn indexes(tokens: &[Value]) -> Vec<u64> {
    tokens
        .iter()
        .map(|t| t["index"].as_u64().unwrap())
        .collect()
}

/// `POST /ai/messages` → tokens over Socket.IO in order → `ai:response` → stored; a second
/// turn carries the first as context (and arrives through `ai:send`); the same question in
/// a new session is a cache hit without a provider call; sessions list, read, rate, delete;
/// another user sees none of it.
async fn a_queued_request_streams_in_order_is_stored_and_cached(backend: &Backend) {
    let ai = ai_app(backend, |_| {}).await;
    let app = &ai.app;
    let ann = person(app, "ann").await;
    let (socket, mut events) = connect(app, &ann).await;
    let pieces = ["The ", "capital ", "of France ", "is ", "Paris."];
    ai.openai.push(Step::Stream {
        pieces: pieces.iter().map(|p| (*p).to_owned()).collect(),
        gap: Duration::from_millis(15),
        cut: 5,
        usage: (21, 5),
    });
    let queued = ask(
        app,
        &ann,
        json!({ "message": "What is the capital of France?" }),
    )
    .await;
    let (session, request) = (
        queued["sessionId"].as_str().unwrap(),
        queued["requestId"].as_str().unwrap(),
    );
    let heard = hear(&mut events, request).await;
    assert_eq!(indexes(&heard.tokens), [0, 1, 2, 3, 4]);
    assert_eq!(heard.text(), pieces.concat());
    assert!(heard.error.is_none());
    let answer = &heard.response["message"];
    assert_eq!(heard.response["sessionId"], session);
    assert_eq!(answer["role"], "assistant");
    assert_eq!(answer["content"], pieces.concat());
    assert_eq!(answer["status"], "complete");
    assert_eq!(
        (answer["provider"].as_str(), answer["model"].as_str()),
        (Some("openai"), Some("gpt-fake"))
    );
    assert_eq!(answer["cached"], false);
    assert_eq!(
        answer["usage"],
        json!({ "promptTokens": 21, "completionTokens": 5 })
    );
    assert!(answer["latencyMs"].as_i64().is_some());

    // Stored, with the session idle again.
    let got = get_json(app, &format!("/api/v1/ai/sessions/{session}"), &ann.token).await;
    assert_eq!(got["status"], "idle");
    assert_eq!(got["title"], "What is the capital of France?");
    let roles: Vec<&str> = got["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["user", "assistant"]);
    let sent = ai.openai.requests().pop().unwrap();
    assert_eq!(
        sent["messages"][0],
        json!({ "role": "system", "content": "You are a helpful assistant." })
    );
    assert_eq!(sent["stream"], true);

    // The second turn, over Socket.IO: the first turn goes along as context.
    let ack = socket
        .call(
            "ai:send",
            &json!({ "message": "And of Italy?", "sessionId": session }),
            WAIT,
        )
        .await
        .unwrap();
    assert_eq!(ack["ok"], true, "{ack}");
    assert_eq!(ack["sessionId"], session);
    let heard = hear(&mut events, ack["requestId"].as_str().unwrap()).await;
    assert_eq!(heard.response["message"]["status"], "complete");
    let sent = ai.openai.requests().pop().unwrap();
    let turns: Vec<(&str, &str)> = sent["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
        .collect();
    assert_eq!(
        turns[1..],
        [
            ("user", "What is the capital of France?"),
            ("assistant", pieces.concat().as_str()),
            ("user", "And of Italy?"),
        ]
    );

    // The same question in a new session: answered from the cache, no provider call.
    let calls = ai.openai.calls();
    let again = ask(
        app,
        &ann,
        json!({ "message": "What is the capital of France?" }),
    )
    .await;
    let heard = hear(&mut events, again["requestId"].as_str().unwrap()).await;
    assert_eq!(heard.response["message"]["cached"], true);
    assert_eq!(heard.response["message"]["content"], pieces.concat());
    assert_eq!(
        heard.text(),
        pieces.concat(),
        "a cached answer still arrives as a token"
    );
    assert_eq!(ai.openai.calls(), calls);
    let health: Value = app.get("/health").await.json().await.unwrap();
    assert_eq!(health["components"]["ai"]["status"], "ok", "{health}");
    assert_eq!(
        health["components"]["ai"]["kind"],
        "openai/gpt-fake,ollama/llama-fake"
    );
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(metrics.contains("ai_cache_hits_total"), "{metrics}");

    // Sessions: listed (newest first), rated, not visible to someone else, deleted.
    let list = get_json(app, "/api/v1/ai/sessions", &ann.token).await;
    let ids: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 2);
    assert_eq!(ids[1], session);
    let answer_id = answer["id"].as_str().unwrap();
    let rated = call(
        app,
        Method::POST,
        &format!("/api/v1/ai/messages/{answer_id}/feedback"),
        Some(&ann.token),
        Some(json!({ "rating": "up", "comment": "right" })),
    )
    .await;
    assert_eq!(rated.status().as_u16(), 204);
    let bad = call(
        app,
        Method::POST,
        &format!("/api/v1/ai/messages/{answer_id}/feedback"),
        Some(&ann.token),
        Some(json!({ "rating": "meh" })),
    )
    .await;
    assert_error(bad, 400, "VALIDATION_ERROR").await;
    let bob = person(app, "bob").await;
    for (method, path, body) in [
        (Method::GET, format!("/api/v1/ai/sessions/{session}"), None),
        (
            Method::DELETE,
            format!("/api/v1/ai/sessions/{session}"),
            None,
        ),
        (Method::GET, format!("/api/v1/ai/requests/{request}"), None),
        (
            Method::POST,
            format!("/api/v1/ai/requests/{request}/cancel"),
            None,
        ),
        (
            Method::POST,
            format!("/api/v1/ai/messages/{answer_id}/feedback"),
            Some(json!({ "rating": "down" })),
        ),
        (
            Method::POST,
            "/api/v1/ai/messages".to_owned(),
            Some(json!({ "message": "hi", "sessionId": session })),
        ),
    ] {
        let response = call(app, method.clone(), &path, Some(&bob.token), body).await;
        assert_error(response, 404, "NOT_FOUND").await;
    }
    assert_eq!(
        get_json(app, "/api/v1/ai/sessions", &bob.token).await["items"],
        json!([])
    );
    let deleted = call(
        app,
        Method::DELETE,
        &format!("/api/v1/ai/sessions/{session}"),
        Some(&ann.token),
        None,
    )
    .await;
    assert_eq!(deleted.status().as_u16(), 204);
    let gone = call(
        app,
        Method::GET,
        &format!("/api/v1/ai/sessions/{session}"),
        Some(&ann.token),
        None,
    )
    .await;
    assert_error(gone, 404, "NOT_FOUND").await;
}

/// Retries (a 429 honouring Retry-After), fallback to the next link (a 500, a hang past the
/// timeout), the breaker opening, half-opening and closing, and when every link fails: the
/// friendly failure, `ai:error`, a failed answer and session.
async fn retries_fallback_breaker_and_the_friendly_failure(backend: &Backend) {
    let ai = ai_app(backend, |c| {
        c.ai.timeout_secs = 1;
        c.ai.attempts = 2;
        c.ai.breaker_failures = 3;
        c.ai.breaker_open_secs = 2;
    })
    .await;
    let app = &ai.app;
    let ann = person(app, "ann").await;
    let (_socket, mut events) = connect(app, &ann).await;
    let mut turn = 0;
    let mut ask_and_hear = async |events: &mut UnboundedReceiver<sio::Event>| {
        turn += 1;
        let queued = ask(app, &ann, json!({ "message": format!("question {turn}") })).await;
        hear(events, queued["requestId"].as_str().unwrap()).await
    };

    // A 429 with Retry-After: 1 is waited out, then the same link answers.
    ai.openai.push(Step::Status {
        status: 429,
        retry_after: Some("1".into()),
        body: r#"{"error":{"message":"rate limited"}}"#.into(),
    });
    let started = std::time::Instant::now();
    let heard = ask_and_hear(&mut events).await;
    assert_eq!(heard.response["message"]["provider"], "openai");
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert_eq!(ai.openai.calls(), 2);

    // A hang, twice (both attempts): past the 1 s timeout the next link (Ollama) answers.
    // Two failures in a row; the circuit opens at three.
    ai.openai.push(Step::Hang);
    ai.openai.push(Step::Hang);
    let heard = ask_and_hear(&mut events).await;
    assert_eq!(heard.response["message"]["provider"], "ollama");
    assert_eq!(heard.response["message"]["model"], "llama-fake");
    assert_eq!(heard.text(), "Hello!");

    // A 500: not retried, straight to Ollama; the third failure in a row opens the circuit.
    ai.openai.set_fallback(Step::status(500));
    let calls = ai.openai.calls();
    let heard = ask_and_hear(&mut events).await;
    assert_eq!(heard.response["message"]["provider"], "ollama");
    assert_eq!(ai.openai.calls(), calls + 1);
    let models = get_json(app, "/api/v1/ai/models", &ann.token).await;
    assert_eq!(
        models["items"][0],
        json!({ "provider": "openai", "model": "gpt-fake", "circuit": "open" }),
        "{models}"
    );
    assert_eq!(models["items"][1]["circuit"], "closed");
    // /health: one link down (its circuit open), the chain still answers.
    let health: Value = app.get("/health").await.json().await.unwrap();
    assert_eq!(health["components"]["ai"]["status"], "degraded", "{health}");
    // Open: OpenAI is not called at all.
    let heard = ask_and_hear(&mut events).await;
    assert_eq!(heard.response["message"]["provider"], "ollama");
    assert_eq!(ai.openai.calls(), calls + 1);

    // After breaker_open_secs one probe goes through; it succeeds and the circuit closes.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    ai.openai.set_fallback(Step::pieces(&["back ", "again"]));
    let heard = ask_and_hear(&mut events).await;
    assert_eq!(heard.response["message"]["provider"], "openai");
    let models = get_json(app, "/api/v1/ai/models", &ann.token).await;
    assert_eq!(models["items"][0]["circuit"], "closed");

    // Every link fails: the user gets the friendly failure and ai:error; it is stored.
    ai.openai.set_fallback(Step::status(500));
    ai.ollama.set_fallback(Step::status(503));
    let queued = ask(app, &ann, json!({ "message": "doomed" })).await;
    let heard = hear(&mut events, queued["requestId"].as_str().unwrap()).await;
    let error = heard.error.expect("an ai:error");
    assert_eq!(error["code"], "API_ERROR");
    assert!(
        error["message"].as_str().unwrap().contains("try again"),
        "{error}"
    );
    assert_eq!(error["sessionId"], queued["sessionId"]);
    let failed = &heard.response["message"];
    assert_eq!(failed["status"], "failed");
    assert_eq!(failed["errorCode"], "API_ERROR");
    assert_eq!(failed["content"], error["message"]);
    let session = session_of(app, &ann, &queued).await;
    assert_eq!(session["status"], "failed");
    assert_eq!(session["messages"][1]["errorCode"], "API_ERROR");
}

/// A slow answer: a second socket opened mid-stream fetches what was produced so far and
/// follows the rest, ending with exactly the whole answer; then a cancelled generation stops,
/// keeping what it had.
async fn resume_mid_stream_and_cancel(backend: &Backend) {
    let ai = ai_app(backend, |_| {}).await;
    let app = &ai.app;
    let ann = person(app, "ann").await;
    let (_first, mut first_events) = connect(app, &ann).await;
    let pieces: Vec<String> = (0..24).map(|i| format!("w{i} ")).collect();
    ai.openai.push(Step::Stream {
        pieces: pieces.clone(),
        gap: Duration::from_millis(60),
        cut: 7,
        usage: (5, 24),
    });
    let queued = ask(app, &ann, json!({ "message": "Tell me a long story" })).await;
    let request = queued["requestId"].as_str().unwrap();
    // Wait for a few pieces, then "reload": the answer so far, then a new socket.
    let mut early = 0;
    while early < 6 {
        let event = sio::next_named(&mut first_events, "ai:token", WAIT)
            .await
            .expect("tokens flow");
        assert_eq!(event.data["index"], early);
        early += 1;
    }
    tokio::time::sleep(Duration::from_millis(250)).await;
    // The reload: connect first, then fetch at once. The answer so far is saved every
    // 200 ms; the fetch waits for a save made after it began, so it holds every piece sent
    // before the socket was there (a fetch of the last save would miss those).
    let (_second, mut second_events) = connect(app, &ann).await;
    let so_far = get_json(app, &format!("/api/v1/ai/requests/{request}"), &ann.token).await;
    assert_eq!(so_far["status"], "streaming", "{so_far}");
    // The session says so too while the answer streams (its status is written beside the
    // provider call, not before it).
    let session = session_of(app, &ann, &queued).await;
    assert_eq!(session["status"], "processing", "{session}");
    let held = usize::try_from(so_far["tokens"].as_u64().unwrap()).unwrap();
    assert!(held >= 6 && held < pieces.len(), "{so_far}");
    assert_eq!(so_far["content"], pieces[..held].concat());
    let heard = hear(&mut second_events, request).await;
    let rest: String = heard
        .tokens
        .iter()
        .filter(|t| usize::try_from(t["index"].as_u64().unwrap()).unwrap() >= held)
        .map(|t| t["delta"].as_str().unwrap())
        .collect();
    assert_eq!(
        format!("{}{rest}", so_far["content"].as_str().unwrap()),
        pieces.concat()
    );
    assert_eq!(heard.response["message"]["content"], pieces.concat());
    let done = get_json(app, &format!("/api/v1/ai/requests/{request}"), &ann.token).await;
    assert_eq!(
        (done["status"].as_str(), done["tokens"].is_null()),
        (Some("complete"), true)
    );

    // Cancel after two pieces: it stops within a moment and keeps what it had.
    ai.openai.push(Step::Stream {
        pieces: pieces.clone(),
        gap: Duration::from_millis(100),
        cut: 4096,
        usage: (5, 24),
    });
    let queued = ask(app, &ann, json!({ "message": "Another long one" })).await;
    let request = queued["requestId"].as_str().unwrap();
    sio::next_named(&mut second_events, "ai:token", WAIT)
        .await
        .unwrap();
    sio::next_named(&mut second_events, "ai:token", WAIT)
        .await
        .unwrap();
    let cancelled = call(
        app,
        Method::POST,
        &format!("/api/v1/ai/requests/{request}/cancel"),
        Some(&ann.token),
        None,
    )
    .await;
    assert_eq!(cancelled.status().as_u16(), 202);
    let started = std::time::Instant::now();
    let heard = hear(&mut second_events, request).await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "stopped in {:?}",
        started.elapsed()
    );
    let kept = heard.response["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(heard.response["message"]["status"], "cancelled");
    assert!(
        kept.len() < pieces.concat().len() && pieces.concat().starts_with(&kept),
        "{kept}"
    );
    assert!(kept.starts_with("w0 w1 "), "{kept}");
    let again = call(
        app,
        Method::POST,
        &format!("/api/v1/ai/requests/{request}/cancel"),
        Some(&ann.token),
        None,
    )
    .await;
    assert_error(again, 409, "CONFLICT").await;
}

/// A redelivered request is not answered again, and a redelivered answer is not stored
/// twice (SPEC §6: consumers idempotent).
async fn redelivered_requests_and_answers_are_stored_once(backend: &Backend) {
    use confab_core::ports::broker::{Envelope, queues};
    let ai = ai_app(backend, |_| {}).await;
    let app = &ai.app;
    let ann = person(app, "ann").await;
    let (_socket, mut events) = connect(app, &ann).await;
    // A second copy of the request while the first is answered (two nodes relayed the same
    // outbox row): it waits for the first (retried, not answered again).
    ai.openai.push(Step::Stream {
        pieces: (0..10).map(|i| format!("slow{i} ")).collect(),
        gap: Duration::from_millis(80),
        cut: 4096,
        usage: (1, 10),
    });
    let queued = ask(app, &ann, json!({ "message": "once" })).await;
    let request = queued["requestId"].as_str().unwrap();
    sio::next_named(&mut events, "ai:token", WAIT)
        .await
        .expect("the first copy streams");
    app.state
        .broker
        .publish(
            queues::CHAT_REQUESTS,
            &Envelope {
                id: confab_core::domain::EventId::new(),
                kind: "ai.request".into(),
                attempt: 0,
                created_at: confab_core::domain::now(),
                trace_id: None,
                payload: json!({ "requestId": request, "sessionId": queued["sessionId"], "userId": ann.id, "model": null }),
            },
        )
        .await
        .unwrap();
    let heard = hear(&mut events, request).await;
    confab_core::testing::eventually("the copy is settled", WAIT, || async {
        matches!(
            app.state
                .broker
                .depth(queues::CHAT_REQUESTS)
                .await
                .map(|d| d.pending),
            Ok(0)
        )
    })
    .await;
    assert_eq!(
        ai.openai.calls(),
        1,
        "the copy did not call the provider again"
    );
    let calls = ai.openai.calls();
    let envelope = |queue_kind: &str, payload: Value| Envelope {
        id: confab_core::domain::EventId::new(),
        kind: queue_kind.into(),
        attempt: 1,
        created_at: confab_core::domain::now(),
        trace_id: None,
        payload,
    };
    let state = &app.state;
    state
        .broker
        .publish(
            queues::CHAT_REQUESTS,
            &envelope("ai.request", json!({ "requestId": request, "sessionId": queued["sessionId"], "userId": ann.id, "model": null })),
        )
        .await
        .unwrap();
    let mut response = json!({
        "requestId": request, "sessionId": queued["sessionId"], "userId": ann.id,
        "content": "a second answer", "status": "complete", "model": "gpt-fake", "provider": "openai",
        "cached": false, "latencyMs": 5, "promptTokens": null, "completionTokens": null,
        "errorCode": null, "errorDetail": null,
    });
    state
        .broker
        .publish(
            queues::CHAT_RESPONSES,
            &envelope("ai.response", response.take()),
        )
        .await
        .unwrap();
    // Both consumed (queues drain), nothing new stored or asked.
    confab_core::testing::eventually("both queues drained", WAIT, || async {
        let requests = state
            .broker
            .depth(queues::CHAT_REQUESTS)
            .await
            .map(|d| d.pending);
        let responses = state
            .broker
            .depth(queues::CHAT_RESPONSES)
            .await
            .map(|d| d.pending);
        matches!((requests, responses), (Ok(0), Ok(0)))
    })
    .await;
    let session = session_of(app, &ann, &queued).await;
    let messages = session["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2, "{session}");
    assert_eq!(messages[1]["content"], heard.response["message"]["content"]);
    assert_eq!(ai.openai.calls(), calls);
}

/// The per-user limit (10/min by default; 2 here) over HTTP and Socket.IO, and bad input.
async fn the_per_user_limit_and_bad_input(backend: &Backend) {
    let ai = ai_app(backend, |c| c.ai.requests_per_minute = 2).await;
    let app = &ai.app;
    let ann = person(app, "ann").await;
    for body in [
        json!({ "message": "" }),
        json!({ "message": "x".repeat(10_001) }),
        json!({ "message": "hi", "model": "gpt-17" }),
    ] {
        let response = call(
            app,
            Method::POST,
            "/api/v1/ai/messages",
            Some(&ann.token),
            Some(body),
        )
        .await;
        assert_error(response, 400, "VALIDATION_ERROR").await;
    }
    let response = call(
        app,
        Method::POST,
        "/api/v1/ai/messages",
        Some(&ann.token),
        Some(json!({ "text": "hi" })),
    )
    .await;
    assert_error(response, 422, "VALIDATION_ERROR").await;
    ask(app, &ann, json!({ "message": "one" })).await;
    // Asking for a model of the chain by name goes to it first.
    let by_model = ask(
        app,
        &ann,
        json!({ "message": "two", "model": "llama-fake" }),
    )
    .await;
    let response = call(
        app,
        Method::POST,
        "/api/v1/ai/messages",
        Some(&ann.token),
        Some(json!({ "message": "three" })),
    )
    .await;
    assert!(response.headers().contains_key("retry-after"));
    assert_error(response, 429, "RATE_LIMITED").await;
    let (socket, _events) = connect(app, &ann).await;
    let ack = socket
        .call("ai:send", &json!({ "message": "four" }), WAIT)
        .await
        .unwrap();
    assert_eq!(ack, json!({ "ok": false, "code": "RATE_LIMITED" }));
    let ack = socket
        .call("ai:send", &json!({ "text": 5 }), WAIT)
        .await
        .unwrap();
    assert_eq!(ack, json!({ "ok": false, "code": "VALIDATION_ERROR" }));
    confab_core::testing::eventually("the model-named request is answered", WAIT, || async {
        let got = session_of(app, &ann, &by_model).await;
        got["messages"][1]["provider"] == "ollama"
    })
    .await;
}

/// `POST /ai/chat`: JSON, and Server-Sent Events with `stream: true`; a failure is a 502.
async fn synchronous_chat_as_json_and_server_sent_events(backend: &Backend) {
    let ai = ai_app(backend, |_| {}).await;
    let app = &ai.app;
    let ann = person(app, "ann").await;
    ai.openai.push(Step::pieces(&["Bonjour", " !"]));
    let response = call(
        app,
        Method::POST,
        "/api/v1/ai/chat",
        Some(&ann.token),
        Some(json!({ "message": "Say hi in French" })),
    )
    .await;
    assert_eq!(response.status().as_u16(), 200);
    let message: Value = response.json().await.unwrap();
    assert_eq!(
        (message["content"].as_str(), message["status"].as_str()),
        (Some("Bonjour !"), Some("complete"))
    );

    ai.openai.push(Step::Stream {
        pieces: vec!["Un".into(), ", deux".into(), ", trois.".into()],
        gap: Duration::from_millis(20),
        cut: 2,
        usage: (4, 3),
    });
    let response = call(app, Method::POST, "/api/v1/ai/chat", Some(&ann.token), Some(json!({ "message": "Count to three in French", "stream": true, "sessionId": message["sessionId"] }))).await;
    assert_eq!(response.status().as_u16(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let text = response.text().await.unwrap();
    let events: Vec<Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let deltas: String = events.iter().filter_map(|e| e["delta"].as_str()).collect();
    assert_eq!(deltas, "Un, deux, trois.");
    let last = events.last().unwrap();
    assert_eq!(last["done"], true);
    assert_eq!(last["message"]["content"], "Un, deux, trois.");
    assert_eq!(last["message"]["usage"]["completionTokens"], 3);
    let session = session_of(app, &ann, &message).await;
    assert_eq!(session["messages"].as_array().unwrap().len(), 4);

    // Embeddings: from the first provider that has them (the fake OpenAI lists its vectors
    // in reverse; they come back in input order).
    let response = call(
        app,
        Method::POST,
        "/api/v1/ai/embeddings",
        Some(&ann.token),
        Some(json!({ "input": ["a", "bcd"] })),
    )
    .await;
    assert_eq!(response.status().as_u16(), 200);
    let vectors: Value = response.json().await.unwrap();
    assert_eq!(
        vectors,
        json!({ "data": [{ "index": 0, "embedding": [1.0, 97.0, 0.5] }, { "index": 1, "embedding": [3.0, 98.0, 0.5] }], "provider": "openai" })
    );
    let response = call(
        app,
        Method::POST,
        "/api/v1/ai/embeddings",
        Some(&ann.token),
        Some(json!({ "input": [] })),
    )
    .await;
    assert_error(response, 400, "VALIDATION_ERROR").await;

    ai.openai.set_fallback(Step::status(500));
    ai.ollama.set_fallback(Step::status(500));
    let response = call(
        app,
        Method::POST,
        "/api/v1/ai/chat",
        Some(&ann.token),
        Some(json!({ "message": "fail please" })),
    )
    .await;
    let body = assert_error(response, 502, "API_ERROR").await;
    assert!(
        body["message"].as_str().unwrap().contains("try again"),
        "{body}"
    );
}

on_every_backend!(
    a_queued_request_streams_in_order_is_stored_and_cached,
    retries_fallback_breaker_and_the_friendly_failure,
    resume_mid_stream_and_cancel,
    redelivered_requests_and_answers_are_stored_once,
    the_per_user_limit_and_bad_input,
    synchronous_chat_as_json_and_server_sent_events,
    a_mention_in_a_people_chat_is_answered_in_the_chat,
    generations_of_text_and_images_are_queued_and_stored,
);

/// SPEC §8: with no provider the server runs; AI endpoints answer 503 naming what to set.
#[tokio::test]
async fn without_a_provider_the_assistant_answers_503() {
    let app = auth_app(&Backend::EMBEDDED, |_| {}).await;
    let ann = person(&app, "ann").await;
    for path in ["/api/v1/ai/messages", "/api/v1/ai/chat"] {
        let response = call(
            &app,
            Method::POST,
            path,
            Some(&ann.token),
            Some(json!({ "message": "hi" })),
        )
        .await;
        let body = assert_error(response, 503, "UNAVAILABLE").await;
        assert!(
            body["message"].as_str().unwrap().contains("OPENAI_API_KEY"),
            "{body}"
        );
    }
    let (socket, _events) = connect(&app, &ann).await;
    let ack = socket
        .call("ai:send", &json!({ "message": "hi" }), WAIT)
        .await
        .unwrap();
    assert_eq!(ack, json!({ "ok": false, "code": "UNAVAILABLE" }));
    assert_eq!(
        get_json(&app, "/api/v1/ai/models", &ann.token).await,
        json!({ "items": [] })
    );
}

/// End to end against a real OpenAI-compatible server running a small real model
/// (`TEST_LLM_URL`, started by scripts/services.sh): one short prompt, streamed back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_small_model_answers_through_the_queue() {
    let Some(url) =
        confab_core::testing::service_url("TEST_LLM_URL", "real LLM (llama.cpp server)")
    else {
        return;
    };
    let model = std::env::var("TEST_LLM_MODEL").unwrap_or_else(|_| "smollm2-135m".into());
    let app = auth_app(&Backend::EMBEDDED, |c| {
        c.ai.openai = Some(OpenAiConfig {
            base_url: Some(url),
            model: Some(model.clone()),
            ..OpenAiConfig::default()
        });
        c.ai.max_tokens = Some(24);
        c.ai.timeout_secs = 120;
    })
    .await;
    let ann = person(&app, "ann").await;
    let (_socket, mut events) = connect(&app, &ann).await;
    let queued = ask(
        &app,
        &ann,
        json!({ "message": "What is the capital of France?" }),
    )
    .await;
    let heard = hear(&mut events, queued["requestId"].as_str().unwrap()).await;
    let answer = &heard.response["message"];
    eprintln!("the real model said: {}", answer["content"]);
    assert_eq!(answer["status"], "complete", "{answer}");
    assert!(!heard.tokens.is_empty());
    assert_eq!(heard.text(), answer["content"].as_str().unwrap());
    assert!(
        answer["usage"]["completionTokens"]
            .as_i64()
            .is_some_and(|n| n > 0),
        "{answer}"
    );
}

/// SPEC §1 "many nodes" for the assistant: an api process and a worker process on
/// PostgreSQL + Redis + RabbitMQ. The worker's tokens reach the socket on the api node
/// (through Redis); the worker is killed (SIGKILL) mid-answer, RabbitMQ hands the request to
/// a new worker, and the answer is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_answer_is_replaced_and_the_answer_is_stored_once() {
    let what = "api and worker processes on PostgreSQL + Redis + RabbitMQ";
    let (Some(admin), Some(redis), Some(amqp)) = (
        confab_core::testing::service_url("TEST_DATABASE_URL", what),
        confab_core::testing::service_url("TEST_REDIS_URL", what),
        confab_core::testing::service_url("TEST_AMQP_URL", what),
    ) else {
        return;
    };
    let db = confab_adapters::testing::TempDatabase::create(&admin).await;
    let openai = FakeLlm::start(Wire::OpenAi).await;
    let pieces: Vec<String> = (0..30).map(|i| format!("p{i} ")).collect();
    openai.set_fallback(Step::Stream {
        pieces: pieces.clone(),
        gap: Duration::from_millis(100),
        cut: 9,
        usage: (3, 30),
    });
    let prefix = confab_core::testing::unique("ai-nodes");
    let vars = |role: &'static str| {
        vec![
            ("CONFAB_ROLE", role.to_owned()),
            ("DATABASE_URL", db.url.clone()),
            ("REDIS_URL", redis.clone()),
            ("CONFAB__CACHE__KEY_PREFIX", format!("{prefix}:")),
            ("RABBITMQ_URL", amqp.clone()),
            ("CONFAB__QUEUE__QUEUE_PREFIX", format!("{prefix}.")),
            ("CONFAB__QUEUE__IDLE_QUEUE_EXPIRY_SECS", "60".to_owned()),
            ("OPENAI_BASE_URL", openai.url.clone()),
            ("OPENAI_MODEL", "gpt-fake".to_owned()),
        ]
    };
    let start = async |dir: &std::path::Path, role: &'static str| {
        let vars = vars(role);
        let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (child, mut lines, _, address) = crate::cli::spawn_serve(dir, &vars).await;
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        (child, format!("http://{address}"))
    };
    let dirs = [
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    ];
    let (_api, api) = start(dirs[0].path(), "api").await;
    let (mut first_worker, _) = start(dirs[1].path(), "worker").await;

    let http = reqwest::Client::new();
    let session: Value = http
        .post(format!("{api}/api/v1/auth/register"))
        .json(&json!({ "email": format!("{}@example.com", confab_core::testing::unique("ann")), "password": "correct horse battery staple", "name": "Ann" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = session["accessToken"].as_str().unwrap().to_owned();
    let (_socket, mut events) = sio::connect(&api, &json!({ "token": token }))
        .await
        .unwrap();
    let queued: Value = http
        .post(format!("{api}/api/v1/ai/messages"))
        .bearer_auth(&token)
        .json(&json!({ "message": "Count slowly" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let request = queued["requestId"].as_str().unwrap().to_owned();
    // The first worker's tokens cross to the api node's socket.
    for expected in 0..3 {
        let token = sio::next_named(&mut events, "ai:token", WAIT)
            .await
            .expect("tokens from the worker");
        assert_eq!(token.data["index"], expected);
        assert_eq!(token.data["requestId"], request.as_str());
    }
    first_worker.start_kill().unwrap();
    first_worker.wait().await.unwrap();
    assert_eq!(openai.calls(), 1);

    // A new worker gets the request again (the dead one never acknowledged it) and answers.
    let (_second_worker, _) = start(dirs[2].path(), "worker").await;
    let heard = hear(&mut events, &request).await;
    assert_eq!(heard.response["message"]["content"], pieces.concat());
    assert_eq!(heard.response["message"]["status"], "complete");
    assert_eq!(openai.calls(), 2, "asked once per worker");
    let session: Value = http
        .get(format!(
            "{api}/api/v1/ai/sessions/{}",
            queued["sessionId"].as_str().unwrap()
        ))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let roles: Vec<&str> = session["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["user", "assistant"], "stored once: {session}");
    db.drop().await;
}

/// `@assistant` in a people chat (SPEC §3): the answer streams to the chat's room and is
/// posted into the chat as an `ai` message; a redelivered mention posts nothing twice; a
/// message without the mention calls no provider.
async fn a_mention_in_a_people_chat_is_answered_in_the_chat(backend: &Backend) {
    use confab_core::ports::broker::{Envelope, queues};
    let ai = ai_app(backend, |_| {}).await;
    let app = &ai.app;
    let ann = person(app, "ann").await;
    let bob = person(app, "bob").await;
    let chat = crate::live::group(app, &ann, &[&bob]).await;
    let (anns, _ann_events) = connect(app, &ann).await;
    let (bobs, mut bob_events) = connect(app, &bob).await;
    for socket in [&anns, &bobs] {
        let joined = socket
            .call("chat:join", &json!({ "chatId": chat }), WAIT)
            .await
            .unwrap();
        assert_eq!(joined["ok"], true);
    }
    let plain = anns
        .call(
            "message:send",
            &json!({ "chatId": chat, "clientId": "c1", "text": "hello bob, assistant-free" }),
            WAIT,
        )
        .await
        .unwrap();
    assert_eq!(plain["ok"], true);
    ai.openai.push(Step::Stream {
        pieces: vec!["Two plus two ".into(), "is four.".into()],
        gap: Duration::from_millis(20),
        cut: 3,
        usage: (9, 2),
    });
    let asked = anns
        .call(
            "message:send",
            &json!({ "chatId": chat, "clientId": "c2", "text": "@assistant what is 2+2?" }),
            WAIT,
        )
        .await
        .unwrap();
    assert_eq!(asked["ok"], true);
    let asked_id = asked["id"].as_str().unwrap();
    // Bob sees the answer stream into the chat, then the posted message.
    let mut streamed = String::new();
    let posted = loop {
        let event = tokio::time::timeout(WAIT, bob_events.recv())
            .await
            .expect("the answer in time")
            .unwrap();
        match event.name.as_str() {
            "ai:token" => {
                assert_eq!(event.data["chatId"], chat.as_str());
                assert_eq!(event.data["messageId"], asked_id);
                streamed.push_str(event.data["delta"].as_str().unwrap());
            }
            "message:new" if event.data["kind"] == "ai" => break event.data,
            _ => {}
        }
    };
    assert_eq!(streamed, "Two plus two is four.");
    assert_eq!(posted["text"], "Two plus two is four.");
    assert_eq!(posted["chatId"], chat.as_str());
    assert_eq!(posted["senderId"], ann.id.as_str());
    assert_eq!(
        ai.openai.calls(),
        1,
        "only the mention called the assistant"
    );
    let sent = ai.openai.requests().pop().unwrap();
    let last = sent["messages"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(
        last,
        json!({ "role": "user", "content": "@assistant what is 2+2?" })
    );
    assert!(
        sent["messages"].to_string().contains("hello bob"),
        "the chat so far is the context"
    );

    // The mention delivered again: nothing new.
    app.state
        .broker
        .publish(
            queues::CHAT_REQUESTS,
            &Envelope {
                id: confab_core::domain::EventId::new(),
                kind: "ai.mention".into(),
                attempt: 1,
                created_at: confab_core::domain::now(),
                trace_id: None,
                payload: json!({ "chatId": chat, "messageId": asked_id, "userId": ann.id }),
            },
        )
        .await
        .unwrap();
    confab_core::testing::eventually("the redelivered mention is consumed", WAIT, || async {
        matches!(
            app.state
                .broker
                .depth(queues::CHAT_REQUESTS)
                .await
                .map(|d| d.pending),
            Ok(0)
        )
    })
    .await;
    let messages = get_json(app, &format!("/api/v1/chats/{chat}/messages"), &bob.token).await;
    let kinds: Vec<&str> = messages["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds.iter().filter(|k| **k == "ai").count(),
        1,
        "{messages}"
    );
    assert_eq!(kinds.len(), 3);
    assert_eq!(ai.openai.calls(), 1);
}

/// `POST /ai/generations` (SPEC §3): a text job and an image job go through the queue; the
/// images are stored in media storage and come back as signed URLs only their owner's token
/// (or the signature) opens.
async fn generations_of_text_and_images_are_queued_and_stored(backend: &Backend) {
    let ai = ai_app(backend, |_| {}).await;
    let app = &ai.app;
    let ann = person(app, "ann").await;
    let bob = person(app, "bob").await;
    for bad in [
        json!({ "kind": "video", "prompt": "x" }),
        json!({ "kind": "text", "prompt": "" }),
        json!({ "kind": "text", "prompt": "x", "n": 9 }),
        json!({ "kind": "text", "prompt": "x", "provider": "nobody" }),
    ] {
        let response = call(
            app,
            Method::POST,
            "/api/v1/ai/generations",
            Some(&ann.token),
            Some(bad),
        )
        .await;
        assert_error(response, 400, "VALIDATION_ERROR").await;
    }
    let finished = async |id: &str| {
        let path = format!("/api/v1/ai/generations/{id}");
        confab_core::testing::eventually("the generation finishes", WAIT, || async {
            let job = get_json(app, &path, &ann.token).await;
            matches!(job["status"].as_str(), Some("succeeded" | "failed"))
        })
        .await;
        get_json(app, &path, &ann.token).await
    };

    ai.openai
        .set_fallback(Step::pieces(&["Autumn ", "moonlight"]));
    let response = call(
        app,
        Method::POST,
        "/api/v1/ai/generations",
        Some(&ann.token),
        Some(json!({ "kind": "text", "prompt": "A haiku", "n": 2 })),
    )
    .await;
    assert_eq!(response.status().as_u16(), 202);
    let job: Value = response.json().await.unwrap();
    assert_eq!(job["status"], "queued");
    let id = job["id"].as_str().unwrap();
    let done = finished(id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(
        done["results"],
        json!([{ "text": "Autumn moonlight" }, { "text": "Autumn moonlight" }])
    );
    assert_eq!(done["provider"], "openai");
    let theirs = call(
        app,
        Method::GET,
        &format!("/api/v1/ai/generations/{id}"),
        Some(&bob.token),
        None,
    )
    .await;
    assert_error(theirs, 404, "NOT_FOUND").await;

    let response = call(
        app,
        Method::POST,
        "/api/v1/ai/generations",
        Some(&ann.token),
        Some(json!({ "kind": "image", "prompt": "A red square", "n": 2 })),
    )
    .await;
    assert_eq!(response.status().as_u16(), 202);
    let job: Value = response.json().await.unwrap();
    let done = finished(job["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let results = done["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    for image in results {
        assert_eq!(image["contentType"], "image/png", "{image}");
        let url = image["url"].as_str().unwrap();
        let path = url
            .split_once("/api/v1/")
            .map(|(_, p)| format!("/api/v1/{p}"))
            .unwrap();
        let fetched = app.client.get(app.url(&path)).send().await.unwrap();
        assert_eq!(fetched.status().as_u16(), 200, "{url}");
        assert!(fetched.bytes().await.unwrap().starts_with(b"\x89PNG"));
        // By token: the owner only.
        let key = path
            .trim_start_matches("/api/v1/media/")
            .split('?')
            .next()
            .unwrap()
            .to_owned();
        let by_token = call(
            app,
            Method::GET,
            &format!("/api/v1/media/{key}"),
            Some(&ann.token),
            None,
        )
        .await;
        assert_eq!(by_token.status().as_u16(), 200);
        let not_theirs = call(
            app,
            Method::GET,
            &format!("/api/v1/media/{key}"),
            Some(&bob.token),
            None,
        )
        .await;
        assert_error(not_theirs, 404, "NOT_FOUND").await;
    }
}

/// Anthropic and Replicate links in one chain: Anthropic's stream answers; when it fails,
/// Replicate's prediction (three polls) does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_and_replicate_links_answer_through_the_queue() {
    use confab_adapters::testing::fake_llm::{FAKE_KEY, REPLICATE_VERSION};
    use confab_server::config::{AnthropicConfig, ReplicateConfig, Secret};
    let anthropic = FakeLlm::start(Wire::Anthropic).await;
    let replicate = FakeLlm::start(Wire::Replicate).await;
    let app = auth_app(&Backend::EMBEDDED, |c| {
        c.ai.anthropic = Some(AnthropicConfig {
            api_key: Some(Secret::new(FAKE_KEY)),
            base_url: Some(anthropic.url.clone()),
            model: Some("claude-fake".into()),
        });
        c.ai.replicate = Some(ReplicateConfig {
            api_key: Some(Secret::new(FAKE_KEY)),
            api_url: Some(replicate.url.clone()),
            model_version: Some(REPLICATE_VERSION.into()),
            poll_interval_ms: Some(20),
            ..ReplicateConfig::default()
        });
        c.ai.requests_per_minute = 1000;
    })
    .await;
    let ann = person(&app, "ann").await;
    let (_socket, mut events) = connect(&app, &ann).await;
    anthropic.push(Step::pieces(&["Bonjour", " Ann"]));
    let queued = ask(&app, &ann, json!({ "message": "Greet me" })).await;
    let heard = hear(&mut events, queued["requestId"].as_str().unwrap()).await;
    assert_eq!(heard.text(), "Bonjour Ann");
    assert_eq!(heard.response["message"]["provider"], "anthropic");
    assert_eq!(heard.response["message"]["model"], "claude-fake");

    anthropic.set_fallback(Step::status(529));
    replicate.push(Step::pieces(&["From ", "a prediction"]));
    let polls = replicate.polls();
    let queued = ask(&app, &ann, json!({ "message": "Greet me again" })).await;
    let heard = hear(&mut events, queued["requestId"].as_str().unwrap()).await;
    assert_eq!(
        heard.response["message"]["provider"], "replicate",
        "{}",
        heard.response
    );
    assert_eq!(heard.response["message"]["content"], "From a prediction");
    assert_eq!(
        heard.text(),
        "From a prediction",
        "one piece, when the prediction ends"
    );
    assert_eq!(replicate.polls() - polls, 3);
}

/// SPEC §5: AI sessions past `ai.retention_days` are purged by the daily job.
#[tokio::test]
async fn ai_history_past_its_retention_is_purged_daily() {
    let ai = ai_app(&Backend::EMBEDDED, |c| c.ai.retention_days = 30).await;
    let app = &ai.app;
    let ann = person(app, "ann").await;
    let response = call(
        app,
        Method::POST,
        "/api/v1/ai/chat",
        Some(&ann.token),
        Some(json!({ "message": "keep me a while" })),
    )
    .await;
    let message: Value = response.json().await.unwrap();
    let session = format!(
        "/api/v1/ai/sessions/{}",
        message["sessionId"].as_str().unwrap()
    );
    // 29 days on: kept.
    let soon = confab_core::domain::now() + chrono::Duration::days(29);
    assert!(
        confab_server::jobs::run_due(&app.state, soon)
            .await
            .contains(&"purge_ai_history")
    );
    assert_eq!(
        call(app, Method::GET, &session, Some(&ann.token), None)
            .await
            .status()
            .as_u16(),
        200
    );
    // 31 days on: gone.
    let later = soon + chrono::Duration::days(2);
    assert!(
        confab_server::jobs::run_due(&app.state, later)
            .await
            .contains(&"purge_ai_history")
    );
    assert_error(
        call(app, Method::GET, &session, Some(&ann.token), None).await,
        404,
        "NOT_FOUND",
    )
    .await;
}

/// SPEC §8: a critical failure (`API_ERROR`, `CONFIG_ERROR`) is told to the configured
/// webhook (Slack-style `{"text"}`), without the provider's key.
#[tokio::test]
async fn a_critical_provider_failure_notifies_the_webhook() {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Value>();
    let hook = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |axum::Json(body): axum::Json<Value>| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(body);
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, hook).await });
    let ai = ai_app(&Backend::EMBEDDED, |c| {
        c.ai.webhook_url = Some(confab_server::config::SecretUrl::parse(&hook_url).unwrap());
        if let Some(openai) = c.ai.openai.as_mut() {
            openai.api_key = Some(confab_server::config::Secret::new("sk-very-secret-key"));
        }
    })
    .await;
    ai.openai.set_fallback(Step::status(500));
    ai.ollama.set_fallback(Step::status(500));
    let ann = person(&ai.app, "ann").await;
    ask(&ai.app, &ann, json!({ "message": "break please" })).await;
    let told = tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("the webhook is told")
        .unwrap();
    let text = told["text"].as_str().unwrap();
    assert!(text.contains("API_ERROR"), "{text}");
    assert!(!text.contains("sk-very-secret-key"), "{text}");
}
