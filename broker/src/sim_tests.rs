//! Raft behaviour without sockets or clocks: several nodes' replicas of one
//! partition group in one process, stepped by hand over an in-memory
//! network that can cut links, isolate nodes, drop, duplicate and reorder
//! messages, and crash and restart nodes (the in-memory node is dropped and
//! reopened from its directories: Raft log and sled). Every random choice
//! comes from one seeded xorshift, so a failing run replays exactly from
//! its seed (printed on failure; `COVET_SIM_SEED=n` runs only that seed).
//! Election timeouts are fixed per node, so nothing here depends on
//! raft-rs's random timer.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};

use bytes::{Bytes, BytesMut};
use covet_protocol::batch::{self, BatchBuilder, Record};
use covet_raft_store::LogOptions;
use raft::prelude::{Entry, Message};
use raft::{GetEntriesContext, StateRole, Storage, NO_LIMIT};
use tokio::sync::oneshot;

use crate::error::{BrokerError, Result};
use crate::group::{Applied, Bootstrap, Group, GroupConfig, Machine, Outbox};
use crate::logging::raft_logger;
use crate::state::partition::PartitionState;

const GROUP: u64 = 7;

/// Messages sent during a step, before the network decides their fate.
#[derive(Default)]
struct Wire(RefCell<Vec<Message>>);

impl Outbox for Wire {
    fn send(&self, _group: u64, message: Message) -> bool {
        self.0.borrow_mut().push(message);
        true
    }
}

/// A message on the network, and how often it may still be held back.
struct InFlight {
    message: Message,
    defers_left: u8,
}

/// What the network does to messages, in percent of messages.
#[derive(Debug, Clone, Copy, Default)]
struct Faults {
    drop: u64,
    /// Delivered twice (the copy later).
    duplicate: u64,
    /// Held back behind the messages queued after it.
    reorder: u64,
}

struct Sim {
    /// `None` while the node is crashed.
    nodes: Vec<Option<Group>>,
    /// Each node's directory, which outlives its crashes.
    dirs: Vec<tempfile::TempDir>,
    voters: Vec<u64>,
    logger: slog::Logger,
    wire: Wire,
    in_flight: VecDeque<InFlight>,
    /// Directed links that deliver nothing.
    cut: HashSet<(u64, u64)>,
    faults: Faults,
    rng: u64,
}

impl Sim {
    fn new(n: u64, seed: u64) -> Sim {
        let mut sim = Sim {
            nodes: Vec::new(),
            dirs: (0..n).map(|_| tempfile::tempdir().unwrap()).collect(),
            voters: (1..=n).collect(),
            logger: raft_logger(),
            wire: Wire::default(),
            in_flight: VecDeque::new(),
            cut: HashSet::new(),
            faults: Faults::default(),
            // xorshift never leaves 0; spread small seeds apart.
            rng: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
        };
        for id in 1..=n {
            let group = sim.open(id).unwrap();
            sim.nodes.push(Some(group));
        }
        sim
    }

    /// Opens node `id` from its directory (creating the group the first
    /// time), as the broker does on start.
    fn open(&self, id: u64) -> Result<Group> {
        let dir: &Path = self.dirs[id as usize - 1].path();
        let group_dir: PathBuf = dir.join("group");
        std::fs::create_dir_all(&group_dir).map_err(|e| BrokerError::Storage(e.to_string()))?;
        let db = sled::Config::new().path(dir.join("sled")).open()?;
        let state = PartitionState::open(db.open_tree("p")?, group_dir.join("offsets"))?;
        let cfg = GroupConfig {
            node_id: id,
            log_options: LogOptions::default(),
            logger: &self.logger,
            election_tick: 10,
            heartbeat_tick: 2,
            // Distinct timeouts: no split votes in lockstep.
            fixed_election_timeout: Some(10 + 4 * id as usize),
        };
        let bootstrap = Bootstrap {
            voters: self.voters.clone(),
            preferred_leader: 0,
        };
        Group::open(
            GROUP,
            &group_dir,
            Machine::Partition(state),
            &cfg,
            &bootstrap,
        )
    }

    fn node(&mut self, id: u64) -> &mut Group {
        self.nodes[id as usize - 1]
            .as_mut()
            .expect("the node is running")
    }

    fn group(&self, id: u64) -> &Group {
        self.nodes[id as usize - 1]
            .as_ref()
            .expect("the node is running")
    }

    fn is_up(&self, id: u64) -> bool {
        self.nodes[id as usize - 1].is_some()
    }

