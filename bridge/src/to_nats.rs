//! Covet -> NATS routes: a Covet consumer group member per route, each
//! record published to the subject its template renders, and acknowledged
//! in Covet only once NATS has it.
//!
//! **JetStream** (`jetstream = true`): every record is published with
//! `Nats-Msg-Id` = `<topic>/<partition>/<offset>` and acknowledged in
//! Covet after its PubAck. Up to `max_in_flight` publishes are
//! outstanding at once (their PubAcks awaited concurrently). A publish
//! that fails for a reason that may pass (a timeout, a lost connection, a
//! NATS restart, a stream without a leader) is retried with backoff until
//! it is acknowledged; a record redelivered by Covet (a bridge that died,
//! a broker restart) is published again with the same id, and JetStream
//! drops it as a duplicate while the first copy is within the stream's
//! duplicate window (`duplicate_window`, 2 minutes by default). So: at
//! least once into the stream, and exactly once as long as no record is
//! retried or redelivered later than the duplicate window after its first
//! copy was stored.
//!
//! **Core NATS** (`jetstream = false`): records are taken in batches,
//! published, and followed by a request to this route's own responder on
//! the same connection. NATS handles a connection's messages in order, so
//! its reply proves the server received every publish before it; only
//! then are the batch's records acknowledged in Covet. A batch during
//! which the client reconnected, or whose round trip failed, is published
//! again. At least once as far as the NATS server; duplicates are
//! possible (core NATS cannot drop them), and a subscriber that is slow,
//! disconnected or absent misses messages, as core NATS always allows.
//!
//! **Order.** The group consumer hands out one record of a key at a time
//! and holds the later ones until it is acknowledged, so records of one
//! key reach NATS in offset order. Records without a key are published
//! concurrently, in no guaranteed order.
//!
//! **Headers.** Record headers become NATS headers, except names starting
//! with `Nats-` (the server's control headers, such as
//! `Nats-Expected-Last-Sequence`: passed through, they would change what
//! JetStream does with the message; the bridge owns `Nats-Msg-Id`), in
//! any case, but for `nats-subject` and `nats-stream-sequence`, which the
//! NATS -> Covet routes write and the server ignores. The bridge adds `covet-topic`, `covet-partition`, `covet-offset` and, for a
//! keyed record, `covet-key` (the key, when it is UTF-8 without control
//! characters) or `covet-key-base64` (standard base64, otherwise).
//!
//! **Stopping and failures.** On stop the route takes no more records,
//! lets those in flight settle for up to 10 s, and leaves the group (which
//! commits what was acknowledged); records still unsettled then (NATS
//! down) stay unacknowledged and go to the group's next member. A bridge
//! killed outright leaves its records unacknowledged too: the group gives
//! its partitions to the next member once its 10 s session times out, and
//! that member publishes them again (deduplicated by JetStream, within the
//! duplicate window). A Covet broker restart is ridden out by the group
//! consumer (sessions reopen, unacknowledged records come again) and a
//! NATS restart by the client's reconnects and the publish retries.
//!
//! **Poison records.** A record NATS refuses for good goes to the route's
//! dead-letter topic in Covet (created if missing) with the reason in the
//! `covet-bridge-error` header, then is acknowledged; the route goes on.
//! Refusals taken as permanent: larger than the server's `max_payload`;
//! JetStream says no stream takes the subject (checked with JetStream's
//! API after a "no responders", so a server still starting is retried);
//! larger than the stream's `max_msg_size` or its header limit; a sealed
//! stream; a header that cannot be a NATS header. Anything else is
//! retried.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream;
use async_nats::{HeaderMap, HeaderName, HeaderValue};
use base64::Engine as _;
use bytes::Bytes;
use covet_client::{
    Client, GroupConsumer, GroupConsumerConfig, GroupRecord, Header, Membership, ProducerConfig,
    Reason, Record, TopicSpec,
};
use futures::StreamExt as _;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::config::{valid_subject, Route, ToNats, RETRY_BACKOFF};
use crate::status::RouteStatus;
use crate::subject::Fields;
use crate::{RouteContext, ERROR_HEADER};

/// The record's topic, partition and offset, on every message.
pub const TOPIC_HEADER: &str = "covet-topic";
pub const PARTITION_HEADER: &str = "covet-partition";
pub const OFFSET_HEADER: &str = "covet-offset";
/// The record's key, when it is UTF-8 without control characters.
pub const KEY_HEADER: &str = "covet-key";
/// The record's key in standard base64, when it is not.
pub const KEY_BASE64_HEADER: &str = "covet-key-base64";

