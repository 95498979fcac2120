//! Records handed from a Rust record source (a subscription or a group
//! member) to Python, a batch at a time.
//!
//! Two ways in: [`Reader::take`] returns what is buffered already, at once
//! and on the event loop's thread (the common case under load: no future,
//! no wake-up); [`Reader::next_batch`] waits on the runtime for the first
//! record. Neither loses records: a `next_batch` whose future was cancelled
//! after it took records puts them back (the stash), and the next call
//! returns them first.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex as StdMutex};

use covet_client::{Error, GroupConsumer, GroupRecord, Subscription};
use futures::FutureExt;
use pyo3::intern;
use pyo3::prelude::*;
use tokio::sync::{watch, Mutex};

use crate::bridge::{is_done, runtime, settle, Bridge};
use crate::{GroupMessage, Message};

/// Where records come from.
pub(crate) trait Source: Send + 'static {
    type Record: Send + 'static;
    type Message: for<'py> IntoPyObject<'py> + Send + 'static;
    /// The next record; `None` once the source ended for good.
    fn next(&mut self) -> impl Future<Output = Option<Result<Self::Record, Error>>> + Send;
    fn message(record: Self::Record) -> Self::Message;
}

impl Source for Subscription {
    type Record = covet_client::ConsumedRecord;
    type Message = Message;

    fn next(&mut self) -> impl Future<Output = Option<Result<Self::Record, Error>>> + Send {
        Subscription::next(self)
    }

    fn message(record: Self::Record) -> Message {
        Message { record }
    }
}

impl Source for GroupConsumer {
    type Record = GroupRecord;
    type Message = GroupMessage;

    /// A partition whose session ended (taken over, reset) is not an error
    /// for the application: the membership hands out the group's current
    /// assignment, so such errors are passed over.
    async fn next(&mut self) -> Option<Result<GroupRecord, Error>> {
        loop {
            match GroupConsumer::next(self).await? {
                Ok(r) => return Some(Ok(r)),
                Err(_) => continue,
            }
        }
    }

    fn message(record: GroupRecord) -> GroupMessage {
        GroupMessage::new(record)
    }
}

struct Shared<S: Source> {
    /// `None` once the source ended or was closed.
    source: Mutex<Option<S>>,
    /// Records taken off the source and not handed out (their future was
    /// cancelled), oldest first: handed out before anything else.
    stash: StdMutex<VecDeque<S::Record>>,
    /// A failure met after some records of a batch were taken: raised by
    /// the next call, after those records were handed out.
    error: StdMutex<Option<Error>>,
    /// Set by `interrupt`: no more records are handed out, and a waiting
    /// `next_batch` returns an empty batch.
    stopped: watch::Sender<bool>,
}

pub(crate) struct Reader<S: Source> {
    shared: Arc<Shared<S>>,
    bridge: Bridge,
}

/// How a wait for records ended.
enum Waited {
    /// Records are in the stash.
    Ready,
    /// The source ended, or the reader was interrupted.
    Over,
    Failed(Error),
}

impl<S: Source> Reader<S> {
    pub(crate) fn new(source: S, bridge: Bridge) -> Self {
        Reader {
            shared: Arc::new(Shared {
                source: Mutex::new(Some(source)),
                stash: StdMutex::new(VecDeque::new()),
                error: StdMutex::new(None),
                stopped: watch::Sender::new(false),
            }),
            bridge,
        }
    }

    /// Up to `max` records that are ready now, without waiting; empty if
    /// none are (or another call is waiting for the source).
    pub(crate) fn take(&self, max: usize) -> PyResult<Vec<S::Message>> {
        let shared = &self.shared;
        if let Some(e) = lock(&shared.error).take() {
            return Err(crate::to_py_err(e));
        }
        let mut out: Vec<S::Record> = Vec::new();
        if *shared.stopped.borrow() {
            return Ok(Vec::new());
        }
        unstash(shared, &mut out, max);
        if out.len() < max {
            if let Ok(mut source) = shared.source.try_lock() {
                if let Some(source) = source.as_mut() {
                    // Under the GIL: releasing it would cost more than the
                    // few microseconds of taking buffered records.
                    let _guard = runtime().enter();
                    fill(source, &mut out, max, &shared.error);
                }
            }
        }
        Ok(out.into_iter().map(S::message).collect())
    }

    /// A future of the next records, at least one and at most `max`,
    /// waiting for the first; an empty list once the source ended or the
    /// reader was interrupted.
    pub(crate) fn next_batch<'py>(
        &self,
        py: Python<'py>,
        max: usize,
    ) -> PyResult<Bound<'py, PyAny>> {
        let future = self.bridge.future(py)?;
        let unbound = future.clone().unbind();
        spawn_wait(
            py,
            self.shared.clone(),
            self.bridge.clone(),
            unbound,
            max.max(1),
        )?;
        Ok(future)
    }

    /// Hands out no more records: a waiting `next_batch` returns an empty
    /// list, and so does every later call. The source stays open, so what
    /// was handed out can still be settled.
    pub(crate) fn interrupt(&self) {
        self.shared.stopped.send_replace(true);
    }

    /// Interrupts, then takes the source out (to be closed); `None` if it
    /// was taken already or has ended.
    pub(crate) async fn take_source(shared: &ReaderHandle<S>) -> Option<S> {
        shared.0.stopped.send_replace(true);
        shared.0.source.lock().await.take()
    }

    /// A handle for closing from the runtime.
    pub(crate) fn handle(&self) -> ReaderHandle<S> {
        ReaderHandle(self.shared.clone())
    }
}

