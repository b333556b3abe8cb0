//! The threads that decode and encode images: off the async runtime, and at the lowest CPU
//! priority the system has (`SCHED_IDLE` on Linux), so an image uses only the CPU that chat
//! delivery leaves and never delays a message (BENCHMARKS.md: with them on the runtime's
//! blocking pool at normal priority, a 12 MP upload tripled delivery p99 on one core). Under
//! a load that leaves no CPU, an upload waits, and fails at its deadline with a 503.

use std::panic::AssertUnwindSafe;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};

use super::MediaError;

type Job = Box<dyn FnOnce() + Send>;

pub struct ImageWorkers {
    jobs: SyncSender<Job>,
}

impl ImageWorkers {
    /// Starts `threads` workers; `queue`: jobs that may wait for one. The threads end when
    /// this is dropped.
    pub fn start(threads: usize, queue: usize) -> Self {
        let (jobs, waiting) = std::sync::mpsc::sync_channel::<Job>(queue);
        let waiting = Arc::new(Mutex::new(waiting));
        for n in 0..threads.max(1) {
            let waiting = waiting.clone();
            let started = std::thread::Builder::new()
                .name(format!("confab-image-{n}"))
                .spawn(move || work(&waiting));
            if let Err(error) = started {
                tracing::error!(%error, "Cannot start an image worker thread.");
            }
        }
        Self { jobs }
    }

    /// Runs `task` on a worker. `TimedOut` (busy) when the queue is full; `Corrupt` when the
    /// task panicked (a decoder's bug on a hostile file).
    pub async fn run<T: Send + 'static>(
        &self,
        task: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, MediaError> {
        let (answer, answered) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = answer.send(task());
        });
        match self.jobs.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                return Err(MediaError::TimedOut);
            }
        }
        answered.await.map_err(|_| MediaError::Corrupt)
    }
}

fn work(waiting: &Mutex<Receiver<Job>>) {
    if let Err(error) = crate::priority::lower_this_thread(crate::priority::Background::Idle) {
        tracing::warn!(?error, "Image workers run at normal priority.");
    }
    loop {
        let next = waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .recv();
        let Ok(job) = next else {
            return;
        };
        // A panicking decoder fails its upload, not the worker.
        if std::panic::catch_unwind(AssertUnwindSafe(job)).is_err() {
            tracing::warn!("An image job panicked.");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_run_and_a_panic_fails_only_its_job() {
        let workers = ImageWorkers::start(1, 4);
        assert_eq!(workers.run(|| 6 * 7).await.unwrap(), 42);
        let panicked = workers.run(|| -> u8 { panic!("a hostile file") }).await;
        assert!(matches!(panicked, Err(MediaError::Corrupt)));
        assert_eq!(workers.run(|| "still here").await.unwrap(), "still here");
    }
}
