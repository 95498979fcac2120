//! The way results travel from tokio back to the asyncio event loop.
//!
//! Every client owns a [`Bridge`]: an eventfd the event loop watches
//! (`loop.add_reader`) and a queue of finished operations. Work that
//! finishes on a tokio thread pushes its outcome onto the queue and writes
//! the eventfd only if the queue was empty, so the event loop wakes once
//! for a burst of completions (the acknowledgement of a batch of a
//! thousand records is one wake-up). The event loop then turns each
//! outcome into Python objects and resolves its `asyncio.Future`, all on
//! its own thread with the GIL it already holds.
//!
//! Nothing on a tokio thread ever takes the GIL: a tokio thread waiting for
//! it behind a busy event loop waits up to the interpreter's switch
//! interval (5 ms), which is what made `loop.call_soon_threadsafe` per
//! result (the usual way) slow under load.

use std::future::Future;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::pin::{pin, Pin};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Wake, Waker};

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::{intern, IntoPyObjectExt};

/// The runtime every client of the process shares: the producer, the
/// subscriptions, heartbeats and timers run on it, never on the event
/// loop's thread. Owned here until [`shutdown`].
static RUNTIME: Mutex<Option<tokio::runtime::Runtime>> = Mutex::new(None);

/// A handle to the shared runtime, started on first use.
pub(crate) fn runtime() -> &'static tokio::runtime::Handle {
    static HANDLE: OnceLock<tokio::runtime::Handle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .thread_name("covet-client")
            .enable_all()
            .build()
            // Without threads there is no client at all; this happens only
            // when the process cannot start threads.
            .expect("starting the covet client runtime");
        let handle = rt.handle().clone();
        *RUNTIME.lock().unwrap_or_else(|e| e.into_inner()) = Some(rt);
        handle
    })
}

/// Stops the runtime's threads; registered with `atexit`, so it runs when
/// the interpreter exits and before it finalizes. A tokio thread still
/// running while the interpreter tears itself down could touch Python
/// objects (dropping one, or waking a loop) after Python stopped being
/// usable: that crashed `python -m covet run` now and then at exit with the
/// first binding. Work still queued is dropped: a client is closed (its
/// records flushed) before the program ends.
#[pyfunction]
pub(crate) fn shutdown(py: Python<'_>) {
    let rt = RUNTIME.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(rt) = rt {
        // Without the GIL: tasks dropped now may need it for a moment.
        py.detach(|| rt.shutdown_timeout(std::time::Duration::from_secs(2)));
    }
}

/// What turns a finished operation into the resolution of its future, run
/// on the event loop's thread. It gets the future, which may have been
/// cancelled in the meantime.
pub(crate) type Finish = Box<dyn FnOnce(Python<'_>, &Bound<'_, PyAny>) + Send>;

struct Shared {
    /// Finished operations the event loop has not seen yet.
    ready: Mutex<Vec<(Py<PyAny>, Finish)>>,
    /// Written when `ready` goes from empty to not empty.
    event: OwnedFd,
}

impl Shared {
    fn push(&self, future: Py<PyAny>, finish: Finish) {
        let was_empty = {
            let mut ready = self.ready.lock().unwrap_or_else(|e| e.into_inner());
            let was_empty = ready.is_empty();
            ready.push((future, finish));
            was_empty
        };
        if was_empty {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a live u64 to an eventfd we own.
            // It cannot block (EFD_NONBLOCK) and can fail only when the
            // counter would overflow, when a wake-up is pending anyway.
            unsafe {
                libc::write(
                    self.event.as_raw_fd(),
                    (&one as *const u64).cast(),
                    std::mem::size_of::<u64>(),
                );
            }
        }
    }

    /// Resolves every finished operation; on the event loop's thread.
    fn drain(&self, py: Python<'_>) {
        let mut count: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64 from an eventfd we own;
        // nonblocking, so a wake-up already consumed is EAGAIN, ignored.
        // Read before taking the queue: an operation pushed after the take
        // writes the eventfd again, and that write is not lost.
        unsafe {
            libc::read(
                self.event.as_raw_fd(),
                (&mut count as *mut u64).cast(),
                std::mem::size_of::<u64>(),
            );
        }
        let ready = std::mem::take(&mut *self.ready.lock().unwrap_or_else(|e| e.into_inner()));
        for (future, finish) in ready {
            finish(py, future.bind(py));
        }
    }
}

