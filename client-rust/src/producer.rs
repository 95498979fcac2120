//! The batching producer.
//!
//! `send` appends the record to the open batch of its partition, under one
//! short lock and without switching tasks. Batching is *natural*, as in
//! Kafka's accumulator: a batch is closed (its sequence numbers fixed and
//! it handed to the sender) when
//!
//! - its partition has a free in-flight slot — fewer than `max_in_flight`
//!   of the partition's closed batches are unanswered — and it is due: at
//!   once with `linger` 0, else once `linger` has passed since its first
//!   record; or
//! - it is full (the next record would take it past `max_batch_bytes`, or
//!   the topic's own limit if lower);
//!   a full batch closes even when the window is full, and waits in the
//!   sender's queue; or
//! - on `flush`.
//!
//! Otherwise it stays open and keeps filling. When a batch of a partition
//! is answered (acknowledged, or failed for good) the sender frees its slot
//! here, and the partition's open batch, if due, is closed at once, without
//! waiting for the linger timer. So at low load a record goes out
//! immediately, and under load the records that arrive while the window is
//! full go out together, in one batch per freed slot, as large as
//! `max_batch_bytes` allows.
//!
//! Closed batches join one FIFO queue that a sender task drains onto one
//! long-lived produce stream per partition leader (see `sender`). Batches
//! are idempotent (producer id + per-partition sequence, assigned at close
//! and contiguous), so the sender retries them through leader changes
//! without duplicating, and the broker stores each partition's records in
//! the order they were sent.
//!
//! Memory is bounded by `buffer_bytes`: a record takes its encoded size from
//! the buffer when it is sent and gives it back when its batch is answered;
//! `send` waits while the buffer is full. That is the producer's
//! backpressure.
//!
//! Each record's [`Delivery`] resolves with its offset once the broker has
//! committed and applied its batch, or with the error that failed the batch
//! (see `delivery`).
//!
//! Locking: the state lock is taken by `send`, `flush`, the linger task and
//! a batch that ends (in the sender task or a stream's reader, when it
//! frees its slot), each time for a short, non-blocking section, and never
//! while another lock of the producer is held. Nothing that runs under it
//! takes it again: closing a batch only pushes onto an unbounded channel,
//! and what may drop under it (a closed batch the sender can no longer
//! take) does not touch the state; a batch frees its slot only once it is
//! in the sender's hands.

mod delivery;
mod sender;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use covet_protocol::api::InitProducerRequest;
use covet_protocol::batch::{BatchBuilder, Record};
use tokio::sync::{mpsc, oneshot, Notify, OnceCell, Semaphore};
use tokio::time::Instant;

use crate::partitioner::partition_for_key;
use crate::{Client, Error, Result};
pub(crate) use delivery::BatchAck;
pub use delivery::Delivery;
use sender::{Queued, Sender, MAX_IN_FLIGHT};