/// How long the member may be silent before the group gives its
/// partitions to another (a bridge killed and restarted gets them back
/// after this).
const SESSION_TIMEOUT: Duration = Duration::from_secs(10);
/// A record the bridge holds this long is delivered again by the broker;
/// the group consumer never hands out a copy of one it holds, so this
/// only bounds how long a dead bridge's records wait (and a new session
/// takes them back at once anyway).
const ACK_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest pause between attempts at a failing publish.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long a stopping route lets records in flight settle; those still
/// unsettled then are left unacknowledged (delivered again to the group's
/// next member, deduplicated by JetStream).
const SETTLE_GRACE: Duration = Duration::from_secs(10);
/// How often the group's lag is asked.
const LAG_INTERVAL: Duration = Duration::from_secs(1);
/// How long a JetStream publish waits for its PubAck before it is retried.
const PUBACK_TIMEOUT: Duration = Duration::from_secs(5);

/// Why one attempt to hand a record to NATS failed.
#[derive(Debug)]
enum Failure {
    /// NATS will never take it: dead-letter it.
    Permanent(String),
    /// May pass: try again.
    Retry(String),
}

/// Runs one Covet -> NATS route until `ctx.stop`.
pub async fn run(route: &Route, spec: &ToNats, ctx: RouteContext) -> anyhow::Result<()> {
    let RouteContext {
        covet,
        nats,
        status,
        mut stop,
    } = ctx;
    let Some((mut consumer, membership)) = join(route, spec, &covet, &status, &mut stop).await?
    else {
        return Ok(());
    };
    let lag = tokio::spawn(watch_lag(
        covet.clone(),
        spec.group.clone(),
        spec.from_topic.clone(),
        status.clone(),
    ));
    let dead = Arc::new(DeadLetters::new(&covet, route, status.clone()));
    let result = if spec.jetstream {
        run_jetstream(route, spec, &nats, &mut consumer, &status, &dead, &mut stop).await
    } else {
        run_core(route, spec, &nats, &mut consumer, &status, &dead, &mut stop).await
    };
    lag.abort();
    // Leaving commits what was acknowledged and hands the partitions on at
    // once; a failure here only delays that (the session times out).
    if let Err(e) = membership.leave().await {
        tracing::warn!(route = %route.name, error = %e, "leaving the group");
    }
    if let Err(e) = consumer.close().await {
        tracing::warn!(route = %route.name, error = %e, "closing the group's sessions");
    }
    result
}

