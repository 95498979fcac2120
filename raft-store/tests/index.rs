//! Segment index files: open loads sealed segments from them without
//! reading the segments, and never trusts one that does not describe the
//! segment file as it is.

mod common;

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::Path;

use common::*;
use covet_raft_store::{GroupStorage, LogOptions, OpenStats, SegmentInfo, StoreError};
use raft::prelude::Entry;
use raft::Storage;
use tempfile::TempDir;

const SEGMENT_BYTES: u64 = 300;

/// Entries 1..=`last` (term 1, then term 2 from 31), with hard and conf
/// state, in many segments; synced and closed.
fn many_segments(dir: &Path, last: u64) -> Vec<SegmentInfo> {
    let store = open(dir, SEGMENT_BYTES);
    for chunk in (1..=last).collect::<Vec<_>>().chunks(7) {
        let batch: Vec<Entry> = chunk
            .iter()
            .map(|&i| entry(i, if i <= 30 { 1 } else { 2 }))
            .collect();
        store.append(&batch).expect("append");
    }
    store.set_conf_state(&voters(&[1, 2])).expect("cs");
    store.set_hard_state(&hard_state(2, 1, last)).expect("hs");
    store.sync().expect("sync");
    store.segments()
}

/// Everything observable about a store, for comparing two opens.
fn observe(store: &GroupStorage) -> impl PartialEq + std::fmt::Debug {
    let (first, last) = first_last(store);
    let terms: Vec<_> = (0..=last + 1).map(|i| store.term(i).ok()).collect();
    (
        store.segments(),
        all_entries(store),
        terms,
        store.hard_state(),
        store.conf_state(),
        first,
    )
}

fn scanned_bytes(segments: &[SegmentInfo]) -> u64 {
    segments.iter().map(|s| s.bytes - 32).sum()
}

#[test]
fn open_reads_only_the_last_segment() {
    let dir = TempDir::new().expect("tempdir");
    let segments = many_segments(dir.path(), 200);
    let n = segments.len();
    assert!(n > 10, "{segments:?}");
    // Every sealed segment has an index; the active one has none.
    let files = segment_files(dir.path());
    let indexes: Vec<_> = files[..n - 1].iter().map(|f| index_of(f)).collect();
    assert_eq!(index_files(dir.path()), indexes);

    let store = open(dir.path(), SEGMENT_BYTES);
    let stats = store.open_stats();
    assert_eq!(
        stats,
        OpenStats {
            segments_indexed: n - 1,
            segments_scanned: 1,
            bytes_scanned: scanned_bytes(&segments[n - 1..]),
            index_bytes_read: indexes
                .iter()
                .map(|f| fs::metadata(f).expect("stat").len())
                .sum(),
            indexes_written: 0,
            ..stats
        }
    );
    let fast = observe(&store);
    assert_eq!(store.segments(), segments);
    drop(store);

    // Without indexes, open scans everything, and rebuilds the same state
    // and the same indexes.
    let saved: Vec<_> = indexes.iter().map(|f| fs::read(f).expect("read")).collect();
    assert_eq!(remove_index_files(dir.path()), n - 1);
    let store = open(dir.path(), SEGMENT_BYTES);
    let stats = store.open_stats();
    assert_eq!(stats.segments_scanned, n);
    assert_eq!(stats.segments_indexed, 0);
    assert_eq!(stats.bytes_scanned, scanned_bytes(&segments));
    assert_eq!(stats.indexes_written, n - 1);
    assert_eq!(observe(&store), fast);
    drop(store);
    for (path, bytes) in indexes.iter().zip(&saved) {
        assert_eq!(&fs::read(path).expect("rewritten"), bytes);
    }
    let store = open(dir.path(), SEGMENT_BYTES);
    assert_eq!(store.open_stats().segments_scanned, 1);
    assert_eq!(observe(&store), fast);
}

