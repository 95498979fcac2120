//! The batching producer.
//!
//! `send` hands a record to a background task that keeps one open batch per
//! partition. A batch is sent when it reaches `max_batch_bytes`, when it has
//! waited `linger`, or on `flush`. Batches go out on one long-lived produce
//! stream, up to `max_in_flight` at a time; the broker proposes a stream's
//! batches in order, so each partition's records are acknowledged in the
//! order they were sent. Each record's [`Delivery`] resolves with its offset
//! once the broker has committed and applied its batch, or with the error
//! that failed the batch.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use covet_protocol::api::{ProduceRequest, ProduceResponse};
use covet_protocol::batch::{BatchBuilder, Record};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;

use crate::partitioner::partition_for_key;
use crate::{Client, Error, Result};

/// Producer settings.
#[derive(Debug, Clone)]
pub struct ProducerConfig {
    /// How long a batch waits for more records before it is sent.
    pub linger: Duration,
    /// Largest batch built, in bytes (a single larger record is sent alone).
    pub max_batch_bytes: usize,
    /// Batches sent and not yet acknowledged.
    pub max_in_flight: usize,
    /// Records queued for the background task before `send` waits.
    pub queue: usize,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        ProducerConfig {
            linger: Duration::from_millis(5),
            max_batch_bytes: 1 << 20,
            max_in_flight: 64,
            queue: 8192,
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

type Ack = oneshot::Sender<Result<RecordMetadata>>;

/// Resolves when the record is acknowledged (or failed).
pub struct Delivery(oneshot::Receiver<Result<RecordMetadata>>);

impl Future for Delivery {
    type Output = Result<RecordMetadata>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(Error::Closed)))
    }
}

enum Cmd {
    Send {
        topic: Arc<str>,
        partition: Option<u32>,
        record: Record,
        ack: Ack,
    },
    Flush(oneshot::Sender<()>),
}

/// A handle to the producer; clones share one background task.
#[derive(Clone)]
pub struct Producer {
    tx: mpsc::Sender<Cmd>,
}

impl Producer {
    pub(crate) fn start(client: Client, config: ProducerConfig) -> Producer {
        let (tx, rx) = mpsc::channel(config.queue.max(1));
        tokio::spawn(Accumulator::new(client, config).run(rx));
        Producer { tx }
    }

    /// Queues a record for `topic`, partitioned by key (or sticky when
    /// unkeyed). Waits only if the queue is full.
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
        record: Record,
    ) -> Result<Delivery> {
        let (ack, rx) = oneshot::channel();
        let cmd = Cmd::Send {
            topic: topic.into(),
            partition,
            record,
            ack,
        };
        self.tx.send(cmd).await.map_err(|_| Error::Closed)?;
        Ok(Delivery(rx))
    }

    /// Sends every open batch and waits until all records queued before the
    /// call are acknowledged or failed.
    pub async fn flush(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Flush(tx))
            .await
            .map_err(|_| Error::Closed)?;
        rx.await.map_err(|_| Error::Closed)
    }
}

struct OpenBatch {
    builder: BatchBuilder,
    acks: Vec<Ack>,
    deadline: Instant,
}

struct InFlight {
    topic: Arc<str>,
    partition: u32,
    acks: Vec<Ack>,
    _permit: OwnedSemaphorePermit,
}

type InFlightMap = Arc<Mutex<HashMap<u64, InFlight>>>;

/// The produce stream currently open to the broker, and the batches sent
/// on it that await an answer.
struct Stream {
    tx: mpsc::Sender<ProduceRequest>,
    in_flight: InFlightMap,
}

struct Accumulator {
    client: Client,
    config: ProducerConfig,
    /// Partition count and sticky partition of each topic seen.
    topics: HashMap<Arc<str>, (u32, u32)>,
    open: HashMap<(Arc<str>, u32), OpenBatch>,
    permits: Arc<Semaphore>,
    stream: Option<Stream>,
    next_id: u64,
}

impl Accumulator {
    fn new(client: Client, config: ProducerConfig) -> Self {
        let permits = Arc::new(Semaphore::new(config.max_in_flight.max(1)));
        Accumulator {
            client,
            config,
            topics: HashMap::new(),
            open: HashMap::new(),
            permits,
            stream: None,
            next_id: 0,
        }
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Cmd>) {
        loop {
            let deadline = self.open.values().map(|b| b.deadline).min();
            let cmd = match deadline {
                Some(d) => tokio::select! {
                    cmd = rx.recv() => cmd,
                    _ = tokio::time::sleep_until(d) => { self.send_expired().await; continue; }
                },
                None => rx.recv().await,
            };
            match cmd {
                Some(Cmd::Send {
                    topic,
                    partition,
                    record,
                    ack,
                }) => self.add(topic, partition, record, ack).await,
                Some(Cmd::Flush(done)) => {
                    self.flush().await;
                    let _ = done.send(());
                }
                None => {
                    self.flush().await;
                    return;
                }
            }
        }
    }

