//! Background threads that must not take CPU from message delivery, and how low they go.

/// How far below the threads that deliver messages a background thread runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Background {
    /// Only CPU nobody else wants (`SCHED_IDLE`): work that may wait indefinitely under load.
    Idle,
    /// The lowest normal priority (`SCHED_BATCH`, nice 19): work that must still progress
    /// under load, without preempting anyone.
    Batch,
}

/// Lowers the calling thread to `level`. Elsewhere than on Linux it keeps its priority.
#[cfg(target_os = "linux")]
pub fn lower_this_thread(level: Background) -> Result<(), impl std::fmt::Debug> {
    use thread_priority::{
        NormalThreadSchedulePolicy, ThreadPriority, ThreadSchedulePolicy,
        set_thread_priority_and_policy, thread_native_id,
    };
    let policy = match level {
        Background::Idle => NormalThreadSchedulePolicy::Idle,
        Background::Batch => NormalThreadSchedulePolicy::Batch,
    };
    set_thread_priority_and_policy(
        thread_native_id(),
        ThreadPriority::Min,
        ThreadSchedulePolicy::Normal(policy),
    )
}

/// Lowers the calling thread to `level`. Elsewhere than on Linux it keeps its priority.
#[cfg(not(target_os = "linux"))]
pub fn lower_this_thread(_level: Background) -> Result<(), impl std::fmt::Debug> {
    Ok::<(), ()>(())
}
