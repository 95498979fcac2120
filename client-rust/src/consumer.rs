//! Credit-paced consumption.
//!
//! A [`PartitionStream`] is one subscribe call: the broker pushes committed
//! batches while the client holds credit (counted in records) and the client
//! grants more as it processes them. A [`Subscription`] merges several
//! partitions and grants credit back as the application takes records, so
//! at most `window` records per partition (plus one batch) are ever buffered
//! in the client: a slow application slows the broker, never grows memory.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use covet_protocol::api::{position, subscribe_request, subscribe_response, Empty, Position};
use covet_protocol::api::{SubscribeOpen, SubscribeRequest, SubscribeResponse};
use covet_protocol::batch::{self, BatchRecords, Header, StoredRecord};
use tokio::sync::{mpsc, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

use crate::routing::Rpc;
use crate::{Client, Error, Result};

/// Where a subscription starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartPosition {
    /// The first record still held.
    Earliest,
    /// Only records committed after the subscription opens.
    Latest,
    /// A record offset (at most the high watermark).
    Offset(u64),
    /// The first batch whose timestamp is at or after this (ms since epoch).
    Timestamp(i64),
}

impl StartPosition {
    pub(crate) fn to_api(self) -> Position {
        let kind = match self {
            StartPosition::Earliest => position::Kind::Earliest(Empty {}),
            StartPosition::Latest => position::Kind::Latest(Empty {}),
            StartPosition::Offset(o) => position::Kind::Offset(o),
            StartPosition::Timestamp(t) => position::Kind::TimestampMs(t),
        };
        Position { kind: Some(kind) }
    }
}

/// A record as delivered to a consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumedRecord {
    pub topic: Arc<str>,
    pub partition: u32,
    pub offset: u64,
    pub timestamp_ms: i64,
    pub key: Option<Bytes>,
    pub value: Bytes,
    pub headers: Vec<Header>,
}

/// One partition's subscribe stream.
pub struct PartitionStream {
    topic: Arc<str>,
    partition: u32,
    requests: mpsc::Sender<SubscribeRequest>,
    responses: Streaming<SubscribeResponse>,
    /// Batches of the last message not yet handed out. The broker
    /// coalesces many batches into one message; they are handed out one
    /// by one.
    pending: std::vec::IntoIter<Bytes>,
    next: u64,
    start_offset: u64,
    high_watermark: u64,
}

/// A batch with records at or after the stream's position, its frame
/// (CRC included) checked, its records not yet decoded.
pub(crate) struct Fresh {
    records: BatchRecords,
    /// The stream's position before this batch: records below it were
    /// delivered before, or lie before where the stream opened.
    from: u64,
}

impl PartitionStream {
    pub(crate) async fn open(
        mut rpc: Rpc,
        topic: &str,
        partition: u32,
        from: StartPosition,
        credit: u64,
        allow_follower: bool,
    ) -> Result<Self> {
        let (requests, rx) = mpsc::channel(16);
        let open = SubscribeOpen {
            topic: topic.to_string(),
            partition,
            from: Some(from.to_api()),
            credit,
            allow_follower,
            group: None,
        };
        let first = SubscribeRequest {
            kind: Some(subscribe_request::Kind::Open(open)),
        };
        requests.send(first).await.map_err(|_| Error::Closed)?;
        let mut responses = rpc.subscribe(ReceiverStream::new(rx)).await?.into_inner();
        let opened = match responses.message().await? {
            Some(SubscribeResponse {
                kind: Some(subscribe_response::Kind::Opened(o)),
            }) => o,
            _ => {
                return Err(Error::Protocol(
                    "subscribe stream did not start with `opened`".into(),
                ))
            }
        };
        Ok(PartitionStream {
            topic: topic.into(),
            partition,
            requests,
            responses,
            pending: Vec::new().into_iter(),
            next: opened.offset,
            start_offset: opened.start_offset,
            high_watermark: opened.high_watermark,
        })
    }

