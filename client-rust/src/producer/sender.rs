//! The producer's sender task: sends closed batches to each partition's
//! leader over one long-lived produce stream per node, and retries batches
//! that failed for a retriable reason (a leader change, a broken or silent
//! stream) on the new leader.
//!
//! Each partition has its own window of `max_in_flight` batches: a
//! partition whose leader is gone holds only its own slots, and the others
//! keep flowing. Batches wait in their partition's queue for a slot, in
//! order. The producer hands over a batch only when its partition has a
//! free slot by the producer's own count (closed batches not answered yet,
//! retried ones included), or when the batch is full or flushed, so that
//! queue is short: records that arrive while the window is full wait in
//! the producer's open batch instead, and leave together. When a batch
//! ends (acknowledged, or failed for good) it tells the producer
//! (`Slots::free`, before its deliveries resolve), which may close the
//! partition's open batch at once.
//!
//! Retrying is safe because batches are idempotent: each carries the
//! producer id, a producer epoch and a per-partition sequence number, and a
//! partition stores a sequence once, answering a repeat with the original
//! offset (the broker's rules are in `broker/src/state/producers.rs` and
//! `docs/protocol.md`). A batch that arrives ahead of a predecessor still
//! being retried is refused as out of sequence and retried itself, after
//! the predecessor, so a partition's records are stored in the order they
//! were sent.
//!
//! When a batch fails for good (refused for a reason retrying cannot fix,
//! or its retries ran out), its sequence numbers leave a gap the broker
//! would wait for forever. The partition then moves to the next producer
//! epoch, in which the broker lets a batch skip ahead. Skipping is safe
//! only over batches that are given up on, never over a healthy one still
//! in flight, so the move is made in three steps: the partition is
//! *fenced* (nothing more is sent), every batch of it still out on a stream
//! comes back (acknowledged, or failed and queued for retry), then the
//! epoch moves and the lowest batch left goes first and alone; only once it
//! is acknowledged do the others follow, in order.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use covet_protocol::api::{ProduceRequest, ProduceResponse};
use covet_protocol::batch;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;

use super::{ClosedBatch, Slots};
use crate::routing::RETRY_DEADLINE;
use crate::{Client, Error};

const BACKOFF_MIN: Duration = Duration::from_millis(20);
const BACKOFF_MAX: Duration = Duration::from_millis(500);
/// How long in-flight batches may go without any answer on their stream.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
/// The most batches a partition may have unanswered: the number of recent
/// batches per producer a partition remembers to answer retries (`RECENT`
/// in `broker/src/state/producers.rs`).
pub(crate) const MAX_IN_FLIGHT: usize = 128;
/// Metadata is refreshed at most this often for retries.
const REFRESH_EVERY: Duration = Duration::from_millis(100);

/// What the queue carries.
pub(crate) enum Queued {
    Batch(ClosedBatch),
    /// Answered once every batch queued before it is answered.
    Barrier(oneshot::Sender<()>),
}

type PartitionKey = (Arc<str>, u32);

/// A batch between being taken from the queue and being answered. Dropping
/// it gives its records' bytes back to the producer's buffer and frees its
/// partition's slot, whatever the outcome.
struct InFlight {
    batch: ClosedBatch,
    /// Order of arrival, for flush barriers.
    seq: u64,
    attempts: u32,
    /// When the first attempt was made; retries stop after RETRY_DEADLINE.
    since: Instant,
    /// When the current attempt was sent.
    sent_at: Instant,
    buffer: Arc<Semaphore>,
    freed: mpsc::UnboundedSender<Freed>,
    /// Whether the batch was given up on (fences its partition).
    failed: bool,
    /// Whether it is out on a stream (and holds a slot of its partition).
    on_stream: bool,
    /// Whether it is the one batch a recovering partition sent first.
    probe: bool,
    /// Whether the batch still counts in the producer's window of its
    /// partition (see `release_slot`).
    slot_held: bool,
    slots: Slots,
}

/// A batch's end, as the sender hears of it.
struct Freed {
    key: PartitionKey,
    seq: u64,
    failed: bool,
    on_stream: bool,
    probe: bool,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.release_slot();
        self.buffer.add_permits(self.batch.reserved);
        let _ = self.freed.send(Freed {
            key: (self.batch.topic.clone(), self.batch.partition),
            seq: self.seq,
            failed: self.failed,
            on_stream: self.on_stream,
            probe: self.probe,
        });
    }
}