/// One client's way back into its event loop (see the module docs).
#[derive(Clone)]
pub(crate) struct Bridge {
    users: Arc<Users>,
}

/// Everything that may still deliver a result holds this: the client,
/// its subscriptions, and every operation in flight. When the last one
/// goes, nothing more can arrive, and the event loop stops watching the
/// eventfd after resolving what did.
struct Users {
    shared: Arc<Shared>,
    event_loop: Option<Py<PyAny>>,
}

impl Drop for Users {
    fn drop(&mut self) {
        let Some(event_loop) = self.event_loop.take() else {
            return;
        };
        // Possibly on a tokio thread, hence `call_soon_threadsafe`. The
        // reader is removed only after a last drain, since a result pushed
        // just before this drop may not have been read yet (removing a
        // reader cancels its pending call). Nothing to do when the
        // interpreter is shutting down or the loop is closed.
        let shared = self.shared.clone();
        Python::try_attach(|py| {
            let event_loop = event_loop.bind(py);
            let closed = event_loop
                .call_method0(intern!(py, "is_closed"))
                .and_then(|c| c.is_truthy())
                .unwrap_or(true);
            if closed {
                return;
            }
            let last = LastDrain {
                shared,
                event_loop: event_loop.clone().unbind(),
            };
            let _ = event_loop.call_method1(intern!(py, "call_soon_threadsafe"), (last,));
        });
    }
}

/// The callable the event loop runs when the eventfd is readable.
#[pyclass(frozen, module = "covet._covet")]
struct Drain {
    shared: Arc<Shared>,
}

#[pymethods]
impl Drain {
    fn __call__(&self, py: Python<'_>) {
        self.shared.drain(py);
    }
}

/// Run once by the event loop after the last user of a bridge is gone:
/// resolves what is left, then stops watching the eventfd (which closes
/// when the loop lets go of its `Drain`, so its number cannot be reused
/// while it is still watched).
#[pyclass(frozen, module = "covet._covet")]
struct LastDrain {
    shared: Arc<Shared>,
    event_loop: Py<PyAny>,
}

#[pymethods]
impl LastDrain {
    fn __call__(&self, py: Python<'_>) -> PyResult<()> {
        self.shared.drain(py);
        self.event_loop.bind(py).call_method1(
            intern!(py, "remove_reader"),
            (self.shared.event.as_raw_fd(),),
        )?;
        Ok(())
    }
}

impl Bridge {
    /// A bridge into `event_loop`, registered with it.
    pub(crate) fn new(event_loop: &Bound<'_, PyAny>) -> PyResult<Bridge> {
        // SAFETY: eventfd has no memory arguments; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(PyRuntimeError::new_err(format!(
                "eventfd: {}",
                std::io::Error::last_os_error()
            )));
        }
        // SAFETY: `fd` is a new descriptor nothing else owns.
        let event = unsafe { OwnedFd::from_raw_fd(fd) };
        let shared = Arc::new(Shared {
            ready: Mutex::new(Vec::new()),
            event,
        });
        let drain = Drain {
            shared: shared.clone(),
        };
        event_loop.call_method1(intern!(event_loop.py(), "add_reader"), (fd, drain))?;
        Ok(Bridge {
            users: Arc::new(Users {
                shared,
                event_loop: Some(event_loop.clone().unbind()),
            }),
        })
    }

    /// A new future of the event loop.
    pub(crate) fn future<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        match &self.users.event_loop {
            Some(event_loop) => event_loop
                .bind(py)
                .call_method0(intern!(py, "create_future")),
            None => Err(PyRuntimeError::new_err("the client's event loop is gone")),
        }
    }

    /// Resolves `future` on the event loop with what `finish` makes.
    pub(crate) fn finish_later(&self, future: Py<PyAny>, finish: Finish) {
        self.users.shared.push(future, finish);
    }

    /// Runs `work` on the runtime; the returned future resolves with its
    /// result (converted on the event loop) or its error.
    pub(crate) fn spawn<'py, F, T>(&self, py: Python<'py>, work: F) -> PyResult<Bound<'py, PyAny>>
    where
        F: Future<Output = Result<T, covet_client::Error>> + Send + 'static,
        T: for<'a> IntoPyObject<'a> + Send + 'static,
    {
        let future = self.future(py)?;
        let handle = future.clone().unbind();
        let users = self.users.clone();
        runtime().spawn(async move {
            let outcome = work.await;
            users
                .shared
                .push(handle, Box::new(move |py, f| settle(py, f, outcome)));
        });
        Ok(future)
    }
}

