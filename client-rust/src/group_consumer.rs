//! A consumer group member's partition sessions (ADR 0009): the layer the
//! group coordinator drives. It holds a group session on each partition
//! it is given and hands the application one stream of records, each
//! acknowledged or negatively acknowledged on its own.
//!
//! **What it does.** [`GroupConsumer::assign`] opens a `Subscribe` group
//! session at each new partition's leader (one task per partition) and
//! releases the partitions no longer listed. A session's task decodes the
//! broker's `Deliveries`, hands the listed records to
//! [`GroupConsumer::next`], and sends [`GroupRecord::ack`]s (coalesced:
//! acks that come within [`ACK_LINGER`] of each other travel in one
//! `Acks` message) and [`GroupRecord::nack`]s back on the same stream.
//! The broker sends while fewer than `max_in_flight` records of the
//! partition are unacknowledged: that is the only credit, and it bounds
//! what this layer buffers per partition.
//!
//! **Per-key order.** A record whose key equals the key of a record of the
//! same partition that the application holds (handed out, not yet acked or
//! nacked) is held back, with the later records of that key behind it,
//! until the held one is resolved. Records without a key are never held.
//! A nack resolves a record too: the key's next record may then go out
//! before the nacked one comes back. A copy of a record the application
//! still holds (the broker delivers again what is not acknowledged within
//! `ack_timeout`) is never handed out: the ack or nack of the held record
//! settles it, and a nacked record is delivered again by the broker.
//! Records held back here are not the application's yet: their ack
//! deadlines are extended at the broker (`Extend`) every third of
//! `ack_timeout` while they wait, so a key whose records take longer than
//! `ack_timeout` in all loses none of them to a timeout. A record the
//! application holds gets `ack_timeout` to be resolved.
//!
//! **Failures.** A session whose stream breaks for a retriable reason (a
//! leader change, a restart, a lost connection) opens again on the
//! partition's current leader, with backoff, for up to 30 s; records it
//! had received and not handed out are dropped (the broker delivers them
//! again), acks not yet sent go to the new stream. `FENCED` (a newer
//! generation took the partition over) and any other error end that
//! partition's session: the error is returned from [`GroupConsumer::next`]
//! (its message names the partition), the partition is no longer
//! [`GroupConsumer::owned`], and its records not yet taken are dropped
//! (acks of records in hand go nowhere: the next owner gets them again).
//!
//! **Releasing a partition** ([`GroupConsumer::assign`] without it, or
//! [`GroupConsumer::close`]): records of it not yet taken by the
//! application are no longer handed out; the application gets up to
//! [`GroupConsumerConfig::release_grace`] to resolve the ones it holds
//! (acks made then still count, sent together at the end so that the
//! broker does not deliver more in the meantime; a nack made then is not
//! sent: the next owner gets the record at once); the request side is
//! closed, and the broker commits the group's progress and ends the stream
//! (awaited, for at most 5 s). Records still held after the grace are
//! abandoned: their acks are ignored and the next owner gets them again.
//!
//! **What the coordinator must do.** Report [`GroupConsumer::owned`] in
//! each heartbeat: it lists partitions whose session is open, opening,
//! reconnecting or being released, so a revoked partition leaves it only
//! once its progress is committed and its session ended: only then may
//! the coordinator give it to another member. Pass every new assignment to
//! [`GroupConsumer::assign`] with its generation (never lower than the
//! last): kept partitions keep their sessions (reconnects use the newest
//! generation), revoked ones are released before `assign` returns. On a
//! `FENCED` error from [`GroupConsumer::next`] the member rejoins and
//! assigns again. The coordinator can run on its own task through an
//! [`Assigner`] while the application calls `next`.
//!
//! Not done here: membership (join, heartbeat, leave) and choosing
//! partitions; those are the coordinator's.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use covet_protocol::api::{
    subscribe_request, subscribe_response, Acks, Extend, GroupSession, Nack, Returned,
};
use covet_protocol::api::{SubscribeOpen, SubscribeRequest, SubscribeResponse};
use covet_protocol::batch::{BatchRecords, Header, StoredRecord};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::Streaming;

use crate::routing::Rpc;
use crate::{Client, Error, Result};

/// Held-back records are extended at most this often.
const EXTEND_MIN: Duration = Duration::from_millis(100);

/// Acks made within this of the first unsent one travel in one message.
pub const ACK_LINGER: Duration = Duration::from_millis(2);
/// An `Acks` message carries at most this many offsets.
const ACKS_PER_MESSAGE: usize = 4096;
/// How long a released session may take to commit and end its stream.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// The broker's limit on `max_in_flight`.
const MAX_IN_FLIGHT: u32 = 10_000;
/// Pauses between a session that broke soon after it opened and the next
/// open: doubled from the first to the last.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(20), Duration::from_secs(1));
/// A session that lived this long before it broke is opened again at once.
const HEALTHY: Duration = Duration::from_secs(1);

