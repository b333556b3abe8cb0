//! Who is online (SPEC §4): a user with a socket open (touched every minute while it is) or
//! active within the window (5 minutes by default), as the cache's `online_users` records it.
//! One reader with one window for profiles, digest mails and `presence` events.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use crate::domain::{Timestamp, UserId, now};
use crate::ports::cache::{Cache, keys};

#[derive(Clone)]
pub struct Presence {
    cache: Arc<dyn Cache>,
    window: Duration,
}

impl Presence {
    pub fn new(cache: Arc<dyn Cache>, window: Duration) -> Self {
        Self { cache, window }
    }

    /// How long a user stays online after their last activity.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// Users online now; empty when the cache cannot tell.
    pub async fn online(&self) -> HashSet<UserId> {
        let window = chrono::Duration::from_std(self.window).unwrap_or_default();
        self.active_since(now() - window).await
    }

    /// Users active at or after `since`; empty when the cache cannot tell.
    pub async fn active_since(&self, since: Timestamp) -> HashSet<UserId> {
        self.cache
            .presence_since(keys::ONLINE_USERS, since.timestamp_millis())
            .await
            .map(|seen| {
                seen.into_iter()
                    .filter_map(|p| p.member.parse::<uuid::Uuid>().ok().map(UserId))
                    .collect()
            })
            .unwrap_or_default()
    }
}
