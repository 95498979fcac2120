//! The batching producer.
//!
//! `send` appends the record to the open batch of its partition, under a
//! short lock and without switching tasks. A batch is closed when it reaches
//! `max_batch_bytes`, when it has waited `linger`, or on `flush`; closed
//! batches join one FIFO queue that a sender task drains onto one
//! long-lived produce stream per partition leader, up to `max_in_flight`
//! batches unanswered. Batches are idempotent (producer id + per-partition
//! sequence), so the sender retries them through leader changes without
//! duplicating, and the broker stores each partition's records in the order
//! they were sent.
//!
//! Memory is bounded by `buffer_bytes`: a record takes its encoded size from
//! the buffer when it is sent and gives it back when its batch is answered;
//! `send` waits while the buffer is full. That is the producer's
//! backpressure.
//!
//! Each record's [`Delivery`] resolves with its offset once the broker has
//! committed and applied its batch, or with the error that failed the batch.
//! Records of one batch share one completion, so acknowledging a batch of
//! ten thousand records is one store and one wake-up, not ten thousand.

mod sender;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use covet_protocol::api::InitProducerRequest;
use covet_protocol::batch::{BatchBuilder, Record};
use tokio::sync::{mpsc, oneshot, Notify, OnceCell, Semaphore};
use tokio::time::Instant;

use crate::partitioner::partition_for_key;
use crate::{Client, Error, Result};
use sender::{Queued, Sender};

/// Producer settings.
#[derive(Debug, Clone)]
pub struct ProducerConfig {
    /// How long a batch waits for more records before it is sent.
    pub linger: Duration,
    /// Largest batch built, in bytes (a single larger record is sent alone).
    pub max_batch_bytes: usize,
    /// Batches sent and not yet acknowledged, per partition; at most 128,
    /// the batches per producer a partition remembers to answer a retry
    /// with the original offset.
    pub max_in_flight: usize,
    /// Bytes of records accepted and not yet acknowledged; `send` waits
    /// beyond it.
    pub buffer_bytes: usize,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        ProducerConfig {
            linger: Duration::from_millis(5),
            max_batch_bytes: 1 << 20,
            max_in_flight: 64,
            buffer_bytes: 64 << 20,
        }
    }
}

/// Where an acknowledged record landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordMetadata {
    pub topic: Arc<str>,
    pub partition: u32,
    pub offset: u64,
}

/// Counts of what a producer handed to the broker, since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProducerStats {
    /// Batches closed and handed to the sender (a retried batch counts
    /// once).
    pub batches: u64,
    /// Records in those batches.
    pub records: u64,
}

impl ProducerStats {
    /// The mean number of records per batch (0 before the first batch).
    pub fn records_per_batch(&self) -> f64 {
        if self.batches == 0 {
            0.0
        } else {
            self.records as f64 / self.batches as f64
        }
    }
}

/// The outcome of one batch, shared by the deliveries of its records.
#[derive(Default)]
pub(crate) struct BatchAck {
    /// The batch's base offset, or why it failed.
    outcome: OnceLock<Result<u64>>,
    notify: Notify,
}

impl BatchAck {
    pub(crate) fn complete(&self, outcome: Result<u64>) {
        let _ = self.outcome.set(outcome);
        self.notify.notify_waiters();
    }
}

/// Resolves when the record is acknowledged (or failed).
pub struct Delivery {
    wait: Pin<Box<dyn Future<Output = Result<RecordMetadata>> + Send>>,
}

impl Delivery {
    fn new(ack: Arc<BatchAck>, topic: Arc<str>, partition: u32, index: u32) -> Delivery {
        let wait = async move {
            loop {
                let notified = ack.notify.notified();
                tokio::pin!(notified);
                // Register before checking, so a completion in between is
                // not missed.
                notified.as_mut().enable();
                if let Some(outcome) = ack.outcome.get() {
                    return match outcome {
                        Ok(base) => Ok(RecordMetadata {
                            topic,
                            partition,
                            offset: base + u64::from(index),
                        }),
                        Err(e) => Err(e.clone()),
                    };
                }
                notified.await;
            }
        };
        Delivery {
            wait: Box::pin(wait),
        }
    }
}

impl Future for Delivery {
    type Output = Result<RecordMetadata>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.wait.as_mut().poll(cx)
    }
}

/// A batch being filled.
struct OpenBatch {
    builder: BatchBuilder,
    ack: Arc<BatchAck>,
    /// Buffer bytes the records hold, returned when the batch is answered.
    reserved: usize,
    deadline: Instant,
}

/// A closed batch, on its way to the broker.
pub(crate) struct ClosedBatch {
    pub topic: Arc<str>,
    pub partition: u32,
    pub batch: bytes::Bytes,
    pub ack: Arc<BatchAck>,
    pub reserved: usize,
}

struct TopicState {
    name: Arc<str>,
    /// Partition unkeyed records go to until its batch closes.
    sticky: u32,
    open: Vec<Option<OpenBatch>>,
    /// Sequence number of the next record sent to each partition.
    next_sequence: Vec<i32>,
}