/// Joins the route's group, retrying while Covet cannot answer. `None`:
/// stopped first.
async fn join(
    route: &Route,
    spec: &ToNats,
    covet: &Client,
    status: &RouteStatus,
    stop: &mut watch::Receiver<bool>,
) -> anyhow::Result<Option<(GroupConsumer, Membership)>> {
    let mut backoff = RETRY_BACKOFF;
    loop {
        // Unique per join, so a rejoin is never taken for the old member.
        let member = format!(
            "bridge-{}-{}-{}",
            route.name,
            std::process::id(),
            unique_id()
        );
        let config = GroupConsumerConfig {
            // The broker's limit per partition is 10,000; the route's
            // semaphore bounds the whole.
            max_in_flight: route.max_in_flight.clamp(1, 10_000) as u32,
            ack_timeout: ACK_TIMEOUT,
            // The bridge dead-letters what NATS refuses; a record
            // delivered many times (a long NATS outage, restarts) is
            // retried, never sent to the dead-letter topic by the broker.
            max_deliveries: u32::MAX,
            dead_letter_topic: Some(route.dead_letter_topic.clone()),
            ..GroupConsumerConfig::new(spec.group.clone(), member)
        };
        let consumer = covet.group_consumer(config).context("group consumer")?;
        let joined = Membership::join(
            covet.clone(),
            &spec.group,
            vec![spec.from_topic.clone()],
            SESSION_TIMEOUT,
            Arc::new(consumer.assigner()),
        )
        .await;
        match joined {
            Ok(m) => return Ok(Some((consumer, m))),
            Err(e) if e.is_retriable() || e.reason() == Some(Reason::UnknownTopic) => {
                status.error(&format!("joining group {}: {e}", spec.group));
                tracing::warn!(route = %route.name, error = %e, "joining the group; retrying");
            }
            Err(e) => return Err(e).with_context(|| format!("joining group {}", spec.group)),
        }
        let _ = consumer.close().await;
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.wait_for(|s| *s) => return Ok(None),
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Keeps `status.lag` at the group's lag on the topic (summed over its
/// partitions).
async fn watch_lag(covet: Client, group: String, topic: String, status: Arc<RouteStatus>) {
    let mut tick = tokio::time::interval(LAG_INTERVAL);
    loop {
        tick.tick().await;
        if let Ok(g) = covet.describe_group(&group).await {
            let lag: u64 = g
                .partitions
                .iter()
                .filter(|p| p.topic == topic)
                .map(|p| p.lag)
                .sum();
            status.lag.store(lag, Ordering::Relaxed);
        }
    }
}

/// The next record, or `None` once stopped (or the consumer closed).
/// Session errors (a partition taken over or lost) are counted and
/// skipped: membership assigns the partition again.
async fn next_record(
    consumer: &mut GroupConsumer,
    status: &RouteStatus,
    stop: &mut watch::Receiver<bool>,
) -> Option<GroupRecord> {
    loop {
        if *stop.borrow() {
            return None;
        }
        tokio::select! {
            r = consumer.next() => match r {
                Some(Ok(r)) => return Some(r),
                Some(Err(e)) => {
                    tracing::info!(error = %e, "a partition session ended");
                    status.error(&e);
                }
                None => return None,
            },
            _ = stop.wait_for(|s| *s) => return None,
        }
    }
}

/// A record ready to publish: its subject and NATS message, or why NATS
/// can never take it.
struct Outgoing {
    subject: String,
    headers: HeaderMap,
    msg_id: String,
}

fn outgoing(spec: &ToNats, r: &GroupRecord) -> Result<Outgoing, String> {
    let subject = spec.to_subject.render(&Fields {
        topic: &r.topic,
        partition: r.partition,
        offset: r.offset,
        key: r.key.as_deref(),
    });
    // Templates are checked to render valid subjects; this stays a
    // per-record refusal rather than a retry loop should one not.
    if !valid_subject(&subject, false) {
        return Err(format!("{subject:?} is not a valid NATS subject"));
    }
    let headers = nats_headers(r)?;
    Ok(Outgoing {
        subject,
        headers,
        msg_id: format!("{}/{}/{}", r.topic, r.partition, r.offset),
    })
}

/// Whether a record header goes out to NATS: not one of the server's
/// `Nats-` control headers (in any case), except the two the NATS -> Covet
/// routes write themselves (`nats-subject`, `nats-stream-sequence`), which
/// the server does not interpret: a stream mirrored into Covet and back
/// keeps where each message came from.
fn passes_through(name: &str) -> bool {
    let reserved = name.len() >= 5 && name[..5].eq_ignore_ascii_case("nats-");
    !reserved
        || name.eq_ignore_ascii_case(crate::SUBJECT_HEADER)
        || name.eq_ignore_ascii_case(crate::SEQUENCE_HEADER)
}

/// The NATS headers for a record (see the module docs), or why it cannot
/// have them.
pub fn nats_headers(r: &GroupRecord) -> Result<HeaderMap, String> {
    let mut h = HeaderMap::new();
    for Header { key, value } in &r.headers {
        if !passes_through(key) {
            continue;
        }
        let name: HeaderName = key
            .parse()
            .map_err(|_| format!("header {key:?} cannot be a NATS header name"))?;
        let value = std::str::from_utf8(value)
            .ok()
            .and_then(|v| v.parse::<HeaderValue>().ok())
            .ok_or_else(|| {
                format!("header {key:?}: its value cannot be a NATS header value (not UTF-8, or a line break)")
            })?;
        h.append(name, value);
    }
    h.insert(TOPIC_HEADER, r.topic.as_ref());
    h.insert(PARTITION_HEADER, r.partition.to_string());
    h.insert(OFFSET_HEADER, r.offset.to_string());
    if let Some(key) = &r.key {
        match std::str::from_utf8(key) {
            Ok(k) if !k.chars().any(char::is_control) => h.insert(KEY_HEADER, k),
            _ => h.insert(
                KEY_BASE64_HEADER,
                base64::engine::general_purpose::STANDARD.encode(key),
            ),
        }
    }
    Ok(h)
}

/// An id that differs between joins of this process.
fn unique_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{nanos:x}")
}

fn backoff_after(attempt: u32) -> Duration {
    RETRY_BACKOFF
        .saturating_mul(1u32 << attempt.min(8))
        .min(MAX_BACKOFF)
}

async fn run_jetstream(
    route: &Route,
    spec: &ToNats,
    nats: &async_nats::Client,
    consumer: &mut GroupConsumer,
    status: &Arc<RouteStatus>,
    dead: &Arc<DeadLetters>,
    stop: &mut watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let js = jetstream::ContextBuilder::new()
        .timeout(PUBACK_TIMEOUT)
        .max_ack_inflight(route.max_in_flight)
        .build(nats.clone());
    let slots = Arc::new(Semaphore::new(route.max_in_flight));
    let mut tasks = JoinSet::new();
    loop {
        // Reap finished tasks as we go, so the set stays small.
        while tasks.try_join_next().is_some() {}
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.context("in-flight slots closed")?,
            _ = stop.wait_for(|s| *s) => break,
        };
        let Some(record) = next_record(consumer, status, stop).await else {
            break;
        };
        RouteStatus::add(&status.received, 1);
        RouteStatus::add(&status.in_flight, 1);
        let (js, status, dead, spec) = (js.clone(), status.clone(), dead.clone(), spec.clone());
        tasks.spawn(async move {
            let _permit = permit;
            let settled = match outgoing(&spec, &record) {
                Ok(out) => publish_jetstream(&js, &status, out, record.value.clone()).await,
                Err(why) => Err(why),
            };
            match settled {
                Ok(()) => {
                    record.ack();
                    RouteStatus::add(&status.delivered, 1);
                }
                Err(why) => {
                    if dead.write(&record, &why).await {
                        record.ack();
                    }
                }
            }
            status.in_flight.fetch_sub(1, Ordering::Relaxed);
        });
    }
    settle(tasks, status).await;
    Ok(())
}