/// How a member consumes its partitions.
#[derive(Debug, Clone)]
pub struct GroupConsumerConfig {
    pub group: String,
    /// The member id the coordinator gave this member.
    pub member_id: String,
    /// Records of one partition held unacknowledged at most (1..=10,000):
    /// the broker's credit, and this layer's buffer bound.
    pub max_in_flight: u32,
    /// A record not acknowledged within this is delivered again
    /// (1 ms..=about 49 days).
    pub ack_timeout: Duration,
    /// After this many deliveries a record goes to the dead-letter topic
    /// (0: the broker's default, 5).
    pub max_deliveries: u32,
    /// Where dead letters go; `None`: `<topic>.dlq`.
    pub dead_letter_topic: Option<String>,
    /// How long a partition being released waits for the application to
    /// resolve the records of it that it holds.
    pub release_grace: Duration,
}

impl GroupConsumerConfig {
    /// Defaults: 100 in flight per partition, 30 s ack timeout, the
    /// broker's 5 deliveries and `<topic>.dlq`, 5 s release grace.
    pub fn new(group: impl Into<String>, member_id: impl Into<String>) -> Self {
        GroupConsumerConfig {
            group: group.into(),
            member_id: member_id.into(),
            max_in_flight: 100,
            ack_timeout: Duration::from_secs(30),
            max_deliveries: 0,
            dead_letter_topic: None,
            release_grace: Duration::from_secs(5),
        }
    }

    fn check(&self) -> Result<()> {
        if !(1..=MAX_IN_FLIGHT).contains(&self.max_in_flight) {
            return Err(Error::InvalidArgument(format!(
                "max_in_flight must be between 1 and {MAX_IN_FLIGHT}, not {}",
                self.max_in_flight
            )));
        }
        let ms = self.ack_timeout.as_millis();
        if ms == 0 || ms > u128::from(u32::MAX) {
            return Err(Error::InvalidArgument(format!(
                "ack_timeout must be between 1 ms and {} ms, not {ms} ms",
                u32::MAX
            )));
        }
        Ok(())
    }

    fn session(&self, generation: u64) -> GroupSession {
        GroupSession {
            group: self.group.clone(),
            member_id: self.member_id.clone(),
            generation,
            max_in_flight: self.max_in_flight,
            // Checked to fit by `check`.
            ack_timeout_ms: u32::try_from(self.ack_timeout.as_millis()).unwrap_or(u32::MAX),
            max_deliveries: self.max_deliveries,
            dead_letter_topic: self.dead_letter_topic.clone().unwrap_or_default(),
            start: None,
        }
    }
}

/// A record handed to a group member. Resolve it with [`GroupRecord::ack`]
/// or [`GroupRecord::nack`] (or through its [`Acker`] after taking the
/// fields apart); dropping it unresolved nacks it with no delay.
#[derive(Debug)]
pub struct GroupRecord {
    pub topic: Arc<str>,
    pub partition: u32,
    pub offset: u64,
    /// Times the group was handed this record, this time included.
    pub delivery_count: u32,
    pub timestamp_ms: i64,
    pub key: Option<Bytes>,
    pub value: Bytes,
    pub headers: Vec<Header>,
    pub acker: Acker,
}

impl GroupRecord {
    /// The record is handled: it is not delivered again.
    pub fn ack(self) {
        self.acker.ack();
    }

    /// The record is to be delivered again, not before `delay` (whole ms,
    /// at most about 49 days).
    pub fn nack(self, delay: Duration) {
        self.acker.nack(delay);
    }
}

/// What the application decided about a record.
#[derive(Debug)]
enum Resolution {
    Ack(u64),
    Nack(u64, Duration),
    /// Never reached the application (its partition is being released).
    Abandon(u64),
}

/// Acknowledges one record to its partition's session. Dropped
/// unresolved, it nacks the record with no delay.
#[derive(Debug)]
pub struct Acker {
    offset: u64,
    tx: mpsc::UnboundedSender<Resolution>,
    done: bool,
}

impl Acker {
    /// See [`GroupRecord::ack`]. Ignored once the partition was released.
    pub fn ack(mut self) {
        self.resolve(Resolution::Ack(self.offset));
    }

    /// See [`GroupRecord::nack`]. Ignored once the partition was released.
    pub fn nack(mut self, delay: Duration) {
        self.resolve(Resolution::Nack(self.offset, delay));
    }

    fn abandon(mut self) {
        self.resolve(Resolution::Abandon(self.offset));
    }

    fn resolve(&mut self, r: Resolution) {
        self.done = true;
        // A closed channel means the session ended: nothing to tell.
        let _ = self.tx.send(r);
    }
}

impl Drop for Acker {
    fn drop(&mut self) {
        if !self.done {
            self.resolve(Resolution::Nack(self.offset, Duration::ZERO));
        }
    }
}

