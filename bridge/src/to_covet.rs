//! NATS -> Covet routes.
//!
//! # JetStream (at least once, no duplicates in Covet)
//!
//! The route reads a durable pull consumer (created if missing: explicit
//! ack, filtered on `from_subject`, `max_ack_pending` = the route's
//! `max_in_flight`, [`ACK_WAIT`]; an existing consumer is used as it is
//! configured). Each message becomes one record, sent
//! from one task in stream order (so records of one key reach Covet in the
//! order JetStream delivered them), and is acknowledged in NATS only after
//! Covet acknowledged its record, with a double ack (the ack counts once
//! the server confirmed it). At most `max_in_flight` messages are between
//! being taken and that confirmation: a slow Covet slows the pull.
//!
//! Records: value = payload; key = the `key_token`-th subject token (none
//! without `key_token`); headers = the NATS headers, a multi-valued header
//! as one record header per value (in order; headers of different names in
//! name order), then `nats-subject`, `nats-stream-sequence` and
//! `covet-bridge-route`. Incoming NATS headers with one of the bridge's own
//! names are dropped, so a publisher cannot make the bridge skip a message.
//!
//! **Deduplication.** JetStream redelivers a message whose ack it did not
//! get (the bridge died between Covet's ack and its own, the ack was lost
//! in a NATS restart, Covet took longer than the ack wait). The route keeps
//! a checkpoint in Covet, topic `__covet_bridge.<route>` (one partition,
//! JSON `{"offsets": {"<partition>": offset}}`), written about every
//! [`CHECKPOINT_EVERY`] while it moves. A partition's checkpoint offset is
//! at or before the first record of this route in that partition whose
//! NATS ack was not confirmed at least [`ACK_GRACE`] earlier (records are
//! let past in send order; within a session the producer stores a
//! partition's records in send order, so everything of this route below
//! the offset is settled). On start (and whenever the route restarts its
//! session after Covet failed a write for good), the route reads the last
//! checkpoint and scans each partition of `to_topic` from there to the high
//! watermark, collecting the `nats-stream-sequence` of records whose
//! `covet-bridge-route` is this route. A message whose stream sequence is
//! in that set, or was written in this session, or is in flight now, is
//! acknowledged without writing (`duplicates_skipped`).
//!
//! The guarantee: every message of the stream reaches `to_topic` (or the
//! dead-letter topic) at least once, and a message is written to `to_topic`
//! once, across bridge crashes and restarts, NATS server restarts and Covet
//! broker restarts, provided that (1) NATS does not redeliver a message
//! more than [`ACK_GRACE`] after it confirmed its ack (a single server's
//! file store writes consumer state within a fraction of a second; a NATS
//! that loses confirmed acks for longer can cause duplicates), (2) the
//! records between the checkpoint and the end are still held (retention),
//! and (3) a Covet batch the producer gave up on (after its 30 s of
//! retries), or one a killed bridge left in the broker's pipeline, is not
//! committed after the scan that follows. The scan reads at most what the
//! route wrote since its checkpoint: `max_in_flight` messages plus what was
//! acked in the last [`ACK_GRACE`] + [`CHECKPOINT_EVERY`]. A fresh consumer
//! (one that never delivered anything) starts its checkpoint at the
//! partitions' ends, so there is no scan; a route whose consumer exists but
//! whose checkpoint topic does not scans its partitions from their start.
//! Poison messages sent to the dead-letter topic are not deduplicated: a
//! redelivered poison message is dead-lettered again. The checkpoint names
//! the consumer it belongs to (stream, durable, creation time): when the
//! stream or the consumer is made again (sequences start from 1 again), an
//! older checkpoint is not used, and a new consumer starts at the
//! partitions' ends. The first checkpoint is written before anything is
//! pulled. A consumer deleted under a running route (or its stream) is
//! opened again, which makes a new one if it is missing. One bridge process per route at a time: two would each write
//! their own checkpoint and not see each other's writes.
//!
//! Per-key order holds for messages delivered once; a redelivery (after a
//! failure) arrives after later messages, as JetStream redelivers it.
//!
//! **Poison messages.** A record Covet refuses for good (`BATCH_TOO_LARGE`,
//! `INVALID_REQUEST`, `CORRUPT_BATCH`, or one the client cannot batch) goes
//! to the route's dead-letter topic (created if missing) with the
//! `covet-bridge-error` header, the original headers and subject; its
//! value is dropped when it was too large. The message is then acked.
//!
//! # Core NATS (at most once)
//!
//! A plain subscription: messages are written as they come, and nothing is
//! acknowledged, so a message in flight when the bridge dies, or published
//! while it is not subscribed, is lost. Core NATS cannot be paused: a
//! reader task takes every message into a queue of `max_in_flight`; when
//! the queue is full (Covet slower than the publishers) a message is
//! dropped, counted in `errors` and logged.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::consumer::{pull, AckPolicy, PullConsumer};
use async_nats::jetstream::message::Acker;
use bytes::Bytes;
use covet_client::{
    Client, Delivery, Error as CovetError, Header, Producer, ProducerConfig, Reason, Record,
    RecordMetadata, StartPosition, TopicSpec,
};
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt as _, StreamExt as _};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::{NatsSource, Route, ToCovet, RETRY_BACKOFF};
use crate::status::RouteStatus;
use crate::{RouteContext, ERROR_HEADER, ROUTE_HEADER, SEQUENCE_HEADER, SUBJECT_HEADER};

