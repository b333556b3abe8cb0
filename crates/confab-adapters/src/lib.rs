//! confab's adapters: one module per backend implementation of a `confab_core` port, with its
//! config beside it, and one factory per port that turns the `kind`-tagged config into
//! `Arc<dyn Port>`.

pub mod blob;
pub mod broker;
pub mod cache;
pub mod db_broker;
pub mod fail_soft_cache;
pub mod llm;
pub mod mail;
pub mod memory_cache;
pub mod metered_broker;
pub mod object_blob_store;
pub mod prefixed_broker;
pub mod rabbit_broker;
pub mod redis_cache;
pub mod sql_store;
#[cfg(feature = "testing")]
pub mod testing;

/// Locks a mutex that guards a plain map or flag. A poisoned lock only means another caller
/// panicked mid-update; the data is still usable, so it is taken as it is.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