/// What a session sends [`GroupConsumer::next`]: its "released" flag (set
/// when it is released or ended) and a record or the error that ended
/// it.
type Item = (Arc<AtomicBool>, Result<GroupRecord>);
type PartitionId = (String, u32);

/// A running session, as the consumer keeps it.
struct Entry {
    /// Set when the session ended on its own (fenced, failed).
    ended: Arc<AtomicBool>,
    release: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<()>>,
}

impl Entry {
    /// Releases the partition (see the module docs) and waits for it.
    async fn release(mut self) -> Result<()> {
        if let Some(r) = self.release.take() {
            let _ = r.send(());
        }
        match (&mut self.task).await {
            Ok(outcome) => outcome,
            Err(e) => Err(Error::Transport(format!("session task failed: {e}"))),
        }
    }
}

struct Inner {
    client: Client,
    config: Arc<GroupConsumerConfig>,
    generation: Arc<AtomicU64>,
    sessions: Mutex<HashMap<PartitionId, Entry>>,
    /// Partitions taken out of `sessions` whose release is under way: still
    /// owned. Locked after `sessions` when both are.
    releasing: Mutex<Vec<PartitionId>>,
    /// `None` once closed.
    out: Mutex<Option<mpsc::UnboundedSender<Item>>>,
    /// One assignment change at a time.
    assigning: tokio::sync::Mutex<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let sessions = self.sessions.get_mut().unwrap_or_else(|e| e.into_inner());
        for e in sessions.values() {
            e.task.abort();
        }
    }
}

/// Changes a [`GroupConsumer`]'s partitions; cheap to clone, for a
/// coordinator running on its own task.
#[derive(Clone)]
pub struct Assigner {
    inner: Arc<Inner>,
}

/// A group member's partition sessions, merged into one stream of
/// records; see the module docs.
pub struct GroupConsumer {
    assigner: Assigner,
    rx: mpsc::UnboundedReceiver<Item>,
}

impl Client {
    /// A group consumer holding no partitions yet; the coordinator gives
    /// it some with [`GroupConsumer::assign`].
    pub fn group_consumer(&self, config: GroupConsumerConfig) -> Result<GroupConsumer> {
        config.check()?;
        // Unbounded in type only: each session has at most max_in_flight
        // records out (the broker's credit).
        let (tx, rx) = mpsc::unbounded_channel();
        let inner = Inner {
            client: self.clone(),
            config: Arc::new(config),
            generation: Arc::new(AtomicU64::new(0)),
            sessions: Mutex::new(HashMap::new()),
            releasing: Mutex::new(Vec::new()),
            out: Mutex::new(Some(tx)),
            assigning: tokio::sync::Mutex::new(()),
        };
        Ok(GroupConsumer {
            assigner: Assigner {
                inner: Arc::new(inner),
            },
            rx,
        })
    }
}

impl GroupConsumer {
    /// See [`Assigner::assign`].
    pub async fn assign(&self, generation: u64, partitions: Vec<(String, u32)>) -> Result<()> {
        self.assigner.assign(generation, partitions).await
    }

    /// See [`Assigner::owned`].
    pub fn owned(&self) -> Vec<(String, u32)> {
        self.assigner.owned()
    }

    /// A handle that changes this consumer's partitions from another task.
    pub fn assigner(&self) -> Assigner {
        self.assigner.clone()
    }

    /// The next record of any partition, or the error that ended a
    /// partition's session. Waits while no partition is assigned; `None`
    /// once the consumer was closed.
    pub async fn next(&mut self) -> Option<Result<GroupRecord>> {
        loop {
            let (released, item) = self.rx.recv().await?;
            match item {
                // Its session ended or is being released: its acks would
                // go nowhere, and the partition's next owner gets it.
                Ok(r) if released.load(Ordering::Acquire) => r.acker.abandon(),
                item => return Some(item),
            }
        }
    }

    /// Releases every partition (see the module docs); the first failure
    /// to end a session cleanly is returned.
    pub async fn close(self) -> Result<()> {
        self.assigner.close().await
    }
}