/// The reader's state, to close it from a task on the runtime.
pub(crate) struct ReaderHandle<S: Source>(Arc<Shared<S>>);

fn lock<T>(m: &StdMutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Moves stashed records into `out`, up to `max`.
fn unstash<S: Source>(shared: &Shared<S>, out: &mut Vec<S::Record>, max: usize) {
    let mut stash = lock(&shared.stash);
    while out.len() < max {
        match stash.pop_front() {
            Some(r) => out.push(r),
            None => break,
        }
    }
}

/// Takes what the source has ready, without waiting, up to `max` in `out`. A
/// failure after some records is kept for the next call. `S::next` is
/// cancel-safe, so dropping a pending one loses nothing.
fn fill<S: Source>(
    source: &mut S,
    out: &mut Vec<S::Record>,
    max: usize,
    error: &StdMutex<Option<Error>>,
) {
    while out.len() < max {
        match source.next().now_or_never() {
            Some(Some(Ok(r))) => out.push(r),
            Some(Some(Err(e))) => {
                *lock(error) = Some(e);
                break;
            }
            Some(None) | None => break,
        }
    }
}

/// Waits on the runtime for records, then resolves `future` on the event
/// loop with a batch of at most `max` taken from the stash.
///
/// Records the wait takes go into the stash before it lets go of the
/// source, and only the event loop's thread takes them out: a wait whose
/// future was cancelled leaves them there, and whatever call comes next
/// (a `take`, or a wait that finds the stash filled) hands them out first.
fn spawn_wait<S: Source>(
    py: Python<'_>,
    shared: Arc<Shared<S>>,
    bridge: Bridge,
    future: Py<PyAny>,
    max: usize,
) -> PyResult<()> {
    let on_done = future.bind(py).getattr(intern!(py, "add_done_callback"))?;
    let task = runtime().spawn(async move {
        let waited = wait(&shared, max).await;
        let again = bridge.clone();
        bridge.finish_later(
            future,
            Box::new(move |py, f| {
                if is_done(f) {
                    // Cancelled: records stay in the stash for the next call.
                    if let Waited::Failed(e) = waited {
                        *lock(&shared.error) = Some(e);
                    }
                    return;
                }
                let records = match waited {
                    Waited::Failed(e) => return settle::<Vec<S::Message>>(py, f, Err(e)),
                    Waited::Over => Vec::new(),
                    Waited::Ready => {
                        let mut records = Vec::new();
                        unstash(&shared, &mut records, max);
                        if records.is_empty() {
                            // Another call took them first: wait again.
                            let unbound = f.clone().unbind();
                            if let Err(e) = spawn_wait(py, shared, again, unbound, max) {
                                let _ = f.call_method1(
                                    intern!(py, "set_exception"),
                                    (e.into_value(py),),
                                );
                            }
                            return;
                        }
                        records
                    }
                };
                settle(
                    py,
                    f,
                    Ok(records.into_iter().map(S::message).collect::<Vec<_>>()),
                );
            }),
        );
    });
    // A cancelled future stops its wait, so that a caller polling with a
    // timeout does not leave a waiting task behind per attempt. The wait
    // is cancel-safe: records it took are in the stash already.
    on_done.call1((AbortOnCancel(task.abort_handle()),))?;
    Ok(())
}

/// A future's done-callback that aborts its wait if it was cancelled.
#[pyclass(frozen, module = "covet._covet")]
struct AbortOnCancel(tokio::task::AbortHandle);

#[pymethods]
impl AbortOnCancel {
    fn __call__(&self, future: &Bound<'_, PyAny>) -> PyResult<()> {
        if future
            .call_method0(intern!(future.py(), "cancelled"))?
            .is_truthy()?
        {
            self.0.abort();
        }
        Ok(())
    }
}

/// Waits for the first record (or the end, or an interrupt), then moves
/// what else is ready into the stash too, up to `max` in all.
async fn wait<S: Source>(shared: &Shared<S>, max: usize) -> Waited {
    let mut stopped = shared.stopped.subscribe();
    let mut guard = tokio::select! {
        g = shared.source.lock() => g,
        _ = stopped.wait_for(|s| *s) => return Waited::Over,
    };
    if *stopped.borrow() {
        return Waited::Over;
    }
    if !lock(&shared.stash).is_empty() {
        return Waited::Ready;
    }
    if let Some(e) = lock(&shared.error).take() {
        return Waited::Failed(e);
    }
    let Some(source) = guard.as_mut() else {
        return Waited::Over;
    };
    let first = tokio::select! {
        next = source.next() => next,
        _ = stopped.wait_for(|s| *s) => return Waited::Over,
    };
    let mut taken = match first {
        None => {
            *guard = None;
            return Waited::Over;
        }
        Some(Err(e)) => return Waited::Failed(e),
        Some(Ok(r)) => vec![r],
    };
    fill(source, &mut taken, max, &shared.error);
    lock(&shared.stash).extend(taken);
    Waited::Ready
}