impl InFlight {
    fn complete(mut self, outcome: crate::Result<u64>) {
        self.failed = outcome.is_err();
        self.release_slot();
        self.batch.ack.complete(outcome);
    }

    /// Tells the producer the batch has ended, before its records'
    /// deliveries resolve: a caller that awaits one record and sends the
    /// next finds the slot free, and the record goes out at once. This
    /// takes the producer's state lock, which is sound because a batch
    /// ends (and an `InFlight` drops) only in the sender task or a
    /// stream's reader, never under that lock.
    fn release_slot(&mut self) {
        if std::mem::take(&mut self.slot_held) {
            self.slots.free(&self.batch.topic, self.batch.partition);
        }
    }

    fn key(&self) -> PartitionKey {
        (self.batch.topic.clone(), self.batch.partition)
    }
}

/// Batches awaiting an answer on one stream, by request id (so a broken
/// stream's batches are retried in the order they were sent); `None` once
/// the stream has ended, so nothing is added that no one would answer.
type InFlightMap = Arc<Mutex<Option<BTreeMap<u64, InFlight>>>>;

/// A produce stream to one node.
struct Stream {
    tx: mpsc::Sender<ProduceRequest>,
    in_flight: InFlightMap,
}

/// One partition's window.
///
/// After a failure the partition *recovers*: its failed batches wait in
/// the order they were sent, the first is sent alone (the probe), and only
/// when it is acknowledged do the rest follow, in order, on one stream.
/// Sending them all at once after a leader change would have most of them
/// refused as out of sequence, again and again.
#[derive(Default)]
struct Partition {
    /// Batches out on a stream.
    in_flight: usize,
    /// New batches not sent yet.
    waiting: VecDeque<InFlight>,
    /// Failed batches to send again, by arrival number (the order they
    /// were sent in, and their sequence order).
    retry: BTreeMap<u64, InFlight>,
    /// A probe is scheduled or out.
    probing: bool,
    probe_attempts: u32,
    /// The producer epoch batches of this partition are sent with.
    epoch: i16,
    /// A batch was given up on: nothing is sent until every batch out on a
    /// stream is back, then the epoch moves.
    fenced: bool,
    /// The epoch just moved and no batch has gone out in it: the next one
    /// goes alone, as a probe.
    solo: bool,
    /// Every epoch is used up: the partition's batches fail at once.
    exhausted: bool,
    /// The node whose stream the batches out (if any) were sent on.
    node: u64,
}

pub(crate) struct Sender {
    client: Client,
    max_in_flight: usize,
    /// Given to each batch, to tell the producer when it ends.
    slots: Slots,
    buffer: Arc<Semaphore>,
    streams: HashMap<u64, Stream>,
    partitions: HashMap<PartitionKey, Partition>,
    next_id: u64,
    next_seq: u64,
    /// Arrival numbers of batches not answered yet.
    outstanding: BTreeSet<u64>,
    barriers: Vec<(u64, oneshot::Sender<()>)>,
    last_refresh: Option<Instant>,
    retry_tx: mpsc::UnboundedSender<(InFlight, Error)>,
    retry_rx: mpsc::UnboundedReceiver<(InFlight, Error)>,
    probe_tx: mpsc::UnboundedSender<PartitionKey>,
    probe_rx: mpsc::UnboundedReceiver<PartitionKey>,
    freed_tx: mpsc::UnboundedSender<Freed>,
    freed_rx: mpsc::UnboundedReceiver<Freed>,
}

impl Sender {
    pub(crate) fn new(
        client: Client,
        max_in_flight: usize,
        buffer: Arc<Semaphore>,
        slots: Slots,
    ) -> Sender {
        let (retry_tx, retry_rx) = mpsc::unbounded_channel();
        let (probe_tx, probe_rx) = mpsc::unbounded_channel();
        let (freed_tx, freed_rx) = mpsc::unbounded_channel();
        Sender {
            client,
            max_in_flight: max_in_flight.clamp(1, MAX_IN_FLIGHT),
            slots,
            buffer,
            streams: HashMap::new(),
            partitions: HashMap::new(),
            next_id: 0,
            next_seq: 0,
            outstanding: BTreeSet::new(),
            barriers: Vec::new(),
            last_refresh: None,
            retry_tx,
            retry_rx,
            probe_tx,
            probe_rx,
            freed_tx,
            freed_rx,
        }
    }