impl Assigner {
    /// Makes `partitions` this member's: opens a session on each new one
    /// (returning once all are open, or the first that cannot be) and
    /// releases the ones not listed (before opening any). `generation`
    /// must not be lower than the last one given.
    pub async fn assign(&self, generation: u64, partitions: Vec<(String, u32)>) -> Result<()> {
        let inner = &self.inner;
        let _one = inner.assigning.lock().await;
        let Some(out) = inner.out.lock().unwrap_or_else(|e| e.into_inner()).clone() else {
            return Err(Error::Closed);
        };
        let last = inner.generation.load(Ordering::Acquire);
        if generation < last {
            return Err(Error::InvalidArgument(format!(
                "generation {generation} is older than {last}"
            )));
        }
        inner.generation.store(generation, Ordering::Release);
        let wanted: HashSet<PartitionId> = partitions.into_iter().collect();
        let (released, new) = {
            let mut sessions = inner.sessions.lock().unwrap_or_else(|e| e.into_inner());
            sessions.retain(|_, e| !e.ended.load(Ordering::Acquire));
            let gone: Vec<PartitionId> = sessions
                .keys()
                .filter(|p| !wanted.contains(*p))
                .cloned()
                .collect();
            let released = self.take_for_release(&mut sessions, gone);
            let new: Vec<PartitionId> = wanted
                .into_iter()
                .filter(|p| !sessions.contains_key(p))
                .collect();
            (released, new)
        };
        for outcome in self.release(released).await {
            if let Err(e) = outcome {
                tracing::warn!(error = %e, "a released group session did not end cleanly");
            }
        }
        let mut opening = Vec::new();
        for p in new {
            let (entry, opened) = self.start(p.clone(), out.clone());
            inner
                .sessions
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(p.clone(), entry);
            opening.push(async move { (p, opened.await) });
        }
        let mut first = None;
        for (p, opened) in futures::future::join_all(opening).await {
            let failure = match opened {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => e,
                Err(_) => Error::Closed,
            };
            inner
                .sessions
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&p);
            first.get_or_insert(failure);
        }
        first.map_or(Ok(()), Err)
    }

    /// The partitions with a session open, opening, reconnecting or being
    /// released: what a heartbeat reports.
    pub fn owned(&self) -> Vec<(String, u32)> {
        let sessions = self
            .inner
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mut owned: Vec<PartitionId> = sessions
            .iter()
            .filter(|(_, e)| !e.ended.load(Ordering::Acquire))
            .map(|(p, _)| p.clone())
            .collect();
        owned.extend(
            self.inner
                .releasing
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .cloned(),
        );
        owned.sort();
        owned.dedup();
        owned
    }

    /// Releases every partition; afterwards `next` returns `None` and
    /// `assign` fails with [`Error::Closed`].
    pub async fn close(&self) -> Result<()> {
        let _one = self.inner.assigning.lock().await;
        self.inner
            .out
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let all = {
            let mut sessions = self
                .inner
                .sessions
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let ids = sessions.keys().cloned().collect();
            self.take_for_release(&mut sessions, ids)
        };
        let mut first = Ok(());
        for outcome in self.release(all).await {
            if let Err(e) = outcome {
                if first.is_ok() {
                    first = Err(e);
                }
            }
        }
        first
    }

    /// Takes the sessions of `ids` out of `sessions` (whose lock the
    /// caller holds), marking them as being released.
    fn take_for_release(
        &self,
        sessions: &mut HashMap<PartitionId, Entry>,
        ids: Vec<PartitionId>,
    ) -> Vec<(PartitionId, Entry)> {
        let taken: Vec<(PartitionId, Entry)> = ids
            .into_iter()
            .filter_map(|p| sessions.remove(&p).map(|e| (p, e)))
            .collect();
        self.inner
            .releasing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(taken.iter().map(|(p, _)| p.clone()));
        taken
    }

    /// Releases `sessions` at once; each is owned until its release ends.
    async fn release(&self, sessions: Vec<(PartitionId, Entry)>) -> Vec<Result<()>> {
        let releases = sessions.into_iter().map(|(p, e)| async move {
            let outcome = e.release().await;
            let mut releasing = self
                .inner
                .releasing
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(i) = releasing.iter().position(|r| *r == p) {
                releasing.swap_remove(i);
            }
            outcome
        });
        futures::future::join_all(releases).await
    }

    /// Spawns the session task of `p`; the receiver says whether it opened.
    fn start(
        &self,
        p: PartitionId,
        out: mpsc::UnboundedSender<Item>,
    ) -> (Entry, oneshot::Receiver<Result<()>>) {
        let (opened_tx, opened_rx) = oneshot::channel();
        let (release_tx, release_rx) = oneshot::channel();
        let ended = Arc::new(AtomicBool::new(false));
        let (acks_tx, acks_rx) = mpsc::unbounded_channel();
        let part = Part {
            topic: p.0.as_str().into(),
            partition: p.1,
            out,
            released: Arc::new(AtomicBool::new(false)),
            ended: ended.clone(),
            acks_tx,
            in_hand: HashMap::default(),
            busy: HashMap::new(),
            acks: Vec::new(),
            nacks: Vec::new(),
            flush_at: None,
            recent: HashSet::default(),
            recent_order: VecDeque::new(),
            recent_cap: 2 * self.inner.config.max_in_flight as usize + 64,
            batches: VecDeque::new(),
            returned: Vec::new(),
        };
        let ctx = Ctx {
            client: self.inner.client.clone(),
            config: self.inner.config.clone(),
            generation: self.inner.generation.clone(),
        };
        let task = tokio::spawn({
            let ended = ended.clone();
            async move {
                let outcome = run_session(ctx, part, acks_rx, release_rx, opened_tx).await;
                ended.store(true, Ordering::Release);
                outcome
            }
        });
        let entry = Entry {
            ended,
            release: Some(release_tx),
            task,
        };
        (entry, opened_rx)
    }
}

