//! Background work: consume → call a service → ack, and the outbox relay.

use std::sync::Arc;
use std::time::Duration;

use std::collections::HashMap;

use confab_core::ports::broker::{Broker, Delivery};
use confab_core::ports::store::Store;
use confab_core::services::delivery::relay_outbox;
use tokio_util::sync::CancellationToken;

/// How many outbox rows one relay round moves: large, so that under load the relay writes
/// a few big transactions rather than many small ones (each takes SQLite's one write lock
/// that message commits wait for).
const RELAY_BATCH: u32 = 500;
/// How often an idle relay looks for new rows.
const RELAY_IDLE: Duration = Duration::from_millis(200);

/// Moves committed outbox rows to the broker until `shutdown`; `wake` cuts an idle pause
/// short. While the broker is down the
/// rows wait (backing off up to 5 s between tries) and nothing is lost.
pub fn spawn_outbox_relay(
    store: Arc<dyn Store>,
    broker: Arc<dyn Broker>,
    wake: Arc<tokio::sync::Notify>,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut backoff = RELAY_IDLE;
        loop {
            let pause = match relay_outbox(&*store, &*broker, RELAY_BATCH).await {
                // A full batch: there may be more right away.
                Ok(moved) if moved == RELAY_BATCH as usize => Duration::ZERO,
                Ok(_) => {
                    backoff = RELAY_IDLE;
                    RELAY_IDLE
                }
                Err(error) => {
                    tracing::warn!(%error, retry_in_ms = backoff.as_millis(), "Outbox relay could not publish; the messages wait.");
                    let pause = backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    pause
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(pause) => {}
                // Something was committed for the relay just now (an AI request waits on it).
                () = wake.notified(), if !pause.is_zero() && backoff == RELAY_IDLE => {}
            }
        }
    })
}

/// Keeps `queue_depth` current (every 5 s) until `shutdown`.
pub fn spawn_depth_gauges(
    broker: Arc<confab_adapters::metered_broker::MeteredBroker>,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => broker.record_depths(&confab_core::ports::broker::queues::ALL).await,
            }
        }
    })
}

