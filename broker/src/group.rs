//! One Raft group on this node: its `RawNode`, its durable storage, its
//! state machine, and the proposals waiting to be applied.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use bytes::{Bytes, BytesMut};
use covet_protocol::batch;
use covet_raft_store::{GroupStorage, LogOptions};
use raft::prelude::{
    ConfChangeV2, ConfState, Entry, EntryType, HardState, Message, MessageType, Snapshot,
    SnapshotMetadata,
};
use raft::{ProgressState, RawNode, Ready, SnapshotStatus, StateRole, Storage};
use tokio::sync::{oneshot, watch};

use crate::error::{BrokerError, Result};
use crate::state::groups::GroupEntry;
use crate::state::meta::{MetaEffect, MetaState};
use crate::state::partition::PartitionState;

/// The replicated state a group drives.
// One per group, long-lived and moved rarely: boxing the larger variant
// would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum Machine {
    Meta(MetaState),
    Partition(PartitionState),
}

impl Machine {
    fn applied(&self) -> u64 {
        match self {
            Machine::Meta(m) => m.applied(),
            Machine::Partition(p) => p.applied(),
        }
    }
}

/// Where a group's outgoing Raft messages go: the transport, or an
/// in-memory network in tests.
pub trait Outbox {
    /// Queues a message; false if it was dropped.
    fn send(&self, group: u64, message: Message) -> bool;
}

/// What a proposal's waiter receives once its entry is applied.
#[derive(Debug, Clone)]
pub enum Applied {
    Batch {
        base_offset: u64,
        record_count: u32,
    },
    /// A membership change took effect; the group's voters now.
    Membership(Vec<u64>),
    Meta(MetaEffect),
    /// A consumer group's commit, reset or deletion took effect on the
    /// partition.
    Group,
}

pub type Responder = oneshot::Sender<Result<Applied>>;

struct Waiter {
    term: u64,
    tx: Responder,
}

pub struct Group {
    pub id: u64,
    pub node: RawNode<GroupStorage>,
    pub storage: GroupStorage,
    pub machine: Machine,
    /// Leader as last seen, shared with readers through the catalog.
    pub leader: watch::Sender<(u64, u64)>,
    waiters: BTreeMap<u64, Waiter>,
    /// Answers decided in the current apply pass, sent once its state is
    /// published.
    answers: Vec<(Responder, Result<Applied>)>,
    /// Offset the next proposed batch gets, valid while this node leads in
    /// the current term; recomputed from the log tail when unknown.
    proposed_next: Option<u64>,
    role: StateRole,
    /// Ticks each follower has been waiting for a snapshot (leader only).
    snapshot_waits: HashMap<u64, u32>,
    /// Set on a replica rebuilt after a fault: it grants no vote until its
    /// log reaches this index (see the `faults` module).
    pub vote_barrier: Option<u64>,
    /// Ticks since the replica was rebuilt (paces its reports).
    pub rebuild_ticks: u64,
    /// Highest index this replica acknowledged to a leader (reported by
    /// `cluster status`; power-loss tests hold a restart to it).
    pub acked: u64,
    /// The term `acked` counts in.
    pub acked_term: u64,
}

/// Ticks a leader waits for a follower to acknowledge a snapshot before it
/// counts the snapshot as lost: long enough for a big one to travel.
pub const SNAPSHOT_TIMEOUT_TICKS: u32 = 100;

/// Bytes of entry data a leader holds proposed but not committed before it
/// refuses new proposals (raft-rs's `max_uncommitted_size`): a leader cut
/// off from its followers answers with a retriable error instead of growing
/// its memory with every proposal. Four of the largest batches fit.
pub const MAX_UNCOMMITTED_BYTES: u64 = 256 << 20;

/// Index and term of the snapshot every group's log starts after.
pub const INIT_INDEX: u64 = 5;
pub const INIT_TERM: u64 = 5;

/// How a group that does not exist yet on disk starts.
pub struct Bootstrap {
    /// Its initial voters (every replica starts with the same set).
    pub voters: Vec<u64>,
    /// The replica that campaigns at once instead of waiting out an
    /// election timeout, so leaders are spread as assigned.
    pub preferred_leader: u64,
}

