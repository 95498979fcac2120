//! `covet._covet`: the native half of the `covet` Python package.
//!
//! A thin binding over `covet-client`: every call converts its Python
//! arguments (under the GIL, a copy of each payload), then runs the
//! client's work on a tokio runtime of its own, without the GIL, and hands
//! the result back to the asyncio loop through the client's bridge
//! (one eventfd wake-up per burst of results, the GIL never taken on a
//! tokio thread). Where the work can finish at once (queueing a record,
//! taking buffered records) it runs on the caller's thread instead: no
//! future, no thread switch. Batching, retries, routing and credit all
//! stay in `covet-client`; the Python layer (`python/covet/__init__.py`)
//! only adds `async with` and `async for` on top of these classes.

mod bridge;
mod reader;

use std::sync::Arc;

use bytes::Bytes;
use covet_client::{
    Acker, Client, ConsumedRecord, Error, GroupConsumer, GroupConsumerConfig, GroupRecord, Header,
    Membership, Producer, ProducerConfig, Reason, Record, RecordMetadata, StartPosition,
    Subscription, SubscriptionOptions, TopicSpec,
};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{
    PyByteArray, PyBytes, PyDateTime, PyDict, PyInt, PyMemoryView, PyString, PyTzInfo,
};
use tokio::sync::Mutex;

use bridge::{runtime, settle, Bridge, WakeDriven};
use reader::Reader;

/// Records one `next_batch` call hands to Python at most: enough to
/// amortise the hop between tokio and the event loop, small enough that
/// records taken off the subscription (and so credited back to the
/// broker) stay close to what the application has handled.
const DEFAULT_BATCH: usize = 256;

/// Records from this size on (value and key, in bytes) are queued with
/// the GIL released.
const LARGE_RECORD: usize = 64 << 10;

/// The Python exception for a client error: a class of `covet.errors`
/// (see there), built with the message and the broker's stable reason
/// string (`None` when the failure is the client's own).
fn to_py_err(e: Error) -> PyErr {
    Python::attach(|py| build_error(py, &e).unwrap_or_else(|err| err))
}

fn build_error(py: Python<'_>, e: &Error) -> PyResult<PyErr> {
    let (class, reason) = match e {
        Error::Broker { reason, .. } => (class_of(*reason), Some(reason.as_str())),
        Error::Connect { .. } | Error::Transport(_) => ("ConnectionLost", None),
        Error::InvalidArgument(_) => ("InvalidArgument", None),
        Error::Closed => ("Closed", None),
        Error::Protocol(_) => ("CovetError", None),
    };
    let class = py.import("covet.errors")?.getattr(class)?;
    Ok(PyErr::from_value(class.call1((e.to_string(), reason))?))
}

/// The `covet.errors` class a broker reason maps to.
fn class_of(reason: Reason) -> &'static str {
    match reason {
        Reason::NotLeader => "NotLeader",
        Reason::UnknownTopic => "UnknownTopic",
        Reason::UnknownPartition => "UnknownPartition",
        Reason::TopicExists => "TopicExists",
        Reason::BatchTooLarge => "BatchTooLarge",
        Reason::OffsetOutOfRange => "OffsetOutOfRange",
        Reason::Timeout => "Timeout",
        Reason::InvalidTopicName
        | Reason::InvalidConfig
        | Reason::InvalidRequest
        | Reason::CorruptBatch => "InvalidArgument",
        Reason::ShuttingDown | Reason::NotReady | Reason::ReplicaFaulted => "Unavailable",
        _ => "CovetError",
    }
}