    pub fn partition(&self) -> u32 {
        self.partition
    }

    /// The offset of the next record this stream will yield.
    pub fn position(&self) -> u64 {
        self.next
    }

    /// The partition's start offset when the stream opened.
    pub fn start_offset(&self) -> u64 {
        self.start_offset
    }

    /// The partition's high watermark as last reported by the broker.
    pub fn high_watermark(&self) -> u64 {
        self.high_watermark
    }

    /// Grants the broker `records` more credit.
    pub async fn grant(&self, records: u64) -> Result<()> {
        let req = SubscribeRequest {
            kind: Some(subscribe_request::Kind::Credit(records)),
        };
        self.requests.send(req).await.map_err(|_| Error::Closed)
    }

    /// The records of the next batch at or after the position; `None` when
    /// the broker ended the stream.
    pub async fn next_batch(&mut self) -> Result<Option<Vec<ConsumedRecord>>> {
        loop {
            if let Some(fresh) = self.take()? {
                let mut out = Vec::with_capacity(fresh.records.remaining() as usize);
                for r in fresh.records {
                    let r = r.map_err(bad_batch)?;
                    if r.offset >= fresh.from {
                        out.push(consumed(&self.topic, self.partition, r));
                    }
                }
                return Ok(Some(out));
            }
            if !self.fill().await? {
                return Ok(None);
            }
        }
    }

    /// Waits for the next message if no batch is pending; false once the
    /// broker ended the stream. Cancel-safe: nothing is awaited after a
    /// message is taken off the stream.
    async fn fill(&mut self) -> Result<bool> {
        while self.pending.len() == 0 {
            let (batches, high_watermark) = match self.responses.message().await? {
                Some(SubscribeResponse {
                    kind: Some(subscribe_response::Kind::Batches(b)),
                }) => (b.batches, b.high_watermark),
                Some(SubscribeResponse {
                    kind: Some(subscribe_response::Kind::Batch(b)),
                }) => (vec![b.batch], b.high_watermark),
                Some(_) => {
                    return Err(Error::Protocol(
                        "unexpected message on subscribe stream".into(),
                    ))
                }
                None => return Ok(false),
            };
            self.high_watermark = self.high_watermark.max(high_watermark);
            self.pending = batches.into_iter();
        }
        Ok(true)
    }

    /// The next pending batch that holds records at or after the position,
    /// which moves past it. Checks the batch's frame, not its records.
    fn take(&mut self) -> Result<Option<Fresh>> {
        while let Some(bytes) = self.pending.next() {
            let records = match BatchRecords::new(bytes) {
                Ok(r) => r,
                Err(e) => {
                    self.pending = Vec::new().into_iter();
                    return Err(bad_batch(e));
                }
            };
            let end = records.header().next_offset();
            if end <= self.next {
                continue;
            }
            let from = std::mem::replace(&mut self.next, end);
            return Ok(Some(Fresh { records, from }));
        }
        Ok(None)
    }
}

fn bad_batch(e: batch::BatchError) -> Error {
    Error::Protocol(format!("broker sent a bad batch: {e}"))
}

fn consumed(topic: &Arc<str>, partition: u32, r: StoredRecord) -> ConsumedRecord {
    ConsumedRecord {
        topic: topic.clone(),
        partition,
        offset: r.offset,
        timestamp_ms: r.timestamp_ms,
        key: r.key,
        value: r.value,
        headers: r.headers,
    }
}

/// What to follow.
#[derive(Debug, Clone)]
pub struct SubscriptionOptions {
    pub topic: String,
    /// Partitions to follow; `None` means all.
    pub partitions: Option<Vec<u32>>,
    pub from: StartPosition,
    /// Records buffered per partition at most (the credit window).
    pub window: u64,
}