/// Batches under construction. Every change happens under one lock, and a
/// closed batch is queued before the lock is released, so batches of one
/// partition enter the queue in the order their records were sent.
#[derive(Default)]
struct State {
    topics: HashMap<String, TopicState>,
    open_batches: usize,
}

struct Shared {
    config: ProducerConfig,
    client: Client,
    state: Mutex<State>,
    queue: mpsc::UnboundedSender<Queued>,
    /// Free bytes of the record buffer.
    buffer: Arc<Semaphore>,
    /// Wakes the linger task when the first batch opens.
    opened: Arc<Notify>,
    /// This producer's id, for idempotence; asked for on first send.
    producer_id: OnceCell<i64>,
    /// Batches closed, for [`Producer::stats`].
    batches: AtomicU64,
    /// Records in them.
    records: AtomicU64,
}

/// A handle to the producer; clones share its batches and its stream.
#[derive(Clone)]
pub struct Producer {
    shared: Arc<Shared>,
}

impl Producer {
    pub(crate) fn start(client: Client, config: ProducerConfig) -> Producer {
        let (queue, rx) = mpsc::unbounded_channel();
        let buffer = Arc::new(Semaphore::new(
            config.buffer_bytes.clamp(1, Semaphore::MAX_PERMITS),
        ));
        let shared = Arc::new(Shared {
            config: config.clone(),
            client: client.clone(),
            state: Mutex::new(State::default()),
            queue,
            buffer: buffer.clone(),
            opened: Arc::new(Notify::new()),
            producer_id: OnceCell::new(),
            batches: AtomicU64::new(0),
            records: AtomicU64::new(0),
        });
        tokio::spawn(Sender::new(client, config.max_in_flight, buffer).run(rx));
        tokio::spawn(linger(Arc::downgrade(&shared), shared.opened.clone()));
        Producer { shared }
    }

    /// Queues a record for `topic`, partitioned by key (or sticky when
    /// unkeyed). Waits only while the buffer is full. A record whose
    /// `timestamp_ms` is 0 is stamped with the current time.
    pub async fn send(&self, topic: &str, record: Record) -> Result<Delivery> {
        self.enqueue(topic, None, record).await
    }

    /// Queues a record for a given partition.
    pub async fn send_to(&self, topic: &str, partition: u32, record: Record) -> Result<Delivery> {
        self.enqueue(topic, Some(partition), record).await
    }

    async fn enqueue(
        &self,
        topic: &str,
        partition: Option<u32>,
        mut record: Record,
    ) -> Result<Delivery> {
        if record.timestamp_ms == 0 {
            record.timestamp_ms = covet_protocol::now_ms();
        }
        let shared = &self.shared;
        let size = BatchBuilder::new().encoded_len_with(&record);
        let reserve = size.min(shared.config.buffer_bytes).max(1);
        match shared.buffer.try_acquire_many(reserve as u32) {
            Ok(p) => p.forget(),
            Err(_) => shared
                .buffer
                .acquire_many(reserve as u32)
                .await
                .map_err(|_| Error::Closed)?
                .forget(),
        }
        let appended = match self.prepare(topic).await {
            Ok(producer_id) => self.append(topic, partition, &record, reserve, producer_id),
            Err(e) => Err(e),
        };
        if appended.is_err() {
            shared.buffer.add_permits(reserve);
        }
        appended
    }

    /// The producer id (asked for once) and the topic's partition count
    /// (asked for on first use), without holding the lock.
    async fn prepare(&self, topic: &str) -> Result<i64> {
        let client = &self.shared.client;
        let producer_id = *self
            .shared
            .producer_id
            .get_or_try_init(|| async {
                client
                    .router()
                    .retry(|| async {
                        let mut c = client.router().controller().await?;
                        let resp = c.init_producer(InitProducerRequest {}).await?;
                        Ok(resp.into_inner().producer_id)
                    })
                    .await
            })
            .await?;
        if self.lock().topics.contains_key(topic) {
            return Ok(producer_id);
        }
        let info = self.shared.client.describe_topic(topic).await?;
        let count = info.partitions.len().max(1);
        let mut state = self.lock();
        state
            .topics
            .entry(topic.to_string())
            .or_insert_with(|| TopicState {
                name: topic.into(),
                sticky: 0,
                open: (0..count).map(|_| None).collect(),
                next_sequence: vec![0; count],
            });
        Ok(producer_id)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.state.lock().expect("producer state lock")
    }

