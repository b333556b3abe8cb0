//! The `Store` conformance suite: the contract in `ports::store`, case by case.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;

use chrono::Duration as Span;
use serde_json::json;

use super::unique;
use crate::domain::{
    ChatId, ChatKind, EventId, MemberRole, Message, MessageId, MessageKind, NewChat, NewUser,
    OutboxEntry, Page, SecurityEvent, SecurityEventId, ServiceErrorId, StoredServiceError, User,
    UserId, now,
};
use crate::ports::health::HealthStatus;
use crate::ports::store::{Store, StoreError};

/// Runs every case, each on a fresh, empty, migrated store made by `make()`.
pub async fn run_all<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Store>>,
{
    macro_rules! cases {
        ($($case:ident),* $(,)?) => {$(
            eprintln!("store suite: {}", stringify!($case));
            $case(make().await).await;
        )*};
    }
    cases!(
        users_are_created_found_and_unique_by_email,
        updating_a_user_writes_its_fields,
        deleting_a_user_keeps_their_messages_without_a_sender,
        chats_have_members_and_a_member_is_added_once,
        a_direct_chat_is_unique_per_pair_in_either_order,
        chats_are_listed_most_recently_active_first,
        messages_are_unique_per_sender_and_client_id,
        a_message_for_a_missing_chat_is_not_found,
        pages_visit_every_message_exactly_once_in_order,
        edits_and_tombstones_are_written,
        read_positions_only_move_forward_and_count_unread,
        a_transaction_commits_all_or_nothing,
        the_outbox_hands_out_pending_entries_oldest_first,
        a_processed_event_conflicts_the_second_time,
        security_events_are_listed_per_user_newest_first,
        health_is_ok_with_a_kind,
    );
}

async fn user(store: &dyn Store) -> User {
    store
        .create_user(NewUser {
            email: format!("{}@example.com", unique("user")),
            name: "Ann".into(),
            password_hash: Some("$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA".into()),
        })
        .await
        .unwrap()
}

async fn group(store: &dyn Store, owner: UserId, others: &[UserId]) -> ChatId {
    let mut members = vec![(owner, MemberRole::Admin)];
    members.extend(others.iter().map(|u| (*u, MemberRole::Member)));
    store
        .create_chat(NewChat {
            id: ChatId::new(),
            kind: ChatKind::Group,
            name: Some("Team".into()),
            created_by: owner,
            members,
        })
        .await
        .unwrap()
        .id
}

fn text(chat: ChatId, sender: UserId, body: &str, client_id: Option<&str>) -> Message {
    Message {
        id: MessageId::new(),
        chat_id: chat,
        sender_id: Some(sender),
        kind: MessageKind::Text,
        text: Some(body.into()),
        client_id: client_id.map(str::to_owned),
        image: None,
        created_at: now(),
        edited_at: None,
        deleted_at: None,
    }
}

async fn users_are_created_found_and_unique_by_email(store: Arc<dyn Store>) {
    let ann = user(&*store).await;
    assert_eq!(ann.name, "Ann");
    assert_eq!(ann.failed_logins, 0);
    assert_eq!(store.user_by_id(ann.id).await.unwrap().as_ref(), Some(&ann));
    assert_eq!(
        store.user_by_email(&ann.email).await.unwrap().as_ref(),
        Some(&ann)
    );
    assert_eq!(store.user_by_id(UserId::new()).await.unwrap(), None);
    assert_eq!(
        store.user_by_email("nobody@example.com").await.unwrap(),
        None
    );
    let again = store
        .create_user(NewUser {
            email: ann.email.clone(),
            name: "Impostor".into(),
            password_hash: None,
        })
        .await;
    assert!(matches!(again, Err(StoreError::Conflict(_))), "{again:?}");
}

async fn updating_a_user_writes_its_fields(store: Arc<dyn Store>) {
    let mut ann = user(&*store).await;
    ann.name = "Ann B.".into();
    ann.password_hash = None;
    ann.email_verified_at = Some(now());
    ann.avatar_key = Some("avatars/1.webp".into());
    ann.failed_logins = 3;
    ann.locked_until = Some(now() + Span::minutes(15));
    ann.last_seen_at = Some(now());
    ann.updated_at = now();
    store.update_user(&ann).await.unwrap();
    assert_eq!(store.user_by_id(ann.id).await.unwrap(), Some(ann.clone()));

    let mut ghost = ann;
    ghost.id = UserId::new();
    assert!(matches!(
        store.update_user(&ghost).await,
        Err(StoreError::NotFound(_))
    ));
}

