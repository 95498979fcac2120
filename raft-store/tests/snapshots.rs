//! Compaction (retention) and `apply_snapshot`, including what a crash in
//! the middle of either leaves behind.

mod common;

use std::fs;
use std::path::PathBuf;

use common::*;
use covet_raft_store::{GroupStorage, StoreError};
use raft::{Storage, StorageError};
use tempfile::TempDir;

const SEGMENT_BYTES: u64 = 200;

/// Entries 1..=40, term 1 up to 20 and term 2 after, in many segments.
fn forty_entries(dir: &TempDir) -> GroupStorage {
    let store = open(dir.path(), SEGMENT_BYTES);
    store.append(&entries(1..=20, 1)).expect("append");
    store.append(&entries(21..=40, 2)).expect("append");
    store.set_conf_state(&voters(&[1])).expect("cs");
    store.set_hard_state(&hard_state(2, 1, 40)).expect("hs");
    store.sync().expect("sync");
    assert!(store.segments().len() > 4);
    store
}

#[test]
fn compaction_unlinks_whole_segments_and_survives_reopen() {
    let dir = TempDir::new().expect("tempdir");
    let store = forty_entries(&dir);
    let before = store.segments();
    store
        .compact(snapshot(23, 2, &[1], b"state at 23"))
        .expect("compact");

    let kept = before
        .iter()
        .position(|s| s.last_index > 23)
        .expect("a segment beyond 23");
    let first = before[kept].first_index;
    assert!(first <= 24);
    assert_eq!(store.segments(), before[kept..].to_vec());
    assert_eq!(segment_files(dir.path()).len(), before.len() - kept);
    // The removed segments' indexes are gone; the kept sealed ones remain.
    let files = segment_files(dir.path());
    let sealed: Vec<_> = files[..files.len() - 1]
        .iter()
        .map(|f| index_of(f))
        .collect();
    assert_eq!(index_files(dir.path()), sealed);
    let check = |store: &GroupStorage| {
        assert_eq!(first_last(store), (first, 40));
        let prev_term = if first - 1 <= 20 { 1 } else { 2 };
        assert_eq!(store.term(first - 1).expect("term before first"), prev_term);
        assert_eq!(
            store.term(first - 2),
            Err(raft::Error::Store(StorageError::Compacted))
        );
        assert_eq!(
            store.read(first, 41, u64::MAX).expect("read").len() as u64,
            41 - first
        );
        assert!(matches!(
            store.read(first - 1, 41, 10),
            Err(StoreError::Compacted { .. })
        ));
        let snap = store.snapshot(23, 2).expect("snapshot");
        assert_eq!(snap.get_metadata().index, 23);
        assert_eq!(&snap.data[..], b"state at 23");
        assert_eq!(store.hard_state(), hard_state(2, 1, 40));
        assert_eq!(store.conf_state(), voters(&[1]));
    };
    check(&store);
    drop(store);
    let store = open(dir.path(), SEGMENT_BYTES);
    check(&store);
    let stats = store.open_stats();
    assert_eq!(
        (stats.segments_indexed, stats.segments_scanned),
        (sealed.len(), 1)
    );
    store
        .append(&entries(41..=45, 2))
        .expect("append after reopen");
    assert_eq!(first_last(&store), (first, 45));
}

#[test]
fn compaction_never_unlinks_the_active_segment() {
    let dir = TempDir::new().expect("tempdir");
    let store = forty_entries(&dir);
    store.compact(snapshot(40, 2, &[1], b"")).expect("compact");
    let segments = store.segments();
    assert_eq!(segments.len(), 1);
    assert_eq!(segments[0].last_index, 40);
    assert!(segments[0].first_index <= 40);
    // Nothing may be appended at or below the snapshot index.
    assert!(matches!(
        store.append(&[entry(40, 3)]),
        Err(StoreError::InvalidAppend { .. })
    ));
    store.append(&[entry(41, 3)]).expect("append");
    drop(store);
    let store = open(dir.path(), SEGMENT_BYTES);
    assert_eq!(store.term(41).expect("term"), 3);
}

#[test]
fn compaction_rejects_bad_snapshots() {
    let dir = TempDir::new().expect("tempdir");
    let store = forty_entries(&dir);
    let err = store
        .compact(snapshot(41, 2, &[1], b""))
        .expect_err("beyond last");
    assert!(matches!(err, StoreError::InvalidSnapshot { index: 41, .. }));
    let err = store
        .compact(snapshot(30, 1, &[1], b""))
        .expect_err("wrong term");
    assert!(matches!(err, StoreError::InvalidSnapshot { index: 30, .. }));
    store.compact(snapshot(30, 2, &[1], b"")).expect("compact");
    let err = store
        .compact(snapshot(25, 2, &[1], b""))
        .expect_err("older");
    assert!(matches!(
        err,
        StoreError::SnapshotOutOfDate {
            index: 25,
            current: 30
        }
    ));
}

/// Copies of the current segment files, to put back later and play a
/// crash that happened before they were unlinked.
fn save_segments(dir: &TempDir) -> Vec<(PathBuf, Vec<u8>)> {
    segment_files(dir.path())
        .into_iter()
        .map(|p| {
            let bytes = fs::read(&p).expect("read");
            (p, bytes)
        })
        .collect()
}

