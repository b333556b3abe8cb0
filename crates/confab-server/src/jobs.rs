//! Scheduled jobs (SPEC §5): each runs once per period across every node sharing the
//! database, not once per node.
//!
//! A run is claimed by recording a processed-event id derived from the job's name and period
//! number (`Store::mark_processed`, unique in the database): of all nodes that try, exactly
//! one succeeds and runs it. A node that dies after claiming skips that period's run; the
//! jobs are idempotent purges, so the next period catches up.

use std::time::Duration;

use confab_core::domain::{EventId, Timestamp, now};
use confab_core::ports::store::{Store, StoreError};
use confab_core::services::auth::crypto::token_hash;
use tokio_util::sync::CancellationToken;

use crate::state::AppState;

/// A job and how often it runs.
#[derive(Debug, Clone, Copy)]
pub struct Job {
    pub name: &'static str,
    pub period: Duration,
}

/// Purges expired refresh-token families, one-time tokens and published outbox rows.
pub const PURGE_EXPIRED_TOKENS: Job = Job {
    name: "purge_expired_tokens",
    period: Duration::from_hours(1),
};

/// Purges AI sessions (with their messages) and generation jobs last updated more than
/// `ai.retention_days` ago (SPEC §5).
pub const PURGE_AI_HISTORY: Job = Job {
    name: "purge_ai_history",
    period: Duration::from_hours(24),
};

pub const ALL: [Job; 2] = [PURGE_EXPIRED_TOKENS, PURGE_AI_HISTORY];

/// The id of `job`'s run in the period containing `at`: the same on every node.
fn run_id(job: &Job, at: Timestamp) -> EventId {
    let period = i64::try_from(job.period.as_secs().max(1)).unwrap_or(i64::MAX);
    let slot = at.timestamp().div_euclid(period);
    let digest = token_hash(&format!("confab-job:{}:{slot}", job.name));
    let bits = u128::from_str_radix(&digest[..32], 16).expect("a SHA-256 in hex");
    EventId(uuid::Uuid::from_u128(bits))
}

/// Claims `job`'s run for the period containing `at`: true for exactly one caller.
pub async fn claim(store: &dyn Store, job: &Job, at: Timestamp) -> Result<bool, StoreError> {
    let consumer = format!("job:{}", job.name);
    match store
        .mark_processed(&consumer, run_id(job, at), now())
        .await
    {
        Ok(()) => Ok(true),
        Err(StoreError::Conflict(_)) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Runs every job whose run for the period containing `at` no node has claimed yet; returns
/// the names of those this call ran.
pub async fn run_due(state: &AppState, at: Timestamp) -> Vec<&'static str> {
    let mut ran = Vec::new();
    for job in ALL {
        match claim(&*state.store, &job, at).await {
            Ok(true) => {}
            Ok(false) => continue,
            Err(error) => {
                tracing::warn!(job = job.name, %error, "Cannot claim a scheduled job; trying next round.");
                continue;
            }
        }
        match job.name {
            "purge_expired_tokens" => match state.auth.purge_expired().await {
                Ok(purged) => tracing::info!(
                    job = job.name,
                    families = purged.families,
                    tokens = purged.tokens,
                    outbox = purged.outbox,
                    "Purged expired tokens and published outbox rows."
                ),
                Err(error) => tracing::warn!(job = job.name, %error, "Scheduled job failed."),
            },
            "purge_ai_history" => {
                let days = i64::from(state.config.ai.retention_days);
                match state
                    .store
                    .purge_ai_history(at - chrono::Duration::days(days))
                    .await
                {
                    Ok((sessions, generations)) => tracing::info!(
                        job = job.name,
                        sessions,
                        generations,
                        "Purged AI history past its retention."
                    ),
                    Err(error) => tracing::warn!(job = job.name, %error, "Scheduled job failed."),
                }
            }
            other => tracing::error!(job = other, "A scheduled job has no runner."),
        }
        ran.push(job.name);
    }
    ran
}

/// Checks for due jobs every minute until `shutdown`.
pub fn spawn_scheduler(
    state: AppState,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_mins(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => { run_due(&state, now()).await; }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_id_is_the_same_within_a_period_and_differs_across_periods() {
        let at = chrono::DateTime::from_timestamp(7_200, 0).unwrap();
        let same_hour = chrono::DateTime::from_timestamp(7_200 + 3_599, 0).unwrap();
        let next_hour = chrono::DateTime::from_timestamp(7_200 + 3_600, 0).unwrap();
        let job = PURGE_EXPIRED_TOKENS;
        assert_eq!(run_id(&job, at), run_id(&job, same_hour));
        assert_ne!(run_id(&job, at), run_id(&job, next_hour));
    }
}
