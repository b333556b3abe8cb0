//! Background threads that must not take CPU from message delivery, and how low they go.

/// How far below the threads that deliver messages a background thread runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Background {
    /// Only CPU nobody else wants (`SCHED_IDLE`): work that may wait indefinitely under load.
    Idle,
    /// The lowest normal priority (`SCHED_BATCH`, nice 19): work that must still progress
    /// under load, without preempting anyone.
    Batch,
    /// A normal share of the CPU, but its wake-ups never preempt a running thread
    /// (`SCHED_BATCH` at nice 0): a thread that others hand work to many times a second,
    /// which can wait until the thread that handed it over pauses. Woken the usual way, it
    /// took the core at once, and the thread it preempted was switched out and back in
    /// again each time.
    Deferred,
}

/// Lowers the calling thread to `level`. Elsewhere than on Linux it keeps its priority.
#[cfg(target_os = "linux")]
pub fn lower_this_thread(level: Background) -> Result<(), impl std::fmt::Debug> {
    use thread_priority::{
        NormalThreadSchedulePolicy, ThreadPriority, ThreadPriorityOsValue, ThreadSchedulePolicy,
        set_thread_priority_and_policy, thread_native_id,
    };
    let (policy, priority) = match level {
        Background::Idle => (NormalThreadSchedulePolicy::Idle, ThreadPriority::Min),
        Background::Batch => (NormalThreadSchedulePolicy::Batch, ThreadPriority::Min),
        // The OS value of a normal policy is the nice value; the default is 0.
        Background::Deferred => (
            NormalThreadSchedulePolicy::Batch,
            ThreadPriority::Os(ThreadPriorityOsValue::default()),
        ),
    };
    set_thread_priority_and_policy(
        thread_native_id(),
        priority,
        ThreadSchedulePolicy::Normal(policy),
    )
}

/// Lowers the calling thread to `level`. Elsewhere than on Linux it keeps its priority.
#[cfg(not(target_os = "linux"))]
pub fn lower_this_thread(_level: Background) -> Result<(), impl std::fmt::Debug> {
    Ok::<(), ()>(())
}