/// The consumer's ack wait: a message not acked within it is redelivered.
/// A redelivery of a message still in flight is recognised and skipped, so
/// this only bounds how long messages taken by a bridge that died wait.
pub const ACK_WAIT: Duration = Duration::from_secs(10);
/// How often the checkpoint is written while the route moves.
pub const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);
/// How long after NATS confirmed an ack a message still counts as possibly
/// redelivered (a server killed right after confirming may not have
/// written the ack yet): the checkpoint passes a record only after it.
pub const ACK_GRACE: Duration = Duration::from_secs(5);
/// How long sequences written in this session are remembered after their
/// ack was confirmed (well past [`ACK_GRACE`]).
const WRITTEN_MEMORY: Duration = Duration::from_secs(60);
/// How long a stopping route waits for what it has in flight.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);
/// The checkpoint topic keeps a day at most (it is read from its end).
const CHECKPOINT_RETENTION_MS: u64 = 24 * 3600 * 1000;
const CHECKPOINT_RETENTION_BYTES: u64 = 16 << 20;

/// Runs one NATS -> Covet route until `ctx.stop`.
pub async fn run(route: &Route, spec: &ToCovet, ctx: RouteContext) -> anyhow::Result<()> {
    match &spec.source {
        NatsSource::JetStream { stream, durable } => {
            jetstream(route, spec, stream, durable, ctx).await
        }
        NatsSource::Core => core(route, spec, ctx).await,
    }
}

/// The topic holding a route's checkpoints.
pub fn checkpoint_topic(route: &str) -> String {
    format!("__covet_bridge.{route}")
}

/// A route's checkpoint: per partition of `to_topic`, the offset the
/// duplicate scan starts from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub offsets: BTreeMap<u32, u64>,
    /// The JetStream consumer it belongs to (`stream/durable@created`). A
    /// stream deleted and made again numbers its messages from 1 again:
    /// the sequences a checkpoint of an earlier consumer points at are not
    /// this one's, and must not make the route skip anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer: Option<String>,
}

/// The record for one NATS message (see the module docs for the mapping).
pub fn record_of(
    route: &str,
    spec: &ToCovet,
    subject: &str,
    headers: Option<&async_nats::HeaderMap>,
    payload: Bytes,
    sequence: Option<u64>,
) -> Record {
    let mut out = Vec::new();
    if let Some(h) = headers {
        let mut names: Vec<_> = h.iter().collect();
        names.sort_by(|a, b| AsRef::<str>::as_ref(a.0).cmp(AsRef::<str>::as_ref(b.0)));
        for (name, values) in names {
            let name: &str = name.as_ref();
            if is_own_header(name) {
                continue;
            }
            for v in values {
                out.push(Header {
                    key: name.to_string(),
                    value: Bytes::copy_from_slice(v.as_str().as_bytes()),
                });
            }
        }
    }
    out.push(header(SUBJECT_HEADER, subject.as_bytes()));
    if let Some(seq) = sequence {
        out.push(header(SEQUENCE_HEADER, seq.to_string().as_bytes()));
    }
    out.push(header(ROUTE_HEADER, route.as_bytes()));
    let key = spec.key_token.and_then(|t| {
        subject
            .split('.')
            .nth(t.saturating_sub(1))
            .map(|k| Bytes::copy_from_slice(k.as_bytes()))
    });
    Record {
        key,
        value: payload,
        headers: out,
        timestamp_ms: 0,
    }
}

fn header(key: &str, value: &[u8]) -> Header {
    Header {
        key: key.to_string(),
        value: Bytes::copy_from_slice(value),
    }
}

fn is_own_header(name: &str) -> bool {
    [SUBJECT_HEADER, SEQUENCE_HEADER, ROUTE_HEADER, ERROR_HEADER]
        .iter()
        .any(|h| h.eq_ignore_ascii_case(name))
}

/// The last value of header `key`.
fn header_value<'a>(headers: &'a [Header], key: &str) -> Option<&'a [u8]> {
    headers
        .iter()
        .rev()
        .find(|h| h.key == key)
        .map(|h| &h.value[..])
}

/// Whether Covet refused this record itself, for good: it goes to the
/// dead-letter topic. Anything else (a topic gone, a broker down past the
/// producer's retries) is the route's trouble, not the message's.
fn is_poison(e: &CovetError) -> bool {
    match e {
        CovetError::InvalidArgument(_) => true,
        CovetError::Broker { reason, .. } => matches!(
            reason,
            Reason::BatchTooLarge | Reason::InvalidRequest | Reason::CorruptBatch
        ),
        _ => false,
    }
}

/// Sleeps `d` unless `stop` turns true first; false when stopped.
async fn pause(d: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    if *stop.borrow() {
        return false;
    }
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = stop.wait_for(|s| *s) => false,
    }
}

fn producer(client: &Client) -> Producer {
    client.producer(ProducerConfig {
        linger: Duration::from_millis(2),
        ..Default::default()
    })
}