    async fn add(&mut self, topic: Arc<str>, partition: Option<u32>, record: Record, ack: Ack) {
        let partition = match self.choose_partition(&topic, partition, &record).await {
            Ok(p) => p,
            Err(e) => {
                let _ = ack.send(Err(e));
                return;
            }
        };
        let key = (topic, partition);
        let max = self.config.max_batch_bytes;
        if let Some(open) = self.open.get(&key) {
            if open.builder.encoded_len_with(&record) > max {
                self.send_batch(&key).await;
            }
        }
        let linger = self.config.linger;
        let open = self.open.entry(key.clone()).or_insert_with(|| OpenBatch {
            builder: BatchBuilder::new(),
            acks: Vec::new(),
            deadline: Instant::now() + linger,
        });
        if let Err(e) = open.builder.try_push(&record) {
            let _ = ack.send(Err(Error::InvalidArgument(format!(
                "record cannot be batched: {e}"
            ))));
            return;
        }
        open.acks.push(ack);
        if open.builder.encoded_len() >= max {
            self.send_batch(&key).await;
        }
    }

    async fn choose_partition(
        &mut self,
        topic: &Arc<str>,
        explicit: Option<u32>,
        record: &Record,
    ) -> Result<u32> {
        if !self.topics.contains_key(topic) {
            let info = self.client.describe_topic(topic).await?;
            self.topics
                .insert(topic.clone(), (info.partitions.len().max(1) as u32, 0));
        }
        let (count, sticky) = self.topics[topic];
        match (explicit, &record.key) {
            (Some(p), _) if p < count => Ok(p),
            (Some(p), _) => Err(Error::InvalidArgument(format!(
                "topic {topic} has no partition {p}"
            ))),
            (None, Some(key)) => Ok(partition_for_key(key, count)),
            (None, None) => Ok(sticky),
        }
    }

    async fn send_expired(&mut self) {
        let now = Instant::now();
        let due: Vec<_> = self
            .open
            .iter()
            .filter(|(_, b)| b.deadline <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            self.send_batch(&key).await;
        }
    }

    async fn flush(&mut self) {
        let keys: Vec<_> = self.open.keys().cloned().collect();
        for key in keys {
            self.send_batch(&key).await;
        }
        // Every batch holds a permit until it is answered: holding all of
        // them means nothing is in flight.
        let all = self.config.max_in_flight.max(1) as u32;
        drop(self.permits.acquire_many(all).await);
    }

    /// Sends the open batch of `key`, waiting for an in-flight slot.
    async fn send_batch(&mut self, key: &(Arc<str>, u32)) {
        let Some(open) = self.open.remove(key) else {
            return;
        };
        if let Some(t) = self.topics.get_mut(&key.0) {
            if t.1 == key.1 {
                t.1 = (t.1 + 1) % t.0; // unkeyed records move on
            }
        }
        let Some(batch) = open.builder.build() else {
            return;
        };
        let Ok(permit) = self.permits.clone().acquire_owned().await else {
            return;
        };
        let id = self.next_id;
        self.next_id += 1;
        let req = ProduceRequest {
            request_id: id,
            topic: key.0.to_string(),
            partition: key.1,
            batch,
        };
        let flight = InFlight {
            topic: key.0.clone(),
            partition: key.1,
            acks: open.acks,
            _permit: permit,
        };
        let (tx, in_flight) = match self.stream().await {
            Ok(s) => s,
            Err(e) => return fail(flight.acks, &e),
        };
        in_flight.lock().expect("in-flight lock").insert(id, flight);
        if tx.send(req).await.is_err() {
            self.stream = None;
            if let Some(f) = in_flight.lock().expect("in-flight lock").remove(&id) {
                fail(f.acks, &Error::Transport("produce stream closed".into()));
            }
        }
    }

    /// The open produce stream, opening one if there is none (or the last
    /// one broke).
    async fn stream(&mut self) -> Result<(mpsc::Sender<ProduceRequest>, InFlightMap)> {
        if let Some(s) = &self.stream {
            if !s.tx.is_closed() {
                return Ok((s.tx.clone(), s.in_flight.clone()));
            }
        }
        let (tx, rx) = mpsc::channel(self.config.max_in_flight.max(1));
        let responses = self
            .client
            .rpc()
            .produce(ReceiverStream::new(rx))
            .await?
            .into_inner();
        let in_flight = InFlightMap::default();
        tokio::spawn(read_responses(responses, in_flight.clone()));
        self.stream = Some(Stream {
            tx: tx.clone(),
            in_flight: in_flight.clone(),
        });
        Ok((tx, in_flight))
    }
}

/// Resolves acks as responses arrive; when the stream ends, fails whatever
/// is still in flight on it.
async fn read_responses(mut responses: tonic::Streaming<ProduceResponse>, in_flight: InFlightMap) {
    let end = loop {
        match responses.message().await {
            Ok(Some(resp)) => {
                let flight = in_flight
                    .lock()
                    .expect("in-flight lock")
                    .remove(&resp.request_id);
                if let Some(f) = flight {
                    resolve(f, &resp);
                }
            }
            Ok(None) => break Error::Transport("produce stream ended".into()),
            Err(status) => break Error::from(status),
        }
    };
    let rest: Vec<InFlight> = in_flight
        .lock()
        .expect("in-flight lock")
        .drain()
        .map(|(_, f)| f)
        .collect();
    for f in rest {
        fail(f.acks, &end);
    }
}

fn resolve(f: InFlight, resp: &ProduceResponse) {
    if let Some(e) = &resp.error {
        return fail(f.acks, &Error::from_api(e));
    }
    for (i, ack) in f.acks.into_iter().enumerate() {
        let meta = RecordMetadata {
            topic: f.topic.clone(),
            partition: f.partition,
            offset: resp.base_offset + i as u64,
        };
        let _ = ack.send(Ok(meta));
    }
}

fn fail(acks: Vec<Ack>, e: &Error) {
    for ack in acks {
        let _ = ack.send(Err(e.clone()));
    }
}
