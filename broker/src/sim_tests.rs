//! Raft behaviour without sockets or clocks: several nodes' replicas of one
//! partition group in one process, stepped by hand over an in-memory
//! network that can cut links, isolate nodes and drop messages (seeded, so
//! a failing run replays exactly). Election timeouts are fixed per node, so
//! nothing here depends on raft-rs's random timer.

use std::cell::RefCell;
use std::collections::{HashSet, VecDeque};

use bytes::{Bytes, BytesMut};
use covet_protocol::batch::{self, BatchBuilder, Record};
use covet_raft_store::LogOptions;
use raft::prelude::Message;
use raft::StateRole;
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

struct Node {
    group: Group,
    _dir: tempfile::TempDir,
}

struct Sim {
    nodes: Vec<Node>,
    wire: Wire,
    in_flight: VecDeque<Message>,
    /// Directed links that deliver nothing.
    cut: HashSet<(u64, u64)>,
    /// Percent of messages lost, decided by a seeded xorshift.
    drop_percent: u64,
    rng: u64,
}

impl Sim {
    fn new(n: u64, seed: u64) -> Sim {
        let logger = raft_logger();
        let voters: Vec<u64> = (1..=n).collect();
        let nodes = voters
            .iter()
            .map(|&id| {
                let dir = tempfile::tempdir().unwrap();
                let db = sled::Config::new().temporary(true).open().unwrap();
                let state = PartitionState::open(db.open_tree("p").unwrap()).unwrap();
                let cfg = GroupConfig {
                    node_id: id,
                    log_options: LogOptions::default(),
                    logger: &logger,
                    election_tick: 10,
                    heartbeat_tick: 2,
                    // Distinct timeouts: no split votes in lockstep.
                    fixed_election_timeout: Some(10 + 4 * id as usize),
                };
                let bootstrap = Bootstrap {
                    voters: voters.clone(),
                    preferred_leader: 0,
                };
                let group = Group::open(
                    GROUP,
                    dir.path(),
                    Machine::Partition(state),
                    &cfg,
                    &bootstrap,
                )
                .unwrap();
                Node { group, _dir: dir }
            })
            .collect();
        Sim {
            nodes,
            wire: Wire::default(),
            in_flight: VecDeque::new(),
            cut: HashSet::new(),
            drop_percent: 0,
            rng: seed.max(1),
        }
    }

    fn node(&mut self, id: u64) -> &mut Group {
        &mut self.nodes[id as usize - 1].group
    }

    fn random(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
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
            for n in &mut self.nodes {
                let mut effects = Vec::new();
                if let Some(rd) = n.group.write_ready(&self.wire, &mut effects)? {
                    n.group.storage.sync()?;
                    n.group.finish_ready(rd, &self.wire, &mut effects)?;
                    moved = true;
                }
            }
            self.in_flight.extend(self.wire.0.borrow_mut().drain(..));
            while let Some(m) = self.in_flight.pop_front() {
                moved = true;
                let lost = self.cut.contains(&(m.from, m.to))
                    || (self.drop_percent > 0 && self.random() % 100 < self.drop_percent);
                if !lost {
                    let to = m.to;
                    let _ = self.node(to).node.step(m);
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
            for n in &mut self.nodes {
                n.group.node.tick();
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
            .filter(|n| n.group.node.raft.state == StateRole::Leader)
            .map(|n| n.group.node.raft.id)
            .collect()
    }

    fn propose(&mut self, on: u64, records: usize) -> oneshot::Receiver<Result<Applied>> {
        let (tx, rx) = oneshot::channel();
        self.node(on).propose_batch(batch_of(records), tx);
        rx
    }

    /// Each replica's accepted batches: (base offset, raft index).
    fn index_of(&self, id: u64) -> Vec<(u64, u64)> {
        let Machine::Partition(p) = &self.nodes[id as usize - 1].group.machine else {
            unreachable!("partition group")
        };
        p.index()
            .batches_from(0, usize::MAX)
            .unwrap()
            .iter()
            .map(|l| (l.base_offset, l.raft_index))
            .collect()
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
        s.nodes[0].group.node.raft.state == StateRole::Follower
            && s.nodes[0].group.node.raft.leader_id == 2
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

#[test]
fn random_message_loss_never_loses_or_reorders_an_acknowledged_batch() {
    for seed in [3, 17, 4242] {
        let mut sim = Sim::new(3, seed);
        sim.node(1).node.campaign().unwrap();
        sim.settle().unwrap();
        sim.drop_percent = 20;
        let mut pending = Vec::new();
        for step in 0..300 {
            if step % 3 == 0 {
                if let Some(&leader) = sim.leaders().first() {
                    pending.push(sim.propose(leader, 2));
                }
            }
            sim.tick(1).unwrap();
        }
        sim.drop_percent = 0;
        sim.tick(60).unwrap();
        let acked: Vec<u64> = pending
            .iter_mut()
            .filter_map(|rx| outcome(rx).and_then(|r| r.ok()))
            .collect();
        assert!(acked.len() > 20, "seed {seed}: only {} acks", acked.len());
        let index = sim.index_of(1);
        assert_eq!(sim.index_of(2), index, "seed {seed}");
        assert_eq!(sim.index_of(3), index, "seed {seed}");
        let stored: HashSet<u64> = index.iter().map(|(o, _)| *o).collect();
        for off in &acked {
            assert!(stored.contains(off), "seed {seed}: acked offset {off} lost");
        }
        // Offsets are dense: every batch holds two records.
        for (i, (off, _)) in index.iter().enumerate() {
            assert_eq!(*off, 2 * i as u64, "seed {seed}");
        }
        let unique: HashSet<&u64> = acked.iter().collect();
        assert_eq!(
            unique.len(),
            acked.len(),
            "seed {seed}: an offset acked twice"
        );
    }
}

#[test]
fn batch_helper_builds_valid_batches() {
    assert!(batch::validate(&batch_of(3)).is_ok());
}