/// Creates `spec` if it does not exist.
async fn ensure_topic(client: &Client, spec: TopicSpec) -> Result<(), CovetError> {
    match client.describe_topic(&spec.name).await {
        Ok(_) => Ok(()),
        Err(e) if e.reason() == Some(Reason::UnknownTopic) => match client.create_topic(spec).await
        {
            Ok(_) => Ok(()),
            Err(e) if e.reason() == Some(Reason::TopicExists) => Ok(()),
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    }
}

#[derive(Debug, PartialEq, Eq)]
enum DeadLetter {
    Written,
    /// The dead-letter topic refused it too: dropped (logged, counted).
    Dropped,
    /// The route stopped before it could be written.
    Stopped,
}

/// Writes a refused message to the dead-letter topic, retrying while Covet
/// is down.
async fn dead_letter(
    route: &Route,
    ctx: &mut RouteContext,
    producer: &Producer,
    mut record: Record,
    error: &CovetError,
) -> DeadLetter {
    if matches!(error.reason(), Some(Reason::BatchTooLarge))
        || matches!(error, CovetError::InvalidArgument(_))
    {
        record.value = Bytes::new();
    }
    record
        .headers
        .push(header(ERROR_HEADER, error.to_string().as_bytes()));
    loop {
        let attempt = async {
            ensure_topic(&ctx.covet, TopicSpec::new(&route.dead_letter_topic)).await?;
            producer
                .send(&route.dead_letter_topic, record.clone())
                .await?
                .await
        };
        match attempt.await {
            Ok(_) => {
                RouteStatus::add(&ctx.status.dead_lettered, 1);
                tracing::warn!(route = %route.name, topic = %route.dead_letter_topic, error = %error, "message dead-lettered");
                return DeadLetter::Written;
            }
            Err(e) if e.is_retriable() => {
                ctx.status.error(&format!("dead-letter topic: {e}"));
                if !pause(RETRY_BACKOFF * 5, &mut ctx.stop).await {
                    return DeadLetter::Stopped;
                }
            }
            Err(e) => {
                ctx.status.error(&format!(
                    "dead-letter topic {} refused a message: {e}; dropped",
                    route.dead_letter_topic
                ));
                tracing::error!(route = %route.name, error = %e, "dead-letter topic refused a message; dropped");
                return DeadLetter::Dropped;
            }
        }
    }
}

// ---------------------------------------------------------------------------
// JetStream

/// One message between being taken and being settled.
struct Pending {
    acker: Option<Acker>,
    /// Redeliveries of it that came while it was in flight; acked with it.
    extra: Vec<Acker>,
    record: Option<Record>,
    /// Where Covet stored its record (none: skipped or dead-lettered).
    stored: Option<(u32, u64)>,
    /// Whether its record was written to `to_topic` in this session.
    written: bool,
    /// When NATS confirmed its ack.
    acked_at: Option<Instant>,
}

/// What a delivery future yields.
type Delivered = (u64, Result<RecordMetadata, CovetError>);
/// What an ack future yields.
type Acked = (u64, Acker, Result<(), async_nats::Error>);

async fn deliver(seq: u64, d: Delivery) -> Delivered {
    (seq, d.await)
}

fn ack(seq: u64, acker: Acker, delay: Duration) -> BoxFuture<'static, Acked> {
    Box::pin(async move {
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let r = acker.double_ack().await;
        (seq, acker, r)
    })
}

/// Why a session ended.
enum SessionEnd {
    Stopped,
    /// Covet failed a write for good: rescan and go on.
    CovetFailed,
    /// The consumer was deleted (or its stream): open it again.
    ConsumerGone,
}

async fn jetstream(
    route: &Route,
    spec: &ToCovet,
    stream: &str,
    durable: &str,
    mut ctx: RouteContext,
) -> anyhow::Result<()> {
    let js = async_nats::jetstream::new(ctx.nats.clone());
    // Once per consumer: again when it is gone (deleted, or its stream
    // made again) and made anew.
    loop {
        let (consumer, fresh) = loop {
            match open_consumer(
                &js,
                stream,
                durable,
                &spec.from_subject,
                route.max_in_flight,
            )
            .await
            {
                Ok(c) => break c,
                Err(e) => {
                    ctx.status.error(&format!("{e:#}"));
                    tracing::warn!(route = %route.name, error = %format!("{e:#}"), "cannot open the JetStream consumer; retrying");
                    if !pause(RETRY_BACKOFF * 5, &mut ctx.stop).await {
                        return Ok(());
                    }
                }
            }
        };
        let consumer_id = format!("{stream}/{durable}@{}", consumer.cached_info().created);
        let lag = tokio::spawn(track_lag(consumer.clone(), ctx.status.clone()));
        let again = consume(route, spec, &consumer, &consumer_id, fresh, &mut ctx).await;
        lag.abort();
        if !again? {
            return Ok(());
        }
        if !pause(RETRY_BACKOFF * 5, &mut ctx.stop).await {
            return Ok(());
        }
    }
}