async fn deleting_a_user_keeps_their_messages_without_a_sender(store: Arc<dyn Store>) {
    let (ann, bob) = (user(&*store).await, user(&*store).await);
    let chat = group(&*store, bob.id, &[ann.id]).await;
    let message = text(chat, ann.id, "hi", Some("c1"));
    store.insert_message(&message).await.unwrap();
    store
        .record_security_event(&SecurityEvent {
            id: SecurityEventId::new(),
            user_id: Some(ann.id),
            kind: "login_succeeded".into(),
            ip: None,
            user_agent: None,
            details: json!({}),
            created_at: now(),
        })
        .await
        .unwrap();

    assert!(store.delete_user(ann.id).await.unwrap());
    assert!(!store.delete_user(ann.id).await.unwrap(), "already gone");
    assert_eq!(store.user_by_id(ann.id).await.unwrap(), None);
    assert_eq!(store.member(chat, ann.id).await.unwrap(), None);
    let kept = store
        .message_by_id(message.id)
        .await
        .unwrap()
        .expect("the message stays");
    assert_eq!(kept.sender_id, None);
    assert_eq!(kept.text.as_deref(), Some("hi"));
    assert!(
        store
            .chats_of(bob.id)
            .await
            .unwrap()
            .iter()
            .any(|c| c.id == chat)
    );
}

async fn chats_have_members_and_a_member_is_added_once(store: Arc<dyn Store>) {
    let (ann, bob, cid) = (
        user(&*store).await,
        user(&*store).await,
        user(&*store).await,
    );
    let chat = group(&*store, ann.id, &[bob.id]).await;
    let stored = store.chat_by_id(chat).await.unwrap().unwrap();
    assert_eq!(stored.kind, ChatKind::Group);
    assert_eq!(stored.name.as_deref(), Some("Team"));
    assert_eq!(stored.created_by, Some(ann.id));
    assert_eq!(
        store.member(chat, ann.id).await.unwrap().unwrap().role,
        MemberRole::Admin
    );
    assert_eq!(
        store.member(chat, bob.id).await.unwrap().unwrap().role,
        MemberRole::Member
    );
    assert_eq!(store.member(chat, cid.id).await.unwrap(), None);

    let added = store
        .add_member(chat, cid.id, MemberRole::Member)
        .await
        .unwrap();
    assert_eq!((added.chat_id, added.user_id), (chat, cid.id));
    let twice = store.add_member(chat, cid.id, MemberRole::Member).await;
    assert!(matches!(twice, Err(StoreError::Conflict(_))), "{twice:?}");
    let members: HashSet<UserId> = store
        .members(chat)
        .await
        .unwrap()
        .iter()
        .map(|m| m.user_id)
        .collect();
    assert_eq!(members, HashSet::from([ann.id, bob.id, cid.id]));

    assert!(store.remove_member(chat, bob.id).await.unwrap());
    assert!(!store.remove_member(chat, bob.id).await.unwrap());
    assert_eq!(store.members(chat).await.unwrap().len(), 2);
    let missing = store
        .add_member(ChatId::new(), bob.id, MemberRole::Member)
        .await;
    assert!(
        matches!(missing, Err(StoreError::NotFound(_))),
        "{missing:?}"
    );
    assert_eq!(store.chat_by_id(ChatId::new()).await.unwrap(), None);
}

async fn a_direct_chat_is_unique_per_pair_in_either_order(store: Arc<dyn Store>) {
    let (ann, bob) = (user(&*store).await, user(&*store).await);
    let direct = |a: UserId, b: UserId| NewChat {
        id: ChatId::new(),
        kind: ChatKind::Direct,
        name: None,
        created_by: a,
        members: vec![(a, MemberRole::Member), (b, MemberRole::Member)],
    };
    let chat = store.create_chat(direct(ann.id, bob.id)).await.unwrap();
    let again = store.create_chat(direct(bob.id, ann.id)).await;
    assert!(matches!(again, Err(StoreError::Conflict(_))), "{again:?}");
    assert_eq!(
        store
            .direct_chat(bob.id, ann.id)
            .await
            .unwrap()
            .map(|c| c.id),
        Some(chat.id)
    );
    assert_eq!(
        store.direct_chat(ann.id, UserId::new()).await.unwrap(),
        None
    );
}