/// A payload from `bytes`, `bytearray`, `memoryview` or `str` (UTF-8),
/// copied: the producer encodes it into a batch right away, and a copy
/// made under the GIL means no Python object is touched from tokio.
fn payload(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Bytes> {
    if let Ok(b) = obj.cast::<PyBytes>() {
        return Ok(Bytes::copy_from_slice(b.as_bytes()));
    }
    if let Ok(s) = obj.cast::<PyString>() {
        return Ok(Bytes::copy_from_slice(s.to_str()?.as_bytes()));
    }
    if let Ok(b) = obj.cast::<PyByteArray>() {
        return Ok(Bytes::from(b.to_vec()));
    }
    if obj.is_instance_of::<PyMemoryView>() {
        // `tobytes` flattens any shape and item format to its raw bytes.
        let raw = obj.call_method0("tobytes")?;
        let raw = raw.cast::<PyBytes>()?;
        return Ok(Bytes::copy_from_slice(raw.as_bytes()));
    }
    Err(PyTypeError::new_err(format!(
        "{what} must be bytes, bytearray, memoryview or str, not {}",
        obj.get_type().name()?
    )))
}

fn headers_of(headers: Option<&Bound<'_, PyDict>>) -> PyResult<Vec<Header>> {
    let Some(headers) = headers else {
        return Ok(Vec::new());
    };
    let mut out = Vec::with_capacity(headers.len());
    for (k, v) in headers.iter() {
        let key = k
            .cast::<PyString>()
            .map_err(|_| PyTypeError::new_err("header names must be str"))?
            .to_str()?
            .to_string();
        let value = payload(&v, "a header value")?;
        out.push(Header { key, value });
    }
    Ok(out)
}

fn start_of(start: &Bound<'_, PyAny>) -> PyResult<StartPosition> {
    if let Ok(s) = start.cast::<PyString>() {
        return match s.to_str()? {
            "earliest" => Ok(StartPosition::Earliest),
            "latest" => Ok(StartPosition::Latest),
            other => Err(to_py_err(Error::InvalidArgument(format!(
                "start must be \"earliest\", \"latest\", an offset or a datetime, not {other:?}"
            )))),
        };
    }
    if let Ok(dt) = start.cast::<PyDateTime>() {
        // Naive datetimes are taken as local time, as `datetime.timestamp`
        // does. Down to the millisecond: a record stamped in the same
        // millisecond is included rather than skipped.
        let seconds: f64 = dt.call_method0("timestamp")?.extract()?;
        return Ok(StartPosition::Timestamp((seconds * 1000.0).floor() as i64));
    }
    // `bool` is an `int` subclass; `start=True` is a mistake, not offset 1.
    if start.is_instance_of::<PyInt>() && !start.is_instance_of::<pyo3::types::PyBool>() {
        let offset: i128 = start.extract()?;
        return u64::try_from(offset)
            .map(StartPosition::Offset)
            .map_err(|_| {
                to_py_err(Error::InvalidArgument(format!(
                    "start offset must be between 0 and 2**64 - 1, not {offset}"
                )))
            });
    }
    Err(PyTypeError::new_err(format!(
        "start must be \"earliest\", \"latest\", an int offset or a datetime, not {}",
        start.get_type().name()?
    )))
}

/// Where an acknowledged record landed.
#[pyclass(frozen, get_all, module = "covet._covet")]
struct PublishResult {
    topic: String,
    partition: u32,
    offset: u64,
}

impl From<RecordMetadata> for PublishResult {
    fn from(m: RecordMetadata) -> Self {
        PublishResult {
            topic: m.topic.to_string(),
            partition: m.partition,
            offset: m.offset,
        }
    }
}

#[pymethods]
impl PublishResult {
    fn __repr__(&self) -> String {
        format!(
            "PublishResult(topic={:?}, partition={}, offset={})",
            self.topic, self.partition, self.offset
        )
    }
}

/// What the client's producer handed to the broker since it connected.
#[pyclass(frozen, get_all, module = "covet._covet")]
struct ProducerStats {
    /// Batches sent (a retried batch counts once).
    batches: u64,
    /// Records in those batches.
    records: u64,
}

#[pymethods]
impl ProducerStats {
    fn __repr__(&self) -> String {
        format!(
            "ProducerStats(batches={}, records={})",
            self.batches, self.records
        )
    }
}

/// One partition of a topic, as its leader reports it.
#[pyclass(frozen, get_all, module = "covet._covet")]
#[derive(Clone)]
struct PartitionInfo {
    partition: u32,
    /// Node id of the leader; 0 when there is none.
    leader: u64,
    replicas: Vec<u64>,
    start_offset: u64,
    high_watermark: u64,
}

#[pymethods]
impl PartitionInfo {
    fn __repr__(&self) -> String {
        format!(
            "PartitionInfo(partition={}, leader={}, replicas={:?}, start_offset={}, high_watermark={})",
            self.partition, self.leader, self.replicas, self.start_offset, self.high_watermark
        )
    }
}

/// A topic: its settings and partitions.
#[pyclass(frozen, get_all, module = "covet._covet")]
struct TopicInfo {
    name: String,
    partitions: Vec<PartitionInfo>,
    replication_factor: u32,
    retention_ms: u64,
    retention_bytes: u64,
    max_batch_bytes: u32,
}

impl From<covet_client::TopicInfo> for TopicInfo {
    fn from(t: covet_client::TopicInfo) -> Self {
        let config = t.config.unwrap_or_default();
        TopicInfo {
            name: t.name,
            partitions: t
                .partitions
                .into_iter()
                .map(|p| PartitionInfo {
                    partition: p.partition,
                    leader: p.leader,
                    replicas: p.replicas,
                    start_offset: p.start_offset,
                    high_watermark: p.high_watermark,
                })
                .collect(),
            replication_factor: config.replication_factor,
            retention_ms: config.retention_ms,
            retention_bytes: config.retention_bytes,
            max_batch_bytes: config.max_batch_bytes,
        }
    }
}

#[pymethods]
impl TopicInfo {
    fn __repr__(&self) -> String {
        format!(
            "TopicInfo(name={:?}, partitions={})",
            self.name,
            self.partitions.len()
        )
    }
}

/// A read-only buffer over a payload's `Bytes`, shared with the batch it
/// was decoded from: `memoryview(buffer)` reads it without a copy.
#[pyclass(frozen, module = "covet._covet")]
struct Buffer {
    data: Bytes,
}

#[pymethods]
impl Buffer {
    /// # Safety
    ///
    /// Called by CPython with a `view` to fill, as the buffer protocol
    /// requires.
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut pyo3::ffi::Py_buffer,
        flags: std::os::raw::c_int,
    ) -> PyResult<()> {
        if view.is_null() {
            return Err(pyo3::exceptions::PyBufferError::new_err("no view to fill"));
        }
        let data = &slf.get().data;
        let len = isize::try_from(data.len())
            .map_err(|_| pyo3::exceptions::PyBufferError::new_err("payload too large"))?;
        // SAFETY: `view` is CPython's, non-null (checked). The memory is
        // the `Bytes` of a frozen object: it never changes and lives as long
        // as the object, which `PyBuffer_FillInfo` references from
        // `view.obj` until the view is released. `readonly` is 1, so a
        // writable request fails inside `PyBuffer_FillInfo` (BufferError).
        let filled = unsafe {
            pyo3::ffi::PyBuffer_FillInfo(
                view,
                slf.as_ptr(),
                data.as_ptr() as *mut std::os::raw::c_void,
                len,
                1,
                flags,
            )
        };
        if filled == -1 {
            return Err(PyErr::fetch(slf.py()));
        }
        Ok(())
    }

    fn __len__(&self) -> usize {
        self.data.len()
    }
}