/// Reads one consumer until the route stops (false) or the consumer is
/// gone (true: open it again).
async fn consume(
    route: &Route,
    spec: &ToCovet,
    consumer: &PullConsumer,
    consumer_id: &str,
    fresh: bool,
    ctx: &mut RouteContext,
) -> anyhow::Result<bool> {
    // Written (and acknowledged) before anything is pulled: a consumer
    // that delivered something always has a checkpoint of its own.
    let mut checkpoint = loop {
        let attempt = async {
            let cp = start_checkpoint(route, spec, &ctx.covet, consumer_id, fresh).await?;
            let topic = checkpoint_topic(&route.name);
            let sent = send_checkpoint(&producer(&ctx.covet), &topic, &cp, &ctx.status)
                .await
                .context("writing the first checkpoint")?;
            sent.await.context("writing the first checkpoint")?;
            anyhow::Ok(cp)
        };
        match attempt.await {
            Ok(c) => break c,
            Err(e) => {
                ctx.status.error(&format!("{e:#}"));
                tracing::warn!(route = %route.name, error = %format!("{e:#}"), "cannot read the route's checkpoint; retrying");
                if !pause(RETRY_BACKOFF * 5, &mut ctx.stop).await {
                    return Ok(false);
                }
            }
        }
    };
    loop {
        let scanned = loop {
            match scan(route, spec, &ctx.covet, &checkpoint).await {
                Ok(s) => break s,
                Err(e) => {
                    ctx.status.error(&format!("{e:#}"));
                    tracing::warn!(route = %route.name, error = %format!("{e:#}"), "cannot scan for duplicates; retrying");
                    if !pause(RETRY_BACKOFF * 5, &mut ctx.stop).await {
                        return Ok(false);
                    }
                }
            }
        };
        tracing::info!(route = %route.name, found = scanned.len(), "duplicate scan done");
        match session(route, spec, consumer, ctx, &mut checkpoint, scanned).await? {
            SessionEnd::Stopped => return Ok(false),
            SessionEnd::ConsumerGone => {
                tracing::warn!(route = %route.name, consumer = %consumer_id, "the JetStream consumer is gone; opening it again");
                return Ok(true);
            }
            SessionEnd::CovetFailed => {
                if !pause(RETRY_BACKOFF * 5, &mut ctx.stop).await {
                    return Ok(false);
                }
            }
        }
    }
}

async fn open_consumer(
    js: &async_nats::jetstream::Context,
    stream: &str,
    durable: &str,
    subject: &str,
    max_in_flight: usize,
) -> anyhow::Result<(PullConsumer, bool)> {
    let s = js
        .get_stream(stream)
        .await
        .with_context(|| format!("JetStream stream {stream}"))?;
    let consumer: PullConsumer = match s.get_consumer(durable).await {
        Ok(c) => c,
        Err(_) => s
            .create_consumer(pull::Config {
                durable_name: Some(durable.to_string()),
                ack_policy: AckPolicy::Explicit,
                ack_wait: ACK_WAIT,
                filter_subject: subject.to_string(),
                max_ack_pending: max_in_flight as i64,
                ..Default::default()
            })
            .await
            .with_context(|| format!("creating consumer {durable} on stream {stream}"))?,
    };
    let fresh = consumer.cached_info().delivered.stream_sequence == 0;
    Ok((consumer, fresh))
}

/// Asks the consumer how many messages wait, about once a second.
async fn track_lag(consumer: PullConsumer, status: Arc<RouteStatus>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        if let Ok(info) = consumer.get_info().await {
            status.lag.store(info.num_pending, Ordering::Relaxed);
        }
    }
}

/// The checkpoint to scan from: the last one written, or for a consumer
/// that never delivered anything the partitions' ends (nothing of it can
/// be in Covet), or else their starts.
async fn start_checkpoint(
    route: &Route,
    spec: &ToCovet,
    client: &Client,
    consumer_id: &str,
    fresh: bool,
) -> anyhow::Result<Checkpoint> {
    let topic = checkpoint_topic(&route.name);
    let mut spec_cp = TopicSpec::new(&topic).partitions(1);
    spec_cp.retention_ms = Some(CHECKPOINT_RETENTION_MS);
    spec_cp.retention_bytes = Some(CHECKPOINT_RETENTION_BYTES);
    ensure_topic(client, spec_cp)
        .await
        .with_context(|| format!("checkpoint topic {topic}"))?;
    if let Some(mut cp) = last_checkpoint(client, &topic).await? {
        if cp.consumer.as_deref() == Some(consumer_id) {
            return Ok(cp);
        }
        if !fresh {
            // Another consumer's checkpoint, and this one delivered
            // something (made again by hand and used?): the best there is.
            tracing::warn!(route = %route.name, checkpoint = ?cp.consumer, consumer = %consumer_id, "the checkpoint is another consumer's; scanning from it");
            cp.consumer = Some(consumer_id.to_string());
            return Ok(cp);
        }
        // A new consumer (the stream or the consumer made again): its
        // messages are not in Covet yet, whatever the old checkpoint says.
        tracing::info!(route = %route.name, consumer = %consumer_id, "a new JetStream consumer: starting a new checkpoint");
    }
    let info = client
        .describe_topic(&spec.to_topic)
        .await
        .with_context(|| format!("topic {}", spec.to_topic))?;
    Ok(Checkpoint {
        offsets: info
            .partitions
            .iter()
            .map(|p| {
                let at = if fresh {
                    p.high_watermark
                } else {
                    p.start_offset
                };
                (p.partition, at)
            })
            .collect(),
        consumer: Some(consumer_id.to_string()),
    })
}