async fn chats_are_listed_most_recently_active_first(store: Arc<dyn Store>) {
    let ann = user(&*store).await;
    let (first, second, third) = (
        group(&*store, ann.id, &[]).await,
        group(&*store, ann.id, &[]).await,
        group(&*store, ann.id, &[]).await,
    );
    let order =
        |chats: Vec<crate::domain::Chat>| chats.into_iter().map(|c| c.id).collect::<Vec<_>>();
    // Without messages, the newest chat first.
    assert_eq!(
        order(store.chats_of(ann.id).await.unwrap()),
        [third, second, first]
    );
    for chat in [second, first] {
        let m = text(chat, ann.id, "x", None);
        store.insert_message(&m).await.unwrap();
        store
            .set_latest_message(chat, m.id, m.created_at)
            .await
            .unwrap();
    }
    assert_eq!(
        order(store.chats_of(ann.id).await.unwrap()),
        [first, second, third]
    );
    let latest = store.chat_by_id(first).await.unwrap().unwrap();
    assert!(latest.last_message_id.is_some() && latest.last_message_at.is_some());
    assert!(store.chats_of(UserId::new()).await.unwrap().is_empty());
}

async fn messages_are_unique_per_sender_and_client_id(store: Arc<dyn Store>) {
    let (ann, bob) = (user(&*store).await, user(&*store).await);
    let chat = group(&*store, ann.id, &[bob.id]).await;
    let first = text(chat, ann.id, "once", Some("same-id"));
    store.insert_message(&first).await.unwrap();
    let retry = store
        .insert_message(&text(chat, ann.id, "once", Some("same-id")))
        .await;
    assert!(matches!(retry, Err(StoreError::Conflict(_))), "{retry:?}");
    assert_eq!(
        store.message_by_client_id(ann.id, "same-id").await.unwrap(),
        Some(first)
    );
    // Another sender may use the same client id; messages without one never collide.
    store
        .insert_message(&text(chat, bob.id, "mine", Some("same-id")))
        .await
        .unwrap();
    store
        .insert_message(&text(chat, ann.id, "a", None))
        .await
        .unwrap();
    store
        .insert_message(&text(chat, ann.id, "b", None))
        .await
        .unwrap();
    assert_eq!(
        store.message_by_client_id(bob.id, "other").await.unwrap(),
        None
    );
}

async fn a_message_for_a_missing_chat_is_not_found(store: Arc<dyn Store>) {
    let ann = user(&*store).await;
    let orphan = store
        .insert_message(&text(ChatId::new(), ann.id, "lost", None))
        .await;
    assert!(matches!(orphan, Err(StoreError::NotFound(_))), "{orphan:?}");
}

async fn pages_visit_every_message_exactly_once_in_order(store: Arc<dyn Store>) {
    let ann = user(&*store).await;
    let chat = group(&*store, ann.id, &[]).await;
    let other = group(&*store, ann.id, &[]).await;
    let mut ids = Vec::new();
    for i in 0..25 {
        let m = text(chat, ann.id, &format!("m{i}"), None);
        store.insert_message(&m).await.unwrap();
        store
            .insert_message(&text(other, ann.id, "elsewhere", None))
            .await
            .unwrap();
        ids.push(m.id);
    }
    let newest = store.messages(chat, Page::newest(10)).await.unwrap();
    let newest_ids: Vec<MessageId> = newest.iter().map(|m| m.id).collect();
    assert_eq!(
        newest_ids,
        ids.iter().rev().take(10).copied().collect::<Vec<_>>()
    );

    let mut seen = Vec::new();
    let mut page = Page::newest(10);
    loop {
        let batch = store.messages(chat, page).await.unwrap();
        if batch.is_empty() {
            break;
        }
        assert!(batch.len() <= 10);
        seen.extend(batch.iter().map(|m| m.id));
        page = Page::before(batch.last().unwrap().id, 10);
    }
    assert_eq!(
        seen,
        ids.iter().rev().copied().collect::<Vec<_>>(),
        "newest first, each once"
    );

    let mut seen = Vec::new();
    let mut page = Page::after(ids[0], 7);
    seen.push(ids[0]);
    loop {
        let batch = store.messages(chat, page).await.unwrap();
        if batch.is_empty() {
            break;
        }
        seen.extend(batch.iter().map(|m| m.id));
        page = Page::after(batch.last().unwrap().id, 7);
    }
    assert_eq!(seen, ids, "oldest first after a cursor, each once");
    assert_eq!(
        store.messages(chat, Page::newest(0)).await.unwrap().len(),
        1,
        "limits are clamped"
    );
}