#[test]
fn bit_rot_in_an_indexed_segment_is_caught_by_reads() {
    let dir = TempDir::new().expect("tempdir");
    let segments = many_segments(dir.path(), 60);
    // The last entry of the first segment: open would call it a torn tail
    // if that segment were scanned as the last.
    let bad = segments[0].last_index;
    flip_bit_in(dir.path(), format!("entry-{bad:06}").as_bytes());

    let store = open(dir.path(), SEGMENT_BYTES);
    assert_eq!(store.open_stats().segments_scanned, 1);
    assert_eq!(store.segments(), segments);
    assert_eq!(store.term(bad).expect("term from the index"), 1);
    for (low, high) in [(bad, bad + 1), (1, 61), (bad, 61)] {
        let err = store.read(low, high, u64::MAX).expect_err("corrupt");
        assert!(
            matches!(&err, StoreError::Corrupt { reason, .. } if reason.contains("checksum")),
            "{err:?}"
        );
    }
    assert_eq!(
        store.read(1, bad, u64::MAX).expect("entries before"),
        entries(1..=bad - 1, 1)
    );
    assert_eq!(
        store
            .read(bad + 1, 61, u64::MAX)
            .expect("entries after")
            .len() as u64,
        60 - bad
    );
    drop(store);

    // Without its index, open reads the segment and refuses the log.
    fs::remove_file(index_of(&segment_files(dir.path())[0])).expect("remove index");
    let err = GroupStorage::open(
        dir.path(),
        LogOptions {
            segment_bytes: SEGMENT_BYTES,
        },
    )
    .expect_err("corrupt");
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
}

#[test]
fn index_of_a_segment_with_another_length_is_ignored() {
    let dir = TempDir::new().expect("tempdir");
    many_segments(dir.path(), 60);
    let sealed = segment_files(dir.path()).remove(1);
    let len = fs::metadata(&sealed).expect("stat").len();
    // Bytes after the end the index records: trusting the index would
    // hide them; scanning finds a bad frame in a sealed segment.
    let mut file = OpenOptions::new().append(true).open(&sealed).expect("open");
    file.write_all(&[0xab; 40]).expect("append garbage");
    let err = GroupStorage::open(
        dir.path(),
        LogOptions {
            segment_bytes: SEGMENT_BYTES,
        },
    )
    .expect_err("corrupt");
    assert!(
        matches!(&err, StoreError::Corrupt { path, position, .. } if *path == sealed && *position == len),
        "{err:?}"
    );
    // Put the file back as it was: the index is trusted again.
    file.set_len(len).expect("cut garbage");
    let store = open(dir.path(), SEGMENT_BYTES);
    assert_eq!(store.open_stats().segments_scanned, 1);
    assert_eq!(all_entries(&store).len(), 60);
}

#[test]
fn index_of_another_segment_or_group_is_ignored() {
    // Two groups written identically: same file names and lengths, but
    // every segment has its own random salt.
    let (a, b) = (TempDir::new().expect("a"), TempDir::new().expect("b"));
    assert_eq!(many_segments(a.path(), 60), many_segments(b.path(), 60));
    let store = open(b.path(), SEGMENT_BYTES);
    let want = observe(&store);
    drop(store);
    let a_indexes = index_files(a.path());
    let n = a_indexes.len();
    for index in &a_indexes {
        let into = b.path().join(index.file_name().expect("name"));
        fs::copy(index, into).expect("copy index");
    }
    let store = open(b.path(), SEGMENT_BYTES);
    let stats = store.open_stats();
    assert_eq!((stats.segments_scanned, stats.indexes_written), (n + 1, n));
    assert_eq!(observe(&store), want);
    drop(store);

    // An index under another segment's name describes another first index.
    let b_indexes = index_files(b.path());
    fs::copy(&b_indexes[1], &b_indexes[0]).expect("copy index");
    let store = open(b.path(), SEGMENT_BYTES);
    let stats = store.open_stats();
    assert_eq!((stats.segments_scanned, stats.indexes_written), (2, 1));
    assert_eq!(observe(&store), want);
}