/// What a session task needs of its consumer.
struct Ctx {
    client: Client,
    config: Arc<GroupConsumerConfig>,
    generation: Arc<AtomicU64>,
}

/// One open group session stream.
struct Conn {
    /// Unbounded in type only: what waits in it is acks and nacks of
    /// records the broker counts as out, so at most `max_in_flight` plus
    /// the copies it sent. Never blocking here matters: a task waiting to
    /// send would stop reading, while the broker, waiting to send, stops
    /// reading acks.
    requests: mpsc::UnboundedSender<SubscribeRequest>,
    responses: Streaming<SubscribeResponse>,
}

/// A partition session's state: what the application holds, what waits
/// behind a busy key, what is not yet sent.
struct Part {
    topic: Arc<str>,
    partition: u32,
    out: mpsc::UnboundedSender<Item>,
    /// Set when the partition is being released: nothing more is handed
    /// out, and [`GroupConsumer::next`] drops what it still finds.
    released: Arc<AtomicBool>,
    /// Shared with the consumer's [`Entry`]: set when the session ended
    /// on its own.
    ended: Arc<AtomicBool>,
    acks_tx: mpsc::UnboundedSender<Resolution>,
    /// Handed out and not resolved: offset → key.
    in_hand: HashMap<u64, Option<Bytes>, OffsetHash>,
    /// Each key with a record in hand → the records of that key waiting
    /// behind it (with their delivery counts), in offset order.
    busy: HashMap<Bytes, VecDeque<(StoredRecord, u32)>>,
    acks: Vec<u64>,
    nacks: Vec<Nack>,
    /// When the unsent acks go out.
    flush_at: Option<Instant>,
    /// Offsets acknowledged lately, oldest first in `recent_order`: a
    /// delivery of one (the broker sent it before it read the ack, or a
    /// reconnect lost the ack) is acknowledged again, not handed out.
    recent: HashSet<u64, OffsetHash>,
    recent_order: VecDeque<u64>,
    recent_cap: usize,
    /// The last batches received on this stream, decoded: the broker
    /// does not send them again ([`covet_protocol::GROUP_BATCH_MEMORY`]).
    /// Each entry is (base offset, its records in offset order). While a
    /// message is taken in, it also holds all of that message's batches.
    batches: VecDeque<(u64, Vec<StoredRecord>)>,
    /// Records that reached this session and never the application, to
    /// give back (uncounted) when the partition is released.
    returned: Vec<u64>,
}

/// Hashes an offset by one multiplication (Fibonacci hashing): offsets
/// are this process's own numbers, not an attacker's keys, and SipHash was
/// a tenth of a member's time at a few hundred thousand records a second.
#[derive(Clone, Copy, Default)]
struct OffsetHash;

impl std::hash::BuildHasher for OffsetHash {
    type Hasher = OffsetHasher;
    fn build_hasher(&self) -> OffsetHasher {
        OffsetHasher(0)
    }
}

#[derive(Default)]
struct OffsetHasher(u64);

impl std::hash::Hasher for OffsetHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// A partition session's task: opens the session (saying so on
/// `opened`), runs it, reconnects after retriable failures, and releases
/// the partition when told.
async fn run_session(
    ctx: Ctx,
    mut part: Part,
    mut resolutions: mpsc::UnboundedReceiver<Resolution>,
    mut release: oneshot::Receiver<()>,
    opened: oneshot::Sender<Result<()>>,
) -> Result<()> {
    let mut conn = match connect(&ctx, &part.topic, part.partition).await {
        Ok(c) => {
            let _ = opened.send(Ok(()));
            c
        }
        Err(e) => {
            let e = part.name(e);
            let _ = opened.send(Err(e.clone()));
            return Err(e);
        }
    };
    let mut backoff = BACKOFF.0;
    let mut opened_at = Instant::now();
    // Held-back records are extended well before their deadline.
    let mut extend = tokio::time::interval((ctx.config.ack_timeout / 3).max(EXTEND_MIN));
    extend.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let flush_at = part.flush_at;
        let failure = tokio::select! {
            _ = extend.tick() => {
                part.extend_held_back(&conn.requests);
                continue;
            }
            // A dropped sender (the consumer is gone) releases too.
            _ = &mut release => {
                return part.release(conn, &mut resolutions, ctx.config.release_grace).await;
            }
            Some(r) = resolutions.recv() => {
                part.resolve(r);
                while let Ok(r) = resolutions.try_recv() {
                    part.resolve(r);
                }
                // Due now (nothing else in hand): sent here, not through
                // the timer, whose millisecond ticks would add up to 1 ms
                // to every round trip.
                let due = part.flush_at.is_some_and(|t| t <= Instant::now());
                if due || part.acks.len() >= ACKS_PER_MESSAGE || !part.nacks.is_empty() {
                    part.flush(&conn.requests);
                }
                continue;
            }
            _ = tokio::time::sleep_until(flush_at.unwrap_or_else(Instant::now)),
                if flush_at.is_some() => {
                part.flush(&conn.requests);
                continue;
            }
            msg = conn.responses.message() => match msg {
                Ok(Some(m)) => match part.on_message(m) {
                    Ok(()) => continue,
                    Err(e) => e,
                },
                Ok(None) => Error::Transport("the group session stream ended".into()),
                Err(status) => Error::from(status),
            },
        };
        if !failure.is_retriable() {
            return Err(part.fail(failure));
        }
        tracing::debug!(topic = %part.topic, partition = part.partition, error = %failure,
            "group session broke; opening it again");
        // The new session takes back everything the old one had out, and
        // starts its own batch memory.
        part.busy.values_mut().for_each(VecDeque::clear);
        part.batches.clear();
        // A session that keeps breaking as soon as it opens (a leader
        // that steps down at once, say) is not opened in a tight loop.
        let pause = if opened_at.elapsed() < HEALTHY {
            let next = (backoff * 2).min(BACKOFF.1);
            std::mem::replace(&mut backoff, next)
        } else {
            backoff = BACKOFF.0;
            Duration::ZERO
        };
        conn = tokio::select! {
            // Nothing to commit through: the broken stream's session ends
            // on the broker and commits by itself; acks not sent yet are
            // lost, and the next owner gets those records again.
            _ = &mut release => return Ok(()),
            c = async {
                tokio::time::sleep(pause).await;
                connect(&ctx, &part.topic, part.partition).await
            } => match c {
                Ok(c) => c,
                Err(e) => return Err(part.fail(e)),
            },
        };
        opened_at = Instant::now();
        part.flush(&conn.requests);
    }
}