/// The last checkpoint in `topic`, if any.
async fn last_checkpoint(client: &Client, topic: &str) -> anyhow::Result<Option<Checkpoint>> {
    let info = client.describe_topic(topic).await?;
    let Some(p) = info.partitions.first() else {
        return Ok(None);
    };
    if p.high_watermark <= p.start_offset {
        return Ok(None);
    }
    let mut stream = client
        .open_partition(topic, 0, StartPosition::Offset(p.high_watermark - 1), 16)
        .await?;
    let mut last = None;
    while stream.position() < p.high_watermark {
        let batch = tokio::time::timeout(Duration::from_secs(10), stream.next_batch())
            .await
            .context("reading the checkpoint: no answer in 10 s")??
            .context("the checkpoint stream ended")?;
        stream.grant(batch.len() as u64).await?;
        if let Some(r) = batch.last() {
            last = Some(r.value.clone());
        }
    }
    match last {
        Some(v) => Ok(Some(
            serde_json::from_slice(&v).context("the route's last checkpoint is not JSON")?,
        )),
        None => Ok(None),
    }
}

/// The stream sequences of this route's records in `to_topic` from the
/// checkpoint to the end.
async fn scan(
    route: &Route,
    spec: &ToCovet,
    client: &Client,
    cp: &Checkpoint,
) -> anyhow::Result<HashSet<u64>> {
    let info = client
        .describe_topic(&spec.to_topic)
        .await
        .with_context(|| format!("topic {}", spec.to_topic))?;
    let mut found = HashSet::new();
    for p in &info.partitions {
        let from = cp
            .offsets
            .get(&p.partition)
            .copied()
            .unwrap_or(0)
            .max(p.start_offset);
        if from >= p.high_watermark {
            continue;
        }
        let mut stream = client
            .open_partition(
                &spec.to_topic,
                p.partition,
                StartPosition::Offset(from),
                5_000,
            )
            .await?;
        while stream.position() < p.high_watermark {
            let batch = tokio::time::timeout(Duration::from_secs(10), stream.next_batch())
                .await
                .context("scanning: no answer in 10 s")??
                .context("the scan stream ended")?;
            stream.grant(batch.len() as u64).await?;
            for r in batch {
                if header_value(&r.headers, ROUTE_HEADER) != Some(route.name.as_bytes()) {
                    continue;
                }
                let seq = header_value(&r.headers, SEQUENCE_HEADER)
                    .and_then(|v| std::str::from_utf8(v).ok())
                    .and_then(|v| v.parse::<u64>().ok());
                if let Some(seq) = seq {
                    found.insert(seq);
                }
            }
        }
    }
    Ok(found)
}

