//! A single-voter `raft::RawNode` on `GroupStorage`, driven through the
//! standard Ready loop; after reopening, a new node sees every proposal
//! committed.

mod common;

use common::*;
use covet_raft_store::{GroupStorage, LogOptions};
use raft::prelude::{Entry, EntryType};
use raft::{Config, RawNode};
use tempfile::TempDir;

const PROPOSALS: usize = 50;

fn logger() -> slog::Logger {
    slog::Logger::root(slog::Discard, slog::o!())
}

fn config() -> Config {
    Config {
        id: 1,
        election_tick: 10,
        heartbeat_tick: 3,
        max_size_per_msg: 1024,
        max_inflight_msgs: 256,
        ..Default::default()
    }
}

fn apply(entries: Vec<Entry>, applied: &mut Vec<Vec<u8>>) {
    for entry in entries {
        if entry.get_entry_type() == EntryType::EntryNormal && !entry.data.is_empty() {
            applied.push(entry.data.to_vec());
        }
    }
}

/// The canonical order: snapshot, committed entries, append entries,
/// persist hard state, sync (then persisted messages would be sent),
/// advance, and the light ready's commit index and committed entries.
fn drive(node: &mut RawNode<GroupStorage>, store: &GroupStorage, applied: &mut Vec<Vec<u8>>) {
    while node.has_ready() {
        let mut ready = node.ready();
        assert!(ready.messages().is_empty(), "a single voter sends nothing");
        if !ready.snapshot().is_empty() {
            store
                .apply_snapshot(ready.snapshot().clone())
                .expect("apply snapshot");
        }
        apply(ready.take_committed_entries(), applied);
        store.append(ready.entries()).expect("append");
        if let Some(hs) = ready.hs() {
            store.set_hard_state(hs).expect("hard state");
        }
        store.sync().expect("sync");
        assert!(ready.persisted_messages().is_empty());
        let mut light = node.advance(ready);
        if let Some(commit) = light.commit_index() {
            let mut hs = store.hard_state();
            hs.commit = commit;
            store.set_hard_state(&hs).expect("commit index");
        }
        apply(light.take_committed_entries(), applied);
        node.advance_apply();
    }
    store.sync().expect("sync");
}

#[test]
fn single_voter_commits_and_recovers_proposals() {
    let dir = TempDir::new().expect("tempdir");
    let options = LogOptions { segment_bytes: 512 };
    let store = GroupStorage::open(dir.path(), options).expect("open");
    store.set_conf_state(&voters(&[1])).expect("conf state");
    store.sync().expect("sync");

    let mut node = RawNode::new(&config(), store.clone(), &logger()).expect("raw node");
    node.campaign().expect("campaign");
    let mut applied = Vec::new();
    drive(&mut node, &store, &mut applied);
    let proposals: Vec<Vec<u8>> = (0..PROPOSALS)
        .map(|i| format!("proposal {i}").into_bytes())
        .collect();
    for (i, data) in proposals.iter().enumerate() {
        node.propose(vec![], data.clone()).expect("propose");
        if i % 7 == 0 {
            drive(&mut node, &store, &mut applied);
        }
    }
    drive(&mut node, &store, &mut applied);
    assert_eq!(applied, proposals);
    assert!(store.segments().len() > 1, "the log should have rolled");
    let last = node.raft.raft_log.last_index();
    drop(node);
    drop(store);

    let store = GroupStorage::open(dir.path(), options).expect("reopen");
    assert_eq!(store.hard_state().commit, last);
    let mut node = RawNode::new(&config(), store.clone(), &logger()).expect("raw node");
    assert_eq!(node.raft.raft_log.committed, last);
    let mut replayed = Vec::new();
    drive(&mut node, &store, &mut replayed);
    assert_eq!(replayed, proposals);
}