#[test]
fn truncation_removes_the_index_of_the_segment_it_cuts_into() {
    let dir = TempDir::new().expect("tempdir");
    let segments = many_segments(dir.path(), 60);
    let files = segment_files(dir.path());
    let cut_into = 2;
    let stale = fs::read(index_of(&files[cut_into])).expect("index");
    let store = open(dir.path(), SEGMENT_BYTES);
    let at = segments[cut_into].first_index + 1;
    store
        .append(&[entry_with(at, 3, b"replacement")])
        .expect("conflicting append");
    store.sync().expect("sync");
    // Only the segments before the cut keep their indexes.
    let kept: Vec<_> = files[..cut_into].iter().map(|f| index_of(f)).collect();
    assert_eq!(index_files(dir.path()), kept);
    let mut want = entries(1..=at - 1, 1);
    want.push(entry_with(at, 3, b"replacement"));
    assert_eq!(all_entries(&store), want);
    drop(store);

    // Had the removal not been durable, the stale index would be back; it
    // must not be trusted for what is now the last segment.
    fs::write(index_of(&files[cut_into]), &stale).expect("restore stale index");
    let store = open(dir.path(), SEGMENT_BYTES);
    assert_eq!(store.open_stats().segments_scanned, 1);
    assert_eq!(all_entries(&store), want);
    assert!(!index_of(&files[cut_into]).exists());

    // Fill the segment again until it is sealed: it gets a fresh index.
    let more: Vec<Entry> = (at + 1..=at + 20).map(|i| entry(i, 3)).collect();
    store.append(&more).expect("append");
    store.sync().expect("sync");
    want.extend(more);
    assert!(store.segments().len() > cut_into + 1);
    let fresh = fs::read(index_of(&files[cut_into])).expect("fresh index");
    assert_ne!(fresh, stale);
    drop(store);
    let store = open(dir.path(), SEGMENT_BYTES);
    assert_eq!(store.open_stats().segments_scanned, 1);
    assert_eq!(all_entries(&store), want);
    drop(store);

    // A stale index over the fresh one describes another length.
    fs::write(index_of(&files[cut_into]), &stale).expect("restore stale index");
    let store = open(dir.path(), SEGMENT_BYTES);
    let stats = store.open_stats();
    assert_eq!((stats.segments_scanned, stats.indexes_written), (2, 1));
    assert_eq!(all_entries(&store), want);
    assert_eq!(store.term(at).expect("term"), 3);
    assert_eq!(
        fs::read(index_of(&files[cut_into])).expect("rewritten"),
        fresh
    );
}

#[test]
fn index_of_the_last_segment_is_loaded_then_removed_on_open() {
    let dir = TempDir::new().expect("tempdir");
    let segments = many_segments(dir.path(), 60);
    let n = segments.len();
    // A crash after sealing a segment, before the next one was created.
    let files = segment_files(dir.path());
    fs::remove_file(&files[n - 1]).expect("remove newest segment");
    let last = segments[n - 2].last_index;
    let store = open(dir.path(), SEGMENT_BYTES);
    let stats = store.open_stats();
    assert_eq!((stats.segments_indexed, stats.segments_scanned), (n - 1, 0));
    // Gone before anything is appended to the segment it describes.
    assert!(!index_of(&files[n - 2]).exists());
    assert_eq!(first_last(&store), (1, last));
    store
        .append(&[entry(last + 1, 2), entry(last + 2, 2)])
        .expect("append");
    store.sync().expect("sync");
    drop(store);
    let store = open(dir.path(), SEGMENT_BYTES);
    assert_eq!(first_last(&store), (1, last + 2));
    assert_eq!(all_entries(&store).len() as u64, last + 2);
}

/// Entries 1..=`count` of 4 KiB each in one segment, synced; the handle.
fn big_active_segment(dir: &Path, count: u64) -> GroupStorage {
    let store = open(dir, 64 << 20);
    let data = vec![3u8; 4096];
    let batch: Vec<Entry> = (1..=count).map(|i| entry_with(i, 1, &data)).collect();
    store.append(&batch).expect("append");
    store.set_hard_state(&hard_state(1, 1, count)).expect("hs");
    store.sync().expect("sync");
    store
}