/// Opens the partition's group session on its leader, retrying through
/// leader changes (30 s at most); reconnects carry the newest generation.
async fn connect(ctx: &Ctx, topic: &str, partition: u32) -> Result<Conn> {
    let router = ctx.client.router();
    router
        .retry(|| async move {
            let (_, rpc) = router.leader(topic, partition).await?;
            let session = ctx.config.session(ctx.generation.load(Ordering::Acquire));
            open(rpc, topic, partition, session).await
        })
        .await
}

async fn open(mut rpc: Rpc, topic: &str, partition: u32, session: GroupSession) -> Result<Conn> {
    let (requests, rx) = mpsc::unbounded_channel();
    let open = SubscribeOpen {
        topic: topic.to_string(),
        partition,
        group: Some(session),
        ..Default::default()
    };
    let first = SubscribeRequest {
        kind: Some(subscribe_request::Kind::Open(open)),
    };
    requests.send(first).map_err(|_| Error::Closed)?;
    let mut responses = rpc
        .subscribe(UnboundedReceiverStream::new(rx))
        .await?
        .into_inner();
    let first = tokio::time::timeout(CLOSE_TIMEOUT, responses.message())
        .await
        .map_err(|_| Error::Transport("no `opened` in time".into()))??;
    match first.and_then(|m| m.kind) {
        Some(subscribe_response::Kind::Opened(_)) => Ok(Conn {
            requests,
            responses,
        }),
        _ => Err(Error::Protocol(
            "group session did not start with `opened`".into(),
        )),
    }
}

impl Part {
    /// `e` with the partition named in its message.
    fn name(&self, e: Error) -> Error {
        let at = format!("{}/{}", self.topic, self.partition);
        match e {
            Error::Broker {
                reason,
                message,
                leader_hint,
            } => Error::Broker {
                reason,
                message: format!("{at}: {message}"),
                leader_hint,
            },
            Error::Transport(m) => Error::Transport(format!("{at}: {m}")),
            Error::Protocol(m) => Error::Protocol(format!("{at}: {m}")),
            other => other,
        }
    }

    /// Hands the error that ends the session to the application, which
    /// finds the partition no longer owned by then. Its records not yet
    /// taken are not handed out: their acks would go nowhere.
    fn fail(&self, e: Error) -> Error {
        let e = self.name(e);
        self.ended.store(true, Ordering::Release);
        self.released.store(true, Ordering::Release);
        let _ = self.out.send((self.released.clone(), Err(e.clone())));
        e
    }