async fn edits_and_tombstones_are_written(store: Arc<dyn Store>) {
    let ann = user(&*store).await;
    let chat = group(&*store, ann.id, &[]).await;
    let mut m = text(chat, ann.id, "typo", Some("e1"));
    store.insert_message(&m).await.unwrap();
    m.text = Some("fixed".into());
    m.edited_at = Some(now());
    store.update_message(&m).await.unwrap();
    assert_eq!(store.message_by_id(m.id).await.unwrap(), Some(m.clone()));
    m.text = None;
    m.deleted_at = Some(now());
    store.update_message(&m).await.unwrap();
    let tomb = store.message_by_id(m.id).await.unwrap().unwrap();
    assert!(tomb.deleted_at.is_some() && tomb.text.is_none());
}

async fn read_positions_only_move_forward_and_count_unread(store: Arc<dyn Store>) {
    let (ann, bob) = (user(&*store).await, user(&*store).await);
    let chat = group(&*store, ann.id, &[bob.id]).await;
    let mut sent = Vec::new();
    for i in 0..5 {
        let m = text(chat, ann.id, &format!("{i}"), None);
        store.insert_message(&m).await.unwrap();
        sent.push(m.id);
    }
    store
        .insert_message(&text(chat, bob.id, "own", None))
        .await
        .unwrap();
    assert_eq!(
        store
            .count_messages_after(chat, None, bob.id)
            .await
            .unwrap(),
        5,
        "own messages are not unread"
    );
    store.mark_read(chat, bob.id, sent[2], now()).await.unwrap();
    store.mark_read(chat, bob.id, sent[1], now()).await.unwrap();
    let me = store.member(chat, bob.id).await.unwrap().unwrap();
    assert_eq!(me.last_read_message_id, Some(sent[2]), "never backwards");
    assert!(me.last_read_at.is_some());
    assert_eq!(
        store
            .count_messages_after(chat, me.last_read_message_id, bob.id)
            .await
            .unwrap(),
        2
    );
}

fn outbox(kind: &str) -> OutboxEntry {
    OutboxEntry {
        id: EventId::new(),
        queue: "events".into(),
        kind: kind.into(),
        payload: json!({"kind": kind, "n": 1}),
        trace_id: Some("trace-1".into()),
        created_at: now(),
    }
}

async fn a_transaction_commits_all_or_nothing(store: Arc<dyn Store>) {
    let ann = user(&*store).await;
    let chat = group(&*store, ann.id, &[]).await;

    let rolled_back = text(chat, ann.id, "never", Some("tx-1"));
    {
        let tx = store.begin().await.unwrap();
        tx.insert_message(&rolled_back).await.unwrap();
        tx.set_latest_message(chat, rolled_back.id, rolled_back.created_at)
            .await
            .unwrap();
        tx.enqueue(&outbox("message.created")).await.unwrap();
        assert!(
            tx.message_by_id(rolled_back.id).await.unwrap().is_some(),
            "a tx reads its own writes"
        );
        // Dropped without commit.
    }
    assert_eq!(store.message_by_id(rolled_back.id).await.unwrap(), None);
    assert_eq!(
        store
            .chat_by_id(chat)
            .await
            .unwrap()
            .unwrap()
            .last_message_id,
        None
    );
    assert!(store.pending_outbox(10).await.unwrap().is_empty());

    let kept = text(chat, ann.id, "kept", Some("tx-1"));
    let event = outbox("message.created");
    let tx = store.begin().await.unwrap();
    tx.insert_message(&kept).await.unwrap();
    tx.set_latest_message(chat, kept.id, kept.created_at)
        .await
        .unwrap();
    tx.enqueue(&event).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        store.message_by_id(kept.id).await.unwrap(),
        Some(kept.clone())
    );
    assert_eq!(
        store
            .chat_by_id(chat)
            .await
            .unwrap()
            .unwrap()
            .last_message_id,
        Some(kept.id)
    );
    assert_eq!(store.pending_outbox(10).await.unwrap(), [event]);

    // A failing statement inside a transaction leaves the store as it was.
    let tx = store.begin().await.unwrap();
    tx.enqueue(&outbox("x")).await.unwrap();
    let dup = tx
        .insert_message(&text(chat, ann.id, "dup", Some("tx-1")))
        .await;
    assert!(matches!(dup, Err(StoreError::Conflict(_))), "{dup:?}");
    drop(tx);
    assert_eq!(store.pending_outbox(10).await.unwrap().len(), 1);
}

