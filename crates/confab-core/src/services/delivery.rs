//! Moving messages: the transactional outbox relay and the idempotent consumer (SPEC §6).

use std::future::Future;
use std::pin::Pin;

use crate::domain::now;
use crate::ports::broker::{Broker, BrokerError, Delivery, Envelope};
use crate::ports::store::{Store, StoreError, StoreTx};

#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

/// Publishes up to `batch` pending outbox entries and marks those published. Returns how
/// many were published. On a broker failure it stops at that entry: it and everything after
/// it stay in the outbox for the next round (nothing is lost, order is kept), and the error
/// is returned.
pub async fn relay_outbox(
    store: &dyn Store,
    broker: &dyn Broker,
    batch: u32,
) -> Result<usize, DeliveryError> {
    let pending = store.pending_outbox(batch).await?;
    let mut published = Vec::with_capacity(pending.len());
    let mut failure = None;
    // Consecutive entries for the same queue go as one batch: order is kept per queue.
    for run in pending.chunk_by(|a, b| a.queue == b.queue) {
        let envelopes: Vec<Envelope> = run.iter().map(Envelope::from).collect();
        match broker.publish_all(&run[0].queue, &envelopes).await {
            Ok(()) => published.extend(run.iter().map(|entry| entry.id)),
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    // A crash between publish and this mark republishes on restart: at-least-once, and
    // consumers are idempotent by envelope id.
    store.mark_published(&published, now()).await?;
    match failure {
        Some(e) => Err(e.into()),
        None => Ok(published.len()),
    }
}

/// What handling one delivery did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// The work ran and committed.
    Done,
    /// This consumer had already handled this envelope: acknowledged without running again.
    Duplicate,
}

/// Work that runs inside the consumer's transaction.
pub type Work<'a> = Box<
    dyn for<'t> FnOnce(
            &'t dyn StoreTx,
        ) -> Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send + 't>>
        + Send
        + 'a,
>;

/// Runs `work` for `delivery` exactly once per `consumer`, however often the broker delivers
/// it: the processed-id mark and the work's writes commit in one transaction, and the
/// delivery is acknowledged after the commit. A failure of the work nacks the delivery (retry,
/// then dead letter) and rolls the writes back.
pub async fn handle_once(
    store: &dyn Store,
    broker: &dyn Broker,
    consumer: &str,
    delivery: &Delivery,
    work: Work<'_>,
) -> Result<Handled, DeliveryError> {
    let tx = store.begin().await?;
    match tx
        .mark_processed(consumer, delivery.envelope.id, now())
        .await
    {
        Ok(()) => {}
        Err(StoreError::Conflict(_)) => {
            drop(tx);
            broker.ack(delivery).await?;
            return Ok(Handled::Duplicate);
        }
        Err(e) => return Err(e.into()),
    }
    if let Err(error) = work(&*tx).await {
        drop(tx);
        broker.nack(delivery, &error.to_string()).await?;
        return Err(error.into());
    }
    tx.commit().await?;
    broker.ack(delivery).await?;
    Ok(Handled::Done)
}