impl SubscriptionOptions {
    pub fn new(topic: impl Into<String>, from: StartPosition) -> Self {
        SubscriptionOptions {
            topic: topic.into(),
            partitions: None,
            from,
            window: 1000,
        }
    }
}

/// Credit handed back by the application, per partition.
#[derive(Default)]
struct Returned {
    records: AtomicU64,
    notify: Notify,
}

/// What [`Subscription`] keeps per partition.
struct Part {
    topic: Arc<str>,
    partition: u32,
    returned: Arc<Returned>,
    /// Records taken by the application and not yet handed to the pump.
    taken: u64,
    /// Set when the partition's stream failed for good; what it still
    /// sends is dropped.
    failed: bool,
}

/// One message's batches, handed out record by record.
struct Current {
    part: usize,
    batches: std::vec::IntoIter<Fresh>,
    batch: Option<Fresh>,
}

/// What a partition's pump sends: its index and one message's batches.
type Delivery = (usize, Result<Vec<Fresh>>);

/// Several partitions merged into one stream of records. Records of one
/// partition arrive in offset order; partitions interleave.
///
/// Each partition's pump task moves whole messages of batches into one
/// channel; [`Subscription::next`] decodes a record when it is asked for
/// one, and hands credit back to the pump in chunks of a quarter of the
/// window, so the per-record path wakes no other task.
pub struct Subscription {
    rx: mpsc::UnboundedReceiver<Delivery>,
    parts: Vec<Part>,
    current: Option<Current>,
    /// Credit is handed back to a pump once this many records were taken.
    chunk: u64,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Subscription {
    pub(crate) async fn open(
        client: &Client,
        options: SubscriptionOptions,
    ) -> Result<Subscription> {
        let partitions = match options.partitions {
            Some(p) => p,
            None => (0..client
                .describe_topic(&options.topic)
                .await?
                .partitions
                .len() as u32)
                .collect(),
        };
        let window = options.window.max(1);
        let topic: Arc<str> = options.topic.as_str().into();
        // The channel is unbounded in type only: credit bounds it to
        // `window` records plus one batch per partition.
        let (tx, rx) = mpsc::unbounded_channel();
        let mut parts = Vec::new();
        let mut tasks = Vec::new();
        for (i, p) in partitions.into_iter().enumerate() {
            let stream = match client
                .open_partition(&options.topic, p, options.from, window)
                .await
            {
                Ok(s) => s,
                Err(e) => {
                    tasks.iter().for_each(tokio::task::JoinHandle::abort);
                    return Err(e);
                }
            };
            let returned = Arc::new(Returned::default());
            parts.push(Part {
                topic: topic.clone(),
                partition: p,
                returned: returned.clone(),
                taken: 0,
                failed: false,
            });
            tasks.push(tokio::spawn(pump(
                i,
                client.clone(),
                stream,
                window,
                returned,
                tx.clone(),
            )));
        }
        Ok(Subscription {
            rx,
            parts,
            current: None,
            // Chunks so a fast consumer neither wakes its pump nor sends a
            // credit message per record; a quarter of the window keeps the
            // broker well ahead of the application.
            chunk: (window / 4).max(1),
            tasks,
        })
    }

    /// The next record; `None` once every partition's stream has ended.
    pub async fn next(&mut self) -> Option<Result<ConsumedRecord>> {
        loop {
            if let Some(item) = self.next_buffered() {
                return Some(item);
            }
            let (i, item) = self.rx.recv().await?;
            if self.parts.get(i).is_none_or(|p| p.failed) {
                continue;
            }
            match item {
                Ok(batches) => {
                    self.current = Some(Current {
                        part: i,
                        batches: batches.into_iter(),
                        batch: None,
                    });
                }
                Err(e) => return Some(Err(e)),
            }
        }
    }

    /// The next record of the message being handed out, if any.
    fn next_buffered(&mut self) -> Option<Result<ConsumedRecord>> {
        let cur = self.current.as_mut()?;
        loop {
            let Some(fresh) = cur.batch.as_mut() else {
                cur.batch = cur.batches.next();
                if cur.batch.is_none() {
                    self.current = None;
                    return None;
                }
                continue;
            };
            match fresh.records.next() {
                Some(Ok(r)) if r.offset < fresh.from => {}
                Some(Ok(r)) => {
                    let part = self.parts.get_mut(cur.part)?;
                    part.taken += 1;
                    if part.taken >= self.chunk {
                        part.returned
                            .records
                            .fetch_add(std::mem::take(&mut part.taken), Ordering::Relaxed);
                        part.returned.notify.notify_one();
                    }
                    return Some(Ok(consumed(&part.topic, part.partition, r)));
                }
                // The broker sent a batch whose records break the format:
                // that partition's stream ends, as for a bad frame.
                Some(Err(e)) => {
                    let i = cur.part;
                    self.current = None;
                    if let Some(part) = self.parts.get_mut(i) {
                        part.failed = true;
                    }
                    if let Some(task) = self.tasks.get(i) {
                        task.abort();
                    }
                    return Some(Err(bad_batch(e)));
                }
                None => cur.batch = None,
            }
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Moves one partition's messages of batches into the merged channel and
/// turns records the application took into credit for the broker. When
/// the stream breaks for a retriable reason (a leader change, a node
/// restart) it reopens at the next offset on the partition's current
/// leader.
async fn pump(
    i: usize,
    client: Client,
    mut stream: PartitionStream,
    window: u64,
    back: Arc<Returned>,
    tx: mpsc::UnboundedSender<Delivery>,
) {
    loop {
        let failure = tokio::select! {
            filled = stream.fill() => match filled {
                Ok(true) => {
                    let (batches, failure) = take_all(&mut stream);
                    if !batches.is_empty() && tx.send((i, Ok(batches))).is_err() {
                        return;
                    }
                    match failure {
                        Some(e) => e,
                        None => continue,
                    }
                }
                Ok(false) => Error::Transport("subscribe stream ended".into()),
                Err(e) => e,
            },
            // The application hands credit back in chunks (see
            // `Subscription::chunk`), so this wakes once per chunk.
            _ = back.notify.notified() => {
                let owed = back.records.swap(0, Ordering::Relaxed);
                if owed > 0 && stream.grant(owed).await.is_err() {
                    return;
                }
                continue;
            }
        };
        if !failure.is_retriable() {
            let _ = tx.send((i, Err(failure)));
            return;
        }
        let (topic, partition, next) = (stream.topic.clone(), stream.partition, stream.next);
        match reopen(&client, &topic, partition, next, window).await {
            Ok(s) => stream = s,
            Err(e) => {
                let _ = tx.send((i, Err(e)));
                return;
            }
        }
    }
}

/// The pending batches of `stream` with records at or after its position,
/// and the error that stopped the taking, if one did.
fn take_all(stream: &mut PartitionStream) -> (Vec<Fresh>, Option<Error>) {
    let mut batches = Vec::with_capacity(stream.pending.len());
    loop {
        match stream.take() {
            Ok(Some(fresh)) => batches.push(fresh),
            Ok(None) => return (batches, None),
            Err(e) => return (batches, Some(e)),
        }
    }
}

/// Opens a partition again at `next` after its stream broke. A new leader
/// that has not applied as far as the old one answers OFFSET_OUT_OF_RANGE
/// for a moment: that is waited out, not reported.
async fn reopen(
    client: &Client,
    topic: &str,
    partition: u32,
    next: u64,
    window: u64,
) -> Result<PartitionStream> {
    let deadline = tokio::time::Instant::now() + crate::routing::RETRY_DEADLINE;
    loop {
        match client
            .open_partition(topic, partition, StartPosition::Offset(next), window)
            .await
        {
            Err(e)
                if e.reason() == Some(crate::Reason::OffsetOutOfRange)
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            other => return other,
        }
    }
}