/// Parameters shared by every group of the node.
pub struct GroupConfig<'a> {
    pub node_id: u64,
    pub log_options: LogOptions,
    pub logger: &'a slog::Logger,
    pub election_tick: usize,
    pub heartbeat_tick: usize,
    /// A fixed election timeout in ticks instead of raft-rs's randomized
    /// one: deterministic simulations give each node its own.
    pub fixed_election_timeout: Option<usize>,
}

impl Group {
    /// Opens (or creates, with the voters of `bootstrap`) the group stored
    /// in `dir`, and brings its state machine up to the snapshot the log
    /// starts from.
    pub fn open(
        id: u64,
        dir: &Path,
        mut machine: Machine,
        cfg: &GroupConfig<'_>,
        bootstrap: &Bootstrap,
    ) -> Result<Group> {
        let storage = GroupStorage::open(dir, cfg.log_options)?;
        let state = storage
            .initial_state()
            .map_err(|e| BrokerError::Storage(e.to_string()))?;
        let fresh = storage
            .last_index()
            .map_err(|e| BrokerError::Storage(e.to_string()))?
            == 0;
        let created = state.conf_state.voters.is_empty() && fresh;
        if created && !bootstrap.voters.is_empty() {
            Self::bootstrap(&storage, &bootstrap.voters)?;
        }
        Self::recover_machine(id, dir, &storage, &mut machine, fresh)?;
        let applied = Self::reconcile_commit(&storage, machine.applied())?;
        let hs = storage.hard_state();
        tracing::info!(
            group = id,
            term = hs.term,
            vote = hs.vote,
            commit = hs.commit,
            last_index = storage.last_index().unwrap_or(0),
            applied,
            "recovered raft state"
        );
        let config = raft::Config {
            id: cfg.node_id,
            election_tick: cfg.election_tick,
            heartbeat_tick: cfg.heartbeat_tick,
            applied,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            max_uncommitted_size: MAX_UNCOMMITTED_BYTES,
            check_quorum: true,
            pre_vote: true,
            min_election_tick: cfg.fixed_election_timeout.unwrap_or(0),
            max_election_tick: cfg.fixed_election_timeout.map_or(0, |t| t + 1),
            ..Default::default()
        };
        let mut node = RawNode::new(&config, storage.clone(), cfg.logger)
            .map_err(|e| BrokerError::Internal(format!("raft group {id}: {e}")))?;
        let voters = node
            .raft
            .prs()
            .conf()
            .voters()
            .ids()
            .iter()
            .collect::<Vec<_>>();
        if voters == [cfg.node_id] || (created && bootstrap.preferred_leader == cfg.node_id) {
            // A lone voter need not wait out an election timeout, nor the
            // preferred leader of a new group.
            let _ = node.campaign();
        }
        let mut group = Group {
            id,
            node,
            storage,
            machine,
            leader: watch::channel((0, 0)).0,
            waiters: BTreeMap::new(),
            answers: Vec::new(),
            proposed_next: None,
            role: StateRole::Follower,
            snapshot_waits: HashMap::new(),
            vote_barrier: None,
            rebuild_ticks: 0,
            acked: 0,
            acked_term: 0,
        };
        group.vote_barrier = crate::faults::read_barrier(dir);
        group.observe_role();
        Ok(group)
    }

    /// Starts a new group's log after a snapshot at [`INIT_INDEX`] whose
    /// metadata names the first voters (ADR 0005): a member added later
    /// starts with an empty log, so its leader must send it a snapshot, and
    /// it learns the configuration from that instead of from entries it
    /// never sees. Durable when it returns.
    fn bootstrap(storage: &GroupStorage, voters: &[u64]) -> Result<()> {
        let mut meta = SnapshotMetadata {
            index: INIT_INDEX,
            term: INIT_TERM,
            ..Default::default()
        };
        meta.set_conf_state(ConfState {
            voters: voters.to_vec(),
            ..Default::default()
        });
        let mut snapshot = Snapshot::default();
        snapshot.set_metadata(meta);
        storage.apply_snapshot(snapshot)?;
        let hs = HardState {
            term: INIT_TERM,
            vote: 0,
            commit: INIT_INDEX,
            ..Default::default()
        };
        storage.set_hard_state(&hs)?;
        storage.sync()?;
        Ok(())
    }