    fn on_message(&mut self, m: SubscribeResponse) -> Result<()> {
        let Some(subscribe_response::Kind::Deliveries(d)) = m.kind else {
            return Err(Error::Protocol(
                "unexpected message on a group session".into(),
            ));
        };
        for b in d.batches {
            // Counted even if it held nothing: the broker counts it too.
            let base = covet_protocol::batch::read_header(&b)
                .map_err(bad_batch)?
                .base_offset;
            let records: Vec<StoredRecord> = BatchRecords::new(b)
                .map_err(bad_batch)?
                .collect::<std::result::Result<_, _>>()
                .map_err(bad_batch)?;
            self.batches.push_back((base, records));
        }
        // Handed out in offset order, as per-key order needs.
        let mut wanted: Vec<(u64, u32)> = d.records.iter().map(|r| (r.offset, r.count)).collect();
        wanted.sort_unstable();
        // A message may list hundreds of records from as many batches:
        // each is looked up from the batch with the nearest base below it,
        // not by trying every batch.
        let mut by_base: Vec<(u64, usize)> = self
            .batches
            .iter()
            .enumerate()
            .map(|(i, (base, _))| (*base, i))
            .collect();
        by_base.sort_unstable();
        for (offset, count) in wanted {
            let below = by_base.partition_point(|&(base, _)| base <= offset);
            let record = by_base[..below].iter().rev().find_map(|&(base, i)| {
                let records = &self.batches[i].1;
                let k = usize::try_from(offset - base).ok()?;
                records.get(k).filter(|r| r.offset == offset).cloned()
            });
            match record {
                Some(r) => self.arrive(r, count),
                None => {
                    return Err(Error::Protocol(format!(
                        "record {offset} was listed but is in none of the batches kept"
                    )))
                }
            }
        }
        // Trimmed only now: the records listed may be in any batch of this
        // message (there may be more than the memory holds) or in the
        // memory as it was before it. The broker's memory ends the same:
        // the last batches of the two together.
        let excess = self
            .batches
            .len()
            .saturating_sub(covet_protocol::GROUP_BATCH_MEMORY);
        self.batches.drain(..excess);
        Ok(())
    }

    /// A delivered record: handed out, held behind its key, or dropped.
    fn arrive(&mut self, r: StoredRecord, count: u32) {
        if self.released.load(Ordering::Acquire) {
            return;
        }
        if self.recent.contains(&r.offset) {
            self.push_ack(r.offset);
            return;
        }
        if self.in_hand.contains_key(&r.offset) {
            // A copy of a record in hand: its ack or nack settles it.
            return;
        }
        if let Some(key) = &r.key {
            if let Some(waiting) = self.busy.get_mut(key) {
                let at = waiting.partition_point(|(w, _)| w.offset < r.offset);
                if waiting.get(at).is_some_and(|(w, _)| w.offset == r.offset) {
                    waiting[at].1 = count;
                } else {
                    waiting.insert(at, (r, count));
                }
                return;
            }
            self.busy.insert(key.clone(), VecDeque::new());
        }
        self.hand_out(r, count);
    }

    fn hand_out(&mut self, r: StoredRecord, count: u32) {
        self.in_hand.insert(r.offset, r.key.clone());
        let record = GroupRecord {
            topic: self.topic.clone(),
            partition: self.partition,
            offset: r.offset,
            delivery_count: count,
            timestamp_ms: r.timestamp_ms,
            key: r.key,
            value: r.value,
            headers: r.headers,
            acker: Acker {
                offset: r.offset,
                tx: self.acks_tx.clone(),
                done: false,
            },
        };
        if let Err(mpsc::error::SendError((_, Ok(r)))) =
            self.out.send((self.released.clone(), Ok(record)))
        {
            r.acker.abandon();
        }
    }

    /// The application resolved a record: its ack or nack is queued and
    /// the next record of its key, if one waits, goes out.
    fn resolve(&mut self, r: Resolution) {
        let (Resolution::Ack(offset) | Resolution::Nack(offset, _) | Resolution::Abandon(offset)) =
            r;
        let Some(key) = self.in_hand.remove(&offset) else {
            return;
        };
        match r {
            Resolution::Ack(o) => {
                self.push_ack(o);
                self.remember(o);
            }
            // Not sent while releasing: the broker would deliver the
            // record again to this session, raising its count for
            // nothing; the next owner's session gets it at once anyway.
            Resolution::Nack(..) if self.released.load(Ordering::Acquire) => {}
            Resolution::Nack(o, delay) => self.nacks.push(Nack {
                offset: o,
                delay_ms: u32::try_from(delay.as_millis()).unwrap_or(u32::MAX),
            }),
            Resolution::Abandon(o) => self.returned.push(o),
        }
        let Some(key) = key else {
            return;
        };
        let next = self.busy.get_mut(&key).and_then(VecDeque::pop_front);
        match next {
            Some((r, count)) if !self.released.load(Ordering::Acquire) => self.hand_out(r, count),
            _ => {
                self.busy.remove(&key);
            }
        }
    }

    fn push_ack(&mut self, offset: u64) {
        self.acks.push(offset);
        // With nothing else in the application's hands no ack is coming to
        // travel with this one: it goes at once (a member holding one
        // record at a time would otherwise wait the linger every time).
        let at = if self.in_hand.is_empty() {
            Instant::now()
        } else {
            Instant::now() + ACK_LINGER
        };
        if self.flush_at.is_none_or(|t| t > at) {
            self.flush_at = Some(at);
        }
    }

