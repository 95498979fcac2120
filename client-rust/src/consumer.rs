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
use covet_protocol::batch::{self, Header};
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
    fn to_api(self) -> Position {
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
    next: u64,
    start_offset: u64,
    high_watermark: u64,
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
            let batch = match self.responses.message().await? {
                Some(SubscribeResponse {
                    kind: Some(subscribe_response::Kind::Batch(b)),
                }) => b,
                Some(_) => {
                    return Err(Error::Protocol(
                        "unexpected message on subscribe stream".into(),
                    ))
                }
                None => return Ok(None),
            };
            self.high_watermark = self.high_watermark.max(batch.high_watermark);
            let records = batch::decode_records(&batch.batch)
                .map_err(|e| Error::Protocol(format!("broker sent a bad batch: {e}")))?;
            let out: Vec<ConsumedRecord> = records
                .into_iter()
                .filter(|r| r.offset >= self.next)
                .map(|r| ConsumedRecord {
                    topic: self.topic.clone(),
                    partition: self.partition,
                    offset: r.offset,
                    timestamp_ms: r.timestamp_ms,
                    key: r.key,
                    value: r.value,
                    headers: r.headers,
                })
                .collect();
            if let Some(last) = out.last() {
                self.next = last.offset + 1;
                return Ok(Some(out));
            }
        }
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

/// Several partitions merged into one stream of records. Records of one
/// partition arrive in offset order; partitions interleave.
pub struct Subscription {
    rx: mpsc::UnboundedReceiver<(usize, Result<ConsumedRecord>)>,
    returned: Vec<Arc<Returned>>,
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
        // The channel is unbounded in type only: credit bounds it to
        // `window` records plus one batch per partition.
        let (tx, rx) = mpsc::unbounded_channel();
        let mut returned = Vec::new();
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
            let back = Arc::new(Returned::default());
            returned.push(back.clone());
            tasks.push(tokio::spawn(pump(
                i,
                client.clone(),
                stream,
                window,
                back,
                tx.clone(),
            )));
        }
        Ok(Subscription {
            rx,
            returned,
            tasks,
        })
    }

    /// The next record; `None` once every partition's stream has ended.
    pub async fn next(&mut self) -> Option<Result<ConsumedRecord>> {
        let (i, item) = self.rx.recv().await?;
        if let Some(back) = self.returned.get(i) {
            back.records.fetch_add(1, Ordering::Relaxed);
            back.notify.notify_one();
        }
        Some(item)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Moves one partition's records into the merged channel and turns records
/// the application took into credit for the broker. When the stream breaks
/// for a retriable reason (a leader change, a node restart) it reopens at
/// the next offset on the partition's current leader.
async fn pump(
    i: usize,
    client: Client,
    mut stream: PartitionStream,
    window: u64,
    back: Arc<Returned>,
    tx: mpsc::UnboundedSender<(usize, Result<ConsumedRecord>)>,
) {
    // Grant in chunks so a fast consumer does not send a message per record.
    let chunk = (window / 4).max(1);
    let mut owed = 0;
    loop {
        let failure = tokio::select! {
            batch = stream.next_batch() => match batch {
                Ok(Some(records)) => {
                    for r in records {
                        if tx.send((i, Ok(r))).is_err() {
                            return;
                        }
                    }
                    continue;
                }
                Ok(None) => Error::Transport("subscribe stream ended".into()),
                Err(e) => e,
            },
            _ = back.notify.notified() => {
                owed += back.records.swap(0, Ordering::Relaxed);
                if owed >= chunk {
                    if stream.grant(owed).await.is_err() {
                        return;
                    }
                    owed = 0;
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
            Ok(s) => {
                stream = s;
                owed = 0;
            }
            Err(e) => {
                let _ = tx.send((i, Err(e)));
                return;
            }
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