/// Producer settings.
#[derive(Debug, Clone)]
pub struct ProducerConfig {
    /// How long a batch may wait for more records before it is sent, when
    /// its partition has a free in-flight slot. 0 sends a record at once
    /// when the partition has one; either way, records that arrive while
    /// every slot is taken fill one batch that goes out when a slot frees.
    pub linger: Duration,
    /// Largest batch built, in bytes (a single larger record is sent
    /// alone); a topic whose own limit is lower caps it.
    pub max_batch_bytes: usize,
    /// Batches sent and not yet acknowledged, per partition; at most 128,
    /// the batches per producer a partition remembers to answer a retry
    /// with the original offset. With natural batching it is also how many
    /// batches the records outstanding on a partition are spread over: 5
    /// (Kafka's default too) keeps 256 outstanding records to about 50 a
    /// batch, where 64 would cut them into batches of 4, each costing the
    /// broker a round of its own.
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
            max_in_flight: 5,
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

/// The most a record's encoded size grows between the first place of a
/// batch (timestamp and offset deltas 0) and any other: 9 bytes of
/// timestamp-delta varint, 4 of offset-delta varint, 1 of length prefix.
const SIZE_SLACK: usize = 16;

/// A batch being filled.
struct OpenBatch {
    builder: BatchBuilder,
    ack: Arc<BatchAck>,
    /// Buffer bytes the records hold, returned when the batch is answered.
    reserved: usize,
    /// When the batch is due (its first record's arrival plus `linger`).
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

/// One partition, as the producer sees it.
#[derive(Default)]
struct PartitionState {
    open: Option<OpenBatch>,
    /// Sequence number of the next record closed into a batch.
    next_sequence: i32,
    /// Closed batches the broker has not answered yet (acknowledged or
    /// failed for good); retried ones count until their end.
    unanswered: usize,
}

struct TopicState {
    name: Arc<str>,
    /// The producer's `max_batch_bytes`, or the topic's limit if lower: a
    /// batch over it would be refused (`BATCH_TOO_LARGE`).
    max_batch_bytes: usize,
    /// Partition unkeyed records go to until its batch closes.
    sticky: u32,
    partitions: Vec<PartitionState>,
}

/// Batches under construction. Every change happens under one lock, and a
/// closed batch is queued before the lock is released, so batches of one
/// partition enter the queue in the order their records were sent.
#[derive(Default)]
struct State {
    topics: Vec<TopicState>,
    /// Where each topic is in `topics`.
    by_name: HashMap<String, usize>,
    /// The topic found last: most producers write one topic, or a few in
    /// runs, and comparing a name is cheaper than hashing it.
    last: usize,
    /// The linger task sleeps until a deadline (rather than waiting for a
    /// batch to open): opening a batch need not wake it, since every new
    /// deadline is later than the one it sleeps towards.
    linger_armed: bool,
}

struct Shared {
    config: ProducerConfig,
    /// `config.max_in_flight` within 1..=MAX_IN_FLIGHT, as the sender uses.
    max_in_flight: usize,
    client: Client,
    state: Mutex<State>,
    queue: mpsc::UnboundedSender<Queued>,
    /// Free bytes of the record buffer.
    buffer: Arc<Semaphore>,
    /// Wakes the linger task when a batch opens while it is not armed.
    opened: Arc<Notify>,
    /// This producer's id, for idempotence; asked for on first send.
    producer_id: OnceCell<i64>,
    /// An empty builder, to size records without allocating.
    sizer: BatchBuilder,
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

/// The sender's way back into the producer: frees a partition's in-flight
/// slot when one of its batches is answered. Weak, so that the sender's
/// batches do not keep a dropped producer alive.
#[derive(Clone)]
pub(crate) struct Slots(Weak<Shared>);

impl Slots {
    /// A batch of `topic`/`partition` was answered: frees its slot and
    /// closes the partition's open batch if it is due. Called by the
    /// sender's batches as they end, never under the state lock.
    pub(crate) fn free(&self, topic: &str, partition: u32) {
        let Some(shared) = self.0.upgrade() else {
            return;
        };
        {
            let mut state = shared.lock();
            let Some(t) = state.topic(topic) else {
                return;
            };
            let Some(part) = t.partitions.get_mut(partition as usize) else {
                return;
            };
            part.unanswered = part.unanswered.saturating_sub(1);
            let due = part
                .open
                .as_ref()
                .is_some_and(|b| shared.config.linger.is_zero() || b.deadline <= Instant::now());
            if due {
                close(&shared, t, partition);
            }
        }
        // The guard is gone before the last `Arc` could be: dropping the
        // producer here must not find its own lock held.
        drop(shared);
    }
}

impl Producer {
    pub(crate) fn start(client: Client, config: ProducerConfig) -> Producer {
        let (queue, rx) = mpsc::unbounded_channel();
        let buffer = Arc::new(Semaphore::new(
            config.buffer_bytes.clamp(1, Semaphore::MAX_PERMITS),
        ));
        let max_in_flight = config.max_in_flight.clamp(1, MAX_IN_FLIGHT);
        let shared = Arc::new(Shared {
            config: config.clone(),
            max_in_flight,
            client: client.clone(),
            state: Mutex::new(State::default()),
            queue,
            buffer: buffer.clone(),
            opened: Arc::new(Notify::new()),
            producer_id: OnceCell::new(),
            sizer: BatchBuilder::new(),
            batches: AtomicU64::new(0),
            records: AtomicU64::new(0),
        });
        let slots = Slots(Arc::downgrade(&shared));
        tokio::spawn(Sender::new(client, max_in_flight, buffer, slots).run(rx));
        if !config.linger.is_zero() {
            tokio::spawn(linger(Arc::downgrade(&shared), shared.opened.clone()));
        }
        Producer { shared }
    }

