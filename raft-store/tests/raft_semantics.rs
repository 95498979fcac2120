//! `raft::Storage` semantics, following raft-rs's own `MemStorage` tests.

mod common;

use common::*;
use covet_raft_store::{GroupStorage, StoreError};
use protobuf::Message as _;
use raft::prelude::Entry;
use raft::{GetEntriesContext, Storage, StorageError};
use tempfile::TempDir;

fn ctx() -> GetEntriesContext {
    GetEntriesContext::empty(false)
}

fn size_of(e: &Entry) -> u64 {
    u64::from(e.compute_size())
}

fn compacted() -> raft::Error {
    raft::Error::Store(StorageError::Compacted)
}

fn unavailable() -> raft::Error {
    raft::Error::Store(StorageError::Unavailable)
}

/// A log whose snapshot is at index 3 (term 3) followed by entries 4, 5, 6
/// with term = index, like MemStorage's tests.
fn store_3_to_6(dir: &TempDir) -> GroupStorage {
    let store = open(dir.path(), 1 << 20);
    store
        .apply_snapshot(snapshot(3, 3, &[1], b""))
        .expect("apply snapshot");
    store
        .append(&[entry(4, 4), entry(5, 5), entry(6, 6)])
        .expect("append");
    store
}

#[test]
fn fresh_storage_is_empty() {
    let dir = TempDir::new().expect("tempdir");
    let store = open(dir.path(), 1 << 20);
    assert_eq!(first_last(&store), (1, 0));
    assert_eq!(store.term(0).expect("term 0"), 0);
    assert_eq!(store.term(1), Err(unavailable()));
    let state = store.initial_state().expect("initial state");
    assert!(!state.initialized());
    assert_eq!(
        store.entries(1, 1, None, ctx()).expect("empty range"),
        vec![]
    );
}

#[test]
fn term_follows_memstorage() {
    let dir = TempDir::new().expect("tempdir");
    let store = store_3_to_6(&dir);
    assert_eq!(store.term(2), Err(compacted()));
    assert_eq!(store.term(3).expect("snapshot term"), 3);
    assert_eq!(store.term(4).expect("term"), 4);
    assert_eq!(store.term(6).expect("term"), 6);
    assert_eq!(store.term(7), Err(unavailable()));
    assert_eq!(first_last(&store), (4, 6));
}

#[test]
fn entries_honour_ranges_and_max_size() {
    let dir = TempDir::new().expect("tempdir");
    let store = store_3_to_6(&dir);
    let (e4, e5, e6) = (entry(4, 4), entry(5, 5), entry(6, 6));
    let max = u64::MAX;
    let cases: Vec<(u64, u64, u64, raft::Result<Vec<Entry>>)> = vec![
        (2, 6, max, Err(compacted())),
        (3, 4, max, Err(compacted())),
        (4, 5, max, Ok(vec![e4.clone()])),
        (4, 6, max, Ok(vec![e4.clone(), e5.clone()])),
        (4, 7, max, Ok(vec![e4.clone(), e5.clone(), e6.clone()])),
        // Always at least one entry.
        (4, 7, 0, Ok(vec![e4.clone()])),
        (
            4,
            7,
            size_of(&e4) + size_of(&e5),
            Ok(vec![e4.clone(), e5.clone()]),
        ),
        (
            4,
            7,
            size_of(&e4) + size_of(&e5) + size_of(&e6) / 2,
            Ok(vec![e4.clone(), e5.clone()]),
        ),
        (
            4,
            7,
            size_of(&e4) + size_of(&e5) + size_of(&e6) - 1,
            Ok(vec![e4.clone(), e5.clone()]),
        ),
        (
            4,
            7,
            size_of(&e4) + size_of(&e5) + size_of(&e6),
            Ok(vec![e4.clone(), e5.clone(), e6.clone()]),
        ),
        (4, 8, max, Err(unavailable())),
    ];
    for (low, high, max_size, want) in cases {
        let got = store.entries(low, high, Some(max_size), ctx());
        assert_eq!(got, want, "entries({low}, {high}, {max_size})");
    }
    // NO_LIMIT and None mean unlimited.
    assert_eq!(
        store
            .entries(4, 7, raft::NO_LIMIT, ctx())
            .expect("all")
            .len(),
        3
    );
    assert_eq!(store.entries(4, 7, None, ctx()).expect("all").len(), 3);
}

#[test]
fn read_limits_by_data_bytes_and_reports_ranges() {
    let dir = TempDir::new().expect("tempdir");
    let store = open(dir.path(), 1 << 20);
    let batch: Vec<Entry> = (1..=5).map(|i| entry_with(i, 1, &[i as u8; 100])).collect();
    store.append(&batch).expect("append");
    assert_eq!(store.read(1, 6, 0).expect("read"), batch[..1].to_vec());
    assert_eq!(store.read(1, 6, 199).expect("read"), batch[..1].to_vec());
    assert_eq!(store.read(1, 6, 200).expect("read"), batch[..2].to_vec());
    assert_eq!(store.read(2, 6, 350).expect("read"), batch[1..4].to_vec());
    assert_eq!(store.read(1, 6, u64::MAX).expect("read"), batch);
    assert!(matches!(
        store.read(1, 7, 10),
        Err(StoreError::Unavailable {
            index: 7,
            last_index: 5
        })
    ));
    assert_eq!(
        store.read(6, 6, 10).expect("empty range at the end"),
        vec![]
    );
}

