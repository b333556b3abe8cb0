//! The `Store` conformance suite: the contract in `ports::store`, case by case.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;

use chrono::Duration as Span;
use serde_json::json;

use super::unique;
use crate::domain::{
    AiFeedback, AiMessage, AiMessageId, AiRequestId, AiSession, AiSessionId, ChatId, ChatKind,
    EventId, FailedLogin, GenerationId, GenerationJob, LockoutPolicy, Member, MemberRole, Message,
    MessageId, MessageKind, NewChat, NewUser, OneTimeToken, OneTimeTokenId, OutboxEntry, Page,
    RefreshFamily, RefreshFamilyId, RefreshToken, RefreshTokenId, SecurityEvent, SecurityEventId,
    ServiceErrorId, StoredServiceError, TokenPurpose, User, UserId, now,
};
use crate::ports::health::HealthStatus;
use crate::ports::store::{Append, Appended, Store, StoreError};

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
        a_stale_user_write_is_refused,
        failed_logins_count_in_a_window_and_lock_at_the_threshold,
        concurrent_failed_logins_each_count_once,
        users_are_found_by_name_prefix_or_exact_email_only,
        deleting_a_user_keeps_their_messages_without_a_sender,
        chats_have_members_and_a_member_is_added_once,
        members_of_many_chats_come_in_one_call,
        a_direct_chat_is_unique_per_pair_in_either_order,
        chats_are_listed_most_recently_active_first,
        messages_are_unique_per_sender_and_client_id,
        a_batch_of_messages_is_appended_in_one_group_commit,
        concurrent_batches_with_the_same_client_id_store_it_once,
        concurrent_batches_are_answered_each_and_fail_alone,
        a_message_for_a_missing_chat_is_not_found,
        pages_visit_every_message_exactly_once_in_order,
        edits_and_tombstones_are_written,
        read_positions_only_move_forward_and_count_unread,
        a_transaction_commits_all_or_nothing,
        the_outbox_hands_out_pending_entries_oldest_first,
        published_outbox_entries_are_purged_and_pending_ones_stay,
        a_processed_event_conflicts_the_second_time,
        security_events_are_listed_per_user_newest_first,
        a_refresh_token_rotates_once_and_its_family_can_be_revoked,
        exactly_one_of_concurrent_rotations_wins,
        expired_refresh_families_are_purged_with_their_tokens,
        one_time_tokens_are_single_use_expire_and_count_attempts,
        ai_sessions_keep_messages_once_per_request_and_feedback,
        generations_are_updated_and_old_ai_history_is_purged,
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

const LOCKOUT: LockoutPolicy = LockoutPolicy {
    threshold: 3,
    window: Span::minutes(15),
    lock_for: Span::minutes(10),
};

async fn failed_logins_count_in_a_window_and_lock_at_the_threshold(store: Arc<dyn Store>) {
    let ann = user(&*store).await;
    let t0 = now();
    let at = |minutes: i64| t0 + Span::minutes(minutes);
    let count = |minutes: i64| {
        let store = store.clone();
        async move {
            store
                .record_failed_login(ann.id, at(minutes), LOCKOUT)
                .await
                .unwrap()
        }
    };
    assert_eq!(count(0).await.failures, 1);
    assert_eq!(count(1).await.failures, 2);
    assert_eq!(
        count(2).await,
        FailedLogin {
            failures: 0,
            locked_until: Some(at(12)),
        },
        "the third failure in the window locks"
    );
    let locked = store.user_by_id(ann.id).await.unwrap().unwrap();
    assert_eq!(locked.locked_until, Some(at(12)));
    assert_eq!(locked.failed_logins, 0);
    // A fresh window: it opens at minute 3 and closes 15 minutes later.
    assert_eq!(count(3).await.failures, 1);
    assert_eq!(count(17).await.failures, 2);
    assert_eq!(
        count(19).await.failures,
        1,
        "a failure after the window starts a new count"
    );
    // A successful sign-in resets the count (through update_user).
    let mut reset = store.user_by_id(ann.id).await.unwrap().unwrap();
    reset.failed_logins = 0;
    reset.locked_until = None;
    store.update_user(&reset).await.unwrap();
    assert_eq!(count(20).await.failures, 1);

    let ghost = store.record_failed_login(UserId::new(), t0, LOCKOUT).await;
    assert!(matches!(ghost, Err(StoreError::NotFound(_))), "{ghost:?}");
}

