//! Reads concurrent with appends, truncations and compaction; syncs of
//! many groups from many threads.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;

use common::*;
use covet_raft_store::{GroupStorage, StoreError};
use raft::Storage;
use tempfile::TempDir;

#[test]
fn group_storage_is_send_sync_clone() {
    fn check<T: Send + Sync + Clone + 'static>() {}
    check::<GroupStorage>();
}

/// Every entry's data names its index and term; a read must return a
/// contiguous run of such entries with non-decreasing terms.
fn check_run(low: u64, entries: &[raft::prelude::Entry]) {
    let mut term = 0;
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(e.index, low + i as u64);
        assert!(e.term >= term, "terms go back at {}", e.index);
        term = e.term;
        assert_eq!(e.data, entry(e.index, e.term).data);
    }
}

#[test]
fn reads_race_appends_truncations_and_compaction() {
    let dir = TempDir::new().expect("tempdir");
    let store = open(dir.path(), 300);
    store.append(&entries(1..=5, 1)).expect("append");
    let done = Arc::new(AtomicBool::new(false));

    let readers: Vec<_> = (0..3)
        .map(|_| {
            let (store, done) = (store.clone(), Arc::clone(&done));
            thread::spawn(move || {
                let mut reads = 0;
                while !done.load(Ordering::Relaxed) {
                    let (first, last) = first_last(&store);
                    match store.read(first, last + 1, 1500) {
                        Ok(entries) => check_run(first, &entries),
                        // The log moved between first_last and read.
                        Err(StoreError::Compacted { .. } | StoreError::Unavailable { .. }) => {}
                        Err(other) => panic!("read failed: {other}"),
                    }
                    reads += 1;
                }
                reads
            })
        })
        .collect();

    let mut term = 1;
    for round in 0..150u64 {
        let last = store.last_index().expect("last");
        let start = if round % 10 == 9 {
            term += 1; // A new leader overwrites the last two entries.
            last - 1
        } else {
            last + 1
        };
        store
            .append(&entries(start..=start + 4, term))
            .expect("append");
        if round % 25 == 24 {
            store.sync().expect("sync");
            let index = store.last_index().expect("last") - 10;
            let snap_term = store.term(index).expect("term");
            store
                .compact(snapshot(index, snap_term, &[1], b""))
                .expect("compact");
        }
    }
    done.store(true, Ordering::Relaxed);
    for reader in readers {
        assert!(reader.join().expect("reader panicked") > 0);
    }
    let (first, _) = first_last(&store);
    check_run(first, &all_entries(&store));
}

#[test]
fn many_groups_sync_concurrently() {
    let dir = TempDir::new().expect("tempdir");
    let groups: Vec<GroupStorage> = (0..8)
        .map(|g| open(&dir.path().join(format!("group-{g}")), 400))
        .collect();
    let writers: Vec<_> = groups
        .iter()
        .cloned()
        .map(|store| {
            thread::spawn(move || {
                for i in 1..=40 {
                    store.append(&[entry(i, 1)]).expect("append");
                    store.set_hard_state(&hard_state(1, 1, i)).expect("hs");
                    store.sync().expect("sync");
                }
            })
        })
        .collect();
    // Extra syncers on the same groups must not deadlock with the writers.
    let syncers: Vec<_> = groups
        .iter()
        .cloned()
        .map(|store| {
            thread::spawn(move || {
                for _ in 0..40 {
                    store.sync().expect("sync");
                }
            })
        })
        .collect();
    for handle in writers.into_iter().chain(syncers) {
        handle.join().expect("thread panicked");
    }
    drop(groups);
    for g in 0..8 {
        let store = open(&dir.path().join(format!("group-{g}")), 400);
        assert_eq!(all_entries(&store), entries(1..=40, 1));
        assert_eq!(store.hard_state(), hard_state(1, 1, 40));
    }
}
