//! The producer's sender task: sends closed batches, in queue order, to
//! each partition's leader over one long-lived produce stream per node,
//! and retries batches that failed for a retriable reason (a leader change,
//! a broken stream) on the new leader.
//!
//! Retrying is safe because batches are idempotent: each carries the
//! producer id and a per-partition sequence number, and a partition applies
//! a sequence once, answering a repeat with the original offset. A batch
//! that arrives ahead of a predecessor still being retried is refused as out
//! of sequence and retried itself, so a partition's records are stored in
//! the order they were sent.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use covet_protocol::api::{ProduceRequest, ProduceResponse};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;

use super::ClosedBatch;
use crate::routing::RETRY_DEADLINE;
use crate::{Client, Error};

const BACKOFF_MIN: Duration = Duration::from_millis(20);
/// How long in-flight batches may go without any answer on their stream.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_MAX: Duration = Duration::from_millis(500);

/// What the queue carries.
pub(crate) enum Queued {
    Batch(ClosedBatch),
    /// Answered once every batch queued before it is answered.
    Barrier(oneshot::Sender<()>),
}

/// A batch sent and not yet answered. Dropping it gives its records'
/// bytes back to the producer's buffer, whatever the outcome.
struct InFlight {
    batch: ClosedBatch,
    attempts: u32,
    /// When the first attempt was made; retries stop after RETRY_DEADLINE.
    since: Instant,
    /// When the current attempt was sent.
    sent_at: Instant,
    buffer: Arc<Semaphore>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.buffer.add_permits(self.batch.reserved);
    }
}

impl InFlight {
    fn complete(self, outcome: crate::Result<u64>) {
        self.batch.ack.complete(outcome);
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

pub(crate) struct Sender {
    client: Client,
    max_in_flight: u32,
    permits: Arc<Semaphore>,
    buffer: Arc<Semaphore>,
    streams: HashMap<u64, Stream>,
    next_id: u64,
    retry_tx: mpsc::UnboundedSender<(InFlight, Error)>,
    retry_rx: mpsc::UnboundedReceiver<(InFlight, Error)>,
}

impl Sender {
    pub(crate) fn new(client: Client, max_in_flight: usize, buffer: Arc<Semaphore>) -> Sender {
        let max_in_flight = max_in_flight.clamp(1, 1 << 16) as u32;
        let (retry_tx, retry_rx) = mpsc::unbounded_channel();
        Sender {
            client,
            max_in_flight,
            permits: Arc::new(Semaphore::new(max_in_flight as usize)),
            buffer,
            streams: HashMap::new(),
            next_id: 0,
            retry_tx,
            retry_rx,
        }
    }

    pub(crate) async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Queued>) {
        loop {
            tokio::select! {
                biased;
                // Retries first: they hold the earliest sequence numbers.
                Some((flight, error)) = self.retry_rx.recv() => self.retry(flight, error).await,
                item = rx.recv() => match item {
                    Some(Queued::Batch(b)) => self.send_new(b).await,
                    Some(Queued::Barrier(done)) => self.barrier(done).await,
                    None => return,
                },
            }
        }
    }

    /// Waits until nothing is in flight, still serving retries meanwhile.
    async fn barrier(&mut self, done: oneshot::Sender<()>) {
        let (permits, all) = (self.permits.clone(), self.max_in_flight);
        loop {
            tokio::select! {
                biased;
                Some((flight, error)) = self.retry_rx.recv() => self.retry(flight, error).await,
                held = permits.acquire_many(all) => {
                    drop(held);
                    let _ = done.send(());
                    return;
                }
            }
        }
    }

    async fn send_new(&mut self, batch: ClosedBatch) {
        // Retries are served while waiting for a slot: the batches waiting
        // to be retried hold slots themselves, and only this task sends them.
        let permits = self.permits.clone();
        let permit = loop {
            tokio::select! {
                biased;
                Some((flight, error)) = self.retry_rx.recv() => self.retry(flight, error).await,
                permit = permits.clone().acquire_owned() => break permit,
            }
        };
        let Ok(permit) = permit else {
            return batch.ack.complete(Err(Error::Closed));
        };
        let flight = InFlight {
            batch,
            attempts: 0,
            since: Instant::now(),
            sent_at: Instant::now(),
            buffer: self.buffer.clone(),
            _permit: permit,
        };
        self.send(flight).await;
    }

    /// Sends again after a retriable failure, or gives up past the
    /// deadline.
    async fn retry(&mut self, mut flight: InFlight, error: Error) {
        if !error.is_retriable() || flight.since.elapsed() > RETRY_DEADLINE {
            return flight.complete(Err(error));
        }
        tracing::debug!(topic = %flight.batch.topic, partition = flight.batch.partition, error = %error, "retrying batch");
        flight.attempts += 1;
        let backoff = (BACKOFF_MIN * 2u32.saturating_pow(flight.attempts.min(8))).min(BACKOFF_MAX);
        tokio::time::sleep(backoff).await;
        if matches!(
            error,
            Error::Broker { .. } | Error::Transport(_) | Error::Connect { .. }
        ) {
            let _ = self.client.router().refresh().await;
        }
        self.send(flight).await;
    }

    /// Sends a batch to its partition's leader.
    async fn send(&mut self, mut flight: InFlight) {
        flight.sent_at = Instant::now();
        let b = &flight.batch;
        let node = match self.client.router().leader(&b.topic, b.partition).await {
            Ok((node, _)) => node,
            Err(e) => return self.requeue(flight, e),
        };
        let (tx, in_flight) = match self.stream(node).await {
            Ok(s) => s,
            Err(e) => return self.requeue(flight, e),
        };
        let id = self.next_id;
        tracing::trace!(
            node,
            id,
            partition = flight.batch.partition,
            "sending batch"
        );
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
        let sent = tx.send(req).await;
        tracing::trace!(node, id, ok = sent.is_ok(), "batch handed to stream");
        if sent.is_err() {
            self.streams.remove(&node);
            let taken = in_flight
                .lock()
                .expect("in-flight lock")
                .as_mut()
                .and_then(|m| m.remove(&id));
            // Otherwise the reader took it and will requeue it.
            if let Some(f) = taken {
                self.requeue(f, Error::Transport("produce stream closed".into()));
            }
        }
    }

    fn requeue(&self, flight: InFlight, error: Error) {
        if let Err(mpsc::error::SendError((f, e))) = self.retry_tx.send((flight, error)) {
            f.complete(Err(e));
        }
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
        let (tx, rx) = mpsc::channel(self.max_in_flight as usize);
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
/// to the sender; when the stream ends, hands back whatever is still in
/// flight on it, in the order it was sent.
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
                let waiting = in_flight
                    .lock()
                    .expect("in-flight lock")
                    .as_ref()
                    .and_then(|m| m.values().map(|f| f.sent_at).min());
                tracing::trace!(?waiting, "no produce response for a while");
                match waiting {
                    Some(oldest) if oldest.elapsed() >= RESPONSE_TIMEOUT => {
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

fn hand_back(retry: &mpsc::UnboundedSender<(InFlight, Error)>, f: InFlight, e: Error) {
    if let Err(mpsc::error::SendError((f, e))) = retry.send((f, e)) {
        f.complete(Err(e));
    }
}