/// Waits up to [`SETTLE_GRACE`] for the records in flight; the rest are
/// left unacknowledged.
async fn settle(mut tasks: JoinSet<()>, status: &RouteStatus) {
    let all = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(SETTLE_GRACE, all).await.is_err() {
        tracing::warn!(
            left = status.in_flight.load(Ordering::Relaxed),
            "records still in flight at stop are left to the group's next member"
        );
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        status.in_flight.store(0, Ordering::Relaxed);
    }
}

/// Publishes one record until JetStream acknowledges it (`Ok`) or refuses
/// it for good (`Err(reason)`).
async fn publish_jetstream(
    js: &jetstream::Context,
    status: &RouteStatus,
    out: Outgoing,
    payload: Bytes,
) -> Result<(), String> {
    let mut attempt = 0u32;
    loop {
        let publish = jetstream::message::PublishMessage::build()
            .payload(payload.clone())
            .headers(out.headers.clone())
            .message_id(out.msg_id.as_str());
        let result = match js.send_publish(out.subject.clone(), publish).await {
            Ok(ack) => ack.await,
            Err(e) => Err(e),
        };
        let failure = match result {
            Ok(_) => return Ok(()),
            Err(e) => classify_jetstream(js, &out.subject, &e).await,
        };
        match failure {
            Failure::Permanent(why) => return Err(why),
            Failure::Retry(why) => {
                status.error(&format!("publishing to {}: {why}", out.subject));
                tokio::time::sleep(backoff_after(attempt)).await;
                attempt = attempt.saturating_add(1);
            }
        }
    }
}

/// Whether a failed JetStream publish may pass on retry.
async fn classify_jetstream(
    js: &jetstream::Context,
    subject: &str,
    e: &jetstream::context::PublishError,
) -> Failure {
    use jetstream::context::PublishErrorKind as K;
    use jetstream::ErrorCode as C;
    match e.kind() {
        K::MaxPayloadExceeded => Failure::Permanent(format!("NATS refused it: {e}")),
        // No responders: JetStream's own API says whether a stream takes
        // the subject; a server still starting (or unreachable) is retried.
        K::StreamNotFound => match js.stream_by_subject(subject).await {
            Err(n) if n.kind() == jetstream::context::GetStreamByNameErrorKind::NotFound => {
                Failure::Permanent(format!("no JetStream stream takes subject {subject}"))
            }
            _ => Failure::Retry(e.to_string()),
        },
        // The bridge sets no expectations, so these do not pass on retry.
        K::WrongLastMessageId | K::WrongLastSequence => Failure::Permanent(e.to_string()),
        K::Other => {
            let api = std::error::Error::source(e)
                .and_then(|s| s.downcast_ref::<jetstream::Error>())
                .map(|j| j.error_code());
            match api {
                Some(
                    C::STREAM_MESSAGE_EXCEEDS_MAXIMUM
                    | C::STREAM_HEADER_EXCEEDS_MAXIMUM
                    | C::STREAM_SEALED,
                ) => Failure::Permanent(format!("JetStream refused it: {e}")),
                _ => Failure::Retry(e.to_string()),
            }
        }
        K::TimedOut | K::BrokenPipe | K::MaxAckPending => Failure::Retry(e.to_string()),
    }
}

