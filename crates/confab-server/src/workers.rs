//! Background work: consume → call a service → ack, and the outbox relay.

use std::sync::Arc;
use std::time::Duration;

use confab_core::ports::broker::Broker;
use confab_core::ports::store::Store;
use confab_core::services::delivery::relay_outbox;
use tokio_util::sync::CancellationToken;

/// How many outbox rows one relay round moves.
const RELAY_BATCH: u32 = 100;
/// How often an idle relay looks for new rows.
const RELAY_IDLE: Duration = Duration::from_millis(200);

/// Moves committed outbox rows to the broker until `shutdown`. While the broker is down the
/// rows wait (backing off up to 5 s between tries) and nothing is lost.
pub fn spawn_outbox_relay(
    store: Arc<dyn Store>,
    broker: Arc<dyn Broker>,
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

/// Receives from `queue` (up to `batch` at a time) until `shutdown` and hands each delivery
/// to `handle`, which settles it (ack or nack); a queue that cannot be reached is retried
/// each second.
fn spawn_consumer<F, Fut>(
    state: crate::state::AppState,
    queue: &'static str,
    batch: u32,
    shutdown: CancellationToken,
    handle: F,
) -> tokio::task::JoinHandle<()>
where
    F: Fn(crate::state::AppState, confab_core::ports::broker::Delivery) -> Fut + Send + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    tokio::spawn(async move {
        loop {
            let received = tokio::select! {
                () = shutdown.cancelled() => return,
                received = state.broker.receive(queue, batch, Duration::from_secs(1)) => received,
            };
            match received {
                Ok(deliveries) => {
                    for delivery in deliveries {
                        let kind = delivery.envelope.kind.clone();
                        if let Err(error) = handle(state.clone(), delivery).await {
                            tracing::warn!(
                                queue,
                                kind,
                                error = format!("{error:#}"),
                                "A delivery was not handled; it will be retried."
                            );
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
    spawn_consumer(state, MAIL, 8, shutdown, |state, delivery| async move {
        crate::mail::deliver(
            &*state.store,
            &*state.broker,
            &*state.mailer,
            &state.templates,
            &delivery,
        )
        .await
        .map(drop)
    })
}

/// The consumer name under which handled `events` are recorded (idempotency).
pub const EVENTS_CONSUMER: &str = "events";

/// Consumes the `events` queue until `shutdown`: `message.created` queues the offline digest
/// mails (each event once: the mails and the processed mark commit together); other kinds
/// have no consumer yet and are acknowledged.
pub fn spawn_events_worker(
    state: crate::state::AppState,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    use confab_core::ports::broker::queues::EVENTS;
    spawn_consumer(state, EVENTS, 32, shutdown, |state, delivery| async move {
        handle_event(&state, &delivery).await
    })
}

async fn handle_event(
    state: &crate::state::AppState,
    delivery: &confab_core::ports::broker::Delivery,
) -> anyhow::Result<()> {
    use confab_core::domain::{ChatId, UserId};
    use confab_core::services::delivery::handle_once;
    if delivery.envelope.kind != "message.created" {
        state.broker.ack(delivery).await?;
        return Ok(());
    }
    let payload = &delivery.envelope.payload;
    let chat = serde_json::from_value::<ChatId>(payload["chatId"].clone());
    let sender = serde_json::from_value::<Option<UserId>>(payload["senderId"].clone())
        .ok()
        .flatten();
    let Ok(chat) = chat else {
        state
            .broker
            .nack(delivery, "message.created without a chatId")
            .await?;
        return Ok(());
    };
    let mails = match state.chats.offline_digest(chat, sender).await {
        Ok(mails) => mails,
        Err(error) => {
            state.broker.nack(delivery, &error.to_string()).await?;
            return Err(error.into());
        }
    };
    handle_once(
        &*state.store,
        &*state.broker,
        EVENTS_CONSUMER,
        delivery,
        Box::new(move |tx| {
            Box::pin(async move {
                for mail in &mails {
                    tx.enqueue(mail).await?;
                }
                Ok(())
            })
        }),
    )
    .await?;
    Ok(())
}