/// A read-only `memoryview` over `data`, without copying it.
fn view<'py>(py: Python<'py>, data: &Bytes) -> PyResult<Bound<'py, PyMemoryView>> {
    let buffer = Bound::new(py, Buffer { data: data.clone() })?;
    PyMemoryView::from(buffer.as_any())
}

/// A consumed record. `value`, `key` and header values are copied into
/// `bytes` when read; `value_view` is the payload without a copy.
#[pyclass(frozen, module = "covet._covet")]
struct Message {
    record: ConsumedRecord,
}

/// The getters a consumed record's Python class has, over its `record:
/// ConsumedRecord` field, then `$extra` (the class's own methods): one
/// `#[pymethods]` block per class, as pyo3 wants without its
/// `multiple-pymethods` feature.
macro_rules! record_class {
    ($class:ident { $($extra:tt)* }) => {
        #[pymethods]
        impl $class {
            #[getter]
            fn topic(&self) -> &str {
                &self.record.topic
            }

            #[getter]
            fn partition(&self) -> u32 {
                self.record.partition
            }

            #[getter]
            fn offset(&self) -> u64 {
                self.record.offset
            }

            #[getter]
            fn timestamp_ms(&self) -> i64 {
                self.record.timestamp_ms
            }

            /// The producer's timestamp as an aware `datetime` in UTC.
            #[getter]
            fn timestamp<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDateTime>> {
                let utc = PyTzInfo::utc(py)?.to_owned();
                PyDateTime::from_timestamp(py, self.record.timestamp_ms as f64 / 1000.0, Some(&utc))
            }

            #[getter]
            fn value<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
                PyBytes::new(py, &self.record.value)
            }

            /// The value as a read-only `memoryview` of the received batch:
            /// no copy, whatever its size.
            #[getter]
            fn value_view<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyMemoryView>> {
                view(py, &self.record.value)
            }

            #[getter]
            fn key<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyBytes>> {
                self.record.key.as_ref().map(|k| PyBytes::new(py, k))
            }

            /// Headers by name; of a name given more than once, the last
            /// value.
            #[getter]
            fn headers<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
                let out = PyDict::new(py);
                for h in &self.record.headers {
                    out.set_item(&h.key, PyBytes::new(py, &h.value))?;
                }
                Ok(out)
            }

            $($extra)*
        }
    };
}

