//! The group-commit writer: one task per node appends every message sent meanwhile in one
//! transaction ([`Store::append_messages`]), then answers each sender. While a commit is in
//! flight, new messages queue up and go together in the next one, so the cost of a commit is
//! shared by everyone who waited for it: under load, batches grow and throughput follows;
//! alone, a message is committed at once (no timer, no added latency). Where the store keeps
//! the order of its calls (SQLite's writer thread), several batches may be in flight, and
//! the store gathers them into one commit ([`GroupCommit::in_flight`]).

use std::sync::{Arc, OnceLock};

use tokio::sync::{mpsc, oneshot};

use crate::domain::{ChatKind, Message};
use crate::ports::store::{Append, Appended, Store, StoreError};

/// The messages one commit stored, in commit order, with their chats' kinds.
pub type Committed = Vec<(Message, ChatKind)>;
type Subscriber = Arc<OnceLock<mpsc::UnboundedSender<Committed>>>;

/// The most messages in one transaction.
pub const MAX_BATCH: usize = 512;
/// A commit this recent means traffic: the next batch may wait to gather more (here, and in
/// a store that gathers batches itself).
pub const BUSY_WITHIN: std::time::Duration = std::time::Duration::from_millis(20);
/// Messages waiting for the writer before senders wait for room (backpressure).
const QUEUE: usize = 16 * MAX_BATCH;

type Reply = oneshot::Sender<Result<Appended, StoreError>>;

/// How the writer groups messages into commits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupCommit {
    /// How long a batch may wait for more messages after its first while messages are
    /// flowing (zero: never wait; Tokio's timer rounds it up to whole milliseconds).
    pub wait: std::time::Duration,
    /// Batches committing at once. More than one only for a store that commits its
    /// `append_messages` calls one after another in the order they were made (SQLite's writer
    /// thread, which then gathers them into one commit itself): the stream of commits then
    /// keeps its order. A store running them as concurrent transactions (PostgreSQL) could
    /// commit a later batch first, so a reader paging `after` the later one's id would skip
    /// the earlier one.
    pub in_flight: usize,
}

#[derive(Clone)]
pub struct MessageWriter {
    jobs: mpsc::Sender<(Append, Reply)>,
    committed: Subscriber,
}

impl MessageWriter {
    /// Starts the writer task (it ends when every handle is dropped). Needs a Tokio runtime.
    /// A message on a quiet server is committed at once.
    pub fn start(store: Arc<dyn Store>, group: GroupCommit) -> Self {
        let (jobs, queue) = mpsc::channel(QUEUE);
        let committed = Subscriber::default();
        tokio::spawn(run(store, queue, committed.clone(), group));
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

/// A batch's messages and each one's answer.
type Answered = (Vec<Append>, Vec<Result<Appended, StoreError>>);

/// A batch on its way to the store: its commit (a task of its own, so that several can be
/// in flight), its senders, and its place among the batches in flight.
struct InFlight {
    commit: tokio::task::JoinHandle<Answered>,
    replies: Vec<Reply>,
    _place: tokio::sync::OwnedSemaphorePermit,
}

/// Gathers batches and starts their commits (up to `group.in_flight` at once); `finish`
/// answers them in the order they started.
async fn run(
    store: Arc<dyn Store>,
    mut queue: mpsc::Receiver<(Append, Reply)>,
    committed: Subscriber,
    group: GroupCommit,
) {
    let places = Arc::new(tokio::sync::Semaphore::new(group.in_flight.max(1)));
    let (started, in_order) = mpsc::unbounded_channel();
    tokio::spawn(finish(in_order, committed));
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut last_batch: Option<tokio::time::Instant> = None;
    loop {
        // A place first: messages arriving meanwhile join this batch.
        let Ok(place) = places.clone().acquire_owned().await else {
            return;
        };
        if queue.recv_many(&mut batch, MAX_BATCH).await == 0 {
            return;
        }
        // Gather only under traffic (a batch a moment ago): a message on a quiet server is
        // committed at once.
        let busy = last_batch.is_some_and(|at| at.elapsed() < BUSY_WITHIN);
        if busy && !group.wait.is_zero() {
            let deadline = tokio::time::Instant::now() + group.wait;
            while batch.len() < MAX_BATCH {
                let room = MAX_BATCH - batch.len();
                let more = queue.recv_many(&mut batch, room);
                match tokio::time::timeout_at(deadline, more).await {
                    Ok(n) if n > 0 => {}
                    _ => break,
                }
            }
        }
        last_batch = Some(tokio::time::Instant::now());
        let (appends, replies): (Vec<Append>, Vec<Reply>) = batch.drain(..).unzip();
        let store = store.clone();
        let task = tokio::spawn(async move {
            let answers = commit(&*store, &appends).await;
            (appends, answers)
        });
        let in_flight = InFlight {
            commit: task,
            replies,
            _place: place,
        };
        if started.send(in_flight).is_err() {
            return;
        }
    }
}

/// Answers each batch's senders and hands its new messages to the subscriber, batch after
/// batch in the order they started (which, see [`GroupCommit::in_flight`], is commit order).
async fn finish(mut in_order: mpsc::UnboundedReceiver<InFlight>, committed: Subscriber) {
    while let Some(batch) = in_order.recv().await {
        let (appends, answers) = match batch.commit.await {
            Ok(done) => done,
            Err(e) => {
                // The commit task panicked: its outcome is unknown, each sender hears so.
                let message = format!("the message writer failed: {e}");
                for reply in batch.replies {
                    let _ = reply.send(Err(StoreError::Other(message.clone().into())));
                }
                continue;
            }
        };
        let mut stored = Committed::new();
        for ((reply, answer), append) in batch.replies.into_iter().zip(answers).zip(appends) {
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