/// Core NATS: batches of records, each confirmed by a round trip on the
/// same connection (see the module docs).
async fn run_core(
    route: &Route,
    spec: &ToNats,
    nats: &async_nats::Client,
    consumer: &mut GroupConsumer,
    status: &Arc<RouteStatus>,
    dead: &Arc<DeadLetters>,
    stop: &mut watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let barrier = Barrier::start(nats).await?;
    loop {
        let Some(first) = next_record(consumer, status, stop).await else {
            break;
        };
        let mut batch = vec![first];
        // What is ready now joins the batch, up to max_in_flight.
        while batch.len() < route.max_in_flight {
            match futures::FutureExt::now_or_never(consumer.next()) {
                Some(Some(Ok(r))) => batch.push(r),
                Some(Some(Err(e))) => status.error(&e),
                Some(None) | None => break,
            }
        }
        let n = batch.len() as u64;
        RouteStatus::add(&status.received, n);
        RouteStatus::add(&status.in_flight, n);
        let mut ready = Vec::with_capacity(batch.len());
        for r in batch {
            match outgoing(spec, &r) {
                Ok(out) => ready.push((r, out)),
                Err(why) => {
                    if dead.write(&r, &why).await {
                        r.ack();
                    }
                    status.in_flight.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
        let mut attempt = 0u32;
        while !ready.is_empty() {
            let connects = nats.statistics().connects.load(Ordering::Acquire);
            let mut refused = Vec::new();
            let mut failed = None;
            for (i, (r, out)) in ready.iter().enumerate() {
                let sent = nats
                    .publish_with_headers(out.subject.clone(), out.headers.clone(), r.value.clone())
                    .await;
                match sent {
                    Ok(()) => {}
                    Err(e) => match e.kind() {
                        async_nats::client::PublishErrorKind::MaxPayloadExceeded
                        | async_nats::client::PublishErrorKind::InvalidSubject => {
                            refused.push((i, format!("NATS refused it: {e}")))
                        }
                        async_nats::client::PublishErrorKind::Send => {
                            failed = Some(e.to_string());
                            break;
                        }
                    },
                }
            }
            let confirmed = match failed {
                Some(why) => Err(why),
                None => barrier.pass().await,
            };
            let reconnected = nats.statistics().connects.load(Ordering::Acquire) != connects;
            // Refused records are settled either way: NATS never took them.
            for (i, why) in refused.into_iter().rev() {
                let (r, _) = ready.remove(i);
                if dead.write(&r, &why).await {
                    r.ack();
                }
                status.in_flight.fetch_sub(1, Ordering::Relaxed);
            }
            match confirmed {
                Ok(()) if !reconnected => {
                    let n = ready.len() as u64;
                    for (r, _) in ready.drain(..) {
                        r.ack();
                    }
                    RouteStatus::add(&status.delivered, n);
                    status.in_flight.fetch_sub(n, Ordering::Relaxed);
                }
                other => {
                    let why = match other {
                        Err(why) => why,
                        Ok(()) => "the connection to NATS was re-established mid-batch".into(),
                    };
                    status.error(&format!("publishing a batch to core NATS: {why}"));
                    if *stop.borrow() && attempt > 0 {
                        // Left unacknowledged: the group's next member
                        // gets them.
                        status
                            .in_flight
                            .fetch_sub(ready.len() as u64, Ordering::Relaxed);
                        ready.clear();
                        break;
                    }
                    tokio::time::sleep(backoff_after(attempt)).await;
                    attempt = attempt.saturating_add(1);
                }
            }
        }
    }
    Ok(())
}

/// A request to this connection's own responder: its reply proves the
/// server handled everything published on the connection before it.
struct Barrier {
    nats: async_nats::Client,
    subject: String,
    responder: tokio::task::JoinHandle<()>,
}

impl Barrier {
    async fn start(nats: &async_nats::Client) -> anyhow::Result<Barrier> {
        let subject = format!("{}.covet-bridge-barrier", nats.new_inbox());
        let mut sub = nats
            .subscribe(subject.clone())
            .await
            .context("subscribing the core NATS route's barrier")?;
        let replies = nats.clone();
        let responder = tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                if let Some(reply) = m.reply {
                    let _ = replies.publish(reply, Bytes::new()).await;
                }
            }
        });
        Ok(Barrier {
            nats: nats.clone(),
            subject,
            responder,
        })
    }

    async fn pass(&self) -> Result<(), String> {
        self.nats
            .request(self.subject.clone(), Bytes::new())
            .await
            .map(|_| ())
            .map_err(|e| format!("confirming with the server: {e}"))
    }
}