    pub(crate) async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Queued>) {
        let mut queue_open = true;
        loop {
            tokio::select! {
                biased;
                Some(freed) = self.freed_rx.recv() => self.freed(freed).await,
                Some((flight, error)) = self.retry_rx.recv() => self.failed(flight, error),
                Some(key) = self.probe_rx.recv() => self.probe(key).await,
                item = rx.recv(), if queue_open => match item {
                    Some(Queued::Batch(b)) => self.enqueue(b).await,
                    Some(Queued::Barrier(done)) => {
                        let upto = self.next_seq;
                        self.barriers.push((upto, done));
                        self.release_barriers();
                    }
                    None => queue_open = false,
                },
                else => return,
            }
            if !queue_open && self.outstanding.is_empty() {
                return;
            }
        }
    }

    /// Takes a closed batch: sends it if its partition has a free slot,
    /// else queues it behind the others.
    async fn enqueue(&mut self, batch: ClosedBatch) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.outstanding.insert(seq);
        let now = Instant::now();
        let flight = InFlight {
            batch,
            seq,
            attempts: 0,
            since: now,
            sent_at: now,
            buffer: self.buffer.clone(),
            freed: self.freed_tx.clone(),
            failed: false,
            on_stream: false,
            probe: false,
            slot_held: true,
            slots: self.slots.clone(),
        };
        let key = flight.key();
        let part = self.partitions.entry(key.clone()).or_default();
        if part.exhausted {
            return flight.complete(Err(epochs_exhausted()));
        }
        part.waiting.push_back(flight);
        self.fill(&key).await;
    }

    /// Sends waiting batches while the partition has free slots and is not
    /// recovering or fenced.
    async fn fill(&mut self, key: &PartitionKey) {
        loop {
            let Some(part) = self.partitions.get_mut(key) else {
                return;
            };
            if part.fenced
                || part.probing
                || !part.retry.is_empty()
                || part.in_flight >= self.max_in_flight
            {
                return;
            }
            let Some(mut next) = part.waiting.pop_front() else {
                return;
            };
            if std::mem::take(&mut part.solo) {
                // The first batch of a new epoch: if others went with it
                // and it were held up (sent to a stale leader), they would
                // skip over it.
                part.probing = true;
                next.probe = true;
                return self.send(next).await;
            }
            self.send(next).await;
        }
    }

    /// A batch was answered (or given up on).
    async fn freed(&mut self, f: Freed) {
        self.outstanding.remove(&f.seq);
        self.release_barriers();
        let part = self.partitions.entry(f.key.clone()).or_default();
        if f.on_stream {
            part.in_flight = part.in_flight.saturating_sub(1);
        }
        if f.probe {
            part.probing = false;
        }
        if f.failed {
            // The broker will never see this batch's sequence numbers; the
            // partition's next batches skip them in a new epoch.
            part.fenced = true;
        } else if f.probe && !part.fenced {
            // The leader answers: send what failed, in order, then the
            // rest.
            part.probe_attempts = 0;
            let retry = std::mem::take(&mut part.retry);
            for (_, flight) in retry {
                self.send(flight).await;
            }
        }
        self.settle(&f.key);
        self.schedule_probe(&f.key);
        self.fill(&f.key).await;
    }

    /// A batch came back with an error: it fails for good (and the
    /// partition is fenced when its end is heard of, in `freed`), or waits
    /// in its partition's retry queue for the probe.
    fn failed(&mut self, mut flight: InFlight, error: Error) {
        let key = flight.key();
        let part = self.partitions.entry(key.clone()).or_default();
        if flight.on_stream {
            flight.on_stream = false;
            part.in_flight = part.in_flight.saturating_sub(1);
        }
        if std::mem::take(&mut flight.probe) {
            part.probing = false;
        }
        if !error.is_retriable() || flight.since.elapsed() > RETRY_DEADLINE {
            return flight.complete(Err(error));
        }
        tracing::debug!(topic = %key.0, partition = key.1, error = %error, "batch will be retried");
        part.retry.insert(flight.seq, flight);
        self.settle(&key);
        self.schedule_probe(&key);
    }

    /// Moves a fenced partition to its next epoch once none of its batches
    /// is out on a stream: every sequence number below the lowest batch it
    /// still holds is then acknowledged or given up on, so that batch may
    /// skip the gap, and it goes first and alone.
    fn settle(&mut self, key: &PartitionKey) {
        let Some(part) = self.partitions.get_mut(key) else {
            return;
        };
        if !part.fenced || part.in_flight > 0 {
            return;
        }
        part.fenced = false;
        let Some(epoch) = part.epoch.checked_add(1) else {
            // 32,767 batches of this partition given up on: the broker
            // would refuse a wrapped (lower) epoch, so fail openly.
            part.exhausted = true;
            let held = std::mem::take(&mut part.retry).into_values();
            for f in held.chain(std::mem::take(&mut part.waiting)) {
                f.complete(Err(epochs_exhausted()));
            }
            return;
        };
        tracing::debug!(topic = %key.0, partition = key.1, epoch, "moving to a new producer epoch");
        part.epoch = epoch;
        part.solo = true;
        part.probe_attempts = 0;
        self.schedule_probe(key);
    }

    /// Sends the partition's lowest failed batch alone after a backoff, once
    /// none of its batches is out on a stream (so the probe is not
    /// overtaken, and goes to one node at a time).
    fn schedule_probe(&mut self, key: &PartitionKey) {
        let Some(part) = self.partitions.get_mut(key) else {
            return;
        };
        if part.fenced || part.probing || part.retry.is_empty() || part.in_flight > 0 {
            return;
        }
        part.probing = true;
        part.probe_attempts += 1;
        let backoff =
            (BACKOFF_MIN * 2u32.saturating_pow(part.probe_attempts.min(8))).min(BACKOFF_MAX);
        let probe = self.probe_tx.clone();
        let key = key.clone();
        tokio::spawn(async move {
            tokio::time::sleep(backoff).await;
            let _ = probe.send(key);
        });
    }

    async fn probe(&mut self, key: PartitionKey) {
        let stale = self
            .last_refresh
            .is_none_or(|t| t.elapsed() >= REFRESH_EVERY);
        if stale {
            let _ = self.client.router().refresh().await;
            self.last_refresh = Some(Instant::now());
        }
        let Some(part) = self.partitions.get_mut(&key) else {
            return;
        };
        if part.fenced {
            // Scheduled before the fence; the epoch move schedules another.
            part.probing = false;
            return;
        }
        match part.retry.pop_first() {
            Some((_, mut flight)) => {
                part.solo = false;
                flight.probe = true;
                self.send(flight).await;
            }
            None => {
                part.probing = false;
                self.fill(&key).await;
            }
        }
    }

    fn release_barriers(&mut self) {
        let oldest = self.outstanding.first().copied().unwrap_or(u64::MAX);
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.barriers)
            .into_iter()
            .partition(|(upto, _)| oldest >= *upto);
        self.barriers = waiting;
        for (_, done) in ready {
            let _ = done.send(());
        }
    }

    /// Sends a batch to its partition's leader, in the partition's current
    /// epoch; or, if the leader moved while batches of the partition are
    /// still out on the old leader's stream, holds it in the retry queue
    /// until they are back.
    ///
    /// A partition's batches are out to one node at a time so that a batch
    /// stored but not answered is always among the partition's last
    /// `max_in_flight` stored batches (one stream answers in order), which
    /// the broker remembers: its retry is answered with its offset. Were
    /// newer batches sent to a new leader while an older one hung on a
    /// paused one, any number of them could be stored meanwhile, and the
    /// older one's retry would fall out of the broker's memory.
    async fn send(&mut self, mut flight: InFlight) {
        let b = &flight.batch;
        let node = match self.client.router().leader(&b.topic, b.partition).await {
            Ok((node, _)) => node,
            Err(e) => return self.requeue(flight, e),
        };
        let part = self.partitions.entry(flight.key()).or_default();
        if part.in_flight > 0 && part.node != node {
            if std::mem::take(&mut flight.probe) {
                part.probing = false;
            }
            part.retry.insert(flight.seq, flight);
            return;
        }
        part.node = node;
        part.in_flight += 1;
        flight.on_stream = true;
        flight.sent_at = Instant::now();
        flight.attempts += 1;
        let epoch = part.epoch;
        if let Ok(h) = batch::read_header(&flight.batch.batch) {
            if h.producer_id >= 0 && h.producer_epoch != epoch {
                if let Ok(b) = batch::with_producer_epoch(&flight.batch.batch, epoch) {
                    flight.batch.batch = b;
                }
            }
        }
        let (tx, in_flight) = match self.stream(node).await {
            Ok(s) => s,
            Err(e) => return self.requeue(flight, e),
        };
        let id = self.next_id;
        self.next_id += 1;
        let req = ProduceRequest {
            request_id: id,
            topic: flight.batch.topic.to_string(),
            partition: flight.batch.partition,
            batch: flight.batch.batch.clone(),
        };
        {
            let mut map = in_flight.lock().expect("in-flight lock");
            match map.as_mut() {
                Some(m) => {
                    m.insert(id, flight);
                }
                None => {
                    drop(map);
                    self.streams.remove(&node);
                    return self.requeue(flight, Error::Transport("produce stream closed".into()));
                }
            }
        }
        if tx.send(req).await.is_err() {
            self.streams.remove(&node);
            let taken = in_flight
                .lock()
                .expect("in-flight lock")
                .as_mut()
                .and_then(|m| m.remove(&id));
            // Otherwise the reader took it and hands it back itself.
            if let Some(f) = taken {
                self.requeue(f, Error::Transport("produce stream closed".into()));
            }
        }
    }

    fn requeue(&self, flight: InFlight, error: Error) {
        hand_back(&self.retry_tx, flight, error);
    }

    /// The open produce stream to `node`, opening one if there is none or
    /// the last one broke.
    async fn stream(
        &mut self,
        node: u64,
    ) -> crate::Result<(mpsc::Sender<ProduceRequest>, InFlightMap)> {
        if let Some(s) = self.streams.get(&node) {
            if !s.tx.is_closed() {
                return Ok((s.tx.clone(), s.in_flight.clone()));
            }
        }
        let mut rpc = self
            .client
            .router()
            .node(node)
            .ok_or_else(|| Error::Transport(format!("no address for node {node}")))?;
        tracing::debug!(node, "opening produce stream");
        let (tx, rx) = mpsc::channel(1024);
        let responses = rpc.produce(ReceiverStream::new(rx)).await?.into_inner();
        let in_flight: InFlightMap = Arc::new(Mutex::new(Some(BTreeMap::new())));
        tokio::spawn(read_responses(
            responses,
            in_flight.clone(),
            self.retry_tx.clone(),
        ));
        self.streams.insert(
            node,
            Stream {
                tx: tx.clone(),
                in_flight: in_flight.clone(),
            },
        );
        Ok((tx, in_flight))
    }
}

