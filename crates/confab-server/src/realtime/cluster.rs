//! Rooms and broadcasts across nodes: socketioxide's Redis adapter over our own `Driver`,
//! which speaks through the `Cache` port's pub/sub. With Redis configured every node hears
//! every other; with the in-process cache a node hears only itself (one node).
//!
//! Why not the adapter's own `redis` driver: it neither reconnects nor resubscribes after a
//! Redis restart (DEPENDENCIES.md), so cross-node delivery would stop silently. The cache's
//! Redis connection is a managed one whose monitor re-subscribes every channel when Redis
//! is back, and the subscriptions here are streams from it, so they survive the restart.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use confab_core::ports::cache::{Cache, CacheError};
use futures_util::StreamExt;
use socketioxide_redis::drivers::{ChanItem, Driver, MessageStream};
use tokio::sync::mpsc;

/// The adapter type every socket and handler of this server uses.
pub type Adapter =
    socketioxide_redis::CustomRedisAdapter<socketioxide::adapter::Emitter, CacheDriver>;

#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct DriverError(#[from] CacheError);

/// A socketioxide-redis `Driver` over the `Cache` port.
#[derive(Clone)]
pub struct CacheDriver {
    cache: Arc<dyn Cache>,
    /// Whether other nodes can hear this one (a shared cache). With the in-process cache a
    /// node is alone: publishing would only hand every broadcast back to itself to decode
    /// and drop, which cost more CPU per delivery than the delivery.
    clustered: bool,
    /// The forwarding task of each subscribed channel (aborted on unsubscribe).
    forwards: Arc<Mutex<HashMap<String, tokio::task::AbortHandle>>>,
}

impl CacheDriver {
    pub fn new(cache: Arc<dyn Cache>, clustered: bool) -> Self {
        Self {
            cache,
            clustered,
            forwards: Arc::default(),
        }
    }
}

impl Driver for CacheDriver {
    type Error = DriverError;

    async fn publish(&self, chan: String, val: Vec<u8>) -> Result<(), Self::Error> {
        if !self.clustered {
            return Ok(());
        }
        Ok(self.cache.publish(&chan, &val).await?)
    }

    async fn subscribe(
        &self,
        chan: String,
        size: usize,
    ) -> Result<MessageStream<ChanItem>, Self::Error> {
        let mut messages = self.cache.subscribe(&chan).await?;
        let (tx, rx) = mpsc::channel(size.max(1));
        let name = chan.clone();
        let forward = tokio::spawn(async move {
            while let Some(message) = messages.next().await {
                if tx.send((name.clone(), message)).await.is_err() {
                    return;
                }
            }
        });
        let previous = self
            .forwards
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(chan, forward.abort_handle());
        if let Some(previous) = previous {
            previous.abort();
        }
        Ok(MessageStream::new(rx))
    }

    async fn unsubscribe(&self, chan: String) -> Result<(), Self::Error> {
        let forward = self
            .forwards
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&chan);
        if let Some(forward) = forward {
            forward.abort();
        }
        Ok(())
    }

    async fn num_serv(&self, chan: &str) -> Result<u16, Self::Error> {
        let count = self.cache.subscribers(chan).await?;
        Ok(u16::try_from(count).unwrap_or(u16::MAX))
    }
}
