//! The group-commit writer: one task per node appends every message sent meanwhile in one
//! transaction ([`Store::append_messages`]), then answers each sender. While a commit is in
//! flight, new messages queue up and go together in the next one, so the cost of a commit is
//! shared by everyone who waited for it: under load, batches grow and throughput follows;
//! alone, a message is committed at once (no timer, no added latency).

use std::sync::{Arc, OnceLock};

use tokio::sync::{mpsc, oneshot};

use crate::domain::{ChatKind, Message};
use crate::ports::store::{Append, Appended, Store, StoreError};

/// The messages one commit stored, in commit order, with their chats' kinds.
pub type Committed = Vec<(Message, ChatKind)>;
type Subscriber = Arc<OnceLock<mpsc::UnboundedSender<Committed>>>;

/// The most messages in one transaction.
pub const MAX_BATCH: usize = 512;
/// A commit this recent means traffic: the next batch may wait to gather more.
const BUSY_WITHIN: std::time::Duration = std::time::Duration::from_millis(20);
/// Messages waiting for the writer before senders wait for room (backpressure).
const QUEUE: usize = 16 * MAX_BATCH;

type Reply = oneshot::Sender<Result<Appended, StoreError>>;

#[derive(Clone)]
pub struct MessageWriter {
    jobs: mpsc::Sender<(Append, Reply)>,
    committed: Subscriber,
}

impl MessageWriter {
    /// Starts the writer task (it ends when every handle is dropped). Needs a Tokio runtime.
    /// `wait`: how long a batch may wait for more messages after its first while messages
    /// are flowing (zero: never wait). A message on a quiet server is committed at once.
    pub fn start(store: Arc<dyn Store>, wait: std::time::Duration) -> Self {
        let (jobs, queue) = mpsc::channel(QUEUE);
        let committed = Subscriber::default();
        tokio::spawn(run(store, queue, committed.clone(), wait));
        Self { jobs, committed }
    }

    /// Every commit's new messages from now on, in commit order (one subscriber: whoever
    /// broadcasts them; a second call gets `None`). Broadcasting from this one stream, rather
    /// than from each sender's task, gives every member of a room the same order.
    pub fn subscribe(&self) -> Option<mpsc::UnboundedReceiver<Committed>> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.committed.set(tx).ok().map(|()| rx)
    }

    /// Appends one message: returns once its batch is committed (or failed).
    pub async fn append(&self, append: Append) -> Result<Appended, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send((append, reply))
            .await
            .map_err(|_| StoreError::Other("the message writer has stopped".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Other("the message writer has stopped".into()))?
    }
}

async fn run(
    store: Arc<dyn Store>,
    mut queue: mpsc::Receiver<(Append, Reply)>,
    committed: Subscriber,
    wait: std::time::Duration,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut last_commit: Option<tokio::time::Instant> = None;
    while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
        // Gather only under traffic (a commit a moment ago): a message on a quiet server is
        // committed at once.
        let busy = last_commit.is_some_and(|at| at.elapsed() < BUSY_WITHIN);
        if busy && !wait.is_zero() {
            let deadline = tokio::time::Instant::now() + wait;
            while batch.len() < MAX_BATCH {
                let room = MAX_BATCH - batch.len();
                let more = queue.recv_many(&mut batch, room);
                match tokio::time::timeout_at(deadline, more).await {
                    Ok(n) if n > 0 => {}
                    _ => break,
                }
            }
        }
        let (appends, replies): (Vec<Append>, Vec<Reply>) = batch.drain(..).unzip();
        let answers = commit(&*store, &appends).await;
        last_commit = Some(tokio::time::Instant::now());
        let mut stored = Committed::new();
        for ((reply, answer), append) in replies.into_iter().zip(answers).zip(appends) {
            if let Ok(Appended::Stored(kind)) = &answer {
                stored.push((append.message, *kind));
            }
            let _ = reply.send(answer);
        }
        if let Some(subscriber) = committed.get()
            && !stored.is_empty()
        {
            let _ = subscriber.send(stored);
        }
    }
}

/// Commits a batch: one answer per message. A batch that fails for a reason other than an
/// outage is retried one message at a time, so one bad message cannot fail the others.
async fn commit(store: &dyn Store, appends: &[Append]) -> Vec<Result<Appended, StoreError>> {
    let n = appends.len();
    match store.append_messages(appends).await {
        Ok(answers) => answers.into_iter().map(Ok).collect(),
        Err(StoreError::Unavailable(e)) => {
            let message = e.to_string();
            (0..n)
                .map(|_| Err(StoreError::Unavailable(message.clone().into())))
                .collect()
        }
        Err(e) if n == 1 => vec![Err(e)],
        // Each sender gets its own message's answer.
        Err(_) => {
            let mut answers = Vec::with_capacity(n);
            for append in appends {
                let answer = store
                    .append_messages(std::slice::from_ref(append))
                    .await
                    .and_then(|mut a| {
                        a.pop()
                            .ok_or_else(|| StoreError::Other("no answer from the store".into()))
                    });
                answers.push(answer);
            }
            answers
        }
    }
}