#[test]
fn a_clean_stop_seals_the_active_segment_so_open_does_not_scan_it() {
    let dir = TempDir::new().expect("tempdir");
    let store = big_active_segment(dir.path(), 400);
    let written = all_entries(&store);
    assert!(store.seal_for_restart().expect("seal"));
    let files = segment_files(dir.path());
    assert_eq!(files.len(), 1);
    // Its unused preallocated space is cut: the index describes the file.
    assert_eq!(
        fs::metadata(&files[0]).expect("stat").len(),
        store.segments()[0].bytes
    );
    drop(store);
    let store = open(dir.path(), 64 << 20);
    let stats = store.open_stats();
    assert_eq!(stats.segments_scanned, 0, "{stats:?}");
    assert_eq!(stats.bytes_scanned, 0, "{stats:?}");
    assert_eq!(stats.segments_indexed, 1, "{stats:?}");
    assert!(!index_of(&files[0]).exists());
    assert_eq!(all_entries(&store), written);
    assert_eq!(store.hard_state(), hard_state(1, 1, 400));
    // Appends after it, then a crash (no seal): open scans, finds all.
    append_401_then_crash_and_reopen(dir.path(), store);
}

#[test]
fn a_small_active_segment_is_not_sealed() {
    let dir = TempDir::new().expect("tempdir");
    let store = big_active_segment(dir.path(), 10);
    assert!(!store.seal_for_restart().expect("seal"));
    drop(store);
    let store = open(dir.path(), 64 << 20);
    assert_eq!(store.open_stats().segments_scanned, 1);
    assert_eq!(first_last(&store), (1, 10));
}

#[test]
fn writing_after_a_seal_removes_the_index_first() {
    let dir = TempDir::new().expect("tempdir");
    let store = big_active_segment(dir.path(), 400);
    assert!(store.seal_for_restart().expect("seal"));
    let files = segment_files(dir.path());
    assert!(index_of(&files[0]).exists());
    store.append(&[entry(401, 1)]).expect("append");
    assert!(
        !index_of(&files[0]).exists(),
        "a stale index would outlive the write"
    );
    store.sync().expect("sync");
    drop(store);
    let store = open(dir.path(), 64 << 20);
    assert_eq!(store.open_stats().segments_scanned, 1);
    assert_eq!(first_last(&store), (1, 401));
}

/// Appends entry 401 after `big_active_segment(_, 400)`, syncs, drops the
/// handle without a seal (a crash): open scans the segment and finds all.
fn append_401_then_crash_and_reopen(dir: &Path, store: GroupStorage) {
    store.append(&[entry(401, 1)]).expect("append");
    store.sync().expect("sync");
    drop(store);
    let store = open(dir, 64 << 20);
    assert_eq!(store.open_stats().segments_scanned, 1);
    assert_eq!(first_last(&store), (1, 401));
}

#[test]
fn damage_in_a_segment_loaded_from_its_index_is_corruption_when_scanned_later() {
    let dir = TempDir::new().expect("tempdir");
    let store = big_active_segment(dir.path(), 400);
    assert!(store.seal_for_restart().expect("seal"));
    drop(store);
    // Loaded from the index (which open then removes), closed without a
    // seal: the next open scans it.
    drop(open(dir.path(), 64 << 20));
    let files = segment_files(dir.path());
    let bytes = fs::read(&files[0]).expect("read");
    let middle = bytes.len() as u64 / 2;
    let file = OpenOptions::new()
        .write(true)
        .open(&files[0])
        .expect("open");
    std::os::unix::fs::FileExt::write_all_at(&file, &[bytes[middle as usize] ^ 0x10], middle)
        .expect("flip");
    let err = GroupStorage::open(dir.path(), LogOptions::default()).expect_err("corrupt");
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
}

#[test]
fn leftover_index_files_are_removed_on_open() {
    let dir = TempDir::new().expect("tempdir");
    many_segments(dir.path(), 60);
    let before = index_files(dir.path());
    let orphan = dir.path().join(format!("{:020}.idx", 1000));
    let unfinished = dir.path().join(format!("{:020}.idx.tmp", 1));
    fs::write(&orphan, b"no such segment").expect("write");
    fs::write(&unfinished, b"half an index").expect("write");
    let store = open(dir.path(), SEGMENT_BYTES);
    assert!(!orphan.exists() && !unfinished.exists());
    assert_eq!(index_files(dir.path()), before);
    assert_eq!(store.open_stats().segments_scanned, 1);
}