    /// Crashes node `id`: its in-memory state and the messages on their way
    /// to it are gone; what it synced stays in its directory.
    fn crash(&mut self, id: u64) {
        self.nodes[id as usize - 1] = None;
        self.in_flight.retain(|m| m.message.to != id);
    }

    /// Starts a crashed node again from its directory.
    fn restart(&mut self, id: u64) -> Result<()> {
        let group = self.open(id)?;
        self.nodes[id as usize - 1] = Some(group);
        Ok(())
    }

    fn random(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn chance(&mut self, percent: u64) -> bool {
        percent > 0 && self.random() % 100 < percent
    }

    fn isolate(&mut self, id: u64) {
        for other in 1..=self.nodes.len() as u64 {
            if other != id {
                self.cut.insert((id, other));
                self.cut.insert((other, id));
            }
        }
    }

    fn heal(&mut self) {
        self.cut.clear();
    }

    /// Runs every node's rounds and delivers messages until nothing moves.
    fn settle(&mut self) -> Result<()> {
        for _ in 0..10_000 {
            let mut moved = false;
            for g in self.nodes.iter_mut().flatten() {
                let mut effects = Vec::new();
                if let Some(rd) = g.write_ready(&self.wire, &mut effects)? {
                    g.storage.sync()?;
                    g.finish_ready(rd, &self.wire, &mut effects)?;
                    moved = true;
                }
            }
            let sent: Vec<Message> = self.wire.0.borrow_mut().drain(..).collect();
            self.in_flight
                .extend(sent.into_iter().map(|message| InFlight {
                    message,
                    defers_left: 3,
                }));
            while let Some(mut m) = self.in_flight.pop_front() {
                moved = true;
                if m.defers_left > 0 && self.chance(self.faults.reorder) {
                    m.defers_left -= 1;
                    self.in_flight.push_back(m);
                    continue;
                }
                let (from, to) = (m.message.from, m.message.to);
                if self.cut.contains(&(from, to)) || self.chance(self.faults.drop) {
                    continue;
                }
                if m.defers_left > 0 && self.chance(self.faults.duplicate) {
                    self.in_flight.push_back(InFlight {
                        message: m.message.clone(),
                        defers_left: 0,
                    });
                }
                if self.is_up(to) {
                    let _ = self.node(to).node.step(m.message);
                }
            }
            if !moved {
                return Ok(());
            }
        }
        Err(BrokerError::Internal("simulation did not settle".into()))
    }

    fn tick(&mut self, times: usize) -> Result<()> {
        for _ in 0..times {
            for g in self.nodes.iter_mut().flatten() {
                g.node.tick();
            }
            self.settle()?;
        }
        Ok(())
    }

    /// Ticks until `cond` holds, at most `limit` ticks.
    fn tick_until(&mut self, limit: usize, cond: impl Fn(&Sim) -> bool) -> Result<()> {
        for _ in 0..limit {
            if cond(self) {
                return Ok(());
            }
            self.tick(1)?;
        }
        Err(BrokerError::Internal("condition not reached".into()))
    }

    fn leaders(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .flatten()
            .filter(|g| g.node.raft.state == StateRole::Leader)
            .map(|g| g.node.raft.id)
            .collect()
    }

    fn propose(&mut self, on: u64, records: usize) -> oneshot::Receiver<Result<Applied>> {
        self.propose_batch(on, batch_of(records))
    }

    fn propose_batch(&mut self, on: u64, batch: Bytes) -> oneshot::Receiver<Result<Applied>> {
        let (tx, rx) = oneshot::channel();
        self.node(on).propose_batch(batch, tx);
        rx
    }

    /// Each replica's accepted batches: (base offset, raft index).
    fn index_of(&self, id: u64) -> Vec<(u64, u64)> {
        self.locations(id)
            .iter()
            .map(|l| (l.base_offset, l.raft_index))
            .collect()
    }

    fn locations(&self, id: u64) -> Vec<crate::state::partition::BatchLocation> {
        let Machine::Partition(p) = &self.group(id).machine else {
            unreachable!("partition group")
        };
        p.index().batches_from(0, usize::MAX).unwrap()
    }

    /// The committed entries node `id` holds in `[low, high]`.
    fn committed(&self, id: u64, low: u64, high: u64) -> Result<Vec<Entry>> {
        if low > high {
            return Ok(Vec::new());
        }
        self.group(id)
            .storage
            .entries(low, high + 1, NO_LIMIT, GetEntriesContext::empty(false))
            .map_err(|e| BrokerError::Storage(e.to_string()))
    }
}

fn batch_of(n: usize) -> Bytes {
    let mut b = BatchBuilder::new();
    for i in 0..n {
        b.push(&Record {
            value: Bytes::from(format!("r{i}")),
            timestamp_ms: 1,
            ..Default::default()
        });
    }
    BytesMut::from(&b.build().unwrap()[..]).freeze()
}

fn outcome(rx: &mut oneshot::Receiver<Result<Applied>>) -> Option<Result<u64>> {
    match rx.try_recv() {
        Ok(Ok(Applied::Batch { base_offset, .. })) => Some(Ok(base_offset)),
        Ok(Ok(_)) => Some(Err(BrokerError::Internal("not a batch".into()))),
        Ok(Err(e)) => Some(Err(e)),
        Err(_) => None,
    }
}

#[test]
fn a_leader_replicates_and_every_replica_indexes_the_same_batches() {
    let mut sim = Sim::new(3, 1);
    sim.node(1).node.campaign().unwrap();
    sim.settle().unwrap();
    assert_eq!(sim.leaders(), vec![1]);
    let mut acks: Vec<_> = (0..20).map(|i| sim.propose(1, 1 + i % 4)).collect();
    sim.settle().unwrap();
    let offsets: Vec<u64> = acks
        .iter_mut()
        .map(|rx| outcome(rx).unwrap().unwrap())
        .collect();
    let mut expect = 0;
    for (i, off) in offsets.iter().enumerate() {
        assert_eq!(*off, expect, "batch {i}");
        expect += 1 + i as u64 % 4;
    }
    // Followers learn the commit with the next heartbeat.
    sim.tick(3).unwrap();
    let leader_index = sim.index_of(1);
    assert_eq!(leader_index.len(), 20);
    assert_eq!(sim.index_of(2), leader_index);
    assert_eq!(sim.index_of(3), leader_index);
}

#[test]
fn an_isolated_leader_commits_nothing_steps_down_and_loses_its_uncommitted_tail() {
    let mut sim = Sim::new(3, 2);
    sim.node(1).node.campaign().unwrap();
    sim.settle().unwrap();
    let mut first = sim.propose(1, 5);
    sim.settle().unwrap();
    assert_eq!(outcome(&mut first).unwrap().unwrap(), 0);

    sim.isolate(1);
    let mut stranded = sim.propose(1, 3);
    sim.tick(5).unwrap();
    assert!(
        outcome(&mut stranded).is_none(),
        "a minority leader must not commit"
    );
    // Node 2 has the shorter timeout of the majority and takes over; check
    // quorum makes node 1 step down on its own.
    sim.tick_until(200, |s| s.leaders() == vec![2]).unwrap();
    let mut after = sim.propose(2, 2);
    sim.settle().unwrap();
    assert_eq!(outcome(&mut after).unwrap().unwrap(), 5);

    sim.heal();
    sim.tick_until(100, |s| {
        s.group(1).node.raft.state == StateRole::Follower && s.group(1).node.raft.leader_id == 2
    })
    .unwrap();
    sim.tick(5).unwrap();
    // The stranded batch was never committed: its proposer hears so.
    assert!(matches!(
        outcome(&mut stranded),
        Some(Err(BrokerError::NotLeader { .. }))
    ));
    let index = sim.index_of(2);
    assert_eq!(
        index.iter().map(|(o, _)| *o).collect::<Vec<_>>(),
        vec![0, 5]
    );
    assert_eq!(sim.index_of(1), index);
    assert_eq!(sim.index_of(3), index);
}

/// Seeds the chaos test runs unless `COVET_SIM_SEED` names one.
const CHAOS_SEEDS: [u64; 6] = [3, 17, 4242, 90_001, 7_777_777, 123_456_789];

/// A batch of `records` records whose values name proposal `id`: every
/// proposal of a run is unique, so each can be found in the log.
fn tagged_batch(id: u64, records: usize) -> Bytes {
    let mut b = BatchBuilder::new();
    for i in 0..records {
        b.push(&Record {
            value: Bytes::from(format!("proposal-{id}-record-{i}")),
            timestamp_ms: 1,
            ..Default::default()
        });
    }
    BytesMut::from(&b.build().unwrap()[..]).freeze()
}

/// The proposal a stored batch came from (from its first record's value).
fn proposal_of(batch_bytes: &Bytes) -> Option<u64> {
    let records = batch::decode_records(batch_bytes).ok()?;
    let value = std::str::from_utf8(&records.first()?.value).ok()?;
    value
        .strip_prefix("proposal-")?
        .split('-')
        .next()?
        .parse()
        .ok()
}

/// Fails the chaos run with a message (the caller adds the seed).
macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

/// One chaos run: proposals with unique payloads to whoever leads, over a
/// network that drops, duplicates and reorders messages, with a node
/// crashed and restarted from its directories now and then. Then the
/// network heals and every replica must hold the same committed log, and
/// every acknowledged proposal must be stored exactly once, at the offset
/// it was acknowledged with.
fn chaos_run(seed: u64) -> std::result::Result<(), String> {
    let fail = |e: BrokerError| format!("{e}");
    let mut sim = Sim::new(3, seed);
    sim.node(1).node.campaign().map_err(|e| e.to_string())?;
    sim.settle().map_err(fail)?;
    sim.faults = Faults {
        drop: 10,
        duplicate: 10,
        reorder: 20,
    };
    let mut pending = Vec::new();
    let mut next_id = 0u64;
    let mut down: Option<(u64, usize)> = None;
    for step in 0..400usize {
        if step % 3 == 0 {
            let leaders = sim.leaders();
            if let Some(&leader) = leaders.get(sim.random() as usize % leaders.len().max(1)) {
                let records = 1 + (sim.random() % 3) as usize;
                let rx = sim.propose_batch(leader, tagged_batch(next_id, records));
                pending.push((next_id, records, rx));
                next_id += 1;
            }
        }
        match down {
            Some((id, until)) if step >= until => {
                sim.restart(id).map_err(fail)?;
                down = None;
            }
            None if step % 50 == 25 => {
                let id = 1 + sim.random() % 3;
                sim.crash(id);
                down = Some((id, step + 10 + (sim.random() % 30) as usize));
            }
            _ => {}
        }
        sim.tick(1).map_err(fail)?;
    }
    if let Some((id, _)) = down {
        sim.restart(id).map_err(fail)?;
    }
    sim.faults = Faults::default();
    sim.tick_until(300, |s| {
        let Some(&leader) = s.leaders().first() else {
            return false;
        };
        let last = s.group(leader).node.raft.raft_log.last_index();
        (1..=3).all(|id| s.group(id).node.raft.raft_log.committed == last)
    })
    .map_err(|e| format!("replicas did not converge after healing: {e}"))?;

    // Every replica's committed log is the same entry for entry.
    let min_commit = (1..=3)
        .map(|id| sim.group(id).node.raft.raft_log.committed)
        .min()
        .unwrap_or(0);
    let low = (1..=3)
        .map(|id| sim.group(id).storage.first_index().unwrap_or(u64::MAX))
        .max()
        .unwrap_or(0);
    let reference = sim.committed(1, low, min_commit).map_err(fail)?;
    ensure!(
        reference.len() as u64 == min_commit + 1 - low,
        "node 1 holds {} entries of {low}..={min_commit}",
        reference.len()
    );
    for id in 2..=3 {
        let log = sim.committed(id, low, min_commit).map_err(fail)?;
        let at = log
            .iter()
            .zip(&reference)
            .position(|(a, b)| (a.index, a.term, &a.data) != (b.index, b.term, &b.data));
        ensure!(
            log.len() == reference.len() && at.is_none(),
            "node {id}'s committed log differs from node 1's at {at:?} ({} vs {} entries)",
            log.len(),
            reference.len()
        );
        ensure!(
            sim.index_of(id) == sim.index_of(1),
            "node {id} accepted other batches than node 1"
        );
    }

    // Which proposal each accepted batch holds, in offset order.
    let mut stored: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    let mut next_offset = 0;
    for loc in sim.locations(1) {
        ensure!(
            loc.base_offset == next_offset,
            "offsets not dense: batch at {} where {next_offset} was due",
            loc.base_offset
        );
        next_offset += u64::from(loc.record_count);
        let entry = sim
            .committed(1, loc.raft_index, loc.raft_index)
            .map_err(fail)?;
        let id = entry
            .first()
            .and_then(|e| proposal_of(&e.data))
            .ok_or_else(|| format!("batch at offset {} is not a proposal", loc.base_offset))?;
        stored.entry(id).or_default().push(loc.base_offset);
    }
    let mut acked = 0;
    for (id, records, rx) in &mut pending {
        let Some(Ok(offset)) = outcome(rx) else {
            continue;
        };
        acked += 1;
        let copies = stored.get(id).cloned().unwrap_or_default();
        ensure!(
            copies == vec![offset],
            "proposal {id} ({records} records) acknowledged at offset {offset} but stored at {copies:?}"
        );
    }
    for (id, copies) in &stored {
        ensure!(
            copies.len() == 1,
            "proposal {id} stored {} times",
            copies.len()
        );
    }
    ensure!(
        acked > 20,
        "only {acked} of {next_id} proposals acknowledged"
    );
    Ok(())
}

#[test]
fn chaos_never_loses_duplicates_or_reorders_an_acknowledged_batch() {
    let seeds: Vec<u64> = match std::env::var("COVET_SIM_SEED") {
        Ok(s) => vec![s.parse().expect("COVET_SIM_SEED is a number")],
        Err(_) => CHAOS_SEEDS.to_vec(),
    };
    for seed in seeds {
        if let Err(e) = chaos_run(seed) {
            panic!("seed {seed} (rerun with COVET_SIM_SEED={seed}): {e}");
        }
    }
}

#[test]
fn a_restarted_node_reopens_its_log_and_state_from_disk() {
    let mut sim = Sim::new(3, 5);
    sim.node(1).node.campaign().unwrap();
    sim.settle().unwrap();
    let mut first = sim.propose(1, 4);
    sim.settle().unwrap();
    assert_eq!(outcome(&mut first).unwrap().unwrap(), 0);
    sim.tick(3).unwrap();
    let before = sim.index_of(3);
    sim.crash(3);
    let mut during = sim.propose(1, 2);
    sim.tick(3).unwrap();
    assert_eq!(
        outcome(&mut during).unwrap().unwrap(),
        4,
        "a majority is up"
    );
    sim.restart(3).unwrap();
    // Nothing was checkpointed: node 3 replays its own log, without its
    // peers (no tick, so nothing new reaches it).
    sim.settle().unwrap();
    assert_eq!(
        sim.index_of(3),
        before,
        "node 3 reloads what it had applied"
    );
    sim.tick(5).unwrap();
    assert_eq!(sim.index_of(3), sim.index_of(1), "and catches up");
}

#[test]
fn batch_helper_builds_valid_batches() {
    assert!(batch::validate(&batch_of(3)).is_ok());
}

fn group_commit(group: &str, committed: u64) -> crate::state::groups::GroupEntry {
    crate::state::groups::GroupEntry::Commit(covet_protocol::internal::GroupCommit {
        group: group.into(),
        committed,
        deliveries: vec![covet_protocol::internal::Delivery {
            offset: committed,
            count: 2,
        }],
    })
}

impl Sim {
    fn propose_group(
        &mut self,
        on: u64,
        entry: &crate::state::groups::GroupEntry,
    ) -> oneshot::Receiver<Result<Applied>> {
        let (tx, rx) = oneshot::channel();
        self.node(on).propose_group_entry(entry, tx);
        rx
    }