impl Drop for Barrier {
    fn drop(&mut self) {
        self.responder.abort();
    }
}

/// Writes refused records to the route's dead-letter topic.
struct DeadLetters {
    covet: Client,
    producer: covet_client::Producer,
    topic: String,
    status: Arc<RouteStatus>,
    created: tokio::sync::OnceCell<()>,
}

impl DeadLetters {
    fn new(covet: &Client, route: &Route, status: Arc<RouteStatus>) -> DeadLetters {
        DeadLetters {
            covet: covet.clone(),
            producer: covet.producer(ProducerConfig {
                linger: Duration::ZERO,
                ..ProducerConfig::default()
            }),
            topic: route.dead_letter_topic.clone(),
            status,
            created: tokio::sync::OnceCell::new(),
        }
    }

    /// Creates the topic if it is missing (once per run).
    async fn ensure_topic(&self) -> covet_client::Result<()> {
        self.created
            .get_or_try_init(|| async {
                match self.covet.describe_topic(&self.topic).await {
                    Ok(_) => Ok(()),
                    Err(e) if e.reason() == Some(Reason::UnknownTopic) => {
                        match self.covet.create_topic(TopicSpec::new(&self.topic)).await {
                            Ok(_) => Ok(()),
                            Err(e) if e.reason() == Some(Reason::TopicExists) => Ok(()),
                            Err(e) => Err(e),
                        }
                    }
                    Err(e) => Err(e),
                }
            })
            .await
            .map(|_| ())
    }

    /// Writes `r` with `why` in its error header; true once Covet has it.
    /// Retries with backoff for as long as Covet fails, up to a minute (the
    /// record, unacknowledged, is delivered again after that).
    async fn write(&self, r: &GroupRecord, why: &str) -> bool {
        tracing::warn!(
            topic = %r.topic, partition = r.partition, offset = r.offset, reason = %why,
            dead_letter_topic = %self.topic, "NATS refused a record; dead-lettering it"
        );
        let mut headers = r.headers.clone();
        for (k, v) in [
            (ERROR_HEADER, why.to_string()),
            (TOPIC_HEADER, r.topic.to_string()),
            (PARTITION_HEADER, r.partition.to_string()),
            (OFFSET_HEADER, r.offset.to_string()),
        ] {
            headers.retain(|h| h.key != k);
            headers.push(Header {
                key: k.to_string(),
                value: Bytes::from(v),
            });
        }
        let record = Record {
            key: r.key.clone(),
            value: r.value.clone(),
            headers,
            timestamp_ms: r.timestamp_ms,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut attempt = 0u32;
        loop {
            let written = match self.ensure_topic().await {
                Ok(()) => match self.producer.send(&self.topic, record.clone()).await {
                    Ok(d) => d.await.map(|_| ()),
                    Err(e) => Err(e),
                },
                Err(e) => Err(e),
            };
            match written {
                Ok(()) => {
                    RouteStatus::add(&self.status.dead_lettered, 1);
                    return true;
                }
                Err(e) => {
                    self.status
                        .error(&format!("writing to dead-letter topic {}: {e}", self.topic));
                    if tokio::time::Instant::now() >= deadline {
                        return false;
                    }
                }
            }
            tokio::time::sleep(backoff_after(attempt)).await;
            attempt = attempt.saturating_add(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(backoff_after(0), RETRY_BACKOFF);
        assert!(backoff_after(1) > backoff_after(0));
        assert_eq!(backoff_after(40), MAX_BACKOFF);
    }

    #[test]
    fn nats_control_headers_stay_behind_and_the_bridges_own_go_out() {
        for name in ["Nats-Msg-Id", "nats-expected-last-sequence", "NATS-TTL"] {
            assert!(!passes_through(name), "{name}");
        }
        for name in [
            "nats-subject",
            "Nats-Stream-Sequence",
            "app",
            "natsy",
            "nats",
        ] {
            assert!(passes_through(name), "{name}");
        }
    }
}