fn restore_missing(saved: &[(PathBuf, Vec<u8>)]) -> usize {
    let mut restored = 0;
    for (path, bytes) in saved {
        if !path.exists() {
            fs::write(path, bytes).expect("restore");
            restored += 1;
        }
    }
    restored
}

#[test]
fn crash_between_snapshot_write_and_unlink_is_finished_on_open() {
    let dir = TempDir::new().expect("tempdir");
    let store = forty_entries(&dir);
    let saved = save_segments(&dir);
    store.compact(snapshot(30, 2, &[1], b"")).expect("compact");
    let (first, last) = first_last(&store);
    drop(store);
    assert!(restore_missing(&saved) > 0);

    let store = open(dir.path(), SEGMENT_BYTES);
    assert_eq!(first_last(&store), (first, last));
    assert_eq!(segment_files(dir.path()).len(), store.segments().len());
    assert_eq!(index_files(dir.path()).len(), store.segments().len() - 1);
    assert_eq!(store.hard_state(), hard_state(2, 1, 40));
}

#[test]
fn apply_snapshot_discards_the_log() {
    let dir = TempDir::new().expect("tempdir");
    let store = forty_entries(&dir);
    store
        .apply_snapshot(snapshot(60, 5, &[1, 2, 3], b"leader state"))
        .expect("apply");
    let check = |store: &GroupStorage| {
        assert_eq!(first_last(store), (61, 60));
        assert_eq!(store.term(60).expect("snapshot term"), 5);
        assert_eq!(
            store.term(59),
            Err(raft::Error::Store(StorageError::Compacted))
        );
        let state = store.initial_state().expect("state");
        assert_eq!(state.conf_state, voters(&[1, 2, 3]));
        assert_eq!(state.hard_state, hard_state(5, 1, 60));
        assert_eq!(
            &store.snapshot(60, 1).expect("snapshot").data[..],
            b"leader state"
        );
        assert_eq!(segment_files(dir.path()).len(), 1);
        assert!(index_files(dir.path()).is_empty());
    };
    check(&store);
    drop(store);
    let store = open(dir.path(), SEGMENT_BYTES);
    check(&store);
    store.append(&entries(61..=70, 5)).expect("append");
    drop(store);
    let store = open(dir.path(), SEGMENT_BYTES);
    assert_eq!(all_entries(&store), entries(61..=70, 5));
}

#[test]
fn apply_snapshot_below_the_last_index_discards_everything() {
    let dir = TempDir::new().expect("tempdir");
    let store = forty_entries(&dir);
    let saved = save_segments(&dir);
    store
        .apply_snapshot(snapshot(25, 3, &[1, 2], b""))
        .expect("apply");
    assert_eq!(first_last(&store), (26, 25));
    assert_eq!(store.hard_state(), hard_state(3, 1, 40));
    drop(store);

    // A crash before the old segments were unlinked: some are named above
    // the snapshot, and only their older generation marks them stale.
    assert!(restore_missing(&saved) > 0);
    let store = open(dir.path(), SEGMENT_BYTES);
    assert_eq!(first_last(&store), (26, 25));
    assert_eq!(segment_files(dir.path()).len(), 1);
    store.append(&entries(26..=30, 3)).expect("append");
    assert_eq!(
        store.read(26, 31, u64::MAX).expect("read"),
        entries(26..=30, 3)
    );
}

#[test]
fn crash_before_the_new_segment_exists_recovers_from_the_snapshot_file() {
    let dir = TempDir::new().expect("tempdir");
    let store = forty_entries(&dir);
    store
        .apply_snapshot(snapshot(60, 5, &[1, 2, 3], b""))
        .expect("apply");
    drop(store);
    for path in segment_files(dir.path()) {
        fs::remove_file(path).expect("remove");
    }
    let store = open(dir.path(), SEGMENT_BYTES);
    assert_eq!(first_last(&store), (61, 60));
    let state = store.initial_state().expect("state");
    assert_eq!(state.hard_state, hard_state(5, 1, 60));
    assert_eq!(state.conf_state, voters(&[1, 2, 3]));
}

#[test]
fn out_of_date_snapshot_is_refused() {
    let dir = TempDir::new().expect("tempdir");
    let store = forty_entries(&dir);
    store
        .apply_snapshot(snapshot(60, 5, &[1], b""))
        .expect("apply");
    let err = store
        .apply_snapshot(snapshot(50, 5, &[1], b""))
        .expect_err("older");
    assert!(matches!(err, StoreError::SnapshotOutOfDate { .. }));
    let raft_err: raft::Error = err.into();
    assert_eq!(
        raft_err,
        raft::Error::Store(StorageError::SnapshotOutOfDate)
    );
}

#[test]
fn leftover_snapshot_temp_file_is_ignored() {
    let dir = TempDir::new().expect("tempdir");
    let store = forty_entries(&dir);
    store.compact(snapshot(10, 1, &[1], b"a")).expect("compact");
    drop(store);
    fs::write(dir.path().join("snapshot.tmp"), b"half a snapshot").expect("write tmp");
    let store = open(dir.path(), SEGMENT_BYTES);
    assert_eq!(&store.stored_snapshot().data[..], b"a");
    assert!(!dir.path().join("snapshot.tmp").exists());
}