async fn concurrent_failed_logins_each_count_once(store: Arc<dyn Store>) {
    let ann = user(&*store).await;
    let policy = LockoutPolicy {
        threshold: 100,
        ..LOCKOUT
    };
    let t0 = now();
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .record_failed_login(ann.id, t0, policy)
                    .await
                    .unwrap()
                    .failures
            })
        })
        .collect();
    let mut seen = HashSet::new();
    for task in tasks {
        seen.insert(task.await.unwrap());
    }
    assert_eq!(seen, (1..=8).collect(), "each failure counted exactly once");
}

async fn a_stale_user_write_is_refused(store: Arc<dyn Store>) {
    let ann = user(&*store).await;
    let seen = ann.updated_at;
    let mut reset = ann.clone();
    reset.password_hash = Some("new-hash".into());
    reset.updated_at = seen + Span::milliseconds(1);
    assert!(store.update_user_if_unchanged(&reset, seen).await.unwrap());
    let mut stale = ann.clone();
    stale.name = "Renamed from an old copy".into();
    stale.updated_at = seen + Span::milliseconds(2);
    assert!(
        !store.update_user_if_unchanged(&stale, seen).await.unwrap(),
        "a write from a copy read before the reset is refused"
    );
    let stored = store.user_by_id(ann.id).await.unwrap().unwrap();
    assert_eq!(stored, reset);
    let mut ghost = ann;
    ghost.id = UserId::new();
    assert!(!store.update_user_if_unchanged(&ghost, seen).await.unwrap());
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

async fn members_of_many_chats_come_in_one_call(store: Arc<dyn Store>) {
    let (ann, bob, cid) = (
        user(&*store).await,
        user(&*store).await,
        user(&*store).await,
    );
    let first = group(&*store, ann.id, &[bob.id]).await;
    let second = group(&*store, bob.id, &[cid.id]).await;
    let other = group(&*store, cid.id, &[ann.id]).await;
    let pairs = |members: Vec<Member>| -> Vec<(ChatId, UserId)> {
        members.iter().map(|m| (m.chat_id, m.user_id)).collect()
    };
    let got = pairs(
        store
            .members_of_chats(&[first, second, ChatId::new()])
            .await
            .unwrap(),
    );
    let mut expected = vec![
        (first, ann.id),
        (first, bob.id),
        (second, bob.id),
        (second, cid.id),
    ];
    let mut sorted = got.clone();
    sorted.sort_unstable();
    expected.sort_unstable();
    assert_eq!(sorted, expected, "the chats asked for, not {other}");
    // Each chat's members in join order, as `members` gives them.
    for chat in [first, second] {
        let one: Vec<_> = got.iter().filter(|(c, _)| *c == chat).copied().collect();
        assert_eq!(one, pairs(store.members(chat).await.unwrap()));
    }
    assert!(store.members_of_chats(&[]).await.unwrap().is_empty());
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

fn append(message: &Message) -> Append {
    Append {
        message: message.clone(),
        event: OutboxEntry {
            id: EventId::new(),
            queue: "events".into(),
            kind: "message.created".into(),
            payload: json!({ "messageId": message.id }),
            trace_id: None,
            created_at: message.created_at,
        },
    }
}

async fn a_batch_of_messages_is_appended_in_one_group_commit(store: Arc<dyn Store>) {
    let (ann, bob, cat) = (
        user(&*store).await,
        user(&*store).await,
        user(&*store).await,
    );
    let team = group(&*store, ann.id, &[bob.id]).await;
    let direct = store
        .create_chat(NewChat {
            id: ChatId::new(),
            kind: ChatKind::Direct,
            name: None,
            created_by: ann.id,
            members: vec![(ann.id, MemberRole::Member), (cat.id, MemberRole::Member)],
        })
        .await
        .unwrap()
        .id;
    let before = text(team, ann.id, "stored before", Some("earlier"));
    store.insert_message(&before).await.unwrap();
    // Made (its id and time taken) before the batch, appended after it.
    let late = text(team, bob.id, "late", None);

    let batch = [
        text(team, ann.id, "one", Some("c1")),
        text(team, bob.id, "two", None),
        // Not a member of the team; a chat that does not exist.
        text(team, cat.id, "intruder", Some("c1")),
        text(ChatId::new(), ann.id, "nowhere", None),
        // A retry of a message stored earlier, and of one earlier in this batch.
        text(team, ann.id, "stored before (retry)", Some("earlier")),
        text(team, ann.id, "one (retry)", Some("c1")),
        text(direct, cat.id, "hi", Some("c1")),
        text(direct, ann.id, "three", None),
    ];
    let answers = store
        .append_messages(&batch.iter().map(append).collect::<Vec<_>>())
        .await
        .unwrap();
    assert_eq!(
        answers,
        vec![
            Appended::Stored(ChatKind::Group),
            Appended::Stored(ChatKind::Group),
            Appended::NotMember,
            Appended::NotMember,
            Appended::Duplicate {
                existing: Box::new(before.clone()),
                kind: ChatKind::Group
            },
            Appended::Duplicate {
                existing: Box::new(batch[0].clone()),
                kind: ChatKind::Group
            },
            Appended::Stored(ChatKind::Direct),
            Appended::Stored(ChatKind::Direct),
        ]
    );
    let stored = |i: usize| batch[i].clone();
    let team_page = store.messages(team, Page::newest(50)).await.unwrap();
    assert_eq!(team_page, vec![stored(1), stored(0), before.clone()]);
    let direct_page = store.messages(direct, Page::newest(50)).await.unwrap();
    assert_eq!(direct_page, vec![stored(7), stored(6)]);
    // Each chat points at its newest; one outbox entry per stored message.
    let team_chat = store.chat_by_id(team).await.unwrap().unwrap();
    assert_eq!(team_chat.last_message_id, Some(batch[1].id));
    assert_eq!(team_chat.last_message_at, Some(batch[1].created_at));
    let direct_chat = store.chat_by_id(direct).await.unwrap().unwrap();
    assert_eq!(direct_chat.last_message_id, Some(batch[7].id));
    // A message older than the chat's newest is stored, and the chat's pointer stays.
    assert_eq!(
        store.append_messages(&[append(&late)]).await.unwrap(),
        vec![Appended::Stored(ChatKind::Group)]
    );
    assert_eq!(store.chat_by_id(team).await.unwrap().unwrap(), team_chat);
    let events: HashSet<_> = store
        .pending_outbox(100)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "message.created")
        .map(|e| e.payload["messageId"].as_str().unwrap().to_owned())
        .collect();
    let expected: HashSet<_> = [0, 1, 6, 7]
        .iter()
        .map(|i| batch[*i].id.to_string())
        .chain([late.id.to_string()])
        .collect();
    assert_eq!(events, expected);
    // An empty batch is no work.
    assert_eq!(store.append_messages(&[]).await.unwrap(), vec![]);
}

/// Two nodes' writers committing the same `(sender, client_id)` at once: one message stands,
/// the other batch answers `Duplicate` with it and still stores the rest of its batch.
/// Two messages with one client id sent at once, with their answers: exactly one is stored
/// and the other's answer is a duplicate of it. Returns the one stored.
fn stored_once<'m>(x: (&Appended, &'m Message), y: (&Appended, &'m Message)) -> &'m Message {
    match (x.0, y.0) {
        (Appended::Stored(_), Appended::Duplicate { existing, .. }) => {
            assert_eq!(**existing, *x.1);
            x.1
        }
        (Appended::Duplicate { existing, .. }, Appended::Stored(_)) => {
            assert_eq!(**existing, *y.1);
            y.1
        }
        other => panic!("exactly one should be stored: {other:?}"),
    }
}

async fn concurrent_batches_with_the_same_client_id_store_it_once(store: Arc<dyn Store>) {
    let (ann, bob) = (user(&*store).await, user(&*store).await);
    let chat = group(&*store, ann.id, &[bob.id]).await;
    let first = [
        text(chat, ann.id, "mine", Some("race")),
        text(chat, bob.id, "a", None),
    ];
    // The second batch also repeats the client id within itself.
    let second = [
        text(chat, ann.id, "mine", Some("race")),
        text(chat, bob.id, "b", None),
        text(chat, ann.id, "mine again", Some("race")),
    ];
    let (first_batch, second_batch): (Vec<_>, Vec<_>) = (
        first.iter().map(append).collect(),
        second.iter().map(append).collect(),
    );
    let (a, b) = tokio::join!(
        store.append_messages(&first_batch),
        store.append_messages(&second_batch),
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    let winner = stored_once((&a[0], &first[0]), (&b[0], &second[0]));
    assert_eq!(a[1], Appended::Stored(ChatKind::Group));
    assert_eq!(b[1], Appended::Stored(ChatKind::Group));
    // The repeat answers with the message that stands, whichever batch won.
    assert_eq!(
        b[2],
        Appended::Duplicate {
            existing: Box::new(winner.clone()),
            kind: ChatKind::Group
        }
    );
    let page = store.messages(chat, Page::newest(50)).await.unwrap();
    assert_eq!(page.len(), 3, "{page:?}");
    assert_eq!(
        store
            .message_by_client_id(ann.id, "race")
            .await
            .unwrap()
            .as_ref(),
        Some(winner)
    );
}

/// Several batches at once (a store may gather them into one commit, as SQLite's writer
/// thread does): each call gets its own answers, in its own order, and a batch that fails
/// fails alone.
async fn concurrent_batches_are_answered_each_and_fail_alone(store: Arc<dyn Store>) {
    let (ann, bob) = (user(&*store).await, user(&*store).await);
    let chat = group(&*store, ann.id, &[bob.id]).await;
    // A commit a moment ago: a store that lingers for more batches under traffic does now.
    let warm_up = text(chat, bob.id, "warm-up", None);
    store.append_messages(&[append(&warm_up)]).await.unwrap();
    let mut ghost = text(chat, ann.id, "no sender", None);
    ghost.sender_id = None;
    let first = [
        text(chat, ann.id, "1a", Some("k1")),
        text(chat, bob.id, "1b", None),
    ];
    let failing = [ghost, text(chat, bob.id, "fails with its batch", None)];
    let third = [text(chat, bob.id, "3a", None)];
    let fourth = [
        text(chat, ann.id, "4a", Some("k1")),
        text(ChatId::new(), ann.id, "nowhere", None),
        text(chat, ann.id, "4c", None),
    ];
    let batches: Vec<Vec<Append>> = [&first[..], &failing, &third, &fourth]
        .iter()
        .map(|b| b.iter().map(append).collect())
        .collect();
    let (a, failed, c, d) = tokio::join!(
        store.append_messages(&batches[0]),
        store.append_messages(&batches[1]),
        store.append_messages(&batches[2]),
        store.append_messages(&batches[3]),
    );
    assert!(failed.is_err(), "{failed:?}");
    let (a, c, d) = (a.unwrap(), c.unwrap(), d.unwrap());
    let winner = stored_once((&a[0], &first[0]), (&d[0], &fourth[0]));
    assert_eq!(a.len(), 2);
    assert_eq!(a[1], Appended::Stored(ChatKind::Group));
    assert_eq!(c, vec![Appended::Stored(ChatKind::Group)]);
    assert_eq!(d.len(), 3);
    assert_eq!(d[1], Appended::NotMember);
    assert_eq!(d[2], Appended::Stored(ChatKind::Group));
    let page = store.messages(chat, Page::newest(50)).await.unwrap();
    let mut texts: Vec<&str> = page.iter().filter_map(|m| m.text.as_deref()).collect();
    texts.sort_unstable();
    let mut expected = vec!["warm-up", "1b", "3a", "4c", winner.text.as_deref().unwrap()];
    expected.sort_unstable();
    assert_eq!(texts, expected);
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
    m.kind = MessageKind::Image;
    m.image = Some(serde_json::json!({"key": "chats/x/y/image.png", "width": 3}));
    store.insert_message(&m).await.unwrap();
    assert_eq!(store.message_by_id(m.id).await.unwrap(), Some(m.clone()));
    m.text = Some("fixed".into());
    m.edited_at = Some(now());
    store.update_message(&m).await.unwrap();
    assert_eq!(store.message_by_id(m.id).await.unwrap(), Some(m.clone()));
    m.text = None;
    m.image = None;
    m.deleted_at = Some(now());
    store.update_message(&m).await.unwrap();
    let tomb = store.message_by_id(m.id).await.unwrap().unwrap();
    assert!(tomb.deleted_at.is_some() && tomb.text.is_none() && tomb.image.is_none());
    // An edit that read the message before the delete cannot bring it back.
    let mut stale = m.clone();
    stale.text = Some("back from the dead".into());
    stale.deleted_at = None;
    assert!(matches!(
        store.update_message(&stale).await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(store.message_by_id(m.id).await.unwrap(), Some(tomb));
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

async fn published_outbox_entries_are_purged_and_pending_ones_stay(store: Arc<dyn Store>) {
    let entries: Vec<OutboxEntry> = ["a", "b", "c"].iter().map(|k| outbox(k)).collect();
    for e in &entries {
        store.enqueue(e).await.unwrap();
    }
    let published_at = now();
    store
        .mark_published(&[entries[0].id, entries[1].id], published_at)
        .await
        .unwrap();
    assert_eq!(
        store
            .purge_published_outbox(published_at - Span::seconds(1))
            .await
            .unwrap(),
        0,
        "published after the cut-off: kept"
    );
    assert_eq!(
        store
            .purge_published_outbox(published_at + Span::seconds(1))
            .await
            .unwrap(),
        2
    );
    assert_eq!(
        store.pending_outbox(10).await.unwrap(),
        [entries[2].clone()],
        "the unpublished entry stays"
    );
}

async fn a_processed_event_conflicts_the_second_time(store: Arc<dyn Store>) {
    let event = EventId::new();
    assert!(!store.was_processed("mail", event).await.unwrap());
    store.mark_processed("mail", event, now()).await.unwrap();
    assert!(store.was_processed("mail", event).await.unwrap());
    assert!(
        !store.was_processed("analytics", event).await.unwrap(),
        "per consumer"
    );
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

fn family(user: UserId, expires_in: Span) -> RefreshFamily {
    RefreshFamily {
        id: RefreshFamilyId::new(),
        user_id: user,
        created_at: now(),
        expires_at: now() + expires_in,
        revoked_at: None,
        revoked_reason: None,
    }
}

fn refresh(family: &RefreshFamily) -> RefreshToken {
    RefreshToken {
        id: RefreshTokenId::new(),
        family_id: family.id,
        token_hash: unique("hash-"),
        created_at: now(),
        expires_at: family.expires_at,
        rotated_at: None,
        replaced_by: None,
    }
}

async fn a_refresh_token_rotates_once_and_its_family_can_be_revoked(store: Arc<dyn Store>) {
    let ann = user(&*store).await;
    let fam = family(ann.id, Span::days(30));
    let first = refresh(&fam);
    store.create_refresh_family(&fam, &first).await.unwrap();
    let (found, found_family) = store
        .refresh_token_by_hash(&first.token_hash)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((found, found_family), (first.clone(), fam.clone()));
    assert_eq!(
        store.refresh_token_by_hash("no-such-hash").await.unwrap(),
        None
    );

    let second = refresh(&fam);
    assert!(
        store
            .rotate_refresh_token(first.id, &second, now())
            .await
            .unwrap()
    );
    let reused = refresh(&fam);
    assert!(
        !store
            .rotate_refresh_token(first.id, &reused, now())
            .await
            .unwrap(),
        "a rotated token rotates once"
    );
    assert_eq!(
        store
            .refresh_token_by_hash(&reused.token_hash)
            .await
            .unwrap(),
        None,
        "the loser's successor is not stored"
    );
    let old = store.refresh_token_by_id(first.id).await.unwrap().unwrap();
    assert_eq!(old.replaced_by, Some(second.id));
    assert!(old.rotated_at.is_some());

    store
        .revoke_refresh_family(fam.id, "refresh_reused", now())
        .await
        .unwrap();
    store
        .revoke_refresh_family(fam.id, "logout", now())
        .await
        .unwrap();
    let (_, revoked) = store
        .refresh_token_by_hash(&second.token_hash)
        .await
        .unwrap()
        .unwrap();
    assert!(revoked.revoked_at.is_some());
    assert_eq!(
        revoked.revoked_reason.as_deref(),
        Some("refresh_reused"),
        "the first reason stays"
    );

    let (a, b) = (
        family(ann.id, Span::days(30)),
        family(ann.id, Span::days(30)),
    );
    store.create_refresh_family(&a, &refresh(&a)).await.unwrap();
    store.create_refresh_family(&b, &refresh(&b)).await.unwrap();
    assert_eq!(
        store
            .revoke_user_refresh_families(ann.id, "logout_all", now())
            .await
            .unwrap(),
        2,
        "only live families count"
    );
    let ghost = family(UserId::new(), Span::days(1));
    let missing = store.create_refresh_family(&ghost, &refresh(&ghost)).await;
    assert!(
        matches!(missing, Err(StoreError::NotFound(_))),
        "{missing:?}"
    );
}

async fn exactly_one_of_concurrent_rotations_wins(store: Arc<dyn Store>) {
    let ann = user(&*store).await;
    let fam = family(ann.id, Span::days(30));
    let first = refresh(&fam);
    store.create_refresh_family(&fam, &first).await.unwrap();
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (store, successor) = (store.clone(), refresh(&fam));
            tokio::spawn(async move {
                store
                    .rotate_refresh_token(first.id, &successor, now())
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut winners = 0;
    for task in tasks {
        winners += usize::from(task.await.unwrap());
    }
    assert_eq!(
        winners, 1,
        "two tabs refreshing at once: one rotation, the other sees it rotated"
    );
}

async fn expired_refresh_families_are_purged_with_their_tokens(store: Arc<dyn Store>) {
    let ann = user(&*store).await;
    let (old, live) = (
        family(ann.id, -Span::hours(1)),
        family(ann.id, Span::days(30)),
    );
    let (old_token, live_token) = (refresh(&old), refresh(&live));
    store.create_refresh_family(&old, &old_token).await.unwrap();
    store
        .create_refresh_family(&live, &live_token)
        .await
        .unwrap();
    assert_eq!(store.purge_refresh_families(now()).await.unwrap(), 1);
    assert_eq!(
        store
            .refresh_token_by_hash(&old_token.token_hash)
            .await
            .unwrap(),
        None
    );
    assert!(
        store
            .refresh_token_by_hash(&live_token.token_hash)
            .await
            .unwrap()
            .is_some()
    );
}

fn code(email: &str, purpose: TokenPurpose, expires_in: Span) -> OneTimeToken {
    OneTimeToken {
        id: OneTimeTokenId::new(),
        user_id: None,
        email: email.into(),
        purpose,
        token_hash: unique("otp-hash-"),
        attempts: 0,
        created_at: now(),
        expires_at: now() + expires_in,
        used_at: None,
    }
}

async fn one_time_tokens_are_single_use_expire_and_count_attempts(store: Arc<dyn Store>) {
    let email = format!("{}@example.com", unique("otp"));
    let otp = code(&email, TokenPurpose::Otp, Span::minutes(10));
    store.create_one_time_token(&otp).await.unwrap();
    assert_eq!(
        store
            .one_time_token(TokenPurpose::Otp, &otp.token_hash)
            .await
            .unwrap(),
        Some(otp.clone())
    );
    assert_eq!(
        store
            .one_time_token(TokenPurpose::PasswordReset, &otp.token_hash)
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store
            .latest_one_time_token(&email, TokenPurpose::Otp, now())
            .await
            .unwrap()
            .map(|t| t.id),
        Some(otp.id)
    );
    assert_eq!(store.count_one_time_attempt(otp.id).await.unwrap(), 1);
    assert_eq!(store.count_one_time_attempt(otp.id).await.unwrap(), 2);

    let tasks: Vec<_> = (0..6)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.use_one_time_token(otp.id, now()).await.unwrap() })
        })
        .collect();
    let mut used = 0;
    for task in tasks {
        used += usize::from(task.await.unwrap());
    }
    assert_eq!(used, 1, "single use, however many try at once");
    assert_eq!(
        store
            .latest_one_time_token(&email, TokenPurpose::Otp, now())
            .await
            .unwrap(),
        None
    );

    let expired = code(&email, TokenPurpose::PasswordReset, -Span::minutes(1));
    store.create_one_time_token(&expired).await.unwrap();
    assert!(
        !store.use_one_time_token(expired.id, now()).await.unwrap(),
        "an expired token cannot be used"
    );
    assert_eq!(
        store
            .latest_one_time_token(&email, TokenPurpose::PasswordReset, now())
            .await
            .unwrap(),
        None
    );
    let twin = OneTimeToken {
        id: OneTimeTokenId::new(),
        ..expired.clone()
    };
    assert!(matches!(
        store.create_one_time_token(&twin).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(store.purge_one_time_tokens(now()).await.unwrap(), 1);
    assert_eq!(
        store
            .one_time_token(TokenPurpose::PasswordReset, &expired.token_hash)
            .await
            .unwrap(),
        None
    );
    assert!(matches!(
        store.count_one_time_attempt(expired.id).await,
        Err(StoreError::NotFound(_))
    ));
}

fn ai_turn(session: AiSessionId, request: AiRequestId, role: &str, content: &str) -> AiMessage {
    AiMessage {
        id: AiMessageId::new(),
        session_id: session,
        request_id: request,
        role: role.into(),
        content: content.into(),
        status: "complete".into(),
        model: None,
        provider: None,
        cached: false,
        latency_ms: None,
        prompt_tokens: None,
        completion_tokens: None,
        error_code: None,
        created_at: now(),
    }
}

async fn ai_sessions_keep_messages_once_per_request_and_feedback(store: Arc<dyn Store>) {
    let ann = user(&*store).await;
    let mut sessions = Vec::new();
    for title in ["first", "second"] {
        let s = AiSession {
            id: AiSessionId::new(),
            user_id: ann.id,
            title: title.into(),
            status: "idle".into(),
            created_at: now(),
            updated_at: now(),
        };
        store.create_ai_session(&s).await.unwrap();
        sessions.push(s);
    }
    assert_eq!(
        store.ai_session(sessions[0].id).await.unwrap(),
        Some(sessions[0].clone())
    );
    store
        .set_ai_session_status(sessions[0].id, "queued", now() + Span::seconds(1))
        .await
        .unwrap();
    let listed: Vec<AiSessionId> = store
        .ai_sessions_of(ann.id, 10)
        .await
        .unwrap()
        .iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(
        listed,
        [sessions[0].id, sessions[1].id],
        "most recently updated first"
    );
    assert_eq!(
        store
            .ai_session(sessions[0].id)
            .await
            .unwrap()
            .unwrap()
            .status,
        "queued"
    );

    let session = sessions[0].id;
    let mut turns = Vec::new();
    for i in 0..3 {
        let request = AiRequestId::new();
        let question = ai_turn(session, request, "user", &format!("q{i}"));
        let mut answer = ai_turn(session, request, "assistant", "");
        answer.status = "streaming".into();
        store.insert_ai_message(&question).await.unwrap();
        store.insert_ai_message(&answer).await.unwrap();
        turns.push((question, answer));
    }
    let (_, answer) = &turns[2];
    let twice = store
        .insert_ai_message(&ai_turn(session, answer.request_id, "assistant", "again"))
        .await;
    assert!(
        matches!(twice, Err(StoreError::Conflict(_))),
        "a redelivered answer is not stored twice: {twice:?}"
    );

    let mut done = answer.clone();
    done.content = "Paris.".into();
    done.status = "complete".into();
    done.model = Some("smollm2-135m".into());
    done.provider = Some("openai".into());
    done.cached = true;
    done.latency_ms = Some(420);
    done.prompt_tokens = Some(12);
    done.completion_tokens = Some(3);
    store.update_ai_message(&done).await.unwrap();
    assert_eq!(store.ai_message(done.id).await.unwrap(), Some(done.clone()));
    assert_eq!(
        store
            .ai_message_for_request(done.request_id, "assistant")
            .await
            .unwrap(),
        Some(done.clone())
    );

    let context = store.recent_ai_messages(session, 4).await.unwrap();
    let contents: Vec<&str> = context.iter().map(|m| m.content.as_str()).collect();
    assert_eq!(
        contents,
        ["q1", "", "q2", "Paris."],
        "the last N, oldest first"
    );

    let feedback = |rating: &str| AiFeedback {
        message_id: done.id,
        user_id: ann.id,
        rating: rating.into(),
        comment: Some("ok".into()),
        created_at: now(),
    };
    store.put_ai_feedback(&feedback("up")).await.unwrap();
    store.put_ai_feedback(&feedback("down")).await.unwrap();
    let orphan = AiFeedback {
        message_id: AiMessageId::new(),
        ..feedback("up")
    };
    assert!(matches!(
        store.put_ai_feedback(&orphan).await,
        Err(StoreError::NotFound(_))
    ));

    assert!(store.delete_ai_session(session).await.unwrap());
    assert!(!store.delete_ai_session(session).await.unwrap());
    assert_eq!(
        store.ai_message(done.id).await.unwrap(),
        None,
        "messages go with their session"
    );
    assert!(matches!(
        store.set_ai_session_status(session, "idle", now()).await,
        Err(StoreError::NotFound(_))
    ));
}

async fn generations_are_updated_and_old_ai_history_is_purged(store: Arc<dyn Store>) {
    let ann = user(&*store).await;
    let mut job = GenerationJob {
        id: GenerationId::new(),
        user_id: ann.id,
        kind: "image".into(),
        prompt: "a lighthouse at dusk".into(),
        n: 2,
        provider: None,
        status: "queued".into(),
        results: None,
        error_code: None,
        created_at: now(),
        updated_at: now(),
    };
    store.create_generation(&job).await.unwrap();
    job.status = "succeeded".into();
    job.provider = Some("replicate".into());
    job.results = Some(json!({"images": ["media/a.webp", "media/b.webp"]}));
    job.updated_at = now();
    store.update_generation(&job).await.unwrap();
    assert_eq!(store.generation(job.id).await.unwrap(), Some(job.clone()));
    let session = AiSession {
        id: AiSessionId::new(),
        user_id: ann.id,
        title: "t".into(),
        status: "idle".into(),
        created_at: now(),
        updated_at: now(),
    };
    store.create_ai_session(&session).await.unwrap();

    assert_eq!(
        store.purge_ai_history(now() - Span::days(1)).await.unwrap(),
        (0, 0),
        "recent history stays"
    );
    assert_eq!(
        store
            .purge_ai_history(now() + Span::seconds(1))
            .await
            .unwrap(),
        (1, 1)
    );
    assert_eq!(store.generation(job.id).await.unwrap(), None);
    assert_eq!(store.ai_session(session.id).await.unwrap(), None);
}

async fn users_are_found_by_name_prefix_or_exact_email_only(store: Arc<dyn Store>) {
    let mut made = Vec::new();
    for (name, email) in [
        ("Anna Schmidt", "anna@example.com"),
        ("annabel", "belle@example.com"),
        ("Bob", "bob@example.com"),
        ("50%_off", "deals@example.com"),
    ] {
        let u = store
            .create_user(NewUser {
                email: email.into(),
                name: name.into(),
                password_hash: None,
            })
            .await
            .unwrap();
        made.push(u);
    }
    let names = |found: Vec<User>| found.into_iter().map(|u| u.name).collect::<Vec<_>>();
    assert_eq!(
        names(store.search_users("ANN", 10).await.unwrap()),
        ["Anna Schmidt", "annabel"]
    );
    assert_eq!(
        names(store.search_users("ann", 1).await.unwrap()),
        ["Anna Schmidt"],
        "limited"
    );
    assert_eq!(
        names(store.search_users("bob@example.com", 10).await.unwrap()),
        ["Bob"],
        "exact email"
    );
    assert!(
        store.search_users("bob@exa", 10).await.unwrap().is_empty(),
        "never by email prefix"
    );
    assert!(store.search_users("anna@", 10).await.unwrap().is_empty());
    assert_eq!(
        names(store.search_users("50%", 10).await.unwrap()),
        ["50%_off"],
        "wildcards are literal"
    );
    assert!(store.search_users("5_", 10).await.unwrap().is_empty());
    assert!(store.search_users("  ", 10).await.unwrap().is_empty());
}