    /// Queues a record for `topic`, partitioned by key (or sticky when
    /// unkeyed). Waits only while the buffer is full (and, on a topic's
    /// first use, for its metadata). A record whose `timestamp_ms` is 0 is
    /// stamped with the current time.
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
        // The record's encoded size in a batch (give or take a few bytes of
        // varints), without building anything.
        let size = shared.sizer.encoded_len_with(&record) - shared.sizer.encoded_len();
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
        // The common case takes the lock once and does not yield: the
        // producer id is known and the topic has been used before.
        let appended = match shared.producer_id.get() {
            Some(&id) => self.append(topic, partition, &record, (size, reserve), id),
            None => Ok(None),
        };
        let appended = match appended {
            Ok(Some(delivery)) => Ok(delivery),
            Ok(None) => match self.prepare(topic).await {
                Ok(id) => self
                    .append(topic, partition, &record, (size, reserve), id)
                    .and_then(|d| d.ok_or(Error::Closed)),
                Err(e) => Err(e),
            },
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
        if self.shared.lock().topic(topic).is_some() {
            return Ok(producer_id);
        }
        let info = self.shared.client.describe_topic(topic).await?;
        let count = info.partitions.len().max(1);
        let limit = info
            .config
            .as_ref()
            .map(|c| c.max_batch_bytes as usize)
            .filter(|&m| m > 0)
            .unwrap_or(usize::MAX);
        let mut state = self.shared.lock();
        if state.topic(topic).is_none() {
            let at = state.topics.len();
            state.topics.push(TopicState {
                name: topic.into(),
                max_batch_bytes: self.shared.config.max_batch_bytes.min(limit),
                sticky: 0,
                partitions: (0..count).map(|_| PartitionState::default()).collect(),
            });
            state.by_name.insert(topic.to_string(), at);
        }
        Ok(producer_id)
    }

    /// Appends under the lock and closes what the rules close (see the
    /// module docs); `None` if the topic is not known yet. `size` is the
    /// record's encoded size, `reserve` the buffer bytes it holds.
    fn append(
        &self,
        topic: &str,
        explicit: Option<u32>,
        record: &Record,
        (size, reserve): (usize, usize),
        producer_id: i64,
    ) -> Result<Option<Delivery>> {
        let shared = &*self.shared;
        let mut guard = shared.lock();
        let state = &mut *guard;
        let Some(at) = state.find(topic) else {
            return Ok(None);
        };
        let t = &mut state.topics[at];
        let max = t.max_batch_bytes;
        let count = t.partitions.len() as u32;
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
        let part = &mut t.partitions[p as usize];
        // `size` is the record's size with the varints of the first record
        // of a batch; later ones take at most SIZE_SLACK more.
        if part
            .open
            .as_ref()
            .is_some_and(|b| b.builder.encoded_len() + size + SIZE_SLACK > max)
        {
            // Full: it goes now, slot or not.
            close(shared, t, p);
        }
        let part = &mut t.partitions[p as usize];
        let open = match &mut part.open {
            Some(open) => open,
            None => {
                if !shared.config.linger.is_zero() && !state.linger_armed {
                    state.linger_armed = true;
                    shared.opened.notify_one();
                }
                part.open.insert(OpenBatch {
                    builder: BatchBuilder::with_producer(producer_id, 0, part.next_sequence),
                    ack: Arc::new(BatchAck::new(t.name.clone(), p)),
                    reserved: 0,
                    deadline: Instant::now() + shared.config.linger,
                })
            }
        };
        open.builder
            .try_push(record)
            .map_err(|e| Error::InvalidArgument(format!("record cannot be batched: {e}")))?;
        open.reserved += reserve;
        let delivery = Delivery::new(open.ack.clone(), open.builder.record_count() - 1);
        let full = open.builder.encoded_len() >= max;
        // With linger 0 a record is due at once; with a linger the timer
        // (or a freed slot) closes the batch once it is due.
        let free = part.unanswered < shared.max_in_flight;
        if full || (free && shared.config.linger.is_zero()) {
            close(shared, t, p);
        }
        Ok(Some(delivery))
    }

    /// Batches and records handed to the broker so far.
    pub fn stats(&self) -> ProducerStats {
        ProducerStats {
            batches: self.shared.batches.load(Ordering::Relaxed),
            records: self.shared.records.load(Ordering::Relaxed),
        }
    }

