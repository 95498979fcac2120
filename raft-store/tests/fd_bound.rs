//! The number of open segment files stays bounded whatever the number of
//! groups and segments: descriptors come from a process-wide cache (see
//! `set_max_open_files`). Its own test binary, so that no other test's
//! files are counted, and one test at a time for the same reason.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

use common::*;
use covet_raft_store::{set_max_open_files, GroupStorage, StoreError};
use raft::prelude::Snapshot;
use raft::Storage;
use tempfile::TempDir;

/// Tests in this binary each count the process's descriptors: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// Descriptors this process has open now.
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("list /proc/self/fd")
        .count()
}

const GROUPS: u64 = 20;
const ENTRIES: u64 = 20;
const BOUND: usize = 16;
/// Descriptors an operation may hold beyond the cache (the one being
/// read or written, a directory being fsynced, the listing of
/// `/proc/self/fd` itself) plus slack for the test harness.
const SLACK: usize = 8;

/// 20 groups of ~20 segments each (400 segment files) never hold more
/// than the bound open: while writing, after syncing, while reading every
/// entry back, and after reopening them all.
#[test]
fn many_groups_and_segments_stay_within_the_descriptor_bound() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    set_max_open_files(BOUND);
    let root = TempDir::new().expect("tempdir");
    let baseline = open_fds();
    let limit = baseline + BOUND + SLACK;
    let check = |when: &str| {
        let now = open_fds();
        assert!(
            now <= limit,
            "{now} descriptors open {when}; baseline {baseline}, bound {BOUND}"
        );
    };

    let dir = |g: u64| root.path().join(format!("group-{g}"));
    let mut groups: Vec<GroupStorage> = (0..GROUPS).map(|g| open(&dir(g), 120)).collect();
    check("after creating the groups");
    // Interleave the groups, so that every write finds its file evicted.
    for index in 1..=ENTRIES {
        for store in &groups {
            store.append(&entries(index..=index, 1)).expect("append");
        }
        if index % 10 == 0 {
            for store in &groups {
                store.sync().expect("sync");
            }
            check("while writing");
        }
    }
    let segments: usize = groups.iter().map(|s| s.segments().len()).sum();
    assert!(
        segments > 10 * BOUND,
        "only {segments} segments: the test would prove nothing"
    );
    for store in &groups {
        assert_eq!(all_entries(store), entries(1..=ENTRIES, 1));
    }
    check("after reading everything");

    // Reopen everything, as a restarting broker does.
    groups.clear();
    groups = (0..GROUPS).map(|g| open(&dir(g), 120)).collect();
    check("after reopening");
    for store in &groups {
        assert_eq!(all_entries(store), entries(1..=ENTRIES, 1));
        assert_eq!(store.term(ENTRIES).expect("term"), 1);
    }
    check("after reading everything again");
}

/// With a cache of 4 files, readers race appends, suffix truncations,
/// compaction and snapshots in several groups: every read is a correct
/// run or a clean `Compacted` / `Unavailable`, never a failed open of a
/// removed (or re-created) segment.
#[test]
fn reads_race_removals_with_a_tiny_cache() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    set_max_open_files(4);
    let root = TempDir::new().expect("tempdir");
    let stores: Vec<GroupStorage> = (0..3)
        .map(|g| open(&root.path().join(format!("g{g}")), 200))
        .collect();
    for store in &stores {
        store.append(&entries(1..=5, 1)).expect("append");
    }
    let done = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..4)
        .map(|r| {
            let (store, done) = (stores[r % stores.len()].clone(), Arc::clone(&done));
            thread::spawn(move || {
                let mut reads = 0u64;
                while !done.load(Ordering::Relaxed) {
                    let (first, last) = first_last(&store);
                    match store.read(first, last + 1, 2_000) {
                        Ok(read) => {
                            for (i, e) in read.iter().enumerate() {
                                assert_eq!(e.index, first + i as u64);
                                assert_eq!(e.data, entry(e.index, e.term).data);
                            }
                        }
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
    for round in 0..30u64 {
        for store in &stores {
            let last = store.last_index().expect("last");
            match round % 6 {
                // A conflicting suffix: truncation removes segments whose
                // names the following appends create again.
                0 => {
                    let snapshot = store.stored_snapshot().get_metadata().index;
                    let from = (last.saturating_sub(6)).max(snapshot + 1);
                    term += 1;
                    store
                        .append(&entries(from..=last + 2, term))
                        .expect("truncating append");
                }
                3 => {
                    let first = store.first_index().expect("first");
                    let at = (first + last) / 2;
                    let mut snap = Snapshot::default();
                    snap.mut_metadata().index = at;
                    snap.mut_metadata().term = store.term(at).expect("term");
                    store.compact(snap).expect("compact");
                }
                5 => {
                    let mut snap = Snapshot::default();
                    snap.mut_metadata().index = last + 3;
                    snap.mut_metadata().term = term;
                    store.apply_snapshot(snap).expect("apply snapshot");
                    store
                        .append(&entries(last + 4..=last + 6, term))
                        .expect("append after snapshot");
                }
                _ => {
                    store
                        .append(&entries(last + 1..=last + 4, term))
                        .expect("append");
                }
            }
            store.sync().expect("sync");
        }
    }
    done.store(true, Ordering::Relaxed);
    let reads: u64 = readers.into_iter().map(|r| r.join().expect("reader")).sum();
    assert!(reads > 0);
    for store in &stores {
        assert_eq!(store.fault(), None);
        let (first, last) = first_last(store);
        let read = store.read(first, last + 1, u64::MAX).expect("read");
        assert_eq!(read.len() as u64, last + 1 - first);
    }
}