    /// Starts the empty log of a replica rebuilt after a fault: the same
    /// bootstrap snapshot as every replica's, with the term and vote the
    /// replica had (so it never votes twice in a term). Durable when it
    /// returns.
    pub fn bootstrap_replica(
        dir: &Path,
        options: LogOptions,
        voters: &[u64],
        previous: &HardState,
    ) -> Result<()> {
        let storage = GroupStorage::open(dir, options)?;
        Self::bootstrap(&storage, voters)?;
        if previous.term > INIT_TERM {
            let hs = HardState {
                term: previous.term,
                vote: previous.vote,
                commit: INIT_INDEX,
                ..Default::default()
            };
            storage.set_hard_state(&hs)?;
            storage.sync()?;
        }
        Ok(())
    }

    /// Brings the state machine in line with the log it will replay: from
    /// the snapshot the log starts after, when sled is behind it; reset,
    /// when the log is gone (a topic deletion whose sled write was lost).
    fn recover_machine(
        id: u64,
        dir: &Path,
        storage: &GroupStorage,
        machine: &mut Machine,
        fresh: bool,
    ) -> Result<()> {
        let snap = storage.stored_snapshot();
        match machine {
            Machine::Partition(p) if fresh && snap.get_metadata().index == 0 && p.applied() > 0 => {
                tracing::warn!(group = id, "partition log missing; resetting its state");
                p.reset()
            }
            Machine::Partition(p) if snap.get_metadata().index > 0 => p.restore(&snap.data),
            Machine::Meta(m) if fresh && m.applied() > 0 => Err(BrokerError::Storage(format!(
                "metadata log in {} is empty but sled says index {} was applied",
                dir.display(),
                m.applied()
            ))),
            _ => Ok(()),
        }
    }

    /// Installs a snapshot sent by the leader: the log is replaced and the
    /// state machine restored from it.
    pub fn install_snapshot(&mut self, snapshot: raft::prelude::Snapshot) -> Result<()> {
        let data = snapshot.data.clone();
        self.storage.apply_snapshot(snapshot)?;
        match &mut self.machine {
            Machine::Partition(p) => p.restore(&data),
            Machine::Meta(_) => Err(BrokerError::Internal(
                "metadata snapshots are not supported yet".into(),
            )),
        }
    }

    /// raft-rs requires `applied <= commit`. The hard state's commit can lag
    /// what was applied (an entry is applied before the next round persists
    /// the commit index that covers it), and everything applied was
    /// committed, so raise the stored commit to match.
    fn reconcile_commit(storage: &GroupStorage, applied: u64) -> Result<u64> {
        let state = storage
            .initial_state()
            .map_err(|e| BrokerError::Storage(e.to_string()))?;
        let first = storage
            .first_index()
            .map_err(|e| BrokerError::Storage(e.to_string()))?;
        let last = storage
            .last_index()
            .map_err(|e| BrokerError::Storage(e.to_string()))?;
        let applied = applied.max(first.saturating_sub(1));
        if applied > last {
            return Err(BrokerError::Storage(format!(
                "applied index {applied} is beyond the log's last index {last}"
            )));
        }
        if state.hard_state.commit < applied {
            let mut hs = state.hard_state.clone();
            hs.commit = applied;
            storage.set_hard_state(&hs)?;
            storage.sync()?;
        }
        Ok(applied)
    }

    pub fn is_leader(&self) -> bool {
        self.node.raft.state == StateRole::Leader
    }

    /// The follower best placed to take over this group's leadership: the
    /// most caught-up other voter. `None` unless this node leads and has a
    /// follower.
    pub fn transfer_target(&self) -> Option<u64> {
        self.transfer_target_among(None)
    }

    /// Like [`Group::transfer_target`], restricted to `candidates` if given.
    pub fn transfer_target_among(&self, candidates: Option<&[u64]>) -> Option<u64> {
        if !self.is_leader() {
            return None;
        }
        let me = self.node.raft.id;
        let prs = self.node.raft.prs();
        prs.iter()
            .filter(|(&id, _)| id != me && candidates.is_none_or(|c| c.contains(&id)))
            .filter(|(&id, _)| prs.conf().voters().contains(id))
            .max_by_key(|(_, pr)| pr.matched)
            .map(|(&id, _)| id)
    }

    pub fn voters(&self) -> Vec<u64> {
        self.node.raft.prs().conf().voters().ids().iter().collect()
    }

    fn not_leader(&self) -> BrokerError {
        BrokerError::NotLeader {
            leader_hint: self.node.raft.leader_id,
        }
    }

