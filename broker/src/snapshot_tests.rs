//! Snapshot catch-up when the snapshot message is lost: three replicas of
//! a partition group stepped by hand, a follower isolated while the leader
//! compacts its log, then its snapshot dropped on the way.

use std::cell::RefCell;

use bytes::{Bytes, BytesMut};
use covet_protocol::batch::{BatchBuilder, Record};
use covet_raft_store::LogOptions;
use raft::prelude::{Message, MessageType};
use tokio::sync::oneshot;

use crate::group::{Bootstrap, Group, GroupConfig, Machine, Outbox, SNAPSHOT_TIMEOUT_TICKS};
use crate::logging::raft_logger;
use crate::state::partition::PartitionState;

#[derive(Default)]
struct Wire(RefCell<Vec<Message>>);

impl Outbox for Wire {
    fn send(&self, _group: u64, message: Message) -> bool {
        self.0.borrow_mut().push(message);
        true
    }
}

struct Net {
    groups: Vec<Group>,
    _dirs: Vec<tempfile::TempDir>,
    wire: Wire,
    isolated: Option<u64>,
    /// Snapshot messages still to be lost.
    drop_snapshots: usize,
    dropped_snapshots: usize,
}

impl Net {
    fn new() -> Net {
        let logger = raft_logger();
        let voters = vec![1, 2, 3];
        let mut groups = Vec::new();
        let mut dirs = Vec::new();
        for &id in &voters {
            let dir = tempfile::tempdir().unwrap();
            let db = sled::Config::new().temporary(true).open().unwrap();
            let state =
                PartitionState::open(db.open_tree("p").unwrap(), dir.path().join("offsets"))
                    .unwrap();
            let cfg = GroupConfig {
                node_id: id,
                log_options: LogOptions {
                    segment_bytes: 2048,
                },
                logger: &logger,
                election_tick: 10,
                heartbeat_tick: 2,
                fixed_election_timeout: Some(10 + 4 * id as usize),
            };
            let bootstrap = Bootstrap {
                voters: voters.clone(),
                preferred_leader: 1,
            };
            let g = Group::open(9, dir.path(), Machine::Partition(state), &cfg, &bootstrap);
            groups.push(g.unwrap());
            dirs.push(dir);
        }
        Net {
            groups,
            _dirs: dirs,
            wire: Wire::default(),
            isolated: None,
            drop_snapshots: 0,
            dropped_snapshots: 0,
        }
    }

    fn settle(&mut self) {
        for _ in 0..10_000 {
            let mut moved = false;
            for g in &mut self.groups {
                let mut effects = Vec::new();
                if let Some(rd) = g.write_ready(&self.wire, &mut effects).unwrap() {
                    g.storage.sync().unwrap();
                    g.finish_ready(rd, &self.wire, &mut effects).unwrap();
                    moved = true;
                }
            }
            let msgs: Vec<Message> = self.wire.0.borrow_mut().drain(..).collect();
            for m in msgs {
                moved = true;
                if self.isolated.is_some_and(|i| i == m.to || i == m.from) {
                    continue;
                }
                if m.get_msg_type() == MessageType::MsgSnapshot && self.drop_snapshots > 0 {
                    self.drop_snapshots -= 1;
                    self.dropped_snapshots += 1;
                    continue;
                }
                let to = m.to as usize - 1;
                let _ = self.groups[to].node.step(m);
            }
            if !moved {
                return;
            }
        }
        panic!("network did not settle");
    }

    /// One tick of every replica, as the driver does it.
    fn tick(&mut self) {
        for g in &mut self.groups {
            g.node.tick();
            g.check_snapshots();
        }
        self.settle();
    }

    fn applied(&self, id: u64) -> u64 {
        self.groups[id as usize - 1].node.raft.raft_log.applied
    }
}

fn batch(i: usize) -> Bytes {
    let mut b = BatchBuilder::new();
    b.push(&Record {
        value: Bytes::from(vec![i as u8; 300]),
        timestamp_ms: 1,
        ..Default::default()
    });
    BytesMut::from(&b.build().unwrap()[..]).freeze()
}

#[test]
fn a_lost_snapshot_is_sent_again() {
    let mut net = Net::new();
    for _ in 0..30 {
        net.tick();
    }
    assert!(net.groups[0].is_leader(), "node 1 leads");
    net.isolated = Some(3);
    for i in 0..60 {
        let (tx, _rx) = oneshot::channel();
        net.groups[0].propose_batch(batch(i), tx);
        net.settle();
    }
    let leader = &mut net.groups[0];
    leader.enforce_retention(crate::now_ms(), 0, 1).unwrap();
    let first = raft::Storage::first_index(&leader.storage).unwrap();
    assert!(
        first > 20,
        "the leader compacted its log (first index {first})"
    );
    net.isolated = None;
    net.drop_snapshots = 1;
    let target = net.applied(1);
    let limit = 3 * SNAPSHOT_TIMEOUT_TICKS as usize;
    for _ in 0..limit {
        if net.applied(3) >= target {
            break;
        }
        net.tick();
    }
    assert_eq!(net.dropped_snapshots, 1, "the first snapshot was lost");
    assert!(
        net.applied(3) >= target,
        "follower 3 caught up after its snapshot was lost: applied {} of {target}",
        net.applied(3)
    );
}

#[test]
fn a_snapshot_names_the_voters_as_of_its_index_not_as_of_compaction() {
    let mut net = Net::new();
    for _ in 0..30 {
        net.tick();
    }
    assert!(net.groups[0].is_leader(), "node 1 leads");
    for i in 0..60 {
        let (tx, _rx) = oneshot::channel();
        net.groups[0].propose_batch(batch(i), tx);
        net.settle();
    }
    let mut cc = raft::prelude::ConfChangeV2::default();
    let remove = raft_proto::new_conf_change_single(3, raft::prelude::ConfChangeType::RemoveNode);
    cc.set_changes(vec![remove].into());
    let (tx, mut rx) = oneshot::channel();
    net.groups[0].propose_membership(cc, tx);
    net.settle();
    let change_index = net.groups[0].node.raft.raft_log.applied;
    assert!(matches!(rx.try_recv(), Ok(Ok(_))), "node 3 removed");
    assert_eq!(net.groups[0].voters(), vec![1, 2]);
    // Compaction keeps the active segment, which holds the change.
    let leader = &mut net.groups[0];
    leader.enforce_retention(crate::now_ms(), 0, 1).unwrap();
    let snap = leader.storage.stored_snapshot();
    let index = snap.get_metadata().index;
    assert!(
        index > 20 && index < change_index,
        "compacted at {index}, before the change at {change_index}"
    );
    let mut voters = snap.get_metadata().get_conf_state().voters.clone();
    voters.sort_unstable();
    assert_eq!(voters, vec![1, 2, 3], "voters as of index {index}");
}