async fn the_outbox_hands_out_pending_entries_oldest_first(store: Arc<dyn Store>) {
    let entries: Vec<OutboxEntry> = ["a", "b", "c"].iter().map(|k| outbox(k)).collect();
    for e in &entries {
        store.enqueue(e).await.unwrap();
    }
    assert_eq!(store.pending_outbox(10).await.unwrap(), entries);
    assert_eq!(store.pending_outbox(2).await.unwrap(), entries[..2]);
    store
        .mark_published(&[entries[0].id, entries[2].id], now())
        .await
        .unwrap();
    assert_eq!(
        store.pending_outbox(10).await.unwrap(),
        [entries[1].clone()]
    );
    let again = store.enqueue(&entries[1]).await;
    assert!(
        matches!(again, Err(StoreError::Conflict(_))),
        "an event id is enqueued once: {again:?}"
    );
}

async fn a_processed_event_conflicts_the_second_time(store: Arc<dyn Store>) {
    let event = EventId::new();
    store.mark_processed("mail", event, now()).await.unwrap();
    let again = store.mark_processed("mail", event, now()).await;
    assert!(matches!(again, Err(StoreError::Conflict(_))), "{again:?}");
    store
        .mark_processed("analytics", event, now())
        .await
        .unwrap();
}

async fn security_events_are_listed_per_user_newest_first(store: Arc<dyn Store>) {
    let (ann, bob) = (user(&*store).await, user(&*store).await);
    let mut ids = Vec::new();
    for kind in ["login_failed", "login_failed", "login_succeeded"] {
        let e = SecurityEvent {
            id: SecurityEventId::new(),
            user_id: Some(ann.id),
            kind: kind.into(),
            ip: Some("203.0.113.9".into()),
            user_agent: Some("test".into()),
            details: json!({"reason": kind}),
            created_at: now(),
        };
        store.record_security_event(&e).await.unwrap();
        ids.push(e.id);
    }
    let events = store
        .security_events(ann.id, Page::newest(2))
        .await
        .unwrap();
    assert_eq!(
        events.iter().map(|e| e.id).collect::<Vec<_>>(),
        [ids[2], ids[1]]
    );
    assert_eq!(events[0].details, json!({"reason": "login_succeeded"}));
    let rest = store
        .security_events(ann.id, Page::before(ids[1], 10))
        .await
        .unwrap();
    assert_eq!(rest.iter().map(|e| e.id).collect::<Vec<_>>(), [ids[0]]);
    assert!(
        store
            .security_events(bob.id, Page::newest(10))
            .await
            .unwrap()
            .is_empty()
    );

    store
        .record_service_error(&StoredServiceError {
            id: ServiceErrorId::new(),
            code: "TIMEOUT_ERROR".into(),
            service: "openai".into(),
            message: "no answer in 30 s".into(),
            context: json!({"model": "gpt-4o-mini"}),
            request_id: Some("req-1".into()),
            created_at: now(),
        })
        .await
        .unwrap();
}

async fn health_is_ok_with_a_kind(store: Arc<dyn Store>) {
    let health = store.health().await;
    assert_eq!(health.status, HealthStatus::Ok, "{health:?}");
    assert!(
        matches!(health.kind.as_str(), "sqlite" | "postgres"),
        "{}",
        health.kind
    );
}
