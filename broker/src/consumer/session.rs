//! A consumer group's session on one partition, at the partition's leader
//! (ADR 0009): delivers records from the group's committed offset while
//! the member holds fewer than `max_in_flight` unacknowledged, takes acks
//! and nacks on the same stream, delivers again what is nacked or not
//! acknowledged in time, hands records delivered `max_deliveries` times to
//! the dead-letter topic, and commits the group's progress through the
//! partition's Raft group every [`COMMIT_INTERVAL`] and when it ends.
//!
//! The acknowledgement state ([`Cursor`]) outlives a session: it stays in
//! [`GroupSessions`] for the next session of the same group and partition,
//! which takes back what the previous one held. One session per group and
//! partition runs at a time: a session of a newer generation fences the
//! older one. A new leader (or term) builds the cursor afresh from the
//! group's applied commit.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use covet_protocol::api::{position, subscribe_request, subscribe_response};
use covet_protocol::api::{
    Deliveries, GroupSession, Opened, RecordDelivery, SubscribeRequest, SubscribeResponse,
};
use covet_protocol::batch::{self, Header, Record};
use covet_protocol::topic::validate_group_name;
use futures::Stream;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use crate::catalog::{LocalReplica, PartitionHandle};
use crate::consumer::cursor::{Cursor, Limits, Next};
use crate::consumer::dead_letters::DeadLetters;
use crate::driver::NodeHandle;
use crate::error::{BrokerError, Result};
use crate::state::groups::GroupEntry;
use crate::subscribe::{blocking, matching, read_batches_through, Read};

/// How often a session commits its group's progress when it changed.
pub const COMMIT_INTERVAL: Duration = Duration::from_millis(200);
/// The most records a member may hold unacknowledged.
pub const MAX_IN_FLIGHT: u32 = 10_000;
const DEFAULT_ACK_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_MAX_DELIVERIES: u32 = 5;
/// Records per `Deliveries` message at most.
const RECORDS_PER_MESSAGE: usize = 4096;

/// A group's cursor on one partition, between and during sessions.
struct Slot {
    cursor: Option<Cursor>,
    /// The leader term the cursor was built in.
    term: u64,
    /// The newest generation that opened a session; sessions watch it.
    generation: watch::Sender<u64>,
    /// The generation of the session running now, if one is.
    active: Option<u64>,
    /// Counts the sessions opened: the running one is the newest. A member
    /// that reconnects opens a session of the same generation, which takes
    /// over from the one its lost connection left behind.
    serial: u64,
    /// Raised by a reset or deletion of the group here; sessions watch it
    /// and end.
    resets: watch::Sender<u64>,
}

/// A slot shared by the sessions of one group on one partition.
type SharedSlot = Arc<tokio::sync::Mutex<Slot>>;

/// The cursors of every group on every partition this node leads, by
/// (group name, Raft group).
pub struct GroupSessions {
    slots: Mutex<HashMap<(String, u64), SharedSlot>>,
    dead_letters: DeadLetters,
}

impl GroupSessions {
    /// Sessions of a node whose client address is `address` (its dead
    /// letters are written through it).
    pub fn new(address: String) -> GroupSessions {
        GroupSessions {
            slots: Mutex::default(),
            dead_letters: DeadLetters::new(address),
        }
    }

    fn slot(&self, group: &str, raft_group: u64) -> SharedSlot {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(
            slots
                .entry((group.to_string(), raft_group))
                .or_insert_with(|| {
                    let (generation, _) = watch::channel(0);
                    let (resets, _) = watch::channel(0);
                    Arc::new(tokio::sync::Mutex::new(Slot {
                        cursor: None,
                        term: 0,
                        generation,
                        active: None,
                        serial: 0,
                        resets,
                    }))
                }),
        )
    }