record_class!(Message {
    fn __repr__(&self) -> String {
        format!(
            "Message(topic={:?}, partition={}, offset={}, {} value bytes)",
            &*self.record.topic,
            self.record.partition,
            self.record.offset,
            self.record.value.len()
        )
    }
});

/// A subscription opened by `Client.open_subscription`; the Python
/// `covet.Subscription` iterates over it.
#[pyclass(frozen, module = "covet._covet")]
struct NativeSubscription {
    reader: Reader<Subscription>,
}

#[pymethods]
impl NativeSubscription {
    /// Up to `max` records ready now, without waiting (maybe none).
    #[pyo3(signature = (max = DEFAULT_BATCH))]
    fn take(&self, max: usize) -> PyResult<Vec<Message>> {
        self.reader.take(max)
    }

    /// The next records, at least one and at most `max`, waiting for the
    /// first; an empty list once the subscription ended or was closed.
    #[pyo3(signature = (max = DEFAULT_BATCH))]
    fn next_batch<'py>(&self, py: Python<'py>, max: usize) -> PyResult<Bound<'py, PyAny>> {
        self.reader.next_batch(py, max)
    }

    /// Stops the subscription: a pending `next_batch` returns an empty
    /// list, and the partition streams are dropped.
    fn close(&self) {
        let handle = self.reader.handle();
        self.reader.interrupt();
        runtime().spawn(async move { drop(Reader::take_source(&handle).await) });
    }
}

/// A record of a consumer group: a [`Message`]'s fields, its delivery
/// count, and `ack` / `nack`, each of which settles it once (later calls
/// do nothing). Dropped unsettled, it is nacked (the client's `Acker`).
#[pyclass(frozen, module = "covet._covet")]
struct GroupMessage {
    record: ConsumedRecord,
    delivery_count: u32,
    acker: std::sync::Mutex<Option<Acker>>,
}

impl GroupMessage {
    fn new(r: GroupRecord) -> Self {
        let delivery_count = r.delivery_count;
        let acker = r.acker;
        GroupMessage {
            record: ConsumedRecord {
                topic: r.topic,
                partition: r.partition,
                offset: r.offset,
                timestamp_ms: r.timestamp_ms,
                key: r.key,
                value: r.value,
                headers: r.headers,
            },
            delivery_count,
            acker: std::sync::Mutex::new(Some(acker)),
        }
    }