#[test]
fn append_truncates_conflicting_suffix() {
    // Snapshot at 2, then entries 3, 4, 5 with term = index.
    let base = |dir: &TempDir| {
        let store = open(dir.path(), 1 << 20);
        store
            .apply_snapshot(snapshot(2, 2, &[1], b""))
            .expect("apply");
        store
            .append(&[entry(3, 3), entry(4, 4), entry(5, 5)])
            .expect("append");
        store
    };
    let cases: Vec<(Vec<Entry>, Vec<Entry>)> = vec![
        // Same entries again: unchanged.
        (
            vec![entry(3, 3), entry(4, 4), entry(5, 5)],
            vec![entry(3, 3), entry(4, 4), entry(5, 5)],
        ),
        // Conflict in the middle: the suffix is replaced.
        (
            vec![entry(4, 6), entry(5, 6)],
            vec![entry(3, 3), entry(4, 6), entry(5, 6)],
        ),
        // Overlap and extend.
        (
            vec![entry(4, 4), entry(5, 5), entry(6, 5)],
            vec![entry(3, 3), entry(4, 4), entry(5, 5), entry(6, 5)],
        ),
        // Conflict at the first index: the whole log is replaced.
        (vec![entry(3, 7)], vec![entry(3, 7)]),
        // Plain extension.
        (
            vec![entry(6, 5)],
            vec![entry(3, 3), entry(4, 4), entry(5, 5), entry(6, 5)],
        ),
    ];
    for (append, want) in cases {
        let dir = TempDir::new().expect("tempdir");
        let store = base(&dir);
        store.append(&append).expect("append");
        assert_eq!(all_entries(&store), want);
        drop(store);
        let store = open(dir.path(), 1 << 20);
        assert_eq!(all_entries(&store), want, "after reopen");
        assert_eq!(store.term(2).expect("snapshot term"), 2);
    }
}

#[test]
fn append_rejects_gaps_snapshotted_indexes_and_non_contiguous_batches() {
    let dir = TempDir::new().expect("tempdir");
    let store = store_3_to_6(&dir);
    assert!(matches!(
        store.append(&[entry(8, 6)]),
        Err(StoreError::InvalidAppend {
            index: 8,
            min: 4,
            max: 7
        })
    ));
    assert!(matches!(
        store.append(&[entry(3, 6)]),
        Err(StoreError::InvalidAppend { index: 3, .. })
    ));
    assert!(matches!(
        store.append(&[entry(7, 6), entry(9, 6)]),
        Err(StoreError::NonContiguous {
            expected: 8,
            found: 9
        })
    ));
    store.append(&[]).expect("empty append is a no-op");
    assert_eq!(first_last(&store), (4, 6));
}

#[test]
fn snapshot_is_returned_only_when_it_covers_the_request() {
    let dir = TempDir::new().expect("tempdir");
    let store = store_3_to_6(&dir);
    let snap = store.snapshot(3, 2).expect("snapshot at 3");
    assert_eq!(snap.get_metadata().index, 3);
    assert_eq!(
        store
            .snapshot(0, 2)
            .expect("older request")
            .get_metadata()
            .index,
        3
    );
    assert_eq!(
        store.snapshot(4, 2),
        Err(raft::Error::Store(
            StorageError::SnapshotTemporarilyUnavailable
        ))
    );
}

#[test]
fn initial_state_reports_hard_and_conf_state() {
    let dir = TempDir::new().expect("tempdir");
    let store = open(dir.path(), 1 << 20);
    store.append(&entries(1..=5, 1)).expect("append");
    // No conf state set: the compaction snapshot's is used.
    store
        .compact(snapshot(3, 1, &[1, 2, 3], b"sm"))
        .expect("compact");
    let state = store.initial_state().expect("initial state");
    assert_eq!(state.conf_state.voters, vec![1, 2, 3]);
    store.set_hard_state(&hard_state(4, 2, 5)).expect("hs");
    store.set_conf_state(&voters(&[1, 2])).expect("cs");
    let state = store.initial_state().expect("initial state");
    assert_eq!(state.hard_state, hard_state(4, 2, 5));
    assert_eq!(state.conf_state, voters(&[1, 2]));
}

#[test]
fn store_errors_map_to_raft_errors() {
    let compacted: raft::Error = StoreError::Compacted {
        index: 1,
        first_index: 2,
    }
    .into();
    assert_eq!(compacted, raft::Error::Store(StorageError::Compacted));
    let corrupt: raft::Error = StoreError::Corrupt {
        path: "x".into(),
        position: 0,
        reason: "bad".into(),
    }
    .into();
    assert!(matches!(
        corrupt,
        raft::Error::Store(StorageError::Other(_))
    ));
}