    /// Closes every open batch (due or not, slot or not) and waits until
    /// all records sent before the call are acknowledged or failed.
    pub async fn flush(&self) -> Result<()> {
        let (done, rx) = oneshot::channel();
        {
            let mut state = self.shared.lock();
            close_where(&self.shared, &mut state, |_, _| true);
            self.shared
                .queue
                .send(Queued::Barrier(done))
                .map_err(|_| Error::Closed)?;
        }
        rx.await.map_err(|_| Error::Closed)
    }
}

impl State {
    /// Where topic `name` is in `topics`.
    fn find(&mut self, name: &str) -> Option<usize> {
        if self.topics.get(self.last).is_none_or(|t| &*t.name != name) {
            self.last = *self.by_name.get(name)?;
        }
        Some(self.last)
    }

    fn topic(&mut self, name: &str) -> Option<&mut TopicState> {
        let at = self.find(name)?;
        self.topics.get_mut(at)
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("producer state lock")
    }
}

impl Drop for Shared {
    /// The last handle is gone: what is still open is sent as on `flush`
    /// (the sender runs until every queued batch is answered), so no
    /// delivery is left waiting forever. `get_mut`: no lock is taken.
    fn drop(&mut self) {
        let Ok(state) = self.state.get_mut() else {
            return;
        };
        let mut topics = std::mem::take(&mut state.topics);
        for t in topics.iter_mut() {
            for p in 0..t.partitions.len() as u32 {
                close(self, t, p);
            }
        }
    }
}

/// Closes the partition's open batch, if any: fixes its sequence numbers,
/// builds it and queues it for the sender. Unkeyed records move on to the
/// next partition.
fn close(shared: &Shared, t: &mut TopicState, partition: u32) {
    if t.sticky == partition {
        t.sticky = (partition + 1) % t.partitions.len() as u32;
    }
    let part = &mut t.partitions[partition as usize];
    let Some(open) = part.open.take() else {
        return;
    };
    let count = open.builder.record_count();
    // The batch was started at `next_sequence`: a partition has one open
    // batch at a time, opened after the previous one closed, so its
    // sequences are contiguous.
    part.next_sequence = part.next_sequence.wrapping_add(count as i32);
    let Some(batch) = open.builder.build() else {
        shared.buffer.add_permits(open.reserved);
        return;
    };
    shared.batches.fetch_add(1, Ordering::Relaxed);
    shared
        .records
        .fetch_add(u64::from(count), Ordering::Relaxed);
    part.unanswered += 1;
    let closed = ClosedBatch {
        topic: t.name.clone(),
        partition,
        batch,
        ack: open.ack,
        reserved: open.reserved,
    };
    if let Err(mpsc::error::SendError(Queued::Batch(b))) = shared.queue.send(Queued::Batch(closed))
    {
        // The sender is gone: nothing will answer, so nothing holds the
        // slot. No lock is taken on this path (we hold the state lock).
        part.unanswered -= 1;
        shared.buffer.add_permits(b.reserved);
        b.ack.complete(Err(Error::Closed));
    }
}

/// Closes the open batches that `due` selects (given the batch and whether
/// its partition has a free slot).
fn close_where(shared: &Shared, state: &mut State, due: impl Fn(&OpenBatch, bool) -> bool) {
    for t in state.topics.iter_mut() {
        for p in 0..t.partitions.len() {
            let part = &t.partitions[p];
            let free = part.unanswered < shared.max_in_flight;
            if part.open.as_ref().is_some_and(|b| due(b, free)) {
                close(shared, t, p as u32);
            }
        }
    }
}

/// Closes the batches whose linger has passed, on partitions with a free
/// slot; a due batch on a full window stays open until a slot frees
/// (`Slots::free` closes it then). Sleeps until the next batch not yet due
/// is, or until a batch opens when none is pending.
async fn linger(shared: Weak<Shared>, opened: Arc<Notify>) {
    loop {
        let Some(s) = shared.upgrade() else { return };
        let next = {
            let mut state = s.lock();
            let now = Instant::now();
            close_where(&s, &mut state, |b, free| free && b.deadline <= now);
            let next = state
                .topics
                .iter()
                .flat_map(|t| t.partitions.iter())
                .filter_map(|p| p.open.as_ref())
                .map(|b| b.deadline)
                .filter(|&d| d > now)
                .min();
            state.linger_armed = next.is_some();
            next
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