/// Receives from `queue` (up to `batch` at a time) until `shutdown` and hands each batch
/// to `handle`, which settles every delivery in it (ack or nack); a queue that cannot be
/// reached is retried each second.
///
/// `linger`: after a batch that was not full, how long to let the next one gather before
/// receiving again. A delivery to an idle consumer is handled at once; under a steady flow,
/// deliveries go in batches, each paying the queue's receive and settle once.
pub(crate) fn spawn_consumer<F, Fut>(
    state: crate::state::AppState,
    queue: &'static str,
    batch: u32,
    linger: Duration,
    shutdown: CancellationToken,
    handle: F,
) -> tokio::task::JoinHandle<()>
where
    F: Fn(crate::state::AppState, Vec<Delivery>) -> Fut + Send + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    tokio::spawn(async move {
        loop {
            let received = tokio::select! {
                () = shutdown.cancelled() => return,
                received = state.broker.receive(queue, batch, Duration::from_secs(1)) => received,
            };
            match received {
                Ok(deliveries) if deliveries.is_empty() => {}
                Ok(deliveries) => {
                    let full = deliveries.len() >= batch as usize;
                    if let Err(error) = handle(state.clone(), deliveries).await {
                        tracing::warn!(
                            queue,
                            error = format!("{error:#}"),
                            "Deliveries were not handled; they will be retried."
                        );
                    }
                    if !full && !linger.is_zero() {
                        tokio::select! {
                            () = shutdown.cancelled() => return,
                            () = tokio::time::sleep(linger) => {}
                        }
                    }
                }
                Err(error) => {
                    tracing::warn!(queue, %error, "Cannot reach the queue; retrying.");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
    })
}

/// Consumes the `mail` queue until `shutdown`: each message rendered, sent once, acked; a
/// failure nacked (retried with backoff, then dead-lettered).
pub fn spawn_mail_worker(
    state: crate::state::AppState,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    use confab_core::ports::broker::queues::MAIL;
    spawn_consumer(
        state,
        MAIL,
        8,
        Duration::ZERO,
        shutdown,
        |state, deliveries| async move {
            // Each mail on its own: one that cannot be settled does not hold up the others.
            for delivery in deliveries {
                let settled = crate::mail::deliver(
                    &*state.store,
                    &*state.broker,
                    &*state.mailer,
                    &state.templates,
                    &delivery,
                )
                .await;
                if let Err(error) = settled {
                    tracing::warn!(
                        error = format!("{error:#}"),
                        "Mail worker could not settle a delivery."
                    );
                }
            }
            Ok(())
        },
    )
}

/// How long the `events` worker lets a batch gather under a steady flow (one
/// `message.created` per chat message): at 2,000 messages/s, batches of ~100 instead of a
/// receive and an ack per commit. Nothing waiting on an event is in a hurry: digests go out
/// after minutes, an `@assistant` answer starts this much later at most (a lone event is
/// received at once). Each batch is a burst of work beside delivery and each has a fixed
/// cost (claim, members, ack): at 2k msg/s, 20 ms cost ~1 µs more per delivery than 50 ms,
/// and 100 ms put the chat p99 at 3 ms (BENCHMARKS.md).
const EVENTS_LINGER: Duration = Duration::from_millis(50);

/// Consumes the `events` queue until `shutdown`, a batch at a time: the `message.created`
/// events of a batch are grouped by chat and each chat's offline digest is worked out once
/// (`ChatService::offline_digests`, presence and members read once per batch) and its mails queued; the
/// batch is then acknowledged at once, except the events of a chat whose digest failed,
/// which are retried. `media.deleted` and `user.deleted` delete the objects they name
/// (`delete_media`). Other kinds have no consumer yet and are acknowledged.
///
/// Effect-once comes from the digest window the cache claims (one mail per member and chat
/// per 15 minutes), not from processed marks: a redelivered event finds its window claimed.
/// A failure between the claim and the queued mail loses that mail (at most once); it never
/// sends two.
pub fn spawn_events_worker(
    state: crate::state::AppState,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    use confab_core::ports::broker::queues::EVENTS;
    spawn_consumer(
        state,
        EVENTS,
        256,
        EVENTS_LINGER,
        shutdown,
        |state, deliveries| async move {
            crate::ai::forward_mentions(&state, &deliveries).await?;
            let (deliveries, mut deleted) = delete_media(&state, deliveries).await?;
            let failed = digest_mails(&state, &deliveries).await;
            if failed.is_empty() {
                deleted.extend(deliveries);
                state.broker.ack_all(&deleted).await?;
                return Ok(());
            }
            let (retry, mut done): (Vec<Delivery>, Vec<Delivery>) = deliveries
                .into_iter()
                .partition(|d| chat_of(d).is_some_and(|chat| failed.contains_key(&chat)));
            done.extend(deleted);
            state.broker.ack_all(&done).await?;
            for delivery in &retry {
                let error = chat_of(delivery)
                    .and_then(|chat| failed.get(&chat))
                    .map_or("digest failed", String::as_str);
                state.broker.nack(delivery, error).await?;
            }
            Ok(())
        },
    )
}

/// Deletes the objects of the batch's `media.deleted` / `user.deleted` events (a missing one
/// is fine, so a redelivery is harmless); an event whose objects could not all be deleted is
/// nacked (retried with backoff). Returns the other deliveries, and the handled ones to ack.
async fn delete_media(
    state: &crate::state::AppState,
    deliveries: Vec<Delivery>,
) -> anyhow::Result<(Vec<Delivery>, Vec<Delivery>)> {
    use confab_core::services::media::deletes_media;
    let mut rest = Vec::with_capacity(deliveries.len());
    let mut deleted = Vec::new();
    for delivery in deliveries {
        let envelope = &delivery.envelope;
        if !deletes_media(&envelope.kind) {
            rest.push(delivery);
            continue;
        }
        match state
            .media
            .on_event(&envelope.kind, &envelope.payload)
            .await
        {
            Ok(()) => deleted.push(delivery),
            Err(error) => state.broker.nack(&delivery, &error.to_string()).await?,
        }
    }
    Ok((rest, deleted))
}

/// The chat a `message.created` event is about.
fn chat_of(delivery: &Delivery) -> Option<confab_core::domain::ChatId> {
    (delivery.envelope.kind == "message.created")
        .then(|| serde_json::from_value(delivery.envelope.payload["chatId"].clone()).ok())
        .flatten()
}

/// Queues the digest mails of every chat in the batch; the chats whose digest failed, with
/// why.
async fn digest_mails(
    state: &crate::state::AppState,
    deliveries: &[Delivery],
) -> HashMap<confab_core::domain::ChatId, String> {
    use confab_core::domain::{ChatId, UserId};
    let mut chats: HashMap<ChatId, Vec<UserId>> = HashMap::new();
    for delivery in deliveries {
        // A malformed event is acknowledged with the rest: there is nothing to do for it.
        let Some(chat) = chat_of(delivery) else {
            continue;
        };
        let senders = chats.entry(chat).or_default();
        let sender = &delivery.envelope.payload["senderId"];
        if let Ok(sender) = serde_json::from_value::<UserId>(sender.clone()) {
            senders.push(sender);
        }
    }
    let mut failed = HashMap::new();
    if chats.is_empty() {
        return failed;
    }
    let online = state.chats.presence().online().await;
    let digests = match state.chats.offline_digests(&chats, &online).await {
        Ok(digests) => digests,
        Err(error) => {
            let error = error.to_string();
            return chats
                .into_keys()
                .map(|chat| (chat, error.clone()))
                .collect();
        }
    };
    for (chat, mails) in digests {
        let queued = async {
            for mail in mails? {
                state
                    .store
                    .enqueue(&mail)
                    .await
                    .map_err(confab_core::services::chats::ChatError::from)?;
            }
            Ok::<(), confab_core::services::chats::ChatError>(())
        };
        if let Err(error) = queued.await {
            failed.insert(chat, error.to_string());
        }
    }
    failed
}
