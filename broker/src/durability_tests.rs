//! Durability order across the Raft log and sled, proven on the
//! power-loss filesystem: what sled's applied index covers must already be
//! synced in the log when sled persists it.

use std::path::Path;

use covet_powerfs::{CutOptions, MountOptions, PowerFs};
use covet_raft_store::{create_dir_durable, sync_dir, LogOptions};
use raft::prelude::{ConfChangeType, ConfChangeV2};
use tokio::sync::oneshot;

use crate::group::{Bootstrap, Group, GroupConfig, Machine, Outbox};
use crate::logging::raft_logger;
use crate::state::partition::PartitionState;

/// Drops every message: the group has no live peers here.
struct Nowhere;

impl Outbox for Nowhere {
    fn send(&self, _group: u64, _message: raft::prelude::Message) -> bool {
        true
    }
}

fn open(root: &Path, logger: &slog::Logger) -> (sled::Db, Group) {
    let sled_dir = root.join("state");
    create_dir_durable(&sled_dir).unwrap();
    let db = sled::Config::new().path(&sled_dir).open().unwrap();
    sync_dir(&sled_dir).unwrap();
    let state = PartitionState::open(db.open_tree("p").unwrap(), root.join("offsets")).unwrap();
    let cfg = GroupConfig {
        node_id: 1,
        log_options: LogOptions::default(),
        logger,
        election_tick: 10,
        heartbeat_tick: 2,
        fixed_election_timeout: Some(10),
    };
    let bootstrap = Bootstrap {
        voters: vec![1],
        preferred_leader: 1,
    };
    let group = Group::open(
        4,
        &root.join("g"),
        Machine::Partition(state),
        &cfg,
        &bootstrap,
    );
    (db, group.unwrap())
}

/// Runs the group's rounds as the driver does until nothing is ready.
fn settle(g: &mut Group) {
    for _ in 0..100 {
        let mut effects = Vec::new();
        match g.write_ready(&Nowhere, &mut effects).unwrap() {
            Some(rd) => {
                g.storage.sync().unwrap();
                g.finish_ready(rd, &Nowhere, &mut effects).unwrap();
            }
            None => return,
        }
    }
    panic!("the group did not settle");
}

#[test]
fn a_membership_change_is_synced_before_sled_can_say_it_was_applied() {
    let tmp = tempfile::tempdir().unwrap();
    let (backing, mnt) = (tmp.path().join("disk"), tmp.path().join("mnt"));
    std::fs::create_dir_all(&backing).unwrap();
    std::fs::create_dir_all(&mnt).unwrap();
    let opts = MountOptions {
        sync_backing: false,
    };
    let fs = PowerFs::mount(&backing, &mnt, opts).unwrap();
    let logger = raft_logger();
    let (db, mut g) = open(&mnt, &logger);
    settle(&mut g);
    assert!(g.is_leader(), "a lone voter leads");
    // A lone voter commits on its own sync, so the change is applied in the
    // second half of a round, after that round's sync.
    let mut cc = ConfChangeV2::default();
    cc.set_changes(
        vec![raft_proto::new_conf_change_single(
            2,
            ConfChangeType::AddNode,
        )]
        .into(),
    );
    let (tx, mut rx) = oneshot::channel();
    g.propose_membership(cc, tx);
    // Round by round, up to the one that applies the change.
    for _ in 0..10 {
        let mut effects = Vec::new();
        if let Some(rd) = g.write_ready(&Nowhere, &mut effects).unwrap() {
            g.storage.sync().unwrap();
            g.finish_ready(rd, &Nowhere, &mut effects).unwrap();
        }
        if g.voters() == [1, 2] {
            break;
        }
    }
    assert!(matches!(rx.try_recv(), Ok(Ok(_))), "the change was applied");
    assert_eq!(g.voters(), vec![1, 2]);
    // sled's background flush runs before the next round syncs the log.
    db.flush().unwrap();
    drop(g);
    drop(db);
    let cut = fs.power_cut(CutOptions::default()).unwrap();
    assert!(cut.errors.is_empty(), "{:?}", cut.errors);
    drop(fs);

    let (_db, g) = open(&backing, &logger);
    assert_eq!(
        g.voters(),
        vec![1, 2],
        "after the power cut the node must still know the change it applied"
    );
}