    /// Node `id`'s committed offset of `group` on the partition.
    fn group_offset(&self, id: u64, group: &str) -> Option<u64> {
        let Machine::Partition(p) = &self.group(id).machine else {
            unreachable!("partition group")
        };
        p.groups().get(group).map(|s| s.committed)
    }
}

#[test]
fn group_commits_replicate_are_refused_alike_and_replay_after_a_crash() {
    let mut sim = Sim::new(3, 11);
    sim.node(1).node.campaign().unwrap();
    sim.settle().unwrap();
    let mut batch = sim.propose(1, 10);
    let mut first = sim.propose_group(1, &group_commit("g", 4));
    // Beyond the high watermark once applied: refused on every replica.
    let mut beyond = sim.propose_group(1, &group_commit("g", 11));
    sim.settle().unwrap();
    assert_eq!(outcome(&mut batch).unwrap().unwrap(), 0);
    assert!(matches!(first.try_recv(), Ok(Ok(Applied::Group))));
    assert!(matches!(
        beyond.try_recv(),
        Ok(Err(BrokerError::OffsetOutOfRange { .. }))
    ));
    sim.tick(3).unwrap();
    for id in 1..=3 {
        assert_eq!(sim.group_offset(id, "g"), Some(4), "node {id}");
    }
    // A commit behind the current one keeps it (a late duplicate).
    let mut late = sim.propose_group(1, &group_commit("g", 2));
    sim.crash(3);
    let mut ahead = sim.propose_group(1, &group_commit("g", 9));
    sim.tick(3).unwrap();
    assert!(matches!(late.try_recv(), Ok(Ok(Applied::Group))));
    assert!(matches!(ahead.try_recv(), Ok(Ok(Applied::Group))));
    assert_eq!(sim.group_offset(1, "g"), Some(9));
    sim.restart(3).unwrap();
    sim.tick(5).unwrap();
    for id in 1..=3 {
        assert_eq!(sim.group_offset(id, "g"), Some(9), "node {id}");
    }
    // The group entries took no offsets: the next batch follows the first.
    let mut next = sim.propose(1, 1);
    sim.settle().unwrap();
    assert_eq!(outcome(&mut next).unwrap().unwrap(), 10);
}