    fn take(&self) -> Option<Acker> {
        self.acker.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

record_class!(GroupMessage {
    /// Deliveries of this record so far, this one included.
    #[getter]
    fn delivery_count(&self) -> u32 {
        self.delivery_count
    }

    /// Marks the record handled. Returns an awaitable that is already
    /// done: the ack travels with others, and the broker commits it.
    fn ack(&self) -> Ready {
        if let Some(a) = self.take() {
            a.ack();
        }
        Ready
    }

    /// Asks for the record again after `delay` seconds.
    #[pyo3(signature = (delay = 0.0))]
    fn nack(&self, delay: f64) -> PyResult<Ready> {
        if !(0.0..=86_400.0).contains(&delay) {
            return Err(pyo3::exceptions::PyValueError::new_err(
                "delay must be between 0 and 86400 seconds",
            ));
        }
        if let Some(a) = self.take() {
            a.nack(std::time::Duration::from_secs_f64(delay));
        }
        Ok(Ready)
    }

    fn __repr__(&self) -> String {
        format!(
            "GroupMessage(topic={:?}, partition={}, offset={}, delivery_count={}, {} value bytes)",
            &*self.record.topic,
            self.record.partition,
            self.record.offset,
            self.delivery_count,
            self.record.value.len()
        )
    }
});

/// An awaitable that is done at once: what `ack` and `nack` return, so
/// that `await msg.ack()` reads as the rest of the API does without a trip
/// through the event loop.
#[pyclass(frozen, module = "covet._covet")]
struct Ready;

#[pymethods]
impl Ready {
    fn __await__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self) -> Option<()> {
        None
    }
}

/// A consumer group member opened by `Client.open_group`; the Python
/// `covet.GroupSubscription` iterates over it.
#[pyclass(frozen, module = "covet._covet")]
struct NativeGroupSubscription {
    reader: Reader<GroupConsumer>,
    membership: Arc<Mutex<Option<Membership>>>,
    bridge: Bridge,
}

#[pymethods]
impl NativeGroupSubscription {
    /// Up to `max` records ready now, without waiting (maybe none).
    #[pyo3(signature = (max = DEFAULT_BATCH))]
    fn take(&self, max: usize) -> PyResult<Vec<GroupMessage>> {
        self.reader.take(max)
    }

    /// The next records, at least one and at most `max`, waiting for the
    /// first; an empty list once the member left or stopped reading.
    #[pyo3(signature = (max = DEFAULT_BATCH))]
    fn next_batch<'py>(&self, py: Python<'py>, max: usize) -> PyResult<Bound<'py, PyAny>> {
        self.reader.next_batch(py, max)
    }

    /// Takes no more records (a pending `next_batch` returns an empty
    /// list) but stays in the group, so records handed out can still be
    /// acked: how an app drains before it leaves.
    fn stop_reading(&self) {
        self.reader.interrupt();
    }

    /// Leaves the group: partitions are released (what was acked is
    /// committed) and the coordinator told; a pending `next_batch` returns
    /// an empty list.
    fn close<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let handle = self.reader.handle();
        self.reader.interrupt();
        let membership = self.membership.clone();
        self.bridge.spawn(py, async move {
            if let Some(m) = membership.lock().await.take() {
                m.leave().await?;
            }
            if let Some(c) = Reader::take_source(&handle).await {
                c.close().await?;
            }
            Ok(())
        })
    }
}

/// Member ids this process gave out, for distinct names in logs.
static NEXT_MEMBER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// A connection to a Covet cluster with its producer, bound to the event
/// loop it was made on.
#[pyclass(frozen, module = "covet._covet")]
struct NativeClient {
    client: Client,
    producer: Producer,
    bridge: Bridge,
}

/// How a record's delivery resolves its Python future.
fn published(outcome: covet_client::Result<RecordMetadata>) -> bridge::Finish {
    Box::new(move |py, future| settle(py, future, outcome.map(PublishResult::from)))
}