/// Resolves `future` with `outcome`, unless it was cancelled meanwhile.
pub(crate) fn settle<T>(
    py: Python<'_>,
    future: &Bound<'_, PyAny>,
    outcome: Result<T, covet_client::Error>,
) where
    T: for<'a> IntoPyObject<'a>,
{
    if is_done(future) {
        return;
    }
    let result = match outcome {
        Ok(value) => value
            .into_py_any(py)
            .and_then(|v| future.call_method1(intern!(py, "set_result"), (v,))),
        Err(e) => future.call_method1(
            intern!(py, "set_exception"),
            (crate::to_py_err(e).into_value(py),),
        ),
    };
    if let Err(e) = result {
        // Converting the result failed (it cannot in practice): the
        // awaiting task gets that error rather than waiting forever.
        let _ = future.call_method1(intern!(py, "set_exception"), (e.into_value(py),));
    }
}

/// Whether a future is resolved or cancelled already.
pub(crate) fn is_done(future: &Bound<'_, PyAny>) -> bool {
    future
        .call_method0(intern!(future.py(), "done"))
        .and_then(|d| d.is_truthy())
        .unwrap_or(true)
}

/// Polls `work` once on the calling thread (inside the runtime's context,
/// so it may use timers and sockets): its output if it finished without
/// waiting, else the future itself, to be finished elsewhere.
pub(crate) fn poll_once<F: Future + Unpin>(mut work: F) -> Result<F::Output, F> {
    let _guard = runtime().enter();
    let mut cx = Context::from_waker(Waker::noop());
    match pin!(&mut work).poll(&mut cx) {
        Poll::Ready(out) => Ok(out),
        Poll::Pending => Err(work),
    }
}

/// A future that is driven by its own wake-ups rather than by a task: when
/// woken it polls the future on the waking thread, and once it is ready
/// hands the output to the event loop. For futures whose wake-up means
/// "done" (a record's delivery, woken when its batch is acknowledged), this
/// costs no tokio task and no thread switch.
pub(crate) struct WakeDriven<F: Future> {
    state: Mutex<Option<(F, Py<PyAny>)>>,
    users: Arc<Users>,
    #[allow(clippy::type_complexity)]
    finish: fn(F::Output) -> Finish,
}

impl<F> WakeDriven<F>
where
    F: Future + Unpin + Send + 'static,
{
    /// Drives `work` to completion by its wake-ups; `finish` makes the
    /// resolution of `future` from its output.
    pub(crate) fn start(
        bridge: &Bridge,
        work: F,
        future: Py<PyAny>,
        finish: fn(F::Output) -> Finish,
    ) {
        let driven = Arc::new(WakeDriven {
            state: Mutex::new(Some((work, future))),
            users: bridge.users.clone(),
            finish,
        });
        driven.drive();
    }

    fn drive(self: &Arc<Self>) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let Some((work, _)) = state.as_mut() else {
            return;
        };
        let waker = Waker::from(self.clone());
        let mut cx = Context::from_waker(&waker);
        if let Poll::Ready(out) = Pin::new(work).poll(&mut cx) {
            if let Some((_, future)) = state.take() {
                drop(state);
                self.users.shared.push(future, (self.finish)(out));
            }
        }
    }
}

impl<F> Wake for WakeDriven<F>
where
    F: Future + Unpin + Send + 'static,
{
    fn wake(self: Arc<Self>) {
        self.drive();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.drive();
    }
}