/// One run of the pull loop, from a scan to a stop or a Covet failure.
async fn session(
    route: &Route,
    spec: &ToCovet,
    consumer: &PullConsumer,
    ctx: &mut RouteContext,
    checkpoint: &mut Checkpoint,
    scanned: HashSet<u64>,
) -> anyhow::Result<SessionEnd> {
    let status = ctx.status.clone();
    let producer = producer(&ctx.covet);
    let cp_topic = checkpoint_topic(&route.name);
    let mut pending: HashMap<u64, Pending> = HashMap::new();
    // Sequences in send order, for the checkpoint.
    let mut order: VecDeque<u64> = VecDeque::new();
    // Written in this session and acked, with when (pruned after
    // WRITTEN_MEMORY).
    let mut written: HashMap<u64, Instant> = HashMap::new();
    let mut written_order: VecDeque<(Instant, u64)> = VecDeque::new();
    let mut deliveries = FuturesUnordered::new();
    let mut acks: FuturesUnordered<BoxFuture<'static, Acked>> = FuturesUnordered::new();
    let mut messages: Option<pull::Stream> = None;
    let mut cp_tick = tokio::time::interval(CHECKPOINT_EVERY);
    cp_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut cp_written = checkpoint.clone();
    let mut cp_flight: Option<(Checkpoint, Delivery)> = None;
    let mut failed = false;
    let mut stopping = *ctx.stop.borrow();
    let mut settle_deadline = None;
    let batch = route.max_in_flight.clamp(1, 500);
    let mut stop = ctx.stop.clone();
    // Messages taken whose ack NATS has not confirmed yet.
    let mut unacked = 0usize;
    // The consumer was deleted; pulls that failed in a row.
    let mut gone = false;
    let mut pull_failures = 0u32;

    loop {
        // Acked messages stay in `pending` for the grace; they are not in
        // flight any more.
        let taking = !stopping && !failed && !gone && unacked < route.max_in_flight;
        if taking && messages.is_none() {
            match consumer
                .stream()
                .max_messages_per_batch(batch)
                .heartbeat(Duration::from_secs(2))
                .expires(Duration::from_secs(10))
                .messages()
                .await
            {
                Ok(m) => {
                    pull_failures = 0;
                    messages = Some(m);
                }
                Err(e) => {
                    // A few in a row: the consumer may be gone; opening it
                    // again is harmless if it is not.
                    pull_failures += 1;
                    gone = pull_failures >= 3;
                    status.error(&format!("JetStream pull: {e}"));
                    tracing::warn!(route = %route.name, error = %e, "cannot pull from JetStream; retrying");
                    if !pause(RETRY_BACKOFF * 5, &mut ctx.stop).await {
                        stopping = true;
                        settle_deadline = Some(Instant::now() + SETTLE_TIMEOUT);
                    }
                    continue;
                }
            }
        }
        if (stopping || failed) && deliveries.is_empty() && acks.is_empty() {
            break;
        }
        // Acks to a deleted consumer are of no use: its messages are left
        // (what Covet stored of them is after the checkpoint).
        if gone && deliveries.is_empty() {
            break;
        }
        if let Some(deadline) = settle_deadline {
            if Instant::now() >= deadline {
                tracing::warn!(route = %route.name, left = pending.len(), "stopping with messages unsettled; NATS redelivers them");
                break;
            }
        }
        tokio::select! {
            next = async { messages.as_mut().map(|m| m.next()).expect("taking only with a stream").await }, if taking && messages.is_some() => {
                match next {
                    Some(Ok(msg)) => {
                        let seq = match msg.info() {
                            Ok(info) => info.stream_sequence,
                            Err(e) => {
                                status.error(&format!("a JetStream message without its info: {e}"));
                                continue;
                            }
                        };
                        let (msg, acker) = msg.split();
                        RouteStatus::add(&status.received, 1);
                        if let Some(p) = pending.get_mut(&seq) {
                            // A redelivery of a message in flight.
                            RouteStatus::add(&status.duplicates_skipped, 1);
                            if p.acked_at.is_some() {
                                acks.push(ack(seq, acker, Duration::ZERO));
                            } else {
                                p.extra.push(acker);
                            }
                            continue;
                        }
                        status.in_flight.fetch_add(1, Ordering::Relaxed);
                        unacked += 1;
                        order.push_back(seq);
                        if scanned.contains(&seq) || written.contains_key(&seq) {
                            RouteStatus::add(&status.duplicates_skipped, 1);
                            pending.insert(seq, Pending { acker: None, extra: Vec::new(), record: None, stored: None, written: false, acked_at: None });
                            acks.push(ack(seq, acker, Duration::ZERO));
                            continue;
                        }
                        let record = record_of(&route.name, spec, msg.subject.as_str(), msg.headers.as_ref(), msg.payload, Some(seq));
                        pending.insert(seq, Pending { acker: Some(acker), extra: Vec::new(), record: Some(record.clone()), stored: None, written: false, acked_at: None });
                        match producer.send(&spec.to_topic, record).await {
                            Ok(d) => deliveries.push(deliver(seq, d)),
                            Err(e) => {
                                if handle_failure(route, ctx, &producer, &mut pending, seq, &e, &mut acks).await {
                                    route_failure(route, &status, &mut failed, &e);
                                }
                            }
                        }
                    }
                    Some(Err(e)) => {
                        if matches!(e.kind(), pull::MessagesErrorKind::ConsumerDeleted) {
                            gone = true;
                            messages = None;
                        }
                        status.error(&format!("JetStream pull: {e}"));
                        tracing::debug!(route = %route.name, error = %e, "JetStream pull error");
                    }
                    None => {
                        messages = None;
                        if !pause(RETRY_BACKOFF, &mut ctx.stop).await {
                            stopping = true;
                            settle_deadline = Some(Instant::now() + SETTLE_TIMEOUT);
                        }
                    }
                }
            }
            Some((seq, result)) = deliveries.next(), if !deliveries.is_empty() => {
                match result {
                    Ok(meta) => {
                        if let Some(p) = pending.get_mut(&seq) {
                            p.stored = Some((meta.partition, meta.offset));
                            p.written = true;
                            p.record = None;
                            if let Some(a) = p.acker.take() {
                                acks.push(ack(seq, a, Duration::ZERO));
                            }
                        }
                    }
                    Err(e) => {
                        if handle_failure(route, ctx, &producer, &mut pending, seq, &e, &mut acks).await {
                                    route_failure(route, &status, &mut failed, &e);
                                }
                    }
                }
            }
            Some((seq, acker, result)) = acks.next(), if !acks.is_empty() => {
                match result {
                    Ok(()) => {
                        if let Some(p) = pending.get_mut(&seq) {
                            if p.acked_at.is_none() {
                                p.acked_at = Some(Instant::now());
                                status.in_flight.fetch_sub(1, Ordering::Relaxed);
                                unacked -= 1;
                                if p.written {
                                    RouteStatus::add(&status.delivered, 1);
                                    let now = Instant::now();
                                    written.insert(seq, now);
                                    written_order.push_back((now, seq));
                                }
                                for a in p.extra.drain(..) {
                                    acks.push(ack(seq, a, Duration::ZERO));
                                }
                            }
                        }
                    }
                    Err(e) => {
                        // NATS down or restarting: the ack is tried again
                        // (a redelivery meanwhile is recognised as in flight).
                        status.error(&format!("JetStream ack: {e}"));
                        acks.push(ack(seq, acker, RETRY_BACKOFF * 5));
                    }
                }
            }
            _ = cp_tick.tick() => {
                let now = Instant::now();
                advance_checkpoint(&mut order, &mut pending, checkpoint, now);
                while written_order.front().is_some_and(|(t, _)| now.duration_since(*t) > WRITTEN_MEMORY) {
                    if let Some((t, seq)) = written_order.pop_front() {
                        if written.get(&seq) == Some(&t) {
                            written.remove(&seq);
                        }
                    }
                }
                poll_checkpoint(&mut cp_flight, &mut cp_written, &status);
                if cp_flight.is_none() && *checkpoint != cp_written {
                    if let Some(d) = send_checkpoint(&producer, &cp_topic, checkpoint, &status).await {
                        cp_flight = Some((checkpoint.clone(), d));
                    }
                }
            }
            _ = async { let _ = stop.wait_for(|s| *s).await; }, if !stopping => {
                stopping = true;
                settle_deadline = Some(Instant::now() + SETTLE_TIMEOUT);
                messages = None;
            }
        }
    }
    // Lets past what is settled (the grace still applies: a NATS killed
    // now could redeliver what it confirmed a moment ago), then writes the
    // final checkpoint.
    advance_checkpoint(&mut order, &mut pending, checkpoint, Instant::now());
    if let Some((cp, d)) = cp_flight.take() {
        if d.await.is_ok() {
            cp_written = cp;
        }
    }
    if *checkpoint != cp_written {
        if let Some(d) = send_checkpoint(&producer, &cp_topic, checkpoint, &status).await {
            if let Err(e) = d.await {
                status.error(&format!("writing the checkpoint: {e}"));
            }
        }
    }
    // Messages left unsettled are redelivered by NATS; they no longer
    // count as in flight here.
    status.in_flight.fetch_sub(
        (unacked as u64).min(status.in_flight.load(Ordering::Relaxed)),
        Ordering::Relaxed,
    );
    Ok(if *ctx.stop.borrow() {
        SessionEnd::Stopped
    } else if gone {
        SessionEnd::ConsumerGone
    } else if failed {
        SessionEnd::CovetFailed
    } else {
        SessionEnd::Stopped
    })
}