#[pymethods]
impl NativeClient {
    /// Publishes one record; resolves with its partition and offset once
    /// it is committed.
    ///
    /// The record is queued on the calling thread when the producer can
    /// take it at once (the common case), and its delivery resolves the
    /// future straight from the thread that reads the broker's answer: no
    /// task per record, one event-loop wake-up per answered batch. When the
    /// producer's buffer is full the queueing waits on the runtime, and so
    /// does the caller: a bounded window, never an error.
    #[pyo3(signature = (topic, value, key = None, headers = None))]
    fn publish<'py>(
        &self,
        py: Python<'py>,
        topic: String,
        value: &Bound<'py, PyAny>,
        key: Option<&Bound<'py, PyAny>>,
        headers: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let record = Record {
            key: key.map(|k| payload(k, "key")).transpose()?,
            value: payload(value, "value")?,
            headers: headers_of(headers)?,
            timestamp_ms: 0,
        };
        let future = self.bridge.future(py)?;
        let handle = future.clone().unbind();
        let size = record.value.len() + record.key.as_ref().map_or(0, |k| k.len());
        let producer = self.producer.clone();
        let send = Box::pin(async move { producer.send(&topic, record).await });
        // Queueing copies the record into its batch: microseconds for
        // records of a few KiB, not worth releasing the GIL for; a large
        // one is copied without it, so other Python threads run meanwhile.
        let polled = if size >= LARGE_RECORD {
            py.detach(|| bridge::poll_once(send))
        } else {
            bridge::poll_once(send)
        };
        match polled {
            Ok(Ok(delivery)) => WakeDriven::start(&self.bridge, delivery, handle, published),
            Ok(Err(e)) => return Err(to_py_err(e)),
            Err(send) => {
                let bridge = self.bridge.clone();
                runtime().spawn(async move {
                    let outcome = match send.await {
                        Ok(delivery) => delivery.await,
                        Err(e) => Err(e),
                    };
                    bridge.finish_later(handle, published(outcome));
                });
            }
        }
        Ok(future)
    }

    /// Publishes values in order (unkeyed); resolves with one result per
    /// value once all are committed, or with the first failure.
    fn publish_batch<'py>(
        &self,
        py: Python<'py>,
        topic: String,
        values: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        // A str or bytes is iterable too: one record per character or byte
        // is never what was meant.
        if values.is_instance_of::<PyString>()
            || values.is_instance_of::<PyBytes>()
            || values.is_instance_of::<PyByteArray>()
            || values.is_instance_of::<PyMemoryView>()
        {
            return Err(PyTypeError::new_err(
                "values must be a list (or iterable) of payloads, not a single payload",
            ));
        }
        let mut records = Vec::new();
        for v in values.try_iter()? {
            records.push(Record {
                value: payload(&v?, "value")?,
                ..Default::default()
            });
        }
        let producer = self.producer.clone();
        self.bridge.spawn(py, async move {
            let mut deliveries = Vec::with_capacity(records.len());
            for r in records {
                deliveries.push(producer.send(&topic, r).await?);
            }
            let mut out = Vec::with_capacity(deliveries.len());
            for d in deliveries {
                out.push(PublishResult::from(d.await?));
            }
            Ok(out)
        })
    }

    fn producer_stats(&self) -> ProducerStats {
        let stats = self.producer.stats();
        ProducerStats {
            batches: stats.batches,
            records: stats.records,
        }
    }

    /// Waits until every record published before the call is answered.
    fn flush<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let producer = self.producer.clone();
        self.bridge.spawn(py, async move { producer.flush().await })
    }

    // Each argument is a Python keyword argument of `create_topic`.
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (name, partitions = 1, replication_factor = 0, retention_ms = None, retention_bytes = None, max_batch_bytes = None))]
    fn create_topic<'py>(
        &self,
        py: Python<'py>,
        name: String,
        partitions: u32,
        replication_factor: u32,
        retention_ms: Option<u64>,
        retention_bytes: Option<u64>,
        max_batch_bytes: Option<u32>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let spec = TopicSpec {
            name,
            partitions,
            retention_ms,
            retention_bytes,
            max_batch_bytes,
            replication_factor,
        };
        let client = self.client.clone();
        self.bridge.spawn(py, async move {
            Ok(TopicInfo::from(client.create_topic(spec).await?))
        })
    }

    fn list_topics<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let client = self.client.clone();
        self.bridge.spawn(py, async move {
            let topics = client.list_topics().await?;
            Ok(topics.into_iter().map(TopicInfo::from).collect::<Vec<_>>())
        })
    }

    fn describe_topic<'py>(&self, py: Python<'py>, name: String) -> PyResult<Bound<'py, PyAny>> {
        let client = self.client.clone();
        self.bridge.spawn(py, async move {
            Ok(TopicInfo::from(client.describe_topic(&name).await?))
        })
    }

    fn delete_topic<'py>(&self, py: Python<'py>, name: String) -> PyResult<Bound<'py, PyAny>> {
        let client = self.client.clone();
        self.bridge
            .spawn(py, async move { client.delete_topic(&name).await })
    }

    /// Joins consumer group `group` on `topic`: the coordinator assigns
    /// this member partitions, at most `max_in_flight` records of each are
    /// held unacknowledged (the broker's credit), heartbeats run in Rust.
    #[pyo3(signature = (topic, group, max_in_flight, session_timeout_ms, ack_timeout_ms, max_deliveries, dead_letter_topic = None))]
    #[allow(clippy::too_many_arguments)]
    fn open_group<'py>(
        &self,
        py: Python<'py>,
        topic: String,
        group: String,
        max_in_flight: u32,
        session_timeout_ms: u64,
        ack_timeout_ms: u64,
        max_deliveries: u32,
        dead_letter_topic: Option<String>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let n = NEXT_MEMBER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let config = GroupConsumerConfig {
            max_in_flight,
            ack_timeout: std::time::Duration::from_millis(ack_timeout_ms),
            max_deliveries,
            dead_letter_topic,
            ..GroupConsumerConfig::new(group.clone(), format!("py-{}-{n}", std::process::id()))
        };
        let consumer = {
            let _guard = runtime().enter();
            self.client.group_consumer(config).map_err(to_py_err)?
        };
        let client = self.client.clone();
        let bridge = self.bridge.clone();
        self.bridge.spawn(py, async move {
            let membership = Membership::join(
                client,
                &group,
                vec![topic],
                std::time::Duration::from_millis(session_timeout_ms),
                Arc::new(consumer.assigner()),
            )
            .await?;
            Ok(NativeGroupSubscription {
                reader: Reader::new(consumer, bridge.clone()),
                membership: Arc::new(Mutex::new(Some(membership))),
                bridge,
            })
        })
    }

    /// Opens every partition of `topic` at `start`, buffering at most
    /// `window` records per partition (the broker's credit).
    #[pyo3(signature = (topic, start, window = 1000))]
    fn open_subscription<'py>(
        &self,
        py: Python<'py>,
        topic: String,
        start: &Bound<'py, PyAny>,
        window: u64,
    ) -> PyResult<Bound<'py, PyAny>> {
        let mut options = SubscriptionOptions::new(topic, start_of(start)?);
        options.window = window;
        let client = self.client.clone();
        let bridge = self.bridge.clone();
        self.bridge.spawn(py, async move {
            let sub = client.subscribe(options).await?;
            Ok(NativeSubscription {
                reader: Reader::new(sub, bridge),
            })
        })
    }
}