/// Resolves batches as responses arrive and hands retriable failures back
/// to the sender; when the stream ends, or stays silent while batches wait,
/// hands back whatever is still in flight on it, in the order it was sent.
async fn read_responses(
    mut responses: tonic::Streaming<ProduceResponse>,
    in_flight: InFlightMap,
    retry: mpsc::UnboundedSender<(InFlight, Error)>,
) {
    let end = loop {
        // Batches are out and nothing comes back: the leader is paused or
        // cut off. After RESPONSE_TIMEOUT without any answer while a batch
        // waits, give up on this stream; its batches are retried
        // (idempotently) wherever the leader is now.
        let next = match tokio::time::timeout(RESPONSE_TIMEOUT, responses.message()).await {
            Ok(r) => r,
            Err(_) => {
                let oldest = in_flight
                    .lock()
                    .expect("in-flight lock")
                    .as_ref()
                    .and_then(|m| m.values().map(|f| f.sent_at).min());
                match oldest {
                    Some(t) if t.elapsed() >= RESPONSE_TIMEOUT => {
                        break Error::Transport("leader stopped answering".into());
                    }
                    _ => continue,
                }
            }
        };
        match next {
            Ok(Some(resp)) => {
                let flight = in_flight
                    .lock()
                    .expect("in-flight lock")
                    .as_mut()
                    .and_then(|m| m.remove(&resp.request_id));
                let Some(f) = flight else { continue };
                match &resp.error {
                    None => f.complete(Ok(resp.base_offset)),
                    Some(e) => {
                        let error = Error::from_api(e);
                        if error.is_retriable() {
                            hand_back(&retry, f, error);
                        } else {
                            f.complete(Err(error));
                        }
                    }
                }
            }
            Ok(None) => break Error::Transport("produce stream ended".into()),
            Err(status) => break Error::from(status),
        }
    };
    let rest = in_flight.lock().expect("in-flight lock").take();
    for f in rest.into_iter().flat_map(|m| m.into_values()) {
        // The outcome is unknown: the batch may have been applied. The
        // retry is deduplicated by its sequence number.
        hand_back(&retry, f, end.clone());
    }
}

fn epochs_exhausted() -> Error {
    Error::Protocol("producer epochs of this partition are used up; start a new producer".into())
}

fn hand_back(retry: &mpsc::UnboundedSender<(InFlight, Error)>, f: InFlight, e: Error) {
    if let Err(mpsc::error::SendError((f, e))) = retry.send((f, e)) {
        f.complete(Err(e));
    }
}