    /// Proposes `entry` (a reset or deletion of `group` on the partition
    /// whose Raft group is `raft_group`) and waits until it is applied,
    /// with the group's sessions there kept out: a session running now is
    /// refused unless `force` ([`BrokerError::GroupActive`]), and with
    /// `force` ended (`FENCED`). The cursor is dropped first, so no commit
    /// of the old state can follow the entry; the next session builds its
    /// cursor from the applied state.
    pub async fn rewrite(
        &self,
        node: &NodeHandle,
        group: &str,
        raft_group: u64,
        entry: GroupEntry,
        force: bool,
    ) -> Result<()> {
        let slot = self.slot(group, raft_group);
        let mut s = slot.lock().await;
        if let Some(generation) = s.active {
            if !force {
                return Err(BrokerError::GroupActive(format!(
                    "group {group} has a member consuming this partition (generation \
                     {generation}); stop it first, or force"
                )));
            }
        }
        s.cursor = None;
        s.resets.send_modify(|n| *n += 1);
        node.group_entry(raft_group, entry).await
    }
}

/// The session's settings, checked.
fn limits(g: &GroupSession) -> Result<Limits> {
    validate_group_name(&g.group).map_err(BrokerError::InvalidRequest)?;
    if !(1..=MAX_IN_FLIGHT).contains(&g.max_in_flight) {
        return Err(BrokerError::InvalidRequest(format!(
            "max_in_flight must be between 1 and {MAX_IN_FLIGHT}, not {}",
            g.max_in_flight
        )));
    }
    Ok(Limits {
        max_in_flight: g.max_in_flight as usize,
        ack_timeout: match g.ack_timeout_ms {
            0 => DEFAULT_ACK_TIMEOUT,
            ms => Duration::from_millis(u64::from(ms)),
        },
        max_deliveries: match g.max_deliveries {
            0 => DEFAULT_MAX_DELIVERIES,
            n => n,
        },
    })
}

/// A group session, opened and ready to run.
pub struct Session {
    sessions: Arc<GroupSessions>,
    node: NodeHandle,
    topic: String,
    partition: u32,
    raft_group: u64,
    replica: LocalReplica,
    group: String,
    generation: u64,
    /// This session's number in its slot (see `Slot::serial`).
    serial: u64,
    /// The offsets `[base, end)` of the last batches sent on this stream,
    /// which the client keeps ([`covet_protocol::GROUP_BATCH_MEMORY`]).
    sent: std::collections::VecDeque<(u64, u64)>,
    dead_letter_topic: String,
    slot: SharedSlot,
    fence: watch::Receiver<u64>,
    resets: watch::Receiver<u64>,
    inbound: Streaming<SubscribeRequest>,
    shutdown: watch::Receiver<bool>,
    opened: Opened,
    /// The member returned records: it is closing, and nothing more is
    /// delivered on this stream (it would only come back again).
    closing: bool,
}