/// Connects to a cluster through a comma-separated seed list; the client
/// delivers its results to `event_loop` (the running loop of the caller).
/// `linger_ms` and `buffer_bytes` are the producer's (see
/// `covet.connect`).
#[pyfunction]
#[pyo3(signature = (seeds, event_loop, linger_ms = 0, buffer_bytes = 64 << 20))]
fn connect<'py>(
    py: Python<'py>,
    seeds: String,
    event_loop: &Bound<'py, PyAny>,
    linger_ms: u64,
    buffer_bytes: usize,
) -> PyResult<Bound<'py, PyAny>> {
    if buffer_bytes == 0 {
        return Err(to_py_err(Error::InvalidArgument(
            "buffer_bytes must be at least 1".into(),
        )));
    }
    let bridge = Bridge::new(event_loop)?;
    let for_client = bridge.clone();
    bridge.spawn(py, async move {
        let client = Client::connect(&seeds).await?;
        // Linger 0 by default: a record goes out at once while its
        // partition has a free in-flight slot, and records that arrive
        // while every slot is taken fill one batch (the producer's natural
        // batching), so one awaited publish is not held back by a timer.
        let producer = client.producer(ProducerConfig {
            linger: std::time::Duration::from_millis(linger_ms),
            buffer_bytes,
            ..ProducerConfig::default()
        });
        Ok(NativeClient {
            client,
            producer,
            bridge: for_client,
        })
    })
}

#[pymodule]
fn _covet(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(connect, m)?)?;
    let shutdown = wrap_pyfunction!(bridge::shutdown, m)?;
    m.py()
        .import("atexit")?
        .call_method1("register", (shutdown,))?;
    m.add_class::<NativeClient>()?;
    m.add_class::<NativeSubscription>()?;
    m.add_class::<NativeGroupSubscription>()?;
    m.add_class::<GroupMessage>()?;
    m.add_class::<Ready>()?;
    m.add_class::<Message>()?;
    m.add_class::<Buffer>()?;
    m.add_class::<PublishResult>()?;
    m.add_class::<ProducerStats>()?;
    m.add_class::<TopicInfo>()?;
    m.add_class::<PartitionInfo>()?;
    m.add("DEFAULT_BROKER", covet_client::DEFAULT_BROKER)?;
    Ok(())
}