    /// Appends under the lock; closes and queues the batch when full.
    fn append(
        &self,
        topic: &str,
        explicit: Option<u32>,
        record: &Record,
        reserve: usize,
        producer_id: i64,
    ) -> Result<Delivery> {
        let shared = &self.shared;
        let max = shared.config.max_batch_bytes;
        let mut guard = self.lock();
        let state = &mut *guard;
        let Some(t) = state.topics.get_mut(topic) else {
            return Err(Error::Closed);
        };
        let count = t.open.len() as u32;
        let p = match (explicit, &record.key) {
            (Some(p), _) if p < count => p,
            (Some(p), _) => {
                return Err(Error::InvalidArgument(format!(
                    "topic {topic} has no partition {p}"
                )))
            }
            (None, Some(key)) => partition_for_key(key, count),
            (None, None) => t.sticky,
        };
        let slot = &mut t.open[p as usize];
        if slot
            .as_ref()
            .is_some_and(|b| b.builder.encoded_len_with(record) > max)
        {
            let full = slot.take();
            state.open_batches -= 1;
            close(shared, t, p, full);
        }
        let slot = &mut t.open[p as usize];
        if slot.is_none() {
            let sequence = t.next_sequence[p as usize];
            *slot = Some(OpenBatch {
                builder: BatchBuilder::with_producer(producer_id, 0, sequence),
                ack: Arc::default(),
                reserved: 0,
                deadline: Instant::now() + shared.config.linger,
            });
            state.open_batches += 1;
            if state.open_batches == 1 {
                shared.opened.notify_one();
            }
        }
        let open = slot.as_mut().ok_or(Error::Closed)?;
        open.builder
            .try_push(record)
            .map_err(|e| Error::InvalidArgument(format!("record cannot be batched: {e}")))?;
        open.reserved += reserve;
        let index = open.builder.record_count() - 1;
        let delivery = Delivery::new(open.ack.clone(), t.name.clone(), p, index);
        // Without linger a record goes out at once, batched only with what
        // queued behind a full in-flight window.
        if open.builder.encoded_len() >= max || shared.config.linger.is_zero() {
            let full = slot.take();
            state.open_batches -= 1;
            close(shared, t, p, full);
        }
        Ok(delivery)
    }

    /// Batches and records handed to the broker so far.
    pub fn stats(&self) -> ProducerStats {
        ProducerStats {
            batches: self.shared.batches.load(Ordering::Relaxed),
            records: self.shared.records.load(Ordering::Relaxed),
        }
    }

    /// Closes every open batch and waits until all records sent before the
    /// call are acknowledged or failed.
    pub async fn flush(&self) -> Result<()> {
        let (done, rx) = oneshot::channel();
        {
            let mut state = self.lock();
            close_where(&self.shared, &mut state, |_| true);
            self.shared
                .queue
                .send(Queued::Barrier(done))
                .map_err(|_| Error::Closed)?;
        }
        rx.await.map_err(|_| Error::Closed)
    }
}

/// Queues a closed batch; unkeyed records move on to the next partition.
fn close(shared: &Shared, t: &mut TopicState, partition: u32, open: Option<OpenBatch>) {
    if t.sticky == partition {
        t.sticky = (partition + 1) % t.open.len() as u32;
    }
    let Some(open) = open else { return };
    let count = open.builder.record_count();
    let seq = &mut t.next_sequence[partition as usize];
    *seq = seq.wrapping_add(count as i32);
    match open.builder.build() {
        Some(batch) => {
            shared.batches.fetch_add(1, Ordering::Relaxed);
            shared.records.fetch_add(u64::from(count), Ordering::Relaxed);
            let closed = ClosedBatch {
                topic: t.name.clone(),
                partition,
                batch,
                ack: open.ack,
                reserved: open.reserved,
            };
            if let Err(mpsc::error::SendError(Queued::Batch(b))) =
                shared.queue.send(Queued::Batch(closed))
            {
                b.ack.complete(Err(Error::Closed));
            }
        }
        None => shared.buffer.add_permits(open.reserved),
    }
}

/// Closes the open batches that `due` selects.
fn close_where(shared: &Shared, state: &mut State, due: impl Fn(&OpenBatch) -> bool) {
    for t in state.topics.values_mut() {
        for p in 0..t.open.len() {
            if t.open[p].as_ref().is_some_and(&due) {
                let open = t.open[p].take();
                state.open_batches -= 1;
                close(shared, t, p as u32, open);
            }
        }
    }
}

/// Closes batches whose linger has passed. Sleeps until the oldest open
/// batch is due, or until a batch opens when none was.
async fn linger(shared: std::sync::Weak<Shared>, opened: Arc<Notify>) {
    loop {
        let Some(s) = shared.upgrade() else { return };
        let next = {
            let mut state = s.state.lock().expect("producer state lock");
            let now = Instant::now();
            close_where(&s, &mut state, |b| b.deadline <= now);
            state
                .topics
                .values()
                .flat_map(|t| t.open.iter().flatten())
                .map(|b| b.deadline)
                .min()
        };
        drop(s);
        match next {
            Some(deadline) => tokio::time::sleep_until(deadline).await,
            None => {
                // The producer may be dropped while we wait; the timeout
                // lets this task notice and end.
                let _ = tokio::time::timeout(Duration::from_secs(1), opened.notified()).await;
            }
        }
    }
}