    /// Proposes an entry; `tx` is answered when it is applied.
    pub fn propose(&mut self, data: Bytes, tx: Responder) -> bool {
        self.propose_entry(Bytes::new(), data, tx)
    }

    /// Proposes a consumer group's entry to this partition; `tx` is
    /// answered once it is applied ([`Applied::Group`]) or refused.
    pub fn propose_group_entry(&mut self, entry: &GroupEntry, tx: Responder) -> bool {
        let (context, data) = entry.encode();
        self.propose_entry(Bytes::from_static(context), data, tx)
    }

    fn propose_entry(&mut self, context: Bytes, data: Bytes, tx: Responder) -> bool {
        if !self.is_leader() {
            let _ = tx.send(Err(self.not_leader()));
            return false;
        }
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgPropose);
        m.from = self.node.raft.id;
        let e = Entry {
            data,
            context,
            ..Default::default()
        };
        m.set_entries(vec![e].into());
        if self.node.step(m).is_err() {
            // A leader refuses a proposal only when its uncommitted log is
            // full (it cannot reach a quorum, or they are slow): retriable.
            let err = if self.is_leader() {
                BrokerError::Timeout(format!(
                    "group {} has {MAX_UNCOMMITTED_BYTES} bytes proposed and not committed yet; \
                     retry",
                    self.id
                ))
            } else {
                self.not_leader()
            };
            let _ = tx.send(Err(err));
            return false;
        }
        self.await_last_entry(tx);
        true
    }

    /// Registers `tx` for the entry just appended at the log's tail. A
    /// waiter already at that index belongs to an entry this log no longer
    /// holds (it was cut back and refilled).
    fn await_last_entry(&mut self, tx: Responder) {
        let index = self.node.raft.raft_log.last_index();
        let waiter = Waiter {
            term: self.node.raft.term,
            tx,
        };
        if let Some(stale) = self.waiters.insert(index, waiter) {
            let _ = stale.tx.send(Err(self.not_leader()));
        }
    }

    /// Proposes a change of voters; `tx` is answered once it is applied.
    /// One change at a time, as raft-rs requires.
    pub fn propose_membership(&mut self, change: ConfChangeV2, tx: Responder) -> bool {
        if !self.is_leader() {
            let _ = tx.send(Err(self.not_leader()));
            return false;
        }
        if self.membership_pending() {
            let _ = tx.send(Err(BrokerError::Timeout(
                "waiting for another membership change to finish".into(),
            )));
            return false;
        }
        if self.node.propose_conf_change(Vec::new(), change).is_err() {
            let _ = tx.send(Err(self.not_leader()));
            return false;
        }
        self.await_last_entry(tx);
        true
    }

    /// Whether a membership change is proposed and not applied yet.
    pub fn membership_pending(&self) -> bool {
        self.node.raft.pending_conf_index > self.node.raft.raft_log.applied
    }

    /// Stamps the next offset into a validated batch and proposes it.
    #[tracing::instrument(level = "debug", skip_all, fields(group = self.id, bytes = batch_bytes.len()))]
    pub fn propose_batch(&mut self, batch_bytes: Bytes, tx: Responder) {
        if !self.is_leader() {
            let _ = tx.send(Err(self.not_leader()));
            return;
        }
        if let Machine::Partition(p) = &self.machine {
            // A retry of a batch already applied is answered at once.
            if let Some((base_offset, record_count)) = p.applied_duplicate(&batch_bytes) {
                let _ = tx.send(Ok(Applied::Batch {
                    base_offset,
                    record_count,
                }));
                return;
            }
        }
        let next = match self.proposed_next {
            Some(n) => n,
            None => match self.tail_next_offset() {
                Ok(n) => n,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            },
        };
        // The request's buffer is shared with the rest of the gRPC frame, so
        // stamping needs one private copy; the bytes are not re-encoded.
        let mut buf = BytesMut::from(&batch_bytes[..]);
        batch::stamp_base_offset(&mut buf, next);
        let count = match batch::read_header(&buf) {
            Ok(h) => u64::from(h.record_count),
            Err(e) => {
                let _ = tx.send(Err(BrokerError::CorruptBatch(e.to_string())));
                return;
            }
        };
        if self.propose(buf.freeze(), tx) {
            self.proposed_next = Some(next + count);
        }
    }

    /// The offset after the last batch in the log, replaying the
    /// acceptance rule of [`PartitionState::apply_batch`] over the entries
    /// not yet applied.
    fn tail_next_offset(&self) -> Result<u64> {
        let Machine::Partition(p) = &self.machine else {
            return Err(BrokerError::Internal("not a partition group".into()));
        };
        let mut next = p.next_offset();
        let last = self.node.raft.raft_log.last_index();
        let mut lo = self.node.raft.raft_log.applied + 1;
        while lo <= last {
            let entries = self
                .node
                .raft
                .raft_log
                .entries(lo, 8 << 20, raft::GetEntriesContext::empty(false))
                .map_err(|e| BrokerError::Storage(e.to_string()))?;
            for e in &entries {
                if let Ok(h) = batch::read_header(&e.data) {
                    if e.get_entry_type() == EntryType::EntryNormal && h.base_offset == next {
                        next = h.next_offset();
                    }
                }
            }
            lo += entries.len().max(1) as u64;
        }
        Ok(next)
    }

    /// Notes role changes; a new role means the offsets this node assumed
    /// for its proposals may no longer hold.
    pub fn observe_role(&mut self) {
        let role = self.node.raft.state;
        let now = (self.node.raft.leader_id, self.node.raft.term);
        self.leader
            .send_if_modified(|l| std::mem::replace(l, now) != now);
        if role != self.role {
            if self.role == StateRole::Leader {
                // A deposed leader cannot tell whether its pending proposals
                // will commit under the new leader; it says so now instead
                // of when (if ever) it applies their indexes. Idempotent
                // producers retry without duplicating.
                self.fail_all(self.not_leader());
            }
            self.role = role;
            self.proposed_next = None;
        }
    }

    /// The first half of a round: takes this group's `Ready` (if any),
    /// sends what may leave before persisting, installs a snapshot, applies
    /// what is committed, and writes new entries and hard state — without
    /// syncing. The caller syncs the storage and then calls
    /// [`Group::finish_ready`].
    pub fn write_ready(
        &mut self,
        out: &dyn Outbox,
        effects: &mut Vec<(u64, MetaEffect)>,
    ) -> Result<Option<Ready>> {
        if !self.node.has_ready() {
            return Ok(None);
        }
        let mut rd = self.node.ready();
        self.send(out, rd.take_messages());
        if !rd.snapshot().is_empty() {
            self.install_snapshot(rd.snapshot().clone())?;
        }
        self.apply_entries(rd.take_committed_entries(), effects)?;
        if !rd.entries().is_empty() {
            self.storage.append(rd.entries())?;
        }
        if let Some(hs) = rd.hs() {
            self.storage.set_hard_state(hs)?;
        }
        Ok(Some(rd))
    }

    /// The second half, once the storage is synced: sends the messages that
    /// had to wait for persistence (votes, append acks), advances, and
    /// applies what that committed.
    pub fn finish_ready(
        &mut self,
        mut rd: Ready,
        out: &dyn Outbox,
        effects: &mut Vec<(u64, MetaEffect)>,
    ) -> Result<()> {
        self.send(out, rd.take_persisted_messages());
        let mut light = self.node.advance(rd);
        if light.commit_index().is_some() {
            // Not synced here: the commit index is re-derived on restart.
            self.storage.set_hard_state(&self.node.raft.hard_state())?;
        }
        self.send(out, light.take_messages());
        self.apply_entries(light.take_committed_entries(), effects)?;
        self.node.advance_apply();
        self.observe_role();
        Ok(())
    }

    /// Hands messages to the transport; a message that cannot be queued
    /// marks its peer unreachable, so Raft slows down probing it instead of
    /// flooding a dead link.
    fn send(&mut self, out: &dyn Outbox, msgs: Vec<Message>) {
        for m in msgs {
            let to = m.to;
            if m.get_msg_type() == MessageType::MsgAppendResponse && !m.reject {
                // Per term: a later leader may legitimately cut entries an
                // earlier one never committed.
                if self.acked_term != m.term {
                    self.acked = 0;
                    self.acked_term = m.term;
                }
                self.acked = self.acked.max(m.index);
            }
            let snapshot = m.get_msg_type() == MessageType::MsgSnapshot;
            if !out.send(self.id, m) {
                self.node.report_unreachable(to);
                if snapshot {
                    // Otherwise the leader waits for this snapshot to land
                    // for as long as it leads, and never sends to the
                    // follower again.
                    self.node.report_snapshot(to, SnapshotStatus::Failure);
                }
            }
        }
    }

    /// Called every tick: a follower that has been waiting for a snapshot
    /// for [`SNAPSHOT_TIMEOUT_TICKS`] lost it on the way (a broken stream, a
    /// restart), so the send is reported failed and Raft sends a new one.
    /// A snapshot that lands ends the wait through the follower's answer.
    pub fn check_snapshots(&mut self) {
        if !self.is_leader() {
            self.snapshot_waits.clear();
            return;
        }
        let waiting: Vec<u64> = self
            .node
            .raft
            .prs()
            .iter()
            .filter(|(_, pr)| pr.state == ProgressState::Snapshot)
            .map(|(&id, _)| id)
            .collect();
        self.snapshot_waits.retain(|id, _| waiting.contains(id));
        for id in waiting {
            let ticks = self.snapshot_waits.entry(id).or_insert(0);
            *ticks += 1;
            if *ticks >= SNAPSHOT_TIMEOUT_TICKS {
                *ticks = 0;
                tracing::info!(
                    group = self.id,
                    follower = id,
                    "snapshot not acknowledged; resending"
                );
                self.node.report_snapshot(id, SnapshotStatus::Failure);
            }
        }
    }

    /// Applies committed entries in order, answering their waiters.
    pub fn apply_entries(
        &mut self,
        entries: Vec<Entry>,
        effects: &mut Vec<(u64, MetaEffect)>,
    ) -> Result<()> {
        for e in entries {
            let index = e.index;
            let is_group_entry =
                !e.context.is_empty() && matches!(self.machine, Machine::Partition(_));
            let outcome = match e.get_entry_type() {
                EntryType::EntryNormal if is_group_entry => {
                    Some(self.apply_group_entry(index, &e.context, &e.data))
                }
                EntryType::EntryNormal if e.data.is_empty() => {
                    self.mark_applied(index)?;
                    None
                }
                EntryType::EntryNormal => Some(self.apply_normal(index, &e.data, effects)?),
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                    Some(self.apply_conf_change(&e)?.map(Applied::Membership))
                }
            };
            if matches!(outcome, Some(Err(_)))
                && !is_group_entry
                && matches!(self.machine, Machine::Partition(_))
            {
                // A refused batch took a stamped offset it will not use:
                // whatever this node assumed about the tail is stale.
                self.proposed_next = None;
            }
            self.answer(index, e.term, outcome);
        }
        if let Machine::Partition(p) = &mut self.machine {
            p.flush_round()?;
        }
        // Answered only now, so a client that hears of its offset finds it
        // indexed and below the published high watermark.
        for (tx, result) in self.answers.drain(..) {
            let _ = tx.send(result);
        }
        Ok(())
    }

    /// Applies a consumer group's entry to the partition's group table
    /// (see [`crate::state::groups`]); a refused entry changes nothing, on
    /// every replica alike.
    fn apply_group_entry(&mut self, index: u64, context: &[u8], data: &[u8]) -> Result<Applied> {
        let Machine::Partition(p) = &mut self.machine else {
            return Err(BrokerError::Internal(
                "group entry outside a partition".into(),
            ));
        };
        p.mark_applied(index);
        let entry = GroupEntry::decode(context, data)?
            .ok_or_else(|| BrokerError::Internal("group entry without a context".into()))?;
        let outcome = p.apply_group(entry);
        if let Err(e) = &outcome {
            tracing::debug!(group = self.id, index, error = %e, "group entry refused");
        }
        outcome.map(|()| Applied::Group)
    }

    fn mark_applied(&mut self, index: u64) -> Result<()> {
        match &mut self.machine {
            Machine::Meta(m) => m.mark_applied(index),
            Machine::Partition(p) => {
                p.mark_applied(index);
                Ok(())
            }
        }
    }

    /// Applies one command. The outer `Result` is a failure of this node
    /// (storage); the inner one the command's own outcome.
    fn apply_normal(
        &mut self,
        index: u64,
        data: &Bytes,
        effects: &mut Vec<(u64, MetaEffect)>,
    ) -> Result<Result<Applied>> {
        match &mut self.machine {
            Machine::Partition(p) => {
                let accepted = p.apply_batch(index, data);
                if accepted.as_ref().is_ok_and(|a| a.duplicate) {
                    // A retry that was proposed after all: it took a stamped
                    // offset it will not use.
                    self.proposed_next = None;
                }
                Ok(accepted.map(|a| Applied::Batch {
                    base_offset: a.base_offset,
                    record_count: a.record_count,
                }))
            }
            Machine::Meta(m) => match m.apply(index, data) {
                Ok(effect) => {
                    effects.push((index, effect.clone()));
                    Ok(Ok(Applied::Meta(effect)))
                }
                Err(e @ BrokerError::Storage(_)) => Err(e),
                Err(e) => Ok(Err(e)),
            },
        }
    }

    /// Applies a committed membership change. The outer `Result` is a
    /// failure of this node (storage); the inner one says whether the change
    /// took effect, with the voters it left.
    ///
    /// A change raft-rs refuses (one that would remove the last voter, say)
    /// is skipped: every replica refuses the same entry the same way, so
    /// they agree, and a replay on restart skips it again. Propagating the
    /// error instead took the group out of service on every node, on every
    /// restart — for the metadata group, the node for good.
    fn apply_conf_change(&mut self, e: &Entry) -> Result<Result<Vec<u64>>> {
        let parsed = if e.get_entry_type() == EntryType::EntryConfChangeV2 {
            protobuf::Message::parse_from_bytes(&e.data)
        } else {
            <raft::prelude::ConfChange as protobuf::Message>::parse_from_bytes(&e.data)
                .map(raft_proto::ConfChangeI::into_v2)
        };
        let applied = parsed
            .map_err(|err| err.to_string())
            .and_then(|cc: ConfChangeV2| {
                self.node
                    .apply_conf_change(&cc)
                    .map_err(|err| err.to_string())
            });
        let cs = match applied {
            Ok(cs) => cs,
            Err(err) => {
                tracing::error!(
                    group = self.id,
                    index = e.index,
                    error = %err,
                    "committed membership change refused; skipped"
                );
                self.mark_applied(e.index)?;
                return Ok(Err(BrokerError::MembershipConflict(format!(
                    "the change cannot be applied: {err}"
                ))));
            }
        };
        self.storage.set_conf_state(&cs)?;
        // The applied index may reach sled (which syncs on its own
        // schedule) before this round's log sync: were the conf state still
        // in the page cache then, a power cut would leave a node that
        // restarts with the old voters and never re-applies the change.
        // Membership changes are rare; one extra sync each is cheap.
        self.storage.sync()?;
        self.record_conf_state(e.index, &cs)?;
        self.mark_applied(e.index)?;
        Ok(Ok(self.voters()))
    }

    /// Notes the voters a membership change at `index` produced, so a
    /// later compaction can tell the voters as of its own index.
    fn record_conf_state(&self, index: u64, cs: &ConfState) -> Result<()> {
        match &self.machine {
            Machine::Partition(p) => crate::state::confs::record(p.tree(), index, cs),
            // The metadata log is never compacted.
            Machine::Meta(_) => Ok(()),
        }
    }

    /// Answers the waiter of `index` (if its proposal is the entry that was
    /// applied) and fails waiters of earlier indexes, whose entries were
    /// replaced by another leader's.
    fn answer(&mut self, index: u64, term: u64, outcome: Option<Result<Applied>>) {
        while let Some(entry) = self.waiters.first_entry() {
            if *entry.key() > index {
                break;
            }
            let (i, w) = entry.remove_entry();
            let result = match (&outcome, i == index && w.term == term) {
                (Some(result), true) => result.clone(),
                _ => Err(BrokerError::NotLeader {
                    leader_hint: self.node.raft.leader_id,
                }),
            };
            self.answers.push((w.tx, result));
            if i == index {
                break;
            }
        }
    }

    /// Writes a partition's applied state to sled when a checkpoint is due,
    /// or now with `force` (see [`crate::state::partition`]). Call between
    /// rounds.
    pub fn checkpoint(&mut self, force: bool) -> Result<()> {
        if let Machine::Partition(p) = &mut self.machine {
            if force || p.checkpoint_due() {
                p.checkpoint()?;
            }
        }
        Ok(())
    }

    /// Fails every waiter (shutdown, group removal).
    pub fn fail_all(&mut self, err: BrokerError) {
        for (_, w) in std::mem::take(&mut self.waiters) {
            let _ = w.tx.send(Err(err.clone()));
        }
    }
}