    fn remember(&mut self, offset: u64) {
        if self.recent.insert(offset) {
            self.recent_order.push_back(offset);
        }
        while self.recent_order.len() > self.recent_cap {
            if let Some(old) = self.recent_order.pop_front() {
                self.recent.remove(&old);
            }
        }
    }

    /// Sends the queued acks and nacks; what a broken stream refuses
    /// stays queued for the next one.
    fn flush(&mut self, requests: &mpsc::UnboundedSender<SubscribeRequest>) {
        self.flush_at = None;
        while !self.acks.is_empty() {
            let n = self.acks.len().min(ACKS_PER_MESSAGE);
            let offsets: Vec<u64> = self.acks.drain(..n).collect();
            let msg = SubscribeRequest {
                kind: Some(subscribe_request::Kind::Acks(Acks { offsets })),
            };
            if let Err(e) = requests.send(msg) {
                if let Some(subscribe_request::Kind::Acks(a)) = e.0.kind {
                    self.acks.splice(0..0, a.offsets);
                }
                return;
            }
        }
        while let Some(nack) = self.nacks.pop() {
            let msg = SubscribeRequest {
                kind: Some(subscribe_request::Kind::Nack(nack)),
            };
            if requests.send(msg).is_err() {
                self.nacks.push(nack);
                return;
            }
        }
    }

    /// Notes the records of a delivery made after the release began: none
    /// reaches the application (copies of records it holds or acked are
    /// settled by their own ack, and are not given back).
    fn unseen(&mut self, m: SubscribeResponse) {
        if let Some(subscribe_response::Kind::Deliveries(d)) = m.kind {
            let fresh: Vec<u64> = d
                .records
                .iter()
                .map(|r| r.offset)
                .filter(|o| !self.in_hand.contains_key(o) && !self.recent.contains(o))
                .collect();
            self.returned.extend(fresh);
        }
    }

    /// Restarts, at the broker, the ack deadlines of the records held back
    /// behind their key.
    fn extend_held_back(&self, requests: &mpsc::UnboundedSender<SubscribeRequest>) {
        let offsets: Vec<u64> = self
            .busy
            .values()
            .flatten()
            .map(|(r, _)| r.offset)
            .collect();
        for chunk in offsets.chunks(ACKS_PER_MESSAGE) {
            let msg = SubscribeRequest {
                kind: Some(subscribe_request::Kind::Extend(Extend {
                    offsets: chunk.to_vec(),
                })),
            };
            // A broken stream is opened again, and the new session takes
            // back what the old one held: nothing to extend there.
            if requests.send(msg).is_err() {
                return;
            }
        }
    }

    /// Releases the partition: see the module docs.
    async fn release(
        mut self,
        conn: Conn,
        resolutions: &mut mpsc::UnboundedReceiver<Resolution>,
        grace: Duration,
    ) -> Result<()> {
        self.released.store(true, Ordering::Release);
        let held_back = self
            .busy
            .drain()
            .flat_map(|(_, q)| q)
            .map(|(r, _)| r.offset);
        self.returned.extend(held_back);
        let Conn {
            requests,
            mut responses,
        } = conn;
        let deadline = Instant::now() + grace;
        while !self.in_hand.is_empty() {
            tokio::select! {
                Some(r) = resolutions.recv() => self.resolve(r),
                _ = tokio::time::sleep_until(deadline) => break,
                msg = responses.message() => match msg {
                    // Delivered to a released session: given back, and
                    // the next owner gets it.
                    Ok(Some(m)) => self.unseen(m),
                    Ok(None) => {
                        return Err(self.name(Error::Transport("the group session ended".into())))
                    }
                    Err(status) => return Err(self.name(status.into())),
                },
            }
        }
        while let Ok(r) = resolutions.try_recv() {
            self.resolve(r);
        }
        self.flush(&requests);
        // Last: the broker delivers nothing more after it.
        let returned = std::mem::take(&mut self.returned);
        for chunk in returned.chunks(ACKS_PER_MESSAGE) {
            let msg = SubscribeRequest {
                kind: Some(subscribe_request::Kind::Returned(Returned {
                    offsets: chunk.to_vec(),
                })),
            };
            if requests.send(msg).is_err() {
                break;
            }
        }
        // Closing the request side makes the broker commit and end the
        // stream.
        drop(requests);
        let end = async {
            loop {
                match responses.message().await {
                    Ok(Some(_)) => {}
                    Ok(None) => return Ok(()),
                    Err(status) => return Err(Error::from(status)),
                }
            }
        };
        match tokio::time::timeout(CLOSE_TIMEOUT, end).await {
            Ok(outcome) => outcome.map_err(|e| self.name(e)),
            Err(_) => Err(self.name(Error::Transport(format!(
                "the session did not end within {CLOSE_TIMEOUT:?} of its release"
            )))),
        }
    }
}

fn bad_batch(e: covet_protocol::batch::BatchError) -> Error {
    Error::Protocol(format!("broker sent a bad batch: {e}"))
}