/// A write failed. A poison record goes to the dead-letter topic and its
/// message is acked (also when the dead-letter topic refuses it: it is
/// dropped then, and said so); true when the failure is the route's.
async fn handle_failure(
    route: &Route,
    ctx: &mut RouteContext,
    producer: &Producer,
    pending: &mut HashMap<u64, Pending>,
    seq: u64,
    e: &CovetError,
    acks: &mut FuturesUnordered<BoxFuture<'static, Acked>>,
) -> bool {
    let Some(p) = pending.get_mut(&seq) else {
        return false;
    };
    if is_poison(e) {
        let Some(record) = p.record.take() else {
            return false;
        };
        if dead_letter(route, ctx, producer, record, e).await == DeadLetter::Stopped {
            // Left for NATS to redeliver to the next run.
            return false;
        }
        if let Some(a) = p.acker.take() {
            acks.push(ack(seq, a, Duration::ZERO));
        }
        return false;
    }
    true
}

/// Notes a failure of the route's own (said once per session: every write
/// in flight fails alike); the session ends and rescans.
fn route_failure(route: &Route, status: &RouteStatus, failed: &mut bool, e: &CovetError) {
    if !*failed {
        status.error(&format!("writing to Covet: {e}"));
        tracing::warn!(route = %route.name, error = %e, "Covet failed a write; the route rescans and goes on");
    }
    *failed = true;
}

/// Lets settled messages past, in send order: each one whose NATS ack was
/// confirmed at least [`ACK_GRACE`] before `now` moves the checkpoint past
/// its record; the first unsettled one stops the walk (the checkpoint must
/// never pass a message JetStream could still deliver again).
fn advance_checkpoint(
    order: &mut VecDeque<u64>,
    pending: &mut HashMap<u64, Pending>,
    checkpoint: &mut Checkpoint,
    now: Instant,
) {
    while let Some(&seq) = order.front() {
        let settled = pending.get(&seq).is_none_or(|p| {
            p.acked_at
                .is_some_and(|t| now.saturating_duration_since(t) >= ACK_GRACE)
        });
        if !settled {
            break;
        }
        order.pop_front();
        if let Some((part, off)) = pending.remove(&seq).and_then(|p| p.stored) {
            let e = checkpoint.offsets.entry(part).or_insert(0);
            *e = (*e).max(off + 1);
        }
    }
}

/// Records the outcome of a checkpoint write that has completed.
fn poll_checkpoint(
    flight: &mut Option<(Checkpoint, Delivery)>,
    written: &mut Checkpoint,
    status: &RouteStatus,
) {
    let Some((_, d)) = flight.as_mut() else {
        return;
    };
    if let Some(r) = d.now_or_never() {
        match r {
            Ok(_) => {
                if let Some((cp, _)) = flight.take() {
                    *written = cp;
                }
            }
            Err(e) => {
                status.error(&format!("writing the checkpoint: {e}"));
                *flight = None;
            }
        }
    }
}

async fn send_checkpoint(
    producer: &Producer,
    topic: &str,
    cp: &Checkpoint,
    status: &RouteStatus,
) -> Option<Delivery> {
    let value = match serde_json::to_vec(cp) {
        Ok(v) => v,
        Err(e) => {
            status.error(&format!("encoding the checkpoint: {e}"));
            return None;
        }
    };
    let record = Record {
        key: None,
        value: value.into(),
        headers: Vec::new(),
        timestamp_ms: 0,
    };
    match producer.send_to(topic, 0, record).await {
        Ok(d) => Some(d),
        Err(e) => {
            status.error(&format!("writing the checkpoint: {e}"));
            None
        }
    }
}

// ---------------------------------------------------------------------------
// Core NATS