impl Session {
    /// Checks the request, takes over the group's cursor on this
    /// partition (fencing an older session) and says where delivery
    /// starts.
    #[allow(clippy::too_many_arguments)]
    pub async fn open(
        sessions: &Arc<GroupSessions>,
        node: NodeHandle,
        topic: &str,
        partition: &PartitionHandle,
        g: &GroupSession,
        inbound: Streaming<SubscribeRequest>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Session> {
        let limits = limits(g)?;
        let replica = partition.leading(node.node_id)?.clone();
        let (_, term) = *replica.leader.borrow();
        let progress = *replica.progress.borrow();
        let slot = sessions.slot(&g.group, partition.group);
        let fence = {
            let mut s = slot.lock().await;
            let newest = *s.generation.borrow();
            if g.generation < newest {
                return Err(BrokerError::Fenced(format!(
                    "generation {} of group {} is older than generation {newest}",
                    g.generation, g.group
                )));
            }
            let now = Instant::now();
            let same_term = s.term == term;
            match &mut s.cursor {
                Some(cursor) if same_term => cursor.new_session(limits, now),
                _ => {
                    let start = match g.start.as_ref().and_then(|p| p.kind.as_ref()) {
                        Some(position::Kind::Latest(_)) => progress.high_watermark,
                        Some(position::Kind::Offset(o)) => (*o).min(progress.high_watermark),
                        _ => progress.start_offset,
                    };
                    let commit = replica.groups.borrow().get(&g.group).cloned();
                    s.cursor = Some(Cursor::new(
                        commit.as_ref(),
                        start,
                        progress.start_offset,
                        limits,
                    ));
                    s.term = term;
                }
            }
            s.serial += 1;
            s.generation.send_replace(g.generation);
            s.active = Some(g.generation);
            (s.generation.subscribe(), s.resets.subscribe(), s.serial)
        };
        let (fence, resets, serial) = fence;
        let committed = {
            let s = slot.lock().await;
            s.cursor.as_ref().map_or(0, Cursor::committed)
        };
        let dead_letter_topic = if g.dead_letter_topic.is_empty() {
            format!("{topic}.dlq")
        } else {
            g.dead_letter_topic.clone()
        };
        Ok(Session {
            sessions: Arc::clone(sessions),
            node,
            topic: topic.to_string(),
            partition: partition.partition,
            raft_group: partition.group,
            replica,
            group: g.group.clone(),
            generation: g.generation,
            serial,
            sent: std::collections::VecDeque::new(),
            dead_letter_topic,
            slot,
            fence,
            resets,
            inbound,
            shutdown,
            opened: Opened {
                partition: partition.partition,
                offset: committed,
                start_offset: progress.start_offset,
                high_watermark: progress.high_watermark,
            },
            closing: false,
        })
    }

    /// Runs the session on its own task; the returned stream is the
    /// response side of the call.
    pub fn spawn(self) -> impl Stream<Item = std::result::Result<SubscribeResponse, Status>> {
        let (tx, rx) = mpsc::channel(2);
        tokio::spawn(async move {
            let mut session = self;
            let outcome = session.run(&tx).await;
            // Whatever ended the session, what was acknowledged is kept.
            session.commit().await;
            {
                let mut s = session.slot.lock().await;
                if s.serial == session.serial {
                    s.active = None;
                }
            }
            if let Err(e) = outcome {
                let _ = tx.send(Err(e.to_status())).await;
            }
        });
        ReceiverStream::new(rx)
    }

    async fn run(
        &mut self,
        tx: &mpsc::Sender<std::result::Result<SubscribeResponse, Status>>,
    ) -> Result<()> {
        let opened = SubscribeResponse {
            kind: Some(subscribe_response::Kind::Opened(self.opened)),
        };
        if tx.send(Ok(opened)).await.is_err() {
            return Ok(());
        }
        let mut progress = self.replica.progress.clone();
        let mut leader = self.replica.leader.clone();
        let mut next_commit = tokio::time::Instant::now() + COMMIT_INTERVAL;
        loop {
            if !self.deliver(tx).await? {
                return Ok(());
            }
            let wake = {
                let s = self.slot.lock().await;
                s.cursor
                    .as_ref()
                    .and_then(Cursor::next_deadline)
                    .map(tokio::time::Instant::from_std)
            };
            let wake = wake.map_or(next_commit, |w| w.min(next_commit));
            tokio::select! {
                msg = self.inbound.message() => match msg {
                    Ok(Some(m)) => self.on_request(m).await?,
                    Ok(None) => return Ok(()),
                    Err(status) => return Err(BrokerError::from_inbound(&status)),
                },
                changed = progress.changed() => {
                    if changed.is_err() {
                        return Err(BrokerError::UnknownTopic(self.topic.clone()));
                    }
                }
                _ = tokio::time::sleep_until(wake) => {
                    if tokio::time::Instant::now() >= next_commit {
                        self.commit().await;
                        next_commit = tokio::time::Instant::now() + COMMIT_INTERVAL;
                    }
                }
                _ = self.fence.changed() => {
                    let newest = *self.fence.borrow_and_update();
                    if newest != self.generation {
                        return Err(BrokerError::Fenced(format!(
                            "a session of generation {newest} took over group {} on this partition",
                            self.group
                        )));
                    }
                    if self.slot.lock().await.serial != self.serial {
                        // The member reconnected: its new session took over.
                        return Ok(());
                    }
                }
                _ = self.resets.changed() => {
                    return Err(BrokerError::Fenced(format!(
                        "group {} was reset or deleted on this partition",
                        self.group
                    )));
                }
                _ = leader.changed() => {
                    let (now, _) = *leader.borrow_and_update();
                    if now != self.node.node_id {
                        return Err(BrokerError::NotLeader { leader_hint: now });
                    }
                }
                _ = self.shutdown.changed() => return Err(BrokerError::ShuttingDown),
                _ = tx.closed() => return Ok(()),
            }
        }
    }

    /// Takes an ack or a nack.
    async fn on_request(&mut self, m: SubscribeRequest) -> Result<()> {
        let mut s = self.slot.lock().await;
        let Some(cursor) = s.cursor.as_mut() else {
            return Ok(());
        };
        match m.kind {
            Some(subscribe_request::Kind::Acks(acks)) => {
                for offset in acks.offsets {
                    cursor.ack(offset);
                }
            }
            Some(subscribe_request::Kind::Nack(n)) => {
                let delay = Duration::from_millis(u64::from(n.delay_ms));
                cursor.nack(n.offset, delay, Instant::now());
            }
            Some(subscribe_request::Kind::Extend(e)) => {
                let now = Instant::now();
                for offset in e.offsets {
                    cursor.extend(offset, now);
                }
            }
            Some(subscribe_request::Kind::Returned(r)) => {
                let now = Instant::now();
                for offset in r.offsets {
                    cursor.returned(offset, now);
                }
                self.closing = true;
            }
            _ => {
                return Err(BrokerError::InvalidRequest(
                    "only acks, nacks, extends and returns may follow a group open".into(),
                ))
            }
        }
        Ok(())
    }

    /// Delivers what the cursor allows now (and writes dead letters);
    /// false if the client went away.
    async fn deliver(
        &mut self,
        tx: &mpsc::Sender<std::result::Result<SubscribeResponse, Status>>,
    ) -> Result<bool> {
        if self.closing {
            return Ok(true);
        }
        loop {
            let progress = *self.replica.progress.borrow();
            let (records, dead) = {
                let mut s = self.slot.lock().await;
                if s.serial != self.serial {
                    // Taken over by a newer session of this member.
                    return Ok(true);
                }
                let Some(cursor) = s.cursor.as_mut() else {
                    return Ok(true);
                };
                let now = Instant::now();
                cursor.expire(now);
                if !cursor.worth_delivering() {
                    return Ok(true);
                }
                let mut records = Vec::new();
                let mut dead = Vec::new();
                while records.len() < RECORDS_PER_MESSAGE {
                    match cursor.next(progress.high_watermark, progress.start_offset, now) {
                        Some(Next::Deliver { offset, count }) => {
                            records.push(RecordDelivery { offset, count })
                        }
                        Some(Next::DeadLetter { offset, count }) => dead.push((offset, count)),
                        None => break,
                    }
                }
                (records, dead)
            };
            if records.is_empty() && dead.is_empty() {
                return Ok(true);
            }
            for (offset, count) in dead {
                self.dead_letter(offset, count).await;
            }
            if records.is_empty() {
                continue;
            }
            // Records of batches the client keeps need no read and no send.
            let missing: Vec<RecordDelivery> = records
                .iter()
                .filter(|r| {
                    !self
                        .sent
                        .iter()
                        .any(|&(base, end)| (base..end).contains(&r.offset))
                })
                .copied()
                .collect();
            let mut batches = Vec::new();
            if !missing.is_empty() {
                for (base, batch) in self.batches_holding(&missing).await? {
                    let end = batch::read_header(&batch)
                        .map(|h| h.next_offset())
                        .map_err(|e| BrokerError::Storage(format!("stored batch: {e}")))?;
                    if self.sent.len() == covet_protocol::GROUP_BATCH_MEMORY {
                        self.sent.pop_front();
                    }
                    self.sent.push_back((base, end));
                    batches.push(batch);
                }
            }
            let msg = Deliveries {
                batches,
                records,
                high_watermark: progress.high_watermark,
            };
            let resp = SubscribeResponse {
                kind: Some(subscribe_response::Kind::Deliveries(msg)),
            };
            if tx.send(Ok(resp)).await.is_err() {
                return Ok(false);
            }
        }
    }

    /// The stored batches that hold `records` (each batch once, in offset
    /// order), with their base offsets.
    async fn batches_holding(&self, records: &[RecordDelivery]) -> Result<Vec<(u64, Bytes)>> {
        let mut offsets: Vec<u64> = records.iter().map(|r| r.offset).collect();
        offsets.sort_unstable();
        let (index, storage) = (self.replica.index.clone(), self.replica.storage.clone());
        blocking(move || {
            let mut out: Vec<(u64, Bytes)> = Vec::new();
            let mut covered_until = 0u64;
            let mut i = 0;
            while i < offsets.len() {
                let first = offsets[i];
                if first < covered_until {
                    i += 1;
                    continue;
                }
                let last = offsets[offsets.len() - 1];
                let Read::Found(entries, locations) =
                    read_batches_through(&index, &storage, first, last, 64)?
                else {
                    return Err(BrokerError::OffsetOutOfRange {
                        requested: first,
                        start: 0,
                        end: 0,
                    });
                };
                let mut progressed = false;
                for (entry, loc) in matching(&entries, &locations) {
                    let end = loc.base_offset + u64::from(loc.record_count);
                    while i < offsets.len() && offsets[i] < loc.base_offset {
                        i += 1;
                    }
                    if i < offsets.len() && offsets[i] < end {
                        out.push((loc.base_offset, entry.data.clone()));
                        covered_until = end;
                        progressed = true;
                        while i < offsets.len() && offsets[i] < end {
                            i += 1;
                        }
                    }
                    if i == offsets.len() {
                        break;
                    }
                }
                if !progressed {
                    return Err(BrokerError::Internal(format!(
                        "offset {first} is not in the batches read for it"
                    )));
                }
            }
            out.dedup_by_key(|(base, _)| *base);
            Ok(out)
        })
        .await
        .map_err(|s| BrokerError::Internal(s.message().to_string()))?
    }

    /// Writes the record at `offset` to the dead-letter topic, then counts
    /// it as handled; on failure it goes back to the queue.
    async fn dead_letter(&mut self, offset: u64, count: u32) {
        let outcome = self.write_dead_letter(offset, count).await;
        let mut s = self.slot.lock().await;
        let Some(cursor) = s.cursor.as_mut() else {
            return;
        };
        match outcome {
            Ok(()) => {
                cursor.ack(offset);
            }
            Err(e) => {
                tracing::warn!(group = %self.group, topic = %self.topic, offset, error = %e,
                    "cannot write a dead letter; it will be tried again");
                cursor.dead_letter_failed(offset, Instant::now() + Duration::from_secs(1));
            }
        }
    }

    async fn write_dead_letter(&self, offset: u64, count: u32) -> Result<()> {
        let batches = self
            .batches_holding(&[RecordDelivery { offset, count }])
            .await?;
        let record = batches
            .iter()
            .filter_map(|(_, b)| batch::decode_records(b).ok())
            .flatten()
            .find(|r| r.offset == offset)
            .ok_or_else(|| BrokerError::Internal(format!("record {offset} not found")))?;
        let mut headers = record.headers.clone();
        for (name, value) in [
            ("covet-dlq-reason", "max-deliveries".to_string()),
            ("covet-dlq-group", self.group.clone()),
            ("covet-dlq-topic", self.topic.clone()),
            ("covet-dlq-partition", self.partition.to_string()),
            ("covet-dlq-offset", offset.to_string()),
            ("covet-dlq-deliveries", count.to_string()),
        ] {
            headers.push(Header {
                key: name.into(),
                value: Bytes::from(value),
            });
        }
        let dead = Record {
            key: record.key.clone(),
            value: record.value.clone(),
            headers,
            timestamp_ms: record.timestamp_ms,
        };
        self.sessions
            .dead_letters
            .write(&self.dead_letter_topic, dead)
            .await
    }

    /// Commits the group's progress if it changed (errors are logged: the
    /// next commit carries the same state, and an uncommitted ack only
    /// means a redelivery).
    async fn commit(&mut self) {
        let state = {
            let mut s = self.slot.lock().await;
            s.cursor.as_mut().and_then(|c| c.commit_state(&self.group))
        };
        let Some(state) = state else {
            return;
        };
        if let Err(e) = self
            .node
            .group_entry(self.raft_group, GroupEntry::Commit(state))
            .await
        {
            tracing::debug!(group = %self.group, topic = %self.topic, error = %e, "group commit failed");
            let mut s = self.slot.lock().await;
            if let Some(c) = s.cursor.as_mut() {
                c.mark_changed();
            }
        }
    }
}