async fn core(route: &Route, spec: &ToCovet, mut ctx: RouteContext) -> anyhow::Result<()> {
    let status = ctx.status.clone();
    let mut sub = loop {
        match ctx.nats.subscribe(spec.from_subject.clone()).await {
            Ok(s) => break s,
            Err(e) => {
                status.error(&format!("subscribing to {}: {e}", spec.from_subject));
                if !pause(RETRY_BACKOFF * 5, &mut ctx.stop).await {
                    return Ok(());
                }
            }
        }
    };
    // The reader: core NATS cannot be paused, so a full queue drops.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<async_nats::Message>(route.max_in_flight);
    let reader_status = status.clone();
    let name = route.name.clone();
    let reader = tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            RouteStatus::add(&reader_status.received, 1);
            match tx.try_send(m) {
                Ok(()) => {}
                Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => {
                    reader_status.error(&"queue full: a core NATS message was dropped");
                    tracing::warn!(route = %name, "queue full: a core NATS message was dropped");
                }
                Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => break,
            }
        }
    });
    let producer = producer(&ctx.covet);
    let mut deliveries = FuturesUnordered::new();
    let mut stopping = false;
    let mut stop = ctx.stop.clone();
    loop {
        if stopping && deliveries.is_empty() {
            break;
        }
        let taking = !stopping && deliveries.len() < route.max_in_flight;
        tokio::select! {
            m = rx.recv(), if taking => {
                let Some(m) = m else {
                    stopping = true;
                    continue;
                };
                let record = record_of(&route.name, spec, m.subject.as_str(), m.headers.as_ref(), m.payload, None);
                status.in_flight.fetch_add(1, Ordering::Relaxed);
                let sent = producer.send(&spec.to_topic, record.clone()).await;
                deliveries.push(async move {
                    let r = match sent {
                        Ok(d) => d.await,
                        Err(e) => Err(e),
                    };
                    (record, r)
                });
            }
            Some((record, r)) = deliveries.next(), if !deliveries.is_empty() => {
                status.in_flight.fetch_sub(1, Ordering::Relaxed);
                match r {
                    Ok(_) => RouteStatus::add(&status.delivered, 1),
                    Err(e) if is_poison(&e) => {
                        dead_letter(route, &mut ctx, &producer, record, &e).await;
                    }
                    Err(e) => {
                        // At most once: the message is lost.
                        status.error(&format!("writing to {}: {e}; a core NATS message was lost", spec.to_topic));
                    }
                }
            }
            _ = async { let _ = stop.wait_for(|s| *s).await; }, if !stopping => {
                stopping = true;
                reader.abort();
            }
        }
    }
    reader.abort();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(key_token: Option<usize>) -> ToCovet {
        ToCovet {
            from_subject: "orders.>".into(),
            source: NatsSource::Core,
            to_topic: "orders".into(),
            key_token,
        }
    }

    #[test]
    fn records_carry_headers_key_and_sequence() {
        let mut h = async_nats::HeaderMap::new();
        h.append("b", "2");
        h.append("a", "1");
        h.append("a", "1bis");
        // Spoofed bridge headers are dropped.
        h.append(ROUTE_HEADER, "other");
        h.append(SEQUENCE_HEADER, "99");
        let r = record_of(
            "in",
            &spec(Some(2)),
            "orders.k7.created",
            Some(&h),
            Bytes::from_static(b"v"),
            Some(42),
        );
        let hs: Vec<(String, String)> = r
            .headers
            .iter()
            .map(|h| {
                (
                    h.key.clone(),
                    String::from_utf8_lossy(&h.value).into_owned(),
                )
            })
            .collect();
        assert_eq!(
            hs,
            vec![
                ("a".into(), "1".into()),
                ("a".into(), "1bis".into()),
                ("b".into(), "2".into()),
                (SUBJECT_HEADER.into(), "orders.k7.created".into()),
                (SEQUENCE_HEADER.into(), "42".into()),
                (ROUTE_HEADER.into(), "in".into()),
            ]
        );
        assert_eq!(r.key.as_deref(), Some(&b"k7"[..]));
        assert_eq!(&r.value[..], b"v");
        let r = record_of("in", &spec(None), "orders.x", None, Bytes::new(), None);
        assert_eq!(r.key, None);
        assert!(header_value(&r.headers, SEQUENCE_HEADER).is_none());
        let r = record_of("in", &spec(Some(5)), "orders.x", None, Bytes::new(), None);
        assert_eq!(r.key, None, "a subject without the token gives no key");
    }

    #[test]
    fn checkpoint_json() {
        let mut cp = Checkpoint::default();
        cp.offsets.insert(0, 12);
        cp.offsets.insert(3, 7);
        let text = serde_json::to_string(&cp).unwrap();
        assert_eq!(text, r#"{"offsets":{"0":12,"3":7}}"#);
        assert_eq!(serde_json::from_str::<Checkpoint>(&text).unwrap(), cp);
        cp.consumer = Some("S/d@t".into());
        let text = serde_json::to_string(&cp).unwrap();
        assert_eq!(text, r#"{"offsets":{"0":12,"3":7},"consumer":"S/d@t"}"#);
        assert_eq!(serde_json::from_str::<Checkpoint>(&text).unwrap(), cp);
    }
}
